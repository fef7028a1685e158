"""A tiny causal LM that tests build on the spot: no model hub on these machines.

A 2-layer GPT-2 and a byte-level BPE tokenizer trained on the given texts, saved as a plain
Hugging Face directory, so every code path that takes "a model id or dir" (training, export,
serving) is exercised exactly as with `gpt2` - just small enough for a 2-core CPU.

Run `python -m tests.support.tiny_model OUT_DIR` to build one by hand.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path

EOS = "<|endoftext|>"
PAD = "<|pad|>"


def build_tokenizer(texts: Iterable[str], vocab_size: int = 600):
    """Train a byte-level BPE (GPT-2's scheme) on `texts` and wrap it for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
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


def build_tiny_model(
    out_dir: str | Path,
    texts: Iterable[str],
    seed: int = 0,
    *,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 2,
    n_positions: int = 512,
) -> Path:
    """Save a tiny GPT-2 + tokenizer under `out_dir`; `from_pretrained(out_dir)` loads both.
    The size arguments let benchmarks and long-prompt tests grow it without a second copy."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(texts)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def sample_texts() -> list[str]:
    """Every role's prompt + target for the bundled sample: the vocabulary students will see."""
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


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tests.support.tiny_model OUT_DIR")
    print(build_tiny_model(sys.argv[1], sample_texts()))
