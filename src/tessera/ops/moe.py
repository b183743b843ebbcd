"""Mixture-of-experts ops (Mixtral, Qwen-MoE, DeepSeek-style layers): top-k, routing, the
permutation of token rows into expert groups and back, grouped expert GEMMs, and the
whole layer as one op, `fused_moe`, on the GEMM templates.

fused_moe for T tokens, E experts, top-k, hidden H, intermediate I, in six native calls
whatever T and E (nothing per expert in Python; experts no token picked are never read):

  route    logits [T, E] -> weights [T, k] float32, ids [T, k]         a program per token
  sort     ids -> counts [E], row_map [T, k] (each choice's row in its expert's group)
  gather   x [T, H] -> rows [T * k, H] grouped by expert                a program per token
  experts  grouped_gemm(rows, w_gate_up, swiglu) [T * k, I], then grouped_gemm(., w_down)
  combine  out[t] = sum_j weights[t, j] * y[row_map[t, j]], in float32  a program per token

Decode (up to 16 tokens) takes two launches instead: route, then sort, gather, both expert
products and the combine in one (templates/gemm/moe.c), their arguments planned once per
call signature (`_Decode`), so a repeated decode step costs little Python.

Expert weights are [E, K, N] (x @ w[e]), any strides: stacked nn.Linear weights [E, N, K]
pass as `w.transpose(1, 2)`, without a copy. Gate and up projections are one [E, H, 2I]
tensor, [gate | up] along N. Quantized experts are the (data, scales) pairs of
`tessera.ops.quantize` on the [E, K, N] weights.
"""

from __future__ import annotations

from typing import Any

import torch

import tessera.lang as tl
from tessera.errors import DtypeError, ShapeError, TesseraError
from tessera.lang.jit import Specialization
from tessera.ops._launch import (
    FLOATS,
    ArgumentError,
    check_dim,
    check_tensor,
    launch,
    spec,
)
from tessera.ops.quant import dequantize_reference, quantized_matrix
from tessera.ops.registry import op
from tessera.templates.gemm import (
    MoeDecode,
    QuantizedMatrix,
    grouped_gemm,
    moe_decode,
    moe_decode_fits,
)

__all__ = ["fused_moe", "grouped_matmul", "moe_permute", "moe_route", "moe_unpermute", "topk"]

_IDS = (torch.int64, torch.int32)
_TOPK_DTYPES = (*FLOATS, torch.int32, torch.int8, torch.uint8)
_SCORINGS = ("softmax", "sigmoid")
_EXPERT_TILES = (64, 256, 1024, 4096, 1 << 16)  # a token's logits are one tile
_MAX_EXPERTS = _EXPERT_TILES[-1]
_ROW_TILES = (128, 1024)  # columns of a row per program of gather and combine
_DECODE_TOKENS = 16  # up to this many tokens, the experts run in one unpacked launch
_MAX_DECODES = 256  # decode plans kept (a model has one per MoE layer and token count)


# -- kernels ---------------------------------------------------------------------------------
@tl.kernel
def _worse(a, ia, b, ib, LARGEST: tl.constexpr):
    """Whether (a, index ia) ranks after (b, ib): by value (NaN above everything, as in
    torch), then by index."""
    anan = a != a
    bnan = b != b
    tie = ((a == b) | (anan & bnan)) & (ia > ib)
    beaten = (bnan & ~anan) | (a < b) if LARGEST else (anan & ~bnan) | (a > b)
    return beaten | tie


@tl.kernel
def _sift(values, indices, a, b, v, iv, size, LARGEST: tl.constexpr):
    """Put (v, iv) at the root of the heap values/indices[a, :size, b] (worst at the root)
    and sift it down to its place."""
    hole = 0
    going = True
    while going:
        c = 2 * hole + 1
        going = c < size
        if going:
            cv = values[a, c, b]
            ci = indices[a, c, b]
            dv = values[a, c + 1, b]
            di = indices[a, c + 1, b]
            if (c + 1 < size) & _worse(dv, di, cv, ci, LARGEST):
                c = c + 1
                cv = dv
                ci = di
            going = _worse(cv, ci, v, iv, LARGEST)
            if going:
                values[a, hole, b] = cv
                indices[a, hole, b] = ci
                hole = c
    values[a, hole, b] = v
    indices[a, hole, b] = iv


@tl.kernel
def topk_kernel(x, values, indices, worst, LARGEST: tl.constexpr, SORTED: tl.constexpr):
    """Top-k of the row x[a, :, b] into values/indices[a, :k, b]: a heap of the best k
    (worst at the root), filled with stand-ins (`worst` at index n) that every element
    beats; one pass over the row replaces the root by each better element; then
    heap-sorted best first (each step moves the root to the end of a shrinking heap)."""
    b = tl.program_id(0)
    a = tl.program_id(1)
    n = x.shape[1]
    k = values.shape[1]
    for j in range(k):
        values[a, j, b] = worst
        indices[a, j, b] = n
    for s in range(n + k - 1 if SORTED else n):
        size = k
        if s < n:
            v = x[a, s, b]
            iv = s
            go = _worse(values[a, 0, b], indices[a, 0, b], v, iv, LARGEST)
        else:
            size = n + k - 1 - s
            v = values[a, size, b]
            iv = indices[a, size, b]
            values[a, size, b] = values[a, 0, b]
            indices[a, size, b] = indices[a, 0, b]
            go = True
        if go:
            _sift(values, indices, a, b, v, iv, size, LARGEST)


@tl.kernel
def _group_mask(sel, pos, valid, size, n_group, topk_group, TOP2: tl.constexpr):
    """The experts of the topk_group best groups of `size` consecutive experts
    (DeepSeek's group-limited routing): a group scores its best selection score, or with
    TOP2 the sum of its two best; ties go to the lower group."""
    group = pos // size
    gscore = tl.zeros(pos.shape) - float("inf")
    for g in range(n_group):
        seg = tl.where(valid & (group == g), sel, -float("inf"))
        best = tl.max(seg)
        if TOP2:
            first = tl.min(tl.where(seg == best, pos, pos.shape[0]))
            best = best + tl.max(tl.where(pos == first, -float("inf"), seg))
        gscore = tl.where(group == g, best, gscore)
    allowed = pos < 0
    for _c in range(topk_group):
        m = tl.max(tl.where(allowed | ~valid, -float("inf"), gscore))
        i = tl.min(tl.where(~allowed & valid & (gscore == m), pos, pos.shape[0]))
        allowed = allowed | (group == i // size)
    return allowed


@tl.kernel
def route_kernel(logits, bias, weights, ids, bad, scale, group_size, n_group, topk_group,
                 BE: tl.constexpr, SIGMOID: tl.constexpr, BIAS: tl.constexpr,
                 GROUPED: tl.constexpr, RENORM: tl.constexpr):
    """Token t's experts: scores (softmax or sigmoid of its logits), the k best by score
    (+ bias; GROUPED: within the best groups) with ties to the lower expert, their scores
    as weights (renormalized to sum to 1), times `scale`. bad[t] counts the row's NaN and
    infinite logits."""
    t = tl.program_id(0)
    pos = tl.arange(0, BE)
    valid = pos < logits.shape[1]
    z = logits[t, 0:BE].to(tl.float32)
    bad[t] = tl.sum(tl.where(valid & (z - z != 0), 1, 0))
    if SIGMOID:
        p = tl.sigmoid(z)
    else:
        zm = tl.where(valid, z, -float("inf"))
        ez = tl.exp(zm - tl.max(zm))
        p = ez / tl.sum(ez)
    sel = p + bias[0:BE] if BIAS else p
    taken = ~valid
    if GROUPED:
        taken = taken | ~_group_mask(sel, pos, valid, group_size, n_group, topk_group, BIAS)
    total = 0.0
    for j in range(ids.shape[1]):
        m = tl.max(tl.where(taken, -float("inf"), sel))
        i = tl.min(tl.where((sel == m) & ~taken, pos, BE))
        w = tl.sum(tl.where(pos == i, p, 0.0))
        ids[t, j] = i
        weights[t, j] = w
        total += w
        taken = taken | (pos == i)
    if RENORM:
        total = total + 1e-20 if SIGMOID else total
    for j in range(ids.shape[1]):
        weights[t, j] = weights[t, j] / total * scale if RENORM else weights[t, j] * scale


@tl.kernel
def sort_kernel(ids, counts, starts, row_map, bad):
    """One program: rows per expert (counts) and, for each choice ids[t, j], its row in the
    expert-major order (a stable counting sort). bad[0] counts ids out of [0, E)."""
    n_experts = counts.shape[0]
    for e in range(n_experts):
        counts[e] = 0
    n_bad = 0
    for t in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            e = ids[t, j]
            if (e >= 0) & (e < n_experts):
                counts[e] += 1
            else:
                n_bad += 1
    run = 0
    for e in range(n_experts):
        starts[e] = run
        run += counts[e]
    for t in range(ids.shape[0]):
        for j in range(ids.shape[1]):
            e = ids[t, j]
            row = -1
            if (e >= 0) & (e < n_experts):
                row = starts[e]
                starts[e] = row + 1
            row_map[t, j] = row
    bad[0] = n_bad


@tl.kernel
def gather_kernel(x, row_map, out, BH: tl.constexpr):
    """Token t's row (a block of BH columns) copied to its k rows of the expert groups."""
    h = tl.program_id(0) * BH
    t = tl.program_id(1)
    row = x[t, h:h + BH]
    for j in range(row_map.shape[1]):
        out[row_map[t, j], h:h + BH] = row


@tl.kernel
def combine_kernel(y, row_map, weights, out, BH: tl.constexpr):
    """out[t] = sum over j of weights[t, j] * y[row_map[t, j]], in float32."""
    h = tl.program_id(0) * BH
    t = tl.program_id(1)
    acc = tl.zeros((BH,))
    for j in range(row_map.shape[1]):
        acc += weights[t, j] * y[row_map[t, j], h:h + BH]
    out[t, h:h + BH] = acc


def _run(kernel: tl.Kernel, grid: tuple[int, int, int], tensors: list[torch.Tensor],
         scalars: tuple[Any, ...] = (), **const: Any) -> None:
    """Launch `kernel` on these tensors (any strides) and scalars, compiling the
    specialization on first use."""
    launch(_specialization(kernel, tensors, scalars, const), grid, *_flat(tensors), *scalars)


def _specialization(kernel: tl.Kernel, tensors: list[torch.Tensor], scalars: tuple[Any, ...],
                    const: dict[str, Any]) -> Specialization:
    """`kernel` specialized for tensors of these dtypes, ranks and unit last strides."""
    layout = tuple([(t.dtype, t.dim(), t.stride(-1) == 1) for t in tensors])
    key = (kernel, layout, tuple(map(type, scalars)), *const.items())
    s = _SPECS.get(key)
    if s is None:
        s = _SPECS[key] = kernel.specialize(*(spec(*lay) for lay in layout), *scalars,
                                            **const)
    return s


def _flat(tensors: list[torch.Tensor]) -> list[Any]:
    """The launch arguments of these tensors: each one's address, sizes and strides."""
    flat: list[Any] = []
    for t in tensors:
        flat += (t.data_ptr(), *t.shape, *t.stride())
    return flat


_SPECS: dict[tuple, Specialization] = {}


def _width(n: int, menu: tuple[int, ...]) -> int:
    """The first tile width of `menu` that holds n elements, else the last: a short menu,
    so sizes rarely compile a new specialization."""
    return next((w for w in menu if w >= n), menu[-1])


# -- topk ----------------------------------------------------------------------------------
def _worst(dtype: torch.dtype, largest: bool) -> float | int:
    """A value of `dtype` that ranks at or below every element (ties go to the lower
    index, so a stand-in at index n loses to any element)."""
    if dtype.is_floating_point:
        return -float("inf") if largest else float("nan")
    info = torch.iinfo(dtype)
    return info.min if largest else info.max


@op("topk(Tensor x, int k, int dim=-1, bool largest=True, bool sorted=True) -> "
    "(Tensor values, Tensor indices)", kind="index", reference=torch.topk,
    dtypes=tuple(str(d).removeprefix("torch.") for d in _TOPK_DTYPES),
    implements=(torch.ops.aten.topk.default,))
def topk(x: torch.Tensor, k: int, dim: int = -1, largest: bool = True, sorted: bool = True
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest (or smallest) elements along `dim` and their indices, as torch.topk.

    NaN ranks above every number (first when largest, last when smallest); equal values
    come lowest index first (torch leaves their order unspecified). One pass per row
    keeping a heap of k: O(n log k)."""
    check_tensor(x, "topk", "x", _TOPK_DTYPES)
    d = check_dim(dim, x.dim(), "topk")
    shape = x.shape if x.dim() else torch.Size((1,))
    n = shape[d]
    if not isinstance(k, int) or not 0 <= k <= n:
        raise ArgumentError(f"topk: k={k!r} is out of range for {n} elements along dim {dim}",
                            hint=f"use 0 <= k <= {n}")
    if not x.dim():  # torch gives the element itself for k = 0 too
        k = 1
    outer = shape[:d].numel()
    inner = shape[d + 1:].numel()
    out_shape = (*shape[:d], k, *shape[d + 1:])
    values = torch.empty(out_shape, dtype=x.dtype)
    indices = torch.empty(out_shape, dtype=torch.int64)
    if k and outer and inner:
        _run(topk_kernel, (inner, outer, 1),
             [x.reshape(outer, n, inner), values.view(outer, k, inner),
              indices.view(outer, k, inner)], (_worst(x.dtype, bool(largest)),),
             LARGEST=bool(largest), SORTED=bool(sorted))
    if not x.dim():
        return values.view(()), indices.view(())
    return values, indices


# -- routing ---------------------------------------------------------------------------------
def _route_reference(router_logits: torch.Tensor, top_k: int, renormalize: bool = True, *,
                     scoring: str = "softmax", correction_bias: torch.Tensor | None = None,
                     routed_scaling: float = 1.0, n_group: int = 1, topk_group: int = 1
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's Gate.forward (which reduces to Mixtral's routing for softmax scores
    without bias or groups)."""
    z = router_logits.float()
    scores = torch.sigmoid(z) if scoring == "sigmoid" else torch.softmax(z, dim=-1)
    choice = scores if correction_bias is None else scores + correction_bias.float()
    if n_group > 1:
        grouped = choice.unflatten(-1, (n_group, -1))
        group_scores = grouped.amax(-1) if correction_bias is None else \
            grouped.topk(2, dim=-1).values.sum(-1)
        best = group_scores.topk(topk_group, dim=-1).indices
        dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(-1, best, False)
        choice = grouped.masked_fill(dropped.unsqueeze(-1), -float("inf")).flatten(-2)
    ids = torch.topk(choice, top_k, dim=-1).indices
    weights = scores.gather(-1, ids)
    if renormalize:
        total = weights.sum(-1, keepdim=True)
        weights = weights / (total + 1e-20 if scoring == "sigmoid" else total)
    return weights * routed_scaling, ids


def _check_routing(router_logits: torch.Tensor, top_k: int, scoring: str,
                   correction_bias: torch.Tensor | None, n_group: int, topk_group: int,
                   op: str) -> int:
    """Checked routing arguments; returns the number of experts."""
    check_tensor(router_logits, op, "router_logits")
    if router_logits.dim() < 1:
        raise ShapeError(f"{op}: argument 'router_logits' must be [..., E], got a scalar")
    e = router_logits.shape[-1]
    if e > _MAX_EXPERTS:
        raise ShapeError(f"{op}: argument 'router_logits' has {e} experts; routing takes at "
                         f"most {_MAX_EXPERTS}")
    if not isinstance(top_k, int) or not 1 <= top_k <= e:
        raise ArgumentError(f"{op}: top_k={top_k!r} is out of range for {e} experts",
                            hint=f"use 1 <= top_k <= {e}")
    if scoring not in _SCORINGS:
        raise ArgumentError(f"{op}: scoring={scoring!r}; it takes 'softmax' (Mixtral, "
                            "Qwen-MoE) or 'sigmoid' (DeepSeek-V3)")
    if correction_bias is not None:
        check_tensor(correction_bias, op, "correction_bias")
        if tuple(correction_bias.shape) != (e,):
            raise ShapeError(f"{op}: argument 'correction_bias' must have shape ({e},), got "
                             f"{tuple(correction_bias.shape)}")
        _check_finite_bias(correction_bias, op)
    if not isinstance(n_group, int) or n_group < 1 or e % n_group:
        raise ArgumentError(f"{op}: n_group={n_group!r} must divide the {e} experts into "
                            "equal groups")
    size = e // n_group
    if n_group > 1 and (not isinstance(topk_group, int) or not 1 <= topk_group <= n_group
                        or top_k > topk_group * size
                        or (correction_bias is not None and size < 2)):
        raise ArgumentError(f"{op}: topk_group={topk_group!r} of {n_group} groups of {size} "
                            f"experts cannot supply top_k={top_k}",
                            hint="1 <= topk_group <= n_group, top_k <= topk_group * E / "
                                 "n_group (and groups of 2 or more with correction_bias)")
    return e


def _check_finite_bias(correction_bias: torch.Tensor, op: str) -> None:
    if not torch.isfinite(correction_bias).all():
        raise ArgumentError(f"{op}: argument 'correction_bias' has NaN or infinity")


def _route(logits: torch.Tensor, top_k: int, renormalize: bool, scoring: str,
           correction_bias: torch.Tensor | None, routed_scaling: float, n_group: int,
           topk_group: int, op: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing of 2-D logits [T, E] (checked): (weights, ids), raising on NaN/inf rows."""
    t = logits.shape[0]
    weights, ids, bad = _routing(t, top_k)
    if t:
        tensors = [logits, logits if correction_bias is None else correction_bias, weights,
                   ids, bad]
        s, scalars = _route_specialization(tensors, renormalize, scoring, routed_scaling,
                                           n_group, topk_group)
        launch(s, (t, 1, 1), *_flat(tensors), *scalars)
        _refuse_bad_rows(bad, op)
    return weights, ids


def _routing(tokens: int, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Buffers of the route kernel: weights, ids [T, k] and per-token flags [T]."""
    return (torch.empty((tokens, top_k), dtype=torch.float32),
            torch.empty((tokens, top_k), dtype=torch.int64),
            torch.empty(tokens, dtype=torch.int32))


def _route_specialization(tensors: list[torch.Tensor], renormalize: bool, scoring: str,
                          routed_scaling: float, n_group: int, topk_group: int
                          ) -> tuple[Specialization, tuple[Any, ...]]:
    """route_kernel's specialization for (logits, bias or logits, weights, ids, flags) and
    its scalar arguments."""
    e = tensors[0].shape[1]
    scalars = (float(routed_scaling), e // n_group, n_group, topk_group)
    return _specialization(route_kernel, tensors, scalars, {
        "BE": _width(e, _EXPERT_TILES), "SIGMOID": scoring == "sigmoid",
        "BIAS": tensors[1] is not tensors[0], "GROUPED": n_group > 1,
        "RENORM": bool(renormalize)}), scalars


def _refuse_bad_rows(bad: torch.Tensor, op: str) -> None:
    """Raise if the route kernel flagged a row of logits with NaN or infinity."""
    if bad.numpy().any():
        raise _bad_rows(bad, op)


def _bad_rows(bad: torch.Tensor, op: str) -> ArgumentError:
    """The error for the rows of logits the route kernel flagged (some are)."""
    row = int(bad.numpy().nonzero()[0][0])
    return ArgumentError(f"{op}: argument 'router_logits' has NaN or infinity in row {row}; "
                         "routing it would pick an arbitrary expert",
                         hint="the router's input or weights are broken upstream")


@op("moe_route(Tensor router_logits, int top_k, bool renormalize=True, *, "
    "str scoring='softmax', Tensor? correction_bias=None, float routed_scaling=1.0, "
    "int n_group=1, int topk_group=1) -> (Tensor topk_weights, Tensor topk_ids)",
    kind="moe", reference=_route_reference, host_reads=True)
def moe_route(router_logits: torch.Tensor, top_k: int, renormalize: bool = True, *,
              scoring: str = "softmax", correction_bias: torch.Tensor | None = None,
              routed_scaling: float = 1.0, n_group: int = 1, topk_group: int = 1
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's top_k experts and routing weights from router logits [..., E].

    Softmax (or sigmoid) scores, the best top_k by score (+ correction_bias, if given;
    ties to the lower expert), weights = their scores, renormalized to sum to 1 if asked,
    times routed_scaling. Softmax-then-top-k with renormalization equals top-k-then-softmax
    (Mixtral either way). n_group > 1: only experts of the topk_group best groups compete
    (DeepSeek's group-limited routing; a group scores its best expert, or its two best
    with correction_bias). Weights float32, ids int64; NaN or infinite logits raise."""
    e = _check_routing(router_logits, top_k, scoring, correction_bias, n_group, topk_group,
                       "moe_route")
    lead = router_logits.shape[:-1]
    weights, ids = _route(router_logits.reshape(-1, e), top_k, renormalize, scoring,
                          correction_bias, routed_scaling, n_group, topk_group, "moe_route")
    return weights.view(*lead, top_k), ids.view(*lead, top_k)


# -- permutation ---------------------------------------------------------------------------
def _sort(topk_ids: torch.Tensor, num_experts: int, op: str
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(counts [E], row_map [T, k]) of expert choices [T, k], raising on ids out of range."""
    counts = torch.empty(num_experts, dtype=torch.int64)
    row_map = torch.empty(topk_ids.shape, dtype=torch.int64)
    bad = torch.empty(1, dtype=torch.int64)
    _run(sort_kernel, (1, 1, 1), [topk_ids, counts, torch.empty_like(counts), row_map, bad])
    if bad.numpy()[0]:
        ids = topk_ids.flatten()
        e = int(ids[(ids < 0) | (ids >= num_experts)][0])
        raise ArgumentError(f"{op}: argument 'topk_ids' holds expert {e}, out of range for "
                            f"num_experts={num_experts}")
    return counts, row_map


def _gather(x: torch.Tensor, row_map: torch.Tensor) -> torch.Tensor:
    """x's rows [T, H] copied to the expert-grouped rows [T * k, H] that row_map names."""
    t, h = x.shape
    rows = torch.empty((row_map.numel(), h), dtype=x.dtype)
    if rows.numel():
        bh = _width(h, _ROW_TILES)
        _run(gather_kernel, (-(-h // bh), t, 1), [x, row_map, rows], BH=bh)
    return rows


def _combine(y: torch.Tensor, row_map: torch.Tensor, weights: torch.Tensor,
             dtype: torch.dtype) -> torch.Tensor:
    """out[t] = sum_j weights[t, j] * y[row_map[t, j]], accumulated in float32."""
    t, h = row_map.shape[0], y.shape[1]
    out = torch.empty((t, h), dtype=dtype)
    if out.numel():
        bh = _width(h, _ROW_TILES)
        _run(combine_kernel, (-(-h // bh), t, 1), [y, row_map, weights, out], BH=bh)
    return out


def _permute_reference(x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    flat = topk_ids.flatten()
    order = torch.argsort(flat, stable=True)
    row_map = torch.empty_like(order)
    row_map[order] = torch.arange(order.numel())
    counts = torch.bincount(flat, minlength=num_experts)
    return x[order // topk_ids.shape[1]], counts, row_map.view(topk_ids.shape)


def _permute_meta(x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (x.new_empty((topk_ids.numel(), x.shape[-1])),
            x.new_empty(num_experts, dtype=torch.int64),
            x.new_empty(topk_ids.shape, dtype=torch.int64))


def _check_choices(topk_ids: torch.Tensor, t: int, op: str) -> None:
    check_tensor(topk_ids, op, "topk_ids", _IDS)
    if topk_ids.dim() != 2 or topk_ids.shape[0] != t:
        raise ShapeError(f"{op}: argument 'topk_ids' must be [T, k] for the {t} tokens of x, "
                         f"got shape {tuple(topk_ids.shape)}")


def _check_rows(x: torch.Tensor, op: str, arg: str) -> None:
    check_tensor(x, op, arg)
    if x.dim() != 2:
        raise ShapeError(f"{op}: argument {arg!r} must be 2-D [tokens, hidden], got shape "
                         f"{tuple(x.shape)}")


@op("moe_permute(Tensor x, Tensor topk_ids, int num_experts) -> "
    "(Tensor rows, Tensor counts, Tensor row_map)", kind="moe",
    reference=_permute_reference, meta=_permute_meta, host_reads=True)
def moe_permute(x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token rows copied once per expert choice, grouped by expert, and the map back.

    Rows x [T, H] become rows [T * k, H] grouped by expert (expert 0's first; within an
    expert, in token order); also the rows per expert, counts [E] (int64), and row_map
    [T, k]: the row holding each token's j-th choice."""
    _check_rows(x, "moe_permute", "x")
    _check_choices(topk_ids, x.shape[0], "moe_permute")
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ArgumentError(f"moe_permute: num_experts={num_experts!r} must be a positive int")
    counts, row_map = _sort(topk_ids, num_experts, "moe_permute")
    return _gather(x, row_map), counts, row_map


def _unpermute_reference(y: torch.Tensor, row_map: torch.Tensor, topk_weights: torch.Tensor
                         ) -> torch.Tensor:
    picked = y.float()[row_map]  # [T, k, H]
    return (picked * topk_weights.float()[..., None]).sum(1).to(y.dtype)


@op("moe_unpermute(Tensor y, Tensor row_map, Tensor topk_weights) -> Tensor", kind="moe",
    reference=_unpermute_reference,
    meta=lambda y, row_map, topk_weights: y.new_empty((row_map.shape[0], y.shape[-1])),
    host_reads=True)
def moe_unpermute(y: torch.Tensor, row_map: torch.Tensor, topk_weights: torch.Tensor
                  ) -> torch.Tensor:
    """Expert outputs combined back into token order by the routing weights.

    y [T * k, H] has its rows grouped as moe_permute left them; out[t] = sum over j of
    topk_weights[t, j] * y[row_map[t, j]], accumulated in float32, in y's dtype."""
    _check_rows(y, "moe_unpermute", "y")
    check_tensor(row_map, "moe_unpermute", "row_map", _IDS)
    check_tensor(topk_weights, "moe_unpermute", "topk_weights")
    if row_map.dim() != 2 or topk_weights.shape != row_map.shape:
        raise ShapeError(f"moe_unpermute: row_map {tuple(row_map.shape)} and topk_weights "
                         f"{tuple(topk_weights.shape)} must both be [T, k]")
    if row_map.numel():
        lo, hi = torch.aminmax(row_map)
        if lo < 0 or hi >= y.shape[0]:
            raise ArgumentError(f"moe_unpermute: argument 'row_map' names row "
                                f"{int(lo if lo < 0 else hi)}, out of range for the "
                                f"{y.shape[0]} rows of y")
    return _combine(y, row_map, topk_weights, y.dtype)


# -- expert GEMMs ------------------------------------------------------------------------------
def _experts(w: torch.Tensor, scales: torch.Tensor | None, e: int | None, k: int, op: str,
             arg: str, scales_arg: str) -> tuple[torch.Tensor | QuantizedMatrix, int]:
    """The GEMM template's operand for expert weights (float [E, K, N] or quantized data
    with scales) and N, checked against E experts (None: any) and K rows."""
    if scales is not None:
        if not isinstance(w, torch.Tensor) or w.dtype not in (torch.int8, torch.uint8):
            raise DtypeError(f"{op}: {scales_arg} is given, so argument {arg!r} must be the "
                             "int8/uint8 data of tessera.ops.quantize")
        q = quantized_matrix(w, scales, k, op, arg, scales_arg)
        if len(q.shape) != 3 or e not in (None, q.shape[0]):
            raise ShapeError(f"{op}: quantized {arg!r} must hold [E, K, N] expert weights"
                             + (f" for {e} experts" if e is not None else "")
                             + f", got {q.shape}")
        return q, q.shape[2]
    check_tensor(w, op, arg, FLOATS)
    if w.dim() != 3 or w.shape[1] != k or e not in (None, w.shape[0]):
        want = f"[{e if e is not None else 'E'}, {k}, N]"
        raise ShapeError(f"{op}: argument {arg!r} must be {want} expert weights, got shape "
                         f"{tuple(w.shape)}", hint="stacked nn.Linear weights [E, N, K] pass "
                                                   "as w.transpose(1, 2)")
    return w, w.shape[2]


def _half(n: int, op: str, arg: str) -> int:
    if n % 2:
        raise ShapeError(f"{op}: argument {arg!r} must hold [gate | up] columns (an even N), "
                         f"got N = {n}")
    return n // 2


def _grouped_reference(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor,
                       scales: torch.Tensor | None = None, *, swiglu: bool = False
                       ) -> torch.Tensor:
    if scales is not None:
        w = dequantize_reference(w, scales, x.shape[1])
    dtype = x.dtype if scales is not None else torch.promote_types(x.dtype, w.dtype)
    parts = [xe.float() @ we.float() for xe, we in
             zip(x.split(counts.tolist()), w, strict=True)]
    y = torch.cat(parts) if parts else x.new_empty((0, w.shape[2]), dtype=torch.float32)
    if swiglu:
        gate, up = y.chunk(2, dim=-1)
        y = torch.nn.functional.silu(gate) * up
    return y.to(dtype)


def _grouped_meta(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor,
                  scales: torch.Tensor | None = None, *, swiglu: bool = False
                  ) -> torch.Tensor:
    n = w.shape[1] if scales is not None else w.shape[2]
    dtype = x.dtype if scales is not None else torch.promote_types(x.dtype, w.dtype)
    return x.new_empty((x.shape[0], n // 2 if swiglu else n), dtype=dtype)


@op("grouped_matmul(Tensor x, Tensor w, Tensor counts, Tensor? scales=None, *, "
    "bool swiglu=False) -> Tensor", kind="moe", reference=_grouped_reference,
    meta=_grouped_meta, host_reads=True)
def grouped_matmul(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor,
                   scales: torch.Tensor | None = None, *, swiglu: bool = False
                   ) -> torch.Tensor:
    """Expert GEMMs in one call on rows grouped by expert (float or int8/int4 experts).

    Rows x [T, K] come in groups of counts[e] rows (tokens sorted by expert); group e is
    multiplied by w[e] ([E, K, N] float, or int8/int4 data with its scales from
    tessera.ops.quantize); experts without rows are skipped. swiglu=True takes
    w = [gate | up] and gives silu(x @ gate) * (x @ up) [T, N / 2]."""
    _check_rows(x, "grouped_matmul", "x")
    operand, n = _experts(w, scales, None, x.shape[1], "grouped_matmul", "w", "scales")
    e = operand.shape[0]
    check_tensor(counts, "grouped_matmul", "counts", _IDS)
    sizes = counts.numpy()
    if sizes.shape != (e,) or (sizes < 0).any() or int(sizes.sum()) != x.shape[0]:
        raise ShapeError(f"grouped_matmul: argument 'counts' must be {e} non-negative row "
                         f"counts summing to the {x.shape[0]} rows of x, got "
                         f"{sizes.tolist()}")
    if swiglu:
        n = _half(n, "grouped_matmul", "w")
    dtype = x.dtype if scales is not None else torch.promote_types(x.dtype, w.dtype)
    out = torch.empty((x.shape[0], n), dtype=dtype)
    if out.numel():
        grouped_gemm(x, operand, sizes, out, swiglu=swiglu)
    return out


# -- the whole layer -----------------------------------------------------------------------
def _fused_reference(x: torch.Tensor, router_logits: torch.Tensor, w_gate_up: torch.Tensor,
                     w_down: torch.Tensor, top_k: int, renormalize: bool = True, *,
                     gate_up_scales: torch.Tensor | None = None,
                     down_scales: torch.Tensor | None = None, scoring: str = "softmax",
                     correction_bias: torch.Tensor | None = None,
                     routed_scaling: float = 1.0, n_group: int = 1, topk_group: int = 1
                     ) -> torch.Tensor:
    """Route, then each expert's SwiGLU MLP on the tokens that chose it (float32)."""
    h = x.shape[-1]
    xs = x.reshape(-1, h).float()
    weights, ids = _route_reference(router_logits.reshape(xs.shape[0], -1), top_k,
                                    renormalize, scoring=scoring,
                                    correction_bias=correction_bias,
                                    routed_scaling=routed_scaling, n_group=n_group,
                                    topk_group=topk_group)
    if gate_up_scales is not None:
        w_gate_up = dequantize_reference(w_gate_up, gate_up_scales, h)
    inter = w_gate_up.shape[-1] // 2
    if down_scales is not None:
        w_down = dequantize_reference(w_down, down_scales, inter)
    out = torch.zeros_like(xs)
    for e in range(w_gate_up.shape[0]):
        tok, slot = torch.nonzero(ids == e, as_tuple=True)
        gate, up = (xs[tok] @ w_gate_up[e].float()).chunk(2, dim=-1)
        y = (torch.nn.functional.silu(gate) * up) @ w_down[e].float()
        out.index_add_(0, tok, y * weights[tok, slot, None])
    return out.to(x.dtype).view(x.shape)


@op("fused_moe(Tensor x, Tensor router_logits, Tensor w_gate_up, Tensor w_down, int top_k, "
    "bool renormalize=True, *, Tensor? gate_up_scales=None, Tensor? down_scales=None, "
    "str scoring='softmax', Tensor? correction_bias=None, float routed_scaling=1.0, "
    "int n_group=1, int topk_group=1) -> Tensor", kind="moe", reference=_fused_reference,
    meta=lambda x, *args, **kwargs: x.new_empty(x.shape),
    host_reads=lambda **a: not _decodes(**a))
def fused_moe(x: torch.Tensor, router_logits: torch.Tensor, w_gate_up: torch.Tensor,
              w_down: torch.Tensor, top_k: int, renormalize: bool = True, *,
              gate_up_scales: torch.Tensor | None = None,
              down_scales: torch.Tensor | None = None, scoring: str = "softmax",
              correction_bias: torch.Tensor | None = None, routed_scaling: float = 1.0,
              n_group: int = 1, topk_group: int = 1) -> torch.Tensor:
    """A whole MoE layer in one op: routing, SwiGLU experts and the weighted combine.

    On x [..., H]: route with moe_route's rules, run each token through its top_k
    experts' SwiGLU MLPs (silu(x @ gate) * (x @ up)) @ down, with w_gate_up [E, H, 2I] =
    [gate | up] and w_down [E, I, H], float or int8/int4 from tessera.ops.quantize (with
    gate_up_scales / down_scales), and sum the outputs by the routing weights in float32.
    Only the experts some token picked are read. Result in x's dtype. Decode streams the
    weights fastest stored as nn.Linear stores them ([E, out, in], passed transposed).
    Up to 16 tokens run as one launch of the experts (moe.c), planned once per call
    signature: later calls with it skip the checks and the argument binding."""
    options = (top_k, renormalize, scoring, routed_scaling, n_group, topk_group)
    key = (_layout(x), _layout(router_logits), _placed(w_gate_up), _placed(gate_up_scales),
           _placed(w_down), _placed(down_scales), _placed(correction_bias), *options,
           type(top_k), type(n_group), type(topk_group))  # 2.0 == 2, but is refused
    plan = _DECODES.get(key)
    if plan is not None:  # a decode signature seen before: checked then
        if correction_bias is not None:
            _check_finite_bias(correction_bias, "fused_moe")
        return plan(x, router_logits)
    check_tensor(x, "fused_moe", "x")
    if x.dim() < 1:
        raise ShapeError("fused_moe: argument 'x' must be [..., hidden], got a scalar")
    e = _check_routing(router_logits, top_k, scoring, correction_bias, n_group, topk_group,
                       "fused_moe")
    h = x.shape[-1]
    xs = x.reshape(-1, h)
    logits = router_logits.reshape(-1, e)
    if logits.shape[0] != xs.shape[0]:
        raise ShapeError(f"fused_moe: router_logits {tuple(router_logits.shape)} must have "
                         f"one row of E logits per token of x {tuple(x.shape)}")
    gate_up, n2 = _experts(w_gate_up, gate_up_scales, e, h, "fused_moe", "w_gate_up",
                           "gate_up_scales")
    inter = _half(n2, "fused_moe", "w_gate_up")
    down, n = _experts(w_down, down_scales, e, inter, "fused_moe", "w_down", "down_scales")
    if n != h:
        raise ShapeError(f"fused_moe: argument 'w_down' gives {n} outputs per expert; x has "
                         f"hidden size {h}")
    if not xs.shape[0]:
        return x.new_empty(x.shape)
    if xs.shape[0] <= _DECODE_TOKENS and moe_decode_fits(gate_up) and moe_decode_fits(down):
        plan = _Decode(x, router_logits, correction_bias, options,
                       moe_decode(x.dtype, gate_up, down))
        if _read_in_place(w_gate_up, gate_up_scales) and _read_in_place(w_down, down_scales):
            if len(_DECODES) >= _MAX_DECODES:
                _DECODES.clear()
            _DECODES[key] = plan
        return plan(x, router_logits)
    weights, ids = _route(logits, top_k, renormalize, scoring, correction_bias,
                          routed_scaling, n_group, topk_group, "fused_moe")
    counts, row_map = _sort(ids, e, "fused_moe")
    sizes = counts.numpy()
    rows = _gather(xs, row_map)
    act = torch.empty((rows.shape[0], inter), dtype=torch.float32)
    grouped_gemm(rows, gate_up, sizes, act, swiglu=True)
    y = torch.empty((rows.shape[0], h), dtype=torch.float32)
    grouped_gemm(act, down, sizes, y)
    return _combine(y, row_map, weights, x.dtype).view(x.shape)


def _decodes(x: torch.Tensor, router_logits: torch.Tensor, w_gate_up: torch.Tensor,
             w_down: torch.Tensor, gate_up_scales: torch.Tensor | None = None,
             down_scales: torch.Tensor | None = None,
             correction_bias: torch.Tensor | None = None, **_: Any) -> bool:
    """Whether fused_moe takes the decode path for these arguments, which reads nothing
    back on the host (errors come back through the launch's status word), so the graph
    compiler may replay its launches (a correction bias is checked on the host)."""
    if correction_bias is not None or x.dim() < 1 or router_logits.dim() < 1:
        return False
    tokens = x.numel() // max(x.shape[-1], 1)
    try:
        gate_up, n2 = _experts(w_gate_up, gate_up_scales, router_logits.shape[-1],
                               x.shape[-1], "fused_moe", "w_gate_up", "gate_up_scales")
        down, _ = _experts(w_down, down_scales, router_logits.shape[-1], n2 // 2,
                           "fused_moe", "w_down", "down_scales")
    except TesseraError:
        return False
    return 0 < tokens <= _DECODE_TOKENS and moe_decode_fits(gate_up) and \
        moe_decode_fits(down) and _read_in_place(w_gate_up, gate_up_scales) and \
        _read_in_place(w_down, down_scales)


def _read_in_place(w: torch.Tensor, scales: torch.Tensor | None) -> bool:
    """Whether the launch reads the caller's tensors, not copies (quantized data and
    scales are copied unless contiguous): only then may a plan outlive the call."""
    return scales is None or (w.is_contiguous() and scales.is_contiguous())


def _layout(t: Any) -> Any:
    """What fused_moe's checks of a tensor argument depend on (its type if not a tensor)."""
    return (t.dtype, t.shape, t.stride(), t.is_cpu) if isinstance(t, torch.Tensor) else type(t)


def _placed(t: Any) -> Any:
    """The same and its address: a decode plan passes the address on."""
    return (t.data_ptr(), *_layout(t)) if isinstance(t, torch.Tensor) else type(t)


class _Decode:
    """fused_moe for one signature of up to _DECODE_TOKENS tokens (checked), everything
    it fixes computed once: the route kernel's specialization and the sizes and strides
    of its arguments, and the experts' launch (moe.c). A call allocates the results and
    runs two launches: no checks, no binding."""

    def __init__(self, x: torch.Tensor, router_logits: torch.Tensor,
                 correction_bias: torch.Tensor | None, options: tuple[Any, ...],
                 experts: MoeDecode) -> None:
        xs = x.reshape(-1, x.shape[-1])
        logits = router_logits.reshape(-1, router_logits.shape[-1])
        self.tokens, self.hidden = xs.shape
        self.top_k = options[0]
        self.experts = experts
        # strides of x's and the logits' rows, if views of them (the key fixes whether)
        self.x_rows = xs.stride() if xs.data_ptr() == x.data_ptr() else None
        self.logits_rows = logits.stride() \
            if logits.data_ptr() == router_logits.data_ptr() else None
        weights, ids, bad = _routing(self.tokens, self.top_k)
        tensors = [logits, logits if correction_bias is None else correction_bias, weights,
                   ids, bad]
        self.route, self.scalars = _route_specialization(tensors, *options[1:])
        self.bias = None if correction_bias is None else \
            (correction_bias.data_ptr(), *correction_bias.shape, *correction_bias.stride())
        self.num_experts = logits.shape[1]

    def __call__(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        t, k, e = self.tokens, self.top_k, self.num_experts
        rows = x if self.x_rows is not None else x.reshape(t, self.hidden)  # a copy
        rsx, csx = self.x_rows or rows.stride()
        logits = router_logits if self.logits_rows is not None else \
            router_logits.reshape(t, e)
        rsl, csl = self.logits_rows or logits.stride()
        lp = logits.data_ptr()
        # the route kernel's results in one buffer: ids [T, k] int64, weights [T, k]
        # float32, flags [T] int32
        routing = torch.empty(3 * t * k + t, dtype=torch.int32)
        ip = routing.data_ptr()
        wp, fp = ip + 8 * t * k, ip + 12 * t * k
        launch(self.route, (t, 1, 1), lp, t, e, rsl, csl, *(self.bias or (lp, t, e, rsl, csl)),
               wp, t, k, k, 1, ip, t, k, k, 1, fp, t, 1, *self.scalars)
        out = torch.empty(x.shape, dtype=x.dtype)
        self.experts(t, k, rows.data_ptr(), rsx, csx, ip, wp, fp, out.data_ptr(),
                     lambda: _bad_rows(routing[3 * t * k:], "fused_moe"))
        return out


_DECODES: dict[tuple, _Decode] = {}
