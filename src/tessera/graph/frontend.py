"""From torch to the graph IR: an aten-level FX graph (what AOTAutograd or torch.export
produce) becomes a Graph of registry ops. Each aten call is lowered to the op that lists
the overload in its `implements`, binding aten's arguments to the op's by name (with
aten's aliases: self/input -> x, mat2 -> other, ...); aten arguments the op does not take
must hold values that do not change the forward result (dtype=None, dropout_p=0, ...).
Views stay torch views; ops that create a tensor from constants alone (arange, full with
static sizes) become constants. Anything else becomes a torch fallback node, named in one
warning.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Callable, Sequence
from functools import cache
from typing import Any

import torch
import torch.fx

from tessera.graph.ir import Graph, GraphError, Node, Value
from tessera.ops import registry

__all__ = ["from_fx", "lowering"]

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
                    v.kind = "input"
                    self.graph.inputs.append(v)
                    self.env[fx] = v
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
        d = lowering().get(target)
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
        outs = [self.value_of(fx, v, fx.name if len(vals) == 1 else f"{fx.name}_{i}")
                for i, v in enumerate(vals)]
        node = Node(op, args, [o for o in outs if o is not None], fn, source=fx.format_node())
        node.meta["returns"] = [i for i, o in enumerate(outs) if o is not None]
        self.graph.add(node)
        single = not isinstance(fx.meta.get("val"), (list, tuple))
        self.env[fx] = outs[0] if single else outs


def from_fx(gm: torch.fx.GraphModule, constants: dict[int, torch.Tensor] | None = None
            ) -> Graph:
    """The Graph of an aten-level FX graph; placeholders whose index is in `constants`
    become frozen constants holding those tensors."""
    g = _Builder(gm, constants or {}).build()
    g.verify()
    return g
