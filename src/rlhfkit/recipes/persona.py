"""``rlhfkit persona extract | monitor | steer``: persona vectors (RLHF book, ch. on character).

**extract** (Chen et al. 2025, "Persona Vectors"): for each of a trait's questions the model
answers twice, under a system prompt that elicits the trait and under one that suppresses it.
With ``filter markers`` an eliciting answer is kept only if the trait's marker scorer finds the
trait in it and a suppressing one only if it does not. Every kept answer is run through the
model once more and, per decoder layer, its hidden states are averaged over the response tokens
(variant ``response``), over the prompt tokens (``prompt_avg``) or read at the last prompt token
(``last_prompt``). The vector of a layer is mean(eliciting) - mean(suppressing). The chosen
layer is the one whose projections separate the two sides best on the training questions (the
gap of the means over their pooled std). The held-out questions are answered the same way and
give each layer's AUROC: over the answers the filter keeps (eliciting answers that show the
trait against suppressing ones that do not) and, beside it, over every answer labelled only by
its system prompt. A small model often ignores its system prompt, so the second is lower.

Writes ``<output>/vectors.safetensors`` (one (L, D) tensor per variant), ``persona.json`` (trait,
model, chosen layer, per-layer separation and held-out AUROC, provenance) and ``samples.jsonl``.

**monitor**: the projection of each row's response (or prompt) activations on a vector, to flag
a shift before generation or to find the training rows that push a trait up.

**steer**: answers to held-out questions with ``alpha * v`` added at the chosen layer, for each
alpha of a grid, optionally capped; the trait score, the answers' perplexity under the unsteered
model and Spearman's correlation of score with alpha (``<output>/steer.json``).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file

from rlhfkit.atomic import atomic_write_text
from rlhfkit.config import ModelConfig, Problems
from rlhfkit.data.templates import render_prompt
from rlhfkit.data.traits import Trait, load_trait
from rlhfkit.errors import ConfigError, UserError
from rlhfkit.eval.run import load_sampler
from rlhfkit.models.steering import decoder_layers, recording
from rlhfkit.ops.steering import auroc, masked_mean, mean_difference, project
from rlhfkit.rollout.hf import SamplingConfig

log = logging.getLogger(__name__)

VARIANTS = ("response", "prompt_avg", "last_prompt")
"""Where activations are averaged: response tokens, prompt tokens, the last prompt token."""
Variant = Literal["response", "prompt_avg", "last_prompt"]


def _trait_problem(spec: str) -> list[tuple[str, str]]:
    try:
        load_trait(spec)
    except UserError as err:
        return [("trait", str(err))]
    return []


def _vector_problem(directory: str) -> list[tuple[str, str]]:
    path = Path(directory).expanduser()
    missing = [n for n in ("vectors.safetensors", "persona.json") if not (path / n).is_file()]
    if missing:
        return [("vector", f"{directory}: not a persona vector directory (no {missing[0]}); "
                 "make one with rlhfkit persona extract")]  # fmt: skip
    return []


@dataclass
class PersonaExtractConfig:
    """rlhfkit persona extract: a trait's persona vector at every layer of a model."""

    model: ModelConfig = field(default_factory=ModelConfig)
    trait: str = "enthusiasm"
    """A shipped trait (enthusiasm, formality, sycophancy) or a trait file (.yaml/.json)."""
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(max_new_tokens=64, temperature=0.7, num_samples=4)
    )
    """How the answers are sampled (num_samples answers per question and side)."""
    filter: Literal["markers", "none"] = "markers"
    """Keep only eliciting answers that show the trait (marker score > 0) and suppressing ones
    that do not (<= 0), as judged by the trait's marker scorer; or keep every answer."""
    batch_size: int = 8
    """Sequences per forward pass when reading activations."""
    output: str = "runs/persona/enthusiasm"
    """Directory for vectors.safetensors, persona.json and samples.jsonl."""

    def problems(self) -> Problems:
        """The trait file and the batch size."""
        out = _trait_problem(self.trait)
        if self.batch_size < 1:
            out.append(("batch_size", f"must be >= 1, got {self.batch_size}"))
        return out


@dataclass
class Answer:
    """One sampled answer: its prompt and completion ids, text, side and marker score."""

    question: str
    side: str
    prompt_ids: list[int]
    completion_ids: list[int]
    text: str
    score: float


def answer(generator: Any, tokenizer: Any, trait: Trait, questions: tuple[str, ...],
           side: str | None, sampling: SamplingConfig) -> list[Answer]:  # fmt: skip
    """Every question answered ``sampling.num_samples`` times under ``side``'s system prompt."""
    prompts = [render_prompt(tokenizer, trait.messages(q, side)) for q in questions]
    rollout = generator.generate(prompts, sampling)
    out = []
    for i, ids in enumerate(rollout.completion_ids):
        text = tokenizer.decode(ids, skip_special_tokens=True)
        q = rollout.prompt_index[i]
        out.append(Answer(questions[q], side or "none", prompts[q], list(ids), text,
                          trait.score(text)))  # fmt: skip
    return out


def padded(answers: list[Answer], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt + completion of each answer, right-padded: ids and attention (bool), (B, W)."""
    seqs = [a.prompt_ids + a.completion_ids for a in answers]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(seq)
    attention = torch.arange(width)[None, :] < torch.tensor([len(s) for s in seqs])[:, None]
    return ids, attention


def activations(model: torch.nn.Module, answers: list[Answer], batch_size: int,
                pad_id: int) -> dict[str, torch.Tensor]:  # fmt: skip
    """Per answer and decoder layer, the mean hidden state of each variant.

    The prompt and completion of an answer are run together (right-padded batches, no cache);
    the response mean covers the completion's tokens, the prompt mean the prompt's, and the
    last-prompt variant is the hidden state at the last prompt token.

    Returns:
        variant -> (N, L, D) fp32.
    """
    layers = list(range(len(decoder_layers(model))))
    device = next(model.parameters()).device
    out: dict[str, list[torch.Tensor]] = {v: [] for v in VARIANTS}
    for start in range(0, len(answers), batch_size):
        part = answers[start : start + batch_size]
        ids, attention = padded(part, pad_id)
        masks = {v: torch.zeros_like(attention) for v in VARIANTS}
        for row, a in enumerate(part):
            p = len(a.prompt_ids)
            masks["prompt_avg"][row, :p] = True
            masks["last_prompt"][row, p - 1] = True
            masks["response"][row, p : p + len(a.completion_ids)] = True
        with torch.no_grad(), recording(model, layers) as hidden:
            model(input_ids=ids.to(device), attention_mask=attention.long().to(device),
                  use_cache=False)  # fmt: skip
        for v in VARIANTS:
            m = masks[v].to(device)
            out[v].append(torch.stack([masked_mean(hidden[i], m).cpu() for i in layers], dim=1))
    return {v: torch.cat(parts) for v, parts in out.items()}


def separation(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """(mean(pos) - mean(neg)) / pooled std of two sets of projections (0 for no spread)."""
    pooled = torch.cat([pos - pos.mean(), neg - neg.mean()]).std()
    return float((pos.mean() - neg.mean()) / pooled) if pooled > 0 else 0.0


def _kept(answers: list[Answer], side: str, filter_: str) -> list[int]:
    keep = {"positive": lambda s: s > 0, "negative": lambda s: s <= 0}[side]
    return [i for i, a in enumerate(answers)
            if a.side == side and (filter_ == "none" or keep(a.score))]  # fmt: skip


def heldout_aurocs(acts: torch.Tensor, vectors: torch.Tensor, positive: list[int],
                   negative: list[int]) -> list[float]:  # fmt: skip
    """Per layer, the AUROC of the projections separating two sets of answers.

    Args:
        acts: (N, L, D) response-averaged activations.
        vectors: (L, D) the vector of each layer.
        positive: indices into ``acts`` of the eliciting answers compared (those the filter
            kept, or all of that side).
        negative: the same for the suppressing answers.

    Returns:
        L AUROCs (nan where a side is empty).
    """
    out = []
    for i in range(vectors.shape[0]):
        proj = project(acts[:, i], vectors[i])
        out.append(auroc(proj[positive].tolist(), proj[negative].tolist())
                   if positive and negative else math.nan)  # fmt: skip
    return out


def _rows(answers: list[Answer], split: str) -> list[str]:
    return [json.dumps({"split": split, "question": a.question, "side": a.side, "text": a.text,
                        "score": a.score}) for a in answers]  # fmt: skip


def extract(cfg: PersonaExtractConfig) -> dict[str, Any]:
    """Extract and save the vectors; returns the summary written to ``persona.json``."""
    trait = load_trait(cfg.trait)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer, generator = load_sampler(cfg.model)
    pad = int(tokenizer.pad_token_id)

    def both_sides(questions: tuple[str, ...]) -> list[Answer]:
        sides = ("positive", "negative")
        return [
            a
            for s in sides
            for a in answer(generator, tokenizer, trait, questions, s, cfg.sampling)
        ]

    train = both_sides(trait.train_questions)
    pos, neg = _kept(train, "positive", cfg.filter), _kept(train, "negative", cfg.filter)
    if len(pos) < 2 or len(neg) < 2:
        raise ConfigError(
            f"--filter {cfg.filter}: only {len(pos)} eliciting and {len(neg)} suppressing answers "
            "were kept (need 2 each); sample more (--sampling.num-samples) or use --filter none"
        )
    acts = activations(model, train, cfg.batch_size, pad)
    vectors = {v: mean_difference(acts[v][pos], acts[v][neg]).float() for v in VARIANTS}
    n_layers = vectors["response"].shape[0]
    sep = [separation(project(acts["response"][pos, i], vectors["response"][i]),
                      project(acts["response"][neg, i], vectors["response"][i]))
           for i in range(n_layers)]  # fmt: skip
    layer = max(range(n_layers), key=sep.__getitem__)
    held = both_sides(trait.heldout_questions)
    held_acts = activations(model, held, cfg.batch_size, pad)["response"]
    held_pos, held_neg = _kept(held, "positive", cfg.filter), _kept(held, "negative", cfg.filter)
    aurocs = heldout_aurocs(held_acts, vectors["response"], held_pos, held_neg)
    all_aurocs = heldout_aurocs(held_acts, vectors["response"], _kept(held, "positive", "none"),
                                _kept(held, "negative", "none"))  # fmt: skip
    save_file({v: t.contiguous() for v, t in vectors.items()}, str(out / "vectors.safetensors"))
    summary = {
        "trait": trait.name, "trait_source": cfg.trait, "model": cfg.model.name, "layer": layer,
        "layers": n_layers, "hidden_size": int(vectors["response"].shape[1]),
        "kept": {"positive": len(pos), "negative": len(neg), "answers": len(train)},
        "train_separation": sep, "heldout_auroc": aurocs,
        "heldout_auroc_at_layer": aurocs[layer],
        "heldout_kept": {"positive": len(held_pos), "negative": len(held_neg),
                         "answers": len(held)},
        "heldout_auroc_unfiltered": all_aurocs,
        "heldout_auroc_unfiltered_at_layer": all_aurocs[layer],
        "heldout_trait_score": {
            s: sum(a.score for a in held if a.side == s) / max(1, sum(a.side == s for a in held))
            for s in ("positive", "negative")
        },
        "provenance": {"created": datetime.now(UTC).isoformat(timespec="seconds"),
                       "sampling": asdict(cfg.sampling), "filter": cfg.filter},
    }  # fmt: skip
    atomic_write_text(out / "persona.json", json.dumps(summary, indent=2))
    atomic_write_text(out / "samples.jsonl",
                      "\n".join(_rows(train, "train") + _rows(held, "heldout")) + "\n")  # fmt: skip
    log.info("%s: layer %d, held-out AUROC %.3f", trait.name, layer, aurocs[layer])
    print(f"persona vector of {trait.name}: {out} (layer {layer}; held-out AUROC "
          f"{aurocs[layer]:.3f} over {len(held_pos)}/{len(held_neg)} kept answers, "
          f"{all_aurocs[layer]:.3f} over all {len(held)}; kept {len(pos)}/{len(neg)} "
          "training answers)")  # fmt: skip
    return summary
