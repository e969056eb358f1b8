"""Mixture-of-experts models in NVFP4: how much of the model is NVFP4, and the logits error of amax against
searched block scales.

    python examples/moe.py                               # tiny random Mixtral and Qwen2-MoE (no download)
    python examples/moe.py --model qwen3_moe deepseek_v3 # other built-in tiny MoEs
    python examples/moe.py --model PATH                  # any local Hugging Face MoE causal LM

For each model: the share of its parameters stored in NVFP4 when torchao's ``quantize_`` selects ``nn.Linear``
layers only (its default filter, which misses the experts) and with ``scalesearch_compile.quantize_model``
(linears and experts); then, for amax and searched scales, the relative error of the logits against the float
model on one batch of token ids and how often the top-1 token agrees. The experts run with
``experts_implementation`` (default grouped_mm; eager and batched_mm compute the same numbers).
"""

import argparse
import copy
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scalesearch_demo.py, beside the package
import scalesearch_demo  # noqa: E402, F401  (before torchao: quiets its import, keeps the hub offline)

# isort: split
import torch  # noqa: E402
from torchao.quantization import quantize_  # noqa: E402

from scalesearch_compile import ScaleSearchConfig, quantize_model  # noqa: E402
from scalesearch_compile.policy import is_nvfp4  # noqa: E402
from scalesearch_demo import markdown_table, tiny_model  # noqa: E402

BUILT_IN = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3")


def load(name: str) -> torch.nn.Module:
    if name in BUILT_IN:
        return tiny_model(name)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(name, attn_implementation="sdpa").eval()


def nvfp4_share(model: torch.nn.Module) -> float:
    """The fraction of the model's parameters (elements) stored in NVFP4."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if is_nvfp4(p)) / sum(p.numel() for p in params)


def scores(logits: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """(relative error of the logits, top-1 agreement)."""
    relative = ((logits - reference).norm() / reference.norm()).item()
    return relative, (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()


@torch.no_grad()
def report(name: str, args) -> list:
    model = load(name)
    model.config._experts_implementation = args.implementation
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    reference = model(input_ids=ids).logits.float()
    rows = [(name, "float", f"{nvfp4_share(model):.1%}", "0", "100.0%")]
    runs = [("search, quantize_ (nn.Linear only)", "search", False), ("amax", "amax", True), ("search", "search", True)]
    for label, method, with_experts in runs:
        quantized = copy.deepcopy(model)
        config = ScaleSearchConfig(method=method, activations=args.activations, progress=False)
        if with_experts:
            quantize_model(quantized, config)
        else:
            quantize_(quantized, config)
        relative, top1 = scores(quantized(input_ids=ids).logits.float(), reference)
        rows.append((name, label, f"{nvfp4_share(quantized):.1%}", f"{relative:.4f}", f"{top1:.1%}"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["mixtral", "qwen2_moe"], help=f"{', '.join(BUILT_IN)} or a path")
    parser.add_argument("--activations", default="nvfp4", choices=["nvfp4", "none"], help="W4A4 or weight-only")
    parser.add_argument("--implementation", default="grouped_mm", choices=["eager", "batched_mm", "grouped_mm"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    args = parser.parse_args()
    args.activations = None if args.activations == "none" else args.activations
    logging.basicConfig(level=logging.WARNING)

    rows = [row for name in args.model for row in report(name, args)]
    scheme = "W4A4" if args.activations else "W4A16"
    print(f"\n{scheme}, experts_implementation={args.implementation}, batch {args.batch} x {args.seq} tokens")
    print(markdown_table(("model", "weights", "params in NVFP4", "logits rel. error", "top-1 agree"), rows))


if __name__ == "__main__":
    main()
