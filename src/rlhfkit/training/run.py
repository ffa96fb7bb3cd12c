"""Glue shared by recipes: build the model and run directory, finish the run.

Not a trainer: recipes own their loop and call these helpers explicitly. The run's state and
its per-step operations (optimiser step, logging, checkpoints) are :class:`RunContext`
(:mod:`rlhfkit.training.context`, re-exported here).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rlhfkit.atomic import atomic_directory
from rlhfkit.config import LogConfig, ModelConfig
from rlhfkit.errors import ConfigError
from rlhfkit.models.load import (
    LoraSpec,
    apply_lora,
    load_model,
    load_tokenizer,
    resolve_model_path,
)
from rlhfkit.models.precision import resolve_precision
from rlhfkit.models.sharding import local_numel
from rlhfkit.models.steering import attach_steering
from rlhfkit.training.checkpoint import update_checkpoint_info
from rlhfkit.training.companion import Companion
from rlhfkit.training.context import NonFiniteLossError, RunContext
from rlhfkit.training.distributed import barrier, init_distributed
from rlhfkit.training.logging import MetricsLogger, write_run_info
from rlhfkit.training.parallel import Placement
from rlhfkit.training.precision import MasterWeights
from rlhfkit.training.rundir import RunFinished, plan_run, prepare_run_dir

__all__ = [
    "Companion", "NonFiniteLossError", "RunContext", "RunFinished", "batch_order", "build_run",
    "export_model", "finish_run",
]  # fmt: skip

log = logging.getLogger(__name__)


def build_run(
    model_cfg: ModelConfig,
    log_cfg: LogConfig,
    seed: int,
    config: dict[str, Any],
    *,
    task: str = "causal_lm",
    num_labels: int = 1,
    resume: bool | None = None,
    batch_size: int | None = None,
) -> RunContext:
    """Seed, load model + tokenizer with the precision policy and optional LoRA, open the run.

    Under torchrun each rank joins the process group and holds a replica on its device; only
    rank 0 writes the run directory. ``task="score"`` loads a scalar-head model
    (:mod:`rlhfkit.models.heads`) with ``num_labels`` outputs. ``resume`` (``--loop.resume``)
    decides, before the model is loaded, whether the run continues from its latest
    checkpoint or starts over (:mod:`rlhfkit.training.rundir`); :meth:`RunContext.start_training`
    restores the checkpoint. ``batch_size`` (``--loop.batch-size``, global) must be a multiple
    of the number of ranks, which is checked before anything is loaded.

    Raises:
        ConfigError: The run directory cannot be used, or fp16 training was asked for.
        RunFinished: The run directory holds a finished run.
    """
    dist_info = init_distributed()
    if batch_size is not None and batch_size % dist_info.world_size:
        raise ConfigError(
            f"--loop.batch-size {batch_size} is global and is shared out over the "
            f"{dist_info.world_size} ranks: make it a multiple of {dist_info.world_size}"
        )
    plan = plan_run(log_cfg.run_dir, resume)
    torch.manual_seed(seed)
    precision = resolve_precision(model_cfg.precision, dist_info.device)
    if precision.compute == torch.float16:
        raise ConfigError(
            "--model.precision fp16 is for inference only: training in fp16 needs loss scaling, "
            "which rlhfkit does not implement. Use bf16 (or auto)."
        )
    if dist_info.world_size > 1:  # one rank builds a missing embedded-model cache, then all load
        if dist_info.local_rank == 0:
            resolve_model_path(model_cfg.name)
        barrier()
    tokenizer = load_tokenizer(model_cfg.name, trust_remote_code=model_cfg.trust_remote_code)
    load_kwargs: dict[str, Any] = {
        "attn_implementation": model_cfg.attn_implementation,
        "trust_remote_code": model_cfg.trust_remote_code,
        "task": task,
        "num_labels": num_labels,
        "pad_token_id": tokenizer.pad_token_id if task == "score" else None,
        "keep_layers": model_cfg.keep_layers,
        "fuse": model_cfg.fuse,
    }
    model = load_model(model_cfg.name, dtype=torch.float32, **load_kwargs)
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if model_cfg.lora:
        spec = LoraSpec(
            model_cfg.lora_r,
            model_cfg.lora_alpha,
            model_cfg.lora_dropout,
            list(model_cfg.lora_target_modules),
        )
        model = apply_lora(model, spec)
    attach_steering(model, model_cfg)  # --model.steer while training: preventative steering
    placement = Placement.of(model_cfg, dist_info, precision)
    master = placement.trained(model)
    if placement.sharded:
        local, total = local_numel(model)
        log.info("fsdp2: this rank stores %d of %d parameters", local, total)
    run_dir, purge_step = plan.run_dir, None
    if dist_info.is_main:
        try:
            purge_step = prepare_run_dir(plan, config)
            write_run_info(run_dir, config)
        except PermissionError as err:
            problem = f"cannot write {err.filename}: {err.strerror}"
            raise ConfigError(f"--log.run-dir: {problem}") from err
    logger = MetricsLogger(
        run_dir,
        tensorboard=log_cfg.tensorboard,
        wandb=log_cfg.wandb,
        trackio=log_cfg.trackio,
        project=log_cfg.project,
        config=config,
        enabled=dist_info.is_main,
        purge_step=purge_step,
    )
    log.info("precision: compute %s (%s), master fp32", precision.compute, precision.reason)
    return RunContext(
        model,
        tokenizer,
        precision,
        master,
        run_dir,
        logger,
        show_progress=log_cfg.progress,
        dist=dist_info,
        lora_base=(model_cfg.name, spec, load_kwargs) if model_cfg.lora else None,
        source=(model_cfg.name, load_kwargs),
        resume_from=plan.checkpoint,
        placement=placement,
    )


def finish_run(ctx: RunContext, keep_last: int) -> Path:
    """Checkpoint, then save the final model (fp32, Hugging Face format) and tokenizer.

    A LoRA run also saves its adapter (``final/adapter``) and merges it into a freshly loaded
    fp32 base: the training copy of the frozen base weights was rounded to the compute dtype.
    """
    if ctx.saved_step != ctx.step:  # decided the same way on every rank (no file-system read)
        ctx.save(keep_last)
    elif ctx.dist.is_main:  # the records logged since (final evaluation) belong to the run
        path = ctx.run_dir / "checkpoints" / f"step-{ctx.step:08d}"
        if path.is_dir():
            update_checkpoint_info(path, metrics_records=ctx.logger.records)
    if ctx.lora_base is None:
        name, kwargs = ctx.source
        export_model(
            ctx, ctx.model, ctx.master, ctx.run_dir / "final",
            lambda: load_model(name, dtype=torch.float32, **kwargs),
        )  # fmt: skip
    else:
        weights = ctx.master.full_state_dict()  # gathered on every rank when sharded
        if ctx.dist.is_main:
            adapter = _fp32_adapter(ctx, weights)
            with atomic_directory(ctx.run_dir / "final") as tmp:
                adapter.save_pretrained(tmp / "adapter")
                adapter.merge_and_unload().save_pretrained(tmp, safe_serialization=True)
                ctx.tokenizer.save_pretrained(tmp)
        barrier()  # export_model ends with its own barrier
    ctx.logger.close()
    return ctx.run_dir


def export_model(
    ctx: RunContext,
    model: torch.nn.Module,
    master: MasterWeights,
    target: Path,
    fresh: Callable[[], torch.nn.Module],
) -> None:
    """Write a trained model as a Hugging Face directory (fp32) at ``target``, from rank 0.

    A replicated model is cast to fp32 in place and given its master weights. A sharded one is
    gathered (every rank takes part), and rank 0 loads the whole weights into ``fresh()``, an
    fp32 copy of the starting model, which it saves.
    """
    weights = master.full_state_dict() if ctx.place.sharded else None
    if ctx.dist.is_main:
        if weights is None:
            model.to(torch.float32)  # parameters change dtype in place; master keeps handles
            master.sync_to_model()
        else:
            model = fresh()
            _load_weights(model, weights)
        with atomic_directory(target) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            ctx.tokenizer.save_pretrained(tmp)
    barrier()


def _load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Load trained weights by name into a fresh model; every name must be one of its own."""
    result = model.load_state_dict(weights, strict=False)
    if result.unexpected_keys:
        raise RuntimeError(
            f"trained weights do not fit the rebuilt model: {result.unexpected_keys[:5]}"
        )


def _fp32_adapter(ctx: RunContext, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A fresh fp32 base model wrapped with the trained adapter (fp32 master weights)."""
    name, spec, load_kwargs = ctx.lora_base
    fresh = apply_lora(load_model(name, dtype=torch.float32, **load_kwargs), spec)
    _load_weights(fresh, weights)
    return fresh


def batch_order(n: int, batch_size: int, seed: int, position: int) -> list[int]:
    """Example indices of the batch at ``position`` (batches consumed so far).

    A seeded shuffle per epoch, last partial batch dropped. A pure function of the position, so
    resuming needs only the position.
    """
    per_epoch = n // batch_size
    epoch, index = divmod(position, per_epoch)
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order[index * batch_size : (index + 1) * batch_size]
