"""Shared fixtures: a real local Ray cluster and a tiny student model directory.

Later stages (annotation, training, serving) test against these, never against mocks of our
own system (DEVELOPERS.md "Standards").
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.tiny_model import build_tiny_model, sample_texts

# Tests run a throwaway single-machine cluster: Ray 2.60's token auth only adds a file under
# ~/.ray here. Production clusters keep it on (see cluster/).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

RAY_TEST_CPUS = int(os.environ.get("SOCRATIC_TEST_RAY_CPUS", "4"))


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole test session (start-up costs ~4 s, so share it).

    Logical CPUs exceed the 2 physical cores on purpose: a 2-worker training run plus its
    trainer, or Serve's controller and proxy beside replicas, must all be schedulable.
    """
    import ray

    ctx = ray.init(
        address="local",
        num_cpus=RAY_TEST_CPUS,
        log_to_driver=True,
        configure_logging=False,
    )
    try:
        yield ctx
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain HF model dir (tiny GPT-2 + BPE trained on the bundled sample's formatted text)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), sample_texts())


@pytest.fixture(scope="session")
def one_rank():
    """A one-process gloo group, as Ray Train sets up in each worker, for the whole session.

    One group, never re-created: DeepSpeed caches a clone of the world group
    (`deepspeed.utils.groups._WORLD_GROUP`), so an engine built after a second
    `init_process_group` broadcasts over the destroyed first group and fails
    ("Group ... is not registered"), which is what two module-scoped groups did in CI.
    """
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0",
           "WORLD_SIZE": "1", "LOCAL_RANK": "0", "DS_ACCELERATOR": "cpu"}  # fmt: skip
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    dist.init_process_group("gloo", rank=0, world_size=1)
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    try:
        yield
    finally:
        dist.destroy_process_group()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
