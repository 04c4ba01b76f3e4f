// One Llama decoder layer (RMSNorm, q/k/v, RoPE, KV-cache write, masked attention, o, RMSNorm, gated SiLU MLP,
// residuals) in one call, for a model whose projections all stay in GGUF blocks (engine/gguf_blocks.c does the
// products). Built with it by utils/native_kernels.py; engine/native_layers.py says why it exists and what it
// guarantees. Every value a row gets is computed from that row and the keys it attends alone, in an order fixed by
// the row's own data: a row's result never depends on the rows beside it or on where its keys sit in the cache.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int blocks_matmul(int kind, const float *x, long M, long K, const float *scales, const float *mins,
                  const uint8_t *qs, long N, float *y, int threads);

typedef struct {
    int kind;                       // as blocks_matmul's: 0 Q4_1, 1 Q8_0
    const float *scales, *mins;
    const uint8_t *quants;
    long rows, cols;                // out_features, in_features
    const float *bias;              // [rows] or NULL
} Matrix;

typedef struct {
    long hidden, heads, kv_heads, head_dim, ffn;
    float eps;
    const float *norm_in, *norm_post;  // [hidden] RMSNorm weights
    Matrix qkv;                     // rows: q (heads * head_dim), k, v (kv_heads * head_dim each)
    Matrix o;
    Matrix gate_up;                 // rows: gate (ffn), up (ffn)
    Matrix down;
} Layer;

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// e^x, 8 lanes: x = k ln2 + r with |r| <= ln2 / 2, e^r by a degree-7 polynomial (Cephes' expf coefficients),
// times 2^k; about 1 ulp, and 0 below -87.3 (where float32's e^x underflows anyway); NaN for NaN.
static inline __m256 exp8(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.3f), hi = _mm256_set1_ps(88.3f);
    const __m256 input = x, nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);  // NaN stays NaN, as torch's exp keeps it
    __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
    __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_sub_ps(x, _mm256_mul_ps(k, _mm256_set1_ps(0.693359375f)));
    r = _mm256_sub_ps(r, _mm256_mul_ps(k, _mm256_set1_ps(-2.12194440e-4f)));
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_add_ps(_mm256_mul_ps(p, _mm256_mul_ps(r, r)), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
    return _mm256_blendv_ps(_mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(bits))), input, nan);
}

static int matmul(const Matrix *w, const float *x, long n, float *y, int threads) {
    int status = blocks_matmul(w->kind, x, n, w->cols, w->scales, w->mins, w->quants, w->rows, y, threads);
    if (w->bias)
        for (long i = 0; i < n; i++)
            for (long j = 0; j < w->rows; j++) y[i * w->rows + j] += w->bias[j];
    return status;
}

// transformers' LlamaRMSNorm in float32: weight * (x * (1 / sqrt(mean(x^2) + eps)))
static void rms_norm(const float *x, const float *weight, long n, long d, float eps, float *out) {
    for (long i = 0; i < n; i++) {
        const float *row = x + i * d;
        __m256 acc = _mm256_setzero_ps();
        for (long k = 0; k < d; k += 8) {
            __m256 v = _mm256_loadu_ps(row + k);
            acc = _mm256_add_ps(acc, _mm256_mul_ps(v, v));
        }
        const float scale = 1.0f / sqrtf(hsum(acc) / (float)d + eps);
        for (long k = 0; k < d; k++) out[i * d + k] = weight[k] * (row[k] * scale);
    }
}

// x * cos + rotate_half(x) * sin over `heads` heads of one row (rotate_half: [-x2, x1]), in place
static void rope(float *x, long heads, long hd, const float *cos, const float *sin) {
    const long half = hd / 2;
    float rotated[512];
    for (long h = 0; h < heads; h++) {
        float *v = x + h * hd;
        for (long j = 0; j < half; j++) {
            rotated[j] = v[j] * cos[j] - v[j + half] * sin[j];
            rotated[j + half] = v[j + half] * cos[j + half] + v[j] * sin[j + half];
        }
        memcpy(v, rotated, sizeof(float) * hd);
    }
}

// softmax(q k^T * scale over the masked-in keys) v for every (row, head); GQA: head h reads kv head h / group
// The slots a row attends, in slot order, into `index`; returns how many. 32 mask bytes at a time: a long cache
// mostly masked out (several sequences packed in one cache, each row seeing only its own) costs a few compares.
static long masked_in(const uint8_t *allowed, long S, long *index) {
    long count = 0, j = 0;
    for (; j + 32 <= S; j += 32) {
        unsigned bits = (unsigned)_mm256_movemask_epi8(
            _mm256_cmpgt_epi8(_mm256_loadu_si256((const __m256i *)(allowed + j)), _mm256_setzero_si256()));
        while (bits) {
            index[count++] = j + __builtin_ctz(bits);
            bits &= bits - 1;
        }
    }
    for (; j < S; j++)
        if (allowed[j]) index[count++] = j;
    return count;
}

static int attention(const float *qkv, long n, long width, const Layer *L, const float *keys, const float *values,
                     long max_len, const uint8_t *mask, long S, float *out, int threads) {
    const long hd = L->head_dim, group = L->heads / L->kv_heads;
    const float scale = 1.0f / sqrtf((float)hd);
    int out_of_memory = 0;
    #pragma omp parallel num_threads(threads)
    {
        float *scores = malloc(sizeof(float) * (S + 8));
        long *index = malloc(sizeof(long) * (S + 8));
        #pragma omp for schedule(static)
        for (long task = 0; task < n * L->heads; task++) {
            if (!scores || !index) {
                #pragma omp atomic write
                out_of_memory = 1;
                continue;
            }
            const long i = task / L->heads, h = task % L->heads, g = h / group;
            const float *q = qkv + i * width + h * hd;
            const float *K = keys + g * max_len * hd, *V = values + g * max_len * hd;
            const uint8_t *allowed = mask + i * S;
            float top = -INFINITY;
            const long count = masked_in(allowed, S, index);
            // four keys at a time: four independent FMA chains hide the FMA latency; each key's score is still
            // summed in the one order (lane l takes k = l, l + 8, ...; then hsum), so the bits do not change
            long c = 0;
            for (; c + 4 <= count; c += 4) {
                const float *k0 = K + index[c] * hd, *k1 = K + index[c + 1] * hd;
                const float *k2 = K + index[c + 2] * hd, *k3 = K + index[c + 3] * hd;
                __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
                for (long k = 0; k < hd; k += 8) {
                    const __m256 qv = _mm256_loadu_ps(q + k);
                    a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + k), a0);
                    a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k1 + k), a1);
                    a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k2 + k), a2);
                    a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k3 + k), a3);
                }
                scores[c] = hsum(a0) * scale;
                scores[c + 1] = hsum(a1) * scale;
                scores[c + 2] = hsum(a2) * scale;
                scores[c + 3] = hsum(a3) * scale;
            }
            for (; c < count; c++) {
                __m256 acc = _mm256_setzero_ps();
                for (long k = 0; k < hd; k += 8)
                    acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + k), _mm256_loadu_ps(K + index[c] * hd + k), acc);
                scores[c] = hsum(acc) * scale;
            }
            for (c = 0; c < count; c++)
                if (scores[c] > top) top = scores[c];
            float *o = out + i * L->heads * hd + h * hd;
            if (count == 0) {  // no key: zeros (never happens in decoding, where a row sees at least itself)
                memset(o, 0, sizeof(float) * hd);
                continue;
            }
            for (long c = count; c < ((count + 7) & ~7L); c++) scores[c] = -INFINITY;
            const __m256 vtop = _mm256_set1_ps(top);
            for (long c = 0; c < count; c += 8)
                _mm256_storeu_ps(scores + c, exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + c), vtop)));
            float total = 0.0f;
            __m256 acc[64];  // head_dim <= 512
            for (long k = 0; k < hd / 8; k++) acc[k] = _mm256_setzero_ps();
            for (long c = 0; c < count; c++) {
                total += scores[c];
                const __m256 p = _mm256_set1_ps(scores[c]);
                const float *v = V + index[c] * hd;
                for (long k = 0; k < hd / 8; k++) acc[k] = _mm256_fmadd_ps(p, _mm256_loadu_ps(v + 8 * k), acc[k]);
            }
            const __m256 inv = _mm256_set1_ps(1.0f / total);
            for (long k = 0; k < hd / 8; k++) _mm256_storeu_ps(o + 8 * k, _mm256_mul_ps(acc[k], inv));
        }
        free(scores);
        free(index);
    }
    return out_of_memory ? 2 : 0;
}

// h [n, hidden] float32 is updated in place; cos/sin [n, head_dim]; keys/values: this layer's cache
// [kv_heads, max_len, head_dim], rows kv_slots [n] written before attention; mask [n, S] bool (1 = attend).
// Returns 0; 1 (nothing touched) for shapes the kernels do not take (widths multiples of 32, head_dim of 8 and
// <= 512, heads a multiple of kv_heads, matrices of the layer's shapes, S <= max_len, slots inside the cache);
// bit 2 when out of memory.
int llama_layer(const Layer *L, long n, float *h, const float *cos, const float *sin, float *keys, float *values,
                long max_len, const int64_t *kv_slots, const uint8_t *mask, long S, int threads) {
    const long d = L->hidden, hd = L->head_dim, ffn = L->ffn;
    const long nq = L->heads * hd, nkv = L->kv_heads * hd, width = nq + 2 * nkv;
    if (d % 32 || ffn % 32 || hd % 8 || hd > 512 || L->kv_heads < 1 || L->heads % L->kv_heads) return 1;
    if (L->qkv.rows != width || L->qkv.cols != d || L->o.rows != d || L->o.cols != nq || L->gate_up.rows != 2 * ffn
        || L->gate_up.cols != d || L->down.rows != d || L->down.cols != ffn || S > max_len) return 1;
    for (long i = 0; i < n; i++)
        if (kv_slots[i] < 0 || kv_slots[i] >= max_len) return 1;
    float *x = malloc(sizeof(float) * n * d), *qkv = malloc(sizeof(float) * n * width);
    float *att = malloc(sizeof(float) * n * nq), *out = malloc(sizeof(float) * n * d);
    float *gate_up = malloc(sizeof(float) * n * 2 * ffn), *act = malloc(sizeof(float) * n * ffn);
    int status = 0;
    if (!x || !qkv || !att || !out || !gate_up || !act) {
        free(x); free(qkv); free(att); free(out); free(gate_up); free(act);
        return 2;
    }

    rms_norm(h, L->norm_in, n, d, L->eps, x);
    status |= matmul(&L->qkv, x, n, qkv, threads);
    for (long i = 0; i < n; i++) {
        float *row = qkv + i * width;
        rope(row, L->heads + L->kv_heads, hd, cos + i * hd, sin + i * hd);  // q and k heads are adjacent
        for (long g = 0; g < L->kv_heads; g++) {
            memcpy(keys + (g * max_len + kv_slots[i]) * hd, row + nq + g * hd, sizeof(float) * hd);
            memcpy(values + (g * max_len + kv_slots[i]) * hd, row + nq + nkv + g * hd, sizeof(float) * hd);
        }
    }
    status |= attention(qkv, n, width, L, keys, values, max_len, mask, S, att, threads);
    status |= matmul(&L->o, att, n, out, threads);
    for (long k = 0; k < n * d; k++) h[k] = h[k] + out[k];

    rms_norm(h, L->norm_post, n, d, L->eps, x);
    status |= matmul(&L->gate_up, x, n, gate_up, threads);
    const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
    for (long i = 0; i < n; i++) {  // silu(gate) * up, silu(g) = g / (1 + e^-g)
        const float *g = gate_up + i * 2 * ffn, *u = g + ffn;
        for (long k = 0; k < ffn; k += 8) {
            __m256 gv = _mm256_loadu_ps(g + k);
            __m256 silu = _mm256_div_ps(gv, _mm256_add_ps(one, exp8(_mm256_sub_ps(zero, gv))));
            _mm256_storeu_ps(act + i * ffn + k, _mm256_mul_ps(silu, _mm256_loadu_ps(u + k)));
        }
    }
    status |= matmul(&L->down, act, n, out, threads);
    for (long k = 0; k < n * d; k++) h[k] = h[k] + out[k];

    free(x); free(qkv); free(att); free(out); free(gate_up); free(act);
    return status;
}
