"""FX pass: ``F.scaled_dot_product_attention`` -> ``scalesearch::nvfp4_attention``.

Matches every SDPA call of the Dynamo graph (one node on every device) and rewrites it when the call is inside
the op's contract (:func:`scalesearch_compile.attention.check_inputs`, checked on the traced example values):
causal or with a bool/additive mask, GQA, custom scale, and ``dropout_p`` a constant 0. Everything else (a
dropout, an unsupported head_dim, a scale computed in the graph) is left as SDPA and reported.
"""

import inspect

import torch
import torch.fx
import torch.nn.functional as F

from scalesearch_compile.attention import AttentionRecipe, check_inputs
from scalesearch_compile.passes import PassReport, node_location

SDPA_TARGETS = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)
# F.scaled_dot_product_attention is a builtin without a signature; its documented one:
_SDPA = inspect.Signature(
    [
        inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default)
        for name, default in (
            ("query", inspect.Parameter.empty),
            ("key", inspect.Parameter.empty),
            ("value", inspect.Parameter.empty),
            ("attn_mask", None),
            ("dropout_p", 0.0),
            ("is_causal", False),
            ("scale", None),
            ("enable_gqa", False),
        )
    ]
)


def _example(arg):
    return arg.meta.get("example_value") if isinstance(arg, torch.fx.Node) else arg


def _constant_scale(scale):
    """The softmax scale as a Python float or None; a scale computed from a symbolic head_dim (dynamic=True)
    is specialized here, which adds a guard on it (head_dim is fixed for a model in practice)."""
    value = _example(scale)
    return float(value) if isinstance(value, float | torch.SymFloat) else value


def _unsupported(call: inspect.BoundArguments) -> str | None:
    """Why this SDPA call cannot become NVFP4 attention, or None."""
    a = call.arguments
    if a["dropout_p"] != 0.0 or isinstance(a["dropout_p"], torch.fx.Node):
        return f"dropout_p={a['dropout_p']} (only 0 is supported)"
    for name in ("is_causal", "enable_gqa"):
        if not isinstance(a[name], bool):
            return f"{name} is not a constant"
    if not isinstance(_constant_scale(a["scale"]), float | None):
        return "scale is not a number"
    q, k, v = (_example(a[name]) for name in ("query", "key", "value"))
    if q is None or k is None or v is None:
        return "no traced example value"
    try:
        check_inputs(q, k, v, _example(a["attn_mask"]), a["is_causal"], a["enable_gqa"])
    except ValueError as err:
        return str(err)
    return None


def rewrite_attention(gm: torch.fx.GraphModule, recipe: AttentionRecipe, impl: str = "auto") -> PassReport:
    """Replace every supported SDPA call in ``gm`` by ``scalesearch::nvfp4_attention`` with ``recipe``."""
    report = PassReport("attention")
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in SDPA_TARGETS:
            continue
        call = _SDPA.bind(*node.args, **node.kwargs)
        call.apply_defaults()
        name = node_location(node)
        reason = _unsupported(call)
        if reason is not None:
            report.skipped.append((name, reason))
            continue
        a = call.arguments
        scale = _constant_scale(a["scale"])
        args = (a["query"], a["key"], a["value"], a["attn_mask"], a["is_causal"], scale, a["enable_gqa"])
        low, high = recipe.window
        options = (recipe.method, low, high, recipe.smooth_k, recipe.smooth_q, recipe.hadamard, recipe.sink_tiles)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(torch.ops.scalesearch.nvfp4_attention.default, (*args, *options, impl))
        node.replace_all_uses_with(new)
        new.meta.update(node.meta)
        gm.graph.erase_node(node)
        report.rewritten.append(name)
    gm.recompile()
    return report
