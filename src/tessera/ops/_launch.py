"""What op implementations share on the way to a kernel: input checks that name the op and
the argument, the kernel-language dtype of a torch dtype, dimension coalescing, and
specializations compiled once per signature and launched with precomputed arguments
(no per-call binding, no torch views)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from tessera.errors import DeviceError, DtypeError, ShapeError, TesseraError
from tessera.lang.jit import Kernel, Specialization, TensorSpec
from tessera.runtime import dtype as dt
from tessera.runtime.cpu.launch import launcher

__all__ = [
    "FLOATS",
    "KERNEL_DTYPES",
    "ArgumentError",
    "check_dtype",
    "check_tensor",
    "coalesce",
    "compiled",
    "launch",
    "ldtype",
    "spec",
]

FLOATS = (torch.float32, torch.bfloat16, torch.float16)
# The storage dtypes the kernel language handles.
KERNEL_DTYPES = {torch.float32: dt.float32, torch.bfloat16: dt.bfloat16,
                 torch.float16: dt.float16, torch.int8: dt.int8, torch.uint8: dt.uint8,
                 torch.int32: dt.int32, torch.int64: dt.int64, torch.bool: dt.bool}


class ArgumentError(TesseraError, ValueError):
    """An operator argument outside what the op accepts (a range, a mode, NaN routing)."""


def ldtype(d: torch.dtype) -> dt.dtype:
    return KERNEL_DTYPES[d]


def check_tensor(x: Any, op: str, arg: str, dtypes: Sequence[torch.dtype] = FLOATS
                 ) -> None:
    """A CPU torch tensor of one of `dtypes`, or a TesseraError naming op and argument."""
    if not isinstance(x, torch.Tensor):
        raise DtypeError(f"{op}: argument {arg!r} must be a tensor, got {type(x).__name__}")
    if not x.is_cpu:
        raise DeviceError(f"{op}: argument {arg!r} is on {x.device}; tessera.ops runs on the "
                          "CPU", hint="move it with .cpu()")
    check_dtype(x.dtype, op, arg, dtypes)


def check_dtype(d: torch.dtype, op: str, arg: str, dtypes: Sequence[torch.dtype]) -> None:
    if d not in dtypes:
        names = ", ".join(str(t).removeprefix("torch.") for t in dtypes)
        raise DtypeError(f"{op}: argument {arg!r} has dtype {str(d).removeprefix('torch.')}; "
                         f"it takes {names}",
                         hint="convert it first, e.g. x.float()" if d == torch.float64
                         else None)


def check_dim(dim: int, ndim: int, op: str, arg: str = "dim") -> int:
    """`dim` normalized to [0, ndim) (a 0-dim tensor has dims -1 and 0, as in torch)."""
    n = max(ndim, 1)
    if not -n <= dim < n:
        raise ShapeError(f"{op}: {arg}={dim} is out of range for a {ndim}-dim tensor",
                         hint=f"use a dim in [{-n}, {n - 1}]")
    return dim % n


def coalesce(shape: Sequence[int], strides: Sequence[Sequence[int]]
             ) -> tuple[list[int], list[list[int]]]:
    """Merge adjacent dims that every operand walks as one (`strides` per operand, in
    elements, already broadcast to `shape`), and drop size-1 dims: the fewest dims to
    index. A tensor of one element comes out as shape [1]."""
    sizes: list[int] = []
    out: list[list[int]] = [[] for _ in strides]
    for d, n in enumerate(shape):
        if n == 1:
            continue
        if sizes and all(s[-1] == st[d] * n for s, st in zip(out, strides, strict=True)):
            sizes[-1] *= n
            for s, st in zip(out, strides, strict=True):
                s[-1] = st[d]
            continue
        sizes.append(n)
        for s, st in zip(out, strides, strict=True):
            s.append(st[d])
    if not sizes:
        return [1], [[1] for _ in strides]
    return sizes, out


_SPECS: dict[tuple, Specialization] = {}


def compiled(key: tuple, kernel: Kernel, *args: Any, **kwargs: Any) -> Specialization:
    """`kernel`'s specialization for arguments like `args` (TensorSpecs allowed), cached
    under `key`, which must decide everything the specialization depends on. Callable
    args are called first (so a cache hit builds nothing)."""
    s = _SPECS.get(key)
    if s is None:
        args = tuple(a() if callable(a) else a for a in args)
        s = _SPECS[key] = kernel.specialize(*args, **kwargs)
    return s


def spec(d: torch.dtype, rank: int, unit: bool = True) -> TensorSpec:
    """A tensor of this dtype and rank, to specialize for: its last dim has stride 1
    (`unit`) or not (e.g. 0, broadcast)."""
    return TensorSpec(KERNEL_DTYPES[d], (2,) * rank, (2,) * (rank - 1) + (1 if unit else 0,))


def launch(s: Specialization, grid: tuple[int, int, int], *args: Any) -> None:
    """Run a specialization: `args` are its flattened arguments (see Specialization)."""
    _call(s.address, *grid, *args)


_call = launcher()
