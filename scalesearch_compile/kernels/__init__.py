"""Triton kernels (quantize with search, NVFP4 GEMM, attention); imported only where Triton can run."""
