"""`tessera.compile(model, example_inputs)`: ahead-of-time compilation through torch.export,
whose result runs, saves (`.save(path)`) and loads in another process (`tessera.load`)
without tracing or compiling again (kernels come from the compile cache). `executables`
finds the executables behind a compiled model (either kind)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree

from tessera.errors import TesseraError
from tessera.graph import moe
from tessera.graph.backend import decompositions
from tessera.graph.compiler import compile_graph, compiled
from tessera.graph.executable import Executable
from tessera.graph.frontend import from_fx
from tessera.graph.serialize import from_data, to_data

__all__ = ["CompiledModel", "compile", "executables", "load"]


class CompiledModel:
    """A compiled model: call it as the model was called (tensors, positionally)."""

    def __init__(self, source: dict[str, Any], out_spec: pytree.TreeSpec,
                 options: dict[str, Any]) -> None:
        self.source = source  # the lowered graph before passes, as plain data (`save`)
        self.out_spec, self.options = out_spec, options
        self.executable = compile_graph(from_data(source), options)

    @property
    def graph(self) -> Any:
        return self.executable.graph

    def __call__(self, *args: torch.Tensor) -> Any:
        flat = pytree.tree_leaves(args)
        if len(flat) != len(self.graph.inputs):
            raise TesseraError(f"the compiled model takes {len(self.graph.inputs)} tensor "
                               f"inputs, got {len(flat)}")
        return pytree.tree_unflatten(list(self.executable(*flat)), self.out_spec)

    def save(self, path: str | Path) -> None:
        """Write the graph, its frozen weights and options to `path` (a torch.save file
        that `tessera.load` reads with weights_only=True)."""
        torch.save({"graph": self.source,
                    "out_spec": pytree.treespec_dumps(self.out_spec),
                    "options": self.options}, str(path))


def compile(model: torch.nn.Module, example_inputs: Sequence[Any], *,
            dynamic: dict[str, Any] | Sequence[Any] | None = None,
            options: dict[str, Any] | None = None) -> CompiledModel:
    """Export `model` with torch.export at `example_inputs` (`dynamic`: torch.export's
    dynamic_shapes, e.g. {"x": {1: torch.export.Dim("seq")}}), freeze its parameters and
    buffers, and compile the graph for inference."""
    if not isinstance(model, torch.nn.Module):
        raise TesseraError(f"tessera.compile takes a torch.nn.Module, got {type(model).__name__}")
    try:
        with torch.no_grad(), moe.exporting(model, options):
            ep = torch.export.export(model, tuple(example_inputs), dynamic_shapes=dynamic)
            ep = ep.run_decompositions(decompositions())
    except Exception as e:  # torch's own errors say what in the model did not export
        raise TesseraError(f"torch.export could not capture the model: {e}",
                           hint="torch.compile(model, backend='tessera') handles graph "
                                "breaks; tessera.compile needs one exportable graph") from e
    from torch.export.graph_signature import InputKind
    state = {**ep.state_dict, **ep.constants}
    frozen = {i: state[spec.target].detach() for i, spec in
              enumerate(ep.graph_signature.input_specs) if spec.kind != InputKind.USER_INPUT}
    source = to_data(from_fx(ep.graph_module, frozen))
    return CompiledModel(source, ep.call_spec.out_spec, dict(options or {}))


def load(path: str | Path) -> CompiledModel:
    """A model `CompiledModel.save` wrote; runs without tracing or compiling again."""
    try:
        data = torch.load(str(path), weights_only=True)
    except Exception as e:
        raise TesseraError(f"{path} is not a saved Tessera model: {e}") from e
    return CompiledModel(data["graph"], pytree.treespec_loads(data["out_spec"]),
                         data["options"])


def executables(model: CompiledModel | torch.nn.Module) -> list[Executable]:
    """The live executables of a compiled model: a `CompiledModel`'s, or those
    torch.compile(backend="tessera") made for a module (or its compiled wrapper) so far,
    found by the parameters and buffers they froze; oldest first."""
    if isinstance(model, CompiledModel):
        return [model.executable]
    if not isinstance(model, torch.nn.Module):
        raise TesseraError(f"executables() takes a compiled model or a torch.nn.Module, got "
                           f"{type(model).__name__}")
    storages = {t.untyped_storage().data_ptr()
                for t in (*model.parameters(), *model.buffers()) if t.numel()}
    found = [ex for ex in compiled() if any(
        c.data is not None and c.data.numel() and c.data.untyped_storage().data_ptr() in storages
        for c in ex.graph.constants)]
    if not found:
        raise TesseraError(f"no live Tessera executable froze the weights of this "
                           f"{type(model).__name__}",
                           hint="call the torch.compile(model, backend='tessera') module "
                                "once first (it compiles on its first call)")
    return found
