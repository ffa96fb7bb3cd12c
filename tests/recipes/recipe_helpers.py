"""Helpers shared by the recipe tests: data files, reward-model references, configs, and the
2-process gloo harness (torchrun's environment) of the distributed tests."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from rlhfkit.config import LogConfig, LoopConfig, ModelConfig, OptimConfig
from rlhfkit.models.tiny import tiny_tokenizer
from rlhfkit.recipes import reward_model as rm

# Data


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """Write ``rows`` as JSON lines; returns ``path``."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def render_reply(tokenizer: Any, prompt: str | list[dict], completion: str) -> list[int]:
    """Token ids of a prompt (text: one user turn; or messages) and its reply as the assistant's
    turn, rendered by the tokenizer's own chat template."""
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    messages = [*msgs, {"role": "assistant", "content": completion}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# Reward models


def save_reward_model(base_dir: Path, path: Path, seed: int) -> Path:
    """Save the tiny model at ``base_dir`` as a 1-label reward model at ``path``.

    Its head is ``0.5 * randn`` from ``seed``: larger weights than a fresh head, so rewards are
    of order 1 and far apart. The tokenizer is saved beside it (pad id set on the config).
    """
    model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=1)
    tokenizer = tiny_tokenizer()
    model.config.pad_token_id = tokenizer.pad_token_id
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.score.weight.copy_(0.5 * torch.randn(model.score.weight.shape, generator=gen))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def hf_reward_model(path: Path) -> torch.nn.Module:
    """The reference scorer: transformers' own class and sdpa (eager softmaxes in fp32), fp64."""
    return AutoModelForSequenceClassification.from_pretrained(
        path, dtype=torch.float64, attn_implementation="sdpa"
    ).eval()


def rm_config(model_dir: Path, train: Path | str, run_dir: Path, **loop: Any) -> rm.RMConfig:
    """A small fp32 reward-model run on ``train`` (also its eval set): 4 groups per step,
    128-token micro-batches, lr 2e-3 without warm-up; ``loop`` sets more LoopConfig fields."""
    return rm.RMConfig(
        model=ModelConfig(name=str(model_dir), precision="fp32"),
        data=rm.RMDataConfig(train=str(train), eval=str(train), eval_split="train", max_len=256),
        optim=OptimConfig(lr=2e-3, warmup_ratio=0.0),
        loop=LoopConfig(**{"batch_size": 4, "micro_batch_tokens": 128, **loop}),
        log=LogConfig(run_dir=str(run_dir), tensorboard=False, progress=False),
    )


# Two gloo ranks


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, main: Callable[[Any], Any], cfg: Any, done_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
    )  # fmt: skip
    torch.set_num_threads(1)
    try:
        main(cfg)
        if torch.distributed.is_initialized():  # both ranks done before either tears down
            torch.distributed.barrier()
        (Path(done_dir) / f"rank{rank}").touch()
    finally:
        if torch.distributed.is_initialized():  # a pipeline's stages may run in child processes
            torch.distributed.destroy_process_group()


def run_two_ranks(main: Callable[[Any], Any], cfg: Any) -> None:
    """Run ``main(cfg)`` in 2 spawned processes with torchrun's environment (gloo on CPU).

    A rank that dies *after* both ranks finished ``main`` (gloo's teardown in
    ``destroy_process_group`` rarely aborts a process with "terminate called without an active
    exception") does not fail the test: its outputs are complete, and the test checks them.
    Any failure before that is raised as usual.
    """
    import tempfile

    with tempfile.TemporaryDirectory() as done:
        try:
            mp.spawn(_rank_main, args=(free_port(), main, cfg, done), nprocs=2, join=True)
        except mp.ProcessExitedException:
            if not all((Path(done) / f"rank{r}").exists() for r in range(2)):
                raise


def records(run: Path, prefixes: tuple[str, ...]) -> list[dict]:
    """The run's metric records, each cut to the keys that start with one of ``prefixes``."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k.startswith(prefixes)} for r in rows]


def assert_same_run(
    single: Path, double: Path, prefixes: tuple[str, ...], n_records: int
) -> dict[str, torch.Tensor]:
    """The two runs logged ``n_records`` records with the same ``prefixes`` keys and values, and
    saved the same final weights (both within 1e-5); returns the first run's final weights.

    A logged value may differ by 5e-7 of its size on top of the 1e-5: the two runs split the
    batch into other micro-batches, so an fp32 sum such as a sequence's log-probability (-170 on
    the tiny model) differs in its last bits (1.1e-5 there on an AMD EPYC)."""
    a, b = records(single, prefixes), records(double, prefixes)
    assert len(a) == len(b) == n_records
    for ra, rb in zip(a, b, strict=True):
        assert ra.keys() == rb.keys()
        for key in ra:
            bound = 1e-5 + 5e-7 * abs(ra[key])
            assert abs(ra[key] - rb[key]) < bound, (key, ra[key], rb[key])
    wa = load_file(str(single / "final" / "model.safetensors"))
    wb = load_file(str(double / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-5, rtol=0)
    return wa


def pg_config(base: dict[str, Any], **over: Any) -> Any:
    """A ``PGConfig`` from a nested dict, with ``section__field=value`` overrides."""
    from rlhfkit.config import from_dict
    from rlhfkit.recipes import policy_gradient as pg

    for key, value in over.items():
        section, _, name = key.partition("__")
        base.setdefault(section, {})[name] = value
    return from_dict(pg.PGConfig, base)


def read_metrics(run_dir: Path) -> list[dict]:
    """Every record of a run's metrics.jsonl."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def pg_setup(cfg: Any) -> tuple[Any, Any, Any]:
    """The run context, the policy-gradient run objects and a fresh loop state for ``cfg``,
    built as ``rlhfkit rl`` builds them (seed 0, no run directory writes besides the log)."""
    from rlhfkit.recipes.policy_gradient import loop
    from rlhfkit.recipes.policy_gradient.config import resolve_preset
    from rlhfkit.recipes.policy_gradient.state import LoopState
    from rlhfkit.training.run import build_run

    ctx = build_run(cfg.model, cfg.log, 0, {})
    return ctx, loop.prepare(ctx, cfg, resolve_preset(cfg.algo)), LoopState()


def pg_rollout(run: Any, state: Any, critic: Any = None) -> Any:
    """Steps 1-5 of a policy-gradient step: a rollout batch with its advantages."""
    from rlhfkit.recipes.policy_gradient.advantages import assign_advantages, attach_logprobs
    from rlhfkit.recipes.policy_gradient.collect import collect

    batch = collect(run, state)
    attach_logprobs(run, batch)
    if critic is not None:
        critic.attach_values(batch.batches)
    assign_advantages(run, state, batch)
    return batch


# Environments


class EchoEnv:
    """A multi-turn test environment: every reply gets the user message ``answer`` until the
    ``turns``-th, whose reward is its count of the letter a (then the episode ends)."""

    def __init__(self, turns: int = 3, answer: str = "go on") -> None:
        self.tools: list[dict] = []
        self.call_format = None
        self.turns, self.answer, self.n = turns, answer, 0

    def reset(self, fields: dict) -> list[dict]:
        self.n = 0
        prompt = fields["prompt"]
        return list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]

    def step(self, message: str) -> Any:
        from rlhfkit.envs.base import StepResult

        self.n += 1
        if self.n >= self.turns:
            return StepResult([], float(message.count("a")), True, {"echoes": 0.0})
        return StepResult([{"role": "user", "content": self.answer}], 0.0, False, {"echoes": 1.0})


def tiny_sft(base: Any, limit: int, steps: int) -> Any:
    """``base`` (an SFTConfig) on the first ``limit`` rows for ``steps`` tiny steps, no eval."""
    from dataclasses import replace

    from rlhfkit.config import LoopConfig, OptimConfig

    return replace(
        base,
        data=replace(base.data, limit=limit, eval=None),
        optim=OptimConfig(lr=1e-3, warmup_ratio=0.0),
        loop=LoopConfig(max_steps=steps, batch_size=4, micro_batch_tokens=512),
    )
