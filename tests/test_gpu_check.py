"""`benchmarks/gpu_check.py --smoke`: the GPU check's own code on CPU (gloo, tiny shapes).

No GPU here; this keeps the script runnable for when one is lent: both engines it may use
(DeepSpeed ZeRO, and torch FSDP2 for a box without deepspeed), at ZeRO-3, and its checks of
the loop's pieces (train/eval switch, collective devices, token-weighted loss) all pass.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_smoke_runs_both_engines_and_its_checks_pass(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks/gpu_check.py"), "--smoke",
         "--engine", "deepspeed,fsdp", "--stages", "3", "--json", str(out)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    runs = {(r["engine"], r["stage"]) for r in summary["results"]}
    assert runs == {("deepspeed", 3), ("fsdp", 3)}  # stage 2 differs by one setting
    assert summary["backend"] == "gloo" and summary["all_reduce_ok"]
    for r in summary["results"]:
        assert r["tokens_per_s"] > 0 and r["mode_forwards"] > 0 and r["collectives"] > 0
    assert summary["targets"] and all(t.endswith(": MET)") for t in summary["targets"])
    assert "MISSED" not in proc.stdout
