"""ScaleSearchNVFP4Tensor: torchao's NVFP4 layout, lossless conversion to and from NVFP4Tensor, layout errors."""

import pytest
import torch
from torchao.prototype.mx_formats.inference_workflow import NVFP4WeightOnlyConfig
from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale
from torchao.quantization import quantize_

from scalesearch_compile import (
    NVFP4ActivationKwargs,
    NVFP4Weight,
    ScaleChoice,
    ScaleSearchNVFP4Experts,
    ScaleSearchNVFP4Tensor,
    quantize_blocks,
    quantize_experts,
    quantize_nvfp4,
)
from scalesearch_compile.tensor import nvfp4_weight, quantize_weight

torch.manual_seed(0)


def test_quantize_nvfp4_amax_is_torchao_bit_for_bit():
    x = torch.randn(48, 64)
    ours = quantize_nvfp4(x, "amax")
    ref = NVFP4Tensor.to_nvfp4(x, per_tensor_scale=per_tensor_amax_to_scale(x.abs().amax()))
    assert torch.equal(ours.qdata, ref.qdata)
    assert torch.equal(ours.scale.view(torch.uint8), ref.scale.view(torch.uint8))
    assert torch.equal(ours.per_tensor_scale, ref.per_tensor_scale)


def test_weight_layout_and_dequantize():
    w = torch.randn(48, 64, dtype=torch.bfloat16)
    q = quantize_weight(w, ScaleChoice("search", (-1, 4)), act_quant_kwargs=NVFP4ActivationKwargs())
    blocks = quantize_blocks(w, ScaleChoice("search", (-1, 4)))
    assert (q.shape, q.dtype) == ((48, 64), torch.bfloat16)
    assert q.qdata.shape == (48, 32) and q.scale.shape == (48, 4) and q.scale.dtype == torch.float8_e4m3fn
    assert torch.equal(q.qdata, blocks.qdata) and torch.equal(q.scale.view(torch.uint8), blocks.scale_codes)
    assert torch.equal(q.dequantize(torch.float32), blocks.dequantize())
    assert q.dequantize().dtype == torch.bfloat16


def test_transpose_keeps_bytes_and_round_trips():
    q = quantize_weight(torch.randn(48, 64), act_quant_kwargs=NVFP4ActivationKwargs("amax"))
    t = q.t()
    assert isinstance(t, ScaleSearchNVFP4Tensor) and t.shape == (64, 48)
    assert t.act_quant_kwargs == q.act_quant_kwargs
    for swapped in (q.T, q.transpose(0, 1), q.transpose(-1, -2), q.permute(1, 0)):
        assert swapped.shape == (64, 48) and torch.equal(swapped.qdata, t.qdata)
    for same in (q.transpose(1, 1), q.permute(0, 1)):
        assert same.shape == q.shape and same.qdata is q.qdata
    back = t.t()
    assert back.shape == (48, 64) and torch.equal(back.qdata, q.qdata)
    assert torch.equal(back.dequantize(), q.dequantize())


def test_to_and_from_nvfp4_tensor_keep_every_byte():
    q = quantize_weight(torch.randn(48, 64), act_quant_kwargs=NVFP4ActivationKwargs())
    stock = q.to_nvfp4_tensor()
    assert type(stock) is NVFP4Tensor and stock.act_quant_kwargs is None
    assert stock.qdata.data_ptr() == q.qdata.data_ptr() and stock.scale.data_ptr() == q.scale.data_ptr()
    back = ScaleSearchNVFP4Tensor.from_nvfp4_tensor(stock, q.act_quant_kwargs)
    for name in ("qdata", "scale", "per_tensor_scale"):
        assert torch.equal(
            getattr(back, name).reshape(-1).view(torch.uint8), getattr(q, name).reshape(-1).view(torch.uint8)
        )
    assert back.act_quant_kwargs == q.act_quant_kwargs


def test_from_torchao_weight_only_config_unswizzles_exactly():
    linear = torch.nn.Linear(64, 48)
    weight = linear.weight.detach().clone()
    quantize_(linear, NVFP4WeightOnlyConfig())
    stock = linear.weight
    assert stock.is_swizzled_scales
    ours = ScaleSearchNVFP4Tensor.from_nvfp4_tensor(stock)
    assert torch.equal(ours.dequantize(), stock.dequantize())
    # and our "amax" method is torchao's weight-only quantization, byte for byte
    amax = quantize_weight(weight, "amax")
    assert torch.equal(ours.qdata, amax.qdata) and torch.equal(ours.per_tensor_scale, amax.per_tensor_scale)
    assert torch.equal(ours.scale.view(torch.uint8), amax.scale.view(torch.uint8))


def test_activation_kwargs_validate_and_normalise():
    assert NVFP4ActivationKwargs("search", [-1, 3]).window == (-1, 3)  # JSON gives lists back
    assert isinstance(NVFP4ActivationKwargs(), ScaleChoice)  # validated by ScaleChoice, nowhere else
    with pytest.raises(ValueError, match="unknown method"):
        NVFP4ActivationKwargs("rtn")
    with pytest.raises(ValueError, match="empty search window"):
        NVFP4ActivationKwargs("search", (2, 1))


def test_layout_errors():
    q = quantize_weight(torch.randn(48, 64))
    with pytest.raises(ValueError, match="block size must be 16"):
        ScaleSearchNVFP4Tensor(q.qdata, q.scale, 32, torch.float32)
    with pytest.raises(ValueError, match="qdata must be a 2-D uint8"):
        ScaleSearchNVFP4Tensor(q.qdata.view(torch.int8), q.scale, 16, torch.float32)
    with pytest.raises(ValueError, match=r"scales must be E4M3 codes .* of shape \(48, 4\)"):
        ScaleSearchNVFP4Tensor(q.qdata, q.scale[:, :2], 16, torch.float32)
    with pytest.raises(ValueError, match="per_tensor_scale must be None or a one-element float"):
        ScaleSearchNVFP4Tensor(q.qdata, q.scale, 16, torch.float32, torch.ones(48, 1))
    with pytest.raises(ValueError, match="act_quant_kwargs must be NVFP4ActivationKwargs"):
        ScaleSearchNVFP4Tensor(q.qdata, q.scale, 16, torch.float32, None, {"method": "search"})
    with pytest.raises(ValueError, match="a linear weight is 2-D"):
        quantize_weight(torch.randn(2, 48, 64))
    static = NVFP4Tensor.to_nvfp4(torch.randn(48, 64), act_per_tensor_scale=torch.tensor(0.1))
    with pytest.raises(ValueError, match="static activation scale"):
        ScaleSearchNVFP4Tensor.from_nvfp4_tensor(static)
    with pytest.raises(ValueError, match="expected a torchao NVFP4Tensor"):
        ScaleSearchNVFP4Tensor.from_nvfp4_tensor(q)
    with pytest.raises(ValueError, match="transposed view"):
        q.t().nvfp4_weight()


def test_experts_are_each_quantized_as_a_linear_weight():
    weights = torch.randn(3, 32, 48) * torch.tensor([1e-3, 1.0, 1e3])[:, None, None]  # magnitudes far apart
    experts = quantize_experts(weights, "search")
    for e in range(3):
        alone = quantize_weight(weights[e], "search")
        assert torch.equal(experts.qdata[e], alone.qdata) and torch.equal(
            experts.per_tensor_scale[e], alone.per_tensor_scale
        )
        assert torch.equal(experts.scale[e].view(torch.uint8), alone.scale.view(torch.uint8))
    assert experts.shape == (3, 32, 48) and experts.dtype == torch.float32


def test_experts_layout_errors():
    q = quantize_experts(torch.randn(2, 32, 48))
    args = (q.qdata, q.scale, q.per_tensor_scale, 16, torch.float32, False)
    with pytest.raises(ValueError, match="with a global scale per expert"):
        ScaleSearchNVFP4Experts(*args[:2], None, *args[3:])
    with pytest.raises(ValueError, match="with a global scale per expert"):
        ScaleSearchNVFP4Experts(q.qdata[0], q.scale[0], q.per_tensor_scale[0], *args[3:])
    with pytest.raises(ValueError, match=r"a float tensor of 2 \(one per expert\)"):
        ScaleSearchNVFP4Experts(*args[:2], torch.ones(3), *args[3:])
    with pytest.raises(ValueError, match="expert_ids must be a 1-D integer tensor"):
        ScaleSearchNVFP4Experts(*args, expert_ids=torch.zeros(2))
    with pytest.raises(ValueError, match="block size must be 16"):
        ScaleSearchNVFP4Experts(*args[:3], 32, *args[4:])
    with pytest.raises(ValueError, match="experts' weights are 3-D"):
        quantize_experts(torch.randn(32, 48))
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_experts(torch.full((2, 16, 16), float("nan")))
    with pytest.raises(ValueError, match="experts' weights are ScaleSearchNVFP4Experts"):
        ScaleSearchNVFP4Tensor(q.qdata, q.scale, 16, torch.float32, q.per_tensor_scale)


def test_experts_save_and_load_bit_for_bit():
    import io

    experts = quantize_experts(torch.randn(2, 32, 48), act_quant_kwargs=NVFP4ActivationKwargs())
    buffer = io.BytesIO()
    torch.save({"w": experts}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)["w"]
    assert type(loaded) is ScaleSearchNVFP4Experts and loaded.act_quant_kwargs == experts.act_quant_kwargs
    assert torch.equal(loaded.dequantize(), experts.dequantize())


def test_nvfp4_weight_of_torchao_tensors_round_trips_and_errors():
    blocks = quantize_blocks(torch.randn(32, 64), "search")
    stock = quantize_nvfp4(torch.randn(32, 64), "search")
    weight = nvfp4_weight(stock)
    assert torch.equal(weight.qdata, stock.qdata) and torch.equal(weight.scale_codes, stock.scale.view(torch.uint8))
    assert torch.equal(weight.dequantize(), stock.dequantize(torch.float32))
    assert torch.equal(NVFP4Weight.from_blocks(blocks).dequantize(), blocks.dequantize())
    with pytest.raises(ValueError, match="transposed"):
        nvfp4_weight(stock.t())
    swizzled = NVFP4Tensor.to_nvfp4(torch.randn(128, 64), is_swizzled_scales=True)
    assert nvfp4_weight(swizzled).scale_codes.shape == (128, 4)  # unswizzled, exactly
    assert torch.equal(nvfp4_weight(swizzled).dequantize(), swizzled.dequantize(torch.float32))
    with pytest.raises(ValueError, match="2-D or 3-D"):
        quantize_nvfp4(torch.randn(64), "amax")
    with pytest.raises(ValueError, match="one global scale"):
        quantize_nvfp4(torch.randn(4, 64), per_tensor_scale="row")
