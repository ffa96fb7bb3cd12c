"""Reading and editing a model's residual stream: hooks for persona vectors, steering, capping.

"Layer i" is the output of decoder layer i (0-based), the residual stream after i + 1 layers.
Forward hooks on those layers record the hidden states (:func:`recording`) or edit them
(:func:`edited`, with :class:`Steer` and :class:`Cap` edits); each context manager removes its
hooks on exit, also after an exception, so the model is untouched afterwards.

Positions during generation: the prefill pass (more than one position) holds the prompt, each
decode pass (one position) a response token. ``positions="prompt"`` edits only the prefill,
``"response"`` only the decode passes and ``"all"`` both (and every position of a plain forward).
The math lives in :mod:`rlhfkit.ops.steering`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from rlhfkit.ops.steering import Side, cap_hidden, steer_hidden

Positions = Literal["all", "prompt", "response"]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM (under a peft wrapper too).

    Raises:
        ValueError: The model has no list of decoder layers.
    """
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(lm, getattr(lm, "base_model_prefix", "model"), None)
    layers = getattr(backbone, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(lm).__name__} has no list of decoder layers to hook")
    return layers


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _replace(output: Any, hidden: torch.Tensor) -> Any:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@contextmanager
def recording(model: nn.Module, layers: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Record the outputs of ``layers`` on the forward passes inside the block.

    Yields:
        A dict filled by each forward pass: layer -> its last output (B, T, D), detached.
    """
    store: dict[int, torch.Tensor] = {}
    modules = decoder_layers(model)
    handles = []
    try:
        for i in layers:

            def hook(_module: nn.Module, _args: Any, output: Any, i: int = i) -> None:
                store[i] = _hidden(output).detach()

            handles.append(modules[i].register_forward_hook(hook))
        yield store
    finally:
        for handle in handles:
            handle.remove()


@dataclass(frozen=True)
class Steer:
    """Add ``alpha * vector`` to the output of decoder layer ``layer`` at ``positions``."""

    layer: int
    vector: torch.Tensor
    alpha: float
    positions: Positions = "all"


@dataclass(frozen=True)
class Cap:
    """Bound the projection of layer ``layer``'s output on ``axis`` at ``tau`` (from ``side``)."""

    layer: int
    axis: torch.Tensor
    tau: float
    side: Side = "below"
    positions: Positions = "all"


def _active(positions: Positions, hidden: torch.Tensor) -> bool:
    if positions == "all":
        return True
    return (positions == "prompt") == (hidden.shape[1] > 1)


def _apply(edit: Steer | Cap, hidden: torch.Tensor) -> torch.Tensor:
    if isinstance(edit, Steer):
        return steer_hidden(hidden, edit.vector.to(hidden.device), edit.alpha)
    return cap_hidden(hidden, edit.axis.to(hidden.device), edit.tau, edit.side)


@contextmanager
def edited(model: nn.Module, edits: Sequence[Steer | Cap]) -> Iterator[None]:
    """Apply the edits to the layers' outputs on every forward pass inside the block.

    Edits of one layer apply in the order given. The hooks are removed on exit.

    Raises:
        ValueError: A layer out of range, or a vector whose size is not the hidden size.
    """
    modules = decoder_layers(model)
    size = getattr(getattr(model, "config", None), "hidden_size", None)
    for e in edits:
        vec = e.vector if isinstance(e, Steer) else e.axis
        if not 0 <= e.layer < len(modules):
            raise ValueError(f"layer {e.layer} out of range: the model has {len(modules)} layers")
        if size is not None and vec.shape != (size,):
            raise ValueError(f"vector of shape {tuple(vec.shape)} for hidden size {size}")
    handles = []
    try:
        for e in edits:

            def hook(_m: nn.Module, _a: Any, output: Any, e: Steer | Cap = e) -> Any:
                hidden = _hidden(output)
                if not _active(e.positions, hidden):
                    return None
                return _replace(output, _apply(e, hidden))

            handles.append(modules[e.layer].register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()
