"""Dataset adapters: GSM8K, SVAMP, StrategyQA and the bundled sample, as `Problem` records.

Each dataset comes either from the Hugging Face hub (`datasets.load_dataset`, the default on a
cluster) or from a local file (jsonl, json, csv or parquet; what air-gapped users and the tests
use). Both paths go through the same per-record parser, so a record reads the same either way.

Ids are stable: `<dataset>/<split>/<key>`, where the key is the dataset's own id where it has one
(StrategyQA `qid`, SVAMP `ID`) and otherwise the record's position in its split (`gsm8k/test/17`).
Resuming an annotation job and joining predictions to gold both rely on that.

What each dataset gives:

* **gsm8k** (`openai/gsm8k`, configs `main` and `socratic`): the solution is the text before
  `#### <answer>`; in `socratic` every solution line is `sub-question ** sub-answer`, and those
  lines become the gold `steps` (a line with an empty sub-answer, which upstream has a few of, is
  left out and counted in `LoadStats.unanswered_steps_dropped`).
* **svamp** (`ChilleD/SVAMP`, or the `SVAMP.json` of the SVAMP repo): question is `Body + " " +
  Question`; the gold `Equation` becomes a one-line solution. SVAMP has no split of its own, so
  `train`/`test` are a seeded hold-out (default 30 % test, seed 0: the paper's 700/300). The
  masked CSVs of the SVAMP repo (`number0` ... with a `Numbers` column) are unmasked.
* **strategyqa** (`ChilleD/StrategyQA`, or `train.json` / `dev.json` of eladsegal/strategyqa):
  yes/no answers. The public test set has no labels, so evaluate on `dev.json` (the authors'
  90/10 split of the official train set; 229 problems). The human `decomposition` becomes the
  gold sub-questions and the `facts` their answers, in order; the last sub-question is answered
  with the facts left over and "So the answer is yes/no." Where a record has fewer facts than
  intermediate sub-questions, the sub-questions with no fact are left out of its steps (counted
  in `LoadStats.unanswered_steps_dropped`).
* **arith**: generated, seeded GSM8K-style word problems with gold Socratic steps
  (`socratic/arith.py`); `config` holds its knobs (`ops=1-4,operands=2-12,...`), `seed` picks
  the problems, and the splits `train`, `test` and `long` have disjoint texts.
* **sample**: 40 problems with Socratic steps written for this project (`socratic/sample/`), 32
  train and 8 test, for the demo and quick tests.

A record that cannot be read raises `DatasetRecordError` naming the file, the line (or record /
row) and the field, because "KeyError: 'answer'" after an hour of annotation helps nobody.
"""

from __future__ import annotations

import csv
import json
import random
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from socratic.answers import normalize_answer
from socratic.formats import clean
from socratic.records import Problem, Step

DATASETS = ("gsm8k", "svamp", "strategyqa", "sample", "arith")
HUB_IDS = {
    "gsm8k": "openai/gsm8k",
    "svamp": "ChilleD/SVAMP",
    "strategyqa": "ChilleD/StrategyQA",
}
LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
SVAMP_TEST_FRACTION = 0.3
SPLIT_NAMES = ("train", "test", "dev", "validation")


class DatasetRecordError(ValueError):
    """A record that cannot become a Problem; says where it is and which field is wrong."""

    def __init__(self, source: str, where: str, field_name: str, message: str) -> None:
        self.source, self.where, self.field_name = source, where, field_name
        super().__init__(f"{source}: {where}: field {field_name!r}: {message}")


@dataclass
class LoadStats:
    """What an adapter saw; printed by the CLI and asserted on by tests."""

    records: int = 0
    unanswered_steps_dropped: int = 0


@dataclass(frozen=True)
class DatasetSpec:
    """Which problems to load. Built from CLI flags or YAML by every stage.

    `name` is a dataset family (DATASETS). `path` is a local file; without it the hub is used
    (`hub_id`, defaulting per dataset). `config` is the GSM8K config (`main` or `socratic`;
    default: `socratic` when the file name says so, else `main`). `holdout` is the test fraction
    of a seeded split for sources with no split of their own (SVAMP); None means the dataset's
    default and 0 turns the split off.
    """

    name: str
    split: str = "train"
    path: str | None = None
    config: str | None = None
    hub_id: str | None = None
    holdout: float | None = None
    seed: int = 0
    limit: int | None = None
    stats: LoadStats = field(default_factory=LoadStats, compare=False, repr=False)

    @classmethod
    def from_config(cls, cfg: Any) -> DatasetSpec:
        """The spec a stage's config names with its dataset options (`dataset`, `split`, `path`,
        `dataset_config`, `hub_id`, `seed`, `limit`): one mapping, shared by every stage."""
        return cls(
            cfg.dataset,
            split=cfg.split,
            path=cfg.path,
            config=cfg.dataset_config,
            hub_id=cfg.hub_id,
            seed=cfg.seed,
            limit=cfg.limit,
        )


Located = tuple[str, dict[str, Any]]  # (where in the source, record)


def load_problems(spec: DatasetSpec) -> Iterator[Problem]:
    """Yield the problems `spec` names, streaming (a file is never held twice in memory)."""
    if spec.name not in DATASETS:
        raise ValueError(f"unknown dataset {spec.name!r}; known: {', '.join(DATASETS)}")
    for count, problem in enumerate(_ADAPTERS[spec.name](spec), 1):
        if spec.limit is not None and count > spec.limit:
            return
        spec.stats.records = count
        yield problem


# --- reading sources -------------------------------------------------------------------------


def read_local(path: str | Path) -> Iterator[Located]:
    """Records of a local jsonl/json/csv/parquet file, each with its location for error messages."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"dataset file not found: {p}")
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        yield from _read_jsonl(p)
    elif suffix == ".json":
        yield from _read_json(p)
    elif suffix == ".csv":
        with p.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            for row in reader:
                yield f"line {reader.line_num}", dict(row)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        n = 0
        for batch in pq.ParquetFile(p).iter_batches():
            for row in batch.to_pylist():
                n += 1
                yield f"row {n}", row
    else:
        raise ValueError(f"{p}: unsupported file type {suffix!r}; use {', '.join(LOCAL_SUFFIXES)}")


def _read_jsonl(p: Path) -> Iterator[Located]:
    with p.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetRecordError(str(p), f"line {n}", "<json>", f"not JSON: {e}") from e
            if not isinstance(record, dict):
                raise DatasetRecordError(str(p), f"line {n}", "<json>", "not a JSON object")
            yield f"line {n}", record


def _read_json(p: Path) -> Iterator[Located]:
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DatasetRecordError(str(p), f"line {e.lineno}", "<json>", f"not JSON: {e}") from e
    if isinstance(data, dict):  # {"data": [...]} or {"train": [...]} style wrappers
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DatasetRecordError(str(p), "top level", "<json>", "expected a list of records")
        data = lists[0]
    if not isinstance(data, list):
        raise DatasetRecordError(str(p), "top level", "<json>", "expected a list of records")
    for n, record in enumerate(data, 1):
        if not isinstance(record, dict):
            raise DatasetRecordError(str(p), f"record {n}", "<json>", "not a JSON object")
        yield f"record {n}", record


def read_hub(hub_id: str, config: str | None, split: str) -> Iterator[Located]:
    """Records of a hub dataset split (or a local dataset directory `load_dataset` understands)."""
    import datasets

    ds = datasets.load_dataset(hub_id, config, split=split)
    for n, row in enumerate(ds):
        yield f"row {n + 1}", row


def _source(spec: DatasetSpec, default_config: str | None = None) -> tuple[str, Iterator[Located]]:
    if spec.path:
        return spec.path, read_local(spec.path)
    hub_id = spec.hub_id or HUB_IDS[spec.name]
    config = spec.config or default_config
    return f"{hub_id}[{config or 'default'}:{spec.split}]", read_hub(hub_id, config, spec.split)


class _Fields:
    """Typed access to one record's fields, raising DatasetRecordError with the location."""

    def __init__(self, source: str, where: str, record: Mapping[str, Any]) -> None:
        self.source, self.where, self.record = source, where, record

    def error(self, name: str, message: str) -> DatasetRecordError:
        return DatasetRecordError(self.source, self.where, name, message)

    def get(self, name: str, kind: type | tuple[type, ...] = str) -> Any:
        if name not in self.record or self.record[name] is None:
            raise self.error(name, "missing")
        value = self.record[name]
        if not isinstance(value, kind):
            raise self.error(name, f"expected {_kind_name(kind)}, got {type(value).__name__}")
        if isinstance(value, str) and not value.strip():
            raise self.error(name, "empty")
        return value

    def answer(self, name: str, value: Any, kind: str) -> str:
        try:
            return normalize_answer(value, kind)
        except ValueError as e:
            raise self.error(name, str(e)) from e


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


# --- GSM8K -----------------------------------------------------------------------------------


def _load_gsm8k(spec: DatasetSpec) -> Iterator[Problem]:
    config = spec.config
    if config is None:
        config = "socratic" if spec.path and "socratic" in Path(spec.path).name else "main"
    if config not in ("main", "socratic"):
        raise ValueError(f"gsm8k config must be 'main' or 'socratic', got {config!r}")
    source, records = _source(spec, default_config=config)
    for n, (where, record) in enumerate(records):
        f = _Fields(source, where, record)
        yield gsm8k_problem(f, spec.split, n, config == "socratic", spec.stats)


def gsm8k_problem(
    f: _Fields, split: str, index: int, socratic: bool, stats: LoadStats | None = None
) -> Problem:
    question = clean(f.get("question"))
    text = f.get("answer")
    body, sep, final = text.rpartition("####")
    if not sep:
        raise f.error("answer", "no '#### <final answer>' line")
    answer = f.answer("answer", final.strip(), "number")
    lines = [line.strip() for line in body.strip().splitlines() if line.strip()]
    steps: list[Step] = []
    if socratic:
        for k, line in enumerate(lines, 1):
            q, sep, a = line.partition("**")
            if not sep or not q.strip():
                raise f.error("answer", f"solution line {k} is not 'sub-question ** sub-answer'")
            if not a.strip():  # upstream has a few "q ** " lines with no answer (train line 481)
                if stats is not None:
                    stats.unanswered_steps_dropped += 1
                continue
            steps.append(Step(clean(q), clean(a)))
        solution = "\n".join(s.answer for s in steps)
    else:
        solution = "\n".join(lines)
    return Problem(
        id=f"gsm8k/{split}/{index}",
        dataset="gsm8k",
        split=split,
        question=question,
        answer=answer,
        solution=solution or None,
        steps=tuple(steps),
    )


# --- SVAMP -----------------------------------------------------------------------------------

_MASK = re.compile(r"\bnumber(\d+)\b")


def _load_svamp(spec: DatasetSpec) -> Iterator[Problem]:
    source, records = _source(spec)
    holdout = spec.holdout
    if holdout is None:
        # The SVAMP repo's CSVs are already splits; SVAMP.json and the hub's single set are not.
        own_split = spec.path is not None and spec.path.lower().endswith(".csv")
        holdout = 0.0 if own_split else SVAMP_TEST_FRACTION
    rows = [
        svamp_problem(_Fields(source, where, r), spec.split, n)
        for n, (where, r) in enumerate(records)
    ]
    if holdout:
        yield from _seeded_split(rows, spec.split, holdout, spec.seed)
    else:
        yield from rows


def svamp_problem(f: _Fields, split: str, index: int) -> Problem:
    rec = f.record
    if "Body" in rec and "Question" in rec and "Numbers" not in rec:
        question = clean(f"{f.get('Body')} {f.get('Question')}")
    else:
        question = clean(f.get("Question"))
    equation = rec.get("Equation")
    if "Numbers" in rec:  # masked CSVs: "number0 red apples ..." with Numbers = "7 2"
        numbers = str(f.get("Numbers")).split()

        def unmask(m: re.Match[str]) -> str:
            i = int(m.group(1))
            if i >= len(numbers):
                raise f.error("Numbers", f"has no value for number{i}")
            return numbers[i]

        question = _MASK.sub(unmask, question)
        equation = _MASK.sub(unmask, equation) if isinstance(equation, str) else equation
    answer = f.answer("Answer", f.get("Answer", (int, float, str)), "number")
    key = clean(str(rec["ID"])) if rec.get("ID") not in (None, "") else str(index)
    solution = f"{clean(equation)} = {answer}" if isinstance(equation, str) and equation else None
    return Problem(
        id=f"svamp/{split}/{key}",
        dataset="svamp",
        split=split,
        question=question,
        answer=answer,
        solution=solution,
    )


def _seeded_split(
    problems: list[Problem], split: str, test_fraction: float, seed: int
) -> Iterator[Problem]:
    """A reproducible train/test split of a source that has none: same seed, same split."""
    if split not in ("train", "test"):
        raise ValueError(f"a seeded hold-out has splits 'train' and 'test', not {split!r}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"holdout must be between 0 and 1, got {test_fraction}")
    order = list(range(len(problems)))
    random.Random(seed).shuffle(order)
    n_test = round(len(problems) * test_fraction)
    chosen = set(order[:n_test]) if split == "test" else set(order[n_test:])
    for i, p in enumerate(problems):
        if i in chosen:
            yield p


# --- StrategyQA ------------------------------------------------------------------------------


def _load_strategyqa(spec: DatasetSpec) -> Iterator[Problem]:
    source, records = _source(spec)
    for n, (where, record) in enumerate(records):
        yield strategyqa_problem(_Fields(source, where, record), spec.split, n, spec.stats)


def strategyqa_problem(f: _Fields, split: str, index: int, stats: LoadStats) -> Problem:
    question = clean(f.get("question"))
    answer = f.answer("answer", f.get("answer", (bool, str)), "yesno")
    decomposition = [clean(q) for q in f.record.get("decomposition") or [] if clean(q)]
    facts = [clean(x) for x in f.record.get("facts") or [] if clean(x)]
    steps = []
    if decomposition:
        *middle, last = decomposition
        answered = middle[: len(facts)]
        stats.unanswered_steps_dropped += len(middle) - len(answered)
        steps = [Step(q, a) for q, a in zip(answered, facts, strict=False)]
        rest = facts[len(answered) :]
        steps.append(Step(last, " ".join([*rest, f"So the answer is {answer}."])))
    key = clean(str(f.record["qid"])) if f.record.get("qid") else str(index)
    return Problem(
        id=f"strategyqa/{split}/{key}",
        dataset="strategyqa",
        split=split,
        question=question,
        answer=answer,
        solution=" ".join(facts) or None,
        steps=tuple(steps),
    )


# --- the bundled sample ----------------------------------------------------------------------

SAMPLE_FILE = "problems.jsonl"


def sample_path() -> Path:
    """Where the bundled sample lives (package data, so it ships with the wheel)."""
    return Path(str(resources.files("socratic") / "sample" / SAMPLE_FILE))


def _load_sample(spec: DatasetSpec) -> Iterator[Problem]:
    path = spec.path or str(sample_path())
    index: dict[str, int] = {}
    for where, record in read_local(path):
        f = _Fields(path, where, record)
        split = f.get("split")
        n = index.get(split, 0)
        index[split] = n + 1
        if spec.split not in ("all", split):
            continue
        raw_steps = f.get("steps", list)
        steps = []
        for k, s in enumerate(raw_steps, 1):
            if not isinstance(s, dict) or not s.get("question") or not s.get("answer"):
                raise f.error("steps", f"step {k} needs a question and an answer")
            steps.append(Step(clean(s["question"]), clean(s["answer"])))
        yield Problem(
            id=f"sample/{split}/{n}",
            dataset="sample",
            split=split,
            question=clean(f.get("question")),
            answer=f.answer("answer", f.get("answer", (str, int, float)), "number"),
            solution="\n".join(s.answer for s in steps) or None,
            steps=tuple(steps),
        )


# --- arith, the generated family ---------------------------------------------------------------


def _load_arith(spec: DatasetSpec) -> Iterator[Problem]:
    from socratic.arith import ArithConfig, generate

    if spec.path:
        raise ValueError("arith is generated from its config and seed; it reads no --path")
    yield from generate(ArithConfig.parse(spec.config), spec.seed, spec.split)


_ADAPTERS: dict[str, Callable[[DatasetSpec], Iterator[Problem]]] = {
    "gsm8k": _load_gsm8k,
    "svamp": _load_svamp,
    "strategyqa": _load_strategyqa,
    "sample": _load_sample,
    "arith": _load_arith,
}
