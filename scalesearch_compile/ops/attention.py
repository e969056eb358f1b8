"""Custom op ``scalesearch::nvfp4_attention``: NVFP4 attention (ScaleSearchAttention) behind SDPA's contract.

``impl`` chooses :func:`nvfp4_attention_reference` (its quantizations by the quantize kernel ``impl`` picks, the
same bits) or the Triton kernel (CUDA, or CPU under ``TRITON_INTERPRET=1``) as
:mod:`scalesearch_compile.ops.dispatch` decides. The recipe travels as plain
arguments (:func:`recipe_args`) because a custom op's schema takes no dataclasses. Backward is a
straight-through estimate: the gradient of float ``scaled_dot_product_attention`` at the unquantized inputs (so
a model compiled with the backend runs with grad mode on, and can be fine-tuned through NVFP4 attention as
quantization-aware training does); masks get no gradient.
"""

import torch

from scalesearch_compile.attention import DEFAULT_RECIPE, AttentionRecipe, check_inputs, nvfp4_attention_reference
from scalesearch_compile.ops.dispatch import check_impl, kernel, quantizer


@torch.library.custom_op("scalesearch::nvfp4_attention", mutates_args=())
def nvfp4_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
    method: str,
    window_low: int,
    window_high: int,
    p_method: str,
    smooth_k: bool,
    smooth_q: bool,
    hadamard: bool,
    sink_tiles: bool,
    impl: str,
) -> torch.Tensor:
    recipe = AttentionRecipe(
        method=method,
        window=(window_low, window_high),
        p_method=p_method,
        smooth_k=smooth_k,
        smooth_q=smooth_q,
        hadamard=hadamard,
        sink_tiles=sink_tiles,
    )
    attend = kernel("attention", impl, q.device)
    if attend is not None:
        return attend(q, k, v, attn_mask, is_causal, scale, enable_gqa, recipe)
    quantize = quantizer(impl, q)
    return nvfp4_attention_reference(q, k, v, attn_mask, is_causal, scale, enable_gqa, recipe, quantize)


def recipe_args(recipe: AttentionRecipe) -> tuple:
    """``recipe`` as the op's arguments: (method, window_low, window_high, p_method, smooth_k, smooth_q, hadamard,
    sink_tiles)."""
    if not isinstance(recipe, AttentionRecipe):
        raise ValueError(f"recipe must be an AttentionRecipe, got {type(recipe).__name__}")
    return (
        recipe.method,
        *recipe.window,
        recipe.p_method,
        recipe.smooth_k,
        recipe.smooth_q,
        recipe.hadamard,
        recipe.sink_tiles,
    )


@nvfp4_attention_op.register_fake
def _(q, k, v, attn_mask, is_causal, scale, enable_gqa, *recipe_and_impl):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _setup_context(ctx, inputs, output):
    q, k, v, attn_mask, is_causal, scale, enable_gqa = inputs[:7]
    ctx.save_for_backward(q, k, v, attn_mask)
    ctx.options = {"is_causal": is_causal, "scale": scale, "enable_gqa": enable_gqa}


def _backward(ctx, grad):
    q, k, v, attn_mask = ctx.saved_tensors
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_() for t in (q, k, v)]
        out = torch.nn.functional.scaled_dot_product_attention(*inputs, attn_mask=attn_mask, **ctx.options)
        grads = torch.autograd.grad(out, inputs, grad)
    return (*grads, *[None] * (len(ctx.needs_input_grad) - len(grads)))


nvfp4_attention_op.register_autograd(_backward, setup_context=_setup_context)


def nvfp4_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    recipe: AttentionRecipe = DEFAULT_RECIPE,
    impl: str = "auto",
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` (no dropout) with Q, K, V and P in NVFP4 per ``recipe``.

    Raises ValueError for unsupported inputs (e.g. a head_dim outside ``HEAD_DIMS``), so a caller can fall back
    to SDPA. ``impl``: "auto" (Triton on CUDA; elsewhere the reference, quantizing with the C++ kernel on a CPU),
    "reference" or "triton".
    """
    check_impl(impl)
    args = recipe_args(recipe)
    check_inputs(q, k, v, attn_mask, is_causal, enable_gqa)
    scale = None if scale is None else float(scale)
    return nvfp4_attention_op(q, k, v, attn_mask, is_causal, scale, enable_gqa, *args, impl)
