"""benchmarks/gpu_check.py: the plan, the test selection, the dry run, and the timing rows with a fake timer."""

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # the timing rows run the kernels here

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_only_tests_are_the_ones_skipped_without_cuda(gpu_check):
    found = gpu_check.gpu_only_tests()
    assert "tests/test_kernel_gemm.py::test_gpu_llm_shape_fused_equals_unfused" in found
    assert "tests/test_kernel_gemm.py::test_dot_scaled_matches_float64" in found  # needs Blackwell
    assert "tests/test_kernel_quantize.py::test_gpu_large_tensor_bitwise" in found
    assert not any("refus" in node for node in found)  # skipped ON Blackwell: runs anywhere else
    assert all(node.split("::")[0] in {f"tests/{p.name}" for p in (ROOT / "tests").glob("test_*.py")} for node in found)


def test_step_limits_fit_in_eight_minutes(gpu_check):
    assert sum(limit for _, limit in gpu_check.STEPS) <= gpu_check.BUDGET_S < 8 * 60


def test_dry_run_prints_the_plan_and_builds(tmp_path):
    """The shell entry point without a GPU: the plan, then one small build for each target."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    static = "--kernel quantize --config 0 --variant quantize-amax"
    command = [str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--static-args", static]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "GPU-only tests" in done.stdout and "test_gpu_large_tensor_bitwise" in done.stdout
    assert done.stdout.count("| quantize | quantize-amax |") == 2  # sm_90a and sm_100a


def test_timing_rows_with_a_fake_timer(gpu_check):
    """The timing code runs end to end on tiny shapes (the interpreter here); the timer is a stand-in, so the
    numbers mean nothing: only the rows' shape is checked."""
    rows = [
        *gpu_check.gemm_rows(lambda fn: (fn(), 1e-3)[1], "cpu", m_values=(1,), shapes=((32, 64),)),
        *gpu_check.attention_rows(lambda fn: (fn(), 2e-3)[1], "cpu", shapes=((1, 2, 1, 64, 64),)),
        *gpu_check.quantize_rows(lambda fn: (fn(), 1e-3)[1], "cpu", shapes=((4, 64),)),
    ]
    kinds = [row[2] for row in rows]
    assert kinds == [
        "bf16",
        "w4a16",
        "w4a4 fused",
        "w4a4 + quantize",
        "bf16 SDPA",
        "nvfp4 (P four_over_six, default)",
        "nvfp4 P fast_search",
        "nvfp4 P amax",
        "nvfp4 P search",
        "torchao amax",
        "amax",
        "fast_search",
        "search",
    ]
    assert all(len(row) == len(gpu_check.BENCHMARK_HEADER) and row[4] == "1.00x" for row in rows)
