"""Checking an op against its torch reference: the same call on both, results compared
with tolerances that fit the dtype (half types are rounded once from float32, as torch
rounds them; float32 differs by summation order)."""

from __future__ import annotations

from typing import Any

import torch

import tessera.ops as O

TOL = {torch.float32: dict(atol=1e-5, rtol=1.3e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2)}


def close(got: Any, want: Any, *, atol: float | None = None, rtol: float | None = None,
          what: str = "") -> None:
    """`got` equals `want` (tensors, or tuples/lists of them): same dtype and shape, values
    within the dtype's tolerance (exact for integers and bools), NaNs in the same places."""
    if isinstance(want, (tuple, list)):
        assert isinstance(got, (tuple, list)) and len(got) == len(want), (what, got, want)
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            close(g, w, atol=atol, rtol=rtol, what=f"{what}[{i}]")
        return
    assert isinstance(got, torch.Tensor), f"{what}: got a {type(got).__name__}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype}, torch gives {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)}, torch gives " \
                                    f"{tuple(want.shape)}"
    tol = dict(TOL.get(want.dtype, dict(atol=0, rtol=0)))
    if atol is not None:
        tol["atol"] = atol
    if rtol is not None:
        tol["rtol"] = rtol
    torch.testing.assert_close(got, want, equal_nan=True, msg=lambda m: f"{what}: {m}", **tol)


def check(name: str, *args: Any, atol: float | None = None, rtol: float | None = None,
          **kwargs: Any) -> Any:
    """Run op `name` eagerly and its reference on the same arguments and compare; returns
    the op's result."""
    got = getattr(O, name)(*args, **kwargs)
    want = O.get(name).reference(*args, **kwargs)
    close(got, want, atol=atol, rtol=rtol, what=name)
    return got
