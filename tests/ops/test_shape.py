"""Concatenation, splitting and layout copies against torch: every dim and permutation,
strided inputs, tile edges, empty and size-1 dims, every data dtype, cat's type promotion
and torch's skipping of 1-dim empty tensors; results are contiguous copies that never
alias the input; bad input names the op and the argument."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from opcheck import check, close

import tessera.ops as O
from marks import slow_after
from tessera.errors import DtypeError, ShapeError, TesseraError
from tessera.ops import ArgumentError

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.uint8, torch.int32,
          torch.int64, torch.bool]


def data(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape) > 0.5
    if not dtype.is_floating_point:
        return torch.randint(0 if dtype == torch.uint8 else -50, 50, shape, dtype=dtype)
    return torch.randn(shape).to(dtype)


def fresh(got: torch.Tensor, x: torch.Tensor) -> None:
    """A new contiguous tensor, sharing no memory with x."""
    assert got.is_contiguous()
    if got.numel() and x.numel():
        assert got.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()


# -- permute, transpose ----------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(4, 5, 6), (3, 1, 40), (1, 1, 1), (2, 0, 3), (33, 65, 2)])
def test_permute_every_order(shape: tuple[int, ...]) -> None:
    x = data(shape)
    for dims in itertools.permutations(range(3)):
        fresh(check("permute", x, dims), x)
    check("permute", x, (-1, 0, -2))


def test_permute_ranks_and_views() -> None:
    x4 = data((2, 3, 4, 5))
    for dims in [(0, 2, 1, 3), (0, 2, 3, 1), (3, 2, 1, 0), (1, 3, 0, 2)]:  # attention's, NHWC
        check("permute", x4, dims)
    x5 = data((2, 3, 2, 3, 4))  # coalesces to 5 dims: walked in Python
    check("permute", x5, (4, 0, 3, 1, 2))
    check("permute", data((6, 7, 8))[::2, :, 1:], (2, 0, 1))  # no unit-stride dim
    check("permute", data((9, 8)).t(), (1, 0))  # undoes the view: a plain copy
    fresh(check("permute", data((3, 4)), (0, 1)), x4)
    fresh(check("permute", torch.tensor(2.5), ()), x4)
    check("permute", data((5,)), (0,))


@pytest.mark.parametrize("shape", [(1, 1), (3, 1000), (100, 37), (130, 70), (64, 64), (1, 7),
                                   (0, 5)])
def test_transpose_2d_tile_edges(shape: tuple[int, ...]) -> None:
    x = data(shape)
    check("transpose", x, 0, 1)
    check("transpose", x, -1, -2)
    check("transpose", x, 1, 1)


@pytest.mark.parametrize("dtype", slow_after(3, DTYPES))
def test_every_op_every_dtype(dtype: torch.dtype) -> None:
    """One call of each op per data dtype (layouts are swept in float32 below)."""
    x = data((3, 70, 9), dtype)
    check("transpose", x, 1, 2)
    check("permute", x, (1, 0, 2))
    check("cat", [x, x[:, :5]], 1)
    check("split", x, [30, 40], 1)


def test_transpose_every_pair_and_views() -> None:
    x = data((3, 4, 5, 6))
    for a, b in itertools.combinations(range(4), 2):
        check("transpose", x, a, b)
    check("transpose", x.transpose(1, 3), 0, 1)  # already strided in
    check("transpose", data((40, 50))[5:30, ::3], 0, 1)
    check("transpose", torch.tensor(1.5), 0, -1)


# -- cat -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(4, 5, 6), (1, 3), (7,), (2, 1, 1)])
def test_cat_every_dim(shape: tuple[int, ...]) -> None:
    for d in range(len(shape)):
        parts = [data(tuple(n + k if j == d else n for j, n in enumerate(shape)))
                 for k in range(3)]
        check("cat", parts, d)
        check("cat", parts, d - len(shape))
        check("cat", parts[:1], d)


def test_cat_views_and_kv_cache_append() -> None:
    cache, new = data((1, 8, 37, 16)), data((1, 8, 1, 16))
    check("cat", [cache, new], 2)
    check("cat", [cache.transpose(1, 2), new.transpose(1, 2)], 1)  # strided parts
    check("cat", [data((5, 6)).t(), data((6, 2))], 1)
    check("cat", [data((4, 10))[:, ::2], data((4, 3))], 1)
    check("cat", [data((2, 3, 4, 5, 6)).permute(4, 0, 3, 1, 2), data((1, 2, 5, 3, 4))], 0)


def test_cat_empty_tensors_as_torch() -> None:
    x = data((2, 3))
    check("cat", [x, torch.empty(0)], 0)  # 1-dim empty tensors are skipped
    check("cat", [torch.empty(0), x, torch.empty(0, dtype=torch.int32)], 1)
    check("cat", [torch.empty(0), torch.empty(0)], 0)
    check("cat", [data((0, 3)), x, data((0, 3))], 0)
    check("cat", [data((2, 0)), data((2, 0))], 1)
    check("cat", [data((2, 0)), torch.empty(0, dtype=torch.int64)], 0)


@pytest.mark.parametrize("dtypes", slow_after(4, [
    (torch.float32, torch.float32), (torch.int32, torch.float16), (torch.bool, torch.int8),
    (torch.bfloat16, torch.float16), (torch.uint8, torch.int64), (torch.bool, torch.bool),
    (torch.int8, torch.int8), (torch.bfloat16, torch.bfloat16), (torch.uint8, torch.bool),
    (torch.int64, torch.float32), (torch.int32, torch.int32), (torch.float16, torch.float16)]))
def test_cat_dtypes_and_promotion(dtypes: tuple[torch.dtype, torch.dtype]) -> None:
    a, b = data((3, 5), dtypes[0]), data((3, 2), dtypes[1])
    check("cat", [a, b], 1)
    check("cat", [b.t(), a.t()], 0)


# -- split ---------------------------------------------------------------------------------------
def test_split_every_dim() -> None:
    x = data((6, 5, 4))
    for d in range(3):
        n = x.shape[d]
        check("split", x, [1, n - 1], d)
        check("split", x, [n], d - 3)
        check("split", x, [0, n, 0], d)
    check("split", x, 4, 0)  # an int: equal chunks, the last smaller
    check("split", x.transpose(0, 2), [3, 1], 0)


def test_split_pieces_are_fresh_and_edge_cases() -> None:
    x = data((7, 3))
    pieces = O.split(x, [2, 5], 0)
    for p in pieces:
        fresh(p, x)
    check("split", x.t(), [1, 1, 5], 1)
    check("split", data((0, 4)), [0], 0)
    check("split", data((0, 4)), 2, 0)
    check("split", data((5,)), 10, 0)


def test_copies_keep_bits_and_big_outputs() -> None:
    bits = torch.tensor([0x7F81, -0x3D, 0x7FC0, 1, -1], dtype=torch.int16)  # sNaN, payloads
    for dtype in (torch.bfloat16, torch.float16):
        x = bits.view(dtype)[None].expand(3, 5).contiguous()
        got = O.cat([x, x[:1]], 0)
        assert torch.equal(got.view(torch.int16), torch.cat([x, x[:1]]).view(torch.int16))
        assert torch.equal(O.split(x, [1, 4], 1)[1].view(torch.int16), x[:, 1:].view(torch.int16))
    big = data((1100, 2000))  # an 8.8 MB result: advised onto huge pages
    check("transpose", big, 0, 1)


# -- bad input and interop ------------------------------------------------------------------
def test_bad_inputs_name_the_op_and_argument() -> None:
    x = data((3, 4))
    with pytest.raises(TesseraError, match="cat: argument 'tensors' must be a non-empty"):
        O.cat([])
    with pytest.raises(ShapeError, match=r"cat: tensors\[1\] has shape \(3, 5\)"):
        O.cat([x, data((3, 5))], 0)
    with pytest.raises(ShapeError, match=r"cat: tensors\[1\] has shape \(12,\)"):
        O.cat([x, data((12,))], 0)
    with pytest.raises(ShapeError, match="cat: dim=2 is out of range"):
        O.cat([x, x], 2)
    with pytest.raises(ShapeError, match=r"cat: tensors\[0\] is 0-dim"):
        O.cat([torch.tensor(1.0), x])
    with pytest.raises(DtypeError, match=r"cat: argument 'tensors\[1\]' has dtype float64"):
        O.cat([x, x.double()])
    with pytest.raises(DtypeError, match="cat: argument 'tensors' has dtype int16"):
        O.cat([x.to(torch.uint8), x.to(torch.int8)])  # promotes to int16
    with pytest.raises(DtypeError, match=r"cat: argument 'tensors\[0\]' must be a tensor"):
        O.cat([[1.0], x])
    with pytest.raises(ShapeError, match=r"split: split_sizes=\[1, 1\] sum to 2"):
        O.split(x, [1, 1], 0)
    with pytest.raises(ArgumentError, match=r"split: split_sizes=.* must be non-negative"):
        O.split(x, [5, -2], 0)
    with pytest.raises(ArgumentError, match="split: split_sizes=0 must be positive"):
        O.split(x, 0, 0)
    with pytest.raises(ShapeError, match="split: dim=-3 is out of range"):
        O.split(x, [3], -3)
    with pytest.raises(ShapeError, match="split: x is 0-dim"):
        O.split(torch.tensor(1.0), [1], 0)
    with pytest.raises(ArgumentError, match=r"permute: dims=\[0, 0\] repeats a dim"):
        O.permute(x, [0, 0])
    with pytest.raises(ArgumentError, match=r"permute: dims=\[1, -1\] repeats a dim"):
        O.permute(x, [1, -1])
    with pytest.raises(ShapeError, match=r"permute: dims=\[0\] has 1 entries"):
        O.permute(x, [0])
    with pytest.raises(ShapeError, match="permute: dims=2 is out of range"):
        O.permute(x, [2, 0])
    with pytest.raises(ShapeError, match="transpose: dim1=2 is out of range"):
        O.transpose(x, 0, 2)
    with pytest.raises(DtypeError, match="transpose: argument 'x' has dtype complex64"):
        O.transpose(x.to(torch.complex64), 0, 1)


def test_caller_kinds_and_torch_compile() -> None:
    a = np.arange(6, dtype=np.int32).reshape(2, 3)
    got = O.transpose(a, 0, 1)
    assert isinstance(got, np.ndarray) and (got == a.T).all() and got.flags.c_contiguous
    pieces = O.split(a, [1, 2], 1)
    assert all(isinstance(p, np.ndarray) for p in pieces) and (pieces[1] == a[:, 1:]).all()

    def block(w: torch.Tensor, ids: torch.Tensor, kv: torch.Tensor) -> list[torch.Tensor]:
        h = torch.ops.tessera.embedding(w, ids)
        kv = torch.ops.tessera.cat([kv, torch.ops.tessera.transpose(h, 0, 1)[None]], 2)
        return torch.ops.tessera.split(torch.ops.tessera.permute(kv, [0, 2, 1]), [2, 2], 2)

    def eager(w: torch.Tensor, ids: torch.Tensor, kv: torch.Tensor) -> list[torch.Tensor]:
        kv = torch.cat([kv, torch.nn.functional.embedding(ids, w).t()[None]], 2)
        return [p.contiguous() for p in torch.split(kv.permute(0, 2, 1), [2, 2], 2)]

    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, dynamic=True)
    w = data((10, 4))
    for steps in (3, 5):  # dynamic shapes through the fake implementations
        ids, kv = torch.randint(0, 10, (2,)), data((1, 4, steps))
        close(compiled(w, ids, kv), eager(w, ids, kv))
