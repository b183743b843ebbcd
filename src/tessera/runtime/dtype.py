"""Element types: one frozen singleton per dtype, with its C, DLPack, numpy and torch spellings.

torch is imported only when `dtype.torch` is first read, so `import tessera` never pulls it in.
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass
from typing import Any

import numpy as np

from tessera.errors import DtypeError

__all__ = [
    "DTYPES",
    "as_dtype",
    "bfloat16",
    "bool",
    "dtype",
    "float16",
    "float32",
    "int8",
    "int32",
    "int64",
    "uint8",
]

# DLPack type codes (dlpack.h, DLDataTypeCode).
_DL_INT, _DL_UINT, _DL_FLOAT, _DL_BFLOAT, _DL_BOOL = 0, 1, 2, 4, 6


@dataclass(frozen=True, eq=False, repr=False)
class dtype:
    """A Tessera element type. Instances are singletons: compare them with `is` or `==`.

    `c_type` is the C type that *stores* one element: half types are stored as `uint16_t`
    and bool as `uint8_t` (0 or 1), because C and OpenCL C have no portable spelling of
    either in a buffer.
    """

    name: str
    itemsize: int
    is_floating_point: builtins.bool
    c_type: str
    dlpack: tuple[int, int, int]  # (type code, bits, lanes)
    _numpy_name: str | None

    @property
    def numpy(self) -> np.dtype | None:
        """The numpy dtype, or None for bfloat16 (numpy has none)."""
        return None if self._numpy_name is None else np.dtype(self._numpy_name)

    @property
    def torch(self) -> Any:
        """The torch dtype (imports torch on first use)."""
        import torch

        return getattr(torch, self.name)

    def __repr__(self) -> str:
        return f"tessera.{self.name}"

    def __reduce__(self) -> str:
        # Pickle and copy by name, so unpickling yields the module's singleton.
        return self.name


float32 = dtype("float32", 4, True, "float", (_DL_FLOAT, 32, 1), "float32")
float16 = dtype("float16", 2, True, "uint16_t", (_DL_FLOAT, 16, 1), "float16")
bfloat16 = dtype("bfloat16", 2, True, "uint16_t", (_DL_BFLOAT, 16, 1), None)
int8 = dtype("int8", 1, False, "int8_t", (_DL_INT, 8, 1), "int8")
uint8 = dtype("uint8", 1, False, "uint8_t", (_DL_UINT, 8, 1), "uint8")
int32 = dtype("int32", 4, False, "int32_t", (_DL_INT, 32, 1), "int32")
int64 = dtype("int64", 8, False, "int64_t", (_DL_INT, 64, 1), "int64")
bool = dtype("bool", 1, False, "uint8_t", (_DL_BOOL, 8, 1), "bool")  # like torch.bool

DTYPES: tuple[dtype, ...] = (float32, float16, bfloat16, int8, uint8, int32, int64, bool)
_BY_NAME = {d.name: d for d in DTYPES}
_BY_DLPACK = {d.dlpack: d for d in DTYPES}
_ALIASES = {
    **_BY_NAME,
    "float": float32, "f32": float32, "fp32": float32,
    "half": float16, "f16": float16, "fp16": float16,
    "bf16": bfloat16,
    "i8": int8, "u8": uint8,
    "int": int32, "i32": int32,
    "long": int64, "i64": int64,
}
_HINT = (f"supported dtypes: {', '.join(d.name for d in DTYPES)} "
         "(strings such as 'f32', 'fp16', 'bf16', 'i8' work too)")


def _unsupported(what: str) -> DtypeError:
    hint = _HINT
    if what in ("float64", "double"):
        hint = "convert to float32 first (numpy: a.astype(np.float32); torch: t.float()); " + hint
    return DtypeError(f"dtype {what} is not supported by Tessera", hint=hint)


def as_dtype(x: Any) -> dtype:
    """The Tessera dtype for `x`: a dtype, a name or alias, a numpy dtype/type or a torch dtype."""
    if isinstance(x, dtype):
        return x
    if isinstance(x, str):
        key = x.strip().lower()
        for prefix in ("tessera.", "torch.", "numpy.", "np."):
            key = key.removeprefix(prefix)
        if key in _ALIASES:
            return _ALIASES[key]
        raise _unsupported(repr(x))
    if type(x).__module__ == "torch" and type(x).__name__ == "dtype":
        name = str(x).removeprefix("torch.")
        if name in _BY_NAME:
            return _BY_NAME[name]
        raise _unsupported(name)
    if isinstance(x, (np.dtype, type)):
        try:
            nd = np.dtype(x)
        except TypeError:
            raise _unsupported(repr(x)) from None
        if not nd.isnative:
            raise DtypeError(f"numpy dtype {nd.str!r} is not in native byte order",
                             hint="convert with a.astype(a.dtype.newbyteorder('='))")
        if nd.name in _BY_NAME:
            return _BY_NAME[nd.name]
        raise _unsupported(nd.name)
    raise _unsupported(repr(x))


def from_dlpack_type(code: int, bits: int, lanes: int) -> dtype:
    """The Tessera dtype for a DLPack (code, bits, lanes) triple."""
    found = _BY_DLPACK.get((code, bits, lanes))
    if found is None:
        raise DtypeError(f"DLPack dtype (code={code}, bits={bits}, lanes={lanes}) is not "
                         "supported by Tessera", hint=_HINT)
    return found
