"""Saving and loading quantized models: torch.save/torch.load(weights_only=True) bit for bit, and transformers
save_pretrained/from_pretrained with TorchAoConfig(ScaleSearchConfig(...)) with identical logits."""

import io

import pytest
import torch
from torchao.quantization import quantize_
from transformers import AutoModelForCausalLM, TorchAoConfig

from scalesearch_compile import ScaleSearchConfig, ScaleSearchNVFP4Experts, ScaleSearchNVFP4Tensor
from scalesearch_demo import tiny_model

IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


def _assert_same_bytes(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name, tensor in a.items():
        other = b[name]
        assert type(other) is type(tensor), name
        if isinstance(tensor, ScaleSearchNVFP4Tensor | ScaleSearchNVFP4Experts):
            assert torch.equal(tensor.qdata, other.qdata), name
            assert torch.equal(tensor.scale.view(torch.uint8), other.scale.view(torch.uint8)), name
            assert torch.equal(tensor.per_tensor_scale, other.per_tensor_scale), name
            assert tensor.act_quant_kwargs == other.act_quant_kwargs, name
        else:
            assert torch.equal(tensor, other), name


@pytest.mark.parametrize("activations", [None, "nvfp4"])
@torch.no_grad()
def test_torch_save_and_load_weights_only_bit_for_bit(activations):
    torch.manual_seed(0)
    model = tiny_model("llama")
    quantize_(model, ScaleSearchConfig(activations=activations, progress=False))
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    _assert_same_bytes(model.state_dict(), state)

    fresh = tiny_model("llama")  # float weights, replaced by the loaded NVFP4 ones
    fresh.load_state_dict(state, assign=True)
    assert torch.equal(fresh(IDS).logits, model(IDS).logits)


@pytest.mark.parametrize("activations", [None, "nvfp4"])
@torch.no_grad()
def test_transformers_save_pretrained_round_trip(tmp_path, activations):
    torch.manual_seed(0)
    tiny_model("llama").save_pretrained(tmp_path / "float")
    config = TorchAoConfig(ScaleSearchConfig(activations=activations))
    quantized = AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=config).eval()
    assert isinstance(quantized.model.layers[0].mlp.up_proj.weight, ScaleSearchNVFP4Tensor)
    quantized.save_pretrained(tmp_path / "nvfp4")

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "nvfp4").eval()
    assert loaded.config.quantization_config.quant_type == ScaleSearchConfig(activations=activations)
    _assert_same_bytes(quantized.state_dict(), loaded.state_dict())
    assert torch.equal(loaded(IDS).logits, quantized(IDS).logits)


@torch.no_grad()
def test_quantized_gpt2_conv1d_weights_save_and_load_bit_for_bit():
    """Conv1D weights are stored as the transposed view of an NVFP4 weight: the view survives a round trip."""
    from scalesearch_compile import quantize_model

    model = tiny_model("gpt2")
    quantize_model(model, ScaleSearchConfig(progress=False))
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    _assert_same_bytes(model.state_dict(), state)
    fresh = tiny_model("gpt2")
    fresh.load_state_dict(state, assign=True)
    assert fresh.transformer.h[0].mlp.c_fc.weight.is_transposed
    assert torch.equal(fresh(IDS).logits, model(IDS).logits)


@pytest.mark.parametrize("activations", [None, "nvfp4"])
@torch.no_grad()
def test_moe_round_trip_through_torchao_config(tmp_path, activations):
    """Experts' weights reach transformers' torchao loading through FqnToConfig keyed by their parameter names
    (its default only converts nn.Linear weights), save as ScaleSearchNVFP4Experts and load bit for bit."""
    from torchao.quantization import FqnToConfig

    torch.manual_seed(0)
    tiny_model("qwen2_moe").save_pretrained(tmp_path / "float")
    scheme = ScaleSearchConfig(activations=activations)
    config = TorchAoConfig(FqnToConfig({"re:.*_proj": scheme}))  # q_proj ... down_proj, and experts' gate_up_proj
    quantized = AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=config).eval()
    experts = [p for n, p in quantized.named_parameters() if n.endswith(("gate_up_proj", "down_proj"))]
    assert len(experts) == 4 and all(isinstance(p, ScaleSearchNVFP4Experts) for p in experts)
    assert isinstance(quantized.model.layers[0].mlp.shared_expert.up_proj.weight, ScaleSearchNVFP4Tensor)
    quantized.save_pretrained(tmp_path / "nvfp4")

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "nvfp4").eval()
    _assert_same_bytes(quantized.state_dict(), loaded.state_dict())
    for implementation in ("grouped_mm", "batched_mm"):
        quantized.config._experts_implementation = loaded.config._experts_implementation = implementation
        assert torch.equal(loaded(IDS).logits, quantized(IDS).logits)
