"""Turn a ZeRO checkpoint into a plain Hugging Face model directory.

Training checkpoints are DeepSpeed shards (one optimizer shard per rank, and under ZeRO-3 the
parameters partitioned too); nothing outside DeepSpeed can load them. Export consolidates them
into one fp32 state dict and saves model + tokenizer with `save_pretrained`, so the server and
the evaluation load a student with `AutoModelForCausalLM.from_pretrained(dir)` and nothing else.
"""

from __future__ import annotations

import json
from pathlib import Path

STATE_FILE = "socratic_state.json"


def export_checkpoint(checkpoint_dir: str | Path, base_model: str, out_dir: str | Path) -> Path:
    """Consolidate the checkpoint in `checkpoint_dir` into an HF dir at `out_dir`."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    checkpoint_dir = Path(checkpoint_dir)
    tag = json.loads((checkpoint_dir / STATE_FILE).read_text())["tag"]
    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)
    config = AutoConfig.from_pretrained(base_model)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(_tied_keys(model))
    if unexpected or set(missing) - tied:
        raise RuntimeError(
            f"checkpoint {checkpoint_dir} does not match {base_model}: "
            f"missing {sorted(set(missing) - tied)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    model.tie_weights()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base_model).save_pretrained(out)
    return out


def _tied_keys(model) -> list[str]:
    """Parameter names that are tied to another (GPT-2's lm_head), absent from ZeRO states."""
    keys = getattr(model, "_tied_weights_keys", None) or []
    if isinstance(keys, dict):
        keys = list(keys)
    return [k for k in keys if isinstance(k, str)]
