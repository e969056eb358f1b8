"""FX pass: linear layers -> ``scalesearch::nvfp4_linear``.

Matches, on the Dynamo graph, ``F.linear(x, W, b)``, ``x @ W.t()`` / ``x @ W.T`` / ``torch.matmul(x, W.t())``
(weight ``W`` of shape (N, K)) and ``x @ P`` (a parameter ``P`` of shape (K, N), used as ``W = P.t()``), where
the weight is a graph input holding a 2-D parameter or an already-quantized NVFP4 weight.

- A plain weight is quantized here, once, at compile time, with torchao's two-level scaling and the backend's
  block-scale method (``quantize_blocks``). The NVFP4 copy is stored on the graph module as constants
  (qdata uint8 (N, K/2), E4M3 scale codes uint8 (N, K/16), per-tensor scale float32) and the original weight
  stays in the model: compiling adds about 0.28x the bf16 weights' bytes (0.14x of float32 ones); use
  ``quantize_`` first to replace the weights instead. The copy is a snapshot: recompile after changing weights.
- An already-quantized weight (``ScaleSearchNVFP4Tensor`` from ``quantize_``, or a torchao ``NVFP4Tensor``)
  keeps its own bytes and its recorded activation mode.
Anything else (K not a multiple of 16, an unsupported dtype, NaN/Inf in a weight, a weight that is not a graph
input parameter, a skipped module) is left as it was and reported.
"""

import fnmatch
import operator
from dataclasses import dataclass

import torch
import torch.fx
from torch._dynamo.source import ConstantSource
from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor

from scalesearch_compile.passes import PassReport, source_name
from scalesearch_compile.search import checked_amax, quantize_blocks
from scalesearch_compile.tensor import NVFP4ActivationKwargs, ScaleSearchNVFP4Tensor

LINEAR_TARGETS = (torch._C._nn.linear, torch.nn.functional.linear)
MATMUL_TARGETS = (operator.matmul, torch.matmul)


@dataclass(frozen=True)
class LinearRewrite:
    """Settings of the pass: block-scale ``method`` and ``window`` for weights quantized here, ``activations``
    ("nvfp4" or None) for them, module-path patterns and (out, in) shapes to ``skip``, and the op's ``impl``."""

    method: str
    window: tuple
    activations: str | None
    skip_modules: tuple = ()
    skip_shapes: tuple = ()
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


def _match(node, values):
    """``(x, weight node, weight transposed?, bias)`` if ``node`` is a linear product, else None.

    ``transposed`` is True when the graph holds the weight as (K, N) and the linear weight is its transpose.
    """
    if node.op != "call_function":
        return None
    if node.target in LINEAR_TARGETS:
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        return node.args[0], node.args[1], False, bias
    if node.target in MATMUL_TARGETS and isinstance(node.args[1], torch.fx.Node):
        rhs = node.args[1]
        weight = _transposed_parameter(rhs)
        if weight is not None and weight in values:
            return node.args[0], weight, False, None
        if rhs in values:
            return node.args[0], rhs, True, None
    return None


def _quantized_parts(weight, transposed: bool, options: LinearRewrite):
    """``(qdata, scale codes, per-tensor scale, act method, act window)`` for the op, or a reason string."""
    if isinstance(weight, NVFP4Tensor):
        if transposed:
            return "a transposed NVFP4 weight"
        try:
            kwargs = None if weight.act_quant_kwargs is None else NVFP4ActivationKwargs(method="amax")
            weight = ScaleSearchNVFP4Tensor.from_nvfp4_tensor(weight, kwargs)
        except ValueError as err:
            return str(err)
    if isinstance(weight, ScaleSearchNVFP4Tensor):
        if transposed or weight.qdata.stride(-2) < weight.qdata.stride(-1):
            return "a transposed NVFP4 weight"
        act = weight.act_quant_kwargs
        return (
            weight.qdata,
            weight.scale.view(torch.uint8),
            weight.per_tensor_scale,
            None if act is None else act.method,
            [] if act is None else list(act.window),
        )
    if not isinstance(weight, torch.nn.Parameter) or weight.dim() != 2:
        return "the weight is not a 2-D parameter"
    w = weight.detach().t() if transposed else weight.detach()
    if tuple(w.shape) in options.skip_shapes:
        return f"shape {tuple(w.shape)} is in skip_shapes"
    try:
        checked_amax(w, "weight")
    except ValueError as err:
        return str(err)
    blocks = quantize_blocks(w.contiguous(), options.method, window=options.window)
    act_window = list(options.window) if options.activations else []
    act_method = options.method if options.activations else None
    return blocks.qdata, blocks.scale_codes, blocks.per_tensor_scale, act_method, act_window


def rewrite_linears(gm: torch.fx.GraphModule, example_inputs, options: LinearRewrite) -> PassReport:
    """Replace every matched linear product in ``gm`` by ``scalesearch::nvfp4_linear`` (module docstring)."""
    report = PassReport("linear")
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values = {node: value for node, value in zip(placeholders, example_inputs, strict=True)}
    for node in list(gm.graph.nodes):
        matched = _match(node, values)
        if matched is None:
            continue
        x, weight_node, transposed, bias = matched
        name = source_name(weight_node) if weight_node in values else weight_node.name
        if weight_node not in values:
            report.skipped.append((name, "the weight is computed in the graph, not a parameter"))
            continue
        module = name.rsplit(".", 1)[0]
        if any(fnmatch.fnmatchcase(module, pattern) for pattern in options.skip_modules):
            report.skipped.append((name, "matches skip_modules"))
            continue
        parts = _quantized_parts(values[weight_node], transposed, options)
        if isinstance(parts, str):
            report.skipped.append((name, parts))
            continue
        qdata, scale_codes, per_tensor_scale, act_method, act_window = parts
        with gm.graph.inserting_before(node):
            prefix = f"_scalesearch_{len(report.rewritten)}"
            constants = [_constant(gm, f"{prefix}_qdata", qdata), _constant(gm, f"{prefix}_scale", scale_codes)]
            constants.append(None if per_tensor_scale is None else _constant(gm, f"{prefix}_pts", per_tensor_scale))
            new = gm.graph.call_function(
                torch.ops.scalesearch.nvfp4_linear.default,
                (x, *constants, bias, act_method, act_window, options.impl),
            )
        node.replace_all_uses_with(new)
        new.meta.update(node.meta)
        gm.graph.erase_node(node)
        report.rewritten.append(name)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return report


def _constant(gm: torch.fx.GraphModule, name: str, tensor: torch.Tensor) -> torch.fx.Node:
    """A buffer of the graph module. AOTAutograd lifts buffers to inputs and, on a Dynamo graph, looks up each
    one's source: give it a constant one (a plain tensor attribute would reach fake tracing as a real tensor)."""
    gm.register_buffer(name, tensor)
    if hasattr(gm, "_param_name_to_source"):
        gm._param_name_to_source = {**gm._param_name_to_source, name: ConstantSource(name)}
    return gm.graph.get_attr(name)
