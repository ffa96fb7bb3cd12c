"""rlhfkit demo: the pipeline on the embedded model, with before/after samples.

Until the later stages exist, the demo is its first stage: supervised fine-tuning of the
embedded SmolLM2-135M-Instruct on the built-in instruction data.

    1. Sample greedy replies for a few held-out prompts from the base model.
    2. Run SFT (held-out loss logged before and after).
    3. Sample the same prompts from the fine-tuned model and print both side by side, with the
       held-out loss before and after.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from rlhfkit.config import LogConfig, LoopConfig, ModelConfig, OptimConfig
from rlhfkit.data.sources import load_rows
from rlhfkit.models.load import load_model, load_tokenizer
from rlhfkit.models.precision import default_device, resolve_precision
from rlhfkit.recipes import sft
from rlhfkit.rollout.hf import SamplingConfig, sample_chat


def _demo_sft() -> sft.SFTConfig:
    return sft.SFTConfig(
        model=ModelConfig(),
        data=sft.SFTDataConfig(mask_mode="all_assistant_turns"),
        optim=OptimConfig(lr=5e-5, warmup_ratio=0.1),
        loop=LoopConfig(batch_size=16, max_steps=30, micro_batch_tokens=2048),
        log=LogConfig(run_dir="runs/demo/sft"),
    )


@dataclass
class DemoConfig:
    """rlhfkit demo: SFT on the embedded model and built-in data, with before/after samples."""

    sft: sft.SFTConfig = field(default_factory=_demo_sft)
    num_prompts: int = 4
    """Held-out prompts to sample before and after training."""
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(max_new_tokens=48, temperature=0.0)
    )


def _sample(
    model_name: str, precision: str, prompts: list[list[dict[str, str]]], sampling: SamplingConfig
) -> list[str]:
    tokenizer = load_tokenizer(model_name)
    device = default_device()
    model = load_model(
        model_name, dtype=resolve_precision(precision, device).compute, device=device
    )
    return [outs[0] for outs in sample_chat(model, tokenizer, prompts, sampling)]


def _eval_losses(run_dir: Path) -> tuple[float, float]:
    values = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [v["eval/loss"] for v in values if v.get("eval/loss") is not None]
    return losses[0], losses[-1]


def main(cfg: DemoConfig) -> None:
    """Run the demo and print the comparison."""
    console = Console(width=None if sys.stdout.isatty() else 120)
    rows = load_rows(cfg.sft.data.eval or cfg.sft.data.train, split=cfg.sft.data.eval_split)
    prompts = [r.data["messages"][:-1] for r in rows[: cfg.num_prompts]]
    console.rule("[bold]1. base model samples")
    before = _sample(cfg.sft.model.name, cfg.sft.model.precision, prompts, cfg.sampling)
    console.rule("[bold]2. supervised fine-tuning")
    run_dir = sft.main(cfg.sft)
    console.rule("[bold]3. fine-tuned model samples")
    after = _sample(str(run_dir / "final"), cfg.sft.model.precision, prompts, cfg.sampling)
    table = Table(title="held-out prompts: before vs after SFT", show_lines=True)
    for column in ("prompt", "before", "after"):
        table.add_column(column, overflow="fold")
    for prompt, old, new in zip(prompts, before, after, strict=True):
        table.add_row(prompt[-1]["content"], old, new)
    console.print(table)
    first, last = _eval_losses(run_dir)
    console.print(f"held-out loss: {first:.4f} -> {last:.4f}   (run dir: {run_dir})")
