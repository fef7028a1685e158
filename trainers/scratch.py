"""Tiny students from scratch: a GPT-2 and a tokenizer trained on the data, as a plain HF dir.

Why: on a 2-core machine no pretrained student learns multi-step arithmetic in minutes, but a
3-layer GPT-2 whose tokens are whole words, single digits and symbols does (ENVIRONMENT.md,
"Tiny students from scratch": lr 1e-3, 50 warm-up steps, clip 1.0, batch 16). One token per
digit lets a student copy a number digit by digit and the calculator's result be forced token
by token; one token per word keeps sequences short.

The tokenizer is a byte-level BPE whose pre-tokenizer isolates every digit: merges then stop at
word and symbol boundaries, so a vocabulary large enough for the data ends with one token per
word (with its leading space), per digit and per symbol run, and decoding stays exact.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

EOS = "<|endoftext|>"
PAD = "<|pad|>"


def build_tokenizer(
    texts: Iterable[str], vocab_size: int = 4000, *, split_digits: bool = True
) -> Any:
    """A transformers tokenizer with one token per word, digit and symbol run of `texts`.
    `split_digits` False is plain GPT-2 byte-level BPE (merges across digits): the tests' tiny
    models, whose expected outputs were recorded with it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if split_digits
        else byte_level
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=PAD, unk_token=None
    )


ARCHS = ("gpt2", "llama")


def build_student(
    out_dir: str | Path,
    texts: Iterable[str],
    *,
    n_layer: int = 3,
    n_embd: int = 128,
    n_head: int = 4,
    n_positions: int = 512,
    seed: int = 0,
    arch: str = "gpt2",
    vocab_size: int = 4000,
    split_digits: bool = True,
) -> Path:
    """Save a freshly initialised student and its data-trained tokenizer under `out_dir`.

    `arch` "gpt2" is the paper's family (learned absolute positions); "llama" has rotary
    positions, RMSNorm and a gated MLP (4 x width) at the same width and depth. Dropout is off:
    these students see each problem a few times at most, and the trainer may not switch the
    model to train mode (`from_pretrained` loads it in eval mode). The tests' and benchmarks'
    tiny models are this builder at their own sizes (`tests/support/tiny_model.py`)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(texts, vocab_size, split_digits=split_digits)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}  # fmt: skip
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=len(tokenizer),
                hidden_size=n_embd,
                intermediate_size=4 * n_embd,
                num_hidden_layers=n_layer,
                num_attention_heads=n_head,
                num_key_value_heads=n_head,
                max_position_embeddings=n_positions,
                tie_word_embeddings=True,
                **ids,
            )
        )
    else:
        config = GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=n_positions,
            n_embd=n_embd,
            n_layer=n_layer,
            n_head=n_head,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **ids,
        )
        model = GPT2LMHeadModel(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def sample_texts() -> list[str]:
    """Every role's prompt + target for the bundled sample: the vocabulary a tiny model built
    for tests, benchmarks or a smoke run will see."""
    from socratic.adapters import DatasetSpec, load_problems
    from socratic.formats import ROLES, examples_for

    texts = []
    for p in load_problems(DatasetSpec("sample", split="all")):
        for role in ROLES:
            for ex in examples_for(
                role, problem=p.question, steps=p.steps, solution=p.solution, answer=p.answer
            ):
                texts.append(ex.prompt + ex.target)
    return texts


def annotation_texts(data: str) -> list[str]:
    """Every role's prompt + target for the accepted rows of annotation Parquet (`data`, as
    `trainers/train.py --data` takes it): the vocabulary a student trained on them will see."""
    from socratic.formats import ROLES
    from trainers.data import build_examples, read_accepted

    rows = read_accepted(data)
    texts = []
    for role in ROLES:
        examples, _ = build_examples(rows, role)
        texts += [ex.prompt + ex.target for ex in examples]
    if not texts:
        raise ValueError(f"{data}: no accepted rows to build a vocabulary from")
    return texts


def main(argv: list[str] | None = None) -> int:
    """`socratic-distill student --data ANN --output DIR`: a student to train when no pretrained
    one fits (offline, or a vocabulary of your own), from the annotations it will train on."""
    import argparse

    ap = argparse.ArgumentParser(prog="socratic-distill student", description=main.__doc__)
    ap.add_argument("--data", required=True, help="annotation Parquet (dirs or files, a,b)")
    ap.add_argument("--output", required=True, help="the HF model dir to write")
    ap.add_argument("--arch", default="llama", choices=ARCHS)
    ap.add_argument("--n-layer", type=int, default=3)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--n-positions", type=int, default=512)
    ap.add_argument("--vocab-size", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        texts = annotation_texts(args.data)
    except (OSError, ValueError) as e:
        ap.error(str(e))
    out = build_student(
        args.output, texts, n_layer=args.n_layer, n_embd=args.n_embd,
        n_positions=args.n_positions, seed=args.seed, arch=args.arch, vocab_size=args.vocab_size,
    )  # fmt: skip
    print(f"student ({args.arch}, {args.n_layer} x {args.n_embd}) from {len(texts)} texts -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
