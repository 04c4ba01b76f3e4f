// y[M, N] = x[M, K] @ W[N, K]^T with W kept in GGUF blocks of 32 (Q4_1 or Q8_0), products in float32.
// Built by utils/native_kernels.py (AVX2 + FMA, OpenMP; -ffp-contract=off keeps scale * q + min two roundings,
// as gguf-py dequantizes). Every output is summed in one order, whatever M is: lane l of an 8-wide accumulator
// takes k = l, l + 8, ... in turn, then the lanes are added in a fixed tree; engine/gguf_blocks.py says why.
// Kinds 2 and 3 are the same formats with the activations quantized to 8 bits (llama.cpp's numerics, lossy):
// q8_matmul below; bits 2-3 of the kind pick its ISA build, bit 4 says the blocks are pre-packed for it.
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
// float16). Then per block the integer dot product sum(qw * qx) is exact whatever the instructions (vpmaddubsw +
// vpmaddwd on AVX2, vpdpbusd on VNNI; bounds below), converted to float and accumulated as
// acc = (d_w * d_x) * sum + acc block after block, then for Q4_1 plus sum_b min_b * s_b accumulated in block
// order: one order per output, whatever M, the tiling or the ISA, so a row's result depends on that row alone.

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

// A column group: 16 weight rows (output columns) unpacked once per call into two halves of 8, vectors whose lane
// c is column n0 + 8 h + c and holds 4 consecutive weights ("quad" j: k = 4j .. 4j + 3 of a block) as bytes;
// every input row then broadcasts its own 4 quantized activations of a quad to all lanes, so one broadcast and
// two integer multiply-adds serve 16 outputs, and a block's sum for each column ends up in its own lane: no
// horizontal reduction per block.
#define LANES 8  // columns per vector
#define COLS 16  // columns per group: two vectors share each broadcast activation quad

// 8 rows' 16 bytes (a block's Q4_1 nibbles, or half a Q8_0 block) -> out[j], lane c = dword j of row c
static inline void transpose_dwords(const uint8_t *const *row, int offset, __m256i out[4]) {
    __m256i r[4];
    for (int c = 0; c < 4; c++)
        r[c] = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(row[c] + offset))),
                                       _mm_loadu_si128((const __m128i *)(row[c + 4] + offset)), 1);
    const __m256i t0 = _mm256_unpacklo_epi32(r[0], r[1]), t1 = _mm256_unpackhi_epi32(r[0], r[1]);
    const __m256i t2 = _mm256_unpacklo_epi32(r[2], r[3]), t3 = _mm256_unpackhi_epi32(r[2], r[3]);
    out[0] = _mm256_unpacklo_epi64(t0, t2);
    out[1] = _mm256_unpackhi_epi64(t0, t2);
    out[2] = _mm256_unpacklo_epi64(t1, t3);
    out[3] = _mm256_unpackhi_epi64(t1, t3);
}

// lane c: the sum of column c's signed weights over one block (quad vectors every `stride`), exact in int32
static inline __attribute__((always_inline)) __m256i block_sums(const __m256i *quad, int stride) {
    const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
    __m256i total = _mm256_setzero_si256();
    for (int j = 0; j < 8; j++)
        total = _mm256_add_epi32(total, _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, quad[j * stride]), ones16));
    return total;
}

// one block of 8 weight rows (row[c]: column c's block, zeros for a missing column) -> u[j] the quad-j vector as
// unsigned bytes (Q4_1 nibbles 0..15; Q8_0 |q|), sign[j] (Q8_0: the signed q, whose signs go onto the
// activations, since vpmaddubsw and 256-bit vpdpbusd take one unsigned operand). `biased` (Q8_0 in the 512-bit
// build, which has no vpsignb and takes the activations biased to unsigned instead): sign[j] and *wsum, per
// column the block's sum of q, in place of u
static inline __attribute__((always_inline)) void unpack_block(int q8_0, int biased, const uint8_t *const *row,
                                                               __m256i *u, __m256i *sign, __m256i *wsum) {
    const __m256i mask = _mm256_set1_epi8(0x0F);
    __m256i quad[8];
    transpose_dwords(row, 0, quad);
    if (q8_0) {
        transpose_dwords(row, 16, quad + 4);
        for (int j = 0; j < 8; j++) {
            if (!biased) u[j] = _mm256_abs_epi8(quad[j]);
            sign[j] = quad[j];
        }
        if (biased) *wsum = block_sums(quad, 1);
    } else {  // byte j of a Q4_1 block holds q_j (low nibble) and q_{j+16} (high): quads j and j + 4
        for (int j = 0; j < 4; j++) {
            u[j] = _mm256_and_si256(quad[j], mask);
            u[j + 4] = _mm256_and_si256(_mm256_srli_epi16(quad[j], 4), mask);
        }
    }
}

// weight rows n0 .. n0 + cols - 1 (cols <= 16) -> per block b, quad j and half h: u/sign[16 b + 2 j + h] as
// unpack_block makes them (the two halves side by side: one 512-bit vector), wsum[2 b + h], ws/wm[16 b + c]
// column c's scale and min (zeros for missing columns)
static void unpack_group(int q8_0, int biased, const uint8_t *qs, const float *scales, const float *mins, long nb,
                         long n0, long cols, const uint8_t *zeros, __m256i *u, __m256i *sign, __m256i *wsum, float *ws,
                         float *wm) {
    const long qbytes = q8_0 ? 32 : 16;
    for (long b = 0; b < nb; b++) {
        const uint8_t *at[COLS];
        for (int c = 0; c < COLS; c++) {
            const uint8_t *row = qs + ((n0 + c) * nb + b) * qbytes;
            at[c] = c < cols ? row : zeros;
            ws[COLS * b + c] = c < cols ? scales[(n0 + c) * nb + b] : 0.0f;
            wm[COLS * b + c] = c < cols && !q8_0 ? mins[(n0 + c) * nb + b] : 0.0f;
            // the group after next, same block: sixteen strided streams defeat the hardware prefetcher
            _mm_prefetch((const char *)(row + 2 * COLS * nb * qbytes), _MM_HINT_T0);
        }
        for (int h = 0; h < 2; h++) {
            __m256i hu[8], hs[8];
            unpack_block(q8_0, biased, at + LANES * h, hu, hs, wsum + 2 * b + h);
            for (int j = 0; j < 8; j++) {
                u[16 * b + 2 * j + h] = hu[j];
                sign[16 * b + 2 * j + h] = hs[j];
            }
        }
    }
}

// the same from pack_columns' layout (engine/gguf_blocks.py): group g's quants are, per block b and half h, the
// quad vectors themselves (Q4_1: 4 vectors, quads j and j + 4 in the low and high nibbles); its scales and mins
// [b][16] are used in place
static void unpack_packed_group(int q8_0, int biased, const uint8_t *group, long nb, __m256i *u, __m256i *sign,
                                __m256i *wsum) {
    const __m256i mask = _mm256_set1_epi8(0x0F);
    const long group_bytes = (q8_0 ? 512 : 256) * nb;
    for (long b = 0; b < nb; b++) {
        const __m256i *at = (const __m256i *)(group + (q8_0 ? 512 : 256) * b);  // [j][h] vectors
        for (int v = 0; v < (q8_0 ? 16 : 8); v++) {  // v = 2 j + h
            const __m256i quad = _mm256_loadu_si256(at + v);
            // the next group, fetched while this one is multiplied (rows of many tiles take long enough)
            if (v % 2 == 0) _mm_prefetch((const char *)(at + v) + group_bytes, _MM_HINT_T0);
            if (q8_0) {
                if (!biased) u[16 * b + v] = _mm256_abs_epi8(quad);
                sign[16 * b + v] = quad;
            } else {  // quads j and j + 4 of half h
                u[16 * b + v] = _mm256_and_si256(quad, mask);
                u[16 * b + v + 8] = _mm256_and_si256(_mm256_srli_epi16(quad, 4), mask);
            }
        }
        if (biased)
            for (int h = 0; h < 2; h++) wsum[2 * b + h] = block_sums(sign + 16 * b + h, 2);
    }
}

// One column group against input rows i0 .. i0 + TILE - 1; ISA, format and TILE fixed at compile time. Integer
// block sums are exact (AVX2 Q4_1: a pair of products <= 2 * 15 * 127, eight of them summed in int16 <= 30480;
// Q8_0: |w| <= 128, summed in int32 after each vpmaddwd), so every ISA gives the same sums; then per output
// acc = (d_w * d_x) * sum + acc block after block, and for Q4_1 accm = min * s + accm, y = acc + accm: one
// order per output whatever M, the tile or the ISA.
#define Q8_TILE(NAME, TARGET, Q8_0, STEP, FINISH, TILE)                                                          \
__attribute__((target(TARGET))) static void NAME(const int8_t *xq, const float *xd, const float *xs, long i0,   \
        long nb, const __m256i *u, const __m256i *sign, const __m256i *wsum, const float *ws, const float *wm,  \
        long n0, long cols, long N, float *y) {                                                                 \
    const long K = 32 * nb;                                                                                     \
    (void)wsum;                                                                                                 \
    __m256 acc[TILE][2];                                                                                        \
    for (int t = 0; t < TILE; t++) acc[t][0] = acc[t][1] = _mm256_setzero_ps();                                 \
    for (long b = 0; b < nb; b++) {                                                                             \
        __m256i sums[TILE][2];                                                                                  \
        for (int t = 0; t < TILE; t++) sums[t][0] = sums[t][1] = _mm256_setzero_si256();                        \
        for (int j = 0; j < 8; j++) {                                                                           \
            const __m256i w0 = _mm256_load_si256(u + 16 * b + 2 * j), w1 = _mm256_load_si256(u + 16 * b + 2 * j + 1); \
            const __m256i s0 = Q8_0 ? _mm256_load_si256(sign + 16 * b + 2 * j) : w0;                            \
            const __m256i s1 = Q8_0 ? _mm256_load_si256(sign + 16 * b + 2 * j + 1) : w1;                        \
            for (int t = 0; t < TILE; t++) {                                                                    \
                int32_t quad;                                                                                   \
                memcpy(&quad, xq + (i0 + t) * K + 32 * b + 4 * j, 4);                                           \
                const __m256i xv = _mm256_set1_epi32(quad);                                                     \
                sums[t][0] = STEP(sums[t][0], w0, Q8_0 ? _mm256_sign_epi8(xv, s0) : xv);                        \
                sums[t][1] = STEP(sums[t][1], w1, Q8_0 ? _mm256_sign_epi8(xv, s1) : xv);                        \
            }                                                                                                   \
        }                                                                                                       \
        const __m256 ws0 = _mm256_loadu_ps(ws + COLS * b), ws1 = _mm256_loadu_ps(ws + COLS * b + LANES);         \
        for (int t = 0; t < TILE; t++) {                                                                        \
            const __m256 xdv = _mm256_set1_ps(xd[(i0 + t) * nb + b]);                                           \
            acc[t][0] = _mm256_fmadd_ps(_mm256_mul_ps(ws0, xdv), _mm256_cvtepi32_ps(FINISH(sums[t][0])), acc[t][0]); \
            acc[t][1] = _mm256_fmadd_ps(_mm256_mul_ps(ws1, xdv), _mm256_cvtepi32_ps(FINISH(sums[t][1])), acc[t][1]); \
        }                                                                                                       \
    }                                                                                                           \
    for (int t = 0; t < TILE; t++) {                                                                            \
        __m256 accm0 = _mm256_setzero_ps(), accm1 = accm0;  /* Q4_1's min * sum(q x) terms, block after block */ \
        for (long b = 0; b < nb && !Q8_0; b++) {                                                                \
            const __m256 xsv = _mm256_set1_ps(xs[(i0 + t) * nb + b]);                                           \
            accm0 = _mm256_fmadd_ps(_mm256_loadu_ps(wm + COLS * b), xsv, accm0);                                \
            accm1 = _mm256_fmadd_ps(_mm256_loadu_ps(wm + COLS * b + LANES), xsv, accm1);                        \
        }                                                                                                       \
        float out[COLS];                                                                                        \
        _mm256_storeu_ps(out, _mm256_add_ps(acc[t][0], accm0));                                                 \
        _mm256_storeu_ps(out + LANES, _mm256_add_ps(acc[t][1], accm1));                                         \
        memcpy(y + (i0 + t) * N + n0, out, sizeof(float) * cols);                                               \
    }                                                                                                           \
}
// The same tile with 512-bit vectors (one vector = the group's 16 columns; the CPU has AVX-512 F, BW, VL and VNNI).
// Q8_0 cannot move the weights' signs onto the activations here (no vpsignb): its activations arrive biased to
// unsigned (q + 128, xq ^ 0x80) and each block sum is corrected by 128 * sum(q_w), still exact in integers.
#define Q8_TILE512(NAME, Q8_0, TILE)                                                                             \
__attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni"))) static void NAME(const int8_t *xq,       \
        const float *xd, const float *xs, long i0, long nb, const __m256i *u, const __m256i *sign,              \
        const __m256i *wsum, const float *ws, const float *wm, long n0, long cols, long N, float *y) {          \
    const long K = 32 * nb;                                                                                     \
    __m512 acc[TILE];                                                                                           \
    for (int t = 0; t < TILE; t++) acc[t] = _mm512_setzero_ps();                                                \
    for (long b = 0; b < nb; b++) {                                                                             \
        __m512i sums[TILE];                                                                                     \
        for (int t = 0; t < TILE; t++) sums[t] = _mm512_setzero_si512();                                        \
        for (int j = 0; j < 8; j++) {                                                                           \
            const __m512i w = _mm512_loadu_si512(Q8_0 ? sign + 16 * b + 2 * j : u + 16 * b + 2 * j);            \
            for (int t = 0; t < TILE; t++) {                                                                    \
                int32_t quad;                                                                                   \
                memcpy(&quad, xq + (i0 + t) * K + 32 * b + 4 * j, 4);                                           \
                const __m512i xv = _mm512_set1_epi32(quad);                                                     \
                sums[t] = Q8_0 ? _mm512_dpbusd_epi32(sums[t], xv, w) : _mm512_dpbusd_epi32(sums[t], w, xv);     \
            }                                                                                                   \
        }                                                                                                       \
        const __m512 wsv = _mm512_loadu_ps(ws + COLS * b);                                                      \
        const __m512i bias = Q8_0 ? _mm512_slli_epi32(_mm512_loadu_si512(wsum + 2 * b), 7) : _mm512_setzero_si512(); \
        for (int t = 0; t < TILE; t++) {                                                                        \
            const __m512 xdv = _mm512_set1_ps(xd[(i0 + t) * nb + b]);                                           \
            acc[t] = _mm512_fmadd_ps(_mm512_mul_ps(wsv, xdv), _mm512_cvtepi32_ps(_mm512_sub_epi32(sums[t], bias)), \
                                     acc[t]);                                                                   \
        }                                                                                                       \
    }                                                                                                           \
    for (int t = 0; t < TILE; t++) {                                                                            \
        __m512 accm = _mm512_setzero_ps();                                                                      \
        for (long b = 0; b < nb && !Q8_0; b++)                                                                  \
            accm = _mm512_fmadd_ps(_mm512_loadu_ps(wm + COLS * b), _mm512_set1_ps(xs[(i0 + t) * nb + b]), accm); \
        float out[COLS];                                                                                        \
        _mm512_storeu_ps(out, _mm512_add_ps(acc[t], accm));                                                     \
        memcpy(y + (i0 + t) * N + n0, out, sizeof(float) * cols);                                               \
    }                                                                                                           \
}
static inline __attribute__((always_inline)) __m256i add_maddubs16(__m256i s, __m256i u, __m256i x) {
    return _mm256_add_epi16(s, _mm256_maddubs_epi16(u, x));
}
static inline __attribute__((always_inline)) __m256i add_maddubs32(__m256i s, __m256i u, __m256i x) {
    return _mm256_add_epi32(s, _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), _mm256_set1_epi16(1)));
}
static inline __attribute__((always_inline)) __m256i pairs_to_int32(__m256i s) {
    return _mm256_madd_epi16(s, _mm256_set1_epi16(1));
}
static inline __attribute__((always_inline)) __m256i as_is(__m256i s) { return s; }
__attribute__((target("avxvnni"))) static inline __m256i dpbusd_avx(__m256i s, __m256i u, __m256i x) {
    return _mm256_dpbusd_avx_epi32(s, u, x);
}
// each (ISA, format) in tiles of 1, 2 and 4 rows
#define Q8_TILES(NAME, TARGET, Q8_0, STEP, FINISH) Q8_TILE(NAME##_1, TARGET, Q8_0, STEP, FINISH, 1) \
    Q8_TILE(NAME##_2, TARGET, Q8_0, STEP, FINISH, 2) Q8_TILE(NAME##_4, TARGET, Q8_0, STEP, FINISH, 4)
#define Q8_TILES512(NAME, Q8_0) Q8_TILE512(NAME##_1, Q8_0, 1) Q8_TILE512(NAME##_2, Q8_0, 2) \
    Q8_TILE512(NAME##_4, Q8_0, 4)
Q8_TILES(q4_1_avx2, "avx2,fma", 0, add_maddubs16, pairs_to_int32)
Q8_TILES(q8_0_avx2, "avx2,fma", 1, add_maddubs32, as_is)
Q8_TILES512(q4_1_vnni512, 0)
Q8_TILES512(q8_0_vnni512, 1)
Q8_TILES(q4_1_avxvnni, "avx2,fma,avxvnni", 0, dpbusd_avx, as_is)
Q8_TILES(q8_0_avxvnni, "avx2,fma,avxvnni", 1, dpbusd_avx, as_is)

#define SHARED_ROWS 32  // more input rows than this are quantized once and shared between the threads

// rows i0 .. i1 - 1 of x [M, K] -> xq (int8; biased to unsigned, q ^ 0x80, for the 512-bit Q8_0 tile), xd, xs
static void quantize_rows(int biased, const float *x, long i0, long i1, long K, int8_t *xq, float *xd, float *xs) {
    const long nb = K / 32;
    for (long i = i0; i < i1; i++) {
        quantize_row_q8(x + i * K, nb, xq + i * K, xd + i * nb, xs + i * nb);
        if (biased)
            for (long k = 0; k < K; k++) xq[i * K + k] ^= (int8_t)0x80;
    }
}

typedef void (*q8_tile_fn)(const int8_t *, const float *, const float *, long, long, const __m256i *,
                           const __m256i *, const __m256i *, const float *, const float *, long, long, long, float *);

// isa: 0 AVX2, 1 AVX-512 VNNI (512-bit vectors), 2 AVX-VNNI; the caller checks the CPU has it
// packed: the blocks are in pack_columns' layout (N a multiple of 16)
static int q8_matmul(int q8_0, int isa, int packed, const float *x, long M, long K, const float *scales,
                     const float *mins, const uint8_t *qs, long N, float *y, int threads) {
    // [isa][format][tile of 1, 2 or 4 rows]: the same sums in the same order, so a row's result never depends on
    // which tile it fell in
    static const q8_tile_fn tiles[3][2][3] = {
        {{q4_1_avx2_1, q4_1_avx2_2, q4_1_avx2_4}, {q8_0_avx2_1, q8_0_avx2_2, q8_0_avx2_4}},
        {{q4_1_vnni512_1, q4_1_vnni512_2, q4_1_vnni512_4}, {q8_0_vnni512_1, q8_0_vnni512_2, q8_0_vnni512_4}},
        {{q4_1_avxvnni_1, q4_1_avxvnni_2, q4_1_avxvnni_4}, {q8_0_avxvnni_1, q8_0_avxvnni_2, q8_0_avxvnni_4}}};
    const q8_tile_fn *tile = tiles[isa][q8_0];
    const int biased = q8_0 && isa == 1;  // the 512-bit Q8_0 tile: activations q + 128, weight sums
    const long nb = K / 32, groups = (N + COLS - 1) / COLS;
    // few rows (decoding, tree verification): every thread quantizes them all itself, which costs less than the
    // barrier a shared copy needs; many rows (a prompt): quantized once, shared
    const int shared = M > SHARED_ROWS;
    int8_t *xq_shared = shared ? malloc(M * K + 32) : NULL;
    float *xd_shared = shared ? malloc(sizeof(float) * (M * nb + 1)) : NULL;
    float *xs_shared = shared ? malloc(sizeof(float) * (M * nb + 1)) : NULL;
    int out_of_memory = shared && (!xq_shared || !xd_shared || !xs_shared);
    #pragma omp parallel num_threads(threads)
    {
        __m256i *u = aligned_alloc(32, sizeof(__m256i) * 16 * nb), *sign = aligned_alloc(32, sizeof(__m256i) * 16 * nb);
        __m256i *wsum = aligned_alloc(32, sizeof(__m256i) * 2 * nb);
        float *ws = malloc(sizeof(float) * COLS * nb), *wm = malloc(sizeof(float) * COLS * nb);
        int8_t *xq = shared ? xq_shared : malloc(M * K + 32);
        float *xd = shared ? xd_shared : malloc(sizeof(float) * (M * nb + 1));
        float *xs = shared ? xs_shared : malloc(sizeof(float) * (M * nb + 1));
        uint8_t zeros[32] = {0};
        const int ok = u && sign && wsum && ws && wm && xq && xd && xs;
        if (!ok) {  // this thread's share is skipped; the call reports the failure
            #pragma omp atomic write
            out_of_memory = 1;
        }
        if (shared) {
            #pragma omp for schedule(static)
            for (long i = 0; i < M; i++)
                if (ok) quantize_rows(biased, x, i, i + 1, K, xq, xd, xs);
        } else if (ok) {
            quantize_rows(biased, x, 0, M, K, xq, xd, xs);
        }
        #pragma omp for schedule(static)
        for (long g = 0; g < groups; g++) {
            if (!ok) continue;
            const long n0 = g * COLS, cols = N - n0 < COLS ? N - n0 : COLS;
            const float *gs = ws, *gm = wm;
            if (packed) {
                unpack_packed_group(q8_0, biased, qs + n0 * nb * (q8_0 ? 32 : 16), nb, u, sign, wsum);
                gs = scales + n0 * nb;
                gm = q8_0 ? wm : mins + n0 * nb;
            } else {
                unpack_group(q8_0, biased, qs, scales, mins, nb, n0, cols, zeros, u, sign, wsum, ws, wm);
            }
            long i0 = 0;
            for (; i0 + 4 <= M; i0 += 4) tile[2](xq, xd, xs, i0, nb, u, sign, wsum, gs, gm, n0, cols, N, y);
            if (i0 + 2 <= M) {
                tile[1](xq, xd, xs, i0, nb, u, sign, wsum, gs, gm, n0, cols, N, y);
                i0 += 2;
            }
            if (i0 < M) tile[0](xq, xd, xs, i0, nb, u, sign, wsum, gs, gm, n0, cols, N, y);
        }
        free(u); free(sign); free(wsum); free(ws); free(wm);
        if (!shared) {
            free(xq); free(xd); free(xs);
        }
    }
    free(xq_shared); free(xd_shared); free(xs_shared);
    return out_of_memory ? 2 : 0;
}

// kind & 3 = 0: Q4_1 (scales, mins, 16 bytes of nibbles per block); 1: Q8_0 (scales, 32 int8 per block), float32
// activations; 2, 3: the same with 8-bit activations, (kind >> 2) & 3 the ISA of q8_matmul, kind & 16: the blocks
// in pack_columns' layout.
// Returns 0; 1 when K is not a multiple of 32; 2 when a thread's work buffer could not be allocated; 3 when packed
// blocks have a row count that is not a multiple of 16.
int blocks_matmul(int kind, const float *x, long M, long K, const float *scales, const float *mins,
                  const uint8_t *qs, long N, float *y, int threads) {
    if (K % 32) return 1;
    if (kind & 2) {
        if ((kind & 16) && N % COLS) return 3;
        return q8_matmul(kind & 1, (kind >> 2) & 3, (kind >> 4) & 1, x, M, K, scales, mins, qs, N, y, threads);
    }
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
