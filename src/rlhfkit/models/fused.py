"""Swap a loaded model's eager RMSNorm layers for the compiled kernel of :mod:`rlhfkit.ops.fused`.

:func:`fuse_norms` patches the ``forward`` of each RMSNorm module whose own forward computes
exactly :func:`rlhfkit.ops.fused.rms_norm` (checked on a probe input, once per class, before
anything is patched): Llama, Mistral, Qwen2 and Qwen3 do; a norm with another formula (Gemma's
``1 + weight``, say) is left as it is. Parameters, state dicts, LoRA and sharding are untouched:
only the computation of the module's output changes, to a fused one that equals it up to
floating-point reassociation.

Compilation costs a few seconds once per process and dtype (less when Inductor's on-disk cache
already holds the kernel), and an eager norm over a small hidden size costs microseconds, so
``"auto"`` fuses only norms at least :data:`FUSE_MIN_HIDDEN` wide.
"""

from __future__ import annotations

import types
from typing import Literal

import torch
from torch import nn

from rlhfkit.ops.fused import rms_norm, rms_norm_compiled

FuseMode = Literal["auto", "on", "off"]

FUSE_MIN_HIDDEN = 256
"""``"auto"`` fuses RMSNorm layers at least this wide (SmolLM2-135M's are 576; the tests' tiny
models are 32-64, where compiling would cost more than it saves)."""


FUSE_MIN_ELEMENTS = 1 << 17
"""Inputs with fewer elements run the eager formula: for a decode step (64 rows x 576) the
compiled call's fixed cost exceeds the eight small operators it replaces (490 against 512
tokens/s sampling 64 x 64 tokens on the embedded model, Intel Xeon with AMX)."""


def _fused_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """The patched forward of an RMSNorm module (bound to it with ``types.MethodType``)."""
    norm = rms_norm_compiled if hidden_states.numel() >= FUSE_MIN_ELEMENTS else rms_norm
    return norm(hidden_states, self.weight, self.variance_epsilon)


def _is_plain_rms_norm(module: nn.Module) -> bool:
    """Whether ``module`` looks like a Llama-style RMSNorm (the probe then confirms it)."""
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__.endswith("RMSNorm")
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 1
        and isinstance(getattr(module, "variance_epsilon", None), float)
    )


@torch.no_grad()
def _same_formula(module: nn.Module) -> bool:
    """Does the module's own forward equal :func:`rms_norm` on a probe input (bit for bit)?"""
    weight = module.weight
    if weight.device.type == "meta":
        return False
    # a generator of its own: a check must not move the global random stream (a run whose
    # sampler checks its model would otherwise draw other numbers after the same seed)
    gen = torch.Generator(device=weight.device).manual_seed(0)
    probe = torch.randn(2, 3, weight.shape[0], generator=gen, device=weight.device)
    probe = probe.to(weight.dtype)
    return torch.equal(module(probe), rms_norm(probe, weight, module.variance_epsilon))


def fuse_norms(model: nn.Module, mode: FuseMode = "auto") -> int:
    """Patch the model's RMSNorm layers to the compiled fused kernel; returns how many.

    Args:
        model: A loaded model (before LoRA or sharding is applied, as ``load_model`` calls it).
        mode: ``"on"`` fuses every plain RMSNorm; ``"auto"`` those at least
            :data:`FUSE_MIN_HIDDEN` wide; ``"off"`` none.

    Returns:
        The number of modules patched.
    """
    if mode == "off":
        return 0
    checked: dict[type, bool] = {}
    count = 0
    for module in model.modules():
        if not _is_plain_rms_norm(module) or "forward" in vars(module):
            continue
        if mode == "auto" and module.weight.shape[0] < FUSE_MIN_HIDDEN:
            continue
        kind = type(module)
        if kind not in checked:
            checked[kind] = _same_formula(module)
        if checked[kind]:
            module.forward = types.MethodType(_fused_forward, module)
            count += 1
    return count
