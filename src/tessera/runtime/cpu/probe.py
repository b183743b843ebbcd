"""Measured peaks of this machine: fp32 FMA throughput and memory bandwidth.

Measured once per machine by small compiled kernels (a few hundred ms), then kept in the
artifact cache, so `tessera info` and the benchmarks can state results as % of peak.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import time
from pathlib import Path
from typing import Any

from tessera.runtime.cache import default_cache
from tessera.runtime.cpu.device import usable_cores
from tessera.runtime.knowledge import machine

__all__ = ["measured_peaks"]

_SOURCE = r"""
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef __AVX512F__
typedef float vf __attribute__((vector_size(64)));
#else
typedef float vf __attribute__((vector_size(32)));
#endif
#define LANES ((int)(sizeof(vf) / sizeof(float)))
#define CHAINS 12  /* independent FMA chains: > latency x FMA ports on current cores */

/* Seconds for `iters` rounds of CHAINS vector FMAs on every thread; flops via out. */
double fma_peak(int64_t iters, double *flops) {
    double t0 = omp_get_wtime();
    float sink = 0.0f;
    int threads = 1;
    #pragma omp parallel reduction(+:sink)
    {
        #pragma omp single
        threads = omp_get_num_threads();
        vf acc[CHAINS];
        vf b, c;
        for (int l = 0; l < LANES; l++) { b[l] = 0.999999f; c[l] = 1e-7f; }
        for (int k = 0; k < CHAINS; k++) for (int l = 0; l < LANES; l++) acc[k][l] = k + l;
        for (int64_t i = 0; i < iters; i++) {
            #pragma GCC unroll 12
            for (int k = 0; k < CHAINS; k++) acc[k] = acc[k] * b + c;
        }
        for (int k = 0; k < CHAINS; k++) for (int l = 0; l < LANES; l++) sink += acc[k][l];
    }
    double t = omp_get_wtime() - t0;
    *flops = 2.0 * CHAINS * LANES * (double)iters * threads + (sink == 12345.0f);
    return t;
}

/* Best-of-`reps` seconds to copy n floats (STREAM copy) and to read them (sum). */
void bandwidth(int64_t n, int reps, double *copy_s, double *read_s) {
    float *a = aligned_alloc(64, n * sizeof(float)), *b = aligned_alloc(64, n * sizeof(float));
    #pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) { a[i] = 1.0f; b[i] = (float)(i & 7); }
    *copy_s = *read_s = 1e30;
    volatile float keep = 0.0f;
    for (int r = 0; r < reps; r++) {
        double t0 = omp_get_wtime();
        #pragma omp parallel for schedule(static)
        for (int64_t i = 0; i < n; i++) a[i] = b[i];
        double t1 = omp_get_wtime();
        float s = 0.0f;
        #pragma omp parallel for simd schedule(static) reduction(+:s)
        for (int64_t i = 0; i < n; i++) s += a[i];
        double t2 = omp_get_wtime();
        keep += s;
        if (t1 - t0 < *copy_s) *copy_s = t1 - t0;
        if (t2 - t1 < *read_s) *read_s = t2 - t1;
    }
    free(a); free(b);
}
"""
_VERSION = 1
_BUFFER_FLOATS = 32 << 20  # 128 MiB per buffer: several times any L3 we meet
_ESTIMATED_SECONDS = 1.5


def _module():
    from tessera.runtime.toolchain import compile_c

    # -fno-tree-loop-distribute-patterns keeps the copy a vector loop, not a memcpy call.
    mod = compile_c(_SOURCE, name="device_probe", openmp=True,
                    flags=["-fno-tree-loop-distribute-patterns"])
    fma = mod.function("fma_peak", ctypes.c_double, [ctypes.c_int64,
                                                     ctypes.POINTER(ctypes.c_double)])
    bw = mod.function("bandwidth", None, [ctypes.c_int64, ctypes.c_int,
                                          ctypes.POINTER(ctypes.c_double),
                                          ctypes.POINTER(ctypes.c_double)])
    return fma, bw


def _measure() -> dict[str, Any]:
    fma, bw = _module()
    flops = ctypes.c_double()
    iters = 1 << 16
    while fma(iters, ctypes.byref(flops)) < 0.05:  # calibrate to ~50-100 ms per sample
        iters *= 2
    gflops = max(flops.value / fma(iters, ctypes.byref(flops)) / 1e9 for _ in range(5))
    copy_s, read_s = ctypes.c_double(), ctypes.c_double()
    bw(_BUFFER_FLOATS, 8, ctypes.byref(copy_s), ctypes.byref(read_s))
    nbytes = _BUFFER_FLOATS * 4
    return {"peak_gflops_fp32": round(gflops, 1),
            "copy_bandwidth_gbs": round(2 * nbytes / copy_s.value / 1e9, 1),
            "read_bandwidth_gbs": round(nbytes / read_s.value / 1e9, 1)}


def _machine_key() -> str:
    ident = [f"probe-{_VERSION}", _SOURCE, json.dumps(machine(), sort_keys=True)]
    return hashlib.sha256("\0".join(ident).encode()).hexdigest()


def measured_peaks(remeasure: bool = False) -> dict[str, Any]:
    """Peak fp32 GFLOPS (all cores, FMA) and copy/read bandwidth in GB/s, with the time
    they were measured. The first call on a machine measures (~1.5 s); later calls read
    the cache. `remeasure=True` measures again."""
    cache, key = default_cache(), _machine_key()
    if remeasure:
        cache.remove("device", key)

    def build(tmp: Path) -> dict[str, Any]:
        result = {**_measure(), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (tmp / "peaks.json").write_text(json.dumps(result))
        return {"cores": usable_cores()}

    entry, _ = cache.get_or_build("device", key, build)
    return json.loads((entry / "peaks.json").read_text())
