"""ScaleSearchConfig, its stateless quantize_ handler and quantize_model: what is quantized and how, what is
skipped and why, the summary log line, the progress bar, serialisation of the config, and calibration
importance."""

import gc
import logging
import weakref

import pytest
import torch
from torchao.core.config import config_from_dict, config_to_dict
from torchao.quantization import FqnToConfig, quantize_

from scalesearch_compile import (
    NVFP4ActivationKwargs,
    ScaleChoice,
    ScaleSearchConfig,
    ScaleSearchNVFP4Experts,
    ScaleSearchNVFP4Tensor,
    calibrate,
    quantize_model,
)
from scalesearch_compile.calibration import IMPORTANCE_BUFFER
from scalesearch_compile.tensor import quantize_weight

torch.manual_seed(0)


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(64, 32)
        self.odd = torch.nn.Linear(32, 24)  # in_features 32: fine
        self.ragged = torch.nn.Linear(24, 16)  # in_features 24: not a multiple of 16
        self.head = torch.nn.Linear(16, 8)
        self.wide = torch.nn.Linear(16, 16).double()  # unsupported dtype
        self.broken = torch.nn.Linear(16, 16)
        with torch.no_grad():
            self.broken.weight[2, 3] = float("inf")  # not finite

    def forward(self, x):
        return self.head(self.ragged(self.odd(self.up(x))))


def _records(caplog):
    return [r for r in caplog.records if r.name == "scalesearch_compile"]


def test_quantize_model_quantizes_what_it_can_and_logs_one_summary_line(caplog, capsys):
    net = _Net()
    untouched = {name: getattr(net, name).weight for name in ("ragged", "wide", "broken")}
    with caplog.at_level(logging.INFO, logger="scalesearch_compile"):
        summary = quantize_model(net, ScaleSearchConfig(exclude=["he*"]))
    for name in ("up", "odd"):
        weight = getattr(net, name).weight
        assert isinstance(weight, ScaleSearchNVFP4Tensor)
        assert weight.act_quant_kwargs == NVFP4ActivationKwargs("fast_search", (-2, 6))  # run time: three candidates
    for name, weight in untouched.items():
        assert getattr(net, name).weight is weight
    assert type(net.head.weight) is torch.nn.Parameter
    assert summary.quantized == ["up", "odd"]
    (record,) = _records(caplog)
    assert record.levelno == logging.INFO
    message = record.getMessage()
    assert message == summary.line()
    assert "2 of 6 layers to NVFP4 (method=search, activations=nvfp4 (fast_search), window=[-2, 6])" in message
    assert "skipped 4" in message and "in_features 24 not a multiple of 16: ragged" in message
    assert "NaN or Inf in the weight: broken" in message
    assert "excluded by 'he*': head" in message and "weight dtype torch.float64: wide" in message
    assert "scalesearch quantize_" in capsys.readouterr().err  # the tqdm bar
    assert net(torch.randn(3, 64)).shape == (3, 8)


def test_torchao_quantize_handler_is_stateless_and_logs_per_layer(caplog, capsys):
    net = _Net()
    with caplog.at_level(logging.DEBUG, logger="scalesearch_compile"):
        quantize_(net, ScaleSearchConfig())  # torchao's own walk: the handler sees one module at a time
    assert isinstance(net.up.weight, ScaleSearchNVFP4Tensor) and isinstance(net.head.weight, ScaleSearchNVFP4Tensor)
    messages = [(r.levelno, r.getMessage()) for r in _records(caplog)]
    assert sum(level == logging.DEBUG and "to NVFP4" in m for level, m in messages) == 3  # up, odd, head
    left = [m for level, m in messages if level == logging.INFO]
    assert len(left) == 3 and any("in_features 24 not a multiple of 16" in m for m in left)
    assert "scalesearch quantize_" not in capsys.readouterr().err  # no bar: the handler cannot know the total
    import scalesearch_compile.config as config_module

    assert not any(isinstance(v, torch.nn.Module) for v in vars(config_module).values())


def test_torchao_quantize_refuses_exclude_it_cannot_apply():
    net = torch.nn.Sequential(torch.nn.Linear(32, 16))
    with pytest.raises(ValueError, match="exclude needs module names.*quantize_model"):
        quantize_(net, ScaleSearchConfig(exclude=["0"]))
    assert type(net[0].weight) is torch.nn.Parameter  # refused before anything changed


def test_no_model_is_kept_alive_after_an_error():
    net = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.Linear(16, 16))
    net[1].register_buffer(IMPORTANCE_BUFFER, torch.ones(3), persistent=False)  # a wrong shape: an error
    ref = weakref.ref(net)
    for quantize in (quantize_, quantize_model):
        with pytest.raises(ValueError, match="one weight per input channel"):
            quantize(net, ScaleSearchConfig())
    assert isinstance(net[0].weight, ScaleSearchNVFP4Tensor)
    del net
    gc.collect()
    assert ref() is None  # nothing (a frame, a progress record) holds the model after the error


def test_second_run_skips_quantized_layers(caplog):
    net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 16))
    quantize_model(net, ScaleSearchConfig(progress=False))
    qdata = net[0].weight.qdata
    with caplog.at_level(logging.INFO, logger="scalesearch_compile"):
        quantize_model(net, ScaleSearchConfig(progress=False))
    assert net[0].weight.qdata is qdata
    assert "0 of 2 layers" in caplog.text and "weight already quantized (ScaleSearchNVFP4Tensor)" in caplog.text


def test_a_module_shared_by_two_parents_is_counted_twice(caplog):
    shared = torch.nn.Linear(32, 16)
    net = torch.nn.Module()
    net.a, net.b = torch.nn.Sequential(shared), torch.nn.Sequential(torch.nn.Linear(32, 32), shared)
    with caplog.at_level(logging.INFO, logger="scalesearch_compile"):
        quantize_model(net, ScaleSearchConfig(progress=False))
    (record,) = _records(caplog)  # one line, as quantize_ would make three handler calls
    assert "2 of 3 layers" in record.getMessage()
    assert "weight already quantized (ScaleSearchNVFP4Tensor): b.1" in record.getMessage()


def test_a_single_layer_shows_no_bar(caplog, capsys):
    with caplog.at_level(logging.DEBUG, logger="scalesearch_compile"):
        quantize_model(torch.nn.Linear(32, 16), ScaleSearchConfig())
    (record,) = _records(caplog)
    assert "1 of 1 layers" in record.getMessage()
    assert "scalesearch quantize_" not in capsys.readouterr().err


def test_fqn_to_config_quantizes_the_named_module():
    net = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.Linear(16, 16))
    quantize_(net, FqnToConfig({"1": ScaleSearchConfig(activations=None)}), filter_fn=None)
    assert type(net[0].weight) is torch.nn.Parameter
    assert isinstance(net[1].weight, ScaleSearchNVFP4Tensor) and net[1].weight.act_quant_kwargs is None


def test_custom_filter_reports_non_linear_modules(caplog):
    net = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.LayerNorm(16))
    with caplog.at_level(logging.INFO, logger="scalesearch_compile"):
        quantize_model(net, ScaleSearchConfig(progress=False), filter_fn=lambda m, name: name in ("0", "1"))
    assert isinstance(net[0].weight, ScaleSearchNVFP4Tensor)
    assert "not a linear layer or a mixture-of-experts experts module (LayerNorm): 1" in caplog.text


def test_quantize_model_and_torchao_quantize_give_the_same_bytes():
    torch.manual_seed(1)
    a = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.GELU(), torch.nn.Linear(32, 16))
    b = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.GELU(), torch.nn.Linear(32, 16))
    b.load_state_dict(a.state_dict())
    config = ScaleSearchConfig(method="four_over_six", activations=None, progress=False)
    quantize_(a, config)
    quantize_model(b, config)
    for i in (0, 2):
        assert torch.equal(a[i].weight.qdata, b[i].weight.qdata)
        assert torch.equal(a[i].weight.scale.view(torch.uint8), b[i].weight.scale.view(torch.uint8))


def test_calibration_importance_is_used_and_consumed():
    net = torch.nn.Sequential(torch.nn.Linear(64, 32))
    weight = net[0].weight.detach().clone()
    batches = [torch.randn(8, 64) * torch.linspace(0.01, 3.0, 64) for _ in range(2)]
    importance = calibrate(net, batches)["0"]
    quantize_model(net, ScaleSearchConfig(activations=None, progress=False))
    assert not hasattr(net[0], IMPORTANCE_BUFFER)
    expected = quantize_weight(weight, "search", importance=importance)
    plain = quantize_weight(weight, "search")
    assert torch.equal(net[0].weight.scale.view(torch.uint8), expected.scale.view(torch.uint8))
    assert not torch.equal(expected.scale.view(torch.uint8), plain.scale.view(torch.uint8))


def test_config_round_trips_through_torchao_json():
    config = ScaleSearchConfig(method="exhaustive", activations=None, window=[-1, 3], exclude=["lm_head"])
    assert config_from_dict(config_to_dict(config)) == config
    config = ScaleSearchConfig(activation_method="four_over_six")
    assert config_from_dict(config_to_dict(config)) == config


@pytest.mark.parametrize(
    "kwargs, weights, activations",
    [
        ({}, "search", "fast_search"),  # activations are quantized every forward: three candidates, not nine
        ({"activation_method": "search"}, "search", "search"),
        ({"method": "amax"}, "amax", "amax"),  # torchao's numbers for both
        ({"method": "four_over_six"}, "four_over_six", "four_over_six"),
        ({"method": "amax", "activation_method": "fast_search"}, "amax", "fast_search"),
    ],
)
def test_activation_method(kwargs, weights, activations):
    policy = ScaleSearchConfig(window=[-1, 3], **kwargs).policy()
    assert policy.scales == ScaleChoice(weights, (-1, 3))
    assert policy.act_quant_kwargs == NVFP4ActivationKwargs(activations, (-1, 3))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "mse"}, "unknown method 'mse'"),
        ({"activations": "fp8"}, "activations must be 'nvfp4'"),
        ({"window": [3, -1]}, "empty search window"),
        ({"window": "wide"}, "window must be a pair"),
        ({"window": [-2.5, 6]}, "window must be a pair of integer"),
        ({"exclude": ["re:("]}, "exclude: module pattern 're:\\(' is not a regular expression"),
        ({"exclude": "lm_head"}, "exclude: module patterns must be a list of strings"),
        ({"exclude": [3]}, "a module pattern must be a string"),
        ({"progress": "yes"}, "progress must be True or False"),
        ({"activation_method": "mse"}, "activation_method: unknown method 'mse'"),
        ({"activation_method": ["search"]}, "activation_method: unknown method"),
    ],
)
def test_bad_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ScaleSearchConfig(**kwargs)


def test_concurrent_calls_each_log_their_summary(caplog):
    """Four quantize_model calls at once: each quantizes its model and logs its own summary line."""
    from concurrent.futures import ThreadPoolExecutor

    models = [torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 16 * (i + 1))) for i in range(4)]
    with caplog.at_level(logging.INFO, logger="scalesearch_compile"), ThreadPoolExecutor(4) as pool:
        summaries = list(pool.map(lambda m: quantize_model(m, ScaleSearchConfig(progress=False)), models))
    assert all(len(s.quantized) == 2 for s in summaries)
    assert all(isinstance(m[1].weight, ScaleSearchNVFP4Tensor) for m in models)
    lines = [r.getMessage() for r in _records(caplog)]
    assert len(lines) == 4 and all("2 of 2 layers to NVFP4" in line for line in lines)


def test_no_exclude_is_an_empty_list():
    assert ScaleSearchConfig(exclude=None).exclude == []
    assert ScaleSearchConfig(exclude=("lm_head",)).exclude == ["lm_head"]


# Mixture-of-experts models: every expert's weights in NVFP4, run by all three experts implementations.

MOE_IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
EXPERTS_IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")


def _logits_by_implementation(model):
    logits = {}
    with torch.no_grad():
        for implementation in EXPERTS_IMPLEMENTATIONS:
            model.config._experts_implementation = implementation
            logits[implementation] = model(MOE_IDS).logits
    return logits


def _dequantized_copy(model):
    """The model with every NVFP4 weight replaced by its dequantized float tensor."""
    import copy

    dense = copy.deepcopy(model)
    for module in dense.modules():
        for name, param in list(module._parameters.items()):
            if isinstance(param, ScaleSearchNVFP4Tensor | ScaleSearchNVFP4Experts):
                module._parameters[name] = torch.nn.Parameter(param.dequantize(), requires_grad=False)
    return dense


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"])
def test_every_expert_weight_is_quantized_and_the_implementations_agree(name, caplog):
    from scalesearch_demo import tiny_model

    model = tiny_model(name)
    with caplog.at_level(logging.INFO, logger="scalesearch_compile"):
        summary = quantize_model(model, ScaleSearchConfig(activations=None, progress=False))
    experts = {n: p for n, p in model.named_parameters() if p.dim() == 3}
    assert len(experts) == 4 and all(isinstance(p, ScaleSearchNVFP4Experts) for p in experts.values())
    assert all(p.per_tensor_scale.shape == (4,) for p in experts.values())
    assert len(summary.experts) == 2 and "experts: 2 blocks x 4 experts quantized" in caplog.text
    routers = [p for n, p in model.named_parameters() if n.endswith(("mlp.gate.weight", "shared_expert_gate.weight"))]
    assert routers and all(type(p) is torch.nn.Parameter for p in routers)

    logits = _logits_by_implementation(model)
    assert torch.equal(logits["eager"], logits["batched_mm"]) and torch.equal(logits["eager"], logits["grouped_mm"])
    with torch.no_grad():
        dense = _dequantized_copy(model)(MOE_IDS).logits  # W4A16: the same weights in float
    assert torch.allclose(logits["grouped_mm"], dense, rtol=0, atol=1e-4)


def test_w4a4_experts_implementations_agree_bit_for_bit():
    from scalesearch_demo import tiny_model

    model = tiny_model("mixtral")
    quantize_model(model, ScaleSearchConfig(progress=False))
    logits = _logits_by_implementation(model)
    assert torch.equal(logits["eager"], logits["batched_mm"]) and torch.equal(logits["eager"], logits["grouped_mm"])
    model.config._experts_implementation = "grouped_mm"
    with torch.no_grad():
        dense = _dequantized_copy(model)(MOE_IDS).logits
    assert not torch.equal(logits["grouped_mm"], dense)  # W4A4: activations are quantized too


def test_gate_and_up_of_an_expert_share_its_global_scale():
    from scalesearch_compile.search import global_scale
    from scalesearch_demo import tiny_model

    model = tiny_model("qwen3_moe")
    float_weights = model.model.layers[0].mlp.experts.gate_up_proj.detach().clone()
    quantize_model(model, ScaleSearchConfig(progress=False))
    quantized = model.model.layers[0].mlp.experts.gate_up_proj
    expected = global_scale(float_weights.abs().amax(dim=(1, 2)))
    assert torch.equal(quantized.per_tensor_scale, expected)
    assert len(set(expected.tolist())) == 4  # one per expert, not one for all


def test_torchao_quantize_reaches_experts_with_the_filter_and_fqn_to_config():
    from scalesearch_compile import is_quantizable
    from scalesearch_demo import tiny_model

    model = tiny_model("mixtral")
    quantize_(model, ScaleSearchConfig(progress=False))  # torchao's default filter: nn.Linear only
    assert type(model.model.layers[0].mlp.experts.gate_up_proj) is torch.nn.Parameter
    quantize_(model, ScaleSearchConfig(progress=False), filter_fn=is_quantizable)
    assert isinstance(model.model.layers[0].mlp.experts.gate_up_proj, ScaleSearchNVFP4Experts)

    model = tiny_model("mixtral")
    config = ScaleSearchConfig(progress=False)
    quantize_(model, FqnToConfig({r"re:.*\.experts\.down_proj": config}), filter_fn=None)
    experts = model.model.layers[1].mlp.experts
    assert isinstance(experts.down_proj, ScaleSearchNVFP4Experts) and type(experts.gate_up_proj) is torch.nn.Parameter


def test_experts_stored_transposed_gpt_oss():
    """gpt-oss keeps its experts (experts, in, out), with biases: quantized along the input dimension, stored
    as the transposed view, and all three implementations run on them."""
    from transformers import GptOssConfig, GptOssForCausalLM

    config = GptOssConfig(
        hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        head_dim=64, vocab_size=256, num_local_experts=4, num_experts_per_tok=2,
        layer_types=["full_attention"] * 2, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    model = GptOssForCausalLM(config).eval()
    quantize_model(model, ScaleSearchConfig(activations=None, progress=False))
    weight = model.model.layers[0].mlp.experts.gate_up_proj
    assert isinstance(weight, ScaleSearchNVFP4Experts) and weight.transposed and weight.shape == (4, 128, 256)
    logits = _logits_by_implementation(model)
    assert torch.equal(logits["eager"], logits["batched_mm"]) and torch.equal(logits["eager"], logits["grouped_mm"])
    with torch.no_grad():
        dense = _dequantized_copy(model)(MOE_IDS).logits
    assert torch.allclose(logits["eager"], dense, rtol=0, atol=1e-4)


def test_experts_that_cannot_be_quantized_are_left_whole_and_named():
    from scalesearch_demo import tiny_model

    model = tiny_model("mixtral")
    with torch.no_grad():
        model.model.layers[1].mlp.experts.down_proj[2, 0, 0] = float("nan")
    summary = quantize_model(model, ScaleSearchConfig(progress=False))
    layer = model.model.layers[1].mlp.experts
    assert type(layer.gate_up_proj) is torch.nn.Parameter and type(layer.down_proj) is torch.nn.Parameter
    assert summary.skipped == {"down_proj: NaN or Inf in the weight": ["model.layers.1.mlp.experts"]}
    assert isinstance(model.model.layers[0].mlp.experts.down_proj, ScaleSearchNVFP4Experts)
