"""The quality benchmark's report: target lines the dashboard reads, intervals, per-seed spread."""

from __future__ import annotations

import re

import pytest

from pipelines.quality import (
    QualityConfig,
    entries,
    table,
    target_lines,
    wall_line,
)
from socratic.stats import wilson_interval

# check_targets.py's own pattern (../shared/tools): NAME: VALUE (target OP THRESHOLD: VERDICT)
TARGET = re.compile(
    r"^\s*(?P<name>.*):\s*(?P<value>[-+]?[0-9]*\.?[0-9]+)\s*(?P<unit>%|x|ms|s)?\s*"
    r"\(target\s*(?P<op>>=|<=|>|<|=)\s*(?P<thr>[-+]?[0-9]*\.?[0-9]+)\s*(%|x|ms|s)?\s*:\s*"
    r"(?P<verdict>MET|MISSED|NOT MET)\)\s*$"
)


def _row(method: str, correct: int, calculator: bool | None = True) -> dict:
    return {"method": method, "calculator": calculator, "correct": correct, "problems": 100,
            "accuracy": float(correct), "ci95": list(wilson_interval(correct, 100)),
            "tokens_per_problem": 50.0}  # fmt: skip


def _evals(pair: int, split: int, unified: int, cot: int, longer: int) -> dict:
    return {
        "in-length": {"problems": 100, "results": [
            _row("iterative", pair), _row("iterative-split", split), _row("unified", unified),
            _row("cot", cot), _row("answer", 5, None)]},
        "longer": {"problems": 100, "results": [_row("iterative", longer), _row("cot", 1)]},
    }  # fmt: skip


def test_target_lines_compare_the_pair_with_the_best_one_model_method() -> None:
    cfg = QualityConfig(budget="both")
    assert [e.key for e in entries(cfg)] == ["iterative", "iterative-split", "unified", "cot",
                                             "answer"]  # fmt: skip
    lines, figures = target_lines(cfg, _evals(pair=92, split=50, unified=84, cot=96, longer=2))
    lines.append(wall_line(916.4))
    targets = {m["name"].strip(): m for line in lines if (m := TARGET.match(line))}
    assert set(targets) == {
        "Socratic, calculator on, in-length test",
        "Socratic minus best one-model step-by-step method, equal budget per student, in points",
        "Socratic, calculator on, longer test",
        "run wall time",
    }
    gap = targets["Socratic minus best one-model step-by-step method, equal budget per student, "
                  "in points"]  # fmt: skip
    assert (float(gap["value"]), gap["verdict"]) == (-4.0, "MISSED")  # CoT is the best: 96
    assert targets["Socratic, calculator on, in-length test"]["verdict"] == "MET"
    assert targets["run wall time"]["verdict"] == "MISSED"
    assert figures["best_one_model_method"] == "cot"
    assert figures["socratic_per_method_minus_best_one_model_points"] == -46.0
    # lines without a target never look like one to the dashboard
    assert not [x for x in lines if "no target" in x and TARGET.match(x)]


def test_the_table_shows_intervals_and_costs_per_budget_setting() -> None:
    cfg = QualityConfig(budget="both", calculator="on")
    costs = {"iterative": {"training_tokens": 3_000_000}, "unified": {"training_tokens": 1_500_000}}
    md = table(cfg, _evals(pair=92, split=50, unified=84, cot=96, longer=2), costs)
    pair = next(x for x in md.splitlines() if "budget per student" in x)
    assert "92.0 [85.0, 95.9] (92/100)" in pair and "3.00 M" in pair and "| 50 |" in pair
    assert any("budget per method" in x and "50.0 [40.4, 59.6]" in x for x in md.splitlines())


def test_seeds_are_read_once_and_a_bad_list_is_refused() -> None:
    import pytest

    assert QualityConfig(seed=3).seed_list == [3]
    assert QualityConfig(seeds="0, 1,2").seed_list == [0, 1, 2]
    with pytest.raises(ValueError, match="--seeds: expected comma-separated integers"):
        QualityConfig(seeds="0,one").seed_list  # noqa: B018


def test_a_sweep_lever_that_sets_the_recipe_s_own_value_is_the_same_run() -> None:
    from dataclasses import replace

    from pipelines.quality import SWEEP, same_run

    cfg = QualityConfig()  # trains on 8 000 problems by default
    for name, same in (("8000 training problems", True), ("2000 training problems", False),
                       ("500 training problems", False), ("recipe", True),
                       ("deeper, same parameters (6 x 96)", False),
                       ("training positions: the model's own (contiguous)", False),
                       ("training positions: stretched on every row", False),
                       ("one set of weights for both roles (pair weights flipped: separate <-> "
                        "shared)", False)):  # fmt: skip
        assert same_run(replace(cfg, **SWEEP[name](cfg)), cfg) is same, name
    assert same_run(replace(cfg, dataset_config="n_train=8000,n_train=8000"), cfg)
    # auto positions are compared as what they run: stretched from scratch, plain otherwise
    assert same_run(replace(cfg, train_positions="stretch"), cfg)
    pretrained = replace(cfg, base_model="some/model")
    assert same_run(replace(pretrained, train_positions="contiguous"), pretrained)
    assert not same_run(replace(pretrained, train_positions="stretch"), pretrained)


def test_training_positions_resolve_by_student_and_bad_values_are_refused() -> None:
    assert QualityConfig().positions == "stretch"  # students from scratch
    assert QualityConfig(base_model="some/model").positions == "contiguous"  # pretrained
    assert QualityConfig(train_positions="random-gaps").positions == "random-gaps"
    with pytest.raises(ValueError, match="--position-factor"):
        QualityConfig(position_factor=0.5)
    with pytest.raises(ValueError, match="--position-share"):
        QualityConfig(position_share=2.0)


def test_on_policy_solver_data_needs_a_separate_all_at_once_decomposer() -> None:
    assert QualityConfig(solver_data="on-policy").on_policy_share == 0.5
    for bad in ({"pair_weights": "shared"}, {"decomposer_form": "iterative"}):
        with pytest.raises(ValueError, match="decomposer trained before the solver"):
            QualityConfig(solver_data="on-policy", **bad)
    with pytest.raises(ValueError, match="--on-policy-share"):
        QualityConfig(solver_data="on-policy", on_policy_share=0.0)
    QualityConfig(on_policy_share=0.0)  # only read with --solver-data on-policy


def test_the_students_alone_table_shows_the_decomposer_s_misses_by_kind() -> None:
    from pipelines.quality import diagnostics_table
    from socratic.diagnose import MISS_KINDS

    def share(hits: int, n: int = 100) -> dict:
        return {"correct": hits, "total": n, "accuracy": float(hits),
                "ci95": list(wilson_interval(hits, n))}  # fmt: skip

    dec = {"count_right": share(100), "question_right": share(92), "gold_solver_pipeline":
           share(84), "misses": dict(zip(MISS_KINDS, (13, 7, 1, 2, 3), strict=True))}  # fmt: skip
    md = diagnostics_table({"iterative": {"in-length": {
        "solver": {"per_step": share(98), "per_problem": share(95)}, "decomposer": dec}}})
    row = next(x for x in md.splitlines() if "| in-length |" in x)
    assert row.endswith("| 84.0 [75.6, 89.9] | 13 / 7 / 6 |")
