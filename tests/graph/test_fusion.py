"""Autofusion (tessera.graph.fusion): random graphs of pointwise ops (and a row op) with
broadcasting and mixed dtypes compute what torch eager does, fused into as few kernels as
the rules allow; what must stay apart stays apart."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tessera.errors import TesseraError
from tessera.graph import compiled, fusion
from tessera.graph.compiler import compile_graph
from tessera.graph.executable import Executable
from tessera.graph.ir import Graph, Node, Value
from tessera.ops import registry


class Unsupported(Exception):
    """A random op whose result Tessera's eager ops refuse (int16 from uint8 with int8)."""


class Builder:
    """A Graph of registry ops built alongside its torch reference values."""

    def __init__(self) -> None:
        self.g = Graph()
        self.ref: dict[Value, Any] = {}
        self.inputs: list[torch.Tensor] = []

    def input(self, t: torch.Tensor, const: bool = False) -> Value:
        kind = "const" if const else "input"
        v = self.g.value("c" if const else "x", t.dtype, tuple(t.shape), kind,
                         t if const else None)
        self.ref[v] = t
        if not const:
            self.inputs.append(t)
        return v

    def op(self, name: str, **args: Any) -> Value:
        d = registry.get(name)
        real = {k: self.ref.get(a, a) if isinstance(a, Value) else a for k, a in args.items()}
        positional = [a for a in d.args if not a.kwarg_only]
        given = [i for i, a in enumerate(positional) if a.name in real]
        out = d.reference(*(real.get(a.name, a.default) for a in positional[:max(given) + 1]),
                          **{a.name: real[a.name] for a in d.args
                             if a.kwarg_only and a.name in real})
        if out.dtype not in DTYPES:
            raise Unsupported(f"{name} makes {out.dtype}, which Tessera's kernels do not hold")
        v = self.g.value(name, out.dtype, tuple(out.shape))
        self.g.add(Node(name, args, [v]))
        self.ref[v] = out
        return v

    def copy(self, outputs: tuple[Value, ...]) -> Graph:
        """The graph with these outputs, in new Nodes and Values (passes change both)."""
        g = Graph()
        new: dict[Value, Value] = {}
        for v in (*self.g.inputs, *self.g.constants):
            new[v] = g.value(v.name, v.dtype, v.shape, v.kind, v.data)
        for n in self.g.nodes:
            args = {k: new.get(a, a) if isinstance(a, Value) else a for k, a in n.args.items()}
            outs = [g.value(v.name, v.dtype, v.shape) for v in n.outputs]
            new.update(zip(n.outputs, outs, strict=True))
            g.add(Node(n.op, args, outs))
        g.outputs = [new[v] for v in outputs]
        return g

    def __repr__(self) -> str:  # (what hypothesis prints for a failing case)
        return str(self.g)

    def run(self, *outputs: Value, **options: Any) -> tuple[Executable, tuple[Any, ...]]:
        """Compile (natively; no pattern rewrites, which would take some of fusion's work)
        a copy of the graph and run it twice (the second run records and replays)."""
        ex = compile_graph(self.copy(outputs), {"patterns": False, **options})
        ex(*self.inputs)
        return ex, ex(*self.inputs)


def fused_nodes(ex: Executable) -> list[Node]:
    return [n for n in ex.graph.nodes if n.kind == "fused"]


def replayed(ex: Executable) -> int:
    """Launches of the (one) native plan; every node must have been replayed natively."""
    (plan,) = ex.plans.values()
    assert plan is not None and all(s.node is None for s in plan.steps)
    return len(plan.steps_arr)


def close(got: torch.Tensor, want: torch.Tensor, scale: float = 1.0) -> None:
    """Equal within the output dtype's precision (exact for integers and bools); `scale`
    bounds the magnitudes computed on the way (rounding errors are relative to them)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    if want.dtype.is_floating_point:
        eps = torch.finfo(want.dtype).eps
        tol = 8 * eps if want.dtype != torch.float32 else 1e-5
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * scale, equal_nan=True)
    else:
        assert torch.equal(got, want)


# -- random graphs --------------------------------------------------------------------------
FLOAT = (torch.float32, torch.bfloat16, torch.float16)
DTYPES = (*FLOAT, torch.int32, torch.int64, torch.int8, torch.uint8, torch.bool)
TENSORS_ONLY = ("maximum", "minimum", "logical_and", "logical_xor")  # (aten has no Scalar forms)
UNARY_FLOAT = ("tanh", "sigmoid", "sin", "cos", "exp", "gelu", "silu")
BINARY = ("add", "sub", "mul", "maximum", "minimum", "div", "lt", "ge", "eq", "logical_and",
          "logical_xor")


@st.composite
def graphs(draw: st.DrawFn) -> tuple[Builder, list[Value], float]:
    """A random graph over one broadcast domain: 1-3 inputs, 2-6 pointwise ops, maybe a
    row op at the end and a pointwise op on its result; 1-2 outputs. Also the largest
    magnitude any float value can reach (ops that could overflow are not drawn)."""
    b = Builder()
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    domain = draw(st.lists(st.sampled_from([1, 2, 3, 5, 17, 40]), min_size=1, max_size=3))
    domain[-1] = draw(st.sampled_from([16, 17, 40]))
    bound: dict[Value, float] = {}
    pool: list[Value] = []
    for _ in range(draw(st.integers(1, 3))):
        dtype = draw(st.sampled_from(DTYPES))
        shape = [n if draw(st.booleans()) else 1 for n in domain]
        shape = shape[draw(st.integers(0, len(shape) - 1)):]
        if dtype.is_floating_point:
            t = torch.rand(shape, generator=gen) * 4 - 2
        else:
            t = torch.randint(0 if dtype in (torch.uint8, torch.bool) else -4,
                              2 if dtype == torch.bool else 5, shape, generator=gen)
        if draw(st.booleans()) and shape:  # a strided view
            t = torch.stack([t, t], -1)[..., 0]
        v = b.input(t.to(dtype))
        bound[v] = 4.0
        pool.append(v)
    for _ in range(draw(st.integers(2, 6))):
        x = pool[-1] if draw(st.booleans()) else draw(st.sampled_from(pool))
        kind = draw(st.sampled_from(["unary", "binary", "binary", "where", "clamp"]))
        try:
            v = _random_op(draw, b, kind, x, pool, bound)
        except Unsupported:
            continue
        if v is not None:
            pool.append(v)
    last = pool[-1]
    if last.dtype.is_floating_point and list(last.shape) == domain and domain[-1] > 1 \
            and draw(st.booleans()):
        row = draw(st.sampled_from(["sum", "mean", "amax", "softmax", "log_softmax",
                                    "layer_norm"]))
        keep = draw(st.booleans())
        if row in ("sum", "mean", "amax"):
            v = b.op(row, x=last, dim=[-1], keepdim=keep)
        elif row == "layer_norm":
            w = b.input(torch.rand(domain[-1], generator=gen) + 0.5, const=True)
            v = b.op(row, x=last, normalized_shape=[domain[-1]], weight=w)
        else:
            v = b.op(row, x=last, dim=-1)
        bound[v] = bound[last] * domain[-1]
        if keep or row not in ("sum", "mean", "amax"):
            v = b.op("sub", x=last, other=v)
            bound[v] = bound[last] * (domain[-1] + 1)
        pool.append(v)
    outputs = [pool[-1]]
    extra = draw(st.sampled_from(pool))
    if extra.kind == "node" and extra not in outputs:
        outputs.append(extra)
    return b, outputs, max(bound.values())


def _random_op(draw: st.DrawFn, b: Builder, kind: str, x: Value, pool: list[Value],
               bound: dict[Value, float]) -> Value | None:
    """One pointwise op on x (and a second operand from the pool or a number), or None
    where Tessera's eager op would refuse the dtypes or the magnitudes could overflow."""
    is_float, is_bool = x.dtype.is_floating_point, x.dtype == torch.bool
    if kind == "unary":
        name = draw(st.sampled_from([*UNARY_FLOAT, "neg", "abs", "relu"]))
        if (name in ("gelu", "silu") and not is_float) or (is_bool and name in (
                "neg", "abs", "relu")) or (name == "exp" and bound[x] > 5):
            return None
        v = b.op(name, x=x)
        bound[v] = math.exp(bound[x]) if name == "exp" else \
            bound[x] if name in ("neg", "abs", "relu", "gelu", "silu") else 1.0
        return v
    if kind == "clamp":
        if is_bool:
            return None
        lo, hi = draw(st.sampled_from([(-1, None), (None, 1), (-0.5, 1.5), (0, 3)]))
        if x.dtype == torch.uint8 and lo == -1:
            return None  # torch wraps the bound to 255, Tessera's clamp does not
        v = b.op("clamp", x=x, min=lo, max=hi)
        bound[v] = bound[x]
        return v
    if kind == "where":
        cond = draw(st.sampled_from([p for p in pool if p.dtype == torch.bool] or [None]))
        if cond is None:
            return None
        y = draw(st.sampled_from(pool))
        v = b.op("where", condition=cond, x=x, other=y)
        bound[v] = max(bound[x], bound[y])
        return v
    name = draw(st.sampled_from(BINARY))
    y: Any = draw(st.sampled_from(pool)) if draw(st.booleans()) or name in TENSORS_ONLY \
        else draw(st.sampled_from([2, -3, 0.5, 1.5, True]))
    if name == "div":
        y = draw(st.sampled_from([2, -4, 0.5]))  # no value denominators (near-zero ones)
    y_bool = y.dtype == torch.bool if isinstance(y, Value) else isinstance(y, bool)
    yb = bound[y] if isinstance(y, Value) else abs(float(y))
    if name == "sub" and (is_bool or y_bool):  # torch refuses
        return None
    args: dict[str, Any] = {"x": x, "other": y}
    if name in ("add", "sub") and not (is_bool and y_bool):
        args["alpha"] = draw(st.sampled_from([1, 2]))
    magnitude = {"add": bound[x] + 2 * yb, "sub": bound[x] + 2 * yb, "mul": bound[x] * yb,
                 "div": bound[x] / 0.5}.get(name, max(bound[x], yb))
    if magnitude > 1e4:
        return None
    v = b.op(name, **args)
    bound[v] = magnitude
    return v


@settings(max_examples=30, deadline=None, derandomize=True)
@given(graphs())
def test_random_graphs_match_eager(case: tuple[Builder, list[Value], float]) -> None:
    b, outputs, scale = case
    want = [b.ref[v] for v in outputs]
    ex, got = b.run(*outputs)
    for g, w in zip(got, want, strict=True):
        close(g, w, scale)
    replayed(ex)
    assert len(ex.graph.nodes) <= len(b.g.nodes)


# -- what fuses and what does not -------------------------------------------------------------
def gelu_tanh(b: Builder, x: Value) -> Value:
    """GELU with the tanh approximation written out as in HF's NewGELU: 9 ops."""
    cube = b.op("mul", x=b.op("mul", x=x, other=x), other=x)
    inner = b.op("add", x=x, other=b.op("mul", x=cube, other=0.044715))
    t = b.op("tanh", x=b.op("mul", x=inner, other=math.sqrt(2 / math.pi)))
    return b.op("mul", x=b.op("mul", x=x, other=0.5), other=b.op("add", x=t, other=1.0))


def test_gelu_tanh_written_out_is_one_kernel() -> None:
    b = Builder()
    x = b.input(torch.randn(6, 50))
    y = gelu_tanh(b, x)
    assert len(b.g.nodes) == 9
    ex, (got,) = b.run(y)
    (node,) = ex.graph.nodes
    assert node.kind == "fused" and len(node.meta["members"]) == 9
    assert replayed(ex) == 1
    close(got, F.gelu(b.inputs[0], approximate="tanh"))
    _, (unfused,) = b.run(y, fusion=False)
    torch.testing.assert_close(got, unfused, rtol=1e-6, atol=1e-6)


def test_a_value_read_outside_is_a_second_output() -> None:
    b = Builder()
    x = b.input(torch.randn(4, 33))
    h = b.op("sigmoid", x=b.op("mul", x=x, other=2.0))
    out = b.op("add", x=b.op("exp", x=h), other=x)
    ex, got = b.run(out, h)
    (node,) = fused_nodes(ex)
    assert sorted(v.name for v in node.outputs) == sorted([out.name, h.name])
    close(got[0], b.ref[out])
    close(got[1], b.ref[h])


def test_a_smaller_value_read_outside_stays_apart() -> None:
    """x_row [4, 1] is read by a [4, 33] op and is itself an output: storing it from a
    kernel over [4, 33] would need its own layout, so its producer stays a separate node
    (the rest still fuses)."""
    b = Builder()
    x = b.input(torch.randn(4, 1))
    y = b.input(torch.randn(4, 33))
    small = b.op("exp", x=b.op("neg", x=x))
    out = b.op("tanh", x=b.op("mul", x=small, other=y))
    ex, got = b.run(out, small)
    assert [len(n.meta["members"]) for n in fused_nodes(ex)] == [2, 2]
    close(got[0], b.ref[out])
    close(got[1], b.ref[small])


def test_shapes_that_broadcast_to_more_than_an_output_stay_apart() -> None:
    b = Builder()
    x = b.input(torch.randn(5, 8))
    y = b.input(torch.randn(3, 5, 8))
    a = b.op("relu", x=b.op("mul", x=x, other=3.0))  # [5, 8], also an output
    big = b.op("add", x=a, other=y)  # [3, 5, 8]
    ex, got = b.run(big, a)
    assert len(ex.graph.nodes) == 2 and len(fused_nodes(ex)) == 1
    close(got[0], b.ref[big])
    close(got[1], b.ref[a])


def test_symbols_that_may_differ_do_not_fuse() -> None:
    g = Graph()
    x = g.value("x", torch.float32, ("s0", 4), "input")
    y = g.value("y", torch.float32, ("s1", 4), "input")
    ex_, ey = g.value("ex", torch.float32, ("s0", 4)), g.value("ey", torch.float32, ("s1", 4))
    s = g.value("s", torch.float32, ("s0", 4))
    g.add(Node("exp", {"x": x}, [ex_]))
    g.add(Node("exp", {"x": y}, [ey]))
    g.add(Node("add", {"x": ex_, "other": ey, "alpha": 1}, [s]))
    g.outputs = [s]
    assert fusion.fuse(g) == 1  # exp(x) + ...: s0 and s1 are not known to be equal
    assert [n.kind for n in g.nodes] == ["op", "fused"]
    a, c = torch.randn(3, 4), torch.randn(3, 4)
    ex = compile_graph(g, {"fusion": False})
    torch.testing.assert_close(ex(a, c)[0], a.exp() + c.exp())


def test_no_cycle_through_an_unfused_node() -> None:
    """exp(x) feeds a softmax over dim 0 (not a row op) and the mul after it: fusing exp
    with the mul would make a node that both feeds and needs the softmax."""
    b = Builder()
    x = b.input(torch.randn(8, 8))
    e = b.op("exp", x=x)
    s = b.op("softmax", x=e, dim=0)
    out = b.op("tanh", x=b.op("mul", x=e, other=s))
    ex, (got,) = b.run(out)
    assert [n.op for n in ex.graph.nodes] == ["exp", "softmax", "fused:mul_tanh"]
    close(got, b.ref[out], scale=100)


def test_softmax_and_layer_norm_written_out_are_one_kernel_each() -> None:
    b = Builder()
    x = b.input(torch.randn(2, 7, 300))  # 300: rows padded to the tile (masked columns)
    shifted = b.op("sub", x=x, other=b.op("amax", x=x, dim=[-1], keepdim=True))
    e = b.op("exp", x=shifted)
    soft = b.op("div", x=e, other=b.op("sum", x=e, dim=[-1], keepdim=True))
    w = b.input(torch.rand(300) + 0.5, const=True)
    c = b.input(torch.randn(300), const=True)
    d = b.op("sub", x=soft, other=b.op("mean", x=soft, dim=[-1], keepdim=True))
    var = b.op("mean", x=b.op("mul", x=d, other=d), dim=[-1], keepdim=True)
    norm = b.op("mul", x=d, other=b.op("rsqrt", x=b.op("add", x=var, other=1e-5)))
    out = b.op("add", x=b.op("mul", x=norm, other=w), other=c)
    total = b.op("sum", x=out, dim=[-1])  # no keepdim: stored, [2, 7]
    ex, got = b.run(out, total)
    (node,) = ex.graph.nodes
    assert len(node.meta["members"]) == len(b.g.nodes) and replayed(ex) == 1
    soft_ref = torch.softmax(b.inputs[0], -1)
    want = F.layer_norm(soft_ref, [300], b.ref[w], b.ref[c])
    torch.testing.assert_close(got[0], want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[1], want.sum(-1), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize(("dtype", "n"), [(torch.float32, 256), (torch.bfloat16, 100)])
def test_residual_add_then_norm_ops(dtype: torch.dtype, n: int) -> None:
    """add + layer_norm + a copy (BERT's embeddings), mul + rms_norm, add + softmax +
    log_softmax: row ops with a pointwise prologue and epilogue, rows exactly one tile
    wide (256) and not (100)."""
    b = Builder()
    x, y = b.input(torch.randn(9, n).to(dtype)), b.input(torch.randn(9, n).to(dtype))
    w = b.input(torch.randn(n).to(dtype), const=True)
    ln = b.op("contiguous", x=b.op("layer_norm", x=b.op("add", x=x, other=y),
                                   normalized_shape=[n], weight=w, bias=w, eps=1e-5))
    rms = b.op("rms_norm", x=b.op("mul", x=x, other=y), normalized_shape=[n], weight=w)
    sm = b.op("log_softmax", x=b.op("softmax", x=b.op("add", x=x, other=y), dim=-1),
              dim=-1)
    ex, got = b.run(ln, rms, sm)
    # x + y is one value (CSE): layer_norm and the softmaxes of it are one kernel
    assert sorted(len(node.outputs) for node in ex.graph.nodes) == [1, 2]
    assert replayed(ex) == 2
    for g, v in zip(got, (ln, rms, sm), strict=True):
        close(g, b.ref[v], scale=4)


def test_batch_norm_with_frozen_statistics_fuses() -> None:
    """Inference batch norm is eager's x * scale + shift: with constant statistics it joins
    the residual add and relu after it (eager runs it from Python: torch computes scale
    and shift at every call); with statistics given at run time it stays as it is."""
    b = Builder()
    x = b.input(torch.randn(2, 3, 4, 5))
    mean, var, w, c = (b.input(t, const=True) for t in (
        torch.randn(3), torch.rand(3) + 0.5, torch.rand(3) + 0.5, torch.randn(3)))
    bn = b.op("batch_norm", x=x, running_mean=mean, running_var=var, weight=w, bias=c,
              eps=1e-5)
    out = b.op("relu", x=b.op("add", x=bn, other=x))
    ex, (got,) = b.run(out)
    assert [n.op for n in ex.graph.nodes] == ["fused:batch_norm_add_relu"]
    assert replayed(ex) == 1
    close(got, b.ref[out])
    b = Builder()
    x, var = b.input(torch.randn(2, 3, 4)), b.input(torch.rand(3) + 0.5)
    out = b.op("relu", x=b.op("batch_norm", x=x, running_mean=var, running_var=var))
    ex, (got,) = b.run(out)
    assert [n.op for n in ex.graph.nodes] == ["batch_norm", "relu"]
    close(got, b.ref[out])


def test_convolutions_take_batch_norm_activation_and_residual() -> None:
    """conv -> bn -> relu -> + x (read by a convolution): one convolution (bn folded into
    its weights and bias, relu and the residual in its epilogue); conv -> bn -> + bn'(x)
    -> relu: the add stays with the relu (and the other batch norm) in a pointwise group;
    a convolution whose weight is an input stays as it is."""
    b = Builder()
    x = b.input(torch.randn(2, 4, 6, 6))
    stats = [b.input(t, const=True) for t in (torch.randn(4), torch.rand(4) + 0.5,
                                              torch.rand(4) + 0.5, torch.randn(4))]

    def conv_bn(h: Value, w: Value) -> Value:  # (depthwise: no GEMM template to compile)
        c = b.op("conv2d", x=h, weight=w, bias=stats[3], padding=[1, 1], groups=4)
        return b.op("batch_norm", x=c, running_mean=stats[0], running_var=stats[1],
                    weight=stats[2], bias=stats[3])

    w = b.input(torch.randn(4, 1, 3, 3) / 3, const=True)
    h = b.op("add", x=b.op("relu", x=conv_bn(x, w)), other=x)
    bn_x = b.op("batch_norm", x=x, running_mean=stats[0], running_var=stats[1])
    out = b.op("relu", x=b.op("add", x=conv_bn(h, w), other=bn_x))
    ex, (got,) = b.run(out)
    assert [(n.op, n.args["kwargs"]["activation"], n.args["kwargs"]["residual"] is not None)
            for n in ex.graph.nodes if n.op == "fused:conv2d"] == [
        ("fused:conv2d", "relu", True), ("fused:conv2d", None, False)]
    assert [n.op for n in ex.graph.nodes][-1] == "fused:batch_norm_add_relu"
    replayed(ex)
    close(got, b.ref[out], scale=10)
    g = Graph()
    x, w = (g.value(n, torch.float32, s, "input") for n, s in (("x", (1, 2, 3, 3)),
                                                              ("w", (2, 2, 1, 1))))
    c, r = g.value("c", torch.float32, (1, 2, 3, 3)), g.value("r", torch.float32, (1, 2, 3, 3))
    g.add(Node("conv2d", {"x": x, "weight": w}, [c]))
    g.add(Node("relu", {"x": c}, [r]))
    g.outputs = [r]
    assert fusion.fuse_epilogues(g) == 0 and [n.op for n in g.nodes] == ["conv2d", "relu"]


def test_long_rows_stay_unfused() -> None:
    b = Builder()
    x = b.input(torch.randn(2, fusion.MAX_ROW + 16))
    out = b.op("softmax", x=b.op("mul", x=x, other=2.0), dim=-1)
    ex, (got,) = b.run(out)
    assert [n.op for n in ex.graph.nodes] == ["mul", "softmax"]
    close(got, b.ref[out])


def test_layouts_rank_four_strided_and_empty() -> None:
    """Operands whose broadcast dims alternate coalesce to 4 dims (one launch per index of
    the first); transposed inputs are read through their strides; empty domains launch
    nothing."""
    b = Builder()
    x = b.input(torch.randn(3, 1, 4, 1, 5))
    y = b.input(torch.randn(1, 2, 1, 6, 5).transpose(-1, -2).contiguous().transpose(-1, -2))
    out = b.op("sigmoid", x=b.op("sub", x=x, other=y))
    ex, (got,) = b.run(out)
    assert len(fused_nodes(ex)) == 1
    close(got, b.ref[out])
    b = Builder()
    x = b.input(torch.randn(0, 7))
    out = b.op("exp", x=b.op("neg", x=x))
    _, (got,) = b.run(out)
    assert got.shape == (0, 7)


def test_mixed_dtypes_round_each_value_as_eager_does() -> None:
    """int8 arithmetic wraps, bfloat16 values are rounded between ops, comparisons of
    mixed dtypes promote first: all as the eager ops (and torch) do."""
    b = Builder()
    i8 = b.input(torch.tensor([[100, -100, 7, 1]], dtype=torch.int8))
    bf = b.input(torch.tensor([[1.001, 2.5, -3.0, 0.1]], dtype=torch.bfloat16))
    wrapped = b.op("mul", x=b.op("add", x=i8, other=i8), other=2)  # int8: 400 -> -112
    mixed = b.op("add", x=b.op("exp", x=bf), other=wrapped)  # bfloat16 + int8 -> bfloat16
    out = b.op("where", condition=b.op("gt", x=wrapped, other=bf), x=mixed, other=i8)
    ex, (got,) = b.run(out)
    (node,) = ex.graph.nodes
    assert node.kind == "fused"
    close(got, b.ref[out])


def test_fusion_option() -> None:
    b = Builder()
    x = b.input(torch.randn(3, 5))
    out = b.op("exp", x=b.op("neg", x=x))
    ex, _ = b.run(out, fusion=False)
    assert [n.op for n in ex.graph.nodes] == ["neg", "exp"]
    with pytest.raises(TesseraError, match="fusion"):
        compile_graph(Builder().g, {"fusion": "yes"})


def test_bad_shapes_at_run_time_name_the_fused_node() -> None:
    b = Builder()
    x, y = b.input(torch.randn(3, 5)), b.input(torch.randn(3, 5))
    out = b.op("exp", x=b.op("add", x=x, other=y))
    b.g.outputs = [out]
    ex = compile_graph(b.g, {"executor": "python"})
    with pytest.raises(TesseraError, match=r"fused kernel .* do not broadcast"):
        ex(torch.randn(3, 5), torch.randn(4, 5))


# -- through torch.compile ----------------------------------------------------------------------
class FFN(torch.nn.Module):
    """A BERT-style feed-forward block, GELU (tanh) written out, post-norm residual."""

    def __init__(self, d: int = 64, hidden: int = 256) -> None:
        super().__init__()
        self.up, self.down = torch.nn.Linear(d, hidden), torch.nn.Linear(hidden, d)
        self.norm = torch.nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        h = 0.5 * h * (1.0 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h * h * h)))
        return self.norm(self.down(h) + x)


def test_bert_ffn_through_torch_compile() -> None:
    torch.manual_seed(0)
    model = FFN().eval()
    x = torch.randn(2, 8, 64)
    runs: dict[bool, Callable[..., Any]] = {}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallbacks, no plan dropped
        for fuse in (False, True):
            torch._dynamo.reset()
            f = torch.compile(model, backend="tessera", dynamic=False,
                              options={"fusion": fuse, "patterns": False})
            f(x)
            torch.testing.assert_close(f(x), model(x), rtol=1e-5, atol=1e-5)
            runs[fuse] = compiled()[-1]
    assert replayed(runs[True]) < replayed(runs[False])
    kinds = [n.op.partition(":")[0] for n in runs[True].graph.nodes if n.kind != "view"]
    assert kinds == ["addmm", "fused", "addmm", "fused"]
