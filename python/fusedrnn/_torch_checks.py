"""What fusedrnn.torch requires of each tensor a call gets: a dense CPU tensor of a dtype the
layer runs in (the parameters' dtype, where one is given)."""
import torch

from ._validate import DtypeError, ShapeError

KERNEL_DTYPES = (torch.float32, torch.float64)      # what the kernels compute in
LOW_DTYPES = (torch.bfloat16, torch.float16)        # computed in float32 (_torch_precision)
_RUNS = KERNEL_DTYPES + LOW_DTYPES


class TensorKindError(ValueError, RuntimeError):
    """A tensor on another device or of another layout: torch.nn raises RuntimeError."""


def check_tensor(name, t, dtype=None):
    """Raises, naming `name`, unless t is a dense CPU tensor of `dtype` (or, without one, of a
    dtype fusedrnn.torch runs)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise TensorKindError(f"fusedrnn.torch runs on CPU tensors only; {name} is on "
                              f"{t.device} (use torch.nn's own module on that device)")
    if t.layout != torch.strided:
        raise TensorKindError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    if dtype is None:
        if t.dtype not in _RUNS:
            names = ", ".join(str(d).replace("torch.", "") for d in _RUNS)
            raise TypeError(f"fusedrnn.torch supports {names}; {name} has dtype {t.dtype}")
    elif t.dtype != dtype:
        raise DtypeError(f"{name} must have dtype {dtype} (the parameters' dtype), got {t.dtype}")


def check_not_nested(name, t):
    """Raises, naming `name`, for a nested tensor (torch.nested, strided layout: check_tensor
    passes it), whose sizes torch could not even report."""
    if t.is_nested:
        raise TensorKindError(
            f"{name} is a nested tensor, which fusedrnn.torch (as torch.nn's RNNs) does not take: "
            f"pack its sequences (torch.nn.utils.rnn.pack_sequence(list({name}.unbind()), "
            f"enforce_sorted=False)) or pad them ({name}.to_padded_tensor(0.0))")


def dispatches_itself(t):
    """Whether t's class runs torch's operators itself (__torch_dispatch__: a wrapper subclass
    as DTensor or MaskedTensor): the kernels read a tensor's memory, which such a tensor may
    lack (its data pointer is null) and would bypass. (Fake tensors too: callers ask first.)"""
    return type(t).__torch_dispatch__ is not torch.Tensor.__torch_dispatch__


def refuse_dispatching_subclass(name, t):
    if dispatches_itself(t):
        raise TensorKindError(
            f"{name} is of the tensor subclass {type(t).__name__}, which runs torch's operators "
            f"itself (__torch_dispatch__): fusedrnn.torch's kernels read a plain tensor's "
            f"memory and would bypass them. Pass plain tensors (a DTensor's to_local() or "
            f"full_tensor()), or use torch.nn's module")


def check_packed_sequence(data, batch_sizes, sorted_indices, unsorted_indices, input_size):
    """Raises, naming the field, unless a PackedSequence's fields agree as pack_padded_sequence
    makes them: data (N, input_size), batch_sizes a 1-D integer CPU tensor, positive where it
    starts and never growing, summing to N, and each index tensor a permutation of the batch.
    A hand-built one that breaks these gave IndexError or a silently wrong batch order.
    Returns batch_sizes as a NumPy array."""
    if data.dim() != 2 or data.shape[1] != input_size:
        raise ShapeError(f"input.data must have shape (N, {input_size}), got {tuple(data.shape)}")
    if not _integer_cpu_vector(batch_sizes):
        raise TypeError("input.batch_sizes must be a 1-D integer tensor on the CPU (as "
                        "pack_padded_sequence makes it)")
    sizes = batch_sizes.numpy().astype("int64")
    if len(sizes) == 0 or sizes[0] < 1 or (sizes < 0).any() or (sizes[1:] > sizes[:-1]).any():
        raise ValueError(f"input.batch_sizes must start positive and never grow (the batch "
                         f"at each time step), got {sizes.tolist()}")
    if int(sizes.sum()) != data.shape[0]:
        raise ShapeError(f"input.data must have sum(input.batch_sizes) = {int(sizes.sum())} "
                         f"rows, got {data.shape[0]}")
    B = int(sizes[0])
    for name, idx in (("sorted_indices", sorted_indices), ("unsorted_indices", unsorted_indices)):
        if idx is None:
            continue
        ok = _integer_cpu_vector(idx)
        if not ok or sorted(idx.tolist()) != list(range(B)):
            raise ValueError(f"input.{name} must be a permutation of 0..{B - 1} (the batch of "
                             f"{B} sequences), got {idx.tolist() if ok else type(idx).__name__}")
    return sizes


def _integer_cpu_vector(t):
    """Whether t is a 1-D tensor of integers on the CPU (as a PackedSequence's index fields)."""
    return (isinstance(t, torch.Tensor) and t.dim() == 1 and t.device.type == "cpu"
            and not t.dtype.is_floating_point and not t.dtype.is_complex and t.dtype != torch.bool)
