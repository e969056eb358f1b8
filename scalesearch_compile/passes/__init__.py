"""FX rewrites on the Dynamo graph: linear layers, SDPA and experts products -> ``scalesearch::*`` ops.

Each pass edits the graph in place and returns a :class:`PassReport` of what it rewrote and what it left as it
was (with the reason), which the backend logs.
"""

import operator
import re
from dataclasses import dataclass, field

import torch.fx
from torch._dynamo.source import ConstantSource

# what a parameter goes through on its way to a product: views, slices and casts
VIEW_METHODS = ("t", "transpose", "permute", "view", "reshape", "contiguous", "to", "float", "half", "bfloat16")
VIEW_FUNCTIONS = (torch.t, torch.transpose, torch.permute, torch.reshape, operator.getitem)


@dataclass
class PassReport:
    """What one pass did to one graph: ``rewritten`` names and ``skipped`` (name, reason) pairs."""

    kind: str
    rewritten: list = field(default_factory=list)
    skipped: list = field(default_factory=list)

    def summary(self) -> str:
        """One line, the skipped grouped by reason:
        ``linear: rewrote 7 of 9; left as they were: 2 x <reason> (lm_head.weight, pooler.dense.weight)``."""
        total = len(self.rewritten) + len(self.skipped)
        line = f"{self.kind}: rewrote {len(self.rewritten)} of {total}"
        by_reason = {}
        for name, reason in self.skipped:
            by_reason.setdefault(reason, []).append(name)
        if by_reason:
            groups = [
                f"{len(names)} x {reason} ({', '.join(dict.fromkeys(names))})" for reason, names in by_reason.items()
            ]
            line += "; left as they were: " + "; ".join(groups)
        return line


def source_name(node: torch.fx.Node) -> str:
    """A readable name for a placeholder: the module path of a parameter (``model.layers.0.q_proj.weight``),
    from Dynamo's source ``L['self']._modules['model']...._parameters['weight']``; else the node's name."""
    source = getattr(node.meta.get("grapharg"), "source", None)
    parts = re.findall(r"_(?:modules|parameters|buffers)\['([^']+)'\]", str(getattr(source, "name", "")))
    return ".".join(parts) if parts else node.name


def node_location(node: torch.fx.Node) -> str:
    """Where a call comes from in the user's code (``file:line``), for reports; else the node's name."""
    stack = node.meta.get("stack_trace") or ""
    frames = re.findall(r'File "([^"]+)", line (\d+)', stack)
    if frames:
        path, line = frames[-1]
        return f"{path.rsplit('/', 1)[-1]}:{line}"
    return node.name


def graph_constant(gm: torch.fx.GraphModule, name: str, tensor: torch.Tensor) -> torch.fx.Node:
    """A buffer of the graph module. AOTAutograd lifts buffers to inputs and, on a Dynamo graph, looks up each
    one's source: give it a constant one (a plain tensor attribute would reach fake tracing as a real tensor)."""
    gm.register_buffer(name, tensor)
    if hasattr(gm, "_param_name_to_source"):
        gm._param_name_to_source = {**gm._param_name_to_source, name: ConstantSource(name)}
    return gm.graph.get_attr(name)


def parameter_behind(node, values) -> torch.fx.Node | None:
    """The graph input holding a parameter that ``node`` is (a view, slice or cast of), or None."""
    while isinstance(node, torch.fx.Node):
        if node in values:
            return node if isinstance(values[node], torch.nn.Parameter) else None
        is_view = (node.op == "call_method" and node.target in VIEW_METHODS) or (
            node.op == "call_function" and (node.target in VIEW_FUNCTIONS or node.target is getattr)
        )
        if not is_view:
            return None
        node = node.args[0]
    return None
