"""The budget in bits is what the disk holds, for every float dtype an output is stored in
and for families with biases; every output can be fed back in, or is refused before any
work with one sentence; a budget no choice can meet is refused from the layers' shapes."""
import json

import pytest
import torch
from conftest import structured_tiny, word_tokenizer

from rankwise import (CalibrationConfig, CompressConfig, CompressRun, RankwiseError, compress_,
                      compress_model)
from rankwise.cli import main
from rankwise.formats.folder import read_manifest
from rankwise.formats.storage import StorageConfig

WIDE = dict(hidden_size=128, intermediate_size=256)
CALIB = CalibrationConfig(calib=["wikitext"], calib_samples=8, seqlen=64)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root, made = tmp_path_factory.mktemp("budget"), {}
    for family in ("llama", "qwen2"):
        structured_tiny(family, **WIDE).save_pretrained(root / family)
        word_tokenizer().save_pretrained(root / family)
        made[family] = root / family
    return made


def _compress(folder, out, config, save_dtype="auto"):
    return compress_model(CompressRun(model=str(folder), out=str(out), cache=False), config,
                          CALIB, progress=False, storage=StorageConfig(save_dtype))


@pytest.mark.parametrize("family,save_dtype", [("llama", "float32"), ("qwen2", "bfloat16"),
                                                ("qwen2", "float32")])
def test_the_bits_a_run_reports_are_the_bytes_on_disk(folders, tmp_path, family, save_dtype):
    """Packed integers, scales and factors in the stored dtype, biases too, per original
    weight parameter: the manifest's bits, the summary's and the file's agree, within budget."""
    outcome = _compress(folders[family], tmp_path / "out",
                        CompressConfig(bits=4.0, group_size=32, refine_steps=2), save_dtype)
    manifest = read_manifest(outcome.folder)
    assert manifest.storage.bits_per_targeted_param == pytest.approx(manifest.bits, rel=1e-12)
    assert manifest.bits == pytest.approx(outcome.summary.bits, rel=1e-12) and manifest.bits <= 4.0
    assert sum(r["stored_bits"] for r in manifest.forms.values()) == \
        8 * manifest.storage.targeted_bytes
    # every form's predicted loss is what its cut left (rounding included), never a zero
    assert all(r["predicted_loss"] > 0 for r in manifest.forms.values() if r["form"] != "dense")


def test_quantize_reports_the_bits_of_what_it_rounded(folders, tmp_path, capsys):
    out = tmp_path / "part"
    _compress(folders["llama"], out, CompressConfig(ratio=0.3, include="mlp"))
    assert main(["quantize", str(out), "--bits", "4", "--group-size", "32", "--windows", "8",
                 "--seqlen", "64", "--out", str(tmp_path / "q")]) == 0
    manifest = read_manifest(tmp_path / "q")
    assert manifest.bits == pytest.approx(manifest.storage.bits_per_targeted_param, rel=1e-12)
    assert manifest.bits <= 4.0 and f"{manifest.bits:.2f} bits" in capsys.readouterr().out


def test_the_lora_exports_base_keeps_its_source_and_its_true_bits(folders, tmp_path):
    from rankwise.entrypoints.export import ExportConfig, export
    outcome = _compress(folders["llama"], tmp_path / "c",
                        CompressConfig(bits=4.6, forms=["corrected"], weight_bits=[4, 3],
                                       group_size=32, refine_steps=2))
    export(ExportConfig(model=str(outcome.folder), out=str(tmp_path / "lora"), format="lora"))
    base = read_manifest(tmp_path / "lora" / "base")
    assert base.source_model == read_manifest(outcome.folder).source_model is not None
    corrections = sum(16 * r["rank"] * sum(outcome.summary.shapes[n])
                      for n, r in outcome.manifest.forms.items() if r["form"] == "corrected")
    assert corrections > 0
    expected = (outcome.summary.bits * outcome.summary.dense_params - corrections) / \
        outcome.summary.dense_params
    assert base.storage.bits_per_targeted_param == pytest.approx(expected, rel=1e-9)


def test_a_rounded_output_fed_back_in_is_refused_before_any_work(folders, tmp_path, capsys,
                                                                 monkeypatch):
    import rankwise.entrypoints.compress as compressing
    import rankwise.entrypoints.quantize as quantizing
    outcome = _compress(folders["llama"], tmp_path / "r",
                        CompressConfig(bits=4.6, group_size=32, refine_steps=2))
    for module in (compressing, quantizing):
        monkeypatch.setattr(module, "mixture_windows", lambda *a, **k: pytest.fail("windows"))
    for argv in (["compress", "--model", str(outcome.folder), "--bits", "3"],
                 ["compress", "--model", str(outcome.folder), "--ratio", "0.2"],
                 ["quantize", str(outcome.folder), "--bits", "3"]):
        assert main([*argv, "--out", str(tmp_path / "again")]) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("rankwise: error: ") and "holds rounded weights" in last
    assert not (tmp_path / "again").exists()


def test_a_factored_output_offered_no_form_it_can_take_is_one_sentence(folders, tmp_path,
                                                                       monkeypatch):
    import rankwise.cut.surgery as surgery
    outcome = _compress(folders["llama"], tmp_path / "f", CompressConfig(ratio=0.3))
    monkeypatch.setattr(surgery, "walk", lambda *a, **k: pytest.fail("walked"))
    for forms in (["rounded"], ["corrected"]):
        with pytest.raises(RankwiseError, match="can only stay factors"):
            _compress(outcome.folder, tmp_path / "g", CompressConfig(bits=4, forms=forms))


@pytest.mark.parametrize("config", [
    CompressConfig(bits=1.5, forms=["rounded"], group_size=32),
    CompressConfig(bits=4, forms=["rounded"], weight_bits=[8]),
])
def test_a_budget_no_choice_meets_is_refused_before_the_statistics(config, monkeypatch):
    import rankwise.cut.surgery as surgery
    monkeypatch.setattr(surgery, "walk", lambda *a, **k: pytest.fail("walked"))
    model = structured_tiny("llama", **WIDE)
    calib = torch.randint(0, 256, (4, 16))
    with pytest.raises(RankwiseError, match="below the smallest model these forms make"):
        compress_(model, config, calib, progress=False)


def test_a_serving_target_gives_every_rounded_matrix_a_width_its_engine_runs(folders, tmp_path):
    outcome = _compress(folders["llama"], tmp_path / "s",
                        CompressConfig(bits=4.25, group_size=32, refine_steps=2, serve="vllm-cpu"))
    report = json.loads((outcome.folder / "rankwise.json").read_text())["serving"]["vllm-cpu"]
    assert report["packed"] > 0 and report["repacked to int4"] == report["dequantized"] == 0
    assert {f.bits for f in outcome.summary.forms.values() if f.kind != "dense"} <= {4, 16}
