"""Supervised fine-tuning (instruction tuning), RLHF book chapter 4.

The model learns to imitate assistant replies: the loss is the negative log-likelihood of the
assistant tokens (content plus end-of-turn token) given the conversation so far, averaged over
all loss tokens of the optimiser batch (docs/methods/sft.md).

Loop:
    1. Load the model (fp32 master weights, bf16 compute where supported; optional LoRA) and
       its tokenizer.
    2. Load rows, validate them against the schema (errors name file, row and field), render
       each conversation with the tokenizer's chat template into (input_ids, loss_mask),
       truncate, and drop examples without loss tokens (counted).
    3. For each optimiser step: take the next ``batch_size`` examples of a seeded per-epoch
       shuffle; pack them into padding-free micro-batches (or length buckets when the
       attention kernel cannot pack); ``accumulate`` forward/backward with the global token
       count as normaliser; clip; AdamW step; schedule step.
    4. Evaluate the held-out loss before, every ``eval_every`` steps, and after training;
       checkpoint atomically every ``save_every`` steps; save the final model in Hugging Face
       format with the resolved config, git revision and package versions.

Deviations from the book: none in the objective. Packing is on by default (Olmo 3 style); the
gradient equals the unpacked one (tested).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from rlhfkit.config import LogConfig, LoopConfig, ModelConfig, OptimConfig, Problems, to_dict
from rlhfkit.data.collate import (
    bucket_by_length,
    pack_examples,
    packed_batch,
    pad_batch,
    supports_padding_free,
)
from rlhfkit.data.schemas import load_examples
from rlhfkit.data.sources import data_section_problems
from rlhfkit.data.templates import render_messages, unroll_turns
from rlhfkit.errors import ConfigError
from rlhfkit.losses.sft import sft_loss
from rlhfkit.models.forward import label_logprobs
from rlhfkit.training.accumulate import StepStats, accumulate
from rlhfkit.training.distributed import all_reduce_sum
from rlhfkit.training.run import RunContext, batch_order, build_run, finish_run
from rlhfkit.types import LossOutput, TokenizedExample

log = logging.getLogger(__name__)


@dataclass
class SFTDataConfig:
    """Training and evaluation data for SFT."""

    train: str = "builtin:instructions"
    """Training rows: a .jsonl/.json/.parquet/.csv file, a hub dataset, or builtin:NAME."""
    train_split: str = "train"
    """Split of the training source."""
    eval: str | None = "builtin:instructions"
    """Held-out rows (same kinds of source); None disables evaluation."""
    eval_split: str = "heldout"
    """Split of the evaluation source."""
    schema: Literal["sft", "prompt_completion"] = "sft"
    """Row format: 'sft' (messages) or 'prompt_completion' (docs/data_formats.md)."""
    mask_mode: Literal["final_turn", "all_assistant_turns"] = "final_turn"
    """Which assistant turns are labelled: the last one (the default; with unroll, every
    turn once) or all of them."""
    unroll: bool = False
    """With final_turn: one example per assistant turn (a conversation with N assistant turns
    gives N examples), so every turn is learned with only its history as context."""
    max_len: int = 2048
    """Maximum tokens per example."""
    truncation: Literal["right", "drop", "left_prompt"] = "right"
    """What to do with longer examples: cut the end, drop them, or cut the prompt's start."""
    packing: bool = True
    """Pack several examples per row without cross-attention (length buckets if the attention
    kernel cannot)."""
    on_error: Literal["raise", "skip"] = "raise"
    """Bad rows: stop with an error naming file, row and field, or skip and report them."""
    limit: int | None = None
    """Use only the first N rows of each source."""

    def problems(self) -> Problems:
        """Missing, empty or unreadable sources and invalid values (checked before loading)."""
        out = data_section_problems(self)
        if self.unroll and self.mask_mode != "final_turn":
            out.append(("", UNROLL_NEEDS_FINAL_TURN))
        return out


UNROLL_NEEDS_FINAL_TURN = (
    "--data.unroll needs --data.mask-mode final_turn (with all_assistant_turns every unrolled "
    "prefix would label the earlier turns again)"
)


@dataclass
class SFTConfig:
    """rlhfkit sft: supervised fine-tuning on chat data."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    log: LogConfig = field(default_factory=LogConfig)


def tokenize_examples(
    tokenizer: object, source: str, split: str, data: SFTDataConfig
) -> tuple[list[TokenizedExample], dict[str, int]]:
    """Load, validate and render one source; returns examples and counts for the log."""
    if data.unroll and data.mask_mode != "final_turn":
        raise ConfigError(UNROLL_NEEDS_FINAL_TURN)
    result = load_examples(
        source, data.schema, split=split, on_error=data.on_error, limit=data.limit
    )
    examples: list[TokenizedExample] = []
    conversations = [
        (ex.location, conv)
        for ex in result.examples
        for conv in (unroll_turns(ex.messages) if data.unroll else [ex.messages])
    ]
    for location, messages in conversations:
        rendered = render_messages(
            tokenizer,
            messages,
            mask_mode=data.mask_mode,
            max_len=data.max_len,
            truncation=data.truncation,
            source=location,
        )
        if rendered is not None:
            examples.append(rendered)
    counts = {
        "rows": len(result.examples) + len(result.errors),
        "bad_rows": len(result.errors),
        "dropped": len(conversations) - len(examples),
        "examples": len(examples),
    }
    for err in result.errors[:10]:
        log.warning("skipped %s", err)
    return examples, counts


def micro_batches(
    examples: list[TokenizedExample], *, packing: bool, budget: int, pad_id: int
) -> list[dict[str, torch.Tensor]]:
    """Split an optimiser batch into packed rows (or padded buckets) of ``budget`` tokens."""
    if packing:
        return [
            packed_batch([examples[i] for i in b])
            for b in pack_examples(examples, max_tokens=budget)
        ]
    buckets = bucket_by_length([len(e.input_ids) for e in examples], max_tokens=budget)
    return [pad_batch([examples[i] for i in b], pad_id=pad_id) for b in buckets]


def label_count(batch: dict[str, torch.Tensor]) -> float:
    """Loss tokens in a micro-batch (its share of the token_mean normaliser)."""
    return float((batch["labels"][:, 1:] != -100).sum())


def make_step_loss(model: torch.nn.Module):
    """The per-micro-batch loss: NLL of its labels over the global token count."""

    def step_loss(batch: dict[str, torch.Tensor], normaliser: float) -> LossOutput:
        logprobs, _ = label_logprobs(model, batch)
        return sft_loss(
            logprobs=logprobs,
            mask=torch.ones_like(logprobs, dtype=torch.bool),
            normaliser=normaliser,
        )

    return step_loss


@torch.no_grad()
def evaluate(ctx: RunContext, examples: list[TokenizedExample], cfg: SFTConfig) -> float:
    """Token-mean NLL of ``examples`` (held-out loss)."""
    if not examples:
        return float("nan")
    ctx.model.eval()
    mine = ctx.dist.shard(examples)
    batches = micro_batches(
        mine, packing=ctx.packing, budget=cfg.loop.micro_batch_tokens, pad_id=ctx.pad_id
    )
    batches = [ctx.to_device(b) for b in batches]
    stats = accumulate(
        batches, make_step_loss(ctx.model), count_fn=label_count, backward=False,
        models=ctx.models,
    )  # fmt: skip
    ctx.model.train()
    return all_reduce_sum(stats.loss)  # each rank's share is over the global token count


def main(cfg: SFTConfig) -> Path:
    """Run SFT; returns the run directory (final model under ``<run_dir>/final``)."""
    ctx = build_run(
        cfg.model, cfg.log, cfg.loop.seed, to_dict(cfg), resume=cfg.loop.resume,
        batch_size=cfg.loop.batch_size,
    )  # fmt: skip
    ctx.packing = cfg.data.packing and supports_padding_free(ctx.model)
    train, counts = tokenize_examples(ctx.tokenizer, cfg.data.train, cfg.data.train_split, cfg.data)
    held_out = (
        tokenize_examples(ctx.tokenizer, cfg.data.eval, cfg.data.eval_split, cfg.data)[0]
        if cfg.data.eval
        else []
    )
    log.info("data: %s; held-out examples: %d; packing: %s", counts, len(held_out), ctx.packing)
    if len(train) < cfg.loop.batch_size:
        raise ConfigError(
            f"{cfg.data.train}: {len(train)} usable examples < --loop.batch-size "
            f"{cfg.loop.batch_size}"
        )
    per_epoch = len(train) // cfg.loop.batch_size
    total = cfg.loop.max_steps or max(1, math.ceil(cfg.loop.epochs * per_epoch))
    ctx.start_training(cfg.optim, total)
    if ctx.step == 0 and held_out:
        ctx.logger.log(0, {"eval/loss": evaluate(ctx, held_out, cfg)})
    step_loss = make_step_loss(ctx.model)
    # An epoch-based run ends after its batches even if some were skipped (non-finite); a
    # max_steps run continues into the next epoch's shuffle instead.
    batch_limit = None if cfg.loop.max_steps else total
    with ctx.progress(total) as bar:
        while ctx.step < total and (batch_limit is None or ctx.batches_done < batch_limit):
            position = ctx.batches_done
            order = batch_order(len(train), cfg.loop.batch_size, cfg.loop.seed, position)
            batch = ctx.dist.shard([train[i] for i in order])  # this rank's share
            parts = micro_batches(
                batch, packing=ctx.packing, budget=cfg.loop.micro_batch_tokens, pad_id=ctx.pad_id
            )
            parts = [ctx.to_device(part) for part in parts]
            stats: StepStats = accumulate(
                parts,
                step_loss,
                count_fn=label_count,
                after_backward=ctx.master.collect_grads,
                models=ctx.models,
            )
            if not ctx.apply_step(stats, cfg.optim.max_grad_norm, cfg.loop.max_nonfinite):
                continue
            loss = all_reduce_sum(stats.loss)  # each rank's share is over the global count
            bar.update(loss=loss, tokens=int(all_reduce_sum(sum(len(e.input_ids) for e in batch))))
            metrics = {
                "train/loss": loss,
                "train/tokens": stats.normaliser,
                "train/skipped_batches": ctx.batches_done - ctx.step,
            }
            if cfg.loop.eval_every and ctx.step % cfg.loop.eval_every == 0 and ctx.step < total:
                metrics["eval/loss"] = evaluate(ctx, held_out, cfg)
            ctx.log_step(metrics, cfg.log.log_every)
            if cfg.loop.save_every and ctx.step % cfg.loop.save_every == 0:
                data = {
                    "epoch": ctx.batches_done // per_epoch,
                    "batch": ctx.batches_done % per_epoch,
                }
                ctx.save(cfg.loop.keep_last, data=data)
    if held_out:
        ctx.logger.log(ctx.step, {"eval/loss": evaluate(ctx, held_out, cfg)})
    return finish_run(ctx, cfg.loop.keep_last)
