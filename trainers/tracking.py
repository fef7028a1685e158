"""Where training metrics go: TensorBoard event files by default, MLflow or W&B on request.

Ray Train 2 leaves experiment tracking to the training function (its own guides call the
tracker from rank 0), so rank 0 opens one of these and logs every reported metric. TensorBoard
needs no server: event files are written under the run's folder in Ray Train's storage
(`tensorboard --logdir <storage>/<run>`); when that storage is a URI (`s3://...`) they are
written locally and copied there with pyarrow at every checkpoint and at the end.
MLflow and W&B are imported only when asked for, with a clear error if they are not installed.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from typing import Any

TRACKERS = ("tensorboard", "mlflow", "wandb", "none")
_PACKAGE = {"tensorboard": "tensorboardX", "mlflow": "mlflow", "wandb": "wandb"}


def check_tracker(kind: str) -> None:
    """Fail on the driver, before any worker starts, if the tracker's package is missing."""
    if kind not in TRACKERS:
        raise ValueError(f"--tracker must be one of {', '.join(TRACKERS)}; got {kind!r}")
    if kind == "none":
        return
    import importlib

    try:
        importlib.import_module(_PACKAGE[kind])
    except ImportError as e:
        raise ValueError(
            f"--tracker {kind} needs the {_PACKAGE[kind]} package (pip install {_PACKAGE[kind]}),"
            " or pass --tracker tensorboard|none"
        ) from e


class Tracker:
    """Logs nothing (`--tracker none`, and every rank but 0)."""

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def sync(self) -> None:
        """Make what was logged durable (called at checkpoints)."""

    def close(self) -> None:
        pass


class TensorBoard(Tracker):
    def __init__(self, log_dir: str) -> None:
        from tensorboardX import SummaryWriter

        self.remote = log_dir if "://" in log_dir else None
        self.local = tempfile.mkdtemp(prefix="tb-") if self.remote else log_dir
        self.writer = SummaryWriter(self.local)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def sync(self) -> None:
        if self.remote:
            import pyarrow.fs as pafs

            pafs.copy_files(self.local, self.remote)

    def close(self) -> None:
        self.writer.close()
        self.sync()


class MLflow(Tracker):
    def __init__(self, run_name: str, params: Mapping[str, Any]) -> None:
        import mlflow

        self.mlflow = mlflow
        mlflow.start_run(run_name=run_name)
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.mlflow.log_metrics(dict(metrics), step=step)

    def close(self) -> None:
        self.mlflow.end_run()


class WandB(Tracker):
    def __init__(self, run_name: str, params: Mapping[str, Any]) -> None:
        import wandb

        self.run = wandb.init(project="socratic-distill", name=run_name, config=dict(params))

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


def open_tracker(kind: str, *, log_dir: str, run_name: str, params: Mapping[str, Any]) -> Tracker:
    check_tracker(kind)
    if kind == "tensorboard":
        return TensorBoard(log_dir)
    if kind == "mlflow":
        return MLflow(run_name, params)
    if kind == "wandb":
        return WandB(run_name, params)
    return Tracker()
