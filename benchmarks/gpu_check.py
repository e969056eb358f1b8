"""The first thing to run on a GPU (issue 13): GPU-only tests, the kernel tests natively, and kernel timings,
as one Markdown document on stdout and in a file, within 8 minutes.

    benchmarks/gpu_check.sh [--out gpu_check.md] [--dry-run [--static-args "--kernel quantize --config 0"]]

Steps, each in a child process under its own time limit (``STEPS``; a step that runs out is reported as such,
with what it printed, and the next one starts):
1. GPU-only tests: the tests whose ``pytest.mark.skipif`` skips them without CUDA (``not torch.cuda.is_available()``
   or ``not BLACKWELL`` in the marker), found by reading the test files (:func:`gpu_only_tests`).
2. The kernel tests (``tests/test_kernel_*.py``) natively, without the interpreter: every kernel against the
   reference on the GPU (bitwise codes and scales; where ``tl.exp`` or FMA hardware could move a bit, it shows).
3. Timings (``--benchmarks``): medians of ``triton.testing.do_bench`` (CUDA events), each row with its ratio to
   the baseline measured in the same run: the NVFP4 GEMMs (W4A16, W4A4 with the fused prologue, W4A4 after the
   quantize kernel) against ``torch.mm`` in bf16 and, on compute capability 10.x, torchao's NVFP4
   ``torch._scaled_mm``, at M in ``GEMM_M`` and (N, K) in ``GEMM_NK``; the attention kernel (default recipe,
   causal) against bf16 ``F.scaled_dot_product_attention`` (P's scales by four_over_six, fast_search, amax and
   search); the quantize kernel (amax, fast_search, search) against torchao's amax quantizer
   ``NVFP4Tensor.to_nvfp4``. GB/s counts each operand once (``benchmarks/gemm.py``'s model).

``--dry-run`` (no GPU needed) prints the plan and compiles the kernels for sm_90a and sm_100a through
``benchmarks/kernel_static.py`` (every config unless ``--static-args`` narrows it), so a GPU session starts from
code that builds.
"""

import argparse
import ast
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # scalesearch_demo.py, beside the package
sys.path.insert(0, str(ROOT / "benchmarks"))  # gemm.py's traffic model

BUDGET_S = 470  # the whole check, under 8 minutes
STEPS = (  # (name, time limit in seconds)
    ("GPU-only tests", 100),
    ("kernel tests, native", 150),
    ("timings", 200),
)
GEMM_M = (1, 16, 128, 2048)
GEMM_NK = ((4096, 4096), (14336, 4096))
ATTENTION_SHAPES = ((1, 32, 8, 1024, 128), (1, 32, 8, 4096, 128))  # batch, heads, kv heads, length, head_dim
QUANTIZE_SHAPES = ((16, 4096), (2048, 4096), (8192, 4096))
QUANTIZE_BYTES = 2 + 0.5 + 1 / 16  # bf16 in, E2M1 codes and E4M3 scale codes out (torchao writes no offsets)
_GPU_ONLY = re.compile(r"skipif\(\s*(?:[^()]|\([^()]*\))*?\bnot\s+(?:torch\.cuda\.is_available\(\)|BLACKWELL)")


def gpu_only_tests(tests: Path = ROOT / "tests") -> list[str]:
    """pytest node ids of the test functions a ``skipif`` marker skips without CUDA (or without Blackwell)."""
    found = []
    for path in sorted(tests.glob("test_*.py")):
        source = path.read_text()
        for node in ast.parse(source).body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test"):
                markers = [ast.get_source_segment(source, d) or "" for d in node.decorator_list]
                if any(_GPU_ONLY.search(m) for m in markers):
                    found.append(f"tests/{path.name}::{node.name}")
    return found


def step_commands(python: str) -> list[list[str]]:
    pytest = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs"]
    kernel_tests = sorted(f"tests/{p.name}" for p in (ROOT / "tests").glob("test_kernel_*.py"))
    kernel_tests.remove("tests/test_kernel_static.py")  # compiles for GPUs it does not need
    return [[*pytest, *gpu_only_tests()], [*pytest, *kernel_tests], [python, __file__, "--benchmarks"]]


def plan(python: str) -> str:
    lines = [f"GPU check plan (budget {BUDGET_S} s):"]
    for (name, limit), command in zip(STEPS, step_commands(python), strict=True):
        lines.append(f"- {name} (at most {limit} s): {shlex.join(command)}")
    lines.append(f"- GEMM: M {GEMM_M} x (N, K) {GEMM_NK}: bf16 torch.mm, w4a16, w4a4 fused, w4a4 + quantize, torchao")
    lines.append(f"  NVFP4 _scaled_mm on compute capability 10.x; attention (B, H, Hkv, S, D) {ATTENTION_SHAPES}")
    lines.append(f"  vs bf16 SDPA; quantize (M, K) {QUANTIZE_SHAPES} amax / fast_search / search vs torchao to_nvfp4")
    return "\n".join(lines)


# ---- timings (on the GPU, in the child process of step 3) ----


def gemm_rows(timer, device: str, m_values=GEMM_M, shapes=GEMM_NK):
    """Rows (benchmark, shape, kernel, us, ratio to the baseline, GB/s) of the GEMMs, as they are timed."""
    import torch
    from gemm import traffic

    from scalesearch_compile.kernels.gemm import nvfp4_linear_triton
    from scalesearch_compile.kernels.quantize import quantize_nvfp4_triton
    from scalesearch_compile.layout import NVFP4Weight
    from scalesearch_compile.search import QuantizeRequest, ScaleChoice

    blackwell = device == "cuda" and torch.cuda.get_device_capability()[0] == 10
    for n, k in shapes:
        w = torch.randn(n, k, device=device, dtype=torch.bfloat16)
        wq = quantize_nvfp4_triton(QuantizeRequest.of(w, ScaleChoice("search"), check_finite=False))
        weight = NVFP4Weight(wq.qdata, wq.scale_codes, wq.per_tensor_scale)
        for m in m_values:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            kernels = {
                "bf16": lambda: torch.mm(x, w.T),  # noqa: B023  (called before the next iteration)
                "w4a16": lambda: nvfp4_linear_triton(x, weight, act=None),  # noqa: B023
                "w4a4 fused": lambda: nvfp4_linear_triton(x, weight, fuse_act_quant=True),  # noqa: B023
                "w4a4 + quantize": lambda: nvfp4_linear_triton(x, weight, fuse_act_quant=False),  # noqa: B023
            }
            if blackwell and hasattr(torch, "float4_e2m1fn_x2"):
                kernels["w4a4 nvfp4"] = _torchao_fp4_mm(x, weight)
            yield from _timed(timer, "gemm", f"M={m} N={n} K={k}", kernels, lambda kind: traffic(kind, m, n, k))  # noqa: B023


def _torchao_fp4_mm(x, weight):
    """torchao's NVFP4 W4A4 GEMM: cuBLAS block-scaled FP4 ``torch._scaled_mm`` with swizzled scales (amax scales)."""
    import torch
    from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor
    from torchao.prototype.mx_formats.utils import to_blocked

    xq = NVFP4Tensor.to_nvfp4(x)
    fp4 = torch.float4_e2m1fn_x2
    a_scale = to_blocked(xq.scale.view(torch.float8_e4m3fn))
    w_scale = to_blocked(weight.scale_codes.view(torch.float8_e4m3fn))
    return lambda: torch._scaled_mm(
        xq.qdata.view(fp4), weight.qdata.view(fp4).T, a_scale, w_scale, out_dtype=torch.bfloat16
    )


def attention_rows(timer, device: str, shapes=ATTENTION_SHAPES):
    from functools import partial

    import torch
    import torch.nn.functional as F

    from scalesearch_compile.attention import AttentionRecipe
    from scalesearch_compile.kernels.attention import nvfp4_attention_triton

    p_methods = {
        "nvfp4 (P four_over_six, default)": "four_over_six",
        "nvfp4 P fast_search": "fast_search",
        "nvfp4 P amax": "amax",
        "nvfp4 P search": "search",
    }
    recipes = {name: AttentionRecipe(p_method=p) for name, p in p_methods.items()}
    for batch, heads, kv_heads, length, dim in shapes:
        g = torch.Generator(device).manual_seed(0)
        q = torch.randn(batch, heads, length, dim, device=device, dtype=torch.bfloat16, generator=g)
        k, v = (
            torch.randn(batch, kv_heads, length, dim, device=device, dtype=torch.bfloat16, generator=g) for _ in "kv"
        )
        kernels = {
            "bf16 SDPA": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),  # noqa: B023
            **{
                name: partial(nvfp4_attention_triton, q, k, v, is_causal=True, enable_gqa=True, recipe=recipe)
                for name, recipe in recipes.items()
            },
        }
        shape = f"B={batch} H={heads} Hkv={kv_heads} S={length} D={dim} causal"
        yield from _timed(timer, "attention", shape, kernels, None)


def quantize_rows(timer, device: str, shapes=QUANTIZE_SHAPES):
    import torch
    from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale

    from scalesearch_compile.kernels.quantize import quantize_nvfp4_triton
    from scalesearch_compile.search import QuantizeRequest, ScaleChoice

    for m, k in shapes:
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        kernels = {
            "torchao amax": lambda: NVFP4Tensor.to_nvfp4(x, per_tensor_scale=per_tensor_amax_to_scale(x.abs().amax())),  # noqa: B023
            **{
                method: lambda method=method: quantize_nvfp4_triton(
                    QuantizeRequest.of(x, ScaleChoice(method), check_finite=False)  # noqa: B023
                )
                for method in ("amax", "fast_search", "search")
            },
        }
        yield from _timed(timer, "quantize", f"M={m} K={k} bf16", kernels, lambda kind: QUANTIZE_BYTES * m * k)  # noqa: B023


def _timed(timer, benchmark: str, shape: str, kernels: dict, bytes_of):
    """Time each kernel; the first is the baseline. A kernel that fails gives a row saying so."""
    base = None
    for kind, fn in kernels.items():
        try:
            seconds = timer(fn)
        except Exception as error:  # one failing kernel must not hide the others' numbers
            yield (benchmark, shape, kind, f"failed: {type(error).__name__}: {str(error)[:100]}", "-", "-")
            continue
        base = seconds if base is None else base
        try:
            rate = f"{bytes_of(kind) / seconds / 1e9:.0f}" if bytes_of else "-"
        except ValueError:  # no traffic model for this kind
            rate = "-"
        yield (benchmark, shape, kind, f"{seconds * 1e6:.1f}", f"{base / seconds:.2f}x", rate)


BENCHMARK_HEADER = ("benchmark", "shape", "kernel", "median us", "x baseline (first row)", "GB/s")


def run_benchmarks() -> None:
    """Step 3: print the timing rows as Markdown, one line at a time (a step stopped by its limit keeps them)."""
    import scalesearch_demo  # noqa: F401, I001  (first: quiets torchao's import)
    import torch
    import triton.testing

    def timer(fn):
        return triton.testing.do_bench(fn) * 1e-3

    name, capability = torch.cuda.get_device_name(), torch.cuda.get_device_capability()
    print(f"device: {name} (compute capability {capability[0]}.{capability[1]}), torch {torch.__version__}")
    print("| " + " | ".join(BENCHMARK_HEADER) + " |\n" + "|---" * len(BENCHMARK_HEADER) + "|", flush=True)
    for rows in (gemm_rows(timer, "cuda"), attention_rows(timer, "cuda"), quantize_rows(timer, "cuda")):
        for row in rows:
            print("| " + " | ".join(map(str, row)) + " |", flush=True)


# ---- the steps ----


def run_step(command: list[str], limit: float) -> tuple[str, str, float]:
    """(status, output, seconds) of one step in a child process (no interpreter: native kernels)."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    start = time.monotonic()
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
        status, output = (
            ("ok" if done.returncode == 0 else f"failed (exit {done.returncode})"),
            done.stdout + done.stderr,
        )
    except subprocess.TimeoutExpired as stopped:
        status = f"stopped at its {limit:.0f} s limit"
        output = "".join(x.decode() if isinstance(x, bytes) else (x or "") for x in (stopped.stdout, stopped.stderr))
    return status, output, time.monotonic() - start


def summary_line(output: str) -> str:
    """pytest's last summary line ("3 passed, 1 skipped in 2.0s"), or the last line printed."""
    lines = [line.strip("= ") for line in output.splitlines() if line.strip()]
    found = [line for line in lines if re.search(r"\d+ (passed|failed|error|skipped)", line)]
    return (found or lines or ["(no output)"])[-1]


def check(python: str, out: Path) -> int:
    deadline = time.monotonic() + BUDGET_S
    sections, failures = [], 0
    table = ["| step | result | seconds | summary |", "|---|---|---|---|"]
    for (name, limit), command in zip(STEPS, step_commands(python), strict=True):
        status, output, seconds = run_step(command, max(1.0, min(limit, deadline - time.monotonic())))
        failures += status != "ok"
        if name == "timings":
            rows = [line for line in output.splitlines() if line.startswith(("|", "device:"))]
            sections.append("## Timings\n\n" + "\n".join(rows))
            summary = f"{sum(line.startswith(('| gemm', '| attention', '| quantize')) for line in rows)} rows"
        else:
            summary = summary_line(output)
            failed = [line for line in output.splitlines() if line.startswith(("FAILED", "ERROR"))]
            if failed:
                sections.append(f"## {name}: failures\n\n" + "\n".join(f"- `{line}`" for line in failed))
        if status != "ok":
            sections.append(f"## {name}: last output\n\n```\n{output[-3000:]}\n```")
        table.append(f"| {name} | {status} | {seconds:.0f} | {summary} |")
        print(table[-1], flush=True)
    document = "# GPU check (benchmarks/gpu_check.sh)\n\n" + "\n".join(table) + "\n\n" + "\n\n".join(sections) + "\n"
    out.write_text(document)
    print("\n" + document)
    return 1 if failures else 0


def dry_run(python: str, static_args: str) -> int:
    print(plan(python))
    command = [python, str(ROOT / "benchmarks" / "kernel_static.py"), *shlex.split(static_args)]
    print(f"\nCompiling for sm_90a and sm_100a: {shlex.join(command)}", flush=True)
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    print(done.stdout)
    if done.returncode:
        print(done.stderr[-4000:])
    return done.returncode


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu_check.md", help="the Markdown file written (default gpu_check.md)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and compile, no GPU needed")
    parser.add_argument("--static-args", default="", help="kernel_static.py arguments for --dry-run's builds")
    parser.add_argument("--plan", action="store_true", help="print the plan only")
    parser.add_argument("--benchmarks", action="store_true", help="step 3 alone: print the timing rows")
    args = parser.parse_args(argv)
    python = sys.executable
    if args.plan:
        print(plan(python))
        return 0
    if args.dry_run:
        return dry_run(python, args.static_args)
    import torch

    if not torch.cuda.is_available():
        print("No CUDA GPU here: run with --dry-run (plan and builds only).", file=sys.stderr)
        return 2
    if args.benchmarks:
        run_benchmarks()
        return 0
    return check(python, Path(args.out))


if __name__ == "__main__":
    sys.exit(main())
