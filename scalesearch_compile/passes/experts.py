"""FX pass: mixture-of-experts products -> ``scalesearch::nvfp4_grouped_linear``; and a report of every other
product with a parameter operand that stays in float.

Matches, on the Dynamo graph, the products transformers' experts implementations compute with an experts
module's 3-D parameter ``P`` (``(E, N, K)``, or ``(E, K, N)`` for experts stored transposed, gpt-oss):

- ``grouped_mm``: ``torch._grouped_mm`` / ``F.grouped_mm`` / ``transformers::grouped_mm_fallback`` (what it
  runs under torch.compile for weights other than bfloat16) of ``(x, P.transpose(-2, -1), offs)`` (``P`` itself
  when stored transposed) -> ``scalesearch::nvfp4_grouped_linear(x, offs, ...)``;
- ``batched_mm``: ``torch.bmm(P[ids], x.unsqueeze(-1))`` (``torch.bmm(x.unsqueeze(1), P[ids])`` when stored
  transposed) -> :func:`scalesearch_compile.ops.grouped.gathered_linear`.

Both compile with ``fullgraph=True``. The eager loop (``experts_implementation="eager"``) slices one expert per
iteration under data-dependent control flow, where Dynamo breaks the graph; its ``F.linear(x, P[e])`` products
are reported by the linear pass, not rewritten.

Weights are quantized once, at compile time, by the backend's :class:`LinearPolicy` (a global scale per expert)
and stored on the graph module as constants, as the linear pass does; NVFP4 experts' weights from ``quantize_``
keep their bytes and their activation mode; weights that train are left (and reported).
"""

import operator

import torch
import torch.fx

from scalesearch_compile.ops.grouped import gathered_linear
from scalesearch_compile.ops.linear import activation_arguments
from scalesearch_compile.passes import PassReport, graph_constant, parameter_behind, source_name
from scalesearch_compile.passes.linear import match_linear
from scalesearch_compile.policy import LinearPolicy
from scalesearch_compile.tensor import ScaleSearchNVFP4Experts

GROUPED_TARGETS = tuple(
    fn for fn in (getattr(torch, "_grouped_mm", None), getattr(torch.nn.functional, "grouped_mm", None)) if fn
)
GROUPED_OPS = ("transformers::grouped_mm_fallback",)  # custom ops, matched by name (loaded with transformers)
PRODUCT_TARGETS = (
    torch.nn.functional.linear,
    torch._C._nn.linear,
    operator.matmul,
    torch.matmul,
    torch.mm,
    torch.bmm,
    torch.addmm,
    torch.baddbmm,
    torch.einsum,
    *GROUPED_TARGETS,
)


def _is_grouped(node: torch.fx.Node) -> bool:
    if node.target in GROUPED_TARGETS:
        return True
    return getattr(node.target, "_qualified_op_name", None) in GROUPED_OPS


def _is_product(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and (node.target in PRODUCT_TARGETS or _is_grouped(node))


def _swapped_last_dims(node) -> torch.fx.Node | None:
    """``P`` of ``P.transpose(-2, -1)`` (or ``P.mT``), else None."""
    if node.op == "call_method" and node.target == "transpose" or node.target is torch.transpose:
        if sorted(d % 3 for d in node.args[1:3]) == [1, 2]:
            return node.args[0]
    if node.op == "call_function" and node.target is getattr and node.args[1] == "mT":
        return node.args[0]
    return None


def _match(node, values):
    """``(kind, x, ids or offsets, parameter node, stored transposed)`` for an experts product, else None."""
    if node.op != "call_function":
        return None
    if _is_grouped(node):
        x, w = node.args[:2]
        offsets = node.args[2] if len(node.args) > 2 else node.kwargs.get("offs")
        extra = [*node.args[3:], node.kwargs.get("bias"), node.kwargs.get("out_dtype")]
        if offsets is None or any(a is not None for a in extra) or not isinstance(w, torch.fx.Node):
            return None
        behind = _swapped_last_dims(w)
        if behind in values:
            return "grouped", x, offsets, behind, False
        return ("grouped", x, offsets, w, True) if w in values else None
    if node.target is torch.bmm:
        for position, transposed in ((0, False), (1, True)):
            gathered = node.args[position]
            if (
                isinstance(gathered, torch.fx.Node)
                and gathered.target is operator.getitem
                and gathered.args[0] in values
                and isinstance(gathered.args[1], torch.fx.Node)
            ):
                return "batched", node.args[1 - position], gathered.args[1], gathered.args[0], transposed
    return None


def rewrite_experts(gm: torch.fx.GraphModule, example_inputs, policy: LinearPolicy, impl: str) -> PassReport:
    """Rewrite the experts products of ``gm`` (module docstring) and report every other product with a
    parameter operand that stays in float, unless the linear pass (``linear_matches``) already reported it."""
    report = PassReport("experts")
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values = dict(zip(placeholders, example_inputs, strict=True))
    weights = {}  # (parameter node, stored transposed) -> its constants and activation arguments, or a reason
    for node in list(gm.graph.nodes):
        matched = _match(node, values)
        if matched is None:
            if _is_product(node) and match_linear(node, values) is None:
                _report_float_product(node, values, report)
            continue
        kind, x, routing, weight_node, transposed = matched
        name = source_name(weight_node)
        key = (weight_node, transposed)
        with gm.graph.inserting_before(node):  # the constants, at the first use
            if key not in weights:
                weights[key] = _experts_weight(gm, values[weight_node], transposed, name, policy, len(weights))
            parts = weights[key]
            if isinstance(parts, str):
                report.skipped.append((name, parts))
                continue
            new = _product(gm, kind, x, routing, parts, transposed, impl)
        node.replace_all_uses_with(new)
        new.meta.update(node.meta)
        gm.graph.erase_node(node)
        report.rewritten.append(f"{name} ({kind}_mm)")
    if any(n.target in (torch.topk, "topk") for n in gm.graph.nodes):  # a graph that routes tokens
        _report_experts_outside(values, report)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return report


OUTSIDE = (
    "a router without its experts' products in the graph: Dynamo broke the graph at the eager experts loop's "
    "data-dependent control flow, and the experts run in float outside it (set experts_implementation to "
    "'grouped_mm' or 'batched_mm')"
)


def _report_experts_outside(values, report: PassReport) -> None:
    """Report the MoE blocks whose router is in a graph that routes (top-k) but whose experts' products are
    not in it."""
    blocks = {name.split(" ")[0].rsplit(".", 2)[0] for name in report.rewritten}
    blocks |= {name.rsplit(".", 2)[0] for name, _ in report.skipped}
    for node in values:
        *parent, module, tensor = ("." + source_name(node)).split(".")
        if module in ("gate", "router") and tensor == "weight" and ".".join(parent)[1:] not in blocks:
            report.skipped.append((".".join([*parent, "experts"])[1:], OUTSIDE))


def _experts_weight(gm, weight, transposed: bool, name: str, policy: LinearPolicy, index: int):
    """The constant nodes of the NVFP4 experts' weight and its activation arguments, or why it is left."""
    if isinstance(weight, ScaleSearchNVFP4Experts):
        quantized = weight.transpose(-2, -1) if transposed else weight
        if quantized.transposed or quantized.expert_ids is not None:
            return "a view of an NVFP4 experts' weight"
    elif not isinstance(weight, torch.nn.Parameter):
        return "the weight is not a parameter"
    elif weight.requires_grad and torch.is_grad_enabled():
        return "the experts' weights train (compile under torch.no_grad(), or quantize_ the model first)"
    else:
        quantized = policy.quantize_experts(weight.detach().transpose(-2, -1) if transposed else weight.detach(), name)
        if isinstance(quantized, str):
            return quantized
    w, prefix = quantized.nvfp4_weight(), f"_scalesearch_experts_{index}"
    constants = [
        graph_constant(gm, f"{prefix}_{field}", getattr(w, field))
        for field in ("qdata", "scale_codes", "per_tensor_scale")
    ]
    return constants, activation_arguments(quantized.act_quant_kwargs)


def _product(gm, kind: str, x, routing, parts, transposed: bool, impl: str) -> torch.fx.Node:
    """The replacement of one experts product, inserted where the graph is being built."""
    constants, act_args = parts
    graph = gm.graph
    if kind == "grouped":
        op = torch.ops.scalesearch.nvfp4_grouped_linear.default
        return graph.call_function(op, (x, routing, *constants, *act_args, impl))
    dim = 1 if transposed else -1  # bmm(x.unsqueeze(1), P[ids]) or bmm(P[ids], x.unsqueeze(-1))
    rows = graph.call_method("squeeze", (x, dim))
    out = graph.call_function(gathered_linear, (rows, routing, *constants, *act_args, impl))
    return graph.call_method("unsqueeze", (out, dim))


def _report_float_product(node, values, report: PassReport) -> None:
    """Report ``node``'s parameter operands, if any: the product stays in float."""
    target = getattr(node.target, "__name__", str(node.target))
    for arg in node.args:
        parameter = parameter_behind(arg, values)
        if parameter is not None:
            reason = f"a {target} product the backend does not rewrite"
            if values[parameter].dim() == 3 and arg is not parameter:
                reason = "an experts' weight used in a product the backend does not recognise"
            report.skipped.append((source_name(parameter), reason))
