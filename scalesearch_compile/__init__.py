"""scalesearch_compile: NVFP4 with searched block scales, for torchao and torch.compile."""

import logging
import os

# torchao prints two lines about CUDA-only extensions on CPU machines unless told to skip them, and torchao 0.18
# registers two Enum classes with torch's pytree, which logs a deprecation warning for each: import it quietly.
os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
_pytree_log = logging.getLogger("torch.utils._pytree")
_level = _pytree_log.level
_pytree_log.setLevel(logging.ERROR)
import torchao.prototype.mx_formats.nvfp4_tensor  # noqa: E402, F401
import torchao.quantization  # noqa: E402, F401

_pytree_log.setLevel(_level)

from scalesearch_compile.calibration import calibrate  # noqa: E402
from scalesearch_compile.compile_backend import backend  # noqa: E402
from scalesearch_compile.config import ScaleSearchConfig  # noqa: E402
from scalesearch_compile.ops.linear import nvfp4_linear  # noqa: E402
from scalesearch_compile.ops.quantize import nvfp4_quantize  # noqa: E402
from scalesearch_compile.search import METHODS, NVFP4Blocks, chosen_offsets, quantize_blocks  # noqa: E402
from scalesearch_compile.tensor import NVFP4ActivationKwargs, ScaleSearchNVFP4Tensor, quantize_nvfp4  # noqa: E402

__all__ = [
    "METHODS",
    "NVFP4ActivationKwargs",
    "NVFP4Blocks",
    "ScaleSearchConfig",
    "ScaleSearchNVFP4Tensor",
    "backend",
    "calibrate",
    "chosen_offsets",
    "nvfp4_linear",
    "nvfp4_quantize",
    "quantize_blocks",
    "quantize_nvfp4",
]
