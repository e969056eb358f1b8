"""CPU lowering of ``scalesearch::nvfp4_linear`` in compiled graphs: its PyTorch reference traced into the graph,
so that Inductor fuses it, while eager execution keeps calling the op.

On a CPU the linear op runs its reference. Called as an opaque custom op from a compiled graph, the reference runs
unfused, one PyTorch operation after another; traced into the graph instead (the very function the op runs,
``ops.linear.reference_linear``, on fake tensors), Inductor generates loops for it: the weight decode feeds the
matmul, and the scaling and bias fuse around it. The activations' search (W4A4) stays one call of
``scalesearch::fake_quantize_nvfp4`` (``ops.linear.lowered_linear`` says why), which runs the C++ kernel that
quantizes and decodes them in one pass, and attention stays one call of its op. The numbers do not change:
Inductor's CPU code keeps IEEE float32 semantics (no unsafe math, no contraction, a division stays a division on
CPU), so outputs differ at most by the order in which the matmul adds (``tests/test_lowering.py``).

Two routes, nothing global changed:
- the ``"scalesearch"`` backend, for a graph on the CPU that needs no gradient (:func:`applies`), swaps the calls
  of the linear op its passes insert for :func:`~scalesearch_compile.ops.linear.lowered_linear` (:func:`lower`)
  before AOTAutograd traces the graph (a function of the graph is traced like the model's own code, in-place
  operations functionalized; with a gradient, the op's straight-through backward is kept instead);
- a ``quantize_``'d model under any backend: ``ScaleSearchNVFP4Tensor``'s matmul runs the lowered reference
  itself when its input is a fake tensor on a CPU (``dispatch.lowers``), below autograd, so the traced graph
  holds no linear op.
Wherever the op would not run its reference on a CPU (CUDA tensors, or ``impl="triton"``) the op stays.

After AOTAutograd, the backend's post-grad pass (:class:`SharedQuantization`) merges quantizations of the same
activations (q, k and v projections share their input), on every device. On a CPU the trace already shares them,
under any backend (``ops.linear._TracedQuantizations``): plain ``torch.compile`` of a ``quantize_``'d model too.

Inductor caches compiled graphs by the graph it is given: ``stamp.source_stamp()`` (a hash of the modules that
define the numbers) goes into the backend's Inductor config (the ``uuid`` of :class:`SharedQuantization`, with
whether the graph is lowered) and into the weight tensors' cache key, so a change to the reference never reuses
a stale compiled graph, and a graph compiled with the op opaque is never reused where it should be lowered (nor
the other way round).
"""

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from scalesearch_compile.ops.dispatch import kernel
from scalesearch_compile.ops.linear import lowered_linear
from scalesearch_compile.stamp import source_stamp


def lowered_functions() -> dict:
    """``{OpOverload: traceable function of the same arguments}`` of the ops the backend lowers."""
    return {torch.ops.scalesearch.nvfp4_linear.default: lowered_linear}


def applies(example_inputs, impl: str) -> bool:
    """Whether a graph with these example inputs gets the lowering: every tensor on the CPU, where ``impl`` runs the
    reference, and no gradient wanted (grad mode off, or no input requiring grad; Dynamo recompiles when grad mode
    changes)."""
    tensors = [t for t in example_inputs if isinstance(t, torch.Tensor)]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return {t.device.type for t in tensors} <= {"cpu"} and kernel("linear", impl, torch.device("cpu")) is None


def lower(gm: torch.fx.GraphModule) -> None:
    """Swap every call of a lowered op in ``gm`` for its traceable function (:func:`lowered_functions`)."""
    functions = lowered_functions()
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in functions:
            node.target = functions[node.target]
    gm.recompile()


# ops whose result a quantization's argument key replaces by what they compute (see _key)
_SAME_VALUES = (
    torch.ops.aten.reshape.default,
    torch.ops.aten.view.default,
    torch.ops.aten._unsafe_view.default,
    torch.ops.prims.convert_element_type.default,
)


def _key(value):
    """A hashable stand-in for an FX argument: a node by identity, except a reshape or cast, which stands for what
    it computes (every projection of one tensor reshapes it anew); lists as tuples."""
    if isinstance(value, torch.fx.Node) and value.op == "call_function" and value.target in _SAME_VALUES:
        return (value.target, _key(value.args), _key(value.kwargs))
    if isinstance(value, list | tuple):
        return tuple(_key(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _key(v)) for k, v in value.items()))
    return value


def merge_shared_quantization(graph: torch.fx.Graph) -> None:
    """Merge the calls of ``scalesearch::quantize_nvfp4`` (or ``fake_quantize_nvfp4``) with the same arguments (the
    q, k and v projections of an attention layer quantize the same activations): the ops are pure functions, so the
    first call's results serve every later one."""
    targets = {torch.ops.scalesearch.quantize_nvfp4.default, torch.ops.scalesearch.fake_quantize_nvfp4.default}
    first = {}
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in targets:
            continue
        key = (node.target, _key(node.args), _key(node.kwargs))
        if key in first:
            node.replace_all_uses_with(first[key])
            graph.erase_node(node)
        else:
            first[key] = node


class SharedQuantization(CustomGraphPass):
    """The backend's post-grad Inductor pass: :func:`merge_shared_quantization`. Its ``uuid``
    (``stamp.source_stamp()`` and ``lowered``) puts the lowering's source, and whether this graph's ops are
    lowered, into Inductor's and AOTAutograd's cache keys."""

    def __init__(self, lowered: bool):
        self.lowered = lowered

    def __call__(self, graph: torch.fx.Graph) -> None:
        merge_shared_quantization(graph)

    def uuid(self) -> str:
        return f"{source_stamp()}-{'lowered' if self.lowered else 'opaque'}"
