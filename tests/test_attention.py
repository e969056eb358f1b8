"""Tests of the NVFP4 attention reference (scalesearch_compile.attention) and its custom op."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from scalesearch_compile.attention import (
    ABLATION_LADDER,
    NAIVE_RECIPE,
    AttentionRecipe,
    hadamard_matrix,
    nvfp4_attention_reference,
    prepare,
    quantized_keys,
)
from scalesearch_compile.ops.attention import nvfp4_attention, nvfp4_attention_op, recipe_args

# Relative L2 error against float64 SDPA on attention_inputs(seed=0), measured (0.319, 0.297, 0.206, 0.175,
# 0.160) plus about 10%; seeds 1 and 2 measure 0.26-0.31 naive and 0.14-0.15 with every technique.
ERROR_FLOORS = {
    "naive amax NVFP4": 0.35,
    "+ search": 0.33,
    "+ K smoothing": 0.23,
    "+ Hadamard": 0.195,
    "+ sink precision (default)": 0.18,
}


def attention_inputs(seed, batch=1, heads=4, kv_heads=4, q_len=256, k_len=256, head_dim=64):
    """Gaussian Q, K, V with what the techniques target: a per-channel key bias (K smoothing) and two outlier
    channels in Q and K (Hadamard)."""
    g = torch.Generator().manual_seed(seed)
    q = 1.5 * torch.randn(batch, heads, q_len, head_dim, generator=g)
    k = torch.randn(batch, kv_heads, k_len, head_dim, generator=g)
    v = torch.randn(batch, kv_heads, k_len, head_dim, generator=g)
    k = k + 2 * torch.randn(1, kv_heads, 1, head_dim, generator=g)
    outliers = torch.randperm(head_dim, generator=g)[:2]
    q[..., outliers] *= 6
    k[..., outliers] *= 6
    return q, k, v


def sdpa64(q, k, v, attn_mask=None, **kwargs):
    """float64 SDPA (a float mask is cast too: SDPA does not promote it)."""
    if attn_mask is not None and attn_mask.is_floating_point():
        attn_mask = attn_mask.double()
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=attn_mask, **kwargs)


def rel_error(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("k_len", [12, 64, 100, 130, 192])
@pytest.mark.parametrize("sink_tiles", [True, False])
def test_the_reference_quantizes_the_keys_of_its_quantized_tiles_as_the_whole_tensor(k_len, sink_tiles):
    """prepare(keys=quantized_keys(...)) gives the blocks of those keys bit for bit as quantizing every key does
    (one global scale per tensor); with sink tiles, no quantized tile means nothing quantized."""
    recipe = AttentionRecipe(sink_tiles=sink_tiles)
    q, k, v = attention_inputs(seed=7, heads=2, kv_heads=2, q_len=20, k_len=k_len)
    keys = quantized_keys(k_len, recipe)
    tiles = -(-k_len // 64)
    expected = (64, (k_len // 64) * 64) if sink_tiles else (0, tiles * 64)
    assert (keys.start, keys.stop) == expected or (not keys and expected[0] >= expected[1])
    full, some = prepare(q, k, v, recipe), prepare(q, k, v, recipe, keys=keys)
    if not keys:
        assert some.q is None and some.k is None and some.v is None
        return
    assert torch.equal(some.q.qdata, full.q.qdata) and torch.equal(some.q.scale_codes, full.q.scale_codes)
    k_full, v_full = full.k.dequantize(), full.v.dequantize()
    assert torch.equal(some.k.dequantize(), k_full[..., keys.start : keys.stop, :])
    assert torch.equal(some.v.dequantize(), v_full[..., keys.start : keys.stop])


def test_error_floor_per_technique():
    q, k, v = attention_inputs(seed=0)
    ref = sdpa64(q, k, v)
    errors = {name: rel_error(nvfp4_attention_reference(q, k, v, recipe=r), ref) for name, r in ABLATION_LADDER.items()}
    for name, error in errors.items():
        assert error <= ERROR_FLOORS[name], (name, errors)


@pytest.mark.parametrize("seed", [0, 1])
def test_each_technique_lowers_the_error(seed):
    q, k, v = attention_inputs(seed)
    ref = sdpa64(q, k, v)
    errors = [rel_error(nvfp4_attention_reference(q, k, v, recipe=r), ref) for r in ABLATION_LADDER.values()]
    # smooth_k, hadamard and sink tiles each help on these inputs (search alone can lose without smoothing:
    # seed 2 measures 0.267 searched vs 0.264 amax; see test_search_beats_amax for where it wins).
    assert errors[2] < errors[1] and errors[3] < errors[2] and errors[4] < errors[3], errors
    assert errors[4] < 0.6 * errors[0], errors


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("step", ["+ K smoothing", "+ Hadamard", "+ sink precision (default)"])
def test_search_beats_amax(seed, step):
    q, k, v = attention_inputs(seed)
    ref = sdpa64(q, k, v)
    searched = ABLATION_LADDER[step]
    amax = dataclasses.replace(searched, method="amax")
    searched_error = rel_error(nvfp4_attention_reference(q, k, v, recipe=searched), ref)
    amax_error = rel_error(nvfp4_attention_reference(q, k, v, recipe=amax), ref)
    # Measured ratios 0.73-0.93 over these 9 cases.
    assert searched_error < 0.95 * amax_error, (searched_error, amax_error)


def test_hadamard_is_orthonormal():
    for n in (16, 64, 128):
        h = hadamard_matrix(n)
        torch.testing.assert_close(h @ h.T, torch.eye(n), atol=1e-6, rtol=0)
        torch.testing.assert_close(h.abs(), torch.full((n, n), 1 / math.sqrt(n)))
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard_matrix(80)


# With sink tiles and fewer than 2 * TILE keys, not a multiple of TILE, every KV tile is a high-precision one:
# the result must then be exact attention, whatever the smoothing and rotation (they leave softmax unchanged).
EXACT_CASES = [
    dict(q_len=37, k_len=100),
    dict(q_len=100, k_len=100, is_causal=True),
    dict(q_len=20, k_len=90, heads=4, kv_heads=2, enable_gqa=True),
    dict(q_len=64, k_len=70, head_dim=128, scale=0.3),
    dict(q_len=33, k_len=33, mask="bool"),
    dict(q_len=33, k_len=33, mask="float"),
]


@pytest.mark.parametrize("case", EXACT_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("recipe", [AttentionRecipe(), AttentionRecipe(smooth_q=True, hadamard=False)])
def test_high_precision_tiles_are_exact_attention(case, recipe):
    case = dict(case)
    mask_kind = case.pop("mask", None)
    call = {key: case.pop(key) for key in ("is_causal", "enable_gqa", "scale") if key in case}
    q, k, v = attention_inputs(seed=3, **case)
    if mask_kind == "bool":
        call["attn_mask"] = (
            torch.rand(q.shape[0], 1, q.shape[2], k.shape[2], generator=torch.Generator().manual_seed(1)) > 0.4
        )
    elif mask_kind == "float":
        call["attn_mask"] = torch.randn(q.shape[2], k.shape[2], generator=torch.Generator().manual_seed(1))
    out = nvfp4_attention_reference(q, k, v, recipe=recipe, **call)
    # float32 arithmetic on scores up to about 100 (the outlier channels): 1e-4 absolute.
    torch.testing.assert_close(out.double(), sdpa64(q, k, v, **call), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("q_len,k_len", [(1, 1), (17, 300), (200, 129), (130, 64)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_ragged_lengths_stay_accurate(q_len, k_len, is_causal):
    q, k, v = attention_inputs(seed=4, heads=2, kv_heads=2, q_len=q_len, k_len=k_len)
    out = nvfp4_attention_reference(q, k, v, is_causal=is_causal)
    assert out.shape == (1, 2, q_len, 64) and torch.isfinite(out).all()
    assert rel_error(out, sdpa64(q, k, v, is_causal=is_causal)) < 0.2


def test_gqa_equals_repeated_kv_heads():
    q, k, v = attention_inputs(seed=5, heads=6, kv_heads=2, k_len=150, q_len=80)
    out = nvfp4_attention_reference(q, k, v, enable_gqa=True)
    repeated = nvfp4_attention_reference(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1))
    torch.testing.assert_close(out, repeated, atol=0, rtol=0)


def test_causal_equals_lower_triangular_mask():
    q, k, v = attention_inputs(seed=6, heads=2, kv_heads=2, q_len=150, k_len=200)
    tril = torch.ones(150, 200, dtype=torch.bool).tril()
    torch.testing.assert_close(
        nvfp4_attention_reference(q, k, v, is_causal=True), nvfp4_attention_reference(q, k, v, attn_mask=tril)
    )


def test_bool_and_additive_masks_agree_and_empty_rows_give_zero():
    q, k, v = attention_inputs(seed=7, heads=2, kv_heads=2, q_len=40, k_len=200)
    mask = torch.rand(1, 2, 40, 200, generator=torch.Generator().manual_seed(0)) > 0.5
    mask[..., 3, :] = False
    additive = torch.zeros(mask.shape).masked_fill(~mask, -math.inf)
    out = nvfp4_attention_reference(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, nvfp4_attention_reference(q, k, v, attn_mask=additive), atol=0, rtol=0)
    assert (out[..., 3, :] == 0).all()
    ref = sdpa64(q, k, v, attn_mask=mask)
    assert (ref[..., 3, :] == 0).all()
    assert rel_error(out, ref) < 0.2


def test_low_precision_input_dtypes():
    q, k, v = attention_inputs(seed=8, heads=2, kv_heads=2, q_len=70, k_len=150)
    for dtype in (torch.bfloat16, torch.float16):
        out = nvfp4_attention_reference(q.to(dtype), k.to(dtype), v.to(dtype))
        assert out.dtype == dtype
        assert rel_error(out, sdpa64(q, k, v)) < 0.2


def test_no_nan_for_huge_or_tiny_scores():
    q, k, v = attention_inputs(seed=9, heads=1, kv_heads=1, q_len=64, k_len=256)
    for factor in (1e-30, 1e3):
        out = nvfp4_attention_reference(q * factor, k, v)
        assert torch.isfinite(out).all(), factor


def good_inputs():
    return torch.randn(1, 2, 8, 64), torch.randn(1, 2, 8, 64), torch.randn(1, 2, 8, 64)


BAD_INPUTS = [
    (lambda q, k, v: (q[..., :48], k[..., :48], v[..., :48]), {}, "head_dim 48 is not supported"),
    (lambda q, k, v: (q[0], k[0], v[0]), {}, "4-D"),
    (lambda q, k, v: (q, k[:, :1], v[:, :1]), {}, "enable_gqa"),
    (lambda q, k, v: (q, k[:, :1], v), {}, "shapes do not match"),
    (lambda q, k, v: (q.to(torch.int32), k, v), {}, "dtype"),
    (lambda q, k, v: (q, k, v), {"attn_mask": torch.ones(8, 8, dtype=torch.bool), "is_causal": True}, "not both"),
    (lambda q, k, v: (q, k, v), {"attn_mask": torch.ones(3, 8, dtype=torch.bool)}, "does not broadcast"),
    (lambda q, k, v: (q, k, v), {"attn_mask": torch.ones(8, 8, dtype=torch.int64)}, "bool or floating-point tensor"),
    (lambda q, k, v: (q[:, :, :0], k, v), {}, "empty"),
]


@pytest.mark.parametrize("make,kwargs,message", BAD_INPUTS)
def test_bad_inputs_raise_clear_errors(make, kwargs, message):
    with pytest.raises(ValueError, match=message):
        nvfp4_attention(*make(*good_inputs()), **kwargs)


def test_bad_options_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown method"):
        AttentionRecipe(method="best")
    with pytest.raises(ValueError, match="window"):
        AttentionRecipe(window=(3, 1))
    with pytest.raises(ValueError, match="unknown impl"):
        nvfp4_attention(*good_inputs(), impl="cuda")
    with pytest.raises(ValueError, match="AttentionRecipe"):
        nvfp4_attention(*good_inputs(), recipe="search")


def test_op_runs_the_reference_on_cpu():
    q, k, v = attention_inputs(seed=10, heads=4, kv_heads=2, q_len=50, k_len=130)
    recipe = AttentionRecipe(method="four_over_six", smooth_q=True, window=(-1, 3))
    expected = nvfp4_attention_reference(q, k, v, is_causal=True, enable_gqa=True, recipe=recipe)
    out = nvfp4_attention(q, k, v, is_causal=True, enable_gqa=True, recipe=recipe, impl="reference")
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    torch.testing.assert_close(nvfp4_attention(q, k, v, is_causal=True, enable_gqa=True, recipe=recipe), expected)


OPCHECK_CASES = [
    dict(attn_mask=None, is_causal=True, scale=None, enable_gqa=True, recipe=AttentionRecipe()),
    dict(attn_mask="bool", is_causal=False, scale=0.2, enable_gqa=True, recipe=NAIVE_RECIPE),
    dict(attn_mask="float", is_causal=False, scale=None, enable_gqa=True, recipe=AttentionRecipe(smooth_q=True)),
]


@pytest.mark.parametrize("case", OPCHECK_CASES)
def test_opcheck(case):
    q, k, v = attention_inputs(seed=11, heads=2, kv_heads=1, q_len=70, k_len=70)
    mask = {"bool": torch.rand(70, 70) > 0.3, "float": torch.randn(1, 1, 70, 70), None: None}[case["attn_mask"]]
    r = case["recipe"]
    args = (q, k, v, mask, case["is_causal"], case["scale"], case["enable_gqa"], *recipe_args(r), "reference")
    torch.library.opcheck(nvfp4_attention_op, args)


def test_compiles_fullgraph_and_matches_eager():
    q, k, v = attention_inputs(seed=12, heads=2, kv_heads=2, q_len=40, k_len=80)

    def attend(q, k, v):
        return nvfp4_attention(q, k, v, is_causal=True) * 2

    compiled = torch.compile(attend, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), attend(q, k, v), atol=0, rtol=0)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(
    q_len=st.integers(1, 150),
    k_len=st.integers(1, 200),
    group=st.sampled_from([1, 2]),
    is_causal=st.booleans(),
    log_magnitude=st.integers(-20, 3),
    recipe=st.sampled_from([NAIVE_RECIPE, AttentionRecipe(), AttentionRecipe(smooth_q=True, sink_tiles=False)]),
    seed=st.integers(0, 2**16),
)
def test_finite_inputs_give_finite_close_outputs(q_len, k_len, group, is_causal, log_magnitude, recipe, seed):
    """No NaN or Inf from finite inputs at any magnitude of Q (scores from ~1e-20 to ~1e4). The error is bounded
    only for scores up to ~10 and with K smoothing: beyond, a few percent of NVFP4 error on scores of 1e3 moves
    the argmax (measured up to 0.5 with every technique, 0.64 naive), and naive NVFP4 reaches 0.41 on these
    outlier-channel inputs even at magnitude 1 (the smoothed recipes measured at most 0.11 over 150 draws)."""
    q, k, v = attention_inputs(seed, heads=2 * group, kv_heads=2, q_len=q_len, k_len=k_len)
    q = q * 10.0**log_magnitude
    out = nvfp4_attention_reference(q, k, v, is_causal=is_causal, enable_gqa=True, recipe=recipe)
    assert torch.isfinite(out).all()
    if log_magnitude <= 0 and recipe.smooth_k:
        assert rel_error(out, sdpa64(q, k, v, is_causal=is_causal, enable_gqa=True)) < 0.25


def test_backward_is_the_straight_through_sdpa_gradient():
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 4, 40, 64, generator=g).requires_grad_() for _ in range(3))
    upstream = torch.randn(1, 4, 40, 64, generator=g)
    grads = torch.autograd.grad(nvfp4_attention(q, k, v, is_causal=True, enable_gqa=True), (q, k, v), upstream)
    reference = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v), upstream)
    for got, want in zip(grads, reference, strict=True):
        torch.testing.assert_close(got, want)


def test_attention_reads_nothing_on_the_host(host_reads):
    q, k, v = attention_inputs(seed=3, q_len=80, k_len=150)
    for recipe in (AttentionRecipe(), NAIVE_RECIPE, AttentionRecipe(smooth_q=True)):
        assert host_reads(lambda r=recipe: nvfp4_attention(q, k, v, is_causal=True, recipe=r, impl="reference")) == []


def test_a_nan_query_reaches_only_its_own_output_row():
    q, k, v = attention_inputs(seed=4, q_len=70, k_len=140)
    bad = q.clone()
    bad[0, 1, 5, 3] = float("nan")
    clean, out = nvfp4_attention_reference(q, k, v), nvfp4_attention_reference(bad, k, v)
    assert torch.isnan(out[0, 1, 5]).all()
    rows = torch.ones(70, dtype=torch.bool)
    rows[5] = False
    assert torch.equal(out[0, 1, rows], clean[0, 1, rows]) and torch.equal(out[:, [0, 2, 3]], clean[:, [0, 2, 3]])


def test_p_method_defaults_to_four_over_six_for_search_and_is_validated():
    assert AttentionRecipe().p_method == "four_over_six" and AttentionRecipe(p_method="search").p_method == "search"
    assert AttentionRecipe(method="four_over_six").p_method == "four_over_six"
    assert AttentionRecipe(method="amax", p_method="exhaustive").p_method == "exhaustive"
    with pytest.raises(ValueError, match="AttentionRecipe.p_method: unknown method 'best'"):
        AttentionRecipe(p_method="best")


@pytest.mark.parametrize("field", ["smooth_k", "smooth_q", "hadamard", "sink_tiles"])
def test_recipe_switches_must_be_booleans(field):
    with pytest.raises(ValueError, match=f"AttentionRecipe.{field} must be True or False"):
        AttentionRecipe(**{field: "no"})
