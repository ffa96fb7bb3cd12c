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

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.hooks import RemovableHandle

from rlhfkit.config import ModelConfig
from rlhfkit.errors import ConfigError, MissingFileError
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


def attach(model: nn.Module, edits: Sequence[Steer | Cap]) -> list[RemovableHandle]:
    """Register the edits as forward hooks on the layers; returns the handles (to remove them).

    Edits of one layer apply in the order given.

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
    for e in edits:

        def hook(_m: nn.Module, _a: Any, output: Any, e: Steer | Cap = e) -> Any:
            hidden = _hidden(output)
            if not _active(e.positions, hidden):
                return None
            return _replace(output, _apply(e, hidden))

        handles.append(modules[e.layer].register_forward_hook(hook))
    return handles


@contextmanager
def edited(model: nn.Module, edits: Sequence[Steer | Cap]) -> Iterator[None]:
    """Apply the edits on every forward pass inside the block; the hooks are removed on exit.

    Raises:
        ValueError: As :func:`attach`.
    """
    handles = attach(model, edits)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def load_persona_vector(
    directory: str, layer: int | None = None, variant: str = "response"
) -> tuple[torch.Tensor, int, dict[str, Any]]:
    """A vector saved by ``rlhfkit persona extract``: (vector (D,), its layer, persona.json).

    Raises:
        MissingFileError: Not a persona vector directory.
        ConfigError: A layer out of range.
    """
    path = Path(directory).expanduser()
    if not (path / "persona.json").is_file():
        raise MissingFileError(f"{directory}: no persona.json (make one: rlhfkit persona extract)")
    meta = json.loads((path / "persona.json").read_text())
    tensors = load_file(str(path / "vectors.safetensors"))
    chosen = meta["layer"] if layer is None else layer
    if not 0 <= chosen < meta["layers"]:
        raise ConfigError(f"layer {layer}: the vector has layers 0..{meta['layers'] - 1}")
    return tensors[variant][chosen], chosen, meta


def attach_steering(model: nn.Module, cfg: ModelConfig) -> list[RemovableHandle]:
    """``--model.steer``: hook ``steer_alpha * v`` onto the vector's layer for the model's life.

    Nothing is attached without ``cfg.steer``. The hooks are not part of the weights, so a model
    trained with them (preventative steering) is saved unsteered.
    """
    if cfg.steer is None:
        return []
    vector, layer, _ = load_persona_vector(cfg.steer, cfg.steer_layer)
    return attach(model, [Steer(layer, vector, cfg.steer_alpha, cfg.steer_positions)])
