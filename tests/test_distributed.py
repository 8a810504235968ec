"""torchrun with 2 gloo processes gives what one process gives."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from rankwise.cli import main


@pytest.mark.parametrize("extra", [["--allocation", "spectrum"],
                                   ["--allocation", "uniform", "--steps", "2", "--sequential"]])
def test_two_gloo_processes_equal_one(tiny_folder, tmp_path, extra):
    args = ["compress", "--model", str(tiny_folder), "--metric", "kfac", "--ratio", "0.4",
            "--calib-samples", "6", "--seqlen", "32", "--batch-size", "2", *extra]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "rankwise", *args, "--out", str(tmp_path / "two")],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("compressed ") == 1           # rank 0 alone reports
    one, two = (json.loads((tmp_path / f / "rankwise.json").read_text()) for f in ("one", "two"))
    assert one["ranks"] == two["ranks"]
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
