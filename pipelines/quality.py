"""Distillation quality: every method's students trained on the same problems, then scored.

The study behind `make demo`'s stage 6 and `benchmarks/distill_quality.py` (its command line,
kept there so benchmarks are found in one folder; the demo may not import `benchmarks/`):

    .venv/bin/python benchmarks/distill_quality.py --seed 0 --json outputs/bench/quality.json
    .venv/bin/python benchmarks/distill_quality.py --seeds 0,1,2       # mean and spread
    .venv/bin/python benchmarks/distill_quality.py --sweep             # the pair's levers
    .venv/bin/python benchmarks/distill_quality.py --sweep --levers 0,7 \
        --dataset-config n_train=2000                                  # decomposer forms
    python benchmarks/distill_quality.py --dataset gsm8k --base-model DIR --use-gpu   # real data
    python benchmarks/distill_quality.py --dataset custom --path mine_{split}.jsonl \
        --question-field q --answer-field a --steps-field steps --answer-kind number   # yours

What it does, in one process and one local Ray cluster:

1. Data: `arith` (generated, `socratic/arith.py`; `--dataset-config` sets its knobs), the real
   GSM8K socratic files (`--dataset gsm8k`, from `$SOCRATIC_SHARED_DATA`, default
   `../shared/data`), or the user's own (`--dataset custom --path data_{split}.jsonl
   --question-field ... --answer-field ... --steps-field ... --answer-kind ...`, or a hub id as
   `--path`: splits `train` and `test`, with gold steps, since the students train on the
   dataset's own decompositions). The training split goes through `pipelines/annotate.py
   --mode gold`, so the students train on exactly the Parquet a teacher run would write.
2. Students: with no `--base-model`, a student from scratch (`--arch llama` by default, or
   `gpt2`; `--n-layer` x `--n-embd`) with a tokenizer trained on the data (one token per word,
   digit and symbol: `trainers/scratch.py`), every role starting from the same weights. With
   `--base-model DIR`, that model.
3. Training: `trainers.train.run` (Ray Train + DeepSpeed ZeRO-2), one run per role:
   decomposer + solver (the Socratic pair, "iterative"), unified, cot and answer-only. AdamW,
   50 warm-up steps then linear decay, clip 1.0, global batch 16, no loss on the calculator's
   results (`--mask-calculator-results`: forced at inference, so predicting them only teaches
   arithmetic). `--decomposer-form iterative` trains the pair's decomposer to write one
   sub-question at a time, given the problem and the steps answered so far, then `Done.`
   (packed like the solver: one sequence per problem); evaluation and the students-alone
   scores then run that loop (the exported decomposer's `provenance.json` says its form).
4. Evaluation: `pipelines.evaluate.run` on the in-length test split and the longer split
   (`long`: more operations than any training problem), calculator on (`--calculator both`
   adds the students' own arithmetic; answer-only writes none, `n/a`). Then each student of
   the pair alone (`socratic/diagnose.py`): the solver teacher-forced on gold sub-questions,
   the decomposer's sub-questions against the gold ones.
5. Output: a paper-shaped table (system x {in-length, longer} x calculator, each accuracy with
   its 95 % Wilson interval, and what each system costs in training tokens and in generated
   tokens per problem), the students-alone table, accuracy by number of operations as a PNG,
   target lines, and `--json` with every figure.

Budgets (`--budget`): per student (the paper's setting, the default, and the one the ordering
claim uses): every student trains on `--budget-tokens`, so the pair has twice a one-model
method's training compute; per method: the pair's two students share one budget in proportion
to their data, so both see the data the same number of times; `both` trains the pair twice and
puts the two side by side (one more budget of training, ~25 % more time). A budget counts every
token of every example a student sees (prompt + target + EOS, padding excluded), which is what
a training step costs; a role's steps are the budget / (global batch x its mean example
length). Answer-only examples are short, so it sees each problem many more times than the
others: the budget is compute, not epochs. The tokens each run really trained on come back
from the trainer and are in the table and JSON. `--budget-epochs E` budgets passes instead:
every student trains E passes over the training problems, so every method takes the same
optimizer steps (one sequence per problem each); a token budget gives the solver, whose
sequences carry the sub-questions, 22 % fewer steps than chain of thought (645 against 826 at
1.5 M tokens, seed 0). Measured at 1.65 epochs (what 1.5 M tokens buy chain of thought; seeds
0 / 1 / 2, in-length): pair 98 / 82 / 97 %, unified 97 / 85 / 96 %, CoT 96 / 95 / 98 %; the
solver gains but the decomposer, down from 1 103 steps to 825, loses (every question exact on
51 / 66 / 84 % of problems), so the pair trails chain of thought by 4 points on the mean, as
with tokens (-4.3), and tokens stay the default.

The recipe, as measured (seed 0, 2 000 problems of 1-4 operations, 3 x 128 students; the pair's
solver scored alone, teacher-forced, per problem; `--sweep` reruns each lever on the pair):
- llama students (rotary positions) at lr 1e-3 instead of gpt2 ones: solver 26 % -> 98 % (gpt2
  at lr 3e-3 45 %; llama at 3e-3 40 %, it memorises: train loss 0.02). Full run at 1.5 M tokens
  per student: pair 92 %, unified 84 %, CoT 96 %, answer-only 3 % (was 24-34 / 39-59 / 45-52 /
  4-5 % with gpt2 at 3 M per method).
- no loss on calculator results: gpt2 solver 45 -> 51 %; llama pair 86 % masked against 88 %
  unmasked (`--sweep`, within noise). Kept: it spends no capacity on arithmetic it never writes.
- training problems at 1.5 M tokens per student (`--sweep`, pair): 500 -> 58 %, 2 000 -> 86 %,
  8 000 -> 92 %; deeper at the same parameters (6 x 96): 81 %.
- 20 000 distinct problems instead of 2 000 at the same steps: no gain (gpt2 44 % against 45 %;
  llama at lr 3e-3 36 % against 40 %). Depth (gpt2 6 x 96 against 3 x 128, same parameters):
  27 % against 45 %.
- random position offsets in training (gpt2, so that the longer split's positions are trained):
  22 % against 51 %.
- a decomposer that writes one sub-question at a time given the answers so far
  (`--decomposer-form iterative`) against one that writes them all first (`all`, the default),
  `--sweep --levers 0,7 --dataset-config n_train=2000`, seed 0, the same 1.5 M tokens each
  (iterative: 609 steps of packed sequences, all: 1 099): pair 87.0 [79.0, 92.2] against
  86.0 [77.9, 91.5] in-length, 2.0 [0.6, 7.0] against 1.0 [0.2, 5.4] longer: a tie, so `all`
  stays the default. It does not survive longer problems: it stops after 4 steps, the longest
  it trained on, in 66 of 100 longer ones (count right, teacher-forced: 14 % against 56 % for
  `all`; stopped early 86 %), although given the gold history it words more of their
  questions exactly (35 % against 20 % per question). 547 s for both runs, load 2.5-3.4.
- position ids stretched in training (`--train-positions stretch`, the default from scratch:
  `trainers.data.train_position_ids`): the students failed on longer problems because of
  token distances they never trained on, not content. The seed-0 solver answered step 1 of a
  5-6 operation problem right 51 % of the time, and 100 % on the same problem cut to two
  sentences; scaling positions at inference alone gave 3-7 %. `--sweep --levers 0,8,9,10,11`
  (seed 0, 8 000 problems, pair alone; solver alone per step on the longer split; decomposer
  count right on it):

  | training positions | pair, in-length | pair, longer | solver, longer step | count right |
  |---|---|---|---|---|
  | the model's own (contiguous) | 92.0 [85.0, 95.9] | 3.0 [1.0, 8.5] | 42.1 | 41 |
  | random gaps, every row | 27.0 [19.3, 36.4] | 0.0 | 39.1 | 92 |
  | random gaps, half the rows | 86.0 [77.9, 91.5] | 4.0 [1.6, 9.8] | 73.4 | 99 |
  | stretched, every row | 90.0 [82.6, 94.5] | 15.0 [9.3, 23.3] | 75.8 | 100 |
  | stretched, half the rows | 95.0 [88.8, 97.8] | 28.0 [20.1, 37.5] | 81.4 | 97 |

  Random gaps teach the distances but break the adjacent-token reading that copying a number
  needs (in-length step 2: 25 %); a uniform stretch keeps it, and the plain rows keep the
  inference case itself in training.
  Also measured with stretched positions on half the rows: factor 3 instead of 2, 93 % / 20 %
  (a tie); the one-question-at-a-time decomposer (`--decomposer-form iterative`), 82 % / 6 %:
  the positions fix its stop (stopped early on 3 of 100 longer problems, was 86), but it words
  fewer of their questions exactly (55 % per question against 61-69 % for `all`). The same
  solver configuration scored 69-83 % per longer step across these runs: read single runs
  through their intervals.
- one set of weights trained on both roles' examples and loaded as both students
  (`--pair-weights shared`, trainers' `--roles decomposer+solver`, at the pair's compute: 1 627
  steps on 3 M tokens), `--sweep --levers 0,11`, seed 0: pair 80.0 [71.1, 86.7] in-length,
  10.0 [5.5, 17.4] longer, against 95.0 [88.8, 97.8] / 28.0 [20.1, 37.5] for two students.
  The solver held (98.8 % per step against 98.1) but the decomposer lost: its questions,
  answered by a gold solver, 73 % against 84 %. Its errors here, as with its own weights, are
  copies: a name or item of another sentence ("after buying a game" for "spends $7 on a
  scarf"). `separate` stays the default; `shared` stays for the weights it saves in serving.
- the solver trained on its own decomposer's sub-questions (`--solver-data on-policy`: half
  the training problems, each of the decomposer's questions with the gold answer of its
  position; the decomposer trains first), `--sweep --levers 12`, seed 0: pair 96.0
  [90.2, 98.4] in-length, 29.0 [21.0, 38.5] longer, against 95 / 28 with gold sub-questions:
  a tie. The decomposer rewrote 786 of the 4 000 drawn problems (912 questions; 59 s to
  write them all), so the solver saw its errors on 10 % of its data; the pair's errors stay
  the decomposer's (its questions, answered by a gold solver: 84 % in both runs). Off by
  default: it adds a decomposer pass and orders the pair's training for no measured gain.
- global batch 8 instead of 16 (twice the optimizer steps on the same tokens), every method,
  full run, seed 0 (`--batch-size 8`; beside the test suite, so 1 646 s is no wall figure):
  pair 94 [87.5, 97.2] / 20 against 91 / 12 at 16, unified 96 / 9 against 70 / 0, CoT 98 / 25
  against 97 / 30, answer-only 6 / 6. More steps help every student that writes steps, the
  one-model unified most; the pair still trails CoT (-4 against -6 points), its decomposer
  wording fewer questions exactly (84 % against 91 %), its solver more steps right (97.7 %
  against 95.8 %). Seed 1: pair 94 / 20 against 86 / 11, unified 91 / 27 against 62 / 4,
  CoT 97 / 67 against 91 / 27 (gap -3). Seed 2 (idle, 901 s against 864 s at 16 on seed 0):
  pair 95 / 20 against 97 / 24, unified 97 / 19 against 58 / 0, CoT 98 / 48 against 99 / 29
  (gap -3). Over three seeds the pair is 94-95 % in-length (86-97 at 16) and trails CoT by
  3-4 points (2-6 at 16). Not yet the default: the wall target (900 s) sits at its edge.

It always exits 0 on a completed run: it measures, it does not test.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO))

from socratic.adapters import (  # noqa: E402
    DatasetOptions,
    DatasetSpec,
    is_local_path,
    load_problems,
)
from socratic.config import option, parse_config  # noqa: E402
from socratic.formats import examples_for, training_examples  # noqa: E402
from socratic.stats import mean_spread, wilson_interval  # noqa: E402
from trainers.config import SHARED, TRAIN_POSITIONS, check_positions, roles_of  # noqa: E402
from trainers.data import tokenize  # noqa: E402

log = logging.getLogger("distill_quality")  # the benchmark's name, as in its logs

METHOD_ROLES = {
    "iterative": ("decomposer", "solver"),
    "unified": ("unified",),
    "cot": ("cot",),
    "answer": ("answer",),
}
SPLIT_PAIR = "iterative-split"  # the pair with one budget shared by its two students
LABELS = {
    "untrained": "Untrained students (decomposer + solver)",
    "iterative": "Socratic (decomposer + solver), budget per student",
    SPLIT_PAIR: "Socratic (decomposer + solver), budget per method",
    "unified": "Socratic, unified",
    "cot": "Chain of thought",
    "answer": "Answer only",
}
ONE_MODEL_STEPWISE = ("unified", "cot")  # what the pair must beat (answer-only is no steps)
BUDGETS = ("per-student", "per-method", "both")
DEFAULT_TOKENS = 1_500_000  # training tokens per student: the budget unless --budget-epochs
PAIR_WEIGHTS = ("separate", "shared")  # two students, or one set of weights for both roles
SOLVER_DATA = ("gold", "on-policy")  # the solver's sub-questions: gold, or its decomposer's
TARGET_SOCRATIC = 90.0  # % on the in-length test, calculator on
TARGET_GAP = 0.0  # points, Socratic minus the best one-model step-by-step method, in-length
TARGET_LONGER = 50.0  # % on the longer test, calculator on
TARGET_WALL_S = 900.0  # the default run, one seed, on 2 cores
GSM8K_FILES = {"train": "gsm8k/train_socratic.jsonl", "test": "gsm8k/test_socratic.jsonl"}


@dataclass(frozen=True)
class QualityConfig(DatasetOptions):
    """Train every method's students on the same problems and score them (calculator on/off)."""

    dataset: str = option("arith", help="arith (generated), gsm8k (the real socratic files) or "
                          "custom (yours: --path, --question-field, ...)",
                          choices=("arith", "gsm8k", "custom"))  # fmt: skip
    path: str | None = option(
        None,
        help="custom: the dataset, a file with {split} in its name (splits train and test) or a "
        "hub dataset id",
    )
    dataset_config: str | None = option(
        "n_train=8000",
        help="arith knobs, e.g. ops=1-4,long_ops=5-6,n_train=2000 (socratic/arith.py); the "
        "default trains on 8 000 problems (pair 92 %% against 86 %% on 2 000, --sweep)",
    )
    seed: int = option(0, help="seed of the problems, the initial weights and the data order")
    output: str = option("outputs/bench/distill_quality", help="where every artifact goes")
    json: str | None = option(None, help="write every figure to this JSON file")
    methods: str = option("iterative,unified,cot,answer", help="methods to train and score")
    base_model: str | None = option(None, help="start weights (default: a GPT-2 from scratch)")
    arch: str = option("llama", choices=("gpt2", "llama"),
                       help="from-scratch student: gpt2 or llama (rotary positions)")
    n_layer: int = option(3, help="from-scratch student: layers")
    n_embd: int = option(128, help="from-scratch student: width")
    n_head: int = option(4, help="from-scratch student: attention heads")
    n_positions: int = option(
        1024, help="from-scratch student: context length (long-split histories grow past 512)"
    )
    budget_tokens: int | None = option(
        None, help=f"training tokens per student or method (default {DEFAULT_TOKENS:_} unless "
        "--budget-epochs is given; see --budget and the docstring)",
    )
    budget_epochs: float | None = option(
        None, help="instead of --budget-tokens: every student trains this many passes over the "
        "training problems (the same number of optimizer steps for every method; per method "
        "the pair's two students share them, half each). Seeds 0 / 1 / 2 at 1.65 (what 1.5 M "
        "tokens buy chain of thought): pair 98 / 82 / 97 %%, CoT 96 / 95 / 98 %% in-length, "
        "no better for the pair than tokens; see the docstring",
    )
    budget: str = option("per-student", choices=BUDGETS,
                         help="the pair's budget: per-student (each student trains on "
                         "--budget-tokens, the paper's setting), per-method (its two students "
                         "share them) or both, side by side (1 more budget of training)")
    sweep: bool = option(False, help="instead of the table: the pair alone, budget per student, "
                         "once per lever switched against this run's recipe (see SWEEP)")
    levers: str | None = option(None, help="--sweep: only these levers, by their number in "
                                "SWEEP (0 is the recipe), e.g. 0,7")
    decomposer_form: str = option(
        "all", choices=("all", "iterative"),
        help="the pair's decomposer: every sub-question at once (all) or one per step, given "
        "the answers so far (iterative, seed 0: 82 %% in-length, 6 %% longer against 95 %% / "
        "28 %% for all, both with stretched positions; see the docstring)",
    )
    pair_weights: str = option(
        "separate", choices=PAIR_WEIGHTS,
        help="the pair's students: two sets of weights (separate, the paper's), or one trained "
        "on both roles' examples and loaded as both (shared: trainers' --roles "
        "decomposer+solver; per student it trains on twice --budget-tokens, the pair's compute; "
        "seed 0: 80 %% in-length, 10 %% longer against 95 / 28 %% separate, see the docstring)",
    )
    solver_data: str = option(
        "gold", choices=SOLVER_DATA,
        help="the pair's solver trains on the gold sub-questions, or (on-policy) on those its "
        "own decomposer writes for --on-policy-share of the training problems, each with the "
        "gold answer of its position: the decomposer trains first, then the solver "
        "(`on_policy_data`; seed 0: 96 %% / 29 %% against 95 / 28 %% gold, a tie)",
    )
    on_policy_share: float = option(
        0.5, help="--solver-data on-policy: the share of training problems whose gold "
        "sub-questions are replaced by the decomposer's (the rest stay gold)"
    )
    seeds: str | None = option(None, help="several seeds, e.g. 0,1,2: each a full run under "
                               "OUTPUT/seed-N, then the mean and spread of every figure")
    batch_size: int = option(16, help="global batch (examples per optimizer step)")
    lr: float = option(1e-3, help="peak learning rate (llama students: 1e-3; the gpt2 ones "
                       "needed 3e-3, see the docstring)")
    warmup_steps: int = option(50, help="linear warm-up steps")
    mask_calculator_results: bool = option(
        True, help="no loss on the calculator's results (forced at inference), every method"
    )
    train_positions: str = option(
        "auto", choices=("auto", *TRAIN_POSITIONS),
        help="position ids in training, every method (trainers.data.train_position_ids): the "
        "model's own (contiguous) or drawn past each row's length, so that longer problems' "
        "distances are trained (stretch, random-gaps); auto: stretch for students from "
        "scratch, contiguous for a --base-model (pretrained on its own positions)",
    )
    position_factor: float = option(2.0, help="--train-positions: how far past a row's length")
    position_share: float = option(
        0.5, help="--train-positions: the share of rows drawn, the rest keep plain positions "
        "(half: pair 95 %% in-length, 28 %% longer; every row: 90 %% / 15 %%; seed 0, --sweep)"
    )
    max_length: int = option(512, help="max tokens per training example")
    workers: int = option(1, help="Ray Train workers per role")
    concurrent: int = option(2, help="roles training at the same time")
    use_gpu: bool = option(False, help="train (and evaluate) on GPUs: NCCL, bf16")
    train_limit: int | None = option(None, help="train on the first N training problems only")
    eval_limit: int | None = option(None, help="score only the first N problems of each split")
    eval_batch_size: int = option(50, help="problems per evaluation batch")
    eval_actors: int = option(2, help="evaluation actors (one CPU each)")
    max_new_tokens: int | None = option(None, help="tokens per model call (default: from data)")
    calculator: str = option("on", help="on, off or both (off: the students' own arithmetic)",
                             choices=("on", "off", "both"))  # fmt: skip
    untrained: bool = option(False, help="also score the untrained start weights (iterative)")
    num_cpus: int = option(4, help="logical CPUs of the local Ray cluster")
    ray_log: str | None = option(None, help="Ray's own log lines go here (default: OUTPUT/ray.log)")

    def __post_init__(self) -> None:
        check_positions(self.positions, self.position_factor, self.position_share)
        if self.budget_epochs is not None and self.budget_tokens is not None:
            raise ValueError("--budget-epochs and --budget-tokens are one budget in two units: "
                             "give one of them")
        if self.budget_epochs is not None and not self.budget_epochs > 0:
            raise ValueError(f"--budget-epochs must be > 0, got {self.budget_epochs}")
        if self.budget_tokens is not None and not self.budget_tokens > 0:
            raise ValueError(f"--budget-tokens must be > 0, got {self.budget_tokens}")
        if self.solver_data == "on-policy":
            if not 0.0 < self.on_policy_share <= 1.0:
                raise ValueError(f"--on-policy-share must be in (0, 1], got "
                                 f"{self.on_policy_share}")
            if self.pair_weights == "shared" or self.decomposer_form != "all":
                raise ValueError("--solver-data on-policy needs the decomposer trained before "
                                 "the solver and writing every sub-question at once: "
                                 "--pair-weights separate and --decomposer-form all")
        if self.dataset != "custom":
            if self.path:
                raise ValueError("--path is for --dataset custom (gsm8k reads the shared data)")
            return
        if not self.path:
            raise ValueError("--dataset custom needs --path: a file or a hub dataset id")
        if not self.steps_field:
            raise ValueError(
                "--dataset custom: the study trains on the dataset's own steps (annotate --mode "
                "gold), so it needs --steps-field"
            )
        if is_local_path("custom", self.path) and "{split}" not in self.path:
            raise ValueError(
                "--dataset custom: the study trains on split train and scores split test, so a "
                "local --path needs {split} in its name (e.g. mine_{split}.jsonl)"
            )
        DatasetSpec.from_config(SimpleNamespace(**spec_kwargs(self, "train")))

    @property
    def method_list(self) -> list[str]:
        out = [m.strip() for m in self.methods.split(",") if m.strip()]
        bad = [m for m in out if m not in METHOD_ROLES]
        if bad or not out:
            raise ValueError(f"--methods: unknown {bad}; choose from {', '.join(METHOD_ROLES)}")
        return out

    @property
    def lever_list(self) -> set[int] | None:
        """`--levers` as SWEEP numbers; None: every lever."""
        if not self.levers:
            return None
        try:
            out = {int(x) for x in self.levers.split(",") if x.strip()}
        except ValueError:
            raise ValueError(f"--levers: expected SWEEP numbers, got {self.levers!r}") from None
        if bad := sorted(i for i in out if not 0 <= i < len(SWEEP)):
            raise ValueError(f"--levers: no lever {bad}; SWEEP has 0-{len(SWEEP) - 1}")
        return out

    @property
    def tokens(self) -> int:
        """`--budget-tokens`, its default when neither unit is given (unused with epochs)."""
        return DEFAULT_TOKENS if self.budget_tokens is None else self.budget_tokens

    @property
    def positions(self) -> str:
        """`--train-positions` resolved: auto is stretch from scratch, contiguous otherwise."""
        if self.train_positions != "auto":
            return self.train_positions
        return "contiguous" if self.base_model else "stretch"

    @property
    def out(self) -> Path:
        return Path(self.output).resolve()

    @property
    def seed_list(self) -> list[int]:
        try:
            out = [int(x) for x in (self.seeds or "").split(",") if x.strip()]
        except ValueError:
            raise ValueError(
                f"--seeds: expected comma-separated integers, got {self.seeds!r}"
            ) from None
        return out or [self.seed]


@dataclass(frozen=True)
class Entry:
    """One trained system of the table: a method, where its students go, how it is budgeted."""

    key: str  # "iterative", SPLIT_PAIR, "unified", ...: its row, run names and folders
    method: str  # what `pipelines.evaluate` runs
    per_student: bool  # every student trains on the whole budget (one-model methods: trivially)
    shared: bool = False  # the pair's two roles in one set of weights (--pair-weights shared)

    @property
    def roles(self) -> tuple[str, ...]:
        """What trains: one trainer role per student (`decomposer+solver` when shared)."""
        roles = METHOD_ROLES[self.method]
        return (SHARED.join(roles),) if self.shared else roles

    @property
    def students(self) -> str:
        return "students" if self.key == self.method else f"students-{self.key}"


def entries(cfg: QualityConfig) -> list[Entry]:
    """The systems a run trains: the pair once per budget setting, every other method once."""
    out = []
    for m in cfg.method_list:
        if m != "iterative":
            out.append(Entry(m, m, True))
            continue
        shared = cfg.pair_weights == "shared"
        if cfg.budget in ("per-student", "both"):
            out.append(Entry("iterative", "iterative", True, shared))
        if cfg.budget in ("per-method", "both"):
            out.append(Entry(SPLIT_PAIR, "iterative", False, shared))
    return out


# --- the console: our lines there, everything else in a log file ------------------------------

_console: Any = None  # the real console while `quiet_console` holds fd 1 and 2


def say(*parts: Any) -> None:
    """A progress line on the console (and in the log file, when one holds the output)."""
    text = " ".join(str(p) for p in parts)
    if _console is not None:
        _console.write(text + "\n")
        _console.flush()
    print(text, flush=True)


@contextmanager
def quiet_console(log_path: str | Path) -> Iterator[Path]:
    """Send fd 1 and 2 to `log_path`, so that Ray, DeepSpeed and every library write there
    (processes Ray starts inherit them), while `say` still reaches the console.

    Why file descriptors: Ray's C++ core, its raylet and Ray Data print to them directly, and
    Ray Data installs its own logging handlers after any logging set-up of ours."""
    global _console
    path = Path(log_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    _console = os.fdopen(os.dup(1), "w", buffering=1)
    with path.open("a", buffering=1) as log_file:
        os.dup2(log_file.fileno(), 1)
        os.dup2(log_file.fileno(), 2)
        try:
            yield path
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            _console.close()
            _console = None


# --- data ------------------------------------------------------------------------------------


def shared_data() -> Path:
    return Path(os.environ.get("SOCRATIC_SHARED_DATA", REPO.parent / "shared" / "data"))


def split_names(cfg: QualityConfig) -> dict[str, str]:
    """{"in-length": split, "longer": split}; GSM8K has no longer split of its own."""
    if cfg.dataset != "arith":
        return {"in-length": "test"}
    from socratic.arith import ArithConfig

    if ArithConfig.parse(cfg.dataset_config).n_long == 0:
        return {"in-length": "test"}
    return {"in-length": "test", "longer": "long"}


def spec_kwargs(cfg: QualityConfig, split: str) -> dict[str, Any]:
    """The dataset options (as annotate/evaluate take them) that name one split."""
    shared = {f.name: getattr(cfg, f.name) for f in fields(DatasetOptions)}
    if cfg.dataset == "custom":
        return {"dataset": "custom", "split": split, "path": cfg.path, **shared}
    if cfg.dataset == "arith":
        return {"dataset": "arith", "split": split, "dataset_config": cfg.dataset_config,
                "seed": cfg.seed, **shared}  # fmt: skip
    path = shared_data() / GSM8K_FILES["train" if split == "train" else "test"]
    if not path.is_file():
        raise FileNotFoundError(f"--dataset gsm8k: {path} not found (set SOCRATIC_SHARED_DATA)")
    return {"dataset": "gsm8k", "split": split, "path": str(path), "dataset_config": "socratic",
            **shared}  # fmt: skip


def problems_of(cfg: QualityConfig, split: str, limit: int | None) -> list[Any]:
    """One split's problems, through the same mapping annotate and evaluate use."""
    spec = DatasetSpec.from_config(SimpleNamespace(**spec_kwargs(cfg, split), limit=limit))
    return list(load_problems(spec))


def role_texts(
    problems: Sequence[Any], role: str, decomposer_form: str = "all"
) -> list[tuple[str, str]]:
    """(prompt, target) of every example a role trains on, from the formats module."""
    out = []
    for p in problems:
        if not p.steps:
            continue
        for ex in examples_for(
            role, problem=p.question, steps=p.steps, solution=p.solution, answer=p.answer,
            decomposer_form=decomposer_form,
        ):  # fmt: skip
            out.append((ex.prompt, ex.target))
    return out


def train_examples(problems: Sequence[Any], role: str, decomposer_form: str = "all") -> list[Any]:
    """What the trainer trains `role` on: the solver and the iterative decomposer packed (one
    sequence per problem, the trainer's default `--solver-examples packed`), every other role
    one example per problem.

    Why not `role_texts`: planning the solver's steps on its per-example form counted ~1.7x the
    tokens a packed step really holds, so its budget share and step count were wrong. A shared
    student (`decomposer+solver`) trains on every part's examples, as the trainer builds them."""
    if len(parts := roles_of(role)) > 1:
        return [ex for part in parts for ex in train_examples(problems, part, decomposer_form)]
    return [
        ex for p in problems if p.steps
        for ex in training_examples(
            role, problem=p.question, steps=p.steps, solution=p.solution, answer=p.answer,
            decomposer_form=decomposer_form, packed=True,
        )
    ]  # fmt: skip


# --- stages ----------------------------------------------------------------------------------


def annotate_gold(cfg: QualityConfig) -> dict[str, Any]:
    from pipelines import annotate

    kw = spec_kwargs(cfg, "train")
    return annotate.run(
        annotate.AnnotateConfig(**kw, limit=cfg.train_limit, mode="gold",
                                output=str(cfg.out / "annotations"))  # fmt: skip
    )


def build_base(cfg: QualityConfig, problems: Sequence[Any]) -> str:
    """The students' start weights: `--base-model`, or a from-scratch GPT-2 + its tokenizer."""
    if cfg.base_model:
        return cfg.base_model
    from trainers.scratch import build_student

    roles = {r for m in cfg.method_list for r in METHOD_ROLES[m]}
    texts = [p + t for role in sorted(roles)
             for p, t in role_texts(problems, role, cfg.decomposer_form)]  # fmt: skip
    return str(build_student(cfg.out / "base", texts, n_layer=cfg.n_layer, n_embd=cfg.n_embd,
                             n_head=cfg.n_head, n_positions=cfg.n_positions,
                             seed=cfg.seed, arch=cfg.arch))  # fmt: skip


def plan_steps(cfg: QualityConfig, problems: Sequence[Any], base: str) -> dict[str, dict]:
    """Steps per entry and role, `{entry: {role: plan}}` (see the module docstring).

    Per student, each role trains on the whole budget (a shared student of two roles on twice
    it: the pair's compute); per method, the pair's two students share it in proportion to
    their data, so both see the data the same number of times."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    epoch_tokens: dict[str, tuple[int, int]] = {}
    plan: dict[str, dict] = {}
    for entry in entries(cfg):
        for role in entry.roles:
            if role not in epoch_tokens:
                examples = train_examples(problems, role, cfg.decomposer_form)
                n = tokenize(examples, tok, cfg.max_length).lengths
                epoch_tokens[role] = (sum(n), len(n))
        total = sum(epoch_tokens[r][0] for r in entry.roles)
        plan[entry.key] = {}
        for role in entry.roles:
            tokens, examples = epoch_tokens[role]
            mean = tokens / examples
            if cfg.budget_epochs is not None:  # a shared student's examples are both roles'
                students = sum(len(roles_of(r)) for r in entry.roles)
                passes = cfg.budget_epochs / (1 if entry.per_student else students)
                share = passes * tokens
                steps = math.ceil(round(passes * examples / cfg.batch_size, 6))
            else:
                per_student = len(roles_of(role))  # students' worth of budget this run holds
                share = cfg.tokens * (per_student if entry.per_student else tokens / total)
                steps = math.ceil(share / (cfg.batch_size * mean))
            steps = max(cfg.warmup_steps + 1, steps)
            plan[entry.key][role] = {
                "method": entry.method, "budget_tokens": round(share), "examples": examples,
                "mean_tokens": round(mean, 1), "steps": steps,
                "epochs": round(steps * cfg.batch_size / examples, 2),
            }  # fmt: skip
    return plan


def on_policy_data(
    cfg: QualityConfig, entry: Entry, data: str, max_new_tokens: int
) -> tuple[str, dict[str, Any]]:
    """The solver's training data with its own decomposer's sub-questions: for
    `--on-policy-share` of the problems (drawn by seed), the trained decomposer writes the
    sub-questions (greedy, as at inference) and, where it wrote as many as the gold steps, the
    k-th takes the k-th gold answer, so the solver learns to answer what it will be asked with
    what the teacher meant (exposure bias, QUALITY.md; GKD and SIKeD train on the student's own
    outputs corrected by the teacher). A decomposition of another length cannot be aligned, so
    that problem keeps its gold steps, counted. Returns the new annotation folder (written
    through `socratic.records.annotation_table`, the schema annotate writes) and the counts."""
    import random

    import pyarrow.parquet as pq

    from socratic.formats import decomposer_prompt
    from socratic.generate import Generator
    from socratic.records import annotation_table
    from trainers.data import read_accepted

    rows = read_accepted(data)
    ids = sorted({r["id"] for r in rows})
    chosen = set(random.Random(cfg.seed).sample(ids, round(cfg.on_policy_share * len(ids))))
    todo = [r for r in rows if r["id"] in chosen and r["steps"]]
    gen = Generator(cfg.out / entry.students / "decomposer", device=None if cfg.use_gpu else "cpu")
    texts: list[str] = []
    for i in range(0, len(todo), 100):
        prompts = [decomposer_prompt(r["question"]) for r in todo[i : i + 100]]
        texts += [c.text for c in gen.complete(prompts, max_new_tokens=max_new_tokens)]
    counts: dict[str, int] = defaultdict(int)
    for row, text in zip(todo, texts, strict=True):
        steps = on_policy_steps(row["steps"], text)
        if steps is None:
            counts["count differs, gold kept"] += 1
            continue
        changed = sum(a != b for a, b in zip(steps, row["steps"], strict=True))
        counts["rewritten" if changed else "as gold"] += 1
        counts["questions rewritten"] += changed
        row["steps"] = steps
    out = cfg.out / f"annotations-on-policy-{entry.key}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    pq.write_table(annotation_table(rows), out / "part-0.parquet")
    return str(out), {"problems": len(ids), "drawn": len(todo), **counts}


def on_policy_steps(gold: Sequence[dict[str, str]], text: str) -> list[dict[str, str]] | None:
    """A decomposer's reply as training steps: its k-th sub-question with the k-th gold answer;
    None when the reply cannot be aligned: another number of sub-questions, as the solving loop
    parses them (`parse_decomposition`, which skips an empty one)."""
    from socratic.formats import parse_decomposition

    questions = parse_decomposition(text)
    if len(questions) != len(gold):
        return None
    return [{"question": q, "answer": s["answer"]} for q, s in zip(questions, gold, strict=True)]


def train_all(
    cfg: QualityConfig, data: str, base: str, plan: dict[str, dict], problems: Sequence[Any]
) -> list[dict]:
    """One `trainers.train.run` per entry and role (its own step count), `--concurrent` at a
    time, longest first. With `--solver-data on-policy` a separate pair is one job: its
    decomposer, then its solver on `on_policy_data` (`problems` size the decomposer's
    replies)."""
    from trainers import train
    from trainers.config import TRAINERS_DIR, TrainConfig

    micro = max(1, cfg.batch_size // cfg.workers)
    # Every run trains from the start: the study measures a recipe, and a checkpoint left in the
    # same --output by an earlier run (another problem count, budget or recipe) would otherwise
    # be resumed. Measured: a rerun resumed 5 roles mid-schedule from a run whose checkpoints
    # predated the fingerprint check, and every method lost 17-42 points.
    stale = cfg.out / "ray_results"
    if stale.exists():
        say(f"  removing the checkpoints of an earlier run: {stale}")
        shutil.rmtree(stale)
    common = TrainConfig(
        data=data, base_model=base, roles="decomposer", output=str(cfg.out / "students"),
        storage_path=str(cfg.out / "ray_results"), run_name=f"quality-s{cfg.seed}",
        deepspeed=str(TRAINERS_DIR / "ds_zero2.json"), bf16=cfg.use_gpu,
        max_length=cfg.max_length, micro_batch_size=micro, lr=cfg.lr,
        warmup_steps=cfg.warmup_steps, grad_clip=1.0, seed=cfg.seed, log_every=25,
        num_workers=cfg.workers, use_gpu=cfg.use_gpu, cpus_per_worker=1.0,
        mask_calculator_results=cfg.mask_calculator_results,
        decomposer_form=cfg.decomposer_form, train_positions=cfg.positions,
        position_factor=cfg.position_factor, position_share=cfg.position_share,
    )  # fmt: skip
    by_key = {e.key: e for e in entries(cfg)}

    def one(key: str, role: str, role_data: str, extra: dict[str, Any]) -> dict:
        p, entry = plan[key][role], by_key[key]
        tcfg = replace(common, roles=role, max_steps=p["steps"], checkpoint_every=p["steps"],
                       output=str(cfg.out / entry.students), data=role_data,
                       run_name=f"quality-s{cfg.seed}-{key}")  # fmt: skip
        say(f"  training {key} {role}: {p['steps']} steps ({p['epochs']} epochs)")
        (r,) = train.run(tcfg)
        say(f"  {key} {role}: {r['steps']} steps, {r['tokens']} tokens, loss "
            f"{r['final_loss']:.4f}, {r['train_s']} s training ({r['wall_s']} s with start-up)")
        return {**r, "entry": key, **extra}

    def chain(job: tuple[str, tuple[str, ...]]) -> list[dict]:
        key, roles = job
        out, role_data, extra = [], data, {}
        for role in roles:
            if role == "solver" and len(roles) > 1:  # on-policy: after its decomposer
                t = time.perf_counter()
                n_new = new_tokens_needed(cfg, problems, base, "iterative")
                role_data, info = on_policy_data(cfg, by_key[key], data, n_new)
                extra = {"on_policy": {**info, "s": round(time.perf_counter() - t, 1)}}
                say(f"  {key} on-policy solver data: {dict(info)} "
                    f"({extra['on_policy']['s']} s)")
            out.append(one(key, role, role_data, extra))
        return out

    def chained(key: str) -> bool:  # the pair's roles one after the other, in one job
        return cfg.solver_data == "on-policy" and by_key[key].method == "iterative"

    jobs = [job for k in plan
            for job in ([(k, tuple(plan[k]))] if chained(k) else [(k, (r,)) for r in plan[k]])]
    jobs.sort(key=lambda j: -sum(plan[j[0]][r]["steps"] * plan[j[0]][r]["mean_tokens"]
                                 for r in j[1]))  # fmt: skip
    with ThreadPoolExecutor(max_workers=max(1, cfg.concurrent)) as pool:
        return [r for rs in pool.map(chain, jobs) for r in rs]


def new_tokens_needed(cfg: QualityConfig, problems: Sequence[Any], base: str, method: str) -> int:
    """Tokens per model call for one method: its longest gold target, plus a quarter."""
    from transformers import AutoTokenizer

    if cfg.max_new_tokens:
        return cfg.max_new_tokens
    tok = AutoTokenizer.from_pretrained(base)
    longest = 0
    for role in METHOD_ROLES[method]:
        targets = [t for _, t in role_texts(problems, role, cfg.decomposer_form)]
        if targets:
            longest = max(longest, max(len(x) for x in tok(targets)["input_ids"]))
    return int(longest * 1.25) + 8


def evaluate_all(cfg: QualityConfig, problems: dict[str, list[Any]], base: str) -> dict[str, dict]:
    """`pipelines.evaluate.run` per split and entry (each method its own token limit, so a
    student that never stops costs its own length, not the longest method's). Result rows carry
    the entry's key as their `method`, so both budget settings of the pair stay apart."""
    from pipelines import evaluate

    out = {}
    for name, split in split_names(cfg).items():
        results: list[dict] = []
        t = time.perf_counter()
        for entry in entries(cfg):
            ecfg = evaluate.EvaluateConfig(
                **spec_kwargs(cfg, split), limit=cfg.eval_limit, methods=entry.method,
                models=str(cfg.out / entry.students), calculator=cfg.calculator,
                max_new_tokens=new_tokens_needed(cfg, problems[split], base, entry.method),
                batch_size=cfg.eval_batch_size, actors=cfg.eval_actors, actor_cpus=1.0,
                num_threads=1, output=str(cfg.out / "eval" / split / entry.key),
                decomposer_form=cfg.decomposer_form,
            )  # fmt: skip
            summary = evaluate.run(ecfg)
            results += [{**r, "method": entry.key} for r in summary["results"]]
            n = summary["problems"]
        if cfg.untrained:  # the start weights as both students: what training has to beat
            ecfg = replace(ecfg, methods="iterative", decomposer=base, solver=base,
                           max_new_tokens=new_tokens_needed(cfg, problems[split], base,
                                                            "iterative"),
                           output=str(cfg.out / "eval" / split / "untrained"))  # fmt: skip
            summary = evaluate.run(ecfg)
            results += [{**r, "method": "untrained"} for r in summary["results"]]
        out[name] = {"results": results, "problems": n}
        say(f"  {name} ({split}, {n} problems): {time.perf_counter() - t:.1f} s")
    return out


def diagnose_pairs(
    cfg: QualityConfig, problems: dict[str, list[Any]], base: str
) -> dict[str, dict]:
    """Each student of each pair scored alone (`socratic.diagnose`), calculator on, per split:
    `{entry: {split name: {"solver": ..., "decomposer": ...}}}`. In this process, after the
    Ray Data evaluation: a few hundred short prompts, seconds on CPU."""
    from functools import partial

    from socratic.diagnose import score_decomposer, score_solver
    from socratic.generate import Generator

    device = None if cfg.use_gpu else "cpu"
    out: dict[str, dict] = {}
    for entry in (e for e in entries(cfg) if e.method == "iterative"):
        folder = cfg.out / entry.students
        dec = Generator(folder / "decomposer", device=device)  # loaded once, every split
        sol = Generator(folder / "solver", device=device)
        out[entry.key] = {}
        for name, split in split_names(cfg).items():
            ps = [p for p in problems[split] if p.steps]
            n_new = new_tokens_needed(cfg, ps, base, "iterative")
            out[entry.key][name] = {
                "solver": score_solver(
                    ps, partial(sol.complete, max_new_tokens=n_new, calculator=True)
                ),
                "decomposer": score_decomposer(ps, partial(dec.complete, max_new_tokens=n_new),
                                               decomposer_form=cfg.decomposer_form),
            }
    return out


def by_length(cfg: QualityConfig, problems: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Accuracy per (entry, calculator, number of operations), from the predictions Parquet."""
    import pyarrow.parquet as pq

    rows = []
    for split in split_names(cfg).values():
        n_ops = {p.id: len(p.steps) for p in problems[split]}
        kinds = {e.key: e.method for e in entries(cfg)} | (
            {"untrained": "iterative"} if cfg.untrained else {}
        )
        for key, kind in kinds.items():
            folder = cfg.out / "eval" / split / key / "predictions" / kind
            cols = ["id", "calculator", "correct"]
            table = [r for f in sorted(folder.rglob("*.parquet"))
                     for r in pq.read_table(f, columns=cols).to_pylist()]  # fmt: skip
            groups: dict[tuple, list[bool]] = defaultdict(list)
            for r in table:
                groups[(r["calculator"], n_ops.get(r["id"], 0))].append(bool(r["correct"]))
            for (calc, n), hits in sorted(groups.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
                rows.append({"split": split, "method": key, "calculator": calc, "ops": n,
                             "problems": len(hits), "correct": sum(hits),
                             "accuracy": round(100 * sum(hits) / len(hits), 2)})  # fmt: skip
    return rows


# --- report ----------------------------------------------------------------------------------


def accuracy(
    evals: dict[str, dict], name: str, method: str, calculator: bool | None
) -> dict | None:
    """The summary row of (split name, entry, calculator); a one-pass method scored as written
    (calculator None) stands for both settings."""
    if name not in evals:
        return None
    rows = [r for r in evals[name]["results"] if r["method"] == method]
    exact = [r for r in rows if r["calculator"] == calculator]
    return (exact or [r for r in rows if r["calculator"] is None] or [None])[0]


def cell(r: dict | None) -> str:
    """`54.0 [44.3, 63.7] (54/100)`: accuracy, its 95 % Wilson interval, the counts."""
    if not r:
        return ""
    lo, hi = r.get("ci95") or wilson_interval(r["correct"], r["problems"])
    return f"{r['accuracy']:.1f} [{lo:.1f}, {hi:.1f}] ({r['correct']}/{r['problems']})"


def table(
    cfg: QualityConfig, evals: dict[str, dict], costs: dict[str, dict[str, float]] | None = None
) -> str:
    """The paper-shaped table, one row per system and calculator setting, with what each
    costs: the tokens its students trained on and the tokens it generates per problem."""
    names = list(split_names(cfg))
    calcs = {"on": (True,), "off": (False,), "both": (True, False)}[cfg.calculator]
    head = ("| method | calculator | " + " | ".join(f"{n} test" for n in names)
            + " | training tokens | generated tokens / problem (in-length) |")  # fmt: skip
    lines = [head, "|---|---|" + "---|" * (len(names) + 2)]
    keys = (["untrained"] if cfg.untrained else []) + [e.key for e in entries(cfg)]
    for key in keys:
        settings = [c for c in calcs if any(
            r["method"] == key and r["calculator"] == c for e in evals.values()
            for r in e["results"])] or [None]  # fmt: skip
        for calc in settings:
            cells = [cell(accuracy(evals, n, key, calc)) for n in names]
            label = "n/a" if calc is None else ("on" if calc else "off")
            first = accuracy(evals, names[0], key, calc)
            trained = (costs or {}).get(key, {}).get("training_tokens")
            cells.append(f"{trained / 1e6:.2f} M" if trained else "0")
            cells.append(f"{first['tokens_per_problem']:.0f}" if first else "")
            lines.append(f"| {LABELS[key]} | {label} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Accuracy in %, its 95 % Wilson interval in brackets, (correct/problems).")
    if cfg.pair_weights == "shared" and "iterative" in cfg.method_list:
        lines.append("The pair's two students are one set of weights trained on both roles' "
                     "examples (--pair-weights shared).")  # fmt: skip
    if cfg.decomposer_form == "iterative" and "iterative" in cfg.method_list:
        lines.append("The pair's decomposer writes one sub-question at a time, given the answers "
                     "so far (--decomposer-form iterative).")  # fmt: skip
    return "\n".join(lines)


def diagnostics_table(diag: dict[str, dict]) -> str:
    """Each student of each pair alone (see `socratic.diagnose`), calculator on."""
    if not diag:
        return ""
    lines = ["| pair | test | solver, per step | solver, per problem | decomposer: count right "
             "| decomposer: questions exact | every question exact (gold-solver pipeline, "
             "lower bound) | decomposer's wrong questions: one word off, from the problem / "
             "not in it / another kind |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip

    def pct(x: dict) -> str:
        if x["accuracy"] is None:
            return ""
        return f"{x['accuracy']:.1f} [{x['ci95'][0]:.1f}, {x['ci95'][1]:.1f}]"

    for key, by_split in diag.items():
        for name, d in by_split.items():
            sol, dec = d["solver"], d["decomposer"]
            m = list(dec.get("misses", {}).values())
            kinds = f"{m[0]} / {m[1]} / {sum(m[2:])}" if m else ""
            lines.append(f"| {LABELS[key]} | {name} | {pct(sol['per_step'])} | "
                         f"{pct(sol['per_problem'])} | {pct(dec['count_right'])} | "
                         f"{pct(dec['question_right'])} | {pct(dec['gold_solver_pipeline'])} | "
                         f"{kinds} |")
    lines.append("")
    lines.append("Solver: gold sub-questions with the gold history (teacher forcing). Decomposer: "
                 "its sub-questions against the gold ones, word for word; a gold solver answers "
                 "those, so the last column bounds the pipeline with a gold solver from below "
                 "(a question worded otherwise may still be answered right). Wrong questions "
                 "by kind: socratic.diagnose.MISS_KINDS, every kind in the JSON.")  # fmt: skip
    return "\n".join(lines)


def _verdict(ok: bool) -> str:
    return "MET" if ok else "MISSED"


def target_lines(cfg: QualityConfig, evals: dict[str, dict]) -> tuple[list[str], dict[str, Any]]:
    """The issue's target lines (names fixed, so `check_targets` and the dashboard read them),
    informative lines without a target, and every figure."""
    lines, figures = [], {}
    keys = [e.key for e in entries(cfg)]
    pair = "iterative" if "iterative" in keys else SPLIT_PAIR if SPLIT_PAIR in keys else None
    setting = "equal budget per student" if pair == "iterative" else "equal budget per method"
    soc = accuracy(evals, "in-length", pair, True) if pair else None
    if untrained := accuracy(evals, "in-length", "untrained", True):
        figures["untrained_calculator_on_in_length"] = untrained["accuracy"]
    if soc:
        v = soc["accuracy"]
        figures["socratic_calculator_on_in_length"] = v
        figures["socratic_calculator_on_in_length_ci95"] = soc.get("ci95")
        lines.append(f"Socratic, calculator on, in-length test: {v:.1f} % "
                     f"(target >= {TARGET_SOCRATIC:.0f} %: {_verdict(v >= TARGET_SOCRATIC)})")
        lines.append(f"  (95 % interval {cell(soc)}, {setting})")
    one_model = [r for m in ONE_MODEL_STEPWISE
                 if (r := accuracy(evals, "in-length", m, True))]  # fmt: skip
    if soc and one_model:
        best = max(one_model, key=lambda r: r["accuracy"])
        gap = soc["accuracy"] - best["accuracy"]
        figures["socratic_minus_best_one_model_points"] = round(gap, 2)
        figures["best_one_model_method"] = best["method"]
        # The unit goes in the name: the team's dashboard reads %, x, ms and s only.
        lines.append(f"Socratic minus best one-model step-by-step method, {setting}, in points: "
                     f"{gap:.1f} (target >= {TARGET_GAP:.0f}: {_verdict(gap >= TARGET_GAP)})")
        lines.append(f"  (best one-model method: {LABELS[best['method']]}, {cell(best)})")
        split = accuracy(evals, "in-length", SPLIT_PAIR, True)
        if pair == "iterative" and split:
            g = split["accuracy"] - best["accuracy"]
            figures["socratic_per_method_minus_best_one_model_points"] = round(g, 2)
            lines.append(f"Socratic minus best one-model step-by-step method, equal budget per "
                         f"method (measured, no target), in points: {g:.1f}")
    if soc and (ans := accuracy(evals, "in-length", "answer", True)):
        gap = soc["accuracy"] - ans["accuracy"]
        figures["socratic_minus_answer_in_length_points"] = round(gap, 2)
        lines.append(f"Socratic minus answer-only, in-length test (measured, no target), in "
                     f"points: {gap:.1f}")  # fmt: skip
    if pair and (lo := accuracy(evals, "longer", pair, True)):
        v = lo["accuracy"]
        figures["socratic_calculator_on_longer"] = v
        lines.append(f"Socratic, calculator on, longer test: {v:.1f} % "
                     f"(target >= {TARGET_LONGER:.0f} %: {_verdict(v >= TARGET_LONGER)})")
    for key in keys:
        for calc in (True, False):
            r = accuracy(evals, "longer", key, calc)
            if r and (calc or r["calculator"] is not None) and not (key == pair and calc):
                c = "n/a" if r["calculator"] is None else ("on" if calc else "off")
                lines.append(f"{LABELS[key]}, calculator {c}, longer test (measured, no "
                             f"target): {r['accuracy']:.1f} %")  # fmt: skip
    return lines, figures


def wall_line(seconds: float) -> str:
    return (f"run wall time: {seconds:.0f} s (target <= {TARGET_WALL_S:.0f} s: "
            f"{_verdict(seconds <= TARGET_WALL_S)})")  # fmt: skip


def plot(cfg: QualityConfig, rows: list[dict[str, Any]], path: Path, train_ops: int) -> Path:
    """Accuracy against number of operations, one line per system (calculator on where the
    method has it); a dashed line marks the longest training problem."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for key in [e.key for e in entries(cfg)] + (["untrained"] if cfg.untrained else []):
        mine = [r for r in rows if r["method"] == key]
        calc = True if any(r["calculator"] is True for r in mine) else None
        pts: dict[int, list[int]] = defaultdict(lambda: [0, 0])
        for r in mine:
            if r["calculator"] is calc:
                pts[r["ops"]][0] += r["correct"]
                pts[r["ops"]][1] += r["problems"]
        xs = sorted(pts)
        ys = [100 * pts[x][0] / pts[x][1] for x in xs]
        suffix = ", calculator on" if calc else ""
        ax.plot(xs, ys, marker="o", label=LABELS[key] + suffix)
    if train_ops:
        ax.axvline(train_ops + 0.5, color="grey", linestyle="--", linewidth=1)
        ax.text(train_ops + 0.6, 95, "longer than training", fontsize=8, color="grey", va="top")
    ax.set_xlabel("number of operations (gold steps)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-3, 103)
    ax.set_title(f"Tiny students on {cfg.dataset} (seed {cfg.seed}): accuracy by problem length")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --- the run ---------------------------------------------------------------------------------


def start_ray(cfg: QualityConfig) -> bool:
    """A fresh local cluster unless this process has one already (a test's, the demo's);
    True when it is ours to shut down. Never the user's RAY_ADDRESS cluster."""
    import ray

    if ray.is_initialized():
        return False
    # The dashboard stays on: Ray Train's PlacementGroupCleaner asks the State API (served by
    # the dashboard) whether the controller lives, and without it may take a live run's
    # placement group away (seen here: a run killed mid-training, "worker health check failed").
    ray.init(address="local", num_cpus=cfg.num_cpus, log_to_driver=False,
             configure_logging=False)  # fmt: skip
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    return True


def run(cfg: QualityConfig) -> dict[str, Any]:
    """Every stage for one seed; returns every figure (also written to `--json`)."""
    import ray

    t0 = time.perf_counter()
    cfg.out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    train_problems = problems_of(cfg, "train", cfg.train_limit)
    problems = {s: problems_of(cfg, s, cfg.eval_limit) for s in split_names(cfg).values()}
    train_ops = max(len(p.steps) for p in train_problems)
    say(f"data: {cfg.dataset} seed {cfg.seed}: {len(train_problems)} training problems "
          f"(1-{train_ops} operations); "
          + ", ".join(f"{s} {len(v)}" for s, v in problems.items()))  # fmt: skip
    owns_ray = start_ray(cfg)
    try:
        t = time.perf_counter()
        ann = annotate_gold(cfg)
        times["annotate_s"] = round(time.perf_counter() - t, 1)
        say(f"gold annotations: {ann['accepted']} accepted of {ann['rows']} -> {ann['output']}")
        base = build_base(cfg, train_problems)
        plan = plan_steps(cfg, train_problems, base)
        unit = "method" if cfg.budget == "per-method" else "student"
        amount = (f"{cfg.budget_epochs} epochs" if cfg.budget_epochs is not None
                  else f"{cfg.tokens} tokens")  # fmt: skip
        say(f"students from {'scratch' if not cfg.base_model else base}; budget "
            f"{amount} per {unit} (pair: {cfg.budget})")
        t = time.perf_counter()
        trained = train_all(cfg, ann["output"], base, plan, train_problems)
        times["train_s"] = round(time.perf_counter() - t, 1)
        say("evaluating (Ray Data):")
        t = time.perf_counter()
        evals = evaluate_all(cfg, problems, base)
        times["evaluate_s"] = round(time.perf_counter() - t, 1)
    finally:
        if owns_ray:
            ray.shutdown()
    t = time.perf_counter()
    diag = diagnose_pairs(cfg, problems, base)
    times["diagnose_s"] = round(time.perf_counter() - t, 1)
    rows = by_length(cfg, problems)
    boundary = train_ops if cfg.dataset == "arith" else 0
    png = plot(cfg, rows, cfg.out / "accuracy_by_ops.png", boundary)
    costs: dict[str, dict[str, float]] = defaultdict(lambda: {"training_tokens": 0})
    for r in trained:
        costs[r["entry"]]["training_tokens"] += int(r["tokens"] or 0)
    md = table(cfg, evals, costs)
    lines, figures = target_lines(cfg, evals)
    times["total_s"] = round(time.perf_counter() - t0, 1)
    lines.append(wall_line(times["total_s"]))
    result = {
        "config": asdict(cfg),
        "times_s": times,
        "plan": plan,
        "training": trained,
        "trained_tokens_by_method": {k: v["training_tokens"] for k, v in costs.items()},
        "evaluation": {n: e["results"] for n, e in evals.items()},
        "diagnostics": diag,
        "diagnostics_md": diagnostics_table(diag),
        "by_ops": rows,
        "table_md": md,
        "targets": lines,
        "figures": figures,
        "png": str(png),
    }
    write_json(cfg, result)
    return result


def write_json(cfg: QualityConfig, result: dict[str, Any]) -> None:
    (cfg.out / "quality.json").write_text(json.dumps(result, indent=2, default=str))
    if cfg.json:
        Path(cfg.json).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.json).write_text(json.dumps(result, indent=2, default=str))


def run_seeds(cfg: QualityConfig) -> dict[str, Any]:
    """One full run per seed (each under OUTPUT/seed-N), then the mean and spread of every
    accuracy; the target lines are read on the means."""
    seeds = cfg.seed_list
    if len(seeds) == 1:
        return run(replace(cfg, seed=seeds[0]))
    t0 = time.perf_counter()
    runs = []
    for seed in seeds:
        say(f"== seed {seed} ==")
        runs.append(run(replace(cfg, seed=seed, output=str(cfg.out / f"seed-{seed}"), json=None)))
        say(report(runs[-1]))
    cells: dict[tuple, list[float]] = defaultdict(list)
    for r in runs:
        for name, results in r["evaluation"].items():
            for row in results:
                cells[(name, row["method"], row["calculator"])].append(row["accuracy"])
    spread = []
    for (name, method, calc), values in cells.items():
        m, sd = mean_spread(values)
        spread.append({"split": name, "method": method, "calculator": calc, "mean": round(m, 2),
                       "sd": round(sd, 2), "per_seed": values})  # fmt: skip
    mean_evals = {
        name: {"results": [{"method": x["method"], "calculator": x["calculator"],
                            "accuracy": x["mean"], "correct": 0, "problems": 0, "ci95": [0, 0]}
                           for x in spread if x["split"] == name]}  # fmt: skip
        for name in runs[0]["evaluation"]
    }
    lines, figures = target_lines(cfg, mean_evals)
    lines = [line for line in lines if not line.startswith("  (")]  # per-seed intervals only
    walls = [r["times_s"]["total_s"] for r in runs]
    lines.append(f"run wall time, mean of {len(seeds)} seeds (measured, no target): "
                 f"{sum(walls) / len(walls):.0f} s")  # fmt: skip
    md = ["| method | calculator | split | mean | sd | per seed |", "|---|---|---|---|---|---|"]
    for x in spread:
        c = "n/a" if x["calculator"] is None else ("on" if x["calculator"] else "off")
        md.append(f"| {LABELS[x['method']]} | {c} | {x['split']} | {x['mean']:.1f} | "
                  f"{x['sd']:.1f} | {', '.join(f'{v:.0f}' for v in x['per_seed'])} |")
    result = {
        "config": asdict(cfg),
        "seeds": seeds,
        "runs": [{"seed": s, "output": str(cfg.out / f"seed-{s}"), "figures": r["figures"],
                  "times_s": r["times_s"]} for s, r in zip(seeds, runs, strict=True)],  # fmt: skip
        "spread": spread,
        "spread_md": "\n".join(md),
        "targets": lines,
        "figures": figures,
        "times_s": {"total_s": round(time.perf_counter() - t0, 1)},
    }
    cfg.out.mkdir(parents=True, exist_ok=True)
    write_json(cfg, result)
    return result


def with_arith(cfg: QualityConfig, **knobs: int) -> str:
    """`--dataset-config` with `knobs` set (later keys win in `ArithConfig.parse`)."""
    extra = ",".join(f"{k}={v}" for k, v in knobs.items())
    return f"{cfg.dataset_config},{extra}" if cfg.dataset_config else extra


# Each lever of the pair's recipe, switched against the run's own settings (issue #21).
SWEEP: dict[str, Any] = {
    "recipe": lambda c: {},
    "architecture flipped (llama <-> gpt2)": lambda c: {
        "arch": "llama" if c.arch == "gpt2" else "gpt2"},
    "calculator results masked: flipped": lambda c: {
        "mask_calculator_results": not c.mask_calculator_results},
    "deeper, same parameters (6 x 96)": lambda c: {"n_layer": 6, "n_embd": 96},
    "500 training problems": lambda c: {"dataset_config": with_arith(c, n_train=500)},
    "2000 training problems": lambda c: {"dataset_config": with_arith(c, n_train=2000)},
    "8000 training problems": lambda c: {"dataset_config": with_arith(c, n_train=8000)},
    "decomposer one question at a time (form flipped: all <-> iterative)": lambda c: {
        "decomposer_form": "all" if c.decomposer_form == "iterative" else "iterative"},
    "training positions: the model's own (contiguous)": lambda c: {
        "train_positions": "contiguous"},
    "training positions: random gaps instead of stretched": lambda c: {
        "train_positions": "random-gaps"},
    "training positions: stretched on every row": lambda c: {
        "train_positions": "stretch", "position_share": 1.0},
    "one set of weights for both roles (pair weights flipped: separate <-> shared)": lambda c: {
        "pair_weights": "separate" if c.pair_weights == "shared" else "shared"},
    "solver data flipped (gold <-> on-policy: its decomposer's own sub-questions)": lambda c: {
        "solver_data": "gold" if c.solver_data == "on-policy" else "on-policy"},
}  # fmt: skip


def same_run(a: QualityConfig, b: QualityConfig) -> bool:
    """Whether two configs train and score the same thing (arith knobs compared as parsed, so
    `n_train=8000` and `n_train=8000,n_train=8000` are one run): a lever that sets what the
    recipe already has is not run twice."""
    from socratic.arith import ArithConfig

    if a.dataset == b.dataset == "arith":
        if ArithConfig.parse(a.dataset_config) != ArithConfig.parse(b.dataset_config):
            return False
        a = replace(a, dataset_config=b.dataset_config)
    a, b = (replace(x, train_positions=x.positions) for x in (a, b))  # auto as what it runs
    return a == b


def run_sweep(cfg: QualityConfig) -> dict[str, Any]:
    """The pair alone (budget per student, calculator on), once per lever in SWEEP, same seed;
    each run under OUTPUT/sweep/N. One row per lever: in-length and longer accuracy, and each
    student alone."""
    t0 = time.perf_counter()
    recipe = replace(cfg, methods="iterative", budget="per-student", untrained=False,
                     calculator="on", sweep=False, json=None)  # fmt: skip
    rows = []
    chosen = cfg.lever_list
    for i, (name, change) in enumerate(SWEEP.items()):
        if cfg.dataset != "arith" and "dataset_config" in change(cfg):
            continue
        if chosen is not None and i not in chosen:
            continue
        sub = replace(recipe, **change(cfg), output=str(cfg.out / "sweep" / str(i)))
        if i and same_run(replace(sub, output=recipe.output), recipe):
            say(f"== sweep {i}: {name}: the recipe's own setting, not run again ==")
            continue
        say(f"== sweep {i}: {name} ==")
        r = run(sub)
        diag = r["diagnostics"]["iterative"]["in-length"]
        longer = r["diagnostics"]["iterative"].get("longer")
        rows.append({
            "lever": name, "change": change(cfg), "output": sub.output,
            "decomposer_form": sub.decomposer_form,
            "in_length": accuracy_of(r, "in-length"), "longer": accuracy_of(r, "longer"),
            "solver_per_step": diag["solver"]["per_step"]["accuracy"],
            "decomposer_gold_solver": diag["decomposer"]["gold_solver_pipeline"]["accuracy"],
            "decomposer_count_right": diag["decomposer"]["count_right"]["accuracy"],
            "decomposer_count_right_longer":
                longer and longer["decomposer"]["count_right"]["accuracy"],
            "decomposer_gold_solver_longer":
                longer and longer["decomposer"]["gold_solver_pipeline"]["accuracy"],
            "training_tokens": r["trained_tokens_by_method"].get("iterative"),
            "plan": r["plan"].get("iterative"),
            "diagnostics": r["diagnostics"]["iterative"],
            "wall_s": r["times_s"]["total_s"],
        })  # fmt: skip
        say(f"  {name}: in-length {rows[-1]['in_length']}, longer {rows[-1]['longer']}")
    md = ["| lever | pair, in-length | pair, longer | solver alone, per step | pipeline with a "
          "gold solver | decomposer: count right, in-length / longer | wall (s) |",
          "|---|---|---|---|---|---|---|"]  # fmt: skip
    for x in rows:
        counts = f"{x['decomposer_count_right']} / {x['decomposer_count_right_longer'] or ''}"
        md.append(f"| {x['lever']} | {x['in_length']} | {x['longer'] or ''} | "
                  f"{x['solver_per_step']} | {x['decomposer_gold_solver']} | {counts} | "
                  f"{x['wall_s']:.0f} |")  # fmt: skip
    result = {"config": asdict(cfg), "sweep": rows, "sweep_md": "\n".join(md),
              "targets": [], "times_s": {"total_s": round(time.perf_counter() - t0, 1)}}
    cfg.out.mkdir(parents=True, exist_ok=True)
    write_json(cfg, result)
    return result


def accuracy_of(r: dict[str, Any], name: str) -> str | None:
    row = accuracy({n: {"results": v} for n, v in r["evaluation"].items()}, name, "iterative", True)
    return cell(row) if row else None


def report(r: dict[str, Any]) -> str:
    if "sweep_md" in r:
        return "\n".join(["", "== the pair's levers, one at a time (seed "
                          f"{r['config']['seed']}, calculator on) ==", r["sweep_md"]])
    if "spread_md" in r:
        return "\n".join(["", f"== {len(r['seeds'])} seeds: mean and spread (%) ==",
                          r["spread_md"], "", *r["targets"]])  # fmt: skip
    return "\n".join(
        ["", "== accuracy (%) ==", r["table_md"], "",
         "== each student of the pair alone (%, calculator on) ==", r["diagnostics_md"], "",
         f"accuracy by number of operations: {r['png']}",
         "time: " + ", ".join(f"{k} {v}" for k, v in r["times_s"].items()), "",
         *r["targets"]]  # fmt: skip
    )


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    cfg = parse_config(QualityConfig, argv)
    cfg.method_list  # noqa: B018 (validates --methods before anything starts)
    cfg.seed_list  # noqa: B018
    cfg.lever_list  # noqa: B018
    log_path = Path(cfg.ray_log) if cfg.ray_log else cfg.out / "ray.log"
    say(f"Ray's, DeepSpeed's and the libraries' own output: {log_path}")
    with quiet_console(log_path):
        result = run_sweep(cfg) if cfg.sweep else run_seeds(cfg)
        say(report(result))
    return 0


if __name__ == "__main__":
    from pipelines.quality import main as _main

    sys.exit(_main())
