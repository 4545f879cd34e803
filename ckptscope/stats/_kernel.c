/* The stats engine's two fused passes over one contiguous chunk of values of any stored dtype.
 *
 * pass1(values, count, dtype, keys) -> (finite, sum, lo, hi, nonzero, nan, inf)
 * pass2(values, count, dtype, dirty, mean, lo, scale, hist, lut, out, collected, sub[, seeded])
 *     -> (shift, css, collected)
 * hist_of_keys(keys, dtype, lo, scale, hist) -> None
 * convert(values, count, dtype, out) -> None
 *
 * `dtype` is a code of DTYPES (float32 = 0 and float64 = 1, so a bool "is double" still works).
 * The values are read as stored and converted inline, inside the vectorised loops, to the compute
 * width: float64 for float64 and every integer and bool dtype, float32 for float32, float16,
 * bfloat16 and both float8 kinds. The conversions are torch's `x.to(torch.float32/float64)`, bit
 * for bit: bfloat16 is its 16 bits shifted up, float16 is c10's fp16_ieee_to_fp32_value (NaN kept
 * with its sign and payload, quieted), float8 through a 256-entry table of c10's own formulas,
 * integers plain C casts (round to nearest for the 64-bit ones), bool 0 or 1 (any non-zero byte
 * reads as 1). Keys, `out` and `sub` are of the compute width.
 *
 * `values` is any buffer (buffer protocol, any alignment) holding exactly `count` values of
 * `dtype`; `hist` a writable buffer of exactly 64 int64 counts; `keys` one of exactly 65536 int64
 * counts, or empty (no key bins: the fast loop without the key work). Lengths are checked before
 * any value is read, so a wrong call raises and never reads or writes outside the buffers.
 *
 * Percentiles come from the values' order-preserving keys (the bits of a float with the sign
 * folded so that unsigned integer order is numeric order; NaN and Inf get keys of their own,
 * above and below every finite one). pass1 counts the values by the top 16 bits of their key
 * (`keys`). The caller then knows in which of those bins each wanted rank lies and marks those
 * bins in `lut` (65536 bytes: 0 = not wanted, t = wanted bin number t). pass2 either copies every
 * value of a wanted bin into `out` (a buffer of values of the compute width, `collected` of them
 * already there; the exact values, selected from afterwards) or, where they would not fit, counts
 * them by the next 16 bits of their key into `sub` (t-1)*65536 + bits (a float32 value is then
 * known exactly). `collected` comes back -1 when `out` would overflow (as when the file changed
 * between the passes): nothing is written past its end.
 *
 * pass1 reads each value once for the float64 sum, min, max and non-zero count. NaN and Inf are
 * rare, so the fast loop does not look for them: a non-finite sum says one is there, and only then
 * a checking loop runs. pass2 reads each value once more for the centred sums (float64: exact
 * two-pass variance around the provisional mean) and the 64-bin histogram, whose bin ids are
 * computed in vectorised blocks and counted into four interleaved sub-histograms; for bfloat16 and
 * float8, whose values are their key bins' own, hist_of_keys fills the histogram from pass 1's
 * key bins instead and a seeded pass 2 only sums (and gathers). The sums are
 * kept in LANES fixed partial sums (value i in lane i % LANES, added up in a fixed order at the
 * end), so a result does not depend on the vector width the compiler picked for a dtype or a CPU:
 * a bfloat16 chunk sums exactly as its float32 conversion does. All three release the GIL, so the
 * engine's threads run in parallel (the buffers stay held while they run). Every float-to-int
 * conversion is clamped at both ends first: a value below the histogram's lower bound (as when
 * the file changed between the passes) lands in bin 0, one above it in bin 63, NaN in 0.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define BINS 64
#define BLOCK 2048
#define KEY_BINS 65536
#define LANES 16 /* fixed partial sums; BLOCK is a multiple of it */

/* ---- Reading each dtype ------------------------------------------------------------------- */

static inline float f32_of_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
static inline uint32_t bits_of_f32(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

/* c10's fp16_ieee_to_fp32_value (torch's half-to-float), branch-free so it vectorises: normal
 * values re-biased by one float multiply (which also quiets a signalling NaN, as vcvtph2ps does),
 * subnormals through a magic-number subtraction, both exact. */
static inline float f16_to_f32(uint16_t h) {
    const uint32_t w = (uint32_t)h << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const float normalized = f32_of_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float denormalized = f32_of_bits((two_w >> 17) | (126u << 23)) - 0.5f;
    const uint32_t result = sign | (two_w < (1u << 27) ? bits_of_f32(denormalized) : bits_of_f32(normalized));
    return f32_of_bits(result);
}

/* c10's fp8e4m3fn_to_fp32_value (no infinities; 0x7F and 0xFF are NaN). */
static float e4m3fn_to_f32(uint8_t x) {
    const uint32_t w = (uint32_t)x << 24;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t nonsign = w & 0x7FFFFFFFu;
    uint32_t renorm_shift = nonsign ? (uint32_t)__builtin_clz(nonsign) : 32u;
    renorm_shift = renorm_shift > 4 ? renorm_shift - 4 : 0;
    const int32_t inf_nan_mask = ((int32_t)(nonsign + 0x01000000u) >> 8) & INT32_C(0x7F800000);
    const int32_t zero_mask = (int32_t)(nonsign - 1) >> 31;
    const uint32_t body = nonsign ? ((nonsign << renorm_shift >> 4) + ((0x78u - renorm_shift) << 23)) : 0u;
    return f32_of_bits(sign | ((body | (uint32_t)inf_nan_mask) & ~(uint32_t)zero_mask));
}

/* Every float8 value, filled at import: torch's float8_e5m2 is the upper byte of a float16. */
static float table_e4m3fn[256], table_e5m2[256];

static void fill_tables(void) {
    for (int i = 0; i < 256; i++) {
        table_e4m3fn[i] = e4m3fn_to_f32((uint8_t)i);
        table_e5m2[i] = f16_to_f32((uint16_t)(i << 8));
    }
}

/* Value i of a buffer of S at any address, converted to the compute type: file-mapped chunks start
 * at whatever offset the file gives them, and dereferencing a misaligned pointer is undefined
 * behaviour. memcpy is the defined way to say "load it"; compilers turn it into one load. */
#define DEFINE_LOAD(TAG, S, T, EXPR)                                                            \
    static inline T ld_##TAG(const unsigned char *p, Py_ssize_t i) {                            \
        S s;                                                                                    \
        memcpy(&s, p + (size_t)i * sizeof s, sizeof s);                                         \
        return (EXPR);                                                                          \
    }

DEFINE_LOAD(f32, float, float, s)
DEFINE_LOAD(f64, double, double, s)
DEFINE_LOAD(f16, uint16_t, float, f16_to_f32(s))
DEFINE_LOAD(bf16, uint16_t, float, f32_of_bits((uint32_t)s << 16))
DEFINE_LOAD(e4m3, uint8_t, float, table_e4m3fn[s])
DEFINE_LOAD(e5m2, uint8_t, float, table_e5m2[s])
DEFINE_LOAD(i8, int8_t, double, (double)s)
DEFINE_LOAD(u8, uint8_t, double, (double)s)
DEFINE_LOAD(i16, int16_t, double, (double)s)
DEFINE_LOAD(u16, uint16_t, double, (double)s)
DEFINE_LOAD(i32, int32_t, double, (double)s)
DEFINE_LOAD(u32, uint32_t, double, (double)s)
DEFINE_LOAD(i64, int64_t, double, (double)s)
DEFINE_LOAD(u64, uint64_t, double, (double)s)
DEFINE_LOAD(b8, uint8_t, double, s != 0 ? 1.0 : 0.0)

/* X(tag, stored type, compute type, code, name): the codes are DTYPES' (fixed: callers store them). */
#define FOR_EACH_DTYPE(X)                                                                       \
    X(f32, float, float, 0, "float32")                                                          \
    X(f64, double, double, 1, "float64")                                                        \
    X(f16, uint16_t, float, 2, "float16")                                                       \
    X(bf16, uint16_t, float, 3, "bfloat16")                                                     \
    X(e4m3, uint8_t, float, 4, "float8_e4m3fn")                                                 \
    X(e5m2, uint8_t, float, 5, "float8_e5m2")                                                   \
    X(i8, int8_t, double, 6, "int8")                                                            \
    X(u8, uint8_t, double, 7, "uint8")                                                          \
    X(i16, int16_t, double, 8, "int16")                                                         \
    X(u16, uint16_t, double, 9, "uint16")                                                       \
    X(i32, int32_t, double, 10, "int32")                                                        \
    X(u32, uint32_t, double, 11, "uint32")                                                      \
    X(i64, int64_t, double, 12, "int64")                                                        \
    X(u64, uint64_t, double, 13, "uint64")                                                      \
    X(b8, uint8_t, double, 14, "bool")

#define DTYPE_COUNT 15

typedef struct {
    const char *name;
    Py_ssize_t itemsize;      /* stored */
    Py_ssize_t compute_size;  /* 4 (float32) or 8 (float64) */
} dtype_info;

#define DTYPE_INFO_ROW(TAG, S, T, CODE, NAME) [CODE] = {NAME, (Py_ssize_t)sizeof(S), (Py_ssize_t)sizeof(T)},
static const dtype_info DTYPES[DTYPE_COUNT] = {FOR_EACH_DTYPE(DTYPE_INFO_ROW)};

/* LANES consecutive values from value j on, converted into t: the loops take their values from
 * these where a dtype has a wide conversion instruction (float16's F16C path, PRE = 1, further
 * down); elsewhere (PRE = 0) each value is loaded where it is used, which the compiler vectorises
 * better than a store and reload. */
#define DEFINE_LANES(TAG, S, T, CODE, NAME)                                                     \
    static inline void lanes_##TAG(const unsigned char *b, Py_ssize_t j, T *t) {                \
        for (int l = 0; l < LANES; l++) t[l] = ld_##TAG(b, j + l);                              \
    }
FOR_EACH_DTYPE(DEFINE_LANES)

/* Order-preserving keys: flip every bit of a negative value, only the sign bit of a positive one. */
static inline uint32_t key_f32(float v) {
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    return u ^ ((uint32_t)((int32_t)u >> 31) | 0x80000000u);
}
static inline uint64_t key_f64(double v) {
    uint64_t u;
    memcpy(&u, &v, sizeof u);
    return u ^ ((uint64_t)((int64_t)u >> 63) | 0x8000000000000000ull);
}
#define KEY_float(v) key_f32(v)
#define KEY_double(v) key_f64(v)
#define TOP16_float(k) ((uint16_t)((k) >> 16))
#define TOP16_double(k) ((uint16_t)((k) >> 48))
#define NEXT16_float(k) ((uint16_t)((k) & 0xFFFFu))
#define NEXT16_double(k) ((uint16_t)(((k) >> 32) & 0xFFFFu))

/* One build runs everywhere; on x86-64 the loops also get an AVX2 clone, picked at load time, and
 * the float32 and bfloat16 loops an AVX-512 one (x86-64-v4: measured faster for them, slower for
 * int8's, bench/kernel_passes.py). setup.py compiles with -ffp-contract=off, so no clone contracts
 * a multiply and an add into an FMA: every clone rounds the same sums the same way. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FAST __attribute__((target_clones("avx2", "default")))
#define FAST512 __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define FAST
#define FAST512
#endif
/* The clones each dtype's loops get. */
#define ATTR_f32 FAST512
#define ATTR_bf16 FAST512
#define ATTR_f64 FAST
#define ATTR_f16 FAST
#define ATTR_e4m3 FAST
#define ATTR_e5m2 FAST
#define ATTR_i8 FAST
#define ATTR_u8 FAST
#define ATTR_i16 FAST
#define ATTR_u16 FAST
#define ATTR_i32 FAST
#define ATTR_u32 FAST
#define ATTR_i64 FAST
#define ATTR_u64 FAST
#define ATTR_b8 FAST

/* The blocks of a pass read their values in one sweep, then work on them (the key bins, the
 * histogram) without reading more, so the hardware prefetcher, which also stops at each 4 KiB
 * page, loses the stream at every block: a value not in the cache then costs about twice what
 * it costs from the cache. So each block first asks for the cache lines of the block
 * PREFETCH_BLOCKS ahead (a prefetch never faults; those past the end are not asked for). Not in
 * pass 1 without keys over 4-byte or wider values: it reads without a break, the hardware keeps
 * up, and the extra requests measured slower there (0.43 -> 0.52 ns per float32 element). */
#ifndef PREFETCH_BLOCKS
#define PREFETCH_BLOCKS 2
#endif
#if PREFETCH_BLOCKS <= 0 /* (none: for measuring without) */
#define PREFETCH_AHEAD(x, start, n, S) ((void)0)
#else
#define PREFETCH_AHEAD(x, start, n, S)                                                          \
    do {                                                                                        \
        Py_ssize_t ahead_ = (start) + PREFETCH_BLOCKS * BLOCK;                                  \
        Py_ssize_t stop_ = ahead_ + BLOCK < (n) ? ahead_ + BLOCK : (n);                         \
        for (size_t at_ = (size_t)ahead_ * sizeof(S); ahead_ < stop_ && at_ < (size_t)stop_ * sizeof(S); at_ += 64) \
            __builtin_prefetch((x) + at_, 0, 3);                                                \
    } while (0)
#endif

/* The LANES partial sums added up in one fixed order (pairwise). */
static inline double lanes_total(const double *s) {
    double t[LANES];
    memcpy(t, s, sizeof t);
    for (int width = LANES / 2; width > 0; width /= 2)
        for (int l = 0; l < width; l++) t[l] += t[l + width];
    return t[0];
}

/* ---- convert ------------------------------------------------------------------------------ */

#define DEFINE_CONVERT_WITH(TAG, T, ATTR, PRE)                                                  \
    ATTR static void convert_##TAG(const unsigned char *x, Py_ssize_t n, unsigned char *out) {  \
        T t[LANES];                                                                             \
        Py_ssize_t i = 0;                                                                       \
        for (; PRE && i + LANES <= n; i += LANES) {                                             \
            lanes_##TAG(x, i, t);                                                               \
            memcpy(out + (size_t)i * sizeof t[0], t, sizeof t);                                 \
        }                                                                                       \
        for (; i < n; i++) {                                                                    \
            T v = ld_##TAG(x, i);                                                               \
            memcpy(out + (size_t)i * sizeof v, &v, sizeof v);                                   \
        }                                                                                       \
    }
#define DEFINE_CONVERT(TAG, S, T, CODE, NAME) DEFINE_CONVERT_WITH(TAG, T, ATTR_##TAG, 0)
FOR_EACH_DTYPE(DEFINE_CONVERT)

/* ---- pass 1 ------------------------------------------------------------------------------- */

typedef struct {
    int64_t finite, nonzero, nan, inf;
    double sum, lo, hi;
} pass1_result;

/* KEYED is a constant 0 or 1: the loop without keys has none of the key work. */
#define DEFINE_PASS1_VARIANT(NAME, TAG, S, T, KEYED, ATTR, PRE)                                 \
    ATTR static void NAME(const unsigned char *x, Py_ssize_t n, pass1_result *r, int64_t *keys) { \
        double sum[LANES];                                                                      \
        T lo[LANES], hi[LANES];                                                                 \
        int64_t nonzero[LANES];                                                                 \
        for (int l = 0; l < LANES; l++) {                                                       \
            sum[l] = 0.0;                                                                       \
            lo[l] = (T)INFINITY;                                                                \
            hi[l] = (T)-INFINITY;                                                               \
            nonzero[l] = 0;                                                                     \
        }                                                                                       \
        uint16_t top[BLOCK];                                                                    \
        for (Py_ssize_t start = 0; start < n; start += BLOCK) {                                 \
            Py_ssize_t m = n - start < BLOCK ? n - start : BLOCK;                               \
            const unsigned char *b = x + (size_t)start * sizeof(S);                             \
            if (KEYED || sizeof(S) < 4) PREFETCH_AHEAD(x, start, n, S);                         \
            Py_ssize_t j = 0;                                                                   \
            for (; j + LANES <= m; j += LANES) {                                                \
                T t[LANES];                                                                     \
                if (PRE) lanes_##TAG(b, j, t);                                                  \
                _Pragma("omp simd")                                                             \
                for (int l = 0; l < LANES; l++) {                                               \
                    T v = PRE ? t[l] : ld_##TAG(b, j + l);                                      \
                    sum[l] += (double)v;                                                        \
                    lo[l] = v < lo[l] ? v : lo[l];                                              \
                    hi[l] = v > hi[l] ? v : hi[l];                                              \
                    nonzero[l] += (v != (T)0);                                                  \
                    if (KEYED) top[j + l] = TOP16_##T(KEY_##T(v));                              \
                }                                                                               \
            }                                                                                   \
            for (int l = 0; j + l < m; l++) {                                                   \
                T v = ld_##TAG(b, j + l);                                                       \
                sum[l] += (double)v;                                                            \
                lo[l] = v < lo[l] ? v : lo[l];                                                  \
                hi[l] = v > hi[l] ? v : hi[l];                                                  \
                nonzero[l] += (v != (T)0);                                                      \
                if (KEYED) top[j + l] = TOP16_##T(KEY_##T(v));                                  \
            }                                                                                   \
            if (KEYED)                                                                          \
                for (Py_ssize_t i = 0; i < m; i++) keys[top[i]]++;                              \
        }                                                                                       \
        double total = lanes_total(sum);                                                        \
        T tlo = lo[0], thi = hi[0];                                                             \
        int64_t tnonzero = 0;                                                                   \
        for (int l = 0; l < LANES; l++) {                                                       \
            tlo = lo[l] < tlo ? lo[l] : tlo;                                                    \
            thi = hi[l] > thi ? hi[l] : thi;                                                    \
            tnonzero += nonzero[l];                                                             \
        }                                                                                       \
        r->nonzero = tnonzero;                                                                  \
        r->nan = r->inf = 0;                                                                    \
        if (isfinite(total)) {                                                                  \
            r->finite = n;                                                                      \
            r->sum = total;                                                                     \
            r->lo = tlo;                                                                        \
            r->hi = thi;                                                                        \
            return;                                                                             \
        }                                                                                       \
        /* A NaN or Inf is present (or a float64 sum overflowed): count and skip them. */       \
        double fsum = 0.0, flo = INFINITY, fhi = -INFINITY;                                     \
        int64_t finite = 0, nan = 0, inf = 0;                                                   \
        for (Py_ssize_t i = 0; i < n; i++) {                                                    \
            double v = (double)ld_##TAG(x, i);                                                  \
            if (isnan(v)) {                                                                     \
                nan++;                                                                          \
            } else if (isinf(v)) {                                                              \
                inf++;                                                                          \
            } else {                                                                            \
                finite++;                                                                       \
                fsum += v;                                                                      \
                flo = v < flo ? v : flo;                                                        \
                fhi = v > fhi ? v : fhi;                                                        \
            }                                                                                   \
        }                                                                                       \
        r->finite = finite;                                                                     \
        r->nan = nan;                                                                           \
        r->inf = inf;                                                                           \
        r->sum = fsum;                                                                          \
        r->lo = flo;                                                                            \
        r->hi = fhi;                                                                            \
    }

#define DEFINE_PASS1_WITH(TAG, S, T, ATTR, PRE)                                                 \
    DEFINE_PASS1_VARIANT(pass1_##TAG, TAG, S, T, 1, ATTR, PRE)                                  \
    DEFINE_PASS1_VARIANT(pass1_nokeys_##TAG, TAG, S, T, 0, ATTR, PRE)
#define DEFINE_PASS1(TAG, S, T, CODE, NAME) DEFINE_PASS1_WITH(TAG, S, T, ATTR_##TAG, 0)
FOR_EACH_DTYPE(DEFINE_PASS1)

/* ---- pass 2 ------------------------------------------------------------------------------- */

/* Bin of one value: (v - lo) * scale lies in [0, 64] for values inside [lo, hi] (a hair above 64
 * when rounded). The product is clamped to [0, 63] before the conversion (converting an
 * out-of-range float to int is undefined behaviour in C): the maximum and anything past it fold
 * into the last bin; anything below lo (the file changed since pass 1) and NaN into the first. */
static inline int32_t bin_of(double v, double lo, double scale) {
    double t = (v - lo) * scale;
    t = t > 0.0 ? t : 0.0; /* NaN compares false: 0 */
    t = t < (double)(BINS - 1) ? t : (double)(BINS - 1);
    return (int32_t)t;
}

/* The same in float32 for float32-width values (8 lanes per AVX2 operation instead of 4), used
 * when the range and the scale fit float32. */
static inline int32_t bin_of_f32(float v, float lo, float scale) {
    float t = (v - lo) * scale;
    t = t > 0.0f ? t : 0.0f;
    t = t < (float)(BINS - 1) ? t : (float)(BINS - 1);
    return (int32_t)t;
}

#define FAST_BIN_float(v) (f32_bins ? bin_of_f32((v), lo32, scale32) : bin_of((double)(v), lo, scale))
#define FAST_BIN_double(v) bin_of((v), lo, scale)

/* Where pass2 puts the values of the wanted key bins (see the top of this file). */
#define MAX_WANTED 18 /* the nine percentiles' order statistics either side */
#define MAX_WANTED_BINS MAX_WANTED

typedef struct {
    const uint8_t *lut; /* NULL: no percentiles wanted */
    uint16_t bins[MAX_WANTED]; /* the wanted bins (lut[bins[i]] != 0), for the vectorised test */
    int nbins;
    unsigned char *out; /* NULL: count into sub instead */
    Py_ssize_t cap;     /* values out holds */
    Py_ssize_t count;   /* values in out; -1 after an overflow */
    int64_t *sub;
} wanted_bins;

#define WANT_ONE(T, v, k)                                                                      \
    do {                                                                                       \
        uint8_t t_ = w->lut[TOP16_##T(k)];                                                     \
        if (t_) {                                                                              \
            if (w->out != NULL) {                                                              \
                if (w->count >= 0 && w->count < w->cap) {                                      \
                    memcpy(w->out + (size_t)w->count * sizeof(T), &(v), sizeof(T));            \
                    w->count++;                                                                \
                } else {                                                                       \
                    w->count = -1;                                                             \
                }                                                                              \
            } else {                                                                           \
                w->sub[(size_t)(t_ - 1) * KEY_BINS + NEXT16_##T(k)]++;                         \
            }                                                                                  \
        }                                                                                      \
    } while (0)

/* The wanted-bin test of float32 and bfloat16 values with AVX2, sixteen values at a time: their
 * keys' top 16 bits in 16-bit lanes (for bfloat16 the stored bits with the sign folded), compared
 * with each wanted bin, the matches' positions taken from the compare mask. Picked at run time
 * (the CPU is asked once, at import); elsewhere, and for the other dtypes, the portable loop runs. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
static int cpu_has_avx2 = 0; /* both flags: set at import (pick_loops) */

__attribute__((target("avx2"))) static inline __m256i top16_f32x8(const unsigned char *p) {
    __m256i u = _mm256_loadu_si256((const __m256i *)(const void *)p);
    __m256i flip = _mm256_or_si256(_mm256_srai_epi32(u, 31), _mm256_set1_epi32((int)0x80000000u));
    return _mm256_srli_epi32(_mm256_xor_si256(u, flip), 16);
}

/* Sixteen float32 values' top 16 key bits; packus_epi32 packs per 128-bit lane (a0-3 c0-3 |
 * a4-7 c4-7); the permute puts the 16-bit lanes back in the values' order. */
__attribute__((target("avx2"))) static inline __m256i top16x16_f32(const unsigned char *p) {
    return _mm256_permute4x64_epi64(_mm256_packus_epi32(top16_f32x8(p), top16_f32x8(p + 8 * sizeof(float))), 0xD8);
}

/* Sixteen bfloat16 values' top 16 key bits: the float32 key's top half is the stored 16 bits
 * with every bit flipped for a negative value, only the sign bit for a positive one. */
__attribute__((target("avx2"))) static inline __m256i top16x16_bf16(const unsigned char *p) {
    __m256i u = _mm256_loadu_si256((const __m256i *)(const void *)p);
    return _mm256_xor_si256(u, _mm256_or_si256(_mm256_srai_epi16(u, 15), _mm256_set1_epi16((short)0x8000)));
}

/* The same with AVX-512BW where the CPU has it, 32 values at a time, the compares into mask
 * registers (the tail of a block through the AVX2 test). */
#define AVX512 __attribute__((target("avx512f,avx512bw")))
AVX512 static inline __m512i top16x32_f32(const unsigned char *p) {
    const __m512i sign = _mm512_set1_epi32((int)0x80000000u);
    __m512i a = _mm512_loadu_si512((const void *)p);
    __m512i c = _mm512_loadu_si512((const void *)(p + 16 * sizeof(float)));
    a = _mm512_srli_epi32(_mm512_xor_si512(a, _mm512_or_si512(_mm512_srai_epi32(a, 31), sign)), 16);
    c = _mm512_srli_epi32(_mm512_xor_si512(c, _mm512_or_si512(_mm512_srai_epi32(c, 31), sign)), 16);
    /* each 32-bit lane holds 16 bits: truncating to 16-bit lanes keeps them, in order */
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi32_epi16(a)), _mm512_cvtepi32_epi16(c), 1);
}
AVX512 static inline __m512i top16x32_bf16(const unsigned char *p) {
    __m512i u = _mm512_loadu_si512((const void *)p);
    return _mm512_xor_si512(u, _mm512_or_si512(_mm512_srai_epi16(u, 15), _mm512_set1_epi16((short)0x8000)));
}
static int cpu_has_avx512bw = 0;

#define DEFINE_WANTED_AVX512(TAG, SIZE)                                                        \
    AVX512 static Py_ssize_t wanted_##TAG##_avx512(const unsigned char *b, Py_ssize_t m, const uint16_t *bins, \
                                                   int nbins, uint16_t *where) {               \
        __m512i want[MAX_WANTED_BINS];                                                         \
        for (int t = 0; t < nbins; t++) want[t] = _mm512_set1_epi16((short)bins[t]);           \
        Py_ssize_t found = 0, j = 0;                                                           \
        for (; j + 32 <= m; j += 32) {                                                         \
            __m512i k = top16x32_##TAG(b + (size_t)j * (SIZE));                                \
            __mmask32 mask = _mm512_cmpeq_epi16_mask(k, want[0]);                              \
            for (int t = 1; t < nbins; t++) mask |= _mm512_cmpeq_epi16_mask(k, want[t]);       \
            uint32_t bits = (uint32_t)mask;                                                    \
            while (bits) {                                                                     \
                where[found++] = (uint16_t)(j + __builtin_ctz(bits));                          \
                bits &= bits - 1;                                                              \
            }                                                                                  \
        }                                                                                      \
        if (j < m) { /* the tail, through the AVX2 test */                                    \
            Py_ssize_t head = found;                                                           \
            found += wanted_##TAG##_avx2(b + (size_t)j * (SIZE), m - j, bins, nbins, where + found); \
            for (Py_ssize_t i = head; i < found; i++) where[i] = (uint16_t)(where[i] + j);     \
        }                                                                                      \
        return found;                                                                          \
    }

#define DEFINE_WANTED_AVX2_TEST(TAG, SIZE)                                                     \
    /* Writes the positions (in [0, m)) of the values whose key bin is wanted; returns how many. */ \
    __attribute__((target("avx2"))) static Py_ssize_t wanted_##TAG##_avx2(                     \
        const unsigned char *b, Py_ssize_t m, const uint16_t *bins, int nbins, uint16_t *where) { \
        __m256i want[MAX_WANTED_BINS];                                                         \
        for (int t = 0; t < nbins; t++) want[t] = _mm256_set1_epi16((short)bins[t]);           \
        Py_ssize_t found = 0, j = 0;                                                           \
        for (; j + 16 <= m; j += 16) {                                                         \
            __m256i k = top16x16_##TAG(b + (size_t)j * (SIZE));                                \
            __m256i h = _mm256_cmpeq_epi16(k, want[0]);                                        \
            for (int t = 1; t < nbins; t++) h = _mm256_or_si256(h, _mm256_cmpeq_epi16(k, want[t])); \
            uint32_t mask = (uint32_t)_mm256_movemask_epi8(h);                                 \
            while (mask) {                                                                     \
                int lane = __builtin_ctz(mask) >> 1;                                           \
                where[found++] = (uint16_t)(j + lane);                                         \
                mask &= ~(3u << (2 * lane));                                                   \
            }                                                                                  \
        }                                                                                      \
        for (; j < m; j++) { /* the tail */                                                    \
            uint16_t top = TOP16_float(key_f32(ld_##TAG(b, j)));                               \
            for (int t = 0; t < nbins; t++) {                                                  \
                if (top == bins[t]) {                                                          \
                    where[found++] = (uint16_t)j;                                              \
                    break;                                                                     \
                }                                                                              \
            }                                                                                  \
        }                                                                                      \
        return found;                                                                          \
    }
#define DEFINE_FAST_HITS(TAG, SIZE)                                                            \
    /* The block's wanted values through the AVX-512 or AVX2 test; 0 (nothing done) where the \
     * CPU has neither. */                                                                     \
    static int fast_hits_##TAG(const unsigned char *b, Py_ssize_t m, wanted_bins *w) {         \
        if (!cpu_has_avx2) return 0;                                                           \
        uint16_t where[BLOCK];                                                                 \
        Py_ssize_t found = cpu_has_avx512bw ? wanted_##TAG##_avx512(b, m, w->bins, w->nbins, where) \
                                            : wanted_##TAG##_avx2(b, m, w->bins, w->nbins, where); \
        for (Py_ssize_t i = 0; i < found; i++) {                                               \
            float v = ld_##TAG(b, where[i]);                                                   \
            WANT_ONE(float, v, key_f32(v));                                                    \
        }                                                                                      \
        return 1;                                                                              \
    }
#define DEFINE_WANTED(TAG, SIZE)                                                               \
    DEFINE_WANTED_AVX2_TEST(TAG, SIZE)                                                         \
    DEFINE_WANTED_AVX512(TAG, SIZE)                                                            \
    DEFINE_FAST_HITS(TAG, SIZE)
DEFINE_WANTED(f32, sizeof(float))
DEFINE_WANTED(bf16, sizeof(uint16_t))
#define FAST_HITS_f32(b, m, w) fast_hits_f32((b), (m), (w))
#define FAST_HITS_bf16(b, m, w) fast_hits_bf16((b), (m), (w))
#else
#define FAST_HITS_f32(b, m, w) 0
#define FAST_HITS_bf16(b, m, w) 0
#endif
#define FAST_HITS_f64(b, m, w) 0
#define FAST_HITS_f16(b, m, w) 0
#define FAST_HITS_e4m3(b, m, w) 0
#define FAST_HITS_e5m2(b, m, w) 0
#define FAST_HITS_i8(b, m, w) 0
#define FAST_HITS_u8(b, m, w) 0
#define FAST_HITS_i16(b, m, w) 0
#define FAST_HITS_u16(b, m, w) 0
#define FAST_HITS_i32(b, m, w) 0
#define FAST_HITS_u32(b, m, w) 0
#define FAST_HITS_i64(b, m, w) 0
#define FAST_HITS_u64(b, m, w) 0
#define FAST_HITS_b8(b, m, w) 0

/* hit[j] = 1 where value j's key bin is one of the first K wanted bins (a constant count, so
 * the compare loop is unrolled and vectorised), LANES values at a time (from lanes_TAG where PRE). */
#define HITS(TAG, T, K, PRE)                                                                   \
    do {                                                                                       \
        Py_ssize_t jj = 0;                                                                     \
        for (; jj + LANES <= m; jj += LANES) {                                                 \
            T t[LANES];                                                                        \
            if (PRE) lanes_##TAG(b, jj, t);                                                    \
            _Pragma("omp simd")                                                                \
            for (int l = 0; l < LANES; l++) {                                                  \
                uint16_t tj = TOP16_##T(KEY_##T(PRE ? t[l] : ld_##TAG(b, jj + l))), h = 0;     \
                for (int q = 0; q < (K); q++) h |= (uint16_t)(tj == bins[q]);                  \
                hit[jj + l] = h;                                                               \
            }                                                                                  \
        }                                                                                      \
        for (; jj < m; jj++) {                                                                 \
            uint16_t tj = TOP16_##T(KEY_##T(ld_##TAG(b, jj))), h = 0;                          \
            for (int q = 0; q < (K); q++) h |= (uint16_t)(tj == bins[q]);                      \
            hit[jj] = h;                                                                       \
        }                                                                                      \
    } while (0)

/* SEEDED is a constant 0 or 1. 1: the histogram is already there (hist_of_keys counted pass 1's
 * key bins into it), so this pass has none of the histogram's work; only for the dtypes whose
 * values are their key bins' values (keys_are_values), which kernel_pass2 checks. */
#define DEFINE_PASS2_VARIANT(NAME, TAG, S, T, SEEDED, ATTR, PRE)                                 \
    ATTR static void NAME(const unsigned char *x, Py_ssize_t n, int dirty, double mean, double lo, \
                                 double scale, int64_t *hist, double *shift_out, double *css_out, \
                                 wanted_bins *w) {                                               \
        int64_t sub[4][BINS] = {{0}};                                                            \
        int32_t idx[BLOCK];                                                                      \
        const float lo32 = (float)lo, scale32 = (float)scale;                                    \
        /* float32 bins when the range and the scale fit float32 (else differences overflow) */  \
        const int f32_bins = scale > 1e-36 && scale < 1e30;                                      \
        (void)lo32;                                                                              \
        (void)scale32;                                                                           \
        (void)f32_bins;                                                                          \
        double s[LANES], c[LANES];                                                               \
        for (int l = 0; l < LANES; l++) s[l] = c[l] = 0.0;                                       \
        if (!dirty) {                                                                            \
            for (Py_ssize_t start = 0; start < n; start += BLOCK) {                              \
                Py_ssize_t m = n - start < BLOCK ? n - start : BLOCK;                            \
                const unsigned char *b = x + (size_t)start * sizeof(S);                          \
                PREFETCH_AHEAD(x, start, n, S);                                                  \
                Py_ssize_t j = 0;                                                                \
                for (; j + LANES <= m; j += LANES) {                                             \
                    T t[LANES];                                                                  \
                    if (PRE) lanes_##TAG(b, j, t);                                               \
                    _Pragma("omp simd")                                                          \
                    for (int l = 0; l < LANES; l++) {                                            \
                        T v = PRE ? t[l] : ld_##TAG(b, j + l);                                   \
                        double d = (double)v - mean;                                             \
                        s[l] += d;                                                               \
                        c[l] += d * d;                                                           \
                        if (!SEEDED) idx[j + l] = FAST_BIN_##T(v);                               \
                    }                                                                            \
                }                                                                                \
                for (int l = 0; j + l < m; l++) {                                                \
                    T v = ld_##TAG(b, j + l);                                                    \
                    double d = (double)v - mean;                                                 \
                    s[l] += d;                                                                   \
                    c[l] += d * d;                                                               \
                    if (!SEEDED) idx[j + l] = FAST_BIN_##T(v);                                   \
                }                                                                                \
                for (j = 0; !SEEDED && j + 4 <= m; j += 4) {                                     \
                    sub[0][idx[j]]++;                                                            \
                    sub[1][idx[j + 1]]++;                                                        \
                    sub[2][idx[j + 2]]++;                                                        \
                    sub[3][idx[j + 3]]++;                                                        \
                }                                                                                \
                for (; !SEEDED && j < m; j++) sub[0][idx[j]]++;                                  \
                if (w->lut == NULL) continue;                                                    \
                /* which values lie in a wanted bin: a vectorised compare per wanted bin (few, and \
                 * most blocks hold none), then only the hits are looked at */                    \
                if (FAST_HITS_##TAG(b, m, w)) continue; /* AVX2 where the CPU has it */          \
                uint16_t hit[BLOCK + 4];                                                         \
                const uint16_t *bins = w->bins; /* padded to a multiple of 6 with repeats */     \
                if (w->nbins <= 6) {                                                             \
                    HITS(TAG, T, 6, PRE);                                                             \
                } else if (w->nbins <= 12) {                                                     \
                    HITS(TAG, T, 12, PRE);                                                            \
                } else {                                                                         \
                    HITS(TAG, T, 18, PRE);                                                            \
                }                                                                                \
                memset(hit + m, 0, 4 * sizeof hit[0]);                                           \
                for (j = 0; j < m; j += 4) { /* four flags at a time: most words are all zero */ \
                    uint64_t word;                                                               \
                    memcpy(&word, hit + j, sizeof word);                                         \
                    if (!word) continue;                                                         \
                    for (Py_ssize_t i = j; i < j + 4 && i < m; i++) {                            \
                        if (!hit[i]) continue;                                                   \
                        T v = ld_##TAG(b, i);                                                    \
                        WANT_ONE(T, v, KEY_##T(v));                                              \
                    }                                                                            \
                }                                                                                \
            }                                                                                    \
        } else {                                                                                 \
            for (Py_ssize_t i = 0; i < n; i++) {                                                 \
                T tv = ld_##TAG(x, i);                                                           \
                double v = (double)tv;                                                           \
                if (!isfinite(v)) continue;                                                      \
                double d = v - mean;                                                             \
                s[0] += d;                                                                       \
                c[0] += d * d;                                                                   \
                if (!SEEDED) sub[0][bin_of(v, lo, scale)]++;                                     \
                if (w->lut != NULL) WANT_ONE(T, tv, KEY_##T(tv));                                \
            }                                                                                    \
        }                                                                                        \
        for (int k = 0; k < BINS; k++) hist[k] += sub[0][k] + sub[1][k] + sub[2][k] + sub[3][k]; \
        *shift_out = lanes_total(s);                                                             \
        *css_out = lanes_total(c);                                                               \
    }
#define DEFINE_PASS2_WITH(TAG, S, T, ATTR, PRE)                                                 \
    DEFINE_PASS2_VARIANT(pass2_##TAG, TAG, S, T, 0, ATTR, PRE)                                  \
    DEFINE_PASS2_VARIANT(pass2_seeded_##TAG, TAG, S, T, 1, ATTR, PRE)
#define DEFINE_PASS2(TAG, S, T, CODE, NAME) DEFINE_PASS2_WITH(TAG, S, T, ATTR_##TAG, 0)
FOR_EACH_DTYPE(DEFINE_PASS2)

/* float16 with F16C (vcvtph2ps, eight values per instruction) beside AVX2, picked at import where
 * the CPU has both: the same loops, the same results (F16C converts exactly as c10 does; the
 * single values of the tails and the checking loops still go through f16_to_f32). F16C is not a
 * target_clones option of its own, and "arch=haswell" would also allow FMA contraction, which
 * would round the centred sums differently from the float32 loops. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define HAVE_F16C_PATH 1
#define F16C __attribute__((target("avx2,f16c")))
F16C static inline void lanes_f16c(const unsigned char *b, Py_ssize_t j, float *t) {
    const unsigned char *p = b + (size_t)j * sizeof(uint16_t);
    _mm256_storeu_ps(t, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)p)));
    _mm256_storeu_ps(t + 8, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)(p + 16))));
}
static inline float ld_f16c(const unsigned char *p, Py_ssize_t i) { return ld_f16(p, i); }
#define FAST_HITS_f16c(b, m, w) 0
DEFINE_CONVERT_WITH(f16c, float, F16C, 1)
DEFINE_PASS1_WITH(f16c, uint16_t, float, F16C, 1)
DEFINE_PASS2_WITH(f16c, uint16_t, float, F16C, 1)
#endif

/* ---- dispatch ----------------------------------------------------------------------------- */

typedef void (*convert_fn)(const unsigned char *, Py_ssize_t, unsigned char *);
typedef void (*pass1_fn)(const unsigned char *, Py_ssize_t, pass1_result *, int64_t *);
typedef void (*pass2_fn)(const unsigned char *, Py_ssize_t, int, double, double, double, int64_t *, double *,
                         double *, wanted_bins *);
#define CONVERT_ROW(TAG, S, T, CODE, NAME) [CODE] = convert_##TAG,
#define PASS1_ROW(TAG, S, T, CODE, NAME) [CODE] = pass1_##TAG,
#define PASS1_NOKEYS_ROW(TAG, S, T, CODE, NAME) [CODE] = pass1_nokeys_##TAG,
#define PASS2_ROW(TAG, S, T, CODE, NAME) [CODE] = pass2_##TAG,
#define PASS2_SEEDED_ROW(TAG, S, T, CODE, NAME) [CODE] = pass2_seeded_##TAG,
static convert_fn CONVERTS[DTYPE_COUNT] = {FOR_EACH_DTYPE(CONVERT_ROW)};
static pass1_fn PASS1S[DTYPE_COUNT] = {FOR_EACH_DTYPE(PASS1_ROW)};
static pass1_fn PASS1S_NOKEYS[DTYPE_COUNT] = {FOR_EACH_DTYPE(PASS1_NOKEYS_ROW)};
static pass2_fn PASS2S[DTYPE_COUNT] = {FOR_EACH_DTYPE(PASS2_ROW)};
static pass2_fn PASS2S_SEEDED[DTYPE_COUNT] = {FOR_EACH_DTYPE(PASS2_SEEDED_ROW)};

/* The float16 loops with F16C where the CPU has it (asked once, at import). */
static void pick_loops(void) {
#ifdef HAVE_F16C_PATH
    __builtin_cpu_init();
    cpu_has_avx2 = __builtin_cpu_supports("avx2") ? 1 : 0;
    cpu_has_avx512bw = cpu_has_avx2 && __builtin_cpu_supports("avx512bw") ? 1 : 0;
    if (cpu_has_avx2 && __builtin_cpu_supports("f16c")) {
        CONVERTS[2] = convert_f16c;
        PASS1S[2] = pass1_f16c;
        PASS1S_NOKEYS[2] = pass1_nokeys_f16c;
        PASS2S[2] = pass2_f16c;
        PASS2S_SEEDED[2] = pass2_seeded_f16c;
    }
#endif
}

/* The dtypes whose converted values have at most 7 mantissa bits (bfloat16, both float8 kinds):
 * the top 16 bits of a value's key are the whole value, so pass 1's key bins are the values
 * themselves, and the histogram follows from them (hist_of_keys). */
static int keys_are_values(int dtype) { return dtype == 3 || dtype == 4 || dtype == 5; }

/* A known dtype code (ValueError otherwise). */
static int check_dtype(int dtype) {
    if (dtype < 0 || dtype >= DTYPE_COUNT) {
        PyErr_Format(PyExc_ValueError, "unknown dtype code %d", dtype);
        return 0;
    }
    return 1;
}

/* The buffer must hold exactly `n` values of `itemsize` bytes. */
static int check_length(const Py_buffer *buf, Py_ssize_t n, Py_ssize_t itemsize, const char *what) {
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "negative count");
        return 0;
    }
    if (n > PY_SSIZE_T_MAX / itemsize || buf->len != n * itemsize) {
        PyErr_Format(PyExc_ValueError, "the %s buffer has %zd bytes, not %zd values of %zd bytes", what, buf->len, n,
                     itemsize);
        return 0;
    }
    return 1;
}

static int check_counts(const Py_buffer *buf, Py_ssize_t count, const char *what) {
    if (buf->len != count * (Py_ssize_t)sizeof(int64_t)) {
        PyErr_Format(PyExc_ValueError, "the %s buffer has %zd bytes, not %zd int64 counts", what, buf->len, count);
        return 0;
    }
    if (count > 0 && (uintptr_t)buf->buf % _Alignof(int64_t) != 0) { /* an empty one is never read */
        PyErr_Format(PyExc_ValueError, "the %s buffer is not aligned for int64 counts", what);
        return 0;
    }
    return 1;
}

static PyObject *kernel_convert(PyObject *self, PyObject *args) {
    Py_buffer values, out;
    Py_ssize_t n;
    int dtype;
    if (!PyArg_ParseTuple(args, "y*niw*", &values, &n, &dtype, &out))
        return NULL;
    int ok = check_dtype(dtype) && check_length(&values, n, DTYPES[dtype].itemsize, "values") &&
             check_length(&out, n, DTYPES[dtype].compute_size, "out");
    if (ok) {
        Py_BEGIN_ALLOW_THREADS
        CONVERTS[dtype]((const unsigned char *)values.buf, n, (unsigned char *)out.buf);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&values);
    PyBuffer_Release(&out);
    if (!ok) return NULL;
    Py_RETURN_NONE;
}

static PyObject *kernel_pass1(PyObject *self, PyObject *args) {
    Py_buffer values, keys;
    Py_ssize_t n;
    int dtype;
    if (!PyArg_ParseTuple(args, "y*niw*", &values, &n, &dtype, &keys))
        return NULL;
    int keyed = keys.len != 0; /* an empty keys buffer: no key bins */
    if (!check_dtype(dtype) || !check_length(&values, n, DTYPES[dtype].itemsize, "values") ||
        (keyed && !check_counts(&keys, KEY_BINS, "keys"))) {
        PyBuffer_Release(&values);
        PyBuffer_Release(&keys);
        return NULL;
    }
    pass1_result r;
    pass1_fn pass1 = keyed ? PASS1S[dtype] : PASS1S_NOKEYS[dtype];
    Py_BEGIN_ALLOW_THREADS
    pass1((const unsigned char *)values.buf, n, &r, (int64_t *)keys.buf);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&values);
    PyBuffer_Release(&keys);
    return Py_BuildValue("LdddLLL", (long long)r.finite, r.sum, r.lo, r.hi, (long long)r.nonzero,
                         (long long)r.nan, (long long)r.inf);
}

static PyObject *kernel_pass2(PyObject *self, PyObject *args) {
    Py_buffer values, hist, lut, out, sub;
    Py_ssize_t n, collected;
    int dtype, dirty, seeded = 0;
    double mean, lo, scale, shift, css;
    if (!PyArg_ParseTuple(args, "y*nipdddw*y*w*nw*|p", &values, &n, &dtype, &dirty, &mean, &lo, &scale, &hist, &lut,
                          &out, &collected, &sub, &seeded))
        return NULL;
    int ok = check_dtype(dtype);
    if (ok && seeded && !keys_are_values(dtype)) {
        PyErr_Format(PyExc_ValueError, "a seeded histogram needs values that are their key bins' (not %s)",
                     DTYPES[dtype].name);
        ok = 0;
    }
    Py_ssize_t itemsize = ok ? DTYPES[dtype].compute_size : 1; /* of out's values */
    ok = ok && check_length(&values, n, DTYPES[dtype].itemsize, "values") && check_counts(&hist, BINS, "histogram");
    if (ok && (!(scale >= 0.0) || !isfinite(scale) || !isfinite(lo))) {
        PyErr_SetString(PyExc_ValueError, "bad scale or lower bound");
        ok = 0;
    }
    wanted_bins w;
    w.lut = NULL;
    w.nbins = 0;
    w.out = NULL;
    w.cap = 0;
    w.count = collected;
    w.sub = NULL;
    if (ok && lut.len != 0) { /* an empty lut: no percentiles wanted */
        int most = 0;
        if (lut.len != KEY_BINS) {
            PyErr_Format(PyExc_ValueError, "the lut buffer has %zd bytes, not %d", lut.len, KEY_BINS);
            ok = 0;
        } else {
            for (Py_ssize_t i = 0; i < KEY_BINS; i++) {
                int t = ((const uint8_t *)lut.buf)[i];
                most = t > most ? t : most;
                if (t && w.nbins < MAX_WANTED) w.bins[w.nbins++] = (uint16_t)i;
                else if (t) {
                    PyErr_Format(PyExc_ValueError, "more than %d wanted bins", MAX_WANTED);
                    ok = 0;
                    break;
                }
            }
            for (int i = w.nbins; ok && w.nbins > 0 && i < MAX_WANTED; i++)
                w.bins[i] = w.bins[i - 1]; /* repeats match nothing new */
        }
        if (ok && out.len != 0) {
            if (out.len % itemsize != 0 || collected < -1 || collected > out.len / itemsize) {
                PyErr_SetString(PyExc_ValueError, "bad collection buffer or count");
                ok = 0;
            }
            w.out = (unsigned char *)out.buf;
            w.cap = out.len / itemsize;
        } else if (ok && !check_counts(&sub, (Py_ssize_t)most * KEY_BINS, "sub-bin")) {
            ok = 0;
        } else {
            w.sub = (int64_t *)sub.buf;
        }
        w.lut = w.nbins > 0 ? (const uint8_t *)lut.buf : NULL; /* nothing marked: nothing wanted */
    }
    if (!ok) {
        PyBuffer_Release(&values);
        PyBuffer_Release(&hist);
        PyBuffer_Release(&lut);
        PyBuffer_Release(&out);
        PyBuffer_Release(&sub);
        return NULL;
    }
    pass2_fn pass2 = seeded ? PASS2S_SEEDED[dtype] : PASS2S[dtype];
    Py_BEGIN_ALLOW_THREADS
    pass2((const unsigned char *)values.buf, n, dirty, mean, lo, scale, (int64_t *)hist.buf, &shift, &css, &w);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&values);
    PyBuffer_Release(&hist);
    PyBuffer_Release(&lut);
    PyBuffer_Release(&out);
    PyBuffer_Release(&sub);
    return Py_BuildValue("ddn", shift, css, w.count);
}

/* hist_of_keys(keys, dtype, lo, scale, hist): adds pass 1's key bins of a dtype whose values are
 * their key bins' (keys_are_values) into the 64-bin histogram, each bin's count in the bin of its
 * value. The bins are computed in float64 (bin_of), as pass 2's checking loop and the torch
 * engine compute them: at most 65,536 of them, so the float32 shortcut of pass 2's vector loop
 * buys nothing here. The key bins of NaN and Inf are left out, as pass 2 leaves those values out.
 * With it, a seeded pass 2 does no histogram work. */
static PyObject *kernel_hist_of_keys(PyObject *self, PyObject *args) {
    Py_buffer keys, hist;
    int dtype;
    double lo, scale;
    if (!PyArg_ParseTuple(args, "y*iddw*", &keys, &dtype, &lo, &scale, &hist))
        return NULL;
    int ok = check_dtype(dtype) && check_counts(&keys, KEY_BINS, "keys") && check_counts(&hist, BINS, "histogram");
    if (ok && !keys_are_values(dtype)) {
        PyErr_Format(PyExc_ValueError, "the key bins of %s are not its values", DTYPES[dtype].name);
        ok = 0;
    }
    if (ok && (!(scale >= 0.0) || !isfinite(scale) || !isfinite(lo))) {
        PyErr_SetString(PyExc_ValueError, "bad scale or lower bound");
        ok = 0;
    }
    if (ok) {
        const int64_t *k = (const int64_t *)keys.buf;
        int64_t *h = (int64_t *)hist.buf;
        Py_BEGIN_ALLOW_THREADS
        for (uint32_t key = 0; key < KEY_BINS; key++) {
            if (!k[key]) continue;
            uint32_t top = key & 0x8000u ? key ^ 0x8000u : ~key & 0xFFFFu; /* the value's top 16 bits */
            float v = f32_of_bits(top << 16);
            if (isfinite(v)) h[bin_of((double)v, lo, scale)] += k[key];
        }
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&keys);
    PyBuffer_Release(&hist);
    if (!ok) return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"pass1", kernel_pass1, METH_VARARGS, "Sum, min, max, non-zero, NaN and Inf counts and key bins of a chunk."},
    {"pass2", kernel_pass2, METH_VARARGS, "Centred sums, the 64-bin histogram and the wanted key bins of a chunk."},
    {"convert", kernel_convert, METH_VARARGS, "A chunk's values converted to the compute width, into out."},
    {"hist_of_keys", kernel_hist_of_keys, METH_VARARGS, "The histogram of pass 1's key bins (bfloat16, float8)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernel", NULL, -1, methods};

#ifndef CKPTSCOPE_KERNEL_SOURCE_SHA256
#define CKPTSCOPE_KERNEL_SOURCE_SHA256 "unknown"
#endif

/* DTYPES: {name: code}, the codes pass1, pass2 and convert take. */
static int add_dtypes(PyObject *m) {
    PyObject *codes = PyDict_New();
    if (codes == NULL) return -1;
    for (int code = 0; code < DTYPE_COUNT; code++) {
        PyObject *value = PyLong_FromLong(code);
        if (value == NULL || PyDict_SetItemString(codes, DTYPES[code].name, value) < 0) {
            Py_XDECREF(value);
            Py_DECREF(codes);
            return -1;
        }
        Py_DECREF(value);
    }
    if (PyModule_AddObject(m, "DTYPES", codes) < 0) {
        Py_DECREF(codes);
        return -1;
    }
    return 0;
}

PyMODINIT_FUNC PyInit__kernel(void) {
    fill_tables();
    pick_loops();
    PyObject *m = PyModule_Create(&module);
    /* setup.py compiles in the sha256 of this file: the loader compares it with the source beside
     * an editable install, so a kernel built from an older _kernel.c is never used. */
    if (m != NULL && (PyModule_AddStringConstant(m, "SOURCE_SHA256", CKPTSCOPE_KERNEL_SOURCE_SHA256) < 0 ||
                      add_dtypes(m) < 0)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
