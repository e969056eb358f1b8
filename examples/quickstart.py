"""Quickstart: compile a sentence encoder with ``backend="scalesearch"``, amax against searched NVFP4 scales.

    python examples/quickstart.py                 # the built-in all-MiniLM-L6-v2 (no download, no GPU)
    python examples/quickstart.py --model PATH    # any local Hugging Face encoder

For each block-scale method the model is compiled with the "scalesearch" backend (linear layers W4A4 and
attention in NVFP4 where supported), and the table shows: the mean cosine of its sentence embeddings to the
float32 model's, the weight MSE reduction against amax scales, how many linear layers and attention calls the
backend rewrote, the compile time (first call), the median latency of a forward pass, eager float32 and
compiled, and the compiled latency over the baseline row's: the float32 model compiled with Inductor. On a CPU
the NVFP4 ops are traced into the compiled graph as their PyTorch references (scalesearch_compile.ops.lowering),
so Inductor fuses them. What the backend left as it was, and why, is logged above the table.
"""

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scalesearch_demo.py, beside the package
import scalesearch_demo  # noqa: E402, F401  (before torchao: quiets its import, keeps the hub offline)

# isort: split
import torch  # noqa: E402

import scalesearch_compile  # noqa: E402
from scalesearch_compile.search import quantize_blocks  # noqa: E402
from scalesearch_demo import (  # noqa: E402
    SENTENCES,
    compile_and_time,
    load_minilm,
    markdown_table,
    mean_cosine,
    median_ms,
    sentence_embeddings,
)


def load(path: str | None):
    if path is None:
        return load_minilm()
    from transformers import AutoModel, AutoTokenizer

    batch = AutoTokenizer.from_pretrained(path)(SENTENCES, padding=True, return_tensors="pt")
    return AutoModel.from_pretrained(path, attn_implementation="sdpa").eval(), batch


def weight_mse(model: torch.nn.Module, method: str) -> float:
    """Mean squared NVFP4 error over the weights of the linear layers the backend can quantize."""
    total = count = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.in_features % 16 == 0:
            w = module.weight.detach()
            total += (quantize_blocks(w, method).dequantize() - w).double().square().sum().item()
            count += w.numel()
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="local Hugging Face model path (default: the packaged all-MiniLM-L6-v2)")
    parser.add_argument("--repeats", type=int, default=5, help="timed forward passes per row")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    model, batch = load(args.model)
    reference = sentence_embeddings(model, batch)
    eager_ms = median_ms(lambda: sentence_embeddings(model, batch), args.repeats)
    amax_mse = weight_mse(model, "amax")

    rows, baseline_ms = [], None
    for label, method in [("float32, inductor", None), ("NVFP4 amax", "amax"), ("NVFP4 search", "search")]:
        backend = "inductor" if method is None else scalesearch_compile.backend(method=method)
        run = compile_and_time(model, lambda m: sentence_embeddings(m, batch), backend, args.repeats)
        baseline_ms = baseline_ms or run.latency_ms  # the float32 Inductor row comes first
        rows.append(
            (
                label,
                f"{mean_cosine(run.output, reference):.4f}",
                "-" if method is None else f"{100 * (1 - weight_mse(model, method) / amax_mse):.1f}%",
                "-" if method is None else str(backend.rewritten("linear")),
                "-" if method is None else str(backend.rewritten("attention")),
                f"{run.compile_s:.1f}",
                f"{eager_ms:.1f}",
                f"{run.latency_ms:.1f}",
                f"{run.latency_ms / baseline_ms:.2f}x",
            )
        )

    name = args.model or "all-MiniLM-L6-v2"
    print(f"\n{name}, {len(SENTENCES)} sentences, {torch.get_num_threads()} CPU threads")
    header = (
        "model",
        "cosine to fp32",
        "weight MSE vs amax",
        "linears rewritten",
        "attention rewritten",
        "compile s",
        "eager fp32 ms",
        "compiled ms",
        "compiled / fp32 inductor",
    )
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
