"""Every way a write can go wrong leaves the inputs and earlier outputs as they were: onto
its own source, onto another verb's output, a full disk, a kill in the middle."""
import errno
import os
import signal
import subprocess
import sys

import pytest
import torch

from rankwise import RankwiseError, load
from rankwise.cli import main
from rankwise.formats.atomic import MARKER, Output, host_tag, writer_of


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def compressed(tiny_folder, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run(capsys, "compress", "--model", tiny_folder, "--metric", "svd", "--ratio", "0.4",
                       "--out", out)
    assert code == 0, err
    return out


def snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_onto_its_own_source_is_refused(compressed, capsys):
    before = snapshot(compressed)
    code, _, err = run(capsys, "export", compressed, "--dense", compressed)
    assert code == 2 and err.startswith("rankwise: error: refusing to write") and "input" in err
    assert snapshot(compressed) == before
    load(compressed)                                   # the factors are still there


def test_compress_onto_its_own_source_or_a_folder_holding_it_is_refused(compressed, capsys):
    before = snapshot(compressed)
    for out in (compressed, compressed.parent):
        code, _, err = run(capsys, "compress", "--model", compressed, "--metric", "svd", "--out", out)
        assert code == 2 and "an input of this run" in err, err
    assert snapshot(compressed) == before


def test_another_verbs_output_is_never_replaced(compressed, tiny_folder, tmp_path, capsys):
    dense = tmp_path / "dense"
    assert run(capsys, "export", compressed, "--out", dense)[0] == 0
    before = snapshot(dense)
    code, _, err = run(capsys, "compress", "--model", tiny_folder, "--metric", "svd", "--out", dense)
    assert code == 2 and "not an output of rankwise compress (rankwise export" in err, err
    assert snapshot(dense) == before
    before = snapshot(compressed)
    code, _, err = run(capsys, "export", compressed.parent / "dense", "--out", compressed)
    assert code == 2 and "not a rankwise output" in err
    code, _, err = run(capsys, "export", dense, "--out", compressed)
    assert code == 2
    assert snapshot(compressed) == before
    # the same verb replaces its own output, whole
    assert run(capsys, "export", compressed, "--out", dense)[0] == 0
    assert writer_of(dense) == "export --format dense"


def test_a_full_disk_is_one_sentence_and_leaves_nothing(tiny_folder, tmp_path, capsys, monkeypatch):
    import safetensors.torch

    write = safetensors.torch.save_file

    def full(tensors, path, *a, **k):      # the output's weights; the spill still works
        if "rankwise-spill-" in str(path):
            return write(tensors, path, *a, **k)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    code, _, err = run(capsys, "compress", "--model", tiny_folder, "--metric", "svd", "--out",
                       tmp_path / "new")
    assert code == 2 and "no space left on the disk" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_failed_replace_keeps_the_old_output(compressed, tiny_folder, capsys, monkeypatch):
    import safetensors.torch
    before = snapshot(compressed)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    code, _, _ = run(capsys, "compress", "--model", tiny_folder, "--metric", "svd", "--out", compressed)
    assert code == 2 and snapshot(compressed) == before
    assert [p.name for p in compressed.parent.iterdir()] == ["out"]


KILLED = r'''
import sys, time
from rankwise.formats.atomic import Output
out = Output(sys.argv[1], "compress")
with out.writing() as tmp:
    (tmp / "model.safetensors").write_bytes(b"half a checkpoint")
    print("writing", flush=True)
    time.sleep(60)
'''


def test_what_a_killed_write_leaves_is_tidied_by_the_next_one(compressed, tiny_folder, tmp_path,
                                                               capsys):
    before = snapshot(compressed)
    child = subprocess.Popen([sys.executable, "-c", KILLED, str(compressed)],
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "writing"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    left = [p for p in compressed.parent.iterdir() if p.name.startswith(".out.tmp-")]
    assert len(left) == 1 and snapshot(compressed) == before        # the old output is intact
    # a kill between moving the old output aside and renaming the new one in
    aside = compressed.with_name(f".out.old-{host_tag()}-{child.pid}-0")
    compressed.rename(aside)
    Output(compressed, "compress")._tidy()
    assert snapshot(compressed) == before and not aside.exists() and not left[0].exists()
    assert run(capsys, "compress", "--model", tiny_folder, "--metric", "svd", "--out", compressed)[0] == 0
    assert sorted(p.name for p in compressed.parent.iterdir()) == ["out"]


def test_a_live_writers_temporary_folder_is_left_alone(tmp_path):
    out = Output(tmp_path / "x", "compress")
    with out.writing() as tmp:
        Output(tmp_path / "x", "compress")._tidy()      # another run starting meanwhile
        assert tmp.exists()
        (tmp / "file").write_text("done")
    assert (tmp_path / "x" / "file").read_text() == "done" and (tmp_path / "x" / MARKER).exists()


def test_report_never_overwrites_a_foreign_file(compressed, tmp_path, capsys):
    foreign = tmp_path / "notes.html"
    foreign.write_text("<p>mine</p>")
    code, _, err = run(capsys, "report", compressed, "--out", foreign)
    assert code == 2 and "refusing to overwrite" in err and foreign.read_text() == "<p>mine</p>"
    page = tmp_path / "report.html"
    assert run(capsys, "report", compressed, "--out", page)[0] == 0
    assert run(capsys, "report", compressed, "--out", page)[0] == 0      # its own page: replaced


def test_a_killed_runs_spill_is_removed_by_the_next(tmp_path):
    from rankwise.pipeline.spill import Spill
    child = subprocess.Popen([sys.executable, "-c", "import os, sys; print(os.getpid())"],
                             stdout=subprocess.PIPE, text=True)
    dead = int(child.communicate()[0])
    left = tmp_path / f"rankwise-spill-{host_tag()}-{dead}-abc"
    left.mkdir()
    (left / "inputs3.safetensors").write_bytes(b"parked activations")
    with Spill(tmp_path) as spill:
        assert not left.exists() and spill.root.exists()
    assert list(tmp_path.iterdir()) == []


def test_another_machines_spill_and_temporary_output_in_a_shared_folder_are_left_alone(
        tmp_path):
    """On a shared --scratch (or output folder) a process id of another machine means
    nothing here: its folders are live as far as this machine can tell."""
    from rankwise.pipeline.spill import Spill
    child = subprocess.Popen([sys.executable, "-c", "import os, sys; print(os.getpid())"],
                             stdout=subprocess.PIPE, text=True)
    dead = int(child.communicate()[0])           # no such process here, nor maybe there
    other = "0" * 8 if host_tag() != "0" * 8 else "1" * 8
    spill = tmp_path / f"rankwise-spill-{other}-{dead}-abc"
    temporary = tmp_path / f".out.tmp-{other}-{dead}-abcdef01"
    for folder in (spill, temporary):
        folder.mkdir()
    with Spill(tmp_path):
        pass
    Output(tmp_path / "out", "compress")._tidy()
    assert spill.exists() and temporary.exists()


def test_a_checkpoint_on_a_full_disk_is_one_sentence_and_leaves_nothing(tmp_path, monkeypatch):
    import builtins

    from rankwise.train.runner import save_checkpoint
    real_open = builtins.open

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(builtins, "open", lambda path, mode="r", *a, **k:
                        Full(real_open(path, mode, *a, **k)) if "w" in mode else
                        real_open(path, mode, *a, **k))
    with pytest.raises(RankwiseError, match="no space left on the disk holding"):
        save_checkpoint({"step": torch.tensor(3)}, tmp_path / "run.ckpt")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []
    save_checkpoint({"step": torch.tensor(3)}, tmp_path / "run.ckpt")
    assert [p.name for p in tmp_path.iterdir()] == ["run.ckpt"]


def test_the_spill_writes_in_the_background_with_few_groups_waiting(tmp_path, monkeypatch):
    """put returns before its write (held here) is done, from a private copy the caller
    may overwrite at once; a read waits for its group; a third put waits for the first
    write, so the host copies waiting stay bounded."""
    import threading

    import safetensors.torch

    from rankwise.pipeline.spill import IN_FLIGHT, Spill
    gate, write = threading.Event(), safetensors.torch.save_file

    def held(tensors, path, *a, **k):
        gate.wait(10)
        return write(tensors, path, *a, **k)
    monkeypatch.setattr(safetensors.torch, "save_file", held)
    with Spill(tmp_path) as spill:
        t = torch.arange(12.).reshape(3, 4)
        for i in range(IN_FLIGHT):
            spill.put(f"g{i}", {"t": t})
        t.add_(100)
        assert not any(spill.root.iterdir())                  # nothing written yet
        third = threading.Thread(target=spill.put, args=("g9", {"t": t}))
        third.start()
        third.join(0.3)
        assert third.is_alive()                               # waits for the first write
        gate.set()
        third.join(10)
        assert torch.equal(spill.get("g0", "t", rows=2), torch.arange(8.).reshape(2, 4))
        assert torch.equal(spill.read("g9")["t"], torch.arange(12.).reshape(3, 4) + 100)


def test_a_background_write_that_fails_is_one_sentence_and_leaves_nothing(tmp_path,
                                                                          monkeypatch):
    import safetensors.torch

    from rankwise.pipeline.spill import Spill

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(RankwiseError, match="no space left in .* for the temporary spill of g"):
        with Spill(tmp_path) as spill:
            spill.put("g", {"t": torch.ones(3)})          # nothing reads it: the exit raises
    assert list(tmp_path.iterdir()) == []
