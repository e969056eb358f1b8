"""calibrate(): per-input-channel mean of x**2 of every nn.Linear's inputs, attached as a buffer."""

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
