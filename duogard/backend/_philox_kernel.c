/* The portable generator's host kernel: Philox-4x32-10 draws, as specified in
 * duogard/backend/_philox.py (the NumPy reference), in one C loop per key.
 *
 * A small draw in NumPy is ~100 whole-array operations (ten rounds, Box-Muller, the
 * bookkeeping of many keys), each with a few microseconds of per-call overhead: a model's
 * tangents (a few thousand numbers per leaf) cost ~0.5 ms that way, against a few
 * microseconds for the framework's own generator. This file computes the same numbers in one
 * call: words, uniform numbers and signs bit for bit equal to the reference, normal numbers
 * equal to float rounding (log, cos and sin are the C library's, NumPy's differ in the last
 * bit). It is built as an optional extension when the package is installed; without it, the
 * backends draw with the NumPy reference (see _philox_host.py).
 *
 * The module has no Python functions: _philox_host.py loads the shared object with ctypes and
 * calls duogard_philox_draw.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <string.h>

#define M0 0xD2511F53u
#define M1 0xCD9E8D57u
#define W0 0x9E3779B9u
#define W1 0xBB67AE85u
#define ROUNDS 10

enum { KIND_WORDS = 0, KIND_UNIFORM = 1, KIND_NORMAL = 2, KIND_SIGNS = 3 };

/* Philox-4x32-10 of the counter c (four words, replaced by the output) under the key (k0, k1).
 * blocks_chunk below runs the same rounds with the counters in the inner loop, so they vectorise. */
static inline void philox(uint32_t c[4], uint32_t k0, uint32_t k1) {
    uint32_t c0 = c[0], c1 = c[1], c2 = c[2], c3 = c[3];
    for (int r = 0; r < ROUNDS; r++) {
        uint64_t p0 = (uint64_t)c0 * M0, p1 = (uint64_t)c2 * M1;
        uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0;
        uint32_t n2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1;
        c0 = n0;
        c1 = (uint32_t)p1;
        c2 = n2;
        c3 = (uint32_t)p0;
        k0 += W0;
        k1 += W1;
    }
    c[0] = c0;
    c[1] = c1;
    c[2] = c2;
    c[3] = c3;
}

/* The block of the counter (c, 0, 0, 0): the words of a key's stream. */
static inline void block(uint32_t c, uint32_t k0, uint32_t k1, uint32_t out[4]) {
    out[0] = c;
    out[1] = out[2] = out[3] = 0;
    philox(out, k0, k1);
}

static inline uint32_t bits_of(float x) {
    uint32_t i;
    memcpy(&i, &x, 4);
    return i;
}

static inline float float_of(uint32_t i) {
    float x;
    memcpy(&x, &i, 4);
    return x;
}

/* u = (2 (w >> 9) + 1) / 2**24: exact in float32 and float64. */
static inline float unit_f(uint32_t w) { return ((float)(w >> 9) * 2.0f + 1.0f) * 0x1p-24f; }
static inline double unit_d(uint32_t w) { return ((double)(w >> 9) * 2.0 + 1.0) * 0x1p-24; }

/* float32 log of u in (0, 1], without the C library: u = m 2**e with m in [sqrt(1/2), sqrt(2)),
 * log u = e log 2 + 2 atanh(s), s = (m - 1) / (m + 1) (|s| < 0.172, the series to s**11 is
 * exact to float32). Branch-free, so a loop of it vectorises; within a few ulp of logf. */
static inline float log_f(float u) {
    uint32_t i = bits_of(u);
    int32_t e = (int32_t)(i >> 23) - 127;
    float m = float_of((i & 0x007FFFFFu) | 0x3F800000u); /* in [1, 2) */
    int32_t big = m > 1.41421356f;                      /* then m / 2, e + 1 */
    m = float_of(bits_of(m) - ((uint32_t)big << 23));
    e += big;
    float s = (m - 1.0f) / (m + 1.0f), s2 = s * s;
    float p = 1.0f / 11.0f;
    p = p * s2 + 1.0f / 9.0f;
    p = p * s2 + 1.0f / 7.0f;
    p = p * s2 + 1.0f / 5.0f;
    p = p * s2 + 1.0f / 3.0f;
    float logm = 2.0f * s + 2.0f * s * s2 * p;
    /* e log 2 in two parts: the first has few bits, so e times it is exact */
    return (float)e * 0.693145752f + ((float)e * 1.42860677e-6f + logm);
}

/* cos t and sin t of a float32 t in [0, 2 pi], without the C library: t minus the nearest
 * multiple k of pi/2 (pi/2 in three parts, Cody and Waite), Taylor polynomials on
 * [-pi/4, pi/4], then the quadrant k mod 4 (odd quadrants swap cos and sin, and the signs
 * follow). Branch-free; within a few ulp of cosf and sinf. */
static inline void sincos_f(float t, float *c, float *s) {
    float kf = (float)(int32_t)(t * 0.636619772f + 0.5f);
    int32_t k = (int32_t)kf & 3;
    float r = ((t - kf * 1.5703125f) - kf * 4.83751297e-4f) - kf * 7.54978995e-8f, r2 = r * r;
    float sp = -1.0f / 39916800.0f, cp = 1.0f / 479001600.0f;
    sp = sp * r2 + 1.0f / 362880.0f;
    sp = sp * r2 - 1.0f / 5040.0f;
    sp = sp * r2 + 1.0f / 120.0f;
    sp = sp * r2 - 1.0f / 6.0f;
    cp = cp * r2 - 1.0f / 3628800.0f;
    cp = cp * r2 + 1.0f / 40320.0f;
    cp = cp * r2 - 1.0f / 720.0f;
    cp = cp * r2 + 1.0f / 24.0f;
    cp = cp * r2 - 0.5f;
    uint32_t sr = bits_of(r + r * r2 * sp), cr = bits_of(1.0f + r2 * cp);
    uint32_t odd = 0u - (uint32_t)(k & 1); /* all ones in odd quadrants: cos and sin swap */
    *c = float_of(((sr & odd) | (cr & ~odd)) ^ ((uint32_t)((k + 1) >> 1) & 1u) << 31); /* - for k = 1, 2 */
    *s = float_of(((cr & odd) | (sr & ~odd)) ^ ((uint32_t)(k >> 1) << 31));            /* - for k = 2, 3 */
}

#define CHUNK 64 /* blocks per pass: a chunk's words and numbers stay in the L1 cache */

/* Philox-4x32-10 of the counters (b0 + i, 0, 0, 0), i < CHUNK, into w[0..3][i]: the rounds
 * outside, the counters inside, so the compiler vectorises the inner loops. */
static void blocks_chunk(uint32_t b0, uint32_t k0, uint32_t k1, uint32_t w[4][CHUNK]) {
    uint32_t *c0 = w[0], *c1 = w[1], *c2 = w[2], *c3 = w[3];
    for (int i = 0; i < CHUNK; i++) {
        c0[i] = b0 + (uint32_t)i;
        c1[i] = c2[i] = c3[i] = 0;
    }
    for (int r = 0; r < ROUNDS; r++) {
        for (int i = 0; i < CHUNK; i++) {
            uint64_t p0 = (uint64_t)c0[i] * M0, p1 = (uint64_t)c2[i] * M1;
            uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1[i] ^ k0;
            uint32_t n2 = (uint32_t)(p0 >> 32) ^ c3[i] ^ k1;
            c0[i] = n0;
            c1[i] = (uint32_t)p1;
            c2[i] = n2;
            c3[i] = (uint32_t)p0;
        }
        k0 += W0;
        k1 += W1;
    }
}

/* The first n words of the key's stream (words), or their uniform numbers in float32
 * (uniform_f) or float64 (uniform_d): word j is word j % 4 of block j / 4. */
#define WORDWISE(NAME, T, OF)                                                               \
    static void NAME(uint32_t k0, uint32_t k1, int64_t n, T *out) {                         \
        uint32_t w[4][CHUNK];                                                               \
        int64_t blocks = (n + 3) / 4;                                                       \
        for (int64_t b0 = 0; b0 < blocks; b0 += CHUNK) {                                    \
            blocks_chunk((uint32_t)b0, k0, k1, w);                                          \
            int64_t at = 4 * b0, m = n - at < 4 * CHUNK ? n - at : 4 * CHUNK;               \
            for (int64_t j = 0; j < m; j++) out[at + j] = OF(w[j & 3][j >> 2]);             \
        }                                                                                   \
    }
#define AS_WORD(x) (x)
WORDWISE(words, uint32_t, AS_WORD)
WORDWISE(uniform_f, float, unit_f)
WORDWISE(uniform_d, double, unit_d)

/* Box-Muller on word pairs (2p, 2p + 1): r = sqrt(-2 log u), t = 2 pi u', numbers r cos t and
 * r sin t, in the working precision; a block of four words gives four numbers. The float32
 * path works a chunk of blocks at a time, in loops the compiler vectorises. */
static void normal_f(uint32_t k0, uint32_t k1, int64_t n, float *out) {
    const float two_pi = (float)(2.0 * 3.14159265358979323846);
    uint32_t w[4][CHUNK];
    float z[4][CHUNK], zz[4 * CHUNK];
    int64_t blocks = (n + 3) / 4;
    for (int64_t b0 = 0; b0 < blocks; b0 += CHUNK) {
        blocks_chunk((uint32_t)b0, k0, k1, w);
        for (int q = 0; q < 2; q++) {
            for (int i = 0; i < CHUNK; i++) {
                float r = sqrtf(-2.0f * log_f(unit_f(w[2 * q][i])));
                float c, s;
                sincos_f(two_pi * unit_f(w[2 * q + 1][i]), &c, &s);
                z[2 * q][i] = r * c;
                z[2 * q + 1][i] = r * s;
            }
        }
        for (int i = 0; i < CHUNK; i++)
            for (int j = 0; j < 4; j++) zz[4 * i + j] = z[j][i];
        int64_t at = 4 * b0, m = n - at < 4 * CHUNK ? n - at : 4 * CHUNK;
        memcpy(out + at, zz, (size_t)m * sizeof(float));
    }
}

static void normal_d(uint32_t k0, uint32_t k1, int64_t n, double *out) {
    const double two_pi = 2.0 * 3.14159265358979323846;
    uint32_t b[4];
    double z[4];
    for (int64_t i = 0; i < n; i += 4) {
        block((uint32_t)(i / 4), k0, k1, b);
        for (int q = 0; q < 2; q++) {
            double r = sqrt(-2.0 * log(unit_d(b[2 * q])));
            double t = two_pi * unit_d(b[2 * q + 1]);
            z[2 * q] = r * cos(t);
            z[2 * q + 1] = r * sin(t);
        }
        for (int j = 0; j < 4 && i + j < n; j++) out[i + j] = z[j];
    }
}

/* Sign j is +1 where bit j % 32 of word j / 32 is set, -1 where it is clear: 128 signs a block. */
#define SIGNS(NAME, T)                                                                       \
    static void NAME(uint32_t k0, uint32_t k1, int64_t n, T *out) {                          \
        uint32_t w[4][CHUNK];                                                                \
        int64_t blocks = (n + 127) / 128;                                                    \
        for (int64_t b0 = 0; b0 < blocks; b0 += CHUNK) {                                     \
            blocks_chunk((uint32_t)b0, k0, k1, w);                                           \
            int nb = blocks - b0 < CHUNK ? (int)(blocks - b0) : CHUNK;                       \
            for (int i = 0; i < nb; i++) {                                                   \
                for (int q = 0; q < 4; q++) {                                                \
                    int64_t at = 128 * (b0 + i) + 32 * q;                                    \
                    int m = n - at >= 32 ? 32 : (n - at > 0 ? (int)(n - at) : 0);            \
                    uint32_t word = w[q][i];                                                 \
                    if (m == 32) {                                                           \
                        for (int b = 0; b < 32; b++)                                         \
                            out[at + b] = (T)(int32_t)(((word >> b) & 1u) * 2u) - (T)1;      \
                    } else {                                                                 \
                        for (int b = 0; b < m; b++)                                          \
                            out[at + b] = (T)(int32_t)(((word >> b) & 1u) * 2u) - (T)1;      \
                    }                                                                        \
                }                                                                            \
            }                                                                                \
        }                                                                                    \
    }
SIGNS(signs_f, float)
SIGNS(signs_d, double)

/* kind(keys[j], counts[j]) for every j, concatenated into out: words as uint32, the other
 * kinds as float32 (f64 == 0) or float64 (f64 == 1). keys is (nkeys, 2) uint32, (hi, lo)
 * words in the reference's order. Returns 0, or -1 for an unknown kind. */
int duogard_philox_draw(int kind, int f64, const uint32_t *keys, const int64_t *counts, int64_t nkeys,
                        void *out) {
    char *at = (char *)out;
    size_t item = kind == KIND_WORDS ? sizeof(uint32_t) : (f64 ? sizeof(double) : sizeof(float));
    for (int64_t j = 0; j < nkeys; j++) {
        uint32_t k0 = keys[2 * j], k1 = keys[2 * j + 1];
        int64_t n = counts[j];
        switch (kind) {
        case KIND_WORDS:
            words(k0, k1, n, (uint32_t *)at);
            break;
        case KIND_UNIFORM:
            f64 ? uniform_d(k0, k1, n, (double *)at) : uniform_f(k0, k1, n, (float *)at);
            break;
        case KIND_NORMAL:
            f64 ? normal_d(k0, k1, n, (double *)at) : normal_f(k0, k1, n, (float *)at);
            break;
        case KIND_SIGNS:
            f64 ? signs_d(k0, k1, n, (double *)at) : signs_f(k0, k1, n, (float *)at);
            break;
        default:
            return -1;
        }
        at += (size_t)n * item;
    }
    return 0;
}

/* fold_in(key, data[j]) for every j: the first two words of philox(key, (lo, hi, 0, 2)) with
 * (hi, lo) the words of data[j], written as int64 pairs (the torch backend's key layout). */
void duogard_philox_fold_in(uint32_t k0, uint32_t k1, const uint64_t *data, int64_t n, int64_t *out) {
    for (int64_t j = 0; j < n; j++) {
        uint32_t c[4] = {(uint32_t)data[j], (uint32_t)(data[j] >> 32), 0, 2};
        philox(c, k0, k1);
        out[2 * j] = c[0];
        out[2 * j + 1] = c[1];
    }
}

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_philox_kernel",
                                    "duogard's Philox host kernel (called through ctypes).", -1, NULL};

PyMODINIT_FUNC PyInit__philox_kernel(void) { return PyModule_Create(&module); }
