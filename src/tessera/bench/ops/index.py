"""Families `index` and `shape`: tessera.ops embedding, gather, index_select, index_add,
cat and transpose against torch eager and under torch.compile (Inductor).

Small cases are decode-loop sizes, where the per-call cost decides (1 token of a
[32000, 4096] float32 table, an 8 x 4 gather, 8 rows of a [64, 128] matrix); big ones
report GB/s of bytes read and written (512 tokens of the table, a KV-cache append of one
step to a [1, 8, S, 128] cache, a [4096, 4096] float32 transpose, an MoE combine of 2
experts' outputs per token). Goal: at least 1.0x torch eager at the small shapes and
bandwidth-bound at the big ones."""

from __future__ import annotations

from typing import Any

from tessera.bench.cases import op_case
from tessera.bench.runner import Case


def cases(quick: bool) -> list[Case]:
    import torch

    torch.manual_seed(0)
    return [*_embedding(quick), *_small(quick), *_cat(quick), *_transpose(quick),
            _index_add(quick)]


def _embedding(quick: bool) -> list[Case]:
    import torch
    import torch.nn.functional as F

    import tessera.ops as O

    table = torch.randn(32000, 4096)
    out = []
    for tokens in (1, 512):
        ids = torch.randint(0, table.shape[0], (1, tokens))
        out.append(op_case(f"embedding_32000x4096_t{tokens}", O.embedding,
                           lambda w, i: F.embedding(i, w), (table, ids), quick,
                           bytes_moved=2 * tokens * table.shape[1] * 4))
    return out


def _small(quick: bool) -> list[Case]:
    import torch

    import tessera.ops as O

    x = torch.randn(8, 64)
    gi = torch.randint(0, 64, (8, 4))
    m = torch.randn(64, 128)
    rows = torch.randint(0, 64, (8,))
    return [
        op_case("gather_8x64_k4", O.gather, torch.gather, (x, 1, gi), quick,
                bytes_moved=gi.numel() * (4 + 8 + 4)),
        op_case("index_select_64x128_r8", O.index_select, torch.index_select, (m, 0, rows),
                quick, bytes_moved=2 * rows.numel() * m.shape[1] * 4),
    ]


def _cat(quick: bool) -> list[Case]:
    import torch

    import tessera.ops as O

    out = []
    for steps, dtype in ((512, torch.float32), (512, torch.bfloat16), (16, torch.float32)):
        cache = torch.randn(1, 8, steps, 128).to(dtype)
        new = torch.randn(1, 8, 1, 128).to(dtype)
        name = f"cat_kv_1x8x{steps}x128" + ("_bf16" if dtype == torch.bfloat16 else "")
        out.append(op_case(name, O.cat, _cat_ref, (cache, new), quick,
                           ours_args=([cache, new], 2),
                           bytes_moved=2 * (cache.numel() + new.numel()) * cache.itemsize))
    return out


def _cat_ref(cache: Any, new: Any) -> Any:
    import torch

    return torch.cat([cache, new], 2)


def _transpose(quick: bool) -> list[Case]:
    import torch

    import tessera.ops as O

    out = []
    for n in (64, 4096):
        x = torch.randn(n, n)
        out.append(op_case(f"transpose_{n}x{n}", O.transpose, _transpose_ref, (x,), quick,
                           ours_args=(x, 0, 1), bytes_moved=2 * x.numel() * 4))
    return out


def _transpose_ref(x: Any) -> Any:
    return x.t().contiguous()


def _index_add(quick: bool) -> Case:
    import torch

    import tessera.ops as O

    tokens, k, d = 512, 2, 1024
    x = torch.zeros(tokens, d)
    index = torch.randint(0, tokens, (tokens * k,))
    src = torch.randn(tokens * k, d)
    return op_case(f"index_add_moe_t{tokens}_k{k}_d{d}", O.index_add, _index_add_ref,
                   (x, index, src), quick, ours_args=(x, 0, index, src),
                   bytes_moved=(2 * x.numel() + 3 * src.numel()) * 4)


def _index_add_ref(x: Any, index: Any, src: Any) -> Any:
    import torch

    return torch.index_add(x, 0, index, src)
