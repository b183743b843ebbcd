"""Tessera demo: what this machine is, and a C kernel compiled, cached and run on it.

    make demo        (or: .venv/bin/python examples/demo.py)

Grows with the project; today it shows the runtime layer end to end.
"""

from __future__ import annotations

import ctypes
import time

import numpy as np
import torch
from rich.console import Console

import tessera
from tessera.runtime.toolchain import compile_c

console = Console()

SAXPY = r"""
#include <stdint.h>
/* y = a * x + y over n floats, split across cores by OpenMP. */
void saxpy(float *restrict y, const float *restrict x, float a, int64_t n) {
    #pragma omp parallel for simd schedule(static)
    for (int64_t i = 0; i < n; i++) y[i] = a * x[i] + y[i];
}
"""


def main() -> None:
    cpu = tessera.device("cpu")
    props = cpu.properties()
    console.rule("[bold]1. the device")
    console.print(f"{props['model']}: {props['cores']} cores, ISA {' '.join(props['isa'])}")
    console.print(f"measured: {props['peak_gflops_fp32']:.0f} GFLOPS fp32 peak, "
                  f"{props['copy_bandwidth_gbs']:.1f} GB/s copy bandwidth")

    console.rule("[bold]2. a C kernel, compiled once and cached")
    t0 = time.perf_counter()
    module = compile_c(SAXPY, name="saxpy", openmp=True)
    how = "compiled now" if module.built else "loaded from the compile cache"
    console.print(f"{how} in {1e3 * (time.perf_counter() - t0):.1f} ms: {module.path}")
    saxpy = module.function("saxpy", None, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float,
                                            ctypes.c_int64])

    console.rule("[bold]3. tensors shared with numpy and torch, zero-copy")
    n = 1 << 24
    x, y = tessera.empty((n,)), tessera.empty((n,))
    xs, ys = x.numpy(), torch.from_dlpack(y)
    xs[:] = np.arange(n, dtype=np.float32) % 7
    ys.fill_(1.0)
    console.print(f"tessera {x!r} at {x.data_ptr():#x} is numpy's {xs.ctypes.data:#x}; "
                  f"torch sees y at {ys.data_ptr():#x} = {y.data_ptr():#x}")

    console.rule("[bold]4. run it on a stream, timed with events")
    stream = tessera.Stream()
    start, end = tessera.Event(enable_timing=True), tessera.Event(enable_timing=True)
    start.record(stream)
    stream.submit(saxpy, y.data_ptr(), x.data_ptr(), 2.0, n)
    end.record(stream)
    end.synchronize()
    ms = start.elapsed_time(end)
    expected = 2.0 * (np.arange(n, dtype=np.float32) % 7) + 1.0
    ok = torch.equal(ys, torch.from_numpy(expected))
    console.print(f"saxpy over {n:,} floats: {ms:.2f} ms "
                  f"({3 * 4 * n / ms / 1e6:.1f} GB/s moved); matches numpy: {ok}")

    stats = tessera.memory_stats()
    console.rule("[bold]5. the caching allocator")
    console.print(f"allocated {stats['allocated_bytes'] / 2**20:.0f} MiB, reserved "
                  f"{stats['reserved_bytes'] / 2**20:.0f} MiB, peak "
                  f"{stats['peak_allocated_bytes'] / 2**20:.0f} MiB")
    if not ok:
        raise SystemExit("saxpy result differs from numpy")


if __name__ == "__main__":
    main()
