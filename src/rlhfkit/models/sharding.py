"""FSDP2 sharding of a model: one unit per decoder layer plus the root, and how to run it.

``fully_shard`` (PyTorch FSDP2) replaces every parameter of a unit by a ``DTensor`` that holds
1/N of it (dim-0 shards) and all-gathers the unit around its ``forward``. rlhfkit shards each
decoder layer (the model's ``_no_split_modules`` classes) as its own unit and the whole model as
the root unit, which keeps what is left (embeddings, final norm, output or score head, and the
tied input/output embedding as one parameter).

Two things differ from a plain ``model(**inputs)`` loop, and this module owns both:

- rlhfkit's forward helpers (:mod:`rlhfkit.models.forward`, :mod:`rlhfkit.models.heads`) call
  the backbone and read the head's weight directly instead of calling the root ``forward``, so
  the root unit would never be gathered. :func:`run_as_forward` runs a whole loss computation
  as a registered forward method of the root (``register_fsdp_forward_method``): the root's
  parameters are gathered before it and its gradients reduce-scattered after the backward.
- Every forward of a sharded unit is a collective, so ranks must run the same number of them.
  Training steps equalise their micro-batch counts (:mod:`rlhfkit.training.accumulate`); passes
  without gradients whose count differs between ranks (sampling, per-rank evaluation, rank-0
  reports) run inside :func:`gathered`, which all-gathers every unit once, keeps the full
  parameters until the block ends (no collective inside it), then frees them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch import nn

R = TypeVar("R")

_RUN = "_rlhfkit_run"
"""Name of the forward method registered on a sharded root (see :func:`run_as_forward`)."""


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` is the root of an FSDP2-sharded model."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: instances of its ``_no_split_modules`` classes.

    Raises:
        ValueError: If the model names no such class or none is found.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(inner, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(
            f"{type(inner).__name__} declares no decoder-layer class (_no_split_modules): "
            "cannot shard it layer by layer"
        )
    return layers


def shard_model(
    model: nn.Module,
    *,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = torch.float32,
    reshard_after_forward: bool = True,
    offload: bool = False,
) -> nn.Module:
    """Shard ``model`` in place with FSDP2 across the default process group.

    The stored shards keep the dtype the parameters have (fp32 for a trained model: they are
    its master weights; the compute dtype for a frozen one). With ``param_dtype`` the gathered
    parameters are cast to it for compute, and gradients are reduce-scattered in
    ``reduce_dtype``.

    Args:
        model: A transformers model (or a peft wrapper of one) on its device.
        param_dtype: Compute dtype of the gathered parameters (None: as stored).
        reduce_dtype: Dtype of the gradient reduce-scatter.
        reshard_after_forward: Free each layer's gathered parameters after its forward (and
            gather them again for the backward): least memory. False keeps them from forward
            to backward (ZeRO-2 style, one all-gather fewer per layer).
        offload: Keep the shards, their gradients and (so) the optimiser state in CPU memory,
            copied to the device around each use (``CPUOffloadPolicy``).

    Returns:
        The same module, now an ``FSDPModule``.
    """
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        OffloadPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    options: dict[str, Any] = {
        "mp_policy": MixedPrecisionPolicy(
            param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False
        ),
        "offload_policy": CPUOffloadPolicy() if offload else OffloadPolicy(),
    }
    for layer in decoder_layers(model):
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **options)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **options)
    setattr(model, _RUN, _call.__get__(model))
    register_fsdp_forward_method(model, _RUN)
    # FSDP2 initialises its root at the first forward of the root module; rlhfkit's helpers may
    # first run a decoder layer alone (inside ``gathered``), so make the root now.
    model._get_fsdp_state()._lazy_init()
    return model


def _call(self: nn.Module, fn: Callable[[], Any]) -> Any:
    """The registered forward method: run ``fn`` (between FSDP's pre- and post-forward)."""
    return fn()


def run_as_forward(model: nn.Module, fn: Callable[[], R]) -> R:
    """Run ``fn()`` as a forward of ``model``'s root unit (plainly when not sharded).

    FSDP2 gathers the root's parameters before ``fn`` and hooks the tensors it returns, so
    ``fn`` must return the tensor the backward starts from (or a tuple holding it).
    """
    if not is_sharded(model) or getattr(model, "_rlhfkit_depth", 0):
        return fn()
    model._rlhfkit_depth = 1
    try:
        return getattr(model, _RUN)(fn)
    finally:
        model._rlhfkit_depth = 0


def _units(model: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered(*models: nn.Module) -> Iterator[None]:
    """Hold the full parameters of every sharded model in ``models`` until the block ends.

    All ranks must enter together (one all-gather per unit); inside, forwards are local, so
    ranks may run different numbers of them (sampling, per-rank evaluation). Re-entrant: only
    the outermost block gathers and frees. Models that are not sharded are left alone.
    """
    fresh = [m for m in models if is_sharded(m) and not getattr(m, "_rlhfkit_gathered", 0)]
    for model in models:
        if is_sharded(model):
            model._rlhfkit_gathered = getattr(model, "_rlhfkit_gathered", 0) + 1
    saved: list[tuple[nn.Module, Any, list]] = []
    try:
        for model in fresh:
            for unit in _units(model):
                # FSDP2 has a public setter but no getter: keep its fields to restore them
                state = unit._get_fsdp_state()
                groups = state._fsdp_param_groups
                saved.append((unit, state._auto_reshard_after_forward,
                              [g.post_forward_mesh_info for g in groups]))  # fmt: skip
                unit.set_reshard_after_forward(False, recurse=False)
                unit.unshard()
        yield
    finally:
        for model in models:
            if is_sharded(model):
                model._rlhfkit_gathered -= 1
        for unit, auto, infos in saved:
            unit.reshard()
            state = unit._get_fsdp_state()
            state._auto_reshard_after_forward = auto
            for group, info in zip(state._fsdp_param_groups, infos, strict=True):
                group.post_forward_mesh_info = info


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of a sharded tensor (a collective), or the tensor itself."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def local_numel(model: nn.Module) -> tuple[int, int]:
    """(elements this rank stores, elements of the whole model) over the model's parameters."""
    from torch.distributed.tensor import DTensor

    local = total = 0
    for p in model.parameters():
        total += p.numel()
        local += p.to_local().numel() if isinstance(p, DTensor) else p.numel()
    return local, total
