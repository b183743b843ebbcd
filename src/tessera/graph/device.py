"""A compiled graph run on a device that is not the host (OpenCL).

Inputs and outputs stay host torch tensors, as the model's caller has them: each call
uploads the inputs, runs the graph on the device and downloads the outputs. Weights and
other constants are uploaded once. Each node runs its op's own implementation over device
data (tessera/ops/device.py): its kernels are the same kernel-language specializations the
CPU runs, built for the device.

The first call with an input signature runs node by node and records what each node sent
to the device — kernel launches, fills, copies, flag checks — keeping every buffer the
call used. Later calls with that signature write the inputs into the recorded input
buffers and replay the commands: no op implementation and no torch dispatch, only the
launches. A node that computed on the host (a torch fallback, a host-only op: ops/device.py's
round trips) is run again in Python at its place in the replay, its results written into
the buffers its consumers were recorded reading.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tessera.graph.interpreter import call_node, resolve, steps
from tessera.graph.ir import Graph, Node, Value
from tessera.ops import device as ops_device
from tessera.runtime.device import Device
from tessera.runtime.tensor import Tensor, as_tensor

__all__ = ["DeviceRunner"]

Step = Callable[[dict[str, Any]], Any]


@dataclass
class _HostStep:
    """A node run in Python at each replay: its recorded arguments and output buffers."""

    node: Node
    fn: Step
    args: Any  # the node's arguments with Values resolved to the recorded aliases
    outputs: list[Any]


@dataclass
class _Plan:
    """One recorded call: device command segments and host steps in order, the buffers
    they use, where the inputs go and where the outputs are."""

    steps: list[list[Callable[[], None]] | _HostStep]  # (device commands, prepared)
    storages: dict[int, Tensor]  # every buffer the recording used, by storage base
    inputs: list[torch.Tensor | None]  # the alias each input was uploaded to
    outputs: list[Any]  # aliases (downloaded after each replay) or Python values
    host_constants: dict[int, torch.Tensor]  # DeviceRunner.host_constants

    def run(self, device: Device, label: str, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
        for x, alias in zip(inputs, self.inputs, strict=True):
            if alias is not None:
                ops_device.write(device, alias, x.detach())
        for step in self.steps:
            if isinstance(step, list):
                for command in step:
                    command()
                continue
            with ops_device.session(device, f"graph {label}") as s:
                s.host_copies = self.host_constants
                s.storages.update(self.storages)  # the step's arguments are aliases of them
                result = step.fn(step.args)
                results = result if isinstance(result, (tuple, list)) else [result]
                for dst, src in zip(step.outputs, results, strict=False):
                    if isinstance(dst, torch.Tensor):
                        ops_device.write(device, dst, s.to_host(src) if s.is_alias(src)
                                         else src)
        return tuple(ops_device.download(device, o) if isinstance(o, torch.Tensor) else o
                     for o in self.outputs)


def _on_device(op: str, fn: Step) -> Step:
    """A registry op's node function, run through the session (host-only ops fall back to
    host copies)."""
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
        # their host data by device storage, for host steps (weights are never downloaded)
        self.host_constants: dict[int, torch.Tensor] = {}
        # views and torch fallbacks directly over the aliases (torch computing there
        # round-trips); ops and generated kernels through the session (host-only ones run
        # on host copies)
        self.steps = [(n, fn if n.op.startswith(("view:", "torch:")) else _on_device(n.op, fn))
                      for n, fn in steps(graph)]
        self.plans: collections.OrderedDict[tuple[Any, ...], _Plan] = \
            collections.OrderedDict()
        self.calls: collections.Counter[str] = collections.Counter()  # "replay", "record"

    def __call__(self, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
        key = tuple((x.dtype, tuple(x.shape), x.stride()) if isinstance(x, torch.Tensor)
                    else x for x in inputs)
        plan = self.plans.get(key)
        if plan is not None:
            self.plans.move_to_end(key)
            self.calls["replay"] += 1
            return plan.run(self.device, self.label, inputs)
        self.calls["record"] += 1
        out, self.plans[key] = self._record(inputs)
        if len(self.plans) > self.MAX_PLANS:
            self.plans.popitem(last=False)
        return out

    def _record(self, inputs: tuple[Any, ...]) -> tuple[tuple[Any, ...], _Plan]:
        if self.constants is None:
            self.constants = {}
            for v in self.graph.constants:
                if not isinstance(v.data, torch.Tensor):
                    self.constants[v] = v.data
                    continue
                host = v.data.detach().contiguous()
                t = self.constants[v] = as_tensor(host).to(self.device)
                self.host_constants[t.data_ptr()] = host.reshape(-1)
        with ops_device.session(self.device, f"graph {self.label}") as s:
            s.host_copies = self.host_constants
            env: dict[Value, Any] = {v: s.alias(t) if isinstance(t, Tensor) else t
                                     for v, t in self.constants.items()}
            ins = [s.upload(x.detach()) if isinstance(x, torch.Tensor) else None
                   for x in inputs]
            env.update(zip(self.graph.inputs, [a if a is not None else x for a, x in
                                               zip(ins, inputs, strict=True)], strict=True))
            plan_steps: list[list[Callable[[], None]] | _HostStep] = []
            for node, fn in self.steps:
                first, host = len(s.commands), s.host_calls
                args = resolve(node.args, env)
                call_node(node, env, fn)
                if s.host_calls == host:
                    plan_steps.append(ops_device.prepare(self.device, s.commands[first:]))
                else:  # computed on the host: run again at each replay
                    plan_steps.append(_HostStep(node, fn, args,
                                                [env[v] for v in node.outputs]))
            outs = [env[v] for v in self.graph.outputs]
            host_outs = tuple(s.to_host(o) if isinstance(o, torch.Tensor) else o
                              for o in outs)
            plan = _Plan(plan_steps, dict(s.storages), ins, outs, self.host_constants)
        return host_outs, plan
