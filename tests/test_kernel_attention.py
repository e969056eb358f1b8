"""The Triton attention kernel against the reference (under TRITON_INTERPRET=1 on CPU, or on CUDA)."""

import os

import pytest
import torch

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("the Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)

import triton.language as tl  # noqa: E402

from scalesearch_compile.attention import (  # noqa: E402
    NAIVE_RECIPE,
    TILE,
    AttentionRecipe,
    nvfp4_attention_reference,
    quantize_probabilities,
)
from scalesearch_compile.kernels.attention import (  # noqa: E402
    KERNEL_TOLERANCE,
    _quantize_probabilities,
    nvfp4_attention_triton,
)
from scalesearch_compile.ops.attention import nvfp4_attention  # noqa: E402
from scalesearch_compile.search import ScaleChoice, quantize_blocks  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def inputs(seed, batch=1, heads=2, kv_heads=2, q_len=64, k_len=64, head_dim=64, v_dim=None, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, head_dim, generator=g)
    k = torch.randn(batch, kv_heads, k_len, head_dim, generator=g) + torch.randn(1, kv_heads, 1, head_dim, generator=g)
    v = torch.randn(batch, kv_heads, k_len, v_dim or head_dim, generator=g)
    return q.to(DEVICE, dtype), k.to(DEVICE, dtype), v.to(DEVICE, dtype)


def rel_diff(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


CASES = [
    dict(q_len=256, k_len=256),
    dict(q_len=256, k_len=256, is_causal=True, recipe=NAIVE_RECIPE, dtype=torch.bfloat16),
    dict(q_len=77, k_len=200, heads=4, kv_heads=2, enable_gqa=True, head_dim=128, v_dim=64),
    dict(q_len=130, k_len=130, is_causal=True, recipe=AttentionRecipe(smooth_q=True, sink_tiles=False)),
    dict(q_len=5, k_len=250, mask="bool", recipe=AttentionRecipe(hadamard=False, window=(-1, 3), p_method="search")),
    dict(q_len=100, k_len=190, batch=2, heads=2, kv_heads=1, enable_gqa=True, mask="float", scale=0.2),
    dict(q_len=200, k_len=150, is_causal=True, head_dim=128, recipe=AttentionRecipe(method="four_over_six")),
]


def case_id(case):
    return "-".join(f"{k}={v}" for k, v in case.items() if k != "recipe") + ("-recipe" if "recipe" in case else "")


@pytest.mark.parametrize("seed,case", list(enumerate(CASES)), ids=[case_id(c) for c in CASES])
def test_kernel_matches_reference(seed, case):
    check_against_reference(seed, case)


@pytest.mark.usefixtures("interpreted_dot_scaled")
@pytest.mark.parametrize("seed,case", list(enumerate(CASES)), ids=[case_id(c) for c in CASES])
def test_the_dot_scaled_kernel_matches_reference(seed, case):
    """The sm_100 path (``interpreted_dot_scaled``): Q.K^T and P.V through ``tl.dot_scaled`` of packed codes."""
    check_against_reference(seed, case)


def check_against_reference(seed, case):
    case = dict(case)
    call = {key: case.pop(key) for key in ("is_causal", "enable_gqa", "scale", "recipe") if key in case}
    mask_kind = case.pop("mask", None)
    q, k, v = inputs(seed, **case)
    g = torch.Generator().manual_seed(0)
    if mask_kind == "bool":
        mask = torch.rand(q.shape[0], 1, q.shape[2], k.shape[2], generator=g) > 0.5
        mask[..., 1, :] = False  # a row with no key: zeros, as SDPA
        call["attn_mask"] = mask.to(DEVICE)
    elif mask_kind == "float":
        call["attn_mask"] = torch.randn(q.shape[2], k.shape[2], generator=g).to(DEVICE)
    out = nvfp4_attention_triton(q, k, v, **call)
    ref = nvfp4_attention_reference(
        q.cpu(), k.cpu(), v.cpu(), **{k: x.cpu() if torch.is_tensor(x) else x for k, x in call.items()}
    )
    assert out.shape == ref.shape and out.dtype == q.dtype and torch.isfinite(out).all()
    # A bfloat16 output may round the other way where the float32 results straddle a rounding boundary.
    tolerance = KERNEL_TOLERANCE if q.dtype == torch.float32 else torch.finfo(q.dtype).eps
    # The kernel's P is the reference's times exp(m_ref - m) (its running max m leaves out the sink tile, merged
    # afterwards), rounded: now and then a P element lands on the neighbouring E2M1 value and moves its row by up
    # to a few 1e-3. Every other row agrees to the tolerance.
    row_diff = (out.cpu().double() - ref.double()).norm(dim=-1) / ref.double().norm(dim=-1).clamp_min(1e-30)
    assert (row_diff > tolerance).double().mean() <= 0.01 and row_diff.max() <= 0.02
    assert rel_diff(out.cpu(), ref) <= (tolerance if (row_diff <= tolerance).all() else 1e-3)
    if mask_kind == "bool":
        assert (out[..., 1, :] == 0).all()


def test_causal_tile_skipping_equals_explicit_mask():
    q, k, v = inputs(seed=1, q_len=200, k_len=200)
    tril = torch.ones(200, 200, dtype=torch.bool, device=DEVICE).tril()
    causal = nvfp4_attention_triton(q, k, v, is_causal=True)
    masked = nvfp4_attention_triton(q, k, v, attn_mask=tril)
    assert rel_diff(causal, masked) <= KERNEL_TOLERANCE


def test_op_dispatches_to_the_kernel():
    q, k, v = inputs(seed=2, q_len=70, k_len=140)
    recipe = AttentionRecipe(sink_tiles=False)
    out = nvfp4_attention(q, k, v, recipe=recipe, impl="triton")
    torch.testing.assert_close(out, nvfp4_attention_triton(q, k, v, recipe=recipe), atol=0, rtol=0)
    assert (
        rel_diff(out.cpu(), nvfp4_attention(q.cpu(), k.cpu(), v.cpu(), recipe=recipe, impl="reference"))
        <= KERNEL_TOLERANCE
    )


def test_kernel_rejects_bad_inputs():
    q, k, v = inputs(seed=3)
    with pytest.raises(ValueError, match="head_dim 32 is not supported"):
        nvfp4_attention_triton(q[..., :32], k[..., :32], v[..., :32])
    with pytest.raises(ValueError, match="enable_gqa"):
        nvfp4_attention_triton(q, k[:, :1], v[:, :1])


@triton.jit
def _quantize_probabilities_kernel(
    p_ptr, codes_ptr, scale_codes_ptr, row_scale_ptr,
    R: tl.constexpr, N: tl.constexpr, METHOD: tl.constexpr, LO: tl.constexpr, HI: tl.constexpr,
):  # fmt: skip
    rows = tl.arange(0, R)
    p = tl.load(p_ptr + rows[:, None] * N + tl.arange(0, N)[None, :])
    codes, scale_codes, row_scale = _quantize_probabilities(p, METHOD, LO, HI)
    tl.store(codes_ptr + rows[:, None] * N + tl.arange(0, N)[None, :], codes)
    tl.store(scale_codes_ptr + rows[:, None] * (N // 16) + tl.arange(0, N // 16)[None, :], scale_codes)
    tl.store(row_scale_ptr + rows, row_scale)


def probability_tile():
    """Rows of exp(s - max) as the kernel sees them, plus edge rows: all zero, all below the scale floor,
    subnormal, a single one, values on E2M1 rounding ties relative to the row maximum, and a block scaled by its
    amax code to the most it can reach above 6."""
    g = torch.Generator().manual_seed(4)
    p = torch.exp(-3 * torch.rand(16, TILE, generator=g))
    p[0] = 0
    p[1] = 1e-33 * torch.rand(TILE, generator=g)
    p[2] = 1e-40
    p[3, :] = 0
    p[3, 7] = 1.0
    p[4] = torch.tensor([6.0, 5.0, 2.5, 0.75, 0.25, 1.75, 3.5, 0.125] * 8) / 6
    p[5, 17:] = 0
    # amax / 6 / row scale = 448 * 0.607 = 272 rounds down to the E4M3 scale 256: the amax code scales this block's
    # maximum to 6.37, the most it can reach (SCALE_FITS leaves out the saturation there)
    p[6, :16] = torch.linspace(0.1, 0.607, 16)
    p[6, 16] = 1.0
    return p


P_RECIPES = [
    AttentionRecipe(),
    AttentionRecipe(p_method="fast_search"),
    AttentionRecipe(p_method="search"),
    NAIVE_RECIPE,
    AttentionRecipe(method="exhaustive"),
]


@pytest.mark.parametrize("recipe", P_RECIPES)
def test_p_quantization_is_bitwise_the_reference(recipe):
    p = probability_tile()
    codes = torch.empty(p.shape, dtype=torch.int32)
    scale_codes = torch.empty(16, TILE // 16, dtype=torch.int32)
    row_scale = torch.empty(16)
    tensors = [t.to(DEVICE) for t in (p, codes, scale_codes, row_scale)]
    _quantize_probabilities_kernel[(1,)](*tensors, 16, TILE, recipe.p_method, *recipe.window, enable_fp_fusion=False)
    codes, scale_codes, row_scale = (t.cpu() for t in tensors[1:])

    expected_scale = (p.amax(1) / 2688).clamp_min(2.0**-126)  # never below the smallest normal float32
    scales = ScaleChoice(recipe.p_method, recipe.window)
    expected = quantize_blocks(p, scales, per_tensor_scale=expected_scale[:, None])
    assert torch.equal(row_scale, expected_scale)
    assert torch.equal(scale_codes, expected.scale_codes.int())
    assert torch.equal(codes, torch.stack([expected.qdata & 15, expected.qdata >> 4], -1).flatten(-2).int())
    assert torch.equal(quantize_probabilities(p, recipe), expected.dequantize())


LENGTHS = ("q_len", "k_len", "padded_len", "sink_end", "tail_start")


def compile_job(capability, head_dim=64, block_m=64, dot_scaled=False):
    """A compile job for ``_attention_kernel`` with every feature on (causal, mask, Q smoothing, search, leaving
    its row state for the high-precision tiles)."""
    signature = {f"{t}_{kind}_ptr": "*u8" for t in "qkv" for kind in ("codes", "scales")}
    signature.update({f"{name}_ptr": "*fp32" for name in ("q_mean", "global_scales", "mask", "max", "sum", "out")})
    signature.update({f"mask_stride_{name}": "i32" for name in "bhmn"}, sm_scale="fp32")
    signature.update({name: "i32" for name in ("num_heads", "group", *LENGTHS, "Q_BUCKET", "K_BUCKET")})
    constexprs = dict(
        HEAD_DIM=head_dim, V_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=TILE, IS_CAUSAL=True, HAS_MASK=True,
        SMOOTH_Q=True, METHOD="search", LO=-2, HI=6, DOT_SCALED=dot_scaled, LEAVE_STATE=True,
    )  # fmt: skip
    options = {"num_warps": 4, "enable_fp_fusion": False}
    return ("scalesearch_compile.kernels.attention", "_attention_kernel", signature, constexprs, capability, options)


def precise_job(capability, head_dim=64):
    """A compile job for ``_precise_kernel`` as the launcher runs it (causal, with a mask)."""
    from scalesearch_compile.kernels.attention import PRECISE_BLOCK_M, PRECISE_WARPS

    signature = {f"{name}_ptr": "*fp32" for name in ("q_hp", "k_hp", "v_hp", "mask", "max", "sum", "out")}
    signature.update({f"mask_stride_{name}": "i32" for name in "bhmn"}, sm_scale="fp32")
    signature.update({name: "i32" for name in ("num_heads", "group", *LENGTHS)})
    constexprs = dict(
        HEAD_DIM=head_dim, V_DIM=head_dim, BLOCK_M=PRECISE_BLOCK_M, BLOCK_N=TILE, IS_CAUSAL=True, HAS_MASK=True
    )
    options = {"num_warps": PRECISE_WARPS, "enable_fp_fusion": False}
    return ("scalesearch_compile.kernels.attention", "_precise_kernel", signature, constexprs, capability, options)


def test_compiles_for_hopper_and_blackwell():
    """The GPU builds (no GPU needed; the interpreter accepts code a compiler rejects): Hopper's NVFP4 tiles run
    on wgmma, Blackwell's dot_scaled lowers to the block-scaled NVFP4 MMA, and the only FMAs are those of the two
    float32 high-precision dots (BLOCK_M x TILE x D multiply-adds each over the threads), all in their own
    kernel: none in the NVFP4 kernel, so none in the P search."""
    from scalesearch_compile.kernels._nvfp4 import compile_for_gpu, contracted_fmas, int32_pointer_offsets
    from scalesearch_compile.kernels.attention import PRECISE_BLOCK_M, PRECISE_WARPS

    jobs = [compile_job(90), compile_job(100, block_m=128, dot_scaled=True), precise_job(90), precise_job(100)]
    code = compile_for_gpu(jobs)
    # 64-bit element offsets: 8 x 32 x 8192 x 128 elements pass 2**31
    assert all(int32_pointer_offsets(c["ttir"]) == [] for c in code)
    hopper, blackwell, *precise = (c["ptx"] for c in code)
    assert "wgmma" in hopper and ".local" not in hopper
    assert not contracted_fmas(hopper) and not contracted_fmas(blackwell)
    assert "tcgen05.mma.cta_group::1.kind::mxf4nvf4.block_scale.block16" in blackwell
    products = 2 * PRECISE_BLOCK_M * TILE * 64 // (32 * PRECISE_WARPS)  # a thread's share of the two dots
    assert precise[0].count("fma.rn.f32") == products
    assert 0.9 * products < precise[1].count("fma.rn.f32") <= products  # sm_100: a few folded into multiplies


def test_dot_scaled_autotunes_only_tiles_on_the_native_fp4_mma():
    from scalesearch_compile.kernels.attention import GPU_CONFIGS, _attention_kernel, _prune_for_fp4

    assert _attention_kernel.early_config_prune is _prune_for_fp4  # what the autotuner calls
    assert [c.kwargs["BLOCK_M"] for c in _prune_for_fp4(GPU_CONFIGS, {}, DOT_SCALED=True)] == [128]
    assert _prune_for_fp4(GPU_CONFIGS, {"DOT_SCALED": False}) == GPU_CONFIGS
    short = [c for c in GPU_CONFIGS if c.kwargs["BLOCK_M"] < 128]
    assert _prune_for_fp4(short, {"DOT_SCALED": True}) == short  # never empty


def test_autotune_key_holds_every_code_changing_constexpr():
    from scalesearch_compile.kernels._nvfp4 import autotune_key_gaps
    from scalesearch_compile.kernels.attention import _attention_kernel

    assert autotune_key_gaps(_attention_kernel) == set()


def test_sequence_lengths_enter_the_autotune_key_as_powers_of_two(monkeypatch):
    """A new length (every decode step) reuses its bucket's tuned config instead of benchmarking all again."""
    from scalesearch_compile.kernels import attention

    assert not {"q_len", "k_len"} & set(attention._attention_kernel.keys)
    launches = []
    names = attention._attention_kernel.arg_names  # positional arguments first, constexprs by keyword

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(dict(zip(names, args, strict=False)))

    monkeypatch.setattr(attention, "_attention_kernel", Recorder())
    for q_len, k_len in ((77, 200), (100, 256), (1, 129)):
        q, k, v = inputs(seed=5, q_len=q_len, k_len=k_len)
        nvfp4_attention_triton(q, k, v)
    assert [(a["Q_BUCKET"], a["K_BUCKET"]) for a in launches] == [(128, 256), (128, 256), (1, 256)]
