"""``ScaleSearchConfig``: the torchao ``quantize_()`` config that turns linear weights into NVFP4 with searched
block scales (``ScaleSearchNVFP4Tensor``), weight-only (W4A16) or with NVFP4 activations at run time (W4A4);
and :func:`quantize_model`, the same on a whole model with module names, a progress bar and a summary.

torchao's ``quantize_`` calls the config's handler once per selected module and tells it nothing else: not the
module's name, not how many calls will follow. So the handler is stateless, like torchao's own: it quantizes
the module or leaves it, and logs one line (INFO when it leaves a linear layer, with the reason; DEBUG when it
quantizes one). :func:`quantize_model` walks the model as ``quantize_`` does, knowing each module's path, so it
also applies ``exclude``, shows one progress bar and logs one summary line.
"""

import logging
import types
from dataclasses import dataclass, field

import torch
from torchao.core.config import ALLOWED_AO_MODULES, AOBaseConfig
from torchao.quantization.transform_module import register_quantize_module_handler
from tqdm.auto import tqdm

import scalesearch_compile.ops  # noqa: F401  (routes the products of the weights made here to the ops)
from scalesearch_compile.calibration import IMPORTANCE_BUFFER
from scalesearch_compile.policy import (
    LinearPolicy,
    ModulePatterns,
    experts_weights,
    is_linear_layer,
    is_quantizable,
    stores_weight_transposed,
)
from scalesearch_compile.search import DEFAULT_WINDOW, ScaleChoice
from scalesearch_compile.tensor import activation_kwargs

logger = logging.getLogger("scalesearch_compile")


@dataclass
class ScaleSearchConfig(AOBaseConfig):
    """NVFP4 linear layers with searched block scales.

    ``method``: block-scale choice for weights and (W4A4) activations: "search" (default), "amax" (torchao's
    numbers), "four_over_six" or "exhaustive". ``activations``: "nvfp4" quantizes each linear's input at run
    time (blocks of 16, searched scales, dynamic per-tensor scale); None keeps it in high precision (weight
    only). ``activation_method``: the method for activations; None (the default) takes ``method``, with "search"
    run as "fast_search" (three candidate scales instead of nine: activations are quantized in every forward).
    ``window``: [lowest, highest] E4M3 code offset the search tries around the amax code. ``exclude``:
    module-path patterns to leave as they are (``["lm_head", "*.mlp.*", "re:..."]``, the syntax of
    :mod:`scalesearch_compile.policy`); they need module names, so they apply through :func:`quantize_model`
    (torchao's ``quantize_`` refuses a config with patterns; transformers skips modules through
    ``TorchAoConfig(modules_to_not_convert=...)``). ``progress``: :func:`quantize_model` shows a tqdm bar.
    Layers that cannot be quantized (:class:`LinearPolicy`: in_features not a multiple of 16, an unsupported
    weight dtype, a NaN/Inf in the weight, ...) are left as they are and reported. Weights of layers passed
    through :func:`scalesearch_compile.calibrate` first are searched with its importance weights.
    """

    method: str = "search"
    activations: str | None = "nvfp4"
    window: list[int] = field(default_factory=lambda: list(DEFAULT_WINDOW))
    exclude: list[str] = field(default_factory=list)
    activation_method: str | None = None
    progress: bool = True

    def __post_init__(self):
        scales = ScaleChoice(self.method, self.window)
        activation_kwargs(self.activations, scales, self.activation_method)  # validates
        self.window = list(scales.window)  # a list: torchao's config JSON rejects tuples
        try:
            self.exclude = list(ModulePatterns(self.exclude).patterns)
        except ValueError as error:
            raise ValueError(f"exclude: {error}") from None
        if not isinstance(self.progress, bool):
            raise ValueError(f"progress must be True or False, got {self.progress!r}")

    def policy(self) -> LinearPolicy:
        """The :class:`LinearPolicy` this config applies to each linear layer."""
        scales = ScaleChoice(self.method, self.window)
        act = activation_kwargs(self.activations, scales, self.activation_method)
        return LinearPolicy(scales, act, ModulePatterns(self.exclude))


# transformers rebuilds the config from config.json by class name, looked up only in these modules.
ALLOWED_AO_MODULES.add(__name__)


def _linear_extra_repr(self):
    weight = self.weight
    act = "W4A4" if weight.act_quant_kwargs is not None else "W4A16"
    return f"in_features={self.in_features}, out_features={self.out_features}, weight=ScaleSearchNVFP4Tensor ({act})"


def _quantize_module(module: torch.nn.Module, policy: LinearPolicy, path: str, names=None) -> str | None:
    """Quantize a linear layer or a mixture-of-experts experts module in place; None, or why it is left."""
    if is_linear_layer(module) and names in (None, ["weight"]):
        return _quantize_linear(module, policy, path)
    if experts_weights(module):
        return _quantize_experts(module, policy, path, names or experts_weights(module))
    return f"not a linear layer or a mixture-of-experts experts module ({type(module).__name__})"


def _quantize_linear(module: torch.nn.Module, policy: LinearPolicy, path: str) -> str | None:
    """Replace a linear layer's weight by its NVFP4 weight (searched with the importance weights that
    :func:`scalesearch_compile.calibrate` attached, which it consumes). A ``Conv1D``'s weight, stored (in, out),
    is quantized as its transpose and stored as the transposed view."""
    transposed = stores_weight_transposed(module)
    weight = module.weight.t() if transposed else module.weight
    quantized = policy.quantize(weight, path, module._buffers.get(IMPORTANCE_BUFFER))
    if isinstance(quantized, str):
        return quantized
    module._buffers.pop(IMPORTANCE_BUFFER, None)
    replace_linear_weight(module, quantized, transposed)
    return None


def replace_linear_weight(module: torch.nn.Module, quantized, transposed: bool) -> None:
    """Make ``quantized`` (a ScaleSearchNVFP4Tensor) the frozen weight of a linear layer; ``transposed``: the
    layer stores its weight (in, out), as transformers' ``Conv1D``."""
    module.weight = torch.nn.Parameter(quantized.t() if transposed else quantized, requires_grad=False)
    if isinstance(module, torch.nn.Linear):
        module.extra_repr = types.MethodType(_linear_extra_repr, module)


def _quantize_experts(module: torch.nn.Module, policy: LinearPolicy, path: str, names: list) -> str | None:
    """Replace the experts' weights ``names`` by NVFP4 ones, all or none. Weights stored transposed
    (``is_transposed``: ``(experts, in, out)``, gpt-oss) are quantized along their input dimension and stored as
    the transposed view."""
    unknown = [name for name in names if name not in experts_weights(module)]
    if unknown:
        return f"{type(module).__name__} has no experts' weight {unknown[0]!r}"
    transposed, quantized = bool(module.is_transposed), {}
    for name in names:
        weight = module._parameters[name]
        result = policy.quantize_experts(weight.transpose(-2, -1) if transposed else weight, path)
        if isinstance(result, str):
            return f"{name}: {result}"
        quantized[name] = result.transpose(-2, -1) if transposed else result
    for name, weight in quantized.items():
        setattr(module, name, torch.nn.Parameter(weight, requires_grad=False))
    return None


@register_quantize_module_handler(ScaleSearchConfig)
def _quantize_handler(
    module: torch.nn.Module, config: ScaleSearchConfig, *, parameter_name: str | None = None
) -> torch.nn.Module:
    """torchao's handler for one module (module docstring); ``parameter_name``: only that parameter (torchao's
    ``FqnToConfig`` keyed by a parameter's name, which transformers uses for experts' weights)."""
    if config.exclude:
        raise ValueError(
            "ScaleSearchConfig.exclude needs module names, which torchao's quantize_ does not give a config: "
            "call scalesearch_compile.quantize_model(model, config) (the same walk, with names, a progress bar "
            "and a summary), or leave modules out with quantize_'s filter_fn (with transformers: "
            "TorchAoConfig(modules_to_not_convert=...))"
        )
    names = None if parameter_name is None else [parameter_name]
    reason = _quantize_module(module, config.policy(), "", names)
    if reason is None:
        logger.debug("scalesearch quantize_: %r to NVFP4 (%s)", module, _settings(config))
    elif is_quantizable(module):
        logger.info("scalesearch quantize_: left %r as it was: %s", module, reason)
    return module


def _settings(config: ScaleSearchConfig) -> str:
    act = config.policy().act_quant_kwargs
    activations = "none" if act is None else f"nvfp4 ({act.method})"
    return f"method={config.method}, activations={activations}, window={config.window}"


@dataclass
class QuantizeSummary:
    """What :func:`quantize_model` did: the paths of the ``quantized`` modules, ``experts`` (experts module path
    -> number of experts) among them, and the ``skipped`` ones by reason (a module reached twice, shared by two
    parents, counts twice)."""

    config: ScaleSearchConfig
    quantized: list = field(default_factory=list)
    experts: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)
    label: str = "quantize_"

    def record(self, module: torch.nn.Module, path: str, reason: str | None) -> None:
        if reason is not None:
            self.skipped.setdefault(reason, []).append(path)
            return
        self.quantized.append(path)
        names = experts_weights(module)
        if names:
            self.experts[path] = getattr(module, names[0]).shape[0]

    def line(self) -> str:
        """One line: ``scalesearch quantize_: 7 of 9 layers to NVFP4 (...); experts: 2 blocks x 4 experts
        quantized; skipped 2: <reason>: a, b; ...``."""
        skipped = sum(len(paths) for paths in self.skipped.values())
        total = len(self.quantized) + skipped
        layers = len(self.quantized) - len(self.experts)
        line = (
            f"scalesearch quantize_: {layers} of {total - len(self.experts)} layers to NVFP4 ({_settings(self.config)})"
        )
        if self.experts:
            counts = {}
            for experts in self.experts.values():
                counts[experts] = counts.get(experts, 0) + 1
            blocks = ", ".join(f"{n} block{'s' * (n > 1)} x {e} experts" for e, n in counts.items())
            line += f"; experts: {blocks} quantized"
        if self.skipped:
            details = "; ".join(
                f"{reason}: {', '.join(paths[:8])}{', ...' if len(paths) > 8 else ''}"
                for reason, paths in self.skipped.items()
            )
            line += f"; skipped {skipped}: {details}"
        return line


def _visits(module: torch.nn.Module, filter_fn, path: str = "") -> list[tuple[torch.nn.Module, str]]:
    """(module, path) of each module ``quantize_(module, config, filter_fn)`` hands its handler, in its order:
    a module the filter selects is not searched further."""
    if filter_fn(module, path):
        return [(module, path)]
    return [
        visit
        for name, child in module.named_children()
        for visit in _visits(child, filter_fn, f"{path}.{name}" if path else name)
    ]


def quantize_model(model: torch.nn.Module, config: ScaleSearchConfig | None = None, filter_fn=None) -> QuantizeSummary:
    """``quantize_(model, config, filter_fn)`` with module names: the same modules quantized the same way, plus
    ``config.exclude`` applied, a progress bar (``config.progress``, for more than one module) and one summary
    line logged at INFO on the ``scalesearch_compile`` logger. ``filter_fn(module, path)`` defaults to
    :func:`~scalesearch_compile.policy.is_quantizable` (``nn.Linear``, transformers' ``Conv1D`` and
    mixture-of-experts experts modules). Returns the :class:`QuantizeSummary`."""
    config = ScaleSearchConfig() if config is None else config
    if not isinstance(config, ScaleSearchConfig):
        raise ValueError(f"config must be a ScaleSearchConfig, got {type(config).__name__}")
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    policy = config.policy()
    visits = _visits(model, filter_fn or is_quantizable)
    summary = QuantizeSummary(config)
    quiet = not config.progress or len(visits) < 2
    for module, path in tqdm(visits, desc="scalesearch quantize_", unit="layer", disable=quiet):
        summary.record(module, path, _quantize_module(module, policy, path))
    logger.info(summary.line())
    return summary
