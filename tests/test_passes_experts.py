"""The experts FX pass on tiny mixture-of-experts models: the grouped_mm and batched_mm products compile with
fullgraph=True and are rewritten, the numbers equal quantize_'s, and everything left in float is reported."""

import pytest
import torch
import torch.nn.functional as F

from scalesearch_compile import ScaleSearchConfig, quantize_model
from scalesearch_compile.compile_backend import backend
from scalesearch_compile.passes.experts import OUTSIDE
from scalesearch_demo import tiny_model

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
IMPLEMENTATIONS = ["grouped_mm", "batched_mm"]


def moe(name, implementation):
    model = tiny_model(name)
    model.config._experts_implementation = implementation
    return model


def compiled_logits(model, fullgraph=True, **options):
    b = backend(inductor=False, attention=False, **options)
    with torch.no_grad():
        logits = torch.compile(model, backend=b, fullgraph=fullgraph)(IDS).logits
    return logits, b


def experts_report(b):
    return [r for graph in b.reports for r in graph.passes if r.kind == "experts"]


@pytest.mark.parametrize(
    ("name", "implementation", "activations"),
    [
        ("mixtral", "grouped_mm", None),
        ("mixtral", "batched_mm", "nvfp4"),
        ("qwen2_moe", "batched_mm", None),
        ("qwen2_moe", "grouped_mm", "nvfp4"),
    ],
)
def test_experts_products_are_rewritten_and_equal_quantize(name, implementation, activations):
    """Compiling the float model computes what quantize_model's weights compute in eager mode."""
    logits, b = compiled_logits(moe(name, implementation), activations=activations)
    (report,) = experts_report(b)
    expected = [
        f"model.layers.{i}.mlp.experts.{p} ({implementation})" for i in (0, 1) for p in ("gate_up_proj", "down_proj")
    ]
    assert report.rewritten == expected and report.skipped == []
    quantized = moe(name, implementation)
    quantize_model(quantized, ScaleSearchConfig(activations=activations, progress=False))
    with torch.no_grad():
        eager = quantized(IDS).logits
    assert torch.allclose(logits, eager, rtol=0, atol=1e-5)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_quantized_experts_compile_with_fullgraph_and_keep_their_bytes(implementation):
    model = moe("qwen3_moe", implementation)
    quantize_model(model, ScaleSearchConfig(progress=False))
    with torch.no_grad():
        eager = model(IDS).logits
    logits, b = compiled_logits(model)
    assert len(experts_report(b)[0].rewritten) == 4
    assert torch.allclose(logits, eager, rtol=0, atol=1e-5)


def test_routers_stay_float_and_are_reported():
    _, b = compiled_logits(moe("qwen2_moe", "grouped_mm"))
    linear = b.reports[0].passes[0]
    left = {name for name, reason in linear.skipped if "router or gate" in reason}
    assert left == {f"model.layers.{i}.mlp.{g}.weight" for i in (0, 1) for g in ("gate", "shared_expert_gate")}


def test_eager_experts_loop_is_reported_as_left_in_float():
    """The eager loop breaks the graph: its experts never reach the backend, which says so."""
    _, b = compiled_logits(moe("mixtral", "eager"), fullgraph=False)
    reasons = [reason for report in experts_report(b) for _, reason in report.skipped]
    assert OUTSIDE in reasons


def test_a_layer_named_gate_outside_a_mixture_of_experts_reports_no_missing_experts():
    model = torch.nn.Sequential()
    model.add_module("gate", torch.nn.Linear(64, 32))
    b = backend(inductor=False, attention=False)
    torch.compile(model, backend=b, fullgraph=True)(torch.randn(2, 64))
    assert experts_report(b)[0].skipped == []


def test_skip_modules_and_training_weights_are_left_and_named():
    _, b = compiled_logits(moe("mixtral", "batched_mm"), skip_modules=["*.layers.0.*"])
    (report,) = experts_report(b)
    assert len(report.rewritten) == 2
    assert {reason for _, reason in report.skipped} == {"excluded by '*.layers.0.*'"}

    model = moe("mixtral", "grouped_mm").train()
    b = backend(inductor=False, attention=False)
    torch.compile(model, backend=b, fullgraph=True)(IDS).logits.sum().backward()
    (report,) = experts_report(b)
    assert report.rewritten == [] and all("train" in reason for _, reason in report.skipped)


class _FloatProducts(torch.nn.Module):
    """Products with a parameter operand the backend does not rewrite."""

    def __init__(self):
        super().__init__()
        self.experts = torch.nn.Parameter(torch.randn(4, 32, 64))
        self.table = torch.nn.Parameter(torch.randn(64, 64))

    def forward(self, x):
        batched = torch.einsum("ek,enk->en", x[:4], self.experts)
        return batched, torch.bmm(self.experts, x[:4, :, None]), x @ self.table.exp()


def test_every_float_product_with_a_parameter_is_reported():
    b = backend(inductor=False, attention=False)
    torch.compile(_FloatProducts(), backend=b, fullgraph=True)(torch.randn(8, 64))
    (report,) = experts_report(b)
    assert report.rewritten == []
    assert [name for name, _ in report.skipped] == ["experts", "experts"]
    assert "einsum" in report.skipped[0][1]


def test_float_reference_is_close():
    """Sanity bound: the NVFP4 model stays near the float one (NVFP4 on random weights: a loose floor)."""
    model = moe("mixtral", "grouped_mm")
    with torch.no_grad():
        ref = model(IDS).logits
    logits, _ = compiled_logits(model, activations=None)
    assert F.cosine_similarity(logits.flatten(), ref.flatten(), dim=0) > 0.95
