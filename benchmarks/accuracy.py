"""MiniLM accuracy of every weight-quantization method, calibrated and evaluated on disjoint text.

    python benchmarks/accuracy.py [--max-calibration N] [--max-eval N] [--no-attention]

The packaged all-MiniLM-L6-v2 encoder; calibration: the package's built-in calibration sentences (386, batches
of 16); evaluation: its built-in evaluation sentences (135, none of them in the calibration text). The metric is
the sentence-embedding gap to float32, 1 - mean cosine of mean-pooled, L2-normalised embeddings, and the share
of amax's gap each method closes ("cut"). Methods: round to nearest with amax scales, searched scales, the search
weighted by each input channel's mean x^2 (``calibrate``), and GPTQ (``gptq_quantize_``) with amax and with
searched, diag(H)-weighted scales; "search, run time over the window" quantizes W4A4 activations and attention's P
over the whole window instead of the run-time defaults (fast_search for activations, four_over_six for P).
Schemes: W4A16, W4A4 (activations NVFP4 at run time, searched or amax as the weights), and W4A4 with NVFP4
attention (Q, K, V and P, the same scale method) through ``torch.compile(backend="scalesearch")``. The time
each quantization took is printed beside it, with its ratio to ``quantize_model`` with searched scales in the
same run.
"""

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scalesearch_demo.py, beside the package
import scalesearch_demo  # noqa: E402, F401  (before torchao: quiets its import, keeps the hub offline)

# isort: split
import torch  # noqa: E402

from scalesearch_compile import ScaleSearchConfig, backend, calibrate, gptq_quantize_, quantize_model  # noqa: E402
from scalesearch_compile.attention import AttentionRecipe  # noqa: E402
from scalesearch_compile.calibration import builtin_corpus  # noqa: E402
from scalesearch_compile.report import load_pretrained, mean_cosine, minilm_path, sentence_embeddings  # noqa: E402
from scalesearch_demo import markdown_table  # noqa: E402

# label -> (scale method, how the weights are rounded, method of activations and P: None for the run-time defaults,
# under search fast_search for activations and four_over_six for P)
METHODS = {
    "amax": ("amax", "nearest", None),
    "search": ("search", "nearest", None),
    "search, run time over the window": ("search", "nearest", "search"),
    "search + calibrate": ("search", "calibrate", None),
    "GPTQ, amax": ("amax", "gptq", None),
    "GPTQ, search": ("search", "gptq", None),
}
SCHEMES = {"W4A16": None, "W4A4": "nvfp4"}


def quantize(model, method: str, rounding: str, activations, run_time, batches) -> float:
    """Quantize ``model`` in place; returns the seconds it took (calibration included)."""
    config = ScaleSearchConfig(method, activations, progress=False, activation_method=run_time)
    start = time.perf_counter()
    if rounding == "gptq":
        gptq_quantize_(model, batches, config, progress=False)
    else:
        if rounding == "calibrate":
            calibrate(model, batches)
        quantize_model(model, config)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-calibration", type=int, help="use the first N calibration sentences")
    parser.add_argument("--max-eval", type=int, help="use the first N evaluation sentences")
    parser.add_argument("--no-attention", action="store_true", help="skip the W4A4 + NVFP4 attention column")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS), metavar="METHOD")
    parser.add_argument("--schemes", nargs="+", choices=list(SCHEMES), default=list(SCHEMES))
    args = parser.parse_args()
    if "amax" not in args.methods or "search" not in args.methods:
        parser.error("--methods needs amax and search (the baselines of the cut and of the time ratio)")
    model, tokenizer, _ = load_pretrained(minilm_path())
    calibration = builtin_corpus("calibration")[: args.max_calibration]
    evaluation = builtin_corpus("evaluation")[: args.max_eval]
    assert not set(calibration) & set(evaluation)
    batches = [
        dict(tokenizer(calibration[i : i + 16], padding=True, return_tensors="pt"))
        for i in range(0, len(calibration), 16)
    ]
    eval_batch = dict(tokenizer(evaluation, padding=True, return_tensors="pt"))
    reference = sentence_embeddings(model, eval_batch)

    def gap(m) -> float:
        return 1 - mean_cosine(sentence_embeddings(m, eval_batch), reference)

    schemes = {name: SCHEMES[name] for name in args.schemes}
    attention = "W4A4" in schemes and not args.no_attention
    columns = list(schemes) + (["W4A4 + attention"] if attention else [])
    gaps, seconds = {}, {}
    for label in args.methods:
        method, rounding, run_time = METHODS[label]
        for scheme, activations in schemes.items():
            quantized = copy.deepcopy(model)
            seconds[(label, scheme)] = quantize(quantized, method, rounding, activations, run_time, batches)
            gaps[(label, scheme)] = gap(quantized)
            if scheme == "W4A4" and attention:
                torch._dynamo.reset()
                recipe = AttentionRecipe(method=method, p_method=run_time)
                options = dict(method=method, activations=activations, activation_method=run_time, attention=recipe)
                compiled = torch.compile(quantized, backend=backend(**options))
                gaps[(label, "W4A4 + attention")] = gap(compiled)
            done = ", ".join(f"{c} gap {gaps[(label, c)]:.5f}" for c in columns if (label, c) in gaps)
            print(f"{label}: {done}; quantized in {seconds[(label, scheme)]:.1f} s", file=sys.stderr)

    print(
        f"\nall-MiniLM-L6-v2: embedding gap to float32 (1 - mean cosine) on {len(evaluation)} evaluation sentences, "
        f"calibration on {len(calibration)} other sentences; {torch.get_num_threads()} CPU threads"
    )
    header = ["method"] + [f"{c} {kind}" for c in columns for kind in ("gap", "cut")]
    header += [f"{s} quantize s" for s in schemes]
    rows = []
    for label in args.methods:
        cells = [label]
        for column in columns:
            value, base = gaps[(label, column)], gaps[("amax", column)]
            cells += [f"{value:.5f}", "-" if label == "amax" else f"{1 - value / base:.1%}"]
        for scheme in schemes:
            ratio = seconds[(label, scheme)] / seconds[("search", scheme)]
            cells.append(f"{seconds[(label, scheme)]:.1f} ({ratio:.1f}x search)")
        rows.append(cells)
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
