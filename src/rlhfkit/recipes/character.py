"""``rlhfkit persona pairs``: preference pairs for character training from a constitution.

Character training (RLHF book, the chapter on character; Anthropic's character training and the
open replication of Maiya et al. 2025) teaches a model to act on a written description of its
character without seeing it. For every question the model answers twice: once with the
constitution as its system prompt (the **chosen** reply) and once without it (the
**rejected** reply). The pair's prompt is the bare question, so DPO on the pairs moves the
model towards what it would say with the constitution in context, a form of context
distillation.

The constitution is a trait's (``constitution`` in a trait file; its eliciting system prompt when
the file has none) or a text file. The rows are in the preference schema, ready for
``rlhfkit dpo --data.train <output>``; pairs whose two replies are equal are dropped.

``rlhfkit persona reflect`` writes the optional second stage of Maiya et al.: self-reflection
data. The model (usually the one DPO just trained) answers prompts about itself (who it is, what
it values, how it talks; ``data/traits/reflection.yaml`` or a file of your own) with the
constitution as its system prompt; the rows keep only the prompt and the reply, in the messages
schema, so ``rlhfkit sft --data.train <output>`` teaches the model to describe and voice its
character with no constitution in context.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from rlhfkit.atomic import atomic_write_text
from rlhfkit.config import ModelConfig, Problems
from rlhfkit.data.rows import DataError
from rlhfkit.data.templates import render_prompt
from rlhfkit.data.traits import Trait, load_trait
from rlhfkit.errors import MissingFileError
from rlhfkit.eval.run import load_sampler
from rlhfkit.recipes.persona import _trait_problem
from rlhfkit.rollout.hf import SamplingConfig


@dataclass
class PersonaPairsConfig:
    """rlhfkit persona pairs: chosen replies with the constitution in context, rejected without."""

    model: ModelConfig = field(default_factory=ModelConfig)
    trait: str = "enthusiasm"
    """The trait whose questions are answered (and whose constitution is used by default)."""
    constitution: str | None = None
    """A text file describing the character (None: the trait's constitution)."""
    questions: Literal["train", "all"] = "train"
    """The trait's training questions, or all of them (the held-out ones too)."""
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(max_new_tokens=64, temperature=0.7, num_samples=4)
    )
    """How replies are sampled (num_samples pairs per question)."""
    output: str = "runs/persona/pairs.jsonl"
    """The preference rows (prompt, chosen, rejected)."""

    def problems(self) -> Problems:
        """The trait and the constitution file."""
        out = _trait_problem(self.trait)
        if self.constitution is not None and not Path(self.constitution).expanduser().is_file():
            out.append(("constitution", f"{self.constitution}: no such file"))
        return out


def constitution_text(cfg: PersonaPairsConfig, trait: Trait) -> str:
    """The character description the chosen replies see.

    Raises:
        MissingFileError: The constitution file does not exist.
    """
    if cfg.constitution is None:
        return trait.constitution
    path = Path(cfg.constitution).expanduser()
    if not path.is_file():
        raise MissingFileError(f"--constitution: {cfg.constitution}: no such file")
    return path.read_text(encoding="utf-8").strip()


def replies(generator: Any, tokenizer: Any, questions: Sequence[str], system: str | None,
            sampling: SamplingConfig) -> list[list[str]]:  # fmt: skip
    """``sampling.num_samples`` replies to each question, in order.

    Each question is the user turn, under ``system`` as the system prompt (None: none).
    """
    prompts = []
    for q in questions:
        messages = [{"role": "user", "content": q}]
        if system:
            messages.insert(0, {"role": "system", "content": system})
        prompts.append(render_prompt(tokenizer, messages))
    rollout = generator.generate(prompts, sampling)
    out: list[list[str]] = [[] for _ in questions]
    for i, ids in enumerate(rollout.completion_ids):
        out[rollout.prompt_index[i]].append(tokenizer.decode(ids, skip_special_tokens=True))
    return out


def pairs(cfg: PersonaPairsConfig) -> list[dict]:
    """Write the pairs; returns them."""
    trait = load_trait(cfg.trait)
    character = constitution_text(cfg, trait)
    questions = trait.train_questions if cfg.questions == "train" else trait.questions
    _, tokenizer, generator = load_sampler(cfg.model)
    chosen = replies(generator, tokenizer, questions, character, cfg.sampling)
    rejected = replies(generator, tokenizer, questions, None, cfg.sampling)
    rows = [
        {"prompt": [{"role": "user", "content": q}], "chosen": c, "rejected": r,
         "category": "character", "trait": trait.name,
         "score_chosen": trait.score(c), "score_rejected": trait.score(r)}
        for q, cs, rs in zip(questions, chosen, rejected, strict=True)
        for c, r in zip(cs, rs, strict=True)
        if c.strip() and r.strip() and c != r
    ]  # fmt: skip
    Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cfg.output, "".join(json.dumps(r) + "\n" for r in rows))
    mean = sum(r["score_chosen"] - r["score_rejected"] for r in rows) / max(1, len(rows))
    print(f"{len(rows)} pairs written to {cfg.output}; the chosen replies score {mean:+.2f} "
          f"{trait.name} markers above the rejected on average")  # fmt: skip
    return rows


REFLECTION = Path(__file__).resolve().parent.parent / "data" / "traits" / "reflection.yaml"
"""The shipped self-reflection prompts."""


@dataclass
class PersonaReflectConfig:
    """rlhfkit persona reflect: self-reflection rows written with the constitution in context."""

    model: ModelConfig = field(default_factory=ModelConfig)
    trait: str = "enthusiasm"
    """The trait whose constitution is used (and scores the replies)."""
    constitution: str | None = None
    """A text file describing the character (None: the trait's constitution)."""
    prompts: str | None = None
    """A YAML/JSON list of self-reflection prompts (None: the shipped ones)."""
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(max_new_tokens=96, temperature=0.7, num_samples=4)
    )
    """How replies are sampled (num_samples rows per prompt)."""
    output: str = "runs/persona/reflection.jsonl"
    """The SFT rows (messages: the prompt and the reply, no system prompt)."""

    def problems(self) -> Problems:
        """The trait, the constitution and the prompts file."""
        out = _trait_problem(self.trait)
        for name in ("constitution", "prompts"):
            value = getattr(self, name)
            if value is not None and not Path(value).expanduser().is_file():
                out.append((name, f"{value}: no such file"))
        return out


def reflection_prompts(path: str | None) -> list[str]:
    """The self-reflection prompts of ``path`` (a YAML or JSON list of strings; None: shipped).

    Raises:
        MissingFileError: No such file.
        DataError: The file is not a non-empty list of non-empty strings.
    """
    source = Path(path).expanduser() if path else REFLECTION
    if not source.is_file():
        raise MissingFileError(f"--prompts: {path}: no such file")
    try:
        data = yaml.safe_load(source.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise DataError(str(source), None, f"cannot be parsed ({err})") from err
    if not isinstance(data, list) or not data or not all(isinstance(x, str) and x.strip()
                                                          for x in data):  # fmt: skip
        raise DataError(str(source), None, "must be a non-empty list of non-empty strings")
    return [x.strip() for x in data]


def reflect(cfg: PersonaReflectConfig) -> list[dict]:
    """Write the self-reflection rows; returns them."""
    trait = load_trait(cfg.trait)
    character = constitution_text(cfg, trait)
    prompts = reflection_prompts(cfg.prompts)
    _, tokenizer, generator = load_sampler(cfg.model)
    answers = replies(generator, tokenizer, prompts, character, cfg.sampling)
    rows = [
        {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}],
         "category": "self-reflection", "trait": trait.name, "score": trait.score(a)}
        for p, texts in zip(prompts, answers, strict=True)
        for a in texts
        if a.strip()
    ]  # fmt: skip
    Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cfg.output, "".join(json.dumps(r) + "\n" for r in rows))
    mean = sum(r["score"] for r in rows) / max(1, len(rows))
    print(f"{len(rows)} self-reflection rows written to {cfg.output} ({len(prompts)} prompts; "
          f"{trait.name} markers {mean:.2f} per reply); train on them with rlhfkit sft "
          f"--data.train {cfg.output}")  # fmt: skip
    return rows
