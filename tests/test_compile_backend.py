"""The "scalesearch" backend end to end: entry point, fullgraph with Inductor, dynamic shapes, options."""

import copy
import subprocess
import sys
import textwrap

import pytest
import torch
from torchao.quantization import quantize_

from scalesearch_compile import ScaleSearchConfig
from scalesearch_compile.compile_backend import BackendOptions, backend
from scalesearch_demo import tiny_model

# linear layers and attention calls of the tiny models (2 layers each)
# bert: 6 a layer and the pooler; gpt2: 4 Conv1D (torch.addmm on a (in, out) weight) a layer and lm_head
EXPECTED = {"llama": (15, 2), "qwen2": (15, 2), "bert": (13, 2), "gpt2": (9, 2)}


def inputs(name, batch=2, seq=24):
    ids = torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(batch * 100 + seq))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def first_output(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", EXPECTED)
def test_fullgraph_rewrites_everything_and_matches_the_same_ops_run_eagerly(name):
    model = tiny_model(name)
    batch = inputs(name)
    compiled_backend = backend()
    eager_backend = backend(inductor=False)
    with torch.no_grad():
        compiled = first_output(torch.compile(model, backend=compiled_backend, fullgraph=True)(**batch))
        torch._dynamo.reset()
        eager = first_output(torch.compile(model, backend=eager_backend, fullgraph=True)(**batch))
        full = first_output(model(**batch))
    linears, attention = EXPECTED[name]
    assert compiled_backend.rewritten("linear") == linears
    assert compiled_backend.rewritten("attention") == attention
    # Inductor fuses the float ops around the NVFP4 ones; a last-bit difference can move an activation
    # across an E2M1 rounding boundary, so the two agree closely but not bit for bit.
    assert relative_error(compiled, eager) < 2e-3
    assert relative_error(compiled, full) < 0.3  # and it is still the model


def test_plain_and_quantized_models_compile_to_the_same_numbers():
    model = tiny_model("llama")
    quantized = copy.deepcopy(model)
    quantize_(quantized, ScaleSearchConfig(progress=False))  # search, W4A4: the backend's defaults
    batch = inputs("llama")
    plain_backend, quantized_backend = backend(attention=False), backend(attention=False)
    with torch.no_grad():
        from_plain = torch.compile(model, backend=plain_backend, fullgraph=True)(**batch).logits
        torch._dynamo.reset()
        from_quantized = torch.compile(quantized, backend=quantized_backend, fullgraph=True)(**batch).logits
    assert plain_backend.rewritten("linear") == quantized_backend.rewritten("linear") == 15
    assert relative_error(from_plain, from_quantized) < 2e-3


def test_dynamic_shapes_compile_at_most_twice():
    model = tiny_model("qwen2")
    b = backend()
    compiled = torch.compile(model, backend=b, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for batch, seq in [(1, 8), (2, 24), (3, 40), (1, 70), (4, 16)]:
            out = compiled(**inputs("qwen2", batch, seq)).logits
            assert out.shape == (batch, seq, 256)
    assert 1 <= b.compilations() <= 2


def test_entry_point_works_in_a_fresh_interpreter():
    script = textwrap.dedent(
        """
        import logging, sys, torch
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
        model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
        assert "scalesearch_compile" not in sys.modules
        out = torch.compile(model, backend="scalesearch", options={"method": "amax"})(torch.randn(4, 64))
        print("shape", tuple(out.shape))
        """
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "linear: rewrote 2 of 2" in run.stdout and "shape (4, 16)" in run.stdout


@pytest.mark.parametrize(
    "options,message",
    [
        ({"bogus": 1}, r"unknown scalesearch backend option\(s\) \['bogus'\]"),
        ({"method": "mse"}, "unknown method 'mse'"),
        ({"window": (4, 1)}, "empty search window"),
        ({"activations": "int8"}, "activations must be 'nvfp4'"),
        ({"impl": "cuda"}, "unknown impl 'cuda'"),
        ({"skip_modules": "lm_head"}, "skip_modules: module patterns must be a list"),
        ({"skip_modules": ["re:["]}, "is not a regular expression"),
        ({"inductor": "no"}, "inductor must be True or False"),
        ({"window": (-1.5, 2)}, "pair of integer code offsets"),
        ({"skip_shapes": [(1, 2, 3)]}, "skip_shapes must be"),
        ({"attention": "yes"}, "attention must be True, False or an AttentionRecipe"),
        ({"activation_method": "best"}, "activation_method: unknown method 'best'"),
    ],
)
def test_bad_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        backend(**options)
    with pytest.raises(ValueError, match=message):
        BackendOptions.from_dict(options)


def test_run_time_quantization_runs_search_as_fast_search_unless_asked():
    """Weights keep the method; activations (quantized every forward) take fast_search for search, and P (every
    KV tile) four_over_six."""
    default = BackendOptions()
    assert default.linear_policy().scales.method == "search"
    assert default.linear_policy().act_quant_kwargs.method == "fast_search"
    assert (default.attention_recipe().method, default.attention_recipe().p_method) == ("search", "four_over_six")
    amax = BackendOptions(method="amax")
    assert amax.linear_policy().act_quant_kwargs.method == "amax" and amax.attention_recipe().p_method == "amax"
    assert BackendOptions(activation_method="search").linear_policy().act_quant_kwargs.method == "search"


def test_bad_options_fail_at_compile_time_through_torch_compile():
    compiled = torch.compile(torch.nn.Linear(16, 16), backend="scalesearch", options={"bogus": 1})
    with pytest.raises(Exception, match="unknown scalesearch backend option"):
        compiled(torch.randn(2, 16))


@pytest.mark.parametrize("inductor", [False, True])
def test_weights_that_train_are_requantized_on_every_call(inductor):
    """With grad mode on and weights that require grad, the backend quantizes each weight from its current value
    on every call and passes the gradient straight through to it: SGD steps change the weights and lower the
    loss (a compile-time snapshot would leave weight.grad None)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 16))
    x, y = torch.randn(64, 32), torch.randn(64, 16)
    compiled_backend = backend(inductor=inductor)
    compiled = torch.compile(model, backend=compiled_backend)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model[0].weight.detach().clone()
    losses = []
    for _ in range(6):
        loss = torch.nn.functional.mse_loss(compiled(x), y)
        optimizer.zero_grad()
        loss.backward()
        assert model[0].weight.grad is not None and model[2].weight.grad.abs().sum() > 0
        optimizer.step()
        losses.append(loss.item())
    assert not torch.equal(model[0].weight, before)
    assert losses == sorted(losses, reverse=True) and losses[-1] < losses[0], losses
    (report,) = compiled_backend.reports[0].passes[:1]
    assert report.rewritten == [f"{i}.weight (trains: re-quantized on every call)" for i in (0, 2)]
    # the forward is the NVFP4 linear of the weights as they are now
    with torch.no_grad():
        frozen = torch.compile(model, backend=backend(inductor=False))(x)
    torch.testing.assert_close(compiled(x).detach(), frozen, rtol=1e-5, atol=1e-5)
