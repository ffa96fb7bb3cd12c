"""rlhfkit generate: sample chat completions from any model for given prompts."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from rlhfkit.config import ModelConfig
from rlhfkit.models.load import load_model, load_tokenizer
from rlhfkit.models.precision import resolve_precision
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
        path = Path(cfg.prompts_file)
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "messages" in row:
                convs.append(row["messages"])
            elif isinstance(row.get("prompt"), str):
                convs.append([*prefix, {"role": "user", "content": row["prompt"]}])
            else:
                raise ValueError(
                    f"{path}:{number}: field 'prompt': expected a string (or a 'messages' list)"
                )
    if not convs:
        raise SystemExit("rlhfkit generate: give --prompts 'text' ... or --prompts-file file.jsonl")
    return convs


def main(cfg: GenerateConfig) -> list[list[str]]:
    """Load the model, sample, print and optionally save the completions."""
    precision = resolve_precision(cfg.model.precision)
    tokenizer = load_tokenizer(cfg.model.name, trust_remote_code=cfg.model.trust_remote_code)
    model = load_model(
        cfg.model.name,
        dtype=precision.compute,
        attn_implementation=cfg.model.attn_implementation,
        trust_remote_code=cfg.model.trust_remote_code,
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
