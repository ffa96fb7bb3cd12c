"""rlhfkit generate: sample chat completions from any model for given prompts.

The prompts are rendered with the chat template (generation prompt appended) and sampled with
the sampler every other command uses (:func:`rlhfkit.eval.run.sample_grid` on
:func:`rlhfkit.eval.run.open_sampler`: rlhfkit's KV-cache sampler, or a vLLM server with
``--engine.backend vllm``); the completions are decoded without special tokens and stripped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from rlhfkit.config import EngineConfig, ModelConfig
from rlhfkit.data.messages import parse_prompt
from rlhfkit.data.prompts import conversation_rows
from rlhfkit.data.sources import DataError, load_rows
from rlhfkit.eval.run import open_sampler, sample_grid
from rlhfkit.models.load import load_tokenizer
from rlhfkit.rollout.hf import SamplingConfig
from rlhfkit.rollout.vllm_server import require_engine


@dataclass
class GenerateConfig:
    """rlhfkit generate: sample chat completions for prompts."""

    prompts: list[str] = field(default_factory=list)
    """User prompts (each becomes a one-turn conversation)."""
    prompts_file: str | None = None
    """JSONL with a 'prompt' string or a 'messages' list per line (added to --prompts)."""
    system: str | None = None
    """Optional system message put before every prompt."""
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    output: str | None = None
    """Write results as JSONL here (prompt, completions) in addition to printing them."""


def _conversations(cfg: GenerateConfig) -> list[list[dict[str, str]]]:
    prefix = [{"role": "system", "content": cfg.system}] if cfg.system else []
    convs = [[*prefix, {"role": "user", "content": p}] for p in cfg.prompts]
    if cfg.prompts_file:
        for row in load_rows(cfg.prompts_file):  # errors name file:line
            if "messages" in row.data:
                convs.append(parse_prompt(row.data["messages"], "messages", row.location))
            elif isinstance(row.data.get("prompt"), str):
                convs.append([*prefix, {"role": "user", "content": row.data["prompt"]}])
            else:
                raise DataError(row.location, "prompt", "expected a string (or a 'messages' list)")
    if not convs:
        raise SystemExit("rlhfkit generate: give --prompts 'text' ... or --prompts-file file.jsonl")
    return convs


def main(cfg: GenerateConfig) -> list[list[str]]:
    """Load the model, sample, print and optionally save the completions."""
    conversations = _conversations(cfg)
    require_engine(cfg.engine)
    tokenizer = load_tokenizer(cfg.model.name, trust_remote_code=cfg.model.trust_remote_code)
    rows = conversation_rows(tokenizer, conversations)
    with open_sampler(cfg.model, tokenizer, cfg.engine, seed=cfg.sampling.seed) as generator:
        completions = sample_grid(generator, tokenizer, rows, cfg.sampling).texts
    for conv, outs in zip(conversations, completions, strict=True):
        print(f"\n>>> {conv[-1]['content']}")
        for i, out in enumerate(outs):
            print(f"[{i}] {out}")
    if cfg.output:
        with Path(cfg.output).open("w") as f:
            for conv, outs in zip(conversations, completions, strict=True):
                f.write(json.dumps({"messages": conv, "completions": outs}) + "\n")
    return completions
