"""Running a Graph node by node in Python: the reference executor (and the one behind
`TESSERA_EXECUTOR=python`, for debugging). Registry ops run their eager implementation;
views and fallbacks call torch."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from tessera.errors import TesseraError
from tessera.graph.ir import Graph, Node, Value
from tessera.ops import registry

__all__ = ["call_node", "interpret", "resolve", "steps"]


def resolve(a: Any, env: dict[Value, Any]) -> Any:
    """`a` with the Values in it replaced by theirs in `env`."""
    if isinstance(a, Value):
        return env[a]
    if isinstance(a, (list, tuple)):
        return type(a)(resolve(x, env) for x in a)
    if isinstance(a, dict):
        return {k: resolve(v, env) for k, v in a.items()}
    return a


def node_function(node: Node) -> Callable[[dict[str, Any]], Any]:
    """A function of the node's resolved arguments that runs it."""
    if node.fn is not None:
        fn = node.fn
        return lambda a: fn(*a["args"], **a["kwargs"])
    d = registry.get(node.op)
    positional = [a.name for a in d.args if not a.kwarg_only]
    keywords = [a.name for a in d.args if a.kwarg_only]
    impl = d.impl

    def run(a: dict[str, Any]) -> Any:
        return impl(*(a[n] for n in positional if n in a),
                    **{n: a[n] for n in keywords if n in a})
    return run


def call_node(node: Node, env: dict[Value, Any], fn: Callable[[dict[str, Any]], Any]
              ) -> None:
    """Run `node` on the values in `env` and put its outputs there."""
    try:
        result = fn(resolve(node.args, env))
    except TesseraError as e:
        message = f"{e.message} (in graph node {node!r}, from: {node.source})"
        try:  # the same error class, naming the node; a class with other arguments as is
            raised = type(e)(message, hint=e.hint)
        except TypeError:
            raise e from None
        raise raised from e
    returns = node.meta.get("returns", [0])
    if len(node.outputs) == 1 and returns == [0] and not isinstance(result, (tuple, list)):
        env[node.outputs[0]] = result
        return
    for v, i in zip(node.outputs, returns, strict=True):
        env[v] = result[i]


def steps(graph: Graph) -> Iterator[tuple[Node, Callable[[dict[str, Any]], Any]]]:
    for n in graph.nodes:
        yield n, node_function(n)


def interpret(graph: Graph, inputs: list[Any],
              plan: list[tuple[Node, Callable[[dict[str, Any]], Any]]] | None = None, *,
              watch: Callable[[Node, list[Any]], None] | None = None,
              constants: dict[Value, Any] | None = None) -> list[Any]:
    """The graph's outputs for these inputs, running every node in Python. `watch` is
    called after each node with the node and its outputs (what tessera.tools.compare
    checks); `constants` replaces the constants' own data (a device's copies)."""
    env: dict[Value, Any] = dict(constants) if constants is not None else \
        {v: v.data for v in graph.constants}
    env.update(zip(graph.inputs, inputs, strict=True))
    for node, fn in plan if plan is not None else steps(graph):
        call_node(node, env, fn)
        if watch is not None:
            watch(node, [env[v] for v in node.outputs])
    return [env[v] for v in graph.outputs]


def check_inputs(graph: Graph, inputs: list[Any]) -> None:
    if len(inputs) != len(graph.inputs):
        raise TesseraError(f"the compiled graph takes {len(graph.inputs)} inputs, got "
                           f"{len(inputs)}")
    for v, x in zip(graph.inputs, inputs, strict=True):
        if v.shape == () and v.dtype == torch.int64 and isinstance(x, int):
            continue
        if not isinstance(x, torch.Tensor) or x.dtype != v.dtype:
            raise TesseraError(f"input %{v.name} must be a {v!r} tensor, got "
                               f"{getattr(x, 'dtype', type(x).__name__)}")
