"""ScaleSearchConfig and its quantize_ handler: what is quantized and how, what is skipped and why, the
summary log line, the progress bar, serialisation of the config, and calibration importance."""

import logging

import pytest
import torch
from torchao.core.config import config_from_dict, config_to_dict
from torchao.quantization import FqnToConfig, quantize_

from scalesearch_compile import NVFP4ActivationKwargs, ScaleSearchConfig, ScaleSearchNVFP4Tensor, calibrate
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


def test_quantizes_what_it_can_and_logs_one_summary_line(caplog, capsys):
    net = _Net()
    untouched = {name: getattr(net, name).weight for name in ("ragged", "wide", "broken")}
    with caplog.at_level(logging.INFO, logger="scalesearch_compile"):
        quantize_(net, ScaleSearchConfig(exclude=["head"]))
    for name in ("up", "odd"):
        weight = getattr(net, name).weight
        assert isinstance(weight, ScaleSearchNVFP4Tensor)
        assert weight.act_quant_kwargs == NVFP4ActivationKwargs("search", (-2, 6))
    for name, weight in untouched.items():
        assert getattr(net, name).weight is weight
    assert type(net.head.weight) is torch.nn.Parameter
    (record,) = _records(caplog)
    assert record.levelno == logging.INFO
    message = record.getMessage()
    assert "2 of 6 layers to NVFP4 (method=search, activations=nvfp4, window=[-2, 6])" in message
    assert "skipped 4" in message and "in_features not a multiple of 16: ragged" in message
    assert "NaN or Inf in the weight: broken" in message
    assert "excluded: head" in message and "weight dtype torch.float64: wide" in message
    assert "scalesearch quantize_" in capsys.readouterr().err  # the tqdm bar
    assert net(torch.randn(3, 64)).shape == (3, 8)


def test_weight_only_and_method_and_window_are_recorded():
    net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 16))
    quantize_(net, ScaleSearchConfig(method="amax", activations=None, window=[0, 2], progress=False))
    assert all(m.weight.act_quant_kwargs is None for m in net)
    assert torch.equal(net[0].weight.qdata, quantize_weight(net[0].weight.dequantize(), "amax").qdata)
    assert "W4A16" in repr(net)

    net = torch.nn.Sequential(torch.nn.Linear(64, 32))
    quantize_(net, ScaleSearchConfig(method="four_over_six", window=[0, 2], progress=False))
    assert net[0].weight.act_quant_kwargs == NVFP4ActivationKwargs("four_over_six", (0, 2))


def test_second_run_skips_quantized_layers(caplog):
    net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 16))
    quantize_(net, ScaleSearchConfig(progress=False))
    qdata = net[0].weight.qdata
    with caplog.at_level(logging.INFO, logger="scalesearch_compile"):
        quantize_(net, ScaleSearchConfig(progress=False))
    assert net[0].weight.qdata is qdata
    assert "0 of 2 layers" in caplog.text and "weight already quantized (ScaleSearchNVFP4Tensor)" in caplog.text


def test_a_module_shared_by_two_parents_is_counted_twice(caplog):
    shared = torch.nn.Linear(32, 16)
    net = torch.nn.Module()
    net.a, net.b = torch.nn.Sequential(shared), torch.nn.Sequential(torch.nn.Linear(32, 32), shared)
    with caplog.at_level(logging.INFO, logger="scalesearch_compile"):
        quantize_(net, ScaleSearchConfig(progress=False))
    (record,) = _records(caplog)  # one line, after the last of quantize_'s three handler calls
    assert "2 of 3 layers" in record.getMessage()
    assert "weight already quantized (ScaleSearchNVFP4Tensor): a.0" in record.getMessage()


def test_a_single_layer_logs_at_debug_only(caplog, capsys):
    # transformers quantizes while loading by calling quantize_ once per layer: no bar or INFO line per layer
    with caplog.at_level(logging.DEBUG, logger="scalesearch_compile"):
        quantize_(torch.nn.Linear(32, 16), ScaleSearchConfig())
    (record,) = _records(caplog)
    assert record.levelno == logging.DEBUG and "1 of 1 layers" in record.getMessage()
    assert "scalesearch quantize_" not in capsys.readouterr().err


def test_fqn_to_config_quantizes_the_named_module():
    net = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.Linear(16, 16))
    quantize_(net, FqnToConfig({"1": ScaleSearchConfig(activations=None)}), filter_fn=None)
    assert type(net[0].weight) is torch.nn.Parameter
    assert isinstance(net[1].weight, ScaleSearchNVFP4Tensor) and net[1].weight.act_quant_kwargs is None


def test_custom_filter_reports_non_linear_modules(caplog):
    net = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.LayerNorm(16))
    with caplog.at_level(logging.INFO, logger="scalesearch_compile"):
        quantize_(net, ScaleSearchConfig(progress=False), filter_fn=lambda m, name: name in ("0", "1"))
    assert isinstance(net[0].weight, ScaleSearchNVFP4Tensor)
    assert "not an nn.Linear (LayerNorm): 1" in caplog.text


def test_calibration_importance_is_used_and_consumed():
    net = torch.nn.Sequential(torch.nn.Linear(64, 32))
    weight = net[0].weight.detach().clone()
    batches = [torch.randn(8, 64) * torch.linspace(0.01, 3.0, 64) for _ in range(2)]
    importance = calibrate(net, batches)["0"]
    quantize_(net, ScaleSearchConfig(activations=None, progress=False))
    assert not hasattr(net[0], IMPORTANCE_BUFFER)
    expected = quantize_weight(weight, "search", importance=importance)
    plain = quantize_weight(weight, "search")
    assert torch.equal(net[0].weight.scale.view(torch.uint8), expected.scale.view(torch.uint8))
    assert not torch.equal(expected.scale.view(torch.uint8), plain.scale.view(torch.uint8))


def test_config_round_trips_through_torchao_json():
    config = ScaleSearchConfig(method="exhaustive", activations=None, window=[-1, 3], exclude=["lm_head"])
    assert config_from_dict(config_to_dict(config)) == config


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "mse"}, "unknown method 'mse'"),
        ({"activations": "fp8"}, "activations must be 'nvfp4' or None"),
        ({"window": [3, -1]}, "empty search window"),
        ({"window": "wide"}, "window must be a pair"),
        ({"exclude": ["("]}, "exclude pattern '\\(' is not a regular expression"),
    ],
)
def test_bad_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ScaleSearchConfig(**kwargs)
