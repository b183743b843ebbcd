"""How Tessera's OpenMP kernels fare beside torch's own OpenMP pool.

Times a 16K-element parallel kernel (median of many calls) in four situations, each in
a fresh process: torch never imported; torch imported; a parallel torch op before each
call on the same thread; torch busy with matmuls in another thread. Also counts libgomp copies mapped. Results: docs/design/threading.md.

    python benchmarks/openmp_coexistence.py
"""

from __future__ import annotations

import json
import subprocess
import sys

CHILD = r"""
import ctypes, json, statistics, sys, threading, time
import numpy as np
from tessera.runtime.toolchain import compile_c

mode = sys.argv[1]
if mode != "alone":
    import torch
SRC = '''
#include <stdint.h>
void scale(float *restrict y, const float *restrict x, int64_t n) {
    #pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) y[i] = 2.0f * x[i] + 1.0f;
}'''
fn = compile_c(SRC, name="omp_scale", openmp=True).function(
    "scale", None, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64])
n = 16 * 1024
x = np.ones(n, np.float32); y = np.empty_like(x)
stop = threading.Event()
if mode == "torch_busy":
    def busy():
        a = torch.randn(256, 256)
        while not stop.is_set():
            a @ a
    threading.Thread(target=busy, daemon=True).start()
    time.sleep(0.2)
xp, yp = x.ctypes.data, y.ctypes.data
samples = []
if mode == "torch_interleaved":  # a parallel torch op, then our kernel, on one thread
    a, b = torch.ones(1 << 20), torch.empty(1 << 20)
    for _ in range(5000):
        torch.mul(a, 2.0, out=b)
        t0 = time.perf_counter_ns()
        fn(yp, xp, n)
        samples.append((time.perf_counter_ns() - t0) / 1000)
for _ in range(300 if mode != "torch_interleaved" else 0):
    t0 = time.perf_counter_ns()
    for _ in range(100):
        fn(yp, xp, n)
    samples.append((time.perf_counter_ns() - t0) / 100 / 1000)
stop.set()
maps = sum(1 for line in open("/proc/self/maps") if "libgomp" in line and "r-xp" in line)
print(json.dumps({"mode": mode, "median_us": statistics.median(samples),
                  "p90_us": sorted(samples)[int(0.9 * len(samples))], "libgomp_copies": maps}))
"""


def main() -> None:
    for mode in ("alone", "torch_imported", "torch_interleaved", "torch_busy"):
        out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True,
                             text=True, check=True)
        print(json.dumps(json.loads(out.stdout)))


if __name__ == "__main__":
    main()
