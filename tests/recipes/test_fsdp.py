"""FSDP2 on 2 gloo ranks: every recipe's sharded steps equal one process on the same global batch.

Each comparison runs 3 optimiser steps in one process (replicated: the reference) and on 2 ranks
with ``--model.parallel fsdp2`` (fp32, so equal up to the order of float sums), then compares
every logged loss and metric and the exported final weights within 1e-5. The resume tests stop
a 2-rank run after a checkpoint and continue it on 1 rank and on 2.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from fsdp_helpers import (
    RM_COMPLETIONS,
    Crash,
    main_until,
    reward_model_scores,
    scripted_rl,
    sft_until,
    shard_sizes,
)
from recipe_helpers import (
    assert_same_run,
    pg_config,
    records,
    rm_config,
    run_two_ranks,
    write_jsonl,
)
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rlhfkit.config import LogConfig, LoopConfig, ModelConfig, OptimConfig, from_dict
from rlhfkit.recipes import dpo, sft
from rlhfkit.recipes import reward_model as rm
from rlhfkit.training.checkpoint import is_sharded_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

RM_ROWS = [
    {"prompt": f"What is {a} + {b}?", "chosen": f"The answer is {a + b}.",
     "rejected": f"The answer is {a + b + 1 + a % 3}." if a % 2 else "No."}
    for a, b in [(1, 2), (3, 4), (5, 1), (2, 8), (7, 7), (4, 0), (9, 3), (6, 5), (8, 2), (0, 9)]
]  # fmt: skip


@pytest.fixture(autouse=True)
def one_process(monkeypatch, tmp_path):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("RLHFKIT_CACHE", str(tmp_path / "cache"))


def model(path, parallel: str) -> ModelConfig:
    return ModelConfig(name=str(path), precision="fp32", parallel=parallel)


def log(run_dir) -> LogConfig:
    return LogConfig(run_dir=str(run_dir), tensorboard=False, progress=False)


def sft_config(model_dir, chat_data, run_dir, parallel: str, **loop) -> sft.SFTConfig:
    train, heldout = (str(p) for p in chat_data)
    loop = {"batch_size": 8, "micro_batch_tokens": 64, "max_steps": 3, "seed": 1, **loop}
    return sft.SFTConfig(
        model=model(model_dir, parallel),
        data=sft.SFTDataConfig(train=train, eval=heldout, eval_split="train"),
        optim=OptimConfig(lr=3e-3, warmup_ratio=0.0, schedule="constant"),
        loop=LoopConfig(**loop),
        log=log(run_dir),
    )


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sft(tiny_model_dir, chat_data, tmp_path, lora):
    def cfg(run, parallel):
        c = sft_config(tiny_model_dir, chat_data, tmp_path / run, parallel)
        c.model.lora, c.model.lora_r = lora, 4
        return c

    sft.main(cfg("one", "replicate"))
    run_two_ranks(sft.main, cfg("two", "fsdp2"))
    assert_same_run(tmp_path / "one", tmp_path / "two", ("train/", "eval/"), n_records=5)
    if lora:  # the adapter is saved beside the merged model
        assert (tmp_path / "two" / "final" / "adapter" / "adapter_config.json").exists()


def test_bf16_compute_with_fp32_reduction(tiny_model_dir, chat_data, tmp_path):
    """bf16 gathered weights and fp32 gradient reduction: the losses follow the replicated
    bf16 run to bf16 rounding (the two round in different places, so not to 1e-5)."""

    def cfg(run, parallel):
        c = sft_config(tiny_model_dir, chat_data, tmp_path / run, parallel)
        c.model.precision = "bf16"
        return c

    run_two_ranks(sft.main, cfg("rep", "replicate"))
    run_two_ranks(sft.main, cfg("fsdp", "fsdp2"))
    a = [r for r in records(tmp_path / "rep", ("train/loss",)) if r]
    b = [r for r in records(tmp_path / "fsdp", ("train/loss",)) if r]
    assert len(a) == len(b) == 3
    for ra, rb in zip(a, b, strict=True):
        assert rb["train/loss"] == pytest.approx(ra["train/loss"], rel=2e-3)


def test_each_rank_stores_half_of_the_parameters(tiny_model_dir, chat_data, tmp_path):
    run_two_ranks(shard_sizes, sft_config(tiny_model_dir, chat_data, tmp_path, "fsdp2"))
    sizes = [(tmp_path / f"sizes-{r}.txt").read_text().split() for r in (0, 1)]
    total = int(sizes[0][1])
    for local, whole, kind in sizes:
        assert int(whole) == total and kind == "DTensor"
        assert abs(int(local) - total / 2) < 0.02 * total  # dim-0 shards: about half each
    assert sum(int(s[0]) for s in sizes) == total


def test_reward_model(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", RM_ROWS)

    def cfg(run, parallel):
        c = rm_config(tiny_model_dir, data, tmp_path / run, max_steps=3, seed=1)
        c.model.parallel = parallel
        return c

    rm.main(cfg("one", "replicate"))
    run_two_ranks(rm.main, cfg("two", "fsdp2"))
    assert_same_run(tmp_path / "one", tmp_path / "two", ("train/", "eval/"), n_records=5)


def test_dpo(tiny_model_dir, pairs_file, tmp_path):
    def cfg(run, parallel):
        return from_dict(dpo.DPOConfig, {
            "model": {"name": str(tiny_model_dir), "precision": "fp32", "parallel": parallel},
            "data": {"train": str(pairs_file), "eval": str(pairs_file)},
            "optim": {"lr": 1e-3, "warmup_ratio": 0.0},
            "loop": {"batch_size": 8, "max_steps": 3, "micro_batch_tokens": 128},
            "log": {"run_dir": str(tmp_path / run), "progress": False, "tensorboard": False},
            "eval": {"win_rate": False, "kl_prompts": 2, "max_new_tokens": 4},
        })  # fmt: skip

    dpo.main(cfg("one", "replicate"))
    run_two_ranks(dpo.main, cfg("two", "fsdp2"))
    assert_same_run(tmp_path / "one", tmp_path / "two", ("train/", "eval/loss"), n_records=5)


def rl_config(model_dir, task, run_dir, parallel: str, preset: str, **over):
    data, reward = task
    base = {
        "model": {"name": str(model_dir), "precision": "fp32", "parallel": parallel},
        "data": {"train": str(data)},
        "rewards": [f"{reward}:letter_a"],
        "algo": {"preset": preset},
        "sampling": {"num_samples": 4, "max_new_tokens": 8, "temperature": 1.0},
        "optim": {"lr": 1e-2, "warmup_ratio": 0.0, "schedule": "constant"},
        "loop": {"batch_size": 4, "max_steps": 3, "micro_batch_tokens": 64},
        "log": {"run_dir": str(run_dir), "progress": False, "tensorboard": False},
    }
    if preset == "ppo":
        base["critic"] = {"init": "policy", "lr": 1e-3}
        base["algo"]["epochs"] = 1
    return pg_config(base, **over)


@pytest.mark.parametrize("preset", ["grpo", "ppo"])
def test_policy_gradient(tiny_model_dir, pg_task, tmp_path, preset):
    scripted_rl(rl_config(tiny_model_dir, pg_task, tmp_path / "one", "replicate", preset))
    run_two_ranks(
        scripted_rl, rl_config(tiny_model_dir, pg_task, tmp_path / "two", "fsdp2", preset)
    )
    prefixes = ("train/", "rollout/", "critic/")
    assert_same_run(tmp_path / "one", tmp_path / "two", prefixes, n_records=3)
    if preset == "ppo":
        a = load_file(str(tmp_path / "one" / "critic" / "model.safetensors"))
        b = load_file(str(tmp_path / "two" / "critic" / "model.safetensors"))
        for name in a:
            torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=0)


def test_reward_model_reward_is_sharded_and_gathered_to_score(
    tiny_model_dir, tiny_rm_dir, tmp_path
):
    """``rm:<dir>`` as a reward under fsdp2: each rank stores half of the reward model, and,
    gathered, it scores as the whole model does in one process, with a different number of
    passes on each rank. ``--model.shard-frozen false`` holds it whole on every rank."""
    from rlhfkit.rewards import load_reward_fn

    whole = load_reward_fn(f"rm:{tiny_rm_dir}", precision="fp32")
    expected = whole.score_batch(RM_COMPLETIONS, [{"prompt": "Say a"}] * len(RM_COMPLETIONS))
    for shard_frozen in (True, False):
        run = tmp_path / str(shard_frozen)
        run.mkdir()
        cfg = sft.SFTConfig(
            model=ModelConfig(name=str(tiny_model_dir), precision="fp32", parallel="fsdp2",
                              shard_frozen=shard_frozen),
            log=log(run),
        )  # fmt: skip
        run_two_ranks(partial(reward_model_scores, rm_dir=str(tiny_rm_dir)), cfg)
        stored = []
        for rank in (0, 1):
            sizes, scores = (run / f"rm-{rank}.txt").read_text().splitlines()
            local, total = map(int, sizes.split())
            stored.append(local)
            got = [float(x) for x in scores.split()]
            assert got == pytest.approx(expected[: 1 + 3 * rank], abs=1e-5)
        if shard_frozen:  # dim-0 shards: the (1, H) score row is on rank 0
            assert sum(stored) == total and abs(stored[0] - stored[1]) <= 64
        else:
            assert stored == [total, total]


def test_policy_gradient_against_a_sharded_reward_model(
    tiny_model_dir, tiny_rm_dir, pg_task, tmp_path
):
    """GRPO with ``rm:<dir>`` as the reward: 2 fsdp2 ranks (policy, reference and reward model
    sharded) log and train as one process."""

    def cfg(run, parallel):
        out = rl_config(tiny_model_dir, pg_task, tmp_path / run, parallel, "grpo",
                        algo__kl_coef=0.05, optim__lr=1e-3)  # fmt: skip
        out.rewards = (f"rm:{tiny_rm_dir}",)
        return out

    scripted_rl(cfg("one", "replicate"))
    run_two_ranks(scripted_rl, cfg("two", "fsdp2"))
    assert_same_run(tmp_path / "one", tmp_path / "two", ("train/", "rollout/"), n_records=3)


def test_killed_run_resumes_at_another_number_of_ranks(tiny_model_dir, chat_data, tmp_path):
    """2 ranks killed after step 2, 1 rank killed after step 3, 2 ranks to step 5: the losses
    of steps 3-5 and the final weights are those of 5 uninterrupted steps in one process."""

    def cfg(run, parallel="fsdp2"):
        return sft_config(tiny_model_dir, chat_data, tmp_path / run, parallel, max_steps=5,
                          save_every=1, eval_every=0)  # fmt: skip

    sft.main(cfg("straight", "replicate"))
    with pytest.raises(Exception, match=r"killed"):
        run_two_ranks(partial(sft_until, step=2), cfg("cut"))
    ckpt = tmp_path / "cut" / "checkpoints" / "step-00000002"
    assert is_sharded_checkpoint(ckpt) and not (ckpt / "model.safetensors").exists()
    assert not (tmp_path / "cut" / "final").exists()
    with pytest.raises(Crash):
        sft_until(cfg("cut"), step=3)  # one process reads the 2-rank shards
    run_two_ranks(sft.main, cfg("cut"))  # two ranks read the 1-process checkpoint
    losses = [r["train/loss"] for r in records(tmp_path / "straight", ("train/loss",)) if r]
    resumed = [r["train/loss"] for r in records(tmp_path / "cut", ("train/loss",)) if r]
    assert len(losses) == 5 and resumed == pytest.approx(losses, abs=1e-5)
    final = tmp_path / "cut" / "final"
    a = load_file(str(tmp_path / "straight" / "final" / "model.safetensors"))
    b = load_file(str(final / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=0)
    # the export is a plain Hugging Face directory with the trained weights
    reloaded = AutoModelForCausalLM.from_pretrained(final).eval()
    straight = AutoModelForCausalLM.from_pretrained(tmp_path / "straight" / "final").eval()
    ids = torch.tensor([[5, 9, 17, 33, 2]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, straight(ids).logits, atol=1e-4, rtol=0)


def test_sampling_recipes_sample_the_same_under_fsdp2(tiny_model_dir, pg_task, tmp_path):
    """With the real sampler, 2 fsdp2 ranks (weights gathered for sampling) give the same
    rollouts, losses and weights as 2 replicated ranks: GRPO with a KL to the sharded reference,
    and online DPO (sampling, reward-function labels, reference of each round)."""
    from rlhfkit.recipes import dpo_online
    from rlhfkit.recipes import policy_gradient as pg

    def rl(run, parallel):
        return rl_config(tiny_model_dir, pg_task, tmp_path / run, parallel, "grpo",
                         algo__kl_coef=0.05)  # fmt: skip

    run_two_ranks(pg.main, rl("rl-rep", "replicate"))
    run_two_ranks(pg.main, rl("rl-fsdp", "fsdp2"))
    prefixes = ("train/", "rollout/")
    assert_same_run(tmp_path / "rl-rep", tmp_path / "rl-fsdp", prefixes, n_records=3)

    reward = pg_task[1]
    rows = [{"prompt": f"Say a {i}", "chosen": "a", "rejected": "b"} for i in range(8)]
    pairs = write_jsonl(tmp_path / "online.jsonl", rows)

    def online(run, parallel):
        return from_dict(dpo_online.OnlineDPOConfig, {
            "model": {"name": str(tiny_model_dir), "precision": "fp32", "parallel": parallel},
            "data": {"train": str(pairs), "eval": None},
            "optim": {"lr": 1e-3, "warmup_ratio": 0.0, "schedule": "constant"},
            "loop": {"batch_size": 4},
            "log": {"run_dir": str(tmp_path / run), "progress": False, "tensorboard": False},
            "eval": {"win_rate": False, "kl_prompts": 0},
            "online": {"reward": f"{reward}:letter_a", "rounds": 2, "prompts_per_round": 4,
                       "num_samples": 3, "max_new_tokens": 8, "steps_per_round": 1,
                       "temperature": 1.0, "reference": "initial"},
        })  # fmt: skip

    run_two_ranks(dpo_online.main, online("dpo-rep", "replicate"))
    run_two_ranks(dpo_online.main, online("dpo-fsdp", "fsdp2"))
    n = len(records(tmp_path / "dpo-rep", ("train/",)))
    assert_same_run(tmp_path / "dpo-rep", tmp_path / "dpo-fsdp", ("train/", "online/"), n)


def test_pipeline_on_two_ranks(tiny_model_dir, tmp_path):
    """The pipeline under 2 fsdp2 ranks, each model-loading stage in its own process: rank 0
    alone samples, labels and evaluates, both ranks train; SFT and the reward model come out as
    in one process (the RL stage samples per rank, so its weights differ by design)."""
    from dataclasses import replace

    from test_pipeline import _cfg

    from rlhfkit.pipeline import run as pipeline

    one, two = tmp_path / "one", tmp_path / "two"
    pipeline.main(_cfg(tiny_model_dir, one))
    cfg = _cfg(tiny_model_dir, two, isolate_stages=True)
    run_two_ranks(pipeline.main, replace(cfg, model=replace(cfg.model, parallel="fsdp2")))
    for output in ("candidates.jsonl", "pairs.jsonl", "policy/final", "eval.json", "report.html"):
        assert (two / output).exists(), output
    assert (one / "pairs.jsonl").read_text() == (two / "pairs.jsonl").read_text()
    for stage in ("sft", "rm"):
        a = load_file(str(one / stage / "final" / "model.safetensors"))
        b = load_file(str(two / stage / "final" / "model.safetensors"))
        for name in a:
            torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=0)


def test_ppo_resumes_policy_critic_and_kl_controller(tiny_model_dir, pg_task, tmp_path):
    """PPO with a critic and the adaptive KL controller under fsdp2: killed after a checkpoint
    and resumed, it ends with the policy, the value model and the KL coefficient of an
    uninterrupted run."""

    def cfg(run):
        return rl_config(tiny_model_dir, pg_task, tmp_path / run, "fsdp2", "ppo",
                         loop__max_steps=4, loop__save_every=2, algo__kl_coef=0.05,
                         algo__kl_target=0.01)  # fmt: skip

    run_two_ranks(scripted_rl, cfg("straight"))
    with pytest.raises(Exception, match=r"killed"):
        run_two_ranks(partial(main_until, scripted_rl, step=2), cfg("cut"))
    run_two_ranks(scripted_rl, cfg("cut"))
    prefixes = ("train/", "critic/")
    assert_same_run(tmp_path / "straight", tmp_path / "cut", prefixes, n_records=4)
    for name in ("final", "critic"):
        a = load_file(str(tmp_path / "straight" / name / "model.safetensors"))
        b = load_file(str(tmp_path / "cut" / name / "model.safetensors"))
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
    kl = [r["train/kl_coef"] for r in records(tmp_path / "cut", ("train/kl_coef",)) if r]
    assert len(set(kl)) > 1  # the controller moved the coefficient, and resumed it
