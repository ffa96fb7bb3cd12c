"""vLLM as the rollout engine, on the embedded model (slow: starts a real engine, about a
minute on the CPU build). Skipped, with the reason, only where the engine is not installed
(`make vllm` builds its environment; `make test` tries to).

Exact properties: greedy completions equal rlhfkit's sampler's (fp32 on both sides); after a
training step the engine's log-probs of fixed sequences still match the old weights and miss
the new ones (a sync that does nothing fails), and after the sync match the learner's; the
engine's weights hash equal to the learner's after the sync; GRPO runs on the engine.
"""

from __future__ import annotations

import json

import pytest
import torch

from rlhfkit.data.templates import render_prompt
from rlhfkit.models.forward import completion_logprobs
from rlhfkit.models.load import load_model, load_tokenizer, resolve_model_path
from rlhfkit.rollout.hf import SamplingConfig
from rlhfkit.rollout.sampler import chat_generator
from rlhfkit.rollout.vllm import (
    ServerSettings,
    VLLMEngine,
    VLLMServer,
    default_python,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        default_python() is None,
        reason="the vLLM engine is not installed here (`make vllm` builds .venv-vllm)",
    ),
]

PROMPTS = [
    "What is 12 + 7?",
    "Name a colour of the sky.",
    "Write one word that rhymes with cat.",
    "What is the capital of France?",
]


@pytest.fixture(scope="module")
def server():
    settings = ServerSettings(model=resolve_model_path("smollm2-135m-instruct"), dtype="float32")
    server = VLLMServer(settings)
    yield server
    server.close()


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("smollm2-135m-instruct")


def _prompts(tokenizer):
    return [render_prompt(tokenizer, [{"role": "user", "content": p}]) for p in PROMPTS]


def test_greedy_completions_equal_rlhfkits_sampler(server, tokenizer):
    model = load_model("smollm2-135m-instruct", dtype=torch.float32).eval()
    engine = VLLMEngine(server, model, eos_ids=[tokenizer.eos_token_id], dtype=torch.float32)
    greedy = SamplingConfig(max_new_tokens=16, temperature=0.0, num_samples=1)
    prompts = _prompts(tokenizer)
    ours = chat_generator(model, tokenizer).generate(prompts, greedy)
    theirs = engine.generator.generate(prompts, greedy)
    assert theirs.completion_ids == ours.completion_ids
    assert theirs.finish_reasons == ours.finish_reasons
    for a, b in zip(theirs.logprobs, ours.logprobs, strict=True):  # the sampler's log-probs too
        assert a == pytest.approx(b, abs=1e-3)


def test_weight_sync_moves_the_engine_to_the_learner(server, tokenizer):
    model = load_model("smollm2-135m-instruct", dtype=torch.float32)
    engine = VLLMEngine(server, model, eos_ids=[tokenizer.eos_token_id], dtype=torch.float32)
    engine.push(model, version=0)  # whatever an earlier test left there
    engine.apply()
    assert engine.weights_hash() == engine.expected_hash(model)
    prompts = _prompts(tokenizer)
    reply = [tokenizer("The answer is 19.<|im_end|>", add_special_tokens=False)["input_ids"]] * 4

    width = max(len(x) for x in prompts)
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(x)) + x for x in prompts])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in prompts]).bool()
    out = torch.tensor(reply)

    def learner_logprobs():  # (4, T), differentiable
        return completion_logprobs(model, ids, mask, out, torch.ones_like(out, dtype=torch.bool))

    def engine_logprobs():
        sequences = [x + r for x, r in zip(prompts, reply, strict=True)]
        full = engine.generator.sequence_logprobs(sequences)
        return torch.tensor([row[len(x) - 1 :] for row, x in zip(full, prompts, strict=True)])

    with torch.no_grad():
        before = learner_logprobs()
    torch.testing.assert_close(engine_logprobs(), before, atol=2e-3, rtol=0)
    # one optimiser step that raises the reply's likelihood
    optimiser = torch.optim.SGD(model.parameters(), lr=1e-3)
    (-learner_logprobs().mean()).backward()
    optimiser.step()
    with torch.no_grad():
        after = learner_logprobs()
    assert (after - before).abs().max() > 0.05  # the step moved the learner
    stale = engine_logprobs()
    assert (stale - after).abs().max() > 0.05  # not synced yet: the engine is behind
    assert engine.weights_hash() != engine.expected_hash(model)
    engine.push(model, version=1)
    assert engine.apply() == 1
    torch.testing.assert_close(engine_logprobs(), after, atol=2e-3, rtol=0)
    assert engine.weights_hash() == engine.expected_hash(model)


def test_grpo_runs_on_the_engine(server, tmp_path):
    from rlhfkit.config import from_dict
    from rlhfkit.recipes import policy_gradient as pg

    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"What is {a} + {a}?", "answer": str(2 * a)} for a in range(8)]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = from_dict(pg.PGConfig, {
        "model": {"name": "smollm2-135m-instruct", "precision": "fp32"},
        "data": {"train": str(prompts)},
        "rewards": ["rlhfkit.rewards.answers:exact_answer"],
        "engine": {"backend": "vllm", "vllm_url": server.url},
        "sampling": {"num_samples": 2, "max_new_tokens": 8, "temperature": 1.0},
        "optim": {"lr": 1e-5, "warmup_ratio": 0.0, "schedule": "constant"},
        "loop": {"batch_size": 2, "max_steps": 2},
        "log": {"run_dir": str(tmp_path / "run"), "progress": False, "tensorboard": False},
        "sample_every": 0,
    })  # fmt: skip
    pg.main(cfg)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["async/staleness"] == 0  # synchronous on the engine: every batch is fresh
        assert r["train/sampler_gap"] < 0.05  # the engine and the learner agree (fp32)
