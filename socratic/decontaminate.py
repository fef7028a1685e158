"""Decontamination: training problems that share a 13-gram with the evaluation problems.

A student that saw a test problem (or most of it) during training scores higher on it for the
wrong reason, and GSM8K-style sets are small enough that a few leaked problems move the table.
The check is the one GPT-3 (Brown et al. 2020, appendix C) used and NeMo Curator's
`TaskDecontamination` implements: texts are normalised, cut into word n-grams (n = 13), and a
training text that shares any n-gram with an evaluation text is dropped. Only question texts
are compared: a question is what a student is asked at evaluation, and solutions share
boilerplate ("How many ... does she have left?") that says nothing about leakage.

Normalisation (`normalize`) is NeMo Curator's `get_words` - lowercase, punctuation deleted (not
replaced by a space, so `$1,250` stays the one token `1250`), split on whitespace - with
Unicode NFKC first, so full-width digits, ligatures and non-breaking spaces compare equal to
their plain forms, and with every character that is neither a letter, a digit nor whitespace
deleted (Unicode punctuation and symbols such as curly quotes, `×`, `€`, not only ASCII's).

Short texts (the GPT-3 / NeMo Curator rule): a text with fewer than `n` words but at least
`min_words` (8) is used whole, so two texts match when they share a run of
`min(n, len(a), len(b))` consecutive words; a text under `min_words` words never matches,
because a 5-word question ("How many apples are left?") occurs in unrelated problems and would
drop them. GSM8K questions are nearly all longer than 13 words, so the rule rarely applies there.

`python -m socratic.decontaminate --train FILE --eval FILE [--dataset gsm8k]` reports the
overlap of two problem files. Training (`trainers/train.py --decontaminate`) drops the matched
problems on the driver before any worker reads the data.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import unicodedata
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from socratic.adapters import DATASETS, DatasetSpec, load_problems, read_local

NGRAM = 13
MIN_WORDS = 8
# The split each dataset family is evaluated on (pipelines/evaluate.py's default `--split`).
# `arith` is absent on purpose: its splits are disjoint by construction, and its templated wording
# shares 13-grams between any two problems, so an n-gram check would drop every problem.
EVAL_SPLITS = {"gsm8k": "test", "svamp": "test", "strategyqa": "test", "sample": "test"}

_NOT_WORD = re.compile(r"[^\w\s]|_")  # `\w` keeps `_`, which string.punctuation (NeMo) deletes


def normalize(text: str) -> str:
    """`text` as the n-grams see it: NFKC, lowercase, punctuation and symbols deleted, single
    spaces. Both sides go through this, so only wording and numbers decide a match."""
    text = _NOT_WORD.sub("", unicodedata.normalize("NFKC", text).lower())
    return " ".join(text.split())


def words(text: str) -> list[str]:
    return normalize(text).split()


def ngrams(ws: Sequence[str], n: int) -> Iterator[str]:
    """Each run of `n` consecutive words, space-joined (one hashable string per n-gram)."""
    for i in range(len(ws) - n + 1):
        yield " ".join(ws[i : i + n])


@dataclass(frozen=True)
class Match:
    """Why a training problem was dropped: the evaluation problem and the words they share."""

    eval_id: str
    ngram: str


class NgramIndex:
    """The n-grams of a set of evaluation texts, asked per training text (`match`).

    One dict of n-gram -> first evaluation id: GSM8K's 1 319 test questions give ~60k entries,
    and a training text costs one dict lookup per word. The tables for short texts (see the
    module docstring) are built only when a text of that length turns up.
    """

    def __init__(
        self,
        problems: Iterable[tuple[str, str]],
        *,
        name: str = "the evaluation set",
        n: int = NGRAM,
        min_words: int = MIN_WORDS,
    ) -> None:
        if not 1 <= min_words <= n:
            raise ValueError(f"need 1 <= min_words <= n; got min_words {min_words}, n {n}")
        self.name, self.n, self.min_words = name, n, min_words
        self._texts: list[tuple[str, list[str]]] = []
        self._whole: dict[int, dict[str, str]] = {}  # length < n -> whole text -> id
        for pid, text in problems:
            ws = words(text)
            if len(ws) < min_words:
                continue
            self._texts.append((pid, ws))
            if len(ws) < n:
                self._whole.setdefault(len(ws), {}).setdefault(" ".join(ws), pid)
        self.size = len(self._texts)
        self._grams: dict[int, dict[str, str]] = {}
        self._table(n)

    def _table(self, size: int) -> dict[str, str]:
        """Every `size`-gram of the evaluation texts that have at least `size` words."""
        table = self._grams.get(size)
        if table is None:
            table = {}
            for pid, ws in self._texts:
                for g in ngrams(ws, size):
                    table.setdefault(g, pid)
            self._grams[size] = table
        return table

    def match(self, text: str) -> Match | None:
        """The first evaluation text sharing `min(n, len(text), len(eval))` consecutive words
        with `text` (at least `min_words`), or None."""
        ws = words(text)
        if len(ws) < self.min_words:
            return None
        own = min(len(ws), self.n)  # all of a short text, else its n-grams
        checks = [(own, self._table(own))]
        checks += [(k, t) for k, t in sorted(self._whole.items()) if k < own]
        for size, table in checks:
            for g in ngrams(ws, size):
                pid = table.get(g)
                if pid is not None:
                    return Match(pid, g)
        return None


@dataclass
class Report:
    """What one decontamination did: the count goes into a run's summary."""

    eval_set: str
    n: int = NGRAM
    eval_problems: int = 0
    checked: int = 0  # distinct training problems looked at
    matches: dict[str, Match] = field(default_factory=dict)  # training id -> why it went
    skipped: list[str] = field(default_factory=list)  # eval sets not checked, and why

    @property
    def dropped(self) -> int:
        return len(self.matches)

    def summary(self) -> dict[str, Any]:
        """JSON-ready: counts, and per dropped problem the evaluation problem it matched."""
        return {
            "eval_set": self.eval_set,
            "ngram": self.n,
            "eval_problems": self.eval_problems,
            "checked": self.checked,
            "dropped": self.dropped,
            "matches": {
                pid: {"eval_id": m.eval_id, "ngram": m.ngram} for pid, m in self.matches.items()
            },
            "skipped": list(self.skipped),
        }

    def line(self) -> str:
        return (
            f"decontamination: dropped {self.dropped} of {self.checked} training problems "
            f"sharing a {self.n}-gram with {self.eval_set} ({self.eval_problems} problems)"
        )


def decontaminate(problems: Iterable[tuple[str, str]], index: NgramIndex) -> Report:
    """Check each distinct training problem id (its first text) against `index`."""
    report = Report(index.name, index.n, index.size)
    seen: set[str] = set()
    for pid, text in problems:
        if pid in seen:
            continue  # several teacher samples of one problem: one question
        seen.add(pid)
        m = index.match(text)
        if m is not None:
            report.matches[pid] = m
    report.checked = len(seen)
    return report


# --- where evaluation texts come from -------------------------------------------------------------


def problems_from_file(path: str | Path) -> list[tuple[str, str]]:
    """(id, question) of each record of a jsonl/json/csv/parquet file (`read_local`).

    The question is the `question` field (GSM8K, StrategyQA, annotation Parquet), or SVAMP's
    `Body` + `Question`; the id is the record's `id` where it has one, else `<file>:<where>`.
    A file with no such field is an error naming the file and the record, not an empty set.
    """
    p = Path(path)
    out = []
    for where, record in read_local(p):
        text = _question(record)
        if text is None:
            raise ValueError(
                f"{p}: {where} has no question field (need 'question', or SVAMP's 'Body' and "
                f"'Question'); fields: {', '.join(map(str, record)) or 'none'}"
            )
        pid = record.get("id")
        out.append((str(pid) if pid not in (None, "") else f"{p.name}:{where}", text))
    if not out:
        raise ValueError(f"{p}: no problems to decontaminate against")
    return out


def _question(record: Mapping[str, Any]) -> str | None:
    q = record.get("question")
    if isinstance(q, str) and q.strip():
        return q
    body, q = record.get("Body"), record.get("Question")
    if isinstance(q, str) and q.strip():
        return f"{body} {q}" if isinstance(body, str) else q
    return None


def auto_eval_specs(datasets: Iterable[str]) -> tuple[list[DatasetSpec], list[str]]:
    """(what each training dataset family is evaluated on, notes on families with none known).

    The families come from the training rows' `dataset` column; each maps to the split
    `pipelines/evaluate.py` evaluates by default (`EVAL_SPLITS`), loaded as evaluation loads it
    (the hub, unless the caller passes a loader with local files).
    """
    specs, notes = [], []
    for name in sorted(set(datasets)):
        if name in EVAL_SPLITS:
            specs.append(DatasetSpec(name, split=EVAL_SPLITS[name]))
        elif name == "arith":
            notes.append("arith: generated with disjoint splits and shared template wording; "
                         "not checked")  # fmt: skip
        else:
            notes.append(f"{name}: no known evaluation set; give --decontaminate FILE")
    return specs, notes


# --- CLI: the overlap of two files ----------------------------------------------------------------


def _load(path: str, dataset: str | None, split: str) -> list[tuple[str, str]]:
    if dataset is None:
        return problems_from_file(path)
    return [(p.id, p.question) for p in load_problems(DatasetSpec(dataset, split=split, path=path))]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m socratic.decontaminate",
        description="Count training problems sharing an n-gram with evaluation problems.",
    )
    ap.add_argument("--train", required=True, help="training problems (jsonl/json/csv/parquet)")
    ap.add_argument("--eval", required=True, help="evaluation problems, same formats")
    ap.add_argument("--dataset", choices=DATASETS, help="read both through this adapter (ids "
                    "such as gsm8k/test/17); default: any file with a question field")  # fmt: skip
    ap.add_argument("-n", type=int, default=NGRAM, help="n-gram length in words")
    ap.add_argument("--json", help="write the report (with every match) here")
    args = ap.parse_args(argv)
    try:
        t0 = time.perf_counter()
        train = _load(args.train, args.dataset, "train")
        evals = _load(args.eval, args.dataset, "test")
        t1 = time.perf_counter()
        index = NgramIndex(evals, name=args.eval, n=args.n, min_words=min(MIN_WORDS, args.n))
        report = decontaminate(train, index)
        t2 = time.perf_counter()
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.line())
    for pid, m in list(report.matches.items())[:10]:
        print(f"  {pid} ~ {m.eval_id}: {m.ngram!r}")
    print(f"read {t1 - t0:.2f} s, index + check {t2 - t1:.2f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(report.summary(), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
