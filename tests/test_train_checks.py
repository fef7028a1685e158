"""What training checks about what it trains on (issue #22 item 7), in seconds, without Ray Train.

- Resume: a checkpoint carries a fingerprint of its data, `max_length`, solver form and
  tokenizer; `trainers.loop.resume` refuses one where any changed and names each change.
  (`tests/test_train_runs.py` resumes for real with everything unchanged, and has the driver
  refuse a changed `--max-length` before any worker starts.)
- Loss: a model whose forward ignores `num_items_in_batch` (or does not take it) still steps on
  the token mean of the whole optimizer step, on a real one-rank DeepSpeed engine.
- Tokens: a tokenizer for which a prompt's tokens are not a prefix of prompt + target gets a
  warning, as TRL gives one.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from socratic.adapters import DatasetSpec, load_problems
from socratic.formats import Example, SolverSequence, solver_sequence
from tests.support.annotations import write_gold_annotations
from tests.support.tiny_model import build_tokenizer
from trainers.config import TrainConfig
from trainers.export import FINGERPRINT_FILE, STATE_FILE

SAMPLE = list(load_problems(DatasetSpec("sample", split="train")))


# --- resume fingerprint ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    from trainers.loop import load_tokenizer, split_rows

    tmp = tmp_path_factory.mktemp("fp")
    data = write_gold_annotations(SAMPLE, tmp / "gold")
    cfg = TrainConfig(data=str(data), base_model=str(tiny_model_dir), roles="solver",
                      max_length=256, num_workers=1)  # fmt: skip
    rows, _ = split_rows(cfg)
    return {"cfg": cfg, "rows": rows, "tokenizer": load_tokenizer(cfg.base_model), "tmp": tmp}


def _fingerprint(cfg, rows, tokenizer, role="solver"):
    from trainers.data import build_examples, tokenize
    from trainers.loop import run_fingerprint

    examples, _ = build_examples(rows, role, packed=cfg.solver_examples == "packed")
    train = tokenize(examples, tokenizer, cfg.max_length, check_boundaries=0)
    return run_fingerprint(cfg, role, rows, tokenizer, train=train)


def _checkpoint(d: Path, cfg: TrainConfig, fingerprint: dict | None) -> Path:
    """The files `resume` reads before DeepSpeed's: state (with the data order) and fingerprint."""
    from trainers.loop import _data_order

    d.mkdir(parents=True)
    state = {"step": 4, "tag": "step4", "tokens": 1, "data_order": _data_order(cfg, 1)}
    (d / STATE_FILE).write_text(json.dumps(state))
    if fingerprint is not None:
        (d / FINGERPRINT_FILE).write_text(json.dumps(fingerprint))
    return d


def _resume(d: Path, cfg: TrainConfig, fingerprint: dict):
    import ray.train

    from trainers.loop import resume

    return resume(None, ray.train.Checkpoint(str(d)), cfg, rank=0, world=1,
                  fingerprint=fingerprint)  # fmt: skip


def test_resume_refuses_a_changed_max_length_data_solver_form_or_tokenizer(setup) -> None:
    from trainers.loop import CheckpointError

    cfg, rows, tok = setup["cfg"], setup["rows"], setup["tokenizer"]
    saved = _fingerprint(cfg, rows, tok)
    d = _checkpoint(setup["tmp"] / "ckpt", cfg, saved)
    other_tok = build_tokenizer([ex for r in rows for ex in (r["question"],)], vocab_size=400)

    cases = {
        "--max-length: 256 -> 128": (replace(cfg, max_length=128), rows, tok),
        f"training data (--data; and --eval-fraction / --eval-data, which take problems out): "
        f"{len(rows)} rows": (cfg, rows[:-1], tok),
        "solver form (--solver-examples): 'packed' -> 'per-example'": (
            replace(cfg, solver_examples="per-example"), rows, tok,
        ),
        "tokenizer (--base-model)": (cfg, rows, other_tok),
    }  # fmt: skip
    for named, (c, r, t) in cases.items():
        with pytest.raises(CheckpointError) as e:
            _resume(d, c, _fingerprint(c, r, t))
        msg = str(e.value)
        assert str(d) in msg and named in msg and "fresh run" in msg, msg
        if r is not rows:  # the changed row count is shown, old -> new
            assert f"{len(rows)} rows" in msg and f"{len(rows) - 1} rows" in msg, msg
        assert "token sequences" not in msg, msg  # explained by the named field

    # Several changes at once: every one named; the role as well.
    both = replace(cfg, max_length=128, mask_calculator_results=True)
    with pytest.raises(CheckpointError) as e:
        _resume(d, both, _fingerprint(both, rows, tok, role="decomposer"))
    for named in ("role (--roles): 'solver' -> 'decomposer'", "--max-length: 256 -> 128",
                  "--mask-calculator-results: False -> True"):  # fmt: skip
        assert named in str(e.value), str(e.value)


def test_resume_with_the_same_fingerprint_passes_the_check(setup) -> None:
    """Past the fingerprint, `resume` goes on to the manifests: the fake checkpoint has none."""
    from trainers.loop import CheckpointError, fingerprint_changes

    cfg, rows, tok = setup["cfg"], setup["rows"], setup["tokenizer"]
    saved = _fingerprint(cfg, rows, tok)
    d = _checkpoint(setup["tmp"] / "same", cfg, saved)
    with pytest.raises(CheckpointError, match="incomplete"):
        _resume(d, cfg, _fingerprint(cfg, rows, tok))
    # A model dir that moved keeps its tokenizer: the name is shown, never compared.
    moved = json.loads(json.dumps(saved))
    moved["tokenizer"]["name"] = "/elsewhere/tiny"
    assert fingerprint_changes(moved, saved) == []
    # The solver form is no part of another role's data.
    dec = _fingerprint(cfg, rows, tok, role="decomposer")
    flipped = replace(cfg, solver_examples="per-example")
    assert fingerprint_changes(dec, _fingerprint(flipped, rows, tok, role="decomposer")) == []


def test_changed_sequences_alone_are_named(setup) -> None:
    """Same data and settings but other token sequences: the formats or tokenising code."""
    from trainers.loop import fingerprint_changes

    cfg, rows, tok = setup["cfg"], setup["rows"], setup["tokenizer"]
    saved = _fingerprint(cfg, rows, tok)
    now = json.loads(json.dumps(saved))
    now["sequences"]["sha256"] = "0" * 64
    (line,) = fingerprint_changes(saved, now)
    assert line.startswith("token sequences") and "formats" in line


def test_a_checkpoint_without_fingerprint_resumes_with_a_warning(setup, caplog) -> None:
    from trainers.loop import CheckpointError

    cfg, rows, tok = setup["cfg"], setup["rows"], setup["tokenizer"]
    d = _checkpoint(setup["tmp"] / "old", cfg, None)
    with (
        caplog.at_level(logging.WARNING, logger="trainers"),
        pytest.raises(CheckpointError, match="incomplete"),  # past the check, as above
    ):
        _resume(d, cfg, _fingerprint(cfg, rows, tok))
    assert f"no {FINGERPRINT_FILE}" in caplog.text, caplog.text


def test_data_fingerprint_follows_content_and_order(setup) -> None:
    from trainers.loop import data_fingerprint

    rows = setup["rows"]
    base = data_fingerprint(rows)
    edited = [dict(r) for r in rows]
    edited[3]["answer"] = edited[3]["answer"] + "0"
    assert data_fingerprint(edited)["sha256"] != base["sha256"]
    assert data_fingerprint(rows[::-1])["sha256"] != base["sha256"]
    costs = [dict(r, prompt_tokens=123, attempts=3) for r in rows]  # bookkeeping only
    assert data_fingerprint(costs) == base


# --- num_items_in_batch -------------------------------------------------------------------------

VOCAB, LR = 97, 1.0




def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=1, n_head=2,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    return GPT2LMHeadModel(cfg)


class DropsNumItems(torch.nn.Module):
    """A custom model that takes `**kwargs` and drops `num_items_in_batch`: its loss is the
    micro-batch mean."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = _gpt2()

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
        kwargs.pop("num_items_in_batch", None)
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


class NoLossKwargs(DropsNumItems):
    """An older model whose forward takes no `num_items_in_batch` and no `**kwargs`."""

    def forward(self, input_ids, attention_mask=None, labels=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


class Plain(DropsNumItems):
    """The same GPT-2, passing every keyword through (as transformers' models do)."""

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                          **kwargs)  # fmt: skip


def _micro_batches() -> list[dict[str, torch.Tensor]]:
    """Two micro-batches of 2 rows, targets of 2 to 40 tokens."""
    g = torch.Generator().manual_seed(1)
    out = []
    for micro in ([(3, 2), (5, 3)], [(4, 40), (9, 2)]):
        width = max(p + t for p, t in micro)
        ids = torch.randint(0, VOCAB, (len(micro), width), generator=g)
        labels = torch.full_like(ids, -100)
        mask = torch.zeros_like(ids)
        for row, (p, t) in enumerate(micro):
            labels[row, p : p + t] = ids[row, p : p + t]
            mask[row, : p + t] = 1
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def _reference() -> tuple[dict[str, torch.Tensor], float]:
    """GPT-2's weights after one SGD step on the token mean of both micro-batches together."""
    model = _gpt2()
    flat = _micro_batches()
    width = max(b["input_ids"].shape[1] for b in flat)

    def pad(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    big = {k: torch.cat([pad(b[k], -100 if k == "labels" else 0) for b in flat])
           for k in ("input_ids", "attention_mask", "labels")}  # fmt: skip
    loss = model(**big).loss
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= LR * p.grad
    return {k: v.detach() for k, v in model.state_dict().items()}, loss.item()


@pytest.mark.parametrize("model_cls", [Plain, DropsNumItems, NoLossKwargs])
def test_a_model_that_ignores_num_items_still_steps_on_the_token_mean(one_rank, model_cls):
    """Without the check, `DropsNumItems` steps on the sum of the two micro-batch means (about
    grad_accum times the gradient) and `NoLossKwargs` raises a TypeError."""
    import deepspeed

    from trainers.step import evaluate, loss_check, train_step

    model = model_cls()
    config = {
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
        "train_batch_size": 4, "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0,
    }  # fmt: skip
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR), config=config,
        dist_init_required=False,
    )  # fmt: skip
    before = {k: v.detach().clone() for k, v in engine.module.inner.state_dict().items()}
    stats = train_step(engine, _micro_batches(), engine.device)
    check = loss_check(engine)
    assert check.train_checked and check.own_loss == (model_cls is not Plain), check
    want, want_loss = _reference()
    assert stats.loss == pytest.approx(want_loss, rel=1e-5)
    got = engine.module.inner.state_dict()
    worst = 0.0
    for k, w in want.items():
        if k.endswith("attn.bias") or k.endswith("masked_bias"):
            continue
        step_want, step_got = w - before[k], got[k] - before[k]
        scale = step_want.abs().max().item() or 1.0
        worst = max(worst, (step_got - step_want).abs().max().item() / scale)
    assert worst < 1e-4, f"update differs from the big batch's by {worst:.2e} (relative)"

    # Evaluation sums token losses (num_items_in_batch = 1): checked on its first batch too.
    batches = _micro_batches()
    eval_loss = evaluate(engine, batches, engine.device)
    with torch.no_grad():
        ref = _gpt2()
        ref.load_state_dict(engine.module.inner.state_dict())
        total = sum(float(ref(**b).loss) * int((b["labels"][:, 1:] != -100).sum())
                    for b in batches)  # fmt: skip
        count = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    assert eval_loss == pytest.approx(total / count, rel=1e-5)


# --- token boundaries ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("packed", [False, True])
def test_prompt_tokens_that_are_not_a_prefix_give_a_warning(tokenizer, packed) -> None:
    """A prompt ending in a space: byte-level BPE merges " are" when the texts are joined."""
    from trainers.data import IGNORE_INDEX, TokenBoundaryWarning, tokenize

    pieces = ("How many apples ", "are there?")
    ex = SolverSequence(pieces) if packed else Example(*pieces)
    with pytest.warns(TokenBoundaryWarning, match="not a prefix of the tokens of prompt"):
        data = tokenize([ex], tokenizer, 64)
    # The labels stay exact: pieces are encoded apart, so the boundary is known.
    target = tokenizer("are there?", add_special_tokens=False)["input_ids"]
    labels = [t for t in data.labels[0] if t != IGNORE_INDEX]
    assert labels == [*target, tokenizer.eos_token_id]


def test_the_formats_pieces_meet_where_a_byte_level_bpe_cuts(tokenizer) -> None:
    """Every example of the sample, in every role and packed: no warning (prompts end in a
    newline). Only the first few are checked in training; here all of them."""
    from socratic.formats import ROLES, examples_for
    from trainers.data import check_token_boundaries, tokenize

    exs = [ex for p in SAMPLE for role in ROLES
           for ex in examples_for(role, problem=p.question, steps=p.steps, solution=p.solution,
                                  answer=p.answer)]  # fmt: skip
    exs += [solver_sequence(p.question, p.steps) for p in SAMPLE if p.steps]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokenize(exs, tokenizer, 512, check_boundaries=len(exs))
    assert check_token_boundaries(tokenizer, [], [], limit=8) == []
