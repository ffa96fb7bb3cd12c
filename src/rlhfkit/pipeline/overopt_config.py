"""The configuration of ``rlhfkit overopt`` (:mod:`rlhfkit.pipeline.overopt`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from rlhfkit.config import LogConfig, LoopConfig, ModelConfig, OptimConfig, Problems
from rlhfkit.pipeline.config import CandidatesConfig
from rlhfkit.recipes import policy_gradient as pg
from rlhfkit.recipes import reward_model, sft
from rlhfkit.rollout.hf import SamplingConfig
from rlhfkit.validation import model_path_problem


@dataclass
class ProxiesConfig:
    """Step 3: the proxy reward models."""

    budgets: tuple[int, ...] = (64, 256, 1024)
    """Label budgets: each proxy trains on the pool's first b pairs (nested, as in Gao et al.)."""
    label_noise: float = 0.0
    """Share of a budget's pairs whose labels are flipped (seeded)."""
    ensemble: int = 1
    """Reward models per budget, member k with seed + k (K > 1: the ensemble curves too; with
    warm, one initialisation and data order seed + k)."""
    modes: tuple[str, ...] = ("mean", "min", "uwo")
    """Ensemble modes compared (K > 1): mean, min (worst case), uwo (mean - uwo_lambda * std)."""
    uwo_lambda: float = 1.0
    """The std penalty of the uwo mode."""
    warm: bool = False
    """Also the WARM model of each budget: the element-wise mean of its K members' weights."""
    epochs: float = 1.0
    """Passes over a budget's pairs; steps = max(min_steps, ceil(epochs * b / batch_size))."""
    min_steps: int = 8
    """Fewest optimiser steps of a proxy."""
    mix_builtin: bool = True
    """Pool the task's own gold-labelled training pairs with the policy's sampled pairs."""


@dataclass
class BonConfig:
    """Steps 4-5: best-of-n on held-out prompts."""

    source: str = "builtin:preferences"
    """Held-out prompts with the gold judge's fields."""
    split: str = "heldout"
    """Split of the source."""
    prompts: int = 24
    """Distinct prompts."""
    samples: int = 64
    """N: samples per prompt (the unbiased estimator uses all N for every n <= N)."""
    max_n: int = 64
    """Largest n of the curve (n = 1, 2, 4, ... up to it)."""
    max_new_tokens: int = 64
    """Length limit of every sample."""
    temperature: float = 1.0
    """Sampling temperature."""


def _default_rl() -> pg.PGConfig:
    """GRPO, 6 steps of 16 prompts x 4 samples.

    Sampling is most of a step, and a decode step costs about as much for 64 rows as for 32:
    on the AMX CPU 16 prompts per step took 17 s against 11.4 s for 8, a quarter less per
    rollout, so the default takes fewer, larger steps at twice the learning rate. The policy
    still moves as far: its KL to the start reached 5 nats by the third step, as far as 20
    steps of 8 prompts at 3e-5 went.
    """
    return pg.PGConfig(
        data=pg.PGDataConfig(train="builtin:preferences", schema="preference"),
        algo=pg.PGAlgoConfig(preset="grpo"),
        sampling=SamplingConfig(max_new_tokens=64, temperature=1.0, num_samples=4),
        optim=OptimConfig(lr=6e-5, schedule="constant", warmup_ratio=0.0),
        loop=LoopConfig(batch_size=16, max_steps=6, save_every=3, micro_batch_tokens=768),
    )


@dataclass
class OveroptConfig:
    """rlhfkit overopt: proxy reward models at several label budgets, best-of-n and RL.

    Every point is scored by the proxy and by gold; Gao's fits and a report page.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    """The starting model (every stage's precision and loading options)."""
    policy: str | None = None
    """An instruction-tuned policy to start from (None: the sft stage makes one)."""
    sft: sft.SFTConfig = field(
        default_factory=lambda: sft.SFTConfig(
            data=sft.SFTDataConfig(mask_mode="all_assistant_turns"),
            optim=OptimConfig(lr=5e-5, warmup_ratio=0.1),
            loop=LoopConfig(batch_size=16, max_steps=30, micro_batch_tokens=2048),
        )
    )
    candidates: CandidatesConfig = field(
        default_factory=lambda: CandidatesConfig(
            limit=160,
            sampling=SamplingConfig(max_new_tokens=64, temperature=1.0, num_samples=4),
        )
    )
    proxies: ProxiesConfig = field(default_factory=ProxiesConfig)
    rm: reward_model.RMConfig = field(
        default_factory=lambda: reward_model.RMConfig(
            data=reward_model.RMDataConfig(eval=None),
            optim=OptimConfig(lr=1e-4, warmup_ratio=0.1),
            loop=LoopConfig(batch_size=16, micro_batch_tokens=2048, save_every=32),
        )
    )
    """Reward-model training (its steps come from proxies.epochs and the budget)."""
    bon: BonConfig = field(default_factory=BonConfig)
    rl_on: tuple[str, ...] = ("single",)
    """Proxies optimised by RL, per budget: single (seed 0), an ensemble mode (mean, min, uwo;
    needs proxies.ensemble > 1) or warm. Empty: no RL stage."""
    rl: pg.PGConfig = field(default_factory=_default_rl)
    """The RL runs' settings (GRPO; the rewards are the proxy and, at weight 0, the gold judge)."""
    rl_eval_samples: int = 8
    """Samples of each best-of-n prompt drawn from every RL run's final policy and scored by
    gold and its proxy (the RL end point on the held-out test set); 0: none."""
    rl_block: int = 2
    """RL steps averaged per point of the RL curve (one step's rollouts cover few prompts)."""
    seed: int = 0
    """Added to the seeds of the candidates, the proxies and the RL runs, to repeat the
    experiment (the held-out best-of-n samples keep theirs: the same test set every time)."""
    cache_dir: str | None = None
    """Where samples and their scores are cached (None: <run>/cache); runs that share it and
    the policy sample the held-out prompts once."""
    isolate_stages: bool = True
    """Run each model-loading step in a process of its own (memory goes back to the system)."""
    log: LogConfig = field(default_factory=lambda: LogConfig(run_dir="runs/overopt"))

    def problems(self) -> Problems:
        """Budgets, noise, ensemble size, the n grid, the RL proxies and the policy path."""
        out: list[tuple[str, str]] = []
        p = self.proxies
        if not p.budgets or any(b < 2 for b in p.budgets):
            out.append(("proxies.budgets", f"need one or more budgets >= 2, got {p.budgets}"))
        if not 0.0 <= p.label_noise < 0.5:
            out.append(("proxies.label_noise", f"must be in [0, 0.5), got {p.label_noise}"))
        if p.ensemble < 1:
            out.append(("proxies.ensemble", f"must be >= 1, got {p.ensemble}"))
        bad = [m for m in p.modes if m not in ("mean", "min", "uwo")]
        if bad:
            out.append(("proxies.modes", f"unknown mode(s) {bad}; choose mean, min or uwo"))
        if not 1 <= self.bon.max_n <= self.bon.samples:
            out.append(("bon.max_n", f"must be in 1..bon.samples = {self.bon.samples}, got "
                        f"{self.bon.max_n}"))  # fmt: skip
        if self.rl_eval_samples < 0:
            out.append(("rl_eval_samples", f"must be >= 0, got {self.rl_eval_samples}"))
        if self.rl_block < 1:
            out.append(("rl_block", f"must be >= 1, got {self.rl_block}"))
        if self.bon.prompts < 2:
            out.append(("bon.prompts", f"need at least 2 prompts, got {self.bon.prompts}"))
        out += [("rl_on", text) for text in map(self._rl_on_problem, self.rl_on) if text]
        if self.policy is not None:
            out += [("policy", t) for t in [model_path_problem(self.policy)] if t]
        return out

    def _rl_on_problem(self, name: str) -> str | None:
        if name not in ("single", "warm", "mean", "min", "uwo"):
            return f"unknown proxy {name!r}; choose single, warm, mean, min or uwo"
        if name in ("mean", "min", "uwo") and self.proxies.ensemble < 2:
            return f"{name!r} needs proxies.ensemble >= 2"
        if name == "warm" and (self.proxies.ensemble < 2 or not self.proxies.warm):
            return "'warm' needs proxies.warm and proxies.ensemble >= 2"
        return None
