"""``rlhfkit rm warm``: a weight-averaged reward model (WARM) from several fine-tuned ones.

The members must share one architecture (fine-tuned from one initialisation, for example
``rlhfkit rm train`` with different ``--seed`` values); the element-wise mean of their weights
is written to ``--output`` with the first member's config and tokenizer, and loads anywhere a
reward model does (``rm:<output>``). See :mod:`rlhfkit.models.merge`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from rlhfkit.errors import ConfigError
from rlhfkit.models.merge import average_model_dirs
from rlhfkit.validation import model_path_problem

log = logging.getLogger(__name__)


@dataclass
class WarmConfig:
    """rlhfkit rm warm: average the weights of reward models fine-tuned from one start (WARM)."""

    members: tuple[str, ...] = ()
    """Reward-model directories (two or more, one architecture)."""
    output: str = "runs/rm_warm"
    """Where the averaged reward model is written."""

    def problems(self) -> list[tuple[str, str]]:
        """Fewer than two members, or a member that is not a model directory."""
        if len(self.members) < 2:
            return [("members", f"need two or more reward models, got {len(self.members)}")]
        found = [model_path_problem(m if "/" in m else f"./{m}") for m in self.members]
        return [("members", problem) for problem in found if problem]


def main(cfg: WarmConfig) -> Path:
    """Average the members; returns the output directory."""
    try:
        out = average_model_dirs(cfg.members, cfg.output)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(f"--members: {err}") from err
    log.info("WARM average of %d reward models written to %s", len(cfg.members), out)
    return out
