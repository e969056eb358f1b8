"""scalesearch::nvfp4_grouped_linear and the routing of transformers' experts products on
ScaleSearchNVFP4Experts: each expert's rows equal scalesearch::nvfp4_linear of those rows alone (bit for bit,
the same reference), batched == grouped == the eager loop, float64 bounds, opcheck, gradients, input errors."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.library import opcheck

from scalesearch_compile import NVFP4ActivationKwargs, quantize_blocks
from scalesearch_compile.ops.grouped import gathered_linear, grouped_linear
from scalesearch_compile.ops.linear import activation_arguments
from scalesearch_compile.tensor import ScaleSearchNVFP4Tensor, quantize_experts

E, N, K = 4, 48, 64
ACTS = [None, NVFP4ActivationKwargs()]
ACT_IDS = ["w4a16", "w4a4"]


def _experts(act=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    return quantize_experts(torch.randn(E, N, K, generator=g) * torch.logspace(-1, 1, K), act_quant_kwargs=act)


def _sorted_input(counts, extra=0, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(counts) + extra, K, generator=g) * torch.linspace(0.1, 4.0, K)
    return x, torch.tensor(counts).cumsum(0)


def _op_args(x, offsets, experts, impl="reference"):
    w = experts.nvfp4_weight()
    return (
        x,
        offsets,
        w.qdata,
        w.scale_codes,
        w.per_tensor_scale,
        *activation_arguments(experts.act_quant_kwargs),
        impl,
    )


@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
@pytest.mark.parametrize("counts", [[5, 0, 9, 2], [0, 0, 0, 7], [16, 1, 1, 1]])
def test_each_experts_rows_equal_its_linear_alone(counts, act):
    """The documented numerics: an expert's rows are ``F.linear`` of those rows alone on its weight (one
    dynamic activation scale per expert), bit for bit; rows past the last offset are zero."""
    experts = _experts(act)
    x, offsets = _sorted_input(counts, extra=3)
    out = torch.ops.scalesearch.nvfp4_grouped_linear(*_op_args(x, offsets, experts))
    start = 0
    for e, count in enumerate(counts):
        if count:
            alone = F.linear(x[start : start + count], experts[e])
            assert torch.equal(out[start : start + count], alone), e
        start += count
    assert torch.equal(out[start:], torch.zeros(3, N))


@settings(deadline=None)
@given(
    counts=st.lists(st.integers(0, 6), min_size=E, max_size=E),
    extra=st.integers(0, 2),
    w4a4=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_rows_of_any_routing_equal_their_expert_alone(counts, extra, w4a4, seed):
    experts = _experts(ACTS[w4a4])
    x, offsets = _sorted_input(counts, extra, seed)
    out = grouped_linear(x, offsets, experts)
    start = 0
    for e, count in enumerate(counts):
        if count:
            assert torch.equal(out[start : start + count], F.linear(x[start : start + count], experts[e]))
        start += count
    assert not out[start:].any()


@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
def test_matches_float64_dequantize_then_matmul(act):
    experts = _experts(act)
    counts = [6, 3, 0, 8]
    x, offsets = _sorted_input(counts)
    out = grouped_linear(x, offsets, experts)
    w = experts.dequantize(torch.float64)
    start, ref = 0, torch.zeros(x.shape[0], N, dtype=torch.float64)
    for e, count in enumerate(counts):
        rows = x[start : start + count]
        if count:
            a = rows if act is None else quantize_blocks(rows, act).dequantize()
            ref[start : start + count] = a.double() @ w[e].T
        start += count
    assert (out.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
def test_batched_grouped_and_the_eager_loop_agree_bit_for_bit(act):
    """The three products transformers' experts implementations compute on the same routing."""
    experts = _experts(act)
    ids = torch.tensor([3, 0, 0, 2, 3, 3, 0, 2, 2, 2])
    x = torch.randn(ids.numel(), K)
    batched = torch.bmm(experts[ids], x.unsqueeze(-1)).squeeze(-1)
    order = torch.argsort(ids, stable=True)
    offsets = torch.bincount(ids, minlength=E).cumsum(0).int()
    grouped = F.grouped_mm(x[order], experts.transpose(-2, -1), offs=offsets)
    loop = torch.empty_like(batched)
    for e in range(E):
        rows = (ids == e).nonzero().squeeze(-1)
        if rows.numel():
            loop[rows] = F.linear(x[rows], experts[e])
    assert torch.equal(batched, loop) and torch.equal(grouped, loop[order])


def test_gathered_ids_outside_the_experts_give_zero_rows():
    experts = _experts()
    x = torch.randn(5, K)
    ids = torch.tensor([1, E, -1, 0, 1])
    out = gathered_linear(
        *_op_args(x, torch.tensor([1, E, -1, 0, 1]), experts)[:1], ids, *_op_args(x, ids, experts)[2:]
    )
    assert torch.equal(out[1:3], torch.zeros(2, N))
    assert torch.equal(out[[0, 3, 4]], gathered_linear(x[[0, 3, 4]], ids[[0, 3, 4]], *_op_args(x, ids, experts)[2:]))


@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
def test_backward_is_straight_through_for_all_three_products(act):
    experts = _experts(act)
    w = experts.dequantize()
    ids = torch.tensor([1, 3, 3, 0, 1])
    upstream = torch.randn(5, N)
    expected = torch.stack([upstream[i] @ w[ids[i]] for i in range(5)])
    order = torch.argsort(ids, stable=True)
    offsets = torch.bincount(ids, minlength=E).cumsum(0).int()
    products = {
        "batched": lambda x: torch.bmm(experts[ids], x.unsqueeze(-1)).squeeze(-1),
        "grouped": lambda x: F.grouped_mm(x[order], experts.transpose(-2, -1), offs=offsets)[torch.argsort(order)],
        "loop": lambda x: torch.stack([F.linear(x[i : i + 1], experts[ids[i]])[0] for i in range(5)]),
    }
    for name, product in products.items():
        x = torch.randn(5, K, requires_grad=True)
        (product(x) * upstream).sum().backward()
        assert torch.allclose(x.grad, expected, rtol=1e-5, atol=1e-5), name


@pytest.mark.parametrize("act_method", [None, "search"])
def test_opcheck_grouped_linear(act_method):
    experts = _experts(NVFP4ActivationKwargs(act_method) if act_method else None)
    x, offsets = _sorted_input([3, 0, 4, 2], extra=1)
    opcheck(torch.ops.scalesearch.nvfp4_grouped_linear.default, _op_args(x, offsets, experts, "auto"))
    opcheck(torch.ops.scalesearch.nvfp4_grouped_linear.default, _op_args(x.requires_grad_(), offsets, experts))
    grad_args = (torch.randn(x.shape[0], N), *_op_args(x, offsets, experts)[1:5])
    opcheck(torch.ops.scalesearch.nvfp4_grouped_linear_backward.default, grad_args)


def test_views_are_the_same_bytes():
    experts = _experts()
    one = experts[2]
    assert isinstance(one, ScaleSearchNVFP4Tensor) and one.shape == (N, K)
    assert one.qdata.data_ptr() == experts.qdata[2].data_ptr()
    assert torch.equal(one.dequantize(), experts.dequantize()[2])
    gathered = experts[torch.tensor([3, 3, 1])]
    assert gathered.shape == (3, N, K) and gathered.qdata is experts.qdata
    assert torch.equal(gathered.dequantize(), experts.dequantize()[[3, 3, 1]])
    transposed = experts.transpose(-2, -1)
    assert transposed.shape == (E, K, N) and torch.equal(transposed.dequantize(), experts.dequantize().mT)
    assert torch.equal(transposed[1].dequantize(), experts.dequantize()[1].T)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: {**a, "offsets": a["offsets"][:-1]}, r"offsets must be an int32/int64 tensor of shape \(4,\)"),
        (lambda a: {**a, "offsets": a["offsets"].float()}, "offsets must be an int32/int64 tensor"),
        (lambda a: {**a, "x": a["x"][None]}, "grouped linear input must be 2-D"),
        (lambda a: {**a, "x": a["x"][:, :32]}, "in_features"),
        (lambda a: {**a, **{k: a[k][0] for k in ("weight_qdata", "weight_scale", "weight_per_tensor_scale")}}, "3-D"),
        (lambda a: {**a, "act_method": "best"}, "method"),
        (lambda a: {**a, "impl": "cuda"}, "unknown impl 'cuda'"),
    ],
)
def test_input_errors(change, message):
    x, offsets = _sorted_input([1, 2, 3, 4])
    names = ("x", "offsets", "weight_qdata", "weight_scale", "weight_per_tensor_scale", "act_method", "act_window")
    args = dict(zip((*names, "impl"), _op_args(x, offsets, _experts()), strict=True))
    with pytest.raises(ValueError, match=message):
        torch.ops.scalesearch.nvfp4_grouped_linear(**change(args))


def test_unsupported_views_name_what_is_supported():
    experts = _experts()
    with pytest.raises(NotImplementedError, match=r"w\[expert\], w\[expert_ids\] and w.transpose\(-2, -1\)"):
        experts.transpose(0, 1)
    with pytest.raises(NotImplementedError, match=r"w\[expert_ids\]"):
        experts[torch.tensor([0, 1])][torch.tensor([0])]
