"""bench/gpu_check.py, the script a lent GPU runs, on tiny shapes on the CPU (--dry): every
compress part goes through the real API and writes its JSON lines."""
import json
import subprocess
import sys
from pathlib import Path


def test_the_gpu_check_runs_dry_and_writes_a_line_per_row(tmp_path):
    script = Path(__file__).parents[1] / "bench" / "gpu_check.py"
    subprocess.run([sys.executable, str(script), "--dry", "--parts", "eigh", "onload7",
                    "whole11", "--out", str(tmp_path)], check=True, capture_output=True)
    rows = [json.loads(line) for line in (tmp_path / "gpu_check.jsonl").read_text().splitlines()]
    assert [r["part"] for r in rows] == ["eigh"] * 6 + ["onload7", "whole11"]
    assert not [r for r in rows if "error" in r]
    assert all(r["decompositions"] > r["values_only"] > 0 and r["float64_redos"] >= 0
               for r in rows[6:])
