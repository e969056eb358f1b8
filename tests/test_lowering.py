"""The CPU lowering (ops.lowering): compiled CPU graphs run the linear reference traced in, not the opaque op, with
the eager numbers, in every mode, through plain Inductor (quantize_) and through the "scalesearch" backend."""

import gc

import pytest
import torch
from torch._inductor.utils import run_and_get_code
from torchao.quantization import quantize_

import scalesearch_compile
import scalesearch_compile.ops.lowering
from scalesearch_compile import ScaleSearchConfig
from scalesearch_compile.ops.dispatch import lowers
from scalesearch_compile.ops.lowering import SharedQuantization, applies, lowered_functions
from scalesearch_compile.stamp import source_stamp

# how the generated wrapper calls an op (provenance comments name the lowered op too)
LINEAR, QUANTIZE = "torch.ops.scalesearch.nvfp4_linear", "torch.ops.scalesearch.fake_quantize_nvfp4.default("


def compiled_run(fn, *args):
    """``fn(*args)`` and the code Inductor generated for it."""
    with torch.no_grad():
        out, code = run_and_get_code(fn, *args)
    return out, "\n".join(code)


def assert_lowered(code: str, activations: str | None):
    """The compiled graph calls no linear op (its reference is traced in, weight decode and all); only W4A4 calls
    the activations' quantization, one op call a layer."""
    assert code, "nothing was compiled"
    assert LINEAR not in code
    calls = code.count(QUANTIZE)
    assert calls == (0 if activations is None else 2), calls


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(64, 96), torch.nn.Linear(96, 32)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


MODES = {
    "W4A16 amax": dict(method="amax", activations=None),
    "W4A16 search": dict(method="search", activations=None),
    "W4A4 amax": dict(method="amax", activations="nvfp4"),
    "W4A4 search": dict(method="search", activations="nvfp4"),
}


@pytest.mark.parametrize("mode", MODES)
def test_compiled_quantized_model_matches_eager_in_every_mode(mode):
    torch.manual_seed(0)
    model = MLP().eval()
    quantize_(model, ScaleSearchConfig(progress=False, **MODES[mode]))
    x = torch.randn(2, 24, 64)
    with torch.no_grad():
        eager = model(x)
    compiled, code = compiled_run(torch.compile(model, fullgraph=True), x)  # plain Inductor
    assert_lowered(code, MODES[mode]["activations"])
    # the same float32 operations; only the matmul may add in another order
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activations", ["nvfp4", None])
def test_backend_lowers_the_linear_ops_it_inserts(activations):
    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(2, 24, 64)
    with torch.no_grad():
        eager = torch.compile(model, backend=scalesearch_compile.backend(activations=activations, inductor=False))(x)
        torch._dynamo.reset()
        b = scalesearch_compile.backend(activations=activations)
        compiled, code = compiled_run(torch.compile(model, backend=b, fullgraph=True), x)
    assert b.rewritten("linear") == 2
    assert_lowered(code, activations)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


class SharedInput(torch.nn.Module):
    """Three projections of one input, as an attention layer's q, k and v."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(64, 32) for _ in range(3))

    def forward(self, x):
        return self.q(x) * self.k(x) + self.v(torch.relu(x))  # v's input differs


def test_the_backend_quantizes_shared_activations_once():
    """q and k quantize the same activations: one op call serves both (v's input is another tensor), with the
    outputs of the unmerged graph."""
    torch.manual_seed(0)
    model, x = SharedInput().eval(), torch.randn(2, 24, 64)
    with torch.no_grad():
        unmerged = torch.compile(model, backend=scalesearch_compile.backend(inductor=False))(x)
        torch._dynamo.reset()
        b = scalesearch_compile.backend()
        compiled, code = compiled_run(torch.compile(model, backend=b, fullgraph=True), x)
    assert b.rewritten("linear") == 3 and code.count(QUANTIZE) == 2 and LINEAR not in code
    torch.testing.assert_close(compiled, unmerged, rtol=1e-5, atol=1e-5)


def test_a_quantized_model_under_plain_compile_quantizes_shared_activations_once():
    """``quantize_`` + plain ``torch.compile``: the trace of q and k quantizes their shared activations once, v's
    other input separately, with eager's outputs."""
    torch.manual_seed(0)
    model, x = SharedInput().eval(), torch.randn(2, 24, 64)
    quantize_(model, ScaleSearchConfig(progress=False))
    with torch.no_grad():
        eager = model(x)
    for dynamic in (False, True):  # symbolic sizes: the same expression, the same activation
        torch._dynamo.reset()
        compiled, code = compiled_run(torch.compile(model, fullgraph=True, dynamic=dynamic), x)
        assert code.count(QUANTIZE) == 2 and LINEAR not in code
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_traced_quantizations_are_shared_only_for_the_same_activation_and_choice(monkeypatch):
    """What :class:`_TracedQuantizations` takes as the same quantization: the same storage, offset, shape, strides,
    dtype and version, scale choice and impl; anything else quantizes anew."""
    from scalesearch_compile.ops import linear
    from scalesearch_compile.search import DEFAULT_SCALES, ScaleChoice

    calls = []
    monkeypatch.setattr(linear, "_activation_by_op", lambda rows, act, impl: calls.append(impl) or object())
    traced = linear._TracedQuantizations()
    x = torch.randn(8, 64)

    def quantize(source, scales=DEFAULT_SCALES, impl="auto"):
        return traced.quantize(source.float(), scales, source, impl)

    first = quantize(x)
    assert quantize(x.view(8, 64)) is first and quantize(x[:]) is first and len(calls) == 1  # views alike
    other = [
        quantize(x.clone()),  # another storage
        quantize(x[:4]),  # another shape
        quantize(x.view(4, 128)[:, :64]),  # another stride
        quantize(x, ScaleChoice("amax")),
        quantize(x, impl="reference"),
    ]
    assert len(calls) == 6 and all(o is not first for o in other)
    x.add_(1)  # an in-place change moves the version
    assert quantize(x) is not first and len(calls) == 7
    assert len(traced.by_storage[x.untyped_storage()]) == 1  # older versions are dropped
    del x, other
    gc.collect()
    assert len(traced.by_storage) == 0  # entries go with their storage


def test_the_lowering_steps_aside_where_the_op_would_not_run_its_reference():
    x = torch.randn(4, 32)
    assert not lowers("linear", x, "auto")  # a real tensor: eager keeps calling the op
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fake = mode.from_tensor(x)
        assert lowers("linear", fake, "auto") and lowers("linear", fake, "reference")
        assert not lowers("linear", mode.from_tensor(torch.empty(4, 32, device="meta")), "auto")
    assert set(lowered_functions()) == {torch.ops.scalesearch.nvfp4_linear.default}
    assert applies([x, 3], "auto") and applies([x], "reference")
    assert not applies([x, torch.empty(2, device="meta")], "auto")
    trained = torch.nn.Parameter(torch.randn(2))  # a gradient wanted: the op keeps its straight-through backward
    assert not applies([x, trained], "auto")
    with torch.no_grad():
        assert applies([x, trained], "auto")


def test_the_backend_keeps_the_op_where_the_lowering_does_not_apply(monkeypatch):
    """A graph the lowering does not apply to (here: forced) compiles with the op opaque, as before."""
    monkeypatch.setattr(scalesearch_compile.ops.lowering, "applies", lambda *args: False)
    torch.manual_seed(0)
    model, x = MLP().eval(), torch.randn(2, 24, 64)
    compiled, code = compiled_run(torch.compile(model, backend=scalesearch_compile.backend(activations=None)), x)
    assert LINEAR + ".default(" in code


def test_cache_keys_cover_the_traced_source(monkeypatch):
    assert len(source_stamp()) == 32
    assert SharedQuantization(True).uuid() == f"{source_stamp()}-lowered" != SharedQuantization(False).uuid()
    w = scalesearch_compile.tensor.quantize_weight(torch.randn(32, 64))
    key = w._stable_hash_for_caching()
    monkeypatch.setattr(scalesearch_compile.tensor, "source_stamp", lambda: "another source")
    assert w._stable_hash_for_caching() != key
