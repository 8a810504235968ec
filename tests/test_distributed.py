"""torchrun with 2 gloo processes gives what one process gives, along the route NCCL takes."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rankwise.cli import main


@pytest.mark.parametrize("extra", [["--allocation", "spectrum", "--cut", "oneshot"],
                                   ["--allocation", "uniform", "--steps", "2",
                                    "--refine-steps", "4", "--refine-lr", "1e-4"],
                                   ["--bits", "5", "--group-size", "32", "--refine-steps", "2"]],
                         ids=["oneshot", "anchored in two steps", "bits"])
def test_two_gloo_processes_equal_one(tiny_folder, tmp_path, extra):
    """Equal up to round-off, at the default anchor damping: each process sums its share
    of the batches, so the sums (and what is decomposed from them) differ in the last
    bits; the refinement takes the same steps in both."""
    budget = [] if "--bits" in extra else ["--ratio", "0.4"]
    args = ["compress", "--model", str(tiny_folder), "--metric", "kfac", *budget,
            "--calib-samples", "6", "--seqlen", "32", "--batch-size", "2", *extra]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "rankwise", *args, "--out", str(tmp_path / "two")],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("compressed ") == 1           # rank 0 alone reports
    one, two = (json.loads((tmp_path / f / "rankwise.json").read_text()) for f in ("one", "two"))
    assert one["structure"] == two["structure"] and one["forms"].keys() == two["forms"].keys()
    for name, form in one["forms"].items():         # the same forms; prices up to round-off
        other = two["forms"][name]
        assert form.keys() == other.keys()
        for key, value in form.items():
            assert other[key] == (pytest.approx(value, rel=1e-6) if "loss" in key else value)
    for block, record in one.get("refinement", {}).items():
        assert record["after"] < record["before"]
        assert two["refinement"][block]["after"] == pytest.approx(record["after"], rel=1e-3)
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3,
                                   atol=1e-4 * float(a[key].abs().max()), msg=key)


ROUTED = r'''
import sys, weakref
import torch, torch.distributed as dist
sys.path.insert(0, {tests!r})
from conftest import structured_tiny
from rankwise import CompressConfig, compress_
from rankwise.cut.compress import Execution
from rankwise.pipeline import distributed
from rankwise.pipeline.overlap import Beside

dist.init_process_group("gloo")
rank, size = dist.get_rank(), dist.get_world_size()
moved = {{}}

def to_backend(t):
    # what NCCL's route does: a copy on the backend's device (here another CPU tensor)
    copy = t.detach().clone()
    moved[id(copy)] = weakref.ref(copy)
    return copy

def came_through(t):
    return id(t) in moved and moved[id(t)]() is t

class Checked:
    """Collectives that refuse any tensor not handed to them through to_backend."""
    calls = 0
    def all_reduce(self, t):
        assert came_through(t), "all_reduce got a tensor that did not go through the backend's device"
        Checked.calls += 1
        dist.all_reduce(t)
    def broadcast(self, t, src):
        assert came_through(t), "broadcast got a tensor that did not go through the backend's device"
        Checked.calls += 1
        dist.broadcast(t, src)

distributed.Comm.current = classmethod(lambda cls: cls(rank, size, to_backend, Checked()))
model = structured_tiny("llama")
calib = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
# decompositions beside the walk, as on a GPU: their broadcasts must keep every process's
# collectives in one order whatever the worker's timing
beside = lambda device: Beside(device, synchronize=lambda device: None)
summary = compress_(model, CompressConfig(metric="kfac", ratio=0.4, refine_steps=4), calib,
                    progress=False, execution=Execution(batch_size=2, overlap=beside))
assert Checked.calls > 0
if rank == 0:
    torch.save({{"ranks": summary.ranks, "state": model.state_dict()}}, {out!r})
'''


def test_every_collective_takes_the_backends_device_tensors(tmp_path):
    """The route an NCCL run takes (every tensor moved to the backend's device before a
    collective, the result moved back; the allocation's decompositions beside the walk) on
    2 gloo processes, checked at each collective; the result is one process's, inline
    (damped as in test_two_gloo_processes_equal_one)."""
    from conftest import structured_tiny

    from rankwise import CompressConfig, compress_
    from rankwise.cut.compress import Execution
    script = tmp_path / "routed.py"
    script.write_text(ROUTED.format(tests=str(Path(__file__).parent), out=str(tmp_path / "two.pt")))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc-per-node", "2", str(script)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    model = structured_tiny("llama")
    calib = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
    one = compress_(model, CompressConfig(metric="kfac", ratio=0.4, refine_steps=4), calib,
                    progress=False, execution=Execution(batch_size=2))
    two = torch.load(tmp_path / "two.pt")
    assert two["ranks"] == one.ranks
    for key, value in model.state_dict().items():
        torch.testing.assert_close(two["state"][key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_the_backends_device_is_the_processs_gpu_under_nccl(monkeypatch):
    import torch.distributed as dist

    from rankwise.pipeline import distributed
    monkeypatch.setattr(dist, "get_backend", lambda *a: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert distributed.backend_device() == torch.device("cuda", 3)
    monkeypatch.setattr(dist, "get_backend", lambda *a: "gloo")
    assert distributed.backend_device() == torch.device("cpu")


@pytest.mark.parametrize("gpus,backend,device", [(True, "nccl", 2), (False, "gloo", None)])
def test_torchrun_joins_nccl_on_the_local_gpu_where_there_is_one(monkeypatch, gpus, backend,
                                                                 device):
    """init_from_env's NCCL route (the GPU is chosen before the group is joined, or every
    process would share GPU 0) with CUDA's answers stood in for."""
    import torch.distributed as dist

    from rankwise.pipeline import distributed
    joined, chosen = [], []
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setattr(dist, "is_initialized", lambda: bool(joined))
    monkeypatch.setattr(dist, "init_process_group", joined.append)
    monkeypatch.setattr(dist, "get_rank", lambda: 2)
    monkeypatch.setattr(dist, "get_world_size", lambda: 4)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert distributed.init_from_env() == (2, 4)
    assert joined == [backend] and chosen == ([device] if device is not None else [])
