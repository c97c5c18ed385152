"""The type stub python/fusedrnn/_C.pyi against the extension it describes: the same public
names; for every function and method the same parameters in the same order, with the same
defaults, and the same kind of result (str, list, ndarray, ...) as pybind11's signature line
says; the same types of attributes. A name added, renamed or dropped in
csrc/bindings/module.cpp without the stub, or the other way round, fails here.

The stub is read where the package ships it, beside fusedrnn's own files: in an installed package
that is beside the extension module, where type checkers look for it (in an editable install,
python/fusedrnn of the tree, while the extension lies in site-packages). pybind11's
functions carry no __text_signature__ (inspect.signature fails on them): their signature is the
first line of __doc__, which parses as a def."""
import ast
import pathlib
import re

import pytest

import fusedrnn
from fusedrnn import _C

STUB = pathlib.Path(fusedrnn.__file__).with_name("_C.pyi")
REQUIRED = "<no default>"


def _public(name):
    return not name.startswith("_") or name == "__version__"


def _stub_members(body):
    """name -> node of the public functions, classes and annotated attributes in a body."""
    out = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            out[node.name] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = node
    return {name: node for name, node in out.items() if _public(name) or name == "__init__"}


STUB_TREE = ast.parse(STUB.read_text(), filename=str(STUB))
STUB_MEMBERS = _stub_members(STUB_TREE.body)
# The stub's type aliases (_FloatArray = npt.NDArray[...]), by name.
STUB_ALIASES = {node.targets[0].id: node.value for node in STUB_TREE.body
                if isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)}


def _signature(doc, name):
    """pybind11's signature line, the first of the docstring, as an ast.FunctionDef."""
    line = (doc or "").lstrip().split("\n", 1)[0]
    assert line.startswith(f"{name}("), (
        f"{name}: no pybind11 signature line (an overload, or not a pybind11 function?): "
        f"{line!r}")
    return ast.parse(f"def {line}: ...").body[0]


def _default(node):
    """A parameter's default as its repr (so that False is not taken for 0), or REQUIRED."""
    return REQUIRED if node is None else repr(ast.literal_eval(node))


def _params(fn):
    """[(name, default, positional only)] of an ast.FunctionDef."""
    a = fn.args
    assert a.vararg is None and a.kwarg is None, f"{fn.name}: *args / **kwargs"
    positional = a.posonlyargs + a.args
    defaults = [None] * (len(positional) - len(a.defaults)) + a.defaults
    out = [(p.arg, _default(d), i < len(a.posonlyargs))
           for i, (p, d) in enumerate(zip(positional, defaults))]
    return out + [(p.arg, _default(d), False) for p, d in zip(a.kwonlyargs, a.kw_defaults)]


def _kind(annotation):
    """The outer type of an annotation, lowercased, through the stub's aliases: List[str] and
    list[str] are 'list', npt.NDArray[...] and numpy.ndarray 'ndarray', None 'none'."""
    if isinstance(annotation, ast.Name) and annotation.id in STUB_ALIASES:
        return _kind(STUB_ALIASES[annotation.id])
    node = annotation.value if isinstance(annotation, ast.Subscript) else annotation
    if isinstance(node, ast.Constant) and node.value is None:
        return "none"
    name = node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", ast.dump(node))
    return name.lower()


def _check_function(where, stub_fn, doc, name):
    pybind = _signature(doc, name)
    got, want = _params(stub_fn), _params(pybind)
    assert [p[:2] for p in got] == [p[:2] for p in want], (
        f"{where}: the stub's parameters (name, default) {[p[:2] for p in got]} are not the "
        f"extension's {[p[:2] for p in want]}")
    # pybind11 names an argument without py::arg "argN", and it takes no keyword.
    for (param, _, positional_only) in got:
        assert positional_only == bool(re.fullmatch(r"arg\d+", param)), (
            f"{where}: {param} must be positional-only in the stub exactly when pybind11 "
            f"names it argN")
    assert _kind(stub_fn.returns) == _kind(pybind.returns), (
        f"{where}: the stub returns {ast.unparse(stub_fn.returns)}, the extension "
        f"{ast.unparse(pybind.returns)}")


def _extension_names(obj):
    return {n for n in dir(obj) if _public(n)}


def test_stub_names_are_the_extension_names():
    stub = set(STUB_MEMBERS)
    ext = _extension_names(_C)
    assert not stub - ext, f"in _C.pyi but not in fusedrnn._C: {sorted(stub - ext)}"
    assert not ext - stub, f"in fusedrnn._C but not in _C.pyi: {sorted(ext - stub)}"


FUNCTIONS = sorted(n for n in _extension_names(_C)
                   if callable(getattr(_C, n)) and not isinstance(getattr(_C, n), type))
CLASSES = sorted(n for n in _extension_names(_C) if isinstance(getattr(_C, n), type))
ATTRIBUTES = sorted(n for n in _extension_names(_C) if not callable(getattr(_C, n)))


@pytest.mark.parametrize("name", FUNCTIONS)
def test_function_signature(name):
    node = STUB_MEMBERS.get(name)
    assert isinstance(node, ast.FunctionDef), f"_C.pyi has no function {name}"
    _check_function(name, node, getattr(_C, name).__doc__, name)


@pytest.mark.parametrize("name", ATTRIBUTES)
def test_attribute_type(name):
    node = STUB_MEMBERS.get(name)
    assert isinstance(node, ast.AnnAssign), f"_C.pyi has no attribute {name}"
    assert _kind(node.annotation) == type(getattr(_C, name)).__name__


def _class_members(cls):
    """The public members pybind11 defined on a class, and __init__ where it has a constructor
    (without one, __init__ is the inherited slot that raises)."""
    members = {n: v for n, v in vars(cls).items() if _public(n)}
    init = vars(cls).get("__init__")
    if init is not None and (init.__doc__ or "").startswith("__init__("):
        members["__init__"] = init
    return members


@pytest.mark.parametrize("name", CLASSES)
def test_class_members(name):
    cls, node = getattr(_C, name), STUB_MEMBERS.get(name)
    assert isinstance(node, ast.ClassDef), f"_C.pyi has no class {name}"
    stub = _stub_members(node.body)
    ext = _class_members(cls)
    assert set(stub) == set(ext), (
        f"{name}: the stub has {sorted(stub)}, the extension {sorted(ext)}")
    for member, value in ext.items():
        fn, where = stub[member], f"{name}.{member}"
        assert isinstance(fn, ast.FunctionDef), f"{where} must be a def in the stub"
        is_property = any(isinstance(d, ast.Name) and d.id == "property"
                          for d in fn.decorator_list)
        assert is_property == isinstance(value, property), (
            f"{where}: a property in one and not in the other")
        if is_property:  # pybind11's getter: "(arg0: fusedrnn._C.X) -> T"
            getter = _signature(member + value.fget.__doc__.lstrip(), member)
            assert _kind(fn.returns) == _kind(getter.returns), where
        else:
            _check_function(where, fn, value.__doc__, member)


def test_stub_annotations_resolve():
    """Every name an annotation of the stub uses exists (a misspelt type would leave type
    checkers an unknown, i.e. Any, silently): the stub runs as Python, evaluating them."""
    exec(compile(STUB_TREE, str(STUB), "exec"), {})
