"""How many training problems share a 13-gram with their evaluation split, and how long the
check takes (issue #23 item 5).

    python benchmarks/decontamination.py [--json PATH]

Reads the real datasets under `$SOCRATIC_SHARED_DATA` (default `../shared/data`): GSM8K
train against test, SVAMP's seeded train against test (`SVAMP.json`, the paper's 700/300) and
StrategyQA train against dev, through the same adapters and the same check training runs
(`socratic.decontaminate`). The count is what `--decontaminate` drops before training on that
data; the time is what it adds to a training run's start (reading the files not included, as a
run has its rows already and loads the evaluation set once).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.common import add_json_arg, target_line, write_json  # noqa: E402

TARGET_S = 5.0  # GSM8K train (7 473) against test (1 319): seconds, not minutes
# (family, training file, training split, evaluation file, evaluation split)
PAIRS = [
    ("gsm8k", "gsm8k/train.jsonl", "train", "gsm8k/test.jsonl", "test"),
    ("svamp", "svamp/SVAMP.json", "train", "svamp/SVAMP.json", "test"),
    ("strategyqa", "strategyqa/train.json", "train", "strategyqa/dev.json", "dev"),
]


def shared_data() -> Path:
    return Path(os.environ.get("SOCRATIC_SHARED_DATA", REPO.parent / "shared" / "data"))


def measure(name: str, train: Path, train_split: str, test: Path, test_split: str) -> dict:
    from socratic.adapters import DatasetSpec, load_problems
    from socratic.decontaminate import NgramIndex, decontaminate

    def load(path: Path, split: str) -> list[tuple[str, str]]:
        spec = DatasetSpec(name, split=split, path=str(path))
        return [(p.id, p.question) for p in load_problems(spec)]

    t0 = time.perf_counter()
    train_problems, eval_problems = load(train, train_split), load(test, test_split)
    t1 = time.perf_counter()
    index = NgramIndex(eval_problems, name=f"{name}/{test_split}")
    report = decontaminate(train_problems, index)
    t2 = time.perf_counter()
    return {
        "pair": f"{name}/{train_split} vs {name}/{test_split}",
        "read_s": round(t1 - t0, 3),
        "check_s": round(t2 - t1, 3),
        **report.summary(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_json_arg(ap)
    args = ap.parse_args(argv)
    figures: dict[str, Any] = {}
    for name, train, train_split, test, test_split in PAIRS:
        train_path, test_path = shared_data() / train, shared_data() / test
        if not (train_path.is_file() and test_path.is_file()):
            print(f"{name}: {train_path} or {test_path} not present; skipped")
            continue
        r = measure(name, train_path, train_split, test_path, test_split)
        figures[name] = r
        print(
            f"{r['pair']}: {r['dropped']} of {r['checked']} training problems share a "
            f"{r['ngram']}-gram with {r['eval_problems']} evaluation problems "
            f"(check {r['check_s']:.2f} s, read {r['read_s']:.2f} s)"
        )
        for pid, m in list(r["matches"].items())[:5]:
            print(f"  {pid} ~ {m['eval_id']}: {m['ngram']!r}")
    if "gsm8k" in figures:
        print(target_line("gsm8k_check_s", figures["gsm8k"]["check_s"], "<=", TARGET_S, "s", ".2f"))
    write_json(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
