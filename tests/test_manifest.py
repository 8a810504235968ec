"""The manifest is one typed record: it round-trips through its class, and folders written
by 0.1.0 (committed under tests/fixtures) still load, to the logits they gave then."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rankwise import RankwiseError, load
from rankwise.formats.manifest import Manifest, read, write

FIXTURES = Path(__file__).parent / "fixtures" / "v0.1.0"


@pytest.mark.parametrize("name", ["lowrank", "bits"])
def test_folders_written_by_0_1_0_load_to_the_logits_they_gave(name):
    folder = FIXTURES / name
    expected = load_file(folder / "expected.safetensors")
    with torch.no_grad():
        logits = load(folder)(expected["probe"]).logits
    assert torch.equal(logits, expected["logits"])
    manifest = read(folder)
    forms = {s["form"] for s in manifest.structure.values()}
    assert forms == ({"lowrank"} if name == "lowrank" else {"lowrank", "corrected"})
    assert manifest.ranks and all(isinstance(r, int) for r in manifest.ranks.values())


@pytest.mark.parametrize("name", ["lowrank", "bits"])
def test_a_manifest_round_trips_through_its_class(name, tmp_path):
    manifest = read(FIXTURES / name)
    write(tmp_path, manifest)
    again = read(tmp_path)
    assert again == manifest and again.to_json() == manifest.to_json()
    assert again.to_json()["format"] == "rankwise/2"


def test_keys_a_newer_release_wrote_are_kept(tmp_path):
    write(tmp_path, Manifest.from_json({"format": "rankwise/2", "structure": {},
                                        "from_the_future": {"x": 1}}))
    assert read(tmp_path).extra == {"from_the_future": {"x": 1}}


@pytest.mark.parametrize("record", [
    [], {"format": "rankwise/9"}, {"format": "rankwise/2", "structure": {"a": {"form": "lowrank"}}},
    {"format": "rankwise/2", "structure": {"a": {"form": "lowrank", "rank": "8"}}},
    {"format": "rankwise/2", "forms": []}, {"format": "rankwise/2", "storage": {"bytes": 1}},
    {"format": "rankwise/1", "ranks": {"a": True}}])
def test_a_malformed_manifest_is_one_sentence(record):
    with pytest.raises(RankwiseError, match="is not a rankwise/2 manifest"):
        Manifest.from_json(record)
