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
