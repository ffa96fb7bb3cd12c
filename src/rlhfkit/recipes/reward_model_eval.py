"""``rlhfkit rm eval`` and ``rlhfkit rm score``: use a trained reward model.

- ``rm eval``: score held-out preference data (pairs, ratings, rankings, Likert) and report
  pairwise accuracy overall and per category and source, mean margin, BT loss, expected
  calibration error, the reward distribution and the reward-length correlation; JSON plus a
  printed table.
- ``rm score``: add a ``reward`` column to a JSONL of ``prompt`` / ``completion`` rows. Rows are
  scored in length-sorted, token-budgeted batches (padding-free) and written in input order.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from rlhfkit.atomic import atomic_write_text
from rlhfkit.config import ModelConfig
from rlhfkit.data.groups import tokenize_groups
from rlhfkit.data.preferences import to_groups
from rlhfkit.data.schemas import load_examples, validate_rows
from rlhfkit.data.sources import load_rows
from rlhfkit.data.templates import render_messages
from rlhfkit.eval.reward_model import ScoredPair, print_report, rm_report, score_pairs
from rlhfkit.models.heads import score_examples
from rlhfkit.rewards.model import RewardModelScorer

log = logging.getLogger(__name__)


@dataclass
class RMEvalConfig:
    """rlhfkit rm eval: pairwise accuracy and calibration of a reward model."""

    model: ModelConfig = field(default_factory=lambda: ModelConfig(name="runs/rm/final"))
    data: str = "builtin:preferences"
    """Preference rows: a file, a hub dataset or builtin:NAME."""
    split: str = "heldout"
    """Split of the data source."""
    schema: Literal["preference", "ratings", "rankings", "likert"] = "preference"
    """Row format (docs/data_formats.md); ratings, rankings and Likert rows are compared as
    all their pairs with different scores."""
    category_key: str = "category"
    """Row field that groups accuracy."""
    max_len: int = 1024
    """Maximum tokens of prompt + completion (the prompt is cut from the left)."""
    max_tokens: int = 8192
    """Tokens per forward pass."""
    limit: int | None = None
    """Use only the first N rows."""
    output: str | None = None
    """Write the report as JSON here."""


@dataclass
class RMScoreConfig:
    """rlhfkit rm score: add a reward column to prompt/completion rows."""

    input: str = "completions.jsonl"
    """JSONL rows with 'prompt' (string or messages) and 'completion' (string or messages)."""
    output: str = "scored.jsonl"
    """Where to write the rows with the reward column added."""
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name="runs/rm/final"))
    column: str = "reward"
    """Name of the added column."""
    max_len: int = 1024
    """Maximum tokens of prompt + completion (the prompt is cut from the left)."""
    max_tokens: int = 8192
    """Tokens per forward pass."""


def load_scorer(cfg: ModelConfig) -> tuple[torch.nn.Module, Any, bool]:
    """(model in eval mode at the compute dtype, tokenizer, packing) of a reward model."""
    scorer = RewardModelScorer(
        cfg.name,
        precision=cfg.precision,
        trust_remote_code=cfg.trust_remote_code,
        attn_implementation=cfg.attn_implementation,
    )
    return scorer.model, scorer.tokenizer, scorer.packing


def score_models(
    cfg: RMEvalConfig, names: list[str]
) -> tuple[list[list[ScoredPair]], dict[str, Any]]:
    """Every reward model's scored pairs of ``cfg``'s data, and the data's counts.

    The data is read and tokenized once (the models must share a tokenizer, as the members of
    an ensemble or the proxies of one start do); the models are loaded one at a time.

    Returns:
        One list of pairs per model (the same pairs in the same order), and the counts of
        rows, groups and dropped sequences.
    """
    result = load_examples(cfg.data, cfg.schema, split=cfg.split, limit=cfg.limit)
    groups, counts = to_groups(result.examples, pairing="groups", rng=random.Random(0))
    tokenized, dropped = None, {}
    out = []
    for name in names:
        model, tokenizer, packing = load_scorer(replace(cfg.model, name=str(name)))
        if tokenized is None:
            tokenized, dropped = tokenize_groups(tokenizer, groups, max_len=cfg.max_len)
            log.info("data: %s %s", counts, dropped)
        out.append(
            score_pairs(model, tokenized, packing=packing, pad_id=tokenizer.pad_token_id,
                        max_tokens=cfg.max_tokens, category_key=cfg.category_key)
        )  # fmt: skip
        del model
    return out, {**counts, **dropped}


def eval_main(cfg: RMEvalConfig) -> dict[str, Any]:
    """Score preference data with a reward model; print and return the report."""
    (pairs,), counts = score_models(cfg, [cfg.model.name])
    report = rm_report(pairs)
    report["data"] = {"source": cfg.data, "split": cfg.split, **counts}
    print_report(report, title=f"{cfg.model.name} on {cfg.data} [{cfg.split}]")
    if cfg.output:
        atomic_write_text(cfg.output, json.dumps(report, indent=2) + "\n")
    return report


def score_main(cfg: RMScoreConfig) -> Path:
    """Score every row of ``cfg.input`` and write them with a reward column."""
    model, tokenizer, packing = load_scorer(cfg.model)
    rows = load_rows(cfg.input)
    examples = validate_rows(rows, "prompt_completion").examples  # errors name row and field
    sequences = []
    for example in examples:
        rendered = render_messages(
            tokenizer,
            example.messages,
            max_len=cfg.max_len,
            truncation="left_prompt",
            source=example.location,
        )
        if rendered is None:
            raise ValueError(f"{example.location}: field 'completion' is empty")
        sequences.append(rendered)
    rewards = score_examples(
        model, sequences, packing=packing, pad_id=tokenizer.pad_token_id, max_tokens=cfg.max_tokens
    )[:, 0].tolist()
    lines = [json.dumps({**row.data, cfg.column: r}) for row, r in zip(rows, rewards, strict=True)]
    atomic_write_text(cfg.output, "\n".join(lines) + "\n")
    log.info("scored %d rows -> %s", len(rows), cfg.output)
    return Path(cfg.output)
