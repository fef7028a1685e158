"""How often the judge's answer extraction agrees with a human grader on real model outputs
(issue #23 item 2).

    python benchmarks/extraction_agreement.py [--corpus PATH] [--json PATH]

Every accuracy this project reports, and every teacher solution it keeps as training data,
goes through `socratic.answers.extract_answer`; its unit tests check the patterns someone
thought of, not the text real models write. The corpus (`tests/data/extraction_corpus.jsonl`)
holds real outputs of a small instruct model on GSM8K test problems, each labelled by hand
with the final answer a careful grader reads in it (`null` where the text states none: cut off
before the answer, or never committing), before the extractor was run on them. The gold
answers and problems are not in the corpus: this measures reading, not solving.

Agreement is the share of outputs where `extract_answer(text, "number")` gives the label
(compared with `answers_match`; both None counts as agreement), with its 95 % Wilson interval.
Every disagreement is printed with the end of its text, so a reader can judge who is right.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.common import add_json_arg, target_line, write_json  # noqa: E402

DEFAULT_CORPUS = REPO / "tests" / "data" / "extraction_corpus.jsonl"
TARGET_PCT = 95.0
EXCERPT_CHARS = 120
FIELDS = ("id", "text", "label", "note")


def read_corpus(path: Path) -> list[dict[str, Any]]:
    """The corpus rows; raises ValueError on a row without the corpus's fields."""
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        missing = [f for f in FIELDS if f not in row]
        if missing:
            raise ValueError(f"{path}:{n}: missing {', '.join(missing)}")
        rows.append(row)
    return rows


def excerpt(text: str, chars: int = EXCERPT_CHARS) -> str:
    """The last `chars` characters of `text` on one line (where the answer, if any, is)."""
    tail = " ".join(text.split())
    return tail if len(tail) <= chars else "..." + tail[-chars:]


def agree(extracted: str | None, label: str | None) -> bool:
    from socratic.answers import answers_match, normalize_answer

    if label is None or extracted is None:
        return label is None and extracted is None
    return answers_match(extracted, normalize_answer(label, "number"))


def measure(rows: list[dict[str, Any]]) -> dict[str, Any]:
    from socratic.answers import extract_answer
    from socratic.stats import wilson_interval

    if not rows:
        raise ValueError("the corpus is empty")
    disagreements = []
    failures = human_none = 0
    for row in rows:
        extracted = extract_answer(row["text"], "number")
        failures += extracted is None
        human_none += row["label"] is None
        if not agree(extracted, row["label"]):
            disagreements.append({
                "id": row["id"], "label": row["label"], "extracted": extracted,
                "note": row.get("note"), "excerpt": excerpt(row["text"]),
            })  # fmt: skip
    n = len(rows)
    agreed = n - len(disagreements)
    lo, hi = wilson_interval(agreed, n)
    kinds: dict[str, int] = {}
    for d in disagreements:
        kind = (
            "extractor answered, human none" if d["label"] is None
            else "extractor none, human answered" if d["extracted"] is None
            else "different numbers"
        )  # fmt: skip
        kinds[kind] = kinds.get(kind, 0) + 1
    return {
        "outputs": n,
        "agreed": agreed,
        "agreement_pct": round(100 * agreed / n, 1),
        "agreement_ci95_pct": [lo, hi],
        "extraction_failures": failures,
        "extraction_failure_pct": round(100 * failures / n, 1),
        "human_none": human_none,
        "human_none_pct": round(100 * human_none / n, 1),
        "disagreement_kinds": kinds,
        "disagreements": disagreements,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--corpus", type=Path, default=DEFAULT_CORPUS,
        help="labelled outputs, one JSON object a line (id, text, label, note)",
    )  # fmt: skip
    add_json_arg(ap)
    args = ap.parse_args(argv)
    figures = {"corpus": str(args.corpus), **measure(read_corpus(args.corpus))}
    lo, hi = figures["agreement_ci95_pct"]
    print(
        f"{args.corpus.name}: {figures['agreed']} of {figures['outputs']} outputs agree "
        f"({figures['agreement_pct']:.1f} %, 95 % CI {lo:.1f}-{hi:.1f} %); extractor found no "
        f"answer in {figures['extraction_failures']} ({figures['extraction_failure_pct']:.1f} %), "
        f"the human in {figures['human_none']} ({figures['human_none_pct']:.1f} %)"
    )
    for kind, count in sorted(figures["disagreement_kinds"].items()):
        print(f"  {kind}: {count}")
    for d in figures["disagreements"]:
        print(f"{d['id']}: label={d['label']} extracted={d['extracted']}  | {d['excerpt']!r}")
    print(target_line("judge agreement with human labels", figures["agreement_pct"], ">=",
                      TARGET_PCT, "%"))  # fmt: skip
    write_json(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
