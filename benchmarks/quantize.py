"""Time and peak memory of NVFP4 quantization: our methods against torchao's own amax quantizer; and the
run-time quantize op on a CPU, its C++ kernel against its PyTorch reference.

    python benchmarks/quantize.py [--rows 4096 --cols 4096 --repeats 5]

Times are medians of ``--repeats`` runs in this process, after one warm-up run, printed as ratios to
torchao's ``NVFP4Tensor.to_nvfp4`` with its two-level global scale on the same bf16 tensor. Peak extra memory
is how far the resident set's high-water mark (Linux VmHWM, reset through /proc/self/clear_refs) rises above
the resident set while quantizing once, as a multiple of the input's size, each method in a fresh process
(``--memory-of METHOD`` prints just that number; tests/test_search.py runs it too). The second table times
``nvfp4_quantize`` (the op activations go through at run time, global scale from x) with ``impl="auto"`` (on a
CPU the C++ kernel, ``scalesearch_compile/kernels/nvfp4_cpu.cpp``) and ``impl="reference"`` on float32
activation shapes, alternated, each the fastest of 30 runs (``--repeats`` for the largest shape); the two give
the same bits (tests/test_kernel_nvfp4_cpu.py).
"""

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scalesearch_demo.py, beside the package
import scalesearch_demo  # noqa: E402, F401  (before torchao: quiets its import, keeps the hub offline)

# isort: split
import torch  # noqa: E402
from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale  # noqa: E402

from scalesearch_compile import nvfp4_quantize, quantize_nvfp4  # noqa: E402
from scalesearch_demo import markdown_table  # noqa: E402


def torchao_amax(x):
    return NVFP4Tensor.to_nvfp4(x, per_tensor_scale=per_tensor_amax_to_scale(x.abs().amax()))


QUANTIZERS = {
    "torchao amax": torchao_amax,
    "amax": lambda x: quantize_nvfp4(x, "amax"),
    "four_over_six": lambda x: quantize_nvfp4(x, "four_over_six"),
    "search": lambda x: quantize_nvfp4(x, "search"),
}


def make_input(rows: int, cols: int) -> torch.Tensor:
    return torch.empty(rows, cols, dtype=torch.bfloat16).normal_(generator=torch.Generator().manual_seed(0))


def median_seconds(fn, x, repeats: int) -> float:
    fn(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def peak_extra_memory(fn, x) -> float:
    """Rise of the resident-set high-water mark above the resident set while ``fn(x)`` runs, over x's size."""
    fn(x[:64])  # load code paths first
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset VmHWM to the current resident set
    before = _status_kib("VmRSS")
    result = fn(x)  # noqa: F841 (the output counts: it is held while measuring)
    return (_status_kib("VmHWM") - before) * 1024 / (x.numel() * x.element_size())


RUN_TIME_SHAPES = [(192, 384), (192, 1536), (256, 512), (2048, 4096)]  # MiniLM, the small Llama, a prefill


def run_time_table(repeats: int) -> str:
    """Fastest time of the run-time quantize op with its C++ kernel and with its reference, per shape and method."""
    rows = []
    for shape in RUN_TIME_SHAPES:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        for method in ("amax", "search"):
            best = {"auto": float("inf"), "reference": float("inf")}
            for impl in best:
                nvfp4_quantize(x, method, impl=impl)  # warm-up (builds the C++ kernel on first use)
            for _ in range(repeats if x.numel() >= 1 << 20 else 30):
                for impl in best:
                    start = time.perf_counter()
                    nvfp4_quantize(x, method, impl=impl)
                    best[impl] = min(best[impl], time.perf_counter() - start)
            kernel, reference = 1e3 * best["auto"], 1e3 * best["reference"]
            speed_up = f"{reference / kernel:.1f}x"
            rows.append([f"{shape[0]}x{shape[1]}", method, f"{kernel:.3f}", f"{reference:.3f}", speed_up])
    return markdown_table(["float32 input", "method", "C++ kernel ms", "reference ms", "speed-up"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory-of", choices=list(QUANTIZERS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    x = make_input(args.rows, args.cols)
    if args.memory_of:
        print(peak_extra_memory(QUANTIZERS[args.memory_of], x))
        return

    memory = {}
    for name in QUANTIZERS:  # each in a fresh process: freed memory stays resident and would be reused
        cmd = [sys.executable, __file__, "--rows", str(args.rows), "--cols", str(args.cols), "--memory-of", name]
        memory[name] = float(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()[-1])
    seconds = {name: median_seconds(fn, x, args.repeats) for name, fn in QUANTIZERS.items()}

    base = seconds["torchao amax"]
    print(f"NVFP4 quantization of a {args.rows}x{args.cols} bf16 tensor, {torch.get_num_threads()} CPU threads")
    header = ["method", "time (s)", "time / torchao amax", "peak extra memory / input"]
    rows = [[name, f"{seconds[name]:.3f}", f"{seconds[name] / base:.2f}", f"{memory[name]:.2f}"] for name in QUANTIZERS]
    print(markdown_table(header, rows))
    print("\nRun-time quantization (nvfp4_quantize, global scale from x), fastest of 30 runs (largest: --repeats)")
    print(run_time_table(args.repeats))


if __name__ == "__main__":
    main()
