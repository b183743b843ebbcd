/* tessera_math.cl: the OpenCL C side of tessera_math.h, for generated kernels.
 *
 * First a prelude: the C99 fixed-width type names and limits the shared printer uses, and
 * the C math names tessera_math.h calls. On a device with cl_khr_fp64 the printer defines
 * TSR_C_MATH and pastes tessera_math.h itself after this file: the same branch-free
 * polynomials as on the CPU, so results agree across targets, and far faster than some
 * drivers' builtins (PoCL's erf, tanh, log, sin and pow take 20-90x its exp).
 * Without fp64, the tsr_* functions below take their place, with the same semantics on the
 * OpenCL builtins: NaN-propagating
 * maximum/minimum as torch, exact float16/bfloat16 conversions (float16 through
 * vload_half/vstore_half_rte, bfloat16 as the top bits of a float in a ushort), torch's
 * special values for sigmoid/silu/gelu. Accuracy is the builtins' (OpenCL C spec, "Relative
 * Error as ULPs": exp/log 3 ulp, tanh/sin/cos 4-5 ulp, pow/erf/erfc 16 ulp), not the
 * C header's measured bounds; division and sqrt are correctly rounded where the device
 * supports -cl-fp32-correctly-rounded-divide-sqrt (the launcher asks for it).
 * Also gives the C99 fixed-width type names and limits the shared printer uses.
 */
#ifndef TESSERA_MATH_CL
#define TESSERA_MATH_CL

typedef char int8_t;
typedef uchar uint8_t;
typedef ushort uint16_t;
typedef int int32_t;
typedef uint uint32_t;
typedef long int64_t;
typedef ulong uint64_t;
#define INT32_MIN INT_MIN
#define INT32_MAX INT_MAX
#define INT64_MIN LONG_MIN
#define INT64_MAX LONG_MAX
#define fabsf fabs
#define sqrtf sqrt
#define copysignf copysign
#define fmaf fma
#ifdef FP_FAST_FMAF
#define __FP_FAST_FMAF 1
#endif

#ifndef TSR_C_MATH

/* ---- simple ------------------------------------------------------------------------- */
static inline float tsr_abs(float x) { return fabs(x); }
static inline float tsr_sqrt(float x) { return sqrt(x); }
static inline float tsr_rsqrt(float x) { return 1.0f / sqrt(x); }

/* maximum/minimum: NaN if either is NaN (torch semantics; fmax/fmin would drop it);
 * max(-0,+0) = +0, min = -0. */
static inline float tsr_maximum(float a, float b) {
    float r = a == b ? as_float(as_uint(a) & as_uint(b)) : fmax(a, b);
    return isnan(a) || isnan(b) ? a + b : r;
}
static inline float tsr_minimum(float a, float b) {
    float r = a == b ? as_float(as_uint(a) | as_uint(b)) : fmin(a, b);
    return isnan(a) || isnan(b) ? a + b : r;
}

/* ---- transcendental: the builtins ------------------------------------------------------ */
static inline float tsr_exp(float x) { return exp(x); }
static inline float tsr_exp2(float x) { return exp2(x); }
static inline float tsr_log(float x) { return log(x); }
static inline float tsr_log2(float x) { return log2(x); }
static inline float tsr_tanh(float x) { return tanh(x); }
static inline float tsr_erf(float x) { return erf(x); }
static inline float tsr_sin(float x) { return sin(x); }
static inline float tsr_cos(float x) { return cos(x); }
static inline float tsr_pow(float x, float y) { return pow(x, y); }

/* x * sigmoid(v) without overflow: e = e^-|v| never overflows; 1/(1 + e) for v >= 0,
 * e/(1 + e) below. NaN in v gives NaN; x = -inf with sigmoid 0 gives NaN, as in torch. */
static inline float tsr__mul_sigmoid(float x, float v) {
    float e = exp(-fabs(v)), s = 1.0f / (1.0f + e);
    return v >= 0.0f ? x * s : x * (e * s);
}
static inline float tsr_sigmoid(float x) { return tsr__mul_sigmoid(1.0f, x); }
static inline float tsr_silu(float x) { return tsr__mul_sigmoid(x, x); }
/* gelu_tanh: 0.5 x (1 + tanh(u)) = x sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3): no
 * cancellation for x << 0. */
static inline float tsr_gelu_tanh(float x) {
    return tsr__mul_sigmoid(x, 1.5957691216057308f * x * (1.0f + 0.044715f * x * x));
}
/* gelu_erf: x Phi(x) = 0.5 x erfc(-x / sqrt 2): erfc keeps relative accuracy in the
 * x << 0 tail where 1 + erf would cancel; -inf gives NaN like torch. */
static inline float tsr_gelu_erf(float x) { return 0.5f * x * erfc(-0.70710678118654752f * x); }

/* ---- float16 / bfloat16 storage conversions ----------------------------------------- */
/* float16 in a ushort: the vload_half/vstore_half_rte builtins (exact, round to nearest
 * even, inf/NaN kept), on the ushort's bits. */
static inline float tsr_f16_to_f32(ushort h) { return vload_half(0, (const half *)&h); }
static inline ushort tsr_f32_to_f16(float x) {
    ushort h;
    vstore_half_rte(x, 0, (half *)&h);
    return h;
}
/* bf16 <-> f32: bf16 is the top half of a float32; rounding is RNE on the low 16 bits, NaN
 * is kept NaN (quiet bit set). */
static inline float tsr_bf16_to_f32(ushort h) { return as_float((uint)h << 16); }
static inline ushort tsr_f32_to_bf16(float x) {
    uint u = as_uint(x);
    uint r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (ushort)((u & 0x7fffffffu) > 0x7f800000u ? (u >> 16) | 0x0040u : r);
}

#endif /* TSR_C_MATH */
#endif /* TESSERA_MATH_CL */
