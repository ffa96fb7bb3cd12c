"""Command line: ``rlhfkit <command> [--config file.yaml] [--section.field value ...]``.

Each command maps to a recipe's Config dataclass and ``main``; ``rlhfkit <command> --help``
documents every option from the config docstrings.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import os
import sys

from rlhfkit.errors import UserError
from rlhfkit.extras import MissingExtraError
from rlhfkit.validation import did_you_mean, validate

USER_ERRORS = (UserError, MissingExtraError)
"""Exceptions caused by the input, reported as one line without a traceback: bad options and
config files, data errors, missing files, model paths, run directories, missing extras."""

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
    "rm warm": (
        "rlhfkit.recipes.warm",
        "WarmConfig",
        "main",
        "Average the weights of reward models fine-tuned from one start (WARM).",
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
    "cai revise": (
        "rlhfkit.recipes.cai",
        "CAIReviseConfig",
        "main",
        "Constitutional AI's critique and revision: SFT rows and preference pairs.",
    ),
    "cai label": (
        "rlhfkit.recipes.cai_label",
        "CAILabelConfig",
        "main",
        "AI preference labels (RLAIF): a judge compares pairs under the constitution's principles.",
    ),
    "cai rubric": (
        "rlhfkit.recipes.cai_label",
        "CAIRubricConfig",
        "rubric_main",
        "A model writes a weighted checklist (rubric) for each prompt, for rubric rewards.",
    ),
    "distill": (
        "rlhfkit.recipes.distill",
        "DistillConfig",
        "main",
        "Distil a teacher into a student (GKD: on/off-policy, forward/reverse KL, JSD).",
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
    "serve": (
        "rlhfkit.inference.serve",
        "ServeConfig",
        "main",
        "Serve a local model as an OpenAI-compatible chat endpoint (greedy; for judges).",
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
    "persona extract": (
        "rlhfkit.recipes.persona",
        "PersonaExtractConfig",
        "extract",
        "A trait's persona vector at every layer, from contrastive system prompts.",
    ),
    "persona monitor": (
        "rlhfkit.recipes.persona_steer",
        "PersonaMonitorConfig",
        "monitor",
        "Project rows' activations on a persona vector (which rows carry the trait).",
    ),
    "persona pairs": (
        "rlhfkit.recipes.character",
        "PersonaPairsConfig",
        "pairs",
        "Character training pairs: replies with a constitution in context (chosen) and without.",
    ),
    "persona reflect": (
        "rlhfkit.recipes.character",
        "PersonaReflectConfig",
        "reflect",
        "Self-reflection SFT rows: the model writes about itself with a constitution in context.",
    ),
    "persona steer": (
        "rlhfkit.recipes.persona_steer",
        "PersonaSteerConfig",
        "steer",
        "Answer with a persona vector added (and optionally capped) over a grid of strengths.",
    ),
    "overopt": (
        "rlhfkit.pipeline.overopt",
        "OveroptConfig",
        "main",
        "Reward over-optimisation: proxies at label budgets, best-of-n and RL, Gao fits.",
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
    lines += [f"  {name:<13} {entry[-1]}" for name, entry in COMMANDS.items()]
    lines += [
        "",
        "rlhfkit <command> --help lists every option; --debug (or RLHFKIT_DEBUG=1) shows the",
        "traceback of an error in the input too.",
    ]
    return "\n".join(lines)


GROUPS = sorted({name.split()[0] for name in COMMANDS if " " in name})
"""First words of the two-word commands (``rm``, ``label``, ``dpo``)."""

TRAINING = (
    "sft",
    "rm train",
    "dpo",
    "dpo online",
    "rl",
    "distill",
    "rs",
    "pipeline",
    "demo",
    "overopt",
)
"""Commands that checkpoint: an interrupted one continues when it is run again."""


def _subcommands(group: str) -> str:
    """The commands of ``group``, one per line with its help."""
    return "\n".join(
        f"  rlhfkit {name:<13} {entry[-1]}"
        for name, entry in COMMANDS.items()
        if name.split()[0] == group
    )


def _unknown_command(argv: list[str]) -> None:
    """Report a command that is not one: a group's subcommands, or the closest command name.

    Raises:
        SystemExit: Status 0 for ``rlhfkit <group> --help``, else 2.
    """
    first = argv[0]
    if first in GROUPS:
        if argv[1:2] in (["-h"], ["--help"]):
            print(f"rlhfkit {first} has these commands:\n{_subcommands(first)}")
            raise SystemExit(0)
        wrong = ""
        if argv[1:]:
            words = [name.split()[1] for name in COMMANDS if name.split()[0] == first]
            close = difflib.get_close_matches(argv[1], words, n=1)
            hint = f" (did you mean 'rlhfkit {first} {close[0]}'?)" if close else ""
            wrong = f"unknown command 'rlhfkit {first} {argv[1]}'{hint}; "
        print(
            f"rlhfkit {first}: error: {wrong}choose one of:\n{_subcommands(first)}",
            file=sys.stderr,
        )
        raise SystemExit(2)
    hint = did_you_mean(first, sorted({*COMMANDS, *GROUPS}))
    print(f"rlhfkit: error: unknown command {first!r}{hint}\n\n{_usage()}", file=sys.stderr)
    raise SystemExit(2)


def _debug(argv: list[str]) -> bool:
    """Whether tracebacks of user errors are wanted (``--debug`` or ``RLHFKIT_DEBUG=1``)."""
    return "--debug" in argv or os.environ.get("RLHFKIT_DEBUG", "") not in ("", "0")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``rlhfkit`` console script.

    A user error (:class:`~rlhfkit.errors.UserError`, a missing optional extra) prints
    ``rlhfkit <command>: error: <message>`` to stderr and exits with status 2, without a
    traceback unless ``--debug`` or ``RLHFKIT_DEBUG=1``; any other exception is a bug and
    keeps its traceback. A run directory that holds a finished run exits with status 0.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug(argv)
    argv = [arg for arg in argv if arg != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return
    words = 2 if " ".join(argv[:2]) in COMMANDS else 1
    command, rest = " ".join(argv[:words]), argv[words:]
    if command not in COMMANDS:
        _unknown_command(argv)
    from rlhfkit.config import parse_cli
    from rlhfkit.training.rundir import RunFinished

    module_name, config_name, entry, help_ = COMMANDS[command]
    module = importlib.import_module(module_name)
    try:
        cfg = parse_cli(
            getattr(module, config_name), rest, prog=f"rlhfkit {command}", description=help_
        )
        validate(cfg)
        _setup_logging()
        getattr(module, entry)(cfg)
    except RunFinished as done:
        logging.getLogger("rlhfkit").info("%s", done)
    except USER_ERRORS as err:
        if debug:
            raise
        print(f"rlhfkit {command}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        if debug:
            raise
        again = "; run the same command again to continue" if command in TRAINING else ""
        print(f"rlhfkit {command}: interrupted{again}", file=sys.stderr)
        raise SystemExit(130) from None


def _setup_logging() -> None:
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 reports progress
    logging.basicConfig(
        level=logging.INFO if main_rank else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("httpx", "urllib3", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
