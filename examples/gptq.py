"""GPTQ with searched NVFP4 block scales on a Hugging Face model, against round-to-nearest.

    python examples/gptq.py                                   # the packaged all-MiniLM-L6-v2, built-in text
    python examples/gptq.py --model PATH --calibration FILE --eval FILE --scheme w4a4

Calibration text: ``--calibration FILE`` (UTF-8, one sample a line) or the package's built-in calibration
sentences; evaluation text: ``--eval FILE`` or the built-in evaluation sentences (none of them in the built-in
calibration text). The model is quantized three ways: round to nearest with amax scales, with searched scales,
and ``gptq_quantize_`` (GPTQ error feedback, each block's scale searched on the error-fed weights with diag(H)
importance), and each is scored on the evaluation text: an encoder by the mean cosine of its sentence embeddings
to float32's, a causal LM by perplexity (float32's in the first row). For a checkpoint vLLM serves, the same
quantization is ``scalesearch-export MODEL OUT --calibration FILE --gptq``.
"""

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scalesearch_demo.py, beside the package
import scalesearch_demo  # noqa: E402, F401  (before torchao: quiets its import, keeps the hub offline)

# isort: split
from scalesearch_compile import ScaleSearchConfig, gptq_quantize_, quantize_model  # noqa: E402
from scalesearch_compile.calibration import builtin_corpus  # noqa: E402
from scalesearch_compile.report import (  # noqa: E402
    load_pretrained,
    mean_cosine,
    minilm_path,
    perplexity,
    read_lines,
    sentence_embeddings,
)
from scalesearch_demo import markdown_table  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="local Hugging Face checkpoint (default: the packaged all-MiniLM-L6-v2)")
    parser.add_argument("--calibration", metavar="FILE", help="calibration text (default: built-in)")
    parser.add_argument("--eval", metavar="FILE", help="evaluation text (default: built-in)")
    parser.add_argument("--scheme", choices=("w4a16", "w4a4"), default="w4a16")
    parser.add_argument("--max-calibration", type=int, default=128, metavar="N", help="calibration lines used")
    args = parser.parse_args()

    model, tokenizer, kind = load_pretrained(args.model or minilm_path())
    calibration = read_lines(args.calibration, "calibration") if args.calibration else builtin_corpus("calibration")
    evaluation = read_lines(args.eval, "evaluation") if args.eval else builtin_corpus("evaluation")
    calibration = calibration[: args.max_calibration]
    batches = [
        dict(tokenizer(calibration[i : i + 16], padding=True, truncation=True, return_tensors="pt"))
        for i in range(0, len(calibration), 16)
    ]
    if kind == "encoder":
        eval_batch = dict(tokenizer(evaluation, padding=True, truncation=True, return_tensors="pt"))
        reference = sentence_embeddings(model, eval_batch)
        metric_name = "cosine to float32"

        def metric(m):
            return mean_cosine(sentence_embeddings(m, eval_batch), reference)
    else:
        ids = tokenizer("\n".join(evaluation), return_tensors="pt")["input_ids"]
        window = min(512, getattr(model.config, "max_position_embeddings", 512))
        metric_name = "perplexity"

        def metric(m):
            return perplexity(m, ids, window, window // 2)

    activations = "nvfp4" if args.scheme == "w4a4" else None
    rows = [] if kind == "encoder" else [("float32", f"{metric(model):.4f}", "-")]
    for label, method, gptq in (
        ("amax", "amax", False),
        ("search", "search", False),
        ("GPTQ + search", "search", True),
    ):
        quantized = copy.deepcopy(model)
        config = ScaleSearchConfig(method, activations, progress=False)
        start = time.perf_counter()
        if gptq:
            gptq_quantize_(quantized, batches, config)
        else:
            quantize_model(quantized, config)
        rows.append((label, f"{metric(quantized):.5f}", f"{time.perf_counter() - start:.1f}"))
    print(
        f"\n{args.model or 'all-MiniLM-L6-v2'}, {args.scheme.upper()}, calibration {len(calibration)} lines, ", end=""
    )
    print(f"evaluation {len(evaluation)} lines")
    print(markdown_table(["weights", metric_name, "quantize s"], rows))


if __name__ == "__main__":
    main()
