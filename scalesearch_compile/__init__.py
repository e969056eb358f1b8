"""scalesearch_compile: NVFP4 with searched block scales, for torchao and torch.compile.

Importing the package changes no process-wide state: no environment variable, logger level or torch flag.
"""

from scalesearch_compile.calibration import calibrate
from scalesearch_compile.compile_backend import backend
from scalesearch_compile.config import ScaleSearchConfig, quantize_model
from scalesearch_compile.export import export_checkpoint
from scalesearch_compile.gptq import gptq_quantize_
from scalesearch_compile.layout import NVFP4Blocks, NVFP4Weight
from scalesearch_compile.ops.grouped import grouped_linear
from scalesearch_compile.ops.linear import nvfp4_linear
from scalesearch_compile.ops.quantize import nvfp4_quantize
from scalesearch_compile.policy import is_quantizable
from scalesearch_compile.search import METHODS, ScaleChoice, chosen_offsets, quantize_blocks
from scalesearch_compile.tensor import (
    NVFP4ActivationKwargs,
    ScaleSearchNVFP4Experts,
    ScaleSearchNVFP4Tensor,
    quantize_experts,
    quantize_nvfp4,
)

__all__ = [
    "METHODS",
    "NVFP4ActivationKwargs",
    "NVFP4Blocks",
    "NVFP4Weight",
    "ScaleChoice",
    "ScaleSearchConfig",
    "ScaleSearchNVFP4Experts",
    "ScaleSearchNVFP4Tensor",
    "backend",
    "calibrate",
    "chosen_offsets",
    "export_checkpoint",
    "gptq_quantize_",
    "grouped_linear",
    "is_quantizable",
    "nvfp4_linear",
    "nvfp4_quantize",
    "quantize_blocks",
    "quantize_experts",
    "quantize_model",
    "quantize_nvfp4",
]
