"""The embedded SmolLM2-135M-Instruct: cache fidelity and SFT learning (slow: real model)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhfkit.config import LogConfig, LoopConfig, ModelConfig, OptimConfig
from rlhfkit.models.embedded import embedded_model_dir, gguf_path
from rlhfkit.models.load import load_model, load_tokenizer
from rlhfkit.recipes import sft

pytestmark = pytest.mark.slow


def test_cache_equals_the_dequantised_gguf():
    cached = load_model("smollm2-135m-instruct")
    config = json.loads((embedded_model_dir() / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"]
    assert cached.lm_head.weight.data_ptr() == cached.model.embed_tokens.weight.data_ptr()
    source = gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(
        str(source.parent), gguf_file=source.name, dtype=torch.float32
    )
    ids = load_tokenizer("embedded").apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(cached(ids).logits, reference(ids).logits, atol=1e-5, rtol=0)
        out = cached.generate(ids, max_new_tokens=8, do_sample=False)
    reply = load_tokenizer("embedded").decode(out[0, ids.shape[1] :])
    assert "Paris" in reply


def test_sft_lowers_heldout_loss(tmp_path):
    cfg = sft.SFTConfig(
        model=ModelConfig(),
        data=sft.SFTDataConfig(limit=48),
        optim=OptimConfig(lr=5e-5, warmup_ratio=0.0),
        loop=LoopConfig(batch_size=8, max_steps=6, micro_batch_tokens=1024),
        log=LogConfig(run_dir=str(tmp_path / "run"), tensorboard=False, progress=False),
    )
    run = sft.main(cfg)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval/loss"] for r in rows if "eval/loss" in r]
    assert evals[-1] < evals[0] - 0.1, evals


def test_reward_model_learns_the_gold_preference(tmp_path):
    """Bradley-Terry on builtin:preferences: held-out accuracy against the gold rises to >= 0.8.

    At initialisation the random head scores pairs at about chance; 8 steps of 16 pairs (128
    pairs) suffice on the embedded model (benchmarks/rm_accuracy.py measures the time).
    """
    from rlhfkit.recipes import reward_model

    cfg = reward_model.RMConfig(
        loop=LoopConfig(batch_size=16, max_steps=8, micro_batch_tokens=4096),
        log=LogConfig(run_dir=str(tmp_path / "rm"), tensorboard=False, progress=False),
    )
    run = reward_model.main(cfg)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    accuracy = [r["eval/accuracy"] for r in rows if "eval/accuracy" in r]
    assert accuracy[0] < 0.75 and accuracy[-1] >= 0.8, accuracy
