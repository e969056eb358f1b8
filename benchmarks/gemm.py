"""NVFP4 GEMM kernels against torch.mm in bf16 and torchao's NVFP4 torch._scaled_mm, with the device roofline.

    python benchmarks/gemm.py [--roofline-only]

On a GPU: for LLM shapes (M in 1, 16, 128, 2048; Llama-3-8B's (N, K) projections), the median time
(triton.testing.do_bench) of each kernel, its TFLOP/s and GB/s, its ratio to torch.mm in bf16 measured in
the same run, and the roofline ceiling of the device (``PEAKS``). On a CPU it says no GPU is present, checks
the kernels' correctness on a small shape under the Triton interpreter, and prints the roofline tables.
Bytes count each operand once (HBM traffic of an ideal kernel): bf16 activations and outputs, NVFP4 at
4.5 bits per value (E2M1 + one E4M3 scale per 16), int16 offsets for the separate quantize pass.
"""

import argparse
import os
import sys
from functools import partial
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scalesearch_demo.py, beside the package
import scalesearch_demo  # noqa: E402, F401  (before torchao: quiets its import, keeps the hub offline)

# isort: split
from scalesearch_compile.kernels.gemm import nvfp4_linear_triton  # noqa: E402
from scalesearch_compile.layout import NVFP4Weight  # noqa: E402
from scalesearch_compile.search import quantize_blocks  # noqa: E402

M_VALUES = (1, 16, 128, 2048)
NK_SHAPES = ((2048, 2048), (4096, 4096), (6144, 4096), (14336, 4096), (4096, 14336))  # (N, K)
NVFP4_BYTES = 0.5 + 1 / 16  # per value: an E2M1 nibble and a 16th of an E4M3 scale byte
BF16_BYTES = 2

# Dense (no sparsity) vendor datasheet peaks: bf16 and FP4 tensor-core TFLOP/s, HBM TB/s. Hopper has no FP4
# tensor cores: its W4A4 and W4A16 run fp16/bf16 MMAs after dequantizing, so their ceiling is the bf16 one.
PEAKS = {
    "H100 SXM": {"bf16": 989.0, "fp4": 989.0, "hbm": 3.35},
    "H200": {"bf16": 989.0, "fp4": 989.0, "hbm": 4.8},
    "B200": {"bf16": 2250.0, "fp4": 9000.0, "hbm": 8.0},
}


def traffic(kind: str, m: int, n: int, k: int) -> float:
    """Bytes an ideal kernel moves for ``kind`` on an (M, K) x (N, K)^T GEMM with a bf16 (M, N) output."""
    out = BF16_BYTES * m * n
    if kind == "bf16":
        return BF16_BYTES * (m * k + n * k) + out
    if kind in ("w4a16", "w4a4 fused"):  # bf16 activation in, NVFP4 weight
        return BF16_BYTES * m * k + NVFP4_BYTES * n * k + out
    if kind == "w4a4 nvfp4":  # both operands already NVFP4 (torchao _scaled_mm, or our GEMM after quantize)
        return NVFP4_BYTES * (m * k + n * k) + out
    if kind == "w4a4 + quantize":  # our quantize pass (bf16 in, NVFP4 + int16 offsets out) then the GEMM
        return BF16_BYTES * m * k + (NVFP4_BYTES + 2 / 16) * m * k + traffic("w4a4 nvfp4", m, n, k)
    raise ValueError(kind)


def roofline_seconds(kind: str, m: int, n: int, k: int, peak: dict) -> float:
    tflops = peak["bf16"] if kind == "bf16" or kind == "w4a16" else peak["fp4"]
    return max(2 * m * n * k / (tflops * 1e12), traffic(kind, m, n, k) / (peak["hbm"] * 1e12))


def print_roofline_tables() -> None:
    """Markdown: FLOPs and bytes per shape, and each device's ceiling as a speed-up over bf16."""
    kinds = ("bf16", "w4a16", "w4a4 fused", "w4a4 nvfp4")
    print(
        "| M | N | K | GFLOP | MB bf16 | MB W4A16 | MB W4A4 | " + " | ".join(f"{d} W4A16 / W4A4" for d in PEAKS) + " |"
    )
    print("|" + "---|" * (6 + len(PEAKS) + 1))
    for n, k in NK_SHAPES:
        for m in M_VALUES:
            mb = [traffic(kind, m, n, k) / 1e6 for kind in kinds]
            cells = []
            for peak in PEAKS.values():
                base = roofline_seconds("bf16", m, n, k, peak)
                w4a16 = base / roofline_seconds("w4a16", m, n, k, peak)
                w4a4 = base / roofline_seconds("w4a4 nvfp4", m, n, k, peak)
                cells.append(f"{w4a16:.2f}x / {w4a4:.2f}x")
            print(
                f"| {m} | {n} | {k} | {2 * m * n * k / 1e9:.3g} | {mb[0]:.1f} | {mb[1]:.1f} | {mb[3]:.1f} | "
                + " | ".join(cells)
                + " |"
            )


def check_correctness(device: str) -> None:
    """Each kernel on a small shape against a float64 matmul of the dequantized operands."""
    m, n, k = 24, 96, 256
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    wq = quantize_blocks(w, "search")
    weight = NVFP4Weight(wq.qdata.to(device), wq.scale_codes.to(device), wq.per_tensor_scale.to(device))
    w_ref = wq.dequantize().double().T
    cases = {
        "w4a16": (dict(act=None), x.double()),
        "w4a4 + quantize": (dict(fuse_act_quant=False), quantize_blocks(x, "search").dequantize().double()),
        "w4a4 fused": (dict(fuse_act_quant=True), quantize_blocks(x, "search").dequantize().double()),
    }
    for name, (kwargs, a_ref) in cases.items():
        out = nvfp4_linear_triton(x.to(device), weight, **kwargs).double().cpu()
        ref = a_ref @ w_ref
        error = ((out - ref).abs().max() / ref.abs().max()).item()
        print(f"{name:16s} M={m} N={n} K={k}: max error / max |ref| = {error:.2e} ({'ok' if error < 1e-5 else 'FAIL'})")


def gpu_benchmark() -> None:
    import triton.testing
    from torchao.prototype.mx_formats.utils import to_blocked

    name = torch.cuda.get_device_name()
    capability = torch.cuda.get_device_capability()
    peak = next((p for key, p in PEAKS.items() if key.split()[0] in name), None)
    print(f"device: {name} (compute capability {capability[0]}.{capability[1]}); roofline: {peak or 'unknown'}")
    has_fp4_mm = capability[0] == 10 and hasattr(torch, "float4_e2m1fn_x2")
    print("| M | N | K | kernel | us | TFLOP/s | GB/s | vs bf16 | roofline us |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, k in NK_SHAPES:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        wq = quantize_blocks(w.float().cpu(), "search")
        weight = NVFP4Weight(wq.qdata.cuda(), wq.scale_codes.cuda(), wq.per_tensor_scale.cuda())
        for m in M_VALUES:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            kernels = {
                "bf16": partial(torch.mm, x, w.T),
                "w4a16": partial(nvfp4_linear_triton, x, weight, act=None),
                "w4a4 + quantize": partial(nvfp4_linear_triton, x, weight, fuse_act_quant=False),
                "w4a4 fused": partial(nvfp4_linear_triton, x, weight, fuse_act_quant=True),
            }
            if has_fp4_mm:  # torchao's NVFP4 GEMM: cuBLAS block-scaled FP4 with swizzled scales
                xq = quantize_blocks(x.float().cpu(), "amax")
                fp4 = torch.float4_e2m1fn_x2
                kernels["w4a4 nvfp4"] = partial(
                    torch._scaled_mm,
                    xq.qdata.cuda().view(fp4),
                    weight.qdata.view(fp4).T,
                    to_blocked(xq.scale_codes.cuda().view(torch.float8_e4m3fn)),
                    to_blocked(weight.scale_codes.view(torch.float8_e4m3fn)),
                    out_dtype=torch.bfloat16,
                )
            base = None
            for kind, fn in kernels.items():
                row = f"| {m} | {n} | {k} | {kind} |"
                try:
                    seconds = triton.testing.do_bench(fn) * 1e-3
                except Exception as error:  # one failing kernel must not hide the others' numbers
                    print(f"{row} failed: {type(error).__name__}: {str(error)[:120]} |||||")
                    continue
                base = seconds if kind == "bf16" else base
                roof = f"{roofline_seconds(kind, m, n, k, peak) * 1e6:.1f}" if peak else "-"
                print(
                    f"{row} {seconds * 1e6:.1f} | {2 * m * n * k / seconds / 1e12:.1f} | "
                    f"{traffic(kind, m, n, k) / seconds / 1e9:.0f} | {base / seconds:.2f}x | {roof} |"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--roofline-only", action="store_true", help="print the roofline tables and exit")
    args = parser.parse_args()
    if args.roofline_only:
        print_roofline_tables()
        return
    if torch.cuda.is_available():
        check_correctness("cuda")
        gpu_benchmark()
        return
    print("No GPU present: nothing is timed. Correctness under the Triton interpreter:")
    check_correctness("cpu")
    print("\nRoofline ceilings (speed-up over bf16 torch.mm an ideal kernel could reach):")
    print_roofline_tables()


if __name__ == "__main__":
    main()
