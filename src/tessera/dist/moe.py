"""Expert parallelism for mixture-of-experts layers: `dispatch` sends every token to the
ranks that hold its chosen experts, `combine` brings the experts' outputs back and sums
them with the router's weights.

    recv_x, recv_ids, counts, handle = dispatch(x, topk_ids, topk_weights, num_experts, comm)
    y = grouped_gemm(recv_x, w_local, counts)   # rows arrive grouped by local expert
    out = combine(y, handle)                    # out[t] = sum_j w[t, j] * y of (t, j)

Experts are sharded contiguously: expert e lives on rank e // (num_experts // size) as its
local expert e % (num_experts // size). A token is sent once per (token, expert) pair, not
once per destination rank, so what a rank receives is already grouped-GEMM input with no
per-row expert lists (a token with two experts on one rank travels twice). Routing weights
never travel: they stay with their tokens and `combine` applies them in float32.

Both calls are collective: every rank calls them in the same order with the same
`num_experts`, also with no tokens. `comm` and `num_experts` (the same on every rank) are
checked first; a rank with invalid tensors raises its error after one small exchange, in
which every other rank learns of it and raises `CommError`, so nobody waits for a peer
that has given up.

Cost: besides the exchanges, each call makes one pass over its rows. `dispatch` gathers
the rows into a send buffer in exchange order; `combine` sums each token's k weighted rows
straight from what came back (gather, multiply and add in one pass: `embedding_bag`).
Rows reach a rank grouped by source rank: small exchanges regroup them by local expert on
arrival (one more pass, and one in `combine` to send them back), large ones (from
`_SPLIT_MIN_BYTES` received per rank per extra local expert) run one all-to-all-v per
local expert so that the rows land in place. Send and arrival buffers are scratch space
kept per communicator (two, grown to the largest call, freed with the communicator), as a
large new tensor's page faults cost about as much as the copy into it; what the calls
return is always a new tensor, or dispatch's `out`.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from tessera.dist.comm import Communicator
from tessera.errors import CommError, DtypeError, ShapeError, TesseraError

__all__ = ["DispatchHandle", "combine", "dispatch"]

_X_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_ID_DTYPES = (torch.int32, torch.int64)
# Exchanging per local expert costs a collective's latency per extra expert (tens of
# microseconds) and saves a copy of what a rank receives: worth it from about this many
# bytes received per rank for each extra expert.
_SPLIT_MIN_BYTES = 1 << 20
# Smaller scratch buffers come from malloc's free lists without page faults.
_SCRATCH_MIN_BYTES = 1 << 18


@dataclass(frozen=True)
class DispatchHandle:
    """What `combine` needs to send a dispatch's rows back and weigh them: where each
    (token, j) pair's row went, the row counts of the exchanges, the routing weights and
    the tokens' dtype."""

    comm: Communicator
    slots: torch.Tensor              # [T, k]: pair (t, j)'s row in the send order
    weights: torch.Tensor            # [T, k] float32
    sends: list[list[int]]           # per exchange, rows sent to each rank
    recvs: list[list[int]]           # per exchange, rows received from each rank
    ungroup: torch.Tensor | None     # arrived row i is recv_x row ungroup[i]; None: same
    dtype: torch.dtype

    @property
    def send_counts(self) -> list[int]:
        """Rows sent to each rank (over all exchanges)."""
        return [sum(c) for c in zip(*self.sends, strict=True)]

    @property
    def recv_counts(self) -> list[int]:
        """Rows received from each rank (over all exchanges)."""
        return [sum(c) for c in zip(*self.recvs, strict=True)]


def dispatch(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
             num_experts: int, comm: Communicator, *, out: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, DispatchHandle]:
    """Send row t of `x` [T, H] to the rank of each expert `topk_ids[t, j]` ([T, k] int).

    Returns (recv_x [N, H], recv_expert_ids [N] (local expert of each row), counts [L]
    (rows per local expert), handle): recv_x's rows are grouped by local expert, and
    within an expert ordered by source rank, then token, then j, so `counts` are the
    `sizes` of a grouped GEMM. `topk_weights` [T, k] are kept for `combine`.

    recv_x is a new tensor, or with `out` (a contiguous [M, H] CPU tensor of x's dtype,
    not x's memory: say the previous step's recv_x buffer once done with it) out[:N] if
    M >= N, else a new tensor. N is only known once the ranks have exchanged counts, so
    size `out` for the most rows this rank may receive; reusing it saves the page faults
    of a new large tensor (about as long as the copy into it).
    """
    if not isinstance(comm, Communicator):
        raise CommError(f"dispatch: comm must be a tessera.dist Communicator, got "
                        f"{type(comm).__name__}", hint="comm = tessera.dist.init()")
    where = f"rank {comm.rank} of {comm.size}"
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or \
            num_experts < 1 or num_experts % comm.size:
        raise ShapeError(f"dispatch: num_experts={num_experts!r} cannot be split evenly over "
                         f"{comm.size} ranks", where=where,
                         hint="use a positive multiple of the communicator's size")
    size, local = comm.size, num_experts // comm.size
    problem = _check_inputs(x, topk_ids, topk_weights, num_experts, where) or \
        _check_out(out, x, where)
    # table[r] = [problem?, bytes this rank sends, rows for each of rank r's experts]; the
    # alltoall gives every rank what each peer sends it, whether any peer's inputs were
    # invalid, and every rank's total (which picks the same exchange plan everywhere).
    table = np.zeros((size, 2 + local), np.int64)
    if problem is None:
        ids = topk_ids.reshape(-1).numpy().astype(np.int64, copy=False)
        table[:, 1] = ids.size * x.shape[1] * x.element_size()
        table[:, 2:] = np.bincount(ids, minlength=num_experts).reshape(size, local)
    else:
        table[:, 0] = 1
    arrived = comm.alltoall(table)
    if problem is not None:
        raise problem
    bad = np.flatnonzero(arrived[:, 0]).tolist()
    if bad:
        raise CommError(f"dispatch: rank{'s' if len(bad) > 1 else ''} "
                        f"{', '.join(map(str, bad))} passed invalid inputs", where=where,
                        hint="see the error raised on that rank")

    tokens, k = topk_ids.shape
    hidden = x.shape[1]
    x = x.detach()
    recv_table = arrived[:, 2:]  # [source rank, local expert]
    counts = recv_table.sum(0)
    n = int(counts.sum())
    recv_x = out[:n] if out is not None and len(out) >= n else \
        torch.empty(n, hidden, dtype=x.dtype)
    split = size > 1 and local > 1 and \
        int(arrived[:, 1].sum()) >= size * (local - 1) * _SPLIT_MIN_BYTES
    # Send order: by destination rank, then local expert (the expert id), or with one
    # exchange per local expert by local expert, then rank; ties keep pair order t*k + j.
    # (Index arithmetic in numpy: a few microseconds per call instead of tens in torch ops.)
    order = np.argsort(ids % local * size + ids // local if split else ids, kind="stable")
    rows = torch.from_numpy(order // k)
    ungroup = None
    if size == 1:
        sends = recvs = [[n]]
        torch.index_select(x, 0, rows, out=recv_x)
    else:
        send = torch.index_select(x, 0, rows, out=_scratch(comm, 0, len(rows), hidden, x.dtype))
        send_table = table[:, 2:]  # [destination rank, its local expert]
        if split:
            sends, recvs = send_table.T.tolist(), recv_table.T.tolist()
            _exchange(comm, send, sends, recvs, recv_x)
        else:
            sends, recvs = [send_table.sum(1).tolist()], [recv_table.sum(1).tolist()]
            if local == 1:
                comm.alltoallv(send, sends[0], recvs[0], out=recv_x)
            else:  # arrived by source rank, then expert: regroup by expert
                grouping = _grouping(recv_table)
                arrival = _scratch(comm, 1, n, hidden, x.dtype)
                comm.alltoallv(send, sends[0], recvs[0], out=arrival)
                torch.index_select(arrival, 0, torch.from_numpy(grouping), out=recv_x)
                ungroup = torch.from_numpy(_inverse(grouping))
    recv_ids = torch.from_numpy(np.repeat(np.arange(local), counts))
    handle = DispatchHandle(comm, torch.from_numpy(_inverse(order).reshape(tokens, k)),
                            topk_weights.float().contiguous(),
                            sends, recvs, ungroup, x.dtype)
    return recv_x, recv_ids, torch.from_numpy(counts), handle


def combine(y: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
    """Send each row of `y` [N, H'] (the experts' outputs for `dispatch`'s recv_x, same
    order) back to its token's rank and return out [T, H'] in the tokens' dtype, with
    out[t] = sum_j topk_weights[t, j] * (row of pair (t, j)), summed in float32.

    Collective; a `y` with the wrong number of rows raises before any communication, so
    that rank's peers wait for it until the communicator's timeout.
    """
    if not isinstance(handle, DispatchHandle):
        raise TesseraError(f"combine: handle must be what dispatch returned, got "
                           f"{type(handle).__name__}")
    comm = handle.comm
    rows = sum(map(sum, handle.recvs))
    if not isinstance(y, torch.Tensor) or y.dim() != 2 or y.shape[0] != rows:
        got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ShapeError(f"combine: y must be [{rows}, H], one row per row dispatch "
                         f"delivered here, got {got}", where=f"rank {comm.rank} of {comm.size}",
                         hint="return one output row per row of recv_x, in the same order")
    y = y.detach().contiguous()
    width = y.shape[1]
    back = y  # one process: the rows are already in send order
    if comm.size > 1:
        if handle.ungroup is not None:  # back to arrival order, to return as they came
            y = torch.index_select(y, 0, handle.ungroup,
                                   out=_scratch(comm, 0, rows, width, y.dtype))
        back = _scratch(comm, 1, handle.slots.numel(), width, y.dtype)
        _exchange(comm, y, handle.recvs, handle.sends, back)
    if back.dtype != torch.float32:
        back = _scratch(comm, 0, back.shape[0], width, torch.float32).copy_(back)
    tokens = handle.slots.shape[0]
    if width == 0:
        return torch.zeros(tokens, 0, dtype=handle.dtype)
    # out[t] = sum_j weights[t, j] * back[slots[t, j]], j in order, in one pass
    out = F.embedding_bag(handle.slots, back, mode="sum", per_sample_weights=handle.weights)
    return out.to(handle.dtype)


def _inverse(p: np.ndarray) -> np.ndarray:
    """The inverse permutation of `p`: q[p[i]] = i."""
    q = np.empty_like(p)
    q[p] = np.arange(len(p))
    return q


def _exchange(comm: Communicator, send: torch.Tensor, sends: list[list[int]],
              recvs: list[list[int]], out: torch.Tensor) -> None:
    """All-to-all-v of `send`'s rows into `out`, as one exchange per entry of
    sends/recvs (rows to / from each rank), each on the next rows of both."""
    at_send = at_out = 0
    for s, r in zip(sends, recvs, strict=True):
        ns, nr = sum(s), sum(r)
        comm.alltoallv(send[at_send:at_send + ns], s, r, out=out[at_out:at_out + nr])
        at_send, at_out = at_send + ns, at_out + nr


_SCRATCH: weakref.WeakKeyDictionary[Communicator, list[torch.Tensor | None]] = \
    weakref.WeakKeyDictionary()


def _scratch(comm: Communicator, slot: int, rows: int, cols: int,
             dtype: torch.dtype) -> torch.Tensor:
    """Scratch buffer `slot` (0 or 1) of `comm` as a [rows, cols] tensor, never handed to
    the caller: from _SCRATCH_MIN_BYTES kept for the next call (grown when too small), as
    a large new tensor's page faults cost about as much as the copy into it."""
    nbytes = rows * cols * dtype.itemsize
    if nbytes < _SCRATCH_MIN_BYTES:
        return torch.empty(rows, cols, dtype=dtype)
    buffers = _SCRATCH.get(comm)
    if buffers is None:
        buffers = _SCRATCH[comm] = [None, None]
    buf = buffers[slot]
    if buf is None or buf.numel() < nbytes:
        buffers[slot] = buf = None  # free the old one first
        with torch.inference_mode(False):  # usable outside inference mode later
            buf = buffers[slot] = torch.empty(nbytes + nbytes // 8, dtype=torch.uint8)
    return buf[:nbytes].view(dtype).view(rows, cols)


def _check_inputs(x: object, ids: object, weights: object, num_experts: int,
                  where: str) -> TesseraError | None:
    """The first thing wrong with dispatch's tensors, or None."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        return ShapeError(f"dispatch: x must be a [tokens, hidden] tensor, got {got}",
                          where=where)
    if x.dtype not in _X_DTYPES or x.device.type != "cpu":
        return DtypeError(f"dispatch: x is {x.dtype} on {x.device}", where=where,
                          hint="use a CPU tensor of float32, float16, bfloat16 or float64")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != x.shape[0] \
            or ids.shape[1] < 1:
        got = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        return ShapeError(f"dispatch: topk_ids must be [{x.shape[0]}, k] with k >= 1 (one "
                          f"row per token of x), got {got}", where=where)
    if ids.dtype not in _ID_DTYPES:
        return DtypeError(f"dispatch: topk_ids is {ids.dtype}", where=where,
                          hint="expert ids are int64 or int32 (what torch.topk returns)")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_experts):
        return ShapeError(f"dispatch: topk_ids holds experts {int(ids.min())}.."
                          f"{int(ids.max())}, outside 0..{num_experts - 1}", where=where,
                          hint="every id must name one of the num_experts experts")
    if not isinstance(weights, torch.Tensor) or weights.shape != ids.shape:
        got = tuple(weights.shape) if isinstance(weights, torch.Tensor) else \
            type(weights).__name__
        return ShapeError(f"dispatch: topk_weights must have topk_ids' shape "
                          f"{tuple(ids.shape)}, got {got}", where=where)
    if not weights.is_floating_point():
        return DtypeError(f"dispatch: topk_weights is {weights.dtype}", where=where,
                          hint="routing weights are floating point")
    return None


def _check_out(out: object, x: torch.Tensor, where: str) -> TesseraError | None:
    """What is wrong with dispatch's `out` (for a valid x), or None."""
    if out is None:
        return None
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] != x.shape[1] \
            or out.dtype != x.dtype or out.device.type != "cpu" or not out.is_contiguous() \
            or out.requires_grad or (out.numel() and x.numel() and
                                     out.untyped_storage().data_ptr() ==
                                     x.untyped_storage().data_ptr()):
        got = f"{out.dtype} {tuple(out.shape)}" if isinstance(out, torch.Tensor) else \
            type(out).__name__
        return ShapeError(f"dispatch: out must be a contiguous [rows, {x.shape[1]}] CPU "
                          f"tensor of {x.dtype} that does not need grad, apart from x, got "
                          f"{got}", where=where,
                          hint="allocate it with torch.empty(rows, H, dtype=x.dtype)")
    return None


def _grouping(table: np.ndarray) -> np.ndarray:
    """For rows that arrived grouped by source rank, then local expert (`table` [source,
    expert] of row counts), the arrival index of each row when grouped by expert first."""
    counts = table.reshape(-1)
    starts = (np.cumsum(counts) - counts).reshape(table.shape)  # where block (r, e) arrived
    sizes = table.T.reshape(-1)                                  # blocks in (e, r) order
    first = starts.T.reshape(-1)
    offsets = np.cumsum(sizes) - sizes
    within = np.arange(int(sizes.sum())) - np.repeat(offsets, sizes)
    return np.repeat(first, sizes) + within
