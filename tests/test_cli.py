import json

import pytest
import torch
import yaml

from rankwise import load
from rankwise.cli import VERBS, build_parser, main, parse, verb_module
from rankwise.cli.options import resolved_values
from rankwise.formats.folder import read_manifest
from rankwise.models.layers import ranks_of
from rankwise.options import default_of, fields_of


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
    manifest = json.loads((out / "rankwise.json").read_text())
    ranks = read_manifest(out).ranks
    # the spectrum allocation (the default) may keep a layer dense: it is then not in the manifest
    assert ranks_of(load(out)) == ranks and 0 < len(ranks) <= 14
    assert manifest["calibration"]["windows"] == 4 and manifest["calibration"]["seqlen"] == 32
    assert (out / "ranks.png").read_bytes()[:4] == b"\x89PNG"
    code, text, _ = run(capsys, "eval", str(out), "--windows", "2", "--seqlen", "32", "--ranks")
    assert code == 0 and "x dense" in text and "KL(dense || model)" in text
    lines = text.splitlines()
    assert lines[1].startswith("  weights on disk: ") and " bytes (bfloat16; no integer grid" in lines[1]
    rows = {line.split()[0]: line.split() for line in lines[3:6]}
    assert set(rows) == {"wikitext", "pydoc", "code"} and all(r[1] == "62" for r in rows.values())
    assert "model.layers.0.self_attn.q_proj" in text


def test_anchored_multi_step_compression_is_recorded(tiny_folder, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, _ = run(capsys, *compress_args(tiny_folder, out, "--ratio", "0.4", "--allocation",
                                            "spectrum", "--steps", "2", "--refine-steps", "3"))
    manifest = json.loads((out / "rankwise.json").read_text())
    assert code == 0 and manifest["config"]["cut"] == "anchored"
    assert manifest["config"]["steps"] == 2 and manifest["config"]["refine_steps"] == 3
    refinement = manifest["refinement"]
    assert sorted(refinement) == ["0", "1"]
    assert all(r["after"] <= r["before"] for r in refinement.values())
    assert ranks_of(load(out)) == read_manifest(out).ranks and 0.4 <= manifest["achieved_ratio"] < 0.5


def test_the_default_cut_follows_the_metric(tiny_folder, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, _ = run(capsys, *compress_args(tiny_folder, out, "--metric", "svd"))
    manifest = json.loads((out / "rankwise.json").read_text())
    assert code == 0 and manifest["config"]["cut"] == "oneshot" and "refinement" not in manifest


def test_recipe_file_is_read_and_command_line_wins(tiny_folder, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("metric: whiten\nratio: 0.5\ncalib-samples: 4\nseqlen: 32\n")
    out = tmp_path / "out"
    code, text, _ = run(capsys, "compress", "--model", str(tiny_folder), "--config", str(recipe),
                        "--ratio", "0.25", "--out", str(out))
    assert code == 0 and "with whiten" in text and "requested 0.25" in text


@pytest.mark.parametrize("extra,message", [
    (["--ratio", "1.5"], "ratio must be in [0, 1)"),
    (["--ratio", "0"], "ratio 0 removes nothing"),
    (["--include", "no-such-layer"], "no linear layers match"),
    (["--calib-text", "/no/such/file.txt"], "text file not found"),
    (["--seqlen", "1000000000"], "shorter than one window"),
    (["--metric", "svd", "--cut", "anchored"], "anchored cut fits each layer on the inputs"),
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


def test_a_source_config_cannot_put_code_into_the_output(tiny_folder, tmp_path, capsys):
    """modeling_rankwise.py, which trust_remote_code runs, names the base architecture; a
    source config.json that carries rankwise_base_model_type is read, so a value that is
    not a known architecture is refused before any work, and none reaches the output."""
    crafted = tmp_path / "crafted"
    crafted.mkdir()
    for f in tiny_folder.iterdir():
        (crafted / f.name).write_bytes(f.read_bytes())
    config = json.loads((crafted / "config.json").read_text())
    config["rankwise_base_model_type"] = 'llama"\nopen("pwned", "w")\n#'
    (crafted / "config.json").write_text(json.dumps(config))
    code, _, err = run(capsys, *compress_args(crafted, tmp_path / "out", "--metric", "svd"))
    assert code == 2 and "not a causal LM architecture" in err
    assert not (tmp_path / "out").exists()
    from rankwise.formats.hf import modeling_source
    source = modeling_source("llama")
    assert "BASE_MODEL_TYPE = 'llama'" in source
    with pytest.raises(Exception, match="not a causal LM architecture"):
        modeling_source('llama"; import os #')


def test_damping_zero_on_few_tokens_finishes_and_records_the_damping_it_took(tiny_folder, tmp_path,
                                                                           capsys):
    """Two windows of 32 tokens for 64- and 128-wide layers: rank-deficient statistics that
    a damping of 0 cannot root (the walk once sat there forever). It finishes, and the
    manifest says which layers' roots took more damping than asked, and how much."""
    import threading
    out, result = tmp_path / "out", {}
    argv = ["compress", "--model", str(tiny_folder), "--calib-samples", "2", "--seqlen", "32",
            "--calib", "wikitext", "--damping", "0", "--out", str(out)]
    worker = threading.Thread(target=lambda: result.update(code=main(argv)), daemon=True)
    worker.start()
    worker.join(120)
    assert result.get("code") == 0, "compress with --damping 0 did not finish"
    forms = json.loads((out / "rankwise.json").read_text())["forms"]
    raised = [r["raised_damping"] for r in forms.values() if "raised_damping" in r]
    assert raised and all(0 < d <= 1e-2 for d in raised)


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


@pytest.mark.parametrize("objective", ["lm", "distill"])
def test_finetune_language_model_saves_a_loadable_model(tiny_folder, tmp_path, capsys, objective):
    out = tmp_path / "ft"
    code, text, _ = run(capsys, "finetune", "--model", str(tiny_folder), "--method", "svt",
                        "--ratio", "0.4", "--steps", "4", "--prox-every", "2",
                        "--recovery-steps", "1", "--seqlen", "32", "--calib-seqlen", "64",
                        "--calib-samples", "6", "--eval-windows", "2", "--objective", objective,
                        "--out", str(out))
    assert code == 0 and "test perplexity" in text and "removed 0.4" in text
    assert json.loads((out / "rankwise.json").read_text())["objective"] == objective
    model = load(out)
    assert any(type(m).__name__ == "LowRankLinear" for m in model.modules())
    assert (out / "training.png").exists() and (out / "history.json").exists()


def test_finetune_images_and_bad_options(tmp_path, capsys):
    out = tmp_path / "images"
    code, text, _ = run(capsys, "images", "--task", "digits", "--method", "hard",
                        "--ratio", "0.6", "--steps", "6", "--prox-every", "2",
                        "--recovery-steps", "2", "--pretrain-epochs", "1", "--out", str(out))
    assert code == 0 and "test accuracy" in text
    assert (out / "training.png").exists() and (out / "history.json").exists()
    code, _, err = run(capsys, "images", "--ratio", "1.5", "--out", str(out))
    assert code == 2 and err.startswith("rankwise: error: ratio must be in (0, 1)")
    code, _, err = run(capsys, "images", "--resume", "--pretrain-epochs", "1",
                       "--steps", "3", "--recovery-steps", "1", "--out", str(out))
    assert code == 2 and "no checkpoint to resume from" in err


def _values(f, hint):
    """(recipe value, flag argv, flag value) for one option, each unlike the default and
    unlike each other where the type allows."""
    import types
    import typing
    default, choices = default_of(f), f.metadata.get("choices")
    dashed = f.name.replace("_", "-")
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if hint is bool:
        return (not default), [f"--{'' if default else 'no-'}{dashed}"], default
    if typing.get_origin(hint) is list and choices:
        recipe, flag, given = [choices[1]], str(choices[2]), [choices[2]]
    elif typing.get_origin(hint) is list:
        recipe, flag, given = ["recipe-a", "recipe-b"], "flag-c", ["flag-c"]
    elif typing.get_origin(hint) is dict:
        recipe, flag, given = {"q_proj": 3}, "{k_proj: 5}", {"k_proj": 5}
    elif choices:
        others = [c for c in choices if c != default] or [default]   # a one-choice option
        recipe = others[0]
        given = others[1] if len(others) > 1 else default
        flag = str(given)
    elif hint is int:
        recipe, flag, given = (default or 0) + 3, str((default or 0) + 5), (default or 0) + 5
    elif hint is float:
        recipe, flag, given = 0.37, "0.29", 0.29
    else:
        recipe, flag, given = "from-recipe", "from-flag", "from-flag"
    return recipe, ([flag] if f.metadata.get("positional") else [f"--{dashed}", flag]), given


@pytest.mark.parametrize("verb", list(VERBS))
def test_every_option_of_every_verb_reads_the_recipe_and_the_flag_wins(verb, tmp_path):
    classes = verb_module(verb).option_classes()
    for cls in classes:
        for f, hint in fields_of(cls):
            recipe_value, flag_argv, flag_value = _values(f, hint)
            recipe = tmp_path / f"{f.name}.yaml"
            recipe.write_text(yaml.safe_dump({f.name.replace("_", "-"): recipe_value}))
            for argv, expected in (([verb, "--config", str(recipe)], recipe_value),
                                   ([verb, *flag_argv, "--config", str(recipe)], flag_value)):
                args = build_parser(argv).parse_args(argv)
                assert resolved_values(args, classes)[f.name] == expected, (f.name, argv)
            args = build_parser([verb]).parse_args([verb])
            assert f.name not in resolved_values(args, classes)    # the field's own default


def test_recipe_values_reach_the_configs_the_verbs_run_with(tmp_path):
    """The values the old parser's defaults silently overrode."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("batch-size: 3\nseqlen: 64\nout: somewhere\n")
    _, configs, _ = parse(["compress", "--config", str(recipe)])
    calibration = next(c for t, c in configs.items() if t.__name__ == "CalibrationConfig")
    assert (calibration.batch_size, calibration.seqlen) == (3, 64)
    recipe.write_text("seqlen: 64\nholdout: 0.3\ndevice: auto\nseed: 5\ncalib-samples: 7\n"
                      "out: somewhere\n")
    _, configs, _ = parse(["finetune", "--config", str(recipe)])
    run_options = next(c for t, c in configs.items() if t.__name__ == "FinetuneRun")
    assert (run_options.seqlen, run_options.holdout, run_options.device, run_options.seed,
            run_options.calib_samples) == (64, 0.3, "auto", 5, 7)


@pytest.fixture
def no_slow_load(monkeypatch):
    """Any model load fails the test: what is checked must be checked before it."""
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the bad input was noticed")
    import rankwise.entrypoints.compress as compress_entry
    import rankwise.entrypoints.evaluate as eval_entry
    import rankwise.entrypoints.finetune as finetune_entry
    monkeypatch.setattr(compress_entry, "open_model", refuse)
    monkeypatch.setattr(eval_entry, "open_model", refuse)
    monkeypatch.setattr(finetune_entry, "load_model", refuse)


@pytest.mark.parametrize("argv,message", [
    (["compress", "--seqlen", "0", "--out", "{tmp}/o"], "seqlen must be"),
    (["compress", "--calib-samples", "0", "--out", "{tmp}/o"], "calib_samples must be"),
    (["compress", "--ratio", "2", "--out", "{tmp}/o"], "ratio must be in"),
    (["compress", "--out", "{tmp}/file/o"], "is a file, not a folder"),
    (["compress", "--out", "{tmp}/file"], "refusing to overwrite"),
    (["compress", "--calib-text", "{tmp}/missing.txt", "--out", "{tmp}/o"], "text file not found"),
    (["compress", "--model", "{tmp}/missing", "--out", "{tmp}/o"], "model not found"),
    (["compress"], "--out is required"),
    (["eval", "{tmp}/missing"], "model not found"),
    (["eval", "--seqlen", "1"], "seqlen must be"),
    (["eval", "--text", "{tmp}"], "expected a text file"),
    (["finetune", "--holdout", "1.5", "--out", "{tmp}/o"], "holdout must be in"),
    (["finetune", "--device", "tpu", "--out", "{tmp}/o"], "unknown device"),
    (["finetune", "--resume", "--out", "{tmp}/o"], "no checkpoint to resume from"),
    (["images", "--pretrain-epochs", "-1", "--out", "{tmp}/o"], "pretrain_epochs must be"),
    (["finetune", "--out", "{tmp}/file/o"], "is a file, not a folder"),
    (["dln", "recover", "--tol", "0"], "tol must be in"),
])
def test_cheap_checks_come_before_the_slow_load(argv, message, tmp_path, capsys, no_slow_load):
    (tmp_path / "file").write_text("not a folder")
    code, _, err = run(capsys, *[a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert code == 2 and err.count("rankwise: error:") == 1 and message in err, err
    assert "Traceback" not in err and not (tmp_path / "o").exists()


def test_ctrl_c_is_one_line_and_exit_130(tiny_folder, tmp_path, capsys, monkeypatch):
    import rankwise.entrypoints.compress as compress_entry

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(compress_entry, "compress_", interrupted)
    code, _, err = run(capsys, *compress_args(tiny_folder, tmp_path / "out"))
    assert code == 130 and err.strip().splitlines()[-1] == "rankwise: interrupted"
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("keep", [60, 4000])
def test_a_truncated_gguf_is_one_sentence(tmp_path, capsys, keep):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_tensor("token_embd.weight", torch.zeros(256, 64).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    path.write_bytes(path.read_bytes()[:keep])
    code, _, err = run(capsys, "eval", str(path), "--windows", "1")
    assert code == 2 and err.startswith("rankwise: error: could not load") and "GGUF" in err
    assert "Traceback" not in err


def test_the_core_and_the_product_verbs_never_import_the_lab():
    import subprocess
    import sys
    code = ("import sys, rankwise, rankwise.train, rankwise.entrypoints\n"
            "from rankwise.cli import parse\n"
            "for argv in (['compress', '--out', 'x'], ['eval'], ['finetune', '--out', 'x']):\n"
            "    parse(argv)\n"
            "print(sorted(m for m in sys.modules if m.startswith('rankwise.lab')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    out = subprocess.run([sys.executable, "-m", "rankwise", "dln", "--help"], capture_output=True,
                         text=True)
    assert out.returncode == 0 and "--warmup-steps" in out.stdout


def test_eval_runs_a_local_lm_eval_task_on_model_and_reference(tiny_folder, tmp_path, capsys,
                                                               monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rows = [{"question": "The capital of France is", "choices": [" Paris", " the"], "label": 0},
            {"question": "In 1990 the team", "choices": [" won", " of"], "label": 0},
            {"question": "The river flows into the", "choices": [" sea", " ,"], "label": 0}]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_choice.yaml").write_text(
        "task: tiny_choice\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'data.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n    higher_is_better: true\n")
    out = tmp_path / "out"
    assert run(capsys, *compress_args(tiny_folder, out))[0] == 0
    code, text, err = run(capsys, "eval", str(out), "--text", "none", "--tasks", "tiny_choice",
                          "--task-path", str(tasks))
    assert code == 0, err
    line = next(line for line in text.splitlines() if "tiny_choice" in line)
    value, dense = float(line.split()[2]), float(line.split("dense ")[1].split(",")[0])
    assert 0 <= value <= 1 and 0 <= dense <= 1 and "(dense" in line
    code, _, err = run(capsys, "eval", str(out), "--tasks", "no_such_task", "--task-path", str(tasks))
    assert code == 2 and "unknown lm-eval task" in err


def test_report_compares_runs_in_a_page_chromium_loads(tiny_folder, tmp_path, capsys):
    import shutil
    import subprocess
    runs = []
    for ratio, allocation in (("0.3", "uniform"), ("0.5", "spectrum")):
        out = tmp_path / f"run-{allocation}"
        assert run(capsys, *compress_args(tiny_folder, out, "--ratio", ratio,
                                          "--allocation", allocation))[0] == 0
        runs.append(out)
    assert run(capsys, "eval", str(runs[0]), "--windows", "2", "--seqlen", "32")[0] == 0
    assert json.loads((runs[0] / "eval.json").read_text())["texts"]["wikitext"]["kl"] >= 0
    page = tmp_path / "report.html"
    code, text, err = run(capsys, "report", *map(str, runs), "--out", str(page))
    assert code == 0, err
    source = page.read_text()
    assert all(f"<td data-value=\"{r.name}\">" in source for r in runs)
    assert source.count("data:image/png;base64,") == 3       # the Pareto plot, two rank charts
    assert "Not evaluated yet: run-spectrum" in source
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium here (.ci/run installs Debian's)")
    shot = tmp_path / "report.png"
    result = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
         "--enable-logging=stderr", "--v=0", "--window-size=1280,1600", "--virtual-time-budget=3000",
         "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    dom = result.stdout
    # the page's script ran (it counts the rows) and every run is in the rendered table
    assert '<span id="count">2</span>' in dom and all(r.name in dom for r in runs)
    console = [line for line in result.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,1400",
                    f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120)
    assert shot.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("family,ids", [("gpt2", dict(bos_token_id=50256, eos_token_id=50256)),
                                        ("llama", dict(bos_token_id=None, eos_token_id=None))])
def test_a_model_self_sampling_cannot_start_still_compresses_by_default(family, ids, tmp_path,
                                                                         capsys, caplog):
    """EOS outside the vocabulary (as tiny configs built for tests have), or no BOS/EOS at
    all: the default mixture drops `self` with a warning; asking for it is one sentence."""
    from conftest import structured_tiny, word_tokenizer
    folder = tmp_path / "model"
    structured_tiny(family, **ids).save_pretrained(folder)
    word_tokenizer(eos=False).save_pretrained(folder)
    common = ["--model", str(folder), "--calib-samples", "6", "--seqlen", "32", "--metric", "whiten"]
    code, _, err = run(capsys, "compress", *common, "--out", str(tmp_path / "default"))
    assert code == 0, err
    assert "calibrating on the texts alone" in caplog.text
    sources = json.loads((tmp_path / "default" / "rankwise.json").read_text())["calibration"]["sources"]
    assert "self" not in [s["source"] for s in sources]
    code, _, err = run(capsys, "compress", *common, "--calib", "self", "--out", str(tmp_path / "self"))
    assert code == 2 and err.count("rankwise: error:") == 1 and "Traceback" not in err
    assert "needs a start token inside the vocabulary" in err
    assert not (tmp_path / "self").exists()
