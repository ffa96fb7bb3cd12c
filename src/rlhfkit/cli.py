"""Command line: ``rlhfkit <command> [--config file.yaml] [--section.field value ...]``.

Each command maps to a recipe's Config dataclass and ``main``; ``rlhfkit <command> --help``
documents every option from the config docstrings.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "sft": ("rlhfkit.recipes.sft", "SFTConfig", "main", "Supervised fine-tuning on chat data."),
    "rm train": (
        "rlhfkit.recipes.reward_model",
        "RMConfig",
        "main",
        "Train a reward model (bt, margin, all_pairs, plackett_luce, orm, prm).",
    ),
    "rm eval": (
        "rlhfkit.recipes.reward_model_eval",
        "RMEvalConfig",
        "eval_main",
        "Pairwise accuracy, margin, calibration of a reward model.",
    ),
    "rm score": (
        "rlhfkit.recipes.reward_model_eval",
        "RMScoreConfig",
        "score_main",
        "Add a reward column to prompt/completion rows.",
    ),
    "dpo": (
        "rlhfkit.recipes.dpo",
        "DPOConfig",
        "main",
        "Direct alignment on preference pairs (dpo, ipo, simpo, orpo, kto, ...).",
    ),
    "dpo online": (
        "rlhfkit.recipes.dpo_online",
        "OnlineDPOConfig",
        "main",
        "Iterative DPO: sample pairs from the policy, label them with a reward, train; repeat.",
    ),
    "rl": (
        "rlhfkit.recipes.policy_gradient",
        "PGConfig",
        "main",
        "Policy-gradient RL against rewards (grpo, rloo, reinforce, dr_grpo, gspo, cispo, ...).",
    ),
    "eval": (
        "rlhfkit.inference.evaluate",
        "EvalConfig",
        "main",
        "Evaluate a model: accuracy, pass@k, pass^k, maj@k, reward and length statistics.",
    ),
    "rs": (
        "rlhfkit.inference.rejection_sampling",
        "RSConfig",
        "main",
        "Rejection sampling: sample N, score, select the best, SFT on them (with a control).",
    ),
    "bon": (
        "rlhfkit.inference.best_of_n",
        "BoNConfig",
        "main",
        "Best-of-N at inference, with the analytic KL of best-of-N.",
    ),
    "filter": (
        "rlhfkit.inference.difficulty",
        "FilterConfig",
        "main",
        "Keep prompts whose pass rate over N samples lies in a band (difficulty filter).",
    ),
    "decontam": (
        "rlhfkit.inference.decontaminate",
        "DecontamConfig",
        "main",
        "Flag training rows sharing an 8-gram (or 50-char substring) with eval sets.",
    ),
    "generate": (
        "rlhfkit.inference.generate",
        "GenerateConfig",
        "main",
        "Sample chat completions from a model.",
    ),
    "label serve": (
        "rlhfkit.feedback.serve",
        "LabelServeConfig",
        "serve",
        "Serve the human-feedback labelling web app.",
    ),
    "label task": (
        "rlhfkit.feedback.serve",
        "LabelTaskConfig",
        "task_main",
        "Create a labelling task from candidates and print the labellers' links.",
    ),
    "label export": (
        "rlhfkit.feedback.serve",
        "LabelExportConfig",
        "export_main",
        "Export a labelling task as pairs/likert/ratings/rankings, with agreement statistics.",
    ),
    "pipeline": (
        "rlhfkit.pipeline.run",
        "PipelineConfig",
        "main",
        "SFT -> candidates -> labels -> reward model -> PPO/DPO -> eval -> report.html.",
    ),
    "demo": (
        "rlhfkit.pipeline.run",
        "PipelineConfig",
        "demo",
        "The pipeline on the embedded model and built-in data (runs/demo, about 15 minutes).",
    ),
}
"""Command (one or two words) -> (module, Config class, entry function, help)."""


def _usage() -> str:
    lines = [
        "usage: rlhfkit <command> [--config file.yaml] [--section.field value ...]",
        "",
        "commands:",
    ]
    lines += [f"  {name:<10} {entry[-1]}" for name, entry in COMMANDS.items()]
    lines += ["", "rlhfkit <command> --help lists every option."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``rlhfkit`` console script."""
    from rlhfkit.config import parse_cli

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return
    words = 2 if " ".join(argv[:2]) in COMMANDS else 1
    command, rest = " ".join(argv[:words]), argv[words:]
    if command not in COMMANDS:
        raise SystemExit(f"unknown command {command!r}\n\n{_usage()}")
    module_name, config_name, entry, help_ = COMMANDS[command]
    module = importlib.import_module(module_name)
    cfg = parse_cli(
        getattr(module, config_name), rest, prog=f"rlhfkit {command}", description=help_
    )
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 reports progress
    logging.basicConfig(
        level=logging.INFO if main_rank else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("httpx", "urllib3", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    getattr(module, entry)(cfg)
