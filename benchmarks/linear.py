"""Forward time of models whose linear layers are quantized with ``quantize_(model, ScaleSearchConfig(...))``,
eager and under ``torch.compile``, on the CPU (their accuracy: ``benchmarks/accuracy.py``).

    python benchmarks/linear.py [--repeats 10] [--no-compile]

Models: the real all-MiniLM-L6-v2 encoder (16 sentences, padded) and a small random Llama built from a config
(4 layers, hidden 512, batch 4 x 64 tokens). Times are the fastest of ``--repeats`` forward passes under
``torch.no_grad`` after two warm-up passes (which also compile), every variant of a model, eager and
compiled, timed round-robin in the same rounds, and printed with their ratios to the float32 model and to
torchao's ``NVFP4WeightOnlyConfig`` (amax scales, dequantize-then-matmul) in the same mode; a ratio above 1
is slower; a last line gives the compiled ratios issue 14 targets. ``torch.compile`` is the default Inductor
backend, which on a CPU gets the NVFP4 references traced into the graph (``scalesearch_compile.ops.lowering``).
"""

import argparse
import copy
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scalesearch_demo.py, beside the package
import scalesearch_demo  # noqa: E402, F401  (before torchao: quiets its import, keeps the hub offline)

# isort: split
import torch  # noqa: E402
from torchao.prototype.mx_formats.inference_workflow import NVFP4WeightOnlyConfig  # noqa: E402
from torchao.quantization import quantize_  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from scalesearch_compile import ScaleSearchConfig  # noqa: E402
from scalesearch_demo import load_minilm  # noqa: E402

VARIANTS = {
    "float32": None,
    "torchao NVFP4WeightOnly": NVFP4WeightOnlyConfig(),
    "W4A16 search": ScaleSearchConfig(activations=None, progress=False),
    "W4A4 amax": ScaleSearchConfig(method="amax", progress=False),
    "W4A4 search": ScaleSearchConfig(progress=False),
}


def minilm():
    """The float32 all-MiniLM-L6-v2 encoder and the tokenized ``scalesearch_demo.SENTENCES``."""
    model, batch = load_minilm()
    return model, dict(batch)


def small_llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=4096,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=256,
    )
    ids = torch.randint(0, config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))
    return LlamaForCausalLM(config).eval(), {"input_ids": ids}


def quantized(model, config):
    model = copy.deepcopy(model)
    if config is not None:
        quantize_(model, config)
    return model


@torch.no_grad()
def interleaved_min_ms(models: dict, inputs, repeats: int) -> dict:
    """Fastest forward ms of each model, timed round-robin (one pass of each per round) so that load from other
    processes falls on all of them alike; the minimum, not the median, because on the shared 2-core CI machine
    other jobs' bursts inflate whole runs of rounds (medians of the same model moved 3x between runs)."""
    for model in models.values():
        for _ in range(2):  # warm-up; compiles a torch.compile'd model
            model(**inputs)
    times = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            start = time.perf_counter()
            model(**inputs)
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * min(t) for name, t in times.items()}


def time_model(name, model, inputs, repeats: int, compile_too: bool) -> None:
    eager = {variant: quantized(model, config) for variant, config in VARIANTS.items()}
    models = {(variant, "eager"): m for variant, m in eager.items()}
    if compile_too:
        models |= {(variant, "compiled"): torch.compile(m) for variant, m in eager.items()}
    ms = interleaved_min_ms(models, inputs, repeats)
    ms |= {(variant, "compiled"): float("nan") for variant in eager if not compile_too}
    print(f"\n{name}: fastest forward ms of {repeats} rounds and ratios (above 1: slower)")
    print("| variant | eager ms | compiled ms | eager/fp32 | compiled/fp32 | eager/torchao | compiled/torchao |")
    print("|---|---|---|---|---|---|---|")
    for variant in eager:
        e, c = ms[(variant, "eager")], ms[(variant, "compiled")]
        base = ms[("float32", "eager")], ms[("float32", "compiled")]
        torchao = ms[("torchao NVFP4WeightOnly", "eager")], ms[("torchao NVFP4WeightOnly", "compiled")]
        print(
            f"| {variant} | {e:.1f} | {c:.1f} | {e / base[0]:.2f}x | {c / base[1]:.2f}x "
            f"| {e / torchao[0]:.2f}x | {c / torchao[1]:.2f}x |"
        )
    if compile_too:
        compiled = {variant: ms[(variant, "compiled")] for variant in eager}
        print(
            "compiled, same run (issue 14 targets in brackets): "
            f"W4A16 search / torchao {compiled['W4A16 search'] / compiled['torchao NVFP4WeightOnly']:.2f}x (<= 1.0); "
            f"W4A4 search / float32 {compiled['W4A4 search'] / compiled['float32']:.2f}x (<= 2.0); "
            f"W4A4 amax / float32 {compiled['W4A4 amax'] / compiled['float32']:.2f}x; "
            f"W4A4 search / W4A4 amax {compiled['W4A4 search'] / compiled['W4A4 amax']:.2f}x (<= 1.3)"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-compile", action="store_true", help="time eager mode only")
    args = parser.parse_args()
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load average {load}")

    encoder, sentences = minilm()
    time_model("all-MiniLM-L6-v2 (16 sentences)", encoder, sentences, args.repeats, not args.no_compile)
    llama, ids = small_llama()
    time_model("small random Llama (4 x 64 tokens)", llama, ids, args.repeats, not args.no_compile)


if __name__ == "__main__":
    main()
