"""GPTQ with searched block scales: the weight algorithm against its special cases and its objective, and
gptq_quantize_ on whole models (sequential block order, shared Hessians, padding, W4A16/W4A4, bad input)."""

import copy

import pytest
import torch

import scalesearch_compile.gptq as gptq
from scalesearch_compile import ScaleChoice, ScaleSearchConfig, ScaleSearchNVFP4Tensor, quantize_blocks, quantize_model
from scalesearch_compile.gptq import gptq_quantize_, gptq_weight
from scalesearch_demo import tiny_model

torch.manual_seed(0)


def _correlated_inputs(rows=512, k=64, rank=16, seed=0):
    """Inputs close to a rank-16 subspace: what error feedback exploits."""
    g = torch.Generator().manual_seed(seed)
    low_rank = torch.randn(rows, rank, generator=g) @ torch.randn(rank, k, generator=g)
    return low_rank + 0.1 * torch.randn(rows, k, generator=g)


@pytest.mark.parametrize("method", ["amax", "search"])
def test_uncorrelated_inputs_make_gptq_round_to_nearest(method):
    """With H a multiple of the identity there is no error to feed forward and no channel weighs more: GPTQ's
    bytes are quantize_blocks' bytes."""
    weight = torch.randn(48, 64) * torch.logspace(-2, 1, 64)
    nvfp4 = gptq_weight(weight, 3.0 * torch.eye(64, dtype=torch.float64), ScaleChoice(method), damping=0.01)
    blocks = quantize_blocks(weight, method)
    assert torch.equal(nvfp4.qdata, blocks.qdata) and torch.equal(nvfp4.scale_codes, blocks.scale_codes)
    assert torch.equal(nvfp4.per_tensor_scale, blocks.per_tensor_scale)


@pytest.mark.parametrize("method", ["amax", "search"])
def test_gptq_lowers_the_output_error_it_minimises(method):
    x = _correlated_inputs()
    weight = torch.randn(32, 64)
    hessian = x.double().T @ x.double()
    gptq_out = x @ gptq_weight(weight, hessian, ScaleChoice(method), 0.01).dequantize().T
    rtn_out = x @ quantize_blocks(weight, method).dequantize().T
    exact = x @ weight.T
    # measured: 0.13-0.18x round-to-nearest's squared output error (seeds 0-2, both methods)
    assert (gptq_out - exact).square().sum() < 0.3 * (rtn_out - exact).square().sum()


def test_singular_hessians_and_dead_inputs():
    weight = torch.randn(16, 32)
    x = torch.randn(100, 32)
    x[:, 5] = 0.0  # an input that never fires: its weights are kept and get no feedback
    hessian = x.double().T @ x.double()
    nvfp4 = gptq_weight(weight, hessian, ScaleChoice(), damping=0.0)
    assert torch.isfinite(nvfp4.dequantize()).all()
    rank_one = torch.ones(32, 1, dtype=torch.float64) @ torch.ones(1, 32, dtype=torch.float64)
    with pytest.raises(ValueError, match="not positive definite after damping 0"):
        gptq_weight(weight, rank_one, ScaleChoice(), damping=0.0)
    gptq_weight(weight, rank_one, ScaleChoice(), damping=0.01)  # damping makes it definite


def _batches(vocab=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(4, 16, dtype=torch.long)
    mask[1, 10:] = 0  # padding
    return [{"input_ids": torch.randint(0, vocab, (4, 16), generator=g), "attention_mask": mask} for _ in range(2)]


@pytest.mark.parametrize("name", ["llama", "qwen2", "bert"])
@pytest.mark.parametrize("activations", [None, "nvfp4"])
def test_every_linear_becomes_what_quantize_makes(name, activations):
    config = ScaleSearchConfig(activations=activations, progress=False)
    model, reference = tiny_model(name), tiny_model(name)
    summary = gptq_quantize_(model, _batches(), config, progress=False)
    expected = quantize_model(reference, config)
    assert summary.quantized and sorted(summary.quantized) == sorted(expected.quantized)
    for (path, module), (_, other) in zip(model.named_modules(), reference.named_modules(), strict=True):
        weight = getattr(module, "weight", None)
        if isinstance(other.__dict__.get("_parameters", {}).get("weight"), ScaleSearchNVFP4Tensor):
            assert isinstance(weight, ScaleSearchNVFP4Tensor), path
            assert weight.act_quant_kwargs == other.weight.act_quant_kwargs
    assert model.config.use_cache == reference.config.use_cache


@torch.no_grad()
def test_calibration_outputs_are_closer_than_round_to_nearest():
    model = tiny_model("llama")
    batches = _batches()
    reference = [model(**b).logits for b in batches]
    rtn = copy.deepcopy(model)
    quantize_model(rtn, ScaleSearchConfig(activations=None, progress=False))
    gptq_quantize_(model, batches, ScaleSearchConfig(activations=None, progress=False), progress=False)

    def error(m):
        return sum((m(**b).logits - r).square().sum() for b, r in zip(batches, reference, strict=True))

    assert error(model) < error(rtn)


def test_hessians_come_from_the_quantized_earlier_blocks_without_padding(monkeypatch):
    """Block 1's q_proj Hessian is X^T X of its inputs in the model whose block 0 is already quantized, over the
    real tokens only; q/k/v share it and the MLP's gate/up share another."""
    seen = {}
    original = gptq.gptq_weight

    def recording(weight, hessian, *args):
        seen.setdefault(id(hessian), []).append(weight)
        return original(weight, hessian, *args)

    monkeypatch.setattr(gptq, "gptq_weight", recording)
    model, batches = tiny_model("llama"), _batches()
    hessians, original_close = {}, gptq._Hessians.close
    monkeypatch.setattr(gptq._Hessians, "close", lambda self: hessians.update(self.sums) or original_close(self))
    gptq_quantize_(model, batches, ScaleSearchConfig(activations=None, progress=False), progress=False)

    layer = model.model.layers[1]
    shared = [len(weights) for weights in seen.values()]
    assert sorted(shared) == [1, 1, 1, 1, 1, 2, 2, 3, 3]  # per block: q/k/v, o, gate/up, down; then lm_head
    inputs = []
    handle = layer.self_attn.q_proj.register_forward_pre_hook(lambda m, a: inputs.append(a[0].reshape(-1, 128)))
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    handle.remove()
    rows = torch.cat([x[b["attention_mask"].reshape(-1).bool()] for x, b in zip(inputs, batches, strict=True)])
    expected = rows.double().T @ rows.double()
    assert torch.allclose(hessians["model.layers.1.self_attn.q_proj"], expected, rtol=1e-6, atol=1e-6)


def test_bad_input_is_named():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="at least one batch"):
        gptq_quantize_(model, [])
    with pytest.raises(ValueError, match="damping must be a non-negative number"):
        gptq_quantize_(model, _batches(), damping=-1)
    with pytest.raises(ValueError, match="damping must be a non-negative number"):
        gptq_quantize_(model, _batches(), damping="0.01")
    with pytest.raises(ValueError, match="config must be a ScaleSearchConfig"):
        gptq_quantize_(model, _batches(), config="search")
