"""Annotation Parquet to token batches: real Parquet files, the real tiny tokenizer, no mocks."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from socratic.adapters import DatasetSpec, load_problems
from socratic.formats import Example, examples_for
from socratic.records import ACCEPTED, REJECTED, Step, annotation_row, annotation_table
from trainers.data import (
    IGNORE_INDEX,
    absolute_positions,
    batches,
    build_examples,
    collate,
    padding_fraction,
    read_accepted,
    shard,
    tokenize,
    train_position_ids,
)

SAMPLE = list(load_problems(DatasetSpec("sample", split="all")))


def _row(
    problem, *, sample=0, status=ACCEPTED, reason=None, steps=None, style="socratic", raw=None
):
    steps = problem.steps if steps is None else steps
    return annotation_row(
        problem,
        sample=sample,
        teacher="test-teacher",
        prompt_version="v1",
        style=style,
        cache_key=f"{problem.id}/{sample}",
        steps=steps,
        predicted=problem.answer if status == ACCEPTED else None,
        status=status,
        reason=reason,
        raw=raw,
    )


def _write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(annotation_table(rows), path)
    return path


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


# --- read_accepted ---------------------------------------------------------------------------


def test_read_accepted_from_folder_file_and_list(tmp_path: Path) -> None:
    a, b = SAMPLE[:5], SAMPLE[5:8]
    rejected = _row(SAMPLE[9], status=REJECTED, reason="wrong_answer")
    _write(tmp_path / "run" / "part-0.parquet", [_row(p) for p in a] + [rejected])
    _write(tmp_path / "run" / "nested" / "part-1.parquet", [_row(p) for p in b])
    (tmp_path / "run" / "summary.json").write_text("{}")  # beside the Parquet; ignored

    rows = read_accepted(str(tmp_path / "run"))  # files in path order: nested/ sorts first
    assert [r["id"] for r in rows] == [p.id for p in b + a]
    assert all(r["status"] == ACCEPTED for r in rows)
    assert rows[0]["steps"] == [s.to_dict() for s in b[0].steps]

    single = read_accepted(str(tmp_path / "run" / "nested" / "part-1.parquet"))
    assert [r["id"] for r in single] == [p.id for p in b]

    other = _write(tmp_path / "other.parquet", [_row(SAMPLE[0], sample=1)])
    both = read_accepted([str(tmp_path / "run"), str(other)])
    assert len(both) == len(rows) + 1
    assert [(r["id"], r["sample"]) for r in both][-1] == (SAMPLE[0].id, 1)


def test_read_accepted_takes_a_file_uri(tmp_path: Path) -> None:
    _write(tmp_path / "run" / "part-0.parquet", [_row(p) for p in SAMPLE[:3]])
    assert len(read_accepted(f"file://{tmp_path / 'run'}")) == 3


def test_missing_path_is_named(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=f"not found: {missing}"):
        read_accepted([str(_write(tmp_path / "ok.parquet", [_row(SAMPLE[0])])), missing])


def test_empty_folder_and_zero_row_file(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=f"{tmp_path / 'empty'}: no annotation rows"):
        read_accepted(str(tmp_path / "empty"))
    zero = _write(tmp_path / "zero" / "part-0.parquet", [])
    with pytest.raises(ValueError, match=f"{zero}: no annotation rows"):
        read_accepted(str(zero))
    with pytest.raises(ValueError, match=f"{tmp_path / 'zero'}: no annotation rows"):
        read_accepted(str(tmp_path / "zero"))


def test_only_rejected_rows_lists_reasons(tmp_path: Path) -> None:
    reasons = ["wrong_answer"] * 3 + ["unparseable"] * 2 + ["api_error: 429: slow down"] * 2
    rows = [
        _row(p, status=REJECTED, reason=r, steps=()) for p, r in zip(SAMPLE, reasons, strict=False)
    ]
    path = _write(tmp_path / "bad" / "part-0.parquet", rows)
    with pytest.raises(ValueError) as err:
        read_accepted(str(path.parent))
    msg = str(err.value)
    assert msg.startswith(f"{path.parent}: none of the 7 rows is accepted")
    assert "wrong_answer 3" in msg and "unparseable 2" in msg and "api_error: 429 2" in msg
    assert "slow down" not in msg


def test_wrong_schema_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "x" / "not-annotations.parquet"
    path.parent.mkdir()
    pq.write_table(pa.table({"id": ["a"], "steps": [1]}), path)
    with pytest.raises(ValueError, match=f"{path}: not an annotation table: .*missing column"):
        read_accepted(str(tmp_path / "x"))


def test_non_parquet_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"id": 1}\n')
    with pytest.raises(ValueError, match=f"{path}: not a readable Parquet file"):
        read_accepted(str(path))


# --- build_examples ----------------------------------------------------------------------------


def _accepted_rows(problems) -> list[dict]:
    return [_row(p) for p in problems]


def test_decomposer_and_unified_one_example_per_row() -> None:
    rows = _accepted_rows(SAMPLE[:6])
    for role in ("decomposer", "unified", "answer"):
        examples, stats = build_examples(rows, role)
        assert (stats.rows, stats.examples, stats.skipped) == (6, 6, 0)
        p = SAMPLE[0]
        want = examples_for(role, problem=p.question, steps=p.steps, answer=p.answer)
        assert examples[0] == want[0]


def test_solver_gets_one_example_per_step() -> None:
    rows = _accepted_rows(SAMPLE[:6])
    examples, stats = build_examples(rows, "solver")
    assert stats.examples == len(examples) == sum(len(p.steps) for p in SAMPLE[:6])
    first = SAMPLE[0]
    assert examples[1].prompt.endswith(f"Q2: {first.steps[1].question}\n")
    assert examples[1].target == f"A2: {first.steps[1].answer}"


def test_teacher_samples_of_one_problem_are_all_kept() -> None:
    p = SAMPLE[0]
    rows = [_row(p, sample=0), _row(p, sample=1, steps=[Step("What is it?", "It is 14")])]
    examples, _ = build_examples(rows, "decomposer")
    assert len(examples) == 2 and examples[0] != examples[1]


def test_cot_from_cot_raw_and_from_steps() -> None:
    p = SAMPLE[1]
    raw = "First, 2+1 = <<2+1=3>>3.\n\nSo it is 3.\nAnswer: 3"
    cot_row = _row(p, style="cot", steps=(), raw=raw)
    (ex,), stats = build_examples([cot_row], "cot")
    assert stats.skipped == 0
    assert ex.target == f"First, 2+1 = <<2+1=3>>3.\nSo it is 3.\nAnswer: {p.answer}"

    (ex,), _ = build_examples([_row(p)], "cot")
    lines = ex.target.splitlines()
    assert lines[:-1] == [s.answer for s in p.steps]
    assert lines[-1] == f"Answer: {p.answer}"


def test_rows_that_cannot_format_are_skipped_and_counted() -> None:
    cot_row = _row(SAMPLE[1], style="cot", steps=(), raw="2+1 = 3\nAnswer: 3")
    blank_q = _row(SAMPLE[2], steps=[Step("  ", "4")])
    rows = [*_accepted_rows(SAMPLE[:3]), cot_row, blank_q]
    examples, stats = build_examples(rows, "decomposer")
    assert (stats.rows, stats.examples, stats.skipped) == (5, 3, 2)
    assert len(examples) == 3
    assert sum(stats.skip_reasons.values()) == 2
    assert "sub-question 1 is empty" in stats.skip_reasons

    _, solver_stats = build_examples(rows, "solver")
    assert solver_stats.skipped == 2
    empty_cot = _row(SAMPLE[1], style="cot", steps=(), raw="Answer: 3")
    _, cot_stats = build_examples([cot_row, empty_cot], "cot")
    assert (cot_stats.examples, cot_stats.skipped) == (1, 1)

    with pytest.raises(ValueError, match="unknown role"):
        build_examples(rows, "critic")


def test_a_shared_student_gets_every_part_roles_examples() -> None:
    """`decomposer+solver`: the union of both roles' examples, packed where each part is."""
    blank_q = _row(SAMPLE[2], steps=[Step("  ", "4")])
    rows = iter([*_accepted_rows(SAMPLE[:3]), blank_q])  # read once per part: a list inside
    examples, stats = build_examples(rows, "decomposer+solver", packed=True)
    rows = [*_accepted_rows(SAMPLE[:3]), blank_q]
    want = build_examples(rows, "decomposer")[0] + build_examples(rows, "solver", packed=True)[0]
    assert examples == want
    assert (stats.role, stats.rows, stats.examples, stats.skipped) == (
        "decomposer+solver", 4, len(want), 2)  # fmt: skip
    with pytest.raises(ValueError, match="unknown role 'critic'"):
        build_examples(rows, "decomposer+critic")


def test_train_config_takes_shared_students_and_refuses_a_role_twice() -> None:
    from trainers.config import TrainConfig, roles_of

    cfg = TrainConfig(data="d", base_model="m", roles="decomposer+solver, cot",
                      role_scaling={"decomposer+solver": {"num_workers": 1}})  # fmt: skip
    assert cfg.role_list == ["decomposer+solver", "cot"]
    assert roles_of(cfg.role_list[0]) == ("decomposer", "solver")
    assert cfg.scaling_for("decomposer+solver").num_workers == 1
    with pytest.raises(ValueError, match="names a role twice"):
        TrainConfig(data="d", base_model="m", roles="decomposer+solver,solver")
    with pytest.raises(ValueError, match="'\\+' joins roles"):
        TrainConfig(data="d", base_model="m", roles="decomposer+solvr")


# --- tokenize ----------------------------------------------------------------------------------


def _sample_examples(role: str) -> list[Example]:
    examples, _ = build_examples(_accepted_rows(SAMPLE), role)
    return examples


@pytest.mark.parametrize("role", ["decomposer", "solver", "unified", "cot", "answer"])
def test_labels_cover_exactly_the_target(tokenizer, role: str) -> None:
    examples = _sample_examples(role)
    data = tokenize(examples, tokenizer, max_length=4096)
    assert (data.examples, len(data), data.truncated, data.dropped) == (len(examples),) * 2 + (0, 0)
    eos = tokenizer.eos_token_id
    for ex, (ids, labels) in zip(examples, (data[i] for i in range(len(data))), strict=True):
        n_prompt = len(tokenizer.encode(ex.prompt, add_special_tokens=False))
        assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert IGNORE_INDEX not in labels[n_prompt:]
        assert labels[n_prompt:] == ids[n_prompt:]
        assert ids[-1] == labels[-1] == eos
        assert tokenizer.decode(labels[n_prompt:-1]) == ex.target
        # the formats' promise: apart is the same as together
        assert ids[:-1] == tokenizer.encode(ex.prompt + ex.target, add_special_tokens=False)
    assert data.tokens == sum(data.lengths)
    assert data.target_tokens == sum(sum(x != IGNORE_INDEX for x in lab) for lab in data.labels)


def test_truncation_cuts_the_prompt_start_and_keeps_the_target(tokenizer) -> None:
    ex = _sample_examples("solver")[3]
    p = tokenizer.encode(ex.prompt, add_special_tokens=False)
    t = tokenizer.encode(ex.target, add_special_tokens=False) + [tokenizer.eos_token_id]
    assert len(p) > 20
    data = tokenize([ex], tokenizer, max_length=len(t) + 12, min_prompt_tokens=8)
    assert (data.truncated, data.dropped, len(data)) == (1, 0, 1)
    ids, labels = data[0]
    assert ids == p[-12:] + t
    assert labels == [IGNORE_INDEX] * 12 + t
    assert tokenizer.decode(ids).endswith(ex.target + tokenizer.eos_token)


def test_examples_that_cannot_fit_are_dropped_and_counted(tokenizer) -> None:
    examples = _sample_examples("decomposer")[:4]
    t0 = len(tokenizer.encode(examples[0].target, add_special_tokens=False)) + 1
    longest_t = max(len(tokenizer.encode(e.target, add_special_tokens=False)) + 1 for e in examples)
    data = tokenize(examples, tokenizer, max_length=t0 + 7, min_prompt_tokens=8)
    assert data.dropped >= 1 and data.examples == 4
    assert len(data) == 4 - data.dropped
    assert all(len(ids) <= t0 + 7 for ids in data.input_ids)
    assert tokenize(examples, tokenizer, max_length=longest_t + 8).dropped == 0


def test_tokenize_rejects_a_tokenizer_without_eos(tokenizer) -> None:
    class NoEos:
        eos_token_id = None

    with pytest.raises(ValueError, match="EOS"):
        tokenize(_sample_examples("answer"), NoEos(), max_length=64)


# --- batches -----------------------------------------------------------------------------------

lengths_st = st.lists(st.integers(1, 512), min_size=0, max_size=300)


@settings(max_examples=150, deadline=None)
@given(lengths_st, st.integers(1, 16), st.integers(0, 2**31), st.integers(0, 50), st.booleans())
def test_batches_cover_every_index_once(lengths, bs, seed, epoch, group) -> None:
    out = batches(lengths, bs, seed=seed, epoch=epoch, group_by_length=group)
    flat = [i for b in out for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    assert all(1 <= len(b) <= bs for b in out)
    assert len(out) == -(-len(lengths) // bs)  # only the last batch may be short
    assert sum(len(b) < bs for b in out) <= 1
    assert out == batches(lengths, bs, seed=seed, epoch=epoch, group_by_length=group)


@settings(max_examples=100, deadline=None)
@given(
    st.integers(20, 300).flatmap(
        lambda n: st.tuples(
            st.lists(st.integers(1, 512), min_size=n, max_size=n), st.integers(1, n // 4)
        )
    ),
    st.integers(0, 2**31),
    st.booleans(),
)
def test_batches_change_with_the_epoch(lengths_bs, seed, group) -> None:
    lengths, bs = lengths_bs
    a = batches(lengths, bs, seed=seed, epoch=0, group_by_length=group)
    b = batches(lengths, bs, seed=seed, epoch=1, group_by_length=group)
    assert a != b


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(1, 512), min_size=0, max_size=400),
    st.integers(1, 16),
    st.integers(0, 2**31),
)
def test_grouping_never_pads_more(lengths, bs, seed) -> None:
    """Per draw, not just on average: each window is cut optimally from the same examples."""
    grouped = padding_fraction(lengths, batches(lengths, bs, seed=seed, epoch=0))
    plain = batches(lengths, bs, seed=seed, epoch=0, group_by_length=False)
    assert grouped <= padding_fraction(lengths, plain) + 1e-12


@pytest.mark.parametrize("lengths", [[1, 2, 1], [1, 10, 10], [10] * 16 + [1], [1] * 16 + [10]])
def test_the_short_batch_goes_where_it_pads_least(lengths) -> None:
    bs = 2 if len(lengths) == 3 else 16
    best = min(
        padding_fraction(lengths, batches(lengths, bs, seed=s, epoch=0, group_by_length=False))
        for s in range(200)
    )
    assert padding_fraction(lengths, batches(lengths, bs, seed=0, epoch=0)) == pytest.approx(best)


def test_grouping_pads_much_less_on_spread_lengths() -> None:
    import random

    rng = random.Random(0)
    lengths = [rng.randint(20, 400) for _ in range(2000)]
    grouped = padding_fraction(lengths, batches(lengths, 8, seed=0, epoch=0))
    plain = padding_fraction(lengths, batches(lengths, 8, seed=0, epoch=0, group_by_length=False))
    assert grouped < 0.05 < 0.3 < plain


def test_padding_fraction_by_hand() -> None:
    assert padding_fraction([2, 4, 3], [[0, 1], [2]]) == pytest.approx(2 / 11)
    assert padding_fraction([], []) == 0.0


# --- shard -------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 60), st.integers(1, 8))
def test_shard_gives_every_rank_the_same_count(n_batches, world) -> None:
    order = batches([1] * (n_batches * 3), 3, seed=0, epoch=0)
    parts = [shard(order, r, world) for r in range(world)]
    assert len({len(p) for p in parts}) == 1
    dealt = sorted(map(tuple, (b for p in parts for b in p)))
    if n_batches >= world:
        kept = n_batches - n_batches % world
        assert len(parts[0]) == kept // world
        assert dealt == sorted(map(tuple, order[:kept]))
    elif n_batches:
        assert len(parts[0]) == 1  # repeated so every rank steps once
        assert set(dealt) == set(map(tuple, order))
    else:
        assert dealt == []


def test_shard_rejects_a_bad_rank() -> None:
    with pytest.raises(ValueError, match="rank 2"):
        shard([[0]], 2, 2)


# --- collate -----------------------------------------------------------------------------------


def test_collate_right_pads() -> None:
    seqs = [([5, 6, 7], [-100, 6, 7]), ([8], [8]), ([1, 2, 3, 4, 5], [-100, -100, 3, 4, 5])]
    out = collate(seqs, pad_token_id=0)
    assert set(out) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.long and t.shape == (3, 5) for t in out.values())
    assert out["input_ids"][1].tolist() == [8, 0, 0, 0, 0]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1] * 5]
    assert out["labels"][0].tolist() == [-100, 6, 7, -100, -100]
    assert out["labels"][2].tolist() == [-100, -100, 3, 4, 5]


def test_collate_feeds_the_tiny_model(tiny_model_dir, tokenizer) -> None:
    """The end of the chain: a batch the real model computes a finite loss on."""
    from transformers import AutoModelForCausalLM

    data = tokenize(_sample_examples("solver"), tokenizer, max_length=256)
    idx = batches(data.lengths, 4, seed=0, epoch=0)[0]
    batch = collate([data[i] for i in idx], tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    loss = model(**batch).loss
    assert torch.isfinite(loss)


# --- the iterative decomposer (--decomposer-form iterative) -------------------------------------


def test_iterative_decomposer_one_example_per_step_and_the_end_or_one_packed_sequence(
    tokenizer,
) -> None:
    from socratic.formats import END, SolverSequence

    rows = _accepted_rows(SAMPLE[:6])
    per, stats = build_examples(rows, "decomposer", decomposer_form="iterative")
    assert stats.examples == len(per) == sum(len(p.steps) + 1 for p in SAMPLE[:6])
    assert per[len(SAMPLE[0].steps)].target == END
    packed, stats = build_examples(rows, "decomposer", packed=True, decomposer_form="iterative")
    assert stats.examples == len(packed) == 6 and isinstance(packed[0], SolverSequence)
    assert [ex for seq in packed for ex in seq.examples()] == per
    # packed, the loss is on the same targets, each in its own context, at fewer tokens
    apart, together = tokenize(per, tokenizer, 4096), tokenize(packed, tokenizer, 4096)
    assert together.examples == apart.examples == len(per)
    assert together.target_tokens == apart.target_tokens and together.tokens < apart.tokens
    # "all" (the default) and the solver are unchanged by the option
    assert build_examples(rows, "decomposer")[0] == build_examples(
        rows, "decomposer", packed=True, decomposer_form="all")[0]  # fmt: skip
    assert build_examples(rows, "solver", decomposer_form="iterative")[0] == build_examples(
        rows, "solver")[0]  # fmt: skip


def test_decomposer_form_option_and_its_fingerprint(tokenizer, tmp_path: Path) -> None:
    from dataclasses import replace

    from socratic.config import parse_config
    from trainers.config import TrainConfig
    from trainers.loop import fingerprint_changes, run_fingerprint

    base = ["--data", "d.parquet", "--base-model", "gpt2"]
    assert parse_config(TrainConfig, base).decomposer_form == "all"
    cfg = parse_config(TrainConfig, [*base, "--decomposer-form", "iterative"])
    assert cfg.decomposer_form == "iterative"
    with pytest.raises(SystemExit):
        parse_config(TrainConfig, [*base, "--decomposer-form", "each"])
    with pytest.raises(ValueError, match="--decomposer-form must be one of all, iterative"):
        replace(cfg, decomposer_form="each")
    rows = _accepted_rows(SAMPLE[:3])
    fp = {
        form: {role: run_fingerprint(replace(cfg, decomposer_form=form), role, rows, tokenizer)
               for role in ("decomposer", "solver")}  # fmt: skip
        for form in ("all", "iterative")
    }
    # "all" records nothing new, so a checkpoint written before the option still resumes
    assert fp["all"]["decomposer"]["decomposer_form"] is None
    assert fp["iterative"]["decomposer"]["decomposer_form"] == "iterative"
    assert fingerprint_changes(fp["all"]["decomposer"], fp["iterative"]["decomposer"])
    assert not fingerprint_changes(fp["all"]["solver"], fp["iterative"]["solver"])
    old = {k: v for k, v in fp["all"]["decomposer"].items() if k != "decomposer_form"}
    assert not fingerprint_changes(old, fp["all"]["decomposer"])


def test_the_quality_study_plans_the_iterative_decomposer_on_what_the_trainer_trains() -> None:
    """Its budget is tokens: steps come from the packed sequences the trainer really builds."""
    from pipelines.quality import train_examples

    rows = _accepted_rows(SAMPLE[:6])
    packed, _ = build_examples(rows, "decomposer", packed=True, decomposer_form="iterative")
    assert train_examples(SAMPLE[:6], "decomposer", "iterative") == packed
    assert train_examples(SAMPLE[:6], "decomposer") == build_examples(rows, "decomposer")[0]


def _mask(*lengths: int) -> torch.Tensor:
    width = max(lengths)
    return torch.tensor([[1] * n + [0] * (width - n) for n in lengths])


def test_contiguous_training_positions_leave_the_model_its_own() -> None:
    assert train_position_ids(_mask(5, 3), "contiguous", 2.0) is None


@pytest.mark.parametrize("how", ["random-gaps", "stretch"])
def test_drawn_positions_increase_stay_in_range_and_reach_past_the_row(how: str) -> None:
    torch.manual_seed(0)
    lengths = (40, 17, 1)
    reach, gaps_of_one = 0, 0
    for _ in range(50):
        pos = train_position_ids(_mask(*lengths), how, 2.0)
        assert pos is not None and pos.dtype == torch.long and pos.shape == (3, 40)
        for row, n in enumerate(lengths):
            p = pos[row]
            assert bool((p[1:] > p[:-1]).all()), p  # increasing, padding included
            assert int(p[:n].max()) < max(n, int(2.0 * n)), (how, p)
            reach = max(reach, int(p[n - 1] - p[0]) - (n - 1))
            gaps_of_one += int((p[1:n] - p[: n - 1] == 1).sum())
    assert reach > 10  # distances longer than the row itself are trained
    assert gaps_of_one > 0  # and so are the contiguous neighbours inference uses


def test_drawn_positions_stay_under_an_absolute_position_table() -> None:
    from transformers import GPT2Config, LlamaConfig

    limit = absolute_positions(GPT2Config(n_positions=48))
    assert limit == 48 and absolute_positions(LlamaConfig()) is None
    torch.manual_seed(1)
    for how in ("random-gaps", "stretch"):
        for _ in range(20):
            pos = train_position_ids(_mask(40, 30), how, 3.0, limit)
            assert int(pos.max()) < 48, how
    with pytest.raises(ValueError, match="exceeds the model's 48 positions"):
        train_position_ids(_mask(60), "random-gaps", 2.0, limit)


def test_bad_position_settings_are_refused_by_name() -> None:
    from trainers.config import TrainConfig

    with pytest.raises(ValueError, match="random-gaps"):
        train_position_ids(_mask(4), "shuffled", 2.0)
    with pytest.raises(ValueError, match=">= 1"):
        train_position_ids(_mask(4), "stretch", 0.5)
    with pytest.raises(ValueError, match="--position-factor"):
        TrainConfig(data="d", base_model="m", position_factor=0.9)
    with pytest.raises(ValueError, match="--train-positions"):
        TrainConfig(data="d", base_model="m", train_positions="shuffled")


def test_a_share_of_rows_keeps_the_plain_positions() -> None:
    torch.manual_seed(2)
    plain = drawn = 0
    for _ in range(40):
        pos = train_position_ids(_mask(12, 12, 12, 12), "stretch", 3.0, share=0.5)
        for row in pos:
            if torch.equal(row, torch.arange(12)):
                plain += 1
            else:
                drawn += 1
    assert plain > 40 and drawn > 40  # about half each (160 rows; a stretch of ~1 is rare)
    assert train_position_ids(_mask(12), "stretch", 3.0, share=0.0).equal(torch.arange(12)[None])
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        train_position_ids(_mask(4), "stretch", 2.0, share=1.5)
