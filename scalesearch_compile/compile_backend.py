"""The ``"scalesearch"`` torch.compile backend: validate options, run the FX passes, hand off to Inductor.

``torch.compile(model, backend="scalesearch", options={...})`` finds :func:`scalesearch_backend` through the
``torch_dynamo_backends`` entry point (no import needed); ``scalesearch_compile.backend(**options)`` returns a
configured :class:`ScaleSearchBackend` to pass as ``backend=`` that also keeps the passes' reports.
Options (:class:`BackendOptions`): ``method``, ``window``, ``activations``, ``attention``, ``skip_modules``,
``skip_shapes``, ``impl``, ``inductor``. Every compiled graph logs one summary line per pass on the
``scalesearch_compile`` logger.
"""

import dataclasses
import logging
from dataclasses import dataclass

import torch

import scalesearch_compile.ops  # noqa: F401  (registers the scalesearch::* ops the passes insert)
from scalesearch_compile.attention import AttentionRecipe
from scalesearch_compile.ops.quantize import IMPLS
from scalesearch_compile.passes.attention import rewrite_attention
from scalesearch_compile.passes.linear import LinearRewrite, rewrite_linears
from scalesearch_compile.search import DEFAULT_WINDOW, check_method, check_window

logger = logging.getLogger("scalesearch_compile")

ACTIVATIONS = ("nvfp4", None)


@dataclass(frozen=True)
class BackendOptions:
    """What the backend rewrites and how.

    method / window: block-scale selection for weights quantized at compile time, for activations and inside
    attention. activations: "nvfp4" (W4A4, activations quantized at run time) or None (weight-only).
    attention: rewrite SDPA (True, the default recipe with ``method``/``window``), leave it (False), or an
    :class:`AttentionRecipe`. skip_modules: fnmatch patterns on module paths ("lm_head", "*.mlp.*").
    skip_shapes: (out_features, in_features) pairs to leave. impl: "auto", "reference" or "triton".
    inductor: compile the rewritten graph with Inductor (True) or run it as it is (False).
    """

    method: str = "search"
    window: tuple = DEFAULT_WINDOW
    activations: str | None = "nvfp4"
    attention: bool | AttentionRecipe = True
    skip_modules: tuple = ()
    skip_shapes: tuple = ()
    impl: str = "auto"
    inductor: bool = True

    def __post_init__(self):
        check_method(self.method)
        set_ = object.__setattr__
        set_(self, "window", check_window(self.window))
        if self.activations not in ACTIVATIONS:
            raise ValueError(f"activations must be 'nvfp4' or None, got {self.activations!r}")
        if not isinstance(self.attention, bool | AttentionRecipe):
            raise ValueError(f"attention must be True, False or an AttentionRecipe, got {self.attention!r}")
        if self.impl not in IMPLS:
            raise ValueError(f"unknown impl {self.impl!r}; expected one of {', '.join(IMPLS)}")
        if isinstance(self.skip_modules, str) or not all(isinstance(p, str) for p in self.skip_modules):
            raise ValueError(f"skip_modules must be a list of module-path patterns, got {self.skip_modules!r}")
        set_(self, "skip_modules", tuple(self.skip_modules))
        try:
            set_(self, "skip_shapes", tuple((int(n), int(k)) for n, k in self.skip_shapes))
        except (TypeError, ValueError):
            message = f"skip_shapes must be (out_features, in_features) pairs, got {self.skip_shapes!r}"
            raise ValueError(message) from None

    @classmethod
    def from_dict(cls, options: dict | None) -> "BackendOptions":
        """Options as ``torch.compile(..., options=...)`` passes them; unknown names raise ValueError."""
        options = dict(options or {})
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"unknown scalesearch backend option(s) {unknown}; valid options: {', '.join(known)}")
        return cls(**options)

    def attention_recipe(self) -> AttentionRecipe | None:
        if isinstance(self.attention, AttentionRecipe):
            return self.attention
        return AttentionRecipe(method=self.method, window=self.window) if self.attention else None


@dataclass(frozen=True)
class GraphReport:
    """The passes' reports for one graph handed to the backend; ``compile_id`` is Dynamo's ("0/1": frame 0,
    second compilation). Dynamo may hand the same compilation over twice (it restarts after Inductor adds
    a guard), so count compilations by distinct ``compile_id``."""

    compile_id: str
    passes: list


class ScaleSearchBackend:
    """A torch.compile backend with fixed options; ``reports`` holds a :class:`GraphReport` per graph."""

    def __init__(self, options: BackendOptions):
        self.options = options
        self.reports = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs, **torch_kwargs):
        o = self.options
        linear = LinearRewrite(o.method, o.window, o.activations, o.skip_modules, o.skip_shapes, o.impl)
        reports = [rewrite_linears(gm, example_inputs, linear)]
        recipe = o.attention_recipe()
        if recipe is not None:
            reports.append(rewrite_attention(gm, recipe, o.impl))
        self.reports.append(GraphReport(str(gm.meta.get("dynamo_compile_id")), reports))
        for report in reports:
            logger.info("scalesearch backend: %s", report.summary())
        if not o.inductor:
            return gm.forward
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        mode = torch_kwargs.get("mode")
        return compile_fx(gm, example_inputs, config_patches=list_mode_options(mode) if mode else None)

    def rewritten(self, kind: str) -> int:
        """How many calls of ``kind`` ("linear" or "attention") the compiled graphs rewrote, in total."""
        latest = {graph.compile_id: graph for graph in self.reports}  # a restarted compilation counts once
        return sum(len(r.rewritten) for graph in latest.values() for r in graph.passes if r.kind == kind)

    def compilations(self) -> int:
        """How many distinct Dynamo compilations reached this backend."""
        return len({graph.compile_id for graph in self.reports})


def backend(**options) -> ScaleSearchBackend:
    """A configured backend: ``torch.compile(model, backend=scalesearch_compile.backend(method="amax"))``."""
    return ScaleSearchBackend(BackendOptions.from_dict(options))


def scalesearch_backend(gm: torch.fx.GraphModule, example_inputs, options: dict | None = None, mode=None):
    """The ``"scalesearch"`` entry point: ``torch.compile(model, backend="scalesearch", options={...})``."""
    return ScaleSearchBackend(BackendOptions.from_dict(options))(gm, example_inputs, mode=mode)
