/* Tessera GEMM template: C = alpha * A @ B + beta * C, any strides, fused epilogues.
 *
 * Layered as CUTLASS/CATLASS and structured as BLIS:
 *   device  (Python)   picks blocking and formats, builds and launches;
 *   kernel  tsr_gemm   the five loops: jc (NC) -> pc (KC, pack B) -> ic (MC, pack A)
 *                      -> jr/ir (micro-tiles, spread over the threads);
 *   block   pack_a / pack_b_sliver  copy operands into MR- and NR-wide float32 slivers,
 *                      zero-padded, converting 16-bit and dequantizing int8/int4 on the way;
 *   tile    micro_kernel  an MR x NR block of C in MR * NR / VL vector registers over the
 *                      whole KC loop, then one store that applies the epilogue.
 * The builder prepends MR, NR, VL (floats per vector), MC, KC, NC, the operand formats
 * A_FMT, B_FMT, C_FMT (TSR_F32/BF16/F16; B also TSR_Q8/Q4 with GROUP rows per scale),
 * SWIGLU, PACKED_B, optionally EPILOGUE, tessera_tile.h (the micro-kernel's K step, which
 * `tl.dot` shares) and tessera_math.h.
 */
#include <stdint.h>
#include <string.h>
#include <stdlib.h>
#include <omp.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#define TSR_F32 0
#define TSR_BF16 1
#define TSR_F16 2
#define TSR_Q8 3
#define TSR_Q4 4

typedef uint16_t tsr_hv __attribute__((vector_size(VL * 2)));
typedef uint32_t tsr_uv __attribute__((vector_size(VL * 4)));


/* ---- storage formats: element types and their float32 conversions --------------------- */
static inline float f32_in(float x) { return x; }
static inline float f32_out(float x) { return x; }
/* VL contiguous 16-bit floats as a float32 vector */
static inline tsr_fv bf16_vload(const uint16_t *p) {
    tsr_hv h; memcpy(&h, p, sizeof h);
    const tsr_uv u = __builtin_convertvector(h, tsr_uv) << 16;
    tsr_fv f; memcpy(&f, &u, sizeof f); return f;
}
static inline tsr_fv f16_vload(const uint16_t *p) {
#ifdef __FLT16_MAX__
    typedef _Float16 tsr_f16v __attribute__((vector_size(VL * 2)));
    tsr_f16v h; memcpy(&h, p, sizeof h);
    return __builtin_convertvector(h, tsr_fv);
#else
    float lanes[VL];
    for (int l = 0; l < VL; l++) lanes[l] = tsr_f16_to_f32(p[l]);
    return tsr_vload(lanes);
#endif
}
/* VL signed bytes as floats (GCC scalarizes __builtin_convertvector from bytes, so x86
   gets the widening instructions); and the 32 int4 rows of a 16-byte block (see tsr_b)
   as floats times NIBBLE_UNIT: with AVX-512 each nibble looks its value up in a 16-float
   table (vpermps reads the low 4 bits of each lane: no masking), else a nibble moved to
   the top of its byte is a signed byte, 16 times its value. */
#if defined(__AVX512F__) && VL == 16
#include <immintrin.h>
static inline tsr_fv i8_vload(const int8_t *p) {
    return (tsr_fv)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const void *)p)));
}
#define NIBBLE_UNIT 1.0f
static inline void nibble_block(const uint8_t *p, tsr_fv out[32 / VL]) {
    const __m512 values = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7,
                                          -8, -7, -6, -5, -4, -3, -2, -1);
    const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const void *)p));
    out[0] = (tsr_fv)_mm512_permutexvar_ps(bytes, values);
    out[1] = (tsr_fv)_mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), values);
}
#elif defined(__AVX2__) && VL == 8
#include <immintrin.h>
static inline tsr_fv i8_vload(const int8_t *p) {
    return (tsr_fv)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const void *)p)));
}
static inline tsr_fv nibble_vload(const uint8_t *p, int high) {
    __m128i q = _mm_loadl_epi64((const void *)p);
    q = _mm_and_si128(high ? q : _mm_slli_epi16(q, 4), _mm_set1_epi8(-16));
    return (tsr_fv)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
}
#else
static inline tsr_fv i8_vload(const int8_t *p) {
    float lanes[VL];
    for (int l = 0; l < VL; l++) lanes[l] = p[l];
    return tsr_vload(lanes);
}
static inline tsr_fv nibble_vload(const uint8_t *p, int high) {
    float lanes[VL];
    for (int l = 0; l < VL; l++) lanes[l] = (int8_t)(high ? p[l] & 0xf0 : p[l] << 4);
    return tsr_vload(lanes);
}
#endif
#ifndef NIBBLE_UNIT
#define NIBBLE_UNIT (1.0f / 16)
static inline void nibble_block(const uint8_t *p, tsr_fv out[32 / VL]) {
    for (int h = 0; h < 32 / VL; h++) out[h] = nibble_vload(p + h * VL % 16, h * VL >= 16);
}
#endif
#define FORMAT_F32 float, f32_in, f32_out, tsr_vload
#define FORMAT_BF16 uint16_t, tsr_bf16_to_f32, tsr_f32_to_bf16, bf16_vload
#define FORMAT_F16 uint16_t, tsr_f16_to_f32, tsr_f32_to_f16, f16_vload
#define PICK_T(t, in, out, vl) t
#define PICK_IN(t, in, out, vl) in
#define PICK_OUT(t, in, out, vl) out
#define PICK_VLOAD(t, in, out, vl) vl
#if A_FMT == TSR_BF16
#define A_FORMAT FORMAT_BF16
#elif A_FMT == TSR_F16
#define A_FORMAT FORMAT_F16
#else
#define A_FORMAT FORMAT_F32
#endif
#if C_FMT == TSR_BF16
#define C_FORMAT FORMAT_BF16
#elif C_FMT == TSR_F16
#define C_FORMAT FORMAT_F16
#else
#define C_FORMAT FORMAT_F32
#endif
#if B_FMT == TSR_BF16
#define B_FORMAT FORMAT_BF16
#elif B_FMT == TSR_F16
#define B_FORMAT FORMAT_F16
#elif B_FMT == TSR_Q8
#define B_FORMAT int8_t, f32_in, f32_out, tsr_vload
#elif B_FMT == TSR_Q4
#define B_FORMAT uint8_t, f32_in, f32_out, tsr_vload
#else
#define B_FORMAT FORMAT_F32
#endif
#define APPLY(pick, fmt) pick(fmt)
typedef APPLY(PICK_T, A_FORMAT) a_t;
typedef APPLY(PICK_T, B_FORMAT) b_t;
typedef APPLY(PICK_T, C_FORMAT) c_t;
#define A_IN APPLY(PICK_IN, A_FORMAT)
#define C_IN APPLY(PICK_IN, C_FORMAT)
#define C_OUT APPLY(PICK_OUT, C_FORMAT)
#define QUANTIZED (B_FMT == TSR_Q8 || B_FMT == TSR_Q4)

/* Operand B: element (p, j) of a dense B at p * rs + j * cs (in b_t). A quantized B is
   stored by columns: column j's K rows (padded to a multiple of GROUP) start at byte
   j * cs; int8 one per byte, int4 in blocks of 32 rows as 16 bytes (row r of a block in
   byte r % 16, low nibble for r < 16, high for r >= 16, two's complement); row p of
   column j is scaled by scale[j * scs + p / GROUP]. Problem g of a grouped or batched
   call starts gs elements (bytes) and gss scales further. */
typedef struct { const void *p; const float *scale; int64_t rs, cs, scs, gs, gss; } tsr_b;

static inline tsr_b b_problem(const tsr_b *b, int64_t g) {
    tsr_b r = *b;
    r.p = (const b_t *)b->p + g * b->gs;
    r.scale = b->scale + g * b->gss;
    return r;
}

static inline float b_at(const tsr_b *b, int64_t p, int64_t j) {
#if B_FMT == TSR_Q8
    return ((const int8_t *)b->p)[j * b->cs + p] * b->scale[j * b->scs + p / GROUP];
#elif B_FMT == TSR_Q4
    const uint8_t byte = ((const uint8_t *)b->p)[j * b->cs + p / 32 * 16 + p % 16];
    const int nib = p % 32 < 16 ? byte & 15 : byte >> 4;
    return ((nib ^ 8) - 8) * b->scale[j * b->scs + p / GROUP];
#else
    return APPLY(PICK_IN, B_FORMAT)(((const b_t *)b->p)[p * b->rs + j * b->cs]);
#endif
}

/* Operand A: element (i, p) at p[i * rs + p * cs]; or, gathered (ro set), at
   p[ro[i] + co[p]]: a matrix of offsets that separate into a row and a column part, as an
   implicit im2col (row i an output pixel, column p an input channel and kernel tap, of a
   zero-padded image), so a convolution runs as a GEMM without materializing the matrix. */
typedef struct { const a_t *p; int64_t rs, cs; const int64_t *ro, *co; } tsr_a;

static inline float a_at(const tsr_a *a, int64_t i, int64_t p) {
    return A_IN(a->ro ? a->p[a->ro[i] + a->co[p]] : a->p[i * a->rs + p * a->cs]);
}


/* ---- epilogue --------------------------------------------------------------------------- */
/* What the builder fuses into the final store of each element of C (bias, activation,
   residual...), as EPILOGUE(x, i, j, ep); the identity when there is none. */
typedef struct { const float *bias; const float *res; int64_t rsr, csr; } tsr_ep;
#ifndef EPILOGUE
#define EPILOGUE(x, i, j, ep) (x)
#define HAS_EPILOGUE 0
#else
#define HAS_EPILOGUE 1
#endif
#define NV (NR / VL)
/* SwiGLU: B holds [gate | up] (2N columns); each packed NR-sliver takes NR / 2 gate
   columns and the same NR / 2 up columns, so one micro-tile yields silu(gate) * up. */
#define HALF (NR / 2)
/* Partial sums stay in C between KC steps when C is float32 and as wide as the product;
   otherwise (16-bit C, SwiGLU) in a float32 workspace. */
#define DIRECT (C_FMT == TSR_F32 && !SWIGLU)

/* Where a micro-tile goes: C (format c_t) and, between KC steps, a float32 workspace. */
typedef struct {
    c_t *c; int64_t rsc, csc;
    float *w; int64_t rsw;  /* DIRECT: w aliases c */
    int64_t n;  /* columns of C */
    float alpha, beta;
    const tsr_ep *ep;
} tsr_out;

/* The final store of an m x n corner of the tile at C(i0, j0) (SwiGLU: of the packed
   product, whose sliver j0 / NR yields outputs from j0 / NR * HALF): epilogue, SwiGLU
   pairing, format conversion. */
static inline __attribute__((always_inline)) void store_rows(
        const tsr_out *o, float tile[MR][NR], int64_t i0, int64_t j0, int64_t m, int64_t n,
        const int64_t csc) {
    for (int64_t r = 0; r < m; r++) {
        c_t *dst = o->c + (i0 + r) * o->rsc;
#if SWIGLU
        const int64_t c0 = j0 / NR * HALF;  /* the sliver's first output column */
        const int64_t h = o->n - c0 < HALF ? o->n - c0 : HALF;
        #pragma omp simd simdlen(VL)
        for (int64_t j = 0; j < h; j++) {
            const float x = tsr_silu(tile[r][j]) * tile[r][HALF + j];
            dst[(c0 + j) * csc] = C_OUT(EPILOGUE(x, i0 + r, c0 + j, o->ep));
        }
#else
        #pragma omp simd simdlen(VL)
        for (int64_t j = 0; j < n; j++)
            dst[(j0 + j) * csc] = C_OUT(EPILOGUE(tile[r][j], i0 + r, j0 + j, o->ep));
#endif
    }
}

static void store_final(const tsr_out *o, float tile[MR][NR], int64_t i0, int64_t j0,
                        int64_t m, int64_t n) {
    if (o->csc == 1)  /* contiguous rows: vector stores */
        store_rows(o, tile, i0, j0, m, n, 1);
    else
        store_rows(o, tile, i0, j0, m, n, o->csc);
}

/* The rest of micro_kernel (below) for a C stored by columns (rsc = 1): each column of
   the tile is contiguous there, so the loops run down the columns (an m x n corner; a
   whole tile with constant bounds). Element (r, j) of the tile is at v[r * rs + j * cs]. */
static inline __attribute__((always_inline)) void column_loop(
        const tsr_out *o, const float *v, const int rs, const int cs, int64_t i0, int64_t j0,
        const int64_t m, const int64_t n, int first, int last) {
    const float beta = first ? o->beta : 1.0f;
    for (int64_t j = 0; j < n; j++) {
        c_t *c = o->c + (j0 + j) * o->csc + i0;
        float *w = DIRECT ? (float *)c : o->w + i0 * o->rsw + j0 + j;
        const int64_t ws = DIRECT ? 1 : o->rsw;
        float x[MR];
        for (int64_t r = 0; r < m; r++) x[r] = v[r * rs + j * cs];
        if (!first)
            for (int64_t r = 0; r < m; r++) x[r] += w[r * ws];
        else if (beta != 0.0f)
            for (int64_t r = 0; r < m; r++) x[r] += beta * C_IN(c[r]);
        if (last) {  /* the epilogue's reads first: no store to C comes between them */
            for (int64_t r = 0; r < m; r++) x[r] = EPILOGUE(x[r], i0 + r, j0 + j, o->ep);
            for (int64_t r = 0; r < m; r++) c[r] = C_OUT(x[r]);
        } else {
            for (int64_t r = 0; r < m; r++) w[r * ws] = x[r];
        }
    }
}

static void columns(const tsr_out *o, float tile[MR][NR], int64_t i0, int64_t j0, int64_t m,
                    int64_t n, int first, int last) {
    if (m == MR && n == NR)
        column_loop(o, &tile[0][0], NR, 1, i0, j0, MR, NR, first, last);
    else
        column_loop(o, &tile[0][0], NR, 1, i0, j0, m, n, first, last);
}

#if defined(__AVX2__) && VL == 8 && MR <= 8
#define TRANSPOSED 8  /* whole tiles go down the columns from the transposed tile */
/* alpha * acc transposed in 8 x 8 blocks (rows past MR zero): t[j][r] = element (r, j) */
static inline __attribute__((always_inline)) void transpose_tile(
        tsr_fv acc[MR][NV], float alpha, float t[NR][8]) {
    for (int v = 0; v < NV; v++) {
        __m256 r[8], u[8], s[8];
        for (int i = 0; i < 8; i++) r[i] = i < MR ? (__m256)(alpha * acc[i][v]) : _mm256_setzero_ps();
        for (int i = 0; i < 8; i += 2) {  /* pairs of rows interleaved */
            u[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
            u[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
        }
        for (int i = 0; i < 8; i += 4) {  /* then pairs of pairs: 4 rows of a column */
            s[i] = _mm256_shuffle_ps(u[i], u[i + 2], 0x44);
            s[i + 1] = _mm256_shuffle_ps(u[i], u[i + 2], 0xee);
            s[i + 2] = _mm256_shuffle_ps(u[i + 1], u[i + 3], 0x44);
            s[i + 3] = _mm256_shuffle_ps(u[i + 1], u[i + 3], 0xee);
        }
        for (int i = 0; i < 4; i++) {  /* then the 128-bit halves */
            _mm256_storeu_ps(t[v * 8 + i], _mm256_permute2f128_ps(s[i], s[i + 4], 0x20));
            _mm256_storeu_ps(t[v * 8 + i + 4], _mm256_permute2f128_ps(s[i], s[i + 4], 0x31));
        }
    }
}
#endif

/* ---- tile ------------------------------------------------------------------------------- */
/* Prefetches of C: GCC turns any write prefetch into PREFETCHW, which goes to L1 whatever
   the locality, so the early one (to L2) is a read prefetch. */
#define PF_L1W(p) __builtin_prefetch((p), 1, 3)
#define PF_L2(p) __builtin_prefetch((p), 0, 2)
#define KPF 32  /* k steps before the end of a tile at which its C is pulled into L1 */
/* every cache line of `rows` rows of a tile of C at cp, rows rs apart */
#define PF_TILE(PF, cp, rs, rows)                                                  \
    for (int64_t r_ = 0; r_ < (rows); r_++) {                                      \
        for (int l_ = 0; l_ < NR; l_ += 16) PF((cp) + r_ * (rs) + l_);              \
        PF((cp) + r_ * (rs) + NR - 1);                                              \
    }
/* the same for a tile of a C stored by columns, `cols` columns cs apart */
#define PF_COLUMNS(PF, cp, cs, cols)                                               \
    for (int64_t j_ = 0; j_ < (cols); j_++) {                                      \
        PF((cp) + j_ * (cs));                                                       \
        PF((cp) + j_ * (cs) + MR - 1);                                              \
    }

/* acc = A_sliver (k x MR, p-major) * B_sliver (k x NR, rows ldb apart), added to the tile at
   (i0, j0) of the output: the m x n corner inside it (the slivers are zero-padded).
   A float32 gathered A may be read in place instead (ga set: rows i0.., columns pc..):
   each step broadcasts its MR elements through the column's offset, no packing.
   first: the first KC step (beta applies); last: the final one (epilogue, conversion);
   next: whether the tile below is computed next (its C is prefetched to L2 now, a whole
   tile ahead; this tile's C, prefetched then, comes into L1 KPF steps before the end). */
static void micro_kernel(int64_t k, const float *restrict a, const tsr_a *ga, int64_t pc,
                         const float *restrict b, int64_t ldb, const tsr_out *o, int64_t i0,
                         int64_t j0, int64_t m, int64_t n, int first, int last, int next) {
    tsr_fv acc[MR][NV];
    for (int r = 0; r < MR; r++)
        for (int v = 0; v < NV; v++) acc[r][v] = (tsr_fv){0};
    float *w = o->w + i0 * o->rsw + j0;
    const int prefetch = DIRECT && o->csc == 1;
    const int by_columns = !SWIGLU && o->rsc == 1 && o->csc != 1;  /* see columns() */
    c_t *cols = o->c + j0 * o->csc + i0;
    if (prefetch && next) PF_TILE(PF_L2, w + MR * o->rsw, o->rsw, MR)
    if (by_columns && next) PF_COLUMNS(PF_L2, cols + MR, o->csc, NR)
    const int64_t k1 = k > KPF ? k - KPF : 0;
    int64_t p = 0;
    #define K_LOOP                                                                  \
        _Pragma("GCC unroll 4")                                                     \
        for (; p < k1; p++) TSR_TILE_STEP(acc, MR, NV, A_AT, b + p * ldb);          \
        if (prefetch) PF_TILE(PF_L1W, w, o->rsw, m)                                 \
        if (by_columns) PF_COLUMNS(PF_L1W, cols, o->csc, n)                         \
        for (; p < k; p++) TSR_TILE_STEP(acc, MR, NV, A_AT, b + p * ldb);
    if (A_FMT == TSR_F32 && ga) {
        const float *src[MR];  /* rows past m repeat row 0: computed, never stored */
        for (int r = 0; r < MR; r++) src[r] = (const float *)ga->p + ga->ro[i0 + (r < m ? r : 0)];
        const int64_t *col = ga->co + pc;
        #define A_AT(r) src[r][col[p]]
        K_LOOP
        #undef A_AT
    } else {
        #define A_AT(r) a[p * MR + (r)]
        K_LOOP
        #undef A_AT
    }
    #undef K_LOOP
    const float alpha = o->alpha, beta = first ? o->beta : 1.0f;
    float tile[MR][NR];
    if (DIRECT && m == MR && n == NR && o->csc == 1) {  /* a whole tile, rows contiguous */
        const int epilogue = HAS_EPILOGUE && last;  /* then through `tile` to the epilogue */
        for (int r = 0; r < MR; r++)
            for (int v = 0; v < NV; v++) {
                float *dst = w + r * o->rsw + v * VL;
                tsr_fv x = alpha * acc[r][v];
                if (beta != 0.0f) x += beta * tsr_vload(dst);
                tsr_vstore(epilogue ? &tile[r][v * VL] : dst, x);
            }
        if (epilogue) store_final(o, tile, i0, j0, m, n);
        return;
    }
#ifdef TRANSPOSED
    if (by_columns && m == MR && n == NR) {
        float t[NR][TRANSPOSED];
        transpose_tile(acc, alpha, t);
        column_loop(o, &t[0][0], 1, TRANSPOSED, i0, j0, MR, NR, first, last);
        return;
    }
#endif
    for (int r = 0; r < MR; r++)
        for (int v = 0; v < NV; v++) tsr_vstore(&tile[r][v * VL], alpha * acc[r][v]);
    if (by_columns) {  /* C by columns (NCHW convolution outputs) */
        columns(o, tile, i0, j0, m, n, first, last);
        return;
    }
    for (int64_t r = 0; r < m; r++) {  /* add what came before: beta C, or partial sums */
        const c_t *c = o->c + (i0 + r) * o->rsc;
        const float *w = o->w + (i0 + r) * o->rsw;
        if (first && beta != 0.0f)
            for (int64_t j = 0; j < n; j++) tile[r][j] += beta * C_IN(c[(j0 + j) * o->csc]);
        else if (!first)
            for (int64_t j = 0; j < n; j++) tile[r][j] += w[(j0 + j) * (DIRECT ? o->csc : 1)];
    }
    if (last) {
        store_final(o, tile, i0, j0, m, n);
        return;
    }
    for (int64_t r = 0; r < m; r++)
        for (int64_t j = 0; j < n; j++)
            o->w[(i0 + r) * o->rsw + (j0 + j) * (DIRECT ? o->csc : 1)] = tile[r][j];
}

/* ---- block: packing ----------------------------------------------------------------- */
/* One float32 sliver: dst[p * w + l] = src[l * ls + p * ps] for l < lanes, zero for
   lanes <= l < w (past the edge of the matrix), p < kc. */
static inline __attribute__((always_inline)) void pack_sliver(
        const int w, int64_t lanes, int64_t kc, const float *src, int64_t ls, int64_t ps,
        float *restrict dst) {
    if (lanes == w && ls == 1) {  /* lanes contiguous: a row of dst per step */
        for (int64_t p = 0; p < kc; p++) memcpy(dst + p * w, src + p * ps, w * sizeof(float));
    } else if (lanes == w) {  /* a whole sliver: no test per element */
        for (int64_t p = 0; p < kc; p++)
            for (int l = 0; l < w; l++) dst[p * w + l] = src[l * ls + p * ps];
    } else {
        for (int64_t p = 0; p < kc; p++) {
            int64_t l = 0;
            for (; l < lanes; l++) dst[p * w + l] = src[l * ls + p * ps];
            for (; l < w; l++) dst[p * w + l] = 0.0f;
        }
    }
}

/* A gathered A[ic:ic+mc, pc:pc+kc] as MR-row slivers. Rows at consecutive addresses (the
   pixels of an image row, stride 1) copy MR contiguous elements per column. */
static void pack_a_gathered(const tsr_a *a, int64_t ic, int64_t pc, int64_t mc,
                            int64_t kc, float *restrict dst) {
    const int64_t *co = a->co + pc;
    for (int64_t i = 0; i < mc; i += MR, dst += MR * kc) {
        const int64_t rows = mc - i < MR ? mc - i : MR, *ro = a->ro + ic + i;
        int run = rows == MR;
        for (int r = 1; r < MR && run; r++) run = ro[r] == ro[0] + r;
        if (run) {
            const a_t *src = a->p + ro[0];
            for (int64_t p = 0; p < kc; p++)
                for (int r = 0; r < MR; r++) dst[p * MR + r] = A_IN(src[co[p] + r]);
            continue;
        }
        int64_t off[MR];
        for (int r = 0; r < MR; r++) off[r] = ro[r < rows ? r : 0];
        for (int64_t p = 0; p < kc; p++) {
            const a_t *src = a->p + co[p];
            for (int r = 0; r < MR; r++) dst[p * MR + r] = r < rows ? A_IN(src[off[r]]) : 0.0f;
        }
    }
}

/* A[ic:ic+mc, pc:pc+kc] as MR-row slivers, each kc x MR (zero rows past mc). */
static void pack_a(const tsr_a *op, int64_t ic, int64_t pc, int64_t mc, int64_t kc,
                   float *restrict dst) {
    if (op->ro) {
        pack_a_gathered(op, ic, pc, mc, kc, dst);
        return;
    }
    const int64_t rsa = op->rs, csa = op->cs;
    const a_t *a = op->p + ic * rsa + pc * csa;
    for (int64_t i = 0; i < mc; i += MR, dst += MR * kc) {
        const int64_t rows = mc - i < MR ? mc - i : MR;
#if A_FMT == TSR_F32
        pack_sliver(MR, rows, kc, a + i * rsa, rsa, csa, dst);
#else
        for (int64_t p = 0; p < kc; p++) {
            const a_t *src = a + i * rsa + p * csa;
            for (int64_t r = 0; r < MR; r++)
                dst[p * MR + r] = r < rows ? A_IN(src[r * rsa]) : 0.0f;
        }
#endif
    }
}

/* The B column behind packed column jp of an n-column product (SwiGLU: of 2n columns
   interleaved by half slivers), or -1 past the edge. */
static inline int64_t b_column(int64_t jp, int64_t n) {
#if SWIGLU
    const int64_t out = jp / NR * HALF + jp % HALF;
    return out >= n ? -1 : jp % NR < HALF ? out : n + out;
#else
    return jp < n ? jp : -1;
#endif
}

/* B[pc:pc+kc, packed columns jp .. jp+NR] as one kc x NR sliver (zero columns past n). */
static void pack_b_sliver(const tsr_b *b, int64_t n, int64_t pc, int64_t kc, int64_t jp,
                          float *restrict dst) {
#if B_FMT == TSR_F32 && !SWIGLU
    const float *src = (const float *)b->p + pc * b->rs + jp * b->cs;
    pack_sliver(NR, n - jp < NR ? n - jp : NR, kc, src, b->cs, b->rs, dst);
#else
    for (int64_t j = 0; j < NR; j++) {  /* by columns: quantized B is stored by columns */
        const int64_t col = b_column(jp + j, n);
        if (col < 0)
            for (int64_t p = 0; p < kc; p++) dst[p * NR + j] = 0.0f;
        else
            for (int64_t p = 0; p < kc; p++) dst[p * NR + j] = b_at(b, pc + p, col);
    }
#endif
}

/* B[pc:pc+kc, jp .. jp + count * NR] as `count` slivers at dst, dst + kc * NR, ... A
   row-major float32 B of whole slivers is copied row by row across all of them: each
   row is then one contiguous read, where sliver by sliver every 64 bytes would come from
   another row (and, for long rows, another page). */
#define GROUP_SLIVERS 8
static void pack_b_slivers(const tsr_b *b, int64_t n, int64_t pc, int64_t kc, int64_t jp,
                           int count, float *restrict dst) {
    if (B_FMT == TSR_F32 && !SWIGLU && b->cs == 1 && jp + count * NR <= n) {
        const float *src = (const float *)b->p + pc * b->rs + jp;
        for (int64_t p = 0; p < kc; p++)
            for (int s = 0; s < count; s++)
                memcpy(dst + s * kc * NR + p * NR, src + p * b->rs + s * NR,
                       NR * sizeof(float));
        return;
    }
    for (int s = 0; s < count; s++) pack_b_sliver(b, n, pc, kc, jp + s * NR, dst + s * kc * NR);
}

/* Packing buffers, kept per calling thread and grown as needed: fresh multi-MB buffers
   per call would cost their page faults every time. */
static _Thread_local float *buffers[2];
static _Thread_local size_t capacity[2];

static float *buffer(int which, int64_t floats) {
    const size_t align = (size_t)2 << 20;  /* whole 2 MiB pages, made huge: fewer TLB misses */
    const size_t bytes = ((size_t)floats * sizeof(float) + align - 1) / align * align;
    if (bytes > capacity[which]) {
        free(buffers[which]);
        buffers[which] = aligned_alloc(align, bytes);
        capacity[which] = buffers[which] ? bytes : 0;
#if defined(MADV_HUGEPAGE)
        if (buffers[which]) madvise(buffers[which], bytes, MADV_HUGEPAGE);
#endif
    }
    return buffers[which];
}

/* Packed columns of an n-column product: whole slivers for SwiGLU (HALF outputs each). */
static inline int64_t packed_columns(int64_t n) {
    return SWIGLU ? (n + HALF - 1) / HALF * NR : n;
}

/* A prepacked B: every (jc, pc) panel in the order tsr_gemm reads them; the panel at
   (jc, pc) starts at jc * k + pc * ncp (ncp: the panel's columns rounded up to NR). */
static inline int64_t panel_offset(int64_t jc, int64_t pc, int64_t k, int64_t nc) {
    return jc * k + pc * ((nc + NR - 1) / NR * NR);
}

/* Pack all of B [k, n] for PACKED_B builds; dst holds packed_size(k, n) floats. */
int64_t tsr_packed_size(int64_t k, int64_t n) {
    return (packed_columns(n) + NR - 1) / NR * NR * k;
}

void tsr_pack_b(int64_t k, int64_t n, const tsr_b *b, float *dst) {
    const int64_t np = packed_columns(n);
    for (int64_t jc = 0; jc < np; jc += NC) {
        const int64_t nc = np - jc < NC ? np - jc : NC;
        for (int64_t pc = 0; pc < k; pc += KC) {
            const int64_t kc = k - pc < KC ? k - pc : KC;
            float *panel = dst + panel_offset(jc, pc, k, nc);
            #pragma omp parallel for schedule(static) if(kc * nc > 65536)
            for (int64_t j = 0; j < nc; j += NR)
                pack_b_sliver(b, n, pc, kc, jc + j, panel + j * kc);
        }
    }
}

/* ---- skinny products: a few rows of A (LLM decode) ------------------------------------ */
/* No packing: B is streamed once at memory bandwidth and threads split the columns of C.
   B row-major (cs = 1, at most STRIP_ROWS rows of A): each row of A scales rows of B into
   a strip of C kept in L1. B by columns (rs = 1: a transposed weight, or quantized; at
   most DOT_ROWS or QDOT_ROWS rows): each element of C is a dot product along a contiguous
   column of B; the columns of a step stay in L2 while blocks of up to 4 rows of A pass. */
#define STRIP_ROWS 4
#define DIRECT_B_ROWS 64  /* up to this many rows, a row-major float32 B is not packed */
#define STRIP 2048  /* columns of C per step when B is row-major (8 KiB per row in L1) */
#define DOT_ROWS 48
#define QDOT_ROWS 8  /* quantized: each block of rows dequantizes the columns again */
/* columns per step for blocks of m <= 4 rows: as many accumulators as registers hold
   (AVX2's 16: 4 rows of 8 columns spilled, 1.25x slower for 32 rows) */
#if VL == 8
#define DOT_COLS(m) ((m) <= 2 ? 8 : 4)
#else
#define DOT_COLS(m) (((m) <= 2 ? 128 : 64) / VL)
#endif
#define QDOT_WIDE (VL == 16 ? 4 : 2)  /* for one row: 32-row blocks of B fill registers */
#define QDOT_COLS(m) (QDOT_WIDE / (m) > 0 ? QDOT_WIDE / (m) : 1)

static inline float hsum(tsr_fv v) {
#if defined(__AVX512F__) && VL == 16
    return _mm512_reduce_add_ps((__m512)v);  /* a shuffle tree, not 16 dependent adds */
#else
    float lanes[VL], s = 0.0f;
    tsr_vstore(lanes, v);
    for (int l = 0; l < VL; l++) s += lanes[l];
    return s;
#endif
}

/* out[i][v] = the lanes of acc[i * lda + v] summed (rows 0 .. done of the dot product),
   plus rows done .. k one at a time, for i < m, v < nj. */
static inline __attribute__((always_inline)) void finish_dots(
        int64_t m, int64_t nj, int64_t k, int64_t done, const tsr_fv *acc, int lda,
        const float *a, int64_t rsa, const tsr_b *b, int64_t j0, float *out, int64_t ldo) {
    for (int64_t i = 0; i < m; i++)
        for (int64_t v = 0; v < nj; v++) {
            float s = done ? hsum(acc[i * lda + v]) : 0.0f;
            for (int64_t p = done; p < k; p++) s += a[i * rsa + p] * b_at(b, p, j0 + v);
            out[i * ldo + v] = s;
        }
}

#if !QUANTIZED
#define COLS DOT_COLS
/* out[i][v] = A[i, :] . B[:, j0 + v] for i < m, v < nj <= cols dense columns stored by
   columns (rs = 1); A is float32 with contiguous rows. */
static inline __attribute__((always_inline)) void dot_columns(
        const int m, const int cols, int64_t k, int64_t nj, const float *a, int64_t rsa,
        const tsr_b *b, int64_t j0, float *out, int64_t ldo) {
    tsr_fv acc[4][DOT_COLS(1)];
    for (int i = 0; i < m; i++)
        for (int v = 0; v < cols; v++) acc[i][v] = (tsr_fv){0};
    const int64_t kv = nj == cols ? k / VL * VL : 0;
    for (int64_t p = 0; p < kv; p += VL) {
        tsr_fv bv[DOT_COLS(1)];
        for (int v = 0; v < cols; v++)
            bv[v] = APPLY(PICK_VLOAD, B_FORMAT)((const b_t *)b->p + p + (j0 + v) * b->cs);
        for (int i = 0; i < m; i++) {
            const tsr_fv av = tsr_vload(a + i * rsa + p);
            for (int v = 0; v < cols; v++) acc[i][v] += av * bv[v];
        }
    }
    finish_dots(m, nj, k, kv, acc[0], DOT_COLS(1), a, rsa, b, j0, out, ldo);
}
#define DOT dot_columns
#else
#define COLS QDOT_COLS
/* The same for quantized columns: each group of rows accumulates unscaled, then is
   scaled once. */
static inline __attribute__((always_inline)) void dot_columns_q(
        const int m, const int cols, int64_t k, int64_t nj, const float *a, int64_t rsa,
        const tsr_b *b, int64_t j0, float *out, int64_t ldo) {
    const float unit = B_FMT == TSR_Q4 ? NIBBLE_UNIT : 1.0f;
    tsr_fv acc[4][QDOT_COLS(1)];
    for (int i = 0; i < m; i++)
        for (int v = 0; v < cols; v++) acc[i][v] = (tsr_fv){0};
    const b_t *col[QDOT_COLS(1)];
    for (int v = 0; v < cols; v++) col[v] = (const b_t *)b->p + (j0 + v) * b->cs;
    const int64_t kg = nj == cols ? k / GROUP * GROUP : 0;
    for (int64_t g = 0; g < kg; g += GROUP) {
        tsr_fv part[4][QDOT_COLS(1)];
        for (int i = 0; i < m; i++)
            for (int v = 0; v < cols; v++) part[i][v] = (tsr_fv){0};
        for (int64_t p = g; p < g + GROUP; p += 32) {  /* a block of 32 rows */
            tsr_fv bv[QDOT_COLS(1)][32 / VL];
            for (int v = 0; v < cols; v++)
#if B_FMT == TSR_Q8
                for (int h = 0; h < 32 / VL; h++) bv[v][h] = i8_vload(col[v] + p + h * VL);
#else
                nibble_block(col[v] + p / 2, bv[v]);
#endif
            for (int h = 0; h < 32 / VL; h++)
                for (int i = 0; i < m; i++) {
                    const tsr_fv av = tsr_vload(a + i * rsa + p + h * VL);
                    for (int v = 0; v < cols; v++) part[i][v] += av * bv[v][h];
                }
        }
        for (int v = 0; v < cols; v++) {
            const float scale = b->scale[(j0 + v) * b->scs + g / GROUP] * unit;
            for (int i = 0; i < m; i++) acc[i][v] += part[i][v] * scale;
        }
    }
    finish_dots(m, nj, k, kg, acc[0], QDOT_COLS(1), a, rsa, b, j0, out, ldo);
}
#define DOT dot_columns_q
#endif

/* out[i][j] = A[i, :] . B[:, j0 + j] for i < m, j < nj <= step columns (ldo = step). */
static void skinny_block(int64_t m, int64_t k, const float *a, int64_t rsa, const tsr_b *b,
                         int64_t j0, int64_t nj, float *out, int64_t ldo) {
    if (!QUANTIZED && b->cs == 1) {  /* stream B's rows over a strip of C in L1 */
        for (int64_t i = 0; i < m; i++) memset(out + i * ldo, 0, nj * sizeof(float));
        for (int64_t p = 0; p < k; p++) {
            const b_t *brow = (const b_t *)b->p + p * b->rs + j0;
            for (int64_t i = 0; i < m; i++) {
                const float ai = a[i * rsa + p];
                float *o = out + i * ldo;
                #pragma omp simd
                for (int64_t j = 0; j < nj; j++)
                    o[j] += ai * APPLY(PICK_IN, B_FORMAT)(brow[j]);
            }
        }
        return;
    }
    /* blocks of 4 rows at COLS(4) columns, or all m <= 4 rows at COLS(m); constant row
       and column counts keep the accumulators in registers */
    #define DOT_AT(rows, cols) \
        DOT(rows, cols, k, nj, a + i * rsa, rsa, b, j0, out + i * ldo, ldo)
    for (int64_t i = 0; i < m; i += 4) {
        switch (m <= 4 ? m : m - i < 4 ? 4 + m - i : 8) {
            case 1: DOT_AT(1, COLS(1)); break;
            case 2: DOT_AT(2, COLS(2)); break;
            case 3: DOT_AT(3, COLS(3)); break;
            case 4: DOT_AT(4, COLS(4)); break;
            case 5: DOT_AT(1, COLS(4)); break;
            case 6: DOT_AT(2, COLS(4)); break;
            case 7: DOT_AT(3, COLS(4)); break;
            default: DOT_AT(4, COLS(4)); break;
        }
    }
    #undef DOT_AT
}

/* C[m, n] for a skinny A, already float32 with contiguous rows. */
static void skinny(int64_t m, int64_t n, int64_t k, const float *a, int64_t rsa,
                   const tsr_b *b, const tsr_out *o) {
    const int64_t step = !QUANTIZED && b->cs == 1 ? STRIP : COLS(m < 4 ? m : 4);
    #pragma omp parallel for schedule(static) if(n * k > 65536)
    for (int64_t j0 = 0; j0 < n; j0 += step) {
        const int64_t nj = n - j0 < step ? n - j0 : step;
        float out[STRIP_ROWS * STRIP];  /* m * step floats */
        skinny_block(m, k, a, rsa, b, j0, nj, out, step);
#if SWIGLU
        float up[STRIP_ROWS * STRIP];
        skinny_block(m, k, a, rsa, b, n + j0, nj, up, step);
#endif
        for (int64_t i = 0; i < m; i++) {
            c_t *dst = o->c + i * o->rsc + j0 * o->csc;
            for (int64_t j = 0; j < nj; j++) {
                float x = o->alpha * out[i * step + j];
#if SWIGLU
                x = tsr_silu(x) * o->alpha * up[i * step + j];
#endif
                if (o->beta != 0.0f) x += o->beta * C_IN(dst[j * o->csc]);
                dst[j * o->csc] = C_OUT(EPILOGUE(x, i, j0 + j, o->ep));
            }
        }
    }
}

/* ---- kernel ----------------------------------------------------------------------------- */
/* C[m, n] = alpha A[m, k] B[k, n] + beta C for any operand A (see tsr_a). */
static int gemm_run(int64_t m, int64_t n, int64_t k, float alpha, const tsr_a *a,
                    const tsr_b *b, float beta, c_t *c, int64_t rsc, int64_t csc,
                    const tsr_ep *ep) {
    if (m <= 0 || n <= 0) return 0;
    tsr_out o = {c, rsc, csc, (float *)c, rsc, n, alpha, beta, ep};
    if (k <= 0 || alpha == 0.0f) {  /* C = beta C, then the epilogue */
        for (int64_t i = 0; i < m; i++)
            for (int64_t j = 0; j < n; j++) {
                c_t *dst = c + i * rsc + j * csc;
                const float x = beta != 0.0f ? beta * C_IN(*dst) : 0.0f;
                *dst = C_OUT(EPILOGUE(SWIGLU ? 0.0f : x, i, j, ep));  /* silu(0) * 0 */
            }
        return 0;
    }
    const int skinny_b = QUANTIZED ? m <= QDOT_ROWS : b->cs == 1 ? m <= STRIP_ROWS
                         : b->rs == 1 && m <= DOT_ROWS;
    if (!PACKED_B && skinny_b) {
        float *rows = NULL;  /* A as float32 rows for the dot products */
        if (A_FMT != TSR_F32 || a->cs != 1 || a->ro) {
            if (!(rows = malloc((size_t)(m * k) * sizeof(float)))) return -1;
            for (int64_t i = 0; i < m; i++)
                for (int64_t p = 0; p < k; p++) rows[i * k + p] = a_at(a, i, p);
        }
        skinny(m, n, k, rows ? rows : (const float *)a->p, rows ? k : a->rs, b, &o);
        free(rows);
        return 0;
    }
    /* a float32 gathered A (a convolution's image) is read in place: packing it would
       cost about a quarter of a product with 64 columns. Its tiles stay in L1 while B's
       slivers stream from L2 (see below), so B's panel may be deeper than L1, up to
       PANEL_DIRECT floats in steps of even depth: a 3x3 convolution of 64 channels
       (K = 576) takes one step, one of 128 channels two, not three. */
#ifndef GATHER_N
#define GATHER_N 128
#endif
#define PANEL_DIRECT 98304  /* floats of B's panel: 384 KiB of L2 */
    const tsr_a *a_direct = A_FMT == TSR_F32 && a->ro && n <= GATHER_N ? a : NULL;
    int64_t kcb = KC;
    if (a_direct && !PACKED_B && PANEL_DIRECT / ((n + NR - 1) / NR * NR) > KC) {
        kcb = PANEL_DIRECT / ((n + NR - 1) / NR * NR);
        kcb = (k + (k + kcb - 1) / kcb - 1) / ((k + kcb - 1) / kcb);  /* even steps */
    }
    const int64_t np = packed_columns(n);
    const int64_t nc_max = np < NC ? (np + NR - 1) / NR * NR : NC;
    const int64_t kc_max = k < kcb ? k : kcb;
    const int threads = omp_get_max_threads();
    const int64_t mc_max = m < MC ? (m + MR - 1) / MR * MR : MC;
    float *bp = PACKED_B ? NULL : buffer(0, nc_max * kc_max);
    float *ap = buffer(1, threads * mc_max * kc_max);
    if ((!PACKED_B && !bp) || !ap) return -1;
    if (!DIRECT && k > kcb) {  /* partial sums between KC steps need float32 room */
        if (!(o.w = malloc((size_t)(m * np) * sizeof(float)))) return -1;
        o.rsw = np;
    }
    /* few rows, row-major float32 B of short rows: whole slivers are read in place, since
       packing them would cost about as much as the product (long rows put each k step of
       a sliver on another page: packing wins there) */
    const int direct_b = !PACKED_B && B_FMT == TSR_F32 && !SWIGLU && b->cs == 1 &&
                         m <= DIRECT_B_ROWS && b->rs <= 1024;
    #define IN_PLACE(j) (direct_b && jc + (j) + NR <= n)
    const int64_t work = m * n * k;
    #pragma omp parallel if(work > 64 * 64 * 64) num_threads(threads)
    {
        float *my_a = ap + omp_get_thread_num() * mc_max * kc_max;
        const int nt = omp_get_num_threads();
        for (int64_t jc = 0; jc < np; jc += NC) {
            const int64_t nc = np - jc < NC ? np - jc : NC;
            for (int64_t pc = 0; pc < k; pc += kcb) {
                const int64_t kc = k - pc < kcb ? k - pc : kcb;
                const int first = pc == 0, last = pc + kc >= k;
                const float *panel;
                if (PACKED_B) {
                    panel = (const float *)b->p + panel_offset(jc, pc, k, nc);
                } else {
                    #pragma omp for schedule(static)
                    for (int64_t j = 0; j < nc; j += GROUP_SLIVERS * NR) {
                        const int64_t w = nc - j < GROUP_SLIVERS * NR ? nc - j
                                                                      : GROUP_SLIVERS * NR;
                        if (direct_b) {  /* those read in place are not packed */
                            for (int64_t jj = j; jj < j + w; jj += NR)
                                if (!IN_PLACE(jj))
                                    pack_b_sliver(b, n, pc, kc, jc + jj, bp + jj * kc);
                        } else {
                            pack_b_slivers(b, n, pc, kc, jc + j, (int)((w + NR - 1) / NR),
                                           bp + j * kc);
                        }
                    }
                    panel = bp;
                }
                /* the micro-tile (i, j) of the (ic, jc) block, A packed at `packed` */
                #define TILE(packed) micro_kernel(kc, (packed) + i * kc, a_direct, pc, \
                    IN_PLACE(j) ? \
                    (const float *)b->p + pc * b->rs + jc + j : panel + j * kc, \
                    IN_PLACE(j) ? b->rs : NR, &o, \
                    ic + i, jc + j, mc - i < MR ? mc - i : MR, \
                    np - jc - j < NR ? np - jc - j : NR, first, last, i + MR < mc)
                /* threads split the rows of C into equal blocks (a multiple of the thread
                   count, at most MC rows) when there are enough rows, else its columns:
                   each thread then streams only its part of B */
                int64_t blocks = (m + MC - 1) / MC;
                blocks = (blocks + nt - 1) / nt * nt;
                const int64_t mb = ((m + blocks - 1) / blocks + MR - 1) / MR * MR;
                blocks = (m + mb - 1) / mb;
                /* micro-tiles of the busiest thread with rows split, against all of them
                   (49 rows: 5 of 9, so 2 threads would take 10 tiles' time for 9) */
                const int64_t busiest = (blocks + nt - 1) / nt * (mb / MR);
                const int64_t tiles = (blocks - 1) * (mb / MR) +
                                      (m - (blocks - 1) * mb + MR - 1) / MR;
                if (blocks >= nt && mb * 2 >= MC && busiest * nt * 20 <= tiles * 21) {
                    #pragma omp for schedule(static)
                    for (int64_t ib = 0; ib < blocks; ib++) {
                        const int64_t ic = ib * mb, mc = m - ic < mb ? m - ic : mb;
                        if (a_direct) {  /* an A tile read in place stays in L1 across
                                            the slivers of B, which stream from L2 */
                            for (int64_t i = 0; i < mc; i += MR)
                                for (int64_t j = 0; j < nc; j += NR)
                                    TILE(my_a);
                            continue;
                        }
                        pack_a(a, ic, pc, mc, kc, my_a);
                        for (int64_t j = 0; j < nc; j += NR)
                            for (int64_t i = 0; i < mc; i += MR)
                                TILE(my_a);
                    }
                } else if (a_direct) {  /* nothing to pack: one loop, one barrier */
                    const int64_t ic = 0, mc = m;
                    #pragma omp for schedule(static) collapse(2)
                    for (int64_t j = 0; j < nc; j += NR)
                        for (int64_t i = 0; i < mc; i += MR)
                            TILE(ap);
                } else {
                    for (int64_t ic = 0; ic < m; ic += MC) {
                        const int64_t mc = m - ic < MC ? m - ic : MC;
                        #pragma omp for schedule(static)
                        for (int64_t i = 0; i < mc; i += MR)
                            pack_a(a, ic + i, pc, mc - i < MR ? mc - i : MR, kc,
                                   ap + i * kc);
                        #pragma omp for schedule(static) collapse(2)
                        for (int64_t j = 0; j < nc; j += NR)
                            for (int64_t i = 0; i < mc; i += MR)
                                TILE(ap);
                    }
                }
            }
        }
    }
    if (o.w != (float *)c) free(o.w);
    return 0;
}

/* C[m, n] = alpha A[m, k] B[k, n] + beta C (SwiGLU: n outputs of a 2n-column B), element
   (i, j) of X at x + i * rsx + j * csx. Returns 0, or -1 if memory runs out. */
int tsr_gemm(int64_t m, int64_t n, int64_t k, float alpha, const a_t *a, int64_t rsa,
             int64_t csa, const tsr_b *b, float beta, c_t *c, int64_t rsc, int64_t csc,
             const tsr_ep *ep) {
    const tsr_a op = {a, rsa, csa, NULL, NULL};
    return gemm_run(m, n, k, alpha, &op, b, beta, c, rsc, csc, ep);
}

/* group g of a grouped call (rows starts[g] .. starts[g + 1] of A and C) */
static int gemm_group(int64_t g, const int64_t *sizes, const int64_t *starts, int64_t n,
                      int64_t k, const a_t *a, int64_t rsa, int64_t csa, const tsr_b *b,
                      c_t *c, int64_t rsc, int64_t csc, const tsr_ep *ep) {
    if (sizes[g] == 0) return 0;
    const tsr_b bg = b_problem(b, g);
    return tsr_gemm(sizes[g], n, k, 1.0f, a + starts[g] * rsa, rsa, csa, &bg, 0.0f,
                    c + starts[g] * rsc, rsc, csc, ep);
}

/* grouped (MoE experts): for each group g of `sizes[g]` consecutive rows of A (tokens
   sorted by expert), C[rows] = A[rows] @ B[g]. One call for all the groups. Token counts
   are uneven: biggest first, each group bigger than a thread's share of the rows left
   runs on all threads; then the threads take the other groups one each as they free up
   (the GEMM inside runs on its caller's thread alone, as nested regions do). Returns 0,
   or -1 if memory runs out. */
int tsr_gemm_grouped(int64_t groups, const int64_t *sizes, int64_t n, int64_t k,
                     const a_t *a, int64_t rsa, int64_t csa, const tsr_b *b,
                     c_t *c, int64_t rsc, int64_t csc, const tsr_ep *ep) {
    int64_t *starts = malloc((size_t)(2 * groups + 1) * sizeof(int64_t));
    if (!starts) return -1;
    int64_t *order = starts + groups + 1;
    starts[0] = 0;
    for (int64_t g = 0; g < groups; g++) starts[g + 1] = starts[g] + sizes[g];
    for (int64_t g = 0; g < groups; g++) {  /* insertion sort, biggest first */
        int64_t at = g;
        for (; at > 0 && sizes[order[at - 1]] < sizes[g]; at--) order[at] = order[at - 1];
        order[at] = g;
    }
    const int threads = omp_get_max_threads();
    int64_t big = 0, rest = starts[groups];  /* groups above a thread's share of the rest */
    for (; big < groups && sizes[order[big]] * threads > rest; big++)
        rest -= sizes[order[big]];
    int failed = 0;
    for (int64_t x = 0; x < big; x++)
        failed |= gemm_group(order[x], sizes, starts, n, k, a, rsa, csa, b, c, rsc, csc, ep);
    #pragma omp parallel for schedule(dynamic, 1) if(groups - big > 1) reduction(|:failed)
    for (int64_t x = big; x < groups; x++)
        failed |= gemm_group(order[x], sizes, starts, n, k, a, rsa, csa, b, c, rsc, csc, ep);
    free(starts);
    return failed ? -1 : 0;
}

/* batched: C[i] = A[i] @ B[i] for i < batch, X[i] at x + i * bsx (a batch stride of 0
   shares one matrix, e.g. a weight). Threads take whole products when there are many. */
int tsr_gemm_batched(int64_t batch, int64_t m, int64_t n, int64_t k,
                     const a_t *a, int64_t bsa, int64_t rsa, int64_t csa, const tsr_b *b,
                     c_t *c, int64_t bsc, int64_t rsc, int64_t csc, const tsr_ep *ep) {
    int failed = 0;
    #pragma omp parallel for schedule(static) if(batch >= 2 * omp_get_max_threads()) \
        reduction(|:failed)
    for (int64_t i = 0; i < batch; i++) {
        const tsr_b bi = b_problem(b, i);
        failed |= tsr_gemm(m, n, k, 1.0f, a + i * bsa, rsa, csa, &bi, 0.0f,
                           c + i * bsc, rsc, csc, ep);
    }
    return failed ? -1 : 0;
}

/* ---- launch: everything above behind the kernel language's launch ABI ------------------ */
/* The arguments of one call, each in an 8-byte slot as runtime/cpu/launch.c passes them
   (pointers and integers as int64, floats as double), so that Python calls the template
   for the cost of a method call instead of ctypes marshalling. `batch` problems: problem
   i reads A at a + i * bsa (gathered through ro/co if ro is set), B shifted by
   b_problem(i), bias at bias + i * bias_gs, the residual at res + i * res_gs, and writes C
   at c + i * bsc; threads take whole problems when there are many. *status is 0, or -1 if
   memory ran out. */
typedef struct {
    int64_t batch, m, n, k;
    double alpha, beta;
    const a_t *a;
    int64_t bsa, rsa, csa;
    const int64_t *ro, *co;
    tsr_b b;
    c_t *c;
    int64_t bsc, rsc, csc;
    const float *bias;
    int64_t bias_gs;
    const float *res;
    int64_t res_gs, rsr, csr;
    int64_t *status;
} tsr_call;

static int call_problem(const tsr_call *s, int64_t i) {
    const tsr_a a = {s->a + i * s->bsa, s->rsa, s->csa, s->ro, s->co};
    const tsr_b b = b_problem(&s->b, i);
    const tsr_ep ep = {s->bias ? s->bias + i * s->bias_gs : NULL,
                       s->res ? s->res + i * s->res_gs : NULL, s->rsr, s->csr};
    return gemm_run(s->m, s->n, s->k, (float)s->alpha, &a, &b, (float)s->beta,
                    s->c + i * s->bsc, s->rsc, s->csc, &ep);
}

void tsr_gemm_launch(int64_t grid0, int64_t grid1, int64_t grid2, const char *slots) {
    (void)grid0, (void)grid1, (void)grid2;
    tsr_call s;
    memcpy(&s, slots, sizeof s);
    int failed = 0;
    if (s.batch == 1) {  /* no parallel region of one thread around it: ~1 us */
        failed = call_problem(&s, 0);
    } else {
        #pragma omp parallel for schedule(static) if(s.batch >= 2 * omp_get_max_threads()) \
            reduction(|:failed)
        for (int64_t i = 0; i < s.batch; i++) failed |= call_problem(&s, i);
    }
    *s.status = failed ? -1 : 0;
}
