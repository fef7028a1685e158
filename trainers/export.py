"""Turn a ZeRO checkpoint into a plain Hugging Face model directory, with its provenance.

Training checkpoints are DeepSpeed shards (one optimizer shard per rank, and under ZeRO-3 the
parameters partitioned too); nothing outside DeepSpeed can load them. Export consolidates them
into one fp32 state dict and saves model + tokenizer with `save_pretrained`, so the server and
the evaluation load a student with `AutoModelForCausalLM.from_pretrained(dir)` and nothing else.

It runs on the driver (`trainers/train.py`), never inside a Ray task: a zero-CPU task may land on
any node, and its local disk is not where the user asked for the model. An `--output` URI
(`s3://...`) is written through pyarrow's filesystems. Beside the weights go `provenance.json`
(what made them: data, config, base model, checkpoint, commit, versions) and the loss curves.
"""

from __future__ import annotations

import json
import platform
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

STATE_FILE = "socratic_state.json"
FINGERPRINT_FILE = "fingerprint.json"  # what a checkpoint was trained on (trainers.loop)
HISTORY_FILE = "history.json"
PROVENANCE_FILE = "provenance.json"  # socratic.solve.PROVENANCE_FILE reads it (same name)
CURVES_FILE = "loss_curves.png"


def export_checkpoint(
    checkpoint_dir: str | Path,
    base_model: str,
    out_dir: str | Path,
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Consolidate the checkpoint in `checkpoint_dir` into an HF dir at `out_dir` (local)."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    checkpoint_dir = Path(checkpoint_dir)
    tag = json.loads((checkpoint_dir / STATE_FILE).read_text())["tag"]
    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)
    config = AutoConfig.from_pretrained(base_model)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(_tied_keys(model))
    if unexpected or set(missing) - tied:
        raise RuntimeError(
            f"checkpoint {checkpoint_dir} does not match {base_model}: "
            f"missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    model.tie_weights()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base_model).save_pretrained(out)
    history_file = checkpoint_dir / HISTORY_FILE
    history = json.loads(history_file.read_text()) if history_file.is_file() else []
    if history:
        record = provenance or {}  # a shared student's curve is titled by its joined roles
        title = str(record.get("student", record.get("role", "")))
        plot_losses(history, out / CURVES_FILE, title=title)
    if provenance is not None:
        (out / PROVENANCE_FILE).write_text(json.dumps(dict(provenance), indent=2, default=str))
    return out


def export_to(
    checkpoint_dir: str | Path,
    base_model: str,
    output: str,
    provenance: Mapping[str, Any] | None = None,
) -> str:
    """`export_checkpoint` to a local dir or a pyarrow filesystem URI; returns where it went."""
    if "://" not in output:
        return str(export_checkpoint(checkpoint_dir, base_model, output, provenance).resolve())
    import pyarrow.fs as pafs

    with tempfile.TemporaryDirectory() as local:
        export_checkpoint(checkpoint_dir, base_model, local, provenance)
        fs, path = pafs.FileSystem.from_uri(output)
        fs.create_dir(path, recursive=True)
        pafs.copy_files(local, path, destination_filesystem=fs)
    return output


def _filesystem(where: str) -> tuple[Any, str]:
    import pyarrow.fs as pafs

    if "://" in where:
        return pafs.FileSystem.from_uri(where)
    return pafs.LocalFileSystem(), str(Path(where).resolve())


def copy_export(source: str, output: str, provenance: Mapping[str, Any]) -> str:
    """An exported dir (`export_to`'s result) copied to `output`, a local dir or a URI, with
    its own `provenance.json`: the further roles of a shared student (`decomposer+solver`),
    without consolidating the checkpoint again. Returns where it went, as `export_to` does."""
    import pyarrow.fs as pafs

    (src_fs, src), (dst_fs, dst) = _filesystem(source), _filesystem(output)
    dst_fs.create_dir(dst, recursive=True)
    pafs.copy_files(src, dst, source_filesystem=src_fs, destination_filesystem=dst_fs)
    with dst_fs.open_output_stream(f"{dst}/{PROVENANCE_FILE}") as f:
        f.write(json.dumps(dict(provenance), indent=2, default=str).encode())
    return output if "://" in output else dst


def provenance(
    *, role: str, config: Mapping[str, Any], deepspeed: Mapping[str, Any] | None,
    checkpoint: str, metrics: Mapping[str, Any], export: str,
) -> dict[str, Any]:  # fmt: skip
    """What made an exported student, enough to rebuild it. A decomposer also says its form
    ("all" or "iterative"): evaluation and Serve read it (`socratic.solve.decomposer_form_of`)
    to run the loop it was trained for."""
    import deepspeed as ds
    import torch
    import transformers

    try:
        import ray

        ray_version = ray.__version__
    except ImportError:  # pragma: no cover - the driver has ray
        ray_version = None
    return {
        "role": role,
        "decomposer_form": config.get("decomposer_form", "all") if role == "decomposer" else None,
        "base_model": config.get("base_model"),
        "data": config.get("data"),
        "eval_data": config.get("eval_data"),
        "eval_fraction": config.get("eval_fraction"),
        "checkpoint": checkpoint,
        "export": export,
        "step": metrics.get("step"),
        "loss": metrics.get("loss"),
        "eval_loss": metrics.get("eval_loss"),
        "config": dict(config),
        "deepspeed": dict(deepspeed) if deepspeed is not None else None,
        "git_commit": git_commit(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "deepspeed": ds.__version__,
            "ray": ray_version,
        },
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def git_commit() -> str | None:
    """The project's commit, with `+dirty` when the tree has changes; None outside git."""
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("+dirty" if dirty else "") if sha else None


def plot_losses(history: Sequence[Mapping[str, float]], path: str | Path, title: str = "") -> Path:
    """Training and eval loss against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in [("loss", "train loss"), ("eval_loss", "eval loss")]:
        pts = [(h["step"], h[key]) for h in history if key in h]
        if pts:
            ax.plot(
                *zip(*pts, strict=True), marker="." if key == "eval_loss" else None, label=label
            )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per target token")
    ax.set_title(f"{title} loss curves".strip())
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def _tied_keys(model) -> list[str]:
    """Parameter names that are tied to another (GPT-2's lm_head), absent from ZeRO states."""
    keys = getattr(model, "_tied_weights_keys", None) or []
    if isinstance(keys, dict):
        keys = list(keys)
    return [k for k in keys if isinstance(k, str)]
