"""NVFP4 block-scale selection: amax, four_over_six, search (ScaleSearch) and exhaustive.

Numerics (the reference every kernel must match bit for bit):
- Input is cast to float32 and split into blocks of 16 along the last dimension.
- Global scale (optional): ``pts = amax(|x|) / (448 * 6)`` as torchao's ``per_tensor_amax_to_scale``; a zero
  or underflowing ``pts`` is replaced by 1.0 so an all-zero tensor quantizes to zeros, not NaN.
- amax code ``c0 = e4m3(clamp(amax_block / 6 / pts, 2**-6, 448))`` (without a global scale, ``pts`` is
  left out of every formula), exactly torchao's ``nvfp4_quantize``.
- A candidate code ``c`` (1..126) quantizes the block as ``q = e2m1(clamp(x * ((1 / pts) / s), -6, 6))``
  with ``s = e4m3_value(c)`` and dequantizes as ``q * (pts * s)``; its error is the sum over the block of
  ``w * (x - q * (pts * s))**2`` in float32, added pairwise (8 sums of neighbours, then 4, 2, 1) so that any
  implementation that adds in the same tree gets the same bits. ``w`` is 1, or the per-input-channel
  importance (e.g. mean of x**2 of the layer's calibration inputs).
- The amax code is evaluated first and a candidate replaces the best only if its error is strictly lower, so
  the amax code wins ties and no block ever gets a larger error than with amax.

Candidates per method: ``amax`` {c0}; ``four_over_six`` {c0, e4m3(clamp(amax_block / 4 / pts, 2**-6, 448))};
``search`` {c0 + d for d in window} (default window -2..+6, the ScaleSearch paper's); ``exhaustive`` all
codes 1..126.

Overflow policy: a candidate code outside 1..126 (a scale above 448 or at zero after global scaling) is
skipped, never clamped. With torchao's global scale the block holding the tensor's amax already sits at
code 126, so only smaller scales are tried for it; clamping would merely repeat the 448 candidate.

Memory: the input is processed in chunks of about ``CHUNK_ELEMENTS`` values, so the working set is bounded
by a few float32 copies of one chunk whatever the tensor size.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from scalesearch_compile.formats import (
    E2M1_MAX,
    E4M3_MAX,
    E4M3_MAX_CODE,
    E4M3_MIN_NORMAL,
    e2m1_encode,
    e2m1_round,
    e2m1_value_table,
    e4m3_encode,
    e4m3_value_table,
    pack_nibbles,
    unpack_nibbles,
)

BLOCK_SIZE = 16
METHODS = ("amax", "search", "four_over_six", "exhaustive")
DEFAULT_WINDOW = (-2, 6)
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# 2**18 values a chunk: peak extra memory for a 4096x4096 bf16 input measured at 0.76x the input (2.4x with
# 2**20), at the same speed.
CHUNK_ELEMENTS = 1 << 18

PerTensorScale = bool | str | None | torch.Tensor


@dataclass(frozen=True)
class NVFP4Blocks:
    """A tensor quantized to NVFP4 in torchao's unswizzled layout, with the search's choices.

    ``qdata``: uint8 ``(..., K // 2)``, two E2M1 codes a byte (element 2i in the low nibble).
    ``scale_codes``: uint8 E4M3 codes ``(..., K // 16)``. ``per_tensor_scale``: float32 0-d tensor, a
    per-row ``(..., 1)`` tensor, or None for single-level scaling. ``offsets``: int16 ``(..., K // 16)``,
    chosen code minus amax code per block.
    """

    qdata: torch.Tensor
    scale_codes: torch.Tensor
    per_tensor_scale: torch.Tensor | None
    offsets: torch.Tensor

    def block_scales(self) -> torch.Tensor:
        """float32 scale of each block, global scale included: ``pts * e4m3_value(code)``."""
        scales = e4m3_value_table(self.scale_codes.device)[self.scale_codes.long()]
        return scales if self.per_tensor_scale is None else self.per_tensor_scale * scales

    def dequantize(self) -> torch.Tensor:
        """float32 values ``e2m1_value(code) * (pts * e4m3_value(scale_code))``, shape ``(..., K)``."""
        values = e2m1_value_table(self.qdata.device)[unpack_nibbles(self.qdata).long()]
        blocks = values.unflatten(-1, (-1, BLOCK_SIZE))
        return (blocks * self.block_scales().unsqueeze(-1)).flatten(-2)


def check_dtype_and_shape(x: torch.Tensor, what: str = "input") -> None:
    """ValueError naming the problem unless ``x`` is a tensor of a supported dtype with K % 16 == 0 (reads no
    values, so it also runs on fake tensors)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d) for d in SUPPORTED_DTYPES)
        raise ValueError(f"{what} has unsupported dtype {x.dtype}; NVFP4 quantization takes {names}")
    if x.dim() == 0 or x.shape[-1] % BLOCK_SIZE:
        raise ValueError(
            f"{what} last dimension must be a multiple of {BLOCK_SIZE} (the NVFP4 block size), "
            f"got shape {tuple(x.shape)}"
        )


def checked_amax(x: torch.Tensor, what: str = "input") -> torch.Tensor:
    """amax(|x|) as float32, after raising ValueError naming the problem if ``x`` cannot be quantized."""
    check_dtype_and_shape(x, what)
    if x.numel() == 0:
        raise ValueError(f"{what} is empty (shape {tuple(x.shape)}); there is nothing to quantize")
    amax = x.abs().amax().float()  # NaN and Inf propagate into the maximum
    if not torch.isfinite(amax):
        bad = (~torch.isfinite(x)).sum().item()
        raise ValueError(f"{what} contains {bad} NaN or Inf value(s); NVFP4 quantization needs finite input")
    return amax


def check_window(window: Sequence[int]) -> tuple:
    """Validate a search window ``(lowest offset, highest offset)`` of E4M3 codes around the amax code."""
    try:
        low, high = (int(v) for v in window)
    except (TypeError, ValueError):
        raise ValueError(f"window must be a pair of integer code offsets (low, high), got {window!r}") from None
    if low > high:
        raise ValueError(f"empty search window ({low}, {high}): the low offset must not exceed the high offset")
    return low, high


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")


def per_tensor_scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """torchao's global scale ``amax / (448 * 6)`` (float32), with 1.0 where that is zero."""
    scale = amax.float() / (E4M3_MAX * E2M1_MAX)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def resolve_per_tensor_scale(x: torch.Tensor, amax: torch.Tensor, per_tensor_scale: PerTensorScale):
    """``per_tensor_scale`` as :func:`quantize_blocks` takes it, resolved for ``x`` (whose amax is ``amax``).

    The global scale as float32: 0-d (one per tensor), ``(..., 1)`` (one per row) or None."""
    if per_tensor_scale is True:
        return per_tensor_scale_from_amax(amax)
    if per_tensor_scale is None or per_tensor_scale is False:
        return None
    if isinstance(per_tensor_scale, str):
        if per_tensor_scale != "row":
            raise ValueError(f"unknown per_tensor_scale {per_tensor_scale!r}; expected True, None, 'row' or a tensor")
        return per_tensor_scale_from_amax(x.abs().amax(dim=-1, keepdim=True))
    row_shape = (*x.shape[:-1], 1)
    if not isinstance(per_tensor_scale, torch.Tensor) or per_tensor_scale.numel() not in (1, math.prod(row_shape)):
        raise ValueError(
            f"per_tensor_scale must be True, None, 'row', a one-element tensor or a tensor of shape {row_shape}"
        )
    scale = per_tensor_scale.detach().float().to(x.device)
    scale = scale.reshape(()) if scale.numel() == 1 and scale.dim() < 2 else scale.reshape(row_shape)
    if not (torch.isfinite(scale).all() and (scale > 0).all()):
        raise ValueError("per_tensor_scale must be positive and finite")
    return scale


def check_importance(importance: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """Validated per-input-channel importance as float32 ``(K // 16, 16)``, or None."""
    if importance is None:
        return None
    if importance.shape != (x.shape[-1],):
        raise ValueError(
            f"importance must have one weight per input channel, shape ({x.shape[-1]},), got {tuple(importance.shape)}"
        )
    importance = importance.detach().float().to(x.device)
    if not torch.isfinite(importance).all() or (importance < 0).any():
        raise ValueError("importance weights must be finite and non-negative")
    return importance.view(-1, BLOCK_SIZE)


def _pairwise_block_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum the last dimension (16) as a fixed tree of pairs: 16 -> 8 -> 4 -> 2 -> 1."""
    while values.shape[-1] > 1:
        values = values[..., 0::2] + values[..., 1::2]
    return values[..., 0]


def _amax_code(block_amax: torch.Tensor, divisor: float, pts: torch.Tensor | None) -> torch.Tensor:
    # An elementwise division, not by a Python number: CUDA turns ``tensor / scalar`` into a multiplication
    # by the reciprocal, which differs in the last bit for about a third of the values (IEEE division here,
    # as on the CPU and in the Triton kernel's div_rn).
    scale = block_amax / torch.full_like(block_amax, divisor)
    if pts is not None:
        scale = scale / pts
    return e4m3_encode(scale.clamp(E4M3_MIN_NORMAL, E4M3_MAX)).to(torch.int32)


def _scale_factors(code, pts, scale_table):
    """Per-block (quantize multiplier, dequantize scale) of E4M3 ``code``: ((1 / pts) / s, pts * s)."""
    scale = scale_table[code.clamp(1, E4M3_MAX_CODE).long()]
    if pts is None:
        return 1.0 / scale, scale
    return (1.0 / pts) / scale, pts * scale


def _block_error(magnitudes, code, pts, scale_table, weights, work) -> torch.Tensor:
    """Block error of quantizing ``magnitudes`` = |x| (rows, K//16, 16) with E4M3 ``code`` per block.

    Uses |x - q * s| = ||x| - |q| * s| (the code keeps the sign of x), so the sign never enters. Works in
    place in ``work``, two float32 buffers shaped like ``magnitudes``: this is the hot loop, and fresh
    temporaries made the 4096x4096 search about 1.4x slower on the 2-core CI machine.
    """
    multiplier, dequant_scale = _scale_factors(code, pts, scale_table)
    y = torch.mul(magnitudes, multiplier.unsqueeze(-1), out=work[0])
    y = e2m1_round(y, out=y, scratch=work[1]).mul_(dequant_scale.unsqueeze(-1))
    err = torch.sub(magnitudes, y, out=y).square_()
    if weights is not None:
        err.mul_(weights)
    return _pairwise_block_sum(err)


def _candidate_codes(method, window, block_amax, amax_code, pts):
    """Codes to try after the amax code, in order (invalid codes are filtered by the caller)."""
    if method == "search":
        return [amax_code + d for d in range(window[0], window[1] + 1) if d != 0]
    if method == "four_over_six":
        return [_amax_code(block_amax, 4.0, pts)]
    if method == "exhaustive":
        return [torch.full_like(amax_code, c) for c in range(1, E4M3_MAX_CODE + 1)]
    return []


def _quantize_chunk(blocks, weights, pts, method, window):
    """Select scales for float32 ``blocks`` (rows, K//16, 16); return (E2M1 codes, E4M3 codes, offsets)."""
    scale_table = e4m3_value_table(blocks.device)
    magnitudes = blocks.abs()
    block_amax = magnitudes.amax(dim=-1)
    amax_code = _amax_code(block_amax, E2M1_MAX, pts)
    best_code = amax_code
    candidates = _candidate_codes(method, window, block_amax, amax_code, pts)
    if candidates:
        work = (torch.empty_like(magnitudes), torch.empty_like(magnitudes))
        best_err = _block_error(magnitudes, amax_code, pts, scale_table, weights, work)
    for code in candidates:
        err = _block_error(magnitudes, code, pts, scale_table, weights, work)
        better = (err < best_err) & (code >= 1) & (code <= E4M3_MAX_CODE)
        best_err = torch.where(better, err, best_err)
        best_code = torch.where(better, code, best_code)

    multiplier, _ = _scale_factors(best_code, pts, scale_table)
    codes = e2m1_encode((blocks * multiplier.unsqueeze(-1)).clamp(-E2M1_MAX, E2M1_MAX))
    return codes, best_code.to(torch.uint8), (best_code - amax_code).to(torch.int16)


def quantize_blocks(
    x: torch.Tensor,
    method: str = "search",
    *,
    window: Sequence[int] = DEFAULT_WINDOW,
    per_tensor_scale: PerTensorScale = True,
    importance: torch.Tensor | None = None,
) -> NVFP4Blocks:
    """Quantize ``x`` (..., K) to NVFP4 with the block scales chosen by ``method``.

    ``per_tensor_scale``: True computes torchao's global scale ``amax / (448 * 6)`` from ``x``; "row" computes
    one such scale per row (over the last dimension, shape ``(..., 1)``; the per-row first level of
    SageAttention3's P quantization); a one-element tensor, or one of shape ``(..., 1)``, is used as given;
    None or False means single-level scaling. ``importance``: optional per-input-channel weights
    (K,) for the block error. See the module docstring for the exact numerics.
    """
    check_method(method)
    window = check_window(window)
    amax = checked_amax(x)
    weights = check_importance(importance, x)
    pts = resolve_per_tensor_scale(x, amax, per_tensor_scale)
    row_pts = pts.reshape(-1, 1) if pts is not None and pts.dim() else None

    k = x.shape[-1]
    rows = x.reshape(-1, k)
    qdata = torch.empty((rows.shape[0], k // 2), dtype=torch.uint8, device=x.device)
    scale_codes = torch.empty((rows.shape[0], k // BLOCK_SIZE), dtype=torch.uint8, device=x.device)
    offsets = torch.empty(scale_codes.shape, dtype=torch.int16, device=x.device)
    step = max(1, CHUNK_ELEMENTS // k)
    for start in range(0, rows.shape[0], step):
        stop = start + step
        blocks = rows[start:stop].float().view(-1, k // BLOCK_SIZE, BLOCK_SIZE)
        chunk_pts = pts if row_pts is None else row_pts[start:stop]
        codes, scale_codes[start:stop], offsets[start:stop] = _quantize_chunk(
            blocks, weights, chunk_pts, method, window
        )
        qdata[start:stop] = pack_nibbles(codes.view(-1, k))

    lead = x.shape[:-1]
    return NVFP4Blocks(
        qdata.view(*lead, k // 2),
        scale_codes.view(*lead, k // BLOCK_SIZE),
        pts,
        offsets.view(*lead, k // BLOCK_SIZE),
    )


def chosen_offsets(x: torch.Tensor, method: str = "search", **kwargs) -> torch.Tensor:
    """Per-block E4M3 code offsets (int16, shape (..., K // 16)) that ``method`` picks relative to amax."""
    return quantize_blocks(x, method, **kwargs).offsets
