"""FX rewrites on the Dynamo graph: linear layers and SDPA -> ``scalesearch::*`` ops.

Each pass edits the graph in place and returns a :class:`PassReport` of what it rewrote and what it left as it
was (with the reason), which the backend logs.
"""

import re
from dataclasses import dataclass, field

import torch.fx


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
