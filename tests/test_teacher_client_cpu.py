"""`benchmarks/teacher_client_cpu.py` runs end to end (a few calls), so it does not rot."""

from __future__ import annotations

import json

from benchmarks.teacher_client_cpu import main


def test_the_client_cpu_benchmark_measures_both_clients(tmp_path, capsys) -> None:
    out = tmp_path / "cpu.json"
    assert main(["--in-flight", "8", "--calls", "40", "--latency", "0", "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert [r["client"] for r in results] == ["openai", "aiohttp"]
    assert all(r["ok"] == 40 and r["cpu_ms_per_call"] > 0 for r in results)
    assert "openai / aiohttp CPU per call at 8 in flight" in capsys.readouterr().out
