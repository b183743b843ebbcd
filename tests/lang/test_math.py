"""tessera_math.h against float64 torch references.

Each function is compiled into a `#pragma omp simd` loop (as kernels use it) and compared on
dense sweeps (max error in float32 ulps of the reference) and on special values (NaN
positions, infinities and signed zeros exact). The float16/bfloat16 conversions are checked
exhaustively / on random bit patterns against torch's own conversions.

`python tests/lang/test_math.py` prints the error table used in docs/lang/math.md.
"""

from __future__ import annotations

import ctypes
import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import tessera.lang.codegen as codegen  # noqa: E402
from tessera.runtime.toolchain import compile_c  # noqa: E402

HEADER = Path(codegen.__file__).with_name("tessera_math.h")
PRELUDE = "#include <stdint.h>\n#include <stdbool.h>\n#include <math.h>\n#include <string.h>\n"

UNARY = ["exp", "exp2", "log", "log2", "sqrt", "rsqrt", "abs", "tanh", "sigmoid", "erf", "sin",
         "cos", "silu", "gelu_erf", "gelu_tanh"]
BINARY = ["pow", "maximum", "minimum"]
CONVERT = [("f16_to_f32", "uint16_t", "float"), ("f32_to_f16", "float", "uint16_t"),
           ("bf16_to_f32", "uint16_t", "float"), ("f32_to_bf16", "float", "uint16_t")]

FMAX = float(np.finfo(np.float32).max)
TINY = 2.0 ** -149  # smallest float32 subnormal


def harness() -> str:
    loop = "    #pragma omp simd\n    for (int64_t i = 0; i < n; i++) "
    parts = [PRELUDE, HEADER.read_text()]
    for f in UNARY:
        parts.append(f"void apply_{f}(const float *x, float *y, int64_t n) {{\n"
                     f"{loop}y[i] = tsr_{f}(x[i]);\n}}\n")
    for f in BINARY:
        parts.append(f"void apply_{f}(const float *a, const float *b, float *y, int64_t n) {{\n"
                     f"{loop}y[i] = tsr_{f}(a[i], b[i]);\n}}\n")
    for f, src, dst in CONVERT:
        parts.append(f"void apply_{f}(const {src} *x, {dst} *y, int64_t n) {{\n"
                     f"{loop}y[i] = tsr_{f}(x[i]);\n}}\n")
    return "\n".join(parts)


_module = None


def module():
    global _module
    if _module is None:
        _module = compile_c(harness(), name="mathtest", openmp=True)
    return _module


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


def call(name: str, *args: np.ndarray, out_dtype=np.float32) -> np.ndarray:
    args = tuple(np.ascontiguousarray(a) for a in args)
    out = np.empty(args[0].shape, dtype=out_dtype)
    fn = module().function(f"apply_{name}", None,
                           [ctypes.c_void_p] * (len(args) + 1) + [ctypes.c_int64])
    fn(*[_ptr(a) for a in args], _ptr(out), out.size)
    return out


# ---- references ------------------------------------------------------------------------

def _t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x, dtype=np.float64))


def _sigmoid_times(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(v)


REF = {
    "exp": torch.exp, "exp2": torch.exp2, "log": torch.log, "log2": torch.log2,
    "sqrt": torch.sqrt, "rsqrt": torch.rsqrt, "abs": torch.abs, "tanh": torch.tanh,
    "sigmoid": torch.sigmoid, "erf": torch.erf, "sin": torch.sin, "cos": torch.cos,
    "silu": torch.nn.functional.silu,
    # 0.5 x (1 + erf(x/sqrt2)) written with erfc so the float64 reference has no cancellation
    "gelu_erf": lambda x: torch.where(x == -math.inf, torch.nan,
                                      0.5 * x * torch.special.erfc(-x / math.sqrt(2.0))),
    # 0.5 x (1 + tanh(u)) == x sigmoid(2u), same reason
    "gelu_tanh": lambda x: torch.where(
        x == -math.inf, torch.nan,
        _sigmoid_times(x, 2 * math.sqrt(2 / math.pi) * x * (1 + 0.044715 * x * x))),
}


def reference(name: str, *args: np.ndarray) -> np.ndarray:
    if name in REF:
        return REF[name](_t(args[0])).numpy()
    fn = {"pow": torch.pow, "maximum": torch.maximum, "minimum": torch.minimum}[name]
    return fn(_t(args[0]), _t(args[1])).numpy()


def ulp_of(ref: np.ndarray) -> np.ndarray:
    """float32 ulp at the (float64) reference value; subnormal spacing below 2^-126."""
    _, e = np.frexp(np.abs(ref))
    return np.maximum(np.ldexp(1.0, e - 24), TINY)


def errors(name: str, *args: np.ndarray) -> tuple[float, float, np.ndarray]:
    """(max ulp error, max abs error, ulp errors) of tsr_<name> against float64 torch.

    Where the reference rounds to +-inf in float32 the result must be that infinity (the
    error is inf otherwise); NaN positions must agree.
    """
    got = call(name, *args).astype(np.float64)
    ref = reference(name, *args)
    with np.errstate(over="ignore"):
        ref32 = ref.astype(np.float32).astype(np.float64)
    nan_ref, nan_got = np.isnan(ref), np.isnan(got)
    assert np.array_equal(nan_ref, nan_got), \
        f"{name}: NaN mismatch at {args[0][nan_ref != nan_got][:5]}"
    ok = ~nan_ref
    ref, ref32, got = ref[ok], ref32[ok], got[ok]
    inf = np.isinf(ref32)
    bad_inf = inf & (got != ref32)
    with np.errstate(invalid="ignore"):
        diff = np.abs(got - ref)
    err = np.where(inf, np.where(bad_inf, np.inf, 0.0), diff / ulp_of(ref))
    err = np.where(~inf & np.isinf(got), np.inf, err)
    absd = np.where(inf, 0.0, diff)
    absd = np.where(~inf & np.isinf(got), np.inf, absd)
    return float(err.max(initial=0)), float(absd.max(initial=0)), err


# ---- inputs ----------------------------------------------------------------------------

def rng(*key: float) -> np.random.Generator:
    """A generator seeded by `key`, so every test sees the same inputs in any order."""
    return np.random.default_rng([20240611, *np.array(key, dtype=np.float64).view(np.uint64)])


def span(lo: float, hi: float, n: int = 1 << 20) -> np.ndarray:
    """Evenly spaced values in [lo, hi], plus random float32 bit patterns inside it (so every
    binade is covered, down to subnormals when the range includes 0)."""
    lin = np.linspace(lo, hi, n, dtype=np.float64).astype(np.float32)
    r = rng(lo, hi, n)
    bits = r.integers(0, 0x7F800000, size=4 * n, dtype=np.int64).astype(np.uint32)
    rnd = bits.view(np.float32) * np.where(r.random(4 * n) < 0.5, -1, 1).astype(np.float32)
    rnd = rnd[(rnd >= lo) & (rnd <= hi)]
    return np.concatenate([lin, rnd])


POS = (TINY, FMAX)
# name -> (input range, max ulp bound). Bounds are the measured maxima (docs/lang/math.md,
# with and without FMA contraction) rounded up; 0.51 = correctly rounded up to a final
# double -> float rounding.
SWEEPS = {
    "exp": ((-110.0, 95.0), 1), "exp2": ((-160.0, 140.0), 1.5),
    "log": (POS, 1), "log2": (POS, 1), "sqrt": (POS, 0.5), "rsqrt": (POS, 0.51),
    "abs": ((-FMAX, FMAX), 0), "tanh": ((-20.0, 20.0), 1.5), "sigmoid": ((-110.0, 110.0), 3),
    "erf": ((-6.0, 6.0), 1.5), "sin": ((-1e4, 1e4), 1.75), "cos": ((-1e4, 1e4), 1.75),
    "silu": ((-110.0, 110.0), 3.5), "gelu_erf": ((-9.0, 20.0), 4),
    "gelu_tanh": ((-20.0, 20.0), 4),
}
# sin/cos keep their accuracy (SWEEPS bound + 0.25 ulp) up to SINCOS_RANGE
SINCOS_RANGE = 1e6
# extra sweeps: near 1 for log/log2, sin/cos farther out (abs error bound), zeros of sin/cos
NEAR1 = np.float32(1.0) + np.arange(-(1 << 16), 1 << 16).astype(np.float32) * np.float32(2 ** -24)

SPECIALS = np.array([0.0, -0.0, math.inf, -math.inf, math.nan, TINY, -TINY, 1e-40, -1e-40,
                     2.0 ** -126, -(2.0 ** -126), 1e-30, -1e-30, 1.0, -1.0, 0.5, -0.5, 2.0,
                     -2.0, 88.0, -88.0, 88.8, -88.8, 89.0, -104.0, 128.0, -150.0, 1e4, -1e4,
                     1e30, -1e30, FMAX, -FMAX], dtype=np.float32)


def check_specials(name: str, bound: float, *args: np.ndarray) -> None:
    got = call(name, *args).astype(np.float64)
    ref = reference(name, *args)
    with np.errstate(over="ignore"):
        ref32 = ref.astype(np.float32).astype(np.float64)
    for i in range(got.size):
        where = f"{name}{tuple(float(a[i]) for a in args)}: got {got[i]!r}, want {ref[i]!r}"
        if math.isnan(ref[i]) or math.isnan(got[i]):
            assert math.isnan(ref[i]) and math.isnan(got[i]), where
        elif math.isinf(ref32[i]) or math.isinf(got[i]) or ref32[i] == 0 or got[i] == 0:
            # infinities and exact zeros (with sign) must match exactly
            if ref32[i] == 0 and got[i] == 0:
                assert math.copysign(1, ref32[i]) == math.copysign(1, got[i]), where
            elif ref32[i] == 0:  # tiny reference that rounds to 0: allow the ulp bound
                assert abs(got[i] - ref[i]) <= bound * TINY, where
            else:
                assert got[i] == ref32[i], where
        else:
            assert abs(got[i] - ref[i]) <= bound * ulp_of(ref[i]), where


# ---- tests: unary ----------------------------------------------------------------------

@pytest.mark.parametrize("name", UNARY)
def test_unary_sweep(name):
    (lo, hi), bound = SWEEPS[name]
    ulp, _, _ = errors(name, span(lo, hi))
    assert ulp <= bound, f"{name}: max error {ulp:.3f} ulp > {bound}"


@pytest.mark.parametrize("name", UNARY)
def test_unary_specials(name):
    x = SPECIALS
    if name in ("sin", "cos"):  # no accuracy promise past SINCOS_RANGE (see test_sincos_far)
        x = x[~(np.abs(x) > SINCOS_RANGE)]
    check_specials(name, SWEEPS[name][1], x)


@pytest.mark.parametrize("name", ["log", "log2"])
def test_log_near_one(name):
    ulp, _, _ = errors(name, NEAR1)
    assert ulp <= SWEEPS[name][1]


@pytest.mark.parametrize("name", ["exp", "exp2"])
def test_exp_subnormal_results(name):
    x = span(-104.0, -87.0) if name == "exp" else span(-150.0, -125.0)
    ulp, _, _ = errors(name, x)
    assert ulp <= SWEEPS[name][1]  # subnormal results are rounded, not flushed


@pytest.mark.parametrize("name", ["sin", "cos"])
def test_sincos_far(name):
    # float32 Cody-Waite reduction: accurate while |r| stays near pi/4, i.e. |x| <~ 1e6
    ulp, absd, _ = errors(name, span(-SINCOS_RANGE, SINCOS_RANGE))
    assert ulp <= SWEEPS[name][1] + 0.25 and absd <= 8e-8
    far = np.concatenate([span(-1e9, 1e9, 1 << 16), np.array(
        [1e7, -3e7, 1e16, 1e20, -3e38, FMAX, -FMAX], dtype=np.float32)])
    got = call(name, far)
    assert np.all(np.abs(got) <= 1)  # far out: bounded (not NaN), not accurate


def test_sin_near_multiples_of_pi():
    k = np.arange(-3000, 3001, dtype=np.float64)
    base = (k * math.pi).astype(np.float32)
    x = np.concatenate([np.nextafter(base, np.float32(np.inf)), base,
                        np.nextafter(base, np.float32(-np.inf))])
    ulp, _, _ = errors("sin", x)
    assert ulp <= SWEEPS["sin"][1]


# every 11th float in [-16, -0.25] (4.6M of them): where the float32 activations have their
# largest errors
DENSE_NEG = -np.arange(np.float32(0.25).view(np.uint32), np.float32(16).view(np.uint32), 11,
                       dtype=np.uint32).view(np.float32)


@pytest.mark.parametrize("name", ["tanh", "sigmoid", "silu", "gelu_tanh"])
def test_activation_dense(name):
    ulp, _, _ = errors(name, DENSE_NEG)
    assert ulp <= SWEEPS[name][1], f"{name}: {ulp} ulp"


def test_tiny_inputs_relative():
    x = span(-1e-3, 1e-3)
    for name in ("tanh", "erf", "sin", "silu", "gelu_erf", "gelu_tanh"):
        ulp, _, _ = errors(name, x)
        assert ulp <= SWEEPS[name][1], name


def test_gelu_erf_far_negative_tail():
    # x < -9: |gelu| <= 1.03e-18; any result that small (or -0) is accepted there, but the
    # sign is never positive
    x = span(-1e4, -9.0)
    got = call("gelu_erf", x)
    assert np.all(np.abs(got) <= 1.03e-18) and not np.any(got > 0)
    ulp, _, _ = errors("gelu_erf", span(-9.0, -1.0))  # relative accuracy down to -9
    assert ulp <= SWEEPS["gelu_erf"][1]


# ---- tests: binary ---------------------------------------------------------------------

def pow_inputs() -> tuple[np.ndarray, np.ndarray]:
    n = 1 << 19
    r = rng(1)
    with np.errstate(over="ignore"):
        big = np.exp(r.uniform(-100, 100, n)).astype(np.float32)
    pairs = [
        (np.exp(r.uniform(-8, 8, n)), r.uniform(-12, 12, n)),  # positive bases, wide range
        (r.uniform(0.5, 2, n), r.uniform(-200, 200, n)),       # near 1, large exponents
        (r.uniform(-30, 30, n), r.integers(-25, 26, n)),       # negative bases, integer powers
        (r.uniform(-3, 3, n), r.uniform(-5, 5, n)),            # negative bases, any power
        (big, r.uniform(-3, 3, n)),                            # over/underflow, subnormals
    ]
    x = np.concatenate([a.astype(np.float32) for a, _ in pairs])
    y = np.concatenate([b.astype(np.float32) for _, b in pairs])
    return x, y


POW_BOUND = 0.51


def test_pow_sweep():
    x, y = pow_inputs()
    ulp, _, _ = errors("pow", x, y)
    assert ulp <= POW_BOUND, f"pow: {ulp} ulp"


PAIR_VALUES = np.array([0.0, -0.0, math.inf, -math.inf, math.nan, 1.0, -1.0, 2.0, -2.0, 0.5,
                        -0.5, 3.0, -3.0, 2.5, -2.5, TINY, -TINY, 1e-40, FMAX, -FMAX, 1e10,
                        -1e10, 2.0 ** 24 + 2, 2.0 ** 30, -(2.0 ** 30) - 128], dtype=np.float32)


def _pairs() -> tuple[np.ndarray, np.ndarray]:
    a, b = np.meshgrid(PAIR_VALUES, PAIR_VALUES, indexing="ij")
    return a.ravel().copy(), b.ravel().copy()


def test_pow_specials():
    a, b = _pairs()
    check_specials("pow", POW_BOUND, a, b)


@pytest.mark.parametrize("name", ["maximum", "minimum"])
def test_maximum_minimum(name):
    a, b = _pairs()
    r = rng(2)
    a = np.concatenate([a, r.standard_normal(10000).astype(np.float32)])
    b = np.concatenate([b, r.standard_normal(10000).astype(np.float32)])
    got = call(name, a, b)
    want = getattr(torch, name)(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    assert np.array_equal(np.isnan(got), np.isnan(want))
    ok = ~np.isnan(want)
    assert np.array_equal(got[ok], want[ok])
    # signed zeros: maximum(-0, +0) = +0 and minimum(-0, +0) = -0 in either order
    zeros = ok & (a == 0) & (b == 0)
    sign = np.signbit(got[zeros])
    expect = (np.signbit(a[zeros]) & np.signbit(b[zeros])) if name == "maximum" \
        else (np.signbit(a[zeros]) | np.signbit(b[zeros]))
    assert np.array_equal(sign, expect)


# ---- tests: float16 / bfloat16 ---------------------------------------------------------

ALL16 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)


@pytest.mark.parametrize("name,dtype", [("f16_to_f32", torch.float16),
                                        ("bf16_to_f32", torch.bfloat16)])
def test_half_to_float_exhaustive(name, dtype):
    got = call(name, ALL16)
    want = torch.from_numpy(ALL16.view(np.int16)).view(dtype).float().numpy()
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))


def f32_patterns() -> np.ndarray:
    rnd = rng(3).integers(0, 1 << 32, size=1 << 21, dtype=np.uint64).astype(np.uint32)
    # every half/bfloat value's neighbourhood: exact values, midpoints and +-1 ulp of them
    h = torch.from_numpy(ALL16.view(np.int16))
    edges = []
    for dt in (torch.float16, torch.bfloat16):
        v = h.view(dt).double().numpy()
        v = v[np.isfinite(v)]
        v = np.sort(v)
        mids = (v[:-1] + v[1:]) / 2
        for w in (v, mids):
            w32 = w.astype(np.float32)
            edges += [w32, np.nextafter(w32, np.float32(np.inf)),
                      np.nextafter(w32, np.float32(-np.inf))]
    specials = np.array([0.0, -0.0, math.inf, -math.inf, math.nan, 65504.0, 65519.99,
                         65520.0, 65536.0, FMAX, -FMAX, TINY, 2.0 ** -24, 2.0 ** -25,
                         2.0 ** -25 * 1.0000001, 2.0 ** -14, 2.0 ** -133], dtype=np.float32)
    return np.concatenate([rnd.view(np.float32), *edges, specials])


@pytest.mark.parametrize("name,dtype", [("f32_to_f16", torch.float16),
                                        ("f32_to_bf16", torch.bfloat16)])
def test_float_to_half_rounding(name, dtype):
    x = f32_patterns()
    got = call(name, x, out_dtype=np.uint16)
    want = torch.from_numpy(x).to(dtype).view(torch.int16).numpy().view(np.uint16)
    nan = np.isnan(x)
    back = torch.from_numpy(got.view(np.int16)).view(dtype).float().numpy()
    assert np.all(np.isnan(back[nan])), "NaN must stay NaN"
    bad = np.nonzero(got[~nan] != want[~nan])[0]
    assert bad.size == 0, f"{name}: {bad.size} mismatches, e.g. {x[~nan][bad[:5]]}"


# ---- error table (python tests/lang/test_math.py) --------------------------------------

def _table() -> None:
    rows = []
    for name in UNARY:
        (lo, hi), bound = SWEEPS[name]
        ulp, absd, _ = errors(name, span(lo, hi))
        rows.append((name, f"[{lo:.3g}, {hi:.3g}]", ulp, absd, bound))
    for name in ("tanh", "sigmoid", "silu", "gelu_tanh"):
        ulp, absd, _ = errors(name, DENSE_NEG)
        rows.append((name, "every 3rd float in [-16, -0.25]", ulp, absd, SWEEPS[name][1]))
    for name in ("log", "log2"):
        ulp, absd, _ = errors(name, NEAR1)
        rows.append((name, "1 +- 2^-8", ulp, absd, SWEEPS[name][1]))
    for name in ("sin", "cos"):
        for r in (1e5, SINCOS_RANGE, 6e6):
            ulp, absd, _ = errors(name, span(-r, r))
            rows.append((name, f"[-{r:.0e}, {r:.0e}]", ulp, absd,
                         SWEEPS[name][1] + 0.25 if r == SINCOS_RANGE else None))
    ulp, absd, _ = errors("gelu_erf", span(-9.0, -1.0))
    rows.append(("gelu_erf", "[-9, -1]", ulp, absd, SWEEPS["gelu_erf"][1]))
    ulp, absd, _ = errors("erf", span(-1e-3, 1e-3))
    rows.append(("erf", "[-1e-3, 1e-3]", ulp, absd, SWEEPS["erf"][1]))
    ulp, absd, _ = errors("gelu_erf", span(-1e-3, 1e-3))
    rows.append(("gelu_erf", "[-1e-3, 1e-3]", ulp, absd, SWEEPS["gelu_erf"][1]))
    k = np.arange(-3000, 3001, dtype=np.float64)
    base = (k * math.pi).astype(np.float32)
    x = np.concatenate([np.nextafter(base, np.float32(np.inf)), base,
                        np.nextafter(base, np.float32(-np.inf))])
    ulp, absd, _ = errors("sin", x)
    rows.append(("sin", "k*pi +- 1 ulp, |k| <= 3000", ulp, absd, SWEEPS["sin"][1]))
    ulp, absd, _ = errors("pow", *pow_inputs())
    rows.append(("pow", "see pow_inputs()", ulp, absd, POW_BOUND))
    print(f"{'function':10} {'range':28} {'max ulp':>8} {'max abs':>10} bound")
    for name, rng, ulp, absd, bound in rows:
        print(f"{name:10} {rng:28} {ulp:8.3f} {absd:10.3g} {bound}")


if __name__ == "__main__":
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as cache:  # keep the user's compile cache clean
        os.environ["TESSERA_CACHE_DIR"] = cache
        _table()
