"""Load any Hugging Face causal LM (hub id or local directory) or the embedded default model.

``load_model("smollm2-135m-instruct")`` (or ``"embedded"``) resolves to the cached copy of the
embedded model (see :mod:`rlhfkit.models.embedded`); anything else goes to
``AutoModelForCausalLM.from_pretrained`` unchanged, so hub ids and local directories work alike.

Before that, a name is checked so that a mistake fails at once with its reason
(:func:`check_model_source`): a local-looking path that does not exist says "no such
directory"; a hub id is looked up with one short request instead of transformers' minute of
retries (offline, or with ``HF_HUB_OFFLINE=1``, only the local cache is consulted).
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
)

from rlhfkit.data.templates import CHATML_TEMPLATE
from rlhfkit.errors import ConfigError
from rlhfkit.models.attention import VARLEN_SDPA
from rlhfkit.models.embedded import EMBEDDED_NAME, embedded_model_dir
from rlhfkit.models.fused import FuseMode, fuse_norms
from rlhfkit.validation import model_path_problem

log = logging.getLogger(__name__)

EMBEDDED_ALIASES = (EMBEDDED_NAME, "embedded", "default")

HUB_TIMEOUT = 10.0
"""Seconds the hub lookup of a model waits for an answer."""

TASKS: dict[str, tuple[type, str]] = {
    "causal_lm": (AutoModelForCausalLM, "CAUSAL_LM"),
    "score": (AutoModelForSequenceClassification, "SEQ_CLS"),
}
"""Model task -> (transformers auto class, peft task type). ``score`` is the backbone plus a
bias-free linear head of ``num_labels`` outputs: reward, ORM/PRM and value models
(:mod:`rlhfkit.models.heads`)."""


@dataclass
class LoraSpec:
    """LoRA adapter settings (passed to ``peft.LoraConfig``).

    Attributes:
        r: Rank of the update matrices.
        alpha: Scaling numerator (the update is scaled by alpha / r).
        dropout: Dropout on the adapter input.
        target_modules: Module names to adapt; ``all-linear`` adapts every linear layer but the
            head.
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])


def resolve_model_path(name_or_path: str) -> str:
    """Map the embedded model's names to its cache directory; leave other names unchanged."""
    if name_or_path in EMBEDDED_ALIASES:
        return str(embedded_model_dir())
    return name_or_path


@functools.cache
def check_model_source(name_or_path: str) -> bool:
    """Check that a model can be loaded from where its name points, without loading it.

    Returns:
        True if it must be loaded from local files only: offline mode, or a hub model in the
        local cache while the hub is unreachable.

    Raises:
        ConfigError: A local-looking path that is not a model directory ("no such directory:
            <path>"), a bare name that is neither a directory nor a hub id, a hub id the hub
            does not know (or gates), or one that is neither cached nor downloadable (offline
            or unreachable hub; the reason is given).
    """
    if name_or_path in EMBEDDED_ALIASES:
        return False
    problem = model_path_problem(name_or_path)
    if problem:
        raise ConfigError(f"model {problem}")
    if Path(name_or_path).expanduser().is_dir():
        return False
    if "/" not in name_or_path:
        raise ConfigError(
            f"model {name_or_path!r} is neither a local directory nor a hub id (owner/name) nor "
            f"one of {', '.join(EMBEDDED_ALIASES)}"
        )
    return _check_hub(name_or_path)


def _check_hub(repo: str) -> bool:
    """One short lookup of ``repo``'s config.json on the hub (see :func:`check_model_source`)."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HFValidationError,
        RepositoryNotFoundError,
    )

    from rlhfkit.validation import in_hub_cache

    cached = in_hub_cache(repo)
    if constants.HF_HUB_OFFLINE:
        if cached:
            return True
        raise ConfigError(
            f"model {repo!r}: no such local directory, and it is not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}); HF_HUB_OFFLINE is set, so it cannot be downloaded"
        )
    try:
        get_hf_file_metadata(hf_hub_url(repo, "config.json"), timeout=HUB_TIMEOUT)
    except GatedRepoError as err:
        raise ConfigError(f"model {repo!r} is gated on the Hugging Face Hub: {err}") from None
    except (RepositoryNotFoundError, HFValidationError):
        raise ConfigError(
            f"model {repo!r}: no such local directory, and no such model on the Hugging Face "
            "Hub (or it is private: log in with `hf auth login`)"
        ) from None
    except EntryNotFoundError:
        return False  # the repository exists; transformers says what it lacks
    except Exception as err:  # no network, DNS, timeout, proxy: transformers would retry
        reason = f"{type(err).__name__}: {err}"
        if cached:
            log.warning("the Hugging Face Hub is unreachable (%s); using the cached %s", reason,
                        repo)  # fmt: skip
            return True
        raise ConfigError(
            f"model {repo!r}: no such local directory, and the Hugging Face Hub is unreachable "
            f"to download it ({reason}). Check the network, or use a local model directory."
        ) from None
    return False


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False):
    """Load a tokenizer and make sure it can pad and render chats.

    A tokenizer without a pad token pads with its EOS token (labels come from the loss mask,
    never from pad-id comparisons, so this is safe). One without a chat template gets ChatML
    with a warning (base models should use their instruct sibling's template).
    """
    local_only = check_model_source(name_or_path)
    path = resolve_model_path(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(
        path, trust_remote_code=trust_remote_code, local_files_only=local_only
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        warnings.warn(
            f"{name_or_path} has no chat template; using ChatML. Pass the instruct sibling's "
            "tokenizer for a base model if it has one.",
            stacklevel=2,
        )
        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def load_model(
    name_or_path: str,
    *,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = VARLEN_SDPA,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    task: str = "causal_lm",
    num_labels: int = 1,
    pad_token_id: int | None = None,
    keep_layers: Sequence[int] | None = None,
    fuse: FuseMode = "auto",
) -> PreTrainedModel:
    """Load a causal LM (or a scalar-head model on its backbone) by id, directory or name.

    Args:
        name_or_path: Hub id, directory, or ``smollm2-135m-instruct`` / ``embedded``.
        dtype: Parameter dtype.
        attn_implementation: ``varlen_sdpa`` (default: sdpa, per document on packed rows; see
            :mod:`rlhfkit.models.attention`), ``sdpa``, ``eager`` or ``flash_attention_2``.
        device: Where to put the model.
        trust_remote_code: Forwarded to transformers.
        task: ``causal_lm`` or ``score`` (see :data:`TASKS`); a causal-LM checkpoint loaded as
            ``score`` keeps its backbone and gets a freshly initialised head.
        num_labels: Head outputs of a ``score`` model (1: reward / value, 3: PRM).
        pad_token_id: Written into a ``score`` model's config (transformers pools at the last
            non-pad token).
        keep_layers: Keep only these decoder layers, in this order (:func:`keep_layers`;
            None: all).
        fuse: Compile the RMSNorm layers into fused kernels (:func:`fuse_norms`): ``auto``
            (hidden sizes of at least 256), ``on`` or ``off``.
    """
    if task not in TASKS:
        raise ValueError(f"unknown model task {task!r}; use one of {', '.join(TASKS)}")
    local_only = check_model_source(name_or_path)
    path = resolve_model_path(name_or_path)
    extra = {"num_labels": num_labels} if task == "score" else {}
    model = TASKS[task][0].from_pretrained(
        path,
        dtype=dtype,
        attn_implementation=attn_implementation,
        trust_remote_code=trust_remote_code,
        local_files_only=local_only,
        use_kernels=False,  # transformers' hub kernels: downloaded code, re-applied on train()
        **extra,
    )
    if task == "score" and pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    if keep_layers is not None:
        keep_layers_of(model, keep_layers)
    fuse_norms(model, fuse)
    return model.to(device)


def keep_layers_of(model: PreTrainedModel, indices: Sequence[int]) -> PreTrainedModel:
    """Cut ``model`` in place down to the decoder layers ``indices`` (in that order).

    A smaller student initialised from a teacher (for example every other layer). The config
    says the new depth (and per-layer settings such as ``layer_types`` follow the kept layers),
    and each attention layer is renumbered for the KV cache, so the model saves and loads as a
    normal Hugging Face model of that depth.

    Raises:
        ValueError: The model has no list of decoder layers.
        ConfigError: No index, a repeated one, or one out of range.
    """
    backbone = getattr(model, model.base_model_prefix, None)
    layers = getattr(backbone, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no list of decoder layers to cut")
    n = len(layers)
    if not indices or any(not 0 <= i < n for i in indices) or len(set(indices)) < len(indices):
        raise ConfigError(
            f"--model.keep-layers {' '.join(map(str, indices))}: need distinct layer indices in "
            f"0..{n - 1}"
        )
    backbone.layers = torch.nn.ModuleList(layers[i] for i in indices)
    for position, layer in enumerate(backbone.layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = position
    config = model.config
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in indices]
    config.num_hidden_layers = len(indices)
    return model


def apply_lora(model: PreTrainedModel, spec: LoraSpec):
    """Wrap ``model`` with a peft LoRA adapter; only adapter weights stay trainable.

    A ``score`` model (sequence classification) also trains its head in full: peft's
    ``SEQ_CLS`` task keeps a trainable copy of ``score``.
    """
    from peft import LoraConfig, get_peft_model

    targets = spec.target_modules
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=targets[0] if targets == ["all-linear"] else targets,
        task_type="SEQ_CLS" if hasattr(model, "score") else "CAUSAL_LM",
    )
    return get_peft_model(model, config)
