"""Pattern rewrites on the graph IR, written in Python and open to users.

    @tessera.graph.pattern(torch.randn(4, 8), replace=lambda x: torch.sigmoid(x) * x)
    def my_silu(x):
        return x / (1 + torch.exp(-x))

A pattern is a function over tensors, traced the way the backend traces models (make_fx
with the backend's decompositions, then the frontend's lowering), so it is a small Graph
of the very nodes a model's graph holds. Wherever that subgraph occurs — the same ops and
attributes, shapes and dtypes that fit, interior values used only inside it — it is
replaced in place by the replacement function traced on the matched values (or by the
nodes a `build` function emits), again and again until nothing matches.

Shapes: the examples are traced with every size other than 1 scaled by its own prime, so
each number the trace derives from sizes (an output's dims, a split's sizes) is known as
a product of the inputs' sizes and checked as one. A pattern is thus shape-generic, with
two rules: sizes equal in the examples must be equal in a match (give dims that may
differ different sizes), and a size of 1 stays 1 (a broadcast). Ranks are the
examples'.
Float parameters match whatever number the graph passes where the pattern passes them;
other non-tensor parameters are fixed to their example values. The pattern's floating
dtypes stand for any floating dtypes, consistently. A graph holds the same values in
several layouts: contiguous copies and same-shape views are looked through, and view,
reshape and _unsafe_view are one op (their sizes are checked through the output shape).
Binary ops that commute match either way round; dims are compared modulo rank.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import torch

from tessera.errors import TesseraError
from tessera.graph.frontend import RESHAPES, view_form
from tessera.graph.ir import Graph, Node, Value

__all__ = ["Match", "Pattern", "PatternError", "pattern", "registered", "rewrite",
           "underlying", "unregister"]


class PatternError(TesseraError):
    """A pattern that cannot be traced or applied, or rewrites that do not terminate."""


# -- tracing ---------------------------------------------------------------------------
_PRIMES = (11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73, 79, 83, 89,
           97, 101, 103, 107, 109, 113)
_SENTINEL = 0.6180339887498949  # float parameters are traced as _SENTINEL + k / 1024
_SIZED_VIEWS = RESHAPES | {"view:expand.default"}  # sizes follow from the output shape
_COMMUTATIVE = {"add", "mul", "maximum", "minimum", "eq", "ne", "logical_and", "logical_or",
                "logical_xor"}
_DIM_ARGS = ("dim", "dim0", "dim1", "dims")
_LAYOUT_VIEWS = ("view:transpose.int", "view:permute.default")
_LAYOUT_COPIES = ("transpose", "permute")  # the registry's: those views' layouts copied


@dataclass(frozen=True)
class _Spec:
    """A tensor argument of a trace: its dtype and (scaled) shape."""

    dtype: torch.dtype
    shape: tuple[int, ...]


def _trace(fn: Callable[..., Any], args: Sequence[Any], what: str) -> Graph:
    """The graph of fn(*args): _Spec arguments become the graph's inputs (fake tensors,
    no memory), real tensors too (constants' data is not needed to trace), anything else
    is passed as is."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    from tessera.graph.backend import decompositions
    from tessera.graph.frontend import from_fx

    at = [i for i, a in enumerate(args) if isinstance(a, (_Spec, torch.Tensor))]

    def traced(*tensors: torch.Tensor) -> Any:
        full = list(args)
        for i, t in zip(at, tensors, strict=True):
            full[i] = t
        return fn(*full)

    mode = FakeTensorMode()
    with mode:
        fakes = [torch.empty(a.shape, dtype=a.dtype) for a in (args[i] for i in at)]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mode:
                gm = make_fx(traced, tracing_mode="fake",
                             decomposition_table=decompositions())(*fakes)
            g = from_fx(gm, specialize=False)  # outside the fake mode: constants it
            # folds hold real data
    except TesseraError:
        raise
    except Exception as e:
        raise PatternError(f"{what} could not be traced: {type(e).__name__}: {e}",
                           hint="a pattern is a function of tensors written with torch "
                                "ops; it must run for other sizes than the examples' "
                                "(each is scaled by a prime)") from e
    if len(g.outputs) != 1:
        raise PatternError(f"{what} returns {len(g.outputs)} tensors; a pattern and its "
                           "replacement return one")
    return g


def _simplify(g: Graph) -> None:
    """CSE and DCE as the compiler runs them before patterns, so a pattern's graph has the
    shape its matches have."""
    from tessera.graph.passes import cse, dce
    while cse(g) | dce(g):
        pass


def _first_input(n: Node) -> Value | None:
    return next(n.inputs(), None)


def _transparent(n: Node) -> bool:
    """A node whose output holds its input's values in the input's shape: a contiguous
    copy, an alias, a view, expand or slice to the same shape (x[:, :, None] slices every
    dim whole)."""
    if n.op in ("contiguous", "view:alias.default", "view:detach.default"):
        return True
    if n.op in _SIZED_VIEWS or n.op == "view:slice.Tensor":
        src = _first_input(n)
        return src is not None and src.shape == n.outputs[0].shape
    return False


def underlying(v: Value) -> Value:
    """v before the transparent nodes that produce it."""
    while v.producer is not None and _transparent(v.producer):
        first = _first_input(v.producer)
        if first is None:
            break
        v = first
    return v


def _bypass(g: Graph) -> None:
    """Drop transparent nodes, their readers reading their input instead."""
    from tessera.graph.passes import _substitute

    rename: dict[Value, Value] = {}
    kept = []
    for n in g.nodes:
        n.args = _substitute(n.args, rename)
        src = _first_input(n)
        if _transparent(n) and src is not None:
            rename[n.outputs[0]] = src
        else:
            kept.append(n)
    g.nodes = kept
    g.outputs = [rename.get(v, v) for v in g.outputs]


# -- sizes as products of the inputs' sizes ---------------------------------------------
@dataclass(frozen=True)
class _Size:
    """coef * prod(size[p] ** e): a number the trace derived from the inputs' sizes."""

    coef: Fraction
    powers: tuple[tuple[int, int], ...]  # (prime, exponent)

    @property
    def bare(self) -> int | None:
        """The prime if this is exactly one input size."""
        if self.coef == 1 and len(self.powers) == 1 and self.powers[0][1] == 1:
            return self.powers[0][0]
        return None


def _factor(n: int, scale: dict[int, int]) -> _Size | None:
    """n as a product of scaled sizes (scale: prime -> the example size it multiplies), or
    None for a literal."""
    if isinstance(n, bool) or not isinstance(n, int) or n <= 1 or n > 1 << 48:
        return None
    powers, rest, den = [], n, 1
    for p, unit in scale.items():
        e = 0
        while rest % p == 0:
            rest //= p
            e += 1
        if e:
            powers.append((p, e))
            den *= unit ** e
    return _Size(Fraction(rest, den), tuple(powers)) if powers else None


def _evaluate(s: _Size, sizes: dict[int, Any]) -> Any:
    """The size under the bound input sizes (ints, or sympy expressions of a graph's
    symbolic dims), or None if one is unbound or the result is not a whole number."""
    value: Any = s.coef
    for p, e in s.powers:
        if p not in sizes:
            return None
        value = value * sizes[p] ** e
    if isinstance(value, Fraction):
        return int(value) if value.denominator == 1 else None
    return value


def _dim(d: Any) -> Any:
    """A graph dim as a number or a sympy expression (symbolic dims are strings)."""
    if isinstance(d, str):
        import sympy
        return sympy.sympify(d)
    return d


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    import sympy
    return sympy.simplify(sympy.sympify(a) - sympy.sympify(b)) == 0


# -- patterns ----------------------------------------------------------------------------
@dataclass
class _Template:
    """A traced pattern."""

    graph: Graph
    params: dict[Value, str]  # graph inputs -> parameter names
    broadcast: frozenset[Value]  # inputs a match may broadcast
    scalars: dict[float, str]  # traced sentinel -> float parameter name
    scale: dict[int, int]  # prime -> the example size it scales
    anchor: Node  # computes the output
    alternatives: dict[Node, frozenset[str]]


class Pattern:
    """A rewrite: where `fn`'s graph occurs, put `replace`'s (or what `build` emits).

    `examples`: one per parameter of `fn` — tensors (only dtype and shape are used),
    floats (matched against any number), other values (fixed). `replace`: a function of
    the same parameters computing the same result (call Tessera's ops as
    `torch.ops.tessera.<op>`), traced on each match's shapes. `build(match)`: emits the
    replacement's nodes through `match.emit` and returns its output Value. `check(match)`:
    whether to rewrite this match. `ops`: {node name in fn's graph: registry ops it may
    also be}, compared by tensor arguments only (the match's node tells which it was).
    `broadcast`: tensor parameters (given at full size) that a match may pass with dims of
    1 or fewer dims, as broadcasting allows (attention masks). `needs`: ops every match
    holds; a graph without one of them is not searched (nor is the pattern traced for
    it)."""

    def __init__(self, fn: Callable[..., Any], examples: Sequence[Any], *,
                 replace: Callable[..., Any] | None = None,
                 build: Callable[[Match], Value] | None = None,
                 check: Callable[[Match], bool] | None = None, name: str | None = None,
                 ops: dict[str, Sequence[str]] | None = None,
                 broadcast: Sequence[str] = (), needs: Sequence[str] = ()) -> None:
        self.name = name or getattr(fn, "__name__", "pattern")
        if (replace is None) == (build is None):
            raise PatternError(f"pattern {self.name}: give exactly one of replace= and "
                               "build=")
        self.fn, self.examples = fn, list(examples)
        self.replace, self.build, self.check = replace, build, check
        self.ops = {k: frozenset(v) for k, v in (ops or {}).items()}
        self.params = _parameters(fn, len(self.examples), self.name)
        self.broadcast = frozenset(broadcast)
        self.needs = frozenset(needs)
        if self.broadcast - set(self.params):
            raise PatternError(f"pattern {self.name}: broadcast= names "
                               f"{sorted(self.broadcast - set(self.params))}, which are not "
                               "parameters")
        self._template: _Template | None = None
        self._replacements: dict[Any, Graph | None] = {}

    def __repr__(self) -> str:
        return f"Pattern({self.name})"

    # -- compiling ---------------------------------------------------------------------
    def compile(self) -> _Template:
        """Trace the pattern (once)."""
        if self._template is None:
            self._template = self._compile()
        return self._template

    def _compile(self) -> _Template:
        dims = sorted({d for e in self.examples if isinstance(e, torch.Tensor)
                       for d in e.shape})
        if 0 in dims:
            raise PatternError(f"pattern {self.name}: an example has a dim of size 0",
                               hint="give sizes of 2 or more (1 for broadcast dims)")
        units = [d for d in dims if d != 1]
        primes = [p for p in _PRIMES if all(d % p for d in units)]
        if len(primes) < len(units):
            raise PatternError(f"pattern {self.name}: the examples have more distinct sizes "
                               f"({len(units)}) than this tracer can tell apart")
        prime_of = dict(zip(units, primes, strict=False))
        args: list[Any] = []
        scalars: dict[float, str] = {}
        for name, e in zip(self.params, self.examples, strict=True):
            if isinstance(e, torch.Tensor):
                args.append(_Spec(e.dtype, tuple(d * prime_of.get(d, 1) for d in e.shape)))
            elif isinstance(e, float):
                s = _SENTINEL + len(scalars) / 1024
                scalars[s] = name
                args.append(s)
            else:
                args.append(e)
        g = _trace(self.fn, args, f"pattern {self.name}")
        _simplify(g)
        _bypass(g)
        tensor_names = [n for n, e in zip(self.params, self.examples, strict=True)
                        if isinstance(e, torch.Tensor)]
        params = dict(zip(g.inputs, tensor_names, strict=True))
        out = g.outputs[0]
        if out.producer is None or out.producer not in g.nodes:
            raise PatternError(f"pattern {self.name} computes nothing (it returns an input)")
        used = {a for n in g.nodes for a in _leaves(n.args) if isinstance(a, float)}
        unused = [n for s, n in scalars.items() if s not in used]
        if unused:
            raise PatternError(f"pattern {self.name}: float parameter(s) {unused} are not "
                               "passed to any op as they are, so they cannot be matched",
                               hint="use the parameter directly (x * scale, not "
                                    "x * (1 / scale))")
        by_name = {v.name: v.producer for n in g.nodes for v in n.outputs}
        missing = sorted(set(self.ops) - set(by_name))
        if missing:
            raise PatternError(f"pattern {self.name}: ops= names {missing}, which are not "
                               f"nodes of its graph ({', '.join(sorted(by_name))})")
        lacking = sorted(self.needs - {n.op for n in g.nodes})
        if lacking:
            raise PatternError(f"pattern {self.name}: needs= names {lacking}, which its "
                               "graph does not hold")
        scale = {p: d for d, p in prime_of.items()}
        broadcast = frozenset(v for v, n in params.items() if n in self.broadcast)
        return _Template(g, params, broadcast, scalars, scale, out.producer,
                         {by_name[k]: v for k, v in self.ops.items()})

    # -- matching and rewriting ---------------------------------------------------------
    def matches(self, graph: Graph) -> list[Match]:
        """Every place the pattern matches now (they may overlap; nothing is changed)."""
        t = self.compile()
        users = _users(graph)
        found = []
        for n in graph.nodes:
            m = _Matcher(self, t, graph, users).match(n)
            if m is not None:
                found.append(m)
        return found

    def apply(self, graph: Graph) -> int:
        """Rewrite the graph with this pattern alone to a fixed point; how many times."""
        return rewrite(graph, [self]).get(self.name, 0)

    def replacement(self, m: Match) -> Value | None:
        """Emit the replacement of match m (None: it cannot be expressed for these
        shapes, the match is left alone)."""
        if self.build is not None:
            return self.build(m)
        template = self._replacement_graph(m)
        return None if template is None else m._inline(template)

    def _replacement_graph(self, m: Match) -> Graph | None:
        """The replacement traced for the match's input dtypes and shapes (cached)."""
        t = self.compile()
        args: list[Any] = []
        for name, e in zip(self.params, self.examples, strict=True):
            if isinstance(e, torch.Tensor):
                v = m.values[name]
                args.append(_Spec(v.dtype, v.shape))
            else:
                args.append(m.values[name] if name in t.scalars.values() else e)
        key = tuple(args)
        if key not in self._replacements:
            symbolic = sorted({d for a in args if isinstance(a, _Spec) for d in a.shape
                               if isinstance(d, str)})
            sentinel = dict(zip(symbolic, reversed(_PRIMES), strict=False))
            if len(sentinel) < len(symbolic):
                self._replacements[key] = None
                return None
            concrete = [_Spec(a.dtype, tuple(sentinel.get(d, d) for d in a.shape))
                        if isinstance(a, _Spec) else a for a in args]
            g = _trace(self.replace, concrete, f"the replacement of pattern {self.name}")
            _simplify(g)
            self._replacements[key] = _resymbolize(g, {p: s for s, p in sentinel.items()})
        return self._replacements[key]


def _parameters(fn: Callable[..., Any], count: int, name: str) -> list[str]:
    """The names of fn's parameters (arg0, arg1, ... for a builtin without a signature)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except ValueError:
        return [f"arg{i}" for i in range(count)]
    if any(p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params):
        raise PatternError(f"pattern {name}: its parameters must be plain positional ones")
    if len(params) != count:
        raise PatternError(f"pattern {name} takes {len(params)} parameters but "
                           f"{count} examples were given")
    return [p.name for p in params]


def _resymbolize(g: Graph, symbols: dict[int, str]) -> Graph | None:
    """A replacement traced with stand-in sizes for a graph's symbolic dims, with its
    dims put back as symbols; None if an attribute depends on them (it would hold a
    stand-in number)."""
    if not symbols:
        return g
    scale = dict.fromkeys(symbols, 1)
    for n in g.nodes:
        for a in _leaves(n.args):
            if _factor(a, scale) is not None:
                return None
    import sympy
    names = {p: sympy.Symbol(s) for p, s in symbols.items()}
    for v in [*g.inputs, *(v for n in g.nodes for v in n.outputs)]:
        dims = []
        for d in v.shape:
            s = _factor(d, scale) if isinstance(d, int) else None
            dims.append(d if s is None else str(_evaluate(s, names)))
        v.shape = tuple(dims)
    return g


def _leaves(a: Any) -> Iterator[Any]:
    if isinstance(a, dict):
        for x in a.values():
            yield from _leaves(x)
    elif isinstance(a, (list, tuple)):
        for x in a:
            yield from _leaves(x)
    else:
        yield a


# -- matches -------------------------------------------------------------------------------
@dataclass
class Match:
    """One occurrence of a pattern in a graph. `values`: parameter name -> the graph Value
    (tensors) or number (floats) it binds; `nodes`: the graph's nodes the pattern covers;
    `output`: the Value the pattern computes, which the replacement takes over."""

    pattern: Pattern
    graph: Graph
    values: dict[str, Any]
    nodes: list[Node]
    output: Value
    by_name: dict[str, Node] = field(repr=False)
    emitted: list[Node] = field(default_factory=list, repr=False)

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def node(self, name: str) -> Node:
        """The graph node that matched the pattern's node of this name (its FX name, as
        `print(pattern.compile().graph)` shows)."""
        return self.by_name[name]

    def emit(self, op: str, args: dict[str, Any], *, like: Value | tuple[torch.dtype, tuple],
             fn: Callable[..., Any] | None = None, name: str | None = None) -> Value:
        """Add a node ahead of the match's output and return its (one) output, of `like`'s
        dtype and shape. `op` is a registry op (args by schema name, defaults filled in)
        or "view:"/"torch:"/"fused:<name>" calling `fn` with args {"args", "kwargs"}."""
        from tessera.ops import registry

        dtype, shape = (like.dtype, like.shape) if isinstance(like, Value) else like
        if fn is None:
            d = registry.get(op)
            names = {a.name for a in d.args}
            if set(args) - names:
                raise PatternError(f"pattern {self.pattern.name}: op {op} has no argument(s)"
                                   f" {sorted(set(args) - names)}")
            args = {a.name: args.get(a.name, a.default) for a in d.args
                    if a.name in args or a.default is not a.REQUIRED}
        out = self.graph.value(name or op.rpartition(":")[2].partition(".")[0], dtype, shape)
        node = Node(op, args, [out], fn, source=f"pattern {self.pattern.name}"
                    ).derive(self._replaced())
        out.producer = node
        self.emitted.append(node)
        return out

    def _replaced(self) -> list[Node]:
        """The covered nodes, the output's producer last: what emitted nodes derive their
        origin and source line from."""
        anchor = self.output.producer
        return [*(n for n in self.nodes if n is not anchor), *([anchor] if anchor else [])]

    def constant(self, data: torch.Tensor, name: str = "folded") -> Value:
        """A new constant of the graph holding `data`."""
        return self.graph.value(name, data.dtype, tuple(data.shape), "const", data)

    def _inline(self, template: Graph) -> Value:
        """Copy a traced replacement into the graph on the match's values; nodes reading
        only constants are computed now and become constants."""
        from tessera.graph.interpreter import call_node, node_function
        from tessera.graph.passes import _substitute

        names = [n for n, e in zip(self.pattern.params, self.pattern.examples, strict=True)
                 if isinstance(e, torch.Tensor)]
        env: dict[Value, Value] = {v: self.values[n]
                                   for v, n in zip(template.inputs, names, strict=True)}
        for c in template.constants:
            env[c] = self.constant(c.data, c.name)
        for n in template.nodes:
            args = _substitute(n.args, env)
            if all(v.kind == "const" for v in _values(args)) and \
                    torch.Tag.nondeterministic_seeded not in getattr(n.fn, "tags", ()):
                copy = Node(n.op, args, n.outputs, n.fn, meta=dict(n.meta))
                data = {v: v.data for v in _values(args)}
                call_node(copy, data, node_function(copy))
                for v in n.outputs:
                    env[v] = self.constant(data[v].contiguous(), v.name)
                continue
            outs = [self.graph.value(v.name, v.dtype, v.shape) for v in n.outputs]
            node = Node(n.op, args, outs, n.fn, source=f"pattern {self.pattern.name}",
                        meta=dict(n.meta)).derive(self._replaced())
            for o in outs:
                o.producer = node
            env.update(zip(n.outputs, outs, strict=True))
            self.emitted.append(node)
        return env[template.outputs[0]]


def _values(a: Any) -> Iterator[Value]:
    for x in _leaves(a):
        if isinstance(x, Value):
            yield x


def _users(g: Graph) -> dict[Value, list[Node]]:
    users = g.users()
    for v in g.outputs:
        users.setdefault(v, []).append(_OUTPUT)
    return users


_OUTPUT = Node("graph output", {}, [])  # stands for the graph's return in users lists


@dataclass
class _State:
    """A partial match: pattern Values and Nodes bound to the graph's, input sizes bound,
    sizes still to check, the dtype map and float parameters."""

    values: dict[Value, Value] = field(default_factory=dict)
    nodes: dict[Node, Node] = field(default_factory=dict)
    crossed: list[Node] = field(default_factory=list)
    sizes: dict[int, Any] = field(default_factory=dict)
    checks: list[tuple[int, Any, bool]] = field(default_factory=list)  # (.., broadcast)
    dtypes: dict[torch.dtype, torch.dtype] = field(default_factory=dict)
    scalars: dict[str, float] = field(default_factory=dict)

    def copy(self) -> _State:
        return _State(dict(self.values), dict(self.nodes), list(self.crossed),
                      dict(self.sizes), list(self.checks), dict(self.dtypes),
                      dict(self.scalars))


class _Matcher:
    """Structural matching of one template against a graph, with backtracking over the
    order of commutative operands."""

    def __init__(self, p: Pattern, t: _Template, g: Graph, users: dict[Value, list[Node]]):
        self.p, self.t, self.g, self.users = p, t, g, users

    def match(self, node: Node) -> Match | None:
        anchor = self.t.anchor
        if not _same_op(self.t, anchor, node):
            return None
        pv = self.t.graph.outputs[0]
        tv = node.outputs[anchor.outputs.index(pv)]
        for st in self._value(pv, tv, _State()):
            m = self._finish(st, tv)
            if m is not None:
                return m
        return None

    # -- structure ---------------------------------------------------------------------
    def _value(self, pv: Value, tv: Value, st: _State) -> Iterator[_State]:
        if pv.kind == "input":  # the replacement reads the value before copies (any
            tv = underlying(tv)  # layout: a copy it needs is placed afterwards)
        if pv in st.values:
            if st.values[pv] is tv:
                yield st
            return
        if pv.kind == "const":  # the same values, in the dtype the match maps it to
            st = st.copy()
            if tv.kind == "const" and tv.shape == pv.shape and \
                    self._dtype(pv.dtype, tv.dtype, st) and \
                    torch.equal(tv.data, pv.data.to(tv.dtype)):
                st.values[pv] = tv
                yield st
            return
        st = st.copy()
        if not self._meta(pv, tv, st):
            return
        st.values[pv] = tv
        if pv.kind == "input":
            yield st
            return
        pn = pv.producer
        assert pn is not None
        while tv.producer is not None and _transparent(tv.producer) and \
                _first_input(tv.producer) is not None:
            st.crossed.append(tv.producer)
            tv = _first_input(tv.producer)  # type: ignore[assignment]
        tn = tv.producer
        if tn is None or tn.outputs.index(tv) != pn.outputs.index(pv):
            return
        yield from self._node(pn, tn, st)

    def _node(self, pn: Node, tn: Node, st: _State) -> Iterator[_State]:
        if pn in st.nodes:
            if st.nodes[pn] is tn:
                yield st
            return
        if not _same_op(self.t, pn, tn):  # (two pattern nodes may meet in one graph
            return  # node: views of q and of v are one when q is v)
        st.nodes[pn] = tn
        for pairs in self._arguments(pn, tn):
            yield from self._pairs(pairs, st)

    def _arguments(self, pn: Node, tn: Node) -> Iterator[list[tuple[Any, Any]]]:
        """The (pattern, graph) argument pairs to match, one list per way to pair them."""
        if pn.op in _SIZED_VIEWS:  # the sizes follow from the output shape (checked)
            yield [(pn.args["args"][0], tn.args["args"][0])]
            return
        if pn in self.t.alternatives:  # tensors only
            pi, ti = list(pn.inputs()), list(tn.inputs())
            if len(pi) == len(ti):
                yield list(zip(pi, ti, strict=True))
            return
        op, pa = view_form(pn)
        if op.startswith("view:") or pn.kind != "op":  # (a registry transpose is a view's
            ta = view_form(tn)[1]  # layout copied: it matches the view)
            if len(pa["args"]) != len(ta["args"]) or set(pa["kwargs"]) != set(ta["kwargs"]):
                return
            if op in _LAYOUT_VIEWS:
                pa, ta = _view_dims(pa, _rank(pn)), _view_dims(ta, _rank(tn))
            yield [*zip(pa["args"], ta["args"], strict=True),
                   *((pa["kwargs"][k], ta["kwargs"][k]) for k in pa["kwargs"])]
            return
        from tessera.ops import registry
        d = registry.get(pn.op)
        pa = {a.name: pn.args.get(a.name, a.default) for a in d.args}
        ta = {a.name: tn.args.get(a.name, a.default) for a in d.args}
        _normalize_dims(pa, _rank(pn))
        _normalize_dims(ta, _rank(tn))
        yield [(pa[k], ta[k]) for k in pa]
        if pn.op in _COMMUTATIVE and pa.get("alpha", 1) == 1 and "other" in pa:
            yield [(pa["x"], ta["other"]), (pa["other"], ta["x"]),
                   *((pa[k], ta[k]) for k in pa if k not in ("x", "other"))]

    def _pairs(self, pairs: list[tuple[Any, Any]], st: _State) -> Iterator[_State]:
        if not pairs:
            yield st
            return
        (pa, ta), rest = pairs[0], pairs[1:]
        for s in self._argument(pa, ta, st):
            yield from self._pairs(rest, s)

    def _argument(self, pa: Any, ta: Any, st: _State) -> Iterator[_State]:
        if isinstance(pa, Value):
            if isinstance(ta, Value):
                yield from self._value(pa, ta, st)
            return
        if isinstance(ta, Value):
            return
        if isinstance(pa, (list, tuple)):
            if isinstance(ta, (list, tuple)) and len(pa) == len(ta):
                yield from self._pairs(list(zip(pa, ta, strict=True)), st)
            return
        if isinstance(pa, float) and pa in self.t.scalars:
            name = self.t.scalars[pa]
            if isinstance(ta, (int, float)) and not isinstance(ta, bool) and \
                    st.scalars.get(name, ta) == ta:
                st = st.copy()
                st.scalars[name] = ta
                yield st
            return
        if isinstance(pa, torch.dtype):
            if isinstance(ta, torch.dtype):
                st = st.copy()
                if self._dtype(pa, ta, st):
                    yield st
            return
        size = _factor(pa, self.t.scale) if isinstance(pa, int) else None
        if size is not None:
            if isinstance(ta, int) and not isinstance(ta, bool):
                st = st.copy()
                st.checks.append((pa, ta, False))
                yield st
            return
        if _same_constant(pa, ta):
            yield st

    def _meta(self, pv: Value, tv: Value, st: _State) -> bool:
        """dtype and rank fit; input sizes are bound, the other dims kept to check."""
        if not self._dtype(pv.dtype, tv.dtype, st):
            return False
        if pv in self.t.broadcast:
            if len(tv.shape) > len(pv.shape):
                return False
            st.checks += [(pd, td, True) for pd, td in
                          zip(pv.shape[len(pv.shape) - len(tv.shape):], tv.shape, strict=True)]
            return True
        if len(pv.shape) != len(tv.shape):
            return False
        for pd, td in zip(pv.shape, tv.shape, strict=True):
            size = _factor(pd, self.t.scale)
            if size is not None and size.bare is not None and size.bare not in st.sizes:
                st.sizes[size.bare] = _dim(td)
            else:
                st.checks.append((pd, td, False))
        return True

    @staticmethod
    def _dtype(pd: torch.dtype, td: torch.dtype, st: _State) -> bool:
        if not pd.is_floating_point:
            return pd == td
        if not td.is_floating_point:
            return False
        if pd in st.dtypes:
            return st.dtypes[pd] == td
        if td in st.dtypes.values():
            return False
        st.dtypes[pd] = td
        return True

    # -- the whole match ---------------------------------------------------------------
    def _finish(self, st: _State, out: Value) -> Match | None:
        for pd, td, broadcast in st.checks:
            if broadcast and td == 1:
                continue
            size = _factor(pd, self.t.scale)
            want = pd if size is None else _evaluate(size, st.sizes)
            if want is None or not _equal(want, _dim(td)):
                return None
        covered = set(st.nodes.values()) | set(st.crossed)
        anchor = st.nodes[self.t.anchor]
        for n in covered:  # every value computed inside is used only inside
            for v in n.outputs:
                if v is not out and any(u not in covered for u in self.users.get(v, ())):
                    if n is anchor or not _keep(n, covered):
                        return None
        if any(st.values[pv].producer in covered for pv in self.t.params if pv in st.values):
            return None  # the replacement reads it: it must be computed outside
        values: dict[str, Any] = {n: st.values[pv] for pv, n in self.t.params.items()
                                  if pv in st.values}
        values.update(st.scalars)
        order = {n: i for i, n in enumerate(self.g.nodes)}
        by_name = {v.name: st.nodes[pn] for pn in st.nodes for v in pn.outputs}
        m = Match(self.p, self.g, values, sorted(covered, key=order.__getitem__), out, by_name)
        if self.p.check is not None and not self.p.check(m):
            return None
        return m



def _same_op(t: _Template, pn: Node, tn: Node) -> bool:
    """Whether graph node tn may match pattern node pn (by op alone)."""
    if len(pn.outputs) != len(tn.outputs):
        return False
    if pn.op == tn.op or (pn.op in RESHAPES and tn.op in RESHAPES):
        return True
    if pn.op in _LAYOUT_COPIES or tn.op in _LAYOUT_COPIES:
        return view_form(pn)[0] == view_form(tn)[0]
    return tn.op in t.alternatives.get(pn, ())


def _keep(n: Node, covered: set[Node]) -> bool:
    """Whether a covered node read outside the match can stay: one that reads no tensor
    (a constant CSE shared between layers) or a view of values computed outside the match
    (or by such nodes): those cost nothing to keep."""
    inputs = list(n.inputs())
    return not inputs or (n.kind == "view" and all(
        v.producer not in covered or _keep(v.producer, covered) for v in inputs))


def _rank(n: Node) -> int:
    v = _first_input(n)
    return len(v.shape) if v is not None else 0


def _mod(d: Any, rank: int) -> Any:
    """A dim (or dims) modulo rank: dim=-1 is dim=3 of a 4-D tensor."""
    if isinstance(d, int) and not isinstance(d, bool) and rank and -rank <= d < rank:
        return d % rank
    if isinstance(d, (list, tuple)):
        return [_mod(x, rank) for x in d]
    return d


def _normalize_dims(args: dict[str, Any], rank: int) -> None:
    """Dim attributes modulo rank."""
    for k in _DIM_ARGS:
        if k in args:
            args[k] = _mod(args[k], rank)


def _view_dims(args: dict[str, Any], rank: int) -> dict[str, Any]:
    """A transpose's or permute's view arguments with dims modulo rank, a transpose's two
    dims unordered."""
    x, *dims = args["args"]
    dims = [_mod(d, rank) for d in dims]
    if len(dims) == 2 and all(isinstance(d, int) for d in dims):
        dims = sorted(dims)
    return {"args": [x, *dims], "kwargs": args["kwargs"]}


def _same_constant(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if type(a) is not type(b):
        return False
    try:
        return bool(a == b)
    except Exception:
        return False


# -- rewriting ---------------------------------------------------------------------------------
def rewrite(graph: Graph, patterns: Sequence[Pattern]) -> dict[str, int]:
    """Apply the patterns in place until none matches (earlier patterns first at each
    node); how many times each fired. Constants nothing reads any more are dropped."""
    counts: dict[str, int] = {}
    budget = 8 * len(graph.nodes) + 64
    changed = True
    while changed:
        changed = False
        for p in patterns:
            if not p.needs <= {n.op for n in graph.nodes}:
                continue
            t = p.compile()
            live, users = set(graph.nodes), None
            for node in list(graph.nodes):
                if node not in live or not _same_op(t, t.anchor, node):
                    continue
                users = users or _users(graph)
                m = _Matcher(p, t, graph, users).match(node)
                if m is None or not _apply(m):
                    continue
                counts[p.name] = counts.get(p.name, 0) + 1
                changed = True
                budget -= 1
                if budget < 0:
                    raise PatternError(
                        "pattern rewrites do not reach a fixed point: "
                        + ", ".join(f"{k} fired {v} times" for k, v in counts.items()),
                        hint="a replacement must not recreate its own pattern")
                live, users = set(graph.nodes), None
    if counts:
        used = {v for n in graph.nodes for v in n.inputs()} | set(graph.outputs)
        graph.constants = [c for c in graph.constants if c in used]
    return counts


def _apply(m: Match) -> bool:
    """Replace the match by its replacement; False if the replacement declined."""
    from tessera.graph.passes import _substitute

    g = m.graph
    new = m.pattern.replacement(m)
    if new is None:
        return False
    old = m.output
    if new.dtype != old.dtype or len(new.shape) != len(old.shape) or not all(
            _equal(_dim(a), _dim(b)) for a, b in zip(new.shape, old.shape, strict=True)):
        raise PatternError(f"pattern {m.pattern.name}: its replacement gives {new!r} where "
                           f"the pattern computed {old!r}")
    users = _users(g)
    covered = set(m.nodes)
    drop = {n for n in covered
            if all(u in covered for v in n.outputs if v is not old for u in users.get(v, ()))}
    anchor = old.producer
    at = g.nodes.index(anchor)
    g.nodes = [n for n in g.nodes[:at] if n not in drop] + m.emitted + \
        [n for n in g.nodes[at:] if n not in drop]
    rename = {old: new}
    new.origin = new.origin or old.origin  # eager's value of what it replaces
    for n in g.nodes:
        n.args = _substitute(n.args, rename)
    g.outputs = [rename.get(v, v) for v in g.outputs]
    return True


# -- the user's patterns -------------------------------------------------------------------------
_REGISTERED: list[Pattern] = []


def pattern(*examples: Any, replace: Callable[..., Any] | None = None,
            build: Callable[[Match], Value] | None = None,
            check: Callable[[Match], bool] | None = None, name: str | None = None,
            ops: dict[str, Sequence[str]] | None = None, broadcast: Sequence[str] = (),
            needs: Sequence[str] = (), register: bool = True
            ) -> Callable[[Callable[..., Any]], Pattern]:
    """Decorator: the function is a pattern traced on `examples` (see `Pattern`), checked
    now, and (with `register`) applied by the graph compiler to every graph it compiles,
    before the built-in rewrites."""
    def decorate(fn: Callable[..., Any]) -> Pattern:
        p = Pattern(fn, examples, replace=replace, build=build, check=check, name=name,
                    ops=ops, broadcast=broadcast, needs=needs)
        p.compile()
        if register:
            _REGISTERED.append(p)
        return p
    return decorate


def registered() -> list[Pattern]:
    """The user's patterns the compiler applies, in the order they were defined."""
    return list(_REGISTERED)


def unregister(p: Pattern) -> None:
    """Stop applying a registered pattern."""
    if p not in _REGISTERED:
        raise PatternError(f"{p!r} is not registered")
    _REGISTERED.remove(p)
