"""Evaluate trained students on a test split with Ray Data batch inference: an accuracy table.

    python pipelines/evaluate.py --dataset gsm8k --split test --models outputs/students \\
        --methods iterative,unified,cot,answer --calculator both --output outputs/eval/gsm8k
    ray job submit --working-dir . -- python pipelines/evaluate.py ...
    python pipelines/evaluate.py table outputs/eval/gsm8k outputs/eval/svamp --output results.md

Methods, as in the paper's results table:
- `iterative`: the Socratic pair. The decomposer writes the sub-questions, the solver answers them
  one by one. It runs `socratic.solve.solve_many`, the same loop the Serve ingress runs, so the
  served and the evaluated system cannot differ. Each actor advances a whole batch in lockstep,
  so every model call is one batched `generate`. A decomposer trained to write one sub-question
  at a time (`--decomposer-form iterative` in training) is run that way: its dir's
  `provenance.json` says so; `--decomposer-form` overrides it.
- `unified`: one model writes q1 a1 q2 a2 ...; the answer is read from the last step.
- `cot`: one model writes the step-by-step solution and an `Answer:` line.
- `answer`: one model writes the final answer only.

Calculator: as in the GSM8K paper, inside decoding. When a student writes `<<expr=`, the
calculator's result and `>>` are forced as its next tokens (`socratic.generate`), so everything
written after a span, in the same text or in later steps, builds on the right value. Every
method that writes arithmetic (`iterative`'s solver, `unified`, `cot`) is scored with it on and
off (`--calculator on|off|both`; `both` runs each such method twice on the same loaded models).
`answer` writes no arithmetic: its calculator column says `n/a`. Each row counts the results
forced and the expressions the calculator refused (those are left to the model).

GPUs: `--gpus-per-actor N` gives each actor N GPUs (a fraction shares one) and puts its models
there, in `--dtype` (default `auto`: bf16 on GPU, fp32 on CPU). A request for more GPUs than the
cluster has fails at once with what was asked and what there is.

Output: `<output>/predictions/<method>/*.parquet`, one row per problem and setting (id, gold,
predicted, steps, correct, tokens generated, ...); `summary.json` and `results.md` hold the
accuracy per method and dataset. Both are computed from the Parquet read back, not from what
the actors returned. A rerun replaces the predictions of the methods it evaluates; while a run
holds the output (`<output>/_run.lock`), a second run into it refuses, naming the first.
"""

from __future__ import annotations

import json
import logging
import math
import posixpath
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python pipelines/evaluate.py`, as `ray job submit` runs it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.journal import absolute, output_fs
from pipelines.output import parquet_files
from pipelines.output_lock import OutputLock, OutputLocked
from socratic.adapters import (
    DATASETS,
    DatasetOptions,
    DatasetSpec,
    LoadStats,
    is_local_path,
    load_problems,
)
from socratic.answers import answers_match, extract_answer
from socratic.config import option, parse_config
from socratic.formats import (
    answer_prompt,
    cot_prompt,
    parse_answer,
    parse_cot,
    parse_unified,
    unified_prompt,
)
from socratic.generate import DTYPES, Generator
from socratic.records import STEP_TYPE
from socratic.solve import DEFAULT_MAX_STEPS, decomposer_form_of, solve_many
from socratic.stats import wilson_interval

log = logging.getLogger("evaluate")

METHODS = ("iterative", "unified", "cot", "answer")
# The student roles (trained model dirs under --models) each method needs.
METHOD_ROLES = {
    "iterative": ("decomposer", "solver"),
    "unified": ("unified",),
    "cot": ("cot",),
    "answer": ("answer",),
}
ONE_PASS_PROMPT = {"unified": unified_prompt, "cot": cot_prompt, "answer": answer_prompt}
CALCULATOR_SETTINGS = {"on": (True,), "off": (False,), "both": (True, False)}
# The methods whose students write `<<expr=value>>` arithmetic, scored with and without.
CALCULATOR_METHODS = ("iterative", "unified", "cot")

PREDICTION_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("dataset", pa.string()),
        ("split", pa.string()),
        ("method", pa.string()),
        ("calculator", pa.bool_()),  # null: a method that writes no arithmetic (`answer`)
        ("question", pa.string()),
        ("gold", pa.string()),
        ("predicted", pa.string()),
        ("correct", pa.bool_()),
        ("steps", pa.list_(STEP_TYPE)),
        ("text", pa.string()),  # one-pass methods: the model's text; iterative: null
        ("tokens", pa.int64()),  # tokens generated for this problem, over every model call
        ("fallback", pa.bool_()),  # iterative: the decomposer produced no sub-question
        ("calculator_forced", pa.int64()),  # results forced inside decoding
        ("calculator_refused", pa.int64()),  # expressions refused (left to the model)
        ("truncated", pa.int64()),  # model calls whose prompt was cut to fit the model
    ]
)


@dataclass(frozen=True)
class EvaluateConfig(DatasetOptions):
    """Evaluate trained students on a test split: per-problem Parquet and an accuracy table."""

    dataset: str = option(
        help="dataset family (custom: your own, see --question-field ...)", choices=DATASETS
    )
    split: str = option("test", help="split to evaluate")
    path: str | None = option(
        None,
        help="local dataset file instead of the hub; custom: a file ({split} is replaced by "
        "the split) or a hub dataset id",
    )
    dataset_config: str | None = option(None, help="GSM8K config: main or socratic")
    hub_id: str | None = option(None, help="hub dataset id, overriding the dataset's default")
    limit: int | None = option(None, help="evaluate only the first N problems")
    seed: int = option(0, help="seed for seeded dataset splits (SVAMP)")
    methods: str = option("iterative", help=f"comma-separated, of: {', '.join(METHODS)}")
    models: str = option(
        "outputs/students", help="folder of exported students, one dir per role (train.py --output)"
    )
    decomposer: str | None = option(None, help="decomposer dir (default: MODELS/decomposer)")
    solver: str | None = option(None, help="solver dir (default: MODELS/solver)")
    unified: str | None = option(None, help="unified student dir (default: MODELS/unified)")
    cot: str | None = option(None, help="chain-of-thought student dir (default: MODELS/cot)")
    answer: str | None = option(None, help="answer-only student dir (default: MODELS/answer)")
    calculator: str = option(
        "on",
        help="force <<expr=>> results while decoding (iterative, unified, cot)",
        choices=tuple(CALCULATOR_SETTINGS),
    )
    max_steps: int = option(DEFAULT_MAX_STEPS, help="iterative: most sub-questions per problem")
    decomposer_form: str | None = option(
        None,
        help="iterative: all (sub-questions at once) or iterative (one per step, given the "
        "answers so far); default: what the decomposer dir's provenance.json says, else all",
        choices=("all", "iterative"),
    )
    max_new_tokens: int = option(128, help="tokens generated per model call")
    batch_size: int = option(16, help="problems per actor batch (one generate call per step)")
    actors: int = option(1, help="model-holding actors in the pool")
    actor_cpus: float = option(1.0, help="CPUs per actor; leave one for read/write tasks")
    num_threads: int | None = option(None, help="torch threads per actor (default: torch's)")
    gpus_per_actor: float = option(0.0, help="GPUs per actor (a fraction shares one); 0: CPU")
    dtype: str = option(
        "auto", help="model dtype; auto: bf16 on GPU, fp32 on CPU", choices=tuple(DTYPES)
    )
    output: str = option("outputs/eval", help="output folder: local path or a pyarrow URI")
    address: str | None = option(None, help="Ray address (default: RAY_ADDRESS or a local cluster)")
    force_unlock: bool = option(
        False,
        help="take over the output's lock (<output>/_run.lock) held by a run on another host, "
        "which cannot be checked from here: only when that run is certainly gone",
    )

    def __post_init__(self) -> None:
        unknown = [m for m in self.method_list if m not in METHODS]
        if unknown or not self.method_list:
            raise ValueError(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
        if self.batch_size < 1 or self.actors < 1 or self.max_steps < 1:
            raise ValueError("--batch-size, --actors and --max-steps must be at least 1")
        if self.gpus_per_actor < 0:
            raise ValueError("--gpus-per-actor must be 0 or more")
        DatasetSpec.from_config(self)  # the dataset options checked at parse, before any work

    @property
    def method_list(self) -> list[str]:
        return [m.strip() for m in self.methods.split(",") if m.strip()]

    def model_dir(self, role: str) -> str:
        return getattr(self, role) or str(Path(self.models) / role)

    def with_absolute_paths(self) -> EvaluateConfig:
        """Local paths (model dirs, `--output`, `--path`) made absolute against the driver's
        working dir; URIs as they are. The actors load the models: a relative dir would be
        resolved in a Ray worker's own working dir (under `ray job submit --working-dir`, or on
        another node), not the one the driver checked."""
        roles = ("decomposer", "solver", "unified", "cot", "answer")
        return replace(
            self,
            path=absolute(self.path)
            if self.path and is_local_path(self.dataset, self.path)
            else self.path,
            models=absolute(self.models),
            output=absolute(self.output),
            **{r: absolute(getattr(self, r)) for r in roles if getattr(self, r)},
        )


def check_models(cfg: EvaluateConfig) -> dict[str, str]:
    """Every model dir the methods need, checked before any actor starts (names what is wrong)."""
    dirs, missing = {}, []
    for method in cfg.method_list:
        for role in METHOD_ROLES[method]:
            d = cfg.model_dir(role)
            if "://" not in d and not (Path(d) / "config.json").is_file():
                missing.append(f"{role}: {d}")
            dirs[role] = d
    if missing:
        raise FileNotFoundError(
            "no exported student (config.json) at " + "; ".join(missing) + ". Train it with "
            "`python trainers/train.py --roles ...` or point --models / --<role> at its dir."
        )
    return dirs


class Evaluator:
    """A Ray Data actor holding one method's model(s); turns a batch of problems into
    prediction rows. The models load once per actor, not once per batch."""

    def __init__(
        self,
        method: str,
        dirs: dict[str, str],
        calculators: Sequence[bool | None],
        max_steps: int,
        max_new_tokens: int,
        num_threads: int | None,
        device: str = "cpu",
        dtype: str = "auto",
        decomposer_form: str = "all",
    ) -> None:
        self.method, self.calculators, self.max_steps = method, calculators, max_steps
        self.decomposer_form = decomposer_form
        kw = {"max_new_tokens": max_new_tokens, "num_threads": num_threads}
        kw |= {"device": device, "dtype": dtype}
        self.models = {role: Generator(dirs[role], **kw) for role in METHOD_ROLES[method]}

    def __call__(self, batch: pa.Table) -> pa.Table:
        problems = batch.to_pylist()
        rows = self._iterative(problems) if self.method == "iterative" else self._one_pass(problems)
        return pa.Table.from_pylist(rows, schema=PREDICTION_SCHEMA)

    def _row(self, p: dict[str, Any], predicted: str | None, **fields: Any) -> dict[str, Any]:
        return {
            "id": p["id"],
            "dataset": p["dataset"],
            "split": p["split"],
            "method": self.method,
            "question": p["question"],
            "gold": p["answer"],
            "predicted": predicted,
            "correct": answers_match(predicted, p["answer"], kind=p["answer_kind"]),
            "calculator": None,
            "text": None,
            "fallback": False,
            "calculator_forced": 0,
            "calculator_refused": 0,
            "truncated": 0,
            **fields,
        }

    def _iterative(self, problems: list[dict[str, Any]]) -> list[dict[str, Any]]:
        dec = self.models["decomposer"].complete
        by_kind: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for p in problems:
            by_kind[p["answer_kind"]].append(p)
        rows = []
        for calculator in self.calculators:
            sol = partial(self.models["solver"].complete, calculator=bool(calculator))
            for kind, group in by_kind.items():
                questions = [p["question"] for p in group]
                kw = {"max_steps": self.max_steps, "calculator": calculator, "answer_kind": kind,
                      "decomposer_form": self.decomposer_form}  # fmt: skip
                for p, s in zip(group, solve_many(questions, dec, sol, **kw), strict=True):
                    rows.append(
                        self._row(
                            p,
                            s.answer,
                            calculator=calculator,
                            steps=[x.to_dict() for x in s.steps],
                            tokens=s.tokens,
                            fallback=s.fallback,
                            calculator_forced=s.calculator_forced,
                            calculator_refused=s.calculator_refused,
                            truncated=s.truncated,
                        )
                    )
        return rows

    def _one_pass(self, problems: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One generate per calculator setting; the text is scored as decoded (with the
        calculator inside decoding, nothing is patched afterwards)."""
        model, prompt = self.models[self.method], ONE_PASS_PROMPT[self.method]
        prompts = [prompt(p["question"]) for p in problems]
        rows = []
        for calculator in self.calculators:
            outs = model.complete(prompts, calculator=bool(calculator))
            for p, out in zip(problems, outs, strict=True):
                predicted, steps = read_one_pass(self.method, out.text, p["answer_kind"])
                rows.append(
                    self._row(
                        p,
                        predicted,
                        calculator=calculator,
                        steps=steps,
                        text=out.text,
                        tokens=out.completion_tokens,
                        calculator_forced=out.calculator_forced,
                        calculator_refused=out.calculator_refused,
                        truncated=int(out.truncated),
                    )
                )
        return rows


def read_one_pass(method: str, text: str, kind: str) -> tuple[str | None, list[dict[str, str]]]:
    """(predicted answer, steps) from a one-pass student's text. A text that breaks the format
    still gets its answer extracted from the whole text: the table scores answers, and format
    adherence is visible in the `steps` column."""
    if method == "unified":
        steps = parse_unified(text)
        source = steps[-1].answer if steps else text
        return extract_answer(source, kind), [s.to_dict() for s in steps]
    if method == "cot":
        solution, answer = parse_cot(text)
        return extract_answer(answer if answer else solution, kind), []
    answer = parse_answer(text)
    return (extract_answer(answer, kind) if answer else None), []


def problem_items(cfg: EvaluateConfig) -> tuple[list[dict[str, Any]], LoadStats]:
    """The problems to score, each with its answer kind (how its answers are read and
    compared), and what loading them skipped (`--skip-bad-records`)."""
    spec = DatasetSpec.from_config(cfg)
    items = [
        {
            "id": p.id,
            "dataset": p.dataset,
            "split": p.split,
            "question": p.question,
            "answer": p.answer,
            "answer_kind": p.answer_kind,
        }
        for p in load_problems(spec)
    ]
    return items, spec.stats


def run(cfg: EvaluateConfig) -> dict[str, Any]:
    """Evaluate every method; returns the summary (also in `<output>/summary.json`)."""
    t0 = time.perf_counter()
    cfg = cfg.with_absolute_paths()  # here, on the driver: the actors get these dirs
    dirs = check_models(cfg)
    items, loaded = problem_items(cfg)
    if not items:
        raise ValueError(f"{cfg.dataset}/{cfg.split}: no problems to evaluate")
    fs, root = output_fs(cfg.output)
    # Before any prediction is replaced: a second run would delete the first one's half-written
    # predictions under it. Raises OutputLocked, naming the run that holds it.
    with OutputLock(fs, root, "evaluate", force=cfg.force_unlock):
        return _evaluate(cfg, dirs, items, fs, root, t0, loaded)


def _evaluate(
    cfg: EvaluateConfig,
    dirs: dict[str, str],
    items: list[dict[str, Any]],
    fs: pafs.FileSystem,
    root: str,
    t0: float,
    loaded: LoadStats | None = None,
) -> dict[str, Any]:
    import ray

    if not ray.is_initialized():
        from socratic.ray_address import resolve_address

        ray.init(address=resolve_address(cfg.address), configure_logging=False)
    check_gpus(cfg, ray.cluster_resources())
    log.info("%d problems of %s/%s; methods %s", len(items), cfg.dataset, cfg.split, cfg.methods)
    for method in cfg.method_list:
        t = time.perf_counter()
        target = posixpath.join(root, "predictions", method)
        if fs.get_file_info(target).type != pafs.FileType.NotFound:
            fs.delete_dir(target)  # a rerun replaces this method's predictions, never mixes them
        calculators = (
            CALCULATOR_SETTINGS[cfg.calculator] if method in CALCULATOR_METHODS else (None,)
        )
        blocks = max(1, math.ceil(len(items) / cfg.batch_size))
        ds = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
            Evaluator,
            fn_constructor_kwargs={
                "method": method,
                "dirs": {r: dirs[r] for r in METHOD_ROLES[method]},
                "calculators": calculators,
                "max_steps": cfg.max_steps,
                "max_new_tokens": cfg.max_new_tokens,
                "num_threads": cfg.num_threads,
                "device": "cuda" if cfg.gpus_per_actor > 0 else "cpu",
                "dtype": cfg.dtype,
                "decomposer_form": decomposer_form(cfg, dirs),
            },
            batch_format="pyarrow",
            batch_size=cfg.batch_size,
            compute=ray.data.ActorPoolStrategy(size=cfg.actors),
            num_cpus=cfg.actor_cpus,
            num_gpus=cfg.gpus_per_actor,
        )
        ds.write_parquet(
            posixpath.join(cfg.output, "predictions", method) if "://" in cfg.output else target,
            schema=PREDICTION_SCHEMA,
        )
        log.info("%s: done in %.1f s", method, time.perf_counter() - t)
    summary = summarize(cfg, fs, root, len(items), time.perf_counter() - t0)
    if "iterative" in cfg.method_list:
        summary["decomposer_form"] = decomposer_form(cfg, dirs)
    summary["answer_kind"] = ", ".join(sorted({i["answer_kind"] for i in items}))
    summary["skipped_records"] = loaded.skipped_records if loaded else 0
    summary["skipped_record_errors"] = list(loaded.skipped_examples) if loaded else []
    with fs.open_output_stream(posixpath.join(root, "summary.json")) as f:
        f.write(json.dumps(summary, indent=2).encode())
    with fs.open_output_stream(posixpath.join(root, "results.md")) as f:
        f.write(results_markdown(summary).encode())
    return summary


def decomposer_form(cfg: EvaluateConfig, dirs: dict[str, str]) -> str:
    """The pair's loop: `--decomposer-form`, else the one its decomposer was trained for."""
    if "decomposer" not in dirs:
        return "all"
    return cfg.decomposer_form or decomposer_form_of(dirs["decomposer"])


def check_gpus(cfg: EvaluateConfig, resources: dict[str, float]) -> None:
    """Refuse, before any actor waits for them, GPUs the cluster does not have (Ray would
    otherwise queue the actors for ever)."""
    if cfg.gpus_per_actor <= 0:
        return
    need, have = cfg.gpus_per_actor, resources.get("GPU", 0)
    if need > have:
        raise ValueError(
            f"--gpus-per-actor {need:g} asks for more GPUs than the cluster has ({have:g} GPU "
            f"in {resources.get('CPU', 0):g} CPUs); use --gpus-per-actor 0 to run on CPU"
        )
    if cfg.actors * need > have:
        log.warning("%d actors x %g GPUs > %g GPUs: some actors will wait for a GPU",
                    cfg.actors, need, have)  # fmt: skip


def read_predictions(fs: pafs.FileSystem, root: str, method: str) -> pa.Table:
    files = parquet_files(fs, posixpath.join(root, "predictions", method))
    tables = [pq.read_table(f, filesystem=fs, schema=PREDICTION_SCHEMA) for f in files]
    return pa.concat_tables(tables) if tables else PREDICTION_SCHEMA.empty_table()


def summarize(
    cfg: EvaluateConfig, fs: pafs.FileSystem, root: str, n_problems: int, wall_s: float
) -> dict[str, Any]:
    """Accuracy per (method, calculator) from the Parquet, with what is missing or doubled and
    the share of outputs no answer could be read from (`no_answer`, `no_answer_pct`): a student
    that answers wrong and one that never writes an answer need different fixes."""
    results = []
    for method in cfg.method_list:
        rows = read_predictions(fs, root, method).to_pylist()
        settings: dict[bool | None, list[dict[str, Any]]] = defaultdict(list)
        for r in rows:
            settings[r["calculator"]].append(r)
        for calculator, group in sorted(settings.items(), key=lambda kv: str(kv[0])):
            ids = {r["id"] for r in group}
            correct = sum(r["correct"] for r in group)
            no_answer = sum(not r["predicted"] for r in group)
            results.append(
                {
                    "method": method,
                    "calculator": calculator,
                    "dataset": cfg.dataset,
                    "split": cfg.split,
                    "problems": len(group),
                    "missing": n_problems - len(ids),
                    "duplicates": len(group) - len(ids),
                    "correct": correct,
                    "accuracy": round(100 * correct / len(group), 2) if group else None,
                    "ci95": list(wilson_interval(correct, len(group))) if group else None,
                    "no_answer": no_answer,
                    "no_answer_pct": round(100 * no_answer / len(group), 2) if group else None,
                    "tokens": sum(r["tokens"] for r in group),
                    "tokens_per_problem": round(sum(r["tokens"] for r in group) / len(group), 1)
                    if group
                    else None,
                    "fallbacks": sum(r["fallback"] for r in group),
                    "calculator_forced": sum(r["calculator_forced"] for r in group),
                    "calculator_refused": sum(r["calculator_refused"] for r in group),
                    "truncated": sum(r["truncated"] for r in group),
                }
            )
    return {
        "dataset": cfg.dataset,
        "split": cfg.split,
        "problems": n_problems,
        "models": {r: cfg.model_dir(r) for m in cfg.method_list for r in METHOD_ROLES[m]},
        "results": results,
        "output": cfg.output,
        "wall_s": round(wall_s, 2),
    }


METHOD_LABELS = {
    "answer": "Answer only",
    "cot": "Chain of thought",
    "unified": "Socratic, unified student",
    "iterative": "Socratic, decomposer + solver",
}


def results_markdown(summary: dict[str, Any]) -> str:
    """The paper's table shape: a row per method (and calculator setting), a column per dataset.

    Works on one run's summary and on `merge_summaries` of several (one run per dataset, as
    each dataset has its own students)."""
    results = summary["results"]
    datasets = sorted({r["dataset"] for r in results})
    rows: dict[tuple[str, bool | None], dict[str, str]] = {}
    for r in results:
        cell = f"{r['accuracy']:.1f} ({r['correct']}/{r['problems']}){_interval(r)}{_no_answer(r)}"
        rows.setdefault((r["method"], r["calculator"]), {})[r["dataset"]] = cell
    order = {m: i for i, m in enumerate(METHOD_LABELS)}
    lines = [
        "| method | calculator | " + " | ".join(datasets) + " |",
        "|---|---|" + "---|" * len(datasets),
    ]
    for (method, calculator), cells in sorted(
        rows.items(), key=lambda kv: (order[kv[0][0]], str(kv[0][1]))
    ):
        calc = "n/a" if calculator is None else ("on" if calculator else "off")
        row = " | ".join(cells.get(d, "") for d in datasets)
        lines.append(f"| {METHOD_LABELS[method]} | {calc} | {row} |")
    lines.append("")
    splits = ", ".join(sorted({f"{r['dataset']}/{r['split']}" for r in results}))
    models = ", ".join(f"{role} {d}" for role, d in summary["models"].items())
    lines.append(
        f"Accuracy in % on {splits}, 95 % Wilson interval in brackets, then the share of "
        f"outputs with no answer to read; models: {models}"
    )
    return "\n".join(lines) + "\n"


def _no_answer(r: dict[str, Any], sep: str = "; ") -> str:
    """`; no answer 3.1 %` of a result row; empty for a summary written before rows had it."""
    pct = r.get("no_answer_pct")
    return "" if pct is None else f"{sep}no answer {pct:.1f} %"


def _interval(r: dict[str, Any]) -> str:
    """` [lo, hi]` of a result row; empty for a summary written before rows carried one."""
    ci = r.get("ci95")
    return f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else ""


def merge_summaries(paths: Sequence[str | Path]) -> dict[str, Any]:
    """One summary from several runs' `summary.json` (or their output dirs), for one table."""
    summaries = []
    for path in paths:
        f = Path(path)
        f = f / "summary.json" if f.is_dir() else f
        if not f.is_file():
            raise FileNotFoundError(f"no evaluation summary at {f}")
        summaries.append(json.loads(f.read_text()))
    return {
        "results": [r for s in summaries for r in s["results"]],
        "models": {
            f"{s['dataset']} {role}": d for s in summaries for role, d in s["models"].items()
        },
        "sources": [str(p) for p in paths],
    }


def format_summary(s: dict[str, Any]) -> str:
    kind = f" ({s['answer_kind']} answers)" if s.get("answer_kind") else ""
    lines = [
        f"evaluated {s['problems']} problems of {s['dataset']}/{s['split']}{kind} -> {s['output']}"
    ]
    if s.get("skipped_records"):
        errors = s.get("skipped_record_errors") or [""]
        lines.append(
            f"  skipped {s['skipped_records']} bad dataset records (--skip-bad-records)"
            + (f"; the first: {errors[0]}" if errors[0] else "")
        )
    for r in s["results"]:
        calc = (
            "" if r["calculator"] is None else f" (calculator {'on' if r['calculator'] else 'off'})"
        )
        gaps = f", {r['missing']} missing" if r["missing"] else ""
        gaps += f", {r['duplicates']} duplicated" if r["duplicates"] else ""
        extra = ""
        if r["calculator"]:
            extra = f", {r['calculator_forced']} results forced, {r['calculator_refused']} refused"
        if r.get("truncated"):
            extra += f", {r['truncated']} prompts truncated"
        lines.append(
            f"  {r['method']}{calc}: {r['accuracy']} %{_interval(r)} "
            f"({r['correct']}/{r['problems']}{gaps}){_no_answer(r, ', ')}, "
            f"{r['tokens_per_problem']} tokens/problem{extra}"
        )
    lines.append(f"  wall {s['wall_s']} s")
    return "\n".join(lines)


def table_main(argv: Sequence[str]) -> int:
    """`evaluate.py table RUN...`: one paper-shaped table from several runs' outputs."""
    import argparse

    p = argparse.ArgumentParser(
        prog="evaluate.py table", description="Merge evaluation runs into one results table."
    )
    p.add_argument("runs", nargs="+", help="output dirs (or summary.json files) of evaluate runs")
    p.add_argument("--output", type=Path, help="write the table here (.md) and its JSON beside")
    a = p.parse_args(argv)
    try:
        merged = merge_summaries(a.runs)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    table = results_markdown(merged)
    if a.output:
        a.output.parent.mkdir(parents=True, exist_ok=True)
        a.output.write_text(table)
        a.output.with_suffix(".json").write_text(json.dumps(merged, indent=2))
    print(table)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["table"]:
        return table_main(argv[1:])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = parse_config(EvaluateConfig, argv)
    log.info("config: %s", json.dumps(asdict(cfg), default=str))
    try:
        summary = run(cfg)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OutputLocked as e:
        print(f"error: {e}", file=sys.stderr)
        return 4
    print(format_summary(summary))
    print(results_markdown(summary))
    return 0


if __name__ == "__main__":
    # Through the importable module, so Ray ships `pipelines.evaluate.Evaluator` by reference.
    from pipelines.evaluate import main as _main

    sys.exit(_main())
