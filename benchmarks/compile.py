"""Compile time and compiled latency: ``backend="scalesearch"`` against ``backend="inductor"``.

    python benchmarks/compile.py [--models llama qwen2 bert minilm] [--repeats 5]

Each model is compiled from a clean Dynamo cache with Inductor's on-disk caches off (so every compile is a
cold one), first with plain Inductor on the unquantized model, then with the scalesearch backend (search
scales, W4A4 linears, NVFP4 attention where supported), in this process. Compile time is the first call's
wall time; latency the median of ``--repeats`` calls after it. Ratios are scalesearch / inductor.
On a CPU the NVFP4 ops run their PyTorch reference (dequantize, then an fp32 matmul), so they are slower than
fp32; the point of this script on a CPU is the compile-time overhead of the passes.
"""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scalesearch_demo.py, beside the package
import scalesearch_demo  # noqa: E402, F401  (before torchao: quiets its import, keeps the hub offline)

# isort: split

os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")

import torch  # noqa: E402

import scalesearch_compile  # noqa: E402
from scalesearch_demo import compile_and_time, load_minilm, markdown_table, tiny_model  # noqa: E402


def workload(name: str):
    """(model, run) where run(model) is one forward pass on a fixed batch."""
    if name == "minilm":
        model, batch = load_minilm()
        return model, lambda m: m(**batch).last_hidden_state
    model = tiny_model(name)
    ids = torch.randint(0, 256, (4, 128), generator=torch.Generator().manual_seed(0))
    if name == "bert":
        return model, lambda m: m(input_ids=ids).last_hidden_state
    return model, lambda m: m(input_ids=ids).logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["llama", "qwen2", "bert", "minilm"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    print(f"{torch.get_num_threads()} CPU threads, Inductor caches off")
    header = ("model", "inductor compile s", "scalesearch compile s", "compile ratio")
    header += ("inductor ms", "scalesearch ms", "latency ratio", "linears / attention rewritten")
    rows = []
    for name in args.models:
        model, run = workload(name)
        base = compile_and_time(model, run, "inductor", args.repeats)
        backend = scalesearch_compile.backend()
        ours = compile_and_time(model, run, backend, args.repeats)
        cells = (
            name,
            f"{base.compile_s:.1f}",
            f"{ours.compile_s:.1f}",
            f"{ours.compile_s / base.compile_s:.2f}",
            f"{base.latency_ms:.1f}",
            f"{ours.latency_ms:.1f}",
            f"{ours.latency_ms / base.latency_ms:.2f}",
            f"{backend.rewritten('linear')} / {backend.rewritten('attention')}",
        )
        rows.append(cells)
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
