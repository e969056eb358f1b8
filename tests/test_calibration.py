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
