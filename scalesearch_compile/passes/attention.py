"""FX pass: ``F.scaled_dot_product_attention`` -> ``scalesearch::nvfp4_attention``.

Matches every SDPA call of the Dynamo graph (one node on every device) and rewrites it when the call is inside
the op's contract (:func:`scalesearch_compile.attention.check_inputs`, checked on the traced example values):
causal or with a bool/additive mask, GQA, custom scale, and ``dropout_p`` a constant 0. A head_dim below the
op's smallest (a multiple of 16, e.g. MiniLM's 32) is zero-padded up to it, with the softmax scale of the
original head_dim and the output sliced back: exact for attention (zero channels add nothing to Q K^T, and
their NVFP4 blocks are exact zeros), at the cost of the padded width. Everything else (a dropout, another
head_dim, a scale that is not a number) is left as SDPA and reported.
"""

import inspect
import math

import torch
import torch.fx
import torch.nn.functional as F

from scalesearch_compile.attention import HEAD_DIMS, AttentionRecipe, check_inputs
from scalesearch_compile.ops.attention import recipe_args
from scalesearch_compile.passes import PassReport, node_location

QKV = ("query", "key", "value")
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


def _padded_dim(dim) -> int:
    """The head_dim the op runs: ``dim``, or the smallest supported one for a smaller multiple of 16."""
    return HEAD_DIMS[0] if dim < HEAD_DIMS[0] and dim % 16 == 0 else dim


def _with_padded_head_dim(t: torch.Tensor) -> torch.Tensor:
    return t.new_empty((*t.shape[:-1], _padded_dim(t.shape[-1])))


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
    q, k, v = (_example(a[name]) for name in QKV)
    if q is None or k is None or v is None:
        return "no traced example value"
    q, k, v = (_with_padded_head_dim(t) for t in (q, k, v))
    try:
        check_inputs(q, k, v, _example(a["attn_mask"]), a["is_causal"], a["enable_gqa"])
    except ValueError as err:
        return str(err)
    return None


def _pad_head_dim(graph: torch.fx.Graph, node: torch.fx.Node, dim: int) -> torch.fx.Node:
    pad = _padded_dim(dim) - dim
    return node if pad == 0 else graph.call_function(F.pad, (node, (0, pad)))


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
        qk_dim, v_dim = int(_example(a["query"]).shape[-1]), int(_example(a["value"]).shape[-1])
        scale = _constant_scale(a["scale"])
        if scale is None and _padded_dim(qk_dim) != qk_dim:
            scale = 1.0 / math.sqrt(qk_dim)  # SDPA's default, of the unpadded head_dim
        options = recipe_args(recipe)
        with gm.graph.inserting_before(node):
            q, k, v = (_pad_head_dim(gm.graph, a[n], dim) for n, dim in zip(QKV, (qk_dim, qk_dim, v_dim), strict=True))
            args = (q, k, v, a["attn_mask"], a["is_causal"], scale, a["enable_gqa"])
            new = gm.graph.call_function(torch.ops.scalesearch.nvfp4_attention.default, (*args, *options, impl))
            if _padded_dim(v_dim) != v_dim:
                new = gm.graph.call_function(torch.narrow, (new, -1, 0, v_dim))
        node.replace_all_uses_with(new)
        new.meta.update(node.meta)
        gm.graph.erase_node(node)
        padded = f" (head_dim {qk_dim} zero-padded to {_padded_dim(qk_dim)})" if _padded_dim(qk_dim) != qk_dim else ""
        report.rewritten.append(name + padded)
    gm.recompile()
    return report
