"""`socratic-distill`: one command, a subcommand per stage (the `[project.scripts]` entry point).

    socratic-distill annotate --dataset gsm8k --split train --output OUT --model gpt-4o-mini
    socratic-distill train --config trainers/configs/cpu_tiny.yaml --data OUT --base-model DIR
    socratic-distill evaluate --dataset gsm8k --split test --models outputs/students ...
    socratic-distill serve --decomposer DIR --solver DIR
    socratic-distill run experiment.yaml                  # every stage from one file, resumable
    socratic-distill SUBCOMMAND --help                    # the stage's own flags

Each subcommand hands the rest of the command line to that stage's own `main(argv)`, the same
function `python pipelines/annotate.py ...` (what `ray job submit` runs) calls, so both spellings
take the same flags and do the same thing. Stages are imported only when chosen: `--help` here
imports neither Ray nor torch.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # `python pipelines/cli.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROG = "socratic-distill"
# subcommand -> (module with `main(argv) -> int`, one line for `--help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "annotate": ("pipelines.annotate", "annotate a dataset with teacher (or gold) decompositions"),
    "train": ("trainers.train", "train the students on Ray Train + DeepSpeed"),
    "student": ("trainers.scratch", "a tiny student from scratch, its vocabulary from annotations"),
    "evaluate": ("pipelines.evaluate", "score trained students on a test split; merge tables"),
    "serve": ("serve.app", "serve a decomposer + solver pair on Ray Serve (HTTP + playground)"),
    "demo": ("pipelines.demo", "every stage once, on one machine, offline"),
    "teacher": ("serve.local_teacher", "serve a Hugging Face LM as an OpenAI-compatible teacher"),
    "fake-teacher": ("serve.fake_teacher", "a stand-in teacher answering from a dataset's gold"),
    "run": ("pipelines.experiment", "annotate -> train -> evaluate (-> serve) from one YAML"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        f"usage: {PROG} SUBCOMMAND [ARGS...]",
        "",
        "Distil Socratic reasoning from a teacher LLM into small students, on Ray.",
        "",
        "subcommands:",
        *(f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()),
        "",
        f"`{PROG} SUBCOMMAND --help` shows a subcommand's own options.",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == "--version":
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"{PROG} {version(PROG)}")
        except PackageNotFoundError:
            print(f"{PROG} (not installed)")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"{usage()}\n\n{PROG}: error: unknown subcommand {name!r}", file=sys.stderr)
        return 2
    stage_main = importlib.import_module(COMMANDS[name][0]).main
    # argparse names the program after sys.argv[0]: make the stage's usage and errors read
    # `socratic-distill annotate ...`, the command the user typed.
    saved = sys.argv
    sys.argv = [f"{PROG} {name}", *rest]
    try:
        return _exit_code(stage_main(rest))
    except SystemExit as e:  # argparse's --help and errors, a stage's own sys.exit
        return _exit_code(e.code)
    finally:
        sys.argv = saved


def _exit_code(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)  # what `sys.exit("message")` prints
    return 1


if __name__ == "__main__":
    sys.exit(main())
