/* Tessera's collective reductions: out = op(src0, src1, ...) elementwise, vectorized C.
 *
 * 16-bit floats widen to float32, accumulate, and round once (nearest even, NaN kept);
 * integer sums and products wrap; max/min propagate NaN as torch.maximum/minimum do.
 * Spliced into transport.c where it says #include "reduce.h" (shm.native() does the
 * splicing, so the compile cache's key covers this file too).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__F16C__)
#include <immintrin.h>
#endif

enum { OP_SUM, OP_PROD, OP_MAX, OP_MIN, N_OPS };
enum { D_F32, D_F16, D_BF16, D_I32, D_I64, D_F64, D_U8, N_DTYPES };
static const size_t dtype_size[N_DTYPES] = {4, 2, 2, 4, 8, 8, 1};

#define BLOCK 1024

/* Blocks of 16-bit floats widened to float32 and rounded back (nearest even, NaN kept):
 * F16C instructions where the CPU has them, else C. */
#if defined(__F16C__)
static void f16_widen(float *d, const uint16_t *s, size_t m) {
    size_t i = 0;
    for (; i + 8 <= m; i += 8)
        _mm256_storeu_ps(d + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + i))));
    for (; i < m; i++) d[i] = _cvtsh_ss(s[i]);
}
static void f16_narrow(uint16_t *d, const float *s, size_t m) {
    size_t i = 0;
    for (; i + 8 <= m; i += 8)
        _mm_storeu_si128((__m128i *)(d + i), _mm256_cvtps_ph(_mm256_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < m; i++) d[i] = _cvtss_sh(s[i], _MM_FROUND_TO_NEAREST_INT);
}
#elif defined(__FLT16_MAX__)
static void f16_widen(float *d, const uint16_t *s, size_t m) {
    for (size_t i = 0; i < m; i++) d[i] = (float)((const _Float16 *)s)[i];
}
static void f16_narrow(uint16_t *d, const float *s, size_t m) {
    for (size_t i = 0; i < m; i++) ((_Float16 *)d)[i] = (_Float16)s[i];
}
#else
static void f16_widen(float *d, const uint16_t *s, size_t m) {
    for (size_t i = 0; i < m; i++) {
        uint32_t h = s[i], sign = (h & 0x8000u) << 16, e = (h >> 10) & 0x1f, f = h & 0x3ff, u;
        if (e == 0x1f) u = sign | 0x7f800000u | (f << 13);
        else if (e) u = sign | ((e + 112) << 23) | (f << 13);
        else { float v = (float)f * 0x1p-24f; memcpy(&u, &v, 4); u |= sign; }
        memcpy(d + i, &u, 4);
    }
}
static void f16_narrow(uint16_t *d, const float *s, size_t m) {
    for (size_t i = 0; i < m; i++) {
        uint32_t u; memcpy(&u, s + i, 4);
        uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
        if (a > 0x7f800000u) d[i] = (uint16_t)(sign | 0x7e00u);
        else if (a >= 0x477ff000u) d[i] = (uint16_t)(sign | 0x7c00u);
        else if (a < 0x38800000u) { float v; memcpy(&v, &a, 4); d[i] = (uint16_t)(sign | (uint32_t)nearbyintf(v * 0x1p24f)); }
        else d[i] = (uint16_t)(sign | ((a + 0xfffu + ((a >> 13) & 1u) - 0x38000000u) >> 13));
    }
}
#endif

static void bf16_widen(float *d, const uint16_t *s, size_t m) {
    for (size_t i = 0; i < m; i++) {
        uint32_t u = (uint32_t)s[i] << 16;
        memcpy(d + i, &u, 4);
    }
}
static void bf16_narrow(uint16_t *d, const float *s, size_t m) {
    for (size_t i = 0; i < m; i++) {
        uint32_t u; memcpy(&u, s + i, 4);
        uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
        d[i] = (uint16_t)((s[i] != s[i]) ? 0x7fc0u : r);
    }
}

/* Binary ops; max/min propagate NaN as torch.maximum/minimum do. */
#define F_SUM(a, b) ((a) + (b))
#define F_PROD(a, b) ((a) * (b))
#define F_MAX(a, b) (((a) > (b) || (a) != (a)) ? (a) : (b))
#define F_MIN(a, b) (((a) < (b) || (a) != (a)) ? (a) : (b))

/* out (and out2 if set) = op over srcs[0..n-1], elementwise, in BLOCK-sized passes so the
 * partial result stays in L1. out may alias srcs[0] (never a later source). */
#define DEF_NATIVE(NAME, T, F)                                                              \
    static void NAME(void *out_, void *out2_, const void *const *srcs, int n, size_t count) { \
        T *out = out_, *out2 = out2_;                                                       \
        for (size_t b = 0; b < count; b += BLOCK) {                                         \
            size_t m = count - b < BLOCK ? count - b : BLOCK;                               \
            const T *s0 = (const T *)srcs[0] + b, *s1 = (const T *)srcs[1] + b;             \
            T *o = out + b;                                                                 \
            for (size_t i = 0; i < m; i++) o[i] = F(s0[i], s1[i]);                          \
            for (int j = 2; j < n; j++) {                                                   \
                const T *sj = (const T *)srcs[j] + b;                                       \
                for (size_t i = 0; i < m; i++) o[i] = F(o[i], sj[i]);                       \
            }                                                                               \
            if (out2) memcpy(out2 + b, o, m * sizeof(T));                                   \
        }                                                                                   \
    }

/* 16-bit floats accumulate in float32 and round once. */
#define DEF_HALF(NAME, WIDEN, NARROW, F)                                                    \
    static void NAME(void *out_, void *out2_, const void *const *srcs, int n, size_t count) { \
        uint16_t *out = out_, *out2 = out2_;                                                \
        float acc[BLOCK], next[BLOCK];                                                      \
        for (size_t b = 0; b < count; b += BLOCK) {                                         \
            size_t m = count - b < BLOCK ? count - b : BLOCK;                               \
            WIDEN(acc, (const uint16_t *)srcs[0] + b, m);                                   \
            for (int j = 1; j < n; j++) {                                                   \
                WIDEN(next, (const uint16_t *)srcs[j] + b, m);                              \
                for (size_t i = 0; i < m; i++) acc[i] = F(acc[i], next[i]);                 \
            }                                                                               \
            NARROW(out + b, acc, m);                                                        \
            if (out2) memcpy(out2 + b, out + b, m * 2);                                     \
        }                                                                                   \
    }

/* Integer sums and products wrap (as torch's do) without undefined behaviour. */
#define DEF_INT(NAME, T, U)                                                                 \
    static inline T NAME##_add(T a, T b) { return (T)((U)a + (U)b); }                       \
    static inline T NAME##_mul(T a, T b) { return (T)((U)a * (U)b); }                       \
    DEF_NATIVE(NAME##_sum, T, NAME##_add)                                                   \
    DEF_NATIVE(NAME##_prod, T, NAME##_mul)                                                  \
    DEF_NATIVE(NAME##_max, T, F_MAX)                                                        \
    DEF_NATIVE(NAME##_min, T, F_MIN)

#define DEF_FLOAT(NAME, T)                                                                  \
    DEF_NATIVE(NAME##_sum, T, F_SUM)                                                        \
    DEF_NATIVE(NAME##_prod, T, F_PROD)                                                      \
    DEF_NATIVE(NAME##_max, T, F_MAX)                                                        \
    DEF_NATIVE(NAME##_min, T, F_MIN)

#define DEF_HALFS(NAME, WIDEN, NARROW)                                                      \
    DEF_HALF(NAME##_sum, WIDEN, NARROW, F_SUM)                                              \
    DEF_HALF(NAME##_prod, WIDEN, NARROW, F_PROD)                                            \
    DEF_HALF(NAME##_max, WIDEN, NARROW, F_MAX)                                              \
    DEF_HALF(NAME##_min, WIDEN, NARROW, F_MIN)

DEF_FLOAT(r_f32, float)
DEF_FLOAT(r_f64, double)
DEF_INT(r_i32, int32_t, uint32_t)
DEF_INT(r_i64, int64_t, uint64_t)
DEF_INT(r_u8, uint8_t, uint32_t)
DEF_HALFS(r_f16, f16_widen, f16_narrow)
DEF_HALFS(r_bf16, bf16_widen, bf16_narrow)

typedef void (*reduce_fn)(void *, void *, const void *const *, int, size_t);
#define ROW(N) {N##_sum, N##_prod, N##_max, N##_min}
static const reduce_fn reducers[N_DTYPES][N_OPS] = {
    ROW(r_f32), ROW(r_f16), ROW(r_bf16), ROW(r_i32), ROW(r_i64), ROW(r_f64), ROW(r_u8)};

