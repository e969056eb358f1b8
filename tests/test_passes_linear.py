"""The linear FX pass: which products it rewrites, what it leaves and why, and the numbers it computes."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torchao.prototype.mx_formats.inference_workflow import NVFP4WeightOnlyConfig
from torchao.quantization import quantize_

from scalesearch_compile import ScaleSearchConfig
from scalesearch_compile.compile_backend import backend
from scalesearch_compile.search import quantize_blocks
from scalesearch_demo import tiny_model


def run(model, *inputs, **options):
    """Compile with the rewrite only (no Inductor), run once; return (output, backend)."""
    b = backend(inductor=False, attention=False, **options)
    with torch.no_grad():
        out = torch.compile(model, backend=b, fullgraph=True)(*inputs)
    return out, b


def dequantized(w: torch.Tensor, method: str = "search") -> torch.Tensor:
    return quantize_blocks(w, method).dequantize()


def nvfp4_activations(x: torch.Tensor, method: str = "search") -> torch.Tensor:
    return quantize_blocks(x.reshape(-1, x.shape[-1]), method).dequantize().view(x.shape)


class Products(torch.nn.Module):
    """Every spelling of a linear product the pass knows, plus ones it must leave."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(32, 64, generator=g))  # (N, K)
        self.p = torch.nn.Parameter(torch.randn(64, 48, generator=g))  # (K, N)
        self.b = torch.nn.Parameter(torch.randn(32, generator=g))
        self.odd = torch.nn.Linear(20, 16)  # in_features not a multiple of 16

    def forward(self, x):
        outs = [
            F.linear(x, self.w, self.b),
            x @ self.w.T,
            x @ self.w.t(),
            torch.matmul(x, self.w.t()),
            x @ self.p,
            x @ (2 * self.w).t(),  # a product of activations, not a linear layer: not matched
            F.linear(x, 2 * self.w),  # a linear whose weight is computed in the graph: left and reported
            self.odd(x[..., :20]),
        ]
        return outs


def test_rewrites_every_spelling_and_reports_the_rest(caplog):
    model = Products()
    x = torch.randn(3, 5, 64)
    with caplog.at_level("INFO", logger="scalesearch_compile"):
        outs, b = run(model, x, activations=None, method="search")
    (report,) = b.reports[0].passes[:1]
    assert report.rewritten == ["w", "w", "w", "w", "p"]
    reasons = dict(report.skipped)
    assert len(reasons) == 2 and "multiple of 16" in reasons.pop("odd.weight")
    assert "computed in the graph" in reasons.popitem()[1]
    assert "linear: rewrote 5 of 7" in caplog.text
    assert "in_features 20 not a multiple of 16" in caplog.text

    w_hat, p_hat = dequantized(model.w.detach()), dequantized(model.p.detach().t().contiguous())
    expected = [x @ w_hat.T + model.b, x @ w_hat.T, x @ w_hat.T, x @ w_hat.T, x @ p_hat.T]
    for got, want in zip(outs[:5], expected, strict=True):
        torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        eager = model(x)
    for got, want in zip(outs[5:], eager[5:], strict=True):  # left as they were: unchanged numbers
        torch.testing.assert_close(got, want)


def test_w4a4_quantizes_activations_with_the_same_method():
    model = Products()
    x = torch.randn(4, 64)
    (out, *_), _ = run(model, x, activations="nvfp4", method="four_over_six")
    expected = nvfp4_activations(x, "four_over_six") @ dequantized(model.w.detach(), "four_over_six").T + model.b
    torch.testing.assert_close(out, expected.detach(), rtol=1e-5, atol=1e-5)


def test_skip_modules_and_shapes():
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1, 8))
    _, b = run(model, ids, skip_modules=["lm_head", "re:.*\\.mlp\\..*"], skip_shapes=[(128, 128)])
    report = b.reports[0].passes[0]
    skipped = dict(report.skipped)
    assert skipped["lm_head.weight"] == "excluded by 'lm_head'"
    assert skipped["model.layers.0.mlp.up_proj.weight"] == "excluded by 're:.*\\\\.mlp\\\\..*'"
    assert "skip_shapes" in skipped["model.layers.1.self_attn.q_proj.weight"]
    assert report.rewritten == [f"model.layers.{i}.self_attn.{p}_proj.weight" for i in (0, 1) for p in "kv"]


def test_nan_weight_is_left_and_named():
    model = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.Linear(16, 16))
    with torch.no_grad():
        model[1].weight[3, 4] = float("nan")
    _, b = run(model, torch.randn(2, 32))
    assert b.reports[0].passes[0].rewritten == ["0.weight"]
    assert "NaN or Inf" in dict(b.reports[0].passes[0].skipped)["1.weight"]


@pytest.mark.parametrize("activations", [None, "nvfp4"])
def test_quantized_model_keeps_its_bytes_and_matches_eager(activations):
    model = copy.deepcopy(tiny_model("qwen2"))  # biases on q, k, v
    quantize_(model, ScaleSearchConfig(method="amax", activations=activations, progress=False))
    ids = torch.randint(0, 256, (2, 8))
    out, b = run(model, ids, method="search", activations="nvfp4")  # the weights' own settings win
    assert len(b.reports[0].passes[0].rewritten) == 15  # 7 linears in each of 2 layers, and lm_head
    with torch.no_grad():
        eager = model(ids).logits
    torch.testing.assert_close(out.logits, eager, rtol=0, atol=0)


def test_torchao_nvfp4_weights_are_rewritten_weight_only():
    model = tiny_model("llama")
    quantize_(model, NVFP4WeightOnlyConfig())  # torchao's own NVFP4Tensor, swizzled scales
    ids = torch.randint(0, 256, (2, 16))
    out, b = run(model, ids, method="search", activations="nvfp4")  # the weights' own (weight-only) mode wins
    assert len(b.reports[0].passes[0].rewritten) == 15
    with torch.no_grad():
        eager = model(ids).logits
    # torchao multiplies by the global scale before the matmul, the op after it: equal up to rounding.
    assert (out.logits - eager).norm() / eager.norm() < 1e-5
