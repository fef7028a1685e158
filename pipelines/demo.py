"""The end-to-end demo (`make demo`): what a new user runs first.

Stages and the issue that builds each: annotate (#3), train (#4), serve (#5), evaluate (#6).
Until they land, the demo runs the stage that exists - the Socratic core - on real data and says
plainly which stages are still to come; it never pretends to have run one.

The core stage: load the bundled sample (and the real datasets when `--shared-data` holds them),
show one problem in every student format, recompute every gold calculator step with the safe
calculator, and check that each problem's last step carries its gold answer.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # `python pipelines/demo.py`, as `ray job submit` runs it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from socratic.adapters import DatasetSpec, load_problems
from socratic.answers import answers_match, extract_answer
from socratic.calculator import apply_calculator
from socratic.formats import ROLES, examples_for
from socratic.records import Problem

PENDING = [
    ("annotate", 3, "teacher decompositions on Ray Data -> Parquet"),
    ("train", 4, "decomposer + solver on Ray Train + DeepSpeed ZeRO"),
    ("serve", 5, "Ray Serve deployments + the solving loop over HTTP"),
    ("evaluate", 6, "accuracy table per method"),
]

# (dataset, split, file under the shared data folder)
SHARED = [
    ("gsm8k", "train", "gsm8k/train_socratic.jsonl"),
    ("gsm8k", "test", "gsm8k/test_socratic.jsonl"),
    ("svamp", "test", "svamp/SVAMP.json"),
    ("strategyqa", "train", "strategyqa/train.json"),
    ("strategyqa", "dev", "strategyqa/dev.json"),
]


def check_problems(problems: Sequence[Problem]) -> dict[str, int]:
    """Counts of what the gold data supports: steps, calculator spans, last step == answer."""
    out = {"problems": len(problems), "steps": 0, "spans": 0, "span_errors": 0, "last_ok": 0}
    for p in problems:
        out["steps"] += len(p.steps)
        for s in p.steps:
            result = apply_calculator(s.answer)
            out["spans"] += result.evaluated
            out["span_errors"] += len(result.errors)
        if p.steps and answers_match(extract_answer(p.steps[-1].answer, p.answer_kind), p.answer):
            out["last_ok"] += 1
    return out


def show_formats(p: Problem) -> None:
    print(f"\n--- {p.id}: every student format (prompt | target) ---")
    for role in ROLES:
        ex = examples_for(
            role, problem=p.question, steps=p.steps, solution=p.solution, answer=p.answer
        )[-1]
        print(f"[{role}]\n{ex.prompt}| {ex.target}\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shared-data",
        type=Path,
        default=Path(__file__).resolve().parents[2] / "shared" / "data",
        help="folder with the real GSM8K/SVAMP/StrategyQA files (skipped if absent)",
    )
    args = parser.parse_args(argv)
    t0 = time.perf_counter()

    print("== stage: core (socratic/) ==")
    sample = list(load_problems(DatasetSpec("sample", split="all")))
    show_formats(sample[0])
    rows = [("sample", "all", check_problems(sample))]
    for name, split, rel in SHARED:
        path = args.shared_data / rel
        if path.is_file():
            rows.append(
                (
                    name,
                    split,
                    check_problems(
                        list(load_problems(DatasetSpec(name, split=split, path=str(path))))
                    ),
                )
            )
        else:
            print(f"(skipping {name}/{split}: {path} not found)")

    print(
        f"{'dataset':<12}{'split':<7}{'problems':>9}{'steps':>8}{'calc spans':>11}"
        f"{'calc errors':>12}{'last step = gold':>18}"
    )
    for name, split, c in rows:
        if c["steps"]:
            last = f"{c['last_ok']:>9} ({c['last_ok'] / c['problems']:.1%})"
        else:
            last = f"{'n/a: no gold steps':>20}"
        print(
            f"{name:<12}{split:<7}{c['problems']:>9}{c['steps']:>8}{c['spans']:>11}"
            f"{c['span_errors']:>12}{last}"
        )

    print("\n== stages not built yet (the demo will run them once they land) ==")
    for stage, issue, what in PENDING:
        print(f"  {stage:<9} issue #{issue}: {what}")
    print(f"\ndone in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
