"""Triton forward kernel of ScaleSearchAttention: FlashAttention with Q, K, V and P in NVFP4.

Numerics: those of :mod:`scalesearch_compile.attention` (its docstring is the definition). The launcher runs
step 1 there (:func:`prepare`: smoothing and Hadamard in torch, Q, K and V quantized by the fused Triton
quantize kernel, bit for bit ``quantize_blocks``) and two kernels run step 2, one program per (BLOCK_M
queries, batch * head) each, with an online softmax in float32 over KV tiles of ``BLOCK_N == TILE`` keys,
skipping the tiles above the diagonal when causal: ``_attention_kernel`` over the NVFP4 tiles, then (when the
recipe keeps them) ``_precise_kernel`` over the high-precision tiles, merging the two row states and writing
the output. P is quantized in the kernel by ``_nvfp4.quantize_tile``, which copies the arithmetic of
``formats.py`` / ``search.py`` exactly (E2M1 rounding by adding and subtracting ``2**22 * spacing``, E4M3
rounding on the float32 bit pattern, IEEE divisions, block errors summed in pairs 16 -> 8 -> 4 -> 2 -> 1, a
candidate kept only if strictly better so the amax code wins ties); the launch sets ``enable_fp_fusion=False``
so no FMA changes those bits on a GPU.

NVFP4 tiles are multiplied as ``global scales * dot(e2m1 * e4m3, e2m1 * e4m3)``: each product of an E2M1 value
and an E4M3 scale is exact in float16, so the float16 ``tl.dot`` with float32 accumulation loses nothing, and
the per-tensor (Q, K, V) and per-row (P) global scales are applied to the float32 result. High-precision
tiles use float32 ``tl.dot(input_precision="ieee")``. Elsewhere K and V tiles are decoded two values an operation
(``_nvfp4.dequantize_pairs``, divided by ``DEQUANTIZED_SCALE``), each dot's contraction (head_dim for Q.K^T, keys
for P.V) in its pair order on both sides. On compute capability 10.x/12.x the NVFP4 products go
through ``tl.dot_scaled`` instead (``DOT_SCALED``; the interpreter tests run it with their
``interpreted_dot_scaled`` fixture, which reads its E4M3 scales as E4M3; not yet run on a GPU).

Agreement with the reference is not bitwise: the kernel sums scores and P.V in another order (and applies the
global scales after the dot instead of before), its ``exp`` may differ in the last bit, and its running max
leaves out the high-precision tiles (merged afterwards), so its P is the reference's times ``exp(m_ref - m)``,
rounded, and a P element can land on the neighbouring E2M1 value. ``tests/test_kernel_attention.py`` checks a
relative L2 difference of at most ``KERNEL_TOLERANCE`` per output row under ``TRITON_INTERPRET=1`` (measured at
most 1.1e-6 there, with P quantized bit for bit as the reference does), but for at most 1% of the rows, where
such a P element moves the row by up to 2% (measured: one row of 512, 1.1%, with P by four_over_six); on a GPU
it is not measured (no GPU was available).

Layouts (contiguous; Hkv key/value heads, Skp = Sk padded to a multiple of TILE with zeros):
``q_codes`` uint8 (B, Hq, Sq, D/2), ``q_scales`` uint8 E4M3 codes (B, Hq, Sq, D/16), ``q_hp`` float32
(B, Hq, Sq, D), ``q_mean`` float32 (B, Hq, D); ``k_codes`` (B, Hkv, Skp, D/2), ``k_scales`` (B, Hkv, Skp, D/16),
``k_hp`` float32 (B, Hkv, Skp, D); ``v_codes`` (B, Hkv, Dv, Skp/2) and ``v_scales`` (B, Hkv, Dv, Skp/16) hold
V^T (blocks along the keys), ``v_hp`` float32 (B, Hkv, Skp, Dv); ``global_scales`` float32 (3,) for Q, K, V;
``mask`` float32 additive, strided over (B, Hq, Sq, Sk) (stride 0 where broadcast); ``out`` float32
(B, Hq, Sq, Dv). E2M1 codes: two a byte, the even element in the low nibble.
"""

import math

import torch
import triton
import triton.language as tl

from scalesearch_compile.attention import (
    DEFAULT_RECIPE,
    TILE,
    AttentionRecipe,
    additive_mask,
    check_inputs,
    prepare,
)
from scalesearch_compile.kernels._nvfp4 import (
    DEQUANTIZED_SCALE,
    GLOBAL_SCALE_MIN,
    INTERPRET,
    autotune_configs,
    check_kernel_device,
    dequantize_pairs,
    dequantize_tile,
    native_fp4_tiles,
    pack_nibbles,
    pair_order,
    quantize_tile,
    unpack_nibbles,
)
from scalesearch_compile.kernels.quantize import quantize_nvfp4_triton

HP_CHUNK = tl.constexpr(16)  # head_dim columns per float32 product of a high-precision tile
KERNEL_TOLERANCE = 1e-5  # relative L2 difference from the reference under the interpreter (module docstring)
# Query rows per program and warps: FlashAttention-2's usual shapes for head_dim 64/128, not yet timed on a GPU
# (none was available). Compiled without a GPU, sm_100 lowers DOT_SCALED to the block-scaled NVFP4 tcgen05 MMA
# only at BLOCK_M = 128 (64 gives f16 MMAs), so with DOT_SCALED the autotuner tries only that tile
# (_prune_for_fp4). The interpreter runs the one config it can.
# 128 rows on 4 warps is left out: it spilled 9-11 KB in benchmarks/kernel_static.py's builds (8 warps: 2 KB).
GPU_CONFIGS = [triton.Config({"BLOCK_M": m}, num_warps=warps) for m, warps in ((64, 4), (64, 8), (128, 8))]
# _precise_kernel's rows per program and warps (one launch shape: it runs at most two tiles a row)
PRECISE_BLOCK_M, PRECISE_WARPS = 16, 4
_CONFIGS = autotune_configs(GPU_CONFIGS, triton.Config({"BLOCK_M": 64}, num_warps=4))


def _prune_for_fp4(configs, named_args, **kwargs):
    """``early_config_prune`` of the attention autotuner: ``_nvfp4.native_fp4_tiles`` of the launch's
    ``DOT_SCALED``."""
    return native_fp4_tiles(configs, {**named_args, **kwargs}["DOT_SCALED"])


@triton.jit
def _load_nvfp4(codes_ptr, scales_ptr, rows, row_len, col0, COLS: tl.constexpr, WORDS: tl.constexpr = False):
    """Packed E2M1 codes (uint8 (R, COLS/2), or with WORDS int32 words (R, COLS/8): rows of ``row_len // 2`` bytes, a
    multiple of 4) and E4M3 scale codes (uint8 (R, COLS/16)) of columns ``col0 .. col0 + COLS`` of ``rows`` (R,)
    of a row-major NVFP4 matrix with ``row_len`` elements a row."""
    if WORDS:
        packed = tl.load(
            codes_ptr.to(tl.pointer_type(tl.int32))
            + (rows[:, None] * (row_len // 8) + col0 // 8 + tl.arange(0, COLS // 8)[None, :])
        )
    else:
        packed = tl.load(codes_ptr + (rows[:, None] * (row_len // 2) + col0 // 2 + tl.arange(0, COLS // 2)[None, :]))
    scales = tl.load(scales_ptr + (rows[:, None] * (row_len // 16) + col0 // 16 + tl.arange(0, COLS // 16)[None, :]))
    return packed, scales


@triton.jit
def _unit_values(packed, scale_codes, R: tl.constexpr, COLS: tl.constexpr):
    """float16 ``e2m1 * e4m3`` (exact) of packed codes (R, COLS/2) and scale codes (R, COLS/16)."""
    return dequantize_tile(unpack_nibbles(packed, R, COLS), scale_codes, R, COLS).to(tl.float16)


@triton.jit
def _paired_unit_values(codes_ptr, scales_ptr, rows, row_len, col0, COLS: tl.constexpr):
    """float16 ``e2m1 * e4m3 / DEQUANTIZED_SCALE`` (exact) of the columns :func:`_load_nvfp4` reads, in
    ``_nvfp4.dequantize_pairs``'s pair order: the codes read as words and decoded two values an operation."""
    words, scales = _load_nvfp4(codes_ptr, scales_ptr, rows, row_len, col0, COLS, WORDS=True)
    return dequantize_pairs(words, scales, tl.float16, rows.shape[0], COLS)


@triton.jit
def _quantize_probabilities(p, METHOD: tl.constexpr, LO: tl.constexpr, HI: tl.constexpr):
    """NVFP4 P tile (R, N) >= 0 along N: (E2M1 codes int32 (R, N), E4M3 codes int32 (R, N/16), row scale (R,)),
    two-level with the per-row first level ``max(rowmax / (448 * 6), 2**-126)`` (``search.global_scale``). Set by
    the row's own maximum, that scale keeps every block's ``amax / 6 / scale`` at most 448 (``SCALE_FITS``)."""
    R: tl.constexpr = p.shape[0]
    N: tl.constexpr = p.shape[1]
    row_scale = tl.maximum(tl.math.div_rn(tl.max(p, 1), 2688.0), GLOBAL_SCALE_MIN)
    codes, scale_codes, _ = quantize_tile(
        p, row_scale[:, None], True, METHOD, LO, HI, R, N, KEEP_MAGNITUDES=False, SCALE_FITS=True
    )
    return codes, scale_codes, row_scale


@triton.jit
def _softmax_step(s, state, start, rows, row_ok, batch, head, k_len, sm_scale, mask, BLOCK_N: tl.constexpr,
                  IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr):  # fmt: skip
    """The online-softmax step of the KV tile at key ``start`` with raw scores ``s`` (BLOCK_M, BLOCK_N): scaled,
    masked (``mask`` = (additive mask pointer, its strides over B, H, Sq, Sk); keys past ``k_len`` and, causal,
    above the diagonal get -inf), then ``(row max, row sum, P, factor)``: the new row max and row sum, the tile's
    unnormalised probabilities, and the factor that rescales the accumulator of ``state`` = (row max, row sum,
    accumulator)."""
    m_i, l_i, _ = state
    mask_ptr, mask_stride_b, mask_stride_h, mask_stride_m, mask_stride_n = mask
    cols = start + tl.arange(0, BLOCK_N)
    s = s * sm_scale
    if HAS_MASK:
        mask_offsets = batch * mask_stride_b + head * mask_stride_h + rows[:, None] * mask_stride_m
        valid = row_ok[:, None] & (cols < k_len)[None, :]
        s += tl.load(mask_ptr + (mask_offsets + cols[None, :] * mask_stride_n), mask=valid, other=0.0)
    allowed = (cols < k_len)[None, :]
    if IS_CAUSAL:
        allowed = allowed & (cols[None, :] <= rows[:, None])
    s = tl.where(allowed, s, float("-inf"))
    new_max = tl.maximum(m_i, tl.max(s, 1))
    safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
    alpha = tl.exp(m_i - safe_max)
    p = tl.exp(s - safe_max[:, None])
    return new_max, l_i * alpha + tl.sum(p, 1), p, alpha


@triton.jit
def _precise_tile(
    state, start, q_rows, rows, row_ok, v_dims, kv_bh, batch, head, k_len, padded_len, sm_scale, q_hp_ptr,
    k_hp_ptr, v_hp_ptr, mask,
    HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
):  # fmt: skip
    """``state`` after the high-precision KV tile at key ``start``: products of the float32 copies."""
    k_rows = kv_bh * padded_len + start + tl.arange(0, BLOCK_N)
    # float32 products run as FMAs in registers: HP_CHUNK columns of head_dim at a time keep the operands small
    # (chained through the accumulator, the sum runs in the same order as one dot)
    s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for d0 in tl.static_range(0, HEAD_DIM, HP_CHUNK):
        chunk = d0 + tl.arange(0, HP_CHUNK)
        q_hp = tl.load(q_hp_ptr + (q_rows[:, None] * HEAD_DIM + chunk[None, :]))
        k_hp = tl.load(k_hp_ptr + (k_rows[:, None] * HEAD_DIM + chunk[None, :]))
        s = tl.dot(q_hp, tl.trans(k_hp), s, input_precision="ieee")
    new_max, l_i, p, alpha = _softmax_step(
        s, state, start, rows, row_ok, batch, head, k_len, sm_scale, mask, BLOCK_N, IS_CAUSAL, HAS_MASK
    )
    # Even and odd keys in two products (P split in registers, V rows read to match): smaller operands,
    # accumulated in place (no separate P.V tile)
    p_even, p_odd = tl.split(tl.reshape(p, (BLOCK_M, BLOCK_N // 2, 2)))
    even_rows = kv_bh * padded_len + start + 2 * tl.arange(0, BLOCK_N // 2)
    v_even = tl.load(v_hp_ptr + (even_rows[:, None] * V_DIM + v_dims[None, :]))
    acc = tl.dot(p_even, v_even, state[2] * alpha[:, None], input_precision="ieee")
    v_odd = tl.load(v_hp_ptr + ((even_rows + 1)[:, None] * V_DIM + v_dims[None, :]))
    acc = tl.dot(p_odd, v_odd, acc, input_precision="ieee")
    return new_max, l_i, acc


@triton.jit
def _nvfp4_tile(
    state, start, rows, row_ok, v_dims, kv_bh, batch, head, k_len, padded_len, sm_scale, q_packed, q_scale_codes,
    q_mean, q_scale, k_scale, v_scale, k_codes_ptr, k_scales_ptr, v_codes_ptr, v_scales_ptr, mask,
    HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, SMOOTH_Q: tl.constexpr,
    METHOD: tl.constexpr, LO: tl.constexpr, HI: tl.constexpr, DOT_SCALED: tl.constexpr,
):  # fmt: skip
    """``state`` after the NVFP4 KV tile at key ``start``: products of the codes, P quantized here."""
    k_rows = kv_bh * padded_len + start + tl.arange(0, BLOCK_N)
    if DOT_SCALED:  # compute capability 10.x/12.x
        k_packed, k_scale_codes = _load_nvfp4(k_codes_ptr, k_scales_ptr, k_rows, HEAD_DIM, 0, HEAD_DIM)
        k_unit = _unit_values(k_packed, k_scale_codes, BLOCK_N, HEAD_DIM)
        s = tl.dot_scaled(
            q_packed, q_scale_codes.to(tl.float8e4nv, bitcast=True), "e2m1",
            tl.trans(k_packed), k_scale_codes.to(tl.float8e4nv, bitcast=True), "e2m1",
        )  # fmt: skip
    else:  # K decoded two values an operation, head_dim in pair order for Q (loop-invariant: computed once) and K
        k_unit = _paired_unit_values(k_codes_ptr, k_scales_ptr, k_rows, HEAD_DIM, 0, HEAD_DIM)
        q_unit = pair_order(_unit_values(q_packed, q_scale_codes, BLOCK_M, HEAD_DIM), BLOCK_M, HEAD_DIM)
        s = tl.dot(q_unit, tl.trans(k_unit)) * DEQUANTIZED_SCALE  # a power of two: exact
        q_mean = tl.reshape(pair_order(q_mean[None, :], 1, HEAD_DIM), (HEAD_DIM,)) * DEQUANTIZED_SCALE
    s = s * (q_scale * k_scale)
    if SMOOTH_Q:
        s += tl.sum(q_mean[None, :] * k_unit.to(tl.float32), 1)[None, :] * k_scale
    new_max, l_i, p, alpha = _softmax_step(
        s, state, start, rows, row_ok, batch, head, k_len, sm_scale, mask, BLOCK_N, IS_CAUSAL, HAS_MASK
    )
    p_codes, p_scale_codes, p_scale = _quantize_probabilities(p, METHOD, LO, HI)
    v_rows = kv_bh * V_DIM + v_dims
    if DOT_SCALED:
        v_packed, v_scale_codes = _load_nvfp4(v_codes_ptr, v_scales_ptr, v_rows, padded_len, start, BLOCK_N)
        pv = tl.dot_scaled(
            pack_nibbles(p_codes, BLOCK_M, BLOCK_N), p_scale_codes.to(tl.uint8).to(tl.float8e4nv, bitcast=True),
            "e2m1", tl.trans(v_packed), v_scale_codes.to(tl.float8e4nv, bitcast=True), "e2m1",
        )  # fmt: skip
    else:  # V decoded two values an operation, the keys in pair order for P and V
        p_unit = pair_order(dequantize_tile(p_codes, p_scale_codes, BLOCK_M, BLOCK_N).to(tl.float16), BLOCK_M, BLOCK_N)
        v_unit = _paired_unit_values(v_codes_ptr, v_scales_ptr, v_rows, padded_len, start, BLOCK_N)
        pv = tl.dot(p_unit, tl.trans(v_unit)) * DEQUANTIZED_SCALE  # a power of two: exact
    pv = pv * (p_scale[:, None] * v_scale)
    return new_max, l_i, state[2] * alpha[:, None] + pv


@triton.jit
def _program_rows(num_heads, group, q_len, k_len, BLOCK_M: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """The program's (batch * head, batch, head, key/value head, query rows, which rows exist, the rows' indices
    into the (B * Hq * Sq) row space (rows past the end re-read the last one, never stored), the keys it attends up
    to). Element offsets in int64: batch x heads x seq x head_dim passes 2**31 at realistic sizes."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    batch = pid_bh // num_heads
    head = pid_bh % num_heads
    kv_bh = batch * (num_heads // group) + head // group
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len
    q_rows = pid_bh * q_len + tl.minimum(rows, q_len - 1)
    end = k_len
    if IS_CAUSAL:
        end = tl.minimum(k_len, (pid_m + 1) * BLOCK_M)
    return pid_bh, batch, head, kv_bh, rows, row_ok, q_rows, end


@triton.jit
def _store_output(out_ptr, out_offsets, acc, l_i, row_ok):
    """The attention output ``acc / l`` of the rows; a row with no key has acc == 0: zeros, as SDPA."""
    tl.store(out_ptr + out_offsets, acc / tl.where(l_i > 0, l_i, 1.0)[:, None], mask=row_ok[:, None])


@triton.jit
def _precise_kernel(
    q_hp_ptr, k_hp_ptr, v_hp_ptr, mask_ptr, max_ptr, sum_ptr, out_ptr,
    mask_stride_b, mask_stride_h, mask_stride_m, mask_stride_n,
    num_heads, group, q_len, k_len, padded_len, sink_end, tail_start, sm_scale,
    HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
):  # fmt: skip
    """The online softmax over the high-precision tiles (the sink tile and a trailing partial tile) of
    ``BLOCK_M`` query rows, merged with the NVFP4 tiles' row state that ``_attention_kernel`` left (row max and
    row sum float32 ``(B * Hq * Sq,)`` in ``max_ptr`` and ``sum_ptr``, its unnormalised accumulator in
    ``out_ptr``) as two halves of a split softmax are (rescaled to the larger row max), then the output. A kernel
    of its own, run second: its float32 FMA products need registers the NVFP4 loop would otherwise spill."""
    pid_bh, batch, head, kv_bh, rows, row_ok, q_rows, end = _program_rows(
        num_heads, group, q_len, k_len, BLOCK_M, IS_CAUSAL
    )
    v_dims = tl.arange(0, V_DIM)
    state = (
        tl.full([BLOCK_M], float("-inf"), tl.float32),
        tl.zeros([BLOCK_M], tl.float32),
        tl.zeros([BLOCK_M, V_DIM], tl.float32),
    )
    mask = (mask_ptr, mask_stride_b, mask_stride_h, mask_stride_m, mask_stride_n)
    has_tail = (tail_start >= sink_end) & (tail_start < end)
    for i in range(0, 2):
        if ((i == 0) & (sink_end > 0)) | ((i == 1) & has_tail):
            state = _precise_tile(
                state, tl.where(i == 0, 0, tail_start), q_rows, rows, row_ok, v_dims, kv_bh, batch, head, k_len,
                padded_len, sm_scale, q_hp_ptr, k_hp_ptr, v_hp_ptr, mask, HEAD_DIM, V_DIM, BLOCK_M, BLOCK_N,
                IS_CAUSAL, HAS_MASK,
            )  # fmt: skip
    m_i, l_i, acc = state
    out_rows = pid_bh * q_len + rows
    out_offsets = out_rows[:, None] * V_DIM + v_dims[None, :]
    nvfp4_max = tl.load(max_ptr + out_rows, mask=row_ok, other=float("-inf"))
    new_max = tl.maximum(m_i, nvfp4_max)
    safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
    alpha, beta = tl.exp(m_i - safe_max), tl.exp(nvfp4_max - safe_max)
    l_i = l_i * alpha + tl.load(sum_ptr + out_rows, mask=row_ok, other=0.0) * beta
    acc = acc * alpha[:, None] + tl.load(out_ptr + out_offsets, mask=row_ok[:, None], other=0.0) * beta[:, None]
    _store_output(out_ptr, out_offsets, acc, l_i, row_ok)


# Sequence lengths enter the key as powers of two (Q_BUCKET, K_BUCKET), so a new length (every decode step)
# reuses its bucket's tuned config; every constexpr the configs do not set is in the key.
@triton.autotune(
    _CONFIGS,
    prune_configs_by={"early_config_prune": _prune_for_fp4},
    key=[
        "Q_BUCKET", "K_BUCKET", "HEAD_DIM", "V_DIM", "BLOCK_N", "IS_CAUSAL", "HAS_MASK", "SMOOTH_Q",
        "METHOD", "LO", "HI", "DOT_SCALED", "LEAVE_STATE",
    ],
)  # fmt: skip
@triton.jit
def _attention_kernel(
    q_codes_ptr, q_scales_ptr, q_mean_ptr,
    k_codes_ptr, k_scales_ptr,
    v_codes_ptr, v_scales_ptr,
    global_scales_ptr, mask_ptr, max_ptr, sum_ptr, out_ptr,
    mask_stride_b, mask_stride_h, mask_stride_m, mask_stride_n,
    num_heads, group, q_len, k_len, padded_len, sink_end, tail_start, sm_scale, Q_BUCKET, K_BUCKET,
    HEAD_DIM: tl.constexpr, V_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, SMOOTH_Q: tl.constexpr,
    METHOD: tl.constexpr, LO: tl.constexpr, HI: tl.constexpr, DOT_SCALED: tl.constexpr,
    LEAVE_STATE: tl.constexpr,
):  # fmt: skip
    """The online softmax over the NVFP4 KV tiles of ``BLOCK_M`` query rows, then the output, or with LEAVE_STATE
    the row state for ``_precise_kernel`` to merge: row max and row sum in ``max_ptr`` and ``sum_ptr``, the
    unnormalised accumulator in ``out_ptr``."""
    pid_bh, batch, head, kv_bh, rows, row_ok, q_rows, end = _program_rows(
        num_heads, group, q_len, k_len, BLOCK_M, IS_CAUSAL
    )
    dims = tl.arange(0, HEAD_DIM)
    v_dims = tl.arange(0, V_DIM)
    q_packed, q_scale_codes = _load_nvfp4(q_codes_ptr, q_scales_ptr, q_rows, HEAD_DIM, 0, HEAD_DIM)
    q_mean = tl.zeros([HEAD_DIM], tl.float32)
    if SMOOTH_Q:
        q_mean = tl.load(q_mean_ptr + (pid_bh * HEAD_DIM + dims))
    q_scale = tl.load(global_scales_ptr)
    k_scale = tl.load(global_scales_ptr + 1)
    v_scale = tl.load(global_scales_ptr + 2)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, V_DIM], tl.float32)
    state = (m_i, l_i, acc)
    mask = (mask_ptr, mask_stride_b, mask_stride_h, mask_stride_m, mask_stride_n)
    main_end = end
    if tail_start >= 0:
        main_end = tl.minimum(end, tail_start)
    for start in range(sink_end, main_end, BLOCK_N):
        state = _nvfp4_tile(
            state, start, rows, row_ok, v_dims, kv_bh, batch, head, k_len, padded_len, sm_scale, q_packed,
            q_scale_codes, q_mean, q_scale, k_scale, v_scale, k_codes_ptr, k_scales_ptr, v_codes_ptr, v_scales_ptr,
            mask, HEAD_DIM, V_DIM, BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_MASK, SMOOTH_Q, METHOD, LO, HI, DOT_SCALED,
        )  # fmt: skip
    m_i, l_i, acc = state

    out_rows = pid_bh * q_len + rows
    out_offsets = out_rows[:, None] * V_DIM + v_dims[None, :]
    if LEAVE_STATE:
        tl.store(max_ptr + out_rows, m_i, mask=row_ok)
        tl.store(sum_ptr + out_rows, l_i, mask=row_ok)
        tl.store(out_ptr + out_offsets, acc, mask=row_ok[:, None])
    else:
        _store_output(out_ptr, out_offsets, acc, l_i, row_ok)


def _use_dot_scaled(device: torch.device) -> bool:
    """Native NVFP4 ``tl.dot_scaled`` on compute capability 10.x/12.x; never under the interpreter."""
    return not INTERPRET and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] in (10, 12)


def nvfp4_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    recipe: AttentionRecipe = DEFAULT_RECIPE,
) -> torch.Tensor:
    """NVFP4 attention with the Triton kernel; arguments and result as ``nvfp4_attention_reference``."""
    check_inputs(q, k, v, attn_mask, is_causal, enable_gqa)
    check_kernel_device(q, "query")
    batch, num_heads, q_len, head_dim = q.shape
    kv_heads, k_len, v_dim = k.shape[1], k.shape[2], v.shape[-1]
    prep = prepare(q, k, v, recipe, quantize=quantize_nvfp4_triton)
    padded_len = prep.k_hp.shape[-2]
    global_scales = torch.stack([prep.q.per_tensor_scale, prep.k.per_tensor_scale, prep.v.per_tensor_scale])
    q_mean = prep.q_mean if prep.q_mean is not None else prep.q_hp  # a placeholder pointer when unused
    mask = None if attn_mask is None else additive_mask(attn_mask)
    if mask is not None:
        mask = mask.reshape((1,) * (4 - mask.dim()) + mask.shape).expand(batch, num_heads, q_len, k_len)
    sink_end = TILE if recipe.sink_tiles else 0
    tail_start = k_len // TILE * TILE if recipe.sink_tiles and k_len % TILE else -1
    rows = batch * num_heads * q_len
    out = torch.empty((batch, num_heads, q_len, v_dim), dtype=torch.float32, device=q.device)
    row_max = row_sum = out  # placeholders, never read without precise tiles
    mask_args = (out if mask is None else mask, *(mask.stride() if mask is not None else (0, 0, 0, 0)))
    lengths = (num_heads, num_heads // kv_heads, q_len, k_len, padded_len, sink_end, tail_start)
    sm_scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    shape = dict(HEAD_DIM=head_dim, V_DIM=v_dim, BLOCK_N=TILE, IS_CAUSAL=is_causal, HAS_MASK=mask is not None)
    if recipe.sink_tiles:
        row_max, row_sum = torch.empty((2, rows), dtype=torch.float32, device=q.device)
    grid = lambda meta: (triton.cdiv(q_len, meta["BLOCK_M"]), batch * num_heads)  # noqa: E731
    _attention_kernel[grid](
        prep.q.qdata, prep.q.scale_codes, q_mean.contiguous(),
        prep.k.qdata, prep.k.scale_codes,
        prep.v.qdata, prep.v.scale_codes,
        global_scales, mask_args[0], row_max, row_sum, out, *mask_args[1:], *lengths, sm_scale,
        triton.next_power_of_2(q_len), triton.next_power_of_2(k_len), **shape,
        SMOOTH_Q=prep.q_mean is not None, METHOD=recipe.p_method, LO=recipe.window[0], HI=recipe.window[1],
        DOT_SCALED=_use_dot_scaled(q.device), LEAVE_STATE=recipe.sink_tiles, enable_fp_fusion=False,
    )  # fmt: skip
    if recipe.sink_tiles:
        _precise_kernel[(triton.cdiv(q_len, PRECISE_BLOCK_M), batch * num_heads)](
            prep.q_hp.contiguous(), prep.k_hp.contiguous(), prep.v_hp.contiguous(), mask_args[0], row_max, row_sum,
            out, *mask_args[1:], *lengths, sm_scale, BLOCK_M=PRECISE_BLOCK_M, **shape,
            num_warps=PRECISE_WARPS, enable_fp_fusion=False,
        )  # fmt: skip
    return out.to(q.dtype)
