"""@triton.jit helpers for NVFP4 tiles: E2M1 / E4M3 rounding and decoding, scale selection, (un)packing.

They reproduce ``scalesearch_compile.formats`` and ``scalesearch_compile.search`` bit for bit:
- every rounding is written with float32 add/sub/mul, IEEE division (``tl.math.div_rn``) and integer bit
  arithmetic, never with a float cast (Triton's interpreter truncates float casts, so tests could not check
  them);
- callers must launch with ``enable_fp_fusion=False``: an FMA contraction of ``|x| - q * s`` changes the
  block error's bits (Triton contracts by default on GPUs).

Layouts: a tile is float32 ``[ROWS, BLOCK_K]`` with BLOCK_K a multiple of 16, so it holds ``BLOCK_K // 16``
whole NVFP4 blocks per row. E2M1 codes are int32 0..15 (bit 3 the sign), E4M3 scale codes int32 0..126.
Packed bytes hold element 2i in the low nibble.
"""

import importlib
import inspect
import os
import pickle
import re
import subprocess
import sys
import tempfile

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Globals a @triton.jit function reads must be tl.constexpr instances (the interpreter does not check this).
NATIVE_16_BIT = tl.constexpr(not INTERPRET)  # the interpreter runs no inline PTX and multiplies bfloat16 wrongly
NVFP4_BLOCK = tl.constexpr(16)
E2M1_MAX = tl.constexpr(6.0)
E4M3_MAX = tl.constexpr(448.0)
E4M3_MIN_NORMAL = tl.constexpr(2.0**-6)
E4M3_MAX_CODE = tl.constexpr(126)
E4M3_NAN_CODE = tl.constexpr(127)
NORMALISED_EXPONENT = tl.constexpr(12)  # search.NORMALISED_EXPONENT
GLOBAL_SCALE_MIN = tl.constexpr(2.0**-126)  # search.GLOBAL_SCALE_MIN


@triton.jit
def e2m1_round(a, SATURATE: tl.constexpr = True):
    """Nearest E2M1 magnitude of float32 ``a >= 0``, ties to even, saturating at 6 (``formats.e2m1_round``).

    Adding and removing ``2**22 * spacing`` (spacing 0.5 / 1 / 2: half the power of two at or below
    ``max(y, 1)``, read from its exponent bits; y <= 6 keeps that power at most 4) makes float32's
    round-to-nearest-even land on the E2M1 grid. Each is one FMA of the power by +-2**22: the product is exact,
    so the FMA rounds once, as the add and the subtract do (one instruction a value less than multiply, add,
    subtract). ``SATURATE=False`` leaves out ``min(a, 6)`` for a caller that knows ``a <= 6``.
    """
    y = tl.minimum(a, E2M1_MAX) if SATURATE else a
    power = (tl.maximum(y, 1.0).to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)
    return tl.fma(power, -4194304.0, tl.fma(power, 4194304.0, y))


@triton.jit
def e2m1_magnitude_code(v):
    """int32 code 0..7 of an exact E2M1 magnitude ``v`` (0, 0.5, ..., 6); the sums are small exact integers."""
    code = 2.0 * tl.minimum(v, 2.0) + tl.minimum(tl.maximum(v - 2.0, 0.0), 2.0)
    code += tl.minimum(tl.maximum((v - 4.0) * 0.5, 0.0), 1.0)
    return code.to(tl.int32)


@triton.jit
def e2m1_value(codes):
    """float32 value of int32 E2M1 codes 0..15 (code 8 is -0.0), built from bits.

    Magnitude code ``e m`` (2 exponent bits, 1 mantissa bit) is ``m * 0.5`` for e == 0, else float32 bits
    ``(e + 126) << 23 | m << 22``; the sign moves from bit 3 to bit 31.
    """
    exponent = (codes >> 1) & 3
    mantissa = codes & 1
    normal = ((exponent + 126) << 23) | (mantissa << 22)
    bits = tl.where(exponent == 0, mantissa * 0x3F000000, normal)  # 0x3F000000 is 0.5
    return (bits | ((codes & 8) << 28)).to(tl.float32, bitcast=True)


@triton.jit
def e4m3_encode(x):
    """E4M3 code (int32) of float32 ``x`` in [2**-6, 448]: nearest, ties to even (``formats.e4m3_encode``).

    Only the normal range is needed: every amax-derived scale is clamped to at least 2**-6 first.
    """
    bits = x.to(tl.int32, bitcast=True)
    rounded = (bits + 0x7FFFF + ((bits >> 20) & 1)) >> 20
    return tl.minimum(rounded - ((127 - 7) << 3), E4M3_MAX_CODE)


@triton.jit
def e4m3_value(code):
    """float32 value of int32 E4M3 codes 0..126: subnormals ``m * 2**-9``, normals from float32 bits."""
    exponent = code >> 3
    mantissa = code & 7
    normal = (((exponent + 120) << 23) | (mantissa << 20)).to(tl.float32, bitcast=True)
    return tl.where(exponent == 0, mantissa.to(tl.float32) * 0.001953125, normal)  # 2**-9


@triton.jit
def normaliser(pts):
    """``2**-e`` with ``e`` the exponent of float32 ``pts > 0`` plus 12, clamped to -114..126, from the bits
    (``search.normaliser``)."""
    exponent = ((pts.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    e = tl.minimum(tl.maximum(exponent + NORMALISED_EXPONENT, -114), 126)
    return ((127 - e) << 23).to(tl.float32, bitcast=True)


@triton.jit
def amax_code(block_amax, pts, DIVISOR: tl.constexpr):
    """E4M3 code of ``clamp(block_amax / DIVISOR / pts, 2**-6, 448)`` (``search._amax_code``). A DIVISOR of 4 is
    a multiply by 0.25: the same real number, so the same rounding."""
    if DIVISOR == 4.0:
        quotient = block_amax * 0.25
    else:
        quotient = tl.math.div_rn(block_amax, DIVISOR)
    scale = tl.math.div_rn(quotient, pts)
    return e4m3_encode(tl.minimum(tl.maximum(scale, E4M3_MIN_NORMAL), E4M3_MAX))


@triton.jit
def scale_factors(code, pts):
    """(quantize multiplier, dequantize scale) of E4M3 ``code`` clamped to 1..126: ``((1 / pts) / s, pts * s)``
    (``search._scale_factors``)."""
    scale = e4m3_value(tl.minimum(tl.maximum(code, 1), E4M3_MAX_CODE))
    return tl.math.div_rn(tl.math.div_rn(1.0, pts), scale), pts * scale


@triton.jit
def _add_neighbours(values, ROWS: tl.constexpr, NUM_BLOCKS: tl.constexpr, HALF: tl.constexpr):
    """``[ROWS, NUM_BLOCKS, 2 * HALF]`` -> ``[ROWS, NUM_BLOCKS, HALF]``: element i is ``v[2i] + v[2i + 1]``."""
    even, odd = tl.split(tl.reshape(values, (ROWS, NUM_BLOCKS, HALF, 2)))
    return even + odd


@triton.jit
def _pairwise_sum16(values, ROWS: tl.constexpr, NUM_BLOCKS: tl.constexpr):
    """Sum ``[ROWS, NUM_BLOCKS, 16]`` over the last axis as the tree 16 -> 8 -> 4 -> 2 -> 1 of neighbours."""
    values = _add_neighbours(values, ROWS, NUM_BLOCKS, 8)
    values = _add_neighbours(values, ROWS, NUM_BLOCKS, 4)
    values = _add_neighbours(values, ROWS, NUM_BLOCKS, 2)
    return tl.reshape(_add_neighbours(values, ROWS, NUM_BLOCKS, 1), (ROWS, NUM_BLOCKS))


@triton.jit
def block_error(
    mag,
    code,
    pts,
    weights,
    HAS_WEIGHTS: tl.constexpr,
    ROWS: tl.constexpr,
    NUM_BLOCKS: tl.constexpr,
    UNSATURATED: tl.constexpr = False,
):
    """``(err, q)``: each block's ``err``, the sum of ``w * (|x| - q * (pts * s))**2`` (``search._block_error``),
    with ``q = e2m1(|x| * mult)`` the E2M1 magnitudes of the block under that scale.

    ``mag``: |x| as ``[ROWS, NUM_BLOCKS, 16]``; ``code``: ``[ROWS, NUM_BLOCKS]`` scale codes (clamped to
    1..126 here; the caller discards invalid ones); ``weights``: ``[1, NUM_BLOCKS, 16]`` per-channel
    importance w (read only if HAS_WEIGHTS, else w = 1).

    UNSATURATED: every valid ``code`` keeps ``|x| * mult`` below 7, so ``min(., 6)`` is left out (E2M1's spacing
    above 4 is 2: below 7 the rounding gives at most 6). This holds for the amax code when ``amax / 6 / pts`` is
    at most 448 (not clamped from above): E4M3 rounds it to within 1/16, so ``amax * mult < 6 * (1 + 1/16)``; and
    for any code above it, at least one E4M3 step above. Codes below the amax code can reach 7.
    """
    multiplier, dequant_scale = scale_factors(code, pts)
    q = e2m1_round(mag * multiplier[:, :, None], not UNSATURATED)
    diff = mag - q * dequant_scale[:, :, None]
    err = diff * diff
    if HAS_WEIGHTS:
        err = err * weights
    return _pairwise_sum16(err, ROWS, NUM_BLOCKS), q


@triton.jit
def _keep_better(best_code, best_err, best_q, code, err, q, KEEP_Q: tl.constexpr, first=False):
    """A candidate replaces the best (code, error and, with KEEP_Q, E2M1 magnitudes) only with a strictly lower
    error and a code in 1..126, or unconditionally when ``first`` (the amax code, evaluated first)."""
    better = ((err < best_err) & (code >= 1) & (code <= E4M3_MAX_CODE)) | first
    if KEEP_Q:
        best_q = tl.where(better[:, :, None], q, best_q)
    return tl.where(better, code, best_code), tl.where(better, err, best_err), best_q


@triton.jit
def quantize_tile(
    x,
    pts,
    HAS_PTS: tl.constexpr,
    METHOD: tl.constexpr,
    LO: tl.constexpr,
    HI: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    weights=None,
    HAS_WEIGHTS: tl.constexpr = False,
    KEEP_MAGNITUDES: tl.constexpr = True,
    SCALE_FITS: tl.constexpr = False,
):
    """Quantize a float32 tile ``[ROWS, BLOCK_K]`` to NVFP4 exactly as ``search.quantize_reference``.

    ``pts``: float32 ``[ROWS, 1]`` global scale (1 unless HAS_PTS); x and pts are normalised by
    :func:`normaliser` first, as the reference. ``weights``: float32 ``[1, BLOCK_K // 16, 16]`` importance of
    the tile's input channels (ignored unless HAS_WEIGHTS). METHOD: "amax", "four_over_six", "search" (code
    offsets LO..HI around the amax code), "fast_search" or "exhaustive". The amax code is evaluated first and
    candidates follow in the reference's order, so ties resolve the same way. NaN and Inf are quantized as zeros
    and their block gets the NaN scale code 127 (as its amax code, so its offset is 0). KEEP_MAGNITUDES: a search
    of two or three candidates keeps its winner's E2M1 magnitudes in registers instead of rounding again.
    SCALE_FITS: every block's ``amax / 6 / pts`` is at most 448 (``pts`` at least the tile's amax / 2688, as
    attention's per-row P scale): the amax code, and four_over_six's code above it, are evaluated without
    saturation (:func:`block_error`'s UNSATURATED).
    Returns ``(codes [ROWS, BLOCK_K] int32 E2M1, scale codes [ROWS, BLOCK_K // 16] int32, amax codes)``.
    """
    NUM_BLOCKS: tl.constexpr = BLOCK_K // NVFP4_BLOCK
    x = tl.reshape(x, (ROWS, NUM_BLOCKS, NVFP4_BLOCK))
    finite = (x.to(tl.int32, bitcast=True) & 0x7F800000) != 0x7F800000  # exponent all ones: NaN or Inf
    non_finite_block = tl.max(tl.where(finite, 0, 1), axis=2) > 0
    if not HAS_PTS:
        pts = tl.full((ROWS, 1), 1.0, tl.float32)
    norm = normaliser(pts)
    x = tl.where(finite, x, 0.0) * norm[:, :, None]
    pts = pts * norm
    mag = tl.abs(x)
    block_amax = tl.max(mag, axis=2)
    first_code = amax_code(block_amax, pts, E2M1_MAX)
    best_code = first_code
    # A search of two or three candidates keeps the winner's E2M1 magnitudes (a select a value and candidate)
    # unless the caller is short of registers (KEEP_MAGNITUDES False: attention's P spilled 164 bytes); longer
    # ones round the block again with the winner (sm_100a, 32 x 128 tiles of "search": 142 instead of 130
    # thread-instructions an element when kept).
    KEEP_Q: tl.constexpr = KEEP_MAGNITUDES and (METHOD == "fast_search" or METHOD == "four_over_six")
    if METHOD == "amax":
        multiplier, _ = scale_factors(first_code, pts)
        magnitude = e2m1_round(mag * multiplier[:, :, None])
    elif METHOD == "four_over_six":
        # The amax code and the four_over_six code in one loop, the amax code first and kept unconditionally (as
        # the reference keeps it): evaluated before the loop, as the other methods do, its temporaries stayed live
        # beside the loop's, and attention's P spilled 28 bytes on sm_90a (BLOCK_M 64 w4) and cost 11-35 more
        # thread-instructions a score (benchmarks/kernel_static.py).
        four = amax_code(block_amax, pts, 4.0)
        best_err = tl.full((ROWS, NUM_BLOCKS), float("inf"), tl.float32)
        magnitude = mag  # replaced on the first trip
        for i in range(2):
            code = tl.where(i == 0, first_code, four)
            err, q = block_error(mag, code, pts, weights, HAS_WEIGHTS, ROWS, NUM_BLOCKS, SCALE_FITS)
            best_code, best_err, magnitude = _keep_better(best_code, best_err, magnitude, code, err, q, KEEP_Q, i == 0)
    else:
        best_err, magnitude = block_error(mag, first_code, pts, weights, HAS_WEIGHTS, ROWS, NUM_BLOCKS, SCALE_FITS)
        if METHOD == "fast_search":
            four = amax_code(block_amax, pts, 4.0)
            # A loop, as "search": unrolled, the attention kernel's P spilled 36-60 bytes on sm_90a (BLOCK_M 64).
            for i in range(2):
                code = tl.where(i == 0, first_code - 1, four)
                err, q = block_error(mag, code, pts, weights, HAS_WEIGHTS, ROWS, NUM_BLOCKS)
                best_code, best_err, magnitude = _keep_better(best_code, best_err, magnitude, code, err, q, KEEP_Q)
        if METHOD == "search":
            # A loop, not unrolled: one candidate's temporaries are live at a time (unrolled, the attention
            # kernel's P search spilled 40-92 bytes in benchmarks/kernel_static.py's builds).
            for offset in range(LO, HI + 1):
                if offset != 0:
                    code = first_code + offset
                    err, q = block_error(mag, code, pts, weights, HAS_WEIGHTS, ROWS, NUM_BLOCKS)
                    best_code, best_err, magnitude = _keep_better(best_code, best_err, magnitude, code, err, q, KEEP_Q)
        if METHOD == "exhaustive":
            for candidate in range(1, E4M3_MAX_CODE + 1):
                code = tl.full((ROWS, NUM_BLOCKS), candidate, tl.int32)
                err, q = block_error(mag, code, pts, weights, HAS_WEIGHTS, ROWS, NUM_BLOCKS)
                best_code, best_err, magnitude = _keep_better(best_code, best_err, magnitude, code, err, q, KEEP_Q)
    if METHOD != "amax" and not KEEP_Q:
        multiplier, _ = scale_factors(best_code, pts)
        magnitude = e2m1_round(mag * multiplier[:, :, None])

    # |x * m| == |x| * m exactly, and the code keeps the sign bit of x (-0.0 gives code 8, as the reference).
    sign = (x.to(tl.int32, bitcast=True) >> 28) & 8
    codes = e2m1_magnitude_code(magnitude) | sign
    best_code = tl.where(non_finite_block, E4M3_NAN_CODE, best_code)
    first_code = tl.where(non_finite_block, E4M3_NAN_CODE, first_code)
    return tl.reshape(codes, (ROWS, BLOCK_K)), best_code, first_code


@triton.jit
def pack_nibbles(codes, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """int32 codes ``[ROWS, BLOCK_K]`` -> uint8 ``[ROWS, BLOCK_K // 2]``, element 2i in the low nibble."""
    low, high = tl.split(tl.reshape(codes, (ROWS, BLOCK_K // 2, 2)))
    return (low | (high << 4)).to(tl.uint8)


@triton.jit
def unpack_nibbles(packed, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """uint8 ``[ROWS, BLOCK_K // 2]`` -> int32 codes ``[ROWS, BLOCK_K]`` (inverse of :func:`pack_nibbles`)."""
    packed = packed.to(tl.int32)
    return tl.reshape(tl.join(packed & 0xF, packed >> 4), (ROWS, BLOCK_K))


@triton.jit
def dequantize_tile(codes, scale_codes, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """float32 ``e2m1(codes) * e4m3(scale_codes)``: int32 ``[ROWS, BLOCK_K]`` codes, ``[ROWS, BLOCK_K // 16]`` scales
    (the NaN code 127 gives NaN, which propagates through the dot as in a float matmul).

    The product of a 2-bit E2M1 significand and a 4-bit E4M3 one is exact in float32, and also in fp16
    and bf16 (values 2**-10 .. 2688), so a tile dequantized here can enter ``tl.dot`` in half precision
    with no rounding; the global scales are applied after the dot.
    """
    NUM_BLOCKS: tl.constexpr = BLOCK_K // NVFP4_BLOCK
    scale_codes = scale_codes.to(tl.int32)
    scales = tl.where(scale_codes == E4M3_NAN_CODE, float("nan"), e4m3_value(scale_codes))
    values = tl.reshape(e2m1_value(codes), (ROWS, NUM_BLOCKS, NVFP4_BLOCK))
    return tl.reshape(values * scales[:, :, None], (ROWS, BLOCK_K))


DEQUANTIZED_SCALE = tl.constexpr(2.0**8)  # dequantize_words returns e2m1 * e4m3 / DEQUANTIZED_SCALE
_SUBNORMAL_TO_SHIFTED = tl.constexpr(2.0 ** (126 - 8))  # takes e2m1 * 2**-126 to e2m1 / DEQUANTIZED_SCALE


@triton.jit
def dequantize_words(words, scale_codes, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """float32 ``e2m1(codes) * e4m3(scale_codes) * 2**-8`` ``[ROWS, BLOCK_K]`` of int32 words ``[ROWS, BLOCK_K // 8]``
    (the packed bytes read four at a time, little-endian: element ``8i + j`` is bits ``4j .. 4j + 3`` of word i)
    and scale codes ``[ROWS, BLOCK_K // 16]`` (code 127 gives NaN, as :func:`dequantize_tile`).

    Cheaper than :func:`dequantize_tile` (one shift-and-mask pair per field instead of decoding exponent and
    mantissa): the code's magnitude bits placed at float32 bits 22-24 and its sign at bit 31 make the float32
    ``e2m1 * 2**-126`` (a subnormal for exponent 0: 0.5 * 2**-126 is mantissa 2**22), and one multiply by
    ``e4m3 * 2**118`` (at most 448 * 2**118 < 2**127) gives ``e2m1 * e4m3 * 2**-8``: a product of a 2-bit and a
    4-bit significand in [2**-18, 10.5], exact in float32, float16 (multiples of 2**-18 are representable there)
    and bfloat16. The caller multiplies its float32 dot products by ``DEQUANTIZED_SCALE = 2**8`` (exact). Needs
    subnormals kept (no flush to zero), which Triton's float32 multiply does (``mul.f32``, no ``.ftz``)."""
    scale_codes = scale_codes.to(tl.int32)
    scales = tl.where(scale_codes == E4M3_NAN_CODE, float("nan"), e4m3_value(scale_codes) * _SUBNORMAL_TO_SHIFTED)
    scales = tl.reshape(tl.join(scales, scales), (ROWS, BLOCK_K // 8))  # a word lies in one block
    words = words.to(tl.uint32, bitcast=True)
    # The eight elements of a word are joined in registers (tl.join keeps the new axis in one thread), so each
    # thread holds whole words and stores its dequantized values contiguously; a [ROWS, BLOCK_K // 8, 8] tensor
    # of shifts spread them over eight threads.
    v0, v1 = _word_element(words, 0, scales), _word_element(words, 1, scales)
    v2, v3 = _word_element(words, 2, scales), _word_element(words, 3, scales)
    v4, v5 = _word_element(words, 4, scales), _word_element(words, 5, scales)
    v6, v7 = _word_element(words, 6, scales), _word_element(words, 7, scales)
    # joined[..., a, b, c] is element 4a + 2b + c of the word
    even = tl.join(tl.join(v0, v4), tl.join(v2, v6))
    odd = tl.join(tl.join(v1, v5), tl.join(v3, v7))
    return tl.reshape(tl.join(even, odd), (ROWS, BLOCK_K))


@triton.jit
def _word_element(words, j: tl.constexpr, scales):
    """float32 element j (bits 4j .. 4j + 3) of uint32 ``words`` times ``scales`` (:func:`dequantize_words`)."""
    nibbles = words >> (4 * j)
    bits = ((nibbles & 7) << 22) | ((nibbles & 8) << 28)
    return bits.to(tl.float32, bitcast=True) * scales


@triton.jit
def dequantize_pairs(words, scale_codes, DTYPE: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """DTYPE (bfloat16 or float16) ``e2m1(codes) * e4m3(scale_codes) * 2**-8`` ``[ROWS, BLOCK_K]``: the values of
    :func:`dequantize_words` (same arguments) in *pair order*, each word's eight elements at positions 0, 2, 4, 6,
    1, 3, 5, 7, so that position ``2j`` holds element ``j`` and ``2j + 1`` element ``j + 4`` (:func:`pair_order`
    puts an activation tile in the same order, which leaves their dot product unchanged).

    Two values at once: a word's nibbles j and j + 4 lie 16 bits apart, as the halves of two 16-bit floats in 32
    bits do. A nibble's magnitude bits moved to bits 6-8 of its half (bfloat16: the exponent's two low bits and the
    top mantissa bit; float16: bits 9-11) and its sign to bit 15 make the half ``e2m1 * 2**-126`` (float16:
    ``e2m1 * 2**-14``), a subnormal for exponent 0; one two-way FMA by the block's ``e4m3 * 2**118`` (float16:
    ``* 2**6``) plus -0 gives both values, exact (a 2-bit times a 4-bit significand, in range; a 16-bit FMA keeps
    subnormal inputs). The bits move four nibbles at a time: a select word takes four nibbles' magnitude bits from
    the word and their signs from the word shifted by SIGN_LEAD (a sign moves that much further than its magnitude
    bits), then one shift and one mask a pair: about 15 integer instructions a word (:func:`dequantize_words`: 40).
    The four nibbles (bfloat16: 0, 1, 4, 5, then 2, 3, 6, 7; float16: 0, 2, 4, 6, then 1, 3, 5, 7) are those whose
    moved sign bits land on no magnitude bit the group keeps."""
    if DTYPE == tl.bfloat16:
        MAG_AT: tl.constexpr = 6
        SIGN_LEAD: tl.constexpr = 6
        GROUP_MAGNITUDES: tl.constexpr = 0x00770077
        GROUP_SHIFT: tl.constexpr = 8  # nibbles 2, 3, 6, 7 to 0, 1, 4, 5
        SECOND: tl.constexpr = 1  # a group's second nibble, from its first
        FACTOR: tl.constexpr = 2.0**119  # twice: 2**-120 to 2**118
    else:
        MAG_AT: tl.constexpr = 9
        SIGN_LEAD: tl.constexpr = 3
        GROUP_MAGNITUDES: tl.constexpr = 0x07070707
        GROUP_SHIFT: tl.constexpr = 4  # nibbles 1, 3, 5, 7 to 0, 2, 4, 6
        SECOND: tl.constexpr = 2
        FACTOR: tl.constexpr = 2.0**63  # twice: 2**-120 to 2**6
    scale_codes = scale_codes.to(tl.int32)
    # float32 bits ``code << 20`` are e4m3 * 2**-120 (E4M3 subnormals become float32 subnormals); two exact
    # multiplies make the block's factor, exact in DTYPE
    scales = (scale_codes << 20).to(tl.float32, bitcast=True) * FACTOR * FACTOR
    scales = tl.where(scale_codes == E4M3_NAN_CODE, float("nan"), scales).to(DTYPE)
    scales = tl.reshape(tl.join(scales, scales), (ROWS, BLOCK_K // 8))  # a word lies in one block
    words = words.to(tl.uint32, bitcast=True)
    HALVES: tl.constexpr = 0x80008000 | (0x00070007 << MAG_AT)  # a pair's sign and magnitude bits
    first = _select_signs(words, GROUP_MAGNITUDES, SIGN_LEAD)
    second = _select_signs(words >> GROUP_SHIFT, GROUP_MAGNITUDES, SIGN_LEAD)
    low0, high0 = _scaled_halves((first << MAG_AT) & HALVES, scales, DTYPE)
    low1, high1 = _scaled_halves((first << (MAG_AT - 4 * SECOND)) & HALVES, scales, DTYPE)
    low2, high2 = _scaled_halves((second << MAG_AT) & HALVES, scales, DTYPE)
    low3, high3 = _scaled_halves((second << (MAG_AT - 4 * SECOND)) & HALVES, scales, DTYPE)
    # lowN: the first group's first and second nibble, then the second group's; joined[..., a, b] is nibble 2a + b
    if DTYPE == tl.bfloat16:  # the groups' nibbles 0, 1 and 2, 3
        lows = tl.join(tl.join(low0, low2), tl.join(low1, low3))
        highs = tl.join(tl.join(high0, high2), tl.join(high1, high3))
    else:  # 0, 2 and 1, 3
        lows = tl.join(tl.join(low0, low1), tl.join(low2, low3))
        highs = tl.join(tl.join(high0, high1), tl.join(high2, high3))
    # [..., a, b, h]: nibble 2a + b + 4h at position 4a + 2b + h; a pair's halves stay in one register
    return tl.reshape(tl.join(lows, highs), (ROWS, BLOCK_K))


@triton.jit
def _select_signs(words, GROUP_MAGNITUDES: tl.constexpr, SIGN_LEAD: tl.constexpr):
    """uint32: the bits of ``words`` at GROUP_MAGNITUDES, those of ``words << SIGN_LEAD`` elsewhere."""
    shifted = words << SIGN_LEAD
    return shifted ^ ((words ^ shifted) & GROUP_MAGNITUDES)


@triton.jit
def _scaled_halves(pair, scales, DTYPE: tl.constexpr):
    """The two 16-bit floats of uint32 ``pair`` (low half, high half) times DTYPE ``scales``."""
    if NATIVE_16_BIT:
        if DTYPE == tl.bfloat16:
            FMA: tl.constexpr = "fma.rn.bf16x2"
        else:
            FMA: tl.constexpr = "fma.rn.f16x2"
        low, high = tl.inline_asm_elementwise(
            "{ .reg .b32 s, z, p; mov.b32 s, {$3, $3}; mov.b32 z, 0x80008000; " + FMA + " p, $2, s, z; "
            "mov.b32 {$0, $1}, p; }",
            "=h,=h,r,h",
            [pair, scales],
            dtype=(scales.dtype, scales.dtype),
            is_pure=True,
            pack=1,
        )
    else:  # the interpreter runs no PTX: the same products in float32, exact, rounded to DTYPE exactly
        if DTYPE == tl.bfloat16:  # from the bits: the interpreter's bfloat16 casts flush subnormals
            low = (pair << 16).to(tl.float32, bitcast=True)
            high = (pair & 0xFFFF0000).to(tl.float32, bitcast=True)
        else:
            low = (pair & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
            high = (pair >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        low = (low * scales.to(tl.float32)).to(DTYPE)
        high = (high * scales.to(tl.float32)).to(DTYPE)
    return low, high


@triton.jit
def pair_order(x, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """``[ROWS, BLOCK_K]`` tile ``x`` with each eight columns in :func:`dequantize_pairs`'s order: 0, 4, 1, 5, 2,
    6, 3, 7."""
    x = tl.reshape(x, (ROWS, BLOCK_K // 8, 2, 4))  # [..., h, j]: column 4h + j
    return tl.reshape(tl.permute(x, (0, 1, 3, 2)), (ROWS, BLOCK_K))


# ---- host side: shared by the launchers and their tests ----


def autotune_configs(gpu_configs, interpreter_config):
    """The GPU configs, or the single one the interpreter can run (``@triton.autotune`` with more than one
    config fails under Triton 3.9's interpreter)."""
    return [interpreter_config] if INTERPRET else gpu_configs


# Rows of a tile whose tl.dot_scaled of two E2M1 operands Triton 3.9 lowers to sm_100's block-scaled FP4 MMA
# (tcgen05.mma kind::mxf4nvf4.block_scale.block16, read from the PTX); with fewer rows it upcasts to 16 bits
# (kind::f16 at 64 rows, mma.sync bf16 at 16).
NATIVE_FP4_BLOCK_M = 128


def native_fp4_tiles(configs: list, dot_scaled: bool) -> list:
    """Of the autotune ``configs``, those whose dot_scaled runs the native FP4 MMA when ``dot_scaled`` (all
    otherwise). Never empty: with no such tile all stay."""
    kept = [c for c in configs if not dot_scaled or c.kwargs["BLOCK_M"] >= NATIVE_FP4_BLOCK_M]
    return kept or configs


def autotune_key_gaps(kernel) -> set[str]:
    """Constexpr parameters of an ``@triton.autotune`` kernel that neither its configs set nor its key holds: a
    launch changing one would reuse the config tuned for other generated code."""
    fn = getattr(kernel.fn, "fn", kernel.fn)  # the Python function under the JIT or interpreter wrapper
    constexprs = {name for name, p in inspect.signature(fn).parameters.items() if p.annotation is tl.constexpr}
    tuned = {name for config in kernel.configs for name in config.kwargs}
    return constexprs - tuned - set(kernel.keys)


def check_kernel_device(tensor, what: str) -> None:
    """Raise ValueError unless ``tensor`` can be read by a Triton kernel here (CUDA, or any under the interpreter)."""
    if not INTERPRET and tensor.device.type != "cuda":
        raise ValueError(
            f"{what} is on {tensor.device}; the Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1 on CPU)"
        )


def compile_for_gpu(jobs, stages=("ttir", "ptx")) -> list[dict]:
    """Code of kernels compiled for NVIDIA targets with no GPU present (Triton's bundled ptxas checks it): per
    job ``{stage: code}`` for ``stages`` of Triton's pipeline ("ttir": Triton IR, where the kernel's own integer
    arithmetic is still visible; "ptx"; "cubin": bytes), plus "shared" (the dynamic shared memory a launch
    asks for, bytes) and, when "cubin" is asked for, "ptxas_log" (``ptxas -v``: registers, spills).

    Each job is ``(module, kernel name, {argument: type} for the non-constexpr arguments, {constexpr: value},
    compute capability, compile options[, {argument: attributes}])``; :func:`launch_job` builds one the way a
    launch specialises. The interpreter cannot compile, so under TRITON_INTERPRET=1 the jobs run in a fresh
    Python process without it; this is how the CPU tests catch errors that only a GPU build would meet (the
    interpreter accepts code a compiler rejects, such as non-constexpr globals).
    """
    if INTERPRET:
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "ptx.pickle")
            with open(path, "wb") as f:
                pickle.dump((jobs, tuple(stages)), f)
            env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
            child = f"from {__name__} import _compile_file; _compile_file({path!r})"
            done = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, check=False)
            if done.returncode:
                raise RuntimeError(f"compiling in a child process failed:\n{done.stderr[-6000:]}")
            with open(path, "rb") as f:
                return pickle.load(f)
    import contextlib
    import io

    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    results = []
    for module, name, signature, constexprs, capability, options, *attrs in jobs:
        fn = getattr(importlib.import_module(module), name)
        fn = fn.fn if hasattr(fn, "configs") else fn  # the JIT function under @triton.autotune
        full_signature = {arg: signature.get(arg, "constexpr") for arg in fn.arg_names}
        attrs = {(fn.arg_names.index(arg),): value for arg, value in (attrs[0] if attrs else {}).items()}
        target = GPUTarget("cuda", capability, 32)
        log = io.StringIO()
        # A cached build skips ptxas, and with it the log: build afresh when the log is wanted.
        wanted = "cubin" in stages
        with knobs.compilation.scope(), knobs.nvidia.scope(), contextlib.redirect_stdout(log):
            knobs.compilation.always_compile = wanted
            knobs.nvidia.dump_ptxas_log = wanted
            kernel = triton.compile(ASTSource(fn, full_signature, constexprs, attrs), target=target, options=options)
        result = {stage: kernel.asm[stage] for stage in stages}
        result["shared"] = kernel.metadata.shared
        if wanted:
            result["ptxas_log"] = log.getvalue()
        results.append(result)
    return results


def launch_job(module: str, name: str, args: dict, constexprs: dict, capability: int, options: dict) -> tuple:
    """A :func:`compile_for_gpu` job specialised as a launch with these arguments would be.

    ``args`` describes each non-constexpr argument: a pointer type such as ``"*bf16"`` (a tensor, taken to be
    16-byte aligned as PyTorch's allocations are), a Python int or float (the value). A launch marks aligned
    pointers and integers divisible by 16 with ``tt.divisibility = 16`` and turns an integer equal to 1 into
    a constant; the same rules are applied here, with Triton's own specialisation of the values.
    """
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    signature, constants, attrs = {}, dict(constexprs), {}
    for arg, value in args.items():
        if isinstance(value, str):
            kind, attr = value, "D"
        else:
            kind, attr = native_specialize_impl(BaseBackend, value, False, True, True)
        if kind == "constexpr":
            constants[arg] = attr
            continue
        signature[arg] = kind
        if attr:
            attrs[arg] = BaseBackend.parse_attr(attr)
    return (module, name, signature, constants, capability, options, attrs)


def int32_pointer_offsets(ttir: str) -> list[str]:
    """The ``tt.addptr`` lines of Triton IR that offset a tensor of pointers by 32-bit integers: offsets that
    wrap past 2**31 elements (scalar pointers offset by small constants are not listed)."""
    return [
        line.strip()
        for line in ttir.splitlines()
        if "tt.addptr" in line and re.search(r":\s*tensor<[^>]*!tt\.ptr<[^>]*>>,\s*tensor<[^>]*xi32>", line)
    ]


def contracted_fmas(ptx: str) -> list[str]:
    """The float32 FMAs of PTX other than :func:`e2m1_round`'s (by +-2**22, a power of two: the product is exact,
    so the FMA rounds once, as the add it replaces): those a compiler contracted from a multiply and an add,
    which round differently from the reference. sm_100 builds pair FMAs (``fma.rn.f32x2``), whose 2**22 operand
    is a register holding the constant twice."""
    magic = {"0f4A800000", "0fCA800000", "1249902592", "-897581056", "3397386240"}  # +-2**22, also as integers
    scalars, pairs = set(magic), set()
    for line in ptx.splitlines():
        move = re.match(r"\s*mov\.(?:b32|f32|u32|s32)\s+(%\w+),\s*([-\w]+);", line)
        if move and move.group(2) in scalars:
            scalars.add(move.group(1))
        pair = re.match(r"\s*mov\.b64\s+(%\w+),\s*\{(%?\w+),\s*(%?\w+)\};", line)
        if pair and pair.group(2) in scalars and pair.group(3) in scalars:
            pairs.add(pair.group(1))
    contracted = []
    for line in ptx.splitlines():
        fma = re.match(r"\s*fma\.rn\.f32(x2)?\s+[%\w]+,\s*([%\w]+),\s*([%\w]+),", line)
        if fma and not {fma.group(2), fma.group(3)} & (pairs if fma.group(1) else scalars):
            contracted.append(line.strip())
    return contracted


def _compile_file(path: str) -> None:
    """Child side of :func:`compile_for_gpu`: read the jobs from ``path``, write their code back to it."""
    with open(path, "rb") as f:
        jobs, stages = pickle.load(f)
    code = compile_for_gpu(jobs, stages)
    with open(path, "wb") as f:
        pickle.dump(code, f)
