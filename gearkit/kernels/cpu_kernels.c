/* Products with bit-packed codes on the CPU: each row of codes is unpacked into a small buffer that stays in L1
 * cache and multiplied at once, so no float copy of a block of codes is ever written to memory.
 *
 * Codes follow gearkit.kernels.reference.pack_bits: a row of n codes (n a multiple of 8) is n/8 blocks of `bits`
 * bytes, code j of a block at bit j * bits of the block read as a little-endian integer. Every array is dense
 * (row-major). Built and loaded by gearkit/kernels/cpu.py; the torch reference is unpack_bits + matmul. */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef float f32x8 __attribute__((vector_size(32)));

#define MR 8 /* output rows a pass keeps in registers */

/* The 8 codes of one block as floats, or the levels of a codebook they index (`levels` non-null): the block's word
 * shifted by eight lanes at once. */
static inline __attribute__((always_inline)) f32x8 unpack8(const uint8_t *src, const int bits, const float *levels) {
    i32x8 code;
    if (bits == 8) {
        code = (i32x8){src[0], src[1], src[2], src[3], src[4], src[5], src[6], src[7]};
    } else {
        const u32x8 shift = {0, bits, 2 * bits, 3 * bits, 4 * bits, 5 * bits, 6 * bits, 7 * bits};
        uint32_t word = 0;
        if (bits == 3) /* three bytes: a 4-byte load could read past the end of the codes */
            word = src[0] | (uint32_t)src[1] << 8 | (uint32_t)src[2] << 16;
        else /* 1, 2 or 4 bytes; the host is little-endian */
            memcpy(&word, src, bits);
        code = (i32x8)((((u32x8){} + word) >> shift) & ((1u << bits) - 1));
    }
    if (levels)
        return (f32x8){levels[code[0]], levels[code[1]], levels[code[2]], levels[code[3]],
                       levels[code[4]], levels[code[5]], levels[code[6]], levels[code[7]]};
    return __builtin_convertvector(code, f32x8);
}

static inline f32x8 load8(const float *p) {
    f32x8 v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* A stored scale or zero: fp32, or fp16 widened by hand (no compiler extension needed); no zeros read as 0. */
static inline float param(const void *p, int64_t i, int half) {
    if (!p) return 0.0f;
    if (!half) return ((const float *)p)[i];
    const uint32_t h = ((const uint16_t *)p)[i], sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    uint32_t bits;
    if (exp == 0x1f) bits = sign | 0x7f800000u | man << 13; /* inf, nan */
    else if (exp) bits = sign | (exp + 112) << 23 | man << 13;
    else if (!man) bits = sign;
    else { /* subnormal: normalise */
        int shift = 0;
        uint32_t m = man;
        while (!(m & 0x400)) m <<= 1, shift++;
        bits = sign | (uint32_t)(113 - shift) << 23 | (m & 0x3ff) << 13;
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* `rows` (<= MR) output rows of one group, their accumulators in registers. Each row of codes has `ng` segments of
 * n / ng codes, each with its own scale and zero (segment `q` of row `r` at index r * ng + q).
 * Plain: out[i, j] = sum_r coef[q, r, i] C[r, j] + bias[q, i], q the segment of j (out rows of n).
 * Transposed: out[i, r] = sum_q scale[r, q] sum_{j in q} a[i, j] C[r, j] + zero[r, q] bias[q, i] (a rows of n,
 * out rows of k). */
static inline __attribute__((always_inline)) void rows_plain(const float *coef, const float *bias, const uint8_t *codes,
                                                             float *out, int64_t k, int64_t n, int64_t ng,
                                                             const int rows, const int bits, const float *levels) {
    const int64_t stride = n / 8 * bits, length = n / ng;
    for (int64_t j = 0; j < n; j += 8) {
        const float *c = coef + j / length * k * rows, *b = bias + j / length * rows;
        f32x8 acc[MR] = {};
        const uint8_t *src = codes + j / 8 * bits;
        for (int64_t r = 0; r < k; r++, src += stride) {
            const f32x8 v = unpack8(src, bits, levels);
            for (int i = 0; i < rows; i++) acc[i] += c[r * rows + i] * v;
        }
        for (int i = 0; i < rows; i++) {
            const f32x8 o = acc[i] + b[i];
            memcpy(out + i * n + j, &o, sizeof o);
        }
    }
}

static inline __attribute__((always_inline)) void rows_transposed(const float *a, const float *scale, const float *zero,
                                                                  const float *bias, const uint8_t *codes, float *out,
                                                                  int64_t k, int64_t n, int64_t ng, const int rows,
                                                                  const int bits, const float *levels) {
    const int64_t stride = n / 8 * bits, length = n / ng;
    for (int64_t r = 0; r < k; r++) {
        float total[MR] = {0};
        const uint8_t *src = codes + r * stride;
        for (int64_t q = 0; q < ng; q++) {
            f32x8 acc[MR] = {};
            for (int64_t j = q * length; j < (q + 1) * length; j += 8, src += bits) {
                const f32x8 v = unpack8(src, bits, levels);
                for (int i = 0; i < rows; i++) acc[i] += load8(a + i * n + j) * v;
            }
            for (int i = 0; i < rows; i++) {
                const f32x8 x = acc[i];
                total[i] += scale[r * ng + q] * (x[0] + x[1] + x[2] + x[3] + x[4] + x[5] + x[6] + x[7])
                            + zero[r * ng + q] * bias[q * rows + i];
            }
        }
        for (int i = 0; i < rows; i++) out[i * k + r] = total[i];
    }
}

/* out[g] = a @ W[g] (plain; a [a_groups, m, k], out [groups, m, n]) or a @ W[g]^T (transposed; a [a_groups, m, n],
 * out [groups, m, k]), segment q of row r of W[g] being scale[g, r, q] * C[g, r, q] + zero[g, r, q] (codes C
 * [groups, k rows of n], scale and zero [groups, k, ng]; C the level a code indexes with `levels`, zero 0 when
 * null); group g reads a[g % a_groups].
 * Scratch: ng * (k * (MR + 2) + MR) floats. */
static inline __attribute__((always_inline)) void dequant_matmul(
    const float *a, const uint8_t *codes, const void *scale, const void *zero, int half, float *out, float *scratch,
    int64_t a_groups, int64_t groups, int64_t m, int64_t k, int64_t n, int64_t ng, int transposed, const int bits,
    const float *levels) {
    float *coef = scratch, *s = coef + ng * k * MR, *z = s + k * ng, *bias = z + k * ng;
    const int64_t length = n / ng;
    for (int64_t g = 0; g < groups; g++) {
        const float *ag = a + (g % a_groups) * m * (transposed ? n : k);
        const uint8_t *cg = codes + g * k * (n / 8 * bits);
        float *og = out + g * m * (transposed ? k : n);
        for (int64_t e = 0; e < k * ng; e++) s[e] = param(scale, g * k * ng + e, half), z[e] = param(zero, g * k * ng + e, half);
        for (int64_t i0 = 0; i0 < m; i0 += MR) {
            const int rows = m - i0 < MR ? (int)(m - i0) : MR;
            const float *ai = ag + i0 * (transposed ? n : k);
            for (int64_t q = 0; q < ng; q++)
                for (int i = 0; i < rows; i++) { /* the zeros' share */
                    float sum = 0.0f;
                    if (transposed)
                        for (int64_t j = q * length; j < (q + 1) * length; j++) sum += ai[i * n + j];
                    else
                        for (int64_t r = 0; r < k; r++) sum += ai[i * k + r] * z[r * ng + q];
                    bias[q * rows + i] = sum;
                }
            if (!transposed)
                for (int64_t q = 0; q < ng; q++)
                    for (int64_t r = 0; r < k; r++)
                        for (int i = 0; i < rows; i++) coef[(q * k + r) * rows + i] = ai[i * k + r] * s[r * ng + q];
            switch (rows) { /* a copy per row count, so the accumulators stay in registers */
#define ROWS(R)                                                                                            \
    case R:                                                                                                \
        if (transposed) rows_transposed(ai, s, z, bias, cg, og + i0 * k, k, n, ng, R, bits, levels);       \
        else rows_plain(coef, bias, cg, og + i0 * n, k, n, ng, R, bits, levels);                           \
        break;
                ROWS(1) ROWS(2) ROWS(3) ROWS(4) ROWS(5) ROWS(6) ROWS(7) ROWS(8)
#undef ROWS
            }
        }
    }
}

/* The exported entry point: the code width (and codebook or not) picks a specialised copy. Single-threaded on
 * purpose: next to torch's own thread pool, splitting the groups over threads measured slower (its idle workers
 * spin on the cores). `zero` and `levels` may be null. Returns 0, or -1 for an unsupported width or a failed
 * allocation. */
int gearkit_dequant_matmul(const float *a, const uint8_t *codes, const void *scale, const void *zero, int half,
                           float *out, int64_t a_groups, int64_t groups, int64_t m, int64_t k, int64_t n,
                           int64_t ng, int transposed, int bits, const float *levels) {
    float *scratch = malloc(sizeof(float) * ng * (k * (MR + 2) + MR));
    if (!scratch) return -1;
    int status = 0;
    switch (bits) {
#define CASE(b)                                                                                              \
    case b:                                                                                                  \
        if (levels)                                                                                          \
            dequant_matmul(a, codes, scale, zero, half, out, scratch, a_groups, groups, m, k, n, ng, transposed, b, \
                           levels);                                                                          \
        else                                                                                                 \
            dequant_matmul(a, codes, scale, zero, half, out, scratch, a_groups, groups, m, k, n, ng, transposed, b, \
                           NULL);                                                                            \
        break;
        CASE(1) CASE(2) CASE(3) CASE(4) CASE(8)
#undef CASE
        default: status = -1;
    }
    free(scratch);
    return status;
}
