"""The graph IR: nodes are operators of the registry (or, where Tessera has no lowering,
torch callables run at a graph boundary) with their attributes; values are tensors with a
dtype and a shape whose dims are ints or symbols ("s0"). A graph is a straight-line
program: inputs, constants (frozen weights), nodes in execution order, outputs."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from tessera.errors import TesseraError

__all__ = ["Graph", "GraphError", "Node", "Value"]

Dim = int | str


class GraphError(TesseraError):
    """A graph that breaks the IR's rules (see Graph.verify), or one that cannot be built."""


@dataclass(eq=False)
class Value:
    """One tensor of the program. `kind`: "input" (an argument of the compiled function),
    "const" (a frozen tensor, held in `data`) or "node" (an output of `producer`).
    `origin`: the value of the source FX graph this one equals ("name", or "name[i]" for
    element i of a node's tuple result; "" if none): what eager computes for it, which
    passes keep when they replace the node that computes it (tessera.tools.compare)."""

    name: str
    dtype: torch.dtype
    shape: tuple[Dim, ...]
    kind: str = "node"
    producer: Node | None = None
    data: torch.Tensor | None = None
    origin: str = ""

    def __repr__(self) -> str:
        dims = ", ".join(map(str, self.shape))
        return f"%{self.name}: {str(self.dtype).removeprefix('torch.')}[{dims}]"

    @property
    def symbolic(self) -> bool:
        return any(isinstance(d, str) for d in self.shape)


@dataclass(eq=False)
class Node:
    """One operator call. `op` is a registry op name, "view:<name>" for a torch view (no
    data moves), "torch:<name>" for a fallback or "fused:<name>" for a generated kernel
    (fusion.py); those three call `fn` with `args` = {"args": [...], "kwargs": {...}}.
    For registry ops `args` maps the schema's arguments to Values (tensors, lists of
    them) or Python constants (attributes). `outputs` are the results in order.
    `origin`: the names of the FX nodes it stands for (one from the frontend, several after
    patterns and fusion); `where`: the user's source line it came from ("file:line: code",
    "" if unknown), which nodes made from others inherit (see `derive`)."""

    op: str
    args: dict[str, Any]
    outputs: list[Value]
    fn: Callable[..., Any] | None = None
    source: str = ""  # where it came from (the FX node, a pattern), for messages
    meta: dict[str, Any] = field(default_factory=dict)
    origin: list[str] = field(default_factory=list)
    where: str = ""

    def derive(self, nodes: Iterable[Node]) -> Node:
        """Take the origin of `nodes` (the nodes this one replaces, in graph order) and the
        last one's `where` that is known; self, for chaining."""
        nodes = list(nodes)
        self.origin = list(dict.fromkeys(o for n in nodes for o in n.origin))
        self.where = next((n.where for n in reversed(nodes) if n.where), "")
        return self

    @property
    def kind(self) -> str:
        """"op" (a registry op), "view", "torch" (a fallback) or "fused"."""
        prefix = self.op.partition(":")[0]
        return prefix if prefix in ("view", "torch", "fused") else "op"

    def inputs(self) -> Iterator[Value]:
        """The Values the node reads, in argument order."""
        for a in self.args.values():
            yield from _values(a)

    def __repr__(self) -> str:
        outs = ", ".join(map(repr, self.outputs))
        args = ", ".join(f"{k}={_show(v)}" for k, v in self.args.items())
        return f"{outs} = {self.op}({args})"


def _values(a: Any) -> Iterator[Value]:
    if isinstance(a, Value):
        yield a
    elif isinstance(a, (list, tuple)):
        for x in a:
            yield from _values(x)
    elif isinstance(a, dict):  # the kwargs of torch, view and fused nodes
        for x in a.values():
            yield from _values(x)


def _show(a: Any) -> str:
    if isinstance(a, Value):
        return f"%{a.name}"
    if isinstance(a, (list, tuple)) and any(isinstance(x, Value) for x in a):
        return "[" + ", ".join(_show(x) for x in a) + "]"
    return repr(a)


@dataclass(eq=False)
class Graph:
    """A program over Values. Nodes are in an order where every input is computed first."""

    inputs: list[Value] = field(default_factory=list)
    constants: list[Value] = field(default_factory=list)
    nodes: list[Node] = field(default_factory=list)
    outputs: list[Value] = field(default_factory=list)
    _names: set[str] = field(default_factory=set, repr=False)

    def value(self, name: str, dtype: torch.dtype, shape: tuple[Dim, ...], kind: str = "node",
              data: torch.Tensor | None = None) -> Value:
        """A new Value with a name unique in this graph (a suffix is added if needed)."""
        base, i = name, 1
        while name in self._names:
            name, i = f"{base}_{i}", i + 1
        self._names.add(name)
        v = Value(name, dtype, tuple(shape), kind, None, data)
        if kind == "input":
            self.inputs.append(v)
        elif kind == "const":
            self.constants.append(v)
        return v

    def add(self, node: Node) -> Node:
        for v in node.outputs:
            v.producer = node
        self.nodes.append(node)
        return node

    def users(self) -> dict[Value, list[Node]]:
        """For every Value, the nodes that read it (in order)."""
        users: dict[Value, list[Node]] = {v: [] for v in (*self.inputs, *self.constants)}
        for n in self.nodes:
            for v in n.outputs:
                users.setdefault(v, [])
            for v in n.inputs():
                users.setdefault(v, []).append(n)
        return users

    def verify(self) -> None:
        """Check the IR's rules: every Value read is defined before its use and defined
        once, constants hold data of their dtype and shape, registry ops exist and get
        exactly their schema's arguments, outputs are defined. Raises GraphError."""
        from tessera.ops import registry

        defined: set[Value] = set()
        for v in self.inputs:
            if v.kind != "input":
                raise GraphError(f"input %{v.name} has kind {v.kind!r}")
            defined.add(v)
        for v in self.constants:
            if v.kind != "const" or v.data is None:
                raise GraphError(f"constant %{v.name} holds no tensor")
            if v.data.dtype != v.dtype or tuple(v.data.shape) != v.shape:
                raise GraphError(f"constant %{v.name} is declared {v!r} but holds "
                                 f"{v.data.dtype}{list(v.data.shape)}")
            defined.add(v)
        for i, n in enumerate(self.nodes):
            where = f"node {i} ({n!r})"
            for v in n.inputs():
                if v not in defined:
                    raise GraphError(f"{where} reads %{v.name} before it is defined")
            if n.kind != "op":
                if n.fn is None or set(n.args) != {"args", "kwargs"}:
                    raise GraphError(f"{where} is a {n.kind} call without a callable or "
                                     "without args and kwargs")
            else:
                d = registry.get(n.op)
                names = [a.name for a in d.args]
                extra = set(n.args) - set(names)
                missing = [a.name for a in d.args
                           if a.default is a.REQUIRED and a.name not in n.args]
                if extra or missing:
                    raise GraphError(f"{where}: op {n.op} takes ({', '.join(names)}); "
                                     f"unknown {sorted(extra)}, missing {missing}")
            for v in n.outputs:
                if v in defined:
                    raise GraphError(f"{where} defines %{v.name} a second time")
                if v.producer is not n:
                    raise GraphError(f"{where}: %{v.name} names another producer")
                defined.add(v)
        for v in self.outputs:
            if v not in defined:
                raise GraphError(f"graph output %{v.name} is never defined")

    def __str__(self) -> str:
        lines = ["graph(" + ", ".join(map(repr, self.inputs)) + "):"]
        lines += [f"    const {c!r}" for c in self.constants]
        lines += [f"    {n!r}" for n in self.nodes]
        lines.append("    return " + ", ".join(f"%{v.name}" for v in self.outputs))
        return "\n".join(lines)
