"""``ScaleSearchConfig``: the torchao ``quantize_()`` config that turns linear weights into NVFP4 with searched
block scales (``ScaleSearchNVFP4Tensor``), weight-only (W4A16) or with NVFP4 activations at run time (W4A4).

``quantize_`` calls the handler once per selected module. So that a whole-model call can show one progress
bar and log one summary line, the handler finds the enclosing ``quantize_`` call's model and ``filter_fn``
(on the call stack), lists the modules that call will visit, and closes the bar and logs when the last one
is done. A call on a single layer (as transformers makes while loading) logs its line at DEBUG.
"""

import logging
import re
import sys
import types
from dataclasses import dataclass, field

import torch
from torchao.core.config import ALLOWED_AO_MODULES, AOBaseConfig
from torchao.quantization import quant_api
from torchao.quantization.transform_module import register_quantize_module_handler
from tqdm.auto import tqdm

import scalesearch_compile.ops.linear  # noqa: F401  (routes F.linear on the weights made here to the ops)
from scalesearch_compile.calibration import IMPORTANCE_BUFFER
from scalesearch_compile.search import BLOCK_SIZE, DEFAULT_WINDOW, SUPPORTED_DTYPES, check_method, check_window
from scalesearch_compile.tensor import NVFP4ActivationKwargs, quantize_weight

logger = logging.getLogger("scalesearch_compile")

ACTIVATIONS = ("nvfp4", None)


@dataclass
class ScaleSearchConfig(AOBaseConfig):
    """NVFP4 linear layers with searched block scales.

    ``method``: block-scale choice for weights and (W4A4) activations: "search" (default), "amax" (torchao's
    numbers), "four_over_six" or "exhaustive". ``activations``: "nvfp4" quantizes each linear's input at run
    time (blocks of 16, searched scales, dynamic per-tensor scale); None keeps it in high precision (weight
    only). ``window``: [lowest, highest] E4M3 code offset the search tries around the amax code. ``exclude``:
    regular expressions; a module whose name fully matches one is left as it is (names are known where
    ``quantize_`` walks a model; transformers, which quantizes layer by layer while loading, skips modules
    through ``TorchAoConfig(modules_to_not_convert=...)`` instead). ``progress``: show a tqdm
    bar when quantizing a whole model. Layers with in_features not a multiple of 16, an unsupported weight
    dtype or a NaN/Inf in the weight are left as they are and reported in the summary log line. Weights of
    layers passed through :func:`scalesearch_compile.calibrate` first are searched with its importance weights.
    """

    method: str = "search"
    activations: str | None = "nvfp4"
    window: list[int] = field(default_factory=lambda: list(DEFAULT_WINDOW))
    exclude: list[str] = field(default_factory=list)
    progress: bool = True

    def __post_init__(self):
        check_method(self.method)
        if self.activations not in ACTIVATIONS:
            raise ValueError(f"activations must be 'nvfp4' or None (weight only), got {self.activations!r}")
        self.window = list(check_window(self.window))  # a list: torchao's config JSON rejects tuples
        for pattern in self.exclude:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"exclude pattern {pattern!r} is not a regular expression: {error}") from None

    def activation_kwargs(self) -> NVFP4ActivationKwargs | None:
        """What the quantized weights record about their activations (None: weight only)."""
        return None if self.activations is None else NVFP4ActivationKwargs(self.method, tuple(self.window))


# transformers rebuilds the config from config.json by class name, looked up only in these modules.
ALLOWED_AO_MODULES.add(__name__)


def skip_reason(module: torch.nn.Module, name: str, config: ScaleSearchConfig) -> str | None:
    """Why ``module`` is left as it is, or None if it can be quantized."""
    if not isinstance(module, torch.nn.Linear):
        return f"not an nn.Linear ({type(module).__name__})"
    weight = module.weight
    if type(weight) not in (torch.Tensor, torch.nn.Parameter):
        return f"weight already quantized ({type(weight).__name__})"
    if any(re.fullmatch(pattern, name) for pattern in config.exclude):
        return "excluded"
    if weight.dtype not in SUPPORTED_DTYPES:
        return f"weight dtype {weight.dtype}"
    if module.in_features % BLOCK_SIZE:
        return f"in_features not a multiple of {BLOCK_SIZE}"
    if not torch.isfinite(weight).all():
        return "NaN or Inf in the weight"
    return None


def _linear_extra_repr(self):
    weight = self.weight
    act = "W4A4" if weight.act_quant_kwargs is not None else "W4A16"
    return f"in_features={self.in_features}, out_features={self.out_features}, weight=ScaleSearchNVFP4Tensor ({act})"


class _Run:
    """One ``quantize_`` call: how many handler calls it will make, the names of the modules, a progress bar,
    and the outcomes."""

    def __init__(self, frame, visits: list[tuple[torch.nn.Module, str]], config: ScaleSearchConfig):
        self.frame = frame
        self.names = {id(module): name for module, name in reversed(visits)}  # a shared module: first name
        self.expected = len(visits)
        self.quantized = 0
        self.skipped: dict[str, list[str]] = {}
        quiet = not config.progress or len(visits) < 2
        self.bar = tqdm(total=self.expected, desc="scalesearch quantize_", unit="layer", disable=quiet)
        self.config = config

    def expect(self, module: torch.nn.Module) -> None:
        """Count a call the walk did not foresee (it should not happen; the summary stays right if it does)."""
        self.names[id(module)] = ""
        self.expected += 1
        self.bar.total = self.expected

    def record(self, module: torch.nn.Module, reason: str | None) -> None:
        if reason is None:
            self.quantized += 1
        else:
            self.skipped.setdefault(reason, []).append(self.names[id(module)] or type(module).__name__)
        self.bar.update(1)

    @property
    def done(self) -> bool:
        return self.quantized + sum(map(len, self.skipped.values())) == self.expected

    def summary(self) -> str:
        c = self.config
        line = (
            f"scalesearch quantize_: {self.quantized} of {self.expected} layers to NVFP4 "
            f"(method={c.method}, activations={c.activations}, window={c.window})"
        )
        if self.skipped:
            count = sum(len(names) for names in self.skipped.values())
            details = "; ".join(
                f"{reason}: {', '.join(names[:8])}{', ...' if len(names) > 8 else ''}"
                for reason, names in self.skipped.items()
            )
            line += f"; skipped {count}: {details}"
        return line


_run: _Run | None = None


def _quantize_call_frame():
    """The frame of the torchao ``quantize_`` call the handler runs under, or None if called directly."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code is not quant_api.quantize_.__code__:
        frame = frame.f_back
    return frame


def _visits(module: torch.nn.Module, filter_fn, name: str = "") -> list[tuple[torch.nn.Module, str]]:
    """(module, name) of each handler call ``quantize_(module, config, filter_fn)`` makes: its own walk."""
    if filter_fn(module, name):
        return [(module, name)]
    return [
        visit
        for child_name, child in module.named_children()
        for visit in _visits(child, filter_fn, f"{name}.{child_name}" if name else child_name)
    ]


def _current_run(module: torch.nn.Module, config: ScaleSearchConfig) -> _Run:
    global _run
    frame = _quantize_call_frame()
    if frame is None or _run is None or _run.frame is not frame:
        filter_fn = None if frame is None else frame.f_locals.get("filter_fn")  # None under FqnToConfig
        visits = [] if filter_fn is None else _visits(frame.f_locals["model"], filter_fn)
        _run = _Run(frame, visits, config)
    if id(module) not in _run.names:
        _run.expect(module)
    return _run


def _finish(run: _Run) -> None:
    global _run
    run.bar.close()
    logger.log(logging.INFO if run.expected > 1 else logging.DEBUG, run.summary())
    _run = None


@register_quantize_module_handler(ScaleSearchConfig)
def _quantize_linear(module: torch.nn.Module, config: ScaleSearchConfig) -> torch.nn.Module:
    run = _current_run(module, config)
    reason = skip_reason(module, run.names.get(id(module), ""), config)
    if reason is None:
        importance = module._buffers.pop(IMPORTANCE_BUFFER, None)
        weight = quantize_weight(
            module.weight.detach(),
            config.method,
            window=config.window,
            importance=importance,
            act_quant_kwargs=config.activation_kwargs(),
        )
        module.weight = torch.nn.Parameter(weight, requires_grad=False)
        module.extra_repr = types.MethodType(_linear_extra_repr, module)
    run.record(module, reason)
    if run.done:
        _finish(run)
    return module
