"""Calibration: statistics of each linear layer's inputs over a few batches: the per-input-channel mean of x**2
(the search's importance weights) and the input amax (a static activation scale for serving). A mixture-of-experts
experts module (3-D weights, one forward for all experts) gets the same statistics per expert and weight: its
gate_up_proj (or up_proj) sees the hidden states of the tokens routed to the expert, its down_proj what the
expert's gating makes of them.

Weighting each element's squared error by its input channel's mean x**2 makes the block search minimise the
expected error of the layer's output (x . w) rather than of the weight itself: on all-MiniLM-L6-v2 (W4A16,
calibrated on the built-in calibration text, evaluated on the disjoint evaluation text, ``scalesearch-report``)
searched scales cut the sentence-embedding gap to float32 by 14.7% against amax scales, and by 36.1% with these
weights.

:func:`builtin_corpus` gives the package's own calibration and evaluation text (disjoint sets of English sentences
written for this project).
"""

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources

import torch

from scalesearch_compile.policy import experts_weights, is_linear_layer

# The built-in English text shipped in scalesearch_compile/data/ (sentences written for this project, one a
# line): calibration text, and evaluation text that shares no sentence with it.
CORPORA = ("calibration", "evaluation")

# Name of the non-persistent buffer :func:`calibrate` attaches to each linear layer; ScaleSearchConfig's
# quantize_ handler consumes (removes) it.
IMPORTANCE_BUFFER = "scalesearch_importance"


@dataclass
class InputStatistics:
    """One linear layer's (or one expert's weight's) inputs over the calibration batches: ``rows`` seen,
    per-input-channel float32 sum of x**2 ``(in_features,)`` and the finite amax."""

    rows: int
    square_sum: torch.Tensor
    amax: torch.Tensor

    def mean_square(self) -> torch.Tensor:
        return self.square_sum / self.rows


def builtin_corpus(name: str = "calibration") -> list[str]:
    """The package's built-in English sentences: ``"calibration"`` (386 sentences, the default calibration text of
    ``scalesearch-report`` and the examples) or ``"evaluation"`` (135 other sentences, never used to calibrate).
    Written for this project (everyday life, science, history, technology, questions, instructions, numbers,
    dialogue; 6 to 31 words), shipped as package data, one sentence a line."""
    if name not in CORPORA:
        raise ValueError(f"unknown built-in corpus {name!r}; expected one of {', '.join(CORPORA)}")
    text = resources.files("scalesearch_compile").joinpath("data", f"{name}.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def run_batches(model: torch.nn.Module, batches: Iterable) -> None:
    """Run ``batches`` through ``model``: a Mapping as keyword arguments, a tuple or list as positional
    arguments, anything else as the single argument."""
    for batch in batches:
        if isinstance(batch, Mapping):
            model(**batch)
        elif isinstance(batch, tuple | list):
            model(*batch)
        else:
            model(batch)


def expert_key(path: str, expert: int, weight: str) -> str:
    """The name :func:`input_statistics` gives the inputs of expert ``expert``'s slice of the 3-D weight ``weight``
    (``gate_up_proj``, ``up_proj``, ``down_proj``) of the experts module at ``path``."""
    return f"{path}.{expert}.{weight}"


def expert_inputs(experts: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor):
    """What each expert's weights see, from the experts module's own float weights and gating: yields
    ``(expert, weight name, rows)`` for every expert some token is routed to (``top_k_index`` ``(tokens, k)``):
    the hidden states ``(tokens, hidden)`` of its tokens for ``gate_up_proj`` (``up_proj`` without a gate), and
    ``act_fn(gate) * up`` of them for ``down_proj`` (float32)."""
    first = "gate_up_proj" if experts.has_gate else "up_proj"
    weights = getattr(experts, first)
    for expert in top_k_index.unique().tolist():
        if not 0 <= expert < weights.shape[0]:
            continue  # an expert-parallel sentinel: no expert here
        x = hidden_states[(top_k_index == expert).any(dim=-1)].float()
        weight = weights[expert].float()
        h = x @ weight if experts.is_transposed else x @ weight.T
        if experts.has_bias:
            h = h + getattr(experts, f"{first}_bias")[expert].float()
        yield expert, first, x
        yield expert, "down_proj", experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)


@torch.no_grad()
def input_statistics(model: torch.nn.Module, batches: Iterable) -> dict[str, InputStatistics]:
    """:class:`InputStatistics` of every linear layer (``nn.Linear`` and transformers' ``Conv1D``) that saw
    input, by module name, and of every expert of a mixture-of-experts experts module (:func:`expert_inputs`)
    that saw a token, by :func:`expert_key`. Padding is left out: when a batch (a Mapping) has an
    ``attention_mask`` with one entry per input row (rows: the input flattened to ``(-1, features)``, as a
    mixture of experts flattens its tokens), only the rows it marks are counted."""
    stats: dict[str, InputStatistics] = {}
    mask: list[torch.Tensor | None] = [None]

    def remember_mask(module, args, kwargs):
        mask[0] = kwargs.get("attention_mask")

    def real_rows(x: torch.Tensor) -> torch.Tensor:
        """Which rows of ``x`` (as ``(-1, features)``) are not padding."""
        keep = mask[0]
        if keep is None or keep.numel() != x.shape[:-1].numel():
            return torch.ones(x.shape[:-1].numel(), dtype=torch.bool, device=x.device)
        return keep.reshape(-1).bool().to(x.device)

    def record(name: str, rows: torch.Tensor) -> None:
        rows = rows.float()
        amax = rows.abs().nan_to_num(nan=0.0, posinf=0.0).amax() if rows.numel() else torch.zeros(())
        seen = stats.get(name)
        if seen is None:
            stats[name] = InputStatistics(rows.shape[0], rows.square().sum(dim=0), amax)
        else:
            seen.rows += rows.shape[0]
            seen.square_sum += rows.square().sum(dim=0)
            seen.amax = torch.maximum(seen.amax, amax)

    def observe_linear(name):
        def hook(module, args):
            x = args[0].detach()
            record(name, x.reshape(-1, x.shape[-1])[real_rows(x)])

        return hook

    def observe_experts(name):
        def hook(module, args):
            x, top_k_index = args[0].detach(), args[1]
            keep = real_rows(x)
            for expert, weight, rows in expert_inputs(module, x.reshape(-1, x.shape[-1])[keep], top_k_index[keep]):
                record(expert_key(name, expert, weight), rows)

        return hook

    handles = [model.register_forward_pre_hook(remember_mask, with_kwargs=True)]
    for name, module in model.named_modules():
        if is_linear_layer(module):
            handles.append(module.register_forward_pre_hook(observe_linear(name)))
        elif experts_weights(module):
            handles.append(module.register_forward_pre_hook(observe_experts(name)))
    try:
        run_batches(model, batches)
    finally:
        for handle in handles:
            handle.remove()
    return {name: s for name, s in stats.items() if s.rows}


def calibrate(model: torch.nn.Module, batches: Iterable) -> dict[str, torch.Tensor]:
    """Run ``batches`` through ``model`` (as :func:`run_batches`) and attach to every linear layer (``nn.Linear``
    and transformers' ``Conv1D``) the float32 mean of x**2 over its input rows (padding left out, as
    :func:`input_statistics`), shape (in_features,), as buffer ``scalesearch_importance``; return them by module
    name. Linear layers that saw no input get no importance, and experts none (``quantize_`` searches experts'
    weights without importance).
    """
    modules = dict(model.named_modules())
    stats = input_statistics(model, batches)
    importance = {name: s.mean_square() for name, s in stats.items() if name in modules}  # not expert_key names
    if not importance:
        raise ValueError("calibration saw no input to any linear layer; pass at least one batch")
    for name, value in importance.items():
        modules[name].register_buffer(IMPORTANCE_BUFFER, value, persistent=False)
    return importance
