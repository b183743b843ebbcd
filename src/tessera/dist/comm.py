"""The communicator: collectives and point-to-point messages on numpy arrays and CPU torch
tensors, over shared memory inside a node and an MPI or gloo engine between nodes.

Every collective must be called by every rank of the communicator in the same order (as in
MPI and NCCL). Ranks that disagree on a collective's kind, dtype, op, root or size get a
`CommError` naming both calls; a peer that dies or stalls gets `CommTimeoutError` naming it.
After either, the communicator is aborted on every rank: build a new one.

While a profile is active (tessera.profile()), every collective and message is a
"collective" event (op, bytes, rank, ranks); the timed methods are swapped in on the class
only then.
"""

from __future__ import annotations

import operator
import queue
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from tessera.dist.bootstrap import Bootstrap
from tessera.dist.engine import Engine
from tessera.dist.transport import Transport
from tessera.errors import CommError, CommTimeoutError, DtypeError, ShapeError
from tessera.runtime import profiling

__all__ = ["OPS", "Communicator", "Work", "node_key"]

OPS = ("sum", "prod", "max", "min")
_OP_CODES = {name: i for i, name in enumerate(OPS)}
_NP_CODES = {np.dtype(t): i for i, t in enumerate(
    (np.float32, np.float16, None, np.int32, np.int64, np.float64, np.uint8)) if t is not None}
_DTYPE_NAMES = ("float32", "float16", "bfloat16", "int32", "int64", "float64", "uint8")
_ITEMSIZE = (4, 2, 2, 4, 8, 8, 1)
_torch_codes: dict[Any, int] = {}
_torch_tensor: type | None = None


def _torch() -> None:
    """Learn torch's tensor type and dtypes once torch is imported (never import it here)."""
    global _torch_tensor
    torch = sys.modules.get("torch")
    if torch is None or _torch_tensor is not None:
        return
    _torch_codes.update({torch.float32: 0, torch.float16: 1, torch.bfloat16: 2,
                         torch.int32: 3, torch.int64: 4, torch.float64: 5, torch.uint8: 6})
    _torch_tensor = torch.Tensor


class _Address(int):
    """A tensor's data address that keeps the tensor alive (a contiguous copy may have no
    other owner)."""

    owner: Any


def _address(t: Any) -> _Address:
    a = _Address(t.data_ptr())
    a.owner = t
    return a


def _operand(x: Any, who: str) -> tuple[Any, int, int]:
    """(what the transport reads: the array or an address, dtype code, element count)."""
    if type(x) is np.ndarray:
        code = _NP_CODES.get(x.dtype)
        if code is None:
            raise _dtype_error(x.dtype, who)
        if not x.flags.c_contiguous:
            x = np.ascontiguousarray(x)
        return x, code, x.size
    _torch()
    if _torch_tensor is not None and isinstance(x, _torch_tensor):
        code = _torch_codes.get(x.dtype)
        if code is None:
            raise _dtype_error(x.dtype, who)
        if x.device.type != "cpu":
            raise CommError(f"{who}: tensor is on {x.device}; tessera.dist works on CPU tensors",
                            hint="move it with .cpu() first")
        return _address(x.contiguous()), code, x.numel()
    if isinstance(x, np.ndarray):
        return _operand(np.asarray(x), who)
    raise CommError(f"{who}: expected a numpy array or a torch tensor, got {type(x).__name__}",
                    hint="wrap Python data with numpy.asarray")


def _dtype_error(dtype: Any, who: str) -> DtypeError:
    return DtypeError(f"{who}: dtype {dtype} is not supported",
                      hint="use one of " + ", ".join(_DTYPE_NAMES))


def _writable(x: Any, code: int, n: int, who: str) -> tuple[Any, Callable[[], None] | None]:
    """(what the transport writes, and the copy back to `x` if it is not contiguous)."""
    if type(x) is np.ndarray or isinstance(x, np.ndarray):
        if not x.flags.writeable:
            raise CommError(f"{who}: the output array is read-only")
        target, xcode, xn = (x, *_operand(x, who)[1:])
    else:
        _, xcode, xn = _operand(x, who)
        target = x
    if xcode != code or xn != n:
        raise ShapeError(f"{who}: out has {xn} {_DTYPE_NAMES[xcode]} elements, the result is "
                         f"{n} {_DTYPE_NAMES[code]}", hint="allocate out like the result")
    if _contiguous(target):
        return (target if isinstance(target, np.ndarray) else _address(target)), None
    staged = _empty(target, n)
    handle = staged if isinstance(staged, np.ndarray) else _address(staged)
    return handle, lambda: _copy_into(target, staged)


def _flat(x: Any, writable: bool = False) -> tuple[Any, int, Any] | None:
    """(transport handle, bytes, dtype) of a contiguous CPU array or tensor of a supported
    dtype, else None (the general path then explains or copies)."""
    if type(x) is np.ndarray:
        if x.flags.c_contiguous and x.dtype in _NP_CODES and (x.flags.writeable or
                                                              not writable):
            return x, x.nbytes, x.dtype
        return None
    if type(x) is _torch_tensor and x.is_cpu and x.dtype in _torch_codes and x.is_contiguous():
        return x.data_ptr(), x.numel() * x.element_size(), x.dtype
    return None


def _contiguous(x: Any) -> bool:
    return x.flags.c_contiguous if isinstance(x, np.ndarray) else x.is_contiguous()


def _empty(like: Any, n: int, shape: Sequence[int] | None = None) -> Any:
    """An uninitialized contiguous array of the same kind and dtype as `like`."""
    shape = tuple(shape) if shape is not None else (n,)
    if isinstance(like, np.ndarray):
        return np.empty(shape, like.dtype)
    import torch

    return torch.empty(shape, dtype=like.dtype)


def _copy_into(target: Any, staged: Any) -> None:
    if isinstance(target, np.ndarray):
        target[...] = staged.reshape(target.shape)
    else:
        target.copy_(staged.reshape(target.shape))


def _op_code(op: Any, who: str) -> int:
    code = _OP_CODES.get(op if isinstance(op, str) else getattr(op, "name", op))
    if code is None:
        raise CommError(f"{who}: unknown reduction {op!r}", hint=f"use one of {', '.join(OPS)}")
    return code


def _rows(x: Any) -> tuple[int, tuple[int, ...]]:
    """(dim 0, the shape of one row): v-collectives count rows of dim 0."""
    shape = tuple(x.shape)
    if not shape:
        raise ShapeError("a 0-d value has no rows to split", hint="reshape it to 1-d")
    return shape[0], shape[1:]


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class Work:
    """A collective or message running in the background: `wait()` returns its result."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self._result: Any = None
        self._error: BaseException | None = None
        self._callbacks: list[Callable[[Work], None]] = []
        self._lock = threading.Lock()

    def _finish(self, result: Any = None, error: BaseException | None = None) -> None:
        self._result, self._error = result, error
        with self._lock:
            self._done.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn(self)

    def is_completed(self) -> bool:
        return self._done.is_set()

    def add_done_callback(self, fn: Callable[[Work], None]) -> None:
        """Call `fn(work)` when the work finishes (on the thread that ran it), or now if
        it has: what futures and overlapping frameworks (DDP hooks) chain on."""
        with self._lock:
            if not self._done.is_set():
                self._callbacks.append(fn)
                return
        fn(self)

    def wait(self, timeout: float | None = None) -> Any:
        """Block until done (or `timeout` seconds: CommTimeoutError); return the result or
        raise the collective's error."""
        if not self._done.wait(timeout):
            raise CommTimeoutError(f"the operation did not finish within {timeout} s", rank=-1)
        if self._error is not None:
            raise self._error
        return self._result


class _Worker:
    """A thread running one stream of operations in submission order."""

    def __init__(self, name: str):
        self.pending = 0
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[tuple[Work, Callable[[], Any]] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._name = name

    def submit(self, fn: Callable[[], Any]) -> Work:
        work = Work()
        with self._lock:
            self.pending += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()
        self._queue.put((work, fn))
        return work

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            work, fn = item
            try:
                work._finish(fn())
            except BaseException as e:
                work._finish(error=e)
            with self._lock:
                self.pending -= 1

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None


class Communicator:
    """A group of processes: `rank` in `range(size)`; `local_rank`/`local_size` within this
    node; `nodes` the number of nodes. Methods follow mpi4py's and torch.distributed's
    collectives; `async_op=True` returns a `Work` whose `wait()` gives the result."""

    def __init__(self, transport: Transport, *, rank: int, size: int, nodes: int,
                 node_key: str, timeout: float, engine: Engine | None):
        self._t = transport
        self.rank = rank
        self.size = size
        self.nodes = nodes
        self.local_rank = transport.local_rank
        self.local_size = transport.local_size
        self.timeout = timeout
        self._node_key = node_key
        self._engine = engine
        self._lock = threading.Lock()
        self._coll = _Worker("tessera-collectives")
        self._p2p: dict[tuple[str, int], _Worker] = {}
        self._broken: str | None = None
        self._fast = getattr(transport, "allreduce_arrays", None)
        self._uniform_cache: dict[int, list[int]] = {}

    def __repr__(self) -> str:
        return (f"<tessera Communicator rank {self.rank} of {self.size} "
                f"({self.nodes} node{'s' if self.nodes > 1 else ''}, {self._t.name})>")

    # ------------------------------------------------------------------ running ops

    def _run(self, fn: Callable[[], Any], async_op: bool) -> Any:
        if self._broken is not None:
            raise CommError(f"this communicator was aborted: {self._broken}",
                            hint="a failed collective leaves ranks out of step; create a new "
                                 "communicator (tessera.dist.init or split)")
        if async_op or self._coll.pending:
            work = self._coll.submit(lambda: self._guarded(fn))
            return work if async_op else work.wait()
        return self._guarded(fn)

    def _quick(self, x: Any, async_op: bool, writable: bool = False) -> tuple | None:
        """`_flat(x)` when a blocking call may take the microsecond path (nothing queued,
        not aborted), else None."""
        if async_op or self._coll.pending or self._broken is not None:
            return None
        return _flat(x, writable)

    @staticmethod
    def _quick_out(x: Any, src: tuple, out: Any, shape: tuple[int, ...], nbytes: int
                   ) -> tuple[Any, Any]:
        """(out, its transport handle) for a microsecond path: `out`, or a new array of
        `shape`, if it is a contiguous writable buffer of `nbytes` of x's dtype apart from
        x; else (out, None) and the general path copies, checks or explains."""
        if out is None:
            out = _empty(x, 0, shape)
        elif _overlap(x, out):
            return out, None
        dst = _flat(out, writable=True)
        return out, (dst[0] if dst is not None and dst[1:] == (nbytes, src[2]) else None)

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        """A transport call on the microsecond path (its errors abort as anywhere)."""
        try:
            fn(*args)
        except self._t.errors as e:
            self._fail(e)

    def _launch(self, op: Callable[[], None], back: Callable[[], None] | None, result: Any,
                async_op: bool) -> Any:
        """Run a transport call (then the copy back to a strided output) now or queued."""
        def run() -> Any:
            op()
            if back:
                back()
            return result
        return self._run(run, async_op)

    def _guarded(self, fn: Callable[[], Any]) -> Any:
        with self._lock:
            try:
                return fn()
            except self._t.errors as e:
                self._fail(e)

    def _fail(self, e: BaseException) -> None:
        message, rank = self._t.describe_error(e)
        self._broken = message
        self._fast = None
        self._t.abort(message)
        where = f"rank {self.rank} of {self.size}"
        if isinstance(e, self._t.timeout_errors):
            raise CommTimeoutError(message, rank=rank, where=where,
                                   hint="check that rank's output for the error that stopped "
                                        "it; raise TESSERA_COMM_TIMEOUT if it is just slow"
                                   ) from None
        if isinstance(e, self._t.abort_errors):
            raise CommError(message, where=where,
                            hint=f"rank {rank} failed first: its error says why") from None
        raise CommError(message, where=where,
                        hint="every rank must call the same collectives in the same order "
                             "with the same dtype, op, root and sizes") from None

    # ------------------------------------------------------------------ collectives

    def allreduce(self, x: Any, op: str = "sum", *, out: Any = None,
                  async_op: bool = False) -> Any:
        """The elementwise reduction of every rank's `x`; `out=x` reduces in place."""
        if self._fast is not None and not async_op and not self._coll.pending:
            # the microsecond path: contiguous numpy arrays, or a torch tensor in place
            try:
                if type(x) is np.ndarray and (out is None or type(out) is np.ndarray):
                    if out is None:
                        out = np.empty(x.shape, x.dtype)
                    self._fast(x, out, _OP_CODES[op])
                    return out
                if type(x) is _torch_tensor and (out is x or out is None) and x.is_cpu:
                    code = _torch_codes.get(x.dtype)
                    if code is not None and x.is_contiguous():
                        out = x if out is x else x.new_empty(x.shape)
                        self._t.allreduce(x.data_ptr(), out.data_ptr(), x.numel(), code,
                                          _OP_CODES[op], -1)
                        return out
            except (KeyError, self._t.unsupported):
                pass  # the general path below says what is wrong
            except self._t.errors as e:
                self._fail(e)
        src, code, n = _operand(x, "allreduce")
        opc = _op_code(op, "allreduce")
        if out is None:
            out = _empty(x, n, x.shape)
        dst, back = _writable(out, code, n, "allreduce")
        return self._launch(lambda: self._t.allreduce(src, dst, n, code, opc, -1), back, out,
                            async_op)

    def reduce(self, x: Any, root: int = 0, op: str = "sum", *, out: Any = None,
               async_op: bool = False) -> Any:
        """The reduction of every rank's `x` on `root` (None on the others)."""
        self._check_rank(root, "reduce", "root")
        src, code, n = _operand(x, "reduce")
        opc = _op_code(op, "reduce")
        dst, back = None, None
        if self.rank == root:
            if out is None:
                out = _empty(x, n, x.shape)
            dst, back = _writable(out, code, n, "reduce")
        return self._launch(lambda: self._t.allreduce(src, dst, n, code, opc, root), back,
                            out if self.rank == root else None, async_op)

    def broadcast(self, x: Any, root: int = 0, *, async_op: bool = False) -> Any:
        """`root`'s `x` into every rank's `x` (in place); returns `x`."""
        src = self._quick(x, async_op, writable=True)
        if src is not None and type(root) is int and 0 <= root < self.size:
            self._call(self._t.broadcast, src[0], src[1], root)
            return x
        self._check_rank(root, "broadcast", "root")
        _, code, n = _operand(x, "broadcast")
        buf, back = _writable(x, code, n, "broadcast")
        if back is not None and self.rank == root:
            buf = _operand(x, "broadcast")[0]
        return self._launch(lambda: self._t.broadcast(buf, n * _ITEMSIZE[code], root),
                            back if self.rank != root else None, x, async_op)

    def allgather(self, x: Any, *, out: Any = None, async_op: bool = False) -> Any:
        """Every rank's `x` stacked in rank order: shape (size, *x.shape)."""
        src = self._quick(x, async_op)
        if src is not None:
            out, dst = self._quick_out(x, src, out, (self.size, *x.shape), src[1] * self.size)
            if dst is not None:
                self._call(self._t.allgatherv, src[0], dst, [src[1]] * self.size)
                return out
        src, code, n = _operand(x, "allgather")
        return self._gather(x, src, code, [n] * self.size, (self.size, *x.shape), out,
                            async_op)

    def allgatherv(self, x: Any, counts: Sequence[int] | None = None, *, out: Any = None,
                   async_op: bool = False) -> Any:
        """Every rank's `x` concatenated along dim 0 in rank order; `counts[r]` is rank r's
        dim 0 (exchanged first when not given)."""
        rows, row_shape = _rows(x)
        counts = self._counts(counts, rows, "allgatherv")
        src, code, _ = _operand(x, "allgatherv")
        row = _numel(row_shape)
        return self._gather(x, src, code, [c * row for c in counts],
                            (sum(counts), *row_shape), out, async_op)

    def _gather(self, x: Any, src: Any, code: int, elems: list[int], shape: tuple[int, ...],
                out: Any, async_op: bool) -> Any:
        total = sum(elems)
        if out is None:
            out = _empty(x, total, shape)
        dst, back = _writable(out, code, total, "allgather")
        nbytes = [e * _ITEMSIZE[code] for e in elems]
        return self._launch(lambda: self._t.allgatherv(src, dst, nbytes), back, out, async_op)

    def reduce_scatter(self, x: Any, op: str = "sum", *, out: Any = None,
                       async_op: bool = False) -> Any:
        """Reduce every rank's `x` (dim 0 = size * n) and give rank r rows [r*n, (r+1)*n)."""
        src = self._quick(x, async_op)
        opc = _OP_CODES.get(op) if type(op) is str else None
        if src is not None and opc is not None and x.ndim and len(x) % self.size == 0:
            out, dst = self._quick_out(x, src, out, (len(x) // self.size, *x.shape[1:]),
                                       src[1] // self.size)
            if dst is not None:
                code = _NP_CODES.get(src[2], _torch_codes.get(src[2]))
                count = src[1] // self.size // _ITEMSIZE[code]
                self._call(self._t.reduce_scatterv, src[0], dst, [count] * self.size, code,
                           opc)
                return out
        n = self._even_blocks(x, "reduce_scatter")
        return self.reduce_scatterv(x, [n] * self.size, op, out=out, async_op=async_op)

    def reduce_scatterv(self, x: Any, counts: Sequence[int], op: str = "sum", *,
                        out: Any = None, async_op: bool = False) -> Any:
        """Reduce every rank's `x` and give rank r its block of `counts[r]` rows of dim 0."""
        rows, row_shape = _rows(x)
        counts = self._check_counts(counts, "reduce_scatterv")
        if sum(counts) != rows:
            raise ShapeError(f"reduce_scatterv: counts sum to {sum(counts)} rows, x has {rows}",
                             hint="counts[r] is the number of dim-0 rows rank r receives")
        src, code, _ = _operand(x, "reduce_scatterv")
        opc = _op_code(op, "reduce_scatterv")
        row = _numel(row_shape)
        mine = counts[self.rank] * row
        if out is None:
            out = _empty(x, mine, (counts[self.rank], *row_shape))
        dst, back = _writable(out, code, mine, "reduce_scatterv")
        elems = [c * row for c in counts]
        return self._launch(lambda: self._t.reduce_scatterv(src, dst, elems, code, opc), back,
                            out, async_op)

    def alltoall(self, x: Any, *, out: Any = None, async_op: bool = False) -> Any:
        """Block i of `x` (dim 0 = size * n) to rank i; block j of the result from rank j."""
        if self._fast is not None and type(x) is np.ndarray and type(out) is np.ndarray and \
                not async_op and not self._coll.pending and x.ndim and len(x) % self.size == 0:
            try:  # the microsecond path: the extension checks both arrays itself
                self._t.alltoall_arrays(x, out)
                return out
            except self._t.unsupported:
                pass  # the paths below copy, check or explain
            except self._t.errors as e:
                self._fail(e)
        src = self._quick(x, async_op)
        if src is not None and x.ndim and len(x) % self.size == 0:
            out, dst = self._quick_out(x, src, out, x.shape, src[1])
            if dst is not None:
                self._call(self._t.alltoallv, src[0], dst, self._uniform(src[1] // self.size))
                return out
        n = self._even_blocks(x, "alltoall")
        matrix = self._uniform(n)
        return self._alltoallv(x, n * self.size, out, async_op,
                               lambda src, dst, unit: self._t.alltoallv(
                                   src, dst, [c * unit for c in matrix]))

    def alltoallv(self, x: Any, send_counts: Sequence[int],
                  recv_counts: Sequence[int] | None = None, *, out: Any = None,
                  async_op: bool = False) -> Any:
        """Rows [sum(send_counts[:i]), ...+send_counts[i]) of `x` to rank i; the result holds
        what each rank sent here, in rank order (`recv_counts[j]` rows from rank j). Without
        `recv_counts` every rank's send counts are exchanged first (one small allgather);
        with them each peer's count is checked against them. Pass them on all ranks or
        none."""
        if recv_counts is not None and self._t.pairs and not async_op and \
                not self._coll.pending and self._broken is None:
            done = self._alltoallv_fast(x, send_counts, recv_counts, out)
            if done is not None:
                return done
        rows, _ = _rows(x)
        send_counts = self._check_counts(send_counts, "alltoallv")
        if sum(send_counts) != rows:
            raise ShapeError(f"alltoallv: send_counts sum to {sum(send_counts)} rows, x has "
                             f"{rows}", hint="send_counts[i] is the rows sent to rank i")
        if recv_counts is not None and self._t.pairs:
            recv = self._check_counts(recv_counts, "alltoallv")
            if recv[self.rank] != send_counts[self.rank]:
                raise ShapeError(f"alltoallv: this rank sends itself {send_counts[self.rank]} "
                                 f"rows but expects {recv[self.rank]}")
            return self._alltoallv(x, sum(recv), out, async_op,
                                   lambda src, dst, unit: self._t.alltoallv_pairs(
                                       src, dst, [c * unit for c in send_counts],
                                       [c * unit for c in recv]))
        matrix = self._count_matrix(send_counts)
        column = [matrix[q][self.rank] for q in range(self.size)]
        if recv_counts is not None and list(recv_counts) != column:
            raise ShapeError(f"alltoallv: recv_counts {list(recv_counts)} disagree with what "
                             f"the ranks send here {column}", hint="pass recv_counts=None")
        flat = [c for line in matrix for c in line]
        return self._alltoallv(x, sum(column), out, async_op,
                               lambda src, dst, unit: self._t.alltoallv(
                                   src, dst, [c * unit for c in flat]))

    def _alltoallv_fast(self, x: Any, send_counts: Sequence[int], recv_counts: Sequence[int],
                        out: Any) -> Any:
        """alltoallv of contiguous operands with both counts known, in one transport call;
        None when anything needs the general path (which also explains errors)."""
        src = _flat(x)
        if src is None or not x.ndim or not len(x):
            return None
        sends = self._check_counts(send_counts, "alltoallv")
        recvs = self._check_counts(recv_counts, "alltoallv")
        if sum(sends) != len(x) or recvs[self.rank] != sends[self.rank]:
            return None
        unit = src[1] // len(x)
        out, dst = self._quick_out(x, src, out, (sum(recvs), *x.shape[1:]), sum(recvs) * unit)
        if dst is None:
            return None
        self._call(self._t.alltoallv_pairs, src[0], dst, [c * unit for c in sends],
                   [c * unit for c in recvs])
        return out

    def _alltoallv(self, x: Any, recv_rows: int, out: Any, async_op: bool,
                   move: Callable[[Any, Any, int], None]) -> Any:
        """Allocate/check the output and run `move(src, dst, bytes per row)`."""
        _, row_shape = _rows(x)
        src, code, _ = _operand(x, "alltoallv")
        row = _numel(row_shape)
        given = out is not None
        if not given:
            out = _empty(x, recv_rows * row, (recv_rows, *row_shape))
        dst, back = _writable(out, code, recv_rows * row, "alltoallv")
        if given and _shares_memory(x, out):
            src = _operand(_clone(x), "alltoallv")[0]
        unit = row * _ITEMSIZE[code]
        return self._launch(lambda: move(src, dst, unit), back, out, async_op)

    def _uniform(self, block: int) -> list[int]:
        """The all-to-all matrix of equal blocks (cached: the microsecond path)."""
        matrix = self._uniform_cache.get(block)
        if matrix is None:
            matrix = self._uniform_cache[block] = [block] * (self.size * self.size)
        return matrix

    def barrier(self, *, async_op: bool = False) -> Any:
        """Return once every rank has called barrier."""
        return self._run(self._t.barrier, async_op)

    # ------------------------------------------------------------------ messages

    def send(self, x: Any, dst: int, tag: int = 0) -> None:
        """Send `x` to rank `dst`; messages between two ranks arrive in order and the
        receiver checks the tag and size."""
        self.isend(x, dst, tag).wait() if self._p2p_pending("send", dst) else \
            self._message("send", x, dst, tag)

    def recv(self, out: Any, src: int, tag: int = 0) -> Any:
        """Receive the next message from rank `src` into `out` (which sets its size)."""
        if self._p2p_pending("recv", src):
            return self.irecv(out, src, tag).wait()
        return self._message("recv", out, src, tag)

    def isend(self, x: Any, dst: int, tag: int = 0) -> Work:
        """`send` in the background (one queue per destination)."""
        self._check_peer(dst, "isend")
        return self._p2p_worker("send", dst).submit(lambda: self._message("send", x, dst, tag))

    def irecv(self, out: Any, src: int, tag: int = 0) -> Work:
        """`recv` in the background (one queue per source); `wait()` returns `out`."""
        self._check_peer(src, "irecv")
        return self._p2p_worker("recv", src).submit(lambda: self._message("recv", out, src, tag))

    def _message(self, kind: str, x: Any, peer: int, tag: int) -> Any:
        self._check_peer(peer, kind)
        if not 0 <= tag < 2**31:
            raise CommError(f"{kind}: tag {tag} is out of range", hint="use 0 <= tag < 2**31")
        if self._broken is not None:
            raise CommError(f"this communicator was aborted: {self._broken}")
        if kind == "send":
            buf, code, n = _operand(x, "send")
            back = None
        else:
            _, code, n = _operand(x, "recv")
            buf, back = _writable(x, code, n, "recv")
        try:
            getattr(self._t, kind)(buf, n * _ITEMSIZE[code], peer, tag)
        except self._t.errors as e:
            self._fail(e)
        if back:
            back()
        return x if kind == "recv" else None

    def _p2p_pending(self, kind: str, peer: int) -> bool:
        worker = self._p2p.get((kind, peer))
        return worker is not None and worker.pending > 0

    def _p2p_worker(self, kind: str, peer: int) -> _Worker:
        key = (kind, peer)
        if key not in self._p2p:
            self._p2p[key] = _Worker(f"tessera-{kind}-{peer}")
        return self._p2p[key]

    # ------------------------------------------------------------------ objects, groups

    def allgather_object(self, obj: Any) -> list[Any]:
        """Every rank's picklable `obj`, in rank order."""
        import pickle

        data = np.frombuffer(pickle.dumps(obj), np.uint8)
        sizes = self.allgather(np.array([data.size], np.int64))[:, 0].tolist()
        gathered = self.allgatherv(data, sizes)
        offsets = np.cumsum([0, *sizes])
        return [pickle.loads(gathered[offsets[r]:offsets[r + 1]].tobytes())
                for r in range(self.size)]

    def split(self, color: int | None, key: int = 0) -> Communicator | None:
        """A communicator per `color` (ordered by `key`, then rank); every rank must call it.
        A rank with color None joins none and gets None."""
        from tessera.dist.group import create

        if color is not None and (not isinstance(color, (int, np.integer)) or color < 0):
            raise CommError(f"split: color must be a non-negative int or None, got {color!r}")
        boot = _SplitBootstrap(self, color, key)
        engine = self._engine.split(color, key) if self._engine is not None else None
        return create(boot, timeout=self.timeout, engine=engine, my_node=self._node_key)

    # ------------------------------------------------------------------ checks

    def _check_rank(self, r: Any, who: str, what: str) -> None:
        if not isinstance(r, (int, np.integer)) or not 0 <= r < self.size:
            raise CommError(f"{who}: {what} {r!r} is not a rank of this communicator "
                            f"(size {self.size})")

    def _check_peer(self, peer: int, who: str) -> None:
        self._check_rank(peer, who, "peer")
        if peer == self.rank:
            raise CommError(f"{who}: rank {peer} is this rank", hint="copy the data locally")

    def _even_blocks(self, x: Any, who: str) -> int:
        """Rows per rank of `x`'s dim 0, split evenly over the ranks."""
        rows, _ = _rows(x)
        if rows % self.size:
            raise ShapeError(f"{who}: dim 0 ({rows}) is not a multiple of the "
                             f"communicator's size ({self.size})",
                             hint=f"use {who}v for uneven blocks")
        return rows // self.size

    def _check_counts(self, counts: Sequence[int], who: str) -> list[int]:
        try:
            counts = [operator.index(c) for c in counts]
        except TypeError:
            raise ShapeError(f"{who}: counts must be integers, got {list(counts)}") from None
        if len(counts) != self.size or min(counts, default=0) < 0:
            raise ShapeError(f"{who}: counts must be {self.size} non-negative row counts, got "
                             f"{counts}")
        return counts

    def _counts(self, counts: Sequence[int] | None, rows: int, who: str) -> list[int]:
        if counts is None:
            return self.allgather(np.array([rows], np.int64))[:, 0].tolist()
        counts = self._check_counts(counts, who)
        if counts[self.rank] != rows:
            raise ShapeError(f"{who}: counts[{self.rank}] = {counts[self.rank]} but x has "
                             f"{rows} rows")
        return counts

    def _count_matrix(self, send_counts: list[int]) -> list[list[int]]:
        """Every rank's send counts (row i: what rank i sends), exchanged in one allgather."""
        if self.size == 1:
            return [send_counts]
        return self.allgather(np.array(send_counts, np.int64)).tolist()

    def close(self) -> None:
        """Stop the background workers; the segment is freed when the object is."""
        self._coll.stop()
        for worker in self._p2p.values():
            worker.stop()


def _shares_memory(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return np.shares_memory(a, b)
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return False
    sa, sb = a.untyped_storage(), b.untyped_storage()
    return sa.data_ptr() == sb.data_ptr() and sa.nbytes() > 0


def _overlap(a: Any, b: Any) -> bool:
    """Whether two arrays/tensors may share memory (a cheap bounds check)."""
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return np.may_share_memory(a, b)
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


def _clone(x: Any) -> Any:
    return x.copy() if isinstance(x, np.ndarray) else x.clone()


def node_key() -> str:
    """What identifies this machine: the host name and the kernel's boot id."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}:{boot}"


class _SplitBootstrap(Bootstrap):
    """The members of one color of a split, exchanging through the parent communicator.
    Every parent rank takes part in every round, so all colors are built together."""

    kind = "split"

    def __init__(self, parent: Communicator, color: int | None, key: int):
        self.parent = parent
        table = parent.allgather_object((color, key))
        self.members = sorted((k, r) for r, (c, k) in enumerate(table) if c == color and
                              c is not None)
        self.ranks = [r for _, r in self.members]
        self.rank = self.ranks.index(parent.rank) if color is not None else -1  # -1: outside
        self.size = len(self.ranks)

    def allgather(self, obj: Any) -> list[Any]:
        table = self.parent.allgather_object(obj)
        return [table[r] for r in self.ranks]


# -- profiling: while a profile is active, the collectives below are swapped for timed
# versions on the class (so a call with no profile costs nothing extra)
_PROFILED = ("allreduce", "reduce", "broadcast", "allgather", "allgatherv", "reduce_scatter",
             "reduce_scatterv", "alltoall", "alltoallv", "barrier", "send", "recv", "isend",
             "irecv")
_PLAIN = {name: getattr(Communicator, name) for name in _PROFILED}


def _timed(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    """`method` reporting each call as a "collective" event: op, bytes of the buffer it
    sends (or, for recv, receives), rank, ranks, and whether it was asynchronous (then
    the event is the submission)."""
    def timed(self: Communicator, *args: Any, **kwargs: Any) -> Any:
        session = profiling.active
        if session is None:
            return method(self, *args, **kwargs)
        t0 = profiling.now()
        out = method(self, *args, **kwargs)
        t1 = profiling.now()
        x = args[0] if args else kwargs.get("x", kwargs.get("out"))
        session.record("collective", name, t0, t1, {
            "bytes": int(getattr(x, "nbytes", 0) or 0), "rank": self.rank, "ranks": self.size,
            "async": bool(kwargs.get("async_op")) or name in ("isend", "irecv")})
        return out
    timed.__name__ = timed.__qualname__ = name
    timed.__doc__ = method.__doc__
    return timed


def _profile(session: profiling.Session | None) -> None:
    for name, method in _PLAIN.items():
        setattr(Communicator, name, method if session is None else _timed(name, method))


profiling.subscribe(_profile)
