"""Recording what a graph's nodes launch, so the sequence can be replayed natively.

Every kernel of every op goes through one launcher (runtime/cpu/launch.c), whose hook
sees each call: entry address, grid and argument slots. A TorchDispatchMode sees every
torch call an op makes while it runs: allocations (served by the recording and logged, so
each pointer in a slot can be traced to the buffer it points into), zero-fills (recorded
as memsets), views (free), and anything else — torch computing, or reading data back to
the host — which marks the node as one that must run in Python at every call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tessera.runtime.cpu import launch as cpu_launch

__all__ = ["Alloc", "Launch", "NodeRecord", "Recorder"]

aten = torch.ops.aten
_ALLOC = {aten.empty.memory_format, aten.empty_strided.default, aten.new_empty.default,
          aten.new_empty_strided.default, aten.empty_like.default}
_ZEROS = {aten.zeros.default, aten.new_zeros.default, aten.zeros_like.default}
_ZERO_FILL = {aten.zero_.default}
# torch calls that touch no data (besides views, which `is_view` finds)
_FREE = {aten.detach.default, aten.alias.default, aten.lift_fresh.default,
         aten.resolve_conj.default, aten.resolve_neg.default, aten.is_same_size.default,
         aten.sym_size.int, aten.sym_stride.int, aten.sym_numel.default,
         aten.sym_storage_offset.default}


@dataclass(eq=False)
class Alloc:
    """A buffer an op allocated while recording: `tensor` keeps it alive until planned."""

    index: int
    tensor: torch.Tensor
    node: int

    @property
    def start(self) -> int:
        return self.tensor.data_ptr()

    @property
    def nbytes(self) -> int:
        return self.tensor.untyped_storage().nbytes()


@dataclass
class Launch:
    address: int
    grid: tuple[int, int, int]
    slots: tuple[int | float, ...]
    node: int


@dataclass
class NodeRecord:
    """What one node did: its launches, allocations, status checks, and whether it can be
    replayed (`why`: the torch call that forbids it)."""

    launches: list[Launch] = field(default_factory=list)
    allocs: list[Alloc] = field(default_factory=list)
    checks: list[tuple[int, Any]] = field(default_factory=list)
    why: str | None = None


class Recorder(TorchDispatchMode):
    """`with recorder.node(i):` around each node's execution."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[NodeRecord] = []
        self.allocs: list[Alloc] = []
        self.kept: list[torch.Tensor] = []  # tensors ops made from Python data (constants)
        self.current: NodeRecord | None = None
        self.index = -1

    # -- hooks -------------------------------------------------------------------------
    def launched(self, address: int, g0: int, g1: int, g2: int, *slots: Any) -> None:
        r = self.current
        if r is not None:
            r.launches.append(Launch(address, (g0, g1, g2), slots, self.index))

    def checked(self, address: int, error: Any) -> None:
        if self.current is not None:
            self.current.checks.append((address, error))

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        kwargs = kwargs or {}
        r = self.current
        if r is None:
            return func(*args, **kwargs)
        if func in _ALLOC or func in _ZEROS:
            out = func(*args, **kwargs)
            a = Alloc(len(self.allocs), out, self.index)
            self.allocs.append(a)
            r.allocs.append(a)
            if func in _ZEROS:
                self._memset(out)
            return out
        if func in _ZERO_FILL:
            out = func(*args, **kwargs)
            self._memset(args[0])
            return out
        if func is aten.lift_fresh.default:  # torch.tensor(...): launches may point into it
            self.kept.append(args[0])
            return func(*args, **kwargs)
        if func in _FREE or func.is_view:
            return func(*args, **kwargs)
        if r.why is None:
            r.why = str(func)
        return func(*args, **kwargs)

    def _memset(self, t: torch.Tensor) -> None:
        if not t.is_contiguous():
            if self.current is not None and self.current.why is None:
                self.current.why = "zero-fill of a strided tensor"
            return
        if t.numel():
            self.launched(memset_address(), 1, 1, 1, t.data_ptr(), t.numel() * t.element_size())

    def node(self, index: int) -> _NodeScope:
        return _NodeScope(self, index)


class _NodeScope:
    def __init__(self, rec: Recorder, index: int):
        self.rec, self.index = rec, index

    def __enter__(self) -> NodeRecord:
        r = NodeRecord()
        self.rec.records.append(r)
        self.rec.current, self.rec.index = r, self.index
        cpu_launch.set_recorder(self.rec)
        return r

    def __exit__(self, *exc: Any) -> None:
        cpu_launch.set_recorder(None)
        self.rec.current, self.rec.index = None, -1


def memset_address() -> int:
    from tessera.graph.replay import builtins
    return builtins()["memset"]
