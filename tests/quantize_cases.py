"""Inputs and checks shared by the tests of the quantize kernels (Triton, C++) against ``search.quantize_blocks``:
``check(x, method, **kwargs)`` is a test module's own comparison of its kernel with the reference."""

import torch

from scalesearch_compile.search import ScaleChoice, quantize_blocks

FIELDS = ("qdata", "scale_codes", "offsets")


def assert_same_blocks(got, ref):
    for field in FIELDS:
        g, r = getattr(got, field).cpu(), getattr(ref, field)
        assert g.dtype == r.dtype and g.shape == r.shape, field
        mismatches = (g != r).sum().item()
        assert mismatches == 0, f"{field}: {mismatches} of {r.numel()} differ"
    if ref.per_tensor_scale is None:
        assert got.per_tensor_scale is None
    else:
        assert torch.equal(got.per_tensor_scale.cpu(), ref.per_tensor_scale)


def ragged_input(dtype, rows=37, k=144, seed=0):
    """Rows not a multiple of the row tile, K = 128 + 16 (a partial column tile), a 1e-4..1e4 spread of scales."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g) * torch.logspace(-4, 4, k)[torch.randperm(k, generator=g)]
    return x.to(dtype)


def edge_input():
    """Blocks that hit ties and limits: zeros, -0.0, constants, E2M1 midpoints, near 448*6, subnormal scales."""
    block = torch.arange(16, dtype=torch.float32)
    rows = [
        torch.zeros(16),
        -torch.zeros(16),
        torch.full((16,), 3.0),
        torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * 2),  # E2M1 ties at scale 1
        torch.tensor([-6.0, 6.0] + [0.0] * 14),
        block * 2688.0 / 15,  # block amax 2688: scale 448 without a global scale, so positive offsets overflow
        (block - 8) * 1e-3,  # tiny: amax code clamps to 8 without a global scale, offsets -2 and -1 are subnormal
        torch.tensor([1e-30] * 15 + [-1.0]),
    ]
    return torch.stack(rows).repeat(1, 2)  # (8, 32)


def overflowing_errors_case(check, method):
    """Single-level, 3e38 beside ordinary values: every candidate's block error overflows float32 to inf, so none
    is strictly better and the amax code (448) stays, with its own E2M1 values (1000 / 448 rounds to 2)."""
    x = torch.tensor([3e38, 1000.0, -500.0, 100.0] * 4).repeat(2, 1)
    ref = check(x, method, per_tensor_scale=None)
    assert (ref.scale_codes == 126).all() and (ref.offsets == 0).all()
    assert torch.equal(ref.dequantize()[0, :4], torch.tensor([2688.0, 896.0, -448.0, 0.0]))


def windows_case(check, window):
    """A search window: the kernel agrees with the reference, and every chosen offset lies inside the window."""
    ref = check(ragged_input(torch.float32, rows=9, k=64), ScaleChoice("search", window))
    chosen = ref.offsets[ref.offsets != 0]
    assert chosen.numel() == 0 or (chosen.min() >= window[0] and chosen.max() <= window[1])


def importance_weighted_case(check, method):
    """An importance-weighted search: the kernel agrees with the reference; a block of zero weight keeps its amax
    code, and the weights change choices."""
    x = ragged_input(torch.float32, rows=6, k=80)
    importance = torch.rand(80, generator=torch.Generator().manual_seed(2)) ** 4  # spread over 4 decades
    importance[:16] = 0.0  # a block whose error counts for nothing: every candidate ties, the amax code stays
    weighted = check(x, method, importance=importance)
    assert (weighted.offsets[:, 0] == 0).all()
    assert not torch.equal(weighted.offsets, quantize_blocks(x, method).offsets)
