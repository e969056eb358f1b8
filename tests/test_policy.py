"""policy: one module-pattern syntax and one decision of which linear layers become NVFP4, for both front ends."""

import logging

import pytest
import torch

from scalesearch_compile import ScaleChoice, ScaleSearchConfig, ScaleSearchNVFP4Tensor, backend, quantize_model
from scalesearch_compile.policy import LinearPolicy, ModulePatterns
from scalesearch_compile.tensor import quantize_weight


@pytest.mark.parametrize(
    "pattern,matches,misses",
    [
        ("lm_head", ["lm_head"], ["model.lm_head", "lm_head_2"]),
        ("*.mlp.*", ["model.layers.0.mlp.up_proj"], ["model.mlp", "mlp.up"]),
        ("model.layers.1?.*", ["model.layers.12.q"], ["model.layers.1.q", "model.layers.123"]),
        ("re:.*\\.(q|k)_proj", ["a.q_proj", "b.c.k_proj"], ["a.v_proj", "q_proj"]),
        ("re:lm_head", ["lm_head"], ["lm_head.x", "a.lm_head"]),  # a regular expression matches the whole path
    ],
)
def test_pattern_syntax(pattern, matches, misses):
    patterns = ModulePatterns([pattern])
    assert all(patterns.match(path) == pattern for path in matches)
    assert all(patterns.match(path) is None for path in misses)


@pytest.mark.parametrize(
    "value,message",
    [
        ("lm_head", "must be a list of strings"),
        (["ok", 3], "a module pattern must be a string"),
        (["re:("], "module pattern 're:\\(' is not a regular expression"),
        ({"lm_head"}, "must be a list of strings"),
    ],
)
def test_bad_patterns(value, message):
    with pytest.raises(ValueError, match=message):
        ModulePatterns(value)
    assert ModulePatterns(None).patterns == ()


def test_policy_reasons():
    policy = LinearPolicy(ScaleChoice("amax"), exclude=ModulePatterns(["skip.*"]), skip_shapes=frozenset({(8, 32)}))
    w = torch.randn(16, 32)
    assert isinstance(policy.quantize(w, "a"), ScaleSearchNVFP4Tensor)
    assert policy.quantize(w, "skip.me") == "excluded by 'skip.*'"
    assert policy.quantize(quantize_weight(w), "a") == "weight already quantized (ScaleSearchNVFP4Tensor)"
    assert policy.quantize(torch.randn(16, 24), "a") == "in_features 24 not a multiple of 16"
    assert policy.quantize(torch.randn(8, 32), "a") == "shape (8, 32) is in skip_shapes"
    assert policy.quantize(w.double(), "a") == "weight dtype torch.float64"
    assert policy.quantize(torch.randn(2, 16, 32), "a") == "the weight is not a 2-D tensor"
    assert policy.quantize(torch.empty(16, 32, device="meta"), "a").startswith("the weight is on the meta device")
    bad = w.clone()
    bad[3, 4] = float("inf")
    assert policy.quantize(bad, "a") == "NaN or Inf in the weight"
    grad = torch.nn.Parameter(w.clone())  # a weight that requires grad quantizes like any other
    assert torch.equal(policy.quantize(grad, "a").qdata, policy.quantize(w, "a").qdata)


class _Mixed(torch.nn.Module):
    """Linear layers each front end must treat alike: quantized, excluded (glob and regex), unquantizable."""

    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(64, 32)
        self.down = torch.nn.Linear(32, 32)
        self.ragged = torch.nn.Linear(32, 24)
        self.tail = torch.nn.Linear(24, 32)  # in_features 24
        self.head = torch.nn.Linear(32, 16)
        self.gating = torch.nn.Linear(32, 32)
        with torch.no_grad():
            self.gating.weight[0, 0] = float("nan")

    def forward(self, x):
        x = self.down(self.up(x))
        return self.head(self.tail(self.ragged(x))) + self.gating(x).sum()


def test_quantize_model_and_the_backend_leave_the_same_layers_for_the_same_reasons(caplog):
    exclude = ["hea*", "re:do.n"]
    reference = _Mixed()
    model = _Mixed()
    model.load_state_dict(reference.state_dict())
    summary = quantize_model(model, ScaleSearchConfig(exclude=exclude, progress=False))

    compiled_backend = backend(skip_modules=exclude, inductor=False, attention=False)
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="scalesearch_compile"):
        torch.compile(reference, backend=compiled_backend, fullgraph=True)(torch.randn(2, 64))
    report, experts = compiled_backend.reports[0].passes
    assert experts.kind == "experts" and not experts.rewritten and not experts.skipped
    by_reason = {}
    for name, reason in report.skipped:
        by_reason.setdefault(reason, []).append(name.removesuffix(".weight"))
    assert by_reason == summary.skipped
    assert [name.removesuffix(".weight") for name in report.rewritten] == summary.quantized == ["up", "ragged"]


def test_torchao_quantize_with_the_linear_layer_filter_quantizes_conv1d():
    from torchao.quantization import quantize_

    from scalesearch_compile.policy import is_linear_layer
    from scalesearch_demo import tiny_model

    model = tiny_model("gpt2")
    quantize_(model, ScaleSearchConfig(activations=None), filter_fn=is_linear_layer)
    conv1d = [m for m in model.modules() if type(m).__name__ == "Conv1D"]
    assert len(conv1d) == 8 and all(isinstance(m.weight, ScaleSearchNVFP4Tensor) for m in conv1d)
    assert isinstance(model.lm_head.weight, ScaleSearchNVFP4Tensor)


def test_weights_are_quantized_by_the_kernel_impl_picks_with_the_references_bits(monkeypatch):
    """On a CPU "auto" quantizes a linear weight and experts' weights with the C++ kernel, "reference" with the
    PyTorch reference: the same codes, scales and global scales; an unknown impl is refused."""
    from scalesearch_compile.kernels import nvfp4_cpu

    calls = []
    kernel = nvfp4_cpu.quantize_nvfp4_cpu
    monkeypatch.setattr(nvfp4_cpu, "quantize_nvfp4_cpu", lambda request: calls.append(request) or kernel(request))
    from scalesearch_compile.ops import dispatch

    dispatch._load.cache_clear()
    weight = torch.randn(48, 64, generator=torch.Generator().manual_seed(0)) * torch.logspace(-2, 2, 64)
    importance = torch.rand(64, generator=torch.Generator().manual_seed(1))
    got = LinearPolicy(ScaleChoice("search")).quantize(weight, "q_proj", importance)
    ref = LinearPolicy(ScaleChoice("search"), impl="reference").quantize(weight, "q_proj", importance)
    experts = torch.stack([weight, weight.flip(0), 2 * weight])
    got_experts = LinearPolicy(ScaleChoice("search")).quantize_experts(experts, "experts")
    ref_experts = LinearPolicy(ScaleChoice("search"), impl="reference").quantize_experts(experts, "experts")
    dispatch._load.cache_clear()
    assert len(calls) == 1 + 3 and calls[0].importance is not None
    for kernel_made, reference_made in ((got, ref), (got_experts, ref_experts)):
        fields = (kernel_made.nvfp4_weight().__dict__.values(), reference_made.nvfp4_weight().__dict__.values())
        assert all(torch.equal(a, b) for a, b in zip(*fields, strict=True))
    with pytest.raises(ValueError, match="unknown impl 'fast'"):
        LinearPolicy(impl="fast")
