"""Fused NVFP4 quantization with scale search: block amax, every candidate scale, best kept, codes packed.

Numerics: bit for bit ``search.quantize_reference(request)`` on qdata, scale codes and offsets, for methods
"amax", "four_over_six", "search" and "exhaustive" (the exact formulas are in search.py's docstring; the tile
arithmetic is in ``_nvfp4.quantize_tile``). The request carries the global scale, resolved by torch (an amax
is exact in any order, and the division is IEEE on every device).

Layouts: reads x ``(..., K)`` (float32, bfloat16 or float16, K a multiple of 16) as ``(M, K)`` rows; writes
qdata uint8 ``(M, K // 2)`` (element 2i in the low nibble), E4M3 scale codes uint8 ``(M, K // 16)`` and the
chosen offsets int16 ``(M, K // 16)`` (chosen code minus amax code), torchao's unswizzled layout.
"""

import triton
import triton.language as tl

from scalesearch_compile.kernels._nvfp4 import autotune_configs, check_kernel_device, pack_nibbles, quantize_tile
from scalesearch_compile.layout import NVFP4Blocks
from scalesearch_compile.search import QuantizeRequest

# Rows x columns per program. GPU candidates: tiles of 512-4096 values (4 warps, 4-32 values a thread) that keep
# the 9-candidate search in registers; not yet timed on a GPU. The interpreter runs one tile shape, the
# largest of them: it pays per program (a 256 x 512 search took 20.3 s with 8 x 64 tiles, 1.6 s with 32 x 128).
GPU_CONFIGS = [
    triton.Config({"BLOCK_M": block_m, "BLOCK_K": block_k}, num_warps=4)
    for block_m in (8, 16, 32)
    for block_k in (64, 128)
]
_CONFIGS = autotune_configs(GPU_CONFIGS, triton.Config({"BLOCK_M": 32, "BLOCK_K": 128}, num_warps=4))


@triton.autotune(configs=_CONFIGS, key=["K", "HAS_PTS", "HAS_WEIGHTS", "METHOD", "LO", "HI"])
@triton.jit
def _quantize_kernel(
    x_ptr,
    pts_ptr,
    weights_ptr,
    qdata_ptr,
    scale_ptr,
    offset_ptr,
    M,
    K,
    PTS_STRIDE,
    HAS_PTS: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    METHOD: tl.constexpr,
    LO: tl.constexpr,
    HI: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One ``[BLOCK_M, BLOCK_K]`` tile of x -> its packed codes, scale codes and offsets.

    ``pts_ptr`` holds one global scale (PTS_STRIDE 0) or one per row (PTS_STRIDE 1); ``weights_ptr`` the K
    input-channel importance weights of a weighted search (HAS_WEIGHTS).
    """
    NUM_BLOCKS: tl.constexpr = BLOCK_K // 16
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    rows = rows.to(tl.int64)
    cols = (tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    x = tl.load(x_ptr + (rows[:, None] * K + cols[None, :]), mask=row_ok[:, None] & (cols < K)[None, :], other=0.0)
    if HAS_PTS:
        pts = tl.load(pts_ptr + rows * PTS_STRIDE, mask=row_ok, other=1.0)[:, None]
    else:
        pts = tl.full((BLOCK_M, 1), 1.0, tl.float32)
    if HAS_WEIGHTS:
        weights = tl.reshape(tl.load(weights_ptr + cols, mask=cols < K, other=0.0), (1, NUM_BLOCKS, 16))
    else:
        weights = None
    codes, scale_codes, first_codes = quantize_tile(
        x.to(tl.float32), pts, HAS_PTS, METHOD, LO, HI, BLOCK_M, BLOCK_K, weights, HAS_WEIGHTS
    )

    bytes_ = tl.program_id(1) * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
    byte_mask = row_ok[:, None] & (bytes_ < K // 2)[None, :]
    byte_offsets = rows[:, None] * (K // 2) + bytes_[None, :]
    tl.store(qdata_ptr + byte_offsets, pack_nibbles(codes, BLOCK_M, BLOCK_K), byte_mask)
    blocks = tl.program_id(1) * NUM_BLOCKS + tl.arange(0, NUM_BLOCKS)
    block_mask = row_ok[:, None] & (blocks < K // 16)[None, :]
    block_offsets = rows[:, None] * (K // 16) + blocks[None, :]
    tl.store(scale_ptr + block_offsets, scale_codes.to(tl.uint8), block_mask)
    tl.store(offset_ptr + block_offsets, (scale_codes - first_codes).to(tl.int16), block_mask)


def quantize_nvfp4_triton(request: QuantizeRequest) -> NVFP4Blocks:
    """Quantize ``request.x`` (..., K) to NVFP4 in one Triton pass; bit for bit ``search.quantize_reference``.

    Reads nothing on the host (the request was validated, and its global scale resolved, by
    :meth:`QuantizeRequest.of`). Raises ValueError for a tensor a kernel cannot read.
    """
    x, pts, weights = request.x, request.per_tensor_scale, request.importance
    check_kernel_device(x, "input")
    k = x.shape[-1]
    rows = x.reshape(-1, k).contiguous()
    m = rows.shape[0]
    out = NVFP4Blocks.empty(x.shape, pts, x.device)
    # rows: a placeholder pointer for an absent optional tensor, never read
    pts_arg = rows if pts is None else pts.reshape(-1).contiguous()
    pts_stride = 0 if pts is None or pts.dim() == 0 else 1
    low, high = request.scales.window

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(k, meta["BLOCK_K"]))

    # enable_fp_fusion=False: a GPU build contracts |x| - q * s into FMAs by default (the sm_90 PTX of the
    # search kernel has 480 fma.rn.f32 with fusion on, 0 with it off), which changes the block errors' bits
    # and so the chosen scales.
    _quantize_kernel[grid](
        rows,
        pts_arg,
        rows if weights is None else weights.reshape(-1),
        out.qdata,
        out.scale_codes,
        out.offsets,
        m,
        k,
        pts_stride,
        HAS_PTS=pts is not None,
        HAS_WEIGHTS=weights is not None,
        METHOD=request.scales.method,
        LO=low,
        HI=high,
        enable_fp_fusion=False,
    )
    return out
