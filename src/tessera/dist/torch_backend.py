"""The `tessera` torch.distributed backend: existing torch code on Tessera's communicator.

    import tessera.dist.torch_backend  # or `import tessera.dist`: registers "tessera"
    torch.distributed.init_process_group("tessera")   # torchrun (env://), tcp://, or a store

Importing this module registers the name with `torch.distributed.Backend.register_backend`
(CPU tensors only). For every process group torch builds on it, the default one and each
`new_group`, torch calls `_create` with that group's own prefixed store, group rank, group
size and timeout; it returns a `TesseraProcessGroup` that owns one `tessera.dist`
Communicator bootstrapped from that store.

Why a Python `ProcessGroup` subclass: torch 2.13's `torch._C._distributed_c10d.Backend` has
no Python constructor, while `ProcessGroup` has a pybind trampoline (`PyProcessGroup`), so a
creator that returns a `ProcessGroup` subclass is taken as the whole group. The Python
front end (`dist.all_reduce`, ...) calls the methods below directly; C++ callers (DDP's
reducer, `_c10d_functional`) reach the ones the trampoline forwards (allreduce, allgather,
broadcast, reduce_scatter, all_to_all_single, barrier, send, recv).

Mapping. Tensors are handed to the communicator as flat contiguous 1-D buffers, so shapes
never matter and counts are element counts. Lists of tensors (all_gather, reduce_scatter,
all_to_all) go through one contiguous staging buffer plus copies; the flat forms
(all_gather_into_tensor, reduce_scatter_tensor, all_to_all_single) are passed straight
through. Data-movement collectives of a dtype the communicator does not reduce (bool, int8,
complex, ...) move the bytes; reductions of small integer/bool dtypes run in int64 and are
cast back. AVG is a SUM followed by a division by the group size (truncating for integers,
as NCCL does). BAND/BOR/BXOR/PREMUL_SUM raise a `CommError`.

`async_op=True` issues the communicator's asynchronous form; copies out of staging buffers
and the AVG division happen when the work is waited on (or found completed).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from tessera.errors import CommError, DtypeError, ShapeError

__all__ = ["BACKEND_NAME", "TesseraProcessGroup", "TesseraWork", "register"]

BACKEND_NAME = "tessera"

# dtypes the communicator moves and reduces natively.
_NATIVE = frozenset({torch.float32, torch.float16, torch.bfloat16, torch.float64,
                     torch.int32, torch.int64, torch.uint8})
# dtypes reduced exactly in int64 and cast back (bool: SUM/MAX = or, PRODUCT/MIN = and).
_WIDEN = frozenset({torch.bool, torch.int8, torch.int16, torch.uint16, torch.uint32})

_RedOp = dist.ReduceOp.RedOpType
_DIRECT_OPS: dict[Any, str] = {_RedOp.SUM: "sum", _RedOp.PRODUCT: "prod", _RedOp.MAX: "max",
                               _RedOp.MIN: "min"}
_OPS: dict[Any, str] = {**_DIRECT_OPS, _RedOp.AVG: "sum"}  # AVG: a sum, then a division


def _seconds(timeout: Any) -> float | None:
    """Seconds from a timedelta/number; None for torch's 'no timeout' (negative or zero)."""
    if timeout is None:
        return None
    secs = timeout.total_seconds() if isinstance(timeout, timedelta) else float(timeout)
    return secs if secs > 0 else None


# --------------------------------------------------------------------------- work objects


class TesseraWork(dist.Work):
    """The handle torch gets back from every collective.

    Wraps zero or more communicator Work objects (none when the operation already ran) and a
    `finalize` step (copies out of staging buffers, AVG division, write-back into
    non-contiguous tensors) that runs exactly once, after they complete. `result` is what
    `get_future()` resolves to (the output tensors, as gloo does).
    """

    def __init__(self, inner: Sequence[Any] = (), finalize: Callable[[], None] | None = None,
                 result: list[torch.Tensor] | None = None, *, timeout: Any = None):
        super().__init__()
        self._inner = list(inner)
        self._finalize = finalize
        self._result = result if result is not None else []
        self._timeout = _seconds(timeout)
        self._done = False
        self._error: BaseException | None = None
        self._future: torch.futures.Future | None = None
        self._lock = threading.RLock()  # a future's callback may wait on this work
        if not self._inner:
            self._complete()

    def _complete(self) -> None:
        """Wait for the communicator's works, then finalize once; remember any failure."""
        with self._lock:
            if self._done:
                return
            try:
                for w in self._inner:
                    w.wait(timeout=self._timeout)
                self._inner = []
                if self._finalize is not None:
                    self._finalize()
                    self._finalize = None
            except BaseException as e:
                self._error = e
            self._done = True
            if self._future is not None:
                self._settle_future()

    def _settle_future(self) -> None:
        fut = self._future
        assert fut is not None
        if fut.done():
            return
        if self._error is not None:
            fut.set_exception(self._error)
        else:
            fut.set_result(self._result)

    def wait(self, timeout: Any = None) -> bool:
        """Block until the operation finished and its outputs are in place; raise its error."""
        secs = _seconds(timeout)
        if secs is not None and not self._done:
            self._timeout = secs if self._timeout is None else min(self._timeout, secs)
        self._complete()
        if self._error is not None:
            raise self._error
        return True

    def is_completed(self) -> bool:
        """True once the outputs are readable (finalizes on the spot if the data has landed)."""
        if not self._done:
            if not all(w.is_completed() for w in self._inner):
                return False
            self._complete()
        return True

    def is_success(self) -> bool:
        """True if completed without error (old torch API)."""
        return self.is_completed() and self._error is None

    def exception(self) -> BaseException | None:
        """The error the operation ended with, if any."""
        return self._error

    def result(self) -> list[torch.Tensor]:
        """The output tensors (waits first)."""
        self.wait()
        return self._result

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        """Call `fn(self)` once the outputs are in place (what `_Joined` chains on)."""
        self.get_future().add_done_callback(lambda _: fn(self))

    def source_rank(self) -> int:
        raise CommError("source_rank() is only defined for recv from any source",
                        where="TesseraWork.source_rank",
                        hint="the tessera backend does not support recv without a source")

    def get_future(self) -> torch.futures.Future:
        """A torch Future holding the outputs, completed (on the communicator's thread) when
        the last inner work finishes, so DDP's comm hooks overlap with the backward pass."""
        with self._lock:
            if self._future is not None:
                return self._future
            self._future = torch.futures.Future()
            pending = list(self._inner)
            if self._done:
                self._settle_future()
                return self._future
        left = [len(pending)]
        count = threading.Lock()

        def one_done(_: Any) -> None:
            with count:
                left[0] -= 1
                last = left[0] == 0
            if last:
                self._complete()

        for w in pending:
            w.add_done_callback(one_done)
        return self._future


class _Held:
    """A communicator work plus the buffers it reads and writes, kept alive until it ends
    (staging buffers exist only here)."""

    def __init__(self, work: Any, refs: Any):
        self.work = work
        self.refs = refs

    def wait(self, timeout: float | None = None) -> Any:
        return self.work.wait(timeout=timeout)

    def is_completed(self) -> bool:
        return bool(self.work.is_completed())

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        self.work.add_done_callback(fn)


def _done(result: list[torch.Tensor] | None = None) -> TesseraWork:
    return TesseraWork((), None, result)


# --------------------------------------------------------------------------- buffers


def _check_cpu(tensors: Sequence[torch.Tensor], where: str) -> None:
    for t in tensors:
        if t.device.type != "cpu":
            raise CommError(f"tensor on {t.device}; the tessera backend moves CPU tensors",
                            where=where,
                            hint="move the tensor to the CPU, or register another backend "
                                 "for this device: init_process_group('cpu:tessera,cuda:nccl')")
        if t.is_sparse:
            raise CommError("sparse tensors are not supported", where=where,
                            hint="call .to_dense() first")


def _movable(t: torch.Tensor) -> torch.Tensor:
    """A flat view of contiguous `t` in a dtype the communicator moves (bytes if need be)."""
    flat = t.view(-1) if t.dim() != 1 else t
    if flat.dtype in _NATIVE:
        return flat
    return flat.view(torch.uint8)


def _elem_scale(dtype: torch.dtype) -> int:
    """How many movable elements one element of `dtype` becomes (1, or its byte size)."""
    return 1 if dtype in _NATIVE else dtype.itemsize


def _contig(t: torch.Tensor) -> tuple[torch.Tensor, Callable[[], None] | None]:
    """`t` itself if contiguous, else a contiguous copy and the step that writes it back."""
    if t.is_contiguous():
        return t, None
    c = t.contiguous()
    return c, lambda: t.copy_(c)


def _chain(*steps: Callable[[], None] | None) -> Callable[[], None] | None:
    live = [s for s in steps if s is not None]
    if not live:
        return None

    def run() -> None:
        for s in live:
            s()

    return run


def _unstage(outs: Sequence[torch.Tensor], stage: torch.Tensor, sizes: list[int]) -> None:
    """Copy consecutive pieces of a staging buffer (`sizes` elements each) into `outs`."""
    offset = 0
    for o, n in zip(outs, sizes, strict=True):
        _copy_into(o, stage[offset:offset + n])
        offset += n


def _copy_into(dst: torch.Tensor, flat_src: torch.Tensor) -> None:
    """Copy a flat buffer (possibly a byte view) into `dst` of any shape and layout."""
    if flat_src.dtype != dst.dtype:
        flat_src = flat_src.view(dst.dtype)
    dst.copy_(flat_src.view(dst.shape))


def _same_dtype(tensors: Sequence[torch.Tensor], where: str) -> torch.dtype:
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) != 1:
        raise DtypeError(f"tensors of mixed dtypes {sorted(map(str, dtypes))}", where=where,
                         hint="give every input and output tensor the same dtype")
    return dtypes.pop()


class _Reduction:
    """How one ReduceOp runs on one dtype: the communicator's op name, the dtype it runs in
    (int64 for widened dtypes) and the AVG division."""

    def __init__(self, op: Any, dtype: torch.dtype, size: int, where: str):
        red = getattr(op, "op", op)
        name = _OPS.get(red)
        if name is None:
            hint = ("use SUM, PRODUCT, MIN, MAX or AVG; for PREMUL_SUM multiply the tensor "
                    "by the factor first, then SUM" if red == _RedOp.PREMUL_SUM else
                    "use SUM, PRODUCT, MIN, MAX or AVG; bitwise reductions (BAND/BOR/BXOR) "
                    "are not implemented by tessera.dist")
            raise CommError(f"reduce op {getattr(red, 'name', red)} is not supported by the "
                            f"tessera backend", where=where, hint=hint)
        if dtype in _NATIVE:
            work_dtype = dtype
        elif dtype in _WIDEN:
            work_dtype = torch.int64
        else:
            raise DtypeError(f"cannot reduce {dtype} tensors", where=where,
                             hint="reduce in float32/float16/bfloat16/float64 or "
                                  "int32/int64/uint8 (complex: SUM/AVG only)")
        if red == _RedOp.AVG and dtype == torch.bool:
            raise DtypeError("AVG of bool tensors is undefined", where=where,
                             hint="convert to a float dtype first")
        self.name = name
        self.dtype = dtype
        self.work_dtype = work_dtype
        self.avg = red == _RedOp.AVG
        self.size = size

    def stage(self, t: torch.Tensor) -> tuple[torch.Tensor, Callable[[], None] | None]:
        """A flat contiguous buffer to reduce in place, and the step that puts it back."""
        if t.dtype == self.work_dtype:
            c, back = _contig(t)
            return c.view(-1), back
        buf = t.reshape(-1).to(self.work_dtype)
        return buf, lambda: t.copy_(buf.view(t.shape).to(self.dtype))

    def scratch(self, out: torch.Tensor) -> tuple[torch.Tensor, Callable[[], None] | None]:
        """A flat buffer the communicator may write the result into, and the step that moves
        it into `out` (contents of the buffer are not read)."""
        if out.dtype == self.work_dtype and out.is_contiguous():
            return out.view(-1), None
        buf = torch.empty(out.numel(), dtype=self.work_dtype)
        return buf, lambda: out.copy_(buf.view(out.shape).to(self.dtype))

    def post(self, buf: torch.Tensor) -> Callable[[], None] | None:
        """The AVG division of a result buffer (in work dtype), or None."""
        if not self.avg:
            return None
        if buf.dtype.is_floating_point:
            return lambda: buf.div_(self.size)
        return lambda: buf.copy_(torch.div(buf, self.size, rounding_mode="trunc"))


# --------------------------------------------------------------------------- process group


class TesseraProcessGroup(dist.ProcessGroup):
    """A torch.distributed process group whose collectives run on a tessera.dist
    Communicator. Built by torch through the registered creator, one per group."""

    def __init__(self, comm: Any, rank: int, size: int, timeout: Any = None):
        super().__init__(rank, size)
        self.comm = comm
        self._rank = rank
        self._size = size
        self._timeout = timeout
        self._group_name = ""
        self._group_desc = ""

    # -- identity ---------------------------------------------------------------------

    def getBackendName(self) -> str:
        return BACKEND_NAME

    # The C++ ProcessGroup keeps its name in its backends, and this group has none: keep
    # them here, so `group_name` (functional collectives look groups up by it) works.
    def setGroupName(self, name: str) -> None:  # torch's spelling
        self._group_name = name

    def getGroupName(self) -> str:  # torch's spelling
        return self._group_name

    def setGroupDesc(self, desc: str) -> None:  # torch's spelling
        self._group_desc = desc

    def getGroupDesc(self) -> str:  # torch's spelling
        return self._group_desc

    def __repr__(self) -> str:
        return f"TesseraProcessGroup(rank={self._rank}, size={self._size})"

    def shutdown(self) -> None:
        """Release the communicator (its shared memory) when torch destroys the group."""
        close = getattr(self.comm, "close", None)
        if close is not None:
            close()

    def abort(self) -> None:
        self.shutdown()

    # -- helpers ----------------------------------------------------------------------

    def _issue(self, opts: Any, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list:
        """Run one communicator call, asynchronously if torch asked for async_op. Returns
        the communicator works to wait on (none when it ran synchronously)."""
        if getattr(opts, "asyncOp", False):
            return [_Held(fn(*args, async_op=True, **kwargs), (args, kwargs))]
        fn(*args, **kwargs)
        return []

    def _work(self, opts: Any, inner: list, finalize: Callable[[], None] | None,
              result: list[torch.Tensor]) -> TesseraWork:
        return TesseraWork(inner, finalize, result, timeout=getattr(opts, "timeout", None))

    def _one(self, tensors: Sequence[torch.Tensor], where: str) -> torch.Tensor:
        if len(tensors) != 1:
            raise ShapeError(f"expected one tensor, got {len(tensors)}", where=where,
                             hint="the tessera backend drives one CPU tensor per process")
        _check_cpu(tensors, where)
        return tensors[0]

    def _check_blocks(self, whole: torch.Tensor, whole_name: str, block: torch.Tensor,
                      block_name: str, where: str) -> None:
        """CPU tensors of one dtype, `whole` holding the group's size blocks of `block`."""
        _check_cpu([whole, block], where)
        _same_dtype([whole, block], where)
        if whole.numel() != self._size * block.numel():
            raise ShapeError(f"{whole_name} has {whole.numel()} elements, expected group size "
                             f"{self._size} x {block_name}'s {block.numel()}", where=where,
                             hint=f"{whole_name} must be world_size times the {block_name}")

    def _root(self, root: int, where: str) -> int:
        if not 0 <= root < self._size:
            raise CommError(f"root rank {root} outside the group of {self._size}",
                            where=where, hint="pass a rank of this group")
        return root

    # -- reductions -------------------------------------------------------------------

    def allreduce(self, tensors: list[torch.Tensor], opts: Any = None) -> TesseraWork:
        """All-reduce each tensor in place (one communicator call per tensor, in order)."""
        opts = opts if opts is not None else dist.AllreduceOptions()
        if len(tensors) == 1 and not opts.asyncOp:  # the latency path: one plain tensor
            t = tensors[0]
            name = _DIRECT_OPS.get(opts.reduceOp.op)
            if name is not None and t.dtype in _NATIVE and t.is_cpu and t.is_contiguous():
                self.comm.allreduce(t, name, out=t)
                return TesseraWork((), None, tensors)
        where = "dist.all_reduce"
        _check_cpu(tensors, where)
        inner: list = []
        steps: list[Callable[[], None] | None] = []
        for t in tensors:
            red = _Reduction(opts.reduceOp, t.dtype, self._size, where)
            if t.numel() == 0:
                continue
            buf, back = red.stage(t)
            inner += self._issue(opts, self.comm.allreduce, buf, red.name, out=buf)
            steps += [red.post(buf), back]
        return self._work(opts, inner, _chain(*steps), list(tensors))

    def allreduce_coalesced(self, tensors: list[torch.Tensor], opts: Any = None) -> TesseraWork:
        """Several all-reduces issued back to back."""
        return self.allreduce(tensors, opts)

    def reduce(self, tensors: list[torch.Tensor], opts: Any = None) -> TesseraWork:
        """Reduce into the root's tensor; other ranks' tensors are left as they were."""
        opts = opts if opts is not None else dist.ReduceOptions()
        where = "dist.reduce"
        t = self._one(tensors, where)
        root = self._root(opts.rootRank, where)
        red = _Reduction(opts.reduceOp, t.dtype, self._size, where)
        if t.numel() == 0:
            return _done(list(tensors))
        buf, back = red.stage(t)
        if self._rank == root:
            inner = self._issue(opts, self.comm.reduce, buf, root, red.name, out=buf)
            return self._work(opts, inner, _chain(red.post(buf), back), list(tensors))
        inner = self._issue(opts, self.comm.reduce, buf, root, red.name)
        return self._work(opts, inner, None, list(tensors))

    def _reduce_scatter_flat(self, out: torch.Tensor, src: torch.Tensor,
                             counts: list[int] | None, opts: Any,
                             result: list[torch.Tensor], where: str) -> TesseraWork:
        """Reduce-scatter flat `src` (already in the reduction's dtype) into `out`."""
        red = _Reduction(opts.reduceOp, out.dtype, self._size, where)
        dst, back = red.scratch(out)
        if counts is None:
            if src.numel() == 0:
                return _done(result)
            inner = self._issue(opts, self.comm.reduce_scatter, src, red.name, out=dst)
        else:
            inner = self._issue(opts, self.comm.reduce_scatterv, src, counts, red.name, out=dst)
        return self._work(opts, inner, _chain(red.post(dst), back), result)

    def reduce_scatter(self, output_tensors: list[torch.Tensor],
                       input_tensors: list[list[torch.Tensor]], opts: Any = None) -> TesseraWork:
        """`dist.reduce_scatter`: block i of the reduction of every rank's list lands on
        rank i; the inputs are concatenated into one staging buffer (sizes may differ)."""
        opts = opts if opts is not None else dist.ReduceScatterOptions()
        where = "dist.reduce_scatter"
        out = self._one(output_tensors, where)
        if len(input_tensors) != 1 or len(input_tensors[0]) != self._size:
            raise ShapeError(f"expected one list of {self._size} input tensors",
                             where=where, hint="pass one input tensor per rank of the group")
        ins = input_tensors[0]
        _check_cpu(ins, where)
        _same_dtype([out, *ins], where)
        counts = [i.numel() for i in ins]
        if counts[self._rank] != out.numel():
            raise ShapeError(f"output has {out.numel()} elements but input {self._rank} has "
                             f"{counts[self._rank]}", where=where,
                             hint="the output must match this rank's input block")
        red = _Reduction(opts.reduceOp, out.dtype, self._size, where)
        src = torch.cat([i.reshape(-1) for i in ins]).to(red.work_dtype)
        even = all(c == counts[0] for c in counts)
        return self._reduce_scatter_flat(out, src, None if even else counts, opts,
                                         list(output_tensors), where)

    def reduce_scatter_single(self, output: torch.Tensor, input: torch.Tensor,
                              opts: Any = None) -> TesseraWork:
        """`dist.reduce_scatter_tensor`: input holds size blocks of output's size."""
        opts = opts if opts is not None else dist.ReduceScatterOptions()
        where = "dist.reduce_scatter_tensor"
        self._check_blocks(input, "input", output, "output", where)
        red = _Reduction(opts.reduceOp, output.dtype, self._size, where)
        src = input.reshape(-1).to(red.work_dtype)  # a view when already flat-able
        return self._reduce_scatter_flat(output, src, None, opts, [output], where)

    _reduce_scatter_base = reduce_scatter_single

    # -- data movement ----------------------------------------------------------------

    def broadcast(self, tensors: list[torch.Tensor], opts: Any = None) -> TesseraWork:
        """Broadcast the root's tensor into every rank's tensor, in place."""
        opts = opts if opts is not None else dist.BroadcastOptions()
        where = "dist.broadcast"
        t = self._one(tensors, where)
        root = self._root(opts.rootRank, where)
        if t.numel() == 0:
            return _done(list(tensors))
        c, back = _contig(t)
        inner = self._issue(opts, self.comm.broadcast, _movable(c), root)
        return self._work(opts, inner, back, list(tensors))

    def allgather(self, output_tensors: list[list[torch.Tensor]],
                  input_tensors: list[torch.Tensor], opts: Any = None) -> TesseraWork:
        """`dist.all_gather` into a list: gather into one staging buffer, then copy out
        (per-rank sizes may differ: then the counts come from the output list)."""
        opts = opts if opts is not None else dist.AllgatherOptions()
        where = "dist.all_gather"
        inp = self._one(input_tensors, where)
        if len(output_tensors) != 1 or len(output_tensors[0]) != self._size:
            raise ShapeError(f"expected one list of {self._size} output tensors",
                             where=where, hint="pass one output tensor per rank of the group")
        outs = output_tensors[0]
        _check_cpu(outs, where)
        dtype = _same_dtype([inp, *outs], where)
        counts = [o.numel() for o in outs]
        if counts[self._rank] != inp.numel():
            raise ShapeError(f"input has {inp.numel()} elements but output {self._rank} has "
                             f"{counts[self._rank]}", where=where,
                             hint="output i must have the shape of rank i's input")
        src = _movable(inp.contiguous())
        scale = _elem_scale(dtype)
        stage = torch.empty(sum(counts) * scale, dtype=src.dtype)

        def copy_out() -> None:
            _unstage(outs, stage, [n * scale for n in counts])

        if all(c == counts[0] for c in counts):
            if counts[0] == 0:
                return _done(list(outs))
            inner = self._issue(opts, self.comm.allgather, src, out=stage)
        else:
            inner = self._issue(opts, self.comm.allgatherv, src, [c * scale for c in counts],
                                out=stage)
        return self._work(opts, inner, copy_out, list(outs))

    def all_gather_single(self, output: torch.Tensor, input: torch.Tensor,
                          opts: Any = None) -> TesseraWork:
        """`dist.all_gather_into_tensor`: output holds size blocks of input's size."""
        opts = opts if opts is not None else dist.AllgatherOptions()
        where = "dist.all_gather_into_tensor"
        self._check_blocks(output, "output", input, "input", where)
        if input.numel() == 0:
            return _done([output])
        dst, back = _contig(output)
        inner = self._issue(opts, self.comm.allgather, _movable(input.contiguous()),
                            out=_movable(dst))
        return self._work(opts, inner, back, [output])

    _allgather_base = all_gather_single

    def allgather_coalesced(self, output_lists: list[list[torch.Tensor]],
                            input_tensors: list[torch.Tensor], opts: Any = None) -> TesseraWork:
        """Several list all-gathers issued back to back."""
        works = [self.allgather([outs], [inp], opts)
                 for outs, inp in zip(output_lists, input_tensors, strict=True)]
        return _Joined(works, [t for outs in output_lists for t in outs])

    def alltoall(self, output_tensors: list[torch.Tensor], input_tensors: list[torch.Tensor],
                 opts: Any = None) -> TesseraWork:
        """`dist.all_to_all` with lists: input i goes to rank i, output j comes from rank j;
        both lists are staged through contiguous buffers (sizes may differ)."""
        opts = opts if opts is not None else dist.AllToAllOptions()
        where = "dist.all_to_all"
        if len(output_tensors) != self._size or len(input_tensors) != self._size:
            raise ShapeError(f"expected {self._size} input and {self._size} output tensors, "
                             f"got {len(input_tensors)} and {len(output_tensors)}",
                             where=where, hint="pass one tensor per rank of the group")
        _check_cpu([*output_tensors, *input_tensors], where)
        dtype = _same_dtype([*output_tensors, *input_tensors], where)
        scale = _elem_scale(dtype)
        src = torch.cat([_movable(i.contiguous()) for i in input_tensors])
        send = [i.numel() * scale for i in input_tensors]
        recv = [o.numel() * scale for o in output_tensors]
        stage = torch.empty(sum(recv), dtype=src.dtype)

        def copy_out() -> None:
            _unstage(output_tensors, stage, recv)

        # always the v-form: ranks whose sizes happen to be equal must take the same path
        inner = self._issue(opts, self.comm.alltoallv, src, send, recv, out=stage)
        return self._work(opts, inner, copy_out, list(output_tensors))

    def all_to_all_single(self, output: torch.Tensor, input: torch.Tensor,
                          output_split_sizes: list[int], input_split_sizes: list[int],
                          opts: Any = None) -> TesseraWork:
        """`dist.all_to_all_single`: dim-0 blocks of input go to each rank in turn; split
        sizes (dim-0 rows) may be empty, meaning equal blocks."""
        opts = opts if opts is not None else dist.AllToAllOptions()
        where = "dist.all_to_all_single"
        _check_cpu([output, input], where)
        dtype = _same_dtype([output, input], where)
        scale = _elem_scale(dtype)
        send = self._split_counts(input, input_split_sizes, "input", where)
        recv = self._split_counts(output, output_split_sizes, "output", where)
        dst, back = _contig(output)
        src = _movable(input.contiguous())
        send = [n * scale for n in send]
        recv = [n * scale for n in recv]
        if not input_split_sizes and not output_split_sizes:  # equal blocks on every rank
            if src.numel() == 0:
                return _done([output])
            inner = self._issue(opts, self.comm.alltoall, src, out=_movable(dst))
        else:  # ranks whose splits happen to be equal must take the same path as the others
            inner = self._issue(opts, self.comm.alltoallv, src, send, recv, out=_movable(dst))
        return self._work(opts, inner, back, [output])

    alltoall_base = all_to_all_single

    def _split_counts(self, t: torch.Tensor, splits: Sequence[int], name: str,
                      where: str) -> list[int]:
        """Element counts per rank from dim-0 split sizes (or equal splits)."""
        rows = t.shape[0] if t.dim() > 0 else 1
        row = math.prod(t.shape[1:])
        if len(splits) == 0:
            if rows % self._size:
                raise ShapeError(f"{name} dim 0 ({rows}) does not split evenly over "
                                 f"{self._size} ranks", where=where,
                                 hint=f"pass {name}_split_sizes")
            return [rows // self._size * row] * self._size
        if len(splits) != self._size or sum(splits) != rows or min(splits) < 0:
            raise ShapeError(f"{name}_split_sizes {list(splits)} do not cover {name} dim 0 "
                             f"({rows}) over {self._size} ranks", where=where,
                             hint="give one non-negative size per rank, summing to dim 0")
        return [int(s) * row for s in splits]

    def gather(self, output_tensors: list[list[torch.Tensor]],
               input_tensors: list[torch.Tensor], opts: Any = None) -> TesseraWork:
        """`dist.gather`: an all-to-all-v in which every rank sends only to the root."""
        opts = opts if opts is not None else dist.GatherOptions()
        where = "dist.gather"
        inp = self._one(input_tensors, where)
        root = self._root(opts.rootRank, where)
        scale = _elem_scale(inp.dtype)
        src = _movable(inp.contiguous())
        send = [0] * self._size
        send[root] = src.numel()
        outs: list[torch.Tensor] = output_tensors[0] if output_tensors else []
        if self._rank == root:
            if len(outs) != self._size:
                raise ShapeError(f"root needs {self._size} output tensors, got {len(outs)}",
                                 where=where, hint="pass gather_list on the root")
            _check_cpu(outs, where)
            _same_dtype([inp, *outs], where)
            recv = [o.numel() * scale for o in outs]
        else:
            recv = [0] * self._size
        stage = torch.empty(sum(recv), dtype=src.dtype)

        def copy_out() -> None:
            _unstage(outs, stage, recv)

        inner = self._issue(opts, self.comm.alltoallv, src, send, recv, out=stage)
        return self._work(opts, inner, copy_out if self._rank == root else None, list(outs))

    def scatter(self, output_tensors: list[torch.Tensor],
                input_tensors: list[list[torch.Tensor]], opts: Any = None) -> TesseraWork:
        """`dist.scatter`: an all-to-all-v in which only the root sends."""
        opts = opts if opts is not None else dist.ScatterOptions()
        where = "dist.scatter"
        out = self._one(output_tensors, where)
        root = self._root(opts.rootRank, where)
        scale = _elem_scale(out.dtype)
        dst, back = _contig(out)
        recv = [0] * self._size
        recv[root] = out.numel() * scale
        if self._rank == root:
            ins = input_tensors[0] if input_tensors else []
            if len(ins) != self._size:
                raise ShapeError(f"root needs {self._size} input tensors, got {len(ins)}",
                                 where=where, hint="pass scatter_list on the root")
            _check_cpu(ins, where)
            _same_dtype([out, *ins], where)
            src = torch.cat([_movable(i.contiguous()) for i in ins])
            send = [i.numel() * scale for i in ins]
        else:
            src = _movable(dst)[:0]
            send = [0] * self._size
        inner = self._issue(opts, self.comm.alltoallv, src, send, recv, out=_movable(dst))
        return self._work(opts, inner, back, [out])

    # -- synchronisation and point to point -------------------------------------------

    def barrier(self, opts: Any = None) -> TesseraWork:
        """Every rank of the group has reached this call."""
        opts = opts if opts is not None else dist.BarrierOptions()
        inner = self._issue(opts, self.comm.barrier)
        return self._work(opts, inner, None, [])

    def send(self, tensors: list[torch.Tensor], dst: int, tag: int) -> TesseraWork:
        """Point-to-point send (in order per pair; the tag must match the recv's)."""
        where = "dist.send"
        t = self._one(tensors, where)
        self._root(dst, where)
        c = _movable(t.contiguous())
        return TesseraWork([_Held(self.comm.isend(c, dst, tag), c)], None, [t])

    def recv(self, tensors: list[torch.Tensor], src: int, tag: int) -> TesseraWork:
        """Point-to-point receive into the tensor, from group rank `src`."""
        where = "dist.recv"
        t = self._one(tensors, where)
        self._root(src, where)
        c, back = _contig(t)
        buf = _movable(c)
        return TesseraWork([_Held(self.comm.irecv(buf, src, tag), buf)], back, [t])

    def recv_anysource(self, tensors: list[torch.Tensor], tag: int) -> TesseraWork:
        raise CommError("recv without a source rank is not supported", where="dist.recv",
                        hint="pass src= to dist.recv / dist.irecv")


class _Joined(TesseraWork):
    """Several works seen as one."""

    def __init__(self, works: list[TesseraWork], result: list[torch.Tensor]):
        self._parts = works
        super().__init__(works, None, result)

    def is_completed(self) -> bool:
        if not all(w.is_completed() for w in self._parts):
            return False
        return super().is_completed()


# --------------------------------------------------------------------------- registration


def _create(store: Any, rank: int, size: int, timeout: Any) -> TesseraProcessGroup:
    """The creator torch calls for each group: bootstrap a Communicator from the group's
    prefixed store and wrap it."""
    import tessera.dist as tdist

    comm = tdist.init_from_store(store, rank, size, timeout=_seconds(timeout))
    return TesseraProcessGroup(comm, rank, size, timeout)


_lock = threading.Lock()


def register() -> None:
    """Register the `tessera` backend with torch.distributed (CPU); idempotent."""
    with _lock:
        if BACKEND_NAME.upper() in dist.Backend._plugins:
            return
        dist.Backend.register_backend(BACKEND_NAME, _create, extended_api=False,
                                      devices=["cpu"])


register()
