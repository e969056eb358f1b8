"""Static SASS report of the Triton kernels (issue 13): registers, spills, shared memory and instructions per
unit of work, read from the machine code of sm_90a (Hopper) and sm_100a (Blackwell) builds, with no GPU.

    python benchmarks/kernel_static.py [--kernel gemm] [--variant w4a16] [--config 4] [--target 90] [--json]

Each kernel is compiled for every GPU autotune config its autotuner tries for the shape (the kernel modules'
``GPU_CONFIGS``, not the single interpreter config; at decode the GEMM keeps only 16-row tiles (on sm_100 W4A4
the 128-column one and W4A16 its converted-decode tile), and on sm_100 the dot_scaled GEMM above decode and
attention only 128-row tiles, which run the native FP4 MMA: ``gemm.configs_for_rows``,
``_nvfp4.native_fp4_tiles``) the way a launch specialises it
(``_nvfp4.launch_job``: 16-byte-aligned pointers and integers divisible by 16 marked ``tt.divisibility = 16``,
integers equal to 1, such as M at decode, made constants), on Llama-3-8B-like shapes (``SHAPES``). From the build:
- registers, spill stores / loads (bytes a thread writes to / reads from local memory) from ``ptxas -v``
  (the ptxas bundled with Triton, run by Triton's own compile with its own flags), and the dynamic shared
  memory a launch asks for;
- SASS from the bundled ``cuobjdump -sass``; the steady-state loop is the last outermost backward branch of
  the kernel's main body (barrier spin-waits nest inside it, any prologue loop comes before it; subroutines
  after the last EXIT are left out; attention's high-precision tiles run in a kernel of their own, variant
  "attention-precise", whose loop is the two tiles), or
  the whole main body for a kernel without a loop over its work (quantize: one tile a program). The scale
  search loops over its candidates (a loop, not unrolled, keeps one candidate's temporaries live at a time):
  that nested loop, the largest in the region, counts once per trip (HI - LO times for "search", the offsets
  beyond the amax code; twice for "fast_search", the default for activations: one below the amax code and
  four_over_six's; twice for "four_over_six", the default for P: the amax code and its own). Variants:
  "attention" is the default recipe (P scales by four_over_six), "attention-fast-search" and
  "attention-search" the same kernel with P by fast_search or searched over the whole window, "attention-amax"
  with amax P scales; "fused" quantizes the activation as the default W4A4 does. The count is per thread (a
  warp issues each instruction once for 32 threads), so ``loop_instructions_per_unit`` = instructions x threads
  per program / units per iteration: thread-instructions per weight byte (GEMM: E2M1 codes plus E4M3 scale bytes
  of one K tile), per score (attention: BLOCK_M x BLOCK_N) or per element (quantize). A static count: both sides
  of a branch inside the loop count, and no instruction's latency.
- occupancy: programs per SM from registers (allocated per warp in units of 256), shared memory (228 KB per
  SM, 1 KB reserved per program), 64 warps and 32 programs per SM (H100 and B200 alike);
- ceiling: the share of the memory roofline an SM can reach when it must issue that many instructions per
  byte, ``min(1, budget / instructions per byte)``, with the issue budget = SMs x 128 lanes x clock /
  bandwidth in thread-instructions per byte of HBM traffic (``ISSUE_BUDGETS``); for GEMM rows with M <= 16
  (weight bytes dominate the traffic) and for quantize (2 bytes read, 0.5 + 1/16 + 2/16 written an element).

The ``--json`` records hold exactly: kernel, variant, config, target, m, registers, spill_bytes (spill stores),
shared_bytes, loop_instructions_per_unit, unit.
"""

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scalesearch_demo.py, beside the package
if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)  # builds in this process; imported (tests), compile_for_gpu copes

# isort: split
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from scalesearch_compile.attention import DEFAULT_RECIPE  # noqa: E402
from scalesearch_compile.search import DEFAULT_WINDOW, ScaleChoice  # noqa: E402

TARGETS = {90: "sm_90a", 100: "sm_100a"}
# Thread-instructions an SM array can issue per byte of HBM traffic: SMs x 128 lanes x boost clock / bandwidth
# (H100 SXM 132 x 128 x 1.755 GHz / 3.35 TB/s; H200 the same chip at 4.8 TB/s; B200 148 x 128 x 1.965 GHz /
# 8 TB/s), from the vendors' datasheets.
ISSUE_BUDGETS = {90: {"H100": 8.9, "H200": 6.2}, 100: {"B200": 4.5}}
QUANTIZE_BYTES = 2 + 0.5 + 1 / 16 + 2 / 16  # bf16 read; codes, scale codes and int16 offsets written
SHAPES = {"gemm": (4096, 4096), "attention": (32, 8, 128, 4096), "quantize": 4096}  # (N, K); heads, kv, D, S; K
DECODE_SPLIT_K_SMS = 132  # the default split at decode as the launcher picks it on an H100 / H200
SM_REGISTERS, SM_WARPS, SM_PROGRAMS, SM_SHARED, PROGRAM_RESERVED = 65536, 64, 32, 233472, 1024
FIELDS = (
    "kernel", "variant", "config", "target", "m", "registers", "spill_bytes", "shared_bytes",
    "loop_instructions_per_unit", "unit",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Case:
    """One build: which kernel, variant, config and target, and how much work one loop iteration does."""

    kernel: str
    variant: str
    config_index: int
    config: str
    target: int
    m: int
    job: tuple
    unit: str
    units_per_iteration: int
    threads: int
    main_loop: bool  # False: the kernel has no loop over its work (quantize: one tile a program)
    candidate_trips: int  # times the scale search's loop runs its candidate body (1 without a search)


def _config_text(kernel: str, config) -> str:
    kw = config.kwargs
    if kernel == "gemm":
        shape = f"{kw['BLOCK_M']}x{kw['BLOCK_N']}x{kw['BLOCK_K']} g{kw['GROUP_M']}"
    elif kernel == "attention":
        shape = f"BLOCK_M {kw['BLOCK_M']}"
    else:
        shape = f"{kw['BLOCK_M']}x{kw['BLOCK_K']}"
    return f"{shape} w{config.num_warps} s{config.num_stages}"


def _options(config) -> dict:
    return {"num_warps": config.num_warps, "num_stages": config.num_stages, "enable_fp_fusion": False}


GEMM_VARIANTS = {  # variant: (A_MODE, M values); W4A4 reads quantized activations, "fused" quantizes them
    "w4a16": ("float", (1, 2048)),
    "w4a4": ("nvfp4", (1, 2048)),
    "fused": ("quantize", (1,)),  # the launcher fuses the activation's quantization only for M <= 16
}


def gemm_cases(target: int, variants, m_override=None):
    """The GEMM as ``gemm._launch`` calls it: bf16 activations, no bias, per-tensor global scales, the default
    split-K at decode (float32 partials), W4A4 and W4A16 through dot_scaled on sm_100."""
    from scalesearch_compile.kernels import gemm

    n, k = SHAPES["gemm"]
    for variant in variants:
        a_mode, m_values = GEMM_VARIANTS[variant]
        for m in m_values if m_override is None else (m_override,):
            split = gemm.default_split_k(m, n, k, DECODE_SPLIT_K_SMS)
            a_type = "*u8" if a_mode == "nvfp4" else "*bf16"
            args = dict(
                a_ptr=a_type, a_scale_ptr="*u8" if a_mode == "nvfp4" else a_type, a_pts_ptr="*fp32", w_ptr="*u8",
                w_scale_ptr="*u8", w_pts_ptr="*fp32", bias_ptr=a_type, row_expert_ptr=a_type,
                out_ptr="*bf16", partial_ptr="*fp32", ticket_ptr="*i32", M=m, N=n, K=k, K_WORDS=k // 8,
                K_BLOCKS=k // 16,
                M_BUCKET=triton.next_power_of_2(m),
                A_PTS_STRIDE=0, NUM_EXPERTS=1,
            )  # fmt: skip
            run_time = ScaleChoice("search").at_run_time() if variant == "fused" else ScaleChoice("amax", (0, 0))
            constexprs = dict(
                A_MODE=a_mode, METHOD=run_time.method, LO=run_time.window[0], HI=run_time.window[1],
                HAS_A_PTS=True, HAS_W_PTS=True, HAS_BIAS=False,
                DOT_DTYPE=tl.bfloat16 if a_mode == "float" else tl.float16, INPUT_PRECISION="tf32",
                DOT_SCALED=target >= 100, SPLIT_K=split, GROUPED=False,
            )  # fmt: skip
            tried = gemm.configs_for_rows(
                gemm.GPU_CONFIGS, args["M_BUCKET"], constexprs["DOT_SCALED"], a_mode, constexprs["DOT_DTYPE"]
            )
            for index, config in enumerate(gemm.GPU_CONFIGS):
                if config in tried:
                    yield _case("gemm", variant, index, config, target, m, gemm, "_nvfp4_gemm_kernel", args, constexprs)


def attention_cases(target: int, variants, m_override=None):
    """Causal prefill as ``nvfp4_attention_triton`` launches it with the default recipe (K smoothing, Hadamard,
    sink tiles, no mask), Llama-3-8B heads (32 query, 8 key/value, head_dim 128)."""
    from scalesearch_compile.attention import TILE
    from scalesearch_compile.kernels import attention
    from scalesearch_compile.kernels._nvfp4 import native_fp4_tiles

    heads, kv_heads, head_dim, length = SHAPES["attention"]
    length = length if m_override is None else m_override
    lengths = dict(
        mask_stride_b=0, mask_stride_h=0, mask_stride_m=0, mask_stride_n=0, num_heads=heads, group=heads // kv_heads,
        q_len=length, k_len=length, padded_len=triton.cdiv(length, TILE) * TILE, sink_end=TILE,
        tail_start=length // TILE * TILE if length % TILE else -1, sm_scale=head_dim**-0.5,
    )  # fmt: skip
    shape = dict(HEAD_DIM=head_dim, V_DIM=head_dim, BLOCK_N=TILE, IS_CAUSAL=True, HAS_MASK=False)
    for variant in variants:
        if variant == "attention-precise":  # one launch shape, no autotuner
            config = triton.Config({"BLOCK_M": attention.PRECISE_BLOCK_M}, num_warps=attention.PRECISE_WARPS)
            pointers = ("q_hp", "k_hp", "v_hp", "mask", "max", "sum", "out")
            args = {**{f"{name}_ptr": "*fp32" for name in pointers}, **lengths}
            yield _case("attention", variant, 0, config, target, length, attention, "_precise_kernel", args, shape)
            continue
        args = dict(
            q_codes_ptr="*u8", q_scales_ptr="*u8", q_mean_ptr="*fp32", k_codes_ptr="*u8", k_scales_ptr="*u8",
            v_codes_ptr="*u8", v_scales_ptr="*u8", global_scales_ptr="*fp32", mask_ptr="*fp32", max_ptr="*fp32",
            sum_ptr="*fp32", out_ptr="*fp32", **lengths,
            Q_BUCKET=triton.next_power_of_2(length), K_BUCKET=triton.next_power_of_2(length),
        )  # fmt: skip
        p_method = {
            "attention": DEFAULT_RECIPE.p_method,
            "attention-fast-search": "fast_search",
            "attention-search": "search",
        }.get(variant, "amax")
        constexprs = dict(
            **shape, SMOOTH_Q=False, METHOD=p_method, LO=DEFAULT_RECIPE.window[0], HI=DEFAULT_RECIPE.window[1],
            DOT_SCALED=target >= 100, LEAVE_STATE=True,
        )  # fmt: skip
        tried = native_fp4_tiles(attention.GPU_CONFIGS, constexprs["DOT_SCALED"])  # what the autotuner keeps
        kernel = (attention, "_attention_kernel", args, constexprs)
        for index, config in enumerate(attention.GPU_CONFIGS):
            if config in tried:
                yield _case("attention", variant, index, config, target, length, *kernel)


def quantize_cases(target: int, variants, m_override=None):
    """bf16 activations (M, K) with a per-tensor global scale, as ``quantize_nvfp4_triton`` launches them."""
    from scalesearch_compile.kernels import quantize

    m = 2048 if m_override is None else m_override
    args = dict(
        x_ptr="*bf16", pts_ptr="*fp32", weights_ptr="*bf16", qdata_ptr="*u8", scale_ptr="*u8", offset_ptr="*i16",
        M=m, K=SHAPES["quantize"], PTS_STRIDE=0,
    )  # fmt: skip
    for variant in variants:
        method = variant.removeprefix("quantize-").replace("-", "_")
        constexprs = dict(HAS_PTS=True, HAS_WEIGHTS=False, METHOD=method, LO=DEFAULT_WINDOW[0], HI=DEFAULT_WINDOW[1])
        for index, config in enumerate(quantize.GPU_CONFIGS):
            yield _case("quantize", variant, index, config, target, m, quantize, "_quantize_kernel", args, constexprs)


def _case(kernel, variant, index, config, target, m, module, name, args, constexprs) -> Case:
    from scalesearch_compile.kernels._nvfp4 import launch_job

    kw = config.kwargs
    job = launch_job(module.__name__, name, args, {**constexprs, **kw}, target, _options(config))
    if kernel == "gemm":
        unit, units = "weight byte", kw["BLOCK_N"] * (kw["BLOCK_K"] // 2 + kw["BLOCK_K"] // 16)
    elif kernel == "attention":
        unit, units = "score", kw["BLOCK_M"] * constexprs["BLOCK_N"]
    else:
        unit, units = "element", kw["BLOCK_M"] * kw["BLOCK_K"]
    threads = 32 * config.num_warps
    method = constexprs.get("METHOD")
    # trips of the candidate loop (_nvfp4.quantize_tile): the window's offsets but 0, fast_search's two candidates
    # beyond the amax code, four_over_six's amax and four_over_six codes
    window = constexprs.get("HI", 0) - constexprs.get("LO", 0)
    trips = {"search": window, "fast_search": 2, "four_over_six": 2}.get(method, 1)
    text = _config_text(kernel, config)
    return Case(kernel, variant, index, text, target, m, job, unit, units, threads, kernel != "quantize", trips)


KERNELS = {
    "gemm": (gemm_cases, tuple(GEMM_VARIANTS)),
    "attention": (
        attention_cases,
        ("attention", "attention-fast-search", "attention-search", "attention-amax", "attention-precise"),
    ),
    "quantize": (quantize_cases, ("quantize-amax", "quantize-search", "quantize-fast-search")),
}


def cases(kernels=None, variants=None, configs=None, targets=None, m=None) -> list[Case]:
    """Every build the report makes, narrowed by kernel names, variant names, config indices and targets."""
    found = []
    for kernel in kernels or KERNELS:
        make, known = KERNELS[kernel]
        chosen = [v for v in known if variants is None or v in variants]
        for target in targets or TARGETS:
            found += [c for c in make(target, chosen, m) if configs is None or c.config_index in configs]
    return found


# ---- reading the build ----

_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def sass_instructions(sass: str) -> list[tuple[int, str]]:
    """(address, text) of each instruction in ``cuobjdump -sass`` output of a one-kernel cubin."""
    return [(int(m.group(1), 16), m.group(2)) for m in map(_INSTRUCTION.match, sass.splitlines()) if m]


def _loops(instructions: list[tuple[int, str]]) -> list[tuple[int, int]]:
    """(first, last) indices of each backward branch's range: a loop."""
    index_of = {address: i for i, (address, _) in enumerate(instructions)}
    loops = []
    for i, (address, text) in enumerate(instructions):
        branch = re.search(r"\b(?:BRA|JMP)\b[^;]*?(0x[0-9a-f]+)\s*$", text)
        if branch and int(branch.group(1), 16) < address and int(branch.group(1), 16) in index_of:
            loops.append((index_of[int(branch.group(1), 16)], i))
    return loops


def steady_state_loop(instructions: list[tuple[int, str]], main_loop: bool = True) -> list[tuple[int, str]]:
    """The instructions of the last outermost backward branch's range in the main body (up to the last EXIT),
    or the whole main body when it has no loop or, ``main_loop`` False, its loops are not over its work."""
    last_exit = max(i for i, (_, text) in enumerate(instructions) if re.search(r"\bEXIT\b", text))
    body = instructions[: last_exit + 1]
    loops = _loops(body)
    if not loops or not main_loop:
        return body
    outermost = [a for a in loops if not any(b != a and b[0] <= a[0] and a[1] <= b[1] for b in loops)]
    start, end = max(outermost)  # the last: a main loop follows any prologue loop
    return body[start : end + 1]


def issued_instructions(region: list[tuple[int, str]], candidate_trips: int) -> int:
    """Instructions a thread issues in one pass over ``region``, its largest nested loop (the scale search's
    candidate loop: hundreds of instructions, against a few for a barrier's spin-wait) counted
    ``candidate_trips`` times."""
    inner = [loop for loop in _loops(region) if loop != (0, len(region) - 1)]
    if candidate_trips <= 1 or not inner:
        return len(region)
    first, last = max(inner, key=lambda loop: loop[1] - loop[0])
    return len(region) + (candidate_trips - 1) * (last - first + 1)


def ptxas_numbers(log: str) -> dict:
    """Registers and spill bytes from a ``ptxas -v`` log of one kernel."""
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if registers is None or spills is None:
        raise ValueError(f"no register or spill line in the ptxas log:\n{log}")
    return {
        "registers": int(registers.group(1)),
        "spill_stores": int(spills.group(1)),
        "spill_loads": int(spills.group(2)),
    }


def programs_per_sm(registers: int, shared: int, warps: int) -> int:
    """Resident programs per SM (H100 / B200 limits): registers per warp rounded up to 256, 228 KB of shared
    memory with 1 KB reserved per program, 64 warps, 32 programs."""
    warp_registers = -(-registers * 32 // 256) * 256
    by_registers = (SM_REGISTERS // warp_registers) // warps
    by_shared = SM_SHARED // (shared + PROGRAM_RESERVED)
    return min(by_registers, by_shared, SM_WARPS // warps, SM_PROGRAMS)


def cuobjdump_sass(cubin: bytes) -> str:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True, check=True).stdout


def analyse(case: Case) -> dict:
    """Compile one case and read its numbers: the JSON fields plus occupancy and loop size."""
    from scalesearch_compile.kernels._nvfp4 import compile_for_gpu

    (code,) = compile_for_gpu([case.job], stages=("cubin",))
    numbers = ptxas_numbers(code["ptxas_log"])
    loop = steady_state_loop(sass_instructions(cuobjdump_sass(code["cubin"])), case.main_loop)
    issued = issued_instructions(loop, case.candidate_trips)
    record = {
        "kernel": case.kernel,
        "variant": case.variant,
        "config": case.config,
        "target": TARGETS[case.target],
        "m": case.m,
        "registers": numbers["registers"],
        "spill_bytes": numbers["spill_stores"],
        "shared_bytes": code["shared"],
        "loop_instructions_per_unit": round(issued * case.threads / case.units_per_iteration, 2),
        "unit": case.unit,
    }
    extra = {
        "spill_loads": numbers["spill_loads"],
        "loop_instructions": issued,
        "programs_per_sm": programs_per_sm(numbers["registers"], code["shared"], case.threads // 32),
        "warps": case.threads // 32,
        "capability": case.target,
    }
    return record, extra


def ceiling(record: dict, target: int) -> str:
    """Share of the memory roofline the instruction issue allows, per GPU of the target (module docstring)."""
    per_unit = record["loop_instructions_per_unit"]
    if record["kernel"] == "gemm" and record["m"] <= 16:
        per_byte = per_unit
    elif record["kernel"] == "quantize":
        per_byte = per_unit / QUANTIZE_BYTES
    else:
        return "-"
    return " / ".join(f"{gpu} {min(1.0, budget / per_byte):.0%}" for gpu, budget in ISSUE_BUDGETS[target].items())


def markdown(results) -> str:
    """The table of ``(record, extra)`` pairs (:func:`analyse`)."""
    from scalesearch_demo import markdown_table

    header = (
        "kernel", "variant", "config", "target", "M", "registers", "spill st / ld B", "shared KB",
        "programs / SM (warps)", "loop SASS / thread", "thread-instr / unit", "unit", "memory-roofline ceiling",
    )  # fmt: skip
    rows = []
    for record, extra in results:
        rows.append((
            record["kernel"], record["variant"], record["config"], record["target"], record["m"], record["registers"],
            f"{record['spill_bytes']} / {extra['spill_loads']}", f"{record['shared_bytes'] / 1024:.1f}",
            f"{extra['programs_per_sm']} ({extra['programs_per_sm'] * extra['warps']})", extra["loop_instructions"],
            f"{record['loop_instructions_per_unit']:.1f}", record["unit"], ceiling(record, extra["capability"]),
        ))  # fmt: skip
    return markdown_table(header, rows)


def run(selected: list[Case], jobs: int, save: Path | None = None) -> list:
    """(record, extra) of each case in order, built ``jobs`` at a time in worker processes; each result is
    also written to ``save`` as soon as it is known (a run stopped part way keeps what it finished)."""
    results = [None] * len(selected)

    def keep(index, result):
        results[index] = result
        if save is not None:
            save.write_text(json.dumps([r for r in results if r is not None], indent=1))

    if jobs <= 1 or len(selected) <= 1:
        for index, case in enumerate(selected):
            keep(index, analyse(case))
        return results
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(analyse, case): index for index, case in enumerate(selected)}
        for future in as_completed(futures):
            keep(futures[future], future.result())
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernel", action="append", choices=tuple(KERNELS), help="repeatable; default all")
    parser.add_argument("--variant", action="append", help="repeatable; default all of the chosen kernels")
    parser.add_argument("--config", action="append", type=int, help="index in the kernel's GPU_CONFIGS; repeatable")
    parser.add_argument("--target", action="append", type=int, choices=tuple(TARGETS), help="compute capability")
    parser.add_argument(
        "--m", type=int, help="rows (GEMM, quantize) or sequence length (attention) instead of the defaults"
    )
    parser.add_argument("--json", action="store_true", help="print the records as a JSON list instead of a table")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="builds in parallel")
    parser.add_argument("--save", help="also write every number (records and table columns) to this JSON file")
    parser.add_argument("--load", help="print the table of a --save file instead of compiling")
    args = parser.parse_args(argv)
    if args.load:
        results = [tuple(pair) for pair in json.loads(Path(args.load).read_text())]
    else:
        selected = cases(args.kernel, args.variant, args.config, args.target, args.m)
        if not selected:
            parser.error("nothing matches the selection")
        results = run(selected, args.jobs, Path(args.save) if args.save else None)
    print(json.dumps([record for record, _ in results], indent=1) if args.json else markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
