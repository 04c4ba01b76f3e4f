// y[M, N] = x[M, K] @ W[N, K]^T with W kept in GGUF blocks of 32 (Q4_1 or Q8_0), products in float32.
// Built by utils/native_kernels.py (AVX2 + FMA, OpenMP; -ffp-contract=off keeps scale * q + min two roundings,
// as gguf-py dequantizes). Every output is summed in one order, whatever M is: lane l of an 8-wide accumulator
// takes k = l, l + 8, ... in turn, then the lanes are added in a fixed tree; engine/gguf_blocks.py says why.
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#define ROWS 4  // weight rows dequantized together

static void dequant_q4_1(const float *d, const float *m, const uint8_t *qs, int nb, float *out) {
    const __m128i mask = _mm_set1_epi8(0x0F);
    for (int b = 0; b < nb; b++) {
        __m128i bytes = _mm_loadu_si128((const __m128i *)(qs + 16 * b));
        __m128i lo = _mm_and_si128(bytes, mask), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
        __m256 vd = _mm256_set1_ps(d[b]), vm = _mm256_set1_ps(m[b]);
        __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
        for (int p = 0; p < 4; p++) {
            __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[p]));
            _mm256_storeu_ps(out + 32 * b + 8 * p, _mm256_add_ps(_mm256_mul_ps(vd, q), vm));
        }
    }
}

static void dequant_q8_0(const float *d, const int8_t *qs, int nb, float *out) {
    for (int b = 0; b < nb; b++) {
        __m256 vd = _mm256_set1_ps(d[b]);
        for (int p = 0; p < 4; p++) {
            __m128i bytes = _mm_loadl_epi64((const __m128i *)(qs + 32 * b + 8 * p));
            __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
            _mm256_storeu_ps(out + 32 * b + 8 * p, _mm256_mul_ps(q, vd));
        }
    }
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// kind 0: Q4_1 (scales, mins, 16 bytes of nibbles per block); kind 1: Q8_0 (scales, 32 int8 per block).
// Returns 0; 1 when K is not a multiple of 32; 2 when a thread's work buffer could not be allocated.
int blocks_matmul(int kind, const float *x, long M, long K, const float *scales, const float *mins,
                  const uint8_t *qs, long N, float *y, int threads) {
    if (K % 32) return 1;
    const long nb = K / 32, qbytes = kind == 0 ? 16 : 32;
    const long groups = (N + ROWS - 1) / ROWS;
    int out_of_memory = 0;
    #pragma omp parallel num_threads(threads)
    {
        float *w = aligned_alloc(64, sizeof(float) * ROWS * K);
        #pragma omp for schedule(static)
        for (long g = 0; g < groups; g++) {
            if (!w) {
                #pragma omp atomic write
                out_of_memory = 1;
                continue;
            }
            const long n0 = g * ROWS, rows = N - n0 < ROWS ? N - n0 : ROWS;
            for (long r = 0; r < rows; r++) {
                const long n = n0 + r;
                if (kind == 0) dequant_q4_1(scales + n * nb, mins + n * nb, qs + n * nb * qbytes, nb, w + r * K);
                else dequant_q8_0(scales + n * nb, (const int8_t *)(qs + n * nb * qbytes), nb, w + r * K);
            }
            for (long r = rows; r < ROWS; r++)
                for (long k = 0; k < K; k++) w[r * K + k] = 0.0f;
            long i = 0;
            for (; i + 3 <= M; i += 3) {  // three input rows x four weight rows: twelve independent sums
                const float *x0 = x + i * K, *x1 = x0 + K, *x2 = x1 + K;
                __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00;
                __m256 a10 = a00, a11 = a00, a12 = a00, a13 = a00;
                __m256 a20 = a00, a21 = a00, a22 = a00, a23 = a00;
                for (long k = 0; k < K; k += 8) {
                    __m256 v0 = _mm256_loadu_ps(x0 + k), v1 = _mm256_loadu_ps(x1 + k), v2 = _mm256_loadu_ps(x2 + k);
                    __m256 wr = _mm256_load_ps(w + k);
                    a00 = _mm256_fmadd_ps(v0, wr, a00); a10 = _mm256_fmadd_ps(v1, wr, a10);
                    a20 = _mm256_fmadd_ps(v2, wr, a20);
                    wr = _mm256_load_ps(w + K + k);
                    a01 = _mm256_fmadd_ps(v0, wr, a01); a11 = _mm256_fmadd_ps(v1, wr, a11);
                    a21 = _mm256_fmadd_ps(v2, wr, a21);
                    wr = _mm256_load_ps(w + 2 * K + k);
                    a02 = _mm256_fmadd_ps(v0, wr, a02); a12 = _mm256_fmadd_ps(v1, wr, a12);
                    a22 = _mm256_fmadd_ps(v2, wr, a22);
                    wr = _mm256_load_ps(w + 3 * K + k);
                    a03 = _mm256_fmadd_ps(v0, wr, a03); a13 = _mm256_fmadd_ps(v1, wr, a13);
                    a23 = _mm256_fmadd_ps(v2, wr, a23);
                }
                float s0[ROWS] = {hsum(a00), hsum(a01), hsum(a02), hsum(a03)};
                float s1[ROWS] = {hsum(a10), hsum(a11), hsum(a12), hsum(a13)};
                float s2[ROWS] = {hsum(a20), hsum(a21), hsum(a22), hsum(a23)};
                for (long r = 0; r < rows; r++) {
                    y[i * N + n0 + r] = s0[r];
                    y[(i + 1) * N + n0 + r] = s1[r];
                    y[(i + 2) * N + n0 + r] = s2[r];
                }
            }
            for (; i < M; i++) {  // the same sums, one input row: identical order, so identical results
                const float *x0 = x + i * K;
                __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00;
                for (long k = 0; k < K; k += 8) {
                    __m256 v0 = _mm256_loadu_ps(x0 + k);
                    a00 = _mm256_fmadd_ps(v0, _mm256_load_ps(w + k), a00);
                    a01 = _mm256_fmadd_ps(v0, _mm256_load_ps(w + K + k), a01);
                    a02 = _mm256_fmadd_ps(v0, _mm256_load_ps(w + 2 * K + k), a02);
                    a03 = _mm256_fmadd_ps(v0, _mm256_load_ps(w + 3 * K + k), a03);
                }
                float s0[ROWS] = {hsum(a00), hsum(a01), hsum(a02), hsum(a03)};
                for (long r = 0; r < rows; r++) y[i * N + n0 + r] = s0[r];
            }
        }
        free(w);
    }
    return out_of_memory ? 2 : 0;
}
