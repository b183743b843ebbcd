"""Device layer of the GEMM template: choose the blocking for this CPU and the variant for
the operands' formats and epilogue, build the C template for it (once per machine, through
the compile cache) and launch it on numpy, torch or tessera matrices of any strides."""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from tessera.errors import ShapeError, TesseraError
from tessera.lang.codegen import MATH_HEADER, TILE_HEADER
from tessera.runtime import dtype as dt
from tessera.runtime import profiling
from tessera.runtime.cpu.device import cache_sizes
from tessera.runtime.cpu.launch import check, lasting
from tessera.runtime.cpu.launch import launcher as _launcher
from tessera.runtime.tensor import Tensor, as_tensor, empty
from tessera.runtime.toolchain import compile_c
from tessera.templates.gemm.quant import QuantizedMatrix
from tessera.templates.gemm.tuning import tuned_record, vector_lanes

__all__ = ["ACTIVATIONS", "Blocking", "MoeDecode", "PackedMatrix", "batched_gemm", "blocking",
           "gemm", "grouped_gemm", "launch", "launch_entry", "moe_decode", "moe_decode_fits",
           "pack"]

_SOURCE = Path(__file__).with_name("sgemm.c")
_MOE_SOURCE = Path(__file__).with_name("moe.c")


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
def blocking(tuned: bool = True) -> Blocking:
    """The blocking for this CPU: the one `tessera tune gemm` recorded for this machine if
    there is a usable one (and `tuned`), else the default derived from its vector width and
    cache sizes. Cached per process; the tuner clears the cache when it records."""
    record = tuned_record() if tuned else None
    if record is not None:
        return Blocking(**record["blocking"])
    vl = vector_lanes()
    wide = vl == 16
    # 8 x 48 with AVX-512: 24 accumulators of the 32 registers, 3 loads of B and 8
    # broadcasts of A for 24 FMAs (8 x 32 left the FMA ports idle more often)
    mr, nr = (8, 48) if wide else (6, 16)
    caches = cache_sizes()
    l1, l2 = caches["L1d"] or 32 << 10, caches["L2"] or 256 << 10
    # With AVX-512 (measured on a 48 KiB L1 / 2 MiB L2 Xeon, 1024..4096, as the tuner's
    # choice): a B sliver of twice L1, A's block in half of L2, a 2.75 MiB B panel; else a
    # sliver filling L1, A's block in a quarter of L2, a 4 MiB panel.
    kc = max(128, min(512, (2 if wide else 1) * l1 // (4 * nr) // 16 * 16))
    mc = max(mr, min(960, l2 // (2 if wide else 4) // (4 * kc) // mr * mr))
    panel = 11 << 18 if wide else 4 << 20
    nc = max(nr, min(4096, panel // (4 * kc) // nr * nr))
    return Blocking(mr, nr, vl, mc, kc, nc)


ACTIVATIONS = {"relu": "({x} < 0.0f ? 0.0f : {x})",  # NaN stays NaN, as in torch
               "gelu": "tsr_gelu_erf({x})", "gelu_tanh": "tsr_gelu_tanh({x})",
               "silu": "tsr_silu({x})", "sigmoid": "tsr_sigmoid({x})", "tanh": "tsr_tanh({x})"}

# Storage formats of the template's operands (TSR_F32 ... in gemm.c).
_FORMATS = {dt.float32: 0, dt.bfloat16: 1, dt.float16: 2}
_Q8, _Q4 = 3, 4


@dataclass(frozen=True)
class _Variant:
    """Everything that selects one compiled variant of the template."""

    blocking: Blocking
    a: int = 0  # formats of A, B and C
    b: int = 0
    c: int = 0
    group: int = 32  # rows per scale of a quantized B
    swiglu: bool = False
    packed: bool = False
    bias: bool = False
    activation: str | None = None
    residual: bool = False
    bias_rows: bool = False  # the bias is indexed by rows of C (an NCHW convolution's)

    def source(self) -> str:
        x = "(x)"
        if self.bias:
            x = f"({x} + (ep)->bias[{'i' if self.bias_rows else 'j'}])"
        if self.activation:
            x = f"({{ const float x_ = {x}; {ACTIVATIONS[self.activation].format(x='x_')}; }})"
        if self.residual:
            x = f"({x} + (ep)->res[(i) * (ep)->rsr + (j) * (ep)->csr])"
        epilogue = f"#define EPILOGUE(x, i, j, ep) {x}\n" if x != "(x)" else ""
        defines = {"A_FMT": self.a, "B_FMT": self.b, "C_FMT": self.c, "GROUP": self.group,
                   "SWIGLU": int(self.swiglu), "PACKED_B": int(self.packed)}
        return (self.blocking.defines()
                + "".join(f"#define {k} {v}\n" for k, v in defines.items())
                + "#include <stdint.h>\n#include <stdbool.h>\n#include <string.h>\n"
                  f"#include <math.h>\n#define TSR_VL {self.blocking.vl}\n"
                + TILE_HEADER.read_text() + MATH_HEADER.read_text() + epilogue
                + _SOURCE.read_text())


class _EpilogueArgs(ctypes.Structure):
    _fields_ = [("bias", ctypes.c_void_p), ("res", ctypes.c_void_p),
                ("rsr", ctypes.c_int64), ("csr", ctypes.c_int64)]


class _BArgs(ctypes.Structure):
    """Operand B (tsr_b in gemm.c): data, scales, strides, and strides between problems."""

    _fields_ = [("p", ctypes.c_void_p), ("scale", ctypes.c_void_p),
                *((f, ctypes.c_int64) for f in ("rs", "cs", "scs", "gs", "gss"))]


_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_B, _EP = ctypes.POINTER(_BArgs), ctypes.POINTER(_EpilogueArgs)
_SIGNATURES = {
    "tsr_gemm_grouped": (ctypes.c_int, [_I64, _PTR, _I64, _I64, _PTR, _I64, _I64, _B, _PTR,
                                        _I64, _I64, _EP]),
    "tsr_gemm_batched": (ctypes.c_int, [_I64, _I64, _I64, _I64, _PTR, _I64, _I64, _I64, _B,
                                        _PTR, _I64, _I64, _I64, _EP]),
    "tsr_packed_size": (_I64, [_I64, _I64]),
    "tsr_pack_b": (None, [_I64, _I64, _B, _PTR]),
}


@cache
def _kernel(variant: _Variant, entry: str) -> Any:
    module = compile_c(variant.source(), name="gemm", openmp=True)
    return profiling.timed(module.function(entry, *_SIGNATURES[entry]))


def launch_entry(a: dt.dtype, b: dt.dtype, c: dt.dtype, *, packed: bool = False,
                 bias: bool = False, activation: str | None = None, residual: bool = False,
                 bias_rows: bool = False, swiglu: bool = False,
                 config: Blocking | None = None) -> int:
    """The address of `tsr_gemm_launch` in the variant for float operands of dtypes a, b
    and c (b float32 if `packed`) with that epilogue (`bias_rows`: a bias per row of C
    rather than per column; `swiglu`: b = [gate | up], as in `gemm`): for callers that
    launch the template through `tessera.runtime.cpu.launch` with precomputed arguments
    (the slots of `tsr_call` in sgemm.c), at a fraction of `gemm`'s per-call cost."""
    if activation is not None and activation not in ACTIVATIONS:
        raise TesseraError(f"gemm: unknown activation {activation!r}",
                           hint=f"one of {', '.join(ACTIVATIONS)}")
    return _address(_Variant(config or blocking(), _FORMATS[a], _FORMATS[b], _FORMATS[c],
                             swiglu=swiglu, packed=packed, bias=bias,
                             activation=activation, residual=residual,
                             bias_rows=bias and bias_rows))


@cache
def _address(variant: _Variant) -> int:
    fn = compile_c(variant.source(), name="gemm", openmp=True).function("tsr_gemm_launch")
    return ctypes.cast(fn, ctypes.c_void_p).value


_STATUS = threading.local()


def _status_word() -> int:
    """The address of this thread's status word (calls on several threads may overlap)."""
    address_of_status = getattr(_STATUS, "address", None)
    if address_of_status is None:
        _STATUS.word = np.zeros(1, np.int64)
        address_of_status = _STATUS.address = _STATUS.word.ctypes.data
    return address_of_status


def launch(address: int, *slots: int | float) -> None:
    """Run the variant at `address` (from `launch_entry`) on the fields of `tsr_call` in
    sgemm.c up to its status, which this supplies and checks."""
    address_of_status = _status_word()
    _launcher()(address, 1, 1, 1, *slots, address_of_status)
    check(address_of_status, lambda: TesseraError(
        f"gemm: out of memory for the buffers of a {slots[1]}x{slots[2]}x{slots[3]} product"))


def _matrix(x: Any, name: str, ndim: int | tuple[int, ...] = 2, who: str = "gemm"
            ) -> tuple[Any, int]:
    """The tessera view of a float operand with `ndim` dimensions (or one of them) and its
    format."""
    t = as_tensor(x)
    if t.dtype not in _FORMATS:
        raise TesseraError(f"{who}: {name} is {t.dtype.name}; the GEMM takes float32, "
                           "bfloat16 or float16", hint=f"convert {name} first")
    ndims = (ndim,) if isinstance(ndim, int) else ndim
    if len(t.shape) not in ndims:
        raise ShapeError(f"{who}: {name} must be {' or '.join(f'{d}-D' for d in ndims)}, "
                         f"got shape {t.shape}")
    return t, _FORMATS[t.dtype]


def _check_writable(t: Any, who: str) -> None:
    if t.readonly:
        raise TesseraError(f"{who}: out is read-only", hint="pass a writable array")
    if any(s == 0 and d > 1 for s, d in zip(t.strides, t.shape, strict=True)):
        raise TesseraError(f"{who}: out has a stride-0 (expanded) dimension, so its "
                           "elements share memory", hint="pass a contiguous out")


def _float32(x: Any, name: str, shape: tuple[int, ...], who: str) -> Any:
    """An epilogue operand as float32 (a converted copy if 16-bit, a contiguous one if a
    strided vector), checked against `shape`."""
    t, fmt = _matrix(x, name, len(shape), who)
    if t.shape != shape:
        raise ShapeError(f"{who}: {name} has shape {t.shape}, expected {shape}")
    if fmt == 0 and (len(shape) == 2 or t.strides == (1,) or shape[0] <= 1):
        return t
    if fmt == 1:  # bfloat16 is the top half of a float32
        bits = t.numpy(view_bfloat16_as_uint16=True).astype(np.uint32)
        return as_tensor(np.ascontiguousarray((bits << 16).view(np.float32)))
    return as_tensor(np.ascontiguousarray(t.numpy(), np.float32))


def _epilogue(who: str, m: int, n: int, bias: Any, activation: str | None, residual: Any
              ) -> tuple[_EpilogueArgs, dict[str, Any], list[Any]]:
    """The epilogue's run-time arguments, checked, the variant fields it selects, and the
    tensors to keep alive during the call."""
    ep, keep = _EpilogueArgs(), []
    if bias is not None:
        keep.append(_float32(bias, "bias", (n,), who))
        ep.bias = keep[-1].data_ptr()
    if residual is not None:
        keep.append(_float32(residual, "residual", (m, n), who))
        ep.res, (ep.rsr, ep.csr) = keep[-1].data_ptr(), keep[-1].strides
    if activation is not None and activation not in ACTIVATIONS:
        raise TesseraError(f"{who}: unknown activation {activation!r}",
                           hint=f"one of {', '.join(ACTIVATIONS)}")
    spec = {"bias": bias is not None, "activation": activation, "residual": residual is not None}
    return ep, spec, keep


@dataclass(frozen=True)
class PackedMatrix:
    """B [K, N] packed once into the template's panels (for frozen weights): a product
    with it skips packing. Tied to the blocking it was packed for, and to `swiglu`."""

    shape: tuple[int, int]
    dtype: str  # of the result: that of the unpacked weights
    blocking: Blocking
    swiglu: bool
    data: np.ndarray  # float32 panels


def pack(b: Any, *, swiglu: bool = False, config: Blocking | None = None) -> PackedMatrix:
    """Pack weights b [K, N] (float32/16, any strides, or a QuantizedMatrix, dequantized
    into float32 panels) for repeated products `gemm(x, packed)`."""
    config = config or blocking()
    barg, fmt, group, (k, n), out_dtype, _keep = _b_operand(b, "pack", 2)
    if swiglu and n % 2:
        raise ShapeError(f"pack: SwiGLU weights need [gate | up] columns, got N = {n}")
    variant = _Variant(config, b=fmt, group=group, swiglu=swiglu, packed=True)
    outputs = n // 2 if swiglu else n
    data = np.empty(_kernel(variant, "tsr_packed_size")(k, outputs), np.float32)
    _kernel(variant, "tsr_pack_b")(k, outputs, barg, data.ctypes.data)
    return PackedMatrix((k, n), out_dtype, config, swiglu, data)


def _b_operand(b: Any, who: str, ndim: int
               ) -> tuple[_BArgs, int, int, tuple[int, ...], Any, list[Any]]:
    """Operand B's C descriptor, format, group size, shape (without packing), the dtype
    its products default to, and what to keep alive."""
    arg = _BArgs()
    if isinstance(b, QuantizedMatrix):
        if len(b.shape) != ndim:
            raise ShapeError(f"{who}: the quantized b is {len(b.shape)}-D, expected {ndim}-D")
        arg.p, arg.scale = b.data.ctypes.data, b.scales.ctypes.data
        arg.rs, arg.cs, arg.scs = 1, b.data.shape[-1], b.scales.shape[-1]
        if ndim == 3:
            arg.gs, arg.gss = b.data.strides[0], b.scales.strides[0] // 4
        return arg, _Q8 if b.bits == 8 else _Q4, b.group_size, b.shape, None, [b]
    t, fmt = _matrix(b, "b", ndim, who)
    arg.p = t.data_ptr()
    arg.rs, arg.cs = t.strides[-2:]
    if ndim == 3:
        arg.gs = t.strides[0]
    return arg, fmt, 32, t.shape, t.dtype, [t]


def gemm(a: Any, b: Any, out: Any = None, *, alpha: float = 1.0, beta: float = 0.0,
         bias: Any = None, activation: str | None = None, residual: Any = None,
         swiglu: bool = False, config: Blocking | None = None) -> Any:
    """out = activation(alpha * a @ b + beta * out + bias) + residual, fused into one pass.

    a [M, K] and b [K, N] are float32, bfloat16 or float16 of any strides (transposed
    views included); b may also be a `QuantizedMatrix` (int8/int4 weights, dequantized in
    the kernel) or a `PackedMatrix`. Products accumulate in float32. `swiglu=True` takes
    b = [gate | up] ([K, 2N]) and gives silu(a @ gate) * (a @ up) [M, N]. Without `out`,
    a new C-contiguous result of a's kind is returned, in torch's promoted dtype.
    """
    ta, a_fmt = _matrix(a, "a")
    m, k = ta.shape
    packed = b if isinstance(b, PackedMatrix) else None
    if packed is not None:
        if packed.swiglu != swiglu:
            raise TesseraError(f"gemm: b was packed with swiglu={packed.swiglu}, called with "
                               f"swiglu={swiglu}", hint="pack(b, swiglu=...) as you call it")
        if config is not None and config != packed.blocking:
            raise TesseraError("gemm: b was packed for another blocking than `config`",
                               hint="pack(b, config=config)")
        config, b_fmt, group = packed.blocking, 0, 32
        barg, (k2, n2), b_dtype = _BArgs(packed.data.ctypes.data), packed.shape, packed.dtype
    else:
        barg, b_fmt, group, (k2, n2), b_dtype, _ = _b_operand(b, "gemm", 2)
    if k2 != k:
        raise ShapeError(f"gemm: a is {m}x{k} but b is {k2}x{n2}",
                         hint="the inner dimensions must agree")
    n = _outputs(n2, swiglu, "gemm")
    if swiglu and (beta != 0.0 or bias is not None or activation is not None):
        raise TesseraError("gemm: swiglu=True computes silu(gate) * up; it takes no beta, "
                           "bias or activation", hint="a residual may still be added")
    if out is None:
        out = _like(a, (m, n), _promote(ta.dtype, b_dtype))
        beta = 0.0
    tc, c_fmt = _matrix(out, "out")
    if tc.shape != (m, n):
        raise ShapeError(f"gemm: out has shape {tc.shape}, the product is {(m, n)}")
    _check_writable(tc, "gemm")
    ep, spec, _keep = _epilogue("gemm", m, n, bias, activation, residual)
    variant = _Variant(config or blocking(), a_fmt, b_fmt, c_fmt, group, swiglu,
                       packed is not None, **spec)
    # through the launcher (tsr_call's slots), so that a recorder sees it like any kernel
    launch(_address(variant), 1, m, n, k, float(alpha), float(beta), ta.data_ptr(), 0,
           *ta.strides, 0, 0, barg.p or 0, barg.scale or 0, barg.rs, barg.cs, barg.scs,
           barg.gs, barg.gss, tc.data_ptr(), 0, *tc.strides, ep.bias or 0, 0, ep.res or 0, 0,
           ep.rsr, ep.csr)
    return out


def _outputs(n: int, swiglu: bool, who: str) -> int:
    if swiglu and n % 2:
        raise ShapeError(f"{who}: swiglu=True needs b = [gate | up] with an even number of "
                         f"columns, got {n}")
    return n // 2 if swiglu else n


def _promote(a: Any, b: Any) -> Any:
    """torch's result dtype for a product of float32/bfloat16/float16 operands."""
    if b is None or a is b:
        return a
    return dt.float32  # any mix of two different float dtypes widens to float32


def grouped_gemm(a: Any, b: Any, sizes: Any, out: Any = None, *, bias: Any = None,
                 activation: str | None = None, swiglu: bool = False,
                 config: Blocking | None = None) -> Any:
    """Mixture-of-experts GEMM in one call: rows of `a` [T, K] come in groups (tokens sorted
    by expert) of `sizes` [E] rows; group g is multiplied by `b[g]` ([E, K, N], any strides,
    or a 3-D QuantizedMatrix). Returns out [T, N] (N / 2 with swiglu, as in `gemm`).
    `bias` [N] and `activation` apply to every group."""
    ta, a_fmt = _matrix(a, "a", 2, "grouped_gemm")
    t, k = ta.shape
    barg, b_fmt, group, shape, b_dtype, _keep_b = _b_operand(b, "grouped_gemm", 3)
    groups, k2, n2 = shape
    if k2 != k:
        raise ShapeError(f"grouped_gemm: a has K = {k}, b has K = {k2}")
    n = _outputs(n2, swiglu, "grouped_gemm")
    counts = np.ascontiguousarray(np.asarray(sizes, dtype=np.int64))
    if counts.shape != (groups,) or (counts < 0).any() or counts.sum() != t:
        raise ShapeError(f"grouped_gemm: sizes must be {groups} non-negative counts summing "
                         f"to the {t} rows of a, got {counts.tolist()}")
    if out is None:
        out = _like(a, (t, n), _promote(ta.dtype, b_dtype))
    tc, c_fmt = _matrix(out, "out", 2, "grouped_gemm")
    if tc.shape != (t, n):
        raise ShapeError(f"grouped_gemm: out has shape {tc.shape}, expected {(t, n)}")
    _check_writable(tc, "grouped_gemm")
    ep, spec, _keep = _epilogue("grouped_gemm", t, n, bias, activation, None)
    variant = _Variant(config or blocking(), a_fmt, b_fmt, c_fmt, group, swiglu, **spec)
    if _kernel(variant, "tsr_gemm_grouped")(groups, counts.ctypes.data, n, k, ta.data_ptr(),
                                            *ta.strides, barg, tc.data_ptr(), *tc.strides, ep):
        raise TesseraError("grouped_gemm: out of memory for the packing buffers")
    return out


def moe_decode_fits(b: Any) -> bool:
    """Whether `moe_decode` takes expert weights b: quantized, or float with contiguous
    columns (stacked nn.Linear weights, transposed) or rows."""
    return isinstance(b, QuantizedMatrix) or 1 in b.stride()[1:]


@dataclass(frozen=True)
class MoeDecode:
    """A few tokens through their top-k experts' SwiGLU MLPs, summed by routing weight,
    in one launch (moe.c) for one dtype of x and one pair of expert weights, whose
    arguments are computed once: every picked expert's weights are streamed unpacked,
    once, by all threads together. Call it with pointers, as `launch` takes slots."""

    entry: int
    down_phase: int  # tsr_moe_down in the build for down's format
    shape: tuple[int, int, int]  # experts, hidden, intermediate
    weight_slots: tuple[int, ...]  # tsr_b of gate_up, then of down

    def __call__(self, tokens: int, topk: int, x: int, rsx: int, csx: int, ids: int,
                 weights: int, flags: int, out: int, refused: Callable[[], Exception]
                 ) -> None:
        """out [T, H] (contiguous, x's dtype) from x [T, H] (rows rsx, columns csx
        elements apart) and the routing: ids [T, topk] int64, weights [T, topk] float32,
        both contiguous, and flags [T] int32 (or 0): if one is set, nothing is computed
        and `refused()` is raised."""
        address_of_status = _status_word()
        _launcher()(self.entry, 1, 1, 1, tokens, topk, *self.shape, x, rsx, csx, ids,
                    topk, 1, weights, topk, 1, flags, *self.weight_slots, out,
                    self.shape[1], 1, self.down_phase, address_of_status)
        check(address_of_status, lambda: _moe_error(address_of_status, tokens, refused))


def _moe_error(address_of_status: int, tokens: int, refused: Callable[[], Exception]
               ) -> Exception:
    status = ctypes.c_int64.from_address(address_of_status).value
    if status == -3:
        return refused()
    if status == -2:
        return TesseraError("moe_decode: an expert id is out of range")
    return TesseraError(f"moe_decode: out of memory for the buffers of {tokens} tokens")


def moe_decode(dtype: Any, gate_up: Any, down: Any) -> MoeDecode:
    """The decode launch for x of `dtype` (torch float) and expert weights gate_up
    [E, H, 2I] = [gate | up] and down [E, I, H]: float torch tensors or QuantizedMatrix
    (see `moe_decode_fits`), kept alive by the caller."""
    fmt = _FORMATS[dt.as_dtype(dtype)]
    up_fmt, up_group, up_slots = _expert_slots(gate_up)
    down_fmt, down_group, down_slots = _expert_slots(down)

    def address(b_fmt: int, group: int, symbol: str) -> int:
        variant = _Variant(blocking(), fmt, b_fmt, fmt, group)
        fn = compile_c(variant.source() + _MOE_SOURCE.read_text(), name="gemm_moe",
                       openmp=True).function(symbol)
        return ctypes.cast(fn, ctypes.c_void_p).value
    down_phase = address(down_fmt, down_group, "tsr_moe_down")
    lasting(down_phase, 1)  # a slot holds it: code loaded for good, which replays may call
    return MoeDecode(address(up_fmt, up_group, "tsr_moe_launch"), down_phase,
                     (gate_up.shape[0], gate_up.shape[1], down.shape[1]),
                     up_slots + down_slots)


def _expert_slots(b: Any) -> tuple[int, int, tuple[int, ...]]:
    """Format, rows per scale and the tsr_b slots of expert weights [E, K, N]: a float
    torch tensor or a QuantizedMatrix."""
    if isinstance(b, QuantizedMatrix):
        return (_Q8 if b.bits == 8 else _Q4, b.group_size,
                (b.data.ctypes.data, b.scales.ctypes.data, 1, b.data.shape[-1],
                 b.scales.shape[-1], b.data.strides[0], b.scales.strides[0] // 4))
    gs, rs, cs = b.stride()
    return _FORMATS[dt.as_dtype(b.dtype)], 32, (b.data_ptr(), 0, rs, cs, 0, gs, 0)


def batched_gemm(a: Any, b: Any, out: Any = None, *, config: Blocking | None = None) -> Any:
    """out[i] = a[i] @ b[i] for [B, M, K] and [B, K, N] float32/16 tensors of any strides;
    a 2-D operand is shared by every product (a weight). Returns out [B, M, N]."""
    ta, a_fmt = _matrix(a, "a", (2, 3), "batched_gemm")
    tb, b_fmt = _matrix(b, "b", (2, 3), "batched_gemm")
    sa = ta.shape if len(ta.shape) == 3 else (1, *ta.shape)
    sb = tb.shape if len(tb.shape) == 3 else (1, *tb.shape)
    batch = max(sa[0], sb[0])
    if sa[0] not in (1, batch) or sb[0] not in (1, batch) or sa[2] != sb[1]:
        raise ShapeError(f"batched_gemm: cannot multiply {ta.shape} by {tb.shape}",
                         hint="[B, M, K] @ [B, K, N]; a 2-D operand is shared")
    (m, k), n = sa[1:], sb[2]

    def batch_stride(x: Any, s: tuple[int, ...]) -> int:
        return x.strides[0] if len(x.shape) == 3 and s[0] > 1 else 0
    if out is None:
        out = _like(a, (batch, m, n), _promote(ta.dtype, tb.dtype))
    tc, c_fmt = _matrix(out, "out", 3, "batched_gemm")
    if tc.shape != (batch, m, n):
        raise ShapeError(f"batched_gemm: out must be {(batch, m, n)}, got {tc.shape}")
    _check_writable(tc, "batched_gemm")
    barg = _BArgs(tb.data_ptr(), None, *tb.strides[-2:], 0, batch_stride(tb, sb), 0)
    variant = _Variant(config or blocking(), a_fmt, b_fmt, c_fmt)
    if _kernel(variant, "tsr_gemm_batched")(batch, m, n, k, ta.data_ptr(),
                                            batch_stride(ta, sa), *ta.strides[-2:], barg,
                                            tc.data_ptr(), *tc.strides, _EpilogueArgs()):
        raise TesseraError("batched_gemm: out of memory for the packing buffers")
    return out


def _like(x: Any, shape: tuple[int, ...], dtype: Any) -> Any:
    """A new C-contiguous result of x's kind: torch, tessera or numpy (a numpy operand
    never promotes to bfloat16, which numpy lacks)."""
    if type(x).__module__.startswith("torch"):
        import torch
        return torch.empty(shape, dtype=dtype.torch)
    if isinstance(x, Tensor):
        return empty(shape, dtype)
    return np.empty(shape, dtype.numpy)
