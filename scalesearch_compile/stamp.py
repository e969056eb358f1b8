"""A hash of the source of the modules that define the numbers of a compiled CPU graph (``ops.lowering``), for
compile caches: Inductor and AOTAutograd key a compiled graph by the graph they are given, which names the
scalesearch ops or the weight tensors' types, not the PyTorch code traced for them."""

import functools
import hashlib
from pathlib import Path

# the modules a lowered graph is made of, relative to the package
SOURCES = (
    "formats.py",
    "layout.py",
    "search.py",
    "ops/dispatch.py",
    "ops/linear.py",
    "ops/lowering.py",
)


@functools.cache
def source_stamp() -> str:
    """blake2b (hex) of the names and bytes of ``SOURCES``."""
    package = Path(__file__).resolve().parent
    digest = hashlib.blake2b(digest_size=16)
    for name in SOURCES:
        digest.update(name.encode())
        digest.update((package / name).read_bytes())
    return digest.hexdigest()
