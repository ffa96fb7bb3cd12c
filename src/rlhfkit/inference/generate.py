"""rlhfkit generate: sample chat completions from any model for given prompts."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from rlhfkit.config import ModelConfig
from rlhfkit.data.messages import parse_prompt
from rlhfkit.data.sources import DataError, load_rows
from rlhfkit.models.load import load_model, load_tokenizer
from rlhfkit.models.precision import default_device, resolve_precision
from rlhfkit.rollout.hf import SamplingConfig, sample_chat


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
    device = default_device()
    precision = resolve_precision(cfg.model.precision, device)
    tokenizer = load_tokenizer(cfg.model.name, trust_remote_code=cfg.model.trust_remote_code)
    model = load_model(
        cfg.model.name,
        dtype=precision.compute,
        attn_implementation=cfg.model.attn_implementation,
        trust_remote_code=cfg.model.trust_remote_code,
        device=device,
    )
    conversations = _conversations(cfg)
    completions = sample_chat(model, tokenizer, conversations, cfg.sampling)
    for conv, outs in zip(conversations, completions, strict=True):
        print(f"\n>>> {conv[-1]['content']}")
        for i, out in enumerate(outs):
            print(f"[{i}] {out}")
    if cfg.output:
        with Path(cfg.output).open("w") as f:
            for conv, outs in zip(conversations, completions, strict=True):
                f.write(json.dumps({"messages": conv, "completions": outs}) + "\n")
    return completions
