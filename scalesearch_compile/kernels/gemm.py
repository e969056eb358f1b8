"""NVFP4 GEMM kernels: W4A4, W4A16, and W4A4 with the activation quantized (with search) in the prologue.

Computes ``out = A @ W^T (+ bias)`` with float32 accumulation and stores it in the output dtype.

Numerics: an NVFP4 operand is ``e2m1(code) * e4m3(scale code) * pts`` per 16-element block (``NVFP4Blocks``
.dequantize). The kernel multiplies the E2M1 and E4M3 values only (exact in fp16), accumulates the dot
products in float32, then multiplies by ``pts_a`` and ``pts_w``, adds the bias in float32 and casts. W4A16
dots the activation in its own dtype with the dequantized weight (float32 activations with IEEE precision,
no TF32; under the interpreter, whose bf16 dot is wrong, bf16 activations in float32, which is exact). The
fused prologue quantizes each activation tile exactly as ``quantize_nvfp4_triton`` (``_nvfp4.quantize_tile``),
so it equals quantize-then-GEMM bit for bit.
Paths: on compute capability 10.x / 12.x, W4A4 uses ``tl.dot_scaled(..., "e2m1", ...)`` with E4M3 scales;
elsewhere (Hopper, Ampere, the interpreter) tiles are dequantized in registers and fed to ``tl.dot``.
Decode shapes (M <= 16) split K across programs; their float32 partial sums are added by torch (in a fixed
order, so the result is deterministic).

Layouts (torchao's, unswizzled): W qdata uint8 ``(N, K // 2)`` (element 2i in the low nibble), scale codes
``(N, K // 16)`` uint8 or float8_e4m3fn, per-tensor scale float32 (one element) or None; an NVFP4 activation
is the same with M rows, its global scale one element or one per row; a float activation ``(..., K)``.
"""

from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from scalesearch_compile.kernels._nvfp4 import (
    INTERPRET,
    autotune_configs,
    check_kernel_device,
    dequantize_tile,
    pack_nibbles,
    quantize_tile,
    unpack_nibbles,
)
from scalesearch_compile.kernels.quantize import quantize_nvfp4_triton
from scalesearch_compile.search import (
    BLOCK_SIZE,
    DEFAULT_WINDOW,
    SUPPORTED_DTYPES,
    NVFP4Blocks,
    PerTensorScale,
    check_method,
    check_window,
    checked_amax,
    resolve_per_tensor_scale,
)

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
DECODE_MAX_M = 16

# Tile shapes from Triton's Hopper matmul tutorial (128x128 / 128x64 / 64x128 with 4-8 warps, 3-4 stages),
# with BLOCK_K 64-128 (whole 16-element scale blocks; dot_scaled wants K >= 64) and BLOCK_M 16 for decode;
# none has been timed on a GPU yet. The interpreter runs one shape that still splits the test shapes.
GPU_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 1}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 1}, num_warps=4, num_stages=3),
]
_CONFIGS = autotune_configs(
    GPU_CONFIGS, triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 2}, num_warps=4)
)


@triton.jit
def _load_nvfp4_tile(qdata_ptr, scale_ptr, rows, row_ok, k0, K, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Packed codes ``[ROWS, BLOCK_K // 2]`` and scale codes ``[ROWS, BLOCK_K // 16]`` at column k0 (0 past K)."""
    bytes_ = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    packed = tl.load(
        qdata_ptr + rows[:, None] * (K // 2) + bytes_[None, :],
        mask=row_ok[:, None] & (bytes_ < K // 2)[None, :],
        other=0,
    )
    blocks = k0 // 16 + tl.arange(0, BLOCK_K // 16)
    scales = tl.load(
        scale_ptr + rows[:, None] * (K // 16) + blocks[None, :],
        mask=row_ok[:, None] & (blocks < K // 16)[None, :],
        other=0,
    )
    return packed, scales


@triton.autotune(configs=_CONFIGS, key=["M_BUCKET", "N", "K", "A_MODE", "DOT_SCALED", "SPLIT_K"])
@triton.jit
def _nvfp4_gemm_kernel(
    a_ptr,
    a_scale_ptr,
    a_pts_ptr,
    w_ptr,
    w_scale_ptr,
    w_pts_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    M_BUCKET,  # next power of two of M: only an autotuning key, so decode and prefill keep their own configs
    A_PTS_STRIDE,
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
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """One ``[BLOCK_M, BLOCK_N]`` output tile over the K tiles of split ``program_id(1)``.

    A_MODE "nvfp4": ``a_ptr``/``a_scale_ptr`` are packed codes and scale codes; "float": ``a_ptr`` is the
    activation, dotted in DOT_DTYPE (W4A16); "quantize": ``a_ptr`` is the activation, quantized per tile with
    METHOD / LO..HI (the fused prologue). ``a_pts_ptr``: one global scale (A_PTS_STRIDE 0) or one per row (1).
    SPLIT_K > 1 stores float32 partial sums ``out[split, M, N]`` without bias; otherwise the finished tile.
    """
    tl.static_assert(not (DOT_SCALED and A_MODE == "float"), "dot_scaled needs an NVFP4 activation")
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
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for tile in range(first_tile, tl.minimum(first_tile + tiles_per_split, k_tiles)):
        k0 = tile * BLOCK_K
        w_packed, w_scales = _load_nvfp4_tile(w_ptr, w_scale_ptr, cols, col_ok, k0, K, BLOCK_N, BLOCK_K)
        if A_MODE == "nvfp4":
            a_packed, a_scales = _load_nvfp4_tile(a_ptr, a_scale_ptr, rows, row_ok, k0, K, BLOCK_M, BLOCK_K)
            if not DOT_SCALED:
                a = dequantize_tile(unpack_nibbles(a_packed, BLOCK_M, BLOCK_K), a_scales, BLOCK_M, BLOCK_K)
        else:
            ks = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(a_ptr + rows[:, None] * K + ks[None, :], mask=row_ok[:, None] & (ks < K)[None, :], other=0.0)
            if A_MODE == "quantize":
                a_codes, a_scales, _ = quantize_tile(
                    a.to(tl.float32), a_pts, HAS_A_PTS, METHOD, LO, HI, BLOCK_M, BLOCK_K
                )
                if DOT_SCALED:
                    a_packed = pack_nibbles(a_codes, BLOCK_M, BLOCK_K)
                else:
                    a = dequantize_tile(a_codes, a_scales, BLOCK_M, BLOCK_K)
        if DOT_SCALED:
            acc = tl.dot_scaled(
                a_packed,
                a_scales.to(tl.uint8).to(tl.float8e4nv, bitcast=True),
                "e2m1",
                tl.trans(w_packed),
                w_scales.to(tl.float8e4nv, bitcast=True),
                "e2m1",
                acc,
            )
        else:
            w = dequantize_tile(unpack_nibbles(w_packed, BLOCK_N, BLOCK_K), w_scales, BLOCK_N, BLOCK_K)
            acc = tl.dot(a.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), acc, input_precision=INPUT_PRECISION)

    if A_MODE != "float":
        acc = acc * a_pts
    if HAS_W_PTS:
        acc = acc * tl.load(w_pts_ptr)
    if HAS_BIAS and SPLIT_K == 1:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out_offsets = tl.program_id(1).to(tl.int64) * M * N + rows[:, None] * N + cols[None, :]
    tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _use_dot_scaled(requested: bool | None, device: torch.device) -> bool:
    """Whether W4A4 runs on ``tl.dot_scaled``: where it exists (compute capability 10.x / 12.x) unless refused."""
    available = not INTERPRET and torch.cuda.get_device_capability(device)[0] in (10, 12)
    if requested and not available:
        # The interpreter would run it and silently return garbage (it reads E4M3 scales as E8M0; FACTS.md).
        raise ValueError("use_dot_scaled=True needs a GPU of compute capability 10.x or 12.x (Blackwell)")
    return available if requested is None else requested


def _split_k(requested: int | None, m: int, n: int, k: int, device: torch.device) -> int:
    """The requested split, or by default: for decode (M <= 16) split K until about two programs per SM exist,
    each with K >= 512 (a paper choice, untimed)."""
    if requested is not None:
        if not isinstance(requested, int) or requested < 1:
            raise ValueError(f"split_k must be None or a positive int, got {requested!r}")
        return requested
    if m > DECODE_MAX_M:
        return 1
    sms = 132 if INTERPRET else torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(8, (2 * sms) // triton.cdiv(n, 64), k // 512))


class _Weight(NamedTuple):
    """A validated NVFP4 weight: qdata uint8 (N, K // 2), scale codes uint8 (N, K // 16), 0-d pts, bias (N,)."""

    qdata: torch.Tensor
    scale_codes: torch.Tensor
    per_tensor_scale: torch.Tensor | None
    bias: torch.Tensor | None


def _check_weight(w_qdata, w_scale_codes, w_per_tensor_scale, bias, k: int, device: torch.device) -> _Weight:
    """Validate torchao's weight layout (and the bias) for inputs with K = ``k`` on ``device``."""
    for name, t in (("w_qdata", w_qdata), ("w_scale_codes", w_scale_codes)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor, got {getattr(t, 'shape', type(t).__name__)}")
    n = w_qdata.shape[0]
    if w_qdata.dtype != torch.uint8 or tuple(w_qdata.shape) != (n, k // 2):
        raise ValueError(
            f"w_qdata must be uint8 of shape (N, K // 2) = ({n}, {k // 2}) for inputs with K = {k}, "
            f"got {w_qdata.dtype} {tuple(w_qdata.shape)}"
        )
    if w_scale_codes.dtype not in (torch.uint8, torch.float8_e4m3fn) or tuple(w_scale_codes.shape) != (n, k // 16):
        raise ValueError(
            f"w_scale_codes must be uint8 or float8_e4m3fn of shape (N, K // 16) = ({n}, {k // 16}), "
            f"got {w_scale_codes.dtype} {tuple(w_scale_codes.shape)} (swizzled scales are not supported)"
        )
    if w_per_tensor_scale is not None:
        # Its value is not checked: reading it would synchronize the GPU on every call.
        if not isinstance(w_per_tensor_scale, torch.Tensor) or w_per_tensor_scale.numel() != 1:
            raise ValueError("w_per_tensor_scale must be None or a one-element tensor")
        w_per_tensor_scale = w_per_tensor_scale.detach().float().reshape(())
    if bias is not None and (
        not isinstance(bias, torch.Tensor) or not bias.is_floating_point() or tuple(bias.shape) != (n,)
    ):
        raise ValueError(
            f"bias must be None or a floating-point tensor of shape ({n},), got {getattr(bias, 'shape', bias)}"
        )
    weight = _Weight(w_qdata.contiguous(), w_scale_codes.contiguous().view(torch.uint8), w_per_tensor_scale, bias)
    for name, t in zip(("w_qdata", "w_scale_codes", "w_per_tensor_scale", "bias"), weight, strict=True):
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but the input is on {device}")
    return weight


def _check_out_dtype(out_dtype, default: torch.dtype) -> torch.dtype:
    out_dtype = default if out_dtype is None else out_dtype
    if out_dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"out_dtype must be one of {SUPPORTED_DTYPES}, got {out_dtype}")
    return out_dtype


def _launch(
    a_mode: str,
    a: torch.Tensor,
    weight: _Weight,
    out_dtype: torch.dtype,
    split_k: int,
    *,
    a_scale_codes: torch.Tensor | None = None,
    a_pts: torch.Tensor | None = None,
    method: str = "amax",
    window: tuple = (0, 0),
    dot_dtype: torch.dtype = torch.float16,
    dot_scaled: bool = False,
) -> torch.Tensor:
    """Launch the GEMM kernel on ``a`` ((M, K) floats, or (M, K // 2) codes with ``a_scale_codes``) and finish
    split-K; returns (M, N) in ``out_dtype``."""
    m, n, k = a.shape[0], weight.qdata.shape[0], weight.qdata.shape[1] * 2
    if split_k == 1:
        out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    else:
        out = torch.empty((split_k, m, n), dtype=torch.float32, device=a.device)
    if INTERPRET and dot_dtype == torch.bfloat16:
        dot_dtype = torch.float32  # the interpreter's bf16 dot is wrong (FACTS.md); bf16 -> fp32 is exact

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
        weight.qdata,
        weight.scale_codes,
        pointer(weight.per_tensor_scale),
        pointer(weight.bias),
        out,
        m,
        n,
        k,
        triton.next_power_of_2(m),
        0 if a_pts is None or a_pts.numel() == 1 else 1,
        A_MODE=a_mode,
        METHOD=method,
        LO=window[0],
        HI=window[1],
        HAS_A_PTS=a_pts is not None,
        HAS_W_PTS=weight.per_tensor_scale is not None,
        HAS_BIAS=weight.bias is not None,
        DOT_DTYPE=_TL_DTYPES[dot_dtype],
        INPUT_PRECISION="ieee" if dot_dtype == torch.float32 else "tf32",  # tf32 is the default, unused for 16 bits
        DOT_SCALED=dot_scaled,
        SPLIT_K=split_k,
        enable_fp_fusion=False,
    )
    if split_k == 1:
        return out
    out = out.sum(0)
    return (out if weight.bias is None else out + weight.bias.float()).to(out_dtype)


def _launch_w4a4(a: NVFP4Blocks, weight: _Weight, out_dtype: torch.dtype, split_k: int, dot_scaled: bool):
    """The GEMM of quantized activation blocks; returns (M, N)."""
    k = weight.qdata.shape[1] * 2
    return _launch(
        "nvfp4",
        a.qdata.reshape(-1, k // 2).contiguous(),
        weight,
        out_dtype,
        split_k,
        a_scale_codes=a.scale_codes.reshape(-1, k // BLOCK_SIZE).contiguous(),
        a_pts=a.per_tensor_scale,
        dot_scaled=dot_scaled,
    )


def nvfp4_gemm_triton(
    a: NVFP4Blocks,
    w_qdata: torch.Tensor,
    w_scale_codes: torch.Tensor,
    w_per_tensor_scale: torch.Tensor | None,
    bias: torch.Tensor | None = None,
    *,
    out_dtype: torch.dtype = torch.float32,
    split_k: int | None = None,
    use_dot_scaled: bool | None = None,
) -> torch.Tensor:
    """W4A4 GEMM of an already quantized activation: ``a.dequantize() @ W_dequantized^T (+ bias)``, (..., N).

    ``split_k`` and ``use_dot_scaled`` as in :func:`nvfp4_linear_triton`.
    """
    if not isinstance(a, NVFP4Blocks):
        raise ValueError(f"a must be NVFP4Blocks (from quantize_nvfp4_triton), got {type(a).__name__}")
    check_kernel_device(a.qdata, "a.qdata")
    k = a.qdata.shape[-1] * 2
    weight = _check_weight(w_qdata, w_scale_codes, w_per_tensor_scale, bias, k, a.qdata.device)
    m, n = a.qdata.numel() * 2 // k, weight.qdata.shape[0]
    out = _launch_w4a4(
        a,
        weight,
        _check_out_dtype(out_dtype, torch.float32),
        _split_k(split_k, m, n, k, a.qdata.device),
        _use_dot_scaled(use_dot_scaled, a.qdata.device),
    )
    return out.view(*a.qdata.shape[:-1], n)


def nvfp4_linear_triton(
    x: torch.Tensor,
    w_qdata: torch.Tensor,
    w_scale_codes: torch.Tensor,
    w_per_tensor_scale: torch.Tensor | None,
    bias: torch.Tensor | None = None,
    *,
    act: str | None = "nvfp4",
    method: str = "search",
    window: Sequence[int] = DEFAULT_WINDOW,
    act_per_tensor_scale: PerTensorScale = True,
    out_dtype: torch.dtype | None = None,
    fuse_act_quant: bool | None = None,
    split_k: int | None = None,
    use_dot_scaled: bool | None = None,
) -> torch.Tensor:
    """``x @ W^T (+ bias)`` with an NVFP4 weight in torchao's layout; returns ``(..., N)`` in ``out_dtype``.

    ``act="nvfp4"`` (W4A4): x is quantized with ``method`` / ``window`` / ``act_per_tensor_scale`` (as
    ``quantize_blocks``), inside the GEMM prologue when ``fuse_act_quant`` (default: M <= 16, where it saves a
    launch and the activation round trip) or by ``quantize_nvfp4_triton`` first; both give the same bits.
    ``act=None`` (W4A16): x (float32 / bfloat16 / float16) is multiplied as is. ``split_k`` (default: more
    than 1 only for M <= 16) splits the reduction across programs. ``out_dtype`` defaults to x's dtype.
    ``use_dot_scaled``: None picks ``tl.dot_scaled`` for W4A4 where the GPU has it; False forces dequantize.
    """
    if act not in ("nvfp4", None):
        raise ValueError(f"act must be 'nvfp4' (W4A4) or None (weight-only W4A16), got {act!r}")
    if not isinstance(x, torch.Tensor) or x.dtype not in SUPPORTED_DTYPES or x.dim() == 0:
        raise ValueError(
            f"x must be a float32, bfloat16 or float16 tensor with at least one dimension, got "
            f"{getattr(x, 'dtype', type(x).__name__)}"
        )
    check_kernel_device(x, "x")
    k = x.shape[-1]
    if k == 0 or k % BLOCK_SIZE:
        raise ValueError(
            f"x's last dimension (K = {k}) must be a positive multiple of {BLOCK_SIZE}, got shape {tuple(x.shape)}"
        )
    weight = _check_weight(w_qdata, w_scale_codes, w_per_tensor_scale, bias, k, x.device)
    out_dtype = _check_out_dtype(out_dtype, x.dtype)
    m, n = x.numel() // k, weight.qdata.shape[0]
    split = _split_k(split_k, m, n, k, x.device)
    if act is not None:
        check_method(method)
        window = check_window(window)
        dot_scaled = _use_dot_scaled(use_dot_scaled, x.device)
    if m == 0:
        return torch.empty((*x.shape[:-1], n), dtype=out_dtype, device=x.device)

    rows = x.reshape(m, k).contiguous()
    if act is None:
        out = _launch("float", rows, weight, out_dtype, split, dot_dtype=x.dtype)
    elif m <= DECODE_MAX_M if fuse_act_quant is None else fuse_act_quant:
        a_pts = resolve_per_tensor_scale(x, checked_amax(x), act_per_tensor_scale)
        out = _launch(
            "quantize", rows, weight, out_dtype, split, a_pts=a_pts, method=method, window=window, dot_scaled=dot_scaled
        )
    else:
        a = quantize_nvfp4_triton(rows, method, window=window, per_tensor_scale=act_per_tensor_scale)
        out = _launch_w4a4(a, weight, out_dtype, split, dot_scaled)
    return out.view(*x.shape[:-1], n)
