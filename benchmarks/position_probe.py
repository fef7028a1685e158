"""Does a solver fail on longer problems because of what they say or because of how long they
are? (issue #21)

    python benchmarks/position_probe.py --solver outputs/bench/distill_quality/students/solver \
        [--limit 100] [--scales 0.85,0.7] [--json PATH]

On the longer `arith` split (5-6 operations, more than any training problem) the solver gets
step 1 twice, teacher-forced: with the whole problem, and with the problem cut to what step 1
needs (its first two sentences and its question). Same sub-question, same answer, same model:
if the cut one is right and the whole one is not, the failure is the length (token distances
it never trained on), not the content. Then the whole problem again with rotary positions
scaled down at inference (position interpolation, each of `--scales`), the fix that needs no
training. Measured on the seed-0 solver of the contiguous-position default run: whole 51 %,
cut 100 %, scaled 7 / 3 / 3 % (0.85 / 0.7 / 0.55); that is why training draws positions
(`--train-positions`, `trainers.data.train_position_ids`). It measures, it sets no target.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.common import add_json_arg, write_json  # noqa: E402
from socratic.stats import wilson_interval  # noqa: E402


def cut_problem(question: str) -> str:
    """The problem's first two sentences (the start and the first operation) and its question:
    all that step 1 of an `arith` problem needs."""
    sentences = [s.strip() for s in re.findall(r"[^.?]+[.?]", question)]
    return " ".join(sentences[:2] + sentences[-1:])


@contextmanager
def scaled_rotary(model: Any, scale: float) -> Iterator[None]:
    """Inside the block, the model's rotary embedding sees its position ids times `scale`."""
    rotary = model.model.rotary_emb
    original = rotary.forward

    def forward(x: Any, position_ids: Any, *args: Any, **kw: Any) -> Any:
        return original(x, position_ids.float() * scale, *args, **kw)

    rotary.forward = forward
    try:
        yield
    finally:
        rotary.forward = original


def main(argv: list[str] | None = None) -> int:
    from socratic import arith
    from socratic.answers import answers_match, extract_answer
    from socratic.formats import parse_solver, solver_prompt
    from socratic.generate import Generator

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--solver", required=True, help="an exported solver dir (rotary student)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the arith problems")
    ap.add_argument("--dataset-config", default=None, help="arith knobs (socratic/arith.py)")
    ap.add_argument("--limit", type=int, default=100, help="longer problems to probe")
    ap.add_argument("--scales", default="0.85,0.7,0.55", help="inference position scales")
    add_json_arg(ap)
    args = ap.parse_args(argv)

    cfg = arith.ArithConfig.parse(args.dataset_config)
    problems = list(arith.generate(cfg, args.seed, "long"))[: args.limit]
    solver = Generator(args.solver, device="cpu")
    generate = partial(solver.complete, max_new_tokens=48, calculator=True)
    gold = [extract_answer(p.steps[0].answer) for p in problems]

    def score(questions: list[str]) -> dict[str, Any]:
        prompts = [solver_prompt(q, [], p.steps[0].question)
                   for q, p in zip(questions, problems, strict=True)]  # fmt: skip
        outs: list[str] = []
        for i in range(0, len(prompts), 50):
            outs += [getattr(r, "text", str(r)) for r in generate(prompts[i : i + 50])]
        hits = sum(answers_match(extract_answer(parse_solver(t)), g)
                   for t, g in zip(outs, gold, strict=True))  # fmt: skip
        n = len(prompts)
        return {"correct": hits, "total": n, "accuracy": round(100 * hits / n, 2),
                "ci95": list(wilson_interval(hits, n))}  # fmt: skip

    figures: dict[str, Any] = {"solver": args.solver, "problems": len(problems)}
    whole = [p.question for p in problems]
    figures["whole"] = score(whole)
    figures["cut"] = score([cut_problem(q) for q in whole])
    figures["scaled"] = {}
    for scale in (float(x) for x in args.scales.split(",") if x.strip()):
        with scaled_rotary(solver.model, scale):
            figures["scaled"][str(scale)] = score(whole)

    def line(name: str, r: dict[str, Any]) -> str:
        lo, hi = r["ci95"]
        return f"{name} (measured, no target): {r['accuracy']} % [{lo}, {hi}]"

    print(f"solver {args.solver}, step 1 of {len(problems)} longer problems, teacher-forced:")
    print(line("step 1, whole problem", figures["whole"]))
    print(line("step 1, problem cut to its first two sentences and question", figures["cut"]))
    for scale, r in figures["scaled"].items():
        print(line(f"step 1, whole problem, positions x {scale} at inference", r))
    write_json(args.json, figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
