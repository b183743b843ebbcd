"""The graph compiler: torch models -> graph IR -> passes -> one native executable.

`torch.compile(model, backend="tessera")` needs no import (an entry point registers it)."""

from __future__ import annotations

from tessera.graph.backend import tessera as backend
from tessera.graph.compiler import compiled
from tessera.graph.ir import Graph, GraphError, Node, Value
from tessera.graph.patterns import pattern

__all__ = ["Graph", "GraphError", "Node", "Value", "backend", "compiled", "pattern"]
