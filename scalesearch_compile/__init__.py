"""scalesearch_compile: NVFP4 with searched block scales, for torchao and torch.compile."""

import os

# torchao prints two lines about CUDA-only extensions on CPU machines unless told to skip them.
os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

from scalesearch_compile.search import METHODS, NVFP4Blocks, chosen_offsets, quantize_blocks  # noqa: E402
from scalesearch_compile.tensor import quantize_nvfp4  # noqa: E402

__all__ = ["METHODS", "NVFP4Blocks", "chosen_offsets", "quantize_blocks", "quantize_nvfp4"]
