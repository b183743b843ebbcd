"""Fusion, property-based: random programs of elementwise chains, shared subexpressions,
broadcasts and reductions, compiled into one kernel each, must agree with numpy.

Each example writes its kernel to a module file (kernels are parsed from source) and
imports it; the printer then decides what to inline, re-read or materialize."""

from __future__ import annotations

import importlib.util
import itertools

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

_count = itertools.count()

# (kernel expression, numpy expression) templates over two operands
BINARY = [("({a} + {b})", "({a} + {b})"), ("({a} - {b})", "({a} - {b})"),
          ("({a} * {b})", "({a} * {b})"),
          ("tl.maximum({a}, {b})", "np.maximum({a}, {b})"),
          ("tl.where({a} > {b}, {a}, {b} * 0.5)", "np.where({a} > {b}, {a}, {b} * 0.5)")]
UNARY = [("tl.abs({a})", "np.abs({a})"), ("(-{a})", "(-{a})"),
         ("tl.exp(tl.minimum({a}, 5.0))", "np.exp(np.minimum({a}, 5.0))"),
         ("tl.sqrt(tl.abs({a}))", "np.sqrt(np.abs({a}))"),
         ("({a} * 0.25 + 1.0)", "({a} * 0.25 + 1.0)")]


@st.composite
def programs(draw):
    """Statements `t<i> = expr` over x (tile [M, N]), row (tile [N]) and earlier t's; some
    t's are used several times, some are reduced along an axis and broadcast back."""
    k_names, n_names, lines_k, lines_n = ["x", "row[None, :]"], ["x", "row"], [], []
    for i in range(draw(st.integers(2, 7))):
        kind = draw(st.sampled_from(["binary", "binary", "unary", "reduce"]))
        j = draw(st.integers(0, len(k_names) - 1))
        if kind == "binary":
            m = draw(st.integers(0, len(k_names) - 1))
            tk, tn = draw(st.sampled_from(BINARY))
            ek, en = tk.format(a=k_names[j], b=k_names[m]), tn.format(a=n_names[j], b=n_names[m])
        elif kind == "unary":
            tk, tn = draw(st.sampled_from(UNARY))
            ek, en = tk.format(a=k_names[j]), tn.format(a=n_names[j])
        else:
            fn, axis = draw(st.sampled_from(["sum", "max", "min"])), draw(st.sampled_from([0, 1]))
            ek = f"tl.{fn}({k_names[j]}, axis={axis}, keepdims=True)"
            en = f"np.{fn}({n_names[j]}, axis={axis}, keepdims=True)"  # tiles' own shapes
        lines_k.append(f"    t{i} = {ek}")
        lines_n.append(f"    t{i} = {en}")
        k_names.append(f"t{i}")
        n_names.append(f"t{i}")
    return lines_k, lines_n, k_names[-1], n_names[-1]


def _load(tmp_path, source: str):
    path = tmp_path / f"fused_{next(_count)}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
PROGRAMS = dict(prog=programs(), m=st.sampled_from([1, 3, 8]),
                n=st.sampled_from([1, 5, 16, 33]), seed=st.integers(0, 2**16))


@SETTINGS
@given(**PROGRAMS)
def test_random_fused_programs_match_numpy(tmp_path, prog, m, n, seed) -> None:
    check_program(tmp_path, prog, m, n, seed, lambda k, grid, *a, **kw: k[grid](*a, **kw))


@settings(SETTINGS, max_examples=10)  # each example is a program build (~0.5 s on PoCL)
@given(**PROGRAMS)
def test_random_fused_programs_match_numpy_on_opencl(tmp_path, opencl_target, prog, m, n,
                                                     seed) -> None:
    check_program(tmp_path, prog, m, n, seed, opencl_target.launch)


def check_program(tmp_path, prog, m: int, n: int, seed: int, launch) -> None:
    """Build the drawn program as a kernel, `launch(kernel, grid, *args)` it on numpy
    arrays and compare with numpy."""
    lines_k, lines_n, out_k, out_n = prog
    source = "\n".join([
        "import numpy as np", "import tessera.lang as tl", "",
        "@tl.kernel",
        "def kernel(xs, rows, out, M: tl.constexpr, N: tl.constexpr):",
        "    x = xs[0:M, 0:N]", "    row = rows[0:N]", *lines_k,
        f"    out[0:M, 0:N] = {out_k}", "",
        "def reference(x, row, M, N):", *lines_n,
        f"    return np.broadcast_to({out_n}, (M, N))", ""])
    module = _load(tmp_path, source)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, n)).astype(np.float32)
    row = rng.standard_normal(n).astype(np.float32)
    out = np.full((m, n), np.nan, np.float32)
    launch(module.kernel, (1,), x, row, out, M=m, N=n)
    want = module.reference(x.astype(np.float64), row.astype(np.float64)[None, :], m, n)
    np.testing.assert_allclose(out, want, rtol=2e-4, atol=2e-4, err_msg=source)
