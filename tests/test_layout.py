"""NVFP4Weight: the one validation of the weight layout, and the same error from every layer that takes one."""

import os

import pytest
import torch

from scalesearch_compile import NVFP4Weight, ScaleSearchNVFP4Tensor, quantize_blocks, quantize_nvfp4
from scalesearch_compile.layout import is_transposed
from scalesearch_compile.tensor import quantize_weight


def parts(n=48, k=64):
    blocks = quantize_blocks(torch.randn(n, k, generator=torch.Generator().manual_seed(0)), "search")
    return blocks.qdata, blocks.scale_codes, blocks.per_tensor_scale


def test_valid_layouts_normalise_scales_and_global_scale():
    stock = quantize_nvfp4(torch.randn(48, 64, generator=torch.Generator().manual_seed(1)), "search")
    weight = NVFP4Weight(stock.qdata, stock.scale, stock.per_tensor_scale.reshape(1))  # float8 scales, (1,) scale
    assert weight.scale_codes.dtype == torch.uint8 and torch.equal(weight.scale_codes, stock.scale.view(torch.uint8))
    assert weight.per_tensor_scale.shape == () and weight.per_tensor_scale.dtype == torch.float32
    assert (weight.out_features, weight.in_features) == (48, 64)
    assert torch.equal(weight.dequantize(), stock.dequantize(torch.float32))  # torchao's own decode
    single_level = NVFP4Weight(stock.qdata, stock.scale)
    assert single_level.per_tensor_scale is None and torch.equal(single_level.dequantize(), weight.unscaled())


def test_orientation_is_decided_by_is_transposed():
    qdata, codes, pts = parts()
    assert not is_transposed(qdata) and is_transposed(qdata.t())
    assert not is_transposed(qdata[:1]) and is_transposed(qdata[:1].t())  # one row: strides still tell
    with pytest.raises(ValueError, match="transposed view"):
        NVFP4Weight(qdata.t().contiguous().t(), codes, pts)  # a (N, K/2) view of a (K/2, N) storage


def _bad_layouts():
    qdata, codes, pts = parts()
    return {
        "qdata dtype": ((qdata.view(torch.int8), codes, pts), "qdata must be a 2-D uint8 tensor"),
        "qdata 4-D": ((qdata[None, None], codes, pts), "qdata must be a 2-D uint8 tensor"),
        "experts' scales": ((qdata[None], codes, pts), r"scales must be E4M3 codes .* of shape \(1, 48, 4\)"),
        "K not a multiple of 16": ((qdata[:, :4], codes[:, :1], pts), "positive multiple of 16"),
        "scale shape": ((qdata, codes[:, :3], pts), r"scales must be E4M3 codes .* of shape \(48, 4\)"),
        "scale dtype": ((qdata, codes.float(), pts), r"scales must be E4M3 codes \(uint8 or float8_e4m3fn\)"),
        "global scale shape": ((qdata, codes, torch.ones(2)), "per_tensor_scale must be None or a one-element"),
        "global scale dtype": ((qdata, codes, torch.ones((), dtype=torch.int32)), "one-element float tensor"),
        "device": ((qdata, codes.to("meta"), pts), "scale_codes is on meta, qdata on cpu"),
    }


@pytest.mark.parametrize("case", list(_bad_layouts()))
def test_every_layer_rejects_a_bad_layout_with_the_same_message(case):
    (qdata, codes, pts), message = _bad_layouts()[case]
    with pytest.raises(ValueError, match=message) as direct:
        NVFP4Weight(qdata, codes, pts)
    # the tensor subclass of quantize_ and the custom op (eager and fake) say exactly the same
    with pytest.raises(ValueError) as tensor:
        ScaleSearchNVFP4Tensor(qdata, codes, 16, torch.float32, pts)
    x = torch.randn(2, 64)
    with pytest.raises(ValueError) as op:
        torch.ops.scalesearch.nvfp4_linear(x, qdata, codes, pts, None, None, [], "reference")
    assert str(tensor.value) == str(op.value) == str(direct.value)


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="the Triton kernels run on CUDA or under TRITON_INTERPRET=1 (as CI runs)",
)
def test_the_kernel_takes_the_same_validated_weight():
    from scalesearch_compile.kernels.gemm import nvfp4_linear_triton

    qdata, codes, pts = parts()
    with pytest.raises(ValueError, match="weight must be an NVFP4Weight"):
        nvfp4_linear_triton(torch.randn(2, 64), (qdata, codes, pts))
    weight = NVFP4Weight(qdata, codes, pts)
    out = nvfp4_linear_triton(torch.randn(2, 64), weight, act=None)
    assert out.shape == (2, 48)


def test_operand_checks():
    weight = NVFP4Weight(*parts())
    with pytest.raises(ValueError, match="linear input has 32 features but the NVFP4 weight has in_features 64"):
        weight.check_operands(32, torch.device("cpu"), None)
    with pytest.raises(ValueError, match="linear input is on meta"):
        weight.check_operands(64, torch.device("meta"), None)
    with pytest.raises(ValueError, match=r"bias must be None or a floating-point tensor of shape \(48,\)"):
        weight.check_operands(64, torch.device("cpu"), torch.zeros(48, dtype=torch.int64))
    weight.check_operands(64, torch.device("cpu"), torch.zeros(48))


def test_weight_of_a_quantized_tensor_and_its_transpose():
    q = quantize_weight(torch.randn(48, 64))
    assert not q.is_transposed and q.t().is_transposed
    assert torch.equal(q.nvfp4_weight().qdata, q.qdata)
    assert torch.equal(q.t().t().nvfp4_weight().dequantize(), q.nvfp4_weight().dequantize())
