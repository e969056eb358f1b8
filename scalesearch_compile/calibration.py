"""Calibration: statistics of each linear layer's inputs over a few batches: the per-input-channel mean of x**2
(the search's importance weights) and the input amax (a static activation scale for serving).

Weighting each element's squared error by its input channel's mean x**2 makes the block search minimise the
expected error of the layer's output (x . w) rather than of the weight itself: on all-MiniLM-L6-v2 (W4A16,
``benchmarks/linear.py``) searched scales cut the sentence-embedding gap to float32 by 14% against amax scales,
and by 38% with these weights.
"""

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from scalesearch_compile.policy import is_linear_layer

# Name of the non-persistent buffer :func:`calibrate` attaches to each linear layer; ScaleSearchConfig's
# quantize_ handler consumes (removes) it.
IMPORTANCE_BUFFER = "scalesearch_importance"


@dataclass
class InputStatistics:
    """One linear layer's inputs over the calibration batches: ``rows`` seen, per-input-channel float32 sum of
    x**2 ``(in_features,)`` and the finite amax."""

    rows: int
    square_sum: torch.Tensor
    amax: torch.Tensor

    def mean_square(self) -> torch.Tensor:
        return self.square_sum / self.rows


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


@torch.no_grad()
def input_statistics(model: torch.nn.Module, batches: Iterable) -> dict[str, InputStatistics]:
    """:class:`InputStatistics` of every linear layer (``nn.Linear`` and transformers' ``Conv1D``) that saw
    input, by module name. Padding is left out: when a batch (a Mapping) has an ``attention_mask`` whose shape
    is the leading shape of a layer's input, only the rows it marks are counted."""
    stats: dict[str, InputStatistics] = {}
    mask: list[torch.Tensor | None] = [None]

    def remember_mask(module, args, kwargs):
        mask[0] = kwargs.get("attention_mask")

    def observe(name):
        def hook(module, args):
            x = args[0].detach()
            keep = mask[0]
            rows = x[keep.bool()] if keep is not None and keep.shape == x.shape[:-1] else x.reshape(-1, x.shape[-1])
            rows = rows.float()
            amax = rows.abs().nan_to_num(nan=0.0, posinf=0.0).amax() if rows.numel() else torch.zeros(())
            seen = stats.get(name)
            if seen is None:
                stats[name] = InputStatistics(rows.shape[0], rows.square().sum(dim=0), amax)
            else:
                seen.rows += rows.shape[0]
                seen.square_sum += rows.square().sum(dim=0)
                seen.amax = torch.maximum(seen.amax, amax)

        return hook

    handles = [model.register_forward_pre_hook(remember_mask, with_kwargs=True)]
    handles += [m.register_forward_pre_hook(observe(n)) for n, m in model.named_modules() if is_linear_layer(m)]
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
    name. Linear layers that saw no input get no importance.
    """
    importance = {name: s.mean_square() for name, s in input_statistics(model, batches).items()}
    if not importance:
        raise ValueError("calibration saw no input to any linear layer; pass at least one batch")
    modules = dict(model.named_modules())
    for name, value in importance.items():
        modules[name].register_buffer(IMPORTANCE_BUFFER, value, persistent=False)
    return importance
