/* Tessera SGEMM template: C = alpha * A @ B + beta * C, row/column/any-strided operands.
 *
 * Layered as CUTLASS/CATLASS and structured as BLIS:
 *   device  (Python)   picks blocking from the cache sizes and launches;
 *   kernel  tsr_sgemm  the five loops: jc (NC) -> pc (KC, pack B) -> ic (MC, pack A)
 *                      -> jr/ir (micro-tiles, spread over the threads);
 *   block   pack_a / pack_b  copy operands into MR- and NR-wide slivers, zero-padded;
 *   tile    micro_kernel     an MR x NR block of C in MR * NR / VL vector registers over
 *                            the whole KC loop.
 * The builder prepends: MR, NR, VL (floats per vector), MC, KC, NC.
 */
#include <stdint.h>
#include <string.h>
#include <stdlib.h>
#include <omp.h>

typedef float tsr_fv __attribute__((vector_size(VL * 4)));

/* Epilogue: what the builder fuses into the final store of each element of C (bias,
   activation, residual...), as EPILOGUE(x, i, j, ep); the identity when there is none. */
typedef struct { const float *bias; const float *res; int64_t rsr, csr; } tsr_ep;
#ifndef EPILOGUE
#define EPILOGUE(x, i, j, ep) (x)
#define HAS_EPILOGUE 0
#else
#define HAS_EPILOGUE 1
#endif
#define NV (NR / VL)

static inline tsr_fv vload(const float *p) { tsr_fv v; memcpy(&v, p, sizeof v); return v; }
static inline void vstore(float *p, tsr_fv v) { memcpy(p, &v, sizeof v); }

/* tile: acc = A_sliver (k x MR, p-major) * B_sliver (k x NR, p-major); C = alpha acc + beta C
   for the m x n corner that lies inside C (the packed slivers are zero-padded). */
static inline void epilogue_tile(float *c, int64_t rsc, int64_t csc, int64_t i0,
                                 int64_t j0, int64_t m, int64_t n, const tsr_ep *ep) {
    (void)i0; (void)j0; (void)ep;
    for (int64_t r = 0; r < m; r++) {
        #pragma omp simd
        for (int64_t j = 0; j < n; j++) {
            float *dst = c + r * rsc + j * csc;
            *dst = EPILOGUE(*dst, i0 + r, j0 + j, ep);
        }
    }
}

static void micro_kernel(int64_t k, const float *restrict a, const float *restrict b,
                         float *c, int64_t rsc, int64_t csc, int64_t m, int64_t n,
                         float alpha, float beta, int64_t i0, int64_t j0, int last,
                         const tsr_ep *ep) {
    tsr_fv acc[MR][NV];
    for (int r = 0; r < MR; r++)
        for (int v = 0; v < NV; v++) acc[r][v] = (tsr_fv){0};
    for (int64_t p = 0; p < k; p++, a += MR, b += NR) {
        tsr_fv bv[NV];
        for (int v = 0; v < NV; v++) bv[v] = vload(b + v * VL);
        #pragma GCC unroll 16
        for (int r = 0; r < MR; r++) {
            const float ar = a[r];
            for (int v = 0; v < NV; v++) acc[r][v] += ar * bv[v];
        }
    }
    if (m == MR && n == NR && csc == 1) {  /* a whole tile, rows contiguous */
        for (int r = 0; r < MR; r++)
            for (int v = 0; v < NV; v++) {
                float *dst = c + r * rsc + v * VL;
                tsr_fv out = alpha * acc[r][v];
                if (beta != 0.0f) out += beta * vload(dst);
                vstore(dst, out);
            }
        if (HAS_EPILOGUE && last) epilogue_tile(c, rsc, csc, i0, j0, m, n, ep);
        return;
    }
    float tile[MR][NR];
    for (int r = 0; r < MR; r++)
        for (int v = 0; v < NV; v++) vstore(&tile[r][v * VL], acc[r][v]);
    for (int64_t r = 0; r < m; r++)
        for (int64_t j = 0; j < n; j++) {
            float *dst = c + r * rsc + j * csc;
            *dst = alpha * tile[r][j] + (beta != 0.0f ? beta * *dst : 0.0f);
        }
    if (HAS_EPILOGUE && last) epilogue_tile(c, rsc, csc, i0, j0, m, n, ep);
}

/* block: A[ic:ic+mc, pc:pc+kc] as MR-row slivers, each kc x MR (zero rows past m). */
static void pack_a(int64_t mc, int64_t kc, const float *a, int64_t rsa, int64_t csa,
                   float *restrict dst) {
    for (int64_t i = 0; i < mc; i += MR, dst += MR * kc) {
        const int64_t rows = mc - i < MR ? mc - i : MR;
        for (int64_t p = 0; p < kc; p++) {
            const float *src = a + i * rsa + p * csa;
            for (int64_t r = 0; r < MR; r++) dst[p * MR + r] = r < rows ? src[r * rsa] : 0.0f;
        }
    }
}

/* block: B[pc:pc+kc, jc+j:jc+j+NR] as one kc x NR sliver (zero columns past n). */
static void pack_b_sliver(int64_t n, int64_t kc, const float *b, int64_t rsb, int64_t csb,
                          float *restrict dst) {
    const int64_t cols = n < NR ? n : NR;
    for (int64_t p = 0; p < kc; p++, dst += NR) {
        const float *src = b + p * rsb;
        if (cols == NR && csb == 1) { memcpy(dst, src, NR * sizeof(float)); continue; }
        for (int64_t j = 0; j < NR; j++) dst[j] = j < cols ? src[j * csb] : 0.0f;
    }
}

/* Packing buffers, kept per calling thread and grown as needed: fresh multi-MB buffers
   per call would cost their page faults every time. */
static _Thread_local float *buffers[2];
static _Thread_local size_t capacity[2];

static float *buffer(int which, int64_t floats) {
    const size_t bytes = ((size_t)floats * sizeof(float) + 4095) / 4096 * 4096;
    if (bytes > capacity[which]) {
        free(buffers[which]);
        buffers[which] = aligned_alloc(4096, bytes);
        capacity[which] = buffers[which] ? bytes : 0;
    }
    return buffers[which];
}

/* A few rows of A (LLM decode: m = 1..GEMV_ROWS): no packing, B is streamed once at memory
   bandwidth. Threads split the columns of C. B row-major (csb = 1): each row of A scales
   rows of B into vector accumulators of C; B column-major (rsb = 1, a transposed weight):
   each element of C is a dot product along a contiguous column of B. */
#define GEMV_ROWS 4
#define GEMV_VECS 8  /* columns of C per step when B is column-major */
#define GEMV_STRIP 2048  /* columns of C per step when B is row-major (8 KiB in L1) */

static inline float hsum(tsr_fv v) {
    float lanes[VL], s = 0.0f;
    vstore(lanes, v);
    for (int l = 0; l < VL; l++) s += lanes[l];
    return s;
}

/* out[i][v] = A[i, :] . B[:, v] for v < nj <= GEMV_VECS columns, each contiguous in B. */
static inline __attribute__((always_inline)) void dot_columns(
        const int m, int64_t k, int64_t nj, const float *a, int64_t rsa, int64_t csa,
        const float *b, int64_t csb, float out[GEMV_ROWS][GEMV_STRIP]) {
    tsr_fv acc[GEMV_ROWS][GEMV_VECS];
    for (int i = 0; i < m; i++)
        for (int v = 0; v < GEMV_VECS; v++) acc[i][v] = (tsr_fv){0};
    const int64_t kv = csa == 1 && nj == GEMV_VECS ? k / VL * VL : 0;
    for (int64_t p = 0; p < kv; p += VL) {
        tsr_fv bv[GEMV_VECS];
        for (int v = 0; v < GEMV_VECS; v++) bv[v] = vload(b + v * csb + p);
        for (int i = 0; i < m; i++) {
            const tsr_fv av = vload(a + i * rsa + p);
            for (int v = 0; v < GEMV_VECS; v++) acc[i][v] += av * bv[v];
        }
    }
    for (int64_t i = 0; i < m; i++)
        for (int64_t v = 0; v < nj; v++) {
            float s = kv ? hsum(acc[i][v]) : 0.0f;
            for (int64_t p = kv; p < k; p++) s += a[i * rsa + p * csa] * b[v * csb + p];
            out[i][v] = s;
        }
}

static void gemv_rows(int64_t m, int64_t n, int64_t k, float alpha, const float *a,
                      int64_t rsa, int64_t csa, const float *b, int64_t rsb, int64_t csb,
                      float beta, float *c, int64_t rsc, int64_t csc, const tsr_ep *ep) {
    const int64_t step = csb == 1 ? GEMV_STRIP : GEMV_VECS;
    #pragma omp parallel for schedule(static) if(n * k > 65536)
    for (int64_t j0 = 0; j0 < n; j0 += step) {
        const int64_t nj = n - j0 < step ? n - j0 : step;
        float out[GEMV_ROWS][GEMV_STRIP];
        if (csb == 1) {  /* stream B's rows over a strip of C that stays in L1 */
            for (int64_t i = 0; i < m; i++) memset(out[i], 0, nj * sizeof(float));
            for (int64_t p = 0; p < k; p++) {
                const float *brow = b + p * rsb + j0;
                for (int64_t i = 0; i < m; i++) {
                    const float ai = a[i * rsa + p * csa];
                    float *o = out[i];
                    #pragma omp simd
                    for (int64_t j = 0; j < nj; j++) o[j] += ai * brow[j];
                }
            }
        } else {  /* rsb == 1: columns of B are contiguous; dot products, VL lanes at once */
            switch (m) {  /* a constant row count keeps the accumulators in registers */
                case 1: dot_columns(1, k, nj, a, rsa, csa, b + j0 * csb, csb, out); break;
                case 2: dot_columns(2, k, nj, a, rsa, csa, b + j0 * csb, csb, out); break;
                case 3: dot_columns(3, k, nj, a, rsa, csa, b + j0 * csb, csb, out); break;
                default: dot_columns(4, k, nj, a, rsa, csa, b + j0 * csb, csb, out); break;
            }
        }
        for (int64_t i = 0; i < m; i++)
            for (int64_t j = 0; j < nj; j++) {
                float *dst = c + i * rsc + (j0 + j) * csc;
                *dst = EPILOGUE(alpha * out[i][j] + (beta != 0.0f ? beta * *dst : 0.0f),
                                i, j0 + j, ep);
            }
    }
}

/* kernel: C[m, n] = alpha A[m, k] B[k, n] + beta C, element (i, j) of X at
   x + i * rsx + j * csx. Returns 0, or -1 if the packing buffers cannot be allocated. */
int tsr_sgemm(int64_t m, int64_t n, int64_t k, float alpha,
              const float *a, int64_t rsa, int64_t csa,
              const float *b, int64_t rsb, int64_t csb,
              float beta, float *c, int64_t rsc, int64_t csc, const tsr_ep *ep) {
    if (m <= 0 || n <= 0) return 0;
    if (k <= 0 || alpha == 0.0f) {  /* C = beta C, then the epilogue */
        for (int64_t i = 0; i < m; i++)
            for (int64_t j = 0; j < n; j++) {
                float *dst = c + i * rsc + j * csc;
                *dst = EPILOGUE(beta != 0.0f ? beta * *dst : 0.0f, i, j, ep);
            }
        return 0;
    }
    if (m <= GEMV_ROWS && (csb == 1 || rsb == 1)) {
        gemv_rows(m, n, k, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc, ep);
        return 0;
    }
    const int64_t nc_max = n < NC ? (n + NR - 1) / NR * NR : NC;
    const int64_t kc_max = k < KC ? k : KC;
    const int threads = omp_get_max_threads();
    const int64_t mc_max = m < MC ? (m + MR - 1) / MR * MR : MC;
    float *bp = buffer(0, nc_max * kc_max), *ap = buffer(1, threads * mc_max * kc_max);
    if (!bp || !ap) return -1;
    const int64_t work = m * n * k;
    #pragma omp parallel if(work > 64 * 64 * 64) num_threads(threads)
    {
        float *my_a = ap + omp_get_thread_num() * mc_max * kc_max;
        const int nt = omp_get_num_threads();
        for (int64_t jc = 0; jc < n; jc += NC) {
            const int64_t nc = n - jc < NC ? n - jc : NC;
            for (int64_t pc = 0; pc < k; pc += KC) {
                const int64_t kc = k - pc < KC ? k - pc : KC;
                const float beta_p = pc == 0 ? beta : 1.0f;
                const int last = pc + kc >= k;  /* the epilogue runs once, at the end */
                #pragma omp for schedule(static)
                for (int64_t j = 0; j < nc; j += NR)
                    pack_b_sliver(nc - j, kc, b + pc * rsb + (jc + j) * csb, rsb, csb,
                                  bp + j * kc);
                /* the micro-tile (i, j) of the (ic, jc) block, A packed at `packed` */
                #define TILE(packed) micro_kernel(kc, (packed) + i * kc, bp + j * kc, \
                    c + (ic + i) * rsc + (jc + j) * csc, rsc, csc, mc - i < MR ? mc - i : MR, \
                    nc - j < NR ? nc - j : NR, alpha, beta_p, ic + i, jc + j, last, ep)
                /* threads split the rows of C into equal blocks (a multiple of the thread
                   count, at most MC rows) when there are enough rows, else its columns */
                int64_t blocks = (m + MC - 1) / MC;
                blocks = (blocks + nt - 1) / nt * nt;
                const int64_t mb = ((m + blocks - 1) / blocks + MR - 1) / MR * MR;
                blocks = (m + mb - 1) / mb;
                if (blocks >= nt) {
                    #pragma omp for schedule(static)
                    for (int64_t ib = 0; ib < blocks; ib++) {
                        const int64_t ic = ib * mb, mc = m - ic < mb ? m - ic : mb;
                        pack_a(mc, kc, a + ic * rsa + pc * csa, rsa, csa, my_a);
                        for (int64_t j = 0; j < nc; j += NR)
                            for (int64_t i = 0; i < mc; i += MR)
                                TILE(my_a);
                    }
                } else {
                    for (int64_t ic = 0; ic < m; ic += MC) {
                        const int64_t mc = m - ic < MC ? m - ic : MC;
                        #pragma omp single
                        pack_a(mc, kc, a + ic * rsa + pc * csa, rsa, csa, ap);
                        #pragma omp for schedule(static) collapse(2)
                        for (int64_t j = 0; j < nc; j += NR)
                            for (int64_t i = 0; i < mc; i += MR)
                                TILE(ap);
                    }
                }
            }
        }
    }
    return 0;
}

/* grouped (MoE experts): for each group g of `sizes[g]` consecutive rows of A (tokens
   sorted by expert), C[rows] = A[rows] @ B[g], B[g] at b + g * gsb. One call for all the
   groups. With many groups the threads take whole groups (dynamically: token counts are
   uneven; the GEMM inside then runs on its caller's thread alone, as nested regions do);
   with few, each group uses all threads. Returns 0, or -1 if packing memory runs out. */
int tsr_sgemm_grouped(int64_t groups, const int64_t *sizes, int64_t n, int64_t k,
                      const float *a, int64_t rsa, int64_t csa,
                      const float *b, int64_t gsb, int64_t rsb, int64_t csb,
                      float *c, int64_t rsc, int64_t csc, const tsr_ep *ep) {
    int64_t *starts = malloc((size_t)(groups + 1) * sizeof(int64_t));
    if (!starts) return -1;
    starts[0] = 0;
    for (int64_t g = 0; g < groups; g++) starts[g + 1] = starts[g] + sizes[g];
    int failed = 0;
    #pragma omp parallel for schedule(dynamic, 1) if(groups >= 2 * omp_get_max_threads()) \
        reduction(|:failed)
    for (int64_t g = 0; g < groups; g++)
        if (sizes[g] > 0)
            failed |= tsr_sgemm(sizes[g], n, k, 1.0f, a + starts[g] * rsa, rsa, csa,
                                b + g * gsb, rsb, csb, 0.0f, c + starts[g] * rsc, rsc, csc, ep);
    free(starts);
    return failed ? -1 : 0;
}

/* batched: C[i] = A[i] @ B[i] for i < batch, X[i] at x + i * bsx (a batch stride of 0
   shares one matrix, e.g. a weight). Threads take whole products when there are many. */
int tsr_sgemm_batched(int64_t batch, int64_t m, int64_t n, int64_t k,
                      const float *a, int64_t bsa, int64_t rsa, int64_t csa,
                      const float *b, int64_t bsb, int64_t rsb, int64_t csb,
                      float *c, int64_t bsc, int64_t rsc, int64_t csc, const tsr_ep *ep) {
    int failed = 0;
    #pragma omp parallel for schedule(static) if(batch >= 2 * omp_get_max_threads()) \
        reduction(|:failed)
    for (int64_t i = 0; i < batch; i++)
        failed |= tsr_sgemm(m, n, k, 1.0f, a + i * bsa, rsa, csa, b + i * bsb, rsb, csb, 0.0f,
                            c + i * bsc, rsc, csc, ep);
    return failed ? -1 : 0;
}
