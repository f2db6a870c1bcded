/* A CPU pass's layers in one call: every layer of a Llama-family model whose projections are
 * GGUF blocks (model/block_kernel.c, compiled into the same library), for rows that each add one
 * token: a decode step's rows, or a prompt's positions as rows of their sequence (every row's k
 * and v are written before any row attends, so each reads the positions before it). See
 * cpu_layers.py for why this is C and what it replaces.
 *
 * Per layer and row, as the decoder's modules compute it (engine/decoder.py):
 *   x = RMSNorm(hidden); q, k, v = x Wqkv (+ bias); Qwen 3's per-head norms of q and k; rotary;
 *   k and v written at the row's position in its cache pages; softmax attention of each query
 *   head over the row's prefix span in the prefix pool and its own positions (one softmax over
 *   both: the same sum the decoder's two parts and their merge compute);
 *   hidden += attention Wo; x = RMSNorm(hidden); hidden += (SiLU(x Wgate) * x Wup) Wdown.
 * Rows never read each other's data, so a row's numbers do not depend on its batch.
 *
 * Layouts: hidden (rows, hidden); a product's output (rows, outputs rounded up to 16); cache
 * pages (pages, page, kv_heads, head_dim); the prefix pool (kv_heads, capacity, head_dim); a
 * page table (rows, table_width) of int32 page numbers; cos and sin (rows, head_dim).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

void block_linear(const uint8_t *weights, const uint16_t *d, const uint16_t *m, int bits, int outputs,
                  int width, const float *bias, const float *x, int rows, int8_t *planes, float *per_block,
                  float *y);

typedef struct {
    const uint8_t *weights;
    const uint16_t *d, *m; /* m NULL: symmetric blocks (block_kernel.c) */
    const float *bias; /* NULL: none */
    int bits, outputs, width; /* outputs: a multiple of 16, the padded ones zero */
} Product;

typedef struct {
    Product qkv, o, gate_up, down;
    const float *input_norm, *post_norm;
    const float *q_norm, *k_norm; /* Qwen 3's norms over each head of q and k; NULL elsewhere */
    float *cache_keys, *cache_values;
    const float *prefix_keys, *prefix_values; /* NULL when no row has a prefix */
} Layer;

typedef struct {
    int rows, hidden, intermediate, heads, kv_heads, head_dim;
    int page, table_width, prefix_capacity;
    float eps, scale;
    const float *cos, *sin;
    const int32_t *table;
    const int64_t *write_at; /* the row's new position in its own pages; it reads 0 ... write_at */
    const int32_t *prefix_starts, *prefix_lengths;
} Step;

/* Enough rows to be worth waking the other threads for the small per-row work. */
#define PARALLEL_ROWS 8

static inline float sum16(__m512 v) { return _mm512_reduce_add_ps(v); }

/* exp(x) for 16 floats: x = n ln2 + r with |r| <= ln2 / 2, exp(r) by Cephes' expf polynomial
 * (within about 2 ulp), times 2^n. Inputs are clamped to [-103, 88.38]: below, a value under
 * 2^-148 (a weight that counts for nothing); above, the largest float's neighbourhood. */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f)), _mm512_set1_ps(-103.f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    return _mm512_scalef_ps(p, n);
}

/* weight * (x / sqrt(mean(x^2) + eps)), as transformers' Llama RMSNorm; n a multiple of 16. */
static void rms_norm(const float *x, const float *weight, int n, float eps, float *out) {
    __m512 squares = _mm512_setzero_ps();
    for (int i = 0; i < n; i += 16) {
        __m512 v = _mm512_loadu_ps(x + i);
        squares = _mm512_fmadd_ps(v, v, squares);
    }
    float inverse = 1.f / sqrtf(sum16(squares) / (float)n + eps);
    __m512 scale = _mm512_set1_ps(inverse);
    for (int i = 0; i < n; i += 16)
        _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_loadu_ps(weight + i),
                                                _mm512_mul_ps(_mm512_loadu_ps(x + i), scale)));
}

/* transformers' rotate-half rotary embedding of one head, in place. */
static void rotate(float *x, const float *cos, const float *sin, int head_dim) {
    int half = head_dim / 2;
    for (int i = 0; i < half; i++) {
        float a = x[i], b = x[i + half];
        x[i] = a * cos[i] - b * sin[i];
        x[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

static inline float *own_position(float *cache, const Step *s, int row, int position, int kv_head) {
    int32_t page = s->table[(size_t)row * s->table_width + position / s->page];
    return cache + (((size_t)page * s->page + position % s->page) * s->kv_heads + kv_head) * s->head_dim;
}

/* q, k, v of one row out of its fused product: per-head norms, rotary, k and v into the cache. */
static void place_qkv(const Layer *l, const Step *s, int row, float *qkv) {
    int hd = s->head_dim, q_size = s->heads * hd, kv_size = s->kv_heads * hd;
    float *q = qkv, *k = qkv + q_size, *v = k + kv_size;
    const float *cos = s->cos + (size_t)row * hd, *sin = s->sin + (size_t)row * hd;
    for (int h = 0; h < s->heads; h++) {
        if (l->q_norm) rms_norm(q + h * hd, l->q_norm, hd, s->eps, q + h * hd);
        rotate(q + h * hd, cos, sin, hd);
    }
    for (int h = 0; h < s->kv_heads; h++) {
        if (l->k_norm) rms_norm(k + h * hd, l->k_norm, hd, s->eps, k + h * hd);
        rotate(k + h * hd, cos, sin, hd);
        int position = (int)s->write_at[row];
        memcpy(own_position(l->cache_keys, s, row, position, h), k + h * hd, hd * sizeof(float));
        memcpy(own_position(l->cache_values, s, row, position, h), v + h * hd, hd * sizeof(float));
    }
}

/* Scores of `group` query heads against one key. */
static inline void score_key(const float *q, const float *key, int group, int hd, float scale, float *scores,
                             int span, int at) {
    for (int h = 0; h < group; h++) {
        __m512 acc = _mm512_setzero_ps();
        for (int i = 0; i < hd; i += 16)
            acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + h * hd + i), _mm512_loadu_ps(key + i), acc);
        scores[(size_t)h * span + at] = sum16(acc) * scale;
    }
}

/* out (group, head_dim) = the weights (group, span) times the values, positions from `at`.
 * Each head's sums stay in registers over the positions (head_dim <= MAX_HEAD_DIM). */
#define MAX_HEAD_DIM 256
static void add_values(const float *weights, const float **values, int count, int group, int hd, int span,
                       int at, float *out) {
    for (int h = 0; h < group; h++) {
        __m512 acc[MAX_HEAD_DIM / 16];
        for (int i = 0; i < hd / 16; i++) acc[i] = _mm512_loadu_ps(out + h * hd + 16 * i);
        const float *w = weights + (size_t)h * span + at;
        for (int p = 0; p < count; p++) {
            __m512 weight = _mm512_set1_ps(w[p]);
            for (int i = 0; i < hd / 16; i++) acc[i] = _mm512_fmadd_ps(weight, _mm512_loadu_ps(values[p] + 16 * i), acc[i]);
        }
        for (int i = 0; i < hd / 16; i++) _mm512_storeu_ps(out + h * hd + 16 * i, acc[i]);
    }
}

/* Where the keys and values of positions from ... from + count - 1 of what a row attends to lie:
 * first its prefix span in the pool, then its own positions through its page table. */
#define CHUNK 64
static void locate(const Layer *l, const Step *s, int row, int g, int shared, int from, int count,
                   const float **keys, const float **values) {
    int hd = s->head_dim;
    for (int i = 0; i < count; i++) {
        int p = from + i;
        if (p < shared) {
            size_t at = ((size_t)g * s->prefix_capacity + s->prefix_starts[row] + p) * hd;
            keys[i] = l->prefix_keys + at;
            values[i] = l->prefix_values + at;
        } else {
            keys[i] = own_position(l->cache_keys, s, row, p - shared, g);
            values[i] = own_position(l->cache_values, s, row, p - shared, g);
        }
    }
}

/* Softmax attention of one row's query heads that read kv head g: out (group, head_dim). */
static void attend(const Layer *l, const Step *s, int row, int g, const float *q, float *scores, float *out) {
    int hd = s->head_dim, group = s->heads / s->kv_heads;
    int shared = l->prefix_keys ? s->prefix_lengths[row] : 0, span = shared + (int)s->write_at[row] + 1;
    const float *keys[CHUNK], *values[CHUNK];
    for (int from = 0; from < span; from += CHUNK) {
        int count = span - from < CHUNK ? span - from : CHUNK;
        locate(l, s, row, g, shared, from, count, keys, values);
        for (int i = 0; i < count; i++) score_key(q, keys[i], group, hd, s->scale, scores, span, from + i);
    }
    for (int h = 0; h < group; h++) { /* the scores become softmax weights */
        float *line = scores + (size_t)h * span;
        __m512 top = _mm512_set1_ps(-INFINITY);
        int i = 0;
        for (; i + 16 <= span; i += 16) top = _mm512_max_ps(top, _mm512_loadu_ps(line + i));
        float best = _mm512_reduce_max_ps(top);
        for (int t = i; t < span; t++) best = line[t] > best ? line[t] : best;
        __m512 total = _mm512_setzero_ps(), shift = _mm512_set1_ps(best);
        for (i = 0; i + 16 <= span; i += 16) {
            __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(line + i), shift));
            _mm512_storeu_ps(line + i, e);
            total = _mm512_add_ps(total, e);
        }
        if (i < span) {
            __mmask16 tail = (__mmask16)((1u << (span - i)) - 1);
            __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, line + i), shift));
            _mm512_mask_storeu_ps(line + i, tail, e);
            total = _mm512_add_ps(total, _mm512_maskz_mov_ps(tail, e));
        }
        float inverse = 1.f / sum16(total);
        for (int t = 0; t < span; t++) line[t] *= inverse;
    }
    memset(out, 0, (size_t)group * hd * sizeof(float));
    for (int from = 0; from < span; from += CHUNK) {
        int count = span - from < CHUNK ? span - from : CHUNK;
        locate(l, s, row, g, shared, from, count, keys, values);
        add_values(scores, values, count, group, hd, span, from, out);
    }
}

/* Where a step's intermediate values go: carved out of one allocation per call. */
typedef struct {
    float *x;         /* rows x widest input: the normed rows, later SiLU(gate) * up */
    float *product;   /* rows x the widest product's outputs */
    float *attention; /* rows x heads x head_dim */
    float *scores;    /* per (row, kv head): group x span */
    int8_t *planes;   /* the products' quantized rows (block_kernel.c) */
    float *per_block;
    int span;         /* the most positions a row attends to */
} Scratch;

static void multiply(const Product *p, const float *x, int rows, const Scratch *w, float *y) {
    block_linear(p->weights, p->d, p->m, p->bits, p->outputs, p->width, p->bias, x, rows, w->planes, w->per_block, y);
}

static void decode_layer(const Layer *l, const Step *s, float *hidden, const Scratch *w) {
    int rows = s->rows, H = s->hidden, I = s->intermediate, hd = s->head_dim;
    int group = s->heads / s->kv_heads, attention_width = s->heads * hd;
    float *x = w->x, *product = w->product;

    #pragma omp parallel for schedule(static) if (rows >= PARALLEL_ROWS)
    for (int r = 0; r < rows; r++) rms_norm(hidden + (size_t)r * H, l->input_norm, H, s->eps, x + (size_t)r * H);
    multiply(&l->qkv, x, rows, w, product);
    #pragma omp parallel for schedule(static) if (rows >= PARALLEL_ROWS)
    for (int r = 0; r < rows; r++) place_qkv(l, s, r, product + (size_t)r * l->qkv.outputs);
    /* Round-robin: a prompt's rows attend to ever more positions, so halves in order would
     * leave one thread the longer half. */
    #pragma omp parallel for collapse(2) schedule(static, 1)
    for (int r = 0; r < rows; r++)
        for (int g = 0; g < s->kv_heads; g++)
            attend(l, s, r, g, product + (size_t)r * l->qkv.outputs + (size_t)g * group * hd,
                   w->scores + ((size_t)r * s->kv_heads + g) * group * w->span,
                   w->attention + (size_t)r * attention_width + (size_t)g * group * hd);
    multiply(&l->o, w->attention, rows, w, product);
    #pragma omp parallel for schedule(static) if (rows >= PARALLEL_ROWS)
    for (int r = 0; r < rows; r++) {
        float *h = hidden + (size_t)r * H;
        const float *o = product + (size_t)r * l->o.outputs;
        for (int i = 0; i < H; i++) h[i] += o[i];
        rms_norm(h, l->post_norm, H, s->eps, x + (size_t)r * H);
    }
    multiply(&l->gate_up, x, rows, w, product);
    #pragma omp parallel for schedule(static) if (rows >= PARALLEL_ROWS)
    for (int r = 0; r < rows; r++) {
        const float *gate = product + (size_t)r * l->gate_up.outputs, *up = gate + I;
        float *out = x + (size_t)r * I;
        for (int i = 0; i < I; i += 16) { /* SiLU(g) = g / (1 + exp(-g)), as torch computes it */
            __m512 g = _mm512_loadu_ps(gate + i);
            __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
            __m512 silu = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), e));
            _mm512_storeu_ps(out + i, _mm512_mul_ps(silu, _mm512_loadu_ps(up + i)));
        }
    }
    multiply(&l->down, x, rows, w, product);
    #pragma omp parallel for schedule(static) if (rows >= PARALLEL_ROWS)
    for (int r = 0; r < rows; r++) {
        float *h = hidden + (size_t)r * H;
        const float *down = product + (size_t)r * l->down.outputs;
        for (int i = 0; i < H; i++) h[i] += down[i];
    }
}

static int widest_of(int a, int b) { return a > b ? a : b; }

/* Runs `count` layers over hidden (rows, hidden), in place. Returns 0, or -1 when the scratch
 * could not be allocated (nothing is changed then). hidden, intermediate and head_dim must be
 * multiples of 16 (cpu_layers.py checks). */
int decode_layers(const Layer *layers, int count, const Step *s, float *hidden) {
    size_t rows = (size_t)s->rows;
    int span = 0, outputs = 0, attention_width = s->heads * s->head_dim;
    int inputs = widest_of(widest_of(s->hidden, s->intermediate), attention_width);
    for (size_t r = 0; r < rows; r++) {
        int shared = layers[0].prefix_keys ? s->prefix_lengths[r] : 0;
        span = widest_of(span, shared + (int)s->write_at[r] + 1);
    }
    for (int i = 0; i < count; i++) {
        const Layer *l = &layers[i];
        outputs = widest_of(widest_of(outputs, l->qkv.outputs), widest_of(l->o.outputs, l->gate_up.outputs));
        outputs = widest_of(outputs, l->down.outputs);
    }
    size_t sizes[5] = {rows * inputs, rows * outputs, rows * attention_width, rows * s->heads * span,
                       rows * inputs / 16};
    size_t floats = 0;
    for (int i = 0; i < 5; i++) floats += (sizes[i] + 15) / 16 * 16; /* each part 64-byte aligned */
    float *memory = aligned_alloc(64, floats * sizeof(float) + (2 * rows * inputs + 63) / 64 * 64);
    if (!memory) return -1;
    float *parts[5];
    for (int i = 0, at = 0; i < 5; at += (int)((sizes[i] + 15) / 16 * 16), i++) parts[i] = memory + at;
    Scratch w = {parts[0], parts[1], parts[2], parts[3], (int8_t *)(memory + floats), parts[4], span};
    for (int i = 0; i < count; i++) decode_layer(&layers[i], s, hidden, &w);
    free(memory);
    return 0;
}
