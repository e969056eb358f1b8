"""FX pass: linear layers -> ``scalesearch::nvfp4_linear``.

Matches, on the Dynamo graph, ``F.linear(x, W, b)``, ``x @ W.t()`` / ``x @ W.T`` / ``torch.matmul(x, W.t())``
/ ``torch.mm`` (weight ``W`` of shape (N, K)), ``x @ P`` and ``torch.addmm(b, x, P)`` (a parameter ``P`` of
shape (K, N), used as ``W = P.t()``: transformers' ``Conv1D``, the GPT-2 family's linear layer), where the
weight is a graph input holding a 2-D parameter or an already-quantized NVFP4 weight.

- A plain weight is quantized here, once, at compile time, by the backend's :class:`LinearPolicy` (which also
  decides what is left, and why, exactly as ``quantize_`` does). The NVFP4 copy is stored on the graph module
  as constants (qdata uint8 (N, K/2), E4M3 scale codes uint8 (N, K/16), per-tensor scale float32) and the
  original weight stays in the model: compiling adds about 0.28x the bf16 weights' bytes (0.14x of float32
  ones); use ``quantize_`` first to replace the weights instead. The copy is a snapshot: recompile after
  changing weights.
- An already-quantized weight (``ScaleSearchNVFP4Tensor`` from ``quantize_``, or a torchao ``NVFP4Tensor``)
  keeps its own bytes and its recorded activation mode.
- A weight that trains (a parameter requiring grad, compiled with grad mode on) becomes
  ``scalesearch::nvfp4_linear_qat``: quantized from its current value on every call, with straight-through
  gradients to the input, the weight and the bias (quantization-aware training).
Anything else (a weight the policy leaves, a weight that is not a graph input parameter) is left as it was and
reported.
"""

import operator
from dataclasses import dataclass

import torch
import torch.fx

from scalesearch_compile.ops.linear import activation_arguments
from scalesearch_compile.passes import PassReport, graph_constant, parameter_behind, source_name
from scalesearch_compile.policy import LinearPolicy, is_nvfp4
from scalesearch_compile.search import ScaleChoice
from scalesearch_compile.tensor import ScaleSearchNVFP4Tensor, nvfp4_weight

LINEAR_TARGETS = (torch._C._nn.linear, torch.nn.functional.linear)
MATMUL_TARGETS = (operator.matmul, torch.matmul, torch.mm)
ADDMM_TARGETS = (torch.addmm,)


@dataclass(frozen=True)
class LinearRewrite:
    """Settings of the pass: the :class:`LinearPolicy` for weights (which to quantize, how, which to leave)
    and the op's ``impl``."""

    policy: LinearPolicy
    impl: str = "auto"


def _transposed_parameter(node) -> torch.fx.Node | None:
    """The parameter node ``W`` behind ``W.t()`` or ``W.T``, else None."""
    if node.op == "call_method" and node.target == "t":
        return node.args[0]
    if node.op == "call_function" and node.target is torch.t:
        return node.args[0]
    if node.op == "call_function" and node.target is getattr and node.args[1] in ("T", "mT"):
        return node.args[0]
    return None


def match_linear(node, values):
    """``(x, weight node, weight transposed?, bias)`` if ``node`` is a linear product, else None.

    ``transposed`` is True when the graph holds the weight as (K, N) and the linear weight is its transpose.
    """
    if node.op != "call_function":
        return None
    if node.target in LINEAR_TARGETS:
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        return node.args[0], node.args[1], False, bias
    if node.target in MATMUL_TARGETS:
        bias, (x, rhs) = None, node.args[:2]
    elif node.target in ADDMM_TARGETS and all(node.kwargs.get(name, 1) == 1 for name in ("beta", "alpha")):
        bias, x, rhs = node.args[:3]
    else:
        return None
    if not isinstance(rhs, torch.fx.Node):
        return None
    weight = _transposed_parameter(rhs)
    if weight is not None and weight in values:
        return x, weight, False, bias
    if rhs in values:
        return x, rhs, True, bias
    return None


def _weight_and_activations(weight, transposed: bool, path: str, policy: LinearPolicy):
    """``(NVFP4Weight, activation ScaleChoice or None)`` for the op, or the reason the product is left."""
    if is_nvfp4(weight) and policy.exclude.match(path) is None:
        weight = weight.t() if transposed else weight  # a (K, N) operand: its transpose is the weight
        if isinstance(weight, ScaleSearchNVFP4Tensor) and weight.is_transposed:
            return "a transposed NVFP4 weight"
        if isinstance(weight, ScaleSearchNVFP4Tensor):
            return weight.nvfp4_weight(), weight.act_quant_kwargs
        try:
            nvfp4 = nvfp4_weight(weight)
        except ValueError as err:
            return str(err)
        # torchao's own W4A4 NVFP4Tensor quantizes activations with amax scales
        return nvfp4, None if weight.act_quant_kwargs is None else ScaleChoice("amax")
    if not isinstance(weight, torch.nn.Parameter):
        return "the weight is not a parameter"
    quantized = policy.quantize(weight.detach().t() if transposed else weight.detach(), path)
    if isinstance(quantized, str):
        return quantized
    return quantized.nvfp4_weight(), quantized.act_quant_kwargs


def rewrite_linears(gm: torch.fx.GraphModule, example_inputs, options: LinearRewrite) -> PassReport:
    """Replace every matched linear product in ``gm`` by ``scalesearch::nvfp4_linear`` (module docstring)."""
    report = PassReport("linear")
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values = {node: value for node, value in zip(placeholders, example_inputs, strict=True)}
    for node in list(gm.graph.nodes):
        matched = match_linear(node, values)
        if matched is None:
            continue
        x, weight_node, transposed, bias = matched
        if weight_node not in values:
            report.skipped.append(_computed_weight(weight_node, values))
            continue
        name, weight = source_name(weight_node), values[weight_node]
        path, policy, trains = name.rpartition(".")[0], options.policy, _trains(weight)
        if trains:  # only what can be known without values: the weight changes from call to call
            reason = policy.reason(weight.detach().t() if transposed else weight.detach(), path)
        else:
            parts = _weight_and_activations(weight, transposed, path, policy)
            reason = parts if isinstance(parts, str) else None
        if reason is not None:
            report.skipped.append((name, reason))
            continue
        with gm.graph.inserting_before(node):
            if trains:
                target, args = _quantization_aware(x, weight_node, bias, transposed, policy, options.impl)
                name += " (trains: re-quantized on every call)"
            else:
                target, args = _frozen(gm, x, parts, bias, options.impl, f"_scalesearch_{len(report.rewritten)}")
            new = gm.graph.call_function(target, args)
        node.replace_all_uses_with(new)
        new.meta.update(node.meta)
        gm.graph.erase_node(node)
        report.rewritten.append(name)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return report


def _computed_weight(weight_node, values) -> tuple[str, str]:
    """(name, reason) of a product whose weight is computed in the graph."""
    parameter = parameter_behind(weight_node, values)
    if parameter is not None and values[parameter].dim() == 3:
        reason = (
            "one expert's slice of an experts' weight (the eager experts loop, which cannot compile in one graph: "
            "use experts_implementation 'grouped_mm' or 'batched_mm', or quantize_ the model first)"
        )
        return source_name(parameter), reason
    return weight_node.name, "the weight is computed in the graph, not a parameter"


def _trains(weight) -> bool:
    """A plain weight that requires grad, compiled with grad mode on: it is quantized on every call, so that
    training updates reach the NVFP4 weight (Dynamo recompiles when grad mode changes)."""
    return isinstance(weight, torch.nn.Parameter) and weight.requires_grad and torch.is_grad_enabled()


def _quantization_aware(x, weight_node, bias, transposed: bool, policy: LinearPolicy, impl: str):
    """The target and arguments of ``scalesearch::nvfp4_linear_qat`` on the weight itself."""
    scales, act_args = policy.scales, activation_arguments(policy.act_quant_kwargs)
    args = (x, weight_node, bias, transposed, scales.method, list(scales.window), *act_args, impl)
    return torch.ops.scalesearch.nvfp4_linear_qat.default, args


def _frozen(gm: torch.fx.GraphModule, x, parts, bias, impl: str, prefix: str):
    """The target and arguments of ``scalesearch::nvfp4_linear`` on the NVFP4 weight ``parts``, stored as
    constants of ``gm`` (inserted where the graph is being built)."""
    weight, act = parts
    constants = [
        graph_constant(gm, f"{prefix}_qdata", weight.qdata),
        graph_constant(gm, f"{prefix}_scale", weight.scale_codes),
    ]
    pts = weight.per_tensor_scale
    constants.append(None if pts is None else graph_constant(gm, f"{prefix}_pts", pts))
    act_args = activation_arguments(act)
    return torch.ops.scalesearch.nvfp4_linear.default, (x, *constants, bias, *act_args, impl)
