"""Inputs and checks shared by the tests of the quantize kernels (Triton, C) against ``search.quantize_blocks``."""

import torch

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
