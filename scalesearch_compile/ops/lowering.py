"""CPU lowering of ``scalesearch::nvfp4_linear`` in compiled graphs: its PyTorch reference traced into the graph,
so that Inductor fuses it, while eager execution keeps calling the op.

On a CPU every op runs its reference. Called as an opaque custom op from a compiled graph, the reference runs
unfused, one PyTorch operation after another; traced into the graph instead (the very function the op runs,
``ops.linear.reference_linear``, on fake tensors), Inductor generates loops for it: the weight decode feeds the
matmul, and the scaling and bias fuse around it. The activations' search (W4A4) stays one call of
``scalesearch::quantize_nvfp4`` (``ops.linear.lowered_linear`` says why), and so does attention. The numbers do
not change: Inductor's CPU code keeps IEEE float32 semantics (no unsafe math, no contraction, a division stays a
division on CPU), so outputs differ at most by the order in which the matmul adds (``tests/test_lowering.py``).
The search functions themselves trace to the eager bits too (tested), for a later, more compact lowering.

Two routes, nothing global changed:
- the ``"scalesearch"`` backend hands Inductor :func:`inductor_decompositions` (its default table plus ours)
  for a graph on the CPU (:func:`applies`), so the linear ops its passes insert are decomposed by AOTAutograd
  (:func:`decompositions`);
- a ``quantize_``'d model under any backend: ``ScaleSearchNVFP4Tensor``'s matmul runs the lowered reference
  itself when its input is a fake tensor on a CPU (``dispatch.lowers``), so the traced graph holds no linear op.
Wherever the op would not run its reference on a CPU (CUDA tensors, or ``impl="triton"``) the op stays.

Inductor caches compiled graphs by the graph it is given, which names the ops, not what they decompose to:
``stamp.source_stamp()`` (a hash of the modules that define the numbers) goes into the backend's Inductor config
(:class:`SourceStamp`, a no-op custom pass whose ``uuid`` is that hash and whether the graph is lowered) and into
the weight tensors' cache key, so a change to the reference never reuses a stale compiled graph, and a graph
compiled with the op opaque is never reused where it should be lowered (nor the other way round).
"""

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass

from scalesearch_compile.ops.dispatch import kernel, lowers
from scalesearch_compile.ops.linear import lowered_linear
from scalesearch_compile.stamp import source_stamp

# op name -> (its name in ops.dispatch, the traceable function that replaces it)
_LOWERED = {"nvfp4_linear": ("linear", lowered_linear)}


def _decomposition(dispatch_name: str, body):
    def decompose(*args, **kwargs):
        x, impl = args[0], args[-1]  # a lowered op takes its input first and impl last
        return body(*args, **kwargs) if lowers(dispatch_name, x, impl) else NotImplemented

    return decompose


def decompositions() -> dict:
    """``{OpOverload: decomposition}`` of the lowered scalesearch ops (AOTAutograd's decomposition table format)."""
    return {
        getattr(torch.ops.scalesearch, name).default: _decomposition(dispatch_name, body)
        for name, (dispatch_name, body) in _LOWERED.items()
    }


def applies(example_inputs, impl: str) -> bool:
    """Whether a graph with these example inputs gets the lowering: every tensor on the CPU, where ``impl`` runs the
    reference. Decided per graph, because Inductor refuses an op that is in the decomposition table and is left in
    the graph (a decomposition that steps aside)."""
    devices = {t.device.type for t in example_inputs if isinstance(t, torch.Tensor)}
    return devices <= {"cpu"} and kernel("linear", impl, torch.device("cpu")) is None


def inductor_decompositions() -> dict:
    """Inductor's own decomposition table (as its current config selects it) with :func:`decompositions` added."""
    from torch._inductor.decomposition import select_decomp_table

    return {**select_decomp_table(), **decompositions()}


class SourceStamp(CustomGraphPass):
    """A custom Inductor pass that changes nothing: its ``uuid`` (``stamp.source_stamp()`` and ``lowered``) puts the
    lowering's source, and whether this graph's ops are decomposed, into Inductor's and AOTAutograd's cache keys
    (which see the graph before decomposition, so they cannot tell the two apart themselves)."""

    def __init__(self, lowered: bool):
        self.lowered = lowered

    def __call__(self, graph: torch.fx.Graph) -> None:
        return None

    def uuid(self) -> str:
        return f"{source_stamp()}-{'lowered' if self.lowered else 'opaque'}"
