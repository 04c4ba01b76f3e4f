// y[M, N] = x[M, K] @ W[N, K]^T with W kept in GGUF blocks of 32 (Q4_1 or Q8_0), products in float32.
// Built by utils/native_kernels.py (AVX2 + FMA, OpenMP; -ffp-contract=off keeps scale * q + min two roundings,
// as gguf-py dequantizes). Every output is summed in one order, whatever M is: lane l of an 8-wide accumulator
// takes k = l, l + 8, ... in turn, then the lanes are added in a fixed tree; engine/gguf_blocks.py says why.
// Kinds 2 and 3 are the same formats with the activations quantized to 8 bits (llama.cpp's numerics, lossy):
// q8_matmul below; bit 4 of the kind picks its VNNI build.
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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

// ---- 8-bit activations (kinds 2, 3) ----
// Each input row is quantized per block of 32 as llama.cpp's Q8_1 (Q8_0 for Q8_0 weights): d = max|x| / 127,
// q = round(x * 127 / max|x|) half to even, s = d * sum(q), with d and s kept in float32 (llama.cpp rounds them to
// float16). Then per block the integer dot product sum(qw * qx) is exact whatever the instructions: vpmaddubsw +
// vpmaddwd (AVX2; no saturation: |a pair's products| <= 2 * 15 * 127 for Q4_1, 2 * 128 * 127 for Q8_0 with the
// sign trick) or vpdpbusd (VNNI) give 8 int32 lanes of partial sums; the block sum is reduced in integers
// (exact, so the ISA cannot matter), converted to float and accumulated as
// acc = (d_w * d_x) * sum + acc block after block, then for Q4_1 plus sum_b min_b * s_b accumulated in block
// order: one order per output, whatever M or the ISA.

// x [K] -> q [K] int8, d [K / 32], s [K / 32]
static void quantize_row_q8(const float *x, long nb, int8_t *q, float *d, float *s) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (long b = 0; b < nb; b++) {
        const float *v = x + 32 * b;
        __m256 m = _mm256_setzero_ps();
        for (int p = 0; p < 4; p++) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(v + 8 * p)));
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_movehdup_ps(h));
        const float amax = _mm_cvtss_f32(h), scale = amax / 127.0f;
        const __m256 inverse = _mm256_set1_ps(amax != 0.0f ? 127.0f / amax : 0.0f);
        __m256i total = _mm256_setzero_si256();
        for (int p = 0; p < 4; p++) {
            __m256 r = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(v + 8 * p), inverse),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            __m256i i32 = _mm256_cvtps_epi32(r);
            total = _mm256_add_epi32(total, i32);
            int32_t lanes[8];
            _mm256_storeu_si256((__m256i *)lanes, i32);
            for (int l = 0; l < 8; l++) q[32 * b + 8 * p + l] = (int8_t)lanes[l];
        }
        int32_t lanes[8], sum = 0;
        _mm256_storeu_si256((__m256i *)lanes, total);
        for (int l = 0; l < 8; l++) sum += lanes[l];
        d[b] = scale;
        s[b] = scale * (float)sum;
    }
}

// weight row -> 32 bytes per block in element order: Q4_1 nibbles as u8 0..15; Q8_0 as |q| (u8) and its sign
// kept beside it (applied to the activations: vpmaddubsw and vpdpbusd take one unsigned operand)
static void unpack_row(int q8_0, const uint8_t *qs, long nb, uint8_t *u, int8_t *sign) {
    const __m128i mask = _mm_set1_epi8(0x0F);
    for (long b = 0; b < nb; b++) {
        if (!q8_0) {
            __m128i bytes = _mm_loadu_si128((const __m128i *)(qs + 16 * b));
            _mm_storeu_si128((__m128i *)(u + 32 * b), _mm_and_si128(bytes, mask));
            _mm_storeu_si128((__m128i *)(u + 32 * b + 16), _mm_and_si128(_mm_srli_epi16(bytes, 4), mask));
        } else {
            __m256i w = _mm256_loadu_si256((const __m256i *)(qs + 32 * b));
            _mm256_storeu_si256((__m256i *)(u + 32 * b), _mm256_abs_epi8(w));
            _mm256_storeu_si256((__m256i *)(sign + 32 * b), w);
        }
    }
}

static inline __attribute__((always_inline)) __m256i dot_avx2(__m256i u, __m256i s) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}
__attribute__((target("avx512vnni,avx512vl"))) static inline __m256i dot_vnni512(__m256i u, __m256i s) {
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
}
__attribute__((target("avxvnni"))) static inline __m256i dot_avxvnni(__m256i u, __m256i s) {
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
}

// one weight-row group (ROWS = 4 unpacked rows u/sign, their scales ws and mins wm [nb][4], zero past `rows`)
// against every quantized input row, two at a time (a zero row pads an odd M): the 8 (input, weight) pairs' block
// sums are reduced in integers into one vector (lane t * 4 + r), so each lane is one output and gets
// acc = d_w * d_x * sum + acc, block after block, then + (sum_b min_b * s_b accumulated alike): the same
// operations for an output whatever shares its vector
#define Q8_GROUP(NAME, TARGET, DOT)                                                                              \
__attribute__((target(TARGET))) static void NAME(int q8_0, const int8_t *xq, const float *xd4, const float *xs4, \
        long M, long nb, const float *ws, const float *wm, const uint8_t *u, const int8_t *sign, long n0,        \
        long rows, long N, float *y) {                                                                           \
    const long K = 32 * nb;                                                                                      \
    for (long i = 0; i < M; i += 2) {                                                                            \
        __m256 acc = _mm256_setzero_ps(), accm = _mm256_setzero_ps();                                            \
        for (long b = 0; b < nb; b++) {                                                                          \
            const __m256i x0 = _mm256_loadu_si256((const __m256i *)(xq + i * K + 32 * b));                       \
            const __m256i x1 = _mm256_loadu_si256((const __m256i *)(xq + (i + 1) * K + 32 * b));                 \
            __m256i d[8];                                                                                        \
            for (int r = 0; r < ROWS; r++) {                                                                     \
                const __m256i uv = _mm256_loadu_si256((const __m256i *)(u + r * K + 32 * b));                    \
                __m256i s0 = x0, s1 = x1;                                                                        \
                if (q8_0) {                                                                                      \
                    const __m256i sv = _mm256_loadu_si256((const __m256i *)(sign + r * K + 32 * b));             \
                    s0 = _mm256_sign_epi8(x0, sv);                                                               \
                    s1 = _mm256_sign_epi8(x1, sv);                                                               \
                }                                                                                                \
                d[r] = DOT(uv, s0);                                                                              \
                d[4 + r] = DOT(uv, s1);                                                                          \
            }                                                                                                    \
            const __m256i g0 = _mm256_hadd_epi32(_mm256_hadd_epi32(d[0], d[1]), _mm256_hadd_epi32(d[2], d[3])); \
            const __m256i g1 = _mm256_hadd_epi32(_mm256_hadd_epi32(d[4], d[5]), _mm256_hadd_epi32(d[6], d[7])); \
            const __m256i sums = _mm256_add_epi32(_mm256_permute2x128_si256(g0, g1, 0x20),                       \
                                                  _mm256_permute2x128_si256(g0, g1, 0x31));                      \
            const __m256 wsv = _mm256_broadcast_ps((const __m128 *)(ws + 4 * b));                                \
            const __m256 xdv = _mm256_loadu2_m128(xd4 + ((i + 1) * nb + b) * 4, xd4 + (i * nb + b) * 4);         \
            acc = _mm256_fmadd_ps(_mm256_mul_ps(wsv, xdv), _mm256_cvtepi32_ps(sums), acc);                       \
            if (!q8_0) {                                                                                         \
                const __m256 wmv = _mm256_broadcast_ps((const __m128 *)(wm + 4 * b));                            \
                const __m256 xsv = _mm256_loadu2_m128(xs4 + ((i + 1) * nb + b) * 4, xs4 + (i * nb + b) * 4);     \
                accm = _mm256_fmadd_ps(wmv, xsv, accm);                                                          \
            }                                                                                                    \
        }                                                                                                        \
        float out[8];                                                                                            \
        _mm256_storeu_ps(out, _mm256_add_ps(acc, accm));                                                         \
        for (int t = 0; t < 2 && i + t < M; t++)                                                                 \
            for (long r = 0; r < rows; r++) y[(i + t) * N + n0 + r] = out[4 * t + r];                            \
    }                                                                                                            \
}
Q8_GROUP(q8_group_avx2, "avx2,fma", dot_avx2)
Q8_GROUP(q8_group_vnni512, "avx2,fma,avx512vnni,avx512vl", dot_vnni512)
Q8_GROUP(q8_group_avxvnni, "avx2,fma,avxvnni", dot_avxvnni)

// isa: 0 AVX2, 1 AVX512-VNNI (256-bit), 2 AVX-VNNI; the caller checks the CPU has it
static int q8_matmul(int q8_0, int isa, const float *x, long M, long K, const float *scales, const float *mins,
                     const uint8_t *qs, long N, float *y, int threads) {
    const long nb = K / 32, qbytes = q8_0 ? 32 : 16, padded = M + (M & 1);
    const long groups = (N + ROWS - 1) / ROWS;
    // rows' quants, and their scales and sums each repeated 4 times (one per weight row of a group's vector)
    int8_t *xq = calloc(padded * K + 32, 1);
    float *xd4 = calloc(padded * nb * 4 + 4, sizeof(float)), *xs4 = calloc(padded * nb * 4 + 4, sizeof(float));
    int out_of_memory = !xq || !xd4 || !xs4;
    #pragma omp parallel num_threads(threads)
    {
        uint8_t *u = malloc(ROWS * K + 32);
        int8_t *sign = malloc(ROWS * K + 32);
        float *ws = malloc(sizeof(float) * (4 * nb + 4)), *wm = malloc(sizeof(float) * (4 * nb + 4));
        float *d = malloc(sizeof(float) * (nb + 1)), *s = malloc(sizeof(float) * (nb + 1));
        if (!u || !sign || !ws || !wm || !d || !s) {
            #pragma omp atomic write
            out_of_memory = 1;
        }
        #pragma omp barrier
        if (!out_of_memory) {
            #pragma omp for schedule(static)
            for (long i = 0; i < M; i++) {
                quantize_row_q8(x + i * K, nb, xq + i * K, d, s);
                for (long b = 0; b < nb; b++)
                    for (int j = 0; j < 4; j++) {
                        xd4[(i * nb + b) * 4 + j] = d[b];
                        xs4[(i * nb + b) * 4 + j] = s[b];
                    }
            }
            #pragma omp for schedule(static)
            for (long g = 0; g < groups; g++) {
                const long n0 = g * ROWS, rows = N - n0 < ROWS ? N - n0 : ROWS;
                memset(u, 0, ROWS * K);
                memset(sign, 0, ROWS * K);
                for (long r = 0; r < rows; r++)
                    unpack_row(q8_0, qs + (n0 + r) * nb * qbytes, nb, u + r * K, sign + r * K);
                for (long b = 0; b < nb; b++)
                    for (long r = 0; r < ROWS; r++) {
                        ws[4 * b + r] = r < rows ? scales[(n0 + r) * nb + b] : 0.0f;
                        wm[4 * b + r] = r < rows && !q8_0 ? mins[(n0 + r) * nb + b] : 0.0f;
                    }
                if (isa == 1) q8_group_vnni512(q8_0, xq, xd4, xs4, M, nb, ws, wm, u, sign, n0, rows, N, y);
                else if (isa == 2) q8_group_avxvnni(q8_0, xq, xd4, xs4, M, nb, ws, wm, u, sign, n0, rows, N, y);
                else q8_group_avx2(q8_0, xq, xd4, xs4, M, nb, ws, wm, u, sign, n0, rows, N, y);
            }
        }
        free(u); free(sign); free(ws); free(wm); free(d); free(s);
    }
    free(xq); free(xd4); free(xs4);
    return out_of_memory ? 2 : 0;
}

// kind & 3 = 0: Q4_1 (scales, mins, 16 bytes of nibbles per block); 1: Q8_0 (scales, 32 int8 per block), float32
// activations; 2, 3: the same with 8-bit activations, (kind >> 2) & 3 the ISA of q8_matmul.
// Returns 0; 1 when K is not a multiple of 32; 2 when a thread's work buffer could not be allocated.
int blocks_matmul(int kind, const float *x, long M, long K, const float *scales, const float *mins,
                  const uint8_t *qs, long N, float *y, int threads) {
    if (K % 32) return 1;
    if (kind & 2) return q8_matmul(kind & 1, (kind >> 2) & 3, x, M, K, scales, mins, qs, N, y, threads);
    kind &= 1;
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
