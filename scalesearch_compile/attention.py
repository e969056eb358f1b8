"""ScaleSearchAttention reference: scaled-dot-product attention with Q, K, V and P in NVFP4 (pure torch).

Contract: ``torch.nn.functional.scaled_dot_product_attention``'s, without dropout. ``q`` (B, Hq, Sq, D),
``k`` (B, Hkv, Sk, D), ``v`` (B, Hkv, Sk, Dv); D and Dv in ``HEAD_DIMS``; Hkv == Hq, or Hq a multiple of Hkv
with ``enable_gqa``; ``attn_mask`` bool (True = attend) or additive, broadcastable to (B, Hq, Sq, Sk);
``is_causal`` is top-left aligned (query i sees keys j <= i) and excludes ``attn_mask``; output (B, Hq, Sq, Dv)
in q's dtype. A query row that may attend to no key returns zeros, as SDPA does.

Numerics (the definition the Triton kernel follows; every quantization is ``search.quantize_reference`` at run
time: nothing is read on the host, and NaN/Inf become NaN blocks that reach only the outputs they feed):
1. Prepare (:func:`prepare`), in float32: K smoothing ``k -= mean_over_keys(k)`` (per batch, head and channel;
   softmax is unchanged since every score of a row moves by the same amount); Hadamard ``q @ H``, ``k @ H``
   with the orthonormal Sylvester matrix ``H`` (D x D), which leaves ``q k^T`` unchanged; Q smoothing
   ``mu = mean_over_queries(q)``, ``q -= mu``, compensated exactly by adding ``mu`` back after dequantizing.
   Then Q and K are quantized along head_dim and V along the sequence (V^T, keys zero-padded to a multiple of
   ``TILE``), each with one global scale per tensor (``amax / (448 * 6)``) and ``recipe.method`` block scales.
   Blocks are independent once the global scale is known, so the reference quantizes only the keys of the tiles
   it quantizes (:func:`quantized_keys`): the same numbers, without work on tiles it keeps in float32.
2. Attend KV tile by KV tile (``TILE`` keys) with FlashAttention's online softmax in float32:
   ``s = (q~ @ k~^T) * scale + mask``; ``m' = max(m, rowmax(s))``; ``p = exp(s - m')``;
   ``l = l * exp(m - m') + rowsum(p)`` (rowsum of the unquantized p); ``acc = acc * exp(m - m') + p~ @ v~``;
   output ``acc / l``. In an NVFP4 tile ``q~ = deq(q) + mu``, ``k~``, ``v~`` are the dequantized tiles and
   ``p~`` is p quantized along the keys with a per-row first-level scale ``max(rowmax(p) / (448 * 6), 2**-126)``
   (``search.global_scale``) and
   ``recipe.p_method`` E4M3 block scales (by default "four_over_six" when the method is "search"). With
   ``sink_tiles``, the first KV tile and the trailing partial tile
   (when Sk is not a multiple of ``TILE``) are high-precision tiles: the prepared float32 q, k, v and p,
   nothing quantized.
"""

import math
from dataclasses import dataclass

import torch

from scalesearch_compile.layout import NVFP4Blocks
from scalesearch_compile.search import (
    SUPPORTED_DTYPES,
    QuantizeRequest,
    ScaleChoice,
    finite_amax,
    global_scale,
    quantize_reference,
)

TILE = 64  # keys per KV tile (and queries per tile in the kernel); a multiple of the NVFP4 block (16)
# What "search" runs as for P, quantized inside the kernel for every KV tile: each candidate scale costs about 16
# thread-instructions a score there, so four_over_six's two (the amax code and amax / 4) cost 1.24-1.27x the
# instructions of amax P scales on sm_90a and 1.40x on sm_100a (fast_search's three: 1.50-1.58x), and keep 47% of
# the window's MSE reduction on softmax blocks, 35% of its gain in the attention benchmark's output error; P's
# scales move that output little (benchmarks/RESULTS.md, "Attention accuracy").
P_SEARCH = "four_over_six"
HEAD_DIMS = (64, 128)


@dataclass(frozen=True)
class AttentionRecipe(ScaleChoice):
    """The block-scale choice for Q, K and V (``method``, ``window``: a :class:`ScaleChoice`) and for P, and which
    ScaleSearchAttention techniques are on (each switchable for ablation).

    ``p_method``: the method of P's block scales, quantized inside the kernel for every KV tile, where each
    candidate scale costs about as much as the rest of P's quantization; None (the default) takes
    ``method``, with "search" run as ``P_SEARCH`` ("four_over_six", :meth:`ScaleChoice.at_run_time`).
    ``smooth_k``/``smooth_q``: subtract the mean of K over keys / of Q over queries (Q's is added back).
    ``hadamard``: rotate Q and K along head_dim. ``sink_tiles``: first and trailing partial KV tile unquantized.
    """

    p_method: str | None = None
    smooth_k: bool = True
    smooth_q: bool = False
    hadamard: bool = True
    sink_tiles: bool = True

    def __post_init__(self):
        super().__post_init__()
        try:
            object.__setattr__(self, "p_method", self.at_run_time(self.p_method, P_SEARCH).method)
        except ValueError as error:
            raise ValueError(f"AttentionRecipe.p_method: {error}") from None
        for name in ("smooth_k", "smooth_q", "hadamard", "sink_tiles"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"AttentionRecipe.{name} must be True or False, got {getattr(self, name)!r}")


DEFAULT_RECIPE = AttentionRecipe()
NAIVE_RECIPE = AttentionRecipe(method="amax", smooth_k=False, hadamard=False, sink_tiles=False)
# The ablation of issue 4, each step adding one technique to the one before (tests and the accuracy study).
ABLATION_LADDER = {
    "naive amax NVFP4": NAIVE_RECIPE,
    "+ search": AttentionRecipe(smooth_k=False, hadamard=False, sink_tiles=False),
    "+ K smoothing": AttentionRecipe(hadamard=False, sink_tiles=False),
    "+ Hadamard": AttentionRecipe(sink_tiles=False),
    "+ sink precision (default)": DEFAULT_RECIPE,
}


@dataclass(frozen=True)
class PreparedInputs:
    """Step 1 of the numerics. ``q_hp`` (B, Hq, Sq, D), ``k_hp`` (B, Hkv, Skp, D), ``v_hp`` (B, Hkv, Skp, Dv):
    float32 after smoothing and rotation (``q_hp`` before Q smoothing), keys zero-padded to Skp, a multiple of
    ``TILE`` (Skp = Sk, no padding, when no key is quantized). ``q`` quantizes ``q_hp - q_mean``; ``k``
    quantizes ``k_hp[..., keys, :]``; ``v`` quantizes ``v_hp[..., keys, :]^T`` (B, Hkv, Dv, len(keys)), K and V
    each under the global scale of the whole tensor.
    ``keys``: the quantized key range (all Skp keys unless :func:`prepare` was given fewer); q, k and v are None
    when it is empty. ``q_mean`` (B, Hq, 1, D) or None."""

    q_hp: torch.Tensor
    k_hp: torch.Tensor
    v_hp: torch.Tensor
    q: NVFP4Blocks | None
    k: NVFP4Blocks | None
    v: NVFP4Blocks | None
    q_mean: torch.Tensor | None
    keys: range


def hadamard_matrix(n: int, device=None) -> torch.Tensor:
    """Orthonormal Sylvester-Hadamard matrix (n x n, n a power of two) in float32: ``H @ H.T == I``."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Sylvester-Hadamard matrix needs a power-of-two size, got {n}")
    h = torch.ones(1, 1, device=device)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)  # entries +-1: CUDA's multiplication by the reciprocal gives the same bits


def check_inputs(q, k, v, attn_mask, is_causal, enable_gqa) -> None:
    """Raise ValueError naming the problem if the arguments fall outside the supported SDPA contract."""
    for name, t in (("query", q), ("key", k), ("value", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor (batch, heads, seq, head_dim)")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} has unsupported dtype {t.dtype}; NVFP4 attention takes {SUPPORTED_DTYPES}")
        if t.shape[-1] not in HEAD_DIMS:
            raise ValueError(
                f"{name} head_dim {t.shape[-1]} is not supported by NVFP4 attention (supported: {HEAD_DIMS}); "
                "fall back to scaled_dot_product_attention"
            )
        if t.numel() == 0:
            raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, query on {q.device}")
    (b, hq, _, d), (bk, hkv, sk, dk) = q.shape, k.shape
    if d != dk or bk != b or v.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"shapes do not match: query {tuple(q.shape)}, key {tuple(k.shape)}, value {tuple(v.shape)} "
            "(batch and query/key head_dim must agree; key and value must share batch, heads and length)"
        )
    if hq != hkv and not (enable_gqa and hq % hkv == 0):
        raise ValueError(
            f"query has {hq} heads and key/value {hkv}: pass enable_gqa=True with query heads a multiple of kv heads"
        )
    if attn_mask is not None:
        if is_causal:
            raise ValueError("pass either attn_mask or is_causal=True, not both (as scaled_dot_product_attention)")
        if not isinstance(attn_mask, torch.Tensor) or (
            attn_mask.dtype != torch.bool and not attn_mask.is_floating_point()
        ):
            raise ValueError(
                f"attn_mask must be a bool or floating-point tensor, got {getattr(attn_mask, 'dtype', attn_mask)}"
            )
        if attn_mask.device != q.device:
            raise ValueError(f"attn_mask is on {attn_mask.device}, query on {q.device}")
        try:
            torch.broadcast_shapes(attn_mask.shape, (b, hq, q.shape[2], sk))
        except RuntimeError:
            raise ValueError(
                f"attn_mask shape {tuple(attn_mask.shape)} does not broadcast to {(b, hq, q.shape[2], sk)}"
            ) from None


def additive_mask(attn_mask: torch.Tensor) -> torch.Tensor:
    """A bool (True = attend) or float mask as float32 to add to the scores: 0 / -inf for a bool mask."""
    if attn_mask.dtype == torch.bool:
        return torch.zeros(attn_mask.shape, device=attn_mask.device).masked_fill(~attn_mask, -math.inf)
    return attn_mask.float()


def score_bias(attn_mask, is_causal: bool, q_len: int, k_len: int, padded_len: int, device) -> torch.Tensor:
    """Everything added to the scores, 4-D float32 broadcastable to (B, H, Sq, padded_len): the mask, the causal
    mask and -inf on the padding keys."""
    if is_causal:
        attn_mask = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril()
    bias = torch.zeros(1, 1, 1, k_len, device=device) if attn_mask is None else additive_mask(attn_mask)
    bias = bias.reshape((1,) * (4 - bias.dim()) + bias.shape)
    bias = bias.expand(*bias.shape[:-1], k_len)
    return torch.nn.functional.pad(bias, (0, padded_len - k_len), value=-math.inf)


def prepare(q, k, v, recipe: AttentionRecipe, quantize=quantize_reference, keys: range | None = None) -> PreparedInputs:
    """Step 1 of the module numerics: smoothing, rotation, padding and quantization of Q, K and V (at run time:
    nothing read on the host, NaN/Inf propagate as NaN blocks).

    ``quantize``: :func:`quantize_reference` or a kernel computing the same bits, taking a :class:`QuantizeRequest`.
    ``keys``: the keys to quantize (bounds multiples of 16; default all, padding included); none quantizes
    nothing.
    """
    q, k, v = q.float(), k.float(), v.float()
    if recipe.smooth_k:
        k = k - k.mean(dim=-2, keepdim=True)
    if recipe.hadamard:
        q = q @ hadamard_matrix(q.shape[-1], q.device)
        k = k @ hadamard_matrix(k.shape[-1], k.device)
    q_mean = q.mean(dim=-2, keepdim=True) if recipe.smooth_q else None
    padded_len = k.shape[-2] + -k.shape[-2] % TILE
    keys = range(padded_len) if keys is None else keys
    if not keys:  # nothing quantized: no padding either
        return PreparedInputs(q, k, v, None, None, None, q_mean, keys)
    k = torch.nn.functional.pad(k, (0, 0, 0, padded_len - k.shape[-2]))
    v = torch.nn.functional.pad(v, (0, 0, 0, padded_len - v.shape[-2]))

    scales = ScaleChoice.of(recipe)

    def quantized(x, pts=True):
        return quantize(QuantizeRequest.of(x, scales, per_tensor_scale=pts, check_finite=False))

    some = slice(keys.start, keys.stop)
    q_blocks = quantized(q if q_mean is None else q - q_mean)
    k_blocks = quantized(k[..., some, :], global_scale(finite_amax(k)))
    v_blocks = quantized(v[..., some, :].transpose(-1, -2), global_scale(finite_amax(v)))
    return PreparedInputs(q, k, v, q_blocks, k_blocks, v_blocks, q_mean, keys)


def high_precision_tiles(k_len: int, recipe: AttentionRecipe) -> set:
    """Indices of the KV tiles kept unquantized: the first and a trailing partial one, with ``sink_tiles``."""
    if not recipe.sink_tiles:
        return set()
    return {0} | ({k_len // TILE} if k_len % TILE else set())


def quantized_keys(k_len: int, recipe: AttentionRecipe) -> range:
    """The keys of the KV tiles that are quantized (those not in :func:`high_precision_tiles`), padding
    included: a contiguous range, empty when every tile is kept in float32."""
    kept_precise = high_precision_tiles(k_len, recipe)
    tiles = [t for t in range(-(-k_len // TILE)) if t not in kept_precise]
    return range(tiles[0] * TILE, (tiles[-1] + 1) * TILE) if tiles else range(0)


def quantize_probabilities(p: torch.Tensor, recipe: AttentionRecipe, quantize=quantize_reference) -> torch.Tensor:
    """NVFP4 round trip of probabilities ``p`` (..., TILE) >= 0 along the last dim, two-level with a per-row
    first level ``search.global_scale(rowmax)``; ``quantize`` as :func:`prepare` takes it."""
    row_scale = global_scale(p.amax(dim=-1, keepdim=True))
    scales = ScaleChoice(recipe.p_method, recipe.window)
    request = QuantizeRequest.of(p, scales, per_tensor_scale=row_scale, check_finite=False)
    return quantize(request).dequantize()


def nvfp4_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    recipe: AttentionRecipe = DEFAULT_RECIPE,
    quantize=quantize_reference,
) -> torch.Tensor:
    """NVFP4 attention as defined in the module docstring; same arguments as SDPA (no dropout) plus ``recipe``;
    every quantization by ``quantize`` (:func:`quantize_reference`, or what computes the same bits)."""
    check_inputs(q, k, v, attn_mask, is_causal, enable_gqa)
    q_len, k_len = q.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    prep = prepare(q, k, v, recipe, quantize, keys=quantized_keys(k_len, recipe))
    group = q.shape[1] // k.shape[1]

    def per_query_head(x):  # (B, Hkv, ...) -> (B, Hq, ...); no copy without grouped heads
        return x if group == 1 else x.repeat_interleave(group, dim=1)

    k_hp, v_hp = per_query_head(prep.k_hp), per_query_head(prep.v_hp)
    if prep.keys:  # indexed by key as k_hp is (zeros before prep.keys, never read)
        q_quant = prep.q.dequantize() + (0.0 if prep.q_mean is None else prep.q_mean)
        k_quant = per_query_head(prep.k.dequantize())
        v_quant = per_query_head(prep.v.dequantize().transpose(-1, -2))
        k_quant, v_quant = (torch.nn.functional.pad(t, (0, 0, prep.keys.start, 0)) for t in (k_quant, v_quant))
    bias = score_bias(attn_mask, is_causal, q_len, k_len, prep.k_hp.shape[-2], q.device)
    hp_tiles = high_precision_tiles(k_len, recipe)

    row_max = torch.full((*prep.q_hp.shape[:-1], 1), -math.inf, device=q.device)
    row_sum = torch.zeros_like(row_max)
    acc = torch.zeros((*prep.q_hp.shape[:-1], v.shape[-1]), device=q.device)
    for tile, start in enumerate(range(0, k_len, TILE)):
        keys = slice(start, start + TILE)
        hp = tile in hp_tiles
        q_t, k_t, v_t = (prep.q_hp, k_hp, v_hp) if hp else (q_quant, k_quant, v_quant)
        s = (q_t @ k_t[..., keys, :].transpose(-1, -2)) * scale + bias[..., keys]
        new_max = torch.maximum(row_max, s.amax(dim=-1, keepdim=True))
        safe_max = torch.where(new_max == -math.inf, 0.0, new_max)
        alpha = torch.exp(row_max - safe_max)
        p = torch.exp(s - safe_max)
        row_sum = row_sum * alpha + p.sum(dim=-1, keepdim=True)
        p_t = p if hp else quantize_probabilities(p, recipe, quantize)
        acc = acc * alpha + p_t @ v_t[..., keys, :]
        row_max = new_max
    out = acc / torch.where(row_sum > 0, row_sum, 1.0)  # a row with no key has acc == 0
    return out.to(q.dtype)
