"""calibrate(): per-input-channel mean of x**2 of every nn.Linear's inputs, attached as a buffer;
input_statistics(): the same and the input amax, padding left out, and per expert of a mixture of experts."""

import pytest
import torch

from scalesearch_compile import calibrate
from scalesearch_compile.calibration import IMPORTANCE_BUFFER


class _Pair(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(16, 32)
        self.b = torch.nn.Linear(32, 16)

    def forward(self, x, scale=1.0):
        return self.b(self.a(x) * scale)


def test_mean_square_per_input_channel_over_all_batches_and_forms():
    torch.manual_seed(0)
    model = _Pair()
    xs = [torch.randn(2, 3, 16), torch.randn(5, 16), torch.randn(4, 16)]
    batches = [xs[0], (xs[1], 2.0), {"x": xs[2]}]
    importance = calibrate(model, batches)
    rows = torch.cat([x.reshape(-1, 16) for x in xs])
    assert torch.allclose(importance["a"], rows.square().mean(dim=0))
    with torch.no_grad():
        hidden = torch.cat([model.a(xs[0]).reshape(-1, 32), model.a(xs[1]) * 2.0, model.a(xs[2])])
    assert torch.allclose(importance["b"], hidden.square().mean(dim=0), rtol=1e-5)
    assert torch.equal(getattr(model.a, IMPORTANCE_BUFFER), importance["a"])
    assert IMPORTANCE_BUFFER not in "".join(model.state_dict())  # non-persistent: never saved
    assert not model.a._forward_pre_hooks  # hooks removed


def test_no_batches_is_an_error():
    with pytest.raises(ValueError, match="saw no input"):
        calibrate(_Pair(), [])


def test_padding_is_left_out_and_the_input_amax_is_kept():
    from scalesearch_compile.calibration import input_statistics

    class Tagged(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(16, 8)

        def forward(self, x, attention_mask=None):
            return self.proj(x)

    x = torch.randn(2, 5, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    x[0, 3:] = 1000.0  # padding positions: must not count
    (stats,) = input_statistics(Tagged(), [{"x": x, "attention_mask": mask}]).values()
    real = x[mask.bool()]
    assert stats.rows == 8
    assert torch.allclose(stats.mean_square(), real.square().mean(0))
    assert stats.amax == real.abs().amax()


def test_experts_inputs_are_recorded_per_expert_from_the_tokens_routed_to_it():
    from scalesearch_compile.calibration import expert_key, input_statistics
    from scalesearch_demo import tiny_model

    model = tiny_model("mixtral")
    experts = model.model.layers[1].mlp.experts
    seen = {}
    handle = experts.register_forward_pre_hook(lambda module, args: seen.update(x=args[0], index=args[1]))
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, 6:] = 0  # padding: its tokens are routed too, but must not count
    batch = {"input_ids": ids, "attention_mask": mask}
    try:
        stats = input_statistics(model, [batch])
    finally:
        handle.remove()
    size = experts.down_proj.shape[-1]
    rows = 0
    for e in range(4):
        routed = (seen["index"] == e).any(dim=-1) & mask.reshape(-1).bool()
        x = seen["x"][routed]
        gate, up = experts.gate_up_proj[e, :size], experts.gate_up_proj[e, size:]  # gate_up_proj: cat(gate, up)
        h = torch.nn.functional.silu(x @ gate.T) * (x @ up.T)  # Mixtral's act_fn(gate) * up
        first = stats[expert_key("model.layers.1.mlp.experts", e, "gate_up_proj")]
        second = stats[expert_key("model.layers.1.mlp.experts", e, "down_proj")]
        assert first.rows == second.rows == x.shape[0] > 0
        assert torch.equal(first.amax, x.abs().amax()) and torch.allclose(first.mean_square(), x.square().mean(0))
        assert torch.allclose(second.amax, h.abs().amax(), rtol=1e-5)
        assert torch.allclose(second.mean_square(), h.square().mean(0), rtol=1e-4, atol=1e-12)
        rows += x.shape[0]
    assert rows == 2 * int(mask.sum())  # each real token is routed to 2 experts
    importance = calibrate(model, [batch])  # attaches to linear layers only
    assert set(importance) == {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
