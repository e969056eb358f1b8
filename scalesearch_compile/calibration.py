"""Calibration: per-input-channel mean of x**2 of each linear layer's inputs, the search's importance weights.

Weighting each element's squared error by its input channel's mean x**2 makes the block search minimise the
expected error of the layer's output (x . w) rather than of the weight itself: on all-MiniLM-L6-v2 (W4A16,
``benchmarks/linear.py``) searched scales cut the sentence-embedding gap to float32 by 14% against amax scales,
and by 38% with these weights.
"""

from collections.abc import Iterable, Mapping

import torch

from scalesearch_compile.policy import is_linear_layer

# Name of the non-persistent buffer :func:`calibrate` attaches to each linear layer; ScaleSearchConfig's
# quantize_ handler consumes (removes) it.
IMPORTANCE_BUFFER = "scalesearch_importance"


@torch.no_grad()
def calibrate(model: torch.nn.Module, batches: Iterable) -> dict[str, torch.Tensor]:
    """Run ``batches`` through ``model`` and attach to every linear layer (``nn.Linear`` and transformers'
    ``Conv1D``, :func:`~scalesearch_compile.policy.is_linear_layer`) the float32 mean of x**2 over all
    of its input rows, shape (in_features,), as buffer ``scalesearch_importance``; return them by module name.

    A batch that is a Mapping is passed as keyword arguments, a tuple or list as positional arguments, anything
    else as the single argument. Linear layers that saw no input get no importance.
    """
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def observe(name):
        def hook(module, args):
            rows = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + rows.square().sum(dim=0)
            counts[name] = counts.get(name, 0) + rows.shape[0]

        return hook

    linears = {name: m for name, m in model.named_modules() if is_linear_layer(m)}
    handles = [m.register_forward_pre_hook(observe(name)) for name, m in linears.items()]
    try:
        for batch in batches:
            if isinstance(batch, Mapping):
                model(**batch)
            elif isinstance(batch, (tuple, list)):
                model(*batch)
            else:
                model(batch)
    finally:
        for handle in handles:
            handle.remove()
    if not counts:
        raise ValueError("calibration saw no input to any linear layer; pass at least one batch")
    importance = {name: sums[name] / counts[name] for name in counts}
    for name, value in importance.items():
        linears[name].register_buffer(IMPORTANCE_BUFFER, value, persistent=False)
    return importance
