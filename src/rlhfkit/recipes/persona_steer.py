"""``rlhfkit persona monitor`` and ``rlhfkit persona steer`` (see :mod:`rlhfkit.recipes.persona`).

**monitor**: each row of a file (``messages`` ending with the assistant's reply, or ``prompt``
and ``completion``; a row without a reply is a prompt) is run through the model and its
activations at the vector's layer are averaged over the reply's tokens (``response``) or the
prompt's (``prompt_avg``), or read at the last prompt token (``last_prompt``: a shift flagged
before anything is generated), then projected on the vector. The rows are written back with a
``projection`` field and the highest are printed: the rows that push the trait up.

**steer**: the trait's held-out questions (no system prompt) are answered with alpha * v added
to the chosen layer's output, for each alpha of ``--alphas``. With ``--cap-quantile q`` the
projection on the axis is also capped (from ``--cap-side``) at tau, the q-quantile of the
per-token projections of the unsteered model's own answers to the training questions. Reported
per alpha: the mean trait score (the trait's marker scorer), the answers' perplexity under the
unsteered model, their distinct-2 (the fraction of distinct token bigrams: repetition, which a
strong vector causes and perplexity does not catch, lowers it), and Spearman's correlation
between alpha and the score (``steer.json``). An alpha is *coherent* while its perplexity is at
most ``--max-perplexity-ratio`` times the unsteered answers' and its distinct-2 at least
``--min-distinct-ratio`` times theirs; Spearman is reported over the coherent alphas too, the
range where steering changes the trait rather than breaking the text.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from rich.console import Console
from rich.table import Table

from rlhfkit.atomic import atomic_write_text
from rlhfkit.config import ModelConfig, Problems
from rlhfkit.data.messages import parse_messages, parse_prompt
from rlhfkit.data.sources import load_rows
from rlhfkit.data.templates import render_prompt
from rlhfkit.data.traits import load_trait
from rlhfkit.eval.metrics import distinct_ngrams, spearman
from rlhfkit.eval.run import load_sampler
from rlhfkit.models.steering import Cap, Steer, edited, load_persona_vector, recording
from rlhfkit.ops.steering import project
from rlhfkit.recipes.persona import (
    Answer,
    _trait_problem,
    _vector_problem,
    activations,
    answer,
    padded,
)
from rlhfkit.rollout.hf import SamplingConfig

console = Console()


@dataclass
class PersonaMonitorConfig:
    """rlhfkit persona monitor: project rows' activations on a persona vector."""

    model: ModelConfig = field(default_factory=ModelConfig)
    vector: str = "runs/persona/enthusiasm"
    """A directory written by rlhfkit persona extract."""
    data: str = "rows.jsonl"
    """Rows to score: messages (the last one the reply) or prompt + completion."""
    layer: int | None = None
    """Layer of the vector (None: the one extract chose)."""
    variant: Literal["response", "prompt_avg", "last_prompt"] = "response"
    """Average over the reply's tokens, the prompt's, or read the last prompt token."""
    batch_size: int = 8
    """Sequences per forward pass."""
    output: str = "runs/persona/monitor.jsonl"
    """The rows with a projection field."""
    top: int = 5
    """Rows printed, highest projection first."""

    def problems(self) -> Problems:
        """The vector directory and the data file."""
        out = _vector_problem(self.vector)
        if not Path(self.data).expanduser().is_file() and not self.data.startswith("builtin:"):
            out.append(("data", f"{self.data}: no such file"))
        return out


def _row_answer(tokenizer: Any, row: dict[str, Any], where: str) -> Answer:
    """A row as prompt ids and reply ids (the reply may be empty)."""
    if "messages" in row:
        messages = parse_messages(row["messages"], "messages", where)
        reply = messages[-1]["content"] if messages[-1]["role"] == "assistant" else ""
        prompt = messages[:-1] if reply else messages
    else:
        prompt = parse_prompt(row.get("prompt"), "prompt", where)
        reply = str(row.get("completion") or "")
    ids = render_prompt(tokenizer, prompt)
    reply_ids = tokenizer(reply, add_special_tokens=False)["input_ids"] if reply else []
    return Answer("", "row", ids, list(reply_ids), reply, 0.0)


def monitor(cfg: PersonaMonitorConfig) -> list[float]:
    """Write every row with its projection; returns the projections."""
    vector, layer, meta = load_persona_vector(cfg.vector, cfg.layer, cfg.variant)
    rows = [r for r in load_rows(cfg.data, split="train")]
    model, tokenizer, _ = load_sampler(cfg.model)
    items = [_row_answer(tokenizer, r.data, r.location) for r in rows]
    if cfg.variant == "response" and any(not a.completion_ids for a in items):
        empty = next(r.location for r, a in zip(rows, items, strict=True) if not a.completion_ids)
        raise ValueError(f"{empty}: no reply to average over (use --variant last_prompt)")
    acts = activations(model, items, cfg.batch_size, int(tokenizer.pad_token_id))[cfg.variant]
    scores = project(acts[:, layer], vector).tolist()
    lines = [json.dumps({**r.data, "projection": s}) for r, s in zip(rows, scores, strict=True)]
    Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cfg.output, "\n".join(lines) + "\n")
    table = Table(title=f"{meta['trait']} projection at layer {layer} ({cfg.variant})")
    table.add_column("row")
    table.add_column("projection", justify="right")
    for i in sorted(range(len(rows)), key=lambda i: -scores[i])[: cfg.top]:
        table.add_row(rows[i].location, f"{scores[i]:.3f}")
    console.print(table)
    return scores


@dataclass
class PersonaSteerConfig:
    """rlhfkit persona steer: answers with a persona vector added, over a grid of alphas."""

    model: ModelConfig = field(default_factory=ModelConfig)
    vector: str = "runs/persona/enthusiasm"
    """A directory written by rlhfkit persona extract."""
    trait: str | None = None
    """The trait whose questions and scorer are used (None: the vector's)."""
    layer: int | None = None
    """Layer to steer (None: the one extract chose)."""
    alphas: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0)
    """Steering strengths: h <- h + alpha * v."""
    positions: Literal["all", "prompt", "response"] = "all"
    """Positions steered: the prompt (prefill), the response (decode steps) or both."""
    cap_quantile: float | None = None
    """Also cap the projection at this quantile of the unsteered answers' projections."""
    cap_side: Literal["below", "above"] = "above"
    """Cap from above (keep the trait down) or from below (keep it up)."""
    questions: Literal["heldout", "train", "all"] = "heldout"
    """The trait's questions answered."""
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(max_new_tokens=64, temperature=0.0)
    )
    """How answers are sampled (greedy by default)."""
    max_perplexity_ratio: float = 2.0
    """Coherence bound: an alpha is coherent while its answers' perplexity under the unsteered
    model is at most this multiple of the unsteered answers' own."""
    min_distinct_ratio: float = 0.9
    """Coherence bound: ... and their distinct-2 at least this fraction of the unsteered
    answers' (a steered model that loops on one phrase keeps a low perplexity)."""
    batch_size: int = 8
    """Sequences per forward pass for perplexity and the cap's threshold."""
    output: str = "runs/persona/steer"
    """Directory for steer.json and samples.jsonl."""

    def problems(self) -> Problems:
        """The vector directory, the trait, the quantile."""
        out = _vector_problem(self.vector)
        out += _trait_problem(self.trait) if self.trait else []
        if self.cap_quantile is not None and not 0.0 <= self.cap_quantile <= 1.0:
            out.append(("cap_quantile", f"must be in [0, 1], got {self.cap_quantile}"))
        if not self.alphas:
            out.append(("alphas", "need at least one alpha"))
        if self.max_perplexity_ratio <= 0:
            out.append(("max_perplexity_ratio", f"must be > 0, got {self.max_perplexity_ratio}"))
        return out


def mean_nll(model: torch.nn.Module, answers: list[Answer], batch_size: int,
             pad_id: int) -> list[float]:  # fmt: skip
    """Each answer's mean negative log-likelihood per completion token under ``model``."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(answers), batch_size):
        part = answers[start : start + batch_size]
        ids, attention = padded(part, pad_id)
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=attention.long().to(device),
                           use_cache=False).logits.float()  # fmt: skip
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        token = logp.gather(-1, ids[:, 1:].to(device)[..., None])[..., 0]  # (B, W-1)
        for row, a in enumerate(part):
            p, n = len(a.prompt_ids), len(a.completion_ids)
            out.append(float(-token[row, p - 1 : p - 1 + n].mean()) if n else math.nan)
    return out


def cap_threshold(
    model: torch.nn.Module, answers: list[Answer], layer: int, vector: torch.Tensor,
    quantile: float, batch_size: int, pad_id: int,
) -> float:  # fmt: skip
    """The ``quantile`` of the per-token projections of the answers' response tokens."""
    values = []
    device = next(model.parameters()).device
    for start in range(0, len(answers), batch_size):
        part = answers[start : start + batch_size]
        ids, attention = padded(part, pad_id)
        with torch.no_grad(), recording(model, [layer]) as hidden:
            model(input_ids=ids.to(device), attention_mask=attention.long().to(device),
                  use_cache=False)  # fmt: skip
        proj = project(hidden[layer], vector.to(device))  # (B, W)
        for row, a in enumerate(part):
            p = len(a.prompt_ids)
            values.append(proj[row, p : p + len(a.completion_ids)].cpu())
    return float(torch.quantile(torch.cat(values), quantile))


def coherent(figures: dict[str, float], unsteered: dict[str, float], max_perplexity_ratio: float,
             min_distinct_ratio: float) -> bool:  # fmt: skip
    """Whether steered answers stay within the coherence bound of the unsteered ones.

    perplexity <= max_perplexity_ratio * perplexity_0 and
    distinct_2 >= min_distinct_ratio * distinct_2_0, both perplexities under the unsteered model.
    """
    return bool(
        figures["perplexity"] <= max_perplexity_ratio * unsteered["perplexity"]
        and figures["distinct_2"] >= min_distinct_ratio * unsteered["distinct_2"]
    )


def _spearman(results: list[dict[str, Any]]) -> float:
    alphas = [r["alpha"] for r in results]
    return spearman(alphas, [r["trait_score"] for r in results]) if len(results) > 1 else math.nan


def steer(cfg: PersonaSteerConfig) -> dict[str, Any]:
    """Answer under each alpha; returns (and writes) the trait score and perplexity per alpha."""
    vector, layer, meta = load_persona_vector(cfg.vector, cfg.layer)
    trait = load_trait(cfg.trait or meta["trait_source"])
    questions = {"heldout": trait.heldout_questions, "train": trait.train_questions,
                 "all": trait.questions}[cfg.questions]  # fmt: skip
    model, tokenizer, generator = load_sampler(cfg.model)
    pad = int(tokenizer.pad_token_id)
    caps: list[Cap] = []
    tau = None
    if cfg.cap_quantile is not None:
        own = answer(generator, tokenizer, trait, trait.train_questions, None, cfg.sampling)
        tau = cap_threshold(model, own, layer, vector, cfg.cap_quantile, cfg.batch_size, pad)
        caps = [Cap(layer, vector, tau, cfg.cap_side, cfg.positions)]

    def measure(edits: list[Steer | Cap]) -> tuple[dict[str, float], list[Answer]]:
        with edited(model, edits):
            answers = answer(generator, tokenizer, trait, questions, None, cfg.sampling)
        nll = mean_nll(model, answers, cfg.batch_size, pad)  # the unsteered model
        finite = [x for x in nll if not math.isnan(x)]
        return {
            "trait_score": sum(a.score for a in answers) / len(answers),
            "perplexity": math.exp(sum(finite) / len(finite)) if finite else math.nan,
            "distinct_2": sum(distinct_ngrams(a.completion_ids) for a in answers) / len(answers),
        }, answers  # fmt: skip

    results, samples = [], []
    for alpha in cfg.alphas:
        figures, answers = measure([Steer(layer, vector, alpha, cfg.positions), *caps])
        results.append({"alpha": alpha, **figures})
        samples += [json.dumps({"alpha": alpha, "question": a.question, "text": a.text,
                                "score": a.score}) for a in answers]  # fmt: skip
    plain = next((r for r in results if r["alpha"] == 0.0 and not caps), None)
    reference = plain or measure([])[0]  # the unsteered model's own answers
    for r in results:
        r["coherent"] = coherent(r, reference, cfg.max_perplexity_ratio, cfg.min_distinct_ratio)
    inside = [r for r in results if r["coherent"]]
    report = {
        "trait": trait.name, "layer": layer, "positions": cfg.positions, "cap_tau": tau,
        "cap_side": cfg.cap_side if caps else None, "results": results,
        "spearman": _spearman(results),
        "unsteered": {k: reference[k] for k in ("trait_score", "perplexity", "distinct_2")},
        "coherence_bound": {"max_perplexity_ratio": cfg.max_perplexity_ratio,
                            "min_distinct_ratio": cfg.min_distinct_ratio},
        "coherent_alphas": [r["alpha"] for r in inside],
        "spearman_coherent": _spearman(inside),
    }  # fmt: skip
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "steer.json", json.dumps(report, indent=2))
    atomic_write_text(out / "samples.jsonl", "\n".join(samples) + "\n")
    table = Table(title=f"steering {trait.name} at layer {layer}")
    for name in ("alpha", "trait score", "perplexity", "distinct-2", "coherent"):
        table.add_column(name, justify="right")
    for r in results:
        table.add_row(f"{r['alpha']:g}", f"{r['trait_score']:.2f}", f"{r['perplexity']:.2f}",
                      f"{r['distinct_2']:.2f}", "yes" if r["coherent"] else "no")  # fmt: skip
    console.print(table)
    console.print(f"Spearman(alpha, trait score) = {report['spearman']:.3f}, over the coherent "
                  f"alphas {report['spearman_coherent']:.3f}; {out / 'steer.json'}")  # fmt: skip
    return report
