"""vLLM as the rollout engine, on the embedded model (slow: starts a real engine, about a
minute on the CPU build). Skipped, with the reason, only where the engine is not installed
(`make vllm` builds its environment; `make test` tries to).

Exact properties: greedy completions equal rlhfkit's sampler's (fp32 on both sides); after a
training step the engine's log-probs of fixed sequences still match the old weights and miss
the new ones (a sync that does nothing fails), and after the sync match the learner's; the
engine's weights hash equal to the learner's after the sync; GRPO runs on the engine; greedy
multi-turn episodes are the same on the engine as on rlhfkit's sampler.
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
from rlhfkit.rollout.vllm import VLLMEngine
from rlhfkit.rollout.vllm_server import ServerSettings, VLLMServer, default_python

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


def test_multi_turn_episodes_on_the_engine_equal_rlhfkits(server, tokenizer):
    """Greedy guess-the-number episodes: the same turns, observations and masks on both.

    Turns end at a full stop or a newline (a stop string: the end-of-turn marker then comes
    with the observation), so that the untrained model plays several turns.
    """
    from rlhfkit.data.prompts import PromptRow
    from rlhfkit.data.tasks.tool_tasks import guess_number_rows
    from rlhfkit.envs.builtin import GuessNumberEnv
    from rlhfkit.rollout.multiturn import TurnLimits, env_prompt_rows, run_episodes

    model = load_model("smollm2-135m-instruct", dtype=torch.float32).eval()
    engine = VLLMEngine(server, model, eos_ids=[tokenizer.eos_token_id], dtype=torch.float32)
    rows = [PromptRow([], row) for row in guess_number_rows(3, seed=4)]
    rows = env_prompt_rows(tokenizer, rows, GuessNumberEnv)
    greedy = SamplingConfig(max_new_tokens=24, temperature=0.0, num_samples=1, stop=(".", "\n"))
    limits = TurnLimits(max_turns=3, max_tokens=120)
    ours = run_episodes(chat_generator(model, tokenizer), tokenizer, rows, GuessNumberEnv,
                        greedy, limits)  # fmt: skip
    theirs = run_episodes(engine.generator, tokenizer, rows, GuessNumberEnv, greedy, limits)
    assert all(info["turns"] > 1 for info in ours.info)  # observations inside the rows
    assert theirs.rollout.completion_ids == ours.rollout.completion_ids
    assert theirs.rollout.masks == ours.rollout.masks
    assert theirs.rewards == ours.rewards and theirs.conversations == ours.conversations
    for a, b, mask in zip(theirs.rollout.logprobs, ours.rollout.logprobs, ours.rollout.masks,
                          strict=True):  # fmt: skip
        assert a == pytest.approx(b, abs=1e-3)
        assert all(x == 0.0 for x, m in zip(a, mask, strict=True) if not m)


def test_eval_on_the_engine_reports_as_on_rlhfkits_sampler(server, tokenizer, tmp_path):
    """`rlhfkit eval --engine.backend vllm` (attached to the server): greedy fp32 samples equal
    the hf backend's, so the reports are equal."""
    from rlhfkit.config import EngineConfig, ModelConfig
    from rlhfkit.inference import evaluate

    model = load_model("smollm2-135m-instruct", dtype=torch.float32)
    engine = VLLMEngine(server, model, eos_ids=[tokenizer.eos_token_id], dtype=torch.float32)
    engine.push(model, version=0)  # the starting weights, whatever an earlier test left there
    engine.apply()
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in [(2, 3), (10, 7),
            (4, 4), (21, 9), (6, 0), (13, 13)]]  # fmt: skip
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))

    url = server.url

    def report(backend):
        cfg = evaluate.EvalConfig(
            model=ModelConfig(name="smollm2-135m-instruct", precision="fp32"),
            data=evaluate.EvalDataConfig(source=str(prompts), split="train"),
            sampling=SamplingConfig(max_new_tokens=24, temperature=0.0),
            engine=EngineConfig(backend=backend, vllm_url=url if backend == "vllm" else None),
            rewards=("rlhfkit.rewards.answers:exact_answer",), cache_dir=None,
            samples_output=str(tmp_path / f"{backend}.jsonl"),
        )  # fmt: skip
        evaluate.main(cfg)
        lines = (tmp_path / f"{backend}.jsonl").read_text().splitlines()
        return [(r["completion"], r["finish"], r["reward"]) for r in map(json.loads, lines)]

    assert report("vllm") == report("hf")


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


def grpo_on_engine(url: str, run_dir, **model) -> list[dict]:
    """Two GRPO steps on the engine at ``url`` (the embedded model plus ``model`` options);
    the metric records."""
    from rlhfkit.config import from_dict
    from rlhfkit.recipes import policy_gradient as pg

    prompts = run_dir.parent / "prompts.jsonl"
    rows = [{"prompt": f"What is {a} + {a}?", "answer": str(2 * a)} for a in range(8)]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = from_dict(pg.PGConfig, {
        "model": {"name": "smollm2-135m-instruct", "precision": "fp32", **model},
        "data": {"train": str(prompts)},
        "rewards": ["rlhfkit.rewards.answers:exact_answer"],
        "engine": {"backend": "vllm", "vllm_url": url},
        "sampling": {"num_samples": 2, "max_new_tokens": 8, "temperature": 1.0},
        "optim": {"lr": 1e-3 if model.get("lora") else 1e-5, "warmup_ratio": 0.0,
                  "schedule": "constant"},
        "loop": {"batch_size": 2, "max_steps": 2},
        "log": {"run_dir": str(run_dir), "progress": False, "tensorboard": False},
        "sample_every": 0,
    })  # fmt: skip
    pg.main(cfg)
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_grpo_runs_on_the_engine(server, tmp_path):
    rows = grpo_on_engine(server.url, tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["async/staleness"] == 0  # synchronous on the engine: every batch is fresh
        assert r["train/sampler_gap"] < 0.05  # the engine and the learner agree (fp32)


def test_online_dpo_samples_each_round_on_the_engine(server, tmp_path):
    """`rlhfkit dpo online --engine.backend vllm`: every round samples on the engine after the
    policy's weights were loaded into it (their load time logged), and pairs are trained on."""
    from rlhfkit.config import from_dict
    from rlhfkit.recipes import dpo_online

    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"What is {a} + {a}?", "chosen": str(2 * a), "rejected": "?"}
            for a in range(6)]  # fmt: skip
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    reward = tmp_path / "reward.py"
    reward.write_text("def length(completion):\n    return float(len(completion))\n")
    cfg = from_dict(dpo_online.OnlineDPOConfig, {
        "model": {"name": "smollm2-135m-instruct", "precision": "fp32"},
        "data": {"train": str(prompts), "eval": None},
        "engine": {"backend": "vllm", "vllm_url": server.url},
        "online": {"reward": f"{reward}:length", "rounds": 2,
                   "prompts_per_round": 4, "num_samples": 4, "max_new_tokens": 12,
                   "steps_per_round": 1, "temperature": 1.0},
        "optim": {"lr": 1e-6, "warmup_ratio": 0.0, "schedule": "constant"},
        "loop": {"batch_size": 2},
        "eval": {"win_rate": False, "kl_prompts": 0},
        "log": {"run_dir": str(tmp_path / "run"), "progress": False, "tensorboard": False},
    })  # fmt: skip
    dpo_online.main(cfg)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in rows if "online/round" in r]
    assert [r["online/round"] for r in rounds] == [1.0, 2.0]
    assert all(r["online/sync_s"] > 0 for r in rounds)  # weights loaded before each round
    assert all(r["online/pairs"] > 0 for r in rounds)
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2]
    for k in (1, 2):
        samples = (tmp_path / "run" / "rounds" / f"round-{k:03d}.jsonl").read_text().splitlines()
        assert len(samples) == 4 and all(len(json.loads(x)["completions"]) == 4 for x in samples)


@pytest.fixture(scope="module")
def lora_server(tmp_path_factory):
    settings = ServerSettings(
        model=resolve_model_path("smollm2-135m-instruct"), dtype="float32", lora_rank=8
    )
    server = VLLMServer(settings, log_dir=tmp_path_factory.mktemp("lora-server"))
    yield server
    server.close()


def test_lora_adapter_sync_moves_the_engine_to_the_learner(lora_server, tokenizer):
    """Under LoRA the engine gets the adapter itself: before the sync it samples the base model,
    after it its log-probs are the learner's (base + adapter), and a second sync loads the
    next adapter in place."""
    from rlhfkit.models.load import LoraSpec, apply_lora
    from rlhfkit.rollout.vllm import ADAPTER_NAME, VLLMAdapterEngine

    torch.manual_seed(0)
    model = apply_lora(load_model("smollm2-135m-instruct", dtype=torch.float32), LoraSpec(r=8))
    with torch.no_grad():  # an adapter that changes the model (a fresh one is the identity)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    engine = VLLMAdapterEngine(
        lora_server, model, eos_ids=[tokenizer.eos_token_id], dtype=torch.float32
    )
    prompts = _prompts(tokenizer)
    reply = tokenizer("The answer is 19.<|im_end|>", add_special_tokens=False)["input_ids"]
    sequences = [x + reply for x in prompts]

    def learner():
        with torch.no_grad():
            return [completion_logprobs(model, torch.tensor([x]), torch.ones(1, len(x)).bool(),
                                        torch.tensor([reply]), torch.ones(1, len(reply)).bool())[0]
                    for x in prompts]  # fmt: skip

    def engine_side():
        full = engine.generator.sequence_logprobs(sequences)
        return [torch.tensor(row[len(x) - 1 :]) for row, x in zip(full, prompts, strict=True)]

    before = engine_side()  # the base model: the adapter is not there yet
    expected = learner()
    assert max((a - b).abs().max().item() for a, b in zip(before, expected, strict=True)) > 0.05
    engine.push(model, version=1)
    assert engine.apply() == 1 and engine.generator.model_name == ADAPTER_NAME
    for a, b in zip(engine_side(), expected, strict=True):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=0)
    assert engine.weights_hash() == engine.expected_hash(model)
    with torch.no_grad():  # the next adapter replaces this one
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(-1.0)
    engine.push(model, version=2)
    engine.apply()
    for a, b in zip(engine_side(), learner(), strict=True):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=0)
    engine.close()


def test_grpo_with_lora_syncs_the_adapter(lora_server, tmp_path):
    """`rlhfkit rl --model.lora true --engine.backend vllm`: the adapter is what gets synced."""
    rows = grpo_on_engine(lora_server.url, tmp_path / "run", lora=True, lora_r=8)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["async/staleness"] == 0
        assert r["train/sampler_gap"] < 0.05  # the engine samples base + the learner's adapter
