"""A causal LM through ``backend="scalesearch"``: amax against searched NVFP4 scales.

    python examples/llama.py                  # a tiny random Llama built from a config (no download)
    python examples/llama.py --model PATH     # any local Hugging Face causal LM

The model is compiled with the "scalesearch" backend for each block-scale method (W4A4 linears, NVFP4
attention where supported) and scored on one batch of token ids against the unquantized model: the relative
error of the logits, the cosine of the next-token distributions, and how often the top-1 token agrees. Also
shown: rewritten linears and attention calls, compile time and latency against Inductor in the same precision.
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
from scalesearch_demo import compile_and_time, markdown_table, tiny_model  # noqa: E402


def load(path: str | None) -> torch.nn.Module:
    if path is None:
        return tiny_model("llama")
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()


def scores(logits: torch.Tensor, reference: torch.Tensor) -> tuple:
    """(relative error of the logits, mean cosine of the softmax distributions, top-1 agreement)."""
    logits, reference = logits.float(), reference.float()
    relative = ((logits - reference).norm() / reference.norm()).item()
    cosine = torch.nn.functional.cosine_similarity(logits.softmax(-1), reference.softmax(-1), dim=-1).mean().item()
    top1 = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    return relative, cosine, top1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="local Hugging Face causal LM path (default: a tiny random Llama)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    model = load(args.model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=g)

    def forward(m):
        return m(input_ids=ids).logits

    rows = []
    for label, method in [("unquantized, inductor", None), ("NVFP4 amax", "amax"), ("NVFP4 search", "search")]:
        backend = "inductor" if method is None else scalesearch_compile.backend(method=method)
        run = compile_and_time(model, forward, backend, args.repeats)
        if method is None:
            reference, base_ms = run.output, run.latency_ms
        relative, cosine, top1 = scores(run.output, reference)
        counts = ("-", "-") if method is None else (backend.rewritten("linear"), backend.rewritten("attention"))
        rows.append(
            (label, f"{relative:.4f}", f"{cosine:.4f}", f"{100 * top1:.1f}%", *map(str, counts))
            + (f"{run.compile_s:.1f}", f"{run.latency_ms:.1f}", f"{run.latency_ms / base_ms:.2f}")
        )

    name = args.model or "tiny random Llama"
    print(f"\n{name}, batch {args.batch} x {args.seq} tokens, {torch.get_num_threads()} CPU threads")
    header = ("model", "logits rel. error", "softmax cosine", "top-1 agree", "linears", "attention")
    header += ("compile s", "latency ms", "latency / inductor")
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
