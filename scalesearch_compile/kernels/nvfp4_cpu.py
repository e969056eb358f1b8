"""NVFP4 on a CPU, in C++ (``nvfp4_cpu.cpp``): quantization with scale search, bit for bit
``search.quantize_reference`` on qdata, scale codes and offsets, for every method, importance weighting and
global-scale mode, finite or not; the decode of packed codes, bit for bit ``layout.unscaled_values``; the finite
amax of a run-time global scale; run-time activations quantized and decoded in one pass (what a W4A4 product
reads).

The PyTorch reference runs each candidate scale as a dozen whole-tensor operations (about 1100 operator calls
for a 9-candidate search of a 192 x 384 activation); the C++ loop keeps 16 blocks in registers (one a vector
lane) and tries every candidate on them in one pass. The decode looks eight E2M1 magnitudes up in a register at
once (a 1536 x 384 weight: 0.15 ms on one core, against 0.6 ms for Inductor's element-wise decode on two and 2 ms
for the reference's table gather).

Built on first use with the system C++ compiler (``$CXX``, else ``c++``), as Inductor builds its CPU kernels, into
``$SCALESEARCH_CACHE_DIR`` (default ``~/.cache/scalesearch_compile``), as a library named by a hash of the
source and the build command, written to a temporary file and renamed (concurrent first uses are safe).
``-ffp-contract=off`` and no ``-ffast-math`` keep every float32 operation the reference's; the build targets the
vector instructions PyTorch's own CPU kernels use here (``torch.backends.cpu.get_cpu_capability()``: AVX-512 or
AVX2 on x86-64, else the compiler's default).

Layouts: reads x ``(..., K)`` float32/bfloat16/float16 as float32 ``(M, K)`` rows; writes qdata uint8
``(M, K // 2)`` (element 2i in the low nibble), E4M3 scale codes uint8 and offsets int16 ``(M, K // 16)``.
"""

import ctypes
import functools
import hashlib
import logging
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from scalesearch_compile.formats import E4M3_MAX_CODE
from scalesearch_compile.layout import NVFP4Blocks
from scalesearch_compile.search import QuantizeRequest, ScaleChoice, finite_amax

logger = logging.getLogger("scalesearch_compile")

SOURCE = Path(__file__).with_name("nvfp4_cpu.cpp")
FLAGS = ("-O3", "-shared", "-fPIC", "-std=c++17", "-ffp-contract=off", "-fno-fast-math")
# Threads from the OpenMP runtime PyTorch has loaded (its libgomp.so.1, whose soname the build's dependency
# matches): the team Inductor's and ATen's CPU kernels run on, not a second pool competing for the cores. A
# compiler without OpenMP builds the library without it, one thread.
PARALLEL_FLAGS = ("-fopenmp",)
# One build for the widest vectors: a 192 x 384 search took 243 us built for AVX-512 (16 lanes) against 365 us
# for AVX2 (8 lanes), and 476 us with GCC's target_clones of both in one library (measured on the C version).
ARCH_FLAGS = {"AVX512": ("-march=x86-64-v4",), "AVX2": ("-march=x86-64-v3",)}
METHOD_IDS = {"amax": 0, "search": 1, "four_over_six": 2, "exhaustive": 3, "fast_search": 4}
# Rows are read as float32 in chunks of about this many values, so the extra memory is bounded whatever the
# input's size and dtype (at most one float32 chunk a call).
CHUNK_VALUES = 1 << 20
# The blocks are shared between torch.get_num_threads() threads from this many value-candidate evaluations on (on
# PyTorch's OpenMP team: a fork and join costs microseconds once its threads exist). In MiniLM's compiled W4A4
# forward (benchmarks/linear.py, 25 searches of 123K-492K values) the searches took 21.4 ms on two threads against
# 30.5 ms on one (torch.profiler, 2-core CI machine; 25.4 ms from 2^20 on). POSIX threads started per call had cost
# 60-100 us each and, between Inductor's OpenMP kernels, slowed the small Llama from 65.8 to 76.8 ms a forward.
PARALLEL_WORK = 1 << 18
DECODE_PARALLEL_VALUES = 1 << 18


def cache_dir() -> Path:
    """Where built libraries are kept: ``$SCALESEARCH_CACHE_DIR``, else ``~/.cache/scalesearch_compile``."""
    configured = os.environ.get("SCALESEARCH_CACHE_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "scalesearch_compile"


def _build_command(output: Path, parallel: bool) -> list[str]:
    compiler = shlex.split(os.environ.get("CXX", "c++"))
    arch = ARCH_FLAGS.get(torch.backends.cpu.get_cpu_capability(), ())
    return [*compiler, *FLAGS, *(PARALLEL_FLAGS if parallel else ()), *arch, str(SOURCE), "-o", str(output)]


def _library_path(directory: Path, parallel: bool) -> Path:
    """The cached build for this source and build command."""
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(_build_command(Path(), parallel)).encode()).hexdigest()[:16]
    return directory / f"nvfp4_cpu_{key}_{sys.platform}.so"


def _build(library: Path, parallel: bool) -> None:
    """Build into a temporary file beside ``library``, then rename; RuntimeError saying why it cannot be."""
    try:
        library.parent.mkdir(parents=True, exist_ok=True)
        scratch = tempfile.TemporaryDirectory(dir=library.parent)
    except OSError as error:
        raise RuntimeError(
            f"cannot write the kernel cache {library.parent} ({error}); set SCALESEARCH_CACHE_DIR to a writable one"
        ) from error
    with scratch:
        built = Path(scratch.name) / library.name
        logger.info("building the C++ quantize kernel (once, a few seconds): %s", library)
        try:
            result = subprocess.run(_build_command(built, parallel), capture_output=True, text=True)
        except OSError as error:
            raise RuntimeError(f"cannot run the C++ compiler ({error}); set CXX to one") from error
        if result.returncode:
            raise _BuildFailed(f"building {SOURCE.name} failed: {result.stderr.strip()[-2000:]}")
        os.replace(built, library)


class _BuildFailed(RuntimeError):
    """The compiler ran and refused the build."""


@functools.cache
def load_library() -> ctypes.CDLL:
    """The built kernel library (built now if no cached build exists), with OpenMP threads or, where the compiler
    has no OpenMP, without; RuntimeError saying why it cannot be built."""
    parallel, serial = (_library_path(cache_dir(), flag) for flag in (True, False))
    library = parallel if parallel.exists() or not serial.exists() else serial
    if not library.exists():
        try:
            _build(parallel, parallel=True)
        except _BuildFailed as error:
            logger.warning("building the C++ kernel with OpenMP failed, so it runs on one thread: %s", error)
            _build(serial, parallel=False)
            library = serial
    lib = ctypes.CDLL(str(library))
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    lib.scalesearch_quantize.restype = None
    lib.scalesearch_quantize.argtypes = [pointer, size, size, pointer, size, pointer]
    lib.scalesearch_quantize.argtypes += [ctypes.c_int] * 4 + [pointer] * 3 + [ctypes.c_int]
    lib.scalesearch_decode.restype = None
    lib.scalesearch_decode.argtypes = [pointer, pointer, size, pointer, ctypes.c_int]
    lib.scalesearch_fake_quantize.restype = None
    lib.scalesearch_fake_quantize.argtypes = [pointer, size, size, *[ctypes.c_int] * 3, pointer, pointer, ctypes.c_int]
    lib.scalesearch_finite_amax.restype = ctypes.c_float
    lib.scalesearch_finite_amax.argtypes = [pointer, size]
    return lib


def _evaluations(scales: ScaleChoice) -> int:
    """Candidate scales a block is tried with, the amax one included."""
    low, high = scales.window
    counts = {"amax": 1, "four_over_six": 2, "fast_search": 3, "search": high - low + 1, "exhaustive": E4M3_MAX_CODE}
    return counts[scales.method]


def threads_for(values: int, scales: ScaleChoice) -> int:
    """Threads for quantizing ``values`` values: torch's intra-op thread count for at least PARALLEL_WORK
    evaluations, else one."""
    return torch.get_num_threads() if values * _evaluations(scales) >= PARALLEL_WORK else 1


def quantize_nvfp4_cpu(request: QuantizeRequest) -> NVFP4Blocks:
    """Quantize ``request.x`` (..., K) on the CPU; bit for bit ``search.quantize_reference``. ValueError for a
    tensor that is not on the CPU; RuntimeError if the kernel cannot be built (:func:`load_library`)."""
    x, pts, weights = request.x, request.per_tensor_scale, request.importance
    if x.device.type != "cpu":
        raise ValueError(f"input is on {x.device}; the C++ quantize kernel reads CPU tensors")
    lib = load_library()
    k = x.shape[-1]
    rows = x.reshape(-1, k)
    global_scale = (torch.ones((), device=x.device) if pts is None else pts).reshape(-1).contiguous()
    pts_stride = 0 if global_scale.numel() == 1 else 1
    weights = None if weights is None else weights.reshape(-1).contiguous()
    out = NVFP4Blocks.empty(x.shape, pts, x.device)
    qdata, scale_codes, offsets = (t.view(rows.shape[0], -1) for t in (out.qdata, out.scale_codes, out.offsets))
    method, (low, high) = METHOD_IDS[request.scales.method], request.scales.window
    step = max(1, CHUNK_VALUES // k)
    for start in range(0, rows.shape[0], step):
        chunk = rows[start : start + step].float().contiguous()
        lib.scalesearch_quantize(
            chunk.data_ptr(),
            chunk.shape[0],
            k,
            global_scale[start * pts_stride :].data_ptr(),
            pts_stride,
            None if weights is None else weights.data_ptr(),
            method,
            low,
            high,
            int(request.finite),
            qdata[start].data_ptr(),
            scale_codes[start].data_ptr(),
            offsets[start].data_ptr(),
            threads_for(chunk.numel(), request.scales),
        )
    return out


def fake_quantize_nvfp4_cpu(x: torch.Tensor, scales: ScaleChoice) -> tuple[torch.Tensor, torch.Tensor]:
    """Run-time activations ``x`` (..., K) (CPU, validated by the caller) as a W4A4 product reads them, in one C++
    call: float32 values ``(M, K)`` quantized per ``scales`` with the global scale of x's finite amax and decoded
    (the global scale left out), and that scale (float32 0-d). Bit for bit ``ops.linear.quantized_activation`` of
    ``QuantizeRequest.of(x, scales, check_finite=False)``, without the codes ever being stored."""
    rows = x.reshape(-1, x.shape[-1]).float().contiguous()
    values, pts = torch.empty(rows.shape, dtype=torch.float32), torch.empty((), dtype=torch.float32)
    method, (low, high) = METHOD_IDS[scales.method], scales.window
    threads = threads_for(rows.numel(), scales)
    load_library().scalesearch_fake_quantize(
        rows.data_ptr(), *rows.shape, method, low, high, values.data_ptr(), pts.data_ptr(), threads
    )
    return values, pts


def decode_nvfp4_cpu(qdata: torch.Tensor, scale_codes: torch.Tensor) -> torch.Tensor:
    """``layout.unscaled_values(qdata, scale_codes)`` of CPU uint8 codes ``(..., K // 2)`` and ``(..., K // 16)``
    (shapes checked by the caller), bit for bit for scale codes 0..127; codes above 127 (negative scales, which no
    quantizer writes) decode as NaN. Two threads from DECODE_PARALLEL_VALUES values on (a 1536 x 384 weight decodes
    in about 0.15-0.6 ms)."""
    qdata, scale_codes = qdata.contiguous(), scale_codes.contiguous()
    out = torch.empty((*qdata.shape[:-1], 2 * qdata.shape[-1]), dtype=torch.float32)
    threads = 2 if out.numel() >= DECODE_PARALLEL_VALUES and torch.get_num_threads() > 1 else 1
    load_library().scalesearch_decode(
        qdata.data_ptr(), scale_codes.data_ptr(), scale_codes.numel(), out.data_ptr(), threads
    )
    return out


def finite_amax_cpu(x: torch.Tensor) -> torch.Tensor:
    """``search.finite_amax(x)`` (float32 0-d: the largest finite magnitude, 0 if none) in one pass with no
    temporaries for a float32 CPU tensor (a maximum is exact in any order); other tensors by the reference's ops."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return finite_amax(x)
    x = x.contiguous()
    return torch.tensor(load_library().scalesearch_finite_amax(x.data_ptr(), x.numel()), dtype=torch.float32)


# Built (or found in the cache) on import: ops.dispatch imports this module on first use, and runs the reference,
# warning once with the reason, when this raises.
load_library()
