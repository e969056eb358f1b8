"""The attention FX pass: SDPA calls inside the op's contract become NVFP4 attention, the rest are reported."""

import pytest
import torch
import torch.nn.functional as F

from scalesearch_compile.attention import AttentionRecipe
from scalesearch_compile.compile_backend import backend
from scalesearch_compile.ops.attention import nvfp4_attention


class Attend(torch.nn.Module):
    def __init__(self, **sdpa_kwargs):
        super().__init__()
        self.sdpa_kwargs = sdpa_kwargs

    def forward(self, q, k, v, mask=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **self.sdpa_kwargs)


def qkv(heads=2, kv_heads=2, seq=40, head_dim=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, seq, head_dim, generator=g)
    k = torch.randn(2, kv_heads, seq, head_dim, generator=g)
    v = torch.randn(2, kv_heads, seq, head_dim, generator=g)
    return q, k, v


def compile_and_run(module, *inputs, **options):
    b = backend(inductor=False, **options)
    return torch.compile(module, backend=b, fullgraph=True)(*inputs), b


@pytest.mark.parametrize(
    "sdpa_kwargs,heads,use_mask",
    [
        ({"is_causal": True}, 2, False),
        ({"scale": 0.3}, 2, False),
        ({"enable_gqa": True, "is_causal": True}, 4, False),
        ({}, 2, True),
    ],
)
def test_supported_calls_become_nvfp4_attention(sdpa_kwargs, heads, use_mask):
    q, k, v = qkv(heads=heads)
    mask = torch.rand(2, 1, 40, 40, generator=torch.Generator().manual_seed(1)) > 0.3 if use_mask else None
    recipe = AttentionRecipe(method="search", smooth_k=True, hadamard=True, sink_tiles=True)
    out, b = compile_and_run(Attend(**sdpa_kwargs), q, k, v, mask, attention=recipe)
    report = b.reports[0].passes[1]
    assert len(report.rewritten) == 1 and not report.skipped
    expected = nvfp4_attention(q, k, v, mask, recipe=recipe, **sdpa_kwargs)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    exact = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **sdpa_kwargs)
    assert (out - exact).norm() / exact.norm() < 0.2  # it is still attention


def test_backend_method_and_window_reach_the_attention_recipe():
    q, k, v = qkv()
    out, _ = compile_and_run(Attend(), q, k, v, method="amax")
    torch.testing.assert_close(out, nvfp4_attention(q, k, v, recipe=AttentionRecipe(method="amax")), rtol=0, atol=0)


@pytest.mark.parametrize(
    "sdpa_kwargs,head_dim,reason",
    [
        ({"dropout_p": 0.1}, 64, "dropout_p=0.1"),
        ({}, 80, "head_dim 80 is not supported"),
    ],
)
def test_unsupported_calls_stay_sdpa_and_are_reported(sdpa_kwargs, head_dim, reason, caplog):
    q, k, v = qkv(head_dim=head_dim)
    with caplog.at_level("INFO", logger="scalesearch_compile"):
        out, b = compile_and_run(Attend(**sdpa_kwargs), q, k, v)
    report = b.reports[0].passes[1]
    assert not report.rewritten and reason in report.skipped[0][1]
    assert "attention: rewrote 0 of 1" in caplog.text and reason in caplog.text
    if not sdpa_kwargs:
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize("sdpa_kwargs", [{}, {"scale": 0.2, "is_causal": True}])
def test_small_head_dims_are_zero_padded(sdpa_kwargs):
    q, k, v = qkv(head_dim=32)
    recipe = AttentionRecipe(hadamard=False)
    out, b = compile_and_run(Attend(**sdpa_kwargs), q, k, v, attention=recipe)
    assert b.reports[0].passes[1].rewritten == ["test_passes_attention.py:18 (head_dim 32 zero-padded to 64)"]
    assert out.shape == v.shape

    def pad(t):
        return F.pad(t, (0, 32))

    kwargs = {"scale": 32**-0.5, **sdpa_kwargs}
    expected = nvfp4_attention(pad(q), pad(k), pad(v), recipe=recipe, **kwargs)[..., :32]
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    exact = F.scaled_dot_product_attention(q, k, v, **sdpa_kwargs)
    assert (out - exact).norm() / exact.norm() < 0.2


def test_attention_false_leaves_sdpa_alone():
    q, k, v = qkv()
    out, b = compile_and_run(Attend(), q, k, v, attention=False)
    assert [r.kind for r in b.reports[0].passes] == ["linear", "experts"]
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
