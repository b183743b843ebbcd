"""The generated fast launchers: after a first launch, later ones with matching torch
arguments skip the general path; anything that would select another specialization, or
that is unsafe, must still reach the general path and give its answer or its error."""

from __future__ import annotations

import pytest
import torch

import tessera.lang as tl


@tl.kernel
def scale_rows(x, out, s, n_valid, B: tl.constexpr, SHIFT: tl.constexpr = 0.0):
    r = tl.program_id(0)
    v = tl.load(x[r, 0:B], other=0.0)
    keep = tl.arange(0, B) < n_valid
    out[r, 0:B] = tl.where(keep, v * s + SHIFT, -1.0)


@pytest.fixture(autouse=True)
def _no_fast_launchers_yet():
    """Each test starts from the general path, so it sees its own launchers made."""
    scale_rows._fast.clear()
    scale_rows._fast_for.clear()


def _want(x, s, n_valid, b, shift=0.0):
    want = torch.full((x.shape[0], b), -1.0)
    cols = min(b, x.shape[1])
    part = x[:, :cols].float() * s + shift
    want[:, :min(cols, max(n_valid, 0))] = part[:, :max(min(cols, n_valid), 0)]
    return want[:, :x.shape[1]]


def _launch_twice(*args, **kwargs):
    """Launch once (general path), then again on fresh outputs (fast path)."""
    x = args[0]
    out1 = torch.empty(x.shape)
    scale_rows[(x.shape[0],)](x, out1, *args[1:], **kwargs)
    out2 = torch.empty(x.shape)
    scale_rows[(x.shape[0],)](x, out2, *args[1:], **kwargs)
    return out1, out2


def test_second_launch_takes_the_fast_path_and_agrees() -> None:
    x = torch.randn(6, 40)
    out1, out2 = _launch_twice(x, 2.0, 30, B=64)
    assert scale_rows._fast, "no fast launcher was generated"
    torch.testing.assert_close(out1, _want(x, 2.0, 30, 64))
    assert torch.equal(out1, out2)


def test_guards_send_other_arguments_to_the_general_path() -> None:
    x = torch.randn(5, 33)
    scale_rows[(5,)](x, torch.empty(5, 33), 1.0, 33, B=64)  # warm a fast launcher
    cases = [
        ((x.double().float(), 3.0, 10), {"B": 64}),             # same kinds: fast
        ((x, 3, 10), {"B": 64}),                                # int scale: other build
        ((x, 3.0, 10), {"B": 64, "SHIFT": 1.5}),                # other constexpr
        ((x.t().contiguous().t(), 3.0, 10), {"B": 64}),         # strided input
        ((x.to(torch.float16), 3.0, 10), {"B": 64}),            # other dtype
        ((x, 3.0, True), {"B": 64}),                            # bool where int was
    ]
    for args, kwargs in cases:
        out = torch.empty(args[0].shape)
        scale_rows[(5,)](args[0], out, *args[1:], **kwargs)
        want = _want(args[0], float(args[1]), int(args[2]), 64, kwargs.get("SHIFT", 0.0))
        torch.testing.assert_close(out, want, atol=1e-2 if args[0].dtype != torch.float32
                                   else 1e-6, rtol=1e-3)


def test_unsafe_outputs_are_rejected_or_handled_after_warmup() -> None:
    x = torch.randn(4, 16)
    scale_rows[(4,)](x, torch.empty(4, 16), 1.0, 16, B=16)
    scale_rows[(4,)](x, torch.empty(4, 16), 1.0, 16, B=16)
    assert len(scale_rows._fast) == 1
    y = x.clone()
    builds = set(scale_rows._compiled.values())
    scale_rows[(4,)](y, y, 2.0, 16, B=16)  # out aliases x: the general path, no restrict
    torch.testing.assert_close(y, x * 2)
    assert [c.restrict for c in set(scale_rows._compiled.values()) - builds] == [False]
    expanded = torch.empty(1, 16).expand(4, 16)
    with pytest.raises(tl.LaunchError, match="stride-0"):
        scale_rows[(4,)](x, expanded, 1.0, 16, B=16)
    out_t = torch.empty(16, 4).t()  # a non-contiguous output is still written right
    scale_rows[(4,)](x, out_t, 1.0, 16, B=16)
    torch.testing.assert_close(out_t, x)


def test_bad_launches_still_raise_launch_errors_after_warmup() -> None:
    x = torch.randn(2, 8)
    scale_rows[(2,)](x, torch.empty(2, 8), 1.0, 8, B=8)
    scale_rows[(2,)](x, torch.empty(2, 8), 1.0, 8, B=8)
    with pytest.raises(tl.LaunchError, match="missing"):
        scale_rows[(2,)](x, torch.empty(2, 8), 1.0, B=8)
    with pytest.raises(tl.LaunchError, match="unexpected"):
        scale_rows[(2,)](x, torch.empty(2, 8), 1.0, 8, B=8, C=1)
    with pytest.raises(tl.LaunchError, match="grid"):
        scale_rows[(-1,)](x, torch.empty(2, 8), 1.0, 8, B=8)
    with pytest.raises(tl.LaunchError, match="grid"):
        scale_rows[(True,)](x, torch.empty(2, 8), 1.0, 8, B=8)
    with pytest.raises(tl.LaunchError, match="int64"):
        scale_rows[(2,)](x, torch.empty(2, 8), 1.0, 2**70, B=8)
    out = torch.full((2, 8), 7.0)
    scale_rows[(0,)](x, out, 1.0, 8, B=8)  # an empty grid runs nothing
    assert torch.equal(out, torch.full((2, 8), 7.0))
