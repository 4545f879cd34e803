/* The stats engine's two fused passes over one contiguous chunk of float32 or float64 values.
 *
 * pass1(values, count, is_double) -> (finite, sum, lo, hi, nonzero, nan, inf)
 * pass2(values, count, is_double, dirty, mean, lo, scale, hist) -> (shift, css)
 *
 * `values` is any buffer (buffer protocol) holding exactly `count` float32 (or float64) values;
 * `hist` a writable buffer of exactly 64 int64 counts. Lengths are checked before any value is
 * read, so a wrong call raises and never reads or writes outside the buffers.
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
    FAST static void NAME(const unsigned char *x, Py_ssize_t n, pass1_result *r) {                   \
        double sum = 0.0;                                                                       \
        T lo = (T)INFINITY, hi = (T)-INFINITY;                                                  \
        int64_t nonzero = 0;                                                                    \
        _Pragma("omp simd reduction(+ : sum, nonzero) reduction(min : lo) reduction(max : hi)") \
        for (Py_ssize_t i = 0; i < n; i++) {                                                    \
            T v = LOAD(T, x, i);                                                                \
            sum += (double)v;                                                                   \
            lo = v < lo ? v : lo;                                                               \
            hi = v > hi ? v : hi;                                                               \
            nonzero += (v != (T)0);                                                             \
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

#define DEFINE_PASS2(NAME, T, FAST_BIN)                                                          \
    FAST static void NAME(const unsigned char *x, Py_ssize_t n, int dirty, double mean, double lo,   \
                          double scale,                                                          \
                     int64_t *hist, double *shift_out, double *css_out) {                        \
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
            }                                                                                    \
        } else {                                                                                 \
            for (Py_ssize_t i = 0; i < n; i++) {                                                 \
                double v = (double)LOAD(T, x, i);                                                \
                if (!isfinite(v)) continue;                                                      \
                double d = v - mean;                                                             \
                shift += d;                                                                      \
                css += d * d;                                                                    \
                sub[0][BIN_OF(v)]++;                                                             \
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

static PyObject *kernel_pass1(PyObject *self, PyObject *args) {
    Py_buffer values;
    Py_ssize_t n;
    int is_double;
    if (!PyArg_ParseTuple(args, "y*np", &values, &n, &is_double))
        return NULL;
    if (!check_values(&values, n, is_double)) {
        PyBuffer_Release(&values);
        return NULL;
    }
    pass1_result r;
    Py_BEGIN_ALLOW_THREADS
    if (is_double)
        pass1_f64((const unsigned char *)values.buf, n, &r);
    else
        pass1_f32((const unsigned char *)values.buf, n, &r);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&values);
    return Py_BuildValue("LdddLLL", (long long)r.finite, r.sum, r.lo, r.hi, (long long)r.nonzero,
                         (long long)r.nan, (long long)r.inf);
}

static PyObject *kernel_pass2(PyObject *self, PyObject *args) {
    Py_buffer values, hist;
    Py_ssize_t n;
    int is_double, dirty;
    double mean, lo, scale, shift, css;
    if (!PyArg_ParseTuple(args, "y*nppdddw*", &values, &n, &is_double, &dirty, &mean, &lo, &scale, &hist))
        return NULL;
    int ok = check_values(&values, n, is_double);
    if (ok && hist.len != (Py_ssize_t)(BINS * sizeof(int64_t))) {
        PyErr_Format(PyExc_ValueError, "the histogram buffer has %zd bytes, not %d int64 counts", hist.len, BINS);
        ok = 0;
    }
    if (ok && (uintptr_t)hist.buf % _Alignof(int64_t) != 0) {
        PyErr_SetString(PyExc_ValueError, "the histogram buffer is not aligned for int64 counts");
        ok = 0;
    }
    if (ok && (!(scale >= 0.0) || !isfinite(scale) || !isfinite(lo))) {
        PyErr_SetString(PyExc_ValueError, "bad scale or lower bound");
        ok = 0;
    }
    if (!ok) {
        PyBuffer_Release(&values);
        PyBuffer_Release(&hist);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    if (is_double)
        pass2_f64((const unsigned char *)values.buf, n, dirty, mean, lo, scale, (int64_t *)hist.buf, &shift, &css);
    else
        pass2_f32((const unsigned char *)values.buf, n, dirty, mean, lo, scale, (int64_t *)hist.buf, &shift, &css);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&values);
    PyBuffer_Release(&hist);
    return Py_BuildValue("dd", shift, css);
}

static PyMethodDef methods[] = {
    {"pass1", kernel_pass1, METH_VARARGS, "Sum, min, max, non-zero, NaN and Inf counts of a chunk."},
    {"pass2", kernel_pass2, METH_VARARGS, "Centred sums and the 64-bin histogram of a chunk."},
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
