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
* **custom**: the user's own data, described by `CustomFields` (which column holds the question,
  the answer, and optionally an id, a solution, gold steps and choices) and an answer kind
  (`number`, `yesno`, `choice`, `text`). The source is a local file, or a hub dataset (any
  `--path` that is not a file) read with `datasets.load_dataset(path, hub_config, split=split)`;
  a `{split}` in a local path is replaced by the split's name, so one option names every split.
  Ids are `custom/<split>/<id field>` or, without an id field, `custom/<split>/<row>` (the
  record's position in its source, counting skipped records, so skipping never renumbers). With
  choices, the options are appended to the question as ` Options: (A) ... (B) ...`, since the
  students must see them; the gold answer is a letter (or an option's exact text, turned into
  its letter).

A record that cannot be read raises `DatasetRecordError` naming the file, the line (or record /
row) and the field, because "KeyError: 'answer'" after an hour of annotation helps nobody. With
`skip_bad_records` such records are left out instead and counted (`LoadStats.skipped_records`,
with the first few errors), so nothing is dropped without a count.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from socratic.answers import ANSWER_KINDS, normalize_answer, normalize_text
from socratic.config import option
from socratic.formats import clean
from socratic.records import Problem, Step

DATASETS = ("gsm8k", "svamp", "strategyqa", "sample", "arith", "custom")
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


SKIPPED_EXAMPLES = 5  # errors of skipped records kept for the summary (the count is complete)


@dataclass
class LoadStats:
    """What an adapter saw; printed by the CLI and asserted on by tests."""

    records: int = 0
    unanswered_steps_dropped: int = 0
    skipped_records: int = 0  # bad records left out under `skip_bad_records`
    skipped_examples: list[str] = field(default_factory=list)  # the first few, as error text

    def reset(self) -> None:
        self.records = self.unanswered_steps_dropped = self.skipped_records = 0
        self.skipped_examples = []

    def skip(self, error: DatasetRecordError) -> None:
        self.skipped_records += 1
        if len(self.skipped_examples) < SKIPPED_EXAMPLES:
            self.skipped_examples.append(str(error))


@dataclass(frozen=True)
class CustomFields:
    """How to read a custom dataset's records: field (column) names and the answer kind.

    Only `question`, `answer` and `answer_kind` are required. A field named here is required
    in every record (missing or empty is a bad record): naming it says the data has it.
    """

    question: str
    answer: str
    answer_kind: str
    id: str | None = None
    solution: str | None = None
    steps: str | None = None
    choices: str | None = None

    def __post_init__(self) -> None:
        if self.answer_kind not in ANSWER_KINDS:
            raise ValueError(
                f"--answer-kind must be one of {', '.join(ANSWER_KINDS)}, not {self.answer_kind!r}"
            )
        if self.choices and self.answer_kind != "choice":
            raise ValueError("--choices-field needs --answer-kind choice")


@dataclass(frozen=True, kw_only=True)
class DatasetOptions:
    """The dataset options every stage that reads a dataset shares, beyond its own `dataset`,
    `split`, `path`, ...: the custom dataset's fields and the bad-record policy.

    A config dataclass inherits it (keyword-only fields, so they can follow fields without a
    default); `parse_config` then offers them as flags and YAML keys, and
    `DatasetSpec.from_config` maps them, so the options are declared once for every stage.
    """

    hub_config: str | None = option(
        None,
        help="custom: the hub dataset's config name (datasets.load_dataset's `name`); other "
        "datasets: the same as --dataset-config",
    )
    question_field: str | None = option(None, help="custom: field (column) of the question")
    answer_field: str | None = option(None, help="custom: field of the gold final answer")
    answer_kind: str | None = option(
        None,
        help="custom: what the answers are: a number, yes/no, a choice letter or a short text "
        "(compared ignoring case, punctuation, articles and spacing)",
        choices=ANSWER_KINDS,
    )
    id_field: str | None = option(
        None, help="custom: field of a stable id (default: custom/<split>/<row>)"
    )
    solution_field: str | None = option(
        None, help="custom: field of a gold worked solution (shown to the teacher)"
    )
    steps_field: str | None = option(
        None,
        help="custom: field of gold steps: a list of {question, answer} (or [q, a] pairs), as "
        "JSON text in a CSV, or lines 'sub-question ** answer'",
    )
    choices_field: str | None = option(
        None,
        help="custom, answer kind choice: field of the options (a list, {label, text}, JSON "
        "text or 'a | b | c'); they are appended to the question as (A) ... (B) ...",
    )
    skip_bad_records: bool = option(
        False,
        help="leave out records that cannot be read (missing or empty field, an answer not of "
        "its kind) and count them in the summary, instead of stopping at the first",
    )


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
    custom: CustomFields | None = None
    skip_bad_records: bool = False
    stats: LoadStats = field(default_factory=LoadStats, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.name == "custom":
            if self.custom is None:
                raise ValueError(
                    "--dataset custom needs --question-field, --answer-field and --answer-kind"
                )
            if not self.path and not self.hub_id:
                raise ValueError("--dataset custom needs --path: a local file or a hub dataset id")
        elif self.custom is not None:
            raise ValueError(
                "--question-field, --answer-field, --answer-kind and the other field options are "
                f"for --dataset custom, not {self.name}"
            )

    @classmethod
    def from_config(cls, cfg: Any) -> DatasetSpec:
        """The spec a stage's config names with its dataset options (`dataset`, `split`, `path`,
        `dataset_config`, `hub_id`, `seed`, `limit`, and `DatasetOptions`): one mapping, shared
        by every stage. A config without `DatasetOptions` reads as having none of them set."""
        opt = {f: getattr(cfg, f, None) for f in _CUSTOM_OPTIONS}
        config, hub_config = getattr(cfg, "dataset_config", None), opt.pop("hub_config")
        if hub_config and config and hub_config != config:
            raise ValueError(f"--hub-config {hub_config!r} and --dataset-config {config!r} differ")
        custom = None
        if any(opt.values()):
            missing = [f for f in ("question_field", "answer_field", "answer_kind") if not opt[f]]
            if missing:
                flags = ", ".join("--" + f.replace("_", "-") for f in missing)
                raise ValueError(f"--dataset {cfg.dataset}: a custom dataset also needs {flags}")
            custom = CustomFields(
                question=opt["question_field"],
                answer=opt["answer_field"],
                answer_kind=opt["answer_kind"],
                id=opt["id_field"],
                solution=opt["solution_field"],
                steps=opt["steps_field"],
                choices=opt["choices_field"],
            )
        return cls(
            cfg.dataset,
            split=cfg.split,
            path=getattr(cfg, "path", None),
            config=hub_config or config,
            hub_id=getattr(cfg, "hub_id", None),
            seed=getattr(cfg, "seed", 0),
            limit=getattr(cfg, "limit", None),
            custom=custom,
            skip_bad_records=bool(getattr(cfg, "skip_bad_records", False)),
        )


_CUSTOM_OPTIONS = (
    "hub_config",
    "question_field",
    "answer_field",
    "answer_kind",
    "id_field",
    "solution_field",
    "steps_field",
    "choices_field",
)


# (where in the source, record); the record is None only where a reader was given `on_bad_line`
# and passed over an unreadable one
Located = tuple[str, dict[str, Any] | None]


_LAST_STATS: dict[DatasetSpec, LoadStats] = {}


def load_problems(spec: DatasetSpec) -> Iterator[Problem]:
    """Yield the problems `spec` names, streaming (a file is never held twice in memory).

    `spec.stats` describes this load (reset when it starts) and is also what `load_stats`
    returns for an equal spec afterwards."""
    if spec.name not in DATASETS:
        raise ValueError(f"unknown dataset {spec.name!r}; known: {', '.join(DATASETS)}")
    spec.stats.reset()  # a reload counts afresh, never twice
    _LAST_STATS[spec] = spec.stats
    for count, problem in enumerate(_ADAPTERS[spec.name](spec), 1):
        if spec.limit is not None and count > spec.limit:
            return
        spec.stats.records = count
        yield problem


def load_stats(spec: DatasetSpec) -> LoadStats | None:
    """The stats of this process's latest load of a spec equal to `spec`, or None if none.

    Why not only `spec.stats`: a stage builds its spec where it loads (the annotation driver's
    loop) and reports elsewhere (its summary, from the config); equal specs name the same
    problems, so the summary finds the count of what was skipped without the spec object
    being threaded through every module in between."""
    return _LAST_STATS.get(spec)


# --- reading sources -------------------------------------------------------------------------


def read_local(
    path: str | Path, on_bad_line: Callable[[DatasetRecordError], None] | None = None
) -> Iterator[Located]:
    """Records of a local jsonl/json/csv/parquet file, each with its location for error messages.

    A jsonl line that is not a JSON object raises, or, with `on_bad_line`, is handed to it and
    yields `(where, None)` in its place (one bad line need not cost the file, and the records
    after it keep their positions)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"dataset file not found: {p}")
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        yield from _read_jsonl(p, on_bad_line)
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


def _read_jsonl(
    p: Path, on_bad_line: Callable[[DatasetRecordError], None] | None = None
) -> Iterator[Located]:
    with p.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                error = DatasetRecordError(str(p), f"line {n}", "<json>", f"not JSON: {e}")
                if on_bad_line is None:
                    raise error from e
                on_bad_line(error)
                yield f"line {n}", None
                continue
            if not isinstance(record, dict):
                error = DatasetRecordError(str(p), f"line {n}", "<json>", "not a JSON object")
                if on_bad_line is None:
                    raise error
                on_bad_line(error)
                yield f"line {n}", None
                continue
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
    skip = spec.stats.skip if spec.skip_bad_records else None
    if spec.path:
        return spec.path, read_local(spec.path, skip)
    hub_id = spec.hub_id or HUB_IDS[spec.name]
    config = spec.config or default_config
    return f"{hub_id}[{config or 'default'}:{spec.split}]", read_hub(hub_id, config, spec.split)


def _each(
    spec: DatasetSpec,
    source: str,
    records: Iterable[Located],
    parse: Callable[[_Fields, int], Problem | None],
) -> Iterator[Problem]:
    """`parse(fields, position)` of every record (None: not wanted here). A bad record raises
    its DatasetRecordError, or with `spec.skip_bad_records` is counted in `spec.stats` and left
    out; positions count every record either way, so positional ids never shift when one is
    skipped."""
    for n, (where, record) in enumerate(records):
        if record is None:  # unreadable, already counted by the reader's `on_bad_line`
            continue
        try:
            problem = parse(_Fields(source, where, record), n)
        except DatasetRecordError as e:
            if not spec.skip_bad_records:
                raise
            spec.stats.skip(e)
            continue
        if problem is not None:
            yield problem


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
    socratic = config == "socratic"
    yield from _each(
        spec, source, records, lambda f, n: gsm8k_problem(f, spec.split, n, socratic, spec.stats)
    )


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
    rows = list(_each(spec, source, records, lambda f, n: svamp_problem(f, spec.split, n)))
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
    yield from _each(
        spec, source, records, lambda f, n: strategyqa_problem(f, spec.split, n, spec.stats)
    )


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

    def parse(f: _Fields, _: int) -> Problem | None:
        split = f.get("split")
        n = index.get(split, 0)
        index[split] = n + 1
        if spec.split not in ("all", split):
            return None
        raw_steps = f.get("steps", list)
        steps = []
        for k, s in enumerate(raw_steps, 1):
            if not isinstance(s, dict) or not s.get("question") or not s.get("answer"):
                raise f.error("steps", f"step {k} needs a question and an answer")
            steps.append(Step(clean(s["question"]), clean(s["answer"])))
        return Problem(
            id=f"sample/{split}/{n}",
            dataset="sample",
            split=split,
            question=clean(f.get("question")),
            answer=f.answer("answer", f.get("answer", (str, int, float)), "number"),
            solution="\n".join(s.answer for s in steps) or None,
            steps=tuple(steps),
        )

    skip = spec.stats.skip if spec.skip_bad_records else None
    yield from _each(spec, path, read_local(path, skip), parse)


def is_local_path(dataset: str, path: str) -> bool:
    """Whether a stage's `--path` names a local file (to be made absolute before Ray workers
    see it) rather than a custom dataset's hub id, which must stay as written."""
    if dataset != "custom":
        return True
    return Path(path).exists() or Path(path).suffix.lower() in LOCAL_SUFFIXES


# --- custom: the user's own data ----------------------------------------------------------------

LETTERS = "ABCDEFGHIJ"  # choice labels; `socratic.answers` reads A-J


def _custom_source(spec: DatasetSpec) -> tuple[str, Iterator[Located]]:
    """A local file (a `{split}` in its path replaced by the split), else a hub dataset id (or a
    dataset directory `datasets.load_dataset` understands). A path with a file suffix that is
    not there is a missing file, never silently a hub lookup."""
    target = str(spec.path or spec.hub_id).replace("{split}", spec.split)
    local = Path(target)
    if spec.path and (local.is_file() or local.suffix.lower() in LOCAL_SUFFIXES):
        return target, read_local(target, spec.stats.skip if spec.skip_bad_records else None)
    source = f"{target}[{spec.config or 'default'}:{spec.split}]"
    return source, read_hub(target, spec.config, spec.split)


def _load_custom(spec: DatasetSpec) -> Iterator[Problem]:
    assert spec.custom is not None  # DatasetSpec checks it
    fields = spec.custom
    source, records = _custom_source(spec)
    seen: set[bytes] = set()  # digests of the ids given so far: a repeated id breaks resume

    def parse(f: _Fields, n: int) -> Problem:
        problem = custom_problem(f, fields, spec.split, n)
        if fields.id:
            digest = hashlib.blake2b(problem.id.encode(), digest_size=8).digest()
            if digest in seen:
                raise f.error(fields.id, f"duplicate id {problem.id!r}: ids must be unique")
            seen.add(digest)
        return problem

    yield from _each(spec, source, records, parse)


def custom_problem(f: _Fields, fields: CustomFields, split: str, index: int) -> Problem:
    """One custom record as a Problem (see the module docstring for ids and choices)."""
    question = clean(f.get(fields.question))
    choices = _custom_choices(f, fields.choices) if fields.choices else None
    answer = _custom_answer(f, fields, choices)
    if choices is not None:
        options = " ".join(f"({LETTERS[i]}) {text}" for i, text in enumerate(choices[1]))
        question = f"{question} Options: {options}"
    key = str(index)
    if fields.id:
        value = f.get(fields.id, (str, int))
        if isinstance(value, bool):
            raise f.error(fields.id, "expected str or int, got bool")
        key = clean(str(value))
    steps = _custom_steps(f, fields.steps) if fields.steps else ()
    solution = None
    if fields.solution:
        solution = str(f.get(fields.solution, (str, int, float))).strip()
    elif steps:
        solution = "\n".join(s.answer for s in steps)
    return Problem(
        id=f"custom/{split}/{key}",
        dataset="custom",
        split=split,
        question=question,
        answer=answer,
        solution=solution,
        steps=steps,
        answer_kind=fields.answer_kind,
    )


def _custom_answer(
    f: _Fields, fields: CustomFields, choices: tuple[list[str] | None, list[str]] | None
) -> str:
    """The gold answer normalised for its kind. A choice answer may also be an option's label
    (`{label, text}` choices, e.g. ARC's "1".."4") or its exact text; it becomes the letter."""
    name, kind = fields.answer, fields.answer_kind
    raw = f.get(name, (str, int, float, bool))
    if kind != "choice" or choices is None:
        return f.answer(name, raw, kind)
    labels, texts = choices
    text = str(raw).strip()
    letter = None
    if labels is not None and text in labels:
        letter = LETTERS[labels.index(text)]
    if letter is None:
        try:
            letter = normalize_answer(text, "choice")
        except ValueError:
            same = [i for i, c in enumerate(texts) if normalize_text(c) == normalize_text(text)]
            if len(same) != 1:
                raise f.error(
                    name,
                    f"expected a choice letter (A-{LETTERS[len(texts) - 1]}) or the text of one "
                    f"option, got {raw!r}",
                ) from None
            letter = LETTERS[same[0]]
    if LETTERS.index(letter) >= len(texts):
        raise f.error(name, f"answer {letter} but the record has {len(texts)} options")
    return letter


def _structured(f: _Fields, name: str) -> Any:
    """A list / mapping field as it is, or its JSON text decoded (how a CSV cell holds one); any
    other text stripped, for the caller's own plain-text form."""
    value = f.get(name, (list, tuple, dict, str))
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text[:1] not in "[{":
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise f.error(name, f"not JSON: {e}") from e


def _custom_choices(f: _Fields, name: str) -> tuple[list[str] | None, list[str]]:
    """(labels or None, option texts) of a choices field: a list, a `{label, text}` mapping (the
    hub's usual shape), JSON text of either, or 'a | b | c'."""
    value = _structured(f, name)
    if isinstance(value, str):
        value = [part.strip() for part in value.split("|")]
    labels = None
    if isinstance(value, dict):
        if not isinstance(value.get("text"), list | tuple):
            raise f.error(name, "a mapping of choices needs a 'text' list")
        raw_labels = value.get("label")
        labels = [str(x).strip() for x in raw_labels] if raw_labels is not None else None
        value = value["text"]
        if labels is not None and len(labels) != len(value):
            raise f.error(name, f"{len(labels)} labels for {len(value)} options")
    if not isinstance(value, list | tuple):
        raise f.error(name, f"expected a list of options, got {type(value).__name__}")
    texts = [clean(str(x)) if isinstance(x, str | int | float) else "" for x in value]
    if any(not t for t in texts):
        raise f.error(name, f"option {[bool(t) for t in texts].index(False) + 1} is empty")
    if not 2 <= len(texts) <= len(LETTERS):
        raise f.error(name, f"expected 2 to {len(LETTERS)} options, got {len(texts)}")
    return labels, texts


def _custom_steps(f: _Fields, name: str) -> tuple[Step, ...]:
    """Gold steps: a list of `{question, answer}` or `[question, answer]`, a `{question: [...],
    answer: [...]}` mapping (how the hub stores a list of pairs), JSON text of those, or lines
    'sub-question ** answer' (GSM8K Socratic's)."""
    value = _structured(f, name)
    if isinstance(value, str):
        value = [line.partition("**")[::2] for line in value.splitlines() if line.strip()]
        if any(not q.strip() or not a.strip() for q, a in value):
            bad = next(k for k, (q, a) in enumerate(value, 1) if not q.strip() or not a.strip())
            raise f.error(name, f"step {bad} is not 'sub-question ** answer'")
    if isinstance(value, dict):
        qs, answers = value.get("question"), value.get("answer")
        if not isinstance(qs, list | tuple) or not isinstance(answers, list | tuple):
            raise f.error(name, "a mapping of steps needs 'question' and 'answer' lists")
        if len(qs) != len(answers):
            raise f.error(name, f"{len(qs)} sub-questions for {len(answers)} answers")
        value = list(zip(qs, answers, strict=True))
    if not isinstance(value, list | tuple):
        raise f.error(name, f"expected a list of steps, got {type(value).__name__}")
    if not value:
        raise f.error(name, "empty")
    steps = []
    for k, item in enumerate(value, 1):
        if isinstance(item, dict):
            q, a = item.get("question"), item.get("answer")
        elif isinstance(item, list | tuple) and len(item) == 2:
            q, a = item
        else:
            q = a = None
        if not isinstance(q, str) or not isinstance(a, str | int | float) or isinstance(a, bool):
            raise f.error(name, f"step {k} needs a question and an answer")
        if not clean(q) or not clean(str(a)):
            raise f.error(name, f"step {k} needs a question and an answer")
        steps.append(Step(clean(q), clean(str(a))))
    return tuple(steps)


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
    "custom": _load_custom,
}
