"""A compiled graph run on a device that is not the host (OpenCL).

Inputs and outputs stay host torch tensors, as the model's caller has them: each call
uploads the inputs, runs the graph on the device and downloads the outputs. Weights and
other constants are uploaded once. Each node runs its op's own implementation over device
data (tessera/ops/device.py): its kernels are the same kernel-language specializations the
CPU runs, built for the device.

The first call with an input signature runs node by node and records what reached the
device — kernel launches, fills, copies — keeping every buffer it used. Later calls with
that signature write the inputs into the recorded input buffers and replay the commands:
no op implementation, no torch dispatch, only the launches. A recording in which torch
computed on host copies (ops/device.py's round trips) is not replayed: those calls run
node by node every time.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tessera.graph.interpreter import interpret, steps
from tessera.graph.ir import Graph, Value
from tessera.ops import device as ops_device
from tessera.runtime.device import Device
from tessera.runtime.tensor import Tensor, as_tensor

__all__ = ["DeviceRunner"]


@dataclass
class _Plan:
    """One recorded call: its commands, the buffers they use, where inputs go and where
    outputs are."""

    commands: list[tuple[Any, ...]]
    keep: list[Tensor]
    inputs: list[torch.Tensor | None]  # the alias each input was uploaded to
    outputs: list[Any]  # aliases (downloaded after each replay) or Python values

    def run(self, device: Device, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
        for x, alias in zip(inputs, self.inputs, strict=True):
            if alias is not None:
                ops_device.write(device, alias, x.detach())
        ops_device.replay(device, self.commands)
        return tuple(ops_device.download(device, o) if isinstance(o, torch.Tensor) else o
                     for o in self.outputs)


def _on_device(op: str, fn: Callable[[dict[str, Any]], Any]) -> Callable[[dict[str, Any]], Any]:
    """A node function run through the session (host-only ops fall back to the host)."""
    def run(a: dict[str, Any]) -> Any:
        s = ops_device.current()
        assert s is not None
        return s.run(op, fn, a)
    return run


class DeviceRunner:
    """Runs `graph` on `device` (see the module docstring)."""

    MAX_PLANS = 16  # input signatures kept, least recently used dropped first

    def __init__(self, graph: Graph, device: Device, label: str):
        self.graph = graph
        self.device = device
        self.label = label
        self.constants: dict[Value, Any] | None = None  # uploaded on the first call
        self.steps = [(n, _on_device(n.op, fn)) for n, fn in steps(graph)]
        self.plans: collections.OrderedDict[tuple[Any, ...], _Plan | None] = \
            collections.OrderedDict()
        self.calls: collections.Counter[str] = collections.Counter()  # "replay", "record"

    def __call__(self, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
        key = tuple((x.dtype, tuple(x.shape), x.stride()) if isinstance(x, torch.Tensor)
                    else x for x in inputs)
        plan = self.plans.get(key)
        if plan is not None:
            self.plans.move_to_end(key)
            self.calls["replay"] += 1
            return plan.run(self.device, inputs)
        self.calls["record"] += 1
        out, plan = self._record(inputs)
        if key not in self.plans or plan is not None:
            self.plans[key] = plan
            if len(self.plans) > self.MAX_PLANS:
                self.plans.popitem(last=False)
        return out

    def _record(self, inputs: tuple[Any, ...]) -> tuple[tuple[Any, ...], _Plan | None]:
        if self.constants is None:
            self.constants = {v: as_tensor(v.data.detach().contiguous()).to(self.device)
                              if isinstance(v.data, torch.Tensor) else v.data
                              for v in self.graph.constants}
        with ops_device.session(self.device, f"graph {self.label}") as s:
            consts = {v: s.alias(t) if isinstance(t, Tensor) else t
                      for v, t in self.constants.items()}
            ins = [s.upload(x.detach()) if isinstance(x, torch.Tensor) else None
                   for x in inputs]
            outs = interpret(self.graph, [a if a is not None else x
                                          for a, x in zip(ins, inputs, strict=True)],
                             self.steps, constants=consts)
            host = tuple(s.to_host(o) if isinstance(o, torch.Tensor) else o for o in outs)
            plan = None if s.host_calls else _Plan(list(s.commands), list(s.storages.values()),
                                                   ins, list(outs))
        return host, plan
