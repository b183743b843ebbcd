"""The native fast path: built and loaded, taken for dense inputs (the Python
implementation is not called), identical results to the Python path, and every unusual
input handed back to the Python path."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import tessera.ops as O
from tessera.ops import _fastpath

X = torch.randn(6, 40)
W, B = torch.randn(40), torch.randn(40)
CALLS: dict[str, Callable[[], Any]] = {
    "add": lambda: O.add(X, X * 2),
    "mul": lambda: O.mul(X.bfloat16(), X.bfloat16()),
    "lt": lambda: O.lt(X, -X),
    "relu": lambda: O.relu(X),
    "exp": lambda: O.exp(X.half()),
    "gelu": lambda: O.gelu(X, approximate="tanh"),
    "where": lambda: O.where(X > 0, X, -X),
    "softmax": lambda: O.softmax(X),
    "log_softmax": lambda: O.log_softmax(X.bfloat16(), -1),
    "layer_norm": lambda: O.layer_norm(X, [40], W, B, 1e-5),
    "rms_norm": lambda: O.rms_norm(X, [40], torch.nn.Parameter(W)),
}


@contextmanager
def python_path_forbidden(name: str) -> Iterator[None]:
    """Fail if op `name`'s Python implementation runs."""
    env = getattr(O, name).__globals__

    def forbidden(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"{name} took the Python path")

    impl, env["_impl"] = env["_impl"], forbidden
    try:
        yield
    finally:
        env["_impl"] = impl


@pytest.fixture(scope="module", autouse=True)
def native() -> None:
    assert _fastpath.wait(timeout=600), "the native fast path did not build (see warnings)"


@pytest.mark.parametrize("name", list(CALLS))
def test_dense_calls_take_the_native_path(name: str) -> None:
    want = CALLS[name]()  # the first call may compile and register the plan
    with python_path_forbidden(name):
        got = CALLS[name]()
    assert got.dtype == want.dtype and torch.equal(got, want)


def test_same_bits_as_the_python_path() -> None:
    for name, call in CALLS.items():
        fast = call()
        env = getattr(O, name).__globals__
        pw, rows = env["_pw"], env["_rows"]
        env["_pw"] = env["_rows"] = lambda *a: None
        try:
            slow = call()
        finally:
            env["_pw"], env["_rows"] = pw, rows
        assert torch.equal(fast, slow), name


class Sub(torch.Tensor):
    pass


@pytest.mark.parametrize("args", [
    (X.t(), X.t()),  # not contiguous
    (X, W),  # broadcast
    (X.as_subclass(Sub), X),  # a subclass may override __torch_function__
    (torch.empty(0, 3), torch.empty(0, 3)),  # empty
    (X, X.bfloat16()),  # a dtype pair with no plan yet
])
def test_unusual_inputs_take_the_python_path(args: tuple[torch.Tensor, ...]) -> None:
    got = O.add(*args)
    want = torch.add(*(a.as_subclass(torch.Tensor) for a in args))
    assert torch.equal(got.as_subclass(torch.Tensor), want)


def test_norm_arguments_outside_the_plan_fall_back() -> None:
    O.layer_norm(X, [40], W, B)
    torch.testing.assert_close(O.layer_norm(X, (40,), W, B, 1), torch.nn.functional.layer_norm(
        X, (40,), W, B, 1.0))  # an int eps
    y = torch.randn(3, 4, 10)
    torch.testing.assert_close(O.layer_norm(y, [4, 10]), torch.nn.functional.layer_norm(
        y, [4, 10]))  # two normalized dims
    torch.testing.assert_close(O.softmax(y, 1), torch.softmax(y, 1))


def test_can_be_turned_off() -> None:
    code = ("import torch, tessera.ops as O\nfrom tessera.ops import _fastpath\n"
            "assert not _fastpath.wait(5)\nx = torch.randn(4, 4)\n"
            "assert torch.equal(O.add(x, x), x + x)\nprint('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "TESSERA_OPS_FASTPATH": "0"}, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_row_plans_for_exact_rows_are_not_used_on_shorter_rows() -> None:
    """384 and 380 columns share a 384-wide tile; only 380 needs the padding masked."""
    assert _fastpath.wait(timeout=600)
    for n in (384, 380, 384, 380):
        x, w, b = torch.randn(5, n), torch.randn(n), torch.randn(n)
        for _ in range(2):  # the second call takes the native path
            torch.testing.assert_close(O.layer_norm(x, [n], w, b),
                                       F.layer_norm(x, [n], w, b), rtol=1e-5, atol=1e-5)
