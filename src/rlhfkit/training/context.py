"""The state of one training run and what a recipe does with it each step.

:class:`RunContext` holds the model, tokenizer, precision policy, optimiser and schedule, run
directory and logger (built by :func:`rlhfkit.training.run.build_run`), and steps, logs and
checkpoints them: restoring a checkpoint, clipping and stepping, skipping non-finite batches,
saving atomically.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from rlhfkit.config import OptimConfig
from rlhfkit.errors import ConfigError, UserError
from rlhfkit.models.load import LoraSpec, load_model
from rlhfkit.models.precision import Precision
from rlhfkit.models.sharding import gathered
from rlhfkit.training.accumulate import StepStats
from rlhfkit.training.checkpoint import (
    TrainerState,
    capture_rng,
    is_sharded_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    load_shards,
    restore_rng,
    save_checkpoint,
    save_shards,
)
from rlhfkit.training.companion import Companion
from rlhfkit.training.distributed import (
    DistInfo,
    all_reduce_mean_,
    all_reduce_sum,
    barrier,
    gather_objects,
)
from rlhfkit.training.logging import MetricsLogger
from rlhfkit.training.optim import adam_state, clip_grad_norm, optimizer_and_schedule
from rlhfkit.training.parallel import Placement
from rlhfkit.training.precision import MasterWeights
from rlhfkit.training.progress import TrainProgress
from rlhfkit.training.reference import starting_model
from rlhfkit.training.rundir import RunFinished

log = logging.getLogger(__name__)


class NonFiniteLossError(UserError, RuntimeError):
    """Too many consecutive steps had a NaN or infinite loss (the message says what to try)."""


@dataclass
class RunContext:
    """The objects a training recipe works with, and its step counter."""

    model: torch.nn.Module
    tokenizer: Any
    precision: Precision
    master: MasterWeights
    run_dir: Path
    logger: MetricsLogger
    show_progress: bool = True
    packing: bool = False
    step: int = 0
    saved_step: int = -1
    nonfinite: int = 0
    dist: DistInfo = field(default_factory=DistInfo)
    lora_base: tuple[str, LoraSpec, dict[str, Any]] | None = None
    """(model name, LoRA spec, load_model keywords) of a LoRA run, to rebuild the fp32 base."""
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None
    resume_state: dict[str, Any] = field(default_factory=dict)
    """What a resumed run needs besides weights, optimiser and data position: plain values kept
    in every checkpoint (skipped batches, a recipe's counters and controllers)."""
    step_values: dict[str, float] = field(default_factory=dict)
    """Values of the last step for the log only (learning rate, gradient norms); never saved."""
    source: tuple[str, dict[str, Any]] | None = None
    """(model name, load_model keywords) of the starting model, to load it again as pi_ref."""
    companions: dict[str, Companion] = field(default_factory=dict)
    """Further trained models (name -> :class:`Companion`), stepped and saved with the policy."""
    resume_from: Path | None = None
    """The checkpoint this attempt continues from (:func:`rlhfkit.training.rundir.plan_run`)."""
    placement: Placement | None = None
    """How models are placed across ranks (replicated or FSDP2-sharded); None: replicated."""

    @property
    def place(self) -> Placement:
        """The run's :class:`Placement` (replicated when none was given)."""
        return self.placement or Placement(self.dist, self.precision)

    @property
    def models(self) -> list[torch.nn.Module]:
        """The trained models: the policy, then every companion."""
        return [self.model, *(c.model for c in self.companions.values())]

    @contextlib.contextmanager
    def gathered(self, *frozen: torch.nn.Module) -> Iterator[None]:
        """Full parameters of the trained models (and ``frozen``) until the block ends.

        Every rank must enter together. Wrap passes without gradients whose number differs
        between ranks (sampling, evaluation of this rank's share, rank-0 reports); a no-op
        unless models are sharded (:func:`rlhfkit.models.sharding.gathered`).
        """
        with gathered(*self.models, *frozen):
            yield

    def starting_model(self, *, local: bool = False) -> AbstractContextManager[torch.nn.Module]:
        """The starting model pi_ref for a pass outside the reference cache.

        Under LoRA the policy with its adapter disabled; otherwise loaded again from its source
        at the compute dtype and freed on exit (no reference is held while training), placed
        as a frozen model (sharded under FSDP2, so every rank must ask together) or, with
        ``local``, whole on this rank only (for a pass one rank makes alone).
        """
        if self.source is None:
            raise ValueError("this run has no recorded starting model")
        name, kwargs = self.source
        dtype, place = self.precision.compute, self.place
        place = replace(place, shard_frozen=place.shard_frozen and not local)
        return starting_model(
            self.model, lambda: place.frozen(load_model(name, dtype=dtype, **kwargs))
        )

    @property
    def pad_id(self) -> int:
        """The tokenizer's padding id."""
        return int(self.tokenizer.pad_token_id)

    def start_training(
        self, optim: OptimConfig, total_steps: int, *, resume: bool | None = None
    ) -> None:
        """Build optimiser and schedule, then restore the checkpoint the run continues from.

        Args:
            optim: Optimiser and schedule settings.
            total_steps: Optimiser steps of the whole run.
            resume: None: continue from ``resume_from`` (set by :func:`build_run` from
                ``--loop.resume``) if any; False: start at step 0; True: continue from the
                latest checkpoint, which must exist.

        Raises:
            ConfigError: ``resume`` is True and there is no checkpoint.
            RunFinished: The run's final model exists and the checkpoint is at
                ``total_steps`` or beyond: nothing is left to train.
        """
        self.optimizer, self.scheduler = optimizer_and_schedule(
            self.master.params(), optim, total_steps
        )
        for companion in self.companions.values():
            companion.start(total_steps)
        path = None if resume is False else self.resume_from
        if resume and path is None:
            path = latest_checkpoint(self.run_dir)
            if path is None:
                raise ConfigError(f"--loop.resume: no checkpoint under {self.run_dir}/checkpoints")
        if path is None:
            return
        state = self._restore(path)
        ranks = state.rng.get("ranks", [state.rng])
        if len(ranks) != self.dist.world_size:
            log.warning("checkpoint has RNG states of %d ranks, this run has %d: not restoring "
                        "them (dropout masks will differ from an uninterrupted run)",
                        len(ranks), self.dist.world_size)  # fmt: skip
        else:
            restore_rng(ranks[self.dist.rank])
        self.step, self.resume_state = state.step, dict(state.extra)
        self.saved_step = state.step
        if self.step >= total_steps and (self.run_dir / "final").is_dir():
            self.logger.close()
            raise RunFinished(self.run_dir, self.step)
        log.info("continuing at step %d of %d", self.step + 1, total_steps)

    @property
    def batches_done(self) -> int:
        """Batches consumed: optimiser steps plus skipped (non-finite) batches."""
        return self.step + int(self.resume_state.get("skipped", 0))

    def apply_step(self, stats: StepStats, max_grad_norm: float, max_nonfinite: int) -> bool:
        """Clip, step and schedule after ``accumulate``; skip a non-finite batch.

        A NaN/inf loss or gradient norm drops the gradients and moves on to the next batch
        (counted in ``resume_state["skipped"]``) without touching the weights or the schedule.

        Returns:
            True if the optimiser stepped; False if the batch was skipped.

        Raises:
            NonFiniteLossError: After ``max_nonfinite`` skipped batches in a row (the last good
                checkpoint is untouched).
        """
        finite = all_reduce_sum(0.0 if stats.finite else 1.0) == 0  # every rank must agree
        norms = {}
        if finite:
            for name, master in self._masters().items():
                self._average_gradients(master)
                norms[name] = clip_grad_norm(master.params(), max_grad_norm)
        if not finite or not all(math.isfinite(v) for v in norms.values()):
            self._skip(max_nonfinite, "loss" if not stats.finite else "gradient norm")
            return False
        self.nonfinite = 0
        self.step_values["grad_norm"] = norms.pop("")
        self.step_values.update({f"grad_norm/{name}": v for name, v in norms.items()})
        self.step_values["lr"] = self.scheduler.get_last_lr()[0]  # the rate this step uses
        self.optimizer.step()
        self.scheduler.step()
        self.master.zero_grad()
        self.master.sync_to_model()
        for companion in self.companions.values():
            companion.step()
        self.step += 1
        return True

    def _masters(self) -> dict[str, MasterWeights]:
        """The policy's master weights (under "") and every companion's."""
        return {"": self.master, **{k: c.master for k, c in self.companions.items()}}

    def _restore(self, path: Path) -> Any:
        """Read weights, optimiser and schedule state from ``path``; return its TrainerState."""
        if is_sharded_checkpoint(path):
            state = load_shards(path, self._named_tensors(init=True))
            for master, opt, saved in self._optimisers(state):
                master.sync_to_model()
                for group, values in zip(opt.param_groups, saved["param_groups"], strict=True):
                    group.update(values)
        elif self.place.sharded:
            raise ConfigError(
                f"{path} was written by a replicated run (model.safetensors): resume it with "
                "--model.parallel replicate"
            )
        else:
            weights, state = load_checkpoint(path)
            self.master.load_state_dict(weights)
            self.optimizer.load_state_dict(state.optimizer)
            for name, companion in self.companions.items():
                prefix = f"{name}/"
                companion.master.load_state_dict(
                    {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
                )
                saved = self._companion_state(state, name, path)
                companion.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(state.scheduler)
        for name, companion in self.companions.items():
            saved = self._companion_state(state, name, path)
            companion.scheduler.load_state_dict(saved["scheduler"])
        return state

    @staticmethod
    def _companion_state(state: Any, name: str, path: Path) -> dict[str, Any]:
        saved = state.data.get("companions", {}).get(name)
        if saved is None:
            raise KeyError(f"{path}: the checkpoint has no state of the {name!r} model")
        return saved

    def _trained(self) -> list[tuple[str, MasterWeights, torch.optim.Optimizer]]:
        """(checkpoint prefix, master weights, optimiser) of the policy and every companion."""
        return [
            ("", self.master, self.optimizer),
            *((f"{n}/", c.master, c.optimizer) for n, c in self.companions.items()),
        ]

    def _named_tensors(self, *, init: bool = False) -> dict[str, torch.Tensor]:
        """Master weights and AdamW moments by name, as this rank holds them (sharded or not).

        Keys: ``[<companion>/]model/<param>`` and ``[<companion>/]optim/<param>/<state>``. With
        ``init`` the optimiser state is created (zeros) where no step has made it yet, so a
        checkpoint can be read into it.
        """
        out: dict[str, torch.Tensor] = {}
        for prefix, master, optimizer in self._trained():
            for name, param in zip(master.names, master.params(), strict=True):
                out[f"{prefix}model/{name}"] = param.data
                state = optimizer.state[param]
                if init and not state:
                    state.update(adam_state(optimizer, param))
                for key, value in state.items():
                    out[f"{prefix}optim/{name}/{key}"] = value
        return out

    def _optimisers(self, state: Any) -> list[tuple[MasterWeights, Any, dict[str, Any]]]:
        """(master, optimiser, its saved hyper-parameters) of every trained model."""
        saved = [state.optimizer] + [
            state.data["companions"][n]["optimizer"] for n in self.companions
        ]
        return [(m, o, s) for (_, m, o), s in zip(self._trained(), saved, strict=True)]

    def _average_gradients(self, master: MasterWeights) -> None:
        """Average fp32 master gradients across ranks.

        A no-op on one process and under FSDP2, whose backward has reduce-scattered them.
        """
        if self.dist.world_size == 1 or self.place.sharded:
            return
        params = master.params()
        for p in params:
            if p.grad is None:  # every rank must reduce the same tensors
                p.grad = torch.zeros_like(p)
        all_reduce_mean_([p.grad for p in params])

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Move a collated batch to this rank's device."""
        return {k: v.to(self.dist.device, non_blocking=True) for k, v in batch.items()}

    def _skip(self, max_nonfinite: int, what: str) -> None:
        for master in self._masters().values():
            master.zero_grad()
        self.nonfinite += 1
        self.resume_state["skipped"] = int(self.resume_state.get("skipped", 0)) + 1
        log.warning(
            "step %d: non-finite %s, batch skipped (%d in a row)", self.step, what, self.nonfinite
        )
        if self.nonfinite >= max_nonfinite:
            raise NonFiniteLossError(
                f"{self.nonfinite} consecutive non-finite losses at step {self.step}; "
                f"stopping. The last good checkpoint in {self.run_dir}/checkpoints is "
                "intact: lower --optim.lr, check the data, or use --model.precision fp32, "
                "then run the command again (it continues from that checkpoint)."
            )

    def log_step(self, metrics: dict[str, float], every: int) -> None:
        """Log ``metrics`` plus learning rate and gradient norm every ``every`` steps."""
        if every and self.step % every == 0:
            extra = {
                "train/lr": self.step_values.get("lr", 0.0),
                "train/grad_norm": self.step_values.get("grad_norm", 0.0),
                **{
                    f"train/{k}": v
                    for k, v in self.step_values.items()
                    if k.startswith("grad_norm/")
                },
            }
            self.logger.log(self.step, {**metrics, **extra})

    def save(self, keep_last: int, data: dict[str, Any] | None = None) -> Path:
        """Write an atomic checkpoint of the current step (rank 0 writes, all ranks wait)."""
        path = self.run_dir / "checkpoints" / f"step-{self.step:08d}"
        self.saved_step = self.step
        rng = gather_objects(capture_rng())  # every rank's generators, restored per rank
        data = dict(data or {})
        info = {"metrics_records": self.logger.records}
        if self.place.sharded_checkpoints:
            if self.companions:
                data["companions"] = {
                    n: {"optimizer": {"param_groups": _hyper_parameters(c.optimizer)},
                        "scheduler": c.scheduler.state_dict()}
                    for n, c in self.companions.items()
                }  # fmt: skip
            state = TrainerState(
                step=self.step, optimizer={"param_groups": _hyper_parameters(self.optimizer)},
                scheduler=self.scheduler.state_dict(), rng={"ranks": rng}, data=data,
                extra=dict(self.resume_state),
            )  # fmt: skip
            path = save_shards(
                self.run_dir, self._named_tensors(init=True), state, is_main=self.dist.is_main,
                keep_last=keep_last, info=info,
            )  # fmt: skip
            if self.dist.is_main:
                log.info("checkpoint %s", path)
            return path
        if not self.dist.is_main:
            barrier()
            return path
        weights = self.master.state_dict()
        if self.companions:
            data["companions"] = {
                name: {"optimizer": c.optimizer.state_dict(), "scheduler": c.scheduler.state_dict()}
                for name, c in self.companions.items()
            }
            for name, c in self.companions.items():
                weights.update({f"{name}/{k}": v for k, v in c.master.state_dict().items()})
        state = TrainerState(
            step=self.step,
            optimizer=self.optimizer.state_dict(),
            scheduler=self.scheduler.state_dict(),
            rng={"ranks": rng},
            data=data,
            extra=dict(self.resume_state),
        )
        path = save_checkpoint(self.run_dir, weights, state, keep_last=keep_last, info=info)
        log.info("checkpoint %s", path)
        barrier()
        return path

    def progress(self, total: int) -> TrainProgress:
        """A progress bar starting at the current step."""
        return TrainProgress(
            total, start=self.step, enabled=self.show_progress and self.dist.is_main
        )


def _hyper_parameters(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """The parameter groups' settings (learning rate, betas, ...) without their parameters."""
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
