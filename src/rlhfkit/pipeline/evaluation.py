"""The pipeline's evaluation stage and the data of its report (``rlhfkit pipeline`` steps 6-7).

Evaluation, on the distinct held-out prompts of the preference task:

- the SFT model samples ``bon_n`` completions per prompt and the final model ``samples``; both
  are scored by the reward model (the proxy) and the gold judge;
- gold and proxy reward, lengths and finished share of each model (over the first ``samples``
  completions of each prompt, so both sides are measured alike);
- win rate of the final model against the SFT model by the gold judge (sample j of a prompt
  against sample j), and by an LLM judge when ``judge`` is set (both orders);
- the headline (:func:`headline`): gold reward of each model and their difference with 95%
  intervals over prompts, win/tie/loss with intervals, and one plain sentence; for all
  prompts, and apart for the task types the preference stages saw and those they never saw
  (``unseen_tasks`` of the pipeline);
- KL(pi_final || pi_SFT), summed over a completion (k1 and k3 on one temperature-1 sample per
  prompt, :func:`rlhfkit.eval.kl.sampled_kl`);
- the reward model's held-out pairwise accuracy against the gold preference, overall and per
  category (the ``rm eval`` report); with ``rm_ensemble`` > 1 also of every member, of the
  ensemble under each mode and of WARM, and which of them RL optimised
  (:func:`rlhfkit.pipeline.ensemble.ensemble_accuracy`);
- the best-of-n curve of the SFT model (:func:`rlhfkit.eval.overopt.bon_curve`): proxy and gold
  reward of the best-by-proxy of n samples against d = sqrt(KL_BoN).

The report adds the training curves (proxy and gold reward and KL per step, read from the
policy run's metrics) and puts the RL curve beside the best-of-n curve (Gao et al. 2023).
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from rlhfkit.atomic import atomic_write_text
from rlhfkit.config import ModelConfig
from rlhfkit.data.tasks.preferences import CORRECT_REWARD, gold_prefers
from rlhfkit.eval.intervals import mean_interval, paired_difference, win_tie_loss
from rlhfkit.eval.kl import sampled_kl
from rlhfkit.eval.overopt import bon_curve
from rlhfkit.inference.evaluate import EvalDataConfig, evaluate_prompts
from rlhfkit.models.load import load_model, load_tokenizer
from rlhfkit.models.precision import default_device, resolve_precision
from rlhfkit.pipeline.config import EvalStageConfig, PipelineConfig
from rlhfkit.pipeline.ensemble import ensemble_accuracy
from rlhfkit.recipes.reward_model_eval import RMEvalConfig, eval_main
from rlhfkit.rollout.hf import SamplingConfig


def _matrix(values: list[list[float | None]]) -> torch.Tensor:
    """(M, N) fp64 tensor with None as NaN."""
    return torch.tensor(
        [[math.nan if v is None else v for v in row] for row in values], dtype=torch.float64
    )


def _mean(values: list[float | None]) -> float:
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.fmean(kept) if kept else math.nan


def _model_figures(grid: Any, proxy: str, gold: str, n: int) -> dict[str, float]:
    """Gold and proxy reward, length and finished share over the first n samples per prompt."""
    cols = range(n)
    return {
        "proxy": _mean([grid.components[proxy][i][j] for i in range(grid.shape[0]) for j in cols]),
        "gold": _mean([grid.components[gold][i][j] for i in range(grid.shape[0]) for j in cols]),
        "length": _mean([float(row[j]) for row in grid.lengths for j in cols]),
        "finished": _mean([float(row[j] != "length") for row in grid.finish for j in cols]),
    }


def gold_outcomes(prompts: list[Any], sft: Any, final: Any, n: int) -> list[list[float]]:
    """Per prompt, the gold verdicts of final sample j against SFT sample j (1 / 0.5 / 0)."""
    return [
        [
            gold_prefers(
                final.texts[i][j], sft.texts[i][j], p.fields["reference"], p.fields.get("task")
            )
            for j in range(n)
        ]
        for i, p in enumerate(prompts)
    ]


def _gold_win_rate(outcomes: list[list[float]]) -> dict[str, float]:
    """Win, tie and loss shares over all comparisons of :func:`gold_outcomes`."""
    flat = [o for row in outcomes for o in row]
    total = len(flat)
    return {
        "win": sum(o == 1.0 for o in flat) / total,
        "tie": sum(o == 0.5 for o in flat) / total,
        "loss": sum(o == 0.0 for o in flat) / total,
        "n": total,
    }


def _prompt_means(grid: Any, gold: str, n: int) -> list[float]:
    """Each prompt's mean gold reward over its first n samples (a blank sample scores 0)."""
    return [statistics.fmean(row[:n]) for row in grid.components[gold]]


def on_policy_agreement(proxy: list[list[float]], gold: list[list[float]]) -> dict[str, Any]:
    """How often the reward model orders two samples of one prompt as the gold judge does.

    Over every pair (i, j) of one prompt's samples whose gold scores differ, the share with
    ``sign(proxy_i - proxy_j) == sign(gold_i - gold_j)`` (a proxy tie counts half); apart for
    the pairs where exactly one sample scores at least ``CORRECT_REWARD`` (a right answer,
    padded by at most a few words). This is the accuracy RL depends on: the ranking of the
    policy's own samples, not of the held-out reference pairs.

    Args:
        proxy: (M, N) reward-model scores of M prompts' N samples.
        gold: (M, N) gold scores of the same samples.

    Returns:
        ``{"pairs", "accuracy", "correctness_pairs", "correctness_accuracy"}`` (an accuracy
        is NaN without pairs).
    """
    hits = {"all": [], "correctness": []}
    for p_row, g_row in zip(proxy, gold, strict=True):
        cells = [
            (p, g) for p, g in zip(p_row, g_row, strict=True) if p is not None and g is not None
        ]
        for a, (pa, ga) in enumerate(cells):
            for pb, gb in cells[a + 1 :]:
                if abs(ga - gb) < 1e-9:
                    continue
                hit = 0.5 if pa == pb else float((pa - pb) * (ga - gb) > 0)
                hits["all"].append(hit)
                if (ga >= CORRECT_REWARD) != (gb >= CORRECT_REWARD):
                    hits["correctness"].append(hit)
    return {
        "pairs": len(hits["all"]),
        "accuracy": _mean(hits["all"]),
        "correctness_pairs": len(hits["correctness"]),
        "correctness_accuracy": _mean(hits["correctness"]),
    }


def _verdict(diff: dict[str, float], wtl: dict[str, Any]) -> str:
    """One plain sentence on a group's gold gain and win/loss ratio."""
    gain = diff["mean"]
    if diff["low"] > 0:
        verdict = f"RLHF raised the gold reward by {gain:.2f} (95% interval {diff['low']:.2f} to "
        verdict += f"{diff['high']:.2f}, so the gain is real, not noise)"
    elif diff["high"] < 0:
        verdict = f"RLHF lowered the gold reward by {-gain:.2f} (95% interval "
        verdict += f"{diff['low']:.2f} to {diff['high']:.2f})"
    else:
        verdict = f"RLHF changed the gold reward by {gain:+.2f}, which is within noise (95% "
        verdict += f"interval {diff['low']:.2f} to {diff['high']:.2f} includes 0)"
    win, loss = wtl["win"]["mean"], wtl["loss"]["mean"]
    return (
        f"{verdict}; the final model beat the SFT model {win:.0%} of the time and lost {loss:.0%}."
    )


def headline(
    prompts: list[Any],
    sft: Any,
    final: Any,
    gold: str,
    n: int,
    unseen_tasks: tuple[str, ...] = (),
    outcomes: list[list[float]] | None = None,
) -> dict[str, Any]:
    """Gold reward before and after, the paired gain and win/tie/loss, with 95% intervals.

    Every interval is over prompts (:mod:`rlhfkit.eval.intervals`): a prompt's value is its mean
    over its first n samples, and outcome j of a prompt compares the final model's sample j
    with the SFT model's sample j by the gold judge.

    Args:
        prompts: The evaluated prompts, rows of the grids.
        sft: The SFT model's scored grid (M, >= n).
        final: The final model's scored grid (M, >= n).
        gold: The gold reward's name in the grids' components.
        n: Samples per prompt compared.
        unseen_tasks: Task types the preference stages never saw; when set, the figures are
            also given apart for the prompts of those types (``"unseen"``) and the others
            (``"seen"``).
        outcomes: :func:`gold_outcomes` of the grids when already computed.

    Returns:
        ``{group: {"prompts", "sft", "final", "gain", "win_tie_loss", "sentence"}}`` with group
        ``"all"`` and, with ``unseen_tasks``, ``"seen"`` and ``"unseen"`` (a group with fewer
        than 2 prompts is left out).
    """
    before, after = _prompt_means(sft, gold, n), _prompt_means(final, gold, n)
    if outcomes is None:
        outcomes = gold_outcomes(prompts, sft, final, n)
    unseen = [p.fields.get("task") in unseen_tasks for p in prompts]
    groups = {"all": [True] * len(prompts)}
    if unseen_tasks:
        groups |= {"seen": [not u for u in unseen], "unseen": unseen}
    out = {}
    for name, keep in groups.items():
        rows = [i for i, k in enumerate(keep) if k]
        if len(rows) < 2:
            continue
        diff = paired_difference([after[i] for i in rows], [before[i] for i in rows])
        wtl = win_tie_loss([outcomes[i] for i in rows])
        out[name] = {
            "prompts": len(rows),
            "sft": mean_interval([before[i] for i in rows]),
            "final": mean_interval([after[i] for i in rows]),
            "gain": diff,
            "win_tie_loss": wtl,
            "sentence": _verdict(diff, wtl),
        }
    return out


def _judge_win_rate(spec: str, prompts: list[Any], sft: Any, final: Any, n: int) -> dict:
    from rlhfkit.rewards.judge import PairwiseJudge, load_backend

    cells = [(i, j) for i in range(len(prompts)) for j in range(n)]
    result = PairwiseJudge(load_backend(spec)).compare(
        [prompts[i].fields["prompt"] for i, _ in cells],
        [final.texts[i][j] for i, j in cells],
        [sft.texts[i][j] for i, j in cells],
    )
    scored = [s for s in result.scores if s is not None]
    total = len(scored) or 1
    return {
        "win": sum(s == 1.0 for s in scored) / total,
        "tie": sum(s == 0.5 for s in scored) / total,
        "loss": sum(s == 0.0 for s in scored) / total,
        "n": len(scored),
        "unparseable": result.unparseable,
        "consistency": result.consistency,
    }


def _kl(
    model_cfg: ModelConfig, policy: Path, reference: Path, prompts: list[Any], cfg: EvalStageConfig
):
    dtype = resolve_precision(model_cfg.precision, default_device()).compute
    tokenizer = load_tokenizer(str(policy))
    final = load_model(str(policy), dtype=dtype).eval()
    ref = load_model(str(reference), dtype=dtype).eval()
    return sampled_kl(
        final,
        contextlib.nullcontext(ref),
        tokenizer,
        [p.fields["prompt"] for p in prompts],
        max_new_tokens=cfg.max_new_tokens,
    )


def evaluate_stage(cfg: PipelineConfig, run: Path, gold: str) -> None:
    """Step 6: write ``<run>/eval.json``."""
    ev = cfg.eval
    proxy = f"rm:{run / 'rm' / 'final'}"
    data = EvalDataConfig(
        source=ev.source,
        split=ev.split,
        schema="preference",
        distinct=True,
        max_prompts=ev.max_prompts,
        max_prompt_len=cfg.rl.data.max_prompt_len,
    )
    sampling = SamplingConfig(max_new_tokens=ev.max_new_tokens, temperature=ev.temperature)
    score = ((proxy, gold), (1.0, 0.0))
    sft_cfg = replace(cfg.model, name=str(run / "sft" / "final"))
    prompts, sft = evaluate_prompts(
        sft_cfg,
        None,
        data,
        replace(sampling, num_samples=max(ev.bon_n, ev.samples)),
        *score,
        cache_dir=str(run / "cache"),
        engine=cfg.engine,
        log_dir=run / "logs" / "eval-sft",
    )
    final_cfg = replace(cfg.model, name=str(run / "policy" / "final"))
    _, final = evaluate_prompts(
        final_cfg,
        prompts,
        data,
        replace(sampling, num_samples=ev.samples, seed=1),
        *score,
        cache_dir=str(run / "cache"),
        engine=cfg.engine,
        log_dir=run / "logs" / "eval-final",
    )
    rm_eval = RMEvalConfig(
        model=replace(cfg.model, name=str(run / "rm" / "final")),
        data=cfg.rm.data.eval or "builtin:preferences",
        split=cfg.rm.data.eval_split,
    )
    rm_report = eval_main(rm_eval)
    ns = [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= sft.shape[1]]
    outcomes = gold_outcomes(prompts, sft, final, ev.samples)
    result = {
        "models": {
            "sft": _model_figures(sft, proxy, gold, ev.samples),
            "final": _model_figures(final, proxy, gold, ev.samples),
        },
        "headline": headline(
            prompts, sft, final, gold, ev.samples, cfg.unseen_tasks, outcomes=outcomes
        ),
        "win_rates": {"gold": _gold_win_rate(outcomes)},
        "kl": _kl(cfg.model, run / "policy" / "final", run / "sft" / "final", prompts, ev),
        "reward_model": {
            "accuracy": rm_report["overall"]["accuracy"],
            "pairs": rm_report["overall"]["pairs"],
            "by_category": {k: v["accuracy"] for k, v in rm_report["per_category"].items()},
            "on_policy": on_policy_agreement(sft.components[proxy], sft.components[gold]),
        },
        "bon": bon_curve(_matrix(sft.components[proxy]), _matrix(sft.components[gold]), ns),
        "samples": [
            {
                "prompt": p.fields["prompt"][-1]["content"],
                "sft": sft.texts[i][0],
                "final": final.texts[i][0],
                "sft_gold": sft.components[gold][i][0],
                "final_gold": final.components[gold][i][0],
            }
            for i, p in enumerate(prompts[: ev.show])
        ],
    }
    if cfg.rm_ensemble > 1:  # rm/final above is the members' WARM average
        result["reward_model"]["ensemble"] = ensemble_accuracy(cfg, run, rm_eval, rm_report)
    if ev.judge:
        result["win_rates"]["judge"] = _judge_win_rate(ev.judge, prompts, sft, final, ev.samples)
    atomic_write_text(run / "eval.json", json.dumps(result, indent=2))


def _policy_metrics(run: Path) -> list[dict[str, Any]]:
    """The rows of the optimise stage's ``metrics.jsonl`` (none when it wrote none)."""
    path = run / "policy" / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


DPO_CURVE = {
    "loss": "train/loss",
    "accuracy": "train/accuracy",
    "chosen": "train/logprobs/chosen",
    "rejected": "train/logprobs/rejected",
}
"""Report key -> the direct-alignment trainer's metric: the loss, the share of pairs whose
implicit reward ranks chosen above rejected, and the two replies' log-probs."""


def _dpo_curve(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Loss, pair accuracy and log-probs per step (direct alignment only)."""
    return [
        {"step": r["step"], **{key: r.get(metric) for key, metric in DPO_CURVE.items()}}
        for r in rows
        if "train/loss" in r and "rollout/reward" not in r
    ]


def _rl_curve(rows: list[dict[str, Any]], gold: str) -> list[dict[str, Any]]:
    """Proxy and gold reward and KL per step, from the policy run's metrics (RL only).

    The proxy is the reward component whose metric starts with ``rollout/reward/rm``: the
    reward model's (``rm:``) or the ensemble's (``rm-ensemble:``), whichever RL optimised.
    """
    keys = (k for r in rows for k in r if k.startswith("rollout/reward/rm"))
    proxy = next(keys, None)
    return [
        {
            "step": r["step"],
            "reward": r["rollout/reward"],
            "proxy": r.get(proxy) if proxy else None,
            "gold": r.get(f"rollout/reward/{gold}"),
            "kl": r.get("rollout/kl_seq"),
        }
        for r in rows
        if "rollout/reward" in r
    ]


def report_data(
    cfg: PipelineConfig, run: Path, gold: str, stages: dict[str, Any]
) -> dict[str, Any]:
    """The input of :func:`rlhfkit.eval.report.render_report` (its schema is documented there)."""
    ev = json.loads((run / "eval.json").read_text())
    metrics = _policy_metrics(run)
    curve = _rl_curve(metrics, gold)
    rl_points = [
        {
            "step": c["step"],
            "kl": max(c["kl"], 0.0),
            "d": math.sqrt(max(c["kl"], 0.0)),
            "proxy": c["proxy"],
            "gold": c["gold"],
        }
        for c in sorted(curve, key=lambda c: c["kl"] if c["kl"] is not None else 0.0)
        if c["kl"] is not None and c["proxy"] is not None
    ]  # ordered by KL: the x axis of the over-optimisation plot
    sft_m, final = ev["models"]["sft"], ev["models"]["final"]
    summary = {
        "gold reward (SFT -> final)": f"{sft_m['gold']:.3f} -> {final['gold']:.3f}",
        "reward-model reward (SFT -> final)": f"{sft_m['proxy']:.3f} -> {final['proxy']:.3f}",
        "KL(final || SFT), nats per sequence": round(ev["kl"]["k1"], 4),
        "win rate vs SFT (gold judge)": round(ev["win_rates"]["gold"]["win"], 3),
        "reward-model held-out accuracy": round(ev["reward_model"]["accuracy"], 3),
        "optimiser": cfg.optimise.method,
        "mean length (SFT -> final)": f"{sft_m['length']:.1f} -> {final['length']:.1f}",
    }
    ensemble = ev["reward_model"].get("ensemble")
    if ensemble and ensemble.get("used"):
        used = ensemble["used"]
        summary["RL reward"] = (
            f"WARM average of {cfg.rm_ensemble} reward models" if used == "warm"
            else f"ensemble of {cfg.rm_ensemble} reward models, {used}"
            + (f" (lambda {cfg.rm_uwo_lambda:g})" if used == "uwo" else "")
        )  # fmt: skip
    quality_file = run / "labels_quality.json"
    if quality_file.is_file():
        q = json.loads(quality_file.read_text())
        summary[f"{cfg.labels.mode} labels: agreement with the gold judge"] = (
            ("n/a" if q["gold_agreement"] is None else f"{q['gold_agreement']:.3f}")
            + f" on {int(q['gold_compared'])} pairs "
            f"({int(q['with_preference'])} of {int(q['pairs'])} pairs got a preference)"
        )
    return {
        "title": f"rlhfkit pipeline: {run}",
        "created": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "config": {
            "model": cfg.model.name,
            "labels": cfg.labels.mode,
            "optimise": cfg.optimise.method,
            **(
                {"rm_ensemble": cfg.rm_ensemble, "rm_combine": cfg.rm_combine}
                if cfg.rm_ensemble > 1
                else {}
            ),
        },
        "stages": stages,
        "headline": ev.get("headline"),
        "summary": summary,
        "curves": {"rl": curve, "dpo": _dpo_curve(metrics)},
        "reward_model": ev["reward_model"],
        "win_rates": ev["win_rates"],
        "overoptimisation": {"bon": ev["bon"], "rl": rl_points},
        "samples": ev["samples"],
    }
