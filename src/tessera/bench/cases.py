"""Case builders the suites share."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tessera.bench import device as bench_device
from tessera.bench.runner import Case
from tessera.errors import TesseraError

__all__ = ["op_case", "torch_case"]


def torch_case(name: str, ours: Callable[[], Any], ref: Callable[..., Any], args: tuple,
               quick: bool, *, bytes_moved: int = 0, flops: int = 0, atol: float = 1e-4,
               rtol: float = 1e-4, meta: dict[str, Any] | None = None) -> Case:
    """A case timing `ours()` against `ref(*args)` in torch eager and, unless `quick`,
    under torch.compile (Inductor); checked to agree within `atol` first. Reports GFLOPS
    if `flops` is given, else GB/s of `bytes_moved`. `ours` closes over host tensors, so
    on a device target the case is listed as not run there (op_case can run it there)."""
    case = _case(name, ours, ref, args, not quick, bytes_moved, flops, atol, rtol, meta)
    device = bench_device.current()
    if device is not None:
        case.skipped[bench_device.impl_name(device)] = (
            "its Tessera call closes over host tensors (bench.cases.torch_case); build the "
            "case with bench.cases.op_case to move its inputs to the device")
    return case


def op_case(name: str, ours: Callable[..., Any], ref: Callable[..., Any], args: tuple,
            quick: bool, *, ours_args: tuple | None = None,
            on_device: Callable[..., Any] | None = None, bytes_moved: int = 0,
            flops: int = 0, atol: float = 1e-4, rtol: float = 1e-4,
            meta: dict[str, Any] | None = None) -> Case:
    """A case timing Tessera's `ours(*ours_args)` (`ours_args` defaults to `args`) against
    `ref(*args)`, as torch_case does. When the suite's cases are built for a device
    (bench.device.target) it also times `tessera_<device type>`: `on_device` (default
    `ours`) on copies of `ours_args` moved to the device once, synchronized inside the timed
    call; it is checked against `ref` too, and reports its device time from event
    profiling. Device cases skip Inductor: they time Tessera on the device against
    Tessera on the host and torch eager. If Tessera cannot run it there (a TesseraError),
    the case lists why."""
    call_args = args if ours_args is None else ours_args
    device = bench_device.current()
    case = _case(name, lambda: ours(*call_args), ref, args, not quick and device is None,
                 bytes_moved, flops, atol, rtol, meta)
    if device is not None:
        _add_device_impl(case, device, on_device or ours, call_args, ref, args, atol, rtol,
                         flops or bytes_moved, "gflops" if flops else "gb_per_s")
    return case


def _case(name: str, ours: Callable[[], Any], ref: Callable[..., Any], args: tuple,
          inductor: bool, bytes_moved: int, flops: int, atol: float, rtol: float,
          meta: dict[str, Any] | None) -> Case:
    """Tessera (`ours()`) against torch eager and, if `inductor`, torch.compile."""
    import torch

    impls: dict[str, Callable[[], Any]] = {"tessera": ours,
                                           "torch_eager": lambda: ref(*args)}
    if inductor:
        compiled = torch.compile(ref, dynamic=False)
        impls["torch_inductor"] = lambda: compiled(*args)

    def check() -> None:
        want = ref(*args)
        for impl in [i for i in impls if not i.startswith("tessera_")]:
            torch.testing.assert_close(impls[impl](), want, atol=atol, rtol=rtol)

    def extra(impl: str, median_s: float) -> dict[str, float]:
        if flops:
            return {"gflops": flops / median_s / 1e9}
        return {"gb_per_s": bytes_moved / median_s / 1e9}

    return Case(name, impls, check=check, extra=extra, meta=meta or {})


def _add_device_impl(case: Case, device: Any, fn: Callable[..., Any], call_args: tuple,
                     ref: Callable[..., Any], args: tuple, atol: float, rtol: float,
                     work: int, metric: str) -> None:
    """Add to `case` the impl running `fn` on `device` (see op_case)."""
    import warnings

    import torch

    from tessera.ops.device import round_trips

    name = bench_device.impl_name(device)
    host_check, host_extra = case.check, case.extra
    state: dict[str, Any] = {"round_trips": 0}  # and "args": the inputs on the device

    def call() -> Any:
        return fn(*state["args"])

    def run() -> Any:
        out = call()
        device.synchronize()
        return out

    def check() -> None:  # (runs first: moves the inputs only for the cases that run)
        host_check()
        state["args"] = bench_device.upload(call_args, device)
        before = round_trips()
        try:
            with warnings.catch_warnings():  # counted below, reported in the table
                warnings.simplefilter("ignore")
                got = bench_device.download(run())
        except TesseraError as e:
            del case.impls[name]
            case.skipped[name] = f"{type(e).__name__}: {e}"
            return
        after = round_trips()
        trips = {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0)}
        state["round_trips"] = sum(trips.values())
        if trips:
            case.notes[name] = "ran on host copies of its data: " + ", ".join(
                f"tessera.ops.{op} ({what}, {n}x a call)" for (op, what), n in trips.items())
        torch.testing.assert_close(got, ref(*args), atol=atol, rtol=rtol,
                                   msg=lambda m: f"{name}: {m}")

    def extra(impl: str, median_s: float) -> dict[str, float]:
        out = host_extra(impl, median_s)
        if impl == name:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                p = bench_device.profile(device, call)
            out.update({"commands": p.commands, "device_us": p.device_s * 1e6})
            if state["round_trips"]:  # the device ran copies only: no device rate
                out["host_round_trips"] = state["round_trips"]
            elif p.device_s > 0:
                out[f"device_{metric}"] = work / p.device_s / 1e9
        return out

    case.impls = {name: run, **case.impls}
    case.check, case.extra = check, extra
