"""Suite `runtime`: what it costs to call compiled native code from Python.

Tessera's launch path is a ctypes call into a cached module; the baseline is the
smallest useful torch eager op. Goal (issue 2): a cached trivial kernel under 5 us.

The profiler's cost: 100 launches of a tiny kernel through the native launcher (and 100
calls of a small eager op) with no profile ("tessera") against the same inside
`tessera.profile()` ("profiled", one profile per 100); the ratio is the cost of recording.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import numpy as np

from tessera.bench.runner import Case

_SOURCE = r"""
#include <stdint.h>
#include <string.h>
int add1(int x) { return x + 1; }
void vadd(float *restrict z, const float *restrict x, const float *restrict y, int64_t n) {
    for (int64_t i = 0; i < n; i++) z[i] = x[i] + y[i];
}
/* vadd with the launcher's ABI (lang/codegen/c.py): grid, then 8-byte argument slots */
void vadd_entry(int64_t g0, int64_t g1, int64_t g2, const char *args) {
    (void)g0; (void)g1; (void)g2;
    float *z, *x, *y;
    int64_t n;
    memcpy(&z, args, 8);
    memcpy(&x, args + 8, 8);
    memcpy(&y, args + 16, 8);
    memcpy(&n, args + 24, 8);
    vadd(z, x, y, n);
}
"""
_REPEAT = 100  # launches per call of the profiler cases' implementations


def _us_per_call(impl: str, median_s: float) -> dict[str, float]:
    return {"us_per_call": median_s * 1e6}


def cases(quick: bool) -> list[Case]:
    import torch

    import tessera
    from tessera.runtime.toolchain import compile_c

    module = compile_c(_SOURCE, name="bench_runtime")
    add1 = module.function("add1", ctypes.c_int, [ctypes.c_int])
    vadd = module.function("vadd", None, [ctypes.c_void_p] * 3 + [ctypes.c_int64])

    a, b, c = torch.ones(1), torch.ones(1), torch.empty(1)

    def check_trivial() -> None:
        torch.add(a, b, out=c)
        assert add1(41) == 42 and c.item() == 2.0

    n = 16
    x, y, z = (tessera.empty((n,)) for _ in range(3))
    x.numpy()[:] = np.arange(n)
    y.numpy()[:] = 2 * np.arange(n)
    tx, ty, tz = x.torch(), y.torch(), torch.empty(n)

    def tessera_vadd() -> None:  # pointers fetched per call, as a real launch does
        vadd(z.data_ptr(), x.data_ptr(), y.data_ptr(), n)

    def check_vadd() -> None:
        tessera_vadd()
        torch.add(tx, ty, out=tz)
        assert np.array_equal(z.numpy(), 3 * np.arange(n, dtype=np.float32))
        assert torch.equal(z.torch(), tz)

    from tessera import ops
    from tessera.ops import _fastpath
    from tessera.runtime.cpu.launch import launcher
    from tessera.tools.profiler import profile

    _fastpath.wait()  # small ops on their native path, as in a warm process
    launch = launcher()
    entry = ctypes.cast(module.function("vadd_entry"), ctypes.c_void_p).value

    def launches() -> None:
        for _ in range(_REPEAT):
            launch(entry, 1, 1, 1, z.data_ptr(), x.data_ptr(), y.data_ptr(), n)

    def op_calls() -> None:
        for _ in range(_REPEAT):
            ops.add(tx, ty)

    def profiled(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            with profile():
                fn()
        return run

    def check_profiled() -> None:
        z.numpy()[:] = 0
        with profile() as p:
            launches()
            op_calls()
        assert np.array_equal(z.numpy(), 3 * np.arange(n, dtype=np.float32))
        kernels = [e for e in p.events if e.cat == "kernel"]
        assert sum(e.name == "bench_runtime:vadd_entry" for e in kernels) == _REPEAT
        assert sum(e.cat == "op" and e.name == "add" for e in p.events) == _REPEAT

    def per_launch(impl: str, median_s: float) -> dict[str, float]:
        return {"us_per_call": median_s / _REPEAT * 1e6}

    return [
        Case("launch_profiled_x100", {"tessera": launches, "profiled": profiled(launches)},
             check=check_profiled, extra=per_launch, meta={"elements": n}),
        Case("op_add_profiled_x100", {"tessera": op_calls, "profiled": profiled(op_calls)},
             check=check_profiled, extra=per_launch, meta={"elements": n}),
        Case("call_trivial_c",
             {"tessera": lambda: add1(41), "torch_eager": lambda: torch.add(a, b, out=c)},
             check=check_trivial, extra=_us_per_call),
        Case("call_kernel_ptr_args",
             {"tessera": tessera_vadd, "torch_eager": lambda: torch.add(tx, ty, out=tz)},
             check=check_vadd, extra=_us_per_call, meta={"elements": n}),
    ]
