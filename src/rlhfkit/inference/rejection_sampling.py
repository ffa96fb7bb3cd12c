"""``rlhfkit rs``: rejection sampling, then SFT on the selection (RLHF book ch. 9).

Rejection sampling (the book's chapter 9; Llama 2, RAFT, STaR-style filtering) fine-tunes the
starting model on its own best completions:

1. Load M prompts (``data.source``) and render them with the chat template.
2. Sample N completions per prompt (``sampling.num_samples``; T 0.8, top-p 0.95 by default),
   with rlhfkit's sampler or, with ``--engine.backend vllm``, a vLLM server.
3. Score them with the rewards (``verifier:auto`` by default; ``rm:<dir>`` for a reward model,
   which receives the completions sorted by length). Samples and scores are cached under
   ``<run_dir>/cache`` by a hash of the model files, prompts and settings.
4. Select (:mod:`rlhfkit.ops.selection`): ``top_per_prompt`` (argmax per prompt) or
   ``top_k_overall`` (the K best of the whole matrix), optionally only completions that ended
   with EOS and scored at least ``selection.min_reward``. The matched random control draws the
   same number of completions at random: from the same prompts for ``top_per_prompt``, from the
   whole matrix for ``top_k_overall``.
5. SFT the **starting** model on the selection (the SFT recipe; ``<run_dir>/sft``), and with
   ``selection.control`` the same SFT on the control (``<run_dir>/control``).
6. With ``heldout.source`` set: greedy held-out evaluation of the starting model, the SFT model
   and the control (``rlhfkit eval``'s engine), written to ``<run_dir>/summary.json``.

Every stage is skipped when its output is complete (samples and scores in the cache, a stage's
``final`` model), and an interrupted SFT resumes from its last checkpoint, so re-running the
same command continues where it stopped.

Deviation from the papers: none in the selection rules; Llama 2 re-samples with each new model
(iterated RS), which is this command run again with ``--model.name <run_dir>/sft/final``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from rich.console import Console
from rich.table import Table

from rlhfkit.atomic import atomic_write_text
from rlhfkit.config import EngineConfig, LogConfig, LoopConfig, ModelConfig, OptimConfig
from rlhfkit.data.prompts import PromptRow
from rlhfkit.eval.run import Grid
from rlhfkit.eval.summary import grid_report
from rlhfkit.inference.evaluate import EvalDataConfig, evaluate_prompts
from rlhfkit.ops.selection import random_k_overall, random_per_prompt, select
from rlhfkit.recipes import sft
from rlhfkit.rewards.base import rewards_problems
from rlhfkit.rollout.hf import SamplingConfig
from rlhfkit.rollout.vllm_server import require_engine

log = logging.getLogger(__name__)


@dataclass
class SelectionConfig:
    """Which completions are kept."""

    mode: Literal["top_per_prompt", "top_k_overall"] = "top_per_prompt"
    """argmax per prompt, or the K best completions overall."""
    k: int | None = None
    """K of top_k_overall."""
    min_reward: float | None = None
    """Drop selected completions that score below this (e.g. 1.0: only verified-correct ones)."""
    finished_only: bool = True
    """Only completions that ended with EOS (a truncated one teaches the model not to stop)."""
    control: bool = True
    """Also SFT on a matched random selection (the control)."""
    seed: int = 0
    """Seed of the random control."""


@dataclass
class HeldoutConfig:
    """Greedy held-out evaluation of the starting, SFT and control models (optional)."""

    source: str | None = None
    """Evaluation prompts (e.g. builtin:arithmetic); None skips this stage."""
    split: str = "heldout"
    """Split of the evaluation source."""
    limit: int | None = 200
    """Prompts evaluated."""
    max_new_tokens: int = 64
    """Length limit of the greedy completions."""


@dataclass
class RSConfig:
    """rlhfkit rs: rejection sampling (sample N, score, select) then SFT on the selection."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: EvalDataConfig = field(default_factory=lambda: EvalDataConfig(split="train", limit=256))
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(
            max_new_tokens=128, temperature=0.8, top_p=0.95, num_samples=8
        )
    )
    engine: EngineConfig = field(default_factory=EngineConfig)
    """Samples and the held-out evaluation on rlhfkit's sampler or vLLM (a vllm_url serves the
    starting model only: the trained models get servers of their own)."""
    rewards: tuple[str, ...] = ("verifier:auto",)
    """Scorers: verifier:NAME (auto: each row's own), rm:DIR, rm-ensemble:MODE:DIR,DIR,
    judge:MODEL, rubric:FILE (|judge:MODEL, |implicit), module:function or file.py:fn."""
    weights: tuple[float, ...] = ()
    """One weight per reward (default 1 each)."""
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5))
    """SFT optimiser (the SFT recipe's)."""
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(batch_size=16, epochs=2.0))
    """SFT batching and length."""
    heldout: HeldoutConfig = field(default_factory=HeldoutConfig)
    chunk: int = 32
    """Prompts per generator call."""
    log: LogConfig = field(default_factory=lambda: LogConfig(run_dir="runs/rs"))

    def problems(self) -> list[tuple[str, str]]:
        """Rewards that cannot load, found before any model loads."""
        return rewards_problems(self.rewards)


def pick(grid: Grid, cfg: SelectionConfig) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Step 4: the selection and its matched random control, as (prompt, sample) pairs.

    Completions that may not be selected (truncated ones with ``finished_only``) count as
    skipped (NaN) for both.
    """
    rewards = grid.reward_matrix()  # (M, N)
    if cfg.finished_only:
        truncated = torch.tensor([[f == "length" for f in row] for row in grid.finish])
        rewards = rewards.masked_fill(truncated, math.nan)
    chosen = select(rewards, cfg.mode, k=cfg.k)
    if cfg.min_reward is not None:
        chosen = [(i, j) for i, j in chosen if rewards[i, j] >= cfg.min_reward]
    if cfg.mode == "top_per_prompt":
        rows = sorted({i for i, _ in chosen})
        drawn = random_per_prompt(rewards[rows], cfg.seed) if rows else []
        control = [(rows[i], j) for i, j in drawn]
    else:
        control = random_k_overall(rewards, len(chosen), cfg.seed) if chosen else []
    return chosen, control


def write_selection(
    path: Path, pairs: list[tuple[int, int]], prompts: list[PromptRow], grid: Grid
) -> None:
    """The selected completions as SFT rows: the prompt's messages plus the reply."""
    lines = []
    for i, j in pairs:
        reply = {"role": "assistant", "content": grid.texts[i][j]}
        messages = [*prompts[i].fields["prompt"], reply]
        row = {"messages": messages, "reward": grid.rewards[i][j], "prompt_index": i, "sample": j}
        lines.append(json.dumps(row))
    atomic_write_text(path, "\n".join(lines) + "\n")


def train_on(cfg: RSConfig, rows: Path, run_dir: Path) -> Path:
    """Step 5: SFT of the starting model on ``rows``; skipped when ``run_dir/final`` exists."""
    final = run_dir / "final"
    if final.is_dir():
        log.info("%s exists: SFT stage skipped", final)
        return final
    sft_cfg = sft.SFTConfig(
        model=cfg.model,
        data=sft.SFTDataConfig(train=str(rows), eval=None, schema="sft"),
        optim=cfg.optim,
        loop=replace(cfg.loop, resume=(run_dir / "checkpoints" / "latest").exists()),
        log=replace(cfg.log, run_dir=str(run_dir)),
    )
    sft.main(sft_cfg)
    return final


def selection_stats(pairs: list[tuple[int, int]], grid: Grid) -> dict[str, float]:
    """Count, mean reward and mean length of a selection."""
    rewards = [grid.rewards[i][j] for i, j in pairs]
    lengths = [grid.lengths[i][j] for i, j in pairs]
    return {
        "count": len(pairs),
        "reward_mean": sum(rewards) / len(rewards) if rewards else math.nan,
        "length_mean": sum(lengths) / len(lengths) if lengths else math.nan,
    }


def heldout_accuracy(cfg: RSConfig, models: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Step 6: greedy held-out figures of each named model."""
    data = EvalDataConfig(
        source=cfg.heldout.source, split=cfg.heldout.split, limit=cfg.heldout.limit,
        max_prompt_len=cfg.data.max_prompt_len,
    )  # fmt: skip
    greedy = SamplingConfig(max_new_tokens=cfg.heldout.max_new_tokens, temperature=0.0)
    out = {}
    for name, path in models.items():
        engine = cfg.engine if path == cfg.model.name else replace(cfg.engine, vllm_url=None)
        prompts, grid = evaluate_prompts(
            replace(cfg.model, name=path), None, data, greedy, cfg.rewards, cfg.weights,
            chunk=cfg.chunk, cache_dir=str(Path(cfg.log.run_dir) / "cache"), engine=engine,
            log_dir=Path(cfg.log.run_dir),
        )  # fmt: skip
        out[name] = grid_report(grid, [p.fields for p in prompts])["overall"]
    return out


def print_summary(summary: dict[str, Any]) -> None:
    """Selection figures and, when evaluated, held-out accuracy per model."""
    table = Table(title="rejection sampling")
    for name in ("", "count", "reward", "length", "held-out accuracy"):
        table.add_column(name, justify="left" if not name else "right")
    heldout = summary.get("heldout", {})
    for name in ("all", "selected", "control", "start"):
        s = summary["selection"].get(name, {})
        acc = heldout.get({"selected": "sft"}.get(name, name), {}).get("accuracy")
        if not s and acc is None:
            continue
        table.add_row(
            name, str(s.get("count", "-")),
            f"{s['reward_mean']:.3f}" if s else "-", f"{s['length_mean']:.1f}" if s else "-",
            "-" if acc is None else f"{acc:.3f}",
        )  # fmt: skip
    Console().print(table)


def main(cfg: RSConfig) -> dict[str, Any]:
    """Steps 1-6; returns the summary (also written to ``<run_dir>/summary.json``)."""
    require_engine(cfg.engine, cfg.model)
    if cfg.heldout.source:  # the trained models' evaluation starts servers of its own
        require_engine(replace(cfg.engine, vllm_url=None))
    run_dir = Path(cfg.log.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    prompts, grid = evaluate_prompts(  # steps 1-3, cached
        cfg.model, None, cfg.data, cfg.sampling, cfg.rewards, cfg.weights,
        chunk=cfg.chunk, cache_dir=str(run_dir / "cache"), engine=cfg.engine, log_dir=run_dir,
    )  # fmt: skip
    chosen, control = pick(grid, cfg.selection)
    if not chosen:
        raise ValueError(
            "rejection sampling selected nothing: no completion passed the selection "
            f"(min_reward {cfg.selection.min_reward}, finished_only "
            f"{cfg.selection.finished_only}); sample more or relax the selection"
        )
    everything = [(i, j) for i in range(grid.shape[0]) for j in range(grid.shape[1])]
    summary: dict[str, Any] = {
        "selection": {
            "all": selection_stats(
                [(i, j) for i, j in everything if not math.isnan(grid.rewards[i][j])], grid
            ),
            "selected": selection_stats(chosen, grid),
        },
        "sampling": grid_report(grid, [p.fields for p in prompts])["overall"],
    }
    write_selection(run_dir / "selected.jsonl", chosen, prompts, grid)
    models = {
        "start": cfg.model.name,
        "sft": str(train_on(cfg, run_dir / "selected.jsonl", run_dir / "sft")),
    }
    if cfg.selection.control:
        summary["selection"]["control"] = selection_stats(control, grid)
        write_selection(run_dir / "control.jsonl", control, prompts, grid)
        models["control"] = str(train_on(cfg, run_dir / "control.jsonl", run_dir / "control"))
    if cfg.heldout.source:
        summary["heldout"] = heldout_accuracy(cfg, models)
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    print_summary(summary)
    return summary
