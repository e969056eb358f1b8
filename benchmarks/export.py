"""Memory and speed of ``scalesearch-export`` (weight-only, no calibration: the streaming path) on a generated
checkpoint of random bf16 weights in several shards, searched scales against ``--method amax``.

    python benchmarks/export.py [--gigabytes 1.2] [--shards 6] [--keep DIR]

The checkpoint is a Llama-shaped model (hidden 2048, MLP 5632, 32000 tokens) with as many layers as reach
``--gigabytes``; each export runs in a fresh process. Printed per method: wall time and time per GB of input, and
peak resident memory above the process's resident memory once its imports are done, as a multiple of the
largest input shard and of the whole checkpoint.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scalesearch_demo.py, beside the package
import scalesearch_demo  # noqa: E402, F401  (before torchao: quiets its import, keeps the hub offline)

# isort: split
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from scalesearch_demo import markdown_table  # noqa: E402

HIDDEN, MLP, VOCAB = 2048, 5632, 32000

# Run in the child: measure the resident memory after the imports, export, report the high-water mark.
CHILD = """
import json, sys, time
import scalesearch_compile
from scalesearch_compile import export_checkpoint
def rss_kib(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the high-water mark to the current resident set
base = rss_kib("VmRSS")
start = time.perf_counter()
summary = export_checkpoint(sys.argv[1], sys.argv[2], method=sys.argv[3], progress=False)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "extra_kib": rss_kib("VmHWM") - base, "bytes_out": summary.bytes_out,
                  "reduction": summary.error_reduction()}))
"""


def layer_tensors(layer: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    prefix = f"model.layers.{layer}"
    shapes = {f"self_attn.{p}_proj": (HIDDEN, HIDDEN) for p in "qkvo"}
    shapes |= {"mlp.gate_proj": (MLP, HIDDEN), "mlp.up_proj": (MLP, HIDDEN), "mlp.down_proj": (HIDDEN, MLP)}
    tensors = {f"{prefix}.{n}.weight": torch.randn(shape, generator=generator) * 0.02 for n, shape in shapes.items()}
    tensors |= {f"{prefix}.{n}.weight": torch.ones(HIDDEN) for n in ("input_layernorm", "post_attention_layernorm")}
    return {name: t.to(torch.bfloat16) for name, t in tensors.items()}


def make_checkpoint(directory: Path, gigabytes: float, shards: int) -> tuple[int, int]:
    """Write the checkpoint; return (its size, its largest shard's size) in bytes."""
    from transformers import LlamaConfig

    per_layer = 2 * (4 * HIDDEN * HIDDEN + 3 * HIDDEN * MLP)
    layers = max(1, round((gigabytes * 1e9 - 4 * VOCAB * HIDDEN) / per_layer))
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=layers,
        num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False, dtype="bfloat16",
    )  # fmt: skip
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(directory)
    generator = torch.Generator().manual_seed(0)
    groups = [list(range(layers))[i::shards] for i in range(shards)]
    weight_map = {}
    for index, group in enumerate(groups):
        tensors = {}
        for layer in sorted(group):
            tensors |= layer_tensors(layer, generator)
        if index == 0:
            tensors["model.embed_tokens.weight"] = (torch.randn(VOCAB, HIDDEN, generator=generator) * 0.02).bfloat16()
            tensors["model.norm.weight"] = torch.ones(HIDDEN, dtype=torch.bfloat16)
        if index == shards - 1:
            tensors["lm_head.weight"] = (torch.randn(VOCAB, HIDDEN, generator=generator) * 0.02).bfloat16()
        name = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        save_file(tensors, directory / name, metadata={"format": "pt"})
        weight_map |= {tensor: name for tensor in tensors}
        del tensors
    files = sorted(directory.glob("*.safetensors"))
    total = sum(f.stat().st_size for f in files)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return total, max(f.stat().st_size for f in files)


def export(model_dir: Path, out_dir: Path, method: str) -> dict:
    """Export in a fresh process; its measurements."""
    argv = [sys.executable, "-c", CHILD, str(model_dir), str(out_dir), method]
    run = subprocess.run(argv, capture_output=True, text=True, check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gigabytes", type=float, default=1.2, help="checkpoint size to generate")
    parser.add_argument("--shards", type=int, default=6)
    parser.add_argument("--keep", help="directory to work in (default: a temporary one, removed)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.keep or scratch)
        model_dir = root / "checkpoint"
        model_dir.mkdir(parents=True, exist_ok=True)
        total, largest = make_checkpoint(model_dir, args.gigabytes, args.shards)
        print(f"checkpoint: {total / 1e9:.2f} GB in {args.shards} shards, largest {largest / 1e6:.0f} MB, bf16\n")
        rows = []
        for method in ("amax", "search"):
            result = export(model_dir, root / f"export-{method}", method)
            extra = result["extra_kib"] * 1024
            rows.append(
                (
                    method,
                    f"{result['seconds']:.1f}",
                    f"{result['seconds'] / (total / 1e9):.1f}",
                    f"{extra / 1e6:.0f}",
                    f"{extra / largest:.2f}",
                    f"{extra / total:.2f}",
                    f"{result['bytes_out'] / 1e9:.2f}",
                    f"{100 * result['reduction']:.1f}%",
                )
            )
        header = ("method", "s", "s per GB", "peak extra MB", "x largest shard", "x checkpoint", "GB out",
                  "weight error vs amax")  # fmt: skip
        print(markdown_table(header, rows))
        amax_s, search_s = (float(row[1]) for row in rows)
        print(f"\nsearch / amax time: {search_s / amax_s:.2f}x")


if __name__ == "__main__":
    main()
