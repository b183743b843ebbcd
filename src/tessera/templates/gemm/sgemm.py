"""Device layer of the SGEMM template: choose the blocking for this CPU, build the C
template with it (once per machine, through the compile cache) and launch it on numpy,
torch or tessera matrices of any strides."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from tessera.errors import ShapeError, TesseraError
from tessera.lang.codegen import MATH_HEADER
from tessera.runtime import dtype as dt
from tessera.runtime.cpu.device import cache_sizes, cpu_features
from tessera.runtime.tensor import as_tensor
from tessera.runtime.toolchain import compile_c

__all__ = ["ACTIVATIONS", "Blocking", "batched_sgemm", "blocking", "grouped_sgemm", "sgemm"]

_SOURCE = Path(__file__).with_name("sgemm.c")


@dataclass(frozen=True)
class Blocking:
    """Template parameters: the micro-tile (MR x NR, in vectors of VL floats) and the
    cache blocks (MC rows of A in L2, KC-deep slivers in L1, NC columns of B in L3)."""

    mr: int
    nr: int
    vl: int
    mc: int
    kc: int
    nc: int

    def defines(self) -> str:
        return "".join(f"#define {k.upper()} {v}\n" for k, v in vars(self).items())


@cache
def blocking() -> Blocking:
    """The default blocking for this CPU, derived from its vector width and cache sizes."""
    wide = "avx512f" in cpu_features()
    vl = 16 if wide else 8
    mr, nr = (8, 32) if wide else (6, 16)
    caches = cache_sizes()
    l1, l2 = caches["L1d"] or 32 << 10, caches["L2"] or 256 << 10
    kc = max(128, min(512, l1 // (4 * nr) // 16 * 16))  # a B sliver fills L1
    mc = max(mr, min(960, l2 // 4 // (4 * kc) // mr * mr))  # A's block in a quarter of L2
    nc = max(nr, min(4096, (4 << 20) // (4 * kc) // nr * nr))  # B's panel: 4 MiB (of L3)
    return Blocking(mr, nr, vl, mc, kc, nc)


ACTIVATIONS = {"relu": "({x} < 0.0f ? 0.0f : {x})",  # NaN stays NaN, as in torch
               "gelu": "tsr_gelu_erf({x})", "gelu_tanh": "tsr_gelu_tanh({x})",
               "silu": "tsr_silu({x})", "sigmoid": "tsr_sigmoid({x})", "tanh": "tsr_tanh({x})"}


class _EpilogueArgs(ctypes.Structure):
    _fields_ = [("bias", ctypes.c_void_p), ("res", ctypes.c_void_p),
                ("rsr", ctypes.c_int64), ("csr", ctypes.c_int64)]


def _epilogue_source(bias: bool, activation: str | None, residual: bool) -> str:
    """The EPILOGUE(x, i, j, ep) macro for one combination: act(x + bias[j]) + res[i, j]."""
    if not (bias or activation or residual):
        return ""
    x = "(x)"
    if bias:
        x = f"({x} + (ep)->bias[j])"
    if activation:
        x = f"({{ const float x_ = {x}; {ACTIVATIONS[activation].format(x='x_')}; }})"
    if residual:
        x = f"({x} + (ep)->res[(i) * (ep)->rsr + (j) * (ep)->csr])"
    math = MATH_HEADER.read_text() if activation else ""
    return (f"#include <stdint.h>\n#include <stdbool.h>\n#include <string.h>\n#include <math.h>\n"
            f"{math}\n#define EPILOGUE(x, i, j, ep) {x}\n")


_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_SIGNATURES = {
    "tsr_sgemm": [_I64, _I64, _I64, ctypes.c_float, _PTR, _I64, _I64, _PTR, _I64, _I64,
                  ctypes.c_float, _PTR, _I64, _I64, ctypes.POINTER(_EpilogueArgs)],
    "tsr_sgemm_grouped": [_I64, _PTR, _I64, _I64, _PTR, _I64, _I64, _PTR, _I64, _I64, _I64,
                          _PTR, _I64, _I64, ctypes.POINTER(_EpilogueArgs)],
    "tsr_sgemm_batched": [_I64, _I64, _I64, _I64, _PTR, _I64, _I64, _I64, _PTR, _I64, _I64,
                          _I64, _PTR, _I64, _I64, _I64, ctypes.POINTER(_EpilogueArgs)],
}


@cache
def _kernel(b: Blocking, epilogue: tuple[bool, str | None, bool] = (False, None, False),
            entry: str = "tsr_sgemm") -> Any:
    source = b.defines() + _epilogue_source(*epilogue) + _SOURCE.read_text()
    module = compile_c(source, name="sgemm", openmp=True)
    return module.function(entry, ctypes.c_int, _SIGNATURES[entry])


def _matrix(x: Any, name: str, ndim: int = 2) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    t = as_tensor(x)
    if t.dtype is not dt.float32:
        raise TesseraError(f"sgemm: {name} is {t.dtype.name}, not float32",
                           hint="convert it, or use a GEMM for its dtype")
    if len(t.shape) != ndim:
        raise ShapeError(f"sgemm: {name} must be {ndim}-D, got shape {t.shape}")
    if ndim == 1 and t.strides != (1,) and t.shape[0] > 1:
        raise ShapeError(f"sgemm: {name} must be contiguous", hint="pass .contiguous()")
    return t.data_ptr(), t.shape, t.strides


def _check_writable(out: Any, who: str) -> None:
    t = as_tensor(out)
    if t.readonly:
        raise TesseraError(f"{who}: out is read-only", hint="pass a writable array")
    if any(s == 0 and d > 1 for s, d in zip(t.strides, t.shape, strict=True)):
        raise TesseraError(f"{who}: out has a stride-0 (expanded) dimension, so its "
                           "elements share memory", hint="pass a contiguous out")


def _epilogue(who: str, m: int, n: int, bias: Any, activation: str | None, residual: Any
              ) -> tuple[_EpilogueArgs, tuple[bool, str | None, bool]]:
    """The epilogue's run-time arguments, checked, and the spec its build is keyed on."""
    ep = _EpilogueArgs()
    if bias is not None:
        ep.bias, shape, _ = _matrix(bias, "bias", ndim=1)
        if shape != (n,):
            raise ShapeError(f"{who}: bias has shape {shape}, expected ({n},)")
    if residual is not None:
        ep.res, shape, (ep.rsr, ep.csr) = _matrix(residual, "residual")
        if shape != (m, n):
            raise ShapeError(f"{who}: residual has shape {shape}, expected {(m, n)}")
    if activation is not None and activation not in ACTIVATIONS:
        raise TesseraError(f"{who}: unknown activation {activation!r}",
                           hint=f"one of {', '.join(ACTIVATIONS)}")
    return ep, (bias is not None, activation, residual is not None)


def sgemm(a: Any, b: Any, out: Any = None, *, alpha: float = 1.0, beta: float = 0.0,
          bias: Any = None, activation: str | None = None, residual: Any = None,
          config: Blocking | None = None) -> Any:
    """out = activation(alpha * a @ b + beta * out + bias) + residual for float32 matrices
    of any strides (transposed views included); the epilogue (bias [n], an activation of
    ACTIVATIONS, residual [m, n]) is fused into the final store. Without `out`, a new
    C-contiguous result of a's kind is returned."""
    pa, (m, k), (rsa, csa) = _matrix(a, "a")
    pb, (k2, n), (rsb, csb) = _matrix(b, "b")
    if k2 != k:
        raise ShapeError(f"sgemm: a is {m}x{k} but b is {k2}x{n}",
                         hint="the inner dimensions must agree")
    if out is None:
        out = _like(a, (m, n))
        beta = 0.0
    pc, shape, (rsc, csc) = _matrix(out, "out")
    if shape != (m, n):
        raise ShapeError(f"sgemm: out has shape {shape}, the product is {(m, n)}")
    _check_writable(out, "sgemm")
    ep, spec = _epilogue("sgemm", m, n, bias, activation, residual)
    kernel = _kernel(config or blocking(), spec)
    if kernel(m, n, k, alpha, pa, rsa, csa, pb, rsb, csb, beta, pc, rsc, csc, ep):
        raise TesseraError(f"sgemm: no memory for the packing buffers of a {m}x{n}x{k} "
                           "product")
    return out


def grouped_sgemm(a: Any, b: Any, sizes: Any, out: Any = None, *, bias: Any = None,
                  activation: str | None = None, config: Blocking | None = None) -> Any:
    """Mixture-of-experts GEMM in one call: rows of `a` [T, K] come in groups (tokens sorted
    by expert) of `sizes` [E] rows; group g is multiplied by `b[g]` ([E, K, N], any
    strides). Returns out [T, N]. `bias` [N] and `activation` apply to every group."""
    pa, (t, k), (rsa, csa) = _matrix(a, "a")
    bt = as_tensor(b)
    if len(bt.shape) != 3 or bt.dtype is not dt.float32:
        raise ShapeError(f"grouped_sgemm: b must be a float32 [E, K, N] tensor, got "
                         f"{bt.dtype.name} {bt.shape}")
    groups, k2, n = bt.shape
    if k2 != k:
        raise ShapeError(f"grouped_sgemm: a has K = {k}, b has K = {k2}")
    counts = np.ascontiguousarray(np.asarray(sizes, dtype=np.int64))
    if counts.shape != (groups,) or (counts < 0).any() or counts.sum() != t:
        raise ShapeError(f"grouped_sgemm: sizes must be {groups} non-negative counts summing "
                         f"to the {t} rows of a, got {counts.tolist()}")
    if out is None:
        out = _like(a, (t, n))
    pc, shape, (rsc, csc) = _matrix(out, "out")
    if shape != (t, n):
        raise ShapeError(f"grouped_sgemm: out has shape {shape}, expected {(t, n)}")
    _check_writable(out, "grouped_sgemm")
    ep, spec = _epilogue("grouped_sgemm", t, n, bias, activation, None)
    kernel = _kernel(config or blocking(), spec, "tsr_sgemm_grouped")
    if kernel(groups, counts.ctypes.data, n, k, pa, rsa, csa, bt.data_ptr(), *bt.strides,
              pc, rsc, csc, ep):
        raise TesseraError("grouped_sgemm: no memory for the packing buffers")
    return out


def batched_sgemm(a: Any, b: Any, out: Any = None, *, config: Blocking | None = None) -> Any:
    """out[i] = a[i] @ b[i] for [B, M, K] and [B, K, N] float32 tensors of any strides; a
    2-D operand is shared by every product (a weight). Returns out [B, M, N]."""
    ta, tb = as_tensor(a), as_tensor(b)
    for t, name in ((ta, "a"), (tb, "b")):
        if t.dtype is not dt.float32 or len(t.shape) not in (2, 3):
            raise ShapeError(f"batched_sgemm: {name} must be a 2-D or 3-D float32 tensor, "
                             f"got {t.dtype.name} {t.shape}")
    sa = ta.shape if len(ta.shape) == 3 else (1, *ta.shape)
    sb = tb.shape if len(tb.shape) == 3 else (1, *tb.shape)
    batch = max(sa[0], sb[0])
    if sa[0] not in (1, batch) or sb[0] not in (1, batch) or sa[2] != sb[1]:
        raise ShapeError(f"batched_sgemm: cannot multiply {ta.shape} by {tb.shape}",
                         hint="[B, M, K] @ [B, K, N]; a 2-D operand is shared")
    (m, k), n = sa[1:], sb[2]

    def batch_stride(t: Any, s: tuple[int, ...]) -> int:
        return t.strides[0] if len(t.shape) == 3 and s[0] > 1 else 0
    if out is None:
        out = _like(a, (batch, m, n))
    tc = as_tensor(out)
    if tc.shape != (batch, m, n) or tc.dtype is not dt.float32:
        raise ShapeError(f"batched_sgemm: out must be float32 {(batch, m, n)}, got "
                         f"{tc.dtype.name} {tc.shape}")
    _check_writable(out, "batched_sgemm")
    kernel = _kernel(config or blocking(), entry="tsr_sgemm_batched")
    if kernel(batch, m, n, k, ta.data_ptr(), batch_stride(ta, sa), *ta.strides[-2:],
              tb.data_ptr(), batch_stride(tb, sb), *tb.strides[-2:],
              tc.data_ptr(), *tc.strides, _EpilogueArgs()):
        raise TesseraError("batched_sgemm: no memory for the packing buffers")
    return out


def _like(x: Any, shape: tuple[int, ...]) -> Any:
    if type(x).__module__.startswith("torch"):
        import torch
        return torch.empty(shape, dtype=torch.float32)
    return np.empty(shape, np.float32)
