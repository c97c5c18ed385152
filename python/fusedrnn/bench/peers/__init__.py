"""The peers timed side by side with fusedrnn.

A peer has ``name``, ``version``, ``modes`` (the modes it can run), ``set_threads(n)``,
``skip_reason(case)`` (None, or why it sits out that case) and ``prepare(problem, mode)``, which
returns a runner: calling it runs the model once (that call is what is timed) and
``runner.outputs(result)`` turns its result into NumPy arrays named as peers/stack.py names them,
to check the peer against fusedrnn before it is timed.

``load(names)`` imports the peers asked for; one whose package is missing is skipped, never an
error, with the reason returned for the run to print.
"""
PEERS = ("torch", "onnxruntime", "reference")


def _factory(name):
    if name == "torch":
        from .torch_nn import TorchPeer
        return TorchPeer
    if name == "onnxruntime":
        from .onnx_runtime import OnnxRuntimePeer
        return OnnxRuntimePeer
    if name == "reference":
        from .reference import ReferencePeer
        return ReferencePeer
    raise ValueError(f"unknown peer {name!r}; expected one of {', '.join(PEERS)}")


def fusedrnn_peer():
    from .ours import FusedrnnPeer
    return FusedrnnPeer()


def load(names):
    """Returns (peers, skipped): the peers that import, and {name: reason} for the others."""
    peers, skipped = [], {}
    for name in names:
        try:
            peers.append(_factory(name)())
        except ImportError as e:
            missing = (e.name or name).split(".")[0]
            skipped[name] = (f"not installed ({e})" if missing == name else
                             f"it needs the {missing} package, which is not installed ({e})")
    return peers, skipped
