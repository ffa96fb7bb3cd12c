"""Shared config sections, YAML presets and CLI parsing.

Every recipe's Config is a dataclass composed of these small sections plus its own algorithm
section. Each field is documented by the docstring under it: tyro turns those into ``--help``,
so there is one source for type, default and help text. A YAML preset supplies values
(``--config configs/sft.yaml``); ``--section.field value`` flags override them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from rlhfkit.errors import ConfigError, MissingFileError
from rlhfkit.validation import did_you_mean, model_path_problem, run_dir_problem

T = TypeVar("T")

Problems = list[tuple[str, str]]
"""What a section's ``problems()`` returns: (field, what is wrong) pairs."""


@dataclass
class ModelConfig:
    """Which model to train and how it computes."""

    name: str = "smollm2-135m-instruct"
    """Hugging Face hub id, local directory, or 'smollm2-135m-instruct' (the embedded default)."""
    precision: Literal["auto", "bf16", "fp32", "fp16"] = "auto"
    """Compute dtype; 'auto' picks bf16 where the CPU (AMX / AVX512-BF16) or GPU supports it.
    Master weights, optimiser state and loss math are always fp32."""
    attn_implementation: str = "varlen_sdpa"
    """Attention kernel: 'varlen_sdpa' (sdpa, run per document on packed rows), 'sdpa',
    'eager', 'flash_attention_2'."""
    fuse: Literal["auto", "on", "off"] = "auto"
    """Compile the RMSNorm layers into fused kernels with torch.compile (a few seconds once,
    then about 4x faster norms): 'auto' for hidden sizes of 256 or more, 'on', 'off'. Without a
    working compiler the norms run eagerly, after one warning."""
    trust_remote_code: bool = False
    """Allow model code from the hub (only for models you trust)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    lora: bool = False
    """Train a LoRA adapter (peft) instead of all weights."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator (update scaled by alpha / r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input."""
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Modules to adapt; 'all-linear' adapts every linear layer except the head."""
    keep_layers: list[int] | None = None
    """Keep only these decoder layers of the loaded model, in this order (for example 0 2 4 ...:
    a smaller student from a teacher); None keeps all."""
    parallel: Literal["replicate", "fsdp2"] = "replicate"
    """How the ranks of a torchrun job share a trained model: 'replicate' (a full copy per rank,
    gradients averaged) or 'fsdp2' (PyTorch FSDP2: parameters, gradients and optimiser state
    sharded across ranks, one unit per decoder layer plus the root; checkpoints sharded with
    torch.distributed.checkpoint and resumable at another number of ranks)."""
    reshard_after_forward: bool = True
    """fsdp2: free each layer's gathered parameters after its forward (least memory); false
    keeps them until the backward (one all-gather fewer per layer)."""
    offload: bool = False
    """fsdp2: keep parameter shards, gradients and optimiser state in CPU memory."""
    shard_frozen: bool = True
    """fsdp2: shard the frozen models the run loads (the KL reference) too; false holds a full
    copy in the compute dtype on every rank."""
    steer: str | None = None
    """A persona vector (a directory written by rlhfkit persona extract): add steer_alpha * v
    to its layer's output on every forward pass of this model. In generate, eval, bon, rs and
    the rollout engine it steers the answers; in sft, dpo and rl it is preventative steering
    (the saved model carries no hook)."""
    steer_alpha: float = 0.0
    """Steering strength alpha (negative: away from the trait)."""
    steer_layer: int | None = None
    """Layer to steer (None: the layer persona extract chose)."""
    steer_positions: Literal["all", "prompt", "response"] = "all"
    """Positions steered while generating: the prompt, the response tokens, or both."""

    def problems(self) -> Problems:
        """Invalid values: an empty or mistyped local model path, LoRA settings, a steer dir."""
        out = [("name", text) for text in [model_path_problem(self.name)] if text]
        if self.lora_r < 1:
            out.append(("lora_r", f"must be at least 1, got {self.lora_r}"))
        if self.lora_alpha <= 0:
            out.append(("lora_alpha", f"must be positive, got {self.lora_alpha}"))
        if not 0.0 <= self.lora_dropout < 1.0:
            out.append(("lora_dropout", f"must be in [0, 1), got {self.lora_dropout}"))
        layers = self.keep_layers
        if layers is not None and (not layers or min(layers) < 0 or len(set(layers)) < len(layers)):
            out.append(("keep_layers", f"need distinct layer indices >= 0, got {layers}"))
        if self.offload and self.parallel != "fsdp2":
            out.append(("offload", "needs --model.parallel fsdp2 (replicate keeps no shards)"))
        steer = Path(self.steer).expanduser() if self.steer is not None else None
        if steer is not None and not (steer / "persona.json").is_file():
            out.append(("steer", f"{self.steer}: not a persona vector directory (no persona.json;"
                        " make one with rlhfkit persona extract)"))  # fmt: skip
        return out


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule."""

    lr: float = 2e-5
    """Peak learning rate."""
    weight_decay: float = 0.0
    """Decoupled weight decay (matrices only)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam moment coefficients."""
    eps: float = 1e-8
    """Adam epsilon."""
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    """Decay after warmup: linear to 0, cosine to 0, or constant."""
    warmup_ratio: float = 0.05
    """Fraction of the steps spent warming up linearly."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 disables clipping)."""

    def problems(self) -> Problems:
        """Invalid values: a learning rate that is not positive, betas outside [0, 1), ..."""
        out = []
        if not (math.isfinite(self.lr) and self.lr > 0):
            out.append(("lr", f"must be a positive number, got {self.lr}"))
        if not self.weight_decay >= 0:
            out.append(("weight_decay", f"must be >= 0, got {self.weight_decay}"))
        if not all(0.0 <= b < 1.0 for b in self.betas):
            out.append(("betas", f"each must be in [0, 1), got {list(self.betas)}"))
        if not self.eps > 0:
            out.append(("eps", f"must be positive, got {self.eps}"))
        if not 0.0 <= self.warmup_ratio <= 1.0:
            out.append(("warmup_ratio", f"must be in [0, 1], got {self.warmup_ratio}"))
        if not self.max_grad_norm >= 0:
            out.append(("max_grad_norm", f"must be >= 0 (0: off), got {self.max_grad_norm}"))
        return out


@dataclass
class LoopConfig:
    """Batching, length of training, evaluation, checkpoints."""

    batch_size: int = 16
    """Sequences per optimiser step (global, over all micro-batches and ranks)."""
    micro_batch_tokens: int = 4096
    """Token budget of one micro-batch (packed row or padded bucket); trades memory for speed,
    never changes the gradient."""
    epochs: float = 1.0
    """Passes over the training data (ignored when max_steps is set)."""
    max_steps: int | None = None
    """Stop after this many optimiser steps."""
    seed: int = 0
    """Seed for data order, initialisation and sampling."""
    data_seed: int | None = None
    """Seed of the data order alone (None: seed). Runs that share seed but not data_seed start
    from the same initialisation (a reward model's new head too) and see the data in different
    orders, as the members of a weight average (WARM) should."""
    eval_every: int = 0
    """Evaluate every N steps (0: only before and after training)."""
    save_every: int = 20
    """Checkpoint every N steps (0: only at the end), so that a crashed or killed run can
    continue: run the same command again."""
    keep_last: int = 2
    """Checkpoints to keep (the newest ones)."""
    resume: bool | None = None
    """None (default): continue from the run directory's latest checkpoint if it has one,
    else start fresh. True: continue, and fail if there is no checkpoint. False: start from
    step 0, deleting the previous run's outputs in the run directory first."""
    max_nonfinite: int = 3
    """Abort after this many consecutive steps with a NaN/inf loss (each is skipped)."""

    def problems(self) -> Problems:
        """Invalid values: a batch size of 0, a negative interval, ..."""
        out = [
            (name, f"must be at least {low}, got {getattr(self, name)}")
            for name, low in (("batch_size", 1), ("micro_batch_tokens", 1), ("eval_every", 0),
                              ("save_every", 0), ("keep_last", 1), ("max_nonfinite", 1))
            if getattr(self, name) < low
        ]  # fmt: skip
        if not (math.isfinite(self.epochs) and self.epochs > 0):
            out.append(("epochs", f"must be a positive number, got {self.epochs}"))
        if self.max_steps is not None and self.max_steps < 1:
            out.append(("max_steps", f"must be at least 1 (or None), got {self.max_steps}"))
        return out


@dataclass
class EnvConfig:
    """A multi-turn environment to act in (tool use, games): the rollouts become episodes."""

    name: str | None = None
    """calculator, guess_number, or 'module:Class' (None: single-turn completions)."""
    options: str = "{}"
    """Keyword arguments of the environment's constructor, as a JSON object."""
    call_format: str = "hermes"
    """How the model writes tool calls: hermes (JSON in <tool_call> tags) or python."""
    native_tools: bool = False
    """Show the tools through the chat template's own tools support instead of the call
    format's system prompt (for models whose template defines tools)."""
    tool_timeout: float = 5.0
    """Seconds a tool call may run before it is stopped (its error goes to the model)."""
    tool_max_chars: int = 2000
    """Characters of a tool's output the model sees."""
    max_turns: int = 8
    """Policy turns per episode."""
    max_tokens: int = 1024
    """Trajectory tokens per episode (the policy's turns and the environment's answers);
    ``sampling.max_new_tokens`` bounds each turn."""
    max_observation_tokens: int = 256
    """Tokens of one environment answer (longer tool output is cut)."""

    def problems(self) -> Problems:
        """Limits below 1 and options that are not a JSON object."""
        out = [
            (name, f"must be at least 1, got {getattr(self, name)}")
            for name in ("max_turns", "max_tokens", "max_observation_tokens", "tool_max_chars")
            if getattr(self, name) < 1
        ]
        if not self.tool_timeout > 0:
            out.append(("tool_timeout", f"must be > 0 seconds, got {self.tool_timeout}"))
        try:
            options = json.loads(self.options)
        except ValueError as err:
            out.append(("options", f"not valid JSON ({err})"))
        else:
            if not isinstance(options, dict):
                out.append(("options", "must be a JSON object of keyword arguments"))
        return out


@dataclass
class EngineConfig:
    """Which engine samples: rlhfkit's own sampler, or a vLLM server."""

    backend: Literal["hf", "vllm"] = "hf"
    """'hf': rlhfkit's own KV-cache sampler on the model. 'vllm': a vLLM server in its own
    environment (built by `make vllm`), started on the model and stopped at the end, or attached
    to by vllm_url."""
    vllm_url: str | None = None
    """vllm: attach to this running server (started with rlhfkit's worker extension) instead of
    starting one; it must serve the model the command names."""
    vllm_python: str | None = None
    """vllm: the Python of the engine's environment (default: .venv-vllm, or
    $RLHFKIT_VLLM_PYTHON)."""
    vllm_memory: float = 0.1
    """vllm: share of memory the engine reserves for its KV cache (its
    --gpu-memory-utilization; on the CPU build a share of RAM)."""
    vllm_max_model_len: int = 2048
    """vllm: longest prompt plus completion the engine accepts."""
    vllm_lora: Literal["adapter", "merged"] = "adapter"
    """vllm, training with --model.lora: send the engine the LoRA adapter itself (it serves the
    base model plus the adapter) or the merged weights W + (alpha/r) B A."""

    def problems(self) -> Problems:
        """A memory share outside (0, 1], a context length below 1."""
        out = []
        if not 0.0 < self.vllm_memory <= 1.0:
            out.append(("vllm_memory", f"must be in (0, 1], got {self.vllm_memory}"))
        if self.vllm_max_model_len < 1:
            out.append(("vllm_max_model_len", f"must be at least 1, got {self.vllm_max_model_len}"))
        return out


@dataclass
class LogConfig:
    """Where outputs go."""

    run_dir: str = "runs/sft"
    """Run directory: final model, checkpoints, metrics.jsonl, config and provenance."""
    tensorboard: bool = True
    """Write TensorBoard event files (when tensorboard is installed)."""
    wandb: bool = False
    """Log to Weights & Biases (pip install wandb)."""
    trackio: bool = False
    """Log to trackio (pip install trackio)."""
    project: str = "rlhfkit"
    """Project name for wandb / trackio."""
    progress: bool = True
    """Show a progress bar."""
    log_every: int = 1
    """Write metrics every N steps."""

    def problems(self) -> Problems:
        """Invalid values: a run directory that cannot be created or written."""
        out = [("run_dir", text) for text in [run_dir_problem(self.run_dir)] if text]
        if self.log_every < 0:
            out.append(("log_every", f"must be >= 0 (0: never), got {self.log_every}"))
        return out


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config as plain YAML-safe values (tuples become lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        return value

    return plain(dataclasses.asdict(cfg))


def from_dict(
    cls: type[T],
    values: dict[str, Any],
    *,
    where: str = "config",
    lines: dict[tuple[str, ...], int] | None = None,
    _path: tuple[str, ...] = (),
) -> T:
    """Build dataclass ``cls`` from nested ``values``; unknown keys raise naming their path.

    Args:
        cls: The config dataclass.
        values: Its fields' values, sections as nested mappings.
        where: How errors name the mapping (a file name, then ``.section`` per level).
        lines: Line of each key path in the file ``values`` came from, for the errors.

    Raises:
        ConfigError: For a key that is not a field (with the closest field name), a section
            that is not a mapping, or a value of the wrong type.
    """
    hints = typing.get_type_hints(cls)
    names = sorted(f.name for f in dataclasses.fields(cls))
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        path = (*_path, key)
        at = f" (line {lines[path]})" if lines and path in lines else ""
        if key not in names:
            raise ConfigError(
                f"{where}: unknown field '{key}'{at}{did_you_mean(str(key), names)} "
                f"({cls.__name__} fields: {', '.join(names)})"
            )
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(
                    f"{where}: '{key}'{at} must be a mapping of {hint.__name__} fields"
                )
            value = from_dict(hint, value, where=f"{where}.{key}", lines=lines, _path=path)
        else:
            try:
                value = coerce(value, hint, where=f"{where}.{key}")
            except ConfigError as err:
                raise ConfigError(f"{err}{at}") from None
        kwargs[key] = value
    return cls(**kwargs)


def coerce(value: Any, hint: Any, *, where: str) -> Any:
    """Check a YAML value against a field's type and convert what YAML leaves ambiguous.

    YAML reads ``1e-5`` as a string and ``3`` where a float is meant as an int; both become
    floats. Literals must be one of their values; lists become tuples for tuple fields.

    Raises:
        ConfigError: Naming ``where``, the expected type and the value.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return coerce(value, option, where=where)
            except ValueError as err:
                errors.append(str(err))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: expected one of {list(args)}, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        items = [coerce(v, item, where=f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    return _scalar(value, hint, where)


def _scalar(value: Any, hint: Any, where: str) -> Any:
    if hint is float and not isinstance(value, bool):
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    exact = {int: (int,), str: (str,), bool: (bool,)}
    if hint not in (float, *exact):  # Any, Path, ...: tyro and the dataclass handle the rest
        return value
    accepted = hint in exact and isinstance(value, exact[hint])
    if accepted and not (hint is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")


def load_yaml(cls: type[T], path: str | Path) -> T:
    """Read a YAML preset into ``cls`` (missing fields keep their defaults).

    Raises:
        MissingFileError: The file does not exist.
        ConfigError: Invalid YAML (with line and column), or an unknown or ill-typed key (with
            its line).
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"config file {path} not found")
    try:
        text = path.read_text(encoding="utf-8")
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a UTF-8 text file ({err.reason})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config sections")
    return from_dict(cls, values, where=str(path), lines=_key_lines(yaml.compose(text)))


def _key_lines(node: Any, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], int]:
    """1-based line of every key path in a composed YAML mapping."""
    out: dict[tuple[str, ...], int] = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                out[(*path, key.value)] = key.start_mark.line + 1
                out.update(_key_lines(value, (*path, key.value)))
    return out


def parse_cli(cls: type[T], args: list[str], *, prog: str, description: str) -> T:
    """Parse ``[--config file.yaml] [--section.field value ...]`` into ``cls``.

    The preset (if any) supplies defaults; flags override them. ``--help`` lists every field
    with its docstring.
    """
    import tyro

    default = cls()
    rest = list(args)
    rest = [
        part
        for arg in rest
        for part in (arg.split("=", 1) if arg.startswith("--config=") else [arg])
    ]
    if "--config" in rest:
        i = rest.index("--config")
        if i + 1 >= len(rest):
            raise ConfigError("--config needs a YAML file path")
        default = load_yaml(cls, rest[i + 1])
        del rest[i : i + 2]
    return tyro.cli(
        cls,
        default=default,
        args=rest,
        prog=prog,
        description=description,
        config=(tyro.conf.FlagConversionOff,),
    )
