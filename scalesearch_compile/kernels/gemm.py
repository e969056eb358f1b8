"""NVFP4 GEMM kernels: W4A4, W4A16, and W4A4 with the activation quantized (with search) in the prologue.

Computes ``out = A @ W^T (+ bias)`` with float32 accumulation and stores it in the output dtype.

Numerics: an NVFP4 operand is ``e2m1(code) * e4m3(scale code) * pts`` per 16-element block (``NVFP4Blocks``
.dequantize). The kernel multiplies the E2M1 and E4M3 values only (exact in fp16), accumulates the dot
products in float32, then multiplies by ``pts_a`` and ``pts_w``, adds the bias in float32 and casts. W4A16
dots the activation in its own dtype with the dequantized weight (float32 activations with IEEE precision,
no TF32; under the interpreter, whose bf16 dot is wrong, bf16 activations in float32, which is exact). The
fused prologue quantizes each activation tile exactly as ``quantize_nvfp4_triton`` (``_nvfp4.quantize_tile``),
so it equals quantize-then-GEMM bit for bit.
Paths: on compute capability 10.x / 12.x, W4A4 uses ``tl.dot_scaled(..., "e2m1", ...)`` with E4M3 scales, and
so does W4A16 with bfloat16 / float16 activations (the weight converted by the hardware's E2M1 conversion and
scaled in the activation's dtype, exact); elsewhere (Hopper, Ampere, the interpreter, float32 W4A16) tiles are
dequantized in registers and fed to ``tl.dot``, for a 16-bit dot two weight values a 32-bit operation
(``_nvfp4.dequantize_pairs``, the K columns of both operands in its pair order: the same dot product).
Decode shapes (M <= 16) split K across programs: each stores its float32 partial sum, and the program that
finishes a tile last (an atomic ticket per tile) adds the partials in split order, adds the bias and casts, so
the result is deterministic and needs no further launch. An activation block holding NaN or Inf (scale code
127) makes its row's outputs NaN, on every path (module ``search``); the other rows are unaffected.

Layouts: the weight is a validated :class:`~scalesearch_compile.layout.NVFP4Weight`; an NVFP4 activation is
:class:`~scalesearch_compile.layout.NVFP4Blocks` with M rows, its global scale one element or one per row; a
float activation ``(..., K)``.
"""

import torch
import triton
import triton.language as tl

from scalesearch_compile.kernels._nvfp4 import (
    DEQUANTIZED_SCALE,
    INTERPRET,
    NATIVE_16_BIT,
    NATIVE_FP4_BLOCK_M,
    autotune_configs,
    check_kernel_device,
    dequantize_pairs,
    dequantize_tile,
    dequantize_words,
    native_fp4_tiles,
    pack_nibbles,
    pair_order,
    quantize_tile,
    unpack_nibbles,
)
from scalesearch_compile.kernels.quantize import quantize_nvfp4_triton
from scalesearch_compile.layout import NVFP4Blocks, NVFP4Weight, expert_of_rows
from scalesearch_compile.search import (
    DEFAULT_SCALES,
    SUPPORTED_DTYPES,
    PerTensorScale,
    QuantizeRequest,
    ScaleChoice,
    check_dtype_and_shape,
    group_scales,
    power_of_two_scale,
)

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
DECODE_MAX_M = 16
# W4A16 from this many rows on dequantizes the weight once and calls torch.mm (cuBLAS): the fused kernel
# dequantizes every weight tile once per BLOCK_M rows (16 times at M = 2048 with 128-row tiles), while the
# separate pass costs one write and one read of the (N, K) weight in 16 bits, 4 bytes a value. A paper choice
# (weights dequantized at least four times), not yet timed on a GPU; ``benchmarks/gpu_check.sh`` times both.
DEQUANTIZE_MIN_M = 512
NO_SEARCH = ScaleChoice("amax", (0, 0))  # the scale-choice constexprs of launches that quantize nothing

# Tile shapes from Triton's Hopper matmul tutorial (128x128 / 128x64 / 64x128 with 4-8 warps, 3-4 stages),
# with BLOCK_K 64-128 (whole 16-element scale blocks; dot_scaled wants K >= 64); the large tiles run 8 warps (and
# 128x128 a K tile of 64) because with 4 warps (or K 128) they spilled up to 448 bytes in
# benchmarks/kernel_static.py's sm_90a builds. None has been timed on a GPU yet. The interpreter runs one shape
# that still splits the test shapes.
LARGE_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
]
# Decode (M <= 16): 16-row tiles, since a taller tile multiplies padding rows (127 of 128 at M = 1).
DECODE_CONFIGS = [
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 1}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 1}, num_warps=4, num_stages=3),
]
# Decode that dequantizes both operands into 16 bits in registers (Hopper, Ampere: W4A16 with bf16 / fp16
# activations, W4A4 unfused) also tries a K tile of 256, the loop's fixed cost spread over twice the bytes: on
# sm_90a 7.8 (W4A16) and 8.6 (W4A4) thread-instructions per weight byte against 8.6-10.0 with the tiles above
# (benchmarks/kernel_static.py). Not with float32 activations (it spills 24 bytes) nor the fused prologue (254
# registers, no faster).
DEQUANTIZED_DECODE_CONFIGS = [
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 256, "GROUP_M": 1}, num_warps=4, num_stages=3),
]
# W4A16 decode through dot_scaled (sm_100), whose loop converts a weight byte in one instruction: a K tile of 256
# spreads the loop's fixed cost (barriers, MMA issue) over twice the bytes, 4.4 thread-instructions per weight
# byte against 5.7-6.0 with the tiles above (benchmarks/kernel_static.py); K 512 spills with float16
# activations, 3 stages cost 4.5.
CONVERTED_DECODE_CONFIGS = [
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 256, "GROUP_M": 1}, num_warps=4, num_stages=2),
]
DECODE_ONLY_CONFIGS = DEQUANTIZED_DECODE_CONFIGS + CONVERTED_DECODE_CONFIGS  # never above DECODE_MAX_M rows
GPU_CONFIGS = LARGE_CONFIGS + DECODE_CONFIGS + DECODE_ONLY_CONFIGS
_CONFIGS = autotune_configs(
    GPU_CONFIGS, triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 2}, num_warps=4)
)


def configs_for_rows(
    configs: list, m_bucket: int, dot_scaled: bool = False, a_mode: str = "nvfp4", dot_dtype=tl.float16
) -> list:
    """Of the autotune ``configs``, those worth trying for ``m_bucket`` rows (M's next power of two): at decode (at
    most ``DECODE_MAX_M`` rows) the decode tiles, with ``dot_scaled`` those whose 128 weight rows run the native
    FP4 MMA, for W4A16 (``a_mode`` "float") with ``dot_scaled`` its converted tile alone, and where both operands
    are dequantized to 16 bits (no ``dot_scaled``, ``a_mode`` not "quantize", a 16-bit ``dot_dtype``) the
    dequantized decode tile too; above, the configs that are not decode's own, with ``dot_scaled`` only those whose
    128 activation rows run the native FP4 MMA (``_nvfp4.native_fp4_tiles``). Never empty: with no such tile (the
    interpreter's one config) all stay."""
    if m_bucket > DECODE_MAX_M:
        kept = native_fp4_tiles([c for c in configs if c not in DECODE_ONLY_CONFIGS], dot_scaled)
    elif dot_scaled and a_mode == "float":
        kept = [c for c in configs if c in CONVERTED_DECODE_CONFIGS]
    elif not dot_scaled and a_mode != "quantize" and dot_dtype != tl.float32:
        kept = [c for c in configs if c in DECODE_CONFIGS + DEQUANTIZED_DECODE_CONFIGS]
    else:  # W4A4 through dot_scaled computes the product transposed: the weight rows must fill the FP4 MMA
        native = [c for c in DECODE_CONFIGS if not dot_scaled or c.kwargs["BLOCK_N"] >= NATIVE_FP4_BLOCK_M]
        kept = [c for c in configs if c in native]
    return kept or configs


def _prune_for_rows(configs, named_args, **kwargs):
    """``early_config_prune`` of the GEMM's autotuner: :func:`configs_for_rows` of the launch's ``M_BUCKET``,
    ``DOT_SCALED``, ``A_MODE`` and ``DOT_DTYPE``."""
    launch = {**named_args, **kwargs}
    return configs_for_rows(
        configs,
        launch["M_BUCKET"],
        launch.get("DOT_SCALED", False),
        launch.get("A_MODE", "nvfp4"),
        launch.get("DOT_DTYPE", tl.float16),
    )


@triton.jit
def _load_nvfp4_tile(
    qdata_ptr,
    scale_ptr,
    rows,
    row_ok,
    tile,
    K_WORDS,
    K_BLOCKS,
    ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    WORDS: tl.constexpr = False,
):
    """Codes and scale codes ``[ROWS, BLOCK_K // 16]`` of K tile ``tile`` (0 past K): the codes as bytes
    ``[ROWS, BLOCK_K // 2]``, or with WORDS as int32 words ``[ROWS, BLOCK_K // 8]`` (for ``dequantize_words`` and
    ``dequantize_pairs``).

    The row strides ``K_WORDS = K // 8`` (int32 words of codes) and ``K_BLOCKS = K // 16`` are kernel arguments
    of their own so that a launch marks them divisible by 16 when they are: rows then start 16-byte aligned and
    scale codes are read 8 bytes at a time (with ``K // 16`` computed in the kernel, one byte at a time)."""
    if WORDS:
        words = tile * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8)
        packed = tl.load(
            qdata_ptr.to(tl.pointer_type(tl.int32)) + (rows[:, None] * K_WORDS + words[None, :]),
            mask=row_ok[:, None] & (words < K_WORDS)[None, :],
            other=0,
        )
    else:
        bytes_ = tile * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)  # (k0 // 2 would hide k0's alignment)
        packed = tl.load(
            qdata_ptr + (rows[:, None] * (4 * K_WORDS) + bytes_[None, :]),
            mask=row_ok[:, None] & (bytes_ < 4 * K_WORDS)[None, :],
            other=0,
        )
    blocks = tile * (BLOCK_K // 16) + tl.arange(0, BLOCK_K // 16)
    scales = tl.load(
        scale_ptr + (rows[:, None] * K_BLOCKS + blocks[None, :]),
        mask=row_ok[:, None] & (blocks < K_BLOCKS)[None, :],
        other=0,
    )
    return packed, scales


@triton.jit
def _tile_product(
    a_ptr,
    a_scale_ptr,
    w_ptr,
    w_scale_ptr,
    rows,
    row_ok,
    cols,
    col_ok,
    a_pts,
    K,
    K_WORDS,
    K_BLOCKS,
    first_tile,
    last_tile,
    A_MODE: tl.constexpr,
    METHOD: tl.constexpr,
    LO: tl.constexpr,
    HI: tl.constexpr,
    HAS_A_PTS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT_SCALED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """float32 ``[BLOCK_M, BLOCK_N]``: the rows ``row_ok`` of A times the weight rows ``cols`` over K tiles
    ``first_tile`` until ``last_tile``, global scales not applied (the kernel's docstring)."""
    # At decode the weight rows are the MMA's M (wgmma on Hopper; on sm_100 the native FP4 MMA for W4A4, which
    # needs 128 of them), the activation rows its N; W4A16's converted dot_scaled builds better unswapped.
    SWAP_AB: tl.constexpr = BLOCK_M <= 16 and not (DOT_SCALED and A_MODE == "float")
    A_FORMAT: tl.constexpr = "bf16" if DOT_DTYPE == tl.bfloat16 else "fp16"  # of a W4A16 dot_scaled
    # Triton 3.9's interpreter computes bfloat16 dots wrongly: there they run in float32 (exact for these operands)
    MMA_DTYPE: tl.constexpr = tl.float32 if DOT_DTYPE == tl.bfloat16 and not NATIVE_16_BIT else DOT_DTYPE
    MMA_PRECISION: tl.constexpr = "ieee" if MMA_DTYPE == tl.float32 else INPUT_PRECISION
    PAIRS: tl.constexpr = not DOT_SCALED and DOT_DTYPE != tl.float32  # dequantize_pairs for a 16-bit dot
    a_norm = tl.math.div_rn(1.0, a_pts)  # "float" mode: a power of two, so exact
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # SWAP_AB: the transposed product
    nan_rows = tl.zeros((BLOCK_M,), dtype=tl.int32)  # dot_scaled: rows with a NaN scale code (see below)
    for tile in range(first_tile, last_tile):
        k0 = tile * BLOCK_K
        w_packed, w_scales = _load_nvfp4_tile(
            w_ptr, w_scale_ptr, cols, col_ok, tile, K_WORDS, K_BLOCKS, BLOCK_N, BLOCK_K, WORDS=not DOT_SCALED
        )
        if A_MODE == "nvfp4":
            a_packed, a_scales = _load_nvfp4_tile(
                a_ptr, a_scale_ptr, rows, row_ok, tile, K_WORDS, K_BLOCKS, BLOCK_M, BLOCK_K, WORDS=PAIRS
            )
            if PAIRS:  # in pair order, divided by DEQUANTIZED_SCALE as the weight
                a = dequantize_pairs(a_packed, a_scales, DOT_DTYPE, BLOCK_M, BLOCK_K)
            elif not DOT_SCALED:
                a = dequantize_tile(unpack_nibbles(a_packed, BLOCK_M, BLOCK_K), a_scales, BLOCK_M, BLOCK_K)
        else:
            ks = k0 + tl.arange(0, BLOCK_K)
            a_offsets = rows[:, None] * K + ks[None, :]
            a = tl.load(a_ptr + a_offsets, mask=row_ok[:, None] & (ks < K)[None, :], other=0.0)
            if A_MODE == "float" and HAS_A_PTS:
                # Exact but for results below the dtype's subnormals, rounded once either way. bf16 has float32's
                # exponent range, so the power of two is a bf16: one bf16x2 multiply per two values.
                if a.dtype == tl.bfloat16 and NATIVE_16_BIT:
                    a = a * a_norm.to(tl.bfloat16)
                else:
                    a = (a.to(tl.float32) * a_norm).to(a.dtype)
            if A_MODE == "quantize":
                a_codes, a_scales, _ = quantize_tile(
                    a.to(tl.float32), a_pts, HAS_A_PTS, METHOD, LO, HI, BLOCK_M, BLOCK_K
                )
                if DOT_SCALED:
                    a_packed = pack_nibbles(a_codes, BLOCK_M, BLOCK_K)
                else:
                    a = dequantize_tile(a_codes, a_scales, BLOCK_M, BLOCK_K)
        if DOT_SCALED and A_MODE == "float":
            # W4A16 on sm_100: the weight's codes converted in hardware (cvt.rn.bf16x2.e2m1x2) and multiplied by
            # their E4M3 scales in the activation's dtype (exact, as dequantize_tile), then a 16-bit MMA.
            acc = tl.dot_scaled(
                a, None, A_FORMAT, tl.trans(w_packed), w_scales.to(tl.float8e4nv, bitcast=True), "e2m1", acc
            )
        elif DOT_SCALED:
            # The dequantizing path turns scale code 127 into NaN itself; here the rows are marked instead of
            # relying on how the block-scaled MMA treats a NaN scale.
            nan_rows = tl.maximum(nan_rows, tl.max((a_scales.to(tl.int32) == 127).to(tl.int32), axis=1))
            a_scales = a_scales.to(tl.uint8).to(tl.float8e4nv, bitcast=True)
            w_scales = w_scales.to(tl.float8e4nv, bitcast=True)
            if SWAP_AB:
                acc_t = tl.dot_scaled(w_packed, w_scales, "e2m1", tl.trans(a_packed), a_scales, "e2m1", acc_t)
            else:
                acc = tl.dot_scaled(a_packed, a_scales, "e2m1", tl.trans(w_packed), w_scales, "e2m1", acc)
        else:
            # divided by DEQUANTIZED_SCALE; 16 bits: two at a time, both operands' columns in pair order
            if PAIRS:
                w = dequantize_pairs(w_packed, w_scales, DOT_DTYPE, BLOCK_N, BLOCK_K)
                if A_MODE != "nvfp4":
                    a = pair_order(a, BLOCK_M, BLOCK_K)
            else:
                w = dequantize_words(w_packed, w_scales, BLOCK_N, BLOCK_K)
            if SWAP_AB:
                acc_t = tl.dot(w.to(MMA_DTYPE), tl.trans(a.to(MMA_DTYPE)), acc_t, input_precision=MMA_PRECISION)
            else:
                acc = tl.dot(a.to(MMA_DTYPE), tl.trans(w.to(MMA_DTYPE)), acc, input_precision=MMA_PRECISION)
    if SWAP_AB:
        acc = tl.trans(acc_t)
    if DOT_SCALED:
        acc = tl.where(nan_rows[:, None] > 0, float("nan"), acc)  # W4A16: no row marked
    else:
        acc = acc * DEQUANTIZED_SCALE  # a power of two: exact
        if PAIRS and A_MODE == "nvfp4":
            acc = acc * DEQUANTIZED_SCALE  # the activation's too
    return acc


# Every constexpr the configs do not set is in the key: each changes the generated code.
@triton.autotune(
    configs=_CONFIGS,
    prune_configs_by={"early_config_prune": _prune_for_rows},
    key=[
        "M_BUCKET", "N", "K", "A_MODE", "METHOD", "LO", "HI", "HAS_A_PTS", "HAS_W_PTS", "HAS_BIAS",
        "DOT_DTYPE", "INPUT_PRECISION", "DOT_SCALED", "SPLIT_K", "GROUPED",
    ],
)  # fmt: skip
@triton.jit
def _nvfp4_gemm_kernel(
    a_ptr,
    a_scale_ptr,
    a_pts_ptr,
    w_ptr,
    w_scale_ptr,
    w_pts_ptr,
    bias_ptr,
    row_expert_ptr,
    out_ptr,
    partial_ptr,
    ticket_ptr,
    M,
    N,
    K,
    K_WORDS,  # K // 8 and K // 16: row strides of code words and scale codes, marked divisible by 16 when they are
    K_BLOCKS,
    M_BUCKET,  # next power of two of M: only an autotuning key, so decode and prefill keep their own configs
    A_PTS_STRIDE,
    NUM_EXPERTS,
    A_MODE: tl.constexpr,
    METHOD: tl.constexpr,
    LO: tl.constexpr,
    HI: tl.constexpr,
    HAS_A_PTS: tl.constexpr,
    HAS_W_PTS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT_SCALED: tl.constexpr,
    SPLIT_K: tl.constexpr,
    GROUPED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """One ``[BLOCK_M, BLOCK_N]`` output tile over the K tiles of split ``program_id(1)``.

    A_MODE "nvfp4": ``a_ptr``/``a_scale_ptr`` are packed codes and scale codes; "float": ``a_ptr`` is the
    activation, dotted in DOT_DTYPE (W4A16); "quantize": ``a_ptr`` is the activation, quantized per tile with
    METHOD / LO..HI (the fused prologue). ``a_pts_ptr``: one global scale (A_PTS_STRIDE 0) or one per row (1);
    in "float" mode a power of two the activation is divided by before the dot (exact), so that the dot cannot
    overflow where the result does not. The accumulator is multiplied by the weight's global scale, then by
    the activation's.
    GROUPED: the weight holds NUM_EXPERTS experts ``(E, N, K)`` with a global scale each, and row r of A is
    multiplied by expert ``row_expert_ptr[r]`` (rows sorted by expert; E: a zero row). A tile is computed once
    per expert its rows hold, each time with the other rows masked, so a tile that straddles a boundary costs
    one extra pass over K.
    SPLIT_K > 1: each split stores its float32 partial sum in ``partial_ptr[split, M, N]``, then takes a ticket
    (``ticket_ptr[tile]``, zero before the launch and again after it); the split that draws the last ticket sums
    the partials in split order and stores the finished tile. Otherwise a program stores its tile at once.
    """
    tl.static_assert(
        not (DOT_SCALED and A_MODE == "float" and DOT_DTYPE == tl.float32), "W4A16 dot_scaled needs 16-bit activations"
    )
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    group_first_m = (pid // (GROUP_M * num_n)) * GROUP_M
    group_rows = tl.minimum(num_m - group_first_m, GROUP_M)
    pid_m = group_first_m + (pid % group_rows)
    pid_n = (pid % (GROUP_M * num_n)) // group_rows

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows = rows.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    cols = cols.to(tl.int64)
    if HAS_A_PTS:
        a_pts = tl.load(a_pts_ptr + rows * A_PTS_STRIDE, mask=row_ok, other=1.0)[:, None]
    else:
        a_pts = tl.full((BLOCK_M, 1), 1.0, tl.float32)

    k_tiles = tl.cdiv(K, BLOCK_K)
    tiles_per_split = tl.cdiv(k_tiles, SPLIT_K)
    first_tile = tl.program_id(1) * tiles_per_split
    last_tile = tl.minimum(first_tile + tiles_per_split, k_tiles)
    if GROUPED:
        experts = tl.load(row_expert_ptr + rows, mask=row_ok, other=NUM_EXPERTS)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for e in range(tl.min(experts), tl.max(tl.where(experts < NUM_EXPERTS, experts, -1)) + 1):
            mine = experts == e
            if tl.max(mine.to(tl.int32)) > 0:  # sorted rows: only an expert with no rows at all is skipped
                w_rows = tl.cast(e, tl.int64) * N
                part = _tile_product(
                    a_ptr, a_scale_ptr, w_ptr + w_rows * (4 * K_WORDS), w_scale_ptr + w_rows * K_BLOCKS, rows, mine,
                    cols, col_ok, a_pts, K, K_WORDS, K_BLOCKS, first_tile, last_tile, A_MODE, METHOD, LO, HI,
                    HAS_A_PTS, DOT_DTYPE, INPUT_PRECISION, DOT_SCALED, BLOCK_M, BLOCK_N, BLOCK_K,
                )  # fmt: skip
                acc = tl.where(mine[:, None], part * tl.load(w_pts_ptr + e), acc)
    else:
        acc = _tile_product(
            a_ptr, a_scale_ptr, w_ptr, w_scale_ptr, rows, row_ok, cols, col_ok, a_pts, K, K_WORDS, K_BLOCKS,
            first_tile, last_tile, A_MODE, METHOD, LO, HI, HAS_A_PTS, DOT_DTYPE, INPUT_PRECISION, DOT_SCALED,
            BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
        if HAS_W_PTS:
            acc = acc * tl.load(w_pts_ptr)
    if HAS_A_PTS:
        acc = acc * a_pts
    out_offsets = rows[:, None] * N + cols[None, :]
    out_mask = row_ok[:, None] & col_ok[None, :]
    last = True
    if SPLIT_K > 1:
        tl.store(partial_ptr + (tl.program_id(1).to(tl.int64) * M * N + out_offsets), acc, mask=out_mask)
        # The CTA barrier orders every thread's partial before the ticket's release (cumulativity); the last
        # split's acquire makes every partial visible to its loads, which bypass L1 (.cg) all the same.
        tl.debug_barrier()
        last = tl.atomic_add(ticket_ptr + pid, 1, sem="acq_rel", scope="gpu") == SPLIT_K - 1
        if last:
            acc = tl.load(partial_ptr + out_offsets, mask=out_mask, cache_modifier=".cg")
            for split in tl.static_range(1, SPLIT_K):
                # split * M * N < 2**31: K is split only for M <= DECODE_MAX_M rows
                acc += tl.load(partial_ptr + (split * M * N + out_offsets), mask=out_mask, cache_modifier=".cg")
            tl.store(ticket_ptr + pid, 0)  # ready for the next launch
    if last:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _dequantize_kernel(
    qdata_ptr, scale_ptr, out_ptr, N, K_WORDS, K_BLOCKS, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr
):  # fmt: skip
    """``out[n, k] = e2m1 * e4m3`` (no global scale) of one ``[BLOCK_N, BLOCK_K]`` tile, in out's dtype: exact in
    float32, bfloat16 and float16 (``_nvfp4.dequantize_tile``); scale code 127 gives NaN."""
    cols = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    col_ok = cols < N
    tile = tl.program_id(1)
    words, scales = _load_nvfp4_tile(
        qdata_ptr, scale_ptr, cols, col_ok, tile, K_WORDS, K_BLOCKS, BLOCK_N, BLOCK_K, WORDS=True
    )
    values = dequantize_words(words, scales, BLOCK_N, BLOCK_K) * DEQUANTIZED_SCALE  # a power of two: exact
    ks = tile * BLOCK_K + tl.arange(0, BLOCK_K)
    offsets = cols[:, None] * (8 * K_WORDS) + ks[None, :]
    tl.store(out_ptr + offsets, values.to(out_ptr.dtype.element_ty), mask=col_ok[:, None] & (ks < 8 * K_WORDS)[None, :])


def dequantize_weight_triton(weight: NVFP4Weight, dtype: torch.dtype) -> torch.Tensor:
    """``(N, K)`` ``e2m1 * e4m3`` of a (single, not experts) weight in ``dtype``, global scale not applied."""
    n, k = weight.out_features, weight.in_features
    out = torch.empty((n, k), dtype=dtype, device=weight.qdata.device)
    block_n, block_k = (32, 64) if INTERPRET else (64, 128)
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    _dequantize_kernel[grid](
        weight.qdata.contiguous(), weight.scale_codes.contiguous(), out, n, k // 8, k // 16, block_n, block_k
    )
    return out


def _dequantized_linear(rows, weight: NVFP4Weight, bias, act_scale, out_dtype) -> torch.Tensor:
    """W4A16 for many rows: the weight dequantized once, then one matmul with float32 accumulation and the
    kernel's epilogue (times the weight's global scale, times the activation's power of two, plus bias, cast).

    The operands are the kernel's exactly (rows divided by the power of two ``act_scale``, exact; the weight's
    E2M1 x E4M3 values, exact in the rows' dtype). On CUDA a half-precision product runs in cuBLAS with a float32
    output (``torch.mm(..., out_dtype=torch.float32)``) and float32 as torch runs it (no TF32 unless the user
    allowed it); elsewhere (the interpreter tests) in float32 from the same values.
    """
    w = dequantize_weight_triton(weight, rows.dtype)
    a = rows if act_scale is None else (rows.float() / act_scale).to(rows.dtype)  # as the kernel: exact
    if rows.is_cuda and rows.dtype != torch.float32:
        acc = torch.mm(a, w.T, out_dtype=torch.float32)
    else:
        acc = torch.mm(a.float(), w.float().T)
    if weight.per_tensor_scale is not None:
        acc = acc * weight.per_tensor_scale
    if act_scale is not None:
        acc = acc * act_scale
    if bias is not None:
        acc = acc + bias.float()
    return acc.to(out_dtype)


def _use_dot_scaled(requested: bool | None, device: torch.device, w4a16_dtype: torch.dtype | None = None) -> bool:
    """Whether the GEMM runs on ``tl.dot_scaled``: where it exists (compute capability 10.x / 12.x) unless refused;
    for W4A16 (``w4a16_dtype``, the activation's dtype) only with 16-bit activations, which it takes as they are."""
    if requested and w4a16_dtype == torch.float32:
        raise ValueError("use_dot_scaled=True with W4A16 needs bfloat16 or float16 activations, got float32")
    available = not INTERPRET and torch.cuda.get_device_capability(device)[0] in (10, 12)
    if requested and not available:
        # Triton 3.9's interpreter would run it and silently return garbage: it reads E4M3 scales as E8M0.
        raise ValueError("use_dot_scaled=True needs a GPU of compute capability 10.x or 12.x (Blackwell)")
    return (available and w4a16_dtype != torch.float32) if requested is None else requested


def _split_k(requested: int | None, m: int, n: int, k: int, device: torch.device) -> int:
    """The requested split, or by default: for decode (M <= 16) split K until about two programs per SM exist,
    each with K >= 512 (a paper choice, untimed)."""
    if requested is not None:
        if not isinstance(requested, int) or requested < 1:
            raise ValueError(f"split_k must be None or a positive int, got {requested!r}")
        return requested
    sms = 132 if INTERPRET else torch.cuda.get_device_properties(device).multi_processor_count
    return default_split_k(m, n, k, sms)


def default_split_k(m: int, n: int, k: int, sms: int) -> int:
    """The split :func:`_split_k` picks on a GPU with ``sms`` SMs."""
    if m > DECODE_MAX_M:
        return 1
    return max(1, min(8, (2 * sms) // triton.cdiv(n, 64), k // 512))


def _check_out_dtype(out_dtype, default: torch.dtype) -> torch.dtype:
    out_dtype = default if out_dtype is None else out_dtype
    if out_dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"out_dtype must be one of {SUPPORTED_DTYPES}, got {out_dtype}")
    return out_dtype


def _check_weight(weight, in_features: int, device: torch.device, bias) -> None:
    if not isinstance(weight, NVFP4Weight):
        raise ValueError(f"weight must be an NVFP4Weight, got {type(weight).__name__}")
    weight.check_operands(in_features, device, bias)


def _launch(
    a_mode: str,
    a: torch.Tensor,
    weight: NVFP4Weight,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    split_k: int,
    *,
    a_scale_codes: torch.Tensor | None = None,
    a_pts: torch.Tensor | None = None,
    scales: ScaleChoice = NO_SEARCH,
    dot_dtype: torch.dtype = torch.float16,
    dot_scaled: bool = False,
    row_experts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch the GEMM kernel on ``a`` ((M, K) floats, or (M, K // 2) codes with ``a_scale_codes``) and finish
    split-K; returns (M, N) in ``out_dtype``. ``row_experts``: each row's expert, for a weight of experts."""
    m, n, k = a.shape[0], weight.out_features, weight.in_features
    out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    partials = tickets = out  # placeholders, never read unless split_k > 1
    if split_k > 1:
        partials = torch.empty((split_k, m, n), dtype=torch.float32, device=a.device)
        tiles = max(triton.cdiv(m, c.kwargs["BLOCK_M"]) * triton.cdiv(n, c.kwargs["BLOCK_N"]) for c in _CONFIGS)
        tickets = torch.zeros(tiles, dtype=torch.int32, device=a.device)  # one memset; the kernel leaves them 0

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), split_k)

    def pointer(t):
        return a if t is None else t  # absent optional tensors: any pointer, the kernel never reads it

    # enable_fp_fusion=False keeps the fused prologue's block errors (|x| - q * s)**2 free of FMA contraction,
    # so it picks the same scales as the quantize kernel and the reference.
    _nvfp4_gemm_kernel[grid](
        a,
        pointer(a_scale_codes),
        pointer(None if a_pts is None else a_pts.reshape(-1).contiguous()),
        weight.qdata.contiguous(),
        weight.scale_codes.contiguous(),
        pointer(weight.per_tensor_scale),
        pointer(bias),
        pointer(row_experts),
        out,
        partials,
        tickets,
        m,
        n,
        k,
        k // 8,
        k // 16,
        triton.next_power_of_2(m),
        0 if a_pts is None or a_pts.numel() == 1 else 1,
        weight.num_experts or 1,
        A_MODE=a_mode,
        METHOD=scales.method,
        LO=scales.window[0],
        HI=scales.window[1],
        HAS_A_PTS=a_pts is not None,
        HAS_W_PTS=weight.per_tensor_scale is not None,
        HAS_BIAS=bias is not None,
        DOT_DTYPE=_TL_DTYPES[dot_dtype],
        INPUT_PRECISION="ieee" if dot_dtype == torch.float32 else "tf32",  # tf32 is the default, unused for 16 bits
        DOT_SCALED=dot_scaled,
        SPLIT_K=split_k,
        GROUPED=row_experts is not None,
        enable_fp_fusion=False,
    )
    return out


def _launch_w4a4(
    a: NVFP4Blocks, weight: NVFP4Weight, bias, out_dtype, split_k: int, dot_scaled: bool, row_experts=None
):
    """The GEMM of quantized activation blocks; returns (M, N)."""
    k = weight.in_features
    return _launch(
        "nvfp4",
        a.qdata.reshape(-1, k // 2).contiguous(),
        weight,
        bias,
        out_dtype,
        split_k,
        a_scale_codes=a.scale_codes.reshape(-1, k // 16).contiguous(),
        a_pts=a.per_tensor_scale,
        dot_scaled=dot_scaled,
        row_experts=row_experts,
    )


def nvfp4_gemm_triton(
    a: NVFP4Blocks,
    weight: NVFP4Weight,
    bias: torch.Tensor | None = None,
    *,
    out_dtype: torch.dtype = torch.float32,
    split_k: int | None = None,
    use_dot_scaled: bool | None = None,
) -> torch.Tensor:
    """W4A4 GEMM of an already quantized activation: ``a.dequantize() @ weight.dequantize()^T (+ bias)``,
    ``(..., N)``. ``split_k`` and ``use_dot_scaled`` as in :func:`nvfp4_linear_triton`."""
    if not isinstance(a, NVFP4Blocks):
        raise ValueError(f"a must be NVFP4Blocks (from quantize_nvfp4_triton), got {type(a).__name__}")
    check_kernel_device(a.qdata, "a.qdata")
    _check_weight(weight, a.qdata.shape[-1] * 2, a.qdata.device, bias)
    m, n, k = a.qdata.numel() // weight.qdata.shape[1], weight.out_features, weight.in_features
    out = _launch_w4a4(
        a,
        weight,
        bias,
        _check_out_dtype(out_dtype, torch.float32),
        _split_k(split_k, m, n, k, a.qdata.device),
        _use_dot_scaled(use_dot_scaled, a.qdata.device),
    )
    return out.view(*a.qdata.shape[:-1], n)


def nvfp4_linear_triton(
    x: torch.Tensor,
    weight: NVFP4Weight,
    bias: torch.Tensor | None = None,
    act: ScaleChoice | None = DEFAULT_SCALES,
    *,
    act_per_tensor_scale: PerTensorScale = True,
    out_dtype: torch.dtype | None = None,
    fuse_act_quant: bool | None = None,
    split_k: int | None = None,
    use_dot_scaled: bool | None = None,
) -> torch.Tensor:
    """``x @ W^T (+ bias)`` with an NVFP4 weight; returns ``(..., N)`` in ``out_dtype`` (default x's dtype).

    ``act`` a :class:`ScaleChoice` (W4A4): x is quantized with those block scales and ``act_per_tensor_scale``
    (as ``quantize_blocks``, at run time: NaN/Inf are not checked, they make their row's outputs NaN), inside
    the GEMM prologue when ``fuse_act_quant`` (saves a launch, but every N tile and K split quantizes its
    activation tile again: 64-151 thread-instructions per weight byte at decode against 8-20 unfused, in
    ``benchmarks/kernel_static.py``) or, by default, by ``quantize_nvfp4_triton`` first, once per row block;
    both give the same bits. ``act=None`` (W4A16): x
    (float32 / bfloat16 / float16) is multiplied as is. ``split_k`` (default: more than 1 only for M <= 16)
    splits the reduction across programs. ``use_dot_scaled``: None picks ``tl.dot_scaled`` where the GPU has it
    (W4A4; W4A16 with bfloat16 / float16 x, whose weight codes are then converted in hardware); False forces
    dequantize. Reads nothing on the host.
    """
    if act is not None and not isinstance(act, ScaleChoice):
        raise ValueError(f"act must be a ScaleChoice (W4A4) or None (weight-only W4A16), got {act!r}")
    check_dtype_and_shape(x, "x")
    _check_weight(weight, x.shape[-1], x.device, bias)
    check_kernel_device(x, "x")
    out_dtype = _check_out_dtype(out_dtype, x.dtype)
    k = x.shape[-1]
    m, n = x.numel() // k, weight.out_features
    split = _split_k(split_k, m, n, k, x.device)
    dot_scaled = _use_dot_scaled(use_dot_scaled, x.device, None if act is not None else x.dtype)
    if m == 0:
        return torch.empty((*x.shape[:-1], n), dtype=out_dtype, device=x.device)

    rows = x.reshape(m, k).contiguous()
    act_scale = power_of_two_scale(rows) if act is None else act_per_tensor_scale
    fuse = bool(fuse_act_quant)  # None: quantize once per row block first (the docstring)
    out = _linear(rows, weight, bias, act, act_scale, out_dtype, split, fuse, dot_scaled)
    return out.view(*x.shape[:-1], n)


def _linear(rows, weight, bias, act, act_scale, out_dtype, split: int, fuse: bool, dot_scaled: bool, row_experts=None):
    """``rows`` (M, K) times the weight: W4A16 dividing the rows by the power of two ``act_scale`` (act None;
    None: not scaled), or W4A4 quantizing them with ``act`` and the global scale ``act_scale``, in the GEMM
    prologue (``fuse``) or by the quantize kernel first."""
    if act is None and row_experts is None and rows.shape[0] >= DEQUANTIZE_MIN_M:
        return _dequantized_linear(rows, weight, bias, act_scale, out_dtype)
    if act is None:
        return _launch(
            "float",
            rows,
            weight,
            bias,
            out_dtype,
            split,
            a_pts=act_scale,
            dot_dtype=rows.dtype,
            dot_scaled=dot_scaled,
            row_experts=row_experts,
        )
    request = QuantizeRequest.of(rows, act, per_tensor_scale=act_scale, check_finite=False)
    if fuse:
        pts = request.per_tensor_scale
        return _launch(
            "quantize", rows, weight, bias, out_dtype, split, a_pts=pts, scales=act, dot_scaled=dot_scaled,
            row_experts=row_experts,
        )  # fmt: skip
    return _launch_w4a4(quantize_nvfp4_triton(request), weight, bias, out_dtype, split, dot_scaled, row_experts)


def nvfp4_grouped_linear_triton(
    x: torch.Tensor,
    offsets: torch.Tensor,
    weight: NVFP4Weight,
    act: ScaleChoice | None = DEFAULT_SCALES,
    *,
    fuse_act_quant: bool | None = None,
    split_k: int | None = None,
    use_dot_scaled: bool | None = None,
) -> torch.Tensor:
    """The products of a mixture-of-experts layer in one launch: x ``(S, K)`` with its rows sorted by expert,
    ``offsets`` ``(E,)`` the cumulative row counts, ``weight`` E experts ``(E, N, K)`` with a global scale each;
    returns ``(S, N)`` in x's dtype, zero past ``offsets[-1]``. Activations are scaled per expert group as in
    ``scalesearch::nvfp4_grouped_linear`` (module ``ops.grouped``): W4A4 (``act`` a ScaleChoice) quantizes each
    group with its own dynamic global scale, W4A16 (None) divides it by its own power of two. The other options
    as in :func:`nvfp4_linear_triton`. Reads nothing on the host."""
    if act is not None and not isinstance(act, ScaleChoice):
        raise ValueError(f"act must be a ScaleChoice (W4A4) or None (weight-only W4A16), got {act!r}")
    check_dtype_and_shape(x, "x")
    if not isinstance(weight, NVFP4Weight) or weight.num_experts is None or weight.per_tensor_scale is None:
        raise ValueError("weight must be the NVFP4Weight of experts (E, N, K) with a global scale per expert")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (rows sorted by expert, in_features), got shape {tuple(x.shape)}")
    _check_weight(weight, x.shape[-1], x.device, None)
    check_kernel_device(x, "x")
    if offsets.dtype not in (torch.int32, torch.int64) or tuple(offsets.shape) != (weight.num_experts,):
        raise ValueError(f"offsets must be int32/int64 of shape ({weight.num_experts},), got {offsets!r}")
    (m, k), n = x.shape, weight.out_features
    split = _split_k(split_k, m, n, k, x.device)
    dot_scaled = _use_dot_scaled(use_dot_scaled, x.device, None if act is not None else x.dtype)
    if m == 0:
        return x.new_empty((0, n))
    rows = x.contiguous()
    experts = expert_of_rows(offsets, m).to(torch.int32)
    scales = group_scales(rows, experts, weight.num_experts, act)
    fuse = bool(fuse_act_quant)  # None: quantize once per row block first (the docstring)
    return _linear(rows, weight, None, act, scales, x.dtype, split, fuse, dot_scaled, experts)
