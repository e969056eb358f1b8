/* NVFP4 quantization with scale search on a CPU: bit for bit search.quantize_reference.
 *
 * One pass over each block of 16 values: sanitise and normalise, block amax, amax code, every candidate's error
 * (16 values in registers, no allocation), the best code kept, the codes rounded and packed. The arithmetic is
 * the reference's, operation for operation, in IEEE float32: built with -ffp-contract=off (no fused
 * multiply-add) and without -ffast-math, so the compiler may vectorise but not reassociate, and every rounding
 * (E2M1 by adding and subtracting 2**22 times the grid spacing, E4M3 on the bit pattern) is the reference's.
 *
 * Layouts: x float32 (rows, k) contiguous, k a multiple of 16; pts and norm float32, one per row or one for all
 * (pts_stride 0): the normalised global scale pts * 2**-e and the normaliser 2**-e; weights float32 (k) or NULL;
 * out qdata uint8 (rows, k / 2) (element 2i in the low nibble), scale codes uint8 and offsets int16 (rows, k / 16).
 */
#include <pthread.h>
#include <stdint.h>
#include <string.h>

/* LANES blocks at a time, one a vector lane (GCC/Clang vector extensions), so the per-block work (amax, scale
 * codes, error sums) is vertical too: as wide as the registers the build targets (-march), since wider vectors
 * than the hardware's are split into scalar code for comparisons (AVX2 with 16 lanes: 8x slower than 8 lanes).
 * Comparisons give lane masks of all ones or zeros. Everything is inlined into the entry point. */
#if defined(__AVX512F__)
#define LANES 16
#elif defined(__AVX2__)
#define LANES 8
#else
#define LANES 4
#endif
#define INLINE inline __attribute__((always_inline))

enum { BLOCK = 16, MAX_CODE = 126, NAN_CODE = 127 };
enum { METHOD_AMAX = 0, METHOD_SEARCH = 1, METHOD_FOUR_OVER_SIX = 2, METHOD_EXHAUSTIVE = 3 };

typedef float vf __attribute__((vector_size(4 * LANES)));
typedef int32_t vi __attribute__((vector_size(4 * LANES)));

static INLINE vf select_f(vi mask, vf a, vf b) { return (vf)((mask & (vi)a) | (~mask & (vi)b)); }
static INLINE vi select_i(vi mask, vi a, vi b) { return (mask & a) | (~mask & b); }
static INLINE vf clamp_f(vf x, float low, float high) {
    x = select_f(x < low, (vf){} + low, x);
    return select_f(x > high, (vf){} + high, x);
}
static INLINE vi clamp_i(vi x, int low, int high) {
    x = select_i(x < low, (vi){} + low, x);
    return select_i(x > high, (vi){} + high, x);
}
static INLINE vf magnitude(vf x) { return (vf)((vi)x & 0x7FFFFFFF); }

/* Value of E4M3 codes 1..126: a normal code e << 3 | m is the float32 with exponent e + 120 and mantissa m << 20,
 * a subnormal one m * 2**-9 (exact). */
static INLINE vf e4m3_value(vi code) {
    vi mantissa = code & 7;
    vf normal = (vf)(((code >> 3) + 120) << 23 | mantissa << 20);
    return select_f(code >= 8, normal, __builtin_convertvector(mantissa, vf) * 0x1p-9f);
}

/* Amax code of blocks: e4m3(clamp(amax / divisor / pts, 2**-6, 448)), rounded to nearest even on the bit pattern
 * (formats.e4m3_encode; the clamp keeps the value normal). */
static INLINE vi amax_code(vf block_amax, float divisor, vf pts) {
    vi bits = (vi)clamp_f(block_amax / divisor / pts, 0x1p-6f, 448.0f);
    vi code = ((bits + 0x7FFFF + ((bits >> 20) & 1)) >> 20) - ((127 - 7) << 3);
    return clamp_i(code, 0, MAX_CODE);
}

/* Nearest E2M1 magnitude of a >= 0, ties to even, saturating at 6 (formats.e2m1_round): adding and subtracting
 * 2**22 times the grid spacing rounds to the grid. */
static INLINE vf e2m1_round(vf a) {
    vf y = select_f(a > 6.0f, (vf){} + 6.0f, a);
    vf magic = clamp_f((vf)((vi)y & 0x7F800000), 1.0f, 4.0f) * 0x1p22f;
    return (y + magic) - magic;
}

/* Magnitude code 0..7 of E2M1 grid values (comparisons are -1 where true). */
static INLINE vi e2m1_magnitude_code(vf v) {
    vi doubled = __builtin_convertvector(2.0f * select_f(v > 2.0f, (vf){} + 2.0f, v), vi);
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

/* Quantize LANES consecutive blocks starting at block g0 (count of them valid). */
static INLINE void quantize_blocks(const float *x, int64_t g0, int count, int64_t blocks_per_row, const float *pts,
                                   const float *norm, int64_t pts_stride, const float *weights, int method,
                                   int low, int high, int finite, uint8_t *qdata, uint8_t *scale_codes,
                                   int16_t *offsets) {
    float lanes[2][BLOCK][LANES], p_lanes[LANES], n_lanes[LANES];  /* [i][j]: value i of block g0 + j */
    if (count < LANES) memset(lanes, 0, sizeof lanes);
    int64_t row = g0 / blocks_per_row, column = g0 % blocks_per_row;  /* of block g0 + j, stepped with j */
    for (int j = 0; j < LANES; j++) {
        p_lanes[j] = pts[row * pts_stride];
        n_lanes[j] = norm[row * pts_stride];
        if (j < count)
            for (int i = 0; i < BLOCK; i++) lanes[0][i][j] = x[(g0 + j) * BLOCK + i];
        if (weights)
            for (int i = 0; i < BLOCK; i++) lanes[1][i][j] = weights[column * BLOCK + i];
        if (j + 1 < count && ++column == blocks_per_row) row++, column = 0;
    }
    vf v[BLOCK], m[BLOCK], w[BLOCK], p, n, block_amax = {};
    vi bad = {};
    memcpy(v, lanes[0], sizeof v);
    if (weights) memcpy(w, lanes[1], sizeof w);
    memcpy(&p, p_lanes, sizeof p);
    memcpy(&n, n_lanes, sizeof n);
    for (int i = 0; i < BLOCK; i++) {
        if (!finite) {
            vi is_finite = ((vi)v[i] & 0x7F800000) != 0x7F800000;
            bad |= ~is_finite;
            v[i] = select_f(is_finite, v[i], (vf){});
        }
        v[i] *= n;
        m[i] = magnitude(v[i]);
        block_amax = select_f(m[i] > block_amax, m[i], block_amax);
    }
    vf inverse = 1.0f / p;
    vi first = amax_code(block_amax, 6.0f, p), best = first;
    const vf *wp = weights ? w : 0;
    if (method != METHOD_AMAX) {
        vf best_error = block_error(m, wp, first, p, inverse);
        vi four = method == METHOD_FOUR_OVER_SIX ? amax_code(block_amax, 4.0f, p) : first;
        int lo = low, hi = high;
        if (method == METHOD_EXHAUSTIVE) lo = 1, hi = MAX_CODE;
        if (method == METHOD_FOUR_OVER_SIX) lo = hi = 1;
        for (int d = lo; d <= hi; d++) {
            if (method == METHOD_SEARCH && d == 0) continue;
            vi code = method == METHOD_SEARCH ? first + d : method == METHOD_FOUR_OVER_SIX ? four : (vi){} + d;
            vf error = block_error(m, wp, clamp_i(code, 1, MAX_CODE), p, inverse);
            vi better = (error < best_error) & (code >= 1) & (code <= MAX_CODE);
            best_error = select_f(better, error, best_error);
            best = select_i(better, code, best);
        }
    }
    vf multiplier = inverse / e4m3_value(best);
    vi codes[BLOCK];
    for (int i = 0; i < BLOCK; i++) {
        vf y = clamp_f(v[i] * multiplier, -6.0f, 6.0f);
        codes[i] = e2m1_magnitude_code(e2m1_round(magnitude(y))) | (((vi)y >> 31) & 8);
    }
    first = select_i(bad, (vi){} + NAN_CODE, first);
    best = select_i(bad, (vi){} + NAN_CODE, best);
    int32_t packed[BLOCK / 2][LANES], best_lanes[LANES], offset_lanes[LANES];
    for (int i = 0; i < BLOCK / 2; i++) {
        vi byte = codes[2 * i] | codes[2 * i + 1] << 4;
        memcpy(packed[i], &byte, sizeof byte);
    }
    vi offset = best - first;
    memcpy(best_lanes, &best, sizeof best);
    memcpy(offset_lanes, &offset, sizeof offset);
    for (int j = 0; j < count; j++) {
        for (int i = 0; i < BLOCK / 2; i++) qdata[(g0 + j) * (BLOCK / 2) + i] = (uint8_t)packed[i][j];
        scale_codes[g0 + j] = (uint8_t)best_lanes[j];
        offsets[g0 + j] = (int16_t)offset_lanes[j];
    }
}

/* A contiguous range of blocks [first, last) for one thread; first is a multiple of LANES. */
struct job {
    const float *x, *pts, *norm, *weights;
    int64_t first, last, blocks_per_row, pts_stride;
    int method, low, high, finite;
    uint8_t *qdata, *scale_codes;
    int16_t *offsets;
};

static void *run_job(void *arg) {
    const struct job *j = arg;
    for (int64_t g0 = j->first; g0 < j->last; g0 += LANES)
        quantize_blocks(j->x, g0, j->last - g0 < LANES ? (int)(j->last - g0) : LANES, j->blocks_per_row, j->pts,
                        j->norm, j->pts_stride, j->weights, j->method, j->low, j->high, j->finite, j->qdata,
                        j->scale_codes, j->offsets);
    return 0;
}

/* Quantize x (rows, k) on up to `threads` threads (this one and threads - 1 POSIX threads, each a contiguous
 * share of the blocks; a thread that cannot be started has its share run here). */
void scalesearch_quantize(const float *x, int64_t rows, int64_t k, const float *pts, const float *norm,
                          int64_t pts_stride, const float *weights, int method, int low, int high, int finite,
                          uint8_t *qdata, uint8_t *scale_codes, int16_t *offsets, int threads) {
    enum { MAX_THREADS = 64 };
    int64_t blocks_per_row = k / BLOCK, blocks = rows * blocks_per_row, groups = (blocks + LANES - 1) / LANES;
    threads = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
    if (threads > groups) threads = (int)groups;
    struct job jobs[MAX_THREADS];
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int t = 0; t < threads; t++) {
        int64_t first = groups * t / threads * LANES, last = groups * (t + 1) / threads * LANES;
        jobs[t] = (struct job){x,    pts,  norm,   weights, first,       last < blocks ? last : blocks,
                               blocks_per_row, pts_stride, method, low, high, finite, qdata, scale_codes, offsets};
    }
    for (int t = 1; t < threads; t++) started[t] = pthread_create(&ids[t], 0, run_job, &jobs[t]) == 0;
    for (int t = 0; t < threads; t++)
        if (!started[t]) run_job(&jobs[t]);
    for (int t = 1; t < threads; t++)
        if (started[t]) pthread_join(ids[t], 0);
}
