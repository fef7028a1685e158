"""The shared fixtures later stages stand on: a real local Ray cluster and a tiny HF model dir."""

from __future__ import annotations

import ray


@ray.remote
def _node_of_task() -> str:
    return ray.get_runtime_context().get_node_id()


def test_ray_cluster_runs_tasks(ray_cluster) -> None:
    assert ray.is_initialized()
    assert ray.cluster_resources()["CPU"] >= 2
    node_ids = set(ray.get([_node_of_task.remote() for _ in range(4)]))
    assert node_ids == {n["NodeID"] for n in ray.nodes() if n["Alive"]}


def test_tiny_model_dir_loads_and_generates(tiny_model_dir) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert (tiny_model_dir / "config.json").is_file()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert tok.eos_token_id is not None and tok.pad_token_id not in (None, tok.eos_token_id)
    assert model.config.vocab_size == len(tok)
    tok.padding_side = "left"
    batch = tok(
        ["Problem: Ann has 3 bags.\nSub-questions:\n", "Problem: x\n"],
        return_tensors="pt",
        padding=True,
    )
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert out.shape == (2, batch["input_ids"].shape[1] + 5)
    assert all(isinstance(t, str) for t in tok.batch_decode(out[:, -5:]))
    # The tokenizer was trained on our formats: markers are cheap to encode.
    assert len(tok("Problem:", add_special_tokens=False)["input_ids"]) <= 2
