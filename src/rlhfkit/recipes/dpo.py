"""Direct alignment from preferences: DPO and its family (RLHF book ch. 8; Rafailov 2023).

The policy is trained directly on (prompt, chosen, rejected) pairs, without a reward model or
sampling: DPO's loss -log sigma(beta * h), h = (log pi - log pi_ref)(y_c) - (log pi -
log pi_ref)(y_r), and its variants picked by name from ``PREFERENCE_LOSSES`` (cdpo, ipo,
dpo_norm, simpo, orpo, kto, apo_zero, apo_down, rpo, odpo).

Loop:
    1. Load the policy (fp32 master weights, bf16 compute; optional LoRA).
    2. Load preference rows, turn them into pairs (ratings, rankings and Likert rows too),
       render prompt + reply with the chat template (prompt cut from the left), drop pairs
       identical after truncation (counted). Unpaired rows (KTO) are single-reply groups.
    3. Reference log-probs: unless the loss is reference-free, sum log pi_ref over every reply
       once, with the starting policy in eval mode (the adapter disabled under LoRA), cached on
       disk by model, token ids and temperature; no reference model is held while training.
    4. For each optimiser step: the next ``batch_size`` pairs of a seeded shuffle, each pair one
       prefix-tree document (prompt computed once; chosen and rejected in the same forward),
       summed reply log-probs, the loss row's function, normalised by the global pair count;
       clip; AdamW; schedule.
    5. Evaluate held-out pairs (implicit-reward accuracy, margins, log-prob changes,
       preference displacement) before, every ``eval_every`` steps and after; with the built-in
       task, greedy replies before and after are compared by the gold judge (win rate). Save
       the model in Hugging Face format.

Deviations: none in the objectives. KTO's z0 uses the cheap batch estimate
(``kto_z0_batch_rejected``), not an extra mismatched-pair forward pass.
"""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from rlhfkit.atomic import atomic_write_text
from rlhfkit.config import LogConfig, LoopConfig, ModelConfig, OptimConfig, Problems, to_dict
from rlhfkit.data.collate import supports_padding_free
from rlhfkit.data.groups import (
    TokenizedGroup,
    collate_groups,
    group_bins,
    scatter_rewards,
    tokenize_groups,
)
from rlhfkit.data.preferences import to_groups
from rlhfkit.data.schemas import load_examples
from rlhfkit.data.sources import data_section_problems
from rlhfkit.errors import ConfigError
from rlhfkit.losses.kto import kto_unpaired_from_pairs, kto_z0_batch_rejected
from rlhfkit.losses.preference import PREFERENCE_LOSSES, rpo_loss
from rlhfkit.models.forward import sequence_logprobs
from rlhfkit.models.heads import supports_prefix_trees
from rlhfkit.recipes.dpo_eval import gold_comparison, heldout_metrics, kl_metrics, pair_metrics
from rlhfkit.training.accumulate import accumulate
from rlhfkit.training.distributed import all_reduce_sum
from rlhfkit.training.reference import cached_reference
from rlhfkit.training.run import RunContext, batch_order, build_run, finish_run
from rlhfkit.types import LossOutput

log = logging.getLogger(__name__)

LossName = Literal[
    "dpo", "cdpo", "ipo", "dpo_norm", "simpo", "orpo", "kto", "apo_zero", "apo_down", "rpo",
    "odpo",
]  # fmt: skip


@dataclass
class DPODataConfig:
    """Preference data for direct alignment."""

    train: str = "builtin:preferences"
    """Training rows: a .jsonl/.json/.parquet/.csv file, a hub dataset, or builtin:NAME."""
    train_split: str = "train"
    """Split of the training source."""
    eval: str | None = "builtin:preferences"
    """Held-out rows; None disables evaluation."""
    eval_split: str = "heldout"
    """Split of the evaluation source."""
    schema: Literal["preference", "ratings", "rankings", "likert"] = "preference"
    """Row format (docs/data_formats.md); ratings, rankings and Likert rows become pairs."""
    ratings_mode: Literal["best_vs_random", "best_vs_worst", "all_pairs"] = "best_vs_random"
    """How ratings become pairs (docs/data_formats.md)."""
    max_len: int = 1024
    """Maximum tokens of prompt + reply (the prompt is cut from the left)."""
    share_prefix: bool = True
    """Compute each pair's prompt once (prefix-tree documents; exact)."""
    on_error: Literal["raise", "skip"] = "raise"
    """Bad rows: stop with an error naming file, row and field, or skip and report them."""
    limit: int | None = None
    """Use only the first N rows of each source."""

    def problems(self) -> Problems:
        """Missing, empty or unreadable sources and invalid values (checked before loading)."""
        return data_section_problems(self)


@dataclass
class DPOAlgoConfig:
    """Which direct-alignment loss and its hyperparameters (None: the loss's default)."""

    loss: LossName = "dpo"
    """dpo, cdpo, ipo, dpo_norm, simpo, orpo, kto, apo_zero, apo_down, rpo or odpo."""
    beta: float | None = None
    """Temperature beta (default per loss: 0.1; 2.0 for dpo_norm and simpo)."""
    label_smoothing: float = 0.1
    """cdpo: probability that a label is flipped."""
    gamma_beta_ratio: float = 0.5
    """simpo: target margin gamma / beta."""
    orpo_lambda: float = 0.1
    """orpo: weight of the odds-ratio term."""
    rpo_alpha: float = 1.0
    """rpo: weight of the chosen reply's length-normalised NLL."""
    rpo_nll_min_margin: float | None = None
    """rpo: the NLL only on pairs whose margin (the data's ``margin`` field, 0 where absent) is
    at least this, so that only clearly better replies are imitated; None: on every pair."""
    odpo_alpha: float = 1.0
    """odpo: offset scale (offset = alpha * log(score_c - score_r), scores from the data)."""
    kto_lambda_d: float = 1.0
    """kto: weight of desirable replies."""
    kto_lambda_u: float = 1.0
    """kto: weight of undesirable replies."""

    def problems(self) -> Problems:
        """Invalid values: a beta that is not positive, a label-smoothing outside [0, 0.5)."""
        out = []
        if self.beta is not None and not self.beta > 0:
            out.append(("beta", f"must be positive, got {self.beta}"))
        if not 0.0 <= self.label_smoothing < 0.5:
            out.append(("label_smoothing", f"must be in [0, 0.5), got {self.label_smoothing}"))
        if self.rpo_nll_min_margin is not None and PREFERENCE_LOSSES[self.loss].fn is not rpo_loss:
            out.append(("rpo_nll_min_margin", f"applies to loss rpo only, not {self.loss}"))
        return out


@dataclass
class DPOEvalConfig:
    """Held-out evaluation beyond the pairs: greedy replies judged by the gold preference."""

    win_rate: bool = True
    """Compare greedy replies before and after training with the gold judge (built-in
    preference task only: its rows carry the reference reply)."""
    prompts: int = 48
    """Held-out prompts for the win rate."""
    max_new_tokens: int = 96
    """Reply length limit for the win rate and the KL samples."""
    kl_prompts: int = 32
    """Held-out prompts sampled (temperature 1) for the KL estimate to the reference at each
    evaluation; 0 disables it."""


@dataclass
class DPOConfig:
    """rlhfkit dpo: align a model directly on preference pairs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DPODataConfig = field(default_factory=DPODataConfig)
    algo: DPOAlgoConfig = field(default_factory=DPOAlgoConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-7, warmup_ratio=0.1))
    loop: LoopConfig = field(default_factory=LoopConfig)
    log: LogConfig = field(default_factory=lambda: LogConfig(run_dir="runs/dpo"))
    eval: DPOEvalConfig = field(default_factory=DPOEvalConfig)


def loss_kwargs(cfg: DPOAlgoConfig) -> dict[str, Any]:
    """Hyperparameters of the chosen loss (the row names which ones it takes)."""
    spec = PREFERENCE_LOSSES[cfg.loss]
    values = {
        "beta": cfg.beta if cfg.beta is not None else spec.beta,
        "label_smoothing": cfg.label_smoothing,
        "gamma_beta_ratio": cfg.gamma_beta_ratio,
        "lambda_": cfg.orpo_lambda,
        "alpha": cfg.rpo_alpha if cfg.loss == "rpo" else cfg.odpo_alpha,
        "lambda_d": cfg.kto_lambda_d,
        "lambda_u": cfg.kto_lambda_u,
        "average_logprobs": False,
    }
    return {name: values[name] for name in ("beta", *spec.hyperparameters) if name in values}


def load_pairs(
    tokenizer: Any, source: str, split: str, cfg: DPOConfig, seed: int
) -> tuple[list[TokenizedGroup], dict[str, int]]:
    """Load, validate, pair and render one source; returns pairs and counts for the log."""
    data = cfg.data
    result = load_examples(
        source, data.schema, split=split, on_error=data.on_error, limit=data.limit
    )
    for err in result.errors[:10]:
        log.warning("skipped %s", err)
    groups, pair_counts = to_groups(
        result.examples, pairing="pairs", rng=random.Random(seed), ratings_mode=data.ratings_mode
    )
    pairs, counts = tokenize_groups(tokenizer, groups, max_len=data.max_len)
    return pairs, {**pair_counts, **counts, "bad_rows": len(result.errors)}


@dataclass
class PairBatches:
    """Pairs with their cached reference sums, cut into micro-batches."""

    pairs: list[TokenizedGroup]
    ref_sums: torch.Tensor | None  # (G, 2)
    packing: bool
    pad_id: int
    share_prefix: bool

    def micro_batches(self, index: list[int], max_tokens: int) -> list[dict[str, torch.Tensor]]:
        """Micro-batches of the pairs ``index`` (whole pairs, each with its reference sums)."""
        chosen = [self.pairs[i] for i in index]
        out = []
        for b in group_bins(chosen, max_tokens=max_tokens, share_prefix=self.share_prefix):
            batch = collate_groups(
                [chosen[i] for i in b], self.packing, self.pad_id, self.share_prefix
            )
            if self.ref_sums is not None:
                batch["ref_sums"] = self.ref_sums[torch.tensor([index[i] for i in b])]
            out.append(batch)
        return out


def make_step_loss(model: torch.nn.Module, cfg: DPOAlgoConfig):
    """Per micro-batch: reply log-probs of chosen and rejected (one forward), then the loss."""
    spec = PREFERENCE_LOSSES[cfg.loss]
    hyper = loss_kwargs(cfg)

    def step_loss(batch: dict[str, torch.Tensor], normaliser: float) -> LossOutput:
        sums, tokens = sequence_logprobs(model, batch)  # (S,), (S,)
        logprobs = scatter_rewards(sums, batch["slots"], batch["group_mask"])  # (N, 2)
        lengths = scatter_rewards(tokens.to(sums.dtype), batch["slots"], batch["group_mask"])
        inputs = {"chosen_logprobs": logprobs[:, 0], "rejected_logprobs": logprobs[:, 1]}
        inputs["chosen_tokens"], inputs["rejected_tokens"] = lengths[:, 0], lengths[:, 1]
        if not spec.reference_free:
            ref = batch["ref_sums"].to(sums.dtype)  # (N, 2)
            inputs["ref_chosen_logprobs"], inputs["ref_rejected_logprobs"] = ref[:, 0], ref[:, 1]
        if "score_chosen" in spec.extra_inputs:
            inputs["score_chosen"], inputs["score_rejected"] = batch["scores"].unbind(-1)
        if cfg.rpo_nll_min_margin is not None:  # rpo only (checked with the config)
            inputs["nll_weights"] = (batch["margins"] >= cfg.rpo_nll_min_margin).to(sums.dtype)
        if not spec.paired:  # KTO on pairs: chosen desirable, rejected undesirable
            del inputs["chosen_tokens"], inputs["rejected_tokens"]
            inputs = kto_unpaired_from_pairs(**inputs)
            inputs["z0"] = kto_z0_batch_rejected(**inputs)
        return spec.fn(**inputs, **hyper, normaliser=normaliser)

    return step_loss


def example_count(cfg: DPOAlgoConfig):
    """Normaliser share of a micro-batch: pairs, or replies for an unpaired loss (KTO)."""
    per_pair = 1.0 if PREFERENCE_LOSSES[cfg.loss].paired else 2.0

    def count(batch: dict[str, torch.Tensor]) -> float:
        return per_pair * float(batch["group_mask"].shape[0])

    return count


def prepare(ctx: RunContext, cfg: DPOConfig) -> tuple[PairBatches, PairBatches | None, dict]:
    """Pairs of the training and held-out sources, with their reference sums.

    The reference sums (where the loss needs them) are computed once by the starting policy
    and cached.
    """
    train, counts = load_pairs(ctx.tokenizer, cfg.data.train, cfg.data.train_split, cfg, 0)
    held = (
        load_pairs(ctx.tokenizer, cfg.data.eval, cfg.data.eval_split, cfg, 1)[0]
        if cfg.data.eval
        else []
    )
    share = cfg.data.share_prefix and ctx.packing and supports_prefix_trees(ctx.model)
    needs_ref = not PREFERENCE_LOSSES[cfg.algo.loss].reference_free
    out = []
    for pairs in (train, held):
        ref = None
        if needs_ref and pairs:
            with ctx.gathered():  # a rank may find the cache that another is still writing
                ref = cached_reference(
                    ctx.model, pairs, max_tokens=cfg.loop.micro_batch_tokens, packing=ctx.packing,
                    pad_id=ctx.pad_id, share_prefix=share,
                )[0]  # fmt: skip
        out.append(PairBatches(pairs, ref, ctx.packing, ctx.pad_id, share))
    return out[0], (out[1] if held else None), counts


def main(cfg: DPOConfig) -> Path:
    """Run direct alignment; returns the run directory (model under ``<run_dir>/final``)."""
    ctx = build_run(
        cfg.model, cfg.log, cfg.loop.seed, to_dict(cfg), resume=cfg.loop.resume,
        batch_size=cfg.loop.batch_size,
    )  # fmt: skip
    ctx.packing = supports_padding_free(ctx.model)
    train, held_out, counts = prepare(ctx, cfg)
    log.info("data: %s; held-out pairs: %d", counts, len(held_out.pairs) if held_out else 0)
    if (gate := cfg.algo.rpo_nll_min_margin) is not None:
        kept = sum(p.margin >= gate for p in train.pairs)
        log.info("rpo: the NLL covers %d of %d pairs (margin >= %g)", kept, len(train.pairs), gate)
        if not kept:
            log.warning("rpo: no pair has a margin >= %g; the NLL term is off", gate)
    if len(train.pairs) < cfg.loop.batch_size:
        raise ConfigError(
            f"{cfg.data.train}: {len(train.pairs)} usable pairs < --loop.batch-size "
            f"{cfg.loop.batch_size}"
        )
    per_epoch = len(train.pairs) // cfg.loop.batch_size
    total = cfg.loop.max_steps or max(1, math.ceil(cfg.loop.epochs * per_epoch))
    ctx.start_training(cfg.optim, total)
    saved = ctx.resume_state.get("gold_before")
    with ctx.gathered():  # rank 0 samples alone
        before = gold_comparison(ctx, cfg, None) if ctx.step == 0 else saved
    if before is not None:
        ctx.resume_state["gold_before"] = before
    step_loss, count = make_step_loss(ctx.model, cfg.algo), example_count(cfg.algo)
    if ctx.step == 0 and held_out is not None:
        ctx.logger.log(0, heldout_metrics(ctx, held_out, step_loss, count, cfg))
    batch_limit = None if cfg.loop.max_steps else total
    with ctx.progress(total) as bar:
        train_steps(
            ctx, cfg, train, held_out, (step_loss, count), bar, stop_step=total,
            batch_limit=batch_limit, save_every=cfg.loop.save_every,
        )  # fmt: skip
    final_evaluation(ctx, cfg, held_out, step_loss, count)
    ctx.resume_state.pop("gold_before", None)
    return finish_run(ctx, cfg.loop.keep_last)


def train_steps(
    ctx: RunContext,
    cfg: DPOConfig,
    train: PairBatches,
    held_out: PairBatches | None,
    loss: tuple[Any, Any],
    bar: Any,
    *,
    stop_step: int,
    batch_limit: int | None,
    save_every: int,
    batch_offset: int = 0,
) -> None:
    """Optimiser steps on ``train`` until step ``stop_step`` (or ``batch_limit`` batches).

    The batch at position p (batches consumed since ``batch_offset``) is a pure function of p
    (:func:`batch_order`), so a resumed run sees the same batches. ``loss`` is the pair
    ``(step_loss, count)`` of :func:`make_step_loss` and :func:`example_count`.
    """
    step_loss, count = loss
    batch_size = min(cfg.loop.batch_size, len(train.pairs))
    while ctx.step < stop_step and (
        batch_limit is None or ctx.batches_done - batch_offset < batch_limit
    ):
        position = ctx.batches_done - batch_offset
        mine = ctx.dist.shard(batch_order(len(train.pairs), batch_size, cfg.loop.seed, position))
        parts = [ctx.to_device(b) for b in train.micro_batches(mine, cfg.loop.micro_batch_tokens)]
        stats = accumulate(
            parts, step_loss, count_fn=count, after_backward=ctx.master.collect_grads,
            models=ctx.models,
        )  # fmt: skip
        if not ctx.apply_step(stats, cfg.optim.max_grad_norm, cfg.loop.max_nonfinite):
            continue
        loss_value = all_reduce_sum(stats.loss)
        tokens = int(all_reduce_sum(sum(train.pairs[i].num_tokens for i in mine)))
        bar.update(loss=loss_value, tokens=tokens)
        sums = {k: all_reduce_sum(v) for k, v in sorted(stats.metrics.items())}
        metrics = {"train/loss": loss_value, "train/tokens": tokens, **pair_metrics(sums, "train")}
        every = cfg.loop.eval_every
        if held_out is not None and every and ctx.step % every == 0 and ctx.step < stop_step:
            with ctx.gathered():  # rank 0 samples alone for the KL
                metrics.update(heldout_metrics(ctx, held_out, step_loss, count, cfg))
                metrics.update(kl_metrics(ctx, cfg))
        ctx.log_step(metrics, cfg.log.log_every)
        if save_every and ctx.step % save_every == 0:
            ctx.save(cfg.loop.keep_last)


def final_evaluation(
    ctx: RunContext, cfg: DPOConfig, held_out: PairBatches | None, step_loss: Any, count: Any
) -> dict[str, float]:
    """Held-out pair metrics and the gold comparison after training.

    Logged, written to ``eval.json``, and the greedy replies before and after to
    ``gold_samples.json``.
    """
    with ctx.gathered():  # rank 0 samples alone for the KL and the gold comparison
        final = (
            heldout_metrics(ctx, held_out, step_loss, count, cfg) if held_out is not None else {}
        )
        final.update(kl_metrics(ctx, cfg))
        after = gold_comparison(ctx, cfg, ctx.resume_state.get("gold_before"))
    if after:
        final.update({f"eval/gold/{k}": v for k, v in after["summary"].items()})
    ctx.logger.log(ctx.step, final)
    if ctx.dist.is_main:
        atomic_write_text(ctx.run_dir / "eval.json", json.dumps(final, indent=2) + "\n")
        if after:
            text = json.dumps(after["samples"], indent=2, ensure_ascii=False) + "\n"
            atomic_write_text(ctx.run_dir / "gold_samples.json", text)
        log.info("final: %s", {k: round(v, 4) for k, v in final.items()})
    return final
