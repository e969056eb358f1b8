"""NVFP4 block-scale selection: amax, four_over_six, search (ScaleSearch), fast_search and exhaustive.

Numerics (the reference every kernel must match bit for bit):
- Input is cast to float32 and split into blocks of 16 along the last dimension.
- Global scale (optional): ``pts = max(amax(|x|) / (448 * 6), 2**-126)``, torchao's
  ``per_tensor_amax_to_scale`` over the finite values of x, kept at least the smallest normal float32 so it
  never underflows (so below amax = 2688 * 2**-126, about 3.2e-35, it is no longer torchao's value: accuracy
  wins over agreement there). Every scale is an IEEE division by a tensor (:func:`global_scale`), never by a
  Python number: CUDA computes ``tensor / python_float`` as a multiplication by the reciprocal, which differs
  in the last bit for some values, while a division by a tensor is correctly rounded on every device and in the
  Triton kernels (``div_rn``). Single-level scaling computes as ``pts = 1``.
- Normalisation: every formula below runs on ``x * 2**-e`` and ``pts * 2**-e``, with ``e`` the exponent of
  ``pts`` plus 12 (per tensor, or per row), so ``pts`` becomes about ``2**-12`` and x at most about 1. Scaling
  by a power of two is exact, so in the float32 range where nothing under- or overflows this changes no bit;
  it keeps the multipliers and the block errors inside float32 for every input whose global scale is normal,
  so quantizing ``x`` and ``x * 2**j`` gives the same codes (and the global scale times ``2**j``).
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
``search`` {c0 + d for d in window} (default window -2..+6, the ScaleSearch paper's); ``fast_search`` {c0,
c0 - 1, c4} with ``c4`` the four_over_six code (the window is not used); ``exhaustive`` all codes 1..126.

``fast_search`` is for quantization at run time (activations; attention's P takes ``four_over_six``, one
candidate fewer), where each candidate costs as much as the rest of the quantization: the codes the default
window picks cluster at c0 - 1..c0 + 1 (the block maximum near 6) and at c4 - 1..c4 + 1 (near 4; c4 - c0 is 4, 5
or 6), and these three candidates keep 84-88% of the window's error reduction on Gaussian, Laplace, Student-t,
outlier-channel and softmax blocks (benchmarks/RESULTS.md) for a quarter of its candidates.

Overflow policy: a candidate code outside 1..126 (a scale above 448 or at zero after global scaling) is
skipped, never clamped. With torchao's global scale the block holding the tensor's amax already sits at
code 126, so only smaller scales are tried for it; clamping would merely repeat the 448 candidate.

NaN and Inf: quantizing weights (``check_finite=True``, the default) raises ValueError naming them, which
reads the values (a host synchronisation on a GPU). At run time (``check_finite=False``) nothing is read on
the host: non-finite values are quantized as zeros, their block gets the E4M3 NaN code 127 (it dequantizes to
NaN, and NaN reaches only the outputs that block feeds, as in a float matmul), and the global scale is taken
over the finite values, so one row's bad values do not change how the other rows are quantized.

Memory: the input is processed in chunks of about ``CHUNK_ELEMENTS`` values, so the working set is bounded
by a few float32 copies of one chunk whatever the tensor size.
"""

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from scalesearch_compile.formats import (
    E2M1_MAX,
    E4M3_MAX,
    E4M3_MAX_CODE,
    E4M3_MIN_NORMAL,
    E4M3_NAN_CODE,
    e2m1_encode,
    e2m1_round,
    e4m3_encode,
    e4m3_value_table,
    pack_nibbles,
)
from scalesearch_compile.layout import BLOCK_SIZE, NVFP4Blocks

METHODS = ("amax", "search", "fast_search", "four_over_six", "exhaustive")
DEFAULT_WINDOW = (-2, 6)
MAX_OFFSET = 125  # E4M3 codes 1..126: no candidate further from any amax code can be valid
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# 2**18 values a chunk: peak extra memory for a 4096x4096 bf16 input measured at 0.76x the input (2.4x with
# 2**20), at the same speed.
CHUNK_ELEMENTS = 1 << 18

GLOBAL_SCALE_MIN = 2.0**-126  # the smallest normal float32: global scales never underflow
NORMALISED_EXPONENT = 12  # global scales are normalised to [2**-12, 2**-11): x to at most about 1

PerTensorScale = bool | str | None | torch.Tensor


@dataclass(frozen=True)
class ScaleChoice:
    """How block scales are chosen: ``method`` ("amax", "search", "fast_search", "four_over_six" or "exhaustive")
    and, for "search", the ``window`` (lowest, highest) of E4M3 code offsets tried around the amax code.

    Validated here and nowhere else; a window given as a list (as JSON gives it back) becomes a tuple. The
    option objects that carry a scale choice (activation kwargs, attention recipe, backend options) derive
    from this class.
    """

    method: str = "search"
    window: tuple = DEFAULT_WINDOW

    def __post_init__(self):
        if not isinstance(self.method, str) or self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; expected one of {', '.join(METHODS)}")
        window = self.window
        if (
            isinstance(window, str | bytes)
            or not isinstance(window, Sequence)
            or len(window) != 2
            or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in window)
        ):
            raise ValueError(f"window must be a pair of integer code offsets (low, high), got {window!r}")
        low, high = (int(v) for v in window)
        if low > high:
            raise ValueError(f"empty search window ({low}, {high}): the low offset must not exceed the high offset")
        if low < -MAX_OFFSET or high > MAX_OFFSET:
            raise ValueError(
                f"window ({low}, {high}) reaches past -{MAX_OFFSET}..{MAX_OFFSET}: no valid E4M3 scale code "
                f"(1..126) lies that far from an amax code"
            )
        object.__setattr__(self, "window", (low, high))

    def at_run_time(self, method: str | None = None, search_as: str = "fast_search") -> "ScaleChoice":
        """The choice for values quantized at run time (W4A4 activations, attention probabilities) under this
        one: ``method`` when given (an option such as ``activation_method``), else this method with "search"
        replaced by ``search_as``: "fast_search" keeps most of its gain for a quarter of its candidates (module
        docstring); attention's P asks for "four_over_six" (``attention.P_SEARCH``). The window stays."""
        if method is None:
            method = search_as if self.method == "search" else self.method
        return ScaleChoice(method, self.window)

    @staticmethod
    def of(method: "str | ScaleChoice") -> "ScaleChoice":
        """A public function's ``method`` argument as a scale choice: a method name (with the default window),
        or a :class:`ScaleChoice` (an object deriving from it, such as an attention recipe, reduced to it)."""
        if isinstance(method, ScaleChoice):
            return ScaleChoice(method.method, method.window)
        return ScaleChoice(method)


DEFAULT_SCALES = ScaleChoice()


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


class NonFiniteError(ValueError):
    """A tensor that must be finite (a weight being quantized) holds NaN or Inf."""


def checked_amax(x: torch.Tensor, what: str = "input") -> torch.Tensor:
    """float32 amax of |x|, after raising :class:`NonFiniteError` counting x's NaN and Inf values (reads the
    maximum on the host)."""
    amax = x.abs().amax().float()  # NaN and Inf propagate into the maximum
    if not torch.isfinite(amax):
        bad = (~torch.isfinite(x)).sum().item()
        raise NonFiniteError(f"{what} contains {bad} NaN or Inf value(s); NVFP4 quantization needs finite input")
    return amax


def finite_amax(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """float32 amax of |x| over its finite values (0 where there are none), over all of x or along ``dim``
    (kept). Reads nothing on the host; one temporary the size of x."""
    magnitudes = x.abs().nan_to_num(nan=0.0, posinf=0.0)  # out of place: traced by ops.lowering
    return (magnitudes.amax() if dim is None else magnitudes.amax(dim=dim, keepdim=True)).float()


def global_scale(amax: torch.Tensor) -> torch.Tensor:
    """First-level scale ``max(amax / (448 * 6), 2**-126)`` (float32): an IEEE division by a tensor, so CPU, CUDA
    and the Triton kernels compute the same bits, kept a normal number."""
    amax = amax.float()
    return (amax / torch.full_like(amax, E4M3_MAX * E2M1_MAX)).clamp_min(GLOBAL_SCALE_MIN)


def normaliser(pts: torch.Tensor) -> torch.Tensor:
    """``2**-e`` for float32 global scales ``pts`` (module docstring): ``e`` is the exponent of ``pts`` plus 12,
    clamped to -114..126, read from the bits (an exact power of two on every device)."""
    exponent = ((pts.view(torch.int32) >> 23) & 0xFF) - 127
    e = (exponent + NORMALISED_EXPONENT).clamp(-114, 126)
    return ((127 - e) << 23).view(torch.float32)


def power_of_two_scale(x: torch.Tensor) -> torch.Tensor:
    """A power of two ``2**e`` (float32 0-d) such that ``x / 2**e`` has its largest finite magnitude about 1:
    dividing by it is exact, and a float matmul of ``x / 2**e`` cannot overflow where the scaled-back result does
    not. Reads nothing on the host."""
    return normaliser(global_scale(finite_amax(x))).reciprocal()


def group_scales(rows: torch.Tensor, groups: torch.Tensor, num_groups: int, act: "ScaleChoice | None") -> torch.Tensor:
    """float32 ``(S, 1)``: the activation scale of each row of ``rows`` ``(S, K)``, one per group (``groups``
    ``(S,)`` integers in 0..num_groups): the global scale of the group's finite amax when its rows are quantized
    (``act`` a ScaleChoice), else the :func:`power_of_two_scale` of the group. Reads nothing on the host."""
    amax = finite_amax(rows, dim=-1).reshape(-1)
    scales = global_scale(amax.new_zeros(num_groups + 1).scatter_reduce(0, groups.long(), amax, "amax"))
    if act is None:
        scales = normaliser(scales).reciprocal()
    return scales[groups.long()].unsqueeze(-1)


@dataclass(frozen=True)
class QuantizeRequest:
    """A validated quantization, what :func:`quantize_reference` and the Triton quantize kernel take.

    ``x``: ``(..., K)`` float32/bfloat16/float16, K a multiple of 16, not empty. ``scales``: the
    :class:`ScaleChoice`. ``per_tensor_scale``: the resolved float32 global scale, 0-d or per row ``(..., 1)``,
    or None (single-level). ``importance``: float32 ``(K // 16, 16)`` weights of each input channel's squared
    error (scaled by a power of two to a maximum of about 1), or None. ``finite``: x was checked to hold no NaN
    or Inf (so it needs no sanitising).
    """

    x: torch.Tensor
    scales: ScaleChoice
    per_tensor_scale: torch.Tensor | None
    importance: torch.Tensor | None
    finite: bool

    @classmethod
    def of(
        cls,
        x: torch.Tensor,
        scales: ScaleChoice,
        *,
        per_tensor_scale: PerTensorScale = True,
        importance: torch.Tensor | None = None,
        check_finite: bool = True,
    ) -> "QuantizeRequest":
        """Validate the arguments of a quantization and resolve the global scale.

        ``per_tensor_scale``: True computes ``amax / (448 * 6)`` from x; "row" one such scale per row (over
        the last dimension, shape ``(..., 1)``); a one-element tensor, or one of shape ``(..., 1)``, is used as
        given; None or False means single-level scaling. ``importance``: optional (K,) non-negative weights.
        ``check_finite``: True raises ValueError for NaN/Inf in x and for bad values in the given scale or
        importance (reading them on the host); False reads no value (run time; see the module docstring).
        """
        if not isinstance(scales, ScaleChoice):
            raise ValueError(f"scales must be a ScaleChoice, got {type(scales).__name__}")
        check_dtype_and_shape(x)
        if x.numel() == 0:
            raise ValueError(f"input is empty (shape {tuple(x.shape)}); there is nothing to quantize")
        if check_finite and x.device.type == "meta":
            raise ValueError("input is on the meta device: it has no values to quantize")
        x = x.detach()
        amax = checked_amax(x) if check_finite else None
        return cls(
            x,
            scales,
            _resolve_per_tensor_scale(x, per_tensor_scale, amax, check_finite),
            _check_importance(importance, x, check_finite),
            check_finite,
        )


def _resolve_per_tensor_scale(x, per_tensor_scale: PerTensorScale, amax: torch.Tensor | None, check_values: bool):
    """The global scale ``per_tensor_scale`` asks for; ``amax``: x's, when it is already known."""
    if per_tensor_scale is True:
        return global_scale(finite_amax(x) if amax is None else amax)
    if per_tensor_scale is None or per_tensor_scale is False:
        return None
    if isinstance(per_tensor_scale, str):
        if per_tensor_scale != "row":
            raise ValueError(f"unknown per_tensor_scale {per_tensor_scale!r}; expected True, None, 'row' or a tensor")
        return global_scale(finite_amax(x, dim=-1))
    row_shape = (*x.shape[:-1], 1)
    if not isinstance(per_tensor_scale, torch.Tensor) or per_tensor_scale.numel() not in (1, math.prod(row_shape)):
        raise ValueError(
            f"per_tensor_scale must be True, None, 'row', a one-element tensor or a tensor of shape {row_shape}"
        )
    scale = _values_for(per_tensor_scale, x, "per_tensor_scale")
    scale = scale.reshape(()) if scale.numel() == 1 and scale.dim() < 2 else scale.reshape(row_shape)
    if check_values and not (torch.isfinite(scale).all() and (scale > 0).all()):
        raise ValueError("per_tensor_scale must be positive and finite")
    return scale


def _values_for(t: torch.Tensor, x: torch.Tensor, what: str) -> torch.Tensor:
    """``t`` (a given global scale or importance) as float32 on x's device; ValueError for a dtype that is not
    a real float, or for a meta tensor when x has values."""
    if not t.is_floating_point():
        raise ValueError(f"{what} must be a real floating-point tensor, got dtype {t.dtype}")
    if t.device.type == "meta" and x.device.type != "meta":
        raise ValueError(f"{what} is on the meta device: it has no values")
    return t.detach().float().to(x.device)


def _check_importance(importance: torch.Tensor | None, x: torch.Tensor, check_values: bool):
    """Validated per-input-channel importance as float32 ``(K // 16, 16)``, or None."""
    if importance is None:
        return None
    if not isinstance(importance, torch.Tensor):
        raise ValueError(f"importance must be a tensor of shape ({x.shape[-1]},), got {type(importance).__name__}")
    if importance.shape != (x.shape[-1],):
        raise ValueError(
            f"importance must have one weight per input channel, shape ({x.shape[-1]},), got {tuple(importance.shape)}"
        )
    importance = _values_for(importance, x, "importance")
    if check_values and (not torch.isfinite(importance).all() or (importance < 0).any()):
        raise ValueError("importance weights must be finite and non-negative")
    # scaled by a power of two to a maximum of about 1: the same choices, and weighted errors that cannot overflow
    return (importance / power_of_two_scale(importance)).view(-1, BLOCK_SIZE)


def _pairwise_block_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum the last dimension (16) as a fixed tree of pairs: 16 -> 8 -> 4 -> 2 -> 1."""
    while values.shape[-1] > 1:
        values = values[..., 0::2] + values[..., 1::2]
    return values[..., 0]


def _amax_code(block_amax: torch.Tensor, divisor: float, pts: torch.Tensor) -> torch.Tensor:
    # IEEE divisions by tensors (module docstring), as the Triton kernel's div_rn.
    scale = block_amax / torch.full_like(block_amax, divisor) / pts
    return e4m3_encode(scale.clamp(E4M3_MIN_NORMAL, E4M3_MAX)).to(torch.int32)


def _scale_factors(code, pts, scale_table):
    """Per-block (quantize multiplier, dequantize scale) of E4M3 ``code``: ((1 / pts) / s, pts * s)."""
    scale = scale_table[code.clamp(1, E4M3_MAX_CODE).long()]
    return pts.reciprocal() / scale, pts * scale


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


def _candidate_codes(scales: ScaleChoice, block_amax, amax_code, pts):
    """Codes to try after the amax code, in order (invalid codes are filtered by the caller)."""
    if scales.method == "search":
        low, high = scales.window
        return [amax_code + d for d in range(low, high + 1) if d != 0]
    if scales.method == "four_over_six":
        return [_amax_code(block_amax, 4.0, pts)]
    if scales.method == "fast_search":
        return [amax_code - 1, _amax_code(block_amax, 4.0, pts)]
    if scales.method == "exhaustive":
        return [torch.full_like(amax_code, c) for c in range(1, E4M3_MAX_CODE + 1)]
    return []


def _quantize_chunk(blocks, weights, pts, scales: ScaleChoice, finite: bool):
    """Select scales for float32 ``blocks`` (rows, K//16, 16) with global scale ``pts`` (0-d or (rows, 1); None
    is 1); return (E2M1 codes, E4M3 codes, offsets)."""
    if not finite:
        is_finite = torch.isfinite(blocks)
        non_finite_block = ~is_finite.all(dim=-1)
        blocks = torch.where(is_finite, blocks, 0.0)
    pts = torch.ones((), device=blocks.device) if pts is None else pts
    norm = normaliser(pts)
    blocks, pts = blocks * norm.unsqueeze(-1), pts * norm
    scale_table = e4m3_value_table(blocks.device)
    magnitudes = blocks.abs()
    block_amax = magnitudes.amax(dim=-1)
    amax_code = _amax_code(block_amax, E2M1_MAX, pts)
    best_code = amax_code
    candidates = _candidate_codes(scales, block_amax, amax_code, pts)
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
    if not finite:  # the NaN scale code, and offset 0, for a block that held NaN or Inf
        best_code = torch.where(non_finite_block, E4M3_NAN_CODE, best_code)
        amax_code = torch.where(non_finite_block, E4M3_NAN_CODE, amax_code)
    return codes, best_code.to(torch.uint8), (best_code - amax_code).to(torch.int16)


class BlockRounding:
    """Rounding to a block scale chosen beforehand, as :func:`quantize_reference` rounds a block once its scale
    is chosen: for quantizers that fix a block's scale first and round its values later, one column at a time
    (GPTQ's error feedback). ``scale_codes``: E4M3 codes (rows,); ``per_tensor_scale``: the 0-d global scale."""

    def __init__(self, scale_codes: torch.Tensor, per_tensor_scale: torch.Tensor):
        self.norm = normaliser(per_tensor_scale)
        table = e4m3_value_table(scale_codes.device)
        codes = scale_codes.long()
        self.multiplier = _scale_factors(codes, per_tensor_scale * self.norm, table)[0].unsqueeze(-1)
        self.scale = (per_tensor_scale * table[codes]).unsqueeze(-1)

    def values(self, x: torch.Tensor) -> torch.Tensor:
        """float32 ``x`` (rows, n) rounded: ``e2m1 * (pts * e4m3(code))``, the values ``NVFP4Blocks.dequantize``
        gives for :meth:`codes` (a rounded zero may differ in sign)."""
        y = x * self.norm * self.multiplier
        return torch.copysign(e2m1_round(y.abs()), y) * self.scale

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 E2M1 codes (rows, n) of ``x``."""
        return e2m1_encode((x * self.norm * self.multiplier).clamp(-E2M1_MAX, E2M1_MAX))


def quantize_reference(request: QuantizeRequest) -> NVFP4Blocks:
    """The PyTorch reference of NVFP4 quantization with searched scales (module docstring): what every
    implementation must reproduce bit for bit."""
    x, pts = request.x, request.per_tensor_scale
    row_pts = pts.reshape(-1, 1) if pts is not None and pts.dim() else None
    k = x.shape[-1]
    rows = x.reshape(-1, k)
    out = NVFP4Blocks.empty(x.shape, pts, x.device)
    qdata, scale_codes, offsets = (t.view(-1, t.shape[-1]) for t in (out.qdata, out.scale_codes, out.offsets))
    step = max(1, CHUNK_ELEMENTS // k)
    for start in range(0, rows.shape[0], step):
        stop = start + step
        blocks = rows[start:stop].float().view(-1, k // BLOCK_SIZE, BLOCK_SIZE)
        chunk_pts = pts if row_pts is None else row_pts[start:stop]
        codes, scale_codes[start:stop], offsets[start:stop] = _quantize_chunk(
            blocks, request.importance, chunk_pts, request.scales, request.finite
        )
        qdata[start:stop] = pack_nibbles(codes.view(-1, k))
    return out


def quantize_blocks(
    x: torch.Tensor,
    method: str | ScaleChoice = "search",
    *,
    per_tensor_scale: PerTensorScale = True,
    importance: torch.Tensor | None = None,
    check_finite: bool = True,
) -> NVFP4Blocks:
    """Quantize ``x`` (..., K) to NVFP4 with the block scales chosen by ``method`` (the PyTorch reference).

    ``method``: a method name (default window -2..+6) or a :class:`ScaleChoice` (``ScaleChoice("search",
    (-1, 4))``). ``per_tensor_scale``, ``importance`` and ``check_finite`` as :meth:`QuantizeRequest.of`. See
    the module docstring for the numerics.
    """
    request = QuantizeRequest.of(
        x,
        ScaleChoice.of(method),
        per_tensor_scale=per_tensor_scale,
        importance=importance,
        check_finite=check_finite,
    )
    return quantize_reference(request)


def chosen_offsets(x: torch.Tensor, method: str | ScaleChoice = "search", **kwargs) -> torch.Tensor:
    """Per-block E4M3 code offsets (int16, shape (..., K // 16)) that ``method`` picks relative to amax."""
    return quantize_blocks(x, method, **kwargs).offsets
