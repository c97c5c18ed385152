"""The README's Python examples run, so the documentation cannot rot.

Every ```python block of README.md is executed on its own, in a fresh namespace, in the order it
appears. Blocks that use torch are marked ``torch`` and skipped when torch is not installed.
The files, extension functions and benchmark command lines it names exist and parse.
"""
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
_FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(text):
    """(line number, source) of every ```python block."""
    return [(text.count("\n", 0, m.start()) + 2, m.group(1)) for m in _FENCE.finditer(text)]


def _uses_torch(src):
    return re.search(r"^\s*(import torch|from torch|import fusedrnn\.torch|from fusedrnn "
                     r"import torch)", src, re.M) is not None


BLOCKS = python_blocks(README.read_text())
PARAMS = [pytest.param(line, src, id=f"line{line}",
                       marks=[pytest.mark.torch] if _uses_torch(src) else [])
          for line, src in BLOCKS]


def test_readme_has_both_examples():
    assert len(BLOCKS) >= 3
    assert any(not _uses_torch(src) and ".backward(" in src for _, src in BLOCKS)
    assert any("fusedrnn.torch.LSTM.from_module(model.rnn)" in src for _, src in BLOCKS)


def test_readme_keeps_the_setup_commands_first():
    text = README.read_text()
    first = re.search(r"^```(\w*)\n", text, re.M)
    assert first.group(1) == "bash" and "pip install ." in text[first.end():].split("```")[0]


def test_fence_parser():
    text = "intro\n```python\na = 1\n```\n```bash\nls\n```\n```python\nimport torch\n```\n"
    assert python_blocks(text) == [(3, "a = 1\n"), (9, "import torch\n")]
    assert _uses_torch(python_blocks(text)[1][1]) and not _uses_torch("a = 1\n")


@pytest.mark.parametrize("line,src", PARAMS)
def test_readme_block_runs(line, src):
    if _uses_torch(src):
        pytest.importorskip("torch")
    # padded with blank lines so that a traceback points at the README's own line numbers
    code = compile("\n" * (line - 1) + src, str(README), "exec")
    exec(code, {"__name__": "__readme__"})


ROOT = README.parent
_PATH = re.compile(r"\b(?:csrc|bench|tests|python/fusedrnn)/[\w./-]*\w")
_BENCH_COMMAND = re.compile(r"python -m (fusedrnn\.bench(?:\.memory)?)\b([^`#&\n]*)")


def test_the_files_the_readme_names_exist():
    missing = sorted({p for p in _PATH.findall(README.read_text()) if not (ROOT / p).exists()})
    assert not missing


def test_the_extension_functions_the_readme_names_exist():
    from fusedrnn import _C
    names = set(re.findall(r"`_C\.(\w+)\(", README.read_text()))
    assert names and not [n for n in names if not callable(getattr(_C, n, None))]


def test_the_readme_s_benchmark_commands_parse():
    """Each `python -m fusedrnn.bench[.memory] ...` the README shows is one its parser takes."""
    import importlib
    import shlex
    commands = _BENCH_COMMAND.findall(README.read_text())
    assert {module for module, _ in commands} == {"fusedrnn.bench", "fusedrnn.bench.memory"}
    parsers = {"fusedrnn.bench": "fusedrnn.bench.cli",
               "fusedrnn.bench.memory": "fusedrnn.bench.memory"}
    for module, argv in commands:
        importlib.import_module(parsers[module]).parser().parse_args(shlex.split(argv))
