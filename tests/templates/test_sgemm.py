"""The SGEMM template against torch.matmul: awkward shapes, every layout, alpha/beta,
blockings that exercise every edge path, and bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from marks import slow_after
from tessera.errors import ShapeError, TesseraError
from tessera.templates.gemm import Blocking, batched_gemm, blocking, gemm, grouped_gemm

SHAPES = [(1, 1, 1), (1, 7, 3), (5, 1, 9), (7, 33, 5), (64, 64, 64), (100, 70, 300),
          (257, 129, 513), (31, 1000, 17)]


def _tol(k: int) -> dict[str, float]:
    return {"atol": 2e-5 * k ** 0.5 + 1e-5, "rtol": 1e-4}


@pytest.mark.parametrize("mnk", SHAPES)
def test_matches_torch(mnk: tuple[int, int, int]) -> None:
    m, n, k = mnk
    a, b = torch.randn(m, k), torch.randn(k, n)
    torch.testing.assert_close(gemm(a, b), a @ b, **_tol(k))


@pytest.mark.parametrize("layout", ["nn", "tn", "nt", "tt", "strided"])
def test_any_strides(layout: str) -> None:
    m, n, k = 45, 38, 71
    a = torch.randn(m, k) if layout[0] == "n" else torch.randn(k, m).t()
    b = torch.randn(k, n) if layout[1:2] in ("n", "") else torch.randn(n, k).t()
    if layout == "strided":
        a, b = torch.randn(2 * m, 3 * k)[::2, ::3], torch.randn(k, 2 * n)[:, ::2]
    out = torch.empty(n, m).t()  # a column-major result
    gemm(a, b, out)
    torch.testing.assert_close(out, a @ b, **_tol(k))


def test_alpha_beta_and_numpy() -> None:
    a = np.random.default_rng(0).standard_normal((70, 40), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((40, 90), dtype=np.float32)
    c0 = np.random.default_rng(2).standard_normal((70, 90), dtype=np.float32)
    c = c0.copy()
    gemm(a, b, c, alpha=-2.0, beta=0.5)
    np.testing.assert_allclose(c, -2.0 * a @ b + 0.5 * c0, rtol=1e-4, atol=1e-3)
    c[:] = np.nan
    gemm(a, b, c, beta=0.0)  # beta = 0: C is not read, so NaNs there do not leak
    np.testing.assert_allclose(c, a @ b, rtol=1e-4, atol=1e-3)
    empty_k = gemm(np.ones((3, 0), np.float32), np.ones((0, 4), np.float32))
    assert np.array_equal(empty_k, np.zeros((3, 4), np.float32))


# 8-lane vectors build on every x86-64 target here; the machine's own width too (16 with
# AVX-512), so the blockings below run everywhere, in CI included.
LANES = sorted({8, blocking().vl})


@pytest.mark.parametrize("config", [
    c for vl in LANES for c in (Blocking(8, 2 * vl, vl, 16, 16, 4 * vl),
                                Blocking(6, vl, vl, 12, 24, 2 * vl),
                                Blocking(3, vl, vl, 9, 7, vl))])
def test_small_blockings_cover_every_edge(config: Blocking) -> None:
    m, n, k = 53, 77, 61  # many MC, KC and NC blocks, all with remainders
    a, b = torch.randn(m, k), torch.randn(k, n)
    torch.testing.assert_close(gemm(a, b, config=config), a @ b, **_tol(k))


def test_bad_inputs() -> None:
    with pytest.raises(ShapeError, match="inner dimensions"):
        gemm(torch.ones(3, 4), torch.ones(5, 6))
    with pytest.raises(ShapeError, match="2-D"):
        gemm(torch.ones(3), torch.ones(3, 6))
    with pytest.raises(TesseraError, match="float32"):
        gemm(torch.ones(3, 4, dtype=torch.float64), torch.ones(4, 6))
    with pytest.raises(ShapeError, match="out has shape"):
        gemm(torch.ones(3, 4), torch.ones(4, 6), torch.empty(3, 5))
    with pytest.raises(TesseraError, match="read-only"):
        gemm(np.ones((3, 4), np.float32), np.ones((4, 6), np.float32),
              np.broadcast_to(np.zeros(6, np.float32), (3, 6)))
    with pytest.raises(TesseraError, match="stride-0"):
        gemm(torch.ones(3, 4), torch.ones(4, 6), torch.zeros(1, 6).expand(3, 6))


@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("layout", ["kn", "nk", "strided_x"])
def test_few_rows_take_the_gemv_path(m: int, layout: str) -> None:
    k, n = 300, 1000 + m  # a partial last strip / column group
    x = torch.randn(m, k) if layout != "strided_x" else torch.randn(m, 2 * k)[:, ::2]
    w = torch.randn(n, k).t() if layout == "nk" else torch.randn(k, n)
    c0 = torch.randn(m, n)
    c = c0.clone()
    gemm(x, w, c, alpha=0.5, beta=2.0)
    torch.testing.assert_close(c, 0.5 * (x @ w) + 2.0 * c0, **_tol(k))


ACTS = {None: lambda x: x, "relu": torch.relu, "gelu": torch.nn.functional.gelu,
        "gelu_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
        "silu": torch.nn.functional.silu, "sigmoid": torch.sigmoid, "tanh": torch.tanh}


@pytest.mark.parametrize("activation", slow_after(1, ["gelu", *(a for a in ACTS if a != "gelu")]))
@pytest.mark.parametrize("mnk", [(1, 70, 30), (3, 65, 17), (100, 70, 300), (257, 129, 513)])
def test_fused_epilogues(mnk: tuple[int, int, int], activation: str | None) -> None:
    m, n, k = mnk
    a, b, bias, res = torch.randn(m, k), torch.randn(k, n), torch.randn(n), torch.randn(m, n)
    got = gemm(a, b, bias=bias, activation=activation, residual=res)
    torch.testing.assert_close(got, ACTS[activation](a @ b + bias) + res, **_tol(k))
    only_act = gemm(a, b, activation=activation)
    torch.testing.assert_close(only_act, ACTS[activation](a @ b), **_tol(k))


def test_epilogue_edge_cases() -> None:
    a, b = torch.randn(4, 0), torch.randn(0, 5)  # k = 0: the epilogue of zeros
    bias = torch.randn(5)
    torch.testing.assert_close(gemm(a, b, bias=bias, activation="relu"),
                               torch.relu(bias).expand(4, 5))
    nan = torch.full((2, 3), float("nan"))
    assert gemm(nan, torch.ones(3, 40), activation="relu").isnan().all()
    res_t = torch.randn(40, 2).t()  # a strided residual
    torch.testing.assert_close(gemm(torch.ones(2, 3), torch.ones(3, 40), residual=res_t),
                               3 + res_t)
    with pytest.raises(ShapeError, match="bias"):
        gemm(torch.ones(2, 3), torch.ones(3, 4), bias=torch.ones(5))
    with pytest.raises(ShapeError, match="residual"):
        gemm(torch.ones(2, 3), torch.ones(3, 4), residual=torch.ones(4, 2))
    with pytest.raises(TesseraError, match="unknown activation"):
        gemm(torch.ones(2, 3), torch.ones(3, 4), activation="swish")


def _grouped_reference(x, w, sizes):
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    pairs = enumerate(zip(starts, sizes, strict=True))
    return torch.cat([x[s:s + c] @ w[e] for e, (s, c) in pairs])


@pytest.mark.parametrize("groups", [1, 3, 8, 64])
def test_grouped_matches_a_loop_of_matmuls(groups: int) -> None:
    rng = np.random.default_rng(groups)
    sizes = rng.integers(0, 20, groups)
    sizes[0] = 0  # experts without tokens
    x, w = torch.randn(int(sizes.sum()), 48), torch.randn(groups, 48, 70)
    torch.testing.assert_close(grouped_gemm(x, w, sizes), _grouped_reference(x, w, sizes),
                               **_tol(48))


def test_grouped_layouts_epilogue_and_errors() -> None:
    sizes = [5, 0, 9]
    x = torch.randn(48, 14).t()  # [14, 48] strided
    w = torch.randn(3, 70, 48).transpose(1, 2)  # [3, 48, 70] with transposed experts
    bias = torch.randn(70)
    got = grouped_gemm(x, w, sizes, bias=bias, activation="silu")
    want = torch.nn.functional.silu(_grouped_reference(x, w, sizes) + bias)
    torch.testing.assert_close(got, want, **_tol(48))
    with pytest.raises(ShapeError, match="summing"):
        grouped_gemm(x, w, [5, 0, 8])
    with pytest.raises(ShapeError, match="non-negative"):
        grouped_gemm(x, w, [15, -1, 0])
    with pytest.raises(ShapeError, match="b must be 3-D"):
        grouped_gemm(x, torch.randn(48, 70), [14])


@pytest.mark.parametrize("bmnk", [(1, 3, 5, 7), (5, 33, 20, 17), (16, 64, 64, 64)])
def test_batched_matches_torch(bmnk: tuple[int, int, int, int]) -> None:
    batch, m, n, k = bmnk
    a, b = torch.randn(batch, m, k), torch.randn(batch, k, n)
    torch.testing.assert_close(batched_gemm(a, b), a @ b, **_tol(k))


def test_batched_shared_operands_views_and_errors() -> None:
    a, w = torch.randn(4, 10, 6), torch.randn(6, 9)
    torch.testing.assert_close(batched_gemm(a, w), a @ w, **_tol(6))  # a shared weight
    a_t, b = torch.randn(6, 4, 10).transpose(0, 1), torch.randn(4, 10, 9)
    out = torch.empty(4, 9, 6).transpose(1, 2)  # strided batch views, in and out
    batched_gemm(a_t, b, out)
    torch.testing.assert_close(out, a_t @ b, **_tol(10))
    with pytest.raises(ShapeError, match="cannot multiply"):
        batched_gemm(torch.randn(3, 2, 4), torch.randn(2, 4, 5))
    with pytest.raises(ShapeError, match="out must be"):
        batched_gemm(torch.randn(3, 2, 4), torch.randn(4, 5), torch.empty(3, 2, 6))
    with pytest.raises(TesseraError, match="stride-0"):
        batched_gemm(torch.randn(3, 2, 4), torch.randn(4, 5), torch.empty(2, 5).expand(3, 2, 5))
    with pytest.raises(TesseraError, match="stride-0"):
        grouped_gemm(torch.randn(3, 4), torch.randn(1, 4, 5), [3], torch.empty(5).expand(3, 5))
