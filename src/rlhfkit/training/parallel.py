"""The parallel strategy of a run: how each model is placed across the ranks of a job.

``--model.parallel replicate`` (the default) keeps a full copy of every model on every rank;
the fp32 master gradients are averaged after each step (:mod:`rlhfkit.training.distributed`).
``--model.parallel fsdp2`` shards the trained models with FSDP2
(:func:`rlhfkit.models.sharding.shard_model`): each rank stores 1/N of the fp32 parameters
(which are then the master weights themselves), of their gradients and of the AdamW state;
layers are gathered in the compute dtype around their forward and backward, and gradients are
reduce-scattered in fp32. Frozen models (the KL reference) are sharded in the compute dtype,
or with ``--model.shard-frozen false`` held whole on every rank.

Recipes never branch on the strategy: they get a :class:`Placement` from the run and ask it to
prepare a trained or a frozen model. With one process both strategies place models the same
way (nothing to shard); only the checkpoint format follows the configured strategy, so a run
can move between 1 and N ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rlhfkit.config import ModelConfig
from rlhfkit.models.precision import Precision
from rlhfkit.models.sharding import shard_model
from rlhfkit.training.distributed import DistInfo
from rlhfkit.training.precision import MasterWeights


@dataclass(frozen=True)
class Placement:
    """Where a run's models live and in which dtype.

    Attributes:
        dist: This rank's place in the job.
        precision: The compute dtype policy.
        strategy: ``replicate`` or ``fsdp2``.
        reshard_after_forward: FSDP2's knob (see ``--model.reshard-after-forward``).
        offload: FSDP2 CPU offload of shards, gradients and optimiser state (on accelerators;
            a CPU run keeps everything in CPU memory anyway).
        shard_frozen: Shard frozen models too under FSDP2.
    """

    dist: DistInfo
    precision: Precision
    strategy: str = "replicate"
    reshard_after_forward: bool = True
    offload: bool = False
    shard_frozen: bool = True

    @classmethod
    def of(cls, cfg: ModelConfig, dist: DistInfo, precision: Precision) -> Placement:
        """The placement a ``--model`` section asks for."""
        return cls(
            dist, precision, cfg.parallel, cfg.reshard_after_forward, cfg.offload,
            cfg.shard_frozen,
        )  # fmt: skip

    @property
    def offloading(self) -> bool:
        """Whether shards are offloaded: asked for, on an accelerator.

        On a CPU the shards are in CPU memory already.
        """
        return self.offload and self.dist.device.type != "cpu"

    @property
    def sharded(self) -> bool:
        """True when models are actually sharded (FSDP2 with more than one rank)."""
        return self.strategy == "fsdp2" and self.dist.world_size > 1

    @property
    def sharded_checkpoints(self) -> bool:
        """True when checkpoints are written with torch.distributed.checkpoint (FSDP2 runs)."""
        return self.strategy == "fsdp2"

    def trained(self, model: nn.Module) -> MasterWeights:
        """Place a trained model (fp32 on entry) and return its master weights.

        Replicated: moved to the device, cast to the compute dtype, with an fp32 master copy.
        Sharded: the fp32 shards are the master weights; FSDP2 casts gathered layers to the
        compute dtype and reduces gradients in fp32.
        """
        model.train()
        if not self.sharded:
            model.to(self.dist.device)
            return MasterWeights(model, self.precision.compute)
        # FSDP2 moves each unit to the device as it shards it: a GPU never holds the whole
        # fp32 model, only one unit at a time before its shards are cut
        compute = self.precision.compute
        shard_model(
            model, param_dtype=None if compute == torch.float32 else compute,
            reduce_dtype=torch.float32, reshard_after_forward=self.reshard_after_forward,
            offload=self.offloading,
        )  # fmt: skip
        return MasterWeights(model, torch.float32)

    def frozen(self, model: nn.Module) -> nn.Module:
        """Place a frozen model (loaded in the compute dtype) in eval mode, sharded if so set.

        Its buffers keep the dtype loading gave them (RoPE's stay fp32).
        """
        model.eval()  # requires_grad left as loaded: only ever run under no_grad
        if not (self.sharded and self.shard_frozen):
            model.to(self.dist.device)
        else:
            shard_model(
                model, reduce_dtype=None, reshard_after_forward=self.reshard_after_forward,
                offload=self.offloading,
            )  # fmt: skip
        return model
