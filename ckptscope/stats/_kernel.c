/* The stats engine's two fused passes over one contiguous chunk of float32 or float64 values.
 *
 * pass1(values, count, is_double, keys) -> (finite, sum, lo, hi, nonzero, nan, inf)
 * pass2(values, count, is_double, dirty, mean, lo, scale, hist, lut, out, collected, sub)
 *     -> (shift, css, collected)
 *
 * `values` is any buffer (buffer protocol) holding exactly `count` float32 (or float64) values;
 * `hist` a writable buffer of exactly 64 int64 counts; `keys` one of exactly 65536 int64 counts.
 * Lengths are checked before any value is read, so a wrong call raises and never reads or writes
 * outside the buffers.
 *
 * Percentiles come from the values' order-preserving keys (the bits of a float with the sign
 * folded so that unsigned integer order is numeric order; NaN and Inf get keys of their own,
 * above and below every finite one). pass1 counts the values by the top 16 bits of their key
 * (`keys`). The caller then knows in which of those bins each wanted rank lies and marks those
 * bins in `lut` (65536 bytes: 0 = not wanted, t = wanted bin number t). pass2 either copies every
 * value of a wanted bin into `out` (a buffer of values of the chunk's width, `collected` of them
 * already there; the exact values, selected from afterwards) or, where they would not fit, counts
 * them by the next 16 bits of their key into `sub` (t-1)*65536 + bits (a float32 value is then
 * known exactly). `collected` comes back -1 when `out` would overflow (as when the file changed
 * between the passes): nothing is written past its end.
 *
 * pass1 reads each value once for the float64 sum, min, max and non-zero count. NaN and Inf are
 * rare, so the fast loop does not look for them: a non-finite sum says one is there, and only then
 * a checking loop runs. pass2 reads each value once more for the centred sums (float64: exact
 * two-pass variance around the provisional mean) and the 64-bin histogram, whose bin ids are
 * computed in vectorised blocks and counted into four interleaved sub-histograms. Both release
 * the GIL, so the engine's threads run in parallel (the buffers stay held while they run). Every
 * float-to-int conversion is clamped at both ends first: a value below the histogram's lower bound
 * (as when the file changed between the passes) lands in bin 0, one above it in bin 63, NaN in 0.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

/* Value i of a buffer of T at any address: file-mapped chunks start at whatever offset the file
 * gives them, and dereferencing a misaligned float* is undefined behaviour. memcpy is the
 * defined way to say "load it"; compilers turn it into one (unaligned) load. */
#define LOAD(T, p, i) load_##T((p), (i))
static inline float load_float(const unsigned char *p, Py_ssize_t i) {
    float v;
    memcpy(&v, p + (size_t)i * sizeof v, sizeof v);
    return v;
}
static inline double load_double(const unsigned char *p, Py_ssize_t i) {
    double v;
    memcpy(&v, p + (size_t)i * sizeof v, sizeof v);
    return v;
}

#define BINS 64
#define BLOCK 2048
#define KEY_BINS 65536

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

/* One build runs everywhere; on x86-64 the loops also get an AVX2 clone, picked at load time. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FAST __attribute__((target_clones("avx2", "default")))
#else
#define FAST
#endif

typedef struct {
    int64_t finite, nonzero, nan, inf;
    double sum, lo, hi;
} pass1_result;

#define DEFINE_PASS1(NAME, T)                                                                   \
    FAST static void NAME(const unsigned char *x, Py_ssize_t n, pass1_result *r, int64_t *keys) {   \
        double sum = 0.0;                                                                       \
        T lo = (T)INFINITY, hi = (T)-INFINITY;                                                  \
        int64_t nonzero = 0;                                                                    \
        uint16_t top[BLOCK];                                                                    \
        for (Py_ssize_t start = 0; start < n; start += BLOCK) {                                 \
            Py_ssize_t m = n - start < BLOCK ? n - start : BLOCK;                               \
            const unsigned char *b = x + (size_t)start * sizeof(T);                             \
            _Pragma("omp simd reduction(+ : sum, nonzero) reduction(min : lo) reduction(max : hi)") \
            for (Py_ssize_t j = 0; j < m; j++) {                                                \
                T v = LOAD(T, b, j);                                                            \
                sum += (double)v;                                                               \
                lo = v < lo ? v : lo;                                                           \
                hi = v > hi ? v : hi;                                                           \
                nonzero += (v != (T)0);                                                         \
                top[j] = TOP16_##T(KEY_##T(v));                                                 \
            }                                                                                   \
            for (Py_ssize_t j = 0; j < m; j++) keys[top[j]]++;                                  \
        }                                                                                       \
        r->nonzero = nonzero;                                                                   \
        r->nan = r->inf = 0;                                                                    \
        if (isfinite(sum)) {                                                                    \
            r->finite = n;                                                                      \
            r->sum = sum;                                                                       \
            r->lo = lo;                                                                         \
            r->hi = hi;                                                                         \
            return;                                                                             \
        }                                                                                       \
        /* A NaN or Inf is present (or a float64 sum overflowed): count and skip them. */       \
        double fsum = 0.0, flo = INFINITY, fhi = -INFINITY;                                     \
        int64_t finite = 0, nan = 0, inf = 0;                                                   \
        for (Py_ssize_t i = 0; i < n; i++) {                                                    \
            double v = (double)LOAD(T, x, i);                                                   \
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

DEFINE_PASS1(pass1_f32, float)
DEFINE_PASS1(pass1_f64, double)

/* Bin of one value: (v - lo) * scale lies in [0, 64] for values inside [lo, hi] (a hair above 64
 * when rounded). The product is clamped to [0, 63] before the conversion (converting an
 * out-of-range float to int is undefined behaviour in C): the maximum and anything past it fold
 * into the last bin; anything below lo (the file changed since pass 1) and NaN into the first. */
#define BIN_OF(v) bin_of((double)(v), lo, scale)

static inline int32_t bin_of(double v, double lo, double scale) {
    double t = (v - lo) * scale;
    t = t > 0.0 ? t : 0.0; /* NaN compares false: 0 */
    t = t < (double)(BINS - 1) ? t : (double)(BINS - 1);
    return (int32_t)t;
}

/* The same in float32 for float32 chunks (8 lanes per AVX2 operation instead of 4), used when the
 * range and the scale fit float32. */
static inline int32_t bin_of_f32(float v, float lo, float scale) {
    float t = (v - lo) * scale;
    t = t > 0.0f ? t : 0.0f;
    t = t < (float)(BINS - 1) ? t : (float)(BINS - 1);
    return (int32_t)t;
}

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

/* The wanted-bin test of float32 values with AVX2, sixteen values at a time: their keys' top 16
 * bits packed into 16-bit lanes, compared with each wanted bin, the matches' positions taken from
 * the compare mask. Picked at run time (the CPU is asked once); elsewhere the portable loop runs. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>
static int cpu_has_avx2 = -1;

__attribute__((target("avx2"))) static inline __m256i top16_f32x8(const unsigned char *p) {
    __m256i u = _mm256_loadu_si256((const __m256i *)(const void *)p);
    __m256i flip = _mm256_or_si256(_mm256_srai_epi32(u, 31), _mm256_set1_epi32((int)0x80000000u));
    return _mm256_srli_epi32(_mm256_xor_si256(u, flip), 16);
}

/* Writes the positions (in [0, m)) of the values whose key bin is wanted; returns how many. */
__attribute__((target("avx2"))) static Py_ssize_t wanted_f32_avx2(const unsigned char *b, Py_ssize_t m,
                                                                  const uint16_t *bins, int nbins,
                                                                  uint16_t *where) {
    __m256i want[MAX_WANTED_BINS];
    for (int t = 0; t < nbins; t++) want[t] = _mm256_set1_epi16((short)bins[t]);
    Py_ssize_t found = 0, j = 0;
    for (; j + 16 <= m; j += 16) {
        const unsigned char *p = b + (size_t)j * sizeof(float);
        /* packus_epi32 packs per 128-bit lane (a0-3 c0-3 | a4-7 c4-7); the permute puts the 16-bit
         * lanes back in the values' order, so the positions come out ascending */
        __m256i k = _mm256_permute4x64_epi64(
            _mm256_packus_epi32(top16_f32x8(p), top16_f32x8(p + 8 * sizeof(float))), 0xD8);
        __m256i h = _mm256_cmpeq_epi16(k, want[0]);
        for (int t = 1; t < nbins; t++) h = _mm256_or_si256(h, _mm256_cmpeq_epi16(k, want[t]));
        uint32_t mask = (uint32_t)_mm256_movemask_epi8(h);
        while (mask) {
            int lane = __builtin_ctz(mask) >> 1;
            where[found++] = (uint16_t)(j + lane);
            mask &= ~(3u << (2 * lane));
        }
    }
    for (; j < m; j++) { /* the tail */
        uint16_t top = TOP16_float(key_f32(LOAD(float, b, j)));
        for (int t = 0; t < nbins; t++) {
            if (top == bins[t]) {
                where[found++] = (uint16_t)j;
                break;
            }
        }
    }
    return found;
}

/* The float32 chunk's wanted values through the AVX2 test; 0 (nothing done) where the CPU lacks it. */
static int fast_hits_f32(const unsigned char *b, Py_ssize_t m, wanted_bins *w) {
    if (cpu_has_avx2 < 0) cpu_has_avx2 = __builtin_cpu_supports("avx2") ? 1 : 0;
    if (!cpu_has_avx2) return 0;
    uint16_t where[BLOCK];
    Py_ssize_t found = wanted_f32_avx2(b, m, w->bins, w->nbins, where);
    for (Py_ssize_t i = 0; i < found; i++) {
        float v = LOAD(float, b, where[i]);
        WANT_ONE(float, v, key_f32(v));
    }
    return 1;
}
#define FAST_HITS(T, b, m, w) FAST_HITS_##T(b, m, w)
#define FAST_HITS_float(b, m, w) fast_hits_f32((b), (m), (w))
#else
#define FAST_HITS(T, b, m, w) 0
#endif
#ifndef FAST_HITS_double
#define FAST_HITS_double(b, m, w) 0
#endif

/* hit[j] = 1 where value j's key bin is one of the first K wanted bins (a constant count, so
 * the compare loop is unrolled and vectorised). */
#define HITS(T, K)                                                                             \
    do {                                                                                       \
        _Pragma("omp simd")                                                                    \
        for (Py_ssize_t jj = 0; jj < m; jj++) {                                                \
            uint16_t tj = TOP16_##T(KEY_##T(LOAD(T, b, jj))), h = 0;                           \
            for (int t = 0; t < (K); t++) h |= (uint16_t)(tj == bins[t]);                      \
            hit[jj] = h;                                                                       \
        }                                                                                      \
    } while (0)

#define DEFINE_PASS2(NAME, T, FAST_BIN)                                                          \
    FAST static void NAME(const unsigned char *x, Py_ssize_t n, int dirty, double mean, double lo,   \
                          double scale, int64_t *hist, double *shift_out, double *css_out,        \
                          wanted_bins *w) {                                                      \
        int64_t sub[4][BINS] = {{0}};                                                            \
        int32_t idx[BLOCK];                                                                      \
        const float lo32 = (float)lo, scale32 = (float)scale;                                    \
        /* float32 bins when the range and the scale fit float32 (else differences overflow) */  \
        const int f32_bins = scale > 1e-36 && scale < 1e30;                                      \
        double shift = 0.0, css = 0.0;                                                           \
        if (!dirty) {                                                                            \
            for (Py_ssize_t start = 0; start < n; start += BLOCK) {                              \
                Py_ssize_t m = n - start < BLOCK ? n - start : BLOCK;                            \
                const unsigned char *b = x + (size_t)start * sizeof(T);                          \
                double s = 0.0, c = 0.0;                                                         \
                _Pragma("omp simd reduction(+ : s, c)")                                          \
                for (Py_ssize_t j = 0; j < m; j++) {                                             \
                    T v = LOAD(T, b, j);                                                         \
                    double d = (double)v - mean;                                                 \
                    s += d;                                                                      \
                    c += d * d;                                                                  \
                    idx[j] = FAST_BIN;                                                           \
                }                                                                                \
                shift += s;                                                                      \
                css += c;                                                                        \
                Py_ssize_t j = 0;                                                                \
                for (; j + 4 <= m; j += 4) {                                                     \
                    sub[0][idx[j]]++;                                                            \
                    sub[1][idx[j + 1]]++;                                                        \
                    sub[2][idx[j + 2]]++;                                                        \
                    sub[3][idx[j + 3]]++;                                                        \
                }                                                                                \
                for (; j < m; j++) sub[0][idx[j]]++;                                             \
                if (w->lut == NULL) continue;                                                    \
                /* which values lie in a wanted bin: a vectorised compare per wanted bin (few, and \
                 * most blocks hold none), then only the hits are looked at */                    \
                if (FAST_HITS(T, b, m, w)) continue; /* AVX2 where the CPU has it (float32) */  \
                uint16_t hit[BLOCK + 4];                                                         \
                const uint16_t *bins = w->bins; /* padded to a multiple of 6 with repeats */     \
                if (w->nbins <= 6) {                                                             \
                    HITS(T, 6);                                                                  \
                } else if (w->nbins <= 12) {                                                     \
                    HITS(T, 12);                                                                 \
                } else {                                                                         \
                    HITS(T, 18);                                                                 \
                }                                                                                \
                memset(hit + m, 0, 4 * sizeof hit[0]);                                           \
                for (j = 0; j < m; j += 4) { /* four flags at a time: most words are all zero */ \
                    uint64_t word;                                                               \
                    memcpy(&word, hit + j, sizeof word);                                         \
                    if (!word) continue;                                                         \
                    for (Py_ssize_t i = j; i < j + 4 && i < m; i++) {                            \
                        if (!hit[i]) continue;                                                   \
                        T v = LOAD(T, b, i);                                                     \
                        WANT_ONE(T, v, KEY_##T(v));                                              \
                    }                                                                            \
                }                                                                                \
            }                                                                                    \
        } else {                                                                                 \
            for (Py_ssize_t i = 0; i < n; i++) {                                                 \
                T tv = LOAD(T, x, i);                                                            \
                double v = (double)tv;                                                           \
                if (!isfinite(v)) continue;                                                      \
                double d = v - mean;                                                             \
                shift += d;                                                                      \
                css += d * d;                                                                    \
                sub[0][BIN_OF(v)]++;                                                             \
                if (w->lut != NULL) WANT_ONE(T, tv, KEY_##T(tv));                                \
            }                                                                                    \
        }                                                                                        \
        for (int k = 0; k < BINS; k++) hist[k] += sub[0][k] + sub[1][k] + sub[2][k] + sub[3][k]; \
        *shift_out = shift;                                                                      \
        *css_out = css;                                                                          \
    }

DEFINE_PASS2(pass2_f32, float, f32_bins ? bin_of_f32(v, lo32, scale32) : bin_of((double)v, lo, scale))
DEFINE_PASS2(pass2_f64, double, bin_of((double)v, lo, scale))

/* The values buffer must hold exactly `n` values of the stated width. */
static int check_values(const Py_buffer *buf, Py_ssize_t n, int is_double) {
    Py_ssize_t itemsize = is_double ? (Py_ssize_t)sizeof(double) : (Py_ssize_t)sizeof(float);
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "negative count");
        return 0;
    }
    if (n > PY_SSIZE_T_MAX / itemsize || buf->len != n * itemsize) {
        PyErr_Format(PyExc_ValueError, "the values buffer has %zd bytes, not %zd values of %zd bytes", buf->len,
                     n, itemsize);
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

static PyObject *kernel_pass1(PyObject *self, PyObject *args) {
    Py_buffer values, keys;
    Py_ssize_t n;
    int is_double;
    if (!PyArg_ParseTuple(args, "y*npw*", &values, &n, &is_double, &keys))
        return NULL;
    if (!check_values(&values, n, is_double) || !check_counts(&keys, KEY_BINS, "keys")) {
        PyBuffer_Release(&values);
        PyBuffer_Release(&keys);
        return NULL;
    }
    pass1_result r;
    Py_BEGIN_ALLOW_THREADS
    if (is_double)
        pass1_f64((const unsigned char *)values.buf, n, &r, (int64_t *)keys.buf);
    else
        pass1_f32((const unsigned char *)values.buf, n, &r, (int64_t *)keys.buf);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&values);
    PyBuffer_Release(&keys);
    return Py_BuildValue("LdddLLL", (long long)r.finite, r.sum, r.lo, r.hi, (long long)r.nonzero,
                         (long long)r.nan, (long long)r.inf);
}

static PyObject *kernel_pass2(PyObject *self, PyObject *args) {
    Py_buffer values, hist, lut, out, sub;
    Py_ssize_t n, collected;
    int is_double, dirty;
    double mean, lo, scale, shift, css;
    if (!PyArg_ParseTuple(args, "y*nppdddw*y*w*nw*", &values, &n, &is_double, &dirty, &mean, &lo, &scale, &hist,
                          &lut, &out, &collected, &sub))
        return NULL;
    Py_ssize_t itemsize = is_double ? (Py_ssize_t)sizeof(double) : (Py_ssize_t)sizeof(float);
    int ok = check_values(&values, n, is_double) && check_counts(&hist, BINS, "histogram");
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
    Py_BEGIN_ALLOW_THREADS
    if (is_double)
        pass2_f64((const unsigned char *)values.buf, n, dirty, mean, lo, scale, (int64_t *)hist.buf, &shift, &css, &w);
    else
        pass2_f32((const unsigned char *)values.buf, n, dirty, mean, lo, scale, (int64_t *)hist.buf, &shift, &css, &w);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&values);
    PyBuffer_Release(&hist);
    PyBuffer_Release(&lut);
    PyBuffer_Release(&out);
    PyBuffer_Release(&sub);
    return Py_BuildValue("ddn", shift, css, w.count);
}

static PyMethodDef methods[] = {
    {"pass1", kernel_pass1, METH_VARARGS, "Sum, min, max, non-zero, NaN and Inf counts and key bins of a chunk."},
    {"pass2", kernel_pass2, METH_VARARGS, "Centred sums, the 64-bin histogram and the wanted key bins of a chunk."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernel", NULL, -1, methods};

#ifndef CKPTSCOPE_KERNEL_SOURCE_SHA256
#define CKPTSCOPE_KERNEL_SOURCE_SHA256 "unknown"
#endif

PyMODINIT_FUNC PyInit__kernel(void) {
    PyObject *m = PyModule_Create(&module);
    /* setup.py compiles in the sha256 of this file: the loader compares it with the source beside
     * an editable install, so a kernel built from an older _kernel.c is never used. */
    if (m != NULL && PyModule_AddStringConstant(m, "SOURCE_SHA256", CKPTSCOPE_KERNEL_SOURCE_SHA256) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
