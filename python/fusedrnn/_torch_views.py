"""NumPy views of torch tensors' memory, for the kernels. Not Tensor.numpy(): that marks the
tensor's storage never resizable again, which breaks FSDP (it frees and refills its parameters'
storage between calls) and a caller's resize_ of a buffer it reuses; torch.nn's module leaves
them resizable. The views live only for a call: a backward reads the tensors autograd saved,
again (functional.backward's ``weights``), not the memory the forward read."""
import torch

from . import _C


def numpy_view(t):
    """A writeable NumPy view of a float32/float64 CPU tensor's memory (zero-copy); None stays
    None. A negative-bit view (torch._neg_view) is resolved into a copy first; a tensor whose
    storage was resized to 0 raises RuntimeError (torch.nn's ops raise too)."""
    if t is None:
        return None
    if t.is_neg():
        t = t.resolve_neg()
    try:
        data = t.data_ptr()
    except RuntimeError as e:   # a transform's tensor: torch's message names no cause
        raise RuntimeError(
            "fusedrnn.torch cannot read this tensor: it belongs to a transform the adapter does "
            "not support (forward-mode AD: torch.func.jvp, jacfwd; torch.func.vmap of its "
            "forward; is_grads_batched=True or jacobian(vectorize=True)); torch.func.grad, vjp "
            f"and jacrev are supported. ({e})") from e
    dtype = t.dtype
    if dtype is not torch.float32 and dtype is not torch.float64:
        raise TypeError(f"fusedrnn.torch reads float32 and float64 tensors, got {dtype}")
    return _C.tensor_view(data, t.shape, t.stride(), dtype is torch.float64, t,
                          t.storage_offset())
