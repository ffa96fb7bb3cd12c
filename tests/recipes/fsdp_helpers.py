"""Helpers of the FSDP2 tests, importable by the spawned ranks.

:class:`ScriptedGenerator` replaces the sampler in the policy-gradient comparisons: its
completions are a pure function of the prompt, the sample index and the batch seed, so the
rollouts of a 2-rank run (each rank sampling its share of the prompts) are exactly those of one
process, and the comparison isolates the sharded training step.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Sequence
from typing import Any

import torch

from rlhfkit.types import Rollout


class ScriptedGenerator:
    """A ``Generator`` whose samples depend only on (prompt, sample index, seed)."""

    def __init__(self, model: Any, *, pad_id: int, eos_ids: Sequence[int], tokenizer: Any = None):
        self.eos, self.vocab = int(eos_ids[0]), int(model.get_input_embeddings().num_embeddings)

    def generate(self, prompts: Sequence[Sequence[int]], sampling: Any) -> Rollout:
        g, out, reasons = sampling.num_samples, [], []
        for prompt in prompts:
            for j in range(g):
                key = hashlib.sha256(f"{list(prompt)}|{j}|{sampling.seed}".encode()).digest()
                rng = random.Random(key)
                n = rng.randint(2, sampling.max_new_tokens)
                ids = [rng.randrange(3, self.vocab) for _ in range(n)]
                if rng.random() < 0.5:
                    ids[-1] = self.eos
                out.append(ids)
                reasons.append("eos" if ids[-1] == self.eos else "length")
        n = len(prompts) * g
        return Rollout(
            prompt_index=[i // g for i in range(n)],
            prompt_ids=[list(prompts[i // g]) for i in range(n)],
            completion_ids=out,
            logprobs=[[-1.0] * len(c) for c in out],
            finish_reasons=reasons,
            entropies=[[0.0] * len(c) for c in out],
        )


def scripted_rl(cfg: Any) -> Any:
    """``rlhfkit rl`` with :class:`ScriptedGenerator` as the sampler."""
    from rlhfkit.recipes.policy_gradient import loop

    original, loop.HFGenerator = loop.HFGenerator, ScriptedGenerator
    try:
        return loop.main(cfg)
    finally:
        loop.HFGenerator = original


def shard_sizes(cfg: Any) -> None:
    """Build the run of ``cfg`` and write this rank's (stored, total) parameter counts."""
    from rlhfkit.models.sharding import local_numel
    from rlhfkit.training.run import build_run

    ctx = build_run(cfg.model, cfg.log, 0, {})
    local, total = local_numel(ctx.model)
    path = f"{cfg.log.run_dir}/sizes-{os.environ['RANK']}.txt"
    with open(path, "w") as f:
        f.write(f"{local} {total} {type(next(ctx.model.parameters())).__name__}\n")
    torch.distributed.barrier()


class Crash(RuntimeError):
    """Stands for a killed run in the resume tests."""


def main_until(main: Any, cfg: Any, step: int) -> None:
    """``main(cfg)`` that dies right after writing the checkpoint of ``step``."""
    from rlhfkit.training.context import RunContext

    original = RunContext.save

    def save(self: RunContext, *args: Any, **kwargs: Any) -> Any:
        path = original(self, *args, **kwargs)
        if self.step == step:
            raise Crash(f"killed after the checkpoint of step {step}")
        return path

    RunContext.save = save
    try:
        main(cfg)
    finally:
        RunContext.save = original


def sft_until(cfg: Any, step: int) -> None:
    """``rlhfkit sft`` that dies right after writing the checkpoint of ``step``."""
    from rlhfkit.recipes import sft

    main_until(sft.main, cfg, step)


RM_COMPLETIONS = ["a", "a b a", "b", "the answer is a", "no", "a a a a"]
"""Completions a reward model scores in :func:`reward_model_scores` (rank r scores 1 + 3r)."""


def reward_model_scores(cfg: Any, rm_dir: str) -> None:
    """Load ``rm:<rm_dir>`` as the run of ``cfg`` places it; write this rank's stored share of it
    and its scores of a rank-dependent number of completions (so the ranks' passes differ)."""
    from rlhfkit.models.sharding import local_numel
    from rlhfkit.rewards import load_reward_fn, reward_models, score_completions
    from rlhfkit.training.run import build_run

    ctx = build_run(cfg.model, cfg.log, 0, {})
    scorer = load_reward_fn(f"rm:{rm_dir}", place=ctx.place.frozen, precision="fp32")
    rank = int(os.environ["RANK"])
    texts = RM_COMPLETIONS[: 1 + 3 * rank]
    with ctx.gathered(*reward_models([scorer])):
        scores = score_completions(scorer, texts, [{"prompt": "Say a"}] * len(texts))
    local, total = local_numel(scorer.model)
    with open(f"{cfg.log.run_dir}/rm-{rank}.txt", "w") as f:
        f.write(f"{local} {total}\n" + " ".join(repr(s) for s in scores) + "\n")
    torch.distributed.barrier()
