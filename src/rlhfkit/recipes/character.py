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
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from rlhfkit.atomic import atomic_write_text
from rlhfkit.config import ModelConfig, Problems
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
        default_factory=lambda: SamplingConfig(max_new_tokens=64, temperature=0.7, num_samples=2)
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


def pairs(cfg: PersonaPairsConfig) -> list[dict]:
    """Write the pairs; returns them."""
    trait = load_trait(cfg.trait)
    character = constitution_text(cfg, trait)
    questions = trait.train_questions if cfg.questions == "train" else trait.questions
    _, tokenizer, generator = load_sampler(cfg.model)

    def replies(system: str | None) -> list[list[str]]:
        prompts = []
        for q in questions:
            messages = [{"role": "user", "content": q}]
            if system:
                messages.insert(0, {"role": "system", "content": system})
            prompts.append(render_prompt(tokenizer, messages))
        rollout = generator.generate(prompts, cfg.sampling)
        out: list[list[str]] = [[] for _ in questions]
        for i, ids in enumerate(rollout.completion_ids):
            out[rollout.prompt_index[i]].append(tokenizer.decode(ids, skip_special_tokens=True))
        return out

    chosen, rejected = replies(character), replies(None)
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
