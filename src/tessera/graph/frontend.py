"""From torch to the graph IR: an aten-level FX graph (what AOTAutograd or torch.export
produce) becomes a Graph of registry ops. Each aten call is lowered to the op that lists
the overload in its `implements`, binding aten's arguments to the op's by name (with
aten's aliases: self/input -> x, mat2 -> other, ...); aten arguments the op does not take
must hold values that do not change the forward result (dtype=None, dropout_p=0, ...).
Views stay torch views, transposes and permutes too: the registry's ops read strided
tensors, so a transpose costs nothing where its readers take it as it is; `place_copies`
makes one a copy (the registry's transpose/permute) only where a reader needs the layout a
copy gives (a reshape that cannot view it, an op that would copy it with torch). Ops that
create a tensor from constants alone (arange, full with static sizes) become constants.
Anything else becomes a torch fallback node, named in one warning.
"""

from __future__ import annotations

import math
import operator
import os
import re
import warnings
from collections.abc import Callable, Sequence
from functools import cache
from typing import Any

import torch
import torch.fx

from tessera.graph.ir import Graph, GraphError, Node, Value
from tessera.ops import registry
from tessera.ops.shape import contiguous_strides

__all__ = ["from_fx", "lowering", "place_copies", "where"]

aten = torch.ops.aten

# aten's names for arguments the ops call otherwise
_ALIASES = {"self": ("x", "input", "q"), "input": ("x", "q"), "query": ("q",), "key": ("k",),
            "value": ("v",), "mat2": ("other",), "vec": ("other",), "tensor": ("other",),
            "exponent": ("other",), "split_size": ("split_sizes",), "group": ("num_groups",)}
# aten arguments without a counterpart, and the values that leave inference unchanged
_IGNORABLE: dict[str, Callable[[Any], bool]] = {
    "cudnn_enabled": lambda v: True, "cudnn_enable": lambda v: True,
    "momentum": lambda v: True, "N": lambda v: True, "C": lambda v: True,
    "HxW": lambda v: True, "padding_idx": lambda v: True,
    "scale_grad_by_freq": lambda v: True, "sparse": lambda v: v is False,
    "memory_format": lambda v: v in (None, torch.contiguous_format, torch.preserve_format),
    "half_to_float": lambda v: v is False, "dtype": lambda v: v is None,
    "dropout_p": lambda v: v == 0.0, "sparse_grad": lambda v: v is False,
    "transposed": lambda v: v is False, "output_padding": lambda v: not any(v),
}


def _bools(*names: str) -> Callable[[dict[str, Any]], bool]:
    return lambda b: all(isinstance(b[n], Value) and b[n].dtype == torch.bool for n in names)


# aten overloads an op computes though its `implements` does not list them (what
# AOTAutograd's graphs hold), when the condition on aten's bound arguments holds
_ALSO: dict[Any, tuple[str, Callable[[dict[str, Any]], bool]]] = {
    aten.convolution.default: ("conv2d", lambda b: len(b["stride"]) == 2
                               and isinstance(b["input"], Value) and len(b["input"].shape) == 4),
    aten.max_pool2d_with_indices.default: ("max_pool2d", lambda b: True),
    aten.bitwise_and.Tensor: ("logical_and", _bools("self", "other")),
    aten.bitwise_or.Tensor: ("logical_or", _bools("self", "other")),
    aten.bitwise_xor.Tensor: ("logical_xor", _bools("self", "other")),
}
# the op's arguments an aten overload implies without spelling them: aten's CPU flash
# attention takes grouped-query keys and values as they are
_IMPLIED: dict[Any, dict[str, Any]] = {
    aten._scaled_dot_product_flash_attention_for_cpu.default: {"enable_gqa": True},
}
# view and metadata ops: no data moves, no kernel runs (reshape may copy: torch does it)
VIEWS = {aten.view.default: torch.reshape, aten._unsafe_view.default: torch.reshape,
         aten.reshape.default: torch.reshape, aten.permute.default: torch.permute,
         aten.t.default: torch.t, aten.transpose.int: torch.transpose,
         aten.expand.default: aten.expand.default, aten.slice.Tensor: aten.slice.Tensor,
         aten.select.int: torch.select, aten.unsqueeze.default: torch.unsqueeze,
         aten.squeeze.dim: torch.squeeze, aten.squeeze.dims: torch.squeeze,
         aten.squeeze.default: torch.squeeze, aten.alias.default: aten.alias.default,
         aten.detach.default: torch.detach, aten.as_strided.default: torch.as_strided,
         aten.unbind.int: torch.unbind, aten.split.Tensor: torch.split,
         aten.split_with_sizes.default: torch.split_with_sizes,
         aten.diagonal.default: torch.diagonal, aten.unfold.default: aten.unfold.default,
         # a tensor literal of the model: its copy is never written (the graph is
         # functional), so it is the literal itself, not a clone on every call
         aten.lift_fresh_copy.default: aten.alias.default}


@cache
def lowering() -> dict[Any, registry.OpDef]:
    """aten overload -> the op that implements it."""
    table = {}
    for d in registry.definitions():
        for target in (*d.implements, getattr(torch.ops.tessera, d.name).default):
            table.setdefault(target, d)
    for target, (name, _) in _ALSO.items():
        table.setdefault(target, registry.get(name))
    return table


def _bind(target: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """aten's arguments by name, defaults filled in."""
    bound = {}
    for i, a in enumerate(target._schema.arguments):
        if i < len(args) and not a.kwarg_only:
            bound[a.name] = args[i]
        elif a.name in kwargs:
            bound[a.name] = kwargs[a.name]
        elif a.has_default_value():
            bound[a.name] = a.default_value
    return bound


def map_arguments(d: registry.OpDef, target: Any, args: Sequence[Any],
                  kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """The op's arguments for this aten call, or None if the op cannot compute it."""
    bound = _bind(target, args, kwargs)
    also = _ALSO.get(target)
    if also is not None and not also[1](bound):
        return None
    names = {a.name for a in d.args}
    out: dict[str, Any] = dict(_IMPLIED.get(target, {}))
    for name, v in bound.items():
        dest = name if name in names else next(
            (n for n in _ALIASES.get(name, ()) if n in names and n not in out), None)
        if dest is not None and dest not in out:
            out[dest] = v
        elif not _IGNORABLE.get(name, lambda v: False)(v):
            return None
    if any(a.default is a.REQUIRED and a.name not in out for a in d.args):
        return None
    return out


def _meta(node: torch.fx.Node) -> list[Any]:
    val = node.meta.get("val")
    return list(val) if isinstance(val, (list, tuple)) else [val]


def _dims(shape: Sequence[Any]) -> tuple[int | str, ...]:
    return tuple(d if isinstance(d, int) else str(d) for d in shape)


def _constant_creation(target: Any, fx: torch.fx.Node) -> bool:
    """A deterministic op making one tensor from constants alone (arange, full,
    scalar_tensor with static sizes): its result is a constant of the graph."""
    return isinstance(target, torch._ops.OpOverload) and not fx.all_input_nodes and \
        isinstance(fx.meta.get("val"), torch.Tensor) and len(target._schema.returns) == 1 \
        and torch.Tag.nondeterministic_seeded not in target.tags and \
        not any("Tensor" in str(a.type) for a in target._schema.arguments)


class _Builder:
    def __init__(self, gm: torch.fx.GraphModule, constants: dict[int, torch.Tensor]):
        self.gm, self.constants = gm, constants
        self.graph = Graph()
        self.env: dict[torch.fx.Node, Any] = {}
        self.fallbacks: dict[str, int] = {}
        self.placeholders: list[Value] = []  # inputs and frozen constants, in order

    def value_of(self, fx: torch.fx.Node, val: Any, name: str | None = None) -> Value | None:
        if isinstance(val, torch.Tensor):
            return self.graph.value(name or fx.name, val.dtype, _dims(val.shape))
        if isinstance(val, (torch.SymInt, int)):
            return self.graph.value(name or fx.name, torch.int64, ())
        return None

    def arg(self, a: Any) -> Any:
        """An FX argument with nodes replaced by their Values (or constants)."""
        return torch.fx.node.map_arg(a, lambda n: self.env[n])

    def build(self) -> Graph:
        index = 0
        for fx in self.gm.graph.nodes:
            if fx.op == "placeholder":
                if index in self.constants:
                    t = self.constants[index]
                    self.env[fx] = self.graph.value(fx.name, t.dtype, tuple(t.shape), "const",
                                                    t)
                else:
                    val = _meta(fx)[0]
                    v = self.value_of(fx, val)
                    if v is None:
                        raise GraphError(f"input {fx.name} is a {type(val).__name__}; the "
                                         "graph compiler takes tensors and ints")
                    v.kind, v.origin = "input", fx.name
                    self.graph.inputs.append(v)
                    self.env[fx] = v
                self.placeholders.append(self.env[fx])
                index += 1
            elif fx.op == "get_attr":
                t = getattr(self.gm, fx.target)
                self.env[fx] = self.graph.value(fx.name, t.dtype, tuple(t.shape), "const", t)
            elif fx.op == "call_function":
                self.call(fx)
            elif fx.op == "output":
                outs = fx.args[0]
                for o in (outs if isinstance(outs, (list, tuple)) else [outs]):
                    v = self.env.get(o) if isinstance(o, torch.fx.Node) else None
                    if not isinstance(v, Value):
                        raise GraphError(f"graph output {o} is not a tensor the graph computes")
                    self.graph.outputs.append(v)
            else:
                raise GraphError(f"FX node {fx.format_node()}: {fx.op} is not supported "
                                 "(AOTAutograd graphs have call_function nodes only)")
        if self.fallbacks:
            names = ", ".join(f"{k} (x{n})" if n > 1 else k for k, n in self.fallbacks.items())
            warnings.warn(f"tessera: no lowering for {names}: these run through torch at "
                          "graph boundaries", stacklevel=3)
        return self.graph

    def call(self, fx: torch.fx.Node) -> None:
        target = fx.target
        if target is operator.getitem:
            src, i = fx.args
            self.env[fx] = self.env[src][i]
            return
        vals = _meta(fx)
        d = lowering().get(target) if target not in _LAYOUT_VIEWS else None
        bound = map_arguments(d, target, self.arg(fx.args), self.arg(fx.kwargs)) \
            if d is not None else None
        ours = d.num_outputs if d is not None else 0
        used = self._used_outputs(fx)
        if bound is not None and max(used, default=0) < ours:
            self.emit(fx, d.name, bound, vals[:ours], None)
        elif target in VIEWS:
            self.emit(fx, "view:" + str(target).removeprefix("aten."),
                      {"args": self.arg(fx.args), "kwargs": self.arg(fx.kwargs)}, vals,
                      VIEWS[target])
        elif _constant_creation(target, fx):
            from torch._subclasses.fake_tensor import unset_fake_temporarily
            with unset_fake_temporarily():  # a real constant, also when tracing patterns
                t = target(*fx.args, **fx.kwargs)  # arange(32), full([], True): made once
            self.env[fx] = self.graph.value(fx.name, t.dtype, tuple(t.shape), "const", t)
        else:
            if isinstance(target, torch._ops.OpOverload) and any(
                    isinstance(v, torch.Tensor) for v in vals):
                key = str(target).removeprefix("aten.")
                self.fallbacks[key] = self.fallbacks.get(key, 0) + 1
            self.emit(fx, "torch:" + getattr(target, "__name__", str(target)),
                      {"args": self.arg(fx.args), "kwargs": self.arg(fx.kwargs)}, vals,
                      target)

    def _used_outputs(self, fx: torch.fx.Node) -> list[int]:
        if len(_meta(fx)) == 1 and not isinstance(fx.meta.get("val"), (list, tuple)):
            return [0]
        return [u.args[1] for u in fx.users if u.target is operator.getitem]

    def emit(self, fx: torch.fx.Node, op: str, args: dict[str, Any], vals: list[Any],
             fn: Callable[..., Any] | None) -> None:
        single = not isinstance(fx.meta.get("val"), (list, tuple))
        outs = [self.value_of(fx, v, fx.name if len(vals) == 1 else f"{fx.name}_{i}")
                for i, v in enumerate(vals)]
        for i, o in enumerate(outs):
            if o is not None:
                o.origin = fx.name if single else f"{fx.name}[{i}]"
        node = Node(op, args, [o for o in outs if o is not None], fn, source=fx.format_node(),
                    origin=[fx.name], where=where(fx))
        node.meta["returns"] = [i for i, o in enumerate(outs) if o is not None]
        self.graph.add(node)
        self.env[fx] = outs[0] if single else outs


def where(fx: torch.fx.Node) -> str:
    """The user's source line an FX node came from, "file:line: code": the innermost frame
    of its recorded stack trace outside the graph compiler (whose code dynamo traces in
    place of the user's, e.g. moe.fused_forward), or "" if it has none."""
    frames = [f for f in _FRAME.findall(fx.meta.get("stack_trace") or "")
              if not f[0].startswith(_COMPILER)]
    if not frames:
        return ""
    file, line, code = frames[-1]
    return f"{file}:{line}: {code.strip()}"


_FRAME = re.compile(r'^\s*File "([^"]+)", line (\d+), in [^\n]*\n([^\n]*)', re.MULTILINE)
_COMPILER = os.path.dirname(os.path.abspath(__file__)) + os.sep


def from_fx(gm: torch.fx.GraphModule, constants: dict[int, torch.Tensor] | None = None, *,
            specialize: bool = True) -> Graph:
    """The Graph of an aten-level FX graph; placeholders whose index is in `constants`
    become frozen constants holding those tensors. `specialize`: while dynamo compiles
    the graph, floats it passes as inputs become constants (see `_dynamo_floats`)."""
    b = _Builder(gm, constants or {})
    g = b.build()
    floats = _dynamo_floats(b.placeholders) if specialize else {}
    if floats:
        _fold_scalars(g, floats)
    place_copies(g)
    g.verify()
    return g


# -- floats dynamo passes as inputs -----------------------------------------------------------
def _dynamo_floats(placeholders: list[Value]) -> dict[Value, float]:
    """The floats dynamo passes as 0-dim float64 inputs — module attributes it does not
    specialize when shapes are dynamic (a norm's eps, an attention scale), which then hide
    the patterns they belong to — by input, each guarded to keep its value (another value
    compiles the model again, as a specialized float would). Empty outside dynamo's
    compile or where its graph arguments do not line up with the placeholders."""
    try:
        from torch._dynamo.guards import GuardBuilder
        from torch._dynamo.symbolic_convert import InstructionTranslator
        tx = InstructionTranslator.current_tx()
        graphargs = tx.output.graphargs if tx is not None else []
    except Exception:  # not compiling under dynamo (or a dynamo without these)
        return {}
    if len(graphargs) != len(placeholders):
        return {}
    found: dict[Value, float] = {}
    for ga, v in zip(graphargs, placeholders, strict=True):
        x = getattr(ga, "example_strong_ref", None)
        if not (getattr(ga, "pass_arg_as_tensor", False) and v.kind == "input" and
                v.shape == () and v.dtype == torch.float64 and isinstance(x, torch.Tensor)
                and x.dim() == 0 and x.dtype == torch.float64):
            continue
        try:
            tx.output.guards.add(ga.source.make_guard(GuardBuilder.EQUALS_MATCH))
        except Exception:  # a source dynamo cannot guard: the float stays an input
            continue
        found[v] = x.item()
    return found


_SCALAR_READERS = ("add", "sub", "mul", "div")  # registry ops taking a number as `other`


def _fold_scalars(g: Graph, floats: dict[Value, float]) -> None:
    """The inputs in `floats` hold those numbers: 0-dim nodes computed from them alone
    (dynamo's casts) are computed now, and their readers get the number — as a Python
    scalar where an arithmetic op takes it as `other` on a float tensor of the result's
    dtype (what models write: x + eps, x * scale, so patterns see it), else as a 0-dim
    constant."""
    from tessera.graph.interpreter import call_node, node_function
    from tessera.graph.passes import _substitute

    known: dict[Value, Any] = {v: torch.tensor(x, dtype=v.dtype) for v, x in floats.items()}
    consts: dict[Value, Value] = {}
    kept = []
    for n in g.nodes:
        ins = list(n.inputs())
        if ins and all(v in known for v in ins) and n.kind in ("op", "torch") and \
                len(n.outputs) == 1 and n.outputs[0].shape == ():
            env = dict(known)
            call_node(n, env, node_function(n))
            if isinstance(env[n.outputs[0]], torch.Tensor):
                known[n.outputs[0]] = env[n.outputs[0]]
                continue
        if any(v in known for v in ins):
            args = n.args
            if n.kind == "op" and n.op in _SCALAR_READERS:
                if n.op in ("add", "mul") and args.get("alpha", 1) == 1 and \
                        args.get("x") in known and args.get("other") not in known:
                    args = {**args, "x": args["other"], "other": args["x"]}
                x, other = args.get("x"), args.get("other")
                if other in known and isinstance(x, Value) and x.dtype.is_floating_point \
                        and x.dtype == n.outputs[0].dtype:
                    args = {**args, "other": known[other].item()}
            for v in ins:
                if v in known and v not in consts:
                    consts[v] = g.value(f"{v.name}_value", v.dtype, (), "const", known[v])
            n.args = _substitute(args, consts)
        kept.append(n)
    g.nodes = kept


# -- layouts: where a transpose must be a copy ----------------------------------------------
# aten's layout changes, lowered as views; the registry op each becomes where a copy is needed
_LAYOUT_VIEWS = {aten.transpose.int: "transpose", aten.permute.default: "permute"}
_AS_VIEW = {op: (f"view:{str(t).removeprefix('aten.')}", t) for t, op in _LAYOUT_VIEWS.items()}
_AS_COPY = {view: (op, t) for op, (view, t) in _AS_VIEW.items()}
RESHAPES = {"view:view.default", "view:_unsafe_view.default", "view:reshape.default"}
# registry ops whose kernels read any strides without torch copying them (tests/graph/
# test_frontend_layouts.py runs each on transposed inputs under the recorder); pointwise
# ops (and `contiguous`) read strides as long as they coalesce to 3 dims, other ops are
# given contiguous inputs, as before transposes were views
_STRIDED = frozenset({"matmul", "linear", "bmm", "addmm", "baddbmm", "cat", "embedding",
                      "scaled_dot_product_attention", "scaled_dot_product_attention_lse",
                      "rotary_embedding", "transpose", "permute"})
_LIKE_INPUT = {"scaled_dot_product_attention": "q", "scaled_dot_product_attention_lse": "q",
               "rotary_embedding": "x"}  # results allocated in that input's layout


def view_form(n: Node) -> tuple[str, dict[str, Any]]:
    """The node's op and arguments with a registry transpose/permute (a copy) written as
    the view it copies: what pattern matching compares, layouts aside."""
    if n.kind == "op" and n.op in _AS_VIEW:
        names = [a.name for a in registry.get(n.op).args]
        return _AS_VIEW[n.op][0], {"args": [n.args[k] for k in names], "kwargs": {}}
    return n.op, n.args


def place_copies(g: Graph) -> int:
    """Make every transpose and permute a view, then a copy (the registry op) wherever a
    reader needs a layout the view does not have, nearest to that reader, until none does;
    drop `contiguous` copies of what is surely contiguous already. In place; how many
    transposes are copies."""
    for n in g.nodes:
        if n.kind == "op" and n.op in _AS_VIEW:
            n.op, n.args = view_form(n)
            n.fn = VIEWS[_AS_COPY[n.op][1]]
    copies: set[Node] = set()
    while True:
        layouts = _Layouts(g)
        more = {s for v in layouts.needs if (s := layouts.source(v)) is not None} - copies
        if not more:
            break
        for n in more:
            op, target = _AS_COPY[n.op]
            bound = _bind(target, n.args["args"], n.args["kwargs"])
            n.op, n.fn = op, None
            n.args = {("x" if k == "self" else k): v for k, v in bound.items()}
        copies |= more
    _drop_copies(g, layouts)
    return len(copies)


def _drop_copies(g: Graph, layouts: _Layouts) -> None:
    """Readers of contiguous(x) read x where x is surely contiguous (the model's copy was
    for eager's layout; the graph is functional, so the copy is never needed for itself).
    Graph outputs (and views they are) keep their own buffer: a caller may write them."""
    from tessera.graph.passes import _substitute
    returned = set()
    for v in g.outputs:
        while isinstance(v, Value) and v not in returned:
            returned.add(v)
            v = next(v.producer.inputs(), None) if v.producer is not None and \
                v.producer.kind == "view" else None
    rename: dict[Value, Value] = {}
    kept = []
    for n in g.nodes:
        n.args = _substitute(n.args, rename)
        x = n.args.get("x") if n.op == "contiguous" else None
        if isinstance(x, Value) and x in layouts.known and layouts.contiguous(x) and \
                n.outputs[0] not in returned:
            rename[n.outputs[0]] = x
        else:
            kept.append(n)
    g.nodes = kept


def _view_strides(shape: Sequence[int], strides: Sequence[int], new: Sequence[int]
                  ) -> tuple[int, ...] | None:
    """The strides of a tensor of `shape` and `strides` viewed as `new`, or None if no
    view can (torch's computeStride: reshape copies then)."""
    if not shape or math.prod(shape) == 0:
        return contiguous_strides(new)
    out = [0] * len(new)
    view_d, base, tensor_n, view_n = len(new) - 1, strides[-1], 1, 1
    for d in range(len(shape) - 1, -1, -1):
        tensor_n *= shape[d]
        if d == 0 or (shape[d - 1] != 1 and strides[d - 1] != tensor_n * base):
            while view_d >= 0 and (view_n < tensor_n or new[view_d] == 1):
                out[view_d] = view_n * base
                view_n *= new[view_d]
                view_d -= 1
            if view_n != tensor_n:
                return None
            if d > 0:
                base, tensor_n, view_n = strides[d - 1], 1, 1
    return tuple(out) if view_d == -1 else None


def _dense(shape: Sequence[int], strides: Sequence[int]) -> bool:
    """Whether the strides lay the elements out without gaps or overlap in some dim
    order (what empty_like keeps)."""
    dims = sorted((s, n) for n, s in zip(shape, strides, strict=True) if n != 1)
    step = 1
    for s, n in dims:
        if s != step:
            return False
        step *= n
    return True


class _Layouts:
    """The strides every tensor of a graph will have at run time as far as the graph
    tells: inputs and op results contiguous (except results allocated in an input's
    layout), views by their rule; None where unknown. Symbolic dims count as distinct
    large primes, so what holds here holds for sizes in general. `needs`: values some
    reader needs contiguous."""

    def __init__(self, g: Graph) -> None:
        self.primes: dict[str, int] = {}
        self.sizes: dict[str, int] = {}
        self.strides: dict[Value, tuple[int, ...] | None] = {}
        self.needs: list[Value] = []
        self.known: set[Value] = set(g.constants)  # layouts surely as computed
        for v in g.inputs:  # (assumed: a strided input costs a copy at worst)
            self.strides[v] = contiguous_strides(self.shape(v))
        for v in g.constants:
            self.strides[v] = tuple(v.data.stride()) if v.data is not None else None
        live = _live(g)
        for n in g.nodes:
            if n.kind == "view":
                outs = self._view(n)
                first = next(n.inputs(), None)
                sure = first in self.known
            else:
                if n in live:
                    self._reads(n)
                outs = [contiguous_strides(self.shape(o)) for o in n.outputs]
                like = _LIKE_INPUT.get(n.op) if n.kind == "op" else None
                sure = n.kind in ("op", "fused")
                if like is not None:
                    outs[0] = self._like(n, n.args[like]) or outs[0]
                    sure = n.args[like] in self.known
            self.strides.update(zip(n.outputs, outs, strict=True))
            if sure:
                self.known.update(o for o, st in zip(n.outputs, outs, strict=True)
                                  if st is not None)

    def size(self, d: int | str) -> int:
        if isinstance(d, int):
            return d
        hit = self.sizes.get(d)
        if hit is None:
            import sympy
            e = sympy.sympify(d)
            for s in sorted(e.free_symbols, key=str):
                self.primes.setdefault(s.name, int(sympy.nextprime(
                    max(self.primes.values(), default=1 << 10))))
            hit = self.sizes[d] = int(e.subs({s: self.primes[s.name] for s in e.free_symbols}))
        return hit

    def shape(self, v: Value) -> tuple[int, ...]:
        return tuple(self.size(d) for d in v.shape)

    def contiguous(self, v: Value) -> bool:
        st, shape = self.strides.get(v), self.shape(v)
        return st is not None and all(n == 1 or a == b for n, a, b in zip(
            shape, st, contiguous_strides(shape), strict=True))

    def need(self, v: Value) -> None:
        if isinstance(v, Value) and v.shape and not self.contiguous(v):
            self.needs.append(v)

    def source(self, v: Value) -> Node | None:
        """The nearest transpose/permute view above v (through views) that leaves its
        result strided: the one to make a copy so v's reader gets contiguous data."""
        while v.producer is not None and v.producer.kind == "view":
            n = v.producer
            if n.op in _AS_COPY and not self.contiguous(n.outputs[0]):
                return n
            first = next(n.inputs(), None)
            if first is None:
                return None
            v = first
        return None

    # -- results --------------------------------------------------------------------------
    def _like(self, n: Node, x: Value) -> tuple[int, ...] | None:
        """The result's strides when the op allocates it in x's layout (attention.py's
        _like_q: [B, S, H, D] memory for a transposed q; rotary's empty_like)."""
        st, shape = self.strides.get(x), self.shape(x)
        if st is None:
            return None
        if n.op == "rotary_embedding":
            return st if _dense(shape, st) else None
        if len(shape) != 4:
            return None
        _, h, s, _ = shape
        dv = self.shape(n.outputs[0])[3]
        if st[1] < st[2] and h > 1 and s > 1:
            return (s * h * dv, dv, h * dv, 1)
        return None

    def _view(self, n: Node) -> list[tuple[int, ...] | None]:
        args, kwargs = n.args["args"], n.args["kwargs"]
        x = args[0] if args and isinstance(args[0], Value) else None
        st = self.strides.get(x) if x is not None else None
        unknown: list[tuple[int, ...] | None] = [None] * len(n.outputs)
        if x is None:
            return unknown
        if n.op in RESHAPES:
            new = _view_strides(self.shape(x), st, self.shape(n.outputs[0])) \
                if st is not None else None
            if new is None:  # torch.reshape copies: the reader of a strided x
                self.need(x)
                return [contiguous_strides(self.shape(n.outputs[0]))]
            return [new]
        if n.op == "view:as_strided.default":  # reads x's storage as laid out: keep it
            self.need(x)
            return unknown
        if st is None:
            return unknown
        if n.op in ("view:slice.Tensor", "view:select.int"):
            return self._sliced(n, st)
        if any(isinstance(a, Value) for a in (*_leaves(args[1:]), *_leaves(kwargs.values()))):
            return unknown
        if n.op == "view:expand.default":
            shape, xs = self.shape(n.outputs[0]), self.shape(x)
            pad = len(shape) - len(xs)
            return [tuple(0 if i < pad or (xs[i - pad] == 1 and shape[i] != 1)
                          else st[i - pad] for i in range(len(shape)))]
        if n.op in ("view:split.Tensor", "view:split_with_sizes.default"):
            return [st] * len(n.outputs)
        try:
            meta = torch.empty_strided(self.shape(x), st, dtype=x.dtype, device="meta")
            out = n.fn(meta, *args[1:], **kwargs)  # type: ignore[misc]
        except Exception:
            return unknown
        outs = list(out) if isinstance(out, (list, tuple)) else [out]
        return [tuple(t.stride()) for t in outs]

    def _sliced(self, n: Node, st: tuple[int, ...]) -> list[tuple[int, ...] | None]:
        """slice and select, whose bounds or index may be symbolic: the strides do not
        depend on them."""
        args = n.args["args"]
        dim = args[1] if len(args) > 1 else n.args["kwargs"].get("dim", 0)
        step = args[4] if len(args) > 4 else n.args["kwargs"].get("step", 1)
        if not isinstance(dim, int) or not isinstance(step, int) or not st:
            return [None]
        d = dim % len(st)
        if n.op == "view:select.int":
            return [st[:d] + st[d + 1:]]
        return [(*st[:d], st[d] * step, *st[d + 1:])]

    # -- readers ----------------------------------------------------------------------------
    def _reads(self, n: Node) -> None:
        """Note the inputs n cannot read strided."""
        tensors = [v for v in n.inputs() if v.shape]
        if n.kind == "op" and n.op in _STRIDED:
            for v in tensors:
                if not self._strided_ok(n, v):
                    self.need(v)
        elif n.kind == "op" and (n.op == "contiguous" or
                                 registry.get(n.op).kind == "pointwise"):
            if not self._coalesces(n, tensors):
                for v in tensors:
                    self.need(v)
        else:
            for v in tensors:
                self.need(v)

    def _strided_ok(self, n: Node, v: Value) -> bool:
        if n.op.startswith("scaled_dot_product_attention"):
            return len(v.shape) <= 4  # more dims are flattened by a reshape
        if n.op == "matmul" and isinstance(n.args.get("other"), Value) and \
                len(n.args["other"].shape) == 1 and v is n.args.get("x"):
            st = self.strides.get(v)  # x's rows are viewed as one matrix
            shape = self.shape(v)
            return st is not None and _view_strides(
                shape, st, (math.prod(shape[:-1]), shape[-1])) is not None
        return True

    def _coalesces(self, n: Node, tensors: list[Value]) -> bool:
        """Whether the pointwise kernels index every operand in at most 3 dims (more are
        walked with torch copies)."""
        from tessera.ops._launch import coalesce
        out = self.shape(n.outputs[0])
        strides = []
        for v in tensors:
            st, shape = self.strides.get(v), self.shape(v)
            if st is None:
                return False
            pad = len(out) - len(shape)
            strides.append([0] * pad + [0 if d == 1 else s for d, s in zip(shape, st,
                                                                          strict=True)])
        sizes, _ = coalesce(out, [*strides, list(contiguous_strides(out))])
        return len(sizes) <= 3


def _live(g: Graph) -> set[Node]:
    """The nodes some graph output depends on."""
    needed, live = set(g.outputs), set()
    for n in reversed(g.nodes):
        if any(v in needed for v in n.outputs):
            live.add(n)
            needed.update(n.inputs())
    return live


def _leaves(a: Any) -> list[Any]:
    if isinstance(a, (list, tuple)):
        return [y for x in a for y in _leaves(x)]
    return [a]
