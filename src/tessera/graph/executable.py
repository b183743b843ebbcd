"""The native executable of a graph: one native call per forward.

The first call with a new input signature (shapes, strides, dtypes) runs the graph node by
node under the recorder (record.py), which sees every kernel launch and every buffer the
ops allocate. From that comes a plan: intermediates get offsets in one arena (memplan.py),
buffers that hold graph outputs become fresh per call, and each pointer in a launch's
argument slots becomes a relocation against the arena, an input, an output buffer or a
value computed in Python. Later calls with that signature fill a small table of base
addresses and replay the launches in C (replay.c) without the GIL and without Python per
op. Nodes that cannot be replayed — torch fallbacks that compute, ops that read data back
on the host (`host_reads`) — run in Python between native segments.

Every new plan is checked once against the recorded run before it is used; a plan that
disagrees is dropped (with a warning) and that signature runs on the interpreter.

A graph with symbolic sizes also gets one generic plan, recorded on the second distinct
signature it sees: the nodes whose work depends on the sizes that changed (a growing KV
cache's length) run from Python, everything else replays, so decode steps whose shapes
never repeat still run natively. Guards on each call (the sizes that did not change, the
layout of every tensor a native launch touches) send a call the plan does not fit to the
interpreter.

Profiling (runtime/profiling.py): while a profile is active, each call is a "graph" event
(args: the graph's `label`, how it ran); native segments replay through replay.c's build
with per-launch timers, giving one "kernel" event per launch and one "op" event per node
(args: graph label, node index in `graph.nodes`, op, and the node's tensor shapes); nodes
run in Python are "op" events too, and the kernels they launch carry the same args. The
arena of a plan made during a profile and each call's output buffers are memory events.
With no profile active, a call costs one check more.
"""

from __future__ import annotations

import bisect
import collections
import functools
import hashlib
import logging
import math
import re
import struct
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tessera.errors import TesseraError
from tessera.graph import memplan
from tessera.graph.device import DeviceRunner
from tessera.graph.interpreter import call_node, check_inputs, interpret, node_function, resolve
from tessera.graph.ir import Graph, Node, Value
from tessera.graph.record import Alloc, Recorder
from tessera.graph.replay import native, profiled
from tessera.ops import _fastpath, registry
from tessera.runtime import profiling
from tessera.runtime.cpu import launch as cpu_launch
from tessera.runtime.device import Device
from tessera.runtime.device import device as _device

__all__ = ["Executable", "PlanError"]


# Slot values in this range are taken for addresses (user space above 4 GiB): sizes and
# strides never get there, and an address below it is refused nowhere worse than here.
_POINTER_LO, _POINTER_HI = 1 << 32, 1 << 47


class PlanError(TesseraError):
    """A recording that cannot be turned into a replayable plan (the graph then runs on
    the interpreter for that input signature)."""


class _Miss(Exception):
    """A call a generic plan does not fit (a tensor a native launch reads has another
    layout than when recorded): the call runs on the interpreter instead."""


def signature(inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    """What a plan depends on: every input's dtype, shape, strides and storage offset (and
    the value of int inputs)."""
    return tuple(_layout(x) if isinstance(x, torch.Tensor) else x for x in inputs)


# where a tensor lives: base kind ("arena", "out", "input", "ext", "const"), base id,
# byte offset from the base's address, shape, strides, dtype
Location = tuple[str, Any, int, tuple[int, ...], tuple[int, ...], torch.dtype]


@dataclass
class _Step:
    """A native segment (launches [first, last)) or one node run from Python."""

    first: int = 0
    last: int = 0
    checks: list[tuple[int, int]] = field(default_factory=list)  # (base, byte offset)
    errors: list[Callable[[], Exception]] = field(default_factory=list)
    node: Node | None = None
    index: int = -1  # the node's in graph.nodes
    fn: Callable[[dict[str, Any]], Any] | None = None
    reads: list[tuple[Value, Location]] = field(default_factory=list)
    exts: list[tuple[Value, int]] = field(default_factory=list)  # outputs -> their base


class _Plan:
    """The replayable form of one recording."""

    def __init__(self, graph: Graph, rec: Recorder, env: dict[Value, Any],
                 inputs: tuple[Any, ...], plan_steps: list[tuple[Node, Any]],
                 varying: frozenset[str] | None = None, label: str = "") -> None:
        """`varying`: for a generic plan, the symbols whose sizes change between calls;
        `label`: the executable's (a profile's events name the graph by it)."""
        self.graph = graph
        self.label = label
        self.kept = rec.kept  # constants ops made while recording: launches point into them
        variant = _variant(plan_steps, env, varying) if varying is not None else set()
        replayable = [r.why is None and not _host_reads(n, env) and not _data_dependent(n)
                      and i not in variant
                      for i, ((n, _), r) in enumerate(zip(plan_steps, rec.records,
                                                          strict=True))]
        # bases: 0 arena, 1 status words, then inputs, output buffers, Python-made values
        self.n_inputs = len(inputs)
        arena_allocs = [a for a in rec.allocs if replayable[a.node]]
        exts: dict[Value, int] = {}
        python_made = {v: None for i, (n, _) in enumerate(plan_steps) if not replayable[i]
                       for v in n.outputs}
        ranges = _Ranges()
        for a in arena_allocs:
            ranges.add(a.start, a.start + a.nbytes, ("alloc", a))
        for k, x in enumerate(inputs):
            if isinstance(x, torch.Tensor):
                start = x.untyped_storage().data_ptr()
                ranges.add(start, start + x.untyped_storage().nbytes(), ("input", k))
        for v in python_made:
            t = env.get(v)
            if isinstance(t, torch.Tensor):
                exts[v] = len(exts)
                ranges.add(t.data_ptr(), t.data_ptr() + _extent(t), ("ext", v))
        constants = {v.data.untyped_storage().data_ptr() for v in graph.constants}
        lasting = _Ranges()  # memory that outlives the plan: constants, lifted tensors
        for t in [*(v.data for v in graph.constants), *rec.kept]:
            start = t.untyped_storage().data_ptr()
            lasting.add(start, start + t.untyped_storage().nbytes(), None)
        for start, nbytes in cpu_launch.lasting_buffers():
            lasting.add(start, start + nbytes, None)
        status_words: dict[int, int] = {}

        # every event (a launch, or a node run in Python) gets a position; allocs a lifetime
        first_use: dict[Alloc, int] = {}
        last_use: dict[Alloc, int] = {}

        def use(a: Alloc, pos: int) -> None:
            first_use[a] = min(first_use.get(a, pos), pos)
            last_use[a] = max(last_use.get(a, pos), pos)

        launches: list[tuple[int, tuple[int, int, int], list[int], list[tuple[int, Any, int]]]] = []
        self.launch_nodes: list[int] = []  # the node index of each launch (for profiles)
        self.steps: list[_Step] = []
        pos = 0
        checked: list[Alloc] = []  # status words in the arena: read when the segment ends
        for i, (node, fn) in enumerate(plan_steps):
            r = rec.records[i]
            if replayable[i]:
                if not self.steps or self.steps[-1].node is not None:
                    self.steps.append(_Step(first=len(launches), last=len(launches)))
                seg = self.steps[-1]
                own_words = {a for a, _ in r.checks if ranges.find(a) is None}
                for lc in r.launches:
                    slots, relocs = [], []
                    for s, value in enumerate(lc.slots):
                        slots.append(_bits(value))
                        if not isinstance(value, int) or isinstance(value, bool):
                            continue
                        hit = ranges.find(value)
                        if hit is None:
                            if _POINTER_LO <= value < _POINTER_HI and value not in own_words \
                                    and lasting.find(value) is None:
                                raise PlanError(
                                    f"node {node!r} gave a kernel an address ({value:#x}) in "
                                    "no buffer the plan knows: memory the op allocated "
                                    "outside torch, which a replay could find freed")
                            continue
                        (kind, what), start = hit
                        if kind == "alloc":
                            use(what, pos)
                        relocs.append((s, (kind, what), value - start))
                    launches.append((lc.address, lc.grid, slots, relocs))
                    self.launch_nodes.append(i)
                    pos += 1
                for address, error in r.checks:
                    hit = ranges.find(address)
                    if hit is None:  # a word of the op's own (thread-local): one of ours
                        word = status_words.setdefault(address, len(status_words))
                        seg.checks.append((("status", word), 0))
                        _redirect(launches, seg.first, address, ("status", word))
                    else:
                        (kind, what), start = hit
                        if kind == "alloc":
                            checked.append(what)
                        seg.checks.append(((kind, what), address - start))
                    seg.errors.append(error)
                seg.last = len(launches)
            else:
                for a in checked:
                    use(a, pos - 1)
                checked.clear()
                step = _Step(node=node, index=i, fn=fn)
                for v in node.inputs():
                    t = env.get(v)
                    if v.kind == "input" or v in python_made:
                        continue  # in the call's env already
                    loc = self._locate(t, ranges, constants) if isinstance(t, torch.Tensor) \
                        else ("const", t, 0, (), (), None)  # constants, and ints of shapes
                    if loc[0] == "alloc":
                        use(loc[1], pos)
                    step.reads.append((v, loc))
                step.exts = [(v, exts[v]) for v in node.outputs if v in exts]
                self.steps.append(step)
                pos += 1
        for a in checked:
            use(a, pos - 1)
        # graph outputs: the buffers holding them are fresh per call
        self.outputs: list[tuple[Value, Location]] = []
        out_allocs: dict[Alloc, int] = {}
        for v in graph.outputs:
            t = env[v]
            loc = ("value", v, 0, (), (), None) if v.kind == "input" or v in python_made else \
                self._locate(t, ranges, constants) if isinstance(t, torch.Tensor) else \
                ("const", t, 0, (), (), None)
            if loc[0] == "alloc":
                out_allocs.setdefault(loc[1], len(out_allocs))
            self.outputs.append((v, loc))
        arena_list = [a for a in arena_allocs if a in first_use and a not in out_allocs]
        self.memory = memplan.plan([memplan.Buffer(a.nbytes, first_use[a], last_use[a])
                                    for a in arena_list])
        offsets = dict(zip(arena_list, self.memory.offsets, strict=True))
        self.out_sizes = [a.nbytes for a in out_allocs]

        # base table: [arena, status words, inputs..., output buffers..., Python values...]
        self.base_out = 2 + self.n_inputs
        self.base_ext = self.base_out + len(out_allocs)
        self.bases = np.zeros(self.base_ext + len(exts), np.int64)

        def base(key: tuple[str, Any]) -> tuple[int, int]:
            """(base index, byte offset of the range's start from that base)."""
            kind, what = key
            if kind == "alloc":
                return (self.base_out + out_allocs[what], 0) if what in out_allocs \
                    else (0, offsets[what])
            if kind == "status":
                return 1, 8 * what
            return (2 + what, 0) if kind == "input" else (self.base_ext + exts[what], 0)

        steps_arr: list[list[int]] = []
        slots_arr: list[int] = []
        relocs_arr: list[list[int]] = []
        for address, grid, slots, relocs in launches:
            steps_arr.append([address, *grid, len(slots_arr), len(slots), len(relocs_arr),
                              len(relocs)])
            for s, key, off in relocs:
                b, at = base(key)
                relocs_arr.append([s, b, at + off])
            slots_arr += slots
        # a generic plan's guards: the layout of every tensor its launches point into
        touched = {key for *_, relocs in launches for _, key, _ in relocs}
        self.input_layouts = [(k, _layout(inputs[k])) for kind, k in sorted(
            {key for key in touched if key[0] == "input"}, key=lambda key: key[1])]
        self.ext_layouts = {self.base_ext + exts[v]: _layout(env[v])
                            for kind, v in touched if kind == "ext"}
        self.pins = _pins(graph, inputs, varying) if varying is not None else []
        self.generic = varying is not None
        self.steps_arr = np.array(steps_arr or [[0] * 8], np.int64).reshape(-1, 8)
        self.slots_arr = np.array(slots_arr or [0], np.int64)
        self.relocs_arr = np.array(relocs_arr or [[0, 0, 0]], np.int64).reshape(-1, 3)
        for step in self.steps:
            if step.node is None:
                step.check_arr = np.array([[base(k)[0], base(k)[1] + off]
                                           for k, off in step.checks] or [[0, 0]],
                                          np.int64).reshape(-1, 2)
            else:
                step.reads = [(v, _rebase(loc, base)) for v, loc in step.reads]
                step.exts = [(v, self.base_ext + k) for v, k in step.exts]
        self.outputs = [(v, _rebase(loc, base)) for v, loc in self.outputs]
        self.arena = torch.empty(max(self.memory.arena_bytes, memplan.ALIGN), dtype=torch.uint8)
        # what a profile says of each replayed node: its op and tensor shapes when recorded
        self.node_args = {i: {"op": plan_steps[i][0].op, **_shapes(
            [env.get(v) for v in plan_steps[i][0].inputs()],
            [env.get(v) for v in plan_steps[i][0].outputs]),
            "params": profiling.scalars(plan_steps[i][0].args)} for i in set(self.launch_nodes)}
        if profiling.active is not None:
            t = profiling.now()
            profiling.active.memory("graph arenas", "arena", self.arena.numel(), t, t,
                                    {"graph": label,
                                     "plan": "generic" if varying is not None else "own"})
        self.status = np.zeros(max(len(status_words), 1), np.int64)
        self.bases[0] = self.arena.data_ptr()
        self.bases[1] = self.status.ctypes.data
        self.lock = threading.Lock()
        self._prepare()

    @staticmethod
    def _locate(t: torch.Tensor, ranges: _Ranges, constants: set[int]) -> Location:
        if t.untyped_storage().data_ptr() in constants or t.numel() == 0:
            return ("const", t, 0, (), (), t.dtype)
        hit = ranges.find(t.data_ptr())
        if hit is None:
            return ("const", t, 0, (), (), t.dtype)  # memory that outlives the plan
        (kind, what), start = hit
        return (kind, what, t.data_ptr() - start, tuple(t.shape), tuple(t.stride()), t.dtype)

    @staticmethod
    def tensor(loc: Location, holders: list[torch.Tensor | None], env: dict[Value, Any]
               ) -> Any:
        """The tensor at `loc` in this call's buffers (`holders`: per base, a tensor whose
        first element is at the base address)."""
        kind, what, off, shape, stride, dtype = loc
        if kind == "const":
            return what
        if kind == "value":
            return env[what]
        holder = holders[what]
        assert holder is not None
        if holder.dtype != dtype:
            holder = holder.view(torch.uint8).view(dtype)
        return torch.as_strided(holder, shape, stride,
                                holder.storage_offset() + off // holder.element_size())

    # -- running -------------------------------------------------------------------------
    def _prepare(self) -> None:
        """Precompute what each call needs: raw addresses, which buffers Python must see,
        and output buffers that are exactly one contiguous output (allocated as it)."""
        self.addresses = (self.steps_arr.ctypes.data, self.slots_arr.ctypes.data,
                          self.relocs_arr.ctypes.data, self.bases.ctypes.data)
        for step in self.steps:
            if step.node is None:
                step.call = (step.first, step.last, step.check_arr.ctypes.data,
                             len(step.checks))
        locs = [loc for _, loc in self.outputs] + [loc for st in self.steps
                                                   for _, loc in st.reads]
        self.holder_inputs = sorted({loc[1] - 2 for loc in locs if loc[0] == "base" and
                                     2 <= loc[1] < self.base_out})
        self.direct: list[tuple[Any, ...] | None] = []
        for k, nbytes in enumerate(self.out_sizes):
            users = [loc for loc in locs if loc[0] == "base" and loc[1] == self.base_out + k]
            loc = users[0] if users else None
            contiguous = loc is not None and loc[2] == 0 and \
                torch.empty(loc[3], dtype=loc[5]).stride() == loc[4] and \
                math.prod(loc[3]) * loc[5].itemsize == nbytes
            self.direct.append((loc[3], loc[5]) if contiguous and all(u == loc for u in users)
                               else None)

    def fits(self, inputs: tuple[Any, ...]) -> bool:
        """Whether a generic plan serves these inputs: the sizes it holds fixed and the
        layouts of the inputs its launches read are the recorded ones."""
        return all(_dim(inputs[k], d) == n for k, d, n in self.pins) and \
            all(_layout(inputs[k]) == want for k, want in self.input_layouts)

    def run(self, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
        session = profiling.active
        label = self.label
        with self.lock:
            bases = self.bases
            holders: list[Any] = [None] * len(bases)
            holders[0] = self.arena
            for k, x in enumerate(inputs):
                if isinstance(x, torch.Tensor):
                    bases[2 + k] = x.untyped_storage().data_ptr()
            for k in self.holder_inputs:
                holders[2 + k] = _flat(inputs[k])
            for k, direct in enumerate(self.direct):
                if direct is not None:
                    buf = torch.empty(direct[0], dtype=direct[1])
                else:
                    buf = torch.empty(-(-max(self.out_sizes[k], 1) // memplan.ALIGN)
                                      * memplan.ALIGN, dtype=torch.uint8)
                bases[self.base_out + k] = buf.data_ptr()
                holders[self.base_out + k] = buf
            if session is not None and self.out_sizes:
                t = profiling.now()
                session.memory("graph outputs", "outputs", sum(
                    holders[self.base_out + k].untyped_storage().nbytes()
                    for k in range(len(self.out_sizes))), t, t, {"graph": label}, count=False)
            env: dict[Value, Any] = dict(zip(self.graph.inputs, inputs, strict=True))
            run = native().run if session is None else self._timed(session, label)
            steps, slots, relocs, base_table = self.addresses
            for step in self.steps:
                if step.node is None:
                    first, last, checks, nchecks = step.call
                    failed = run(steps, first, last, slots, relocs, base_table, checks, nchecks)
                    if failed >= 0:
                        raise step.errors[failed]()
                    continue
                for v, loc in step.reads:
                    env[v] = self.tensor(loc, holders, env)
                call_node(step.node, env, step.fn if session is None else _timed_node(
                    session, label, step.index, step.node, step.fn))
                for v, b in step.exts:
                    t = env[v]
                    if self.generic and b in self.ext_layouts and \
                            _layout(t) != self.ext_layouts[b]:
                        raise _Miss(f"%{v.name} has layout {_layout(t)}")
                    bases[b] = t.data_ptr()
                    holders[b] = t
            return tuple(self._output(loc, holders, env) for _, loc in self.outputs)

    def _timed(self, session: profiling.Session, label: str) -> Callable[..., int]:
        """replay.c's `run` with per-launch timers: each launch a "kernel" event, each
        node's launches an "op" event around them."""
        run = profiled().run

        def timed(steps: int, first: int, last: int, slots: int, relocs: int, bases: int,
                  checks: int, nchecks: int) -> int:
            times = np.zeros(2 * max(last - first, 1), np.int64)
            failed = run(steps, first, last, slots, relocs, bases, checks, nchecks,
                         times.ctypes.data)
            tid = threading.get_ident()
            spans = times.tolist()
            node_start = 0
            for k in range(last - first):
                i = first + k
                node = self.launch_nodes[i]
                info = self.node_args[node]
                args = {"graph": label, "node": node, "op": info["op"]}
                session.events.append(profiling.Event(
                    "kernel", profiling.kernel_name(int(self.steps_arr[i, 0])),
                    spans[2 * k], spans[2 * k + 1], tid, args))
                if i + 1 == last or self.launch_nodes[i + 1] != node:
                    session.events.append(profiling.Event(
                        "op", info["op"], spans[2 * node_start], spans[2 * k + 1], tid,
                        {**args, "inputs": info["inputs"], "outputs": info["outputs"],
                         "params": info["params"]}))
                    node_start = k + 1
            return failed
        return timed

    def _output(self, loc: Location, holders: list[Any], env: dict[Value, Any]) -> Any:
        if loc[0] == "base" and loc[1] >= self.base_out and loc[1] < self.base_ext and \
                self.direct[loc[1] - self.base_out] is not None:
            return holders[loc[1]]
        return self.tensor(loc, holders, env)


_SYMBOL = re.compile(r"[A-Za-z_]\w*")


def _shapes(inputs: Iterable[Any], outputs: Iterable[Any]) -> dict[str, list[Any]]:
    """The (shape, dtype) of each tensor read and made, as a profile's op events give."""
    return {"inputs": profiling.describe(inputs), "outputs": profiling.describe(outputs)}


def _timed_node(session: profiling.Session, label: str, index: int, node: Node,
                fn: Callable[[dict[str, Any]], Any]) -> Callable[[dict[str, Any]], Any]:
    """`fn` (node `index` run in Python) reporting itself as an "op" event; the kernels it
    launches carry the graph, node and op."""
    args = {"graph": label, "node": index, "op": node.op}

    def run(a: dict[str, Any]) -> Any:
        with session.scope(args):
            t0 = profiling.now()
            out = fn(a)
            t1 = profiling.now()
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        session.record("op", node.op, t0, t1, {**args, **_shapes(list(_leaves(a)), outs),
                                               "params": profiling.scalars(node.args)})
        return out
    return run


def _leaves(a: Any) -> Iterator[Any]:
    """The non-container values in nested dicts, lists and tuples (a node's arguments)."""
    if isinstance(a, dict):
        a = a.values()
    elif not isinstance(a, (list, tuple)):
        yield a
        return
    for x in a:
        yield from _leaves(x)


def _variant(plan_steps: list[tuple[Node, Any]], env: dict[Value, Any],
             varying: frozenset[str]) -> set[int]:
    """Indices of the nodes whose launches may change with the `varying` symbols: they
    read or make a size (a Python int) or a tensor whose shape mentions one of them, or
    read a view a variant node made (its strides may change too)."""
    def varies(v: Value) -> bool:
        return isinstance(env.get(v), int) or any(
            isinstance(d, str) and not varying.isdisjoint(_SYMBOL.findall(d))
            for d in v.shape)

    out: set[int] = set()
    tainted: set[Value] = set()
    for i, (node, _) in enumerate(plan_steps):
        if any(v in tainted or varies(v) for v in node.inputs()) or \
                any(varies(v) for v in node.outputs):
            out.add(i)
            if node.kind == "view":
                tainted.update(node.outputs)
    return out


def bindings(graph: Graph, inputs: tuple[Any, ...]) -> dict[str, int]:
    """The size each plain symbol of the graph's input shapes ("s0") has in `inputs`."""
    out: dict[str, int] = {}
    for v, x in zip(graph.inputs, inputs, strict=True):
        if isinstance(x, torch.Tensor):
            out.update((d, n) for d, n in zip(v.shape, x.shape, strict=True)
                       if isinstance(d, str) and d.isidentifier())
    return out


def _pins(graph: Graph, inputs: tuple[Any, ...], varying: frozenset[str]
          ) -> list[tuple[int, int, int]]:
    """(input, dim, size) of every symbolic input dim a generic plan holds fixed."""
    return [(k, d, x.shape[d]) for k, (v, x) in enumerate(zip(graph.inputs, inputs,
                                                             strict=True))
            if isinstance(x, torch.Tensor)
            for d, s in enumerate(v.shape)
            if isinstance(s, str) and varying.isdisjoint(_SYMBOL.findall(s))]


def _dim(x: Any, d: int) -> int | None:
    return x.shape[d] if isinstance(x, torch.Tensor) and d < x.dim() else None


def _layout(t: Any) -> tuple[Any, ...]:
    return (t.dtype, tuple(t.shape), t.stride(), t.storage_offset()) \
        if isinstance(t, torch.Tensor) else (type(t),)


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A 1-D tensor over all of t's storage (for as_strided views at any offset)."""
    return torch.empty(0, dtype=t.dtype).set_(t.untyped_storage(), 0,
                                              (t.untyped_storage().nbytes() // t.element_size(),))


def _data_ptr(x: torch.Tensor) -> int:
    return x.untyped_storage().data_ptr()


def _extent(t: torch.Tensor) -> int:
    """Bytes from t's first element to just past its last."""
    if t.numel() == 0:
        return 0
    return (sum((n - 1) * st for n, st in zip(t.shape, t.stride(), strict=True)) + 1) \
        * t.element_size()


def _rebase(loc: Location, base: Callable[[tuple[str, Any]], tuple[int, int]]) -> Location:
    """A location against the base table: ("base", index, byte offset, ...)."""
    kind, what, off, shape, stride, dtype = loc
    if kind in ("const", "value"):
        return loc
    b, at = base((kind, what))
    return ("base", b, at + off, shape, stride, dtype)


def _bits(value: Any) -> int:
    if isinstance(value, float):
        return struct.unpack("<q", struct.pack("<d", value))[0]
    return int(value)


def _data_dependent(node: Node) -> bool:
    """Whether a value the node reads or makes has a size that depends on data (an
    unbacked symbol, "u0", from nonzero or a one-argument where): its launches differ from
    call to call even when the inputs' shapes do not."""
    return any(isinstance(d, str) and d.lstrip("-").startswith("u")
               for v in (*node.inputs(), *node.outputs) for d in v.shape)


def _host_reads(node: Node, env: dict[Value, Any]) -> bool:
    """Whether the node's op read data on the host for the values it had in `env`."""
    if node.kind != "op":
        return False
    reads = registry.get(node.op).host_reads
    return reads(**resolve(node.args, env)) if callable(reads) else reads


def _redirect(launches: list[Any], first: int, address: int, key: tuple[str, Any]) -> None:
    """Slots of launches[first:] holding `address` become relocations against `key`."""
    for _, _, slots, relocs in launches[first:]:
        for s, bits in enumerate(slots):
            if bits == address and not any(r[0] == s for r in relocs):
                relocs.append((s, key, 0))


class _Ranges:
    """Address ranges [start, end] -> what lives there; lookups by bisection."""

    def __init__(self) -> None:
        self.items: list[tuple[int, int, Any]] = []
        self.starts: list[int] = []
        self.sorted = True

    def add(self, start: int, end: int, what: Any) -> None:
        self.items.append((start, end, what))
        self.sorted = False

    def find(self, address: int) -> tuple[Any, int] | None:
        """(what, its start) of the innermost range holding address (the one starting
        last: a view inside a buffer wins over the buffer)."""
        if not self.sorted:
            self.items.sort(key=lambda r: r[0])
            self.starts = [r[0] for r in self.items]
            self.sorted = True
        for j in range(bisect.bisect_right(self.starts, address) - 1, -1, -1):
            start, end, what = self.items[j]
            if address <= end:
                return what, start
        return None


class Executable:
    """A compiled graph: call it with the graph's inputs, get its outputs (a tuple).
    `native=False`: every call runs node by node in Python (for debugging)."""

    RECORD_AT = 2  # the call of a signature that records its own plan (recording costs
    # about two runs; shapes seen once, like a growing KV cache's, take the generic plan)
    RECORD_OVER_GENERIC = 4  # ... once a generic plan serves it (each plan has an arena)
    MAX_PLANS = 64  # per executable, least recently used dropped first
    MAX_SEEN = 1024  # signatures counted towards RECORD_AT, least recent forgotten first
    MAX_MISSES = 8  # calls a generic plan may turn away before it is dropped

    def __init__(self, graph: Graph, native: bool = True,
                 reference: Executable | None = None, device: Device | None = None) -> None:
        self.graph = graph
        self.device = device if device is not None else _device("cpu")
        # off the host the graph runs through its device runner (graph/device.py)
        self.runner = None if self.device.is_host else DeviceRunner(graph, self.device,
                                                                    self.label)
        self.native = native
        self.reference = reference  # the float graph of a quantized one, until compared
        self.quantization: dict[str, float] | None = None
        self.plan_steps = [(n, node_function(n)) for n in graph.nodes]
        self.plans: collections.OrderedDict[tuple[Any, ...], _Plan | None] = \
            collections.OrderedDict()
        self.seen: collections.OrderedDict[tuple[Any, ...], int] = collections.OrderedDict()
        self.recordings = 0  # input signatures recorded
        self.symbolic = any(v.symbolic for v in graph.inputs)
        self.first: dict[str, int] | None = None  # the first call's sizes of the symbols
        self.generic: _Plan | None = None
        self.misses = 0  # calls the generic plan did not fit
        # calls by how they ran: "plan", "generic", "record", "interpreter", "device"
        self.calls: collections.Counter[str] = collections.Counter()

    @functools.cached_property
    def label(self) -> str:
        """A short hash of the graph's text (ops, shapes, arguments): the same graph gets the
        same label in every process; a profile's events name graphs by it."""
        text = re.sub(r"0x[0-9a-f]+", "", str(self.graph))  # object reprs' addresses
        return "g" + hashlib.sha256(text.encode()).hexdigest()[:10]

    def __call__(self, *inputs: Any) -> tuple[Any, ...]:
        if profiling.active is not None:
            return self._profiled(inputs)
        return self._call(inputs)

    def _profiled(self, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
        """A call as one "graph" event, saying how it ran (plan, generic, record,
        interpreter)."""
        session = profiling.active
        assert session is not None
        before = collections.Counter(self.calls)
        t0 = profiling.now()
        out = self._call(inputs)
        t1 = profiling.now()
        how = sorted((self.calls - before).keys())
        session.record("graph", f"graph {self.label}", t0, t1, {
            "graph": self.label, "nodes": len(self.graph.nodes), "ran": ",".join(how)})
        return out

    def _steps(self) -> list[tuple[Node, Callable[[dict[str, Any]], Any]]]:
        """The node functions, reporting each node while a profile is active."""
        session = profiling.active
        if session is None:
            return self.plan_steps
        return [(n, _timed_node(session, self.label, i, n, fn))
                for i, (n, fn) in enumerate(self.plan_steps)]

    def _call(self, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
        if self.reference is not None:
            return self._compare(inputs)
        if self.runner is not None:
            check_inputs(self.graph, list(inputs))
            self.calls["device"] += 1
            return self.runner(inputs)
        key = signature(inputs) if self.native else None
        plan = self.plans.get(key, False) if key is not None else None
        if plan:
            self.plans.move_to_end(key)
            self.calls["plan"] += 1
            return plan.run(inputs)
        if plan is False and key is not None:
            seen = self.seen.pop(key, 0) + 1
            if seen >= (self.RECORD_AT if self.generic is None else self.RECORD_OVER_GENERIC):
                return self._record(inputs, key)
            self.seen[key] = seen
            if len(self.seen) > self.MAX_SEEN:
                self.seen.popitem(last=False)
            generic = self._generic(inputs, key)
            if generic is not None:
                return generic
        check_inputs(self.graph, list(inputs))
        self.calls["interpreter"] += 1
        return tuple(interpret(self.graph, list(inputs), self._steps()))

    def _generic(self, inputs: tuple[Any, ...], key: tuple[Any, ...]
                 ) -> tuple[Any, ...] | None:
        """The outputs from the generic plan, recording it on the second distinct
        signature of a symbolic graph; None where it does not serve these inputs."""
        if not self.symbolic or self.misses >= self.MAX_MISSES:
            return None
        if self.generic is None:
            if self.first is None:
                self.first = bindings(self.graph, inputs)
                return None
            now = bindings(self.graph, inputs)
            symbols = {t for v in self.graph.inputs for d in v.shape if isinstance(d, str)
                       for t in _SYMBOL.findall(d)}
            varying = frozenset(t for t in symbols if now.get(t, -1) != self.first.get(t))
            return self._record(inputs, key, varying)
        if self.generic.fits(inputs):
            check_inputs(self.graph, list(inputs))
            try:
                outputs = self.generic.run(inputs)
                self.calls["generic"] += 1
                return outputs
            except _Miss:
                pass
        self.misses += 1
        return None

    def _compare(self, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
        """The first call of a quantized graph: its outputs against the float graph's,
        reported in `quantization` and logged."""
        reference, self.reference = self.reference, None
        want, got = reference(*inputs), self(*inputs)
        pairs = [(w.double().flatten(), g.double().flatten())
                 for w, g in zip(want, got, strict=True)
                 if isinstance(w, torch.Tensor) and w.is_floating_point() and w.numel()]
        if pairs:
            w, g = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
            self.quantization = {
                "max_abs_error": float((w - g).abs().max()),
                "rel_error": float((w - g).norm() / w.norm().clamp_min(1e-30)),
                "cosine": float(torch.nn.functional.cosine_similarity(w, g, dim=0))}
            logging.getLogger("tessera.graph").info(
                "quantized graph against float: %s", ", ".join(
                    f"{k} {v:.3g}" for k, v in self.quantization.items()))
        return got

    def _record(self, inputs: tuple[Any, ...], key: tuple[Any, ...],
                varying: frozenset[str] | None = None) -> tuple[Any, ...]:
        """Run once under the recorder and plan: this signature's own plan, or with
        `varying`, the generic plan."""
        check_inputs(self.graph, list(inputs))
        self.recordings += 1
        self.calls["record"] += 1
        rec = Recorder()
        env: dict[Value, Any] = {v: v.data for v in self.graph.constants}
        env.update(zip(self.graph.inputs, inputs, strict=True))
        with _fastpath.suspended(), rec:
            for i, (node, fn) in enumerate(self._steps()):
                with rec.node(i):
                    call_node(node, env, fn)
        outputs = tuple(env[v] for v in self.graph.outputs)
        try:
            plan = _Plan(self.graph, rec, env, inputs, self.plan_steps, varying, self.label)
            again = plan.run(inputs)
            for want, got in zip(outputs, again, strict=True):
                if isinstance(want, torch.Tensor):
                    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
        except (PlanError, AssertionError, _Miss) as e:
            which = "generic plan" if varying is not None else f"plan for inputs {key}"
            warnings.warn(f"tessera: the native {which} of this graph did not reproduce the "
                          f"recorded run, so it runs node by node: {e}", stacklevel=4)
            plan = None
        if varying is not None:
            self.generic = plan
            self.misses += plan is None and self.MAX_MISSES
            return outputs
        self.plans[key] = plan
        if len(self.plans) > self.MAX_PLANS:
            self.plans.popitem(last=False)
        return outputs
