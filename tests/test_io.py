import copy
from pathlib import Path

import pytest
import torch
from conftest import structured_tiny

from rankwise import CompressConfig, RankwiseError, compress_, load, save
from rankwise.formats.folder import read_manifest
from rankwise.formats.manifest import Manifest
from rankwise.forms.grids import Grid
from rankwise.forms.rounding import round_factors, store
from rankwise.models.layers import LowRankLinear, fused_groups


@pytest.fixture
def saved(tmp_path, calib):
    model = structured_tiny("llama", tie_word_embeddings=True)
    model.tie_weights()
    compress_(model, CompressConfig(metric="kfac", ratio=0.4), calib, progress=False)
    folder = save(model, tmp_path / "out", Manifest(config={"metric": "kfac"}))
    return model, folder


def test_save_load_gives_identical_logits(saved, calib):
    model, folder = saved
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors", "rankwise.json",
                                                  "modeling_rankwise.py", ".rankwise-output"}
    loaded = load(folder)
    with torch.no_grad():
        assert torch.equal(model(calib).logits, loaded(calib).logits)
    ranks = read_manifest(folder).ranks
    assert ranks == {n: m.rank for n, m in loaded.named_modules() if isinstance(m, LowRankLinear)}
    assert loaded.lm_head.weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()


def test_a_per_layer_rank_pattern_round_trips(tmp_path, calib):
    model = structured_tiny("llama")
    summary = compress_(model, CompressConfig(metric="kfac", ratio=0.5, allocation="spectrum"),
                        calib, progress=False)
    assert len({r for r in summary.ranks.values()}) > 2     # uneven, some layers dense
    loaded = load(save(model, tmp_path / "out"))
    assert {n: m.rank for n, m in loaded.named_modules() if isinstance(m, LowRankLinear)} == \
        {n: r for n, r in summary.ranks.items() if r is not None}
    with torch.no_grad():
        assert torch.equal(model(calib).logits, loaded(calib).logits)


def test_loaded_model_works_with_transformers_calls(saved, calib):
    loaded = load(saved[1])
    out = loaded(calib[:2], labels=calib[:2])
    assert torch.isfinite(out.loss)
    gen = loaded.generate(calib[:1, :5], max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 9)


def test_saving_again_replaces_an_output_but_not_a_foreign_folder(saved, tmp_path):
    model, folder = saved
    save(model, folder)
    assert (folder / "rankwise.json").exists()
    foreign = tmp_path / "precious"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(RankwiseError, match="refusing to overwrite"):
        save(model, foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_a_failed_save_leaves_nothing_behind(saved, tmp_path, monkeypatch):
    import safetensors.torch
    model, _ = saved

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError):
        save(model, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".new")]


def test_folder_without_manifest_is_not_a_rankwise_output(tmp_path):
    with pytest.raises(RankwiseError, match="not a rankwise output"):
        load(tmp_path)


@pytest.mark.parametrize("damage", ["delete", "truncate", "drop_tensor", "nan"])
def test_damaged_weights_are_a_clear_error(saved, damage):
    from safetensors.torch import load_file, save_file
    weights = saved[1] / "model.safetensors"
    if damage == "delete":
        weights.unlink()
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        tensors = load_file(weights)
        key = next(k for k in tensors if k.endswith("q_proj.A.weight"))
        if damage == "drop_tensor":
            del tensors[key]
        else:
            tensors[key][0, 0] = float("nan")
        save_file(tensors, weights)
    with pytest.raises(RankwiseError):
        load(saved[1])


def test_corrupted_manifest_is_a_clear_error(saved):
    (saved[1] / "rankwise.json").write_text("{not json")
    with pytest.raises(RankwiseError, match="corrupted"):
        load(saved[1])


def test_plain_transformers_loads_the_folder_without_rankwise(tmp_path, calib):
    """trust_remote_code with rankwise made unimportable gives rankwise.load's logits,
    for separate, fused, biased and transposed (Conv1D) projection layouts."""
    import subprocess
    import sys

    from conftest import structured_tiny
    folders = []
    for family in ("llama", "phi3", "qwen2", "gpt_neox", "gpt2"):
        model = structured_tiny(family, tie_word_embeddings=family == "llama")
        compress_(model, CompressConfig(metric="kfac", ratio=0.5, allocation="spectrum"), calib,
                  progress=False)
        folders.append(str(save(model, tmp_path / family)))
    torch.save(calib, tmp_path / "ids.pt")
    code = (
        "import sys, torch\n"
        "sys.modules['rankwise'] = None\n"
        "from transformers import AutoModelForCausalLM\n"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r})\n"
        f"for folder in {folders!r}:\n"
        "    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)\n"
        "    assert type(model).__name__ == 'RankwiseForCausalLM'\n"
        "    with torch.no_grad():\n"
        "        torch.save(model(input_ids=ids).logits, folder + '/hf_logits.pt')\n"
        "    fused = sum(getattr(m, '_siblings', None) is not None for m in model.modules())\n"
        "    open(folder + '/fused.txt', 'w').write(str(fused))\n")
    env = {**__import__("os").environ, "HF_MODULES_CACHE": str(tmp_path / "modules"),
           "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=env)
    for folder in folders:
        model = load(folder)
        with torch.no_grad():
            mine = model(input_ids=calib).logits
        assert torch.equal(torch.load(f"{folder}/hf_logits.pt"), mine), folder
        fused = sum(len(g) for g in fused_groups(model))   # the same layers fused both ways
        assert int(Path(folder, "fused.txt").read_text()) == fused, folder
        if folder.endswith("llama"):
            assert fused > 0


def test_dense_export_is_a_plain_checkpoint_with_the_same_function(saved, tmp_path, calib):
    from transformers import AutoModelForCausalLM

    from rankwise.entrypoints.export import ExportConfig, export
    model, folder = saved
    out = export(ExportConfig(model=str(folder), out=str(tmp_path / "dense")))
    dense = AutoModelForCausalLM.from_pretrained(out)
    assert type(dense).__name__ == "LlamaForCausalLM" and not (out / "modeling_rankwise.py").exists()
    assert not any(isinstance(m, LowRankLinear) for m in dense.modules())
    with torch.no_grad():
        torch.testing.assert_close(dense(calib).logits, model(calib).logits, rtol=1e-4, atol=1e-4)


def test_a_folder_written_before_the_factors_were_linear_modules_still_loads(saved, calib):
    """Earlier releases stored a factored layer as X.A, X.B and X.bias."""
    from safetensors.torch import load_file, save_file
    model, folder = saved
    weights = folder / "model.safetensors"
    old = {}
    for key, value in load_file(weights).items():
        for new, was in ((".A.weight", ".A"), (".B.weight", ".B"), (".B.bias", ".bias")):
            if key.endswith(new):
                key = key[:-len(new)] + was
                break
        old[key] = value
    assert any(k.endswith("q_proj.A") for k in old)
    save_file(old, weights)
    with torch.no_grad():
        assert torch.equal(load(folder)(calib).logits, model(calib).logits)


def test_torchao_int8_weight_only_quantizes_the_factors_of_a_loaded_model(tmp_path, calib):
    """Each factor is a plain nn.Linear, so torchao's quantize_ takes it as it is; the
    sibling fusion steps aside for the quantized factors. (Uniform ranks: torchao 0.18
    cannot quantize a weight with a single input column, the B of a rank-1 layer.)"""
    torchao = pytest.importorskip("torchao.quantization")
    model = structured_tiny("llama")
    compress_(model, CompressConfig(metric="kfac", ratio=0.4, allocation="uniform"), calib,
              progress=False)
    loaded = load(save(model, tmp_path / "out"))
    ours = copy.deepcopy(loaded)       # the same grid (int8 per row), rounded by rankwise
    for layer in ours.modules():
        if isinstance(layer, LowRankLinear):
            rounded = round_factors(layer.A.weight.detach(), layer.B.weight.detach(), None,
                                    Grid.for_bits(8, 64), torch.float32, "rtn")
            for linear, r in zip((layer.A, layer.B), rounded):
                store(linear, r, torch.float32)
    with torch.no_grad():
        reference, expected = loaded(calib).logits, ours(calib).logits
    torchao.quantize_(loaded, torchao.Int8WeightOnlyConfig())
    q_proj = loaded.model.layers[0].self_attn.q_proj
    assert type(q_proj.A.weight).__name__ != "Parameter" or \
        type(q_proj.A.weight.data) is not torch.Tensor            # a quantized tensor
    with torch.no_grad():
        got = loaded(calib).logits                                 # 8 x 32 rows: the fused size
    error = (got - reference).abs().max() / reference.abs().max()
    assert 0 < error < 2 * (expected - reference).abs().max() / reference.abs().max()
    agreement = lambda logits: (logits.argmax(-1) == reference.argmax(-1)).float().mean()
    assert agreement(got) >= agreement(expected) - 0.05   # random tiny model: near ties flip
    generated = loaded.generate(calib[:1, :5], max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 9)


def test_the_modeling_file_fuses_on_the_first_eager_call_never_while_compiling(saved, calib,
                                                                             monkeypatch):
    """A fullgraph compile refuses the `.data` assignment that stacking the siblings does,
    so the copied modeling file waits for an eager call (run here with the compiler's
    flag raised by hand: the route a compiled first call takes)."""
    import importlib.util
    _, folder = saved
    spec = importlib.util.spec_from_file_location("modeling_rankwise_test",
                                                  folder / "modeling_rankwise.py")
    modeling = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(modeling)
    config = modeling.RankwiseConfig.from_pretrained(folder)
    model = modeling.RankwiseForCausalLM(config).eval()
    fused = lambda: sum(getattr(m, "_siblings", None) is not None for m in model.modules())
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with torch.no_grad():
        model(calib)
    assert fused() == 0 and not model._rankwise_fused
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    with torch.no_grad():
        model(calib)
    assert fused() > 0
