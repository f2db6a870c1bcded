/* Products of float32 rows with weights kept as a GGUF file's blocks: 32 weights of one output
 * sharing a scale d and an offset m, each weight d*u + m with u a 4-bit (Q4_0, Q4_1) or 8-bit
 * (Q8_0) unsigned integer. See block_weights.py for why personas carries its own kernel.
 *
 * A row is split per block of 32 values into two int8 planes, x ~= s * (hi + lo / 256) with
 * s = max|x| / 127, so the integer products run on AVX-512 VNNI (vpdpbusd: unsigned bytes times
 * signed bytes, four at a time into int32) while the row keeps about 16 bits of precision: each
 * value within max|x| / 65024 of its block. The offset's part, m * sum(x), uses the row's exact
 * float32 sum. Every output of every row is computed by the same instructions in the same order
 * whatever the other rows are, so a row's product does not depend on its batch.
 *
 * Weight layout, made by block_weights.PackedBlocks.of: outputs in groups of 16; per group and
 * block, 8 steps of 4 inputs, each step 64 bytes (16 outputs x 4 inputs, byte 4*o+j = input
 * 4*step+j of output o). 4-bit weights put two steps in one 64-byte chunk: step 2i in the low
 * nibbles, step 2i+1 in the high ones. d and m: float16 [group][block][16 outputs] (m may be
 * left out: offsets()).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

/* One block of 32 values of each row: the two planes, s / 256, and the exact sum. */
void quantize_rows(const float *x, int rows, int width, int8_t *hi, int8_t *lo, float *scales, float *sums) {
    int blocks = width / 32;
    #pragma omp parallel for schedule(static) if (rows * width >= 65536)
    for (int r = 0; r < rows; r++) {
        for (int b = 0; b < blocks; b++) {
            const float *v = x + (size_t)r * width + b * 32;
            float amax = 0.f, sum = 0.f;
            for (int i = 0; i < 32; i++) {
                float a = fabsf(v[i]);
                amax = a > amax ? a : amax;
                sum += v[i];
            }
            float s = amax / 127.f, inverse = amax > 0.f ? 127.f / amax : 0.f;
            int8_t *h = hi + (size_t)r * width + b * 32, *l = lo + (size_t)r * width + b * 32;
            for (int i = 0; i < 32; i++) {
                float q = nearbyintf(v[i] * inverse);
                float rest = nearbyintf((v[i] - q * s) * inverse * 256.f);
                rest = rest > 127.f ? 127.f : (rest < -127.f ? -127.f : rest);
                h[i] = (int8_t)q;
                l[i] = (int8_t)rest;
            }
            scales[(size_t)r * blocks + b] = s / 256.f;
            sums[(size_t)r * blocks + b] = sum;
        }
    }
}

static inline void load_block(const uint8_t *chunk, int bits, __m512i *w) {
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    if (bits == 4) {
        for (int i = 0; i < 4; i++) {
            __m512i v = _mm512_loadu_si512((const void *)(chunk + 64 * i));
            w[2 * i] = _mm512_and_si512(v, low4);
            w[2 * i + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
        }
    } else {
        for (int i = 0; i < 8; i++) w[i] = _mm512_loadu_si512((const void *)(chunk + 64 * i));
    }
}

/* One block of one row against 16 outputs, added to acc. Four independent integer sums keep
 * the multiply-adds from waiting on each other; integers add exactly, so their order is moot. */
static inline __m512i four_bytes(const int8_t *p) { /* memcpy: no int32 pointer into int8 data */
    int32_t v;
    memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
}

static inline __m512 row_block(const __m512i *w, const int8_t *hi, const int8_t *lo, __m512 d, __m512 m,
                               float scale, float sum, __m512 acc) {
    __m512i h0 = _mm512_setzero_si512(), h1 = _mm512_setzero_si512();
    __m512i l0 = _mm512_setzero_si512(), l1 = _mm512_setzero_si512();
    for (int i = 0; i < 4; i++) {
        h0 = _mm512_dpbusd_epi32(h0, w[i], four_bytes(hi + 4 * i));
        h1 = _mm512_dpbusd_epi32(h1, w[i + 4], four_bytes(hi + 4 * i + 16));
        l0 = _mm512_dpbusd_epi32(l0, w[i], four_bytes(lo + 4 * i));
        l1 = _mm512_dpbusd_epi32(l1, w[i + 4], four_bytes(lo + 4 * i + 16));
    }
    /* |hi sum| <= 32 * 255 * 127, times 256: within int32. */
    __m512i total = _mm512_add_epi32(_mm512_slli_epi32(_mm512_add_epi32(h0, h1), 8), _mm512_add_epi32(l0, l1));
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(total), _mm512_mul_ps(d, _mm512_set1_ps(scale)), acc);
    return _mm512_fmadd_ps(m, _mm512_set1_ps(sum), acc);
}

#define ROW_TILE 8 /* rows sharing one unpacking of a block's weights */

/* A few rows' product is bound by reading the weights, and with the hardware prefetcher alone
 * the loads wait: asking for the weights 4 KB ahead (and their scales and offsets) brings a
 * one-row product close to the machine's read bandwidth (docs/performance.md). */
#define PREFETCH_BYTES 4096

static inline void prefetch_block(const uint8_t *chunk, size_t chunk_bytes, const uint16_t *d, const uint16_t *m) {
    for (size_t c = 0; c < chunk_bytes; c += 64) _mm_prefetch((const char *)(chunk + PREFETCH_BYTES + c), _MM_HINT_T0);
    size_t ahead = PREFETCH_BYTES / chunk_bytes * 16; /* the scales and offsets of that block */
    _mm_prefetch((const char *)(d + ahead), _MM_HINT_T0);
    if (m) _mm_prefetch((const char *)(m + ahead), _MM_HINT_T0);
}

/* A block's 16 offsets: read, or, for symmetric blocks (m == NULL: Q4_0's w = d(u - 8), Q8_0's
 * w = d(u - 128)), -2^(bits-1) d, exactly the float16 offset they would have stored. */
static inline __m512 offsets(const uint16_t *m, __m512 d, int bits) {
    if (m) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)m));
    return _mm512_mul_ps(d, _mm512_set1_ps(bits == 4 ? -8.f : -128.f));
}

/* y = x W^T + bias for `rows` rows of x; `planes` (2 * rows * width bytes) and `per_block`
 * (2 * rows * width / 32 floats) are scratch for the rows' quantized form. `m` NULL: the blocks
 * are symmetric (offsets()), and a product reads only the weights and their scales. */
void block_linear(const uint8_t *weights, const uint16_t *d, const uint16_t *m, int bits, int outputs,
                  int width, const float *bias, const float *x, int rows, int8_t *planes, float *per_block,
                  float *y) {
    int blocks = width / 32, groups = outputs / 16;
    int8_t *hi = planes, *lo = planes + (size_t)rows * width;
    float *scales = per_block, *sums = per_block + (size_t)rows * blocks;
    quantize_rows(x, rows, width, hi, lo, scales, sums);
    size_t chunk_bytes = bits == 4 ? 256 : 512;
    /* Guided, not static: the threads take groups as they free up, so one that runs slower (a busy
     * core, a shared virtual CPU) no longer leaves the other waiting with work it could have
     * taken (docs/performance.md). A group's outputs come from one thread whichever it is: the
     * result is the same either way. */
    #pragma omp parallel for schedule(guided)
    for (int g = 0; g < groups; g++) {
        const uint8_t *wg = weights + (size_t)g * blocks * chunk_bytes;
        const uint16_t *dg = d + (size_t)g * blocks * 16, *mg = m ? m + (size_t)g * blocks * 16 : NULL;
        __m512 start = bias ? _mm512_loadu_ps(bias + g * 16) : _mm512_setzero_ps();
        int r0 = 0;
        for (; r0 + ROW_TILE <= rows; r0 += ROW_TILE) {
            __m512 acc[ROW_TILE];
            for (int t = 0; t < ROW_TILE; t++) acc[t] = start;
            for (int b = 0; b < blocks; b++) {
                __m512i w[8];
                prefetch_block(wg + b * chunk_bytes, chunk_bytes, dg + b * 16, mg ? mg + b * 16 : NULL);
                load_block(wg + b * chunk_bytes, bits, w);
                __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(dg + b * 16)));
                __m512 mv = offsets(mg ? mg + b * 16 : NULL, dv, bits);
                #pragma GCC unroll 8
                for (int t = 0; t < ROW_TILE; t++) {
                    size_t r = (size_t)(r0 + t);
                    acc[t] = row_block(w, hi + r * width + b * 32, lo + r * width + b * 32, dv, mv,
                                       scales[r * blocks + b], sums[r * blocks + b], acc[t]);
                }
            }
            for (int t = 0; t < ROW_TILE; t++) _mm512_storeu_ps(y + (size_t)(r0 + t) * outputs + g * 16, acc[t]);
        }
        for (; r0 < rows; r0++) { /* the same arithmetic per row, one row at a time */
            size_t r = (size_t)r0;
            __m512 acc = start;
            for (int b = 0; b < blocks; b++) {
                __m512i w[8];
                prefetch_block(wg + b * chunk_bytes, chunk_bytes, dg + b * 16, mg ? mg + b * 16 : NULL);
                load_block(wg + b * chunk_bytes, bits, w);
                __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(dg + b * 16)));
                __m512 mv = offsets(mg ? mg + b * 16 : NULL, dv, bits);
                acc = row_block(w, hi + r * width + b * 32, lo + r * width + b * 32, dv, mv,
                                scales[r * blocks + b], sums[r * blocks + b], acc);
            }
            _mm512_storeu_ps(y + r * outputs + g * 16, acc);
        }
    }
}
