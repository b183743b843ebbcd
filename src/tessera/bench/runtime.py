"""Suite `runtime`: what it costs to call compiled native code from Python.

Tessera's launch path is a ctypes call into a cached module; the baseline is the
smallest useful torch eager op. Goal (issue 2): a cached trivial kernel under 5 us.
"""

from __future__ import annotations

import ctypes

import numpy as np

from tessera.bench.runner import Case

_SOURCE = r"""
#include <stdint.h>
int add1(int x) { return x + 1; }
void vadd(float *restrict z, const float *restrict x, const float *restrict y, int64_t n) {
    for (int64_t i = 0; i < n; i++) z[i] = x[i] + y[i];
}
"""


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

    return [
        Case("call_trivial_c",
             {"tessera": lambda: add1(41), "torch_eager": lambda: torch.add(a, b, out=c)},
             check=check_trivial, extra=_us_per_call),
        Case("call_kernel_ptr_args",
             {"tessera": tessera_vadd, "torch_eager": lambda: torch.add(tx, ty, out=tz)},
             check=check_vadd, extra=_us_per_call, meta={"elements": n}),
    ]
