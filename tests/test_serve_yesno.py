"""Every dataset over HTTP: a student trained on yes/no data (StrategyQA's kind) through the
real trainer answers `yes` / `no`, read from its last step exactly as evaluation reads it."""

from __future__ import annotations

import json
import socket
import urllib.request
from pathlib import Path

import pytest

from socratic.answers import extract_answer
from socratic.records import Problem, Step
from tests.support.annotations import write_gold_annotations
from tests.support.tiny_model import build_tiny_model, sample_texts


def _yesno_problems() -> list[Problem]:
    """Small StrategyQA-shaped problems: two sub-questions, a yes/no answer in the last step."""
    out = []
    for i, (a, b) in enumerate([(7, 3), (2, 9), (12, 5), (4, 8), (15, 6), (1, 11), (9, 2),
                                (3, 13), (20, 7), (6, 14), (18, 4), (5, 17)]):  # fmt: skip
        yes = a > b
        word = "yes" if yes else "no"
        out.append(
            Problem(
                id=f"yesno/train/{i}",
                dataset="yesno",
                split="train",
                question=f"Does a box of {a} eggs hold more eggs than a box of {b} eggs?",
                answer=word,
                steps=(
                    Step(f"Is {a} more than {b}?", f"{word.capitalize()}."),
                    Step("Does the first box hold more eggs?", f"So the answer is {word}."),
                ),
            )
        )
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_yesno_student_answers_yes_or_no_over_http(ray_cluster, tmp_path: Path) -> None:
    from ray import serve

    from serve.app import build_app
    from socratic.formats import examples_for
    from trainers.config import TrainConfig
    from trainers.train import run

    problems = _yesno_problems()
    data = write_gold_annotations(problems, tmp_path / "ann")
    # The tiny student's tokenizer also learns these texts, so `yes` / `no` are single tokens.
    texts = sample_texts() + [
        ex.prompt + ex.target
        for p in problems
        for role in ("decomposer", "solver")
        for ex in examples_for(role, problem=p.question, steps=p.steps)
    ]
    base = build_tiny_model(tmp_path / "base", texts)
    cfg = TrainConfig(
        data=str(data), base_model=str(base), output=str(tmp_path / "students"),
        storage_path=str(tmp_path / "ray_results"), run_name="yesno", max_length=128,
        micro_batch_size=4, lr=3e-3, warmup_steps=2, max_steps=60, checkpoint_every=60,
        log_every=20, num_workers=1,
    )  # fmt: skip
    exports = {r["role"]: r["export"] for r in run(cfg)}

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 60})
    small = {"ray_actor_options": {"num_cpus": 0.25}}
    app = build_app({
        "decomposer": exports["decomposer"], "solver": exports["solver"], "max_new_tokens": 40,
        "num_threads": 1, "answer_kind": "yesno",
        "decomposer_options": small, "solver_options": small,
    })  # fmt: skip
    serve.run(app, name="yesno", route_prefix="/")
    try:
        for p in problems[:3]:
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/solve",
                data=json.dumps({"problem": p.question}).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(req, timeout=120) as r:
                out = json.load(r)
            assert out["answer"] in ("yes", "no"), out
            assert out["answer"] == extract_answer(out["steps"][-1]["answer"], "yesno")
    finally:
        serve.shutdown()
