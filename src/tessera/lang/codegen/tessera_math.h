/* tessera_math.h: float32 math for generated kernels.
 *
 * Every function is `static inline`, branch-free straight-line code (selects, not jumps),
 * uses no tables and calls no libm function except sqrtf/fabsf/copysignf (and fmaf where
 * __FP_FAST_FMAF says it is one instruction), which compilers expand to instructions; so
 * GCC/Clang vectorize calls inside `#pragma omp simd` loops.
 * Bit casts go through memcpy. Needs <stdint.h>, <stdbool.h>, <math.h>, <string.h> included
 * first, round-to-nearest mode, no -ffast-math (the round-to-integer trick x + 1.5*2^23 - 1.5*2^23
 * must not be reassociated) and -fno-math-errno for sqrtf to become one instruction.
 * Subnormal inputs and results are handled (nothing is flushed), unless the caller enables
 * FTZ/DAZ. Measured errors per function: docs/lang/math.md.
 *
 * exp/exp2/log/log2/tanh/sigmoid/silu/gelu_tanh/erf/gelu_erf/sin/cos compute in float32
 * (log2 sums its last step, gelu_tanh its argument, in float64); rsqrt/pow compute in
 * float64 (still vectorized, but slower; see the docs) and round once to float32. fmaf is
 * used only through tsr__fma, which falls back to a double product without hardware FMA.
 * Requires SSE4.1-class SIMD for full vectorization (plain x86-64 SSE2 leaves gelu_tanh and
 * pow scalar).
 * The same text is OpenCL C on a device with cl_khr_fp64, after tessera_math.cl's prelude
 * (which maps the few C names): kernels then compute the same values on every target.
 */
#ifndef TESSERA_MATH_H
#define TESSERA_MATH_H

/* ---- bit casts ---------------------------------------------------------------------- */
#ifdef __OPENCL_VERSION__  /* OpenCL C (tessera_math.cl's prelude comes first) */
static inline uint32_t tsr__f2u(float x) { return as_uint(x); }
static inline float tsr__u2f(uint32_t u) { return as_float(u); }
static inline uint64_t tsr__d2u(double x) { return as_ulong(x); }
static inline double tsr__u2d(uint64_t u) { return as_double(u); }
#else
static inline uint32_t tsr__f2u(float x) { uint32_t u; memcpy(&u, &x, 4); return u; }
static inline float tsr__u2f(uint32_t u) { float x; memcpy(&x, &u, 4); return x; }
static inline uint64_t tsr__d2u(double x) { uint64_t u; memcpy(&u, &x, 8); return u; }
static inline double tsr__u2d(uint64_t u) { double x; memcpy(&x, &u, 8); return x; }
#endif

/* Branch-free selects c ? a : b on bit masks. Both sides are always evaluated, which keeps
 * loops if-convertible under the default -ftrapping-math (GCC will not speculate a float
 * operation that a plain ?: would only evaluate conditionally). */
static inline float tsr__sel(bool c, float a, float b) {
    uint32_t m = 0u - (uint32_t)c;
    return tsr__u2f((tsr__f2u(a) & m) | (tsr__f2u(b) & ~m));
}
static inline uint32_t tsr__selu(bool c, uint32_t a, uint32_t b) {
    uint32_t m = 0u - (uint32_t)c;
    return (a & m) | (b & ~m);
}
static inline double tsr__seld(bool c, double a, double b) {
    uint64_t m = (uint64_t)0 - (uint64_t)c;
    return tsr__u2d((tsr__d2u(a) & m) | (tsr__d2u(b) & ~m));
}

#define TSR__RND32 0x1.8p23f  /* x + RND32 - RND32 rounds |x| < 2^22 to an integer */
#define TSR__RND64 0x1.8p52   /* same for doubles, |x| < 2^51 */
#ifdef __OPENCL_VERSION__
#define TSR__NANF NAN
#else
#define TSR__NANF (__builtin_nanf(""))
#endif

/* 2^k for an integer k in [-150, 129] (low bits of k): applied as two normal halves. */
static inline float tsr__scale(float p, uint32_t k) {
    uint32_t k1 = (uint32_t)((int32_t)k >> 1), k2 = k - k1;
    return p * tsr__u2f((k1 + 127u) << 23) * tsr__u2f((k2 + 127u) << 23);
}

/* fused a*b + c, one rounding: fmaf is one instruction where the target has FMA
 * (__FP_FAST_FMAF); otherwise the exact float product is formed in double (the double
 * rounding of the sum is harmless here), which still vectorizes. */
static inline float tsr__fma(float a, float b, float c) {
#ifdef __FP_FAST_FMAF
    return fmaf(a, b, c);
#else
    return (float)((double)a * b + c);
#endif
}

/* ---- simple ------------------------------------------------------------------------- */
/* abs/sqrt: single instructions. rsqrt: 1/sqrt in double, rounded once (0.5 ulp measured). */
static inline float tsr_abs(float x) { return fabsf(x); }
static inline float tsr_sqrt(float x) { return sqrtf(x); }
static inline float tsr_rsqrt(float x) { return (float)(1.0 / sqrt((double)x)); }

/* maximum/minimum: NaN if either is NaN (torch semantics); max(-0,+0) = +0, min = -0. */
static inline float tsr_maximum(float a, float b) {
    float r = tsr__sel(a > b, a, b);
    r = tsr__sel(a == b, tsr__u2f(tsr__f2u(a) & tsr__f2u(b)), r);
    return tsr__sel((a != a) | (b != b), a + b, r);
}
static inline float tsr_minimum(float a, float b) {
    float r = tsr__sel(a < b, a, b);
    r = tsr__sel(a == b, tsr__u2f(tsr__f2u(a) | tsr__f2u(b)), r);
    return tsr__sel((a != a) | (b != b), a + b, r);
}

/* ---- exp / exp2 (float32) ----------------------------------------------------------- */
/* exp: x = k ln2 + r, |r| <= ln2/2 (Cody-Waite, 2-part ln2); e^r = 1 + r + r^2 P5(r)
 * (minimax); 2^k applied in two halves, so subnormal results round correctly and
 * overflow gives inf. tsr__exp_scaled(x, lo, m) = e^(x + lo) 2^m, for a tiny lo (low part
 * of a double argument, added to r) and 0 <= m <= 24 with x <= 0. */
static inline float tsr__exp_scaled(float x, float lo, uint32_t extra) {
    x = tsr__sel(x > 89.0f, 89.0f, x);
    float lim = -104.0f - 0.6931472f * (float)extra;  /* e^lim 2^extra rounds to 0 */
    x = tsr__sel(x < lim, lim, x);                 /* comparisons keep NaN */
    float s = x * 1.44269504f + TSR__RND32, k = s - TSR__RND32;
    float r = x - k * 0.693359375f;                /* exact */
    r = r - k * -2.12194440e-4f + lo;
    float p = 1.9890988e-4f;
    p = p * r + 1.3933647e-3f;
    p = p * r + 8.3333105e-3f;
    p = p * r + 4.1666467e-2f;
    p = p * r + 1.6666667e-1f;
    p = p * r + 0.5f;
    p = (p * r) * r + r + 1.0f;
    return tsr__scale(p, tsr__f2u(s) - 0x4B400000u + extra);
}
static inline float tsr_exp(float x) { return tsr__exp_scaled(x, 0.0f, 0u); }

/* exp2: x = k + r, |r| <= 1/2 (exact); 2^r = 1 + r P5(r) (minimax); 2^k as in tsr_exp. */
static inline float tsr_exp2(float x) {
    x = tsr__sel(x > 130.0f, 130.0f, x);
    x = tsr__sel(x < -152.0f, -152.0f, x);
    float s = x + TSR__RND32, r = x - (s - TSR__RND32);
    float p = 1.5453163e-4f;
    p = p * r + 1.3390863e-3f;
    p = p * r + 9.618083e-3f;
    p = p * r + 5.550357e-2f;
    p = p * r + 2.402265e-1f;
    p = p * r + 6.931472e-1f;
    p = p * r + 1.0f;
    return tsr__scale(p, tsr__f2u(s) - 0x4B400000u);
}

/* y e^(x + lo) for x in [-87, 0.3] and a tiny lo (|lo| < 1e-5: the low part of an exact
 * split plus small corrections, added to the reduced argument). No range clamps: callers
 * keep x in range or discard the lane by a select. Same reduction and polynomial as
 * tsr_exp; y is applied as y + y (e^r - 1), one rounding, and 2^k by one multiply (the
 * result is a normal float). */
static inline float tsr__exp_core(float x, float lo, float y) {
    float s = tsr__fma(x, 1.44269504f, TSR__RND32), k = s - TSR__RND32;
    float r = tsr__fma(k, -0.693359375f, x);
    r = tsr__fma(k, 2.12194440e-4f, r) + lo;
    float p = 1.9890988e-4f;
    p = tsr__fma(p, r, 1.3933647e-3f);
    p = tsr__fma(p, r, 8.3333105e-3f);
    p = tsr__fma(p, r, 4.1666467e-2f);
    p = tsr__fma(p, r, 1.6666667e-1f);
    p = tsr__fma(p, r, 0.5f);
    p = tsr__fma(p * r, r, r);                     /* e^r - 1 */
    return tsr__fma(y, p, y) * tsr__u2f((tsr__f2u(s) - 0x4B400000u + 127u) << 23);
}

/* ---- log / log2 (float32) ----------------------------------------------------------- */
/* Shared reduction: x = 2^e m, m in [sqrt(1/2), sqrt(2)) (subnormals prescaled by 2^23),
 * f = m - 1; returns y = log(1+f) - f = -f^2/2 + f^3 P8(f) (minimax). */
static inline float tsr__log_core(float x, float *f_out, float *e_out) {
    bool sub = x < 0x1p-126f;
    uint32_t u = tsr__f2u(tsr__sel(sub, x * 0x1p23f, x)) + (0x3f800000u - 0x3f3504f3u);
    *e_out = (float)((int32_t)(u >> 23) - 127) - tsr__sel(sub, 23.0f, 0.0f);
    float f = tsr__u2f((u & 0x007fffffu) + 0x3f3504f3u) - 1.0f, z = f * f;
    float p = 6.971611e-2f;
    p = p * f - 1.1479734e-1f;
    p = p * f + 1.168542e-1f;
    p = p * f - 1.2425687e-1f;
    p = p * f + 1.4249058e-1f;
    p = p * f - 1.6667803e-1f;
    p = p * f + 2.0000716e-1f;
    p = p * f - 2.4999997e-1f;
    p = p * f + 3.333333e-1f;
    *f_out = f;
    return f * z * p - 0.5f * z;
}
/* Special values of log/log2: +0/-0 -> -inf, x < 0 -> NaN, +inf -> +inf, NaN -> NaN. */
static inline float tsr__log_special(float x, float r) {
    bool zero = x == 0.0f, neg = x < 0.0f, ok = (x > 0.0f) & (x < INFINITY);
    float s = tsr__sel(zero, -INFINITY, tsr__sel(neg, TSR__NANF, x));
    return tsr__sel(ok, r, s);
}
/* log: e ln2 + f + y with ln2 in two parts (Cephes order of summation). */
static inline float tsr_log(float x) {
    float f, e, y = tsr__log_core(x, &f, &e);
    float r = f + (y + e * -2.12194440e-4f);
    return tsr__log_special(x, r + e * 0.693359375f);
}
/* log2: e + (f + y) log2(e), the final sum in double (one rounding). */
static inline float tsr_log2(float x) {
    float f, e, y = tsr__log_core(x, &f, &e);
    return tsr__log_special(x, (float)(e + ((double)f + y) * 1.4426950408889634));
}

/* ---- tanh / sigmoid / silu / gelu_tanh (float32) ----------------------------------- */
/* tanh: |x| < 0.625: x + x^3 P5(x^2) (minimax); else 1 - 2/(e^{2|x|} + 1); sign copied
 * from x. */
static inline float tsr_tanh(float x) {
    float a = fabsf(x), z = x * x;
    float p = 2.2927448e-3f;
    p = p * z - 8.343945e-3f;
    p = p * z + 2.1768918e-2f;
    p = p * z - 5.3959258e-2f;
    p = p * z + 1.3333304e-1f;
    p = p * z - 3.3333334e-1f;
    float small = a + a * z * p;
    float big = 1.0f - 2.0f / (tsr_exp(2.0f * a) + 1.0f);
    return copysignf(tsr__sel(a < 0.625f, small, big), x);   /* tanh(-0) = -0 */
}
/* x * sigmoid(v), given w = -|v| as hi + lo and pos = v >= 0: es = e^w 2^24 (float exp,
 * scaled so it is never subnormal), d = 1 + e^w; x/d for v >= 0, else (x/d) es 2^-24, whose
 * last multiply rounds once into the subnormal range. */
static inline float tsr__mul_sigmoid(float x, float hi, float lo, bool pos) {
    float es = tsr__exp_scaled(hi, lo, 24u);
    es = tsr__sel(hi < -115.0f, 0.0f, es);  /* |x| e^w < 2^-150 here (|x| <= |v|): exact 0 */
    float q = x / (1.0f + es * 0x1p-24f);
    return tsr__sel(pos, q, (q * es) * 0x1p-24f);
}
/* sigmoid: 1/(1 + e^-x), e^-|x| never overflows; exact limits 0 and 1. */
static inline float tsr_sigmoid(float x) {
    return tsr__mul_sigmoid(1.0f, -fabsf(x), 0.0f, x >= 0.0f);
}
/* silu: x sigmoid(x), accurate down to subnormal results; silu(-inf) = NaN like torch. */
static inline float tsr_silu(float x) { return tsr__mul_sigmoid(x, -fabsf(x), 0.0f, x >= 0.0f); }
/* gelu_tanh: 0.5 x (1 + tanh(u)) = x sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3);
 * same function as torch's approximate='tanh', without its cancellation for x << 0 (torch
 * returns 0 there, this the tiny true value). -|2u| is formed in double and split hi + lo,
 * so e^{-|2u|} keeps full relative accuracy where |2u| is large. */
static inline float tsr_gelu_tanh(float x) {
    double xd = x, w = -fabs(1.5957691216057308 * xd * (1.0 + 0.044715 * xd * xd));
    w = tsr__seld(w < -200.0, -200.0, w);          /* keeps NaN */
    float hi = (float)w, lo = (float)(w - hi);
    return tsr__mul_sigmoid(x, hi, lo, x >= 0.0f);
}

/* ---- float64 helpers (for pow) ---------------------------------------------------- */
/* 2^t in double: t = k + r, |r| <= 1/2; Taylor series of e^{r ln2} to degree 11 (rel. error
 * < 1e-14); t is clamped to [-1000, 1000] (beyond float32's range either way). */
static inline double tsr__exp2_d(double t) {
    t = tsr__seld(t > 1000.0, 1000.0, t);
    t = tsr__seld(t < -1000.0, -1000.0, t);
    double s = t + TSR__RND64, r = t - (s - TSR__RND64);
    double p = 4.4455382718708116e-10;
    p = p * r + 7.054911620801123e-09;
    p = p * r + 1.01780860092397e-07;
    p = p * r + 1.321548679014431e-06;
    p = p * r + 1.5252733804059841e-05;
    p = p * r + 0.0001540353039338161;
    p = p * r + 0.0013333558146428443;
    p = p * r + 0.009618129107628477;
    p = p * r + 0.05550410866482158;
    p = p * r + 0.24022650695910072;
    p = p * r + 0.6931471805599453;
    p = p * r + 1.0;
    return p * tsr__u2d((tsr__d2u(s) + 1023u) << 52);   /* low bits of s hold k */
}
/* log2|x| for finite x != 0 in double: x = 2^e m, m in [sqrt(1/2), sqrt(2)); ln m =
 * 2 atanh(s), s = (m-1)/(m+1), odd series to s^17 (|s| < 0.172, rel. error < 1e-16). */
static inline double tsr__log2_d(double x) {
    uint64_t u = (tsr__d2u(x) & 0x7fffffffffffffffu) + (0x3ff0000000000000u - 0x3fe6a09e667f3bcdu);
    double e = tsr__u2d(0x4330000000000000u | (u >> 52)) - (0x1p52 + 1023.0);
    double m = tsr__u2d((u & 0x000fffffffffffffu) + 0x3fe6a09e667f3bcdu);
    double s = (m - 1.0) / (m + 1.0), z = s * s;
    double p = 1.0 / 17;
    p = p * z + 1.0 / 15;
    p = p * z + 1.0 / 13;
    p = p * z + 1.0 / 11;
    p = p * z + 1.0 / 9;
    p = p * z + 1.0 / 7;
    p = p * z + 1.0 / 5;
    p = p * z + 1.0 / 3;
    return e + (2.0 * 1.4426950408889634) * (s + s * z * p);
}
/* ---- erf / gelu_erf (float32) ------------------------------------------------------- */
/* erf(a) = a + a P5(a^2) for |a| < 0.8 (relative minimax, float32 coefficients; keeps the
 * sign, erf(-0) = -0). */
static inline float tsr__erf_small(float a) {
    float z = a * a, p = -6.535257e-4f;
    p = tsr__fma(p, z, 5.085134e-3f);
    p = tsr__fma(p, z, -2.6820809e-2f);
    p = tsr__fma(p, z, 1.1283113e-1f);
    p = tsr__fma(p, z, -3.7612602e-1f);
    p = tsr__fma(p, z, 1.2837917e-1f);             /* 2/sqrt(pi) - 1 */
    return tsr__fma(a, p, a);
}
/* erf: |x| < 0.8: tsr__erf_small; else 1 - e^{Q6(|x|)}, Q6 a fit of log erfc on [0.8, 3.95]
 * weighted by erfc (only absolute accuracy matters there); |x| is clamped to 3.95, past
 * which erf rounds to 1. Sign copied from x. */
static inline float tsr_erf(float x) {
    float a = fabsf(x);
    float b = tsr__sel(a > 3.95f, 3.95f, a);       /* keeps NaN */
    float q = 2.0745349e-4f;
    q = tsr__fma(q, b, -3.1536052e-3f);
    q = tsr__fma(q, b, 2.2656156e-2f);
    q = tsr__fma(q, b, -1.0479865e-1f);
    q = tsr__fma(q, b, -6.36222e-1f);
    q = tsr__fma(q, b, -1.1282289f);
    q = tsr__fma(q, b, -6.596999e-5f);
    float big = 1.0f - tsr__exp_core(q, 0.0f, 1.0f);
    return copysignf(tsr__sel(a < 0.8f, tsr__erf_small(a), big), x);
}
/* gelu_erf: with v = |x| Phi(-|x|), gelu = -v (x < 0) or x - v; v = e^{-x^2/2} |x| R(t),
 * t = 1/(1 + 0.3|x|), R a degree-10 relative minimax fit of 0.5 erfcx(|x|/sqrt2) in t on
 * [0, 9.2]. The rounding error of t is measured (t_true = t (1 + d)) and applied to R to
 * first order (R's log-derivative in t is about 0.813 + 1.879 t). x^2 = h + l exactly
 * (fma), so e^{-x^2/2} keeps full relative accuracy in the tail. |x| > 13: v = 0 (the true
 * value is below 1e-37); -inf gives NaN like torch (x 0 - v). */
static inline float tsr_gelu_erf(float x) {
    float a = fabsf(x), h = x * x, l = tsr__fma(x, x, -h);
    float den = tsr__fma(a, 0.3f, 1.0f), den_lo = tsr__fma(a, 0.3f, 1.0f - den);
    float t = 1.0f / den;
    float d = tsr__fma(-t, den_lo, tsr__fma(-t, den, 1.0f));
    float r = -1.5954915e-2f;
    r = tsr__fma(r, t, 8.3962046e-2f);
    r = tsr__fma(r, t, -1.5170574e-1f);
    r = tsr__fma(r, t, 7.26579e-2f);
    r = tsr__fma(r, t, 3.947362e-2f);
    r = tsr__fma(r, t, 1.6758239e-2f);
    r = tsr__fma(r, t, 1.1428475e-1f);
    r = tsr__fma(r, t, 9.939513e-2f);
    r = tsr__fma(r, t, 1.2166386e-1f);
    r = tsr__fma(r, t, 1.1945374e-1f);
    r = tsr__fma(r, t, 1.1368444e-5f);
    /* R(t (1 + d)) = R(t) (1 + A d) ~ R(t) e^{A d}: the correction joins exp's low part */
    float lo = tsr__fma(tsr__fma(t, 1.879f, 0.813f), d, -0.5f * l);
    float v = tsr__exp_core(-0.5f * h, lo, a * r);
    v = tsr__sel(a > 13.0f, 0.0f, v);
    return tsr__sel(x < 0.0f, tsr__fma(x, 0.0f, -v), x - v);
}

/* ---- sin / cos (float32) ------------------------------------------------------------ */
/* x = k pi/2 + r: k = rint(x 2/pi), r = x - k(C1 + C2 + C3) by fma, pi/2 truncated to three
 * positive floats (k C1 is exact). sin r = r + r^3 S2(r^2) with r's sign (sin(-0) = -0),
 * cos r = 1 - r^2/2 + r^4 C2(r^2) (minimax on |r| <= pi/4); quadrant (k + shift) mod 4
 * picks +-sin/+-cos. Accurate while |r| stays near pi/4 (|x| <= 1e6, see the docs); far
 * out, |r| > 2 is zeroed so the result stays in [-1, 1] (the rounding trick breaks past
 * |x| ~ 6.6e6). inf/NaN -> NaN. */
static inline float tsr__sincos(float x, uint32_t shift) {
    float s = tsr__fma(x, 0x1.45f306p-1f, TSR__RND32), k = s - TSR__RND32;
    uint32_t q = tsr__f2u(s) + shift;
    float r = tsr__fma(k, -0x1.921fb4p+0f, x);
    r = tsr__fma(k, -0x1.4442d0p-24f, r);
    r = tsr__fma(k, -0x1.846988p-48f, r);
    r = tsr__sel(fabsf(r) > 2.0f, 0.0f, r);        /* keeps NaN */
    float z = r * r;
    float ps = -1.9514454e-4f;
    ps = tsr__fma(ps, z, 8.332155e-3f);
    ps = tsr__fma(ps, z, -1.6666655e-1f);
    ps = copysignf(tsr__fma(r * z, ps, r), r);      /* r = -0 would give +0 */
    float pc = 2.443221e-5f;
    pc = tsr__fma(pc, z, -1.3887308e-3f);
    pc = tsr__fma(pc, z, 4.1666646e-2f);
    pc = tsr__fma(pc, z, -0.5f);
    pc = tsr__fma(pc, z, 1.0f);
    float v = tsr__sel(q & 1u, pc, ps);
    return tsr__u2f(tsr__f2u(v) ^ ((q & 2u) << 30));
}
static inline float tsr_sin(float x) { return tsr__sincos(x, 0u); }
static inline float tsr_cos(float x) { return tsr__sincos(x, 1u); }

/* ---- pow (float64 inside) ----------------------------------------------------------- */
/* pow: 2^(y log2|x|) in double, then C99/IEEE powf special cases: pow(x, +-0) = 1,
 * pow(1, y) = 1, pow(-1, +-inf) = 1, x < 0 finite with y finite non-integer -> NaN,
 * negative x (incl. -0, -inf) with odd integer y -> negated; 0/inf cases follow from the
 * arithmetic with log2(0) = -inf, log2(inf) = inf. */
static inline float tsr_pow(float xf, float yf) {
    double x = xf, y = yf, ax = fabs(x);
    double lg = tsr__log2_d(x);
    lg = tsr__seld(ax == INFINITY, INFINITY, lg);
    lg = tsr__seld(ax == 0.0, -INFINITY, lg);
    double r = tsr__exp2_d(y * lg);                 /* NaN in -> NaN through t */
    r = tsr__seld(x != x, x, r);
    double hy = 0.5 * y;
    double ry = (y + TSR__RND64) - TSR__RND64, rh = (hy + TSR__RND64) - TSR__RND64;
    bool big = fabs(y) >= 0x1p50;                   /* such floats are even integers */
    bool is_int = big | (ry == y), odd = !big & is_int & (rh != hy);
    bool yinf = fabs(y) == INFINITY, xneg = signbit(xf) != 0;
    r = tsr__seld(odd & xneg, -r, r);
    r = tsr__seld((x < 0.0) & (ax != INFINITY) & !yinf & !is_int, TSR__NANF, r);
    r = tsr__seld((y == 0.0) | (x == 1.0) | ((x == -1.0) & yinf), 1.0, r);
    return (float)r;
}

/* ---- float16 / bfloat16 storage conversions ----------------------------------------- */
/* f16 -> f32: normal: rebias; inf/NaN: exponent all ones (payload kept); subnormal:
 * (float)mantissa * 2^-24 (exact). */
static inline float tsr_f16_to_f32(uint16_t h) {
    uint32_t em = h & 0x7fffu, sign = (uint32_t)(h & 0x8000u) << 16;
    float normal = tsr__u2f((em << 13) + 0x38000000u);
    float special = tsr__u2f((em << 13) + 0x70000000u);
    float sub = (float)(int32_t)em * 0x1p-24f;
    float v = tsr__sel(em >= 0x7c00u, special, tsr__sel(em < 0x0400u, sub, normal));
    return tsr__u2f(tsr__f2u(v) | sign);
}
/* f32 -> f16, round to nearest even: |x| >= 2^16 -> inf (NaN -> quiet 0x7e00);
 * |x| < 2^-14: adding 0.5 makes the FPU round at f16's subnormal step; else rebias and
 * round on the integer bits (carry into the exponent gives inf past 65504). */
static inline uint16_t tsr_f32_to_f16(float x) {
    uint32_t u = tsr__f2u(x), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    uint32_t special = tsr__selu(a > 0x7f800000u, 0x7e00u, 0x7c00u);
    uint32_t sub = tsr__f2u(tsr__u2f(a) + 0.5f) - 0x3f000000u;
    uint32_t normal = (a + 0xc8000fffu + ((a >> 13) & 1u)) >> 13;   /* 0xc8000000 = -(112 << 23) */
    uint32_t o = tsr__selu(a >= 0x47800000u, special, tsr__selu(a < 0x38800000u, sub, normal));
    return (uint16_t)(o | sign);
}
/* bf16 <-> f32: bf16 is the top half of a float32; rounding is RNE on the low 16 bits, NaN
 * is kept NaN (quiet bit set). */
static inline float tsr_bf16_to_f32(uint16_t h) { return tsr__u2f((uint32_t)h << 16); }
static inline uint16_t tsr_f32_to_bf16(float x) {
    uint32_t u = tsr__f2u(x);
    uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (uint16_t)tsr__selu((u & 0x7fffffffu) > 0x7f800000u, (u >> 16) | 0x0040u, r);
}

#endif /* TESSERA_MATH_H */
