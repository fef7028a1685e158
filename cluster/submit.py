"""Submit a stage of the project to a Ray cluster as a Ray job, the same way every time.

    python cluster/submit.py annotate --address http://127.0.0.1:8265 -- \\
        --dataset gsm8k --split train --output s3://bucket/ann --model gpt-4o-mini
    python cluster/submit.py train -- --config trainers/configs/gpu_gpt2_large.yaml --data ...
    python cluster/submit.py annotate --dry-run -- ...   # print the `ray job submit` command

It runs `ray job submit --working-dir <repo> --runtime-env cluster/runtime_env.yaml -- python
<stage script> ARGS`, so every submission uploads the same files with the same excludes and the
same environment conventions, and a stage runs on a cluster exactly as the README runs it.

Secrets: never sent. Whatever a submission carries (the runtime env and the entrypoint command
line) is stored in the cluster's GCS with the job and shown by `ray job list`, the dashboard and
the logs. So an API key must already be on the cluster side - the nodes' environment, filled
from ~/.socratic-distill/secrets.env by ray_cluster.yaml or from a Kubernetes Secret by the
KubeRay manifests - and every job driver and Ray worker inherits it from its node. This helper
passes only the NAMES of the secrets the stage reads that are set in your shell (as job
metadata, so `ray job list` shows what the job expects to find on the cluster), and refuses to
submit if a secret's value appears in the runtime env or on the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
RUNTIME_ENV = REPO / "cluster" / "runtime_env.yaml"
STAGES = {
    "annotate": "pipelines/annotate.py",
    "train": "trainers/train.py",
    "evaluate": "pipelines/evaluate.py",
    "run": "pipelines/experiment.py",  # annotate -> train -> evaluate from one experiment file
}
# Secrets the stages read from their environment: the teacher's key (annotate's --api-key-env),
# a hub token for gated models, a tracking key. Only these names are ever passed (as metadata).
STAGE_SECRETS = ("OPENAI_API_KEY", "HF_TOKEN", "WANDB_API_KEY")
# Any variable named like a credential: its value must never reach a job record.
SECRET_PATTERN = re.compile(
    r"(^|_)(API_KEY|KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIALS?)(_|$)", re.IGNORECASE
)
MIN_SECRET_LEN = 8  # shorter values ("1", "true") would match everywhere and protect nothing


def is_secret_name(name: str) -> bool:
    """Whether an environment variable name looks like it holds a credential."""
    return name in STAGE_SECRETS or bool(SECRET_PATTERN.search(name))


def expected_secrets(stage: str, args: Sequence[str], environ: Mapping[str, str]) -> list[str]:
    """Names (never values) of the secrets this stage reads that are set in `environ`: what the
    job will look for in the cluster's environment. annotate's `--api-key-env NAME` counts."""
    names = list(STAGE_SECRETS)
    if stage == "annotate":
        for i, arg in enumerate(args):
            if arg == "--api-key-env" and i + 1 < len(args):
                names.append(args[i + 1])
            elif arg.startswith("--api-key-env="):
                names.append(arg.split("=", 1)[1])
    return sorted({n for n in names if environ.get(n)})


def load_runtime_env(path: str | Path = RUNTIME_ENV) -> dict[str, Any]:
    """The runtime env YAML as a dict (empty file -> {})."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a runtime env must be a mapping")
    return data


def check_no_secrets(
    runtime_env: Mapping[str, Any], entrypoint: Sequence[str], environ: Mapping[str, str]
) -> None:
    """Raise ValueError if a secret could reach the job record: a secret-looking name in the
    runtime env's env_vars, or the value of a secret variable of `environ` anywhere in the
    runtime env or the entrypoint. The message names the variable, never the value."""
    env_vars = runtime_env.get("env_vars") or {}
    bad_names = sorted(k for k in env_vars if is_secret_name(k))
    if bad_names:
        raise ValueError(
            f"runtime env sets {', '.join(bad_names)}: secrets must come from the cluster's own "
            "environment (see cluster/runtime_env.yaml), never from a runtime env"
        )
    record = json.dumps(dict(runtime_env)) + "\0" + "\0".join(entrypoint)
    for name, value in sorted(environ.items()):
        if not is_secret_name(name):
            continue
        if len(value) >= MIN_SECRET_LEN and value in record:
            raise ValueError(
                f"the value of ${name} appears in the job's runtime env or command line; it would "
                "be stored with the job. Pass the variable's name (e.g. --api-key-env) instead."
            )


def default_ray() -> str:
    """The `ray` next to this interpreter (the project's venv), else the one on PATH."""
    local = Path(sys.executable).parent / "ray"
    return str(local) if local.exists() else "ray"


def build_command(
    stage: str,
    args: Sequence[str],
    *,
    address: str | None = None,
    runtime_env: str | Path = RUNTIME_ENV,
    working_dir: str | Path = REPO,
    python: str = "python",
    ray: str = "ray",
    submission_id: str | None = None,
    no_wait: bool = False,
    environ: Mapping[str, str] | None = None,
) -> list[str]:
    """The `ray job submit` argv for one stage; raises ValueError if a secret would travel.

    `python` is the interpreter on the cluster (the nodes' environment decides what `python`
    is); the stage script path is relative to the uploaded working dir.
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; one of {', '.join(STAGES)}")
    environ = os.environ if environ is None else environ
    entrypoint = [python, STAGES[stage], *args]
    check_no_secrets(load_runtime_env(runtime_env), entrypoint, environ)
    metadata = {"stage": stage}
    names = expected_secrets(stage, args, environ)
    if names:
        metadata["secret_env_names"] = ",".join(names)  # names only: what the job expects
    cmd = [ray, "job", "submit"]
    if address:
        cmd += ["--address", address]
    cmd += ["--working-dir", str(working_dir), "--runtime-env", str(runtime_env)]
    cmd += ["--metadata-json", json.dumps(metadata)]
    if submission_id:
        cmd += ["--submission-id", submission_id]
    if no_wait:
        cmd.append("--no-wait")
    return [*cmd, "--", *entrypoint]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1 :]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stage", choices=sorted(STAGES))
    p.add_argument("--address", default=None, help="dashboard address (default: $RAY_ADDRESS)")
    p.add_argument("--runtime-env", default=str(RUNTIME_ENV), help="runtime env YAML")
    p.add_argument("--python", default="python", help="interpreter on the cluster's nodes")
    p.add_argument("--ray", default=default_ray(), help="the ray CLI to submit with")
    p.add_argument("--submission-id", default=None, help="job id to use (default: Ray's)")
    p.add_argument("--no-wait", action="store_true", help="return once the job is submitted")
    p.add_argument("--dry-run", action="store_true", help="print the command, do not run it")
    a = p.parse_args(argv)
    try:
        cmd = build_command(
            a.stage,
            extra,
            address=a.address,
            runtime_env=a.runtime_env,
            python=a.python,
            ray=a.ray,
            submission_id=a.submission_id,
            no_wait=a.no_wait,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    names = expected_secrets(a.stage, extra, os.environ)
    if names:
        print(
            f"note: {', '.join(names)} set here and NOT sent; the job reads the cluster's own",
            file=sys.stderr,
        )
    if a.dry_run:
        print(shlex.join(cmd))
        return 0
    return subprocess.call(cmd, cwd=REPO)


if __name__ == "__main__":
    sys.exit(main())
