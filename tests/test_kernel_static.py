"""benchmarks/kernel_static.py: the static SASS report, on one small build and on synthetic SASS."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_static.py"


@pytest.fixture(scope="module")
def kernel_static():
    spec = importlib.util.spec_from_file_location("kernel_static", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_one_small_build_gives_every_field(kernel_static, capsys, tmp_path):
    """One quantize config on sm_90a: the JSON records hold exactly the documented fields with sane values, and a
    saved run prints the same table again without compiling."""
    saved = tmp_path / "report.json"
    argv = ["--kernel", "quantize", "--config", "0", "--target", "90", "--jobs", "1", "--save", str(saved)]
    assert kernel_static.main([*argv, "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["variant"] for r in records] == ["quantize-amax", "quantize-search", "quantize-fast-search"]
    for record in records:
        assert tuple(record) == kernel_static.FIELDS
        assert record["kernel"] == "quantize" and record["target"] == "sm_90a" and record["unit"] == "element"
        assert record["config"] == "8x64 w4 s3" and record["m"] == 2048
        assert 0 < record["registers"] <= 255 and record["spill_bytes"] >= 0 and record["shared_bytes"] >= 0
        assert record["loop_instructions_per_unit"] > 0
    amax, search, fast = (r["loop_instructions_per_unit"] for r in records)
    assert amax < fast < search  # three candidates cost less than nine, more than one
    kernel_static.main(["--load", str(saved)])
    table = capsys.readouterr().out
    assert table.count("| quantize |") == 3 and "H100" in table


def test_every_kernel_has_cases_for_every_config_and_target(kernel_static):
    from scalesearch_compile.kernels import attention, gemm, quantize

    everything = kernel_static.cases()
    for kernel, module in (("gemm", gemm), ("attention", attention), ("quantize", quantize)):
        mine = [c for c in everything if c.kernel == kernel]
        assert {c.config_index for c in mine} == set(range(len(module.GPU_CONFIGS)))
        assert {c.target for c in mine} == {90, 100}
    decode = [c for c in everything if c.kernel == "gemm" and c.m == 1]
    assert all(c.job[3]["M"] == 1 for c in decode)  # M == 1 is a constant, as a launch makes it
    assert all("M" not in c.job[6] and c.job[6]["K"] == [["tt.divisibility", 16]] for c in decode)
    assert decode and all(gemm.GPU_CONFIGS[c.config_index].kwargs["BLOCK_M"] <= 16 for c in decode)  # as tuned


def test_every_sm100_build_the_autotuners_try_runs_dot_scaled_on_the_native_fp4_mma(kernel_static):
    """What the dot_scaled prunes rely on: each sm_100 W4A4 GEMM (at decode, with the weight rows as the MMA's M,
    and above), fused-prologue and attention build they keep lowers tl.dot_scaled to the block-scaled NVFP4
    tcgen05 MMA, with no 16-bit MMA beside it."""
    from scalesearch_compile.kernels._nvfp4 import compile_for_gpu

    kept = kernel_static.cases(kernels=["gemm"], variants=["w4a4"], targets=[100], m=2048)
    kept += kernel_static.cases(kernels=["gemm"], variants=["w4a4", "fused"], targets=[100], m=1)
    kept += kernel_static.cases(kernels=["attention"], variants=["attention"], targets=[100])
    assert len(kept) == 5  # 128 x 128 and 128 x 64 GEMM tiles, 16 x 128 at decode twice, the 128-row attention
    for ptx in compile_for_gpu([case.job for case in kept], stages=("ptx",)):
        assert "kind::mxf4nvf4.block_scale.block16" in ptx["ptx"] and "kind::f16" not in ptx["ptx"]


SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;                /* 0x0 */
        /*0010*/                   IADD3 R2, R1, 0x1, RZ ;               /* 0x0 */
        /*0020*/                   FADD R3, R2, R2 ;                     /* 0x0 */
        /*0030*/              @!P1 BRA 0x20 ;                            /* 0x0 */
        /*0040*/                   FMUL R3, R2, R2 ;                     /* 0x0 */
        /*0050*/               @P0 BRA 0x20 ;                            /* 0x0 */
        /*0060*/                   EXIT ;                                /* 0x0 */
        /*0070*/                   RET.REL.NODEC R2 0x0 ;                /* 0x0 */
        /*0080*/                   BRA 0x80;                             /* 0x0 */
"""


def test_steady_state_loop_is_the_last_outermost_backward_branch(kernel_static):
    instructions = kernel_static.sass_instructions(SASS)
    assert len(instructions) == 9
    loop = kernel_static.steady_state_loop(instructions)
    assert [address for address, _ in loop] == [0x20, 0x30, 0x40, 0x50]
    no_loop = [(a, t) for a, t in instructions if "BRA" not in t]
    assert len(kernel_static.steady_state_loop(no_loop)) == 5  # the main body up to EXIT
    assert len(kernel_static.steady_state_loop(instructions, main_loop=False)) == 7  # loops not over the work


def test_the_candidate_loop_counts_once_per_candidate(kernel_static):
    """The largest loop nested in the region (the search's candidates) issues its body ``trips`` times; the
    region's own back branch is not nested in it."""
    instructions = kernel_static.sass_instructions(SASS)
    outer = kernel_static.steady_state_loop(instructions)  # 0x20..0x50, the inner loop 0x20..0x30
    assert kernel_static.issued_instructions(outer, 1) == 4
    assert kernel_static.issued_instructions(outer, 8) == 4 + 7 * 2
    whole = kernel_static.steady_state_loop(instructions, main_loop=False)  # the outer loop is now nested
    assert kernel_static.issued_instructions(whole, 3) == 7 + 2 * 4


def test_ptxas_log_and_occupancy(kernel_static):
    log = (
        "ptxas info    : Function properties for k\n"
        "    40 bytes stack frame, 40 bytes spill stores, 36 bytes spill loads\n"
        "ptxas info    : Used 168 registers, used 1 barriers, 40 bytes spill stores, 36 bytes spill loads"
    )
    assert kernel_static.ptxas_numbers(log) == {"registers": 168, "spill_stores": 40, "spill_loads": 36}
    assert kernel_static.programs_per_sm(168, 0, 4) == 3  # 168 x 32 = 5376 registers a warp: 12 warps
    assert kernel_static.programs_per_sm(32, 100 * 1024, 4) == 2  # shared memory bounds it
    assert kernel_static.programs_per_sm(16, 0, 1) == 32
