"""Which linear layers and mixture-of-experts experts become NVFP4, how, and why not: the one decision both
front ends make (torchao ``quantize_`` with ``ScaleSearchConfig``, and the compile backend's passes), and the one
syntax both use to exclude modules.

Module patterns (``ScaleSearchConfig(exclude=...)``, the backend's ``skip_modules=...``) match a module's full
path, as ``model.named_modules()`` names it (``model.layers.0.self_attn.q_proj``): a shell-style glob
(``fnmatch``; ``*`` also crosses dots: ``lm_head``, ``*.mlp.*``, ``model.layers.1?.*``), or ``re:`` and a
regular expression that must match the whole path (``re:.*\\.(q|k)_proj``), the prefix torchao's
``FqnToConfig`` uses.
"""

import fnmatch
import re
import sys
from dataclasses import dataclass, field

import torch
from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor

from scalesearch_compile.layout import BLOCK_SIZE
from scalesearch_compile.ops.dispatch import check_impl, quantizer
from scalesearch_compile.search import SUPPORTED_DTYPES, NonFiniteError, ScaleChoice
from scalesearch_compile.tensor import (
    NVFP4ActivationKwargs,
    ScaleSearchNVFP4Experts,
    ScaleSearchNVFP4Tensor,
    quantize_experts,
    quantize_weight,
)

REGEX_PREFIX = "re:"
EXPERT_WEIGHTS = ("gate_up_proj", "up_proj", "down_proj")  # transformers' names of experts' 3-D weights
ROUTER_NAMES = ("gate", "router", "shared_expert_gate")  # routers and shared-expert gates, kept dense (as vLLM)


@dataclass(frozen=True)
class ModulePatterns:
    """Module-path patterns (module docstring), validated: a list or tuple of strings (None: none), regular
    expressions that compile."""

    patterns: tuple = ()

    def __post_init__(self):
        patterns = () if self.patterns is None else self.patterns
        if isinstance(patterns, str) or not isinstance(patterns, list | tuple):
            raise ValueError(
                f"module patterns must be a list of strings (['lm_head', '*.mlp.*', 're:...']), got {patterns!r}"
            )
        for pattern in patterns:
            if not isinstance(pattern, str):
                raise ValueError(f"a module pattern must be a string, got {pattern!r}")
            if pattern.startswith(REGEX_PREFIX):
                try:
                    re.compile(pattern[len(REGEX_PREFIX) :])
                except re.error as error:
                    raise ValueError(f"module pattern {pattern!r} is not a regular expression: {error}") from None
        object.__setattr__(self, "patterns", tuple(patterns))

    def match(self, path: str) -> str | None:
        """The first pattern that matches module ``path``, or None."""
        for pattern in self.patterns:
            if pattern.startswith(REGEX_PREFIX):
                if re.fullmatch(pattern[len(REGEX_PREFIX) :], path):
                    return pattern
            elif fnmatch.fnmatchcase(path, pattern):
                return pattern
        return None


def is_linear_layer(module: torch.nn.Module, path: str = "") -> bool:
    """Whether ``module`` is a linear layer: an ``nn.Linear``, or transformers' ``Conv1D`` (the GPT-2 family's,
    whose weight is stored transposed, (in_features, out_features)). A ``filter_fn`` for torchao's
    ``quantize_`` (whose default selects ``nn.Linear`` only)."""
    return isinstance(module, torch.nn.Linear) or stores_weight_transposed(module)


def stores_weight_transposed(module: torch.nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (looked up only if transformers has loaded it)."""
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    return pytorch_utils is not None and isinstance(module, pytorch_utils.Conv1D)


def experts_weights(module: torch.nn.Module) -> list[str]:
    """The names of the 3-D expert weights of a transformers mixture-of-experts experts module (the modules
    decorated with ``use_experts_implementation``, which sets ``has_gate`` and ``is_transposed``), else []."""
    if not (hasattr(module, "has_gate") and hasattr(module, "is_transposed")):
        return []
    return [name for name in EXPERT_WEIGHTS if getattr(module._parameters.get(name), "ndim", 0) == 3]


def is_quantizable(module: torch.nn.Module, path: str = "") -> bool:
    """Whether ``quantize_`` with ``ScaleSearchConfig`` can quantize ``module``: a linear layer
    (:func:`is_linear_layer`) or a mixture-of-experts experts module (:func:`experts_weights`); the ``filter_fn``
    to pass to torchao's ``quantize_``, whose default selects ``nn.Linear`` only."""
    return is_linear_layer(module) or bool(experts_weights(module))


def is_nvfp4(weight) -> bool:
    """Whether ``weight`` is already an NVFP4 tensor (torchao's or ours)."""
    return isinstance(weight, NVFP4Tensor | ScaleSearchNVFP4Tensor | ScaleSearchNVFP4Experts)


@dataclass(frozen=True)
class LinearPolicy:
    """How linear weights and experts' weights are quantized (``scales`` for the weight, ``act_quant_kwargs``
    recorded for the activations: None is weight-only; linear and experts' weights by the quantize kernel ``impl``
    picks for their device, the same bits as the reference) and which are left: modules matching ``exclude``, routers
    (:data:`ROUTER_NAMES`), and ``skip_shapes`` ((out_features, in_features) pairs)."""

    scales: ScaleChoice = ScaleChoice()
    act_quant_kwargs: NVFP4ActivationKwargs | None = None
    exclude: ModulePatterns = ModulePatterns()
    skip_shapes: frozenset = field(default_factory=frozenset)
    impl: str = "auto"

    def __post_init__(self):
        check_impl(self.impl)

    def quantize(self, weight, path: str, importance: torch.Tensor | None = None) -> ScaleSearchNVFP4Tensor | str:
        """The NVFP4 weight of the linear layer at module ``path`` (float weight ``(out_features, in_features)``,
        searched with the optional per-input-channel ``importance``), or why it is left as it is."""
        reason = self.reason(weight, path)
        if reason is not None:
            return reason
        try:
            quantize = quantizer(self.impl, weight)
            return quantize_weight(
                weight, self.scales, importance=importance, act_quant_kwargs=self.act_quant_kwargs, quantize=quantize
            )
        except NonFiniteError:
            return "NaN or Inf in the weight"

    def quantize_experts(self, weight, path: str) -> ScaleSearchNVFP4Experts | str:
        """The NVFP4 weights of the experts at module ``path`` (float ``(experts, out_features, in_features)``, a
        global scale per expert), or why they are left as they are."""
        reason = self.reason(weight, path, experts=True)
        if reason is not None:
            return reason
        try:
            quantize = quantizer(self.impl, weight)
            return quantize_experts(weight, self.scales, act_quant_kwargs=self.act_quant_kwargs, quantize=quantize)
        except NonFiniteError:
            return "NaN or Inf in the weight"

    def reason(self, weight, path: str, experts: bool = False) -> str | None:
        """Why the linear layer at module ``path`` with float weight ``(out_features, in_features)`` (``experts``:
        the experts' weights ``(experts, out_features, in_features)``) is left as it is, from what can be known
        without reading the values (:meth:`quantize` also checks for NaN/Inf), or None."""
        pattern = self.exclude.match(path)
        if pattern is not None:
            return f"excluded by {pattern!r}"
        if not experts and path.rpartition(".")[2] in ROUTER_NAMES:
            return "a mixture-of-experts router or gate (kept in high precision, as vLLM does)"
        if is_nvfp4(weight):
            return f"weight already quantized ({type(weight).__name__})"
        if type(weight) not in (torch.Tensor, torch.nn.Parameter):
            return f"the weight is a {type(weight).__name__}, not a plain tensor"
        if weight.dim() != (3 if experts else 2):
            return f"the weight is not a {3 if experts else 2}-D tensor"
        if weight.device.type == "meta":
            return "the weight is on the meta device (no values to quantize)"
        if weight.dtype not in SUPPORTED_DTYPES:
            return f"weight dtype {weight.dtype}"
        if weight.shape[-1] % BLOCK_SIZE:
            return f"in_features {weight.shape[-1]} not a multiple of {BLOCK_SIZE}"
        if tuple(weight.shape[-2:]) in self.skip_shapes:
            return f"shape {tuple(weight.shape[-2:])} is in skip_shapes"
        return None
