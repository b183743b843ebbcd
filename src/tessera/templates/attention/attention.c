/* Tessera attention template: FlashAttention forward (prefill) and split-KV decoding.
 *
 * Prefill (tsr_attention) works on groups of RN = RV * VL query rows of one head, with the
 * rows in vector lanes: S^T = K Q^T and O^T += V^T P^T are GEMM micro-tiles (the GEMM
 * template's TSR_TILE_STEP) whose A operand is K or V read in place (a broadcast per
 * element) and whose B operand is a small packed buffer (Q^T, P^T), and the online softmax
 * is lane-wise: row maxima and sums need no horizontal reductions, nothing is transposed
 * per key block, and K is never packed. Keys stream in blocks of BN; causal groups stop at
 * their last row's key and mask only the keys past their first row.
 * Decode (tsr_decode) splits every sequence's valid keys into chunks spread over the
 * threads (flash-decoding): each chunk leaves a partial max, sum and output per query row,
 * and a second phase combines them.
 *
 * One build per machine serves every dtype and mask kind (they are run-time arguments:
 * conversions happen where rows are copied, never in the inner loops). The builder
 * prepends VL (floats per vector), RV, MR (at most 16), BN, NG, TSR_VL, tessera_tile.h and
 * tessera_math.h.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

/* element formats of q, k, v, the output and the mask */
#define TSR_F32 0
#define TSR_BF16 1
#define TSR_F16 2
#define TSR_BOOL 3
#define TSR_NONE 4  /* no mask */

#define RN (RV * VL)  /* query rows per group: the lanes of RV vectors */
#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

/* The launch arguments, one 8-byte slot each in this order (templates/attention). Strides
   are in elements, in the order (batch, head, position, feature). */
typedef struct {
    const void *q, *k, *v;
    void *o;
    const void *mask;       /* [B, Hq, Sq, Sk] by strides (0 where broadcast), or NULL */
    float *lse;             /* [B, Hq, Sq] natural-log logsumexp (0 where no key), or NULL */
    const int64_t *lens;    /* decode: valid keys of each batch row */
    float *ws;              /* decode: the chunks' partial results */
    int64_t *status;        /* [0]: set to 1 if a scratch buffer could not be allocated;
                               decode: [1 + b * hkv + h], zeros, count finished chunks */
    int64_t qs[4], ks[4], vs[4], os[4], ms[4];
    int64_t batch, hq, hkv, sq, sk, d, dv;
    int64_t fmt, mfmt;      /* format of q, k, v and out; of the mask */
    int64_t causal;         /* prefill: top-left aligned; decode: bottom-right (the last
                               query is the last valid key) */
    int64_t chunk;          /* decode: keys per chunk */
    double scale;
} tsr_args;

/* element i of a tensor of format fmt */
static inline const void *elem(const void *p, int64_t fmt, int64_t i) {
    return (const char *)p + i * (fmt == TSR_F32 ? 4 : fmt == TSR_BOOL ? 1 : 2);
}

static inline float f32_in(float x) { return x; }
static inline float f32_out(float x) { return x; }

/* dst[e * ds] = scale * src[e * cs] for e < n, from format fmt */
static void load_f32(const void *src, int64_t cs, int64_t fmt, int64_t n, float scale,
                     float *restrict dst, int64_t ds) {
#define LOAD(T, IN) {                                                                     \
        const T *x = src;                                                                 \
        if (cs == 1 && ds == 1) {                                                         \
            _Pragma("omp simd")                                                           \
            for (int64_t e = 0; e < n; e++) dst[e] = IN(x[e]) * scale;                    \
        } else {                                                                          \
            for (int64_t e = 0; e < n; e++) dst[e * ds] = IN(x[e * cs]) * scale;          \
        } }
    if (fmt == TSR_BF16) LOAD(uint16_t, tsr_bf16_to_f32)
    else if (fmt == TSR_F16) LOAD(uint16_t, tsr_f16_to_f32)
    else LOAD(float, f32_in)
#undef LOAD
}

/* dst[e * cs] = scale * src[e * ss] for e < n, to format fmt */
static void store_f32(const float *src, int64_t ss, float scale, int64_t n, void *dst,
                      int64_t cs, int64_t fmt) {
#define STORE(T, OUT) {                                                                   \
        T *x = dst;                                                                       \
        for (int64_t e = 0; e < n; e++) x[e * cs] = OUT(src[e * ss] * scale); }
    if (fmt == TSR_BF16) STORE(uint16_t, tsr_f32_to_bf16)
    else if (fmt == TSR_F16) STORE(uint16_t, tsr_f32_to_f16)
    else STORE(float, f32_out)
#undef STORE
}

/* Scratch buffers, kept per thread and grown as needed (fresh ones per call would cost
   their page faults every time). */
#define NBUF 5
static _Thread_local float *buffers[NBUF];
static _Thread_local size_t capacity[NBUF];

static float *buffer(int which, int64_t floats) {
    const size_t bytes = ((size_t)floats * sizeof(float) / 4096 + 1) * 4096;
    if (bytes > capacity[which]) {
        free(buffers[which]);
        buffers[which] = aligned_alloc(64, bytes);
        capacity[which] = buffers[which] ? bytes : 0;
    }
    return buffers[which];
}

/* 2^r for |r| <= 1/2, floats or vectors: a degree-5 fit, 2.4e-7 relative */
#define EXP2_POLY(r) (((((1.3276469e-3f * (r) + 9.6755419e-3f) * (r) + 5.5507131e-2f) * (r) + \
                        2.4022120e-1f) * (r) + 6.9314694e-1f) * (r) + 1.0f)

/* 2^x for the x <= 0 of a softmax (score minus running max): k + r with |r| <= 1/2,
   2^k in the exponent field. Below -126.5 it is exactly 0 (k = -127 gives a zero scale),
   which a weight relative to the row's largest never feels in float32; NaN stays NaN. */
static inline float exp2_neg(float x) {
    x = tsr__sel(x < -127.0f, -127.0f, x);
    const float s = x + TSR__RND32, r = x - (s - TSR__RND32);
    return EXP2_POLY(r) * tsr__u2f((tsr__f2u(s) - 0x4B400000u + 127u) << 23);
}

typedef int32_t tsr_iv __attribute__((vector_size(VL * 4)));
#if defined(__AVX__) && VL == 8
#include <immintrin.h>
#endif
/* whether any lane of a comparison result is true */
static inline int any_lane(tsr_iv m) {
#if defined(__AVX__) && VL == 8
    return !_mm256_testz_si256((__m256i)m, (__m256i)m);  /* one vptest */
#else
    int any = 0;
    for (int l = 0; l < VL; l++) any |= m[l] != 0;
    return any;
#endif
}
/* lane-wise max; a NaN in b is kept (it reaches the softmax's exp and the output) */
static inline tsr_fv vmax(tsr_fv a, tsr_fv b) {
    const tsr_iv keep = a > b;
    return (tsr_fv)((keep & (tsr_iv)a) | (~keep & (tsr_iv)b));
}

/* ---- float32 copies of K and V rows ------------------------------------------------------ */
/* Rows [from, to) of one head (rows rs apart, features cs apart, n of them) as float32
   rows ld apart. */
static void convert_rows(const void *src, int64_t fmt, int64_t rs, int64_t cs, int64_t from,
                         int64_t to, int64_t n, float *restrict dst, int64_t ld) {
    for (int64_t r = from; r < to; r++) load_f32(elem(src, fmt, r * rs), cs, fmt, n, 1.0f,
                                                 dst + r * ld, 1);
}

/* A head's keys and values as float32 rows: in place when they already are (float32,
   unit feature stride), else converted into this thread's buffers as far as needed. */
typedef struct {
    const float *k, *v;
    int64_t ldk, ldv;
    int64_t head, done;  /* the (batch, kv head) converted, and how many of its rows */
} tsr_kv;

static int kv_rows(const tsr_args *a, tsr_kv *kv, int64_t b, int64_t h, int64_t upto) {
    const void *k = elem(a->k, a->fmt, b * a->ks[0] + h * a->ks[1]);
    const void *v = elem(a->v, a->fmt, b * a->vs[0] + h * a->vs[1]);
    if (a->fmt == TSR_F32 && a->ks[3] == 1 && a->vs[3] == 1) {
        kv->k = (const float *)k, kv->v = (const float *)v;
        kv->ldk = a->ks[2], kv->ldv = a->vs[2];
        return 1;
    }
    const int64_t head = b * a->hkv + h;
    if (kv->head != head) {
        kv->head = head, kv->done = 0;
        kv->ldk = a->d, kv->ldv = a->dv;
        kv->k = buffer(0, a->sk * a->d);
        kv->v = buffer(1, a->sk * a->dv);
        if (!kv->k || !kv->v) {
            kv->head = -1;
            return 0;
        }
    }
    if (upto > kv->done) {
        convert_rows(k, a->fmt, a->ks[2], a->ks[3], kv->done, upto, a->d, (float *)kv->k, a->d);
        convert_rows(v, a->fmt, a->vs[2], a->vs[3], kv->done, upto, a->dv, (float *)kv->v,
                     a->dv);
        kv->done = upto;
    }
    return 1;
}

/* ---- prefill: one group of RN query rows --------------------------------------------- */
/* 2^x lane-wise, as exp2_neg, for x <= LAZY */
static inline tsr_fv vexp2(tsr_fv x) {
    const tsr_iv low = x < -127.0f;
    x = (tsr_fv)((low & (tsr_iv)((tsr_fv){0} - 127.0f)) | (~low & (tsr_iv)x));
    const tsr_fv s = x + TSR__RND32, r = x - (s - TSR__RND32);
    return EXP2_POLY(r) * (tsr_fv)(((tsr_iv)s - 0x4B400000 + 127) << 23);
}

/* Scores above a row's running max by at most LAZY (log2 units) are exponentiated
   against that max as they are: weights up to 2^LAZY cannot overflow a float32 sum, so
   the max need not be exact, and a block rarely needs its own max first. */
#define LAZY 64.0f

/* S^T rows for keys k[0 .. mr): s[i][j] = k[i] . q[j] (q^T in qt: d rows of RN), into st.
   Raw (base NULL): stored as they are, and red takes their lane-wise max. Fused: stored
   as p = 2^(s - base) and red takes their lane-wise sum, unless some s exceeds its base
   by more than LAZY: then nothing is stored and 0 is returned. */
static inline __attribute__((always_inline)) int scores_tile(
        const int mr, const float *k, int64_t ldk, const float *restrict qt, int64_t d,
        float *restrict st, const tsr_fv *base, tsr_fv red[RV]) {
    tsr_fv acc[MR][RV];
    const float *kr[MR];
    for (int i = 0; i < mr; i++) {
        kr[i] = k + i * ldk;
        for (int v = 0; v < RV; v++) acc[i][v] = (tsr_fv){0};
    }
    #define K_AT(i) kr[i][e]
    #pragma GCC unroll 4
    for (int64_t e = 0; e < d; e++) TSR_TILE_STEP(acc, mr, RV, K_AT, qt + e * RN);
    #undef K_AT
    if (!base) {
        for (int i = 0; i < mr; i++)
            for (int v = 0; v < RV; v++) {
                tsr_vstore(st + i * RN + v * VL, acc[i][v]);
                red[v] = vmax(red[v], acc[i][v]);
            }
        return 1;
    }
    tsr_iv over = {0};
    for (int i = 0; i < mr; i++)
        for (int v = 0; v < RV; v++) over |= acc[i][v] > base[v] + LAZY;
    if (any_lane(over)) return 0;
    for (int i = 0; i < mr; i++)
        for (int v = 0; v < RV; v++) {
            const tsr_fv p = vexp2(acc[i][v] - base[v]);
            tsr_vstore(st + i * RN + v * VL, p);
            red[v] += p;
        }
    return 1;
}

/* S^T for keys k[0 .. nk) into st: raw, with their lane-wise max in out (base NULL), or
   exponentiated against base with their lane-wise sums in out; 0 if some score was too far
   above its base (st is then incomplete). */
static int scores(const float *k, int64_t ldk, const float *qt, int64_t d, int64_t nk,
                  float *st, const float *base, float *out) {
    tsr_fv b[RV], red[RV];
    for (int v = 0; v < RV; v++) {
        red[v] = (tsr_fv){0} - (base ? 0.0f : INFINITY);
        if (base) b[v] = tsr_vload(base + v * VL);
    }
    const tsr_fv *bp = base ? b : NULL;
    int ok = 1;
    int64_t i = 0;
    for (; ok && i + MR <= nk; i += MR) ok = scores_tile(MR, k + i * ldk, ldk, qt, d, st + i * RN, bp, red);
    /* the last keys: the same tile with fewer of them (8, 4, 2, 1 as needed) */
#if MR > 8
    if (ok && nk - i >= 8) ok = scores_tile(8, k + i * ldk, ldk, qt, d, st + i * RN, bp, red), i += 8;
#endif
#if MR > 4
    if (ok && nk - i >= 4) ok = scores_tile(4, k + i * ldk, ldk, qt, d, st + i * RN, bp, red), i += 4;
#endif
#if MR > 2
    if (ok && nk - i >= 2) ok = scores_tile(2, k + i * ldk, ldk, qt, d, st + i * RN, bp, red), i += 2;
#endif
    if (ok && nk - i >= 1) ok = scores_tile(1, k + i * ldk, ldk, qt, d, st + i * RN, bp, red);
    for (int v = 0; v < RV; v++) tsr_vstore(out + v * VL, red[v]);
    return ok;
}

/* O^T rows for features v[.][0 .. mr): ot[i][j] = alpha[j] ot[i][j] + sum_c v[c][i] p[c][j]
   (P^T in st: nk rows of RN). */
static inline __attribute__((always_inline)) void values_tile(
        const int mr, const float *v, int64_t ldv, const float *restrict st, int64_t nk,
        float *restrict ot, const float *restrict alpha) {
    tsr_fv acc[MR][RV], scale[RV];
    for (int w = 0; w < RV; w++) scale[w] = tsr_vload(alpha + w * VL);
    for (int i = 0; i < mr; i++)
        for (int w = 0; w < RV; w++) acc[i][w] = tsr_vload(ot + i * RN + w * VL) * scale[w];
    const float *vr = v;
    #define V_AT(i) vr[i]
    #pragma GCC unroll 4
    for (int64_t c = 0; c < nk; c++, vr += ldv) TSR_TILE_STEP(acc, mr, RV, V_AT, st + c * RN);
    #undef V_AT
    for (int i = 0; i < mr; i++)
        for (int w = 0; w < RV; w++) tsr_vstore(ot + i * RN + w * VL, acc[i][w]);
}

static void values(const float *v, int64_t ldv, const float *st, int64_t nk, int64_t dv,
                   float *ot, const float *alpha) {
    int64_t i = 0;
    for (; i + MR <= dv; i += MR) values_tile(MR, v + i, ldv, st, nk, ot + i * RN, alpha);
#if MR > 8
    if (dv - i >= 8) values_tile(8, v + i, ldv, st, nk, ot + i * RN, alpha), i += 8;
#endif
#if MR > 4
    if (dv - i >= 4) values_tile(4, v + i, ldv, st, nk, ot + i * RN, alpha), i += 4;
#endif
#if MR > 2
    if (dv - i >= 2) values_tile(2, v + i, ldv, st, nk, ot + i * RN, alpha), i += 2;
#endif
    if (dv - i >= 1) values_tile(1, v + i, ldv, st, nk, ot + i * RN, alpha);
}

/* The lane-wise max of nk rows of st (after masking). */
static void block_max(const float *restrict st, int64_t nk, float *restrict top) {
    for (int j = 0; j < RN; j++) top[j] = -INFINITY;
    for (int64_t c = 0; c < nk; c++) {
        #pragma omp simd
        for (int j = 0; j < RN; j++) top[j] = st[c * RN + j] > top[j] ? st[c * RN + j] : top[j];
    }
}

/* The online softmax over one block of nk keys (log2 units, in st; top: their max):
   st becomes P^T, the running max m and sum l are updated and alpha receives the factor
   of the old output. A row whose keys so far are all masked keeps m = -inf and
   contributes nothing. */
static void softmax_block(float *restrict st, int64_t nk, float *restrict top,
                          float *restrict m, float *restrict l, float *restrict alpha) {
    float base[RN], sum[RN];
    #pragma omp simd
    for (int j = 0; j < RN; j++) {
        top[j] = top[j] > m[j] ? top[j] : m[j];
        base[j] = tsr__sel(top[j] == -INFINITY, 0.0f, top[j]);
        alpha[j] = exp2_neg(m[j] - base[j]);
        m[j] = top[j];
        sum[j] = 0.0f;
    }
    for (int64_t c = 0; c < nk; c++) {
        #pragma omp simd
        for (int j = 0; j < RN; j++) {
            const float p = exp2_neg(st[c * RN + j] - base[j]);
            st[c * RN + j] = p;
            sum[j] += p;
        }
    }
    #pragma omp simd
    for (int j = 0; j < RN; j++) l[j] = l[j] * alpha[j] + sum[j];
}

/* One group of RN query rows: q^T (d rows of RN lanes, scaled to log2 units), the output
   so far O^T (dv rows of RN), the running max and sum per row, and the keys it sees. */
typedef struct {
    float *qt, *ot;
    float m[RN], l[RN], alpha[RN];
    int64_t r0, rows, end;
    int seen;  /* every row has seen a key: the blocks without masks may use its max */
} tsr_group;

static void group_start(const tsr_args *a, tsr_group *g, int64_t b, int64_t h) {
    const int64_t q = b * a->qs[0] + h * a->qs[1] + g->r0 * a->qs[2];
    const float qscale = (float)(a->scale * 1.4426950408889634);
    if (g->rows < RN) memset(g->qt, 0, sizeof(float) * a->d * RN);
    for (int64_t j = 0; j < g->rows; j++)
        load_f32(elem(a->q, a->fmt, q + j * a->qs[2]), a->qs[3], a->fmt, a->d, qscale, g->qt + j, RN);
    memset(g->ot, 0, sizeof(float) * a->dv * RN);
    for (int j = 0; j < RN; j++) g->m[j] = -INFINITY, g->l[j] = 0.0f;
    g->seen = 0;
}

/* Keys kb .. kb + nk for one group: scores, masks, online softmax, output update. */
static void group_keys(const tsr_args *a, const tsr_kv *kv, tsr_group *g, int64_t b,
                       int64_t h, int64_t kb, int64_t nk, float *restrict st) {
    const int64_t r0 = g->r0;
    const float *k = kv->k + kb * kv->ldk, *v = kv->v + kb * kv->ldv;
    const int diagonal = a->causal && kb + nk > r0 + 1;
    float top[RN];
    if (!diagonal && a->mfmt == TSR_NONE && g->seen) {  /* every row has a finite max */
        if (scores(k, kv->ldk, g->qt, a->d, nk, st, g->m, top)) {
            for (int j = 0; j < RN; j++) g->l[j] += top[j], g->alpha[j] = 1.0f;
            values(v, kv->ldv, st, nk, a->dv, g->ot, g->alpha);
            return;
        }
    }
    scores(k, kv->ldk, g->qt, a->d, nk, st, NULL, top);
    if (a->mfmt != TSR_NONE) {  /* booleans keep or drop a score, floats add to it */
        const int64_t m = b * a->ms[0] + h * a->ms[1] + r0 * a->ms[2] + kb * a->ms[3];
        for (int64_t j = 0; j < g->rows; j++) {
            const void *row = elem(a->mask, a->mfmt, m + j * a->ms[2]);
            if (a->mfmt == TSR_BOOL) {
                const uint8_t *keep = row;
                for (int64_t c = 0; c < nk; c++)
                    st[c * RN + j] = tsr__sel(keep[c * a->ms[3]] != 0, st[c * RN + j], -INFINITY);
            } else {
                float add[BN];
                load_f32(row, a->ms[3], a->mfmt, nk, LOG2E, add, 1);
                for (int64_t c = 0; c < nk; c++) st[c * RN + j] += add[c];
            }
        }
    }
    if (diagonal)  /* key c is seen by rows >= c */
        for (int64_t c = kb > r0 + 1 ? kb : r0 + 1; c < kb + nk; c++) {
            #pragma omp simd
            for (int j = 0; j < RN; j++)
                st[(c - kb) * RN + j] = tsr__sel(r0 + j < c, -INFINITY, st[(c - kb) * RN + j]);
        }
    if (diagonal || a->mfmt != TSR_NONE) block_max(st, nk, top);
    softmax_block(st, nk, top, g->m, g->l, g->alpha);
    g->seen = 1;
    for (int j = 0; j < RN; j++) g->seen &= g->m[j] != -INFINITY;
    values(v, kv->ldv, st, nk, a->dv, g->ot, g->alpha);
}

static void group_finish(const tsr_args *a, const tsr_group *g, int64_t b, int64_t h) {
    const int64_t o = b * a->os[0] + h * a->os[1] + g->r0 * a->os[2];
    for (int64_t j = 0; j < g->rows; j++)  /* rows with no key get 0, as torch */
        store_f32(g->ot + j, RN, g->l[j] > 0.0f ? 1.0f / g->l[j] : 0.0f, a->dv,
                  (void *)elem(a->o, a->fmt, o + j * a->os[2]), a->os[3], a->fmt);
    if (a->lse) {
        float *lse = a->lse + (b * a->hq + h) * a->sq + g->r0;
        for (int64_t j = 0; j < g->rows; j++)
            lse[j] = g->l[j] > 0.0f ? (g->m[j] + log2f(g->l[j])) * LN2 : 0.0f;
    }
}

/* Keys a group starting at row r0 sees. */
static inline int64_t group_end(const tsr_args *a, int64_t r0) {
    return a->causal && r0 + RN < a->sk ? r0 + RN : a->sk;
}

/* Rows r0 .. r0 + NG * RN of query head h (kv head h / (hq / hkv)) of batch row b, as NG
   groups that take each block of keys in turn while it is in L1; 0 if out of memory. */
static int row_block(const tsr_args *a, tsr_kv *kv, int64_t b, int64_t h, int64_t r0,
                      tsr_group *groups, float *st) {
    int64_t n = 0, end = 0;
    for (; n < NG && r0 + n * RN < a->sq; n++) {
        tsr_group *g = groups + n;
        g->r0 = r0 + n * RN;
        g->rows = a->sq - g->r0 < RN ? a->sq - g->r0 : RN;
        g->end = group_end(a, g->r0);
        end = g->end > end ? g->end : end;
        group_start(a, g, b, h);
    }
    if (!kv_rows(a, kv, b, h / (a->hq / a->hkv), end)) return 0;
    for (int64_t kb = 0; kb < end; kb += BN)
        for (int64_t i = 0; i < n; i++)
            if (kb < groups[i].end) {
                const int64_t left = groups[i].end - kb;
                group_keys(a, kv, groups + i, b, h, kb, left < BN ? left : BN, st);
            }
    for (int64_t i = 0; i < n; i++) group_finish(a, groups + i, b, h);
    return 1;
}

void tsr_attention(int64_t g0, int64_t g1, int64_t g2, const char *raw) {
    (void)g0, (void)g1, (void)g2;
    tsr_args a;
    memcpy(&a, raw, sizeof a);
    const int64_t blocks = (a.sq + NG * RN - 1) / (NG * RN), items = a.batch * a.hq * blocks;
    const double work = (double)a.batch * a.hq * a.sq * a.sk * (a.d + a.dv) / (a.causal + 1);
    int failed = 0;
    #pragma omp parallel if(work > 4e6) reduction(|:failed)
    {
        tsr_group groups[NG];
        float *qt = buffer(2, NG * a.d * RN), *ot = buffer(3, NG * a.dv * RN);
        float *st = buffer(4, BN * RN);
        failed = !qt || !ot || !st;
        for (int i = 0; i < NG && !failed; i++)
            groups[i].qt = qt + i * a.d * RN, groups[i].ot = ot + i * a.dv * RN;
        tsr_kv kv = {0};
        kv.head = -1;
        /* blocks handed out as threads come free (a thread the machine delays takes fewer),
           head by head, each head's from the last (the largest when causal) to the first,
           so the last ones out are small */
        #pragma omp for schedule(dynamic, 1) nowait
        for (int64_t it = 0; it < items; it++) {
            const int64_t bh = it / blocks, i = blocks - 1 - it % blocks;
            if (!failed) failed = !row_block(&a, &kv, bh / a.hq, bh % a.hq, i * NG * RN, groups, st);
        }
    }
    *a.status = failed;
}

/* ---- decode: a few query rows per kv head, keys split into chunks -------------------- */
#define KB 8  /* keys per step: independent dot products in flight */
#define AHEAD 4  /* steps ahead that K and V rows are prefetched */

/* every cache line of a row of n elements (stride cs) */
static inline void prefetch_row(const void *p, int64_t n, int64_t cs, int64_t fmt) {
    const char *c = p, *end = elem(p, fmt, (n - 1) * cs);
    for (; c <= end; c += 64) __builtin_prefetch(c, 0, 0);
    __builtin_prefetch(end, 0, 0);
}

/* s[j] = q . k[j] for j < KB (k[j] rows of n floats). */
static inline void dots(const float *restrict q, const float *const k[KB], int64_t n,
                        float s[KB]) {
    tsr_fv acc[KB];
    for (int j = 0; j < KB; j++) acc[j] = (tsr_fv){0};
    int64_t e = 0;
    for (; e + VL <= n; e += VL) {
        const tsr_fv x = tsr_vload(q + e);
        for (int j = 0; j < KB; j++) acc[j] += x * tsr_vload(k[j] + e);
    }
    for (int j = 0; j < KB; j++) {
        float lanes[VL], t = 0.0f;
        tsr_vstore(lanes, acc[j]);
        for (int l = 0; l < VL; l++) t += lanes[l];
        for (int64_t f = e; f < n; f++) t += q[f] * k[j][f];
        s[j] = t;
    }
}

/* A mask applied to the scores s[0 .. n) of one query row (log2 units), from its row of
   the mask at element m: booleans keep or drop, floats add. */
static void mask_scores(const tsr_args *a, int64_t m, int64_t n, float *restrict s) {
    const void *row = elem(a->mask, a->mfmt, m);
    if (a->mfmt == TSR_BOOL) {
        const uint8_t *keep = row;
        for (int64_t c = 0; c < n; c++) s[c] = tsr__sel(keep[c * a->ms[3]] != 0, s[c], -INFINITY);
    } else {
        float add[KB];
        load_f32(row, a->ms[3], a->mfmt, n, LOG2E, add, 1);
        for (int64_t c = 0; c < n; c++) s[c] += add[c];
    }
}

/* Keys [c0, c1) of kv head h of batch row b for `rows` query rows (qf: their scaled
   float32 queries, limit: how many keys each sees, moff: where its row of the mask
   starts); res gets each row's max, sum and unnormalized output (2 + dv floats). */
static void decode_chunk(const tsr_args *a, int64_t b, int64_t h, int64_t c0, int64_t c1,
                         const float *qf, const int64_t *limit, const int64_t *moff,
                         int64_t rows, float *res, float *kbuf, float *vbuf) {
    const int64_t d = a->d, dv = a->dv, stride = 2 + dv;
    const void *k = elem(a->k, a->fmt, b * a->ks[0] + h * a->ks[1]);
    const void *v = elem(a->v, a->fmt, b * a->vs[0] + h * a->vs[1]);
    const int direct = a->fmt == TSR_F32 && a->ks[3] == 1 && a->vs[3] == 1;
    for (int64_t r = 0; r < rows; r++) {
        res[r * stride] = -INFINITY, res[r * stride + 1] = 0.0f;
        memset(res + r * stride + 2, 0, sizeof(float) * dv);
    }
    for (int64_t kb = c0; kb < c1; kb += KB) {
        const int64_t nk = c1 - kb < KB ? c1 - kb : KB;
        const float *kr[KB], *vr[KB];
        if (kb + AHEAD * KB < c1)  /* the cache streams from memory once: ask for it early */
            for (int j = 0; j < KB; j++) {
                prefetch_row(elem(k, a->fmt, (kb + AHEAD * KB + j) * a->ks[2]), d, a->ks[3], a->fmt);
                prefetch_row(elem(v, a->fmt, (kb + AHEAD * KB + j) * a->vs[2]), dv, a->vs[3], a->fmt);
            }
        if (!direct) {
            convert_rows(elem(k, a->fmt, kb * a->ks[2]), a->fmt, a->ks[2], a->ks[3], 0, nk, d,
                         kbuf, d);
            convert_rows(elem(v, a->fmt, kb * a->vs[2]), a->fmt, a->vs[2], a->vs[3], 0, nk, dv,
                         vbuf, dv);
        }
        for (int j = 0; j < KB; j++) {  /* past the chunk: repeat its first key, unused */
            const int64_t c = j < nk ? j : 0;
            kr[j] = direct ? (const float *)k + (kb + c) * a->ks[2] : kbuf + c * d;
            vr[j] = direct ? (const float *)v + (kb + c) * a->vs[2] : vbuf + c * dv;
        }
        for (int64_t r = 0; r < rows; r++) {
            float s[KB], *m = res + r * stride, *o = m + 2;
            dots(qf + r * d, kr, d, s);
            if (a->mfmt != TSR_NONE) mask_scores(a, moff[r] + kb * a->ms[3], nk, s);
            float top = m[0];
            for (int j = 0; j < KB; j++) {
                s[j] = j < nk && kb + j < limit[r] ? s[j] : -INFINITY;
                top = s[j] > top || s[j] != s[j] ? s[j] : top;  /* NaN wins */
            }
            if (top == -INFINITY) continue;  /* nothing seen yet */
            const float alpha = exp2_neg(m[0] - top);
            float sum = 0.0f;
            for (int j = 0; j < KB; j++) sum += s[j] = exp2_neg(s[j] - top);
            m[0] = top, m[1] = m[1] * alpha + sum;
            #pragma omp simd
            for (int64_t e = 0; e < dv; e++) {
                float x = o[e] * alpha;
                for (int j = 0; j < KB; j++) x += s[j] * vr[j][e];
                o[e] = x;
            }
        }
    }
}

/* The output rows of (batch row b, kv head h) from the partial results of its n chunks. */
static void combine(const tsr_args *a, int64_t b, int64_t h, int64_t n, int64_t chunks,
                    int64_t rows, float *restrict weight, float *restrict row) {
    const int64_t stride = 2 + a->dv, step = rows * stride, per_head = a->hq / a->hkv;
    for (int64_t r = 0; r < rows; r++) {
        const float *part = a->ws + (b * a->hkv + h) * chunks * step + r * stride;
        float top = -INFINITY, sum = 0.0f;
        for (int64_t c = 0; c < n; c++) top = part[c * step] > top ? part[c * step] : top;
        for (int64_t c = 0; c < n; c++) {
            const float mc = part[c * step];
            weight[c] = mc == -INFINITY ? 0.0f : exp2_neg(mc - top);
            sum += part[c * step + 1] * weight[c];
        }
        for (int64_t e = 0; e < a->dv; e++) {
            float y = 0.0f;
            for (int64_t c = 0; c < n; c++) y += part[c * step + 2 + e] * weight[c];
            row[e] = y;
        }
        const int64_t o = b * a->os[0] + (h * per_head + r / a->sq) * a->os[1] +
                          (r % a->sq) * a->os[2];
        store_f32(row, 1, sum > 0.0f ? 1.0f / sum : 0.0f,  /* no key: 0, as torch */
                  a->dv, (void *)elem(a->o, a->fmt, o), a->os[3], a->fmt);
    }
}

void tsr_decode(int64_t g0, int64_t g1, int64_t g2, const char *raw) {
    (void)g0, (void)g1, (void)g2;
    tsr_args a;
    memcpy(&a, raw, sizeof a);
    const int64_t per_head = a.hq / a.hkv, rows = per_head * a.sq, stride = 2 + a.dv;
    const int64_t chunks = (a.sk + a.chunk - 1) / a.chunk;  /* per sequence, at most */
    int64_t total = 0;
    for (int64_t b = 0; b < a.batch; b++) total += a.lens[b] * a.hkv;
    int failed = 0;
    #pragma omp parallel if(total * rows * (a.d + a.dv) > 1 << 20) reduction(|:failed)
    {
        float *qf = buffer(2, rows * a.d), *kbuf = buffer(3, KB * a.d);
        float *vbuf = buffer(4, KB * a.dv), *weight = buffer(1, chunks + a.dv);
        int64_t *limit = (int64_t *)buffer(0, rows * 4), *moff = limit + rows;
        failed = !qf || !kbuf || !vbuf || !weight || !limit;
        const float qscale = (float)(a.scale * 1.4426950408889634);
        /* (batch row, kv head, chunk) items handed out as threads come free; the thread
           that finishes a sequence's last chunk combines them (no barrier to wait at) */
        #pragma omp for schedule(dynamic, 1) nowait
        for (int64_t it = 0; it < a.batch * a.hkv * chunks; it++) {
            const int64_t bh = it / chunks, c = it % chunks, b = bh / a.hkv, h = bh % a.hkv;
            const int64_t len = a.lens[b], c0 = c * a.chunk, n = (len + a.chunk - 1) / a.chunk;
            if (failed || c >= (n ? n : 1)) continue;  /* past this sequence's keys */
            if (n) {
                for (int64_t r = 0; r < rows; r++) {  /* row r: query r % sq of head r / sq */
                    const int64_t i = r % a.sq;
                    const int64_t q = b * a.qs[0] + (h * per_head + r / a.sq) * a.qs[1] +
                                      i * a.qs[2];
                    load_f32(elem(a.q, a.fmt, q), a.qs[3], a.fmt, a.d, qscale, qf + r * a.d, 1);
                    limit[r] = a.causal ? len - a.sq + 1 + i : len;
                    moff[r] = b * a.ms[0] + (h * per_head + r / a.sq) * a.ms[1] + i * a.ms[2];
                }
                decode_chunk(&a, b, h, c0, c0 + a.chunk < len ? c0 + a.chunk : len, qf, limit,
                             moff, rows, a.ws + it * rows * stride, kbuf, vbuf);
            }
            /* chunks done of this sequence: the release publishes this chunk's results,
               the acquire of the last one sees every other's */
            if (!n || __atomic_add_fetch(a.status + 1 + bh, 1, __ATOMIC_ACQ_REL) == n)
                combine(&a, b, h, n, chunks, rows, weight, weight + chunks);
        }
    }
    a.status[0] = failed;
}
