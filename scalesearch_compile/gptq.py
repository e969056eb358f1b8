"""GPTQ error feedback with searched NVFP4 block scales: :func:`gptq_quantize_`.

GPTQ (Frantar et al., arXiv 2210.17323) quantizes a linear weight W (N, K) one input column at a time and
pushes each column's rounding error onto the columns not yet quantized, through the upper Cholesky factor U of
``H^-1``, ``H = X^T X`` of the layer's calibration inputs X (padding rows left out, accumulated in float64,
``damping`` times the mean of diag(H) added to the diagonal). For NVFP4, at the first column of each 16-column
block the E4M3 scale of every row's block is chosen by the configured method on the error-compensated weights,
with diag(H) as the importance of each input channel (the search weighted by the calibration inputs); the
block's columns are then rounded with that scale, one at a time (:class:`search.BlockRounding`), each error fed
forward. The global scale is the original weight's, as ``quantize_``'s. Columns are processed in order, with
GPTQ's lazy batch updates every 128 columns. Inputs that are always zero (diag(H) = 0) get H_ii = 1 and no
feedback, their weights kept.

:func:`gptq_quantize_` runs it over a model block by block (GPTQ's sequential order): the inputs of the first
transformer block are captured once; each block's Hessians are accumulated from its inputs, which have passed
through the already-quantized earlier blocks, its linear layers quantized, and the block run again, quantized,
to produce the next block's inputs. Only one block's Hessians are held at a time; layers fed the same input
(q/k/v, gate/up) share one. Linear layers outside the blocks (a pooler, lm_head) are quantized last, from a pass
of the whole quantized model. The weights become the ``ScaleSearchNVFP4Tensor`` that ``quantize_`` makes.
"""

import logging
from collections.abc import Iterable, Mapping

import torch
from tqdm.auto import tqdm

from scalesearch_compile.calibration import run_batches
from scalesearch_compile.config import QuantizeSummary, ScaleSearchConfig, replace_linear_weight
from scalesearch_compile.formats import pack_nibbles
from scalesearch_compile.layout import BLOCK_SIZE, NVFP4Weight
from scalesearch_compile.policy import LinearPolicy, is_linear_layer, stores_weight_transposed
from scalesearch_compile.search import (
    BlockRounding,
    NonFiniteError,
    QuantizeRequest,
    ScaleChoice,
    checked_amax,
    global_scale,
    quantize_blocks,
    quantize_reference,
)
from scalesearch_compile.tensor import ScaleSearchNVFP4Tensor

logger = logging.getLogger("scalesearch_compile")

LAZY_COLUMNS = 128  # GPTQ's lazy batch: columns updated together before the rest of W


def gptq_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scales: ScaleChoice,
    damping: float,
    per_tensor_scale: torch.Tensor | None = None,
) -> NVFP4Weight:
    """The NVFP4 weight GPTQ makes of float ``weight`` (N, K) with ``hessian`` (K, K) = X^T X (module
    docstring), under ``per_tensor_scale`` (0-d; default the weight's own, ``global_scale(amax)``); ValueError
    when H is not positive definite after damping."""
    w = weight.detach().float().clone()
    h = hessian.double().clone()
    n, k = w.shape
    diagonal = h.diagonal()
    importance = diagonal.float().clone()
    diagonal[diagonal == 0] = 1.0
    diagonal += damping * diagonal.mean()
    factor, info = torch.linalg.cholesky_ex(h)
    if info:
        raise ValueError(f"the Hessian of the calibration inputs is not positive definite after damping {damping}")
    u = torch.linalg.cholesky(torch.cholesky_inverse(factor), upper=True).float()
    amax = checked_amax(weight, "weight")
    pts = global_scale(amax) if per_tensor_scale is None else per_tensor_scale.float().reshape(())
    codes = torch.empty((n, k), dtype=torch.uint8, device=w.device)
    scale_codes = torch.empty((n, k // BLOCK_SIZE), dtype=torch.uint8, device=w.device)
    for start in range(0, k, LAZY_COLUMNS):
        stop = min(start + LAZY_COLUMNS, k)
        block, errors = w[:, start:stop], torch.empty((n, stop - start), device=w.device)
        before = torch.empty_like(block)  # each column as it was when rounded
        for j in range(stop - start):
            column = start + j
            if column % BLOCK_SIZE == 0:
                request = QuantizeRequest.of(
                    block[:, j : j + BLOCK_SIZE],
                    scales,
                    per_tensor_scale=pts,
                    importance=importance[column : column + BLOCK_SIZE],
                    check_finite=False,
                )
                scale_codes[:, column // BLOCK_SIZE] = chosen = quantize_reference(request).scale_codes[:, 0]
                rounding = BlockRounding(chosen, pts)
            before[:, j] = block[:, j]
            errors[:, j] = (block[:, j] - rounding.values(block[:, j : j + 1])[:, 0]) / u[column, column]
            block[:, j:] -= errors[:, j : j + 1] * u[column, column:stop]
        for first in range(0, stop - start, BLOCK_SIZE):
            codes[:, start + first : start + first + BLOCK_SIZE] = BlockRounding(
                scale_codes[:, (start + first) // BLOCK_SIZE], pts
            ).codes(before[:, first : first + BLOCK_SIZE])
        w[:, stop:] -= errors @ u[start:stop, stop:]
    return NVFP4Weight(pack_nibbles(codes), scale_codes, pts)


class _Hessians:
    """X^T X (float64) of the inputs of some linear layers during forward passes; layers fed the same tensor
    share one. ``rows``: which rows of an input are real (not padding), set per batch."""

    def __init__(self, layers: dict[str, torch.nn.Module], act: ScaleChoice | None = None):
        self.sums, self.group_of, self.rows, self.act = {}, {}, None, act
        self._seen = {}  # input identity -> (group, the input, kept alive so its memory is not reused)
        self._handles = [module.register_forward_pre_hook(self._hook(name)) for name, module in layers.items()]

    def new_pass(self, rows: torch.Tensor | None) -> None:
        self._seen, self.rows = {}, rows

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0].detach()
            key = (x.data_ptr(), tuple(x.shape))
            if key in self._seen:
                self.group_of.setdefault(name, self._seen[key][0])
                return
            group = self.group_of.setdefault(name, name)
            self._seen[key] = group, x
            rows = x.reshape(-1, x.shape[-1])
            if self.act is not None:  # W4A4: the layer multiplies the quantized input
                rows = quantize_blocks(rows, self.act, check_finite=False).dequantize()
            if self.rows is not None and self.rows.numel() == rows.shape[0]:
                rows = rows[self.rows]
            rows = rows.double()
            total = self.sums.get(group)
            self.sums[group] = rows.T @ rows if total is None else total.addmm_(rows.T, rows)

        return hook

    def of(self, name: str) -> torch.Tensor | None:
        return self.sums.get(self.group_of.get(name))

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def _real_rows(batch) -> torch.Tensor | None:
    """The non-padding positions of a batch (its attention mask, flattened), if it has one."""
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    return None if mask is None else mask.reshape(-1).bool()


def _transformer_blocks(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList] | None:
    """The model's stack of blocks: the ModuleList holding the most linear layers, if it holds any."""
    best, count = None, 0
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 1:
            linears = sum(is_linear_layer(m) for m in module.modules())
            if linears > count:
                best, count = (path, module), linears
    return best


class _Stop(Exception):
    """Raised by the capture hook: the rest of the model is not needed."""


def _capture_inputs(model: torch.nn.Module, first: torch.nn.Module, batches: list) -> list:
    """(args, kwargs) of ``first``'s call for each batch."""
    calls = []

    def capture(module, args, kwargs):
        calls.append((args, kwargs))
        raise _Stop

    handle = first.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        for batch in batches:
            try:
                run_batches(model, [batch])
            except _Stop:
                pass
    finally:
        handle.remove()
    return calls


def _hidden_states(output):
    return output[0] if isinstance(output, tuple | list) else output


def _run_block(block, calls, rows, hessians=None) -> list:
    """Run ``block`` on each captured call; return the calls with the block's outputs as the next inputs."""
    following = []
    for (args, kwargs), real in zip(calls, rows, strict=True):
        if hessians is not None:
            hessians.new_pass(real)
        out = _hidden_states(block(*args, **kwargs))
        following.append(((out, *args[1:]), kwargs) if args else ((), {**kwargs, "hidden_states": out}))
    return following


def _quantize_layers(layers, hessians: "_Hessians", policy: LinearPolicy, damping: float, scales, summary) -> None:
    for path, module in layers.items():
        reason = _quantize_layer(module, hessians.of(path), policy, damping, scales.get(path), path)
        summary.record(module, path, reason)


def _quantize_layer(module, hessian, policy: LinearPolicy, damping: float, pts, path: str) -> str | None:
    if hessian is None:
        return "no calibration input reached it"
    transposed = stores_weight_transposed(module)
    weight = module.weight.t() if transposed else module.weight
    try:
        nvfp4 = gptq_weight(weight, hessian, policy.scales, damping, pts)
    except NonFiniteError:
        return "NaN or Inf in the weight"
    except ValueError as error:
        raise ValueError(f"GPTQ of {path}: {error}; raise damping or add calibration data") from None
    replace_linear_weight(
        module, ScaleSearchNVFP4Tensor.from_weight(nvfp4, weight.dtype, policy.act_quant_kwargs), transposed
    )
    return None


def _layers(root: torch.nn.Module, prefix: str, policy: LinearPolicy, summary, skip=()) -> dict:
    """The linear layers under ``root`` (but not in ``skip``) to quantize, by path; the others are recorded in
    ``summary``."""
    layers, skip = {}, {id(m) for m in skip}
    for name, module in root.named_modules():
        path = f"{prefix}.{name}".strip(".")
        if not is_linear_layer(module) or id(module) in skip:
            continue
        weight = module.weight.t() if stores_weight_transposed(module) else module.weight
        reason = policy.reason(weight, path)
        if reason is None:
            layers[path] = module
        else:
            summary.record(module, path, reason)
    return layers


@torch.no_grad()
def gptq_quantize_(
    model: torch.nn.Module,
    batches: Iterable,
    config: ScaleSearchConfig | None = None,
    *,
    damping: float = 0.01,
    global_scales: Mapping[str, torch.Tensor] | None = None,
    progress: bool = True,
) -> QuantizeSummary:
    """Quantize ``model``'s linear layers in place with GPTQ and ``config``'s block-scale method (module
    docstring), on calibration ``batches`` (as :func:`scalesearch_compile.calibration.run_batches` takes them:
    tokenizer outputs, with their ``attention_mask`` leaving padding out). W4A16 or W4A4 as ``config`` says;
    ``config.exclude`` applies. ``damping``: the fraction of the mean of diag(H) added to H's diagonal.
    ``global_scales``: module path -> the 0-d global scale to quantize that layer under (default: its own,
    as ``quantize_``; the serving export passes one per fused group). Returns the :class:`QuantizeSummary`, also
    logged as one line."""
    config = ScaleSearchConfig() if config is None else config
    if not isinstance(config, ScaleSearchConfig):
        raise ValueError(f"config must be a ScaleSearchConfig, got {type(config).__name__}")
    if not isinstance(damping, int | float) or isinstance(damping, bool) or not 0 <= damping < float("inf"):
        raise ValueError(f"damping must be a non-negative number, got {damping!r}")
    batches = list(batches)
    if not batches:
        raise ValueError("GPTQ needs calibration data: pass at least one batch")
    policy, summary = config.policy(), QuantizeSummary(config, label="GPTQ")
    global_scales = dict(global_scales or {})
    rows = [_real_rows(batch) for batch in batches]
    found = _transformer_blocks(model)
    blocks = [] if found is None else [(f"{found[0]}.{i}", block) for i, block in enumerate(found[1])]
    use_cache = getattr(getattr(model, "config", None), "use_cache", None)
    if use_cache:
        model.config.use_cache = False  # a cache would grow each time a block runs again
    try:
        calls = _capture_inputs(model, blocks[0][1], batches) if blocks else []
        bar = tqdm(blocks, desc="scalesearch GPTQ", unit="block", disable=not progress)
        for path, block in bar:
            layers = _layers(block, path, policy, summary)
            hessians = _Hessians(layers, policy.act_quant_kwargs)
            try:
                _run_block(block, calls, rows, hessians)
            finally:
                hessians.close()
            _quantize_layers(layers, hessians, policy, damping, global_scales, summary)
            del hessians
            calls = _run_block(block, calls, rows)
        inside = [m for _, block in blocks for m in block.modules()]
        outside = _layers(model, "", policy, summary, inside)
        _quantize_outside(model, batches, rows, outside, policy, damping, global_scales, summary)
    finally:
        if use_cache:
            model.config.use_cache = use_cache
    logger.info(summary.line())
    return summary


def _quantize_outside(model, batches, rows, layers, policy, damping, global_scales, summary) -> None:
    """GPTQ of the linear layers outside the blocks, from one pass of the whole (quantized) model."""
    if not layers:
        return
    hessians = _Hessians(layers, policy.act_quant_kwargs)
    try:
        for batch, real in zip(batches, rows, strict=True):
            hessians.new_pass(real)
            run_batches(model, [batch])
    finally:
        hessians.close()
    _quantize_layers(layers, hessians, policy, damping, global_scales, summary)
