"""From-scratch students: both architectures save a plain HF dir that trains and decodes with
the calculator inside decoding, as every stage loads it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from socratic.arith import ArithConfig, generate
from socratic.formats import solver_sequence
from socratic.generate import Generator
from trainers.data import collate, tokenize
from trainers.scratch import build_student

PROBLEMS = list(generate(ArithConfig.parse("ops=1-2,n_train=40,n_test=0,n_long=0"), 0, "train"))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_scratch_student_trains_and_decodes(tmp_path: Path, arch: str) -> None:
    seqs = [solver_sequence(p.question, p.steps) for p in PROBLEMS]
    d = build_student(tmp_path / arch, ["".join(s.pieces) for s in seqs], n_layer=2, n_embd=32,
                      n_head=2, n_positions=256, arch=arch)  # fmt: skip
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d)
    assert model.config.model_type == arch
    data = tokenize(seqs[:8], tok, 256, mask_calculator_results=True)
    batch = collate([data[i] for i in range(len(data))], tok.pad_token_id)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(5):
        loss = model(**batch).loss
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < first
    model.save_pretrained(d)
    gen = Generator(d, max_new_tokens=12, device="cpu")
    assert gen.positions == 256
    (out,) = gen.complete([seqs[0].examples()[0].prompt], calculator=True)
    assert out.completion_tokens > 0 and out.calculator  # decodes with the logits processor


def test_an_unknown_architecture_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="arch must be one of gpt2, llama"):
        build_student(tmp_path, ["a b c"], arch="mamba")


def test_the_student_command_builds_from_annotations_and_names_bad_input(tmp_path, capsys) -> None:
    """`socratic-distill student`: a model whose vocabulary covers every role's text of the
    annotations, and a clear error for a folder with none."""
    from socratic.adapters import DatasetSpec, load_problems
    from tests.support.annotations import write_gold_annotations
    from trainers.scratch import annotation_texts, main

    problems = list(load_problems(DatasetSpec("sample", split="train")))[:6]
    ann = write_gold_annotations(problems, tmp_path / "ann")
    assert main(["--data", str(ann), "--output", str(tmp_path / "base")]) == 0
    tok = AutoTokenizer.from_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    assert model.config.model_type == "llama"
    for text in annotation_texts(str(ann)):
        assert tok.unk_token_id not in tok(text)["input_ids"]
        assert tok.decode(tok(text)["input_ids"]) == text
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        main(["--data", str(tmp_path / "empty"), "--output", str(tmp_path / "x")])
    assert "empty" in capsys.readouterr().err
