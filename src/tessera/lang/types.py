"""Types of kernel-language values: tiles (a dtype and a static shape; scalars have shape
()) and tensor arguments (a dtype and a rank; sizes known at run time)."""

from __future__ import annotations

from dataclasses import dataclass

from tessera.runtime import dtype as dt

__all__ = ["COMPUTE", "TensorType", "TileType", "compute_dtype", "promote"]

# Tiles compute in these; float16/bfloat16 tiles hold fp32 values rounded to that type,
# int8/uint8 compute as int32 (C's integer promotion).
COMPUTE = {dt.float32: "float", dt.float16: "float", dt.bfloat16: "float",
           dt.int8: "int32_t", dt.uint8: "int32_t", dt.int32: "int32_t",
           dt.int64: "int64_t", dt.bool: "bool"}


@dataclass(frozen=True)
class TileType:
    dtype: dt.dtype
    shape: tuple[int, ...] = ()

    @property
    def is_scalar(self) -> bool:
        return not self.shape

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def ctype(self) -> str:
        return COMPUTE[self.dtype]

    def __str__(self) -> str:
        dims = "x".join(map(str, self.shape))
        return f"{self.dtype.name}[{dims}]" if self.shape else self.dtype.name


@dataclass(frozen=True)
class TensorType:
    dtype: dt.dtype
    ndim: int
    unit_stride: bool = False  # specialized: the last dimension has stride 1
    sizes: tuple[int | None, ...] = ()  # dims the kernel slices whole (`:`), specialized

    def size(self, dim: int) -> int | None:
        """The compile-time size of `dim`, if the kernel is specialized on it."""
        return self.sizes[dim] if dim < len(self.sizes) else None

    def __str__(self) -> str:
        return f"tensor<{self.dtype.name}, rank {self.ndim}>"


def compute_dtype(d: dt.dtype) -> dt.dtype:
    """The dtype arithmetic on a value of dtype `d` happens in."""
    if d.is_floating_point:
        return dt.float32
    return dt.int32 if d in (dt.int8, dt.uint8) else d


def _category(d: dt.dtype) -> int:
    return 2 if d.is_floating_point else 0 if d is dt.bool else 1


def promote(a: TileType, b: TileType) -> dt.dtype:
    """Result dtype of arithmetic on a and b, as torch does it: the higher category (bool <
    int < float) wins; inside one category a scalar (shape ()) defers to a tile."""
    ca, cb = _category(a.dtype), _category(b.dtype)
    if ca != cb:
        return compute_dtype(a.dtype if ca > cb else b.dtype)
    if a.is_scalar != b.is_scalar:
        return compute_dtype(b.dtype if a.is_scalar else a.dtype)
    x, y = compute_dtype(a.dtype), compute_dtype(b.dtype)
    if x is dt.int64 or y is dt.int64:
        return dt.int64
    return x
