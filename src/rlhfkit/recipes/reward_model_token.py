"""Token-level reward models: outcome (ORM) and process (PRM) heads (Cobbe 2021; Lightman 2023).

Chosen through ``rlhfkit rm train --algo.loss orm|orm_sequence|prm``; the training loop is the
one of :mod:`rlhfkit.recipes.reward_model`, with these task objects.

- ORM (Cobbe 2021; Lyu 2025): rows ``unpaired_preference`` (prompt, completion, label: the
  completion is correct). ``orm``: the label is copied to every completion token and the
  per-token BCE of sigma(w(s_t)) is averaged per sequence, then over sequences
  (``seq_mean_token_mean``); ``orm_sequence``: sigma of the mean token logit, then BCE. The held-out
  score of a completion is the final-token probability (``algo.orm_score`` picks another
  aggregation); reported: mean score on correct vs incorrect completions, per-prompt top-1
  accuracy, correct x incorrect pairwise accuracy, and classification accuracy at 0.5.
- PRM (Lightman 2023): rows ``process`` (prompt, steps, labels in {-1, 0, +1}). Steps are
  joined with ``algo.prm_separator``; the label sits on the last token of each step only; a
  3-class head trained with cross-entropy (or one logit with BCE, neutral steps mapped by
  ``algo.prm_neutral``). Reported: step accuracy, mean P(+1) of correct and of wrong steps, and
  solution accuracy (min over steps of P(+1) > 0.5 iff every step is correct).

The normaliser is global: sequences for the ORM losses, counted steps for the PRM loss.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from rlhfkit.data.collate import pack_examples, packed_batch, pad_batch
from rlhfkit.data.schemas import load_examples
from rlhfkit.data.steps import render_sequence, render_steps
from rlhfkit.eval.metrics import orm_metrics
from rlhfkit.losses.reward import (
    orm_score,
    orm_sequence_loss,
    orm_token_loss,
    prm_aggregate,
    prm_loss,
    prm_step_scores,
)
from rlhfkit.models.heads import selected_documents, token_scores
from rlhfkit.ops.masking import unpack_rows
from rlhfkit.types import LossOutput, StepExample, TokenizedExample

log = logging.getLogger(__name__)


ORM_LOSSES = {"orm": orm_token_loss, "orm_sequence": orm_sequence_loss}
"""``algo.loss`` -> outcome loss (token-level BCE, or sigmoid-after-pooling BCE)."""


@dataclass
class OutcomeItem:
    """A rendered completion with its outcome label (1 = correct)."""

    sequence: TokenizedExample
    label: float
    prompt_id: str


def _load(source: str, schema: str, split: str, data: Any) -> list[Any]:
    if data.schema != schema:
        raise ValueError(
            f"this loss needs rows of schema '{schema}' (docs/data_formats.md); "
            f"set --data.schema {schema} (got '{data.schema}')"
        )
    result = load_examples(source, schema, split=split, on_error=data.on_error, limit=data.limit)
    for err in result.errors[:10]:
        log.warning("skipped %s", err)
    return result.examples


def _collate(
    sequences: list[TokenizedExample], bins: list[list[int]], packing: bool, pad_id: int
) -> list[tuple[list[int], dict[str, torch.Tensor]]]:
    out = []
    for b in bins:
        seqs = [sequences[i] for i in b]
        out.append((b, packed_batch(seqs) if packing else pad_batch(seqs, pad_id=pad_id)))
    return out


def _per_sequence(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Head logits of every completion token as a right-padded (D, T, C) matrix and its mask."""
    select = batch["labels"] != -100  # (B, L): completion tokens (loss-mask positions)
    logits = token_scores(model, batch, select)  # (N, C)
    docs = selected_documents(batch, select)  # (N,)
    counts = torch.bincount(docs, minlength=len(batch["outcome"]))  # (D,)
    return unpack_rows(logits, counts)  # (D, T, C), (D, T)


class OutcomeTask:
    """Outcome reward model: one label per completion, a logit per completion token."""

    num_labels = 1

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.loss = ORM_LOSSES[cfg.algo.loss]

    def load(self, tokenizer: Any, source: str, split: str, seed: int) -> tuple[list, dict]:
        """Rendered completions with labels, and counts for the log."""
        del seed  # nothing random
        examples = _load(source, "unpaired_preference", split, self.cfg.data)
        items = []
        for ex in examples:
            seq = render_sequence(
                tokenizer, ex.prompt, ex.completion, max_len=self.cfg.data.max_len,
                source=ex.location,
            )  # fmt: skip
            if seq is not None:
                items.append(OutcomeItem(seq, float(ex.label), repr(ex.prompt)))
        positive = sum(item.label for item in items)
        return items, {"rows": len(examples), "kept": len(items), "positive": int(positive)}

    @staticmethod
    def tokens(item: OutcomeItem) -> int:
        """Tokens of one item."""
        return len(item.sequence.input_ids)

    def micro_batches(
        self, items: list[OutcomeItem], *, max_tokens: int, packing: bool, pad_id: int
    ) -> list[dict[str, torch.Tensor]]:
        """Packed completions plus their outcome labels."""
        sequences = [item.sequence for item in items]
        bins = pack_examples(sequences, max_tokens=max_tokens)
        out = []
        for b, batch in _collate(sequences, bins, packing, pad_id):
            batch["outcome"] = torch.tensor([items[i].label for i in b])  # (D,)
            batch["index"] = torch.tensor(b, dtype=torch.long)  # (D,) item of each sequence
            out.append(batch)
        return out

    def step_loss(self, model: torch.nn.Module) -> Any:
        """Per micro-batch: token logits per sequence, then the ORM loss."""

        def step_loss(batch: dict[str, torch.Tensor], normaliser: float) -> LossOutput:
            logits, mask = _per_sequence(model, batch)
            return self.loss(
                logits=logits[..., 0], labels=batch["outcome"], mask=mask, normaliser=normaliser
            )

        return step_loss

    @staticmethod
    def count(batch: dict[str, torch.Tensor]) -> float:
        """Sequences in a micro-batch (the normaliser of both ORM losses)."""
        return float(len(batch["outcome"]))

    @staticmethod
    def train_metrics(sums: dict[str, float]) -> dict[str, float]:
        """Sequence accuracy when the loss reports it."""
        if "correct" not in sums:
            return {}
        return {"train/accuracy": sums["correct"] / max(sums.get("sequences", 0.0), 1.0)}

    @torch.no_grad()
    def score(self, model: torch.nn.Module, items: list[OutcomeItem], **kw: Any) -> list:
        """(score, label, prompt id) of every held-out completion."""
        records = []
        for batch in self.micro_batches(items, **kw):
            batch = {k: v.to(next(model.parameters()).device) for k, v in batch.items()}
            logits, mask = _per_sequence(model, batch)
            scores = orm_score(logits=logits[..., 0], mask=mask, mode=self.cfg.algo.orm_score)
            for i, s in zip(batch["index"].tolist(), scores.tolist(), strict=True):
                records.append((s, items[i].label, items[i].prompt_id))
        return records

    @staticmethod
    def report(records: list) -> tuple[dict[str, float], dict[str, Any]]:
        """ORM metrics of the held-out completions."""
        scores = [r[0] for r in records]
        labels = [r[1] for r in records]
        report = orm_metrics(scores=scores, correct=labels, prompt_ids=[r[2] for r in records])
        hits = [(s > 0.5) == (y > 0.5) for s, y in zip(scores, labels, strict=True)]
        report["accuracy"] = sum(hits) / len(hits) if hits else math.nan
        return {f"eval/{k}": float(v) for k, v in report.items()}, report

    @staticmethod
    def print_report(report: dict[str, Any], title: str) -> None:
        """One line per metric."""
        print(title + ": " + ", ".join(f"{k} {v:.4f}" for k, v in report.items()))


class ProcessTask:
    """Process reward model: a label on the last token of every step."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.num_labels = 3 if cfg.algo.prm_mode == "3class" else 1

    def load(self, tokenizer: Any, source: str, split: str, seed: int) -> tuple[list, dict]:
        """Rendered solutions with step positions, and counts for the log."""
        del seed
        examples = _load(source, "process", split, self.cfg.data)
        items = []
        for ex in examples:
            rendered = render_steps(
                tokenizer, ex.prompt, ex.steps, ex.labels, separator=self.cfg.algo.prm_separator,
                max_len=self.cfg.data.max_len, source=ex.location,
            )  # fmt: skip
            if rendered is not None:
                items.append(rendered)
        steps = sum(item.num_steps for item in items)
        return items, {"rows": len(examples), "kept": len(items), "steps": steps}

    @staticmethod
    def tokens(item: StepExample) -> int:
        """Tokens of one item."""
        return len(item.input_ids)

    def micro_batches(
        self, items: list[StepExample], *, max_tokens: int, packing: bool, pad_id: int
    ) -> list[dict[str, torch.Tensor]]:
        """Packed solutions; ``labels`` marks the step-end tokens, ``step_labels`` their labels."""
        sequences = [
            TokenizedExample(it.input_ids, [lab != -100 for lab in it.token_labels()], it.source)
            for it in items
        ]
        bins = pack_examples(sequences, max_tokens=max_tokens)
        out = []
        for b, batch in _collate(sequences, bins, packing, pad_id):
            labels = [lab for i in b for lab in items[i].step_labels]
            batch["step_labels"] = torch.tensor(labels, dtype=torch.long)  # (S,)
            batch["outcome"] = torch.zeros(len(b))  # (D,) sequence count
            out.append(batch)
        return out

    def _logits(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = token_scores(model, batch, batch["labels"] != -100)  # (S, C)
        return logits if self.num_labels == 3 else logits[:, 0]

    def step_loss(self, model: torch.nn.Module) -> Any:
        """Per micro-batch: head logits at the step ends, then the PRM loss."""
        algo = self.cfg.algo

        def step_loss(batch: dict[str, torch.Tensor], normaliser: float) -> LossOutput:
            return prm_loss(
                logits=self._logits(model, batch), labels=batch["step_labels"],
                normaliser=normaliser, mode=algo.prm_mode, neutral=algo.prm_neutral,
            )  # fmt: skip

        return step_loss

    def count(self, batch: dict[str, torch.Tensor]) -> float:
        """Counted steps (neutral steps are dropped in binary mode with neutral 'drop')."""
        labels = batch["step_labels"]
        drop = self.cfg.algo.prm_mode == "binary" and self.cfg.algo.prm_neutral == "drop"
        return float((labels != 0).sum() if drop else labels.numel())

    @staticmethod
    def train_metrics(sums: dict[str, float]) -> dict[str, float]:
        """Step accuracy."""
        return {"train/step_accuracy": sums.get("correct", 0.0) / max(sums.get("steps", 0), 1)}

    @torch.no_grad()
    def score(self, model: torch.nn.Module, items: list[StepExample], **kw: Any) -> list:
        """(P(+1) per step, labels) of every held-out solution."""
        records = []
        for batch in self.micro_batches(items, **kw):
            batch = {k: v.to(next(model.parameters()).device) for k, v in batch.items()}
            mode = self.cfg.algo.prm_mode
            probs = prm_step_scores(logits=self._logits(model, batch), mode=mode).tolist()
            labels = batch["step_labels"].tolist()
            docs = selected_documents(batch, batch["labels"] != -100).tolist()
            for d in sorted(set(docs)):
                mine = [i for i, doc in enumerate(docs) if doc == d]
                records.append(([probs[i] for i in mine], [labels[i] for i in mine]))
        return records

    @staticmethod
    def report(records: list) -> tuple[dict[str, float], dict[str, Any]]:
        """Step and solution accuracy of the held-out solutions."""
        probs = [p for r in records for p in r[0]]
        labels = [y for r in records for y in r[1]]
        signed = [(p > 0.5) == (y > 0) for p, y in zip(probs, labels, strict=True) if y != 0]
        pos = [p for p, y in zip(probs, labels, strict=True) if y > 0]
        neg = [p for p, y in zip(probs, labels, strict=True) if y < 0]
        solved = []
        for step_probs, step_labels in records:
            scores = torch.tensor([step_probs])  # (1, S)
            every = torch.ones_like(scores, dtype=torch.bool)
            worst = prm_aggregate(step_scores=scores, mask=every, mode="min")
            solved.append((float(worst[0]) > 0.5) == all(y > 0 for y in step_labels))

        def mean(values: list) -> float:
            return sum(values) / len(values) if values else math.nan

        report = {
            "step_accuracy": mean(signed),
            "mean_p_correct_steps": mean(pos),
            "mean_p_wrong_steps": mean(neg),
            "solution_accuracy": mean(solved),
            "solutions": len(records),
        }
        return {f"eval/{k}": float(v) for k, v in report.items()}, report

    print_report = staticmethod(OutcomeTask.print_report)


TOKEN_TASKS = {"orm": OutcomeTask, "orm_sequence": OutcomeTask, "prm": ProcessTask}
"""Token-level ``algo.loss`` -> task class."""
