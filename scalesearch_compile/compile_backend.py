"""The ``"scalesearch"`` torch.compile backend: validate options, run the FX passes, hand off to Inductor.

``torch.compile(model, backend="scalesearch", options={...})`` finds :func:`scalesearch_backend` through the
``torch_dynamo_backends`` entry point (no import needed); ``scalesearch_compile.backend(**options)`` returns a
configured :class:`ScaleSearchBackend` to pass as ``backend=`` that also keeps the passes' reports.
Options (:class:`BackendOptions`): ``method``, ``window``, ``activations``, ``activation_method``, ``attention``,
``skip_modules``, ``skip_shapes``, ``impl``, ``inductor``. Every compiled graph logs one summary line per pass on
the ``scalesearch_compile`` logger.
"""

import dataclasses
import logging
from dataclasses import dataclass

import torch

import scalesearch_compile.ops  # noqa: F401  (registers the scalesearch::* ops the passes insert)
from scalesearch_compile.attention import AttentionRecipe
from scalesearch_compile.ops.dispatch import check_impl
from scalesearch_compile.passes.attention import rewrite_attention
from scalesearch_compile.passes.experts import rewrite_experts
from scalesearch_compile.passes.linear import LinearRewrite, rewrite_linears
from scalesearch_compile.policy import LinearPolicy, ModulePatterns
from scalesearch_compile.search import ScaleChoice
from scalesearch_compile.tensor import activation_kwargs

logger = logging.getLogger("scalesearch_compile")


@dataclass(frozen=True)
class BackendOptions(ScaleChoice):
    """What the backend rewrites and how.

    method / window (a :class:`ScaleChoice`): block-scale selection for weights quantized at compile time, for
    activations and inside attention. activations: "nvfp4" (W4A4, activations quantized at run time) or None
    (weight-only). activation_method: the method for activations, None to take ``method`` with "search" run as
    "fast_search" (:meth:`ScaleChoice.at_run_time`). attention: rewrite SDPA (True, the default recipe with
    ``method``/``window``, P's scales as the recipe's ``p_method`` defaults: "four_over_six" for "search"), leave
    it (False), or an :class:`AttentionRecipe`. skip_modules: module-path patterns to leave, in the syntax of
    :mod:`scalesearch_compile.policy` (``["lm_head", "*.mlp.*", "re:..."]``), as ``ScaleSearchConfig.exclude``.
    skip_shapes: (out_features, in_features) pairs to leave. impl: "auto", "reference" or "triton".
    inductor: compile the rewritten graph with Inductor (True) or run it as it is (False).
    """

    activations: str | None = "nvfp4"
    activation_method: str | None = None
    attention: bool | AttentionRecipe = True
    skip_modules: tuple = ()
    skip_shapes: tuple = ()
    impl: str = "auto"
    inductor: bool = True

    def __post_init__(self):
        super().__post_init__()
        set_ = object.__setattr__
        activation_kwargs(self.activations, self, self.activation_method)  # validates
        if not isinstance(self.attention, bool | AttentionRecipe):
            raise ValueError(f"attention must be True, False or an AttentionRecipe, got {self.attention!r}")
        if not isinstance(self.inductor, bool):
            raise ValueError(f"inductor must be True or False, got {self.inductor!r}")
        check_impl(self.impl)
        try:
            set_(self, "skip_modules", ModulePatterns(self.skip_modules).patterns)
        except ValueError as error:
            raise ValueError(f"skip_modules: {error}") from None
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

    def linear_policy(self) -> LinearPolicy:
        scales = ScaleChoice.of(self)
        return LinearPolicy(
            scales,
            activation_kwargs(self.activations, scales, self.activation_method),
            ModulePatterns(self.skip_modules),
            frozenset(self.skip_shapes),
            self.impl,
        )

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
        reports = [rewrite_linears(gm, example_inputs, LinearRewrite(o.linear_policy(), o.impl))]
        recipe = o.attention_recipe()
        if recipe is not None:
            reports.append(rewrite_attention(gm, recipe, o.impl))
        reports.append(rewrite_experts(gm, example_inputs, o.linear_policy(), o.impl))
        self.reports.append(GraphReport(str(gm.meta.get("dynamo_compile_id")), reports))
        for report in reports:
            logger.info("scalesearch backend: %s", report.summary())
        if not o.inductor:
            return gm.forward
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        from scalesearch_compile.ops import lowering

        mode = torch_kwargs.get("mode")
        # the CPU lowering (ops.lowering): linear ops swapped for their traced reference; shared quantizations merged
        lowered = lowering.applies(example_inputs, o.impl)
        if lowered:
            lowering.lower(gm)
        post_grad = lowering.SharedQuantization(lowered)
        patches = {**(list_mode_options(mode) if mode else {}), "post_grad_custom_post_pass": post_grad}
        return compile_fx(gm, example_inputs, config_patches=patches)

    def rewritten(self, kind: str) -> int:
        """How many calls of ``kind`` ("linear", "attention" or "experts") the compiled graphs rewrote, in
        total."""
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
