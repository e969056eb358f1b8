"""Serving export: NVFP4 checkpoints with searched block scales that vLLM, SGLang and TensorRT-LLM load.

Reads a local Hugging Face checkpoint (``config.json`` and safetensors, sharded or not) and writes one that the
engines serve with their own NVFP4 kernels; only the block scales differ from an amax export.

- compressed-tensors ``nvfp4-pack-quantized`` (vLLM, SGLang), W4A16 or W4A4: per quantized Linear ``<m>``,
  ``<m>.weight_packed`` uint8 ``(N, K / 2)`` (two E2M1 codes a byte, column 2i in the low nibble: torchao's
  ``qdata``), ``<m>.weight_scale`` float8_e4m3fn ``(N, K / 16)`` (unswizzled), ``<m>.weight_global_scale`` float32
  ``(1,)`` = 1 / global scale (a divisor: compressed-tensors dequantizes ``q * (s / g)``), and for W4A4
  ``<m>.input_global_scale`` = 1 / the calibrated input's global scale; ``quantization_config`` in config.json.
- ModelOpt NVFP4 (vLLM ``modelopt_fp4``, TensorRT-LLM), W4A4 only (its quant_algo NVFP4): ``<m>.weight``,
  ``<m>.weight_scale``, ``<m>.weight_scale_2`` = the global scale (a multiplier, 0-d), ``<m>.input_scale`` = the
  calibrated input's global scale (0-d); ``hf_quant_config.json``.

Tensors keep the checkpoint's own names (those transformers' ``save_pretrained`` writes). Mixture-of-experts
weights are written one tensor per expert, as vLLM's fused-MoE loader reads them (Mixtral
``model.layers.N.block_sparse_moe.experts.E.w1`` / ``w2`` / ``w3``, Qwen MoE
``model.layers.N.mlp.experts.E.gate_proj`` / ``up_proj`` / ``down_proj``), each quantized as a linear layer's weight
with its own input scale from the tokens routed to its expert, a layer's experts all NVFP4 or all dense (an error
otherwise); routers and shared-expert gates stay dense.

Global scales are :func:`scalesearch_compile.search.global_scale` of an amax. vLLM fuses sibling layers (q/k/v,
query/key/value, gate/up, an expert's w1/w3) and loads one global scale per fused layer without rescaling the block
scales, so each such group gets one global scale, from its largest amax, and every member's block scales are
searched under it. ``lm_head``, weights tied to an embedding, routers, layers matching an ``ignore`` regular
expression and layers that cannot be quantized (in_features not a multiple of 16, NaN/Inf, an unsupported dtype,
transformers' ``Conv1D``) stay dense and are listed in the config's ignore list. Every other tensor and file is
copied unchanged.

Weight-only without calibration never builds the model (its module types and on-disk names are read from a
meta-device copy): tensors stream one at a time from each input shard into an output shard of the same name. With
calibration the model is loaded once to record the input amax and per-channel mean x**2 (importance weights for
the search) of each linear layer and each expert. The output is written into a temporary directory beside OUT_DIR
and renamed when complete.
"""

import json
import re
import shutil
import sys
from collections.abc import Container, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from scalesearch_compile.calibration import expert_key, input_statistics
from scalesearch_compile.cli import OneLineParser, written_atomically
from scalesearch_compile.config import ScaleSearchConfig
from scalesearch_compile.gptq import gptq_quantize_
from scalesearch_compile.layout import BLOCK_SIZE
from scalesearch_compile.policy import (
    ROUTER_NAMES,
    LinearPolicy,
    experts_weights,
    is_linear_layer,
    stores_weight_transposed,
)
from scalesearch_compile.search import (
    METHODS,
    NonFiniteError,
    ScaleChoice,
    global_scale,
    quantize_blocks,
)
from scalesearch_compile.tensor import ScaleSearchNVFP4Tensor

SCHEMES = ("w4a16", "w4a4")
FORMATS = ("compressed-tensors", "modelopt")
# sibling layers the engines fuse into one (and load one global scale for); an expert's w1/w3 (Mixtral) or
# gate_proj/up_proj (Qwen MoE) are siblings under experts.<e>, so each expert is a group of its own
FUSED_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"), ("gate_proj", "up_proj"), ("w1", "w3"))
# one expert's weight as vLLM's fused-MoE loader reads it: <experts>.<e>.<w1|w2|w3|gate_proj|up_proj|down_proj>.weight
EXPERT_TENSOR = re.compile(r"(?P<experts>.+)\.(?P<expert>\d+)\.[^.]+\.weight")
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# weight files of other formats: stale float copies, never copied into the export
OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".safetensors")
_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


class ExportError(ValueError):
    """An export that cannot be made, with the one line that says why."""


@dataclass(frozen=True)
class ExportOptions:
    """What :func:`export_checkpoint` writes (validated here). ``ignore``: regular expressions, each matched
    against the whole module path as the checkpoint names it (Mixtral's experts:
    ``model.layers.N.block_sparse_moe.experts.E.w1``); ``lm_head`` and tied embeddings are always left dense."""

    scheme: str = "w4a16"
    method: str = "search"
    format: str = "compressed-tensors"
    calibration: str | Path | None = None
    gptq: bool = False
    ignore: tuple = ()
    overwrite: bool = False
    verbose: bool = False
    progress: bool = True
    batch_size: int = 8

    def __post_init__(self):
        for name, allowed in (("scheme", SCHEMES), ("method", METHODS), ("format", FORMATS)):
            if getattr(self, name) not in allowed:
                raise ExportError(f"unknown {name} {getattr(self, name)!r}; expected one of {', '.join(allowed)}")
        if isinstance(self.ignore, str) or not all(isinstance(p, str) for p in self.ignore):
            raise ExportError(f"ignore must be a list of regular expressions, got {self.ignore!r}")
        for pattern in self.ignore:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ExportError(f"ignore pattern {pattern!r} is not a regular expression: {error}") from None
        object.__setattr__(self, "ignore", tuple(self.ignore))
        if self.scheme == "w4a4" and self.calibration is None:
            raise ExportError("w4a4 needs --calibration FILE: its static input scales come from calibration")
        if self.format == "modelopt" and self.scheme != "w4a4":
            raise ExportError(
                "ModelOpt's NVFP4 format (quant_algo NVFP4) is W4A4: pass --scheme w4a4 with --calibration, "
                "or --format compressed-tensors for weight-only"
            )
        if self.gptq is True and self.calibration is None:
            raise ExportError("--gptq needs --calibration FILE: GPTQ's Hessians come from calibration inputs")
        for name in ("gptq", "overwrite", "verbose", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ExportError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ExportError(f"batch_size must be a positive int, got {self.batch_size!r}")


@dataclass
class ExportSummary:
    """What an export did: quantized layers (with their fused group), dense layers by reason, bytes read and
    written, and the squared weight error of the export and of amax scales under the same global scales."""

    out_dir: Path
    options: ExportOptions
    quantized: dict = field(default_factory=dict)  # module path -> group name
    dense: dict = field(default_factory=dict)  # reason -> module paths
    errors: dict = field(default_factory=dict)  # group name -> [squared error, squared error with amax scales]
    bytes_in: int = 0
    bytes_out: int = 0

    def leave(self, path: str, reason: str) -> None:
        self.dense.setdefault(reason, []).append(path)

    def error_reduction(self, group: str | None = None) -> float:
        """1 - (weight error of the export) / (weight error with amax scales), over one group or all."""
        pairs = [self.errors[group]] if group is not None else list(self.errors.values())
        ours, amax = (sum(p[i] for p in pairs) for i in (0, 1))
        return 0.0 if amax == 0 else 1 - ours / amax

    def text(self) -> str:
        o = self.options
        lines = [
            f"scalesearch-export: {self.out_dir} ({o.format}, {o.scheme}, method={o.method}{', GPTQ' * o.gptq}): "
            f"{len(self.quantized)} layers NVFP4, {sum(map(len, self.dense.values()))} dense; "
            f"{self.bytes_in / 1e6:.1f} MB in, {self.bytes_out / 1e6:.1f} MB out; weight error "
            f"{100 * self.error_reduction():.1f}% below amax scales"
        ]
        lines += [f"  dense ({reason}): {', '.join(paths)}" for reason, paths in self.dense.items()]
        if o.verbose:
            for group in self.errors:
                lines.append(f"  {group}: weight error {100 * self.error_reduction(group):.1f}% below amax scales")
        return "\n".join(lines)


def _tensor_names(model_dir: Path) -> dict[str, list[str]]:
    """Input shard file name -> its tensor names, from the index or the single file."""
    index = model_dir / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as error:
            raise ExportError(f"{index} is not a safetensors index: {error}") from None
        shards: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            shards.setdefault(shard, []).append(name)
        for shard in shards:
            if not (model_dir / shard).is_file():
                raise ExportError(f"{index} names {shard}, which is missing")
        return shards
    if (model_dir / SINGLE).is_file():
        with safe_open(model_dir / SINGLE, "pt") as f:
            return {SINGLE: list(f.keys())}
    raise ExportError(f"no safetensors in {model_dir}: expected {SINGLE} or {INDEX}")


def _read_config(model_dir: Path) -> dict:
    if not model_dir.is_dir():
        raise ExportError(f"MODEL_DIR {model_dir} is not a directory")
    if not any(model_dir.iterdir()):
        raise ExportError(f"MODEL_DIR {model_dir} is empty")
    path = model_dir / "config.json"
    if not path.is_file():
        raise ExportError(f"no config.json in {model_dir}: a Hugging Face checkpoint directory is expected")
    try:
        config = json.loads(path.read_text())
    except ValueError as error:
        raise ExportError(f"{path} is not JSON: {error}") from None
    if "quantization_config" in config:
        raise ExportError(f"{model_dir} is already quantized ({config['quantization_config'].get('quant_method')})")
    return config


def _model_class(model_dir: Path):
    """The checkpoint's transformers model class and its config."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(model_dir)
    for name in config.architectures or ():
        model_class = getattr(transformers, name, None)
        if model_class is not None:
            return model_class, config
    return transformers.AutoModel, config


@dataclass(frozen=True)
class _Stored:
    """A weight as the checkpoint stores it: the name of its inputs' statistics (:func:`input_statistics`: the
    module path in the model, or the expert's :func:`expert_key`), whether it is a ``Conv1D``'s (stored (in, out))
    or tied to an embedding, and for one expert's weight the on-disk path of its experts module."""

    key: str
    transposed: bool = False
    tied: bool = False
    experts: str | None = None


def _stored_weights(model_dir: Path) -> dict[str, _Stored]:
    """On-disk tensor name -> :class:`_Stored` for the weight of every linear layer, router (``policy.ROUTER_NAMES``)
    and expert of the model, built on the meta device (no memory). The names are those ``save_pretrained`` writes
    (transformers' conversion mapping reverted): Mixtral's ``mlp`` is ``block_sparse_moe`` on disk, and an experts
    module's ``gate_up_proj`` ``(E, 2I, H)`` is ``experts.<e>.w1.weight`` and ``experts.<e>.w3.weight`` (Qwen:
    ``gate_proj``, ``up_proj``), ``(I, H)`` each, for every expert e."""
    from transformers.core_model_loading import revert_weight_conversion

    model_class, config = _model_class(model_dir)
    with torch.device("meta"):
        model = model_class(config) if model_class.__name__ != "AutoModel" else model_class.from_config(config)
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    stored = {}
    for path, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if is_linear_layer(module) or (path.rpartition(".")[2] in ROUTER_NAMES and isinstance(weight, torch.Tensor)):
            for name in revert_weight_conversion(model, {f"{path}.weight": weight}):
                stored[name] = _Stored(path, stores_weight_transposed(module), id(weight) in embeddings)
        for param in experts_weights(module):
            for name in revert_weight_conversion(model, {f"{path}.{param}": getattr(module, param)}):
                match = EXPERT_TENSOR.fullmatch(name)
                if match is None:  # gpt-oss: experts.gate_up_proj (E, H, 2I) on disk
                    raise ExportError(
                        f"transformers stores {path}.{param} as one tensor, {name}: the export writes experts only "
                        "from one tensor per expert (<experts>.<e>.<name>.weight, what vLLM's fused-MoE loader reads)"
                    )
                stored[name] = _Stored(expert_key(path, int(match["expert"]), param), experts=match["experts"])
    return stored


def _groups(paths: Sequence[str]) -> dict[str, str]:
    """Module path -> name of its fused group (the paths of the siblings joined), or the path itself."""
    group_of = {path: path for path in paths}
    by_parent: dict[str, dict[str, str]] = {}
    for path in paths:
        parent, _, leaf = path.rpartition(".")
        by_parent.setdefault(parent, {})[leaf] = path
    for children in by_parent.values():
        for siblings in FUSED_SIBLINGS:
            if all(s in children for s in siblings):
                members = [children[s] for s in siblings]
                for member in members:
                    group_of[member] = "+".join(members)
    return group_of


def _calibration(model_dir: Path, options: ExportOptions) -> tuple[torch.nn.Module, list]:
    """The float32 model and the calibration text (one sample a line) tokenized in batches."""
    path = Path(options.calibration)
    if not path.is_file():
        raise ExportError(f"calibration file {path} does not exist")
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError:
        raise ExportError(f"calibration file {path} is not UTF-8 text") from None
    lines = [line for line in lines if line]
    if not lines:
        raise ExportError(f"calibration file {path} has no text (one sample a line)")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    model_class, _ = _model_class(model_dir)
    model = model_class.from_pretrained(model_dir, dtype=torch.float32).eval()
    size = options.batch_size
    max_length = min(tokenizer.model_max_length, 512)
    batches = [
        dict(tokenizer(lines[i : i + size], padding=True, truncation=True, max_length=max_length, return_tensors="pt"))
        for i in range(0, len(lines), size)
    ]
    return model, batches


def _calibrate(model, batches, stored: dict[str, _Stored], options: ExportOptions) -> dict:
    """On-disk weight name -> the statistics of its inputs over the calibration batches."""
    bar = tqdm(batches, desc="scalesearch-export calibration", unit="batch", disable=not options.progress)
    stats = input_statistics(model, bar)
    return {name: stats[weight.key] for name, weight in stored.items() if weight.key in stats}


def _gptq(model, batches, stored: dict[str, _Stored], plan: dict, scales: dict, options: ExportOptions) -> dict:
    """On-disk weight name -> the NVFP4Weight GPTQ makes of it (:func:`gptq_quantize_` on the calibration
    batches, each layer under its fused group's global scale), for the planned linear layers; an expert's
    weights are not linear layers and keep the searched rounding."""
    modules = dict(model.named_modules())
    layers = {stored[name].key: name for name in plan if stored[name].key in modules}
    others = [path for path, module in modules.items() if is_linear_layer(module) and path not in layers]
    activations = "nvfp4" if options.scheme == "w4a4" else None
    config = ScaleSearchConfig(method=options.method, activations=activations, exclude=others, progress=False)
    own = {path: scales[name] for path, name in layers.items() if scales[name] is not None}
    gptq_quantize_(model, batches, config, global_scales=own, progress=options.progress)
    quantized = {}
    for path, name in layers.items():
        weight = modules[path].weight
        if isinstance(weight, ScaleSearchNVFP4Tensor):
            quantized[name] = (weight.t() if weight.is_transposed else weight).nvfp4_weight()
    return quantized


def _plan(
    model_dir: Path,
    shards: dict,
    stored: dict[str, _Stored],
    stats: dict,
    options: ExportOptions,
    summary: ExportSummary,
) -> dict[str, str]:
    """Weight tensor name -> fused group name of every weight to quantize; the others go to ``summary.dense``.
    The policy (:meth:`LinearPolicy.reason`) judges a stand-in of the stored shape and dtype: routers, shapes."""
    stands_in = {}
    for shard, names in shards.items():
        with safe_open(model_dir / shard, "pt") as f:
            for name in (n for n in names if n in stored):
                piece = f.get_slice(name)
                stands_in[name] = (piece.get_shape(), piece.get_dtype())
    missing = [name for name, weight in stored.items() if weight.experts is not None and name not in stands_in]
    if missing:
        raise ExportError(
            f"{model_dir.name} has no tensor {missing[0]}: the export reads experts stored one tensor per expert, "
            "as transformers' save_pretrained writes them"
        )
    policy = LinearPolicy()
    plan = []
    for name, (shape, dtype) in stands_in.items():
        path, weight = name.removesuffix(".weight"), stored[name]
        pattern = next((p for p in options.ignore if re.fullmatch(p, path)), None)
        if dtype in _SAFETENSORS_DTYPES:  # no memory: the policy reads the shape and dtype, never the values
            reason = policy.reason(torch.zeros((), dtype=_SAFETENSORS_DTYPES[dtype]).expand(shape), path)
        else:
            reason = f"weight dtype {dtype}"
        if path.rpartition(".")[2] == "lm_head":
            summary.leave(path, "lm_head (the engines expect it dense)")
        elif weight.tied:
            summary.leave(path, "tied to the input embedding")
        elif pattern is not None:
            summary.leave(path, f"matches --ignore {pattern!r}")
        elif weight.transposed:
            summary.leave(path, "transformers Conv1D (weight stored (in, out)): the engines load Linear")
        elif reason is not None:
            summary.leave(path, reason)
        elif options.scheme == "w4a4" and name not in stats:
            summary.leave(path, "no calibration input reached it")
        else:
            plan.append(path)
    return {f"{path}.weight": group for path, group in _groups(plan).items()}


def _check_whole_experts(stored: dict[str, _Stored], quantized: Container[str], summary: ExportSummary) -> None:
    """Raise unless the experts of each experts module are all NVFP4 or all dense (``quantized``: on-disk module
    paths): vLLM's fused MoE loads all of a layer's experts one way."""
    experts: dict[str, list[str]] = {}
    for name, weight in stored.items():
        if weight.experts is not None:
            experts.setdefault(weight.experts, []).append(name.removesuffix(".weight"))
    for module, paths in experts.items():
        dense = [path for path in paths if path not in quantized]
        if 0 < len(dense) < len(paths):
            reason = next(reason for reason, left in summary.dense.items() if dense[0] in left)
            raise ExportError(
                f"{dense[0]} stays dense ({reason}) while other experts of {module} are NVFP4: vLLM's fused MoE "
                "loads a layer's experts all NVFP4 or all dense"
            )


def _global_scales(model_dir: Path, shards: dict, plan: dict, summary: ExportSummary) -> dict:
    """Weight tensor name -> global scale (0-d) shared by its fused group (a group of one gets None: its own).
    Members holding NaN or Inf are taken out of the plan and left dense."""
    members = {name for name, group in plan.items() if list(plan.values()).count(group) > 1}
    amax = {}
    for shard, names in shards.items():
        with safe_open(model_dir / shard, "pt") as f:
            for name in (n for n in names if n in members):
                amax[name] = f.get_tensor(name).abs().amax().float()
    for name in [n for n, a in amax.items() if not torch.isfinite(a)]:
        summary.leave(name[: -len(".weight")], "NaN or Inf in the weight")
        del plan[name], amax[name]
    group_amax = {}
    for name, value in amax.items():
        group = plan[name]
        group_amax[group] = torch.maximum(group_amax.get(group, value), value)
    return {name: global_scale(group_amax[group]) if name in amax else None for name, group in plan.items()}


def _reciprocal(scale: torch.Tensor) -> torch.Tensor:
    return torch.ones(1) / scale.reshape(1)


def _quantized_tensors(path: str, blocks, activation_scale, options: ExportOptions) -> dict[str, torch.Tensor]:
    """The tensors that replace ``<path>.weight`` in the chosen format."""
    qdata, scale = blocks.qdata.contiguous(), blocks.scale_codes.view(torch.float8_e4m3fn).contiguous()
    if options.format == "modelopt":
        out = {f"{path}.weight": qdata, f"{path}.weight_scale": scale}
        out[f"{path}.weight_scale_2"] = blocks.per_tensor_scale.reshape(()).clone()
        out[f"{path}.input_scale"] = activation_scale.reshape(()).clone()
        return out
    out = {f"{path}.weight_packed": qdata, f"{path}.weight_scale": scale}
    out[f"{path}.weight_global_scale"] = _reciprocal(blocks.per_tensor_scale)
    if options.scheme == "w4a4":
        out[f"{path}.input_global_scale"] = _reciprocal(activation_scale)
    return out


def _weight_error(weight: torch.Tensor, blocks, scales: ScaleChoice, pts) -> list[float]:
    """[squared error of ``blocks``, squared error with amax scales under the same global scale] (float32
    differences, summed in float64: no float64 copy of the weight)."""
    exact = weight.float()
    amax = blocks if scales.method == "amax" else quantize_blocks(weight, "amax", per_tensor_scale=pts)
    return [(exact - b.dequantize()).square().sum(dtype=torch.float64).item() for b in (blocks, amax)]


def _write(model_dir, tmp, shards, plan, scales, stats, gptq, options, summary) -> dict[str, str]:
    """Stream every input shard into an output shard of the same name; returns the output weight map."""
    method = ScaleChoice.of(options.method)
    weight_map = {}
    bar = tqdm(total=len(plan), desc="scalesearch-export", unit="layer", disable=not options.progress)
    for shard, names in shards.items():
        out = {}
        with safe_open(model_dir / shard, "pt") as f:
            for name in names:
                tensor = f.get_tensor(name)
                if name not in plan:
                    out[name] = tensor
                    continue
                path = name[: -len(".weight")]
                bar.update(1)
                pts = scales[name] if scales[name] is not None else True
                stat = stats.get(name)
                importance = None if stat is None else stat.mean_square()
                try:
                    if name in gptq:
                        blocks = gptq[name]
                    else:
                        blocks = quantize_blocks(tensor, method, per_tensor_scale=pts, importance=importance)
                except NonFiniteError:
                    summary.leave(path, "NaN or Inf in the weight")
                    out[name] = tensor
                    continue
                activation_scale = None if stat is None else global_scale(stat.amax)
                out.update(_quantized_tensors(path, blocks, activation_scale, options))
                summary.quantized[path] = plan[name]
                summary.errors.setdefault(plan[name], [0.0, 0.0])
                for i, value in enumerate(_weight_error(tensor, blocks, method, blocks.per_tensor_scale)):
                    summary.errors[plan[name]][i] += value
        save_file(out, tmp / shard, metadata={"format": "pt"})
        weight_map.update({name: shard for name in out})
        del out
    bar.close()
    return weight_map


def _quantization_config(options: ExportOptions, ignore: list[str]) -> dict:
    if options.format == "modelopt":
        return {
            "producer": {"name": "scalesearch_compile", "version": _version()},
            "quantization": {
                "quant_algo": "NVFP4",
                "kv_cache_quant_algo": None,
                "group_size": BLOCK_SIZE,
                "exclude_modules": ignore,
            },
        }
    weights = {
        "num_bits": 4, "type": "float", "symmetric": True, "group_size": BLOCK_SIZE, "strategy": "tensor_group",
        "dynamic": False, "observer": "minmax", "scale_dtype": "torch.float8_e4m3fn",
    }  # fmt: skip
    activations = None
    if options.scheme == "w4a4":
        activations = {**weights, "dynamic": "local", "observer": "static_minmax"}
    return {
        "quant_method": "compressed-tensors",
        "format": "nvfp4-pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": activations}},
        "ignore": ignore,
    }


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("scalesearch_compile")
    except PackageNotFoundError:
        return "unknown"


def _finish(model_dir, tmp, config, weight_map, options, summary) -> None:
    """Config, index and every other file of the input, beside the written shards."""
    ignore = sorted(path for paths in summary.dense.values() for path in paths)
    quantization = _quantization_config(options, ignore)
    if options.format == "modelopt":
        (tmp / "hf_quant_config.json").write_text(json.dumps(quantization, indent=2) + "\n")
    else:
        config = {**config, "quantization_config": quantization}
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if len(set(weight_map.values())) > 1 or (model_dir / INDEX).is_file():
        total = sum((tmp / shard).stat().st_size for shard in set(weight_map.values()))
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    for entry in model_dir.iterdir():
        if entry.name in ("config.json", INDEX) or entry.name.endswith(OTHER_WEIGHTS):
            continue
        (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, tmp / entry.name)
    summary.bytes_out = sum((tmp / shard).stat().st_size for shard in set(weight_map.values()))


def export_checkpoint(model_dir, out_dir, **options) -> ExportSummary:
    """Export the Hugging Face checkpoint in ``model_dir`` to an NVFP4 checkpoint in ``out_dir`` (module
    docstring); ``options`` as :class:`ExportOptions` (the ``scalesearch-export`` flags). Raises
    :class:`ExportError` with one line naming the problem; writes nothing then."""
    opts = ExportOptions(**options)
    model_dir, out_dir = Path(model_dir).resolve(), Path(out_dir).resolve()
    config = _read_config(model_dir)
    if out_dir == model_dir or model_dir in out_dir.parents:
        raise ExportError(f"OUT_DIR {out_dir} must be outside MODEL_DIR")
    if out_dir.exists() and not opts.overwrite:
        raise ExportError(f"OUT_DIR {out_dir} exists; pass --overwrite to replace it")
    shards = _tensor_names(model_dir)
    summary = ExportSummary(out_dir, opts, bytes_in=sum((model_dir / s).stat().st_size for s in shards))
    stored = _stored_weights(model_dir)
    model, batches = _calibration(model_dir, opts) if opts.calibration is not None else (None, None)
    stats = _calibrate(model, batches, stored, opts) if model is not None else {}
    plan = _plan(model_dir, shards, stored, stats, opts, summary)
    scales = _global_scales(model_dir, shards, plan, summary)
    gptq = _gptq(model, batches, stored, plan, scales, opts) if opts.gptq else {}
    del model
    _check_whole_experts(stored, {name.removesuffix(".weight") for name in plan}, summary)
    with written_atomically(out_dir) as tmp:
        weight_map = _write(model_dir, tmp, shards, plan, scales, stats, gptq, opts, summary)
        _check_whole_experts(stored, summary.quantized, summary)  # an expert holding NaN or Inf stays dense
        _finish(model_dir, tmp, config, weight_map, opts, summary)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """``scalesearch-export MODEL_DIR OUT_DIR [options]``: exit status 0, or 2 with one line for bad input."""
    parser = OneLineParser(prog="scalesearch-export", description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="local Hugging Face checkpoint directory")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="where to write the NVFP4 checkpoint")
    parser.add_argument("--scheme", choices=SCHEMES, default="w4a16")
    parser.add_argument("--method", choices=METHODS, default="search", help="block-scale choice")
    parser.add_argument("--format", choices=FORMATS, default="compressed-tensors")
    parser.add_argument("--calibration", metavar="FILE", help="UTF-8 text, one sample a line (w4a4 needs it)")
    parser.add_argument("--gptq", action="store_true", help="GPTQ error feedback on the calibration text")
    parser.add_argument("--ignore", metavar="REGEX", action="append", default=[], help="module paths to keep dense")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    parser.add_argument("--verbose", action="store_true", help="one error line per fused group")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        summary = export_checkpoint(
            args.model_dir,
            args.out_dir,
            scheme=args.scheme,
            method=args.method,
            format=args.format,
            calibration=args.calibration,
            gptq=args.gptq,
            ignore=args.ignore,
            overwrite=args.overwrite,
            verbose=args.verbose,
            progress=not args.no_progress,
        )
    except ExportError as error:
        print(f"scalesearch-export: error: {error}", file=sys.stderr)
        return 2
    print(summary.text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
