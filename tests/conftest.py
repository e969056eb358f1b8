"""Shared test setup."""

import pytest
import torch
from hypothesis import settings

import scalesearch_demo  # noqa: F401  (first: imports torchao quietly, keeps the hub offline)

# Property tests run the same examples every time ("ci", loaded here); --hypothesis-profile=long (loaded by
# hypothesis after this file) runs 10,000 examples a test.
settings.register_profile("ci", derandomize=True)
settings.register_profile("long", max_examples=10_000)
settings.load_profile("ci")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: no cached graphs, and no automatic-dynamic shapes learned from an
    earlier test's inputs."""
    torch._dynamo.reset()
    yield


HOST_READS = ("aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::nonzero", "aten::equal")


@pytest.fixture
def host_reads():
    """``host_reads(fn)``: the ops ``fn()`` runs that read a tensor's value on the host, each a GPU
    synchronisation on CUDA (and a failure under CUDA-graph capture). Counted with the profiler, which also
    sees inside custom ops."""

    def count(fn) -> list[str]:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            fn()
        return [event.name for event in profile.events() if event.name in HOST_READS]

    return count


@pytest.fixture
def interpreted_dot_scaled(monkeypatch):
    """The Blackwell ``tl.dot_scaled`` paths of the kernels, run by Triton's interpreter on a CPU: the launchers
    are told the GPU has dot_scaled, and the interpreter, whose dot_scaled reads every scale byte as E8M0 (Triton
    3.9), reads float8e4nv scales as E4M3. This checks the kernels' own logic (operand order, transposes, scale
    layouts, NaN rows), not what the hardware computes; ``benchmarks/gpu_check.sh`` runs them on a GPU."""
    import numpy as np
    from triton.runtime import interpreter

    from scalesearch_compile.kernels import _nvfp4, attention, gemm

    if not _nvfp4.INTERPRET:
        pytest.skip("runs the dot_scaled paths under TRITON_INTERPRET=1")
    e8m0_scales = interpreter._dot_scaled_scale_to_f32

    def scales_to_float32(scale_handle, compute_type):
        if scale_handle.dtype == interpreter.tl.float8e4nv:
            codes = torch.from_numpy(scale_handle.data.view(np.uint8).copy())
            return codes.view(torch.float8_e4m3fn).float().numpy()
        return e8m0_scales(scale_handle, compute_type)

    monkeypatch.setattr(interpreter, "_dot_scaled_scale_to_f32", scales_to_float32)
    monkeypatch.setattr(
        gemm, "_use_dot_scaled", lambda requested, device, w4a16_dtype=None: w4a16_dtype != torch.float32
    )
    monkeypatch.setattr(attention, "_use_dot_scaled", lambda device: True)
