"""Property-based tests: kernels compared with torch references on random inputs.

Each distinct constexpr/dtype combination compiles a specialization (cached for the rest
of the session), so the strategies draw from small sets of block sizes and operators.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tessera.lang as tl

SETTINGS = settings(deadline=None, max_examples=25, derandomize=False,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.data_too_large])
FEW = settings(SETTINGS, max_examples=12)

SIZES = st.sampled_from([1, 7, 33, 1000])
BLOCKS = st.sampled_from([1, 16, 128, 1024])
SEEDS = st.integers(0, 2**32 - 1)

TORCH = {"float32": torch.float32, "int32": torch.int32, "int64": torch.int64,
         "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
         "float16": torch.float16, "bfloat16": torch.bfloat16}
TL = {"float32": tl.float32, "int32": tl.int32, "int64": tl.int64, "int8": tl.int8,
      "uint8": tl.uint8, "bool": tl.bool, "float16": tl.float16, "bfloat16": tl.bfloat16}


# ---------------------------------------------------------------------------------------
# data helpers
# ---------------------------------------------------------------------------------------

def rand(gen: np.random.Generator, shape, dtype: str, lo: int = -100, hi: int = 100,
         specials: bool = False) -> torch.Tensor:
    """Random values of `dtype`; floats optionally sprinkled with nan/inf/-0.0."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if dtype == "bool":
        return torch.from_numpy(gen.random(shape) < 0.5)
    if dtype in ("float32", "float16", "bfloat16"):
        a = gen.standard_normal(shape).astype(np.float32) * np.float32(hi / 4)
        if specials and a.size:
            flat = a.reshape(-1)
            k = max(1, a.size // 8)
            pos = gen.integers(0, a.size, k)
            flat[pos] = gen.choice(np.array([np.nan, np.inf, -np.inf, -0.0, 0.0],
                                            np.float32), k)
        return torch.from_numpy(a).to(TORCH[dtype])
    a = gen.integers(lo, hi + 1, shape, dtype=np.int64)
    return torch.from_numpy(a).to(TORCH[dtype])


def view_1d(gen: np.random.Generator, n: int, dtype: str, layout: str, **kw
            ) -> torch.Tensor:
    """A length-n tensor: contiguous, every other element, or starting at offset 3."""
    if layout == "contig":
        return rand(gen, n, dtype, **kw)
    if layout == "step2":
        return rand(gen, 2 * n, dtype, **kw)[::2]
    return rand(gen, n + 3, dtype, **kw)[3:]


def assert_same(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-6,
                atol: float = 0.0) -> None:
    got, want = torch.as_tensor(got), torch.as_tensor(want)
    assert got.shape == want.shape, (got.shape, want.shape)
    if want.dtype.is_floating_point:
        torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol,
                                   equal_nan=True)
    else:
        assert got.dtype == want.dtype, (got.dtype, want.dtype)
        if not torch.equal(got, want):
            bad = (got != want).nonzero()[:5].flatten().tolist()
            raise AssertionError(f"mismatch at {bad}: got {got.flatten()[bad].tolist()} "
                                 f"want {want.flatten()[bad].tolist()}")


# ---------------------------------------------------------------------------------------
# elementwise binary ops
# ---------------------------------------------------------------------------------------

@tl.kernel
def k_binary(x, y, out, OP: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK
    a = x[i:i + BLOCK]
    b = y[i:i + BLOCK]
    if OP == "add":
        r = a + b
    elif OP == "sub":
        r = a - b
    elif OP == "mul":
        r = a * b
    elif OP == "truediv":
        r = a / b
    elif OP == "maximum":
        r = tl.maximum(a, b)
    elif OP == "minimum":
        r = tl.minimum(a, b)
    elif OP == "py_max":
        r = max(a, b)
    elif OP == "py_min":
        r = min(a, b)
    elif OP == "lt":
        r = a < b
    elif OP == "le":
        r = a <= b
    elif OP == "gt":
        r = a > b
    elif OP == "ge":
        r = a >= b
    elif OP == "eq":
        r = a == b
    elif OP == "ne":
        r = a != b
    elif OP == "where":
        r = tl.where(a < b, a, b - a)
    elif OP == "and":
        r = a & b
    elif OP == "or":
        r = a | b
    elif OP == "xor":
        r = a ^ b
    elif OP == "lshift":
        r = a << (b & 15)
    elif OP == "rshift":
        r = a >> (b & 15)
    elif OP == "invert":
        r = ~a ^ b
    elif OP == "chain":
        r = (a < b) == (b >= 0)
    elif OP == "ternary_chain":
        r = tl.where((a < b) & (b < 50), a * 2 - b, -a)
    else:
        r = a + b * 3 - a * b
    out[i:i + BLOCK] = r


def ref_binary(op: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return {"add": lambda: a + b, "sub": lambda: a - b, "mul": lambda: a * b,
            "truediv": lambda: torch.true_divide(a, b),
            "maximum": lambda: torch.maximum(a, b), "minimum": lambda: torch.minimum(a, b),
            "py_max": lambda: torch.maximum(a, b), "py_min": lambda: torch.minimum(a, b),
            "lt": lambda: a < b, "le": lambda: a <= b, "gt": lambda: a > b,
            "ge": lambda: a >= b, "eq": lambda: a == b, "ne": lambda: a != b,
            "where": lambda: torch.where(a < b, a, b - a),
            "ternary_chain": lambda: torch.where((a < b) & (b < 50), a * 2 - b, -a),
            "poly": lambda: a + b * 3 - a * b,
            "and": lambda: a & b, "or": lambda: a | b, "xor": lambda: a ^ b,
            "lshift": lambda: a << (b & 15), "rshift": lambda: a >> (b & 15),
            "invert": lambda: ~a ^ b, "chain": lambda: (a < b) == (b >= 0)}[op]()


BIN_OPS = ["add", "sub", "mul", "truediv", "maximum", "minimum", "py_max", "py_min", "lt",
           "le", "gt", "ge", "eq", "ne", "where", "ternary_chain", "poly"]


def run_binary(op, a, b, block, use_numpy=False):
    want = ref_binary(op, a, b)
    out = torch.full(want.shape, 7, dtype=want.dtype)
    args = (a.numpy(), b.numpy(), out.numpy()) if use_numpy else (a, b, out)
    k_binary[(tl.cdiv(a.shape[0], block),)](*args, OP=op, BLOCK=block)
    return out, want


@SETTINGS
@given(op=st.sampled_from(BIN_OPS), dtype=st.sampled_from(["float32", "int32", "int64"]),
       n=SIZES, block=BLOCKS, seed=SEEDS, specials=st.booleans(),
       layouts=st.tuples(*[st.sampled_from(["contig", "step2", "offset"])] * 2),
       use_numpy=st.booleans())
def test_binary_ops(op, dtype, n, block, seed, specials, layouts, use_numpy):
    gen = np.random.default_rng(seed)
    kw = dict(specials=specials) if dtype == "float32" else dict(lo=-1000, hi=1000)
    a = view_1d(gen, n, dtype, layouts[0], **kw)
    b = view_1d(gen, n, dtype, layouts[1], **kw)
    if op == "truediv" and dtype != "float32":
        b[b == 0] = 1
    if gen.random() < 0.3:  # some equal elements, for the comparisons and max/min
        b[: n // 2] = a[: n // 2]
    out, want = run_binary(op, a, b, block, use_numpy)
    assert_same(out, want, rtol=1e-6 if op != "poly" else 1e-5,
                atol=0 if op != "poly" else 1e-3)


@pytest.mark.parametrize("op", ["maximum", "minimum", "py_max", "py_min"])
def test_float_maximum_minimum_propagate_nan(op):
    nan, inf = float("nan"), float("inf")
    vals = [nan, inf, -inf, 0.0, -0.0, 1.0, -1.0]
    a = torch.tensor([p for p in vals for _ in vals], dtype=torch.float32)
    b = torch.tensor([q for _ in vals for q in vals], dtype=torch.float32)
    out, want = run_binary(op, a, b, 16)
    assert_same(out, want)
    assert torch.equal(out.isnan(), a.isnan() | b.isnan())


@pytest.mark.parametrize("dtype,block", [("float32", 1024), ("int64", 128), ("int32", 16)])
def test_binary_ops_large(dtype, block):
    n = 1_000_003
    gen = np.random.default_rng(n)
    a, b = rand(gen, n, dtype, specials=True), rand(gen, n, dtype, specials=True)
    for op in ("poly", "where"):
        out, want = run_binary(op, a, b, block)
        # a + b * 3 - a * b may be contracted into FMAs: allow for the cancellation
        assert_same(out, want, rtol=1e-5, atol=1e-3)


@SETTINGS
@given(op=st.sampled_from(["and", "or", "xor", "lshift", "rshift", "invert", "chain"]),
       dtype=st.sampled_from(["int32", "int64", "bool", "uint8", "int8"]), n=SIZES,
       block=st.sampled_from([16, 128]), seed=SEEDS)
def test_bitwise_ops(op, dtype, n, block, seed):
    if dtype == "bool" and op in ("lshift", "rshift"):
        return
    gen = np.random.default_rng(seed)
    lo, hi = {"uint8": (0, 255), "int8": (-128, 127)}.get(dtype, (-1000, 1000))
    a, b = rand(gen, n, dtype, lo=lo, hi=hi), rand(gen, n, dtype, lo=lo, hi=hi)
    out, want = run_binary(op, a, b, block)
    assert_same(out, want)


MIXED = ["bool", "int8", "uint8", "int32", "int64", "float32"]


@SETTINGS
@given(op=st.sampled_from(["add", "mul", "lt", "eq", "maximum", "where", "truediv"]),
       da=st.sampled_from(MIXED), db=st.sampled_from(MIXED), n=st.sampled_from([1, 7, 33]),
       seed=SEEDS)
def test_binary_type_promotion(op, da, db, n, seed):
    """Mixed dtypes promote as torch does (int8 x uint8 computes in int32 instead of
    torch's int16; the values agree)."""
    gen = np.random.default_rng(seed)
    a, b = rand(gen, n, da, lo=0, hi=100), rand(gen, n, db, lo=1, hi=100)
    if op == "where" and da == "bool" and db == "bool":
        return  # torch refuses b - a on bools
    if op == "where" and "bool" in (da, db):
        return  # torch refuses - on bools
    want = ref_binary(op, a, b)
    if want.dtype == torch.int16:
        want = want.to(torch.int32)
    out = torch.zeros(want.shape, dtype=want.dtype)
    k_binary[(1,)](a, b, out, OP=op, BLOCK=64)
    assert_same(out, want)


@tl.kernel
def k_scalar_args(x, out, s, t, flag, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK
    v = x[i:i + BLOCK] * s + t
    if flag:
        v = -v
    out[i:i + BLOCK] = v


@FEW
@given(n=SIZES, block=BLOCKS, s=st.floats(-100, 100, width=32), t=st.integers(-1000, 1000),
       flag=st.booleans(), seed=SEEDS)
def test_runtime_scalar_arguments(n, block, s, t, flag, seed):
    x = rand(np.random.default_rng(seed), n, "float32")
    out = torch.zeros(n)
    k_scalar_args[(tl.cdiv(n, block),)](x, out, s, t, flag, BLOCK=block)
    want = x * s + t
    assert_same(out, -want if flag else want, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------------
# integer // and % (Python floor semantics)
# ---------------------------------------------------------------------------------------

@tl.kernel
def k_divmod(x, y, q, r, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK
    a = x[i:i + BLOCK]
    b = y[i:i + BLOCK]
    q[i:i + BLOCK] = a // b
    r[i:i + BLOCK] = a % b


@tl.kernel
def k_divmod_const(x, q, r, D: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK
    a = x[i:i + BLOCK]
    q[i:i + BLOCK] = a // D
    r[i:i + BLOCK] = a % D


def _floor_ref(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Python // and %, computed in int64 (exact for int32 inputs), wrapped to a's dtype."""
    a64, b64 = a.to(torch.int64), b.to(torch.int64)
    return (torch.div(a64, b64, rounding_mode="floor").to(a.dtype),
            torch.remainder(a64, b64).to(a.dtype))


@SETTINGS
@given(dtype=st.sampled_from(["int32", "int64"]), n=SIZES, block=BLOCKS, seed=SEEDS,
       wide=st.booleans())
def test_floor_divmod(dtype, n, block, seed, wide):
    gen = np.random.default_rng(seed)
    lo = -2**31 if wide and dtype == "int32" else -10**6
    a = rand(gen, n, dtype, lo=lo, hi=-lo - 1)
    b = rand(gen, n, dtype, lo=-50, hi=50)
    if dtype == "int32" and wide:
        b = torch.where(torch.from_numpy(gen.random(n) < 0.5), b,
                        rand(gen, n, dtype, lo=lo, hi=-lo - 1))
    b[b == 0] = -1 if gen.random() < 0.5 else 3
    q, r = torch.zeros_like(a), torch.zeros_like(a)
    k_divmod[(tl.cdiv(n, block),)](a, b, q, r, BLOCK=block)
    wq, wr = _floor_ref(a, b)
    assert_same(q, wq)
    assert_same(r, wr)


@FEW
@given(d=st.sampled_from([-7, -2, -1, 1, 3, 8]), dtype=st.sampled_from(["int32", "int64"]),
       seed=SEEDS)
def test_floor_divmod_by_constant(d, dtype, seed):
    a = rand(np.random.default_rng(seed), 100, dtype, lo=-10**5, hi=10**5)
    q, r = torch.zeros_like(a), torch.zeros_like(a)
    k_divmod_const[(1,)](a, q, r, D=d, BLOCK=128)
    wq, wr = _floor_ref(a, torch.full_like(a, d))
    assert_same(q, wq)
    assert_same(r, wr)


def test_divmod_edge_cases():
    """INT_MIN // -1 wraps (no SIGFPE); // 0 and % 0 are 0, as documented."""
    for dtype, lo in ((torch.int32, -2**31), (torch.int64, -2**63)):
        a = torch.tensor([lo, lo, lo, 5, -5, 7, lo + 1], dtype=dtype)
        b = torch.tensor([-1, 1, 2, 0, 0, -1, -1], dtype=dtype)
        q, r = torch.zeros_like(a), torch.zeros_like(a)
        k_divmod[(1,)](a, b, q, r, BLOCK=8)
        assert q.tolist() == [lo, lo, lo // 2, 0, 0, -7, -(lo + 1)]
        assert r.tolist() == [0, 0, 0, 0, 0, 0, 0]


# ---------------------------------------------------------------------------------------
# 2-D tiles, broadcasting, strided views
# ---------------------------------------------------------------------------------------

@tl.kernel
def k_2d(x, row, col, out, BM: tl.constexpr, BN: tl.constexpr):
    i = tl.program_id(0) * BM
    j = tl.program_id(1) * BN
    t = x[i:i + BM, j:j + BN]
    out[i:i + BM, j:j + BN] = t * 2.0 + row[j:j + BN][None, :] - col[i:i + BM][:, None]


LAYOUTS_2D = {
    "contig": (lambda m, n: (m, n), lambda b: b),
    "t": (lambda m, n: (n, m), lambda b: b.t()),
    "rowstep": (lambda m, n: (2 * m, n), lambda b: b[::2]),
    "colstep": (lambda m, n: (m, 2 * n), lambda b: b[:, ::2]),
    "offset": (lambda m, n: (m + 3, n + 2), lambda b: b[3:, 2:]),
    "t_step": (lambda m, n: (2 * n, 3 * m), lambda b: b[::2, ::3].t()),
}


@SETTINGS
@given(m=st.sampled_from([1, 5, 17, 64]), n=st.sampled_from([1, 3, 17, 40]),
       bm=st.sampled_from([1, 8, 32]), bn=st.sampled_from([1, 16, 32]),
       xl=st.sampled_from(list(LAYOUTS_2D)), ol=st.sampled_from(list(LAYOUTS_2D)),
       vec_step=st.sampled_from([1, 3]), seed=SEEDS, use_numpy=st.booleans())
def test_2d_broadcast_and_views(m, n, bm, bn, xl, ol, vec_step, seed, use_numpy):
    gen = np.random.default_rng(seed)
    shape_of, view_of = LAYOUTS_2D[xl]
    x = view_of(rand(gen, shape_of(m, n), "float32"))
    row = rand(gen, n * vec_step, "float32")[::vec_step]
    col = rand(gen, m * vec_step + 2, "float32")[2::vec_step]
    shape_of, view_of = LAYOUTS_2D[ol]
    base = rand(gen, shape_of(m, n), "float32")
    expected_base = base.clone()
    out = view_of(base)
    assert out.shape == x.shape == (m, n)
    want = x * 2.0 + row[None, :] - col[:, None]
    view_of(expected_base)[...] = want
    args = (x, row, col, out)
    if use_numpy:
        args = tuple(a.numpy() for a in args)
    k_2d[(tl.cdiv(m, bm), tl.cdiv(n, bn))](*args, BM=bm, BN=bn)
    assert_same(out, want, rtol=1e-6, atol=1e-6)
    # and nothing outside the output view was touched
    assert_same(base, expected_base, rtol=1e-6, atol=1e-6)


def test_numpy_negative_strides():
    gen = np.random.default_rng(0)
    x = rand(gen, (9, 10), "float32").numpy()[::-1, ::-2]
    out_base = np.zeros((9, 10), np.float32)
    out = out_base[::-1, 1::2]
    row = np.arange(5, dtype=np.float32)[::-1]
    col = np.arange(9, dtype=np.float32)
    k_2d[(3, 1)](x, row, col, out, BM=4, BN=8)
    np.testing.assert_allclose(out, x * 2 + row[None, :] - col[:, None], rtol=1e-6)
    assert (out_base[:, 0::2] == 0).all()


# ---------------------------------------------------------------------------------------
# masked loads: other=, negative offsets, integer indices out of range
# ---------------------------------------------------------------------------------------

@tl.kernel
def k_pad(x, out, OTHER: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK
    out[i:i + BLOCK] = tl.load(x[i:i + BLOCK], other=OTHER)


@tl.kernel
def k_shift(x, out, SHIFT: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK
    out[i:i + BLOCK] = tl.load(x[i - SHIFT:i - SHIFT + BLOCK], other=-1)


@tl.kernel
def k_rows(x, out, OTHER: tl.constexpr, BN: tl.constexpr):
    r = tl.program_id(0)
    j = tl.program_id(1) * BN
    out[r, j:j + BN] = tl.load(x[r, j:j + BN], other=OTHER) + 1


@FEW
@given(n=SIZES, block=st.sampled_from([16, 128]), dtype=st.sampled_from(["float32", "int32"]),
       other=st.sampled_from([7, -3, 0]), seed=SEEDS)
def test_masked_load_other(n, block, dtype, other, seed):
    x = rand(np.random.default_rng(seed), n, dtype)
    padded = tl.cdiv(n, block) * block
    out = torch.zeros(padded, dtype=x.dtype)
    # the output is longer than x: the tail of each last block reads `other`
    k_pad[(tl.cdiv(n, block),)](x, out, OTHER=other, BLOCK=block)
    want = torch.full((padded,), other, dtype=x.dtype)
    want[:n] = x
    assert_same(out, want)


@FEW
@given(n=SIZES, block=st.sampled_from([1, 16, 128]), shift=st.sampled_from([-5, -1, 1, 3]),
       seed=SEEDS)
def test_shifted_loads(n, block, shift, seed):
    x = rand(np.random.default_rng(seed), n, "int64")
    out = torch.zeros(n, dtype=torch.int64)
    k_shift[(tl.cdiv(n, block),)](x, out, SHIFT=shift, BLOCK=block)
    idx = torch.arange(n) - shift
    ok = (idx >= 0) & (idx < n)
    want = torch.where(ok, x[idx.clamp(0, max(n - 1, 0))], torch.tensor(-1))
    assert_same(out, want)


def test_integer_index_past_the_end_is_masked():
    """x[r, ...] / out[r, ...] with r past the tensor's end: the load reads `other` and the
    store writes nothing, even when the tensor is a view into a larger buffer."""
    xbase = torch.arange(10 * 8, dtype=torch.float32).reshape(10, 8) + 100
    x = xbase[2:4]  # 2 rows; rows 4.. of the buffer hold other data
    obase = torch.zeros(10, 8)
    out = obase[2:6]  # 4 rows: rows 2 and 3 of `out` are past the end of x
    k_rows[(4, 1)](x, out, OTHER=-7.0, BN=8)
    assert_same(out[:2], x + 1)
    assert_same(out[2:], torch.full((2, 8), -6.0))
    # now out has 2 rows and the grid 4: rows 2, 3 must not be written
    obase = torch.zeros(10, 8)
    out = obase[2:4]
    k_rows[(4, 1)](xbase[2:6], out, OTHER=-7.0, BN=8)
    assert_same(out, xbase[2:4] + 1)
    assert_same(obase[4:], torch.zeros(6, 8))
    assert_same(obase[:2], torch.zeros(2, 8))


@tl.kernel
def k_inplace(x, y, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK
    x[i:i + BLOCK] = x[i:i + BLOCK] * 2 + y[i:i + BLOCK]


def test_inplace_and_aliased_arguments():
    gen = np.random.default_rng(1)
    x = rand(gen, 1000, "float32")
    y = rand(gen, 1000, "float32")
    want = x * 2 + y
    k_inplace[(tl.cdiv(1000, 128),)](x, y, BLOCK=128)
    assert_same(x, want, rtol=1e-6)
    want = x * 2 + x
    k_inplace[(tl.cdiv(1000, 128),)](x, x, BLOCK=128)  # x and y alias
    assert_same(x, want, rtol=1e-6)


# ---------------------------------------------------------------------------------------
# reductions
# ---------------------------------------------------------------------------------------

@tl.kernel
def k_reduce(x, out, FN: tl.constexpr, AXIS: tl.constexpr, KEEP: tl.constexpr,
             OTHER: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    t = tl.load(x[0:BM, 0:BN], other=OTHER)
    if FN == "sum":
        r = tl.sum(t, axis=AXIS, keepdims=KEEP)
    elif FN == "max":
        r = tl.max(t, axis=AXIS, keepdims=KEEP)
    elif FN == "min":
        r = tl.min(t, axis=AXIS, keepdims=KEEP)
    elif FN == "mean":
        r = tl.mean(t, axis=AXIS, keepdims=KEEP)
    elif FN == "method_sum":
        r = t.sum(axis=AXIS, keepdims=KEEP)
    else:
        r = t.max(axis=AXIS, keepdims=KEEP)
    if AXIS == None:  # noqa: E711
        if KEEP:
            out[0:1, 0:1] = r
        else:
            out[0:1] = r
    elif AXIS == 0:
        if KEEP:
            out[0:1, 0:BN] = r
        else:
            out[0:BN] = r
    else:
        if KEEP:
            out[0:BM, 0:1] = r
        else:
            out[0:BM] = r


def ref_reduce(fn: str, x: torch.Tensor, axis, keep: bool) -> torch.Tensor:
    dims = (0, 1) if axis is None else axis
    if fn in ("sum", "method_sum"):
        r = torch.sum(x, dim=dims, keepdim=keep, dtype=x.dtype)
    elif fn in ("max", "method_max"):
        r = torch.amax(x, dim=dims, keepdim=keep)
    elif fn == "min":
        r = torch.amin(x, dim=dims, keepdim=keep)
    else:
        r = torch.mean(x, dim=dims, keepdim=keep)
    return r.reshape(1) if axis is None and not keep else r


@SETTINGS
@given(fn=st.sampled_from(["sum", "max", "min", "mean", "method_sum", "method_max"]),
       axis=st.sampled_from([0, 1, -1, None]), keep=st.booleans(),
       dtype=st.sampled_from(["float32", "int32"]), m=st.sampled_from([1, 3, 16, 33]),
       n=st.sampled_from([1, 5, 16, 40]), pad=st.sampled_from([0, 0, 3, 20]), seed=SEEDS,
       nans=st.booleans(), t_layout=st.booleans())
def test_reductions(fn, axis, keep, dtype, m, n, pad, seed, nans, t_layout):
    if fn == "mean":
        dtype, pad = "float32", 0  # a padded tile's mean counts the padding
    gen = np.random.default_rng(seed)
    x = rand(gen, (n, m) if t_layout else (m, n), dtype, specials=nans and fn != "sum")
    x = x.t() if t_layout else x
    bm, bn = m + pad, n + (pad // 2)
    is_float = dtype == "float32"
    other = {"max": -np.inf if is_float else -2**31,
             "method_max": -np.inf if is_float else -2**31,
             "min": np.inf if is_float else 2**31 - 1}.get(fn, 0)
    other = float(other) if is_float else int(other)
    want = ref_reduce(fn, x, axis, keep)
    full_shape = {None: (1, 1) if keep else (1,), 0: (1, n) if keep else (n,),
                  1: (m, 1) if keep else (m,), -1: (m, 1) if keep else (m,)}[axis]
    assert want.shape == full_shape
    out = torch.full(full_shape, 99, dtype=want.dtype)
    k_reduce[(1,)](x, out, FN=fn, AXIS=axis, KEEP=keep, OTHER=other, BM=bm, BN=bn)
    assert_same(out, want, rtol=1e-5, atol=1e-4 * max(m, n))


@pytest.mark.parametrize("fn", ["max", "min"])
@pytest.mark.parametrize("axis", [0, 1, None])
def test_reduction_nan_propagates(fn, axis):
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    x[1, 2] = float("nan")
    x[0, 0] = float("inf")
    x[2, 3] = float("-inf")
    want = ref_reduce(fn, x, axis, True)
    out = torch.zeros(want.shape)
    other = float("-inf") if fn == "max" else float("inf")
    k_reduce[(1,)](x, out, FN=fn, AXIS=axis, KEEP=True, OTHER=other, BM=4, BN=8)
    assert_same(out, want)


# ---------------------------------------------------------------------------------------
# casts
# ---------------------------------------------------------------------------------------

@tl.kernel
def k_cast(x, out, DT: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK
    out[i:i + BLOCK] = tl.cast(x[i:i + BLOCK], DT)


@tl.kernel
def k_to(x, out, DT: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK
    out[i:i + BLOCK] = x[i:i + BLOCK].to(DT)


BASIC = ["float32", "int32", "int64", "int8", "uint8", "bool"]


def _cast_input(gen, n: int, src: str, dst: str) -> torch.Tensor:
    if src == "float32":
        # float -> int is only defined (in C and torch) for values in the target's range
        lo, hi = {"int8": (-128, 127), "uint8": (0, 255)}.get(dst, (-10**6, 10**6))
        return torch.from_numpy(gen.uniform(lo, hi, n).astype(np.float32))
    return rand(gen, n, src, lo=-300, hi=300)


@SETTINGS
@given(src=st.sampled_from(BASIC), dst=st.sampled_from(BASIC), wide_out=st.booleans(),
       method=st.booleans(), n=st.sampled_from([1, 33, 1000]), seed=SEEDS)
def test_casts(src, dst, wide_out, method, n, seed):
    """tl.cast / .to produce the values of torch's .to(dst); stored into a wider tensor
    the tile still holds dst's values (e.g. 300 -> int8 is 44)."""
    gen = np.random.default_rng(seed)
    x = _cast_input(gen, n, src, dst)
    want = x.to(TORCH[dst])
    if wide_out:
        want = want.to(torch.float32 if dst == "float32" else torch.int64)
    out = torch.zeros(n, dtype=want.dtype)
    (k_to if method else k_cast)[(tl.cdiv(n, 128),)](x, out, DT=TL[dst], BLOCK=128)
    assert_same(out, want)


@pytest.mark.parametrize("dst", ["int8", "uint8"])
def test_narrowing_int_cast_wraps(dst):
    x = torch.tensor([300, -129, 5, 127, 255, -1, 128, 1000], dtype=torch.int32)
    out = torch.zeros(8, dtype=torch.int32)
    k_cast[(1,)](x, out, DT=TL[dst], BLOCK=8)
    assert_same(out, x.to(TORCH[dst]).to(torch.int32))


# ---------------------------------------------------------------------------------------
# half precision storage and math functions (need codegen/tessera_math.h)
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dst", ["float16", "bfloat16"])
def test_float_to_half_rounding(dst):
    """Every kind of float32 (normal, subnormal, overflow, inf, nan, ties) rounds to
    float16/bfloat16 exactly as torch does."""
    gen = np.random.default_rng(5)
    bits = gen.integers(0, 2**32, 20000, dtype=np.uint64).astype(np.uint32)
    x = torch.from_numpy(bits.view(np.float32).copy())
    ties = torch.tensor([1 + 2**-11, 1 + 3 * 2**-11, 65520.0, 65519.0, 2**-25, 2**-24,
                         1 + 2**-8, 1 + 3 * 2**-8, 3.0e38, -0.0], dtype=torch.float32)
    x = torch.cat([x, ties])
    out = torch.zeros(x.shape, dtype=TORCH[dst])
    k_cast[(tl.cdiv(x.numel(), 1024),)](x, out, DT=TL[dst], BLOCK=1024)
    want = x.to(TORCH[dst])
    assert torch.equal(out.isnan(), want.isnan())
    ok = ~want.isnan()
    assert torch.equal(out[ok].float(), want[ok].float())


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_storage_roundtrip(dtype):
    gen = np.random.default_rng(2)
    x = rand(gen, 1000, dtype, specials=True)
    y = rand(gen, 1000, dtype)
    out = torch.zeros(1000, dtype=TORCH[dtype])
    k_binary[(tl.cdiv(1000, 128),)](x, y, out, OP="add", BLOCK=128)
    assert_same(out, (x.float() + y.float()).to(TORCH[dtype]), rtol=0)
    wide = torch.zeros(1000)
    k_cast[(tl.cdiv(1000, 128),)](x, wide, DT=tl.float32, BLOCK=128)
    assert_same(wide, x.float(), rtol=0)


@tl.kernel
def k_unary(x, out, FN: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK
    a = x[i:i + BLOCK]
    if FN == "exp":
        r = tl.exp(a)
    elif FN == "exp2":
        r = tl.exp2(a)
    elif FN == "log":
        r = tl.log(a)
    elif FN == "log2":
        r = tl.log2(a)
    elif FN == "sqrt":
        r = tl.sqrt(a)
    elif FN == "rsqrt":
        r = tl.rsqrt(a)
    elif FN == "abs":
        r = tl.abs(a)
    elif FN == "tanh":
        r = tl.tanh(a)
    elif FN == "sigmoid":
        r = tl.sigmoid(a)
    elif FN == "erf":
        r = tl.erf(a)
    elif FN == "sin":
        r = tl.sin(a)
    elif FN == "cos":
        r = tl.cos(a)
    elif FN == "silu":
        r = tl.silu(a)
    elif FN == "gelu":
        r = tl.gelu(a)
    elif FN == "gelu_tanh":
        r = tl.gelu(a, approximate="tanh")
    elif FN == "pow":
        r = tl.pow(a, 1.5)
    else:
        r = -a
    out[i:i + BLOCK] = r


F = torch.nn.functional
UNARY_REF = {"exp": torch.exp, "exp2": torch.exp2, "log": torch.log, "log2": torch.log2,
             "sqrt": torch.sqrt, "rsqrt": torch.rsqrt, "abs": torch.abs, "tanh": torch.tanh,
             "sigmoid": torch.sigmoid, "erf": torch.erf, "sin": torch.sin, "cos": torch.cos,
             "silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda v: F.gelu(v, approximate="tanh"),
             "pow": lambda v: torch.pow(v, 1.5), "neg": torch.neg}


@SETTINGS
@given(fn=st.sampled_from(list(UNARY_REF)), n=st.sampled_from([1, 33, 1000]),
       scale=st.sampled_from([1.0, 10.0, 100.0]), seed=SEEDS, specials=st.booleans())
def test_unary_math(fn, n, scale, seed, specials):
    gen = np.random.default_rng(seed)
    x = torch.from_numpy(gen.standard_normal(n).astype(np.float32)) * scale
    if fn in ("log", "log2", "sqrt", "rsqrt", "pow"):
        x = x.abs()
    if specials:
        x[gen.integers(0, n, max(1, n // 10))] = torch.tensor(
            gen.choice([np.nan, np.inf, -np.inf, 0.0, -0.0], max(1, n // 10)),
            dtype=torch.float32)
    out = torch.zeros(n)
    k_unary[(tl.cdiv(n, 128),)](x, out, FN=fn, BLOCK=128)
    want = UNARY_REF[fn](x.double()).float()
    assert_same(out, want, rtol=2e-6 if fn not in ("sin", "cos") else 1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------
# control flow
# ---------------------------------------------------------------------------------------

@tl.kernel
def k_rowsum(x, out, BN: tl.constexpr):
    r = tl.program_id(0)
    acc = tl.zeros((BN,))
    for j in range(0, x.shape[1], BN):
        acc += tl.load(x[r, j:j + BN], other=0.0)
    out[r] = tl.sum(acc)


@tl.kernel
def k_rowmax(x, out, n, BN: tl.constexpr):
    r = tl.program_id(0)
    acc = tl.full((BN,), float("-inf"))
    for j in tl.range(0, n, BN):
        acc = tl.maximum(acc, tl.load(x[r, j:j + BN], other=float("-inf")))
    out[r] = tl.max(acc)


@tl.kernel
def k_alternate(x, out, BN: tl.constexpr):
    """Blocks of a row added and subtracted in turn, with a nested if on the loop index."""
    r = tl.program_id(0)
    acc = tl.zeros((BN,), dtype=tl.int64)
    k = 0
    for j in range(0, x.shape[1], BN):
        t = tl.load(x[r, j:j + BN])
        if k % 2 == 0:
            acc += t
        else:
            acc -= t
        k += 1
    out[r, 0:BN] = acc


@tl.kernel
def k_horner(c, out, n):
    """out[0] = sum c[i] * 2**i, evaluated from the top coefficient down (negative step,
    scalar loads)."""
    acc = 0
    for i in range(n - 1, -1, -1):
        acc = acc * 2 + c[i]
    out[0] = acc


@tl.kernel
def k_while(x, out, steps, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK
    v = x[i:i + BLOCK]
    k = 0
    while k < steps:
        v = v * 3 + 1
        k += 1
    out[i:i + BLOCK] = v


@tl.kernel
def k_ifelse(x, out, s, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    i = pid * BLOCK
    v = x[i:i + BLOCK]
    if pid % 3 == 0:
        v = v + s
    elif pid % 3 == 1 and s > 0:
        v = v - s
    else:
        only_here = v * 0
        v = -v + only_here
    out[i:i + BLOCK] = v


@tl.kernel
def k_static(x, out, K: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK
    a = x[i:i + BLOCK]
    acc = tl.zeros((BLOCK,), dtype=tl.int64)
    for k in tl.static_range(K):
        if k % 2 == 0:  # k is a compile-time constant: only one branch is built
            acc = acc * 2 + a + k
        else:
            acc = acc - a
    out[i:i + BLOCK] = acc


@tl.kernel
def k_scalar_total(x, out, BLOCK: tl.constexpr):
    total = 0
    for j in range(0, x.shape[0], BLOCK):
        total += tl.sum(tl.load(x[j:j + BLOCK], other=0.0))
    out[0] = total


@tl.kernel
def k_nested_loops(x, out, BM: tl.constexpr, BN: tl.constexpr):
    acc = tl.zeros((BM, BN))
    for i in range(0, x.shape[0], BM):
        for j in range(0, x.shape[1], BN):
            acc += tl.load(x[i:i + BM, j:j + BN])
    out[0] = tl.sum(acc)


@FEW
@given(m=st.sampled_from([1, 4]), n=st.sampled_from([1, 7, 100, 1000]),
       bn=st.sampled_from([1, 16, 128]), seed=SEEDS)
def test_loop_row_reductions(m, n, bn, seed):
    gen = np.random.default_rng(seed)
    x = rand(gen, (m, n), "float32", specials=False)
    out = torch.zeros(m)
    k_rowsum[(m,)](x, out, BN=bn)
    assert_same(out, x.sum(1), rtol=1e-5, atol=1e-3)
    k_rowmax[(m,)](x, out, n, BN=bn)
    assert_same(out, x.amax(1))
    xi = rand(gen, (m, n), "int64")
    outi = torch.zeros(m, bn, dtype=torch.int64)
    k_alternate[(m,)](xi, outi, BN=bn)
    pad = tl.cdiv(n, bn) * bn
    blocks = torch.nn.functional.pad(xi, (0, pad - n)).reshape(m, -1, bn)
    signs = torch.tensor([1 if k % 2 == 0 else -1 for k in range(blocks.shape[1])])
    assert_same(outi, (blocks * signs[None, :, None]).sum(1))


@FEW
@given(n=st.integers(0, 20), seed=SEEDS)
def test_negative_step_loop_and_scalar_loads(n, seed):
    c = rand(np.random.default_rng(seed), max(n, 1), "int64", lo=-9, hi=9)
    out = torch.zeros(1, dtype=torch.int64)
    k_horner[(1,)](c, out, n)
    assert out.item() == sum(int(c[i]) * 2**i for i in range(n))


@FEW
@given(n=SIZES, block=BLOCKS, steps=st.integers(-1, 6), seed=SEEDS)
def test_while_loop(n, block, steps, seed):
    x = rand(np.random.default_rng(seed), n, "int64")
    out = torch.zeros(n, dtype=torch.int64)
    k_while[(tl.cdiv(n, block),)](x, out, steps, BLOCK=block)
    want = x.clone()
    for _ in range(max(steps, 0)):
        want = want * 3 + 1
    assert_same(out, want)


@FEW
@given(n=SIZES, block=st.sampled_from([1, 16]), s=st.integers(-5, 5), seed=SEEDS)
def test_if_else_on_scalars(n, block, s, seed):
    x = rand(np.random.default_rng(seed), n, "int32")
    out = torch.zeros(n, dtype=torch.int32)
    k_ifelse[(tl.cdiv(n, block),)](x, out, s, BLOCK=block)
    pid = torch.arange(n) // block
    want = torch.where(pid % 3 == 0, x + s, torch.where((pid % 3 == 1) & (s > 0), x - s, -x))
    assert_same(out, want.to(torch.int32))


@FEW
@given(n=SIZES, k=st.integers(1, 6), seed=SEEDS)
def test_static_range(n, k, seed):
    x = rand(np.random.default_rng(seed), n, "int64")
    out = torch.zeros(n, dtype=torch.int64)
    k_static[(tl.cdiv(n, 16),)](x, out, K=k, BLOCK=16)
    acc = torch.zeros(n, dtype=torch.int64)
    for i in range(k):
        acc = acc * 2 + x + i if i % 2 == 0 else acc - x
    assert_same(out, acc)


def test_nested_loops():
    x = rand(np.random.default_rng(3), (37, 50), "float32")
    out = torch.zeros(1)
    k_nested_loops[(1,)](x, out, BM=8, BN=16)
    assert_same(out, x.sum().reshape(1), rtol=1e-5, atol=1e-3)


def test_scalar_accumulator_started_from_python_int():
    """`total = 0; total += tl.sum(float tile)` must accumulate in float (as Python
    would) - or be rejected - but not silently truncate each partial sum to an int."""
    x = torch.full((100,), 0.3)
    out = torch.zeros(1)
    try:
        k_scalar_total[(1,)](x, out, BLOCK=16)
    except tl.KernelTypeError:
        return
    assert_same(out, x.sum().reshape(1), rtol=1e-5)


@tl.kernel
def k_is_none(x, out, V: tl.constexpr, BLOCK: tl.constexpr):
    if V is None:
        out[0:BLOCK] = x[0:BLOCK]
    else:
        out[0:BLOCK] = x[0:BLOCK] + V


def test_is_none_on_constexpr():
    """`is None` / `is not None` on constexprs are compile-time Python, like `==`."""
    x = torch.ones(4)
    out = torch.zeros(4)
    k_is_none[(1,)](x, out, V=None, BLOCK=4)
    assert_same(out, x)
    k_is_none[(1,)](x, out, V=2.0, BLOCK=4)
    assert_same(out, x + 2)


def test_zero_size_grid_and_tensors():
    """A zero-size grid runs nothing; zero-length tensors are fine."""
    x = torch.zeros(0)
    out = torch.zeros(0)
    k_binary[(0,)](x, x, out, OP="add", BLOCK=16)
    k_binary[(1,)](x, x, out, OP="add", BLOCK=16)
    y = torch.ones(5)
    o = torch.zeros(5)
    k_binary[(0,)](y, y, o, OP="add", BLOCK=16)
    assert not o.any()
