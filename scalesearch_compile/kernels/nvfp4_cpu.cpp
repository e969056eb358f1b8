/* NVFP4 on a CPU: quantization with scale search (bit for bit search.quantize_reference), the decode of packed
 * codes (bit for bit layout.unscaled_values) and the finite amax of the run-time global scale.
 *
 * Quantization: one pass over each block of 16 values: sanitise and normalise, block amax, amax code, every candidate's error
 * (16 values in registers, no allocation), the best code kept, the codes rounded and packed. The arithmetic is
 * the reference's, operation for operation, in IEEE float32: built with -ffp-contract=off (no fused
 * multiply-add) and without -ffast-math, so the compiler may vectorise but not reassociate, and every rounding
 * (E2M1 by adding and subtracting 2**22 times the grid spacing, E4M3 on the bit pattern) is the reference's.
 *
 * Layouts: x float32 (rows, k) contiguous, k a multiple of 16; pts float32, the global scale of each row or one
 * for all (pts_stride 0), normalised here as the reference does (pts * 2**-e, x * 2**-e); weights float32 (k) or
 * NULL;
 * out qdata uint8 (rows, k / 2) (element 2i in the low nibble), scale codes uint8 and offsets int16 (rows, k / 16).
 */
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#include <cmath>
#include <cstdint>
#include <cstring>

/* LANES blocks at a time, one a vector lane (GCC vector extensions), so the per-block work (amax, scale codes,
 * error sums) is vertical too: as wide as the registers the build targets (-march), since wider vectors than the
 * hardware's are split into scalar code for comparisons (AVX2 with 16 lanes: 8x slower than 8 lanes).
 * Comparisons give lane masks of all ones or zeros, and C++'s ?: on them is one blend or min/max (a 192 x 384
 * search: 180 us against 221 us with the same selects written as bit masks in C). Everything is inlined into
 * the entry point. */
#if defined(__AVX512F__)
#define LANES 16
#elif defined(__AVX2__)
#define LANES 8
#else
#define LANES 4
#endif
#define INLINE inline __attribute__((always_inline))

constexpr int BLOCK = 16, MAX_CODE = 126, NAN_CODE = 127;
constexpr int METHOD_AMAX = 0, METHOD_SEARCH = 1, METHOD_FOUR_OVER_SIX = 2, METHOD_EXHAUSTIVE = 3;
constexpr int METHOD_FAST_SEARCH = 4;

typedef float vf __attribute__((vector_size(4 * LANES)));
typedef int32_t vi __attribute__((vector_size(4 * LANES)));

static INLINE vf clamp_f(vf x, float low, float high) {
    x = x < low ? low : x;
    return x > high ? high : x;
}
static INLINE vi clamp_i(vi x, int low, int high) {
    x = x < low ? low : x;
    return x > high ? high : x;
}
static INLINE vf magnitude(vf x) { return (vf)((vi)x & 0x7FFFFFFF); }

/* Value of E4M3 codes 0..126: a normal code e << 3 | m is the float32 with exponent e + 120 and mantissa m << 20,
 * a subnormal one m * 2**-9 (exact). */
static INLINE vf e4m3_value(vi code) {
    vi mantissa = code & 7;
    vf normal = (vf)(((code >> 3) + 120) << 23 | mantissa << 20);
    return code >= 8 ? normal : __builtin_convertvector(mantissa, vf) * 0x1p-9f;
}

/* Amax code of blocks: e4m3(clamp(amax / divisor / pts, 2**-6, 448)), rounded to nearest even on the bit pattern
 * (formats.e4m3_encode; the clamp keeps the value normal). */
static INLINE vi amax_code(vf block_amax, float divisor, vf pts) {
    vi bits = (vi)clamp_f(block_amax / divisor / pts, 0x1p-6f, 448.0f);
    vi code = ((bits + 0x7FFFF + ((bits >> 20) & 1)) >> 20) - ((127 - 7) << 3);
    return clamp_i(code, 0, MAX_CODE);
}

/* Nearest E2M1 magnitude of a >= 0, ties to even, saturating at 6 (formats.e2m1_round): adding and subtracting
 * 2**22 times the grid spacing (half the power of two at or below max(y, 1), at most 4 since y <= 6) rounds to
 * the grid. */
static INLINE vf e2m1_round(vf a) {
    vf y = a > 6.0f ? 6.0f : a;
    vf magic = (vf)((vi)(y < 1.0f ? 1.0f : y) & 0x7F800000) * 0x1p22f;
    return (y + magic) - magic;
}

/* Magnitude code 0..7 of E2M1 grid values (comparisons are -1 where true). */
static INLINE vi e2m1_magnitude_code(vf v) {
    vi doubled = __builtin_convertvector(2.0f * (v > 2.0f ? 2.0f : v), vi);
    return doubled - (v >= 3.0f) - (v >= 4.0f) - (v >= 6.0f);
}

/* Error of quantizing the blocks' magnitudes m[i] with E4M3 scale codes: the sum over i of
 * w[i] * (m - e2m1(m * ((1 / pts) / s)) * (pts * s))**2, added as pairs of neighbours 16 -> 8 -> 4 -> 2 -> 1. */
static INLINE vf block_error(const vf *m, const vf *w, vi code, vf pts, vf inverse) {
    vf scale = e4m3_value(code), multiplier = inverse / scale, dequant = pts * scale, e[BLOCK];
    for (int i = 0; i < BLOCK; i++) {
        vf d = m[i] - e2m1_round(m[i] * multiplier) * dequant;
        e[i] = w ? d * d * w[i] : d * d;
    }
    for (int width = BLOCK / 2; width >= 1; width /= 2)
        for (int i = 0; i < width; i++) e[i] = e[2 * i] + e[2 * i + 1];
    return e[0];
}

/* 2**-e for a float32 global scale: e is its exponent plus 12, clamped to -114..126 (search.normaliser). */
static INLINE float normaliser(float pts) {
    int32_t bits;
    memcpy(&bits, &pts, sizeof bits);
    int32_t e = ((bits >> 23) & 0xFF) - 127 + 12;
    e = e < -114 ? -114 : e > 126 ? 126 : e;
    int32_t power = (127 - e) << 23;
    float value;
    memcpy(&value, &power, sizeof value);
    return value;
}

/* Value i of LANES consecutive blocks starting at x: one gather (AVX-512, AVX2) or LANES loads. */
static INLINE vf load_lanes(const float *x, int i) {
#if defined(__AVX512F__)
    const __m512i index = _mm512_setr_epi32(0, 16, 32, 48, 64, 80, 96, 112, 128, 144, 160, 176, 192, 208, 224, 240);
    return (vf)_mm512_i32gather_ps(index, x + i, 4);
#elif defined(__AVX2__)
    const __m256i index = _mm256_setr_epi32(0, 16, 32, 48, 64, 80, 96, 112);
    return (vf)_mm256_i32gather_ps(x + i, index, 4);
#else
    vf v;
    for (int j = 0; j < LANES; j++) v[j] = x[j * BLOCK + i];
    return v;
#endif
}

/* Quantize LANES consecutive blocks starting at block g0 (count of them valid; pts one per row, or one for all
 * with pts_stride 0). */
static INLINE void quantize_blocks(const float *x, int64_t g0, int count, int64_t blocks_per_row, const float *pts,
                                   int64_t pts_stride, const float *weights, int method, int low, int high,
                                   int finite, uint8_t *qdata, uint8_t *scale_codes, int16_t *offsets) {
    vf v[BLOCK], m[BLOCK], w[BLOCK], p, n, block_amax = {};
    vi bad = {};
    int64_t row = g0 / blocks_per_row, column = g0 % blocks_per_row; /* of block g0 + j, stepped with j */
    n = vf{} + normaliser(pts[row * pts_stride]);
    p = pts[row * pts_stride] * n;
    for (int j = 0; (pts_stride || weights) && j < LANES; j++) {
        n[j] = normaliser(pts[row * pts_stride]);
        p[j] = pts[row * pts_stride] * n[j];
        for (int i = 0; weights && i < BLOCK; i++) w[i][j] = weights[column * BLOCK + i];
        if (j + 1 < count && ++column == blocks_per_row) row++, column = 0;
    }
    for (int i = 0; i < BLOCK; i++) {
        if (count == LANES) {
            v[i] = load_lanes(x + g0 * BLOCK, i);
        } else {
            v[i] = vf{};
            for (int j = 0; j < count; j++) v[i][j] = x[(g0 + j) * BLOCK + i];
        }
        if (!finite) {
            vi is_finite = ((vi)v[i] & 0x7F800000) != 0x7F800000;
            bad |= ~is_finite;
            v[i] = is_finite ? v[i] : vf{};
        }
        v[i] *= n;
        m[i] = magnitude(v[i]);
        block_amax = m[i] > block_amax ? m[i] : block_amax;
    }
    vf inverse = 1.0f / p;
    vi first = amax_code(block_amax, 6.0f, p), best = first;
    const vf *wp = weights ? w : 0;
    if (method != METHOD_AMAX) {
        vf best_error = block_error(m, wp, first, p, inverse);
        auto try_code = [&](vi code) { /* kept only with a strictly lower error and a code in 1..126 */
            vf error = block_error(m, wp, clamp_i(code, 1, MAX_CODE), p, inverse);
            vi better = (error < best_error) & (code >= 1) & (code <= MAX_CODE);
            best_error = better ? error : best_error;
            best = better ? code : best;
        };
        /* search._candidate_codes in its order: offsets from the amax code, all codes, the four_over_six code */
        int lo = method == METHOD_SEARCH ? low : method == METHOD_FAST_SEARCH ? -1 : 1;
        int hi = method == METHOD_SEARCH ? high : method == METHOD_FAST_SEARCH ? -1 : 0;
        for (int d = lo; d <= hi; d++)
            if (d != 0) try_code(first + d);
        if (method == METHOD_EXHAUSTIVE)
            for (int c = 1; c <= MAX_CODE; c++) try_code(vi{} + c);
        if (method == METHOD_FOUR_OVER_SIX || method == METHOD_FAST_SEARCH) try_code(amax_code(block_amax, 4.0f, p));
    }
    vf multiplier = inverse / e4m3_value(best);
    vi codes[BLOCK];
    for (int i = 0; i < BLOCK; i++) {
        vf y = clamp_f(v[i] * multiplier, -6.0f, 6.0f);
        codes[i] = e2m1_magnitude_code(e2m1_round(magnitude(y))) | (((vi)y >> 31) & 8);
    }
    first = bad ? NAN_CODE : first;
    best = bad ? NAN_CODE : best;
    /* Each block's 8 bytes as two little-endian words of 8 nibbles (element 2i in the low nibble of byte i). */
    vi low_word = {}, high_word = {}, offset = best - first;
    for (int i = 0; i < BLOCK / 2; i++) {
        low_word |= codes[i] << (4 * i);
        high_word |= codes[BLOCK / 2 + i] << (4 * i);
    }
    uint32_t words[LANES][2];
    for (int j = 0; j < LANES; j++) words[j][0] = (uint32_t)low_word[j], words[j][1] = (uint32_t)high_word[j];
    memcpy(qdata + g0 * (BLOCK / 2), words, (size_t)count * sizeof words[0]);
    for (int j = 0; j < count; j++) {
        scale_codes[g0 + j] = (uint8_t)best[j];
        offsets[g0 + j] = (int16_t)offset[j];
    }
}

/* Decode `count` NVFP4 blocks: out[16 g + i] = e2m1(code i of block g) * e4m3(scale_codes[g]), the global scale
 * left out (layout.unscaled_values; one float32 multiply, exact). qdata: 8 bytes a block, element 2i in the low
 * nibble of byte i. Eight elements at a time: one 32-bit word of codes broadcast and shifted per lane, the
 * magnitude looked up in a register (one permute), the sign bit moved in. Scale codes 127..255 (NaN, and the
 * negative scales no quantizer writes) decode as NaN. */
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));

static INLINE void decode_blocks(const uint8_t *qdata, const uint8_t *scale_codes, int count, float *out) {
    const v8f e2m1_magnitudes = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
    const v8u nibble_shifts = {0, 4, 8, 12, 16, 20, 24, 28};
    vi codes = {};
    for (int j = 0; j < count; j++) codes[j] = scale_codes[j];
    vf scales = codes >= NAN_CODE ? (vf){} + NAN : e4m3_value(codes);
    for (int j = 0; j < count; j++) {
        uint32_t words[2];
        memcpy(words, qdata + j * (BLOCK / 2), sizeof words);
        for (int half = 0; half < 2; half++) {
            v8i nibbles = (v8i)(((v8u){} + words[half]) >> nibble_shifts) & 15;
            v8f magnitude = __builtin_shuffle(e2m1_magnitudes, nibbles & 7);
            v8f value = (v8f)((v8i)magnitude ^ (nibbles & 8) << 28) * scales[j];
            memcpy(out + j * BLOCK + half * 8, &value, sizeof value);
        }
    }
}

/* A contiguous range of blocks [first, last) for one thread; first is a multiple of LANES. With `values`, the
 * blocks are decoded into it as they are quantized (their codes kept only in registers and a small buffer). */
struct job {
    const float *x, *pts, *weights;
    int64_t first, last, blocks_per_row, pts_stride;
    int method, low, high, finite;
    uint8_t *qdata, *scale_codes;
    int16_t *offsets;
    float *values;
};

static void run_job(const job *j) {
    for (int64_t g0 = j->first; g0 < j->last; g0 += LANES) {
        int count = j->last - g0 < LANES ? (int)(j->last - g0) : LANES;
        if (!j->values) {
            quantize_blocks(j->x, g0, count, j->blocks_per_row, j->pts, j->pts_stride, j->weights, j->method, j->low,
                            j->high, j->finite, j->qdata, j->scale_codes, j->offsets);
            continue;
        }
        uint8_t qdata[LANES * BLOCK / 2], scale_codes[LANES];
        int16_t offsets[LANES];
        /* one global scale and no importance: the blocks' row and column do not matter, so they count from 0 */
        quantize_blocks(j->x + g0 * BLOCK, 0, count, j->blocks_per_row, j->pts, 0, 0, j->method, j->low, j->high,
                        j->finite, qdata, scale_codes, offsets);
        decode_blocks(qdata, scale_codes, count, j->values + g0 * BLOCK);
    }
}

/* Run `jobs[0..threads)`, one a thread of the OpenMP runtime PyTorch's own CPU kernels and Inductor's run on (the
 * same team: no second pool competing for the cores); one after another where the library was built without
 * OpenMP. */
static void run_jobs(job *jobs, int threads) {
    if (threads == 1) {
        run_job(jobs);  // no parallel region for the small calls of decoding one token
        return;
    }
#pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int t = 0; t < threads; t++) run_job(&jobs[t]);
}

/* Quantize x (rows, k) on up to `threads` threads, each a contiguous share of the blocks: into qdata, scale codes
 * and offsets, or, with `values` (one global scale, no weights), decoded into values (rows, k). */
static void quantize(const float *x, int64_t rows, int64_t k, const float *pts, int64_t pts_stride,
                     const float *weights, int method, int low, int high, int finite, uint8_t *qdata,
                     uint8_t *scale_codes, int16_t *offsets, float *values, int threads) {
    enum { MAX_THREADS = 64 };
    int64_t blocks_per_row = k / BLOCK, blocks = rows * blocks_per_row, groups = (blocks + LANES - 1) / LANES;
    threads = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
    if (threads > groups) threads = (int)groups;
    job jobs[MAX_THREADS];
    for (int t = 0; t < threads; t++) {
        int64_t first = groups * t / threads * LANES, last = groups * (t + 1) / threads * LANES;
        jobs[t] = job{x,          pts,    weights, first,       last < blocks ? last : blocks, blocks_per_row,
                      pts_stride, method, low,     high,        finite,                        qdata,
                      scale_codes, offsets, values};
    }
    run_jobs(jobs, threads);
}

extern "C" void scalesearch_quantize(const float *x, int64_t rows, int64_t k, const float *pts, int64_t pts_stride,
                                     const float *weights, int method, int low, int high, int finite, uint8_t *qdata,
                                     uint8_t *scale_codes, int16_t *offsets, int threads) {
    quantize(x, rows, k, pts, pts_stride, weights, method, low, high, finite, qdata, scale_codes, offsets, 0, threads);
}

/* The largest |x| over the finite values of x (n floats), 0 when there are none: search.finite_amax in one pass
 * (a maximum is exact in any order). */
extern "C" float scalesearch_finite_amax(const float *x, int64_t n) {
    vf best = {};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) {
        vf v;
        memcpy(&v, x + i, sizeof v);
        vf m = ((vi)v & 0x7F800000) != 0x7F800000 ? magnitude(v) : vf{};
        best = m > best ? m : best;
    }
    float result = 0.0f;
    for (int j = 0; j < LANES; j++) result = best[j] > result ? best[j] : result;
    for (; i < n; i++) {
        float m = std::isfinite(x[i]) ? std::fabs(x[i]) : 0.0f;
        result = m > result ? m : result;
    }
    return result;
}


/* Decode blocks [first, last) (decode_blocks) into out, on one thread. */
struct decode_job {
    const uint8_t *qdata, *scale_codes;
    int64_t first, last;
    float *out;
};

static void run_decode_job(const decode_job *j) {
    for (int64_t g0 = j->first; g0 < j->last; g0 += LANES)
        decode_blocks(j->qdata + g0 * (BLOCK / 2), j->scale_codes + g0, j->last - g0 < LANES ? (int)(j->last - g0) : LANES,
                      j->out + g0 * BLOCK);
}

/* Decode `blocks` blocks into out (blocks * 16 floats), in two halves on two threads with threads = 2. */
extern "C" void scalesearch_decode(const uint8_t *qdata, const uint8_t *scale_codes, int64_t blocks, float *out,
                                   int threads) {
    int64_t half = (blocks / 2 + LANES - 1) / LANES * LANES;
    bool split = threads > 1 && half < blocks;
    decode_job jobs[2] = {{qdata, scale_codes, 0, split ? half : blocks, out}, {qdata, scale_codes, half, blocks, out}};
    if (!split) {
        run_decode_job(&jobs[0]);
        return;
    }
#pragma omp parallel for num_threads(2) schedule(static, 1)
    for (int t = 0; t < 2; t++) run_decode_job(&jobs[t]);
}

/* Run-time activations as a W4A4 product reads them: x (rows, k) quantized with the global scale of its finite
 * amax, max(amax / (448 * 6), 2**-126) (search.global_scale: an IEEE division), written to *pts, and decoded into
 * values (rows, k), the global scale left out: quantize and decode (layout.unscaled_values) in one pass, the
 * same bits. */
extern "C" void scalesearch_fake_quantize(const float *x, int64_t rows, int64_t k, int method, int low, int high,
                                          float *values, float *pts, int threads) {
    float scale = scalesearch_finite_amax(x, rows * k) / (448.0f * 6.0f);
    *pts = scale < 0x1p-126f ? 0x1p-126f : scale;
    quantize(x, rows, k, pts, 0, 0, method, low, high, 0, 0, 0, 0, values, threads);
}
