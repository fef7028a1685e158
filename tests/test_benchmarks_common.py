"""benchmarks/common.py: the one target-line shape and the one way CPU is counted."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import CpuMeter, target_line

CHECK = Path(__file__).resolve().parents[2] / "shared" / "tools" / "check_targets.py"


def test_target_lines_are_what_check_targets_reads(tmp_path: Path) -> None:
    lines = [
        target_line("share of ideal", 93.25, ">=", 90, "%"),
        target_line("ratio", 1.234, ">=", 1.5, "x", ".2f"),
        target_line("CPU per row", 1.2, "<=", 1.5, "ms"),
        target_line("wall", 901, "<=", 900, "s", ".0f"),
    ]
    assert lines[0] == "share of ideal: 93.2 % (target >= 90 %: MET)"
    assert lines[1] == "ratio: 1.23x (target >= 1.5x: MISSED)"
    log = tmp_path / "log"
    log.write_text("\n".join(lines) + "\n")
    if CHECK.is_file():
        out = subprocess.run([sys.executable, str(CHECK), str(log)], capture_output=True, text=True)
        assert out.returncode == 1  # two MISSED
        assert out.stdout.count("(target") == 4, out.stdout


def test_a_child_that_exits_is_counted_once() -> None:
    """A child burning ~0.6 s of CPU and exiting inside the window counts about 0.6 s: sampled
    while it runs, and not again in its parent's `cutime` once reaped."""
    meter = CpuMeter(lambda pid, cmd, parent: "driver" if parent is None else "child", 0.05)
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass"
    subprocess.run([sys.executable, "-c", burn], check=True)
    time.sleep(0.1)
    cpu = meter.stop()
    assert 0.4 <= cpu["child"] <= 1.3, cpu  # + interpreter start-up
    assert cpu["driver"] < 0.4, cpu  # the parent's cutime would have added the child's 0.6 s
    assert cpu["machine all"] > 0


def test_the_position_probe_cuts_a_longer_problem_to_what_step_one_needs() -> None:
    from benchmarks.position_probe import cut_problem
    from socratic import arith

    cfg = arith.ArithConfig.parse(None)
    p = next(iter(arith.generate(cfg, 0, "long")))
    cut = cut_problem(p.question)
    assert cut == (
        "Mia has 18 shells. Mia packs the shells into 1 bag of 7 and keeps the rest. "
        "How many shells does Mia have after buying more?"
    )
    assert len(p.steps) >= 5 and "18-1*7" in p.steps[0].answer  # step 1 reads only those
