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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tessera.dist.comm import Communicator
from tessera.errors import CommError, DtypeError, ShapeError, TesseraError

__all__ = ["DispatchHandle", "combine", "dispatch"]

_X_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_ID_DTYPES = (torch.int32, torch.int64)


@dataclass(frozen=True)
class DispatchHandle:
    """What `combine` needs to send a dispatch's rows back and weigh them: the pair order
    and row counts of the exchange, the routing weights and the tokens' dtype."""

    comm: Communicator
    order: torch.Tensor            # [T*k] pairs t*k + j, in the order they were sent
    weights: torch.Tensor          # [T, k] float32
    send_counts: list[int]         # rows sent to each rank
    recv_counts: list[int]         # rows received from each rank
    grouping: torch.Tensor | None  # recv_x[i] = arrived row grouping[i]; None: same order
    dtype: torch.dtype


def dispatch(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
             num_experts: int, comm: Communicator
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, DispatchHandle]:
    """Send row t of `x` [T, H] to the rank of each expert `topk_ids[t, j]` ([T, k] int).

    Returns (recv_x [N, H], recv_expert_ids [N] (local expert of each row), counts [L]
    (rows per local expert), handle): recv_x's rows are grouped by local expert, and
    within an expert ordered by source rank, then token, then j, so `counts` are the
    `sizes` of a grouped GEMM. `topk_weights` [T, k] are kept for `combine`.
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
    local = num_experts // comm.size
    problem = _check_inputs(x, topk_ids, topk_weights, num_experts, where)
    # table[r] = [problem?, rows for each of rank r's experts]; the alltoall gives every
    # rank what each peer sends it, and whether any peer's inputs were invalid.
    table = torch.zeros(comm.size, 1 + local, dtype=torch.int64)
    if problem is None:
        ids = topk_ids.reshape(-1).long()
        table[:, 1:] = torch.bincount(ids, minlength=num_experts).view(comm.size, local)
    else:
        table[:, 0] = 1
    arrived = comm.alltoall(table)
    if problem is not None:
        raise problem
    bad = arrived[:, 0].nonzero().flatten().tolist()
    if bad:
        raise CommError(f"dispatch: rank{'s' if len(bad) > 1 else ''} "
                        f"{', '.join(map(str, bad))} passed invalid inputs", where=where,
                        hint="see the error raised on that rank")

    order = torch.argsort(ids, stable=True)  # by expert, so by rank, then local expert
    send_counts = table[:, 1:].sum(1).tolist()
    recv_table = arrived[:, 1:]  # [source rank, local expert]
    recv_counts = recv_table.sum(1).tolist()
    recv_x = comm.alltoallv(x.index_select(0, order // topk_ids.shape[1]), send_counts,
                            recv_counts)
    grouping = None
    if local > 1 and comm.size > 1:
        grouping = _grouping(recv_table)
        recv_x = recv_x.index_select(0, grouping)
    counts = recv_table.sum(0)
    recv_ids = torch.repeat_interleave(torch.arange(local), counts)
    handle = DispatchHandle(comm, order, topk_weights.float(), send_counts, recv_counts,
                            grouping, x.dtype)
    return recv_x, recv_ids, counts, handle


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
    rows = sum(handle.recv_counts)
    if not isinstance(y, torch.Tensor) or y.dim() != 2 or y.shape[0] != rows:
        got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ShapeError(f"combine: y must be [{rows}, H], one row per row dispatch "
                         f"delivered here, got {got}", where=f"rank {comm.rank} of {comm.size}",
                         hint="return one output row per row of recv_x, in the same order")
    if handle.grouping is not None:
        y = torch.empty_like(y).index_copy_(0, handle.grouping, y)
    back = comm.alltoallv(y, handle.recv_counts, handle.send_counts)
    tokens, k = handle.weights.shape
    pairs = torch.empty(tokens * k, y.shape[1], dtype=torch.float32)
    pairs.index_copy_(0, handle.order, back.float())
    out = torch.einsum("tk,tkh->th", handle.weights, pairs.view(tokens, k, y.shape[1]))
    return out.to(handle.dtype)


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


def _grouping(table: torch.Tensor) -> torch.Tensor:
    """For rows that arrived grouped by source rank, then local expert (`table` [source,
    expert] of row counts), the arrival index of each row when grouped by expert first."""
    counts = table.reshape(-1)
    starts = (counts.cumsum(0) - counts).view(table.shape)  # where block (r, e) arrived
    sizes = table.t().reshape(-1)                           # blocks in (e, r) order
    first = starts.t().reshape(-1)
    offsets = sizes.cumsum(0) - sizes
    within = torch.arange(int(sizes.sum())) - torch.repeat_interleave(offsets, sizes)
    return torch.repeat_interleave(first, sizes) + within
