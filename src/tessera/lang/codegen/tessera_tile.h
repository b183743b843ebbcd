/* Tessera's tile-level GEMM micro-kernel, shared by the GEMM template
 * (templates/gemm/sgemm.c) and `tl.dot` in the kernel language: both run their K loops on
 * TSR_TILE_STEP, so a kernel author's dot reaches the template's code.
 *
 * Needs TSR_VL (floats per vector) defined first; provides tsr_fv, tsr_vload, tsr_vstore.
 */
#ifndef TESSERA_TILE_H
#define TESSERA_TILE_H

#include <string.h>

typedef float tsr_fv __attribute__((vector_size(TSR_VL * 4)));
static inline tsr_fv tsr_vload(const float *p) { tsr_fv v; memcpy(&v, p, sizeof v); return v; }
static inline void tsr_vstore(float *p, tsr_fv v) { memcpy(p, &v, sizeof v); }

/* One rank-1 update of an mr x (nv * TSR_VL) block of C held in registers:
 * acc[r][v] += A(r) * b[v * TSR_VL ...] for r < mr, v < nv, where A(r) is element r of
 * A's column and b points at B's row. With constant mr and nv the loops unroll fully,
 * acc stays in mr * nv vector registers, each B vector is loaded once and each A element
 * broadcast once. */
#define TSR_TILE_STEP(acc, mr, nv, A, b) do {                                         \
        tsr_fv tsr_b_[nv];                                                            \
        for (int tsr_v_ = 0; tsr_v_ < (nv); tsr_v_++)                                 \
            tsr_b_[tsr_v_] = tsr_vload((b) + tsr_v_ * TSR_VL);                        \
        _Pragma("GCC unroll 32")                                                      \
        for (int tsr_r_ = 0; tsr_r_ < (mr); tsr_r_++) {                               \
            const float tsr_a_ = A(tsr_r_);                                           \
            for (int tsr_v_ = 0; tsr_v_ < (nv); tsr_v_++)                             \
                acc[tsr_r_][tsr_v_] += tsr_a_ * tsr_b_[tsr_v_];                       \
        }                                                                             \
    } while (0)

#endif /* TESSERA_TILE_H */
