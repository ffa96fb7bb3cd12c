"""The pipeline's reward-model ensemble (``rm_ensemble`` K > 1): members, WARM, RL reward, accuracy.

- **rm stage** (:func:`train_members`): K reward models on the same pairs, member k with seed
  ``rm.loop.seed + k`` (its own data order and head), in ``<run>/rm/members/s<k>/final``. Each
  is skipped when its final model exists and resumes from its checkpoints, which are deleted
  once it is done. ``<run>/rm/final`` is then their weight average (WARM,
  :func:`rlhfkit.models.merge.average_model_dirs`): the stage's output, the model the
  evaluation's reward-model figures and proxy scores read.
- **optimise stage** (:func:`rl_reward_spec`): the RL reward is ``rm:<run>/rm/final`` for K = 1
  or ``rm_combine`` warm, else ``rm-ensemble:<mode>:<member dirs>`` (Coste et al. 2023; uwo with
  ``uwo=<rm_uwo_lambda>``).
- **eval stage** (:func:`ensemble_accuracy`): the held-out pairwise accuracy, overall and per
  category, of every member, of the ensemble under each mode (the members' scores of each pair
  combined by :func:`rlhfkit.ops.ensemble.rm_ensemble`) and of WARM.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from rlhfkit.eval.reward_model import ScoredPair, rm_report
from rlhfkit.models.merge import average_model_dirs
from rlhfkit.ops.ensemble import ENSEMBLE_MODES, rm_ensemble
from rlhfkit.pipeline.config import PipelineConfig
from rlhfkit.recipes import reward_model
from rlhfkit.recipes.reward_model_eval import RMEvalConfig, score_models


def member_dir(run: Path, k: int) -> Path:
    """The run directory of member k (its model is ``final`` in it)."""
    return run / "rm" / "members" / f"s{k}"


def member_finals(cfg: PipelineConfig, run: Path) -> list[Path]:
    """The final models of the ``rm_ensemble`` members, in seed order."""
    return [member_dir(run, k) / "final" for k in range(cfg.rm_ensemble)]


def warm_members(cfg: PipelineConfig) -> bool:
    """Whether the members share one initialisation (rm_combine warm).

    Weight averaging needs members fine-tuned from one start: they share seed and differ in
    data order (data_seed); otherwise each member has its own seed.
    """
    return cfg.rm_combine == "warm"


def uses_ensemble_spec(cfg: PipelineConfig) -> bool:
    """Whether RL scores with the members themselves (K > 1 and a mode other than warm)."""
    return cfg.rm_ensemble > 1 and cfg.rm_combine != "warm"


def rl_reward_spec(cfg: PipelineConfig, run: Path) -> str:
    """The RL stage's reward spec: ``rm:<run>/rm/final`` or ``rm-ensemble:<mode>:<dirs>``.

    Raises:
        ValueError: An ensemble whose member paths contain a comma (the spec's separator).
    """
    if not uses_ensemble_spec(cfg):
        return f"rm:{run / 'rm' / 'final'}"
    dirs = [str(p) for p in member_finals(cfg, run)]
    if any("," in d for d in dirs):
        raise ValueError(f"{run}: a run directory with a comma cannot name an rm-ensemble reward")
    mode = f"uwo={float(cfg.rm_uwo_lambda)!r}" if cfg.rm_combine == "uwo" else cfg.rm_combine
    return f"rm-ensemble:{mode}:{','.join(dirs)}"


def _wait_for(path: Path, poll: float = 1.0) -> None:
    while not path.exists():
        time.sleep(poll)


def train_members(cfg: PipelineConfig, run: Path, sub: reward_model.RMConfig) -> None:
    """The rm stage with K > 1: train the members, then write ``<run>/rm/final`` (WARM).

    Args:
        cfg: The pipeline's config (``rm_ensemble`` members).
        run: The run directory.
        sub: The reward-model recipe's config of one member (model, data, loop and log set);
            member k gets seed ``sub.loop.seed + k`` and its own run directory.
    """
    for k in range(cfg.rm_ensemble):
        out = member_dir(run, k)
        if (out / "final").exists():
            continue
        key = "data_seed" if warm_members(cfg) else "seed"
        seeds = {key: sub.loop.seed + k}
        loop = replace(sub.loop, **seeds, resume=(out / "checkpoints" / "latest").exists())
        reward_model.main(replace(sub, loop=loop, log=replace(sub.log, run_dir=str(out))))
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    final = run / "rm" / "final"
    if int(os.environ.get("RANK", "0")) == 0:  # one writer under torchrun; the others wait
        average_model_dirs(member_finals(cfg, run), final)
    else:
        _wait_for(final)


def combine_pairs(members: list[list[ScoredPair]], mode: str, lam: float) -> list[ScoredPair]:
    """The ensemble's scored pairs: each side's K member scores combined by ``rm_ensemble``.

    Args:
        members: K lists of the same pairs (same order), one per member.
        mode: mean, min or uwo.
        lam: The std penalty of uwo.

    Raises:
        ValueError: Members with different numbers of pairs, or an unknown mode.
    """
    first = members[0]
    if any(len(m) != len(first) for m in members):
        raise ValueError(f"members scored different pair counts: {[len(m) for m in members]}")
    grid = torch.tensor(
        [[p.chosen for p in m] + [p.rejected for p in m] for m in members], dtype=torch.float64
    )  # (K, 2P): chosen sides, then rejected sides
    combined = rm_ensemble(grid, mode, lam).tolist()
    n = len(first)
    return [replace(p, chosen=combined[i], rejected=combined[n + i]) for i, p in enumerate(first)]


def accuracy_summary(report: dict[str, Any]) -> dict[str, Any]:
    """``{"accuracy", "pairs", "by_category"}`` of an ``rm eval`` report."""
    return {
        "accuracy": report["overall"]["accuracy"],
        "pairs": report["overall"]["pairs"],
        "by_category": {k: v["accuracy"] for k, v in report["per_category"].items()},
    }


def ensemble_accuracy(
    cfg: PipelineConfig, run: Path, rm_eval: RMEvalConfig, warm_report: dict[str, Any]
) -> dict[str, Any]:
    """The eval stage's ``reward_model["ensemble"]`` block (K > 1).

    Args:
        cfg: The pipeline's config.
        run: The run directory.
        rm_eval: The held-out data and scoring settings (its model is replaced by each member).
        warm_report: The ``rm eval`` report of ``<run>/rm/final`` (WARM), already computed.

    Returns:
        ``{"members": [{"seed", "dir", "accuracy", "pairs", "by_category"}], "modes": {mode:
        {"accuracy", "pairs", "by_category"} (uwo also "lambda")}, "warm": {...}, "used": the
        rm_combine that RL optimised (None under DPO), "proxy": its reward spec (None under
        DPO)}``.
    """
    dirs = member_finals(cfg, run)
    scored, _ = score_models(rm_eval, [str(d) for d in dirs])
    members = [
        {"seed": cfg.rm.loop.seed + k, "dir": str(path), **accuracy_summary(rm_report(pairs))}
        for k, (path, pairs) in enumerate(zip(dirs, scored, strict=True))
    ]
    lam = cfg.rm_uwo_lambda
    modes = {}
    for mode in ENSEMBLE_MODES:
        modes[mode] = accuracy_summary(rm_report(combine_pairs(scored, mode, lam)))
        if mode == "uwo":
            modes[mode]["lambda"] = lam
    rl = cfg.optimise.method != "dpo"
    return {
        "members": members,
        "modes": modes,
        "warm": accuracy_summary(warm_report),
        "used": cfg.rm_combine if rl else None,
        "proxy": rl_reward_spec(cfg, run) if rl else None,
    }
