"""Gathers and scatters against torch: every dim, strided and non-coalescing views, empty
and size-1 dims, 0-dim tensors, every data dtype, int32/int64 indices, duplicates
(accumulated in order, deterministically), and every bad input: out-of-range indices are
an ArgumentError naming the op, the argument and the value, never a masked read."""

from __future__ import annotations

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
INDEX = [torch.int64, torch.int32]


def data(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape) > 0.5
    if not dtype.is_floating_point:
        lo = 0 if dtype == torch.uint8 else -50
        return torch.randint(lo, 50, shape, dtype=dtype)
    return torch.randn(shape).to(dtype)


def idx(n: int, shape: tuple[int, ...], dtype: torch.dtype = torch.int64) -> torch.Tensor:
    return torch.randint(0, max(n, 1), shape, dtype=dtype)


@pytest.mark.parametrize("dtype", slow_after(3, DTYPES))
def test_every_op_every_dtype(dtype: torch.dtype) -> None:
    """One call of each op per data dtype (the layouts are swept in float32 below)."""
    x = data((6, 40), dtype)
    check("embedding", x, torch.tensor([[5, 0], [5, 3]]))  # duplicates, both ends
    check("index_select", x, 1, torch.tensor([39, 0, 7, 7]))
    check("gather", x, 0, idx(6, (9, 40)))
    check("index_add", x, 0, torch.tensor([0, 5, 0, 0, 3, 5, 1]), data((7, 40), dtype))
    alpha = True if dtype == torch.bool else 3 if not dtype.is_floating_point else 0.5
    check("index_add", x, 0, torch.tensor([5, 5]), data((2, 40), dtype), alpha=alpha)
    check("scatter_add", x, 0, idx(2, (9, 40)), data((9, 40), dtype))  # many duplicates


# -- embedding -------------------------------------------------------------------------------
@pytest.mark.parametrize("ishape", [(), (1,), (7,), (2, 3), (0,), (2, 0), (1, 1, 5)])
@pytest.mark.parametrize("itype", INDEX)
def test_embedding_index_shapes(ishape: tuple[int, ...], itype: torch.dtype) -> None:
    check("embedding", data((40, 16)), idx(40, ishape, itype))


def test_embedding_layouts_and_widths() -> None:
    check("embedding", data((64, 30)).t(), idx(30, (9,)))  # a transposed table
    check("embedding", data((20, 64))[:, ::2], idx(20, (5,)))  # strided rows
    check("embedding", data((10, 1500)), idx(10, (4,)))  # the last column tile is partial
    check("embedding", data((10, 1)), idx(10, (6,)))
    check("embedding", data((10, 0)), idx(10, (3,)))
    check("embedding", data((1, 8)), torch.zeros(3, dtype=torch.int64))
    ids = idx(30, (4, 6))
    check("embedding", data((30, 8)), ids.t())  # a strided index, viewed flat
    check("embedding", data((30, 8)), ids[:, ::2].t())  # one that needs a copy
    check("embedding", data((30, 8)), idx(30, (2000,)))  # many programs


# -- index_select, gather ------------------------------------------------------------------------
SHAPES = [(6,), (4, 5, 6), (3, 1, 7), (1, 9), (2, 3, 4, 5)]


@pytest.mark.parametrize("shape", SHAPES)
def test_index_select_every_dim(shape: tuple[int, ...]) -> None:
    x = data(shape)
    for d in range(-len(shape), len(shape)):
        n = shape[d]
        check("index_select", x, d, idx(n, (7,)))
        check("index_select", x, d, idx(n, (1,), torch.int32))
        check("index_select", x, d, idx(n, (0,)))


def test_index_select_views() -> None:
    x = data((5, 6, 7))
    check("index_select", x.permute(2, 0, 1), 1, idx(5, (4,)))  # dims that do not coalesce
    check("index_select", x.transpose(0, 2), 2, idx(5, (8,), torch.int32))
    check("index_select", x[:, ::2], 0, idx(5, (3,)))
    check("index_select", x, 2, torch.arange(6, dtype=torch.int64)[::2])  # a strided index
    x4 = data((2, 3, 4, 5)).permute(0, 2, 1, 3)  # neither side of a dim coalesces
    check("index_select", x4, 3, idx(5, (6,)))
    check("index_select", x4, 0, idx(2, (3,)))


def test_index_select_0dim() -> None:
    check("index_select", torch.tensor(3.5), 0, torch.tensor([0]))
    check("index_select", torch.tensor(3.5), -1, torch.tensor(0))
    check("index_select", data((4, 3)), 0, torch.tensor(2))


GATHER = [((4, 5, 6), (4, 5, 6)), ((4, 5, 6), (2, 3, 4)), ((7,), (12,)), ((3, 40), (3, 200)),
          ((2, 3, 4, 5), (2, 2, 4, 3)), ((1, 1), (1, 1))]


@pytest.mark.parametrize("xshape, ishape", GATHER)
def test_gather_every_dim(xshape: tuple[int, ...], ishape: tuple[int, ...]) -> None:
    x = data(xshape)
    for d in range(len(xshape)):
        shape = tuple(9 if k == d else min(n, xshape[k]) for k, n in enumerate(ishape))
        check("gather", x, d, idx(xshape[d], shape))
        check("gather", x, d - len(xshape), idx(xshape[d], shape, torch.int32))


def test_gather_views() -> None:
    x = data((6, 7, 8))
    check("gather", x.transpose(0, 2), 1, idx(7, (8, 3, 6)))
    check("gather", x.permute(1, 0, 2), 2, idx(8, (7, 6, 8), torch.int32).transpose(0, 1)
          .contiguous().transpose(0, 1))
    check("gather", x[:, ::3], 0, idx(6, (4, 1, 8)).expand(4, 3, 8)[:, :2])
    x4 = data((2, 3, 4, 5)).permute(0, 2, 1, 3)
    check("gather", x4, 3, idx(5, (2, 4, 3, 5)))


def test_gather_empty_and_0dim() -> None:
    check("gather", data((5, 3)), 0, torch.zeros(0, 3, dtype=torch.int64))
    check("gather", data((5, 3)), 1, torch.zeros(0, 7, dtype=torch.int64))  # as torch: no checks
    check("gather", torch.tensor(2.0), 0, torch.tensor(0))
    check("gather", torch.tensor(2.0), 0, torch.tensor([0, 0]))
    check("gather", data((4,)), 0, torch.tensor(3))


# -- index_add, scatter_add ----------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
def test_index_add_every_dim_duplicates(shape: tuple[int, ...]) -> None:
    x = data(shape)
    for d in range(len(shape)):
        n = shape[d]
        index = torch.cat([idx(n, (5,)), torch.zeros(3, dtype=torch.int64)])  # duplicates
        src = data(tuple(8 if k == d else m for k, m in enumerate(shape)))
        check("index_add", x, d, index, src)
        check("index_add", x, d - len(shape), index.int(), src, alpha=-2.5)
        check("index_add", x, d, index[:0], src.narrow(d, 0, 0))


def test_index_add_views_and_0dim() -> None:
    x = data((4, 5, 6))
    src = data((4, 6, 5))
    check("index_add", x.permute(1, 0, 2)[:, :, ::2].permute(1, 2, 0), 2,
          torch.tensor([4, 4, 1]), src[:, ::2, :3])  # source's outer dims do not coalesce
    check("index_add", torch.tensor(1.5), 0, torch.tensor([0]), torch.tensor(2.0))
    check("index_add", data((3,)), 0, torch.tensor(1), torch.tensor([2.0]))
    check("index_add", data((3, 0)), 0, torch.tensor([1, 2]), data((2, 0)))


@pytest.mark.parametrize("xshape, ishape", GATHER)
def test_scatter_add_every_dim_duplicates(xshape: tuple[int, ...], ishape: tuple[int, ...]
                                          ) -> None:
    x = data(xshape)
    for d in range(len(xshape)):
        shape = tuple(min(n, 3) if k == d else min(n, xshape[k]) for k, n in enumerate(ishape))
        index = idx(min(xshape[d], 2), shape)  # few targets: many duplicates
        src = data(tuple(n + 1 for n in shape))  # larger than index: only its corner adds
        check("scatter_add", x, d, index, src, atol=1e-5, rtol=1e-5)
        check("scatter_add", x, d - len(xshape), index.int(), src[..., :shape[-1]],
              atol=1e-5, rtol=1e-5)


def test_scatter_add_views_and_0dim() -> None:
    x = data((5, 6, 7))
    index = idx(5, (4, 6, 7))
    src = data((7, 6, 4))
    check("scatter_add", x, 0, index, src.transpose(0, 2))
    check("scatter_add", x.transpose(1, 2), 2, idx(6, (5, 7, 9), torch.int32)[:, :, ::2],
          data((5, 7, 5)))
    check("scatter_add", x, 1, index[:0], src)
    one = torch.ones(())
    check("scatter_add", one, 0, torch.tensor(0), one)
    check("index_add", x.transpose(0, 2), 1, torch.tensor([0, 4, 4]),
          data((5, 3, 7)).transpose(0, 2))


def test_accumulation_is_deterministic_and_in_order() -> None:
    x = torch.zeros(3, 64)
    index = torch.randint(0, 3, (4000,))
    src = torch.randn(4000, 64) * 1e3
    a = O.index_add(x, 0, index, src)
    assert torch.equal(a, O.index_add(x, 0, index, src))
    assert torch.equal(a, torch.index_add(x, 0, index, src))  # torch's CPU order: bitwise
    sidx = torch.randint(0, 3, (4000, 64))
    b = O.scatter_add(x, 0, sidx, src)
    assert torch.equal(b, O.scatter_add(x, 0, sidx, src))
    assert torch.equal(b, torch.scatter_add(x, 0, sidx, src))


# -- bad input ---------------------------------------------------------------------------------
def _bad(n: int, value: int) -> torch.Tensor:
    t = idx(n, (50,))
    t[37] = value
    return t


BAD = [
    ("embedding", lambda i: (data((10, 8)), i), "indices", 10),
    ("index_select", lambda i: (data((4, 10, 3)), 1, i), "index", 10),
    ("index_add", lambda i: (data((10, 3)), 0, i, data((50, 3))), "index", 10),
    ("gather", lambda i: (data((10, 3)), 0, i[:, None].expand(50, 3)), "index", 10),
    ("scatter_add", lambda i: (data((10, 3)), 0, i[:, None].expand(50, 3), data((50, 3))),
     "index", 10),
]


@pytest.mark.parametrize("name, args, arg, n", BAD)
@pytest.mark.parametrize("value", [10, 11, 1 << 40, -1, -10, -(1 << 40)])
def test_out_of_range_indices_raise(name: str, args: object, arg: str, n: int, value: int
                                    ) -> None:
    index = _bad(n, value)
    with pytest.raises(ArgumentError, match=rf"{name}: argument '{arg}' holds {value}, out of"):
        getattr(O, name)(*args(index))
    if -(1 << 31) <= value < 1 << 31:
        with pytest.raises(ArgumentError, match=rf"holds {value}"):
            getattr(O, name)(*args(index.int()))


def test_out_of_range_with_an_empty_result_still_raises() -> None:
    with pytest.raises(ArgumentError, match="embedding: argument 'indices' holds 9"):
        O.embedding(data((5, 0)), torch.tensor([9]))
    with pytest.raises(ArgumentError, match="index_select: argument 'index' holds -1"):
        O.index_select(data((0, 5)), 1, torch.tensor([-1]))
    with pytest.raises(ArgumentError, match="index_add: argument 'index' holds 3"):
        O.index_add(data((3, 0)), 0, torch.tensor([3]), data((1, 0)))
    with pytest.raises(ArgumentError, match="embedding: argument 'indices' holds 0"):
        O.embedding(data((0, 4)), torch.tensor([0]))


def test_bad_dtypes_dims_and_shapes() -> None:
    w, x = data((10, 4)), data((4, 5))
    i = torch.tensor([1, 2])
    for bad in (i.float(), i.short(), i.to(torch.uint8), i.bool()):
        with pytest.raises(DtypeError, match="embedding: argument 'indices'"):
            O.embedding(w, bad)
        with pytest.raises(DtypeError, match="gather: argument 'index'"):
            O.gather(x, 0, bad[None])
    with pytest.raises(DtypeError, match="index_select: argument 'x'"):
        O.index_select(x.double(), 0, i)
    with pytest.raises(DtypeError, match="index_add: argument 'source'"):
        O.index_add(x, 0, i, data((2, 5), torch.int32))
    with pytest.raises(DtypeError, match="scatter_add: argument 'src'"):
        O.scatter_add(x, 0, i[None], data((1, 2)).half())
    with pytest.raises(DtypeError, match="embedding: argument 'weight' must be a tensor"):
        O.embedding([1.0, 2.0], i)
    for name, args in [("index_select", (x, 2, i)), ("gather", (x, -3, i[None])),
                       ("index_add", (x, 5, i, x)), ("scatter_add", (x, 2, i[None], x))]:
        with pytest.raises(ShapeError, match=f"{name}: dim="):
            getattr(O, name)(*args)
    with pytest.raises(ShapeError, match="embedding: argument 'weight' must be 2-dim"):
        O.embedding(data((10,)), i)
    with pytest.raises(ShapeError, match="index_select: argument 'index' must be a vector"):
        O.index_select(x, 0, i[None])
    with pytest.raises(ShapeError, match="index_select: x is 0-dim"):
        O.index_select(torch.tensor(1.0), 0, i)
    with pytest.raises(ShapeError, match="gather: 'index' has 1 dims and x has 2"):
        O.gather(x, 0, i)
    with pytest.raises(ShapeError, match="gather: 'index' has shape"):
        O.gather(x, 0, torch.zeros(2, 6, dtype=torch.int64))
    with pytest.raises(ShapeError, match="index_add: 'source' has shape"):
        O.index_add(x, 0, i, data((3, 5)))
    with pytest.raises(ShapeError, match="index_add: 'source' has shape"):
        O.index_add(x, 0, i, data((2, 4)))
    with pytest.raises(ShapeError, match="scatter_add: 'index' has shape"):
        O.scatter_add(x, 0, torch.zeros(2, 3, dtype=torch.int64), data((2, 2)))
    with pytest.raises(ArgumentError, match=r"index_add: alpha=0\.5 is a float"):
        O.index_add(x.int(), 0, i, data((2, 5), torch.int32), alpha=0.5)
    with pytest.raises(ArgumentError, match="index_add: alpha='2' must be a number"):
        O.index_add(x, 0, i, data((2, 5)), alpha="2")
    with pytest.raises(TesseraError):
        O.embedding(w, torch.tensor([1]).to("meta"))


def test_caller_kinds_and_torch_ops() -> None:
    w = np.arange(12, dtype=np.float32).reshape(6, 2)
    got = O.embedding(w, np.array([5, 0], dtype=np.int32))
    assert isinstance(got, np.ndarray) and got.tolist() == [[10.0, 11.0], [0.0, 1.0]]
    x, i = data((4, 5)), torch.tensor([[1, 3, 3, 0, 2]])
    close(torch.ops.tessera.gather(x, 0, i), torch.gather(x, 0, i))
    close(torch.ops.tessera.index_add(x, 0, i[0, :2], x[:2], alpha=2),
          torch.index_add(x, 0, i[0, :2], x[:2], alpha=2))
