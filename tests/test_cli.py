import json

import pytest
import torch

from rankwise import load
from rankwise.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def compress_args(tiny_folder, out, *extra):
    return ["compress", "--model", str(tiny_folder), "--calib-samples", "4", "--seqlen", "32",
            "--out", str(out), *extra]


def test_compress_then_eval_end_to_end(tiny_folder, tmp_path, capsys):
    out = tmp_path / "out"
    code, text, _ = run(capsys, *compress_args(tiny_folder, out, "--metric", "kfac", "--ratio", "0.3"))
    assert code == 0 and "removed 0.3" in text
    assert load(out) is not None
    assert (out / "ranks.png").read_bytes()[:4] == b"\x89PNG"
    code, text, _ = run(capsys, "eval", str(out), "--windows", "2", "--seqlen", "32", "--ranks")
    assert code == 0
    assert "dense perplexity" in text and "KL(dense || model)" in text
    assert "model.layers.0.self_attn.q_proj" in text


def test_sequential_multi_step_compression_is_recorded(tiny_folder, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, _ = run(capsys, *compress_args(tiny_folder, out, "--ratio", "0.4", "--allocation",
                                            "spectrum", "--steps", "2", "--sequential"))
    manifest = json.loads((out / "rankwise.json").read_text())
    assert code == 0 and manifest["config"]["sequential"] and manifest["config"]["steps"] == 2
    assert load(out) is not None


def test_recipe_file_is_read_and_command_line_wins(tiny_folder, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("metric: whiten\nratio: 0.5\ncalib-samples: 4\nseqlen: 32\n")
    out = tmp_path / "out"
    code, text, _ = run(capsys, "compress", "--model", str(tiny_folder), "--config", str(recipe),
                        "--ratio", "0.25", "--out", str(out))
    assert code == 0 and "with whiten" in text and "requested 0.25" in text


@pytest.mark.parametrize("extra,message", [
    (["--ratio", "1.5"], "ratio must be in (0, 1)"),
    (["--ratio", "0"], "ratio must be in (0, 1)"),
    (["--include", "no-such-layer"], "no linear layers match"),
    (["--calib-text", "/no/such/file.txt"], "text file not found"),
    (["--seqlen", "1000000000"], "shorter than one window"),
    (["--metric", "svd", "--sequential"], "sequential mode re-measures the layers' inputs"),
])
def test_bad_input_is_one_sentence_and_leaves_no_output(tiny_folder, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    code, _, err = run(capsys, *compress_args(tiny_folder, out, *extra))
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("rankwise: error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err
    assert not out.exists()
    assert not list(tmp_path.glob(".out*"))


def test_unknown_metric_is_rejected_by_the_parser(tiny_folder, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(compress_args(tiny_folder, tmp_path / "out", "--metric", "pca"))
    assert e.value.code == 2
    assert "invalid choice: 'pca'" in capsys.readouterr().err


def test_missing_model_and_nan_model(tiny_folder, tmp_path, capsys):
    code, _, err = run(capsys, *compress_args(tmp_path / "nowhere", tmp_path / "out"))
    assert code == 2 and "model not found" in err
    from transformers import AutoModelForCausalLM
    bad = tmp_path / "nan-model"
    model = AutoModelForCausalLM.from_pretrained(tiny_folder)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("inf")
    model.save_pretrained(bad)
    for f in tiny_folder.glob("tokenizer*"):
        (bad / f.name).write_bytes(f.read_bytes())
    code, _, err = run(capsys, *compress_args(bad, tmp_path / "out"))
    assert code == 2 and "NaN or Inf" in err
    assert not (tmp_path / "out").exists()


def test_calibration_text_shorter_than_a_window(tiny_folder, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("the cat sat on the mat")
    code, _, err = run(capsys, *compress_args(tiny_folder, tmp_path / "out", "--calib-text", str(short)))
    assert code == 2 and "shorter than one window" in err


def test_eval_of_a_folder_that_is_not_a_model(tmp_path, capsys):
    (tmp_path / "junk").mkdir()
    code, _, err = run(capsys, "eval", str(tmp_path / "junk"))
    assert code == 2 and "could not load" in err


def test_dln_recover_and_subspace_write_their_pictures(tmp_path, capsys):
    code, text, _ = run(capsys, "dln", "recover", "--d", "16", "--rank", "2", "--width", "4",
                        "--eps", "0.01", "--measurements", "200", "--observed", "0.6",
                        "--iterations", "8000", "--out", str(tmp_path))
    assert code == 0
    for problem in ("full", "completion", "sensing"):
        assert sum(line.startswith(problem) for line in text.splitlines()) == 2
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    code, text, _ = run(capsys, "dln", "subspace", "--d", "16", "--rank", "2", "--eps", "0.01",
                        "--iterations", "4000", "--out", str(tmp_path))
    assert code == 0 and "rank of each layer's update" in text
    assert (tmp_path / "subspace.png").exists()


def test_dln_transfer_prints_both_networks(capsys):
    code, text, _ = run(capsys, "dln", "transfer", "--data", "digits", "--width", "8",
                        "--epochs", "1", "--warmup-steps", "2")
    assert code == 0 and "original" in text and "compressed (width 8)" in text


def test_dln_bad_option_is_one_sentence(capsys):
    code, _, err = run(capsys, "dln", "recover", "--rank", "0", "--d", "10")
    assert code == 2 and err.startswith("rankwise: error: rank must be")


def test_finetune_language_model_saves_a_loadable_model(tiny_folder, tmp_path, capsys):
    out = tmp_path / "ft"
    code, text, _ = run(capsys, "finetune", "--model", str(tiny_folder), "--method", "svt",
                        "--ratio", "0.4", "--steps", "4", "--prox-every", "2",
                        "--recovery-steps", "1", "--seqlen", "32", "--calib-seqlen", "64",
                        "--calib-samples", "6", "--eval-windows", "2", "--out", str(out))
    assert code == 0 and "test perplexity" in text and "removed 0.4" in text
    model = load(out)
    assert any(type(m).__name__ == "LowRankLinear" for m in model.modules())
    assert (out / "training.png").exists() and (out / "history.json").exists()


def test_finetune_images_and_bad_options(tmp_path, capsys):
    code, text, _ = run(capsys, "finetune", "--task", "digits", "--method", "hard",
                        "--ratio", "0.6", "--steps", "6", "--prox-every", "2",
                        "--recovery-steps", "2", "--pretrain-epochs", "1", "--out", str(tmp_path))
    assert code == 0 and "test accuracy" in text
    code, _, err = run(capsys, "finetune", "--task", "digits", "--ratio", "1.5", "--out", str(tmp_path))
    assert code == 2 and err.startswith("rankwise: error: ratio must be in (0, 1)")
    code, _, err = run(capsys, "finetune", "--task", "digits", "--resume", "--pretrain-epochs", "1",
                       "--steps", "3", "--recovery-steps", "1", "--out", str(tmp_path))
    assert code == 2 and "no checkpoint to resume from" in err
