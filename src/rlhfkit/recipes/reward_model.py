"""Reward-model training on preferences (RLHF book chapter 5; docs/methods/reward_models.md).

A reward model is the policy's backbone with a scalar head read at the last token of prompt +
completion (``rlhfkit.models.heads``). It learns from comparisons: the completion people (or a
judge) preferred should score higher.

Loop:
    1. Load the backbone with a fresh ``Linear(hidden, 1, bias=False)`` head (fp32 master
       weights, bf16 compute; optional LoRA, the head trained in full).
    2. Load rows (preference pairs, ratings, rankings or Likert comparisons), validate them
       (errors name file, row and field) and turn them into ranked groups (``pairs``: K = 2,
       for bt and margin; ``groups``: all K completions, for all_pairs and plackett_luce).
       Render each completion with its prompt by the chat template, the prompt truncated from
       the left; drop groups whose completions are identical after truncation (counted).
    3. For each optimiser step: the next ``batch_size`` groups of a seeded per-epoch shuffle,
       packed into padding-free micro-batches of whole groups; per micro-batch one forward over
       every sequence, rewards scattered into an (N, K) matrix, the loss of the ``algo.loss``
       row, normalised by the global number of groups; clip; AdamW; schedule.
    4. Evaluate held-out pairwise accuracy (overall and per category), margin, ECE and loss
       before, every ``eval_every`` steps and after training; checkpoint atomically; save the
       final model as a Hugging Face sequence-classification directory
       (``AutoModelForSequenceClassification.from_pretrained(run_dir / "final")`` scores alike).

Losses (``LOSSES``): ``bt`` -log sigma(r_c - r_r); ``margin`` with the data's margin (Llama 2);
``all_pairs`` every ordered pair of a prompt's K completions, weighted 1/C so that each prompt
counts once (InstructGPT); ``plackett_luce`` the K-wise ranking likelihood. ``orm`` and ``prm``
(token-level heads) live in :mod:`rlhfkit.recipes.reward_model_token` and are chosen through the
same ``algo.loss`` field.

Deviations from the book: none in the objectives. Packing is on (no compute on padding); the
defaults are one epoch, lr 5e-5 for a model below 1B and 10% warmup (reward-model docs).
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from rlhfkit.atomic import atomic_write_text
from rlhfkit.config import LogConfig, LoopConfig, ModelConfig, OptimConfig, Problems, to_dict
from rlhfkit.data.collate import supports_padding_free
from rlhfkit.data.groups import (
    TokenizedGroup,
    group_micro_batches,
    scatter_rewards,
    tokenize_groups,
)
from rlhfkit.data.preferences import to_groups
from rlhfkit.data.schemas import load_examples
from rlhfkit.data.sources import data_section_problems
from rlhfkit.errors import ConfigError
from rlhfkit.eval.reward_model import ScoredPair, print_report, rm_report, score_pairs
from rlhfkit.losses.reward import (
    all_pairs_loss,
    bradley_terry_loss,
    pairwise_stats,
    plackett_luce_loss,
)
from rlhfkit.models.heads import (
    check_pooling_compatible,
    sequence_scores,
    supports_prefix_trees,
)
from rlhfkit.training.accumulate import accumulate
from rlhfkit.training.distributed import all_reduce_sum, gather_objects
from rlhfkit.training.run import RunContext, batch_order, build_run, finish_run
from rlhfkit.types import LossOutput

log = logging.getLogger(__name__)

LossName = Literal["bt", "margin", "all_pairs", "plackett_luce", "orm", "orm_sequence", "prm"]


@dataclass
class RMDataConfig:
    """Preference data for reward-model training."""

    train: str = "builtin:preferences"
    """Training rows: a .jsonl/.json/.parquet/.csv file, a hub dataset, or builtin:NAME."""
    train_split: str = "train"
    """Split of the training source."""
    eval: str | None = "builtin:preferences"
    """Held-out rows (same kinds of source); None disables evaluation."""
    eval_split: str = "heldout"
    """Split of the evaluation source."""
    schema: Literal[
        "preference", "ratings", "rankings", "likert", "unpaired_preference", "process"
    ] = "preference"
    """Row format (docs/data_formats.md): pairs, ratings, rankings and Likert comparisons for
    the pairwise losses; unpaired_preference (correct/incorrect) for orm; process for prm."""
    ratings_mode: Literal["best_vs_random", "best_vs_worst", "all_pairs"] = "best_vs_random"
    """How ratings become pairs (docs/data_formats.md) for the bt and margin losses."""
    ranking_mode: Literal["adjacent", "all_pairs"] = "all_pairs"
    """How rankings become pairs for the bt and margin losses."""
    likert_margin: bool = True
    """Use the Likert distance from the midpoint as the margin (margin loss)."""
    max_len: int = 1024
    """Maximum tokens of prompt + completion (the prompt is cut from the left)."""
    packing: bool = True
    """Pack sequences into padding-free rows (padded buckets if the attention cannot)."""
    share_prefix: bool = True
    """Compute the common prefix (the prompt) of a group's completions once: each group is one
    prefix-tree document (exact; needs packing and the varlen_sdpa attention)."""
    on_error: Literal["raise", "skip"] = "raise"
    """Bad rows: stop with an error naming file, row and field, or skip and report them."""
    limit: int | None = None
    """Use only the first N rows of each source."""
    category_key: str = "category"
    """Row field that groups held-out accuracy (rows without it count as 'all')."""

    def problems(self) -> Problems:
        """Missing, empty or unreadable sources and invalid values (checked before loading)."""
        return data_section_problems(self)


@dataclass
class RMAlgoConfig:
    """Which reward-model objective."""

    loss: LossName = "bt"
    """bt, margin, all_pairs, plackett_luce (pairwise and K-wise), orm or orm_sequence
    (outcome labels), prm (step labels)."""
    orm_score: Literal["final", "mean", "min", "product", "last_m", "flag"] = "final"
    """orm: how token probabilities become a completion's held-out score (see orm_score)."""
    prm_separator: str = "\n<step>\n"
    """prm: text joining the steps of a solution."""
    prm_mode: Literal["3class", "binary"] = "3class"
    """prm: 3-class head (-1/0/+1) with cross-entropy, or one logit with BCE."""
    prm_neutral: Literal["drop", "positive", "negative"] = "drop"
    """prm binary mode: what a neutral (0) step label becomes."""


@dataclass
class RMConfig:
    """rlhfkit rm train: train a reward model on preference data."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: RMDataConfig = field(default_factory=RMDataConfig)
    algo: RMAlgoConfig = field(default_factory=RMAlgoConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-5, warmup_ratio=0.1))
    loop: LoopConfig = field(default_factory=LoopConfig)
    log: LogConfig = field(default_factory=lambda: LogConfig(run_dir="runs/rm"))


GroupLoss = Callable[[torch.Tensor, dict[str, torch.Tensor], float], LossOutput]


@dataclass(frozen=True)
class PairwiseLoss:
    """A row of the pairwise-loss table: how groups are formed and the loss on their rewards."""

    pairing: Literal["pairs", "groups"]
    fn: GroupLoss


LOSSES: dict[str, PairwiseLoss] = {
    "bt": PairwiseLoss(
        "pairs",
        lambda r, b, n: bradley_terry_loss(
            chosen_rewards=r[:, 0], rejected_rewards=r[:, 1], normaliser=n
        ),
    ),
    "margin": PairwiseLoss(
        "pairs",
        lambda r, b, n: bradley_terry_loss(
            chosen_rewards=r[:, 0], rejected_rewards=r[:, 1], margin=b["margins"], normaliser=n
        ),
    ),
    "all_pairs": PairwiseLoss(
        "groups",
        lambda r, b, n: all_pairs_loss(
            rewards=r, scores=b["scores"], mask=b["group_mask"], normaliser=n
        ),
    ),
    "plackett_luce": PairwiseLoss(
        "groups",
        lambda r, b, n: plackett_luce_loss(rewards=r, mask=b["group_mask"], normaliser=n),
    ),
}
"""Pairwise / K-wise reward-model losses: rewards (N, K) best first -> loss over N groups."""


def load_groups(
    tokenizer: object, source: str, split: str, cfg: RMConfig, seed: int
) -> tuple[list[TokenizedGroup], dict[str, int]]:
    """Load, validate, pair and render one source; returns groups and counts for the log."""
    data = cfg.data
    result = load_examples(
        source, data.schema, split=split, on_error=data.on_error, limit=data.limit
    )
    for err in result.errors[:10]:
        log.warning("skipped %s", err)
    groups, pair_counts = to_groups(
        result.examples,
        pairing=LOSSES[cfg.algo.loss].pairing,
        rng=random.Random(seed),
        ratings_mode=data.ratings_mode,
        ranking_mode=data.ranking_mode,
        likert_margin=data.likert_margin,
    )
    tokenized, counts = tokenize_groups(tokenizer, groups, max_len=data.max_len)
    sequences = [s.input_ids for g in tokenized for s in g.sequences]
    ending_with_pad = check_pooling_compatible(sequences, getattr(tokenizer, "pad_token_id", None))
    if ending_with_pad:
        log.warning(
            "%s: %d sequences end with the pad id; rlhfkit reads their reward at that token, but "
            "AutoModelForSequenceClassification would read it at the last non-pad token: give "
            "the tokenizer a pad token that the chat template never ends with",
            source,
            ending_with_pad,
        )
    counts = {**pair_counts, **counts, "bad_rows": len(result.errors)}
    return tokenized, {**counts, "ending_with_pad": ending_with_pad}


def make_step_loss(model: torch.nn.Module, loss: PairwiseLoss) -> GroupLoss:
    """Per micro-batch: one forward over all its sequences, rewards into (N, K), the loss."""

    def step_loss(batch: dict[str, torch.Tensor], normaliser: float) -> LossOutput:
        rewards = sequence_scores(model, batch)[:, 0]  # (D,)
        matrix = scatter_rewards(rewards, batch["slots"], batch["group_mask"])  # (N, K)
        out = loss.fn(matrix, batch, normaliser)
        stats = pairwise_stats(rewards=matrix, scores=batch["scores"], mask=batch["group_mask"])
        out.metrics.update(stats)  # the same training accuracy for every loss row
        return out

    return step_loss


def group_count(batch: dict[str, torch.Tensor]) -> float:
    """Groups (pairs) in a micro-batch: its share of the normaliser."""
    return float(batch["group_mask"].shape[0])


class PairwiseTask:
    """Pairwise and K-wise comparisons (bt, margin, all_pairs, plackett_luce).

    Items are :class:`TokenizedGroup` s; a micro-batch holds whole groups; the normaliser is
    the number of groups (pairs for K = 2).
    """

    num_labels = 1

    def __init__(self, cfg: RMConfig) -> None:
        self.cfg = cfg
        self.loss = LOSSES[cfg.algo.loss]
        self.share_prefix = False
        """Set by the recipe when the model can run prefix trees."""

    def load(
        self, tokenizer: object, source: str, split: str, seed: int
    ) -> tuple[list[TokenizedGroup], dict[str, int]]:
        """Groups of one source and counts for the log (:func:`load_groups`)."""
        return load_groups(tokenizer, source, split, self.cfg, seed)

    @staticmethod
    def tokens(item: TokenizedGroup) -> int:
        """Tokens of one item (every sequence in full: the work, however it is computed)."""
        return item.num_tokens

    def micro_batches(
        self, items: list[TokenizedGroup], *, max_tokens: int, packing: bool, pad_id: int
    ) -> list[dict[str, torch.Tensor]]:
        """Whole groups per micro-batch (as prefix trees when ``share_prefix``)."""
        return group_micro_batches(
            items,
            max_tokens=max_tokens,
            packing=packing,
            pad_id=pad_id,
            share_prefix=self.share_prefix and packing,
        )

    def step_loss(self, model: torch.nn.Module) -> GroupLoss:
        """The per-micro-batch loss (:func:`make_step_loss`)."""
        return make_step_loss(model, self.loss)

    count = staticmethod(group_count)

    @staticmethod
    def train_metrics(sums: dict[str, float]) -> dict[str, float]:
        """Training accuracy and margin from the summed loss metrics."""
        pairs = max(sums.get("pairs", 0.0), 1.0)
        return {
            "train/accuracy": sums.get("correct", 0.0) / pairs,
            "train/margin": sums.get("margin_sum", 0.0) / pairs,
        }

    def score(
        self, model: torch.nn.Module, items: list[TokenizedGroup], **kw: Any
    ) -> list[ScoredPair]:
        """Rewards of every held-out pair."""
        return score_pairs(model, items, category_key=self.cfg.data.category_key, **kw)

    print_report = staticmethod(print_report)

    @staticmethod
    def report(records: list[ScoredPair]) -> tuple[dict[str, float], dict[str, Any]]:
        """Logged metrics and the full report of the scored pairs."""
        report = rm_report(records)
        metrics = {f"eval/{k}": float(v) for k, v in report["overall"].items()}
        for name, summary in report["per_category"].items():
            metrics[f"eval/accuracy/{name}"] = summary["accuracy"]
        return metrics, report


def make_task(cfg: RMConfig) -> Any:
    """The task object of ``cfg.algo.loss``: pairwise here, token-level in reward_model_token."""
    if cfg.algo.loss in LOSSES:
        return PairwiseTask(cfg)
    from rlhfkit.recipes.reward_model_token import TOKEN_TASKS

    return TOKEN_TASKS[cfg.algo.loss](cfg)


@torch.no_grad()
def evaluate(ctx: RunContext, task: Any, items: list, cfg: RMConfig) -> tuple[dict, dict]:
    """Held-out metrics and report; every rank scores a share, all ranks get the report."""
    if not items:
        return {}, {}
    ctx.model.eval()
    with ctx.gathered():  # each rank scores its share, a different number of passes
        mine = task.score(
            ctx.model,
            ctx.dist.shard(items),
            packing=ctx.packing,
            pad_id=ctx.pad_id,
            max_tokens=cfg.loop.micro_batch_tokens,
        )
    ctx.model.train()
    return task.report([r for part in gather_objects(mine) for r in part])


def main(cfg: RMConfig) -> Path:
    """Train a reward model; returns the run directory (model under ``<run_dir>/final``)."""
    task = make_task(cfg)
    ctx = build_run(
        cfg.model, cfg.log, cfg.loop.seed, to_dict(cfg), task="score", num_labels=task.num_labels,
        resume=cfg.loop.resume, batch_size=cfg.loop.batch_size,
    )  # fmt: skip
    ctx.packing = cfg.data.packing and supports_padding_free(ctx.model)
    task.share_prefix = cfg.data.share_prefix and ctx.packing and supports_prefix_trees(ctx.model)
    train, counts = task.load(ctx.tokenizer, cfg.data.train, cfg.data.train_split, 0)
    held_out = (
        task.load(ctx.tokenizer, cfg.data.eval, cfg.data.eval_split, 1)[0] if cfg.data.eval else []
    )
    log.info("data: %s; held-out items: %d; packing: %s", counts, len(held_out), ctx.packing)
    if len(train) < cfg.loop.batch_size:
        raise ConfigError(
            f"{cfg.data.train}: {len(train)} usable items < --loop.batch-size {cfg.loop.batch_size}"
        )
    per_epoch = len(train) // cfg.loop.batch_size
    total = cfg.loop.max_steps or max(1, math.ceil(cfg.loop.epochs * per_epoch))
    ctx.start_training(cfg.optim, total)
    if ctx.step == 0:
        ctx.logger.log(0, evaluate(ctx, task, held_out, cfg)[0])
    step_loss = task.step_loss(ctx.model)
    batch_limit = None if cfg.loop.max_steps else total
    data_seed = cfg.loop.seed if cfg.loop.data_seed is None else cfg.loop.data_seed
    with ctx.progress(total) as bar:
        while ctx.step < total and (batch_limit is None or ctx.batches_done < batch_limit):
            order = batch_order(len(train), cfg.loop.batch_size, data_seed, ctx.batches_done)
            batch = ctx.dist.shard([train[i] for i in order])
            parts = task.micro_batches(
                batch,
                max_tokens=cfg.loop.micro_batch_tokens,
                packing=ctx.packing,
                pad_id=ctx.pad_id,
            )
            parts = [ctx.to_device(part) for part in parts]
            stats = accumulate(
                parts,
                step_loss,
                count_fn=task.count,
                after_backward=ctx.master.collect_grads,
                models=ctx.models,
            )
            if not ctx.apply_step(stats, cfg.optim.max_grad_norm, cfg.loop.max_nonfinite):
                continue
            loss = all_reduce_sum(stats.loss)
            tokens = int(all_reduce_sum(sum(task.tokens(item) for item in batch)))
            bar.update(loss=loss, tokens=tokens)
            sums = {k: all_reduce_sum(v) for k, v in sorted(stats.metrics.items())}
            metrics = {"train/loss": loss, "train/tokens": tokens, **task.train_metrics(sums)}
            if cfg.loop.eval_every and ctx.step % cfg.loop.eval_every == 0 and ctx.step < total:
                metrics.update(evaluate(ctx, task, held_out, cfg)[0])
            ctx.log_step(metrics, cfg.log.log_every)
            if cfg.loop.save_every and ctx.step % cfg.loop.save_every == 0:
                ctx.save(cfg.loop.keep_last)
    final, report = evaluate(ctx, task, held_out, cfg)
    ctx.logger.log(ctx.step, final)
    if report and ctx.dist.is_main:
        atomic_write_text(ctx.run_dir / "eval.json", json.dumps(report, indent=2) + "\n")
        task.print_report(report, title=f"held-out ({cfg.data.eval})")
    return finish_run(ctx, cfg.loop.keep_last)
