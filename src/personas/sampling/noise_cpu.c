/* chooser.counter_uniform on the CPU in one pass: the same integer hash of (row keys, token salt)
 * and the same 53-bit uniform, bit for bit, where torch makes it in ~20 passes over int64 tensors
 * (see noise_cpu.py). Every value is a pure function of its row's keys and its token's salt. */
#include <stdint.h>

static inline uint32_t mix32(uint32_t x) { /* chooser.mix32: products modulo 2**32 */
    x ^= x >> 16;
    x *= 0x21F0AAADu;
    x ^= x >> 15;
    x *= 0x735A2D97u;
    return x ^ (x >> 15);
}

/* u[r][t] for `rows` rows (their two keys, each below 2**32) and `tokens` salts (below 2**32). */
void counter_uniform(const int64_t *first, const int64_t *second, int rows, const int64_t *salts, int tokens,
                     double *u) {
    #pragma omp parallel for schedule(static) if ((int64_t)rows * tokens >= 262144)
    for (int r = 0; r < rows; r++) {
        uint32_t key = (uint32_t)first[r], other = (uint32_t)second[r];
        double *out = u + (int64_t)r * tokens;
        for (int t = 0; t < tokens; t++) {
            uint32_t high = mix32(key ^ (uint32_t)salts[t]);
            uint32_t low = ((high ^ other) * 0x2C1B3C6Du) >> 12;
            int64_t k = ((int64_t)high << 21) | ((int64_t)low << 1) | 1; /* odd, below 2**53: exact as a double */
            out[t] = (double)k * 0x1p-53;
        }
    }
}
