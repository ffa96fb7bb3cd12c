"""Load any Hugging Face causal LM (hub id or local directory) or the embedded default model.

``load_model("smollm2-135m-instruct")`` (or ``"embedded"``) resolves to the cached copy of the
embedded model (see :mod:`rlhfkit.models.embedded`); anything else goes to
``AutoModelForCausalLM.from_pretrained`` unchanged, so hub ids and local directories work alike.
"""

from __future__ import annotations

import warnings
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
from rlhfkit.models.attention import VARLEN_SDPA
from rlhfkit.models.embedded import EMBEDDED_NAME, embedded_model_dir

EMBEDDED_ALIASES = (EMBEDDED_NAME, "embedded", "default")

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


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False):
    """Load a tokenizer and make sure it can pad and render chats.

    A tokenizer without a pad token pads with its EOS token (labels come from the loss mask,
    never from pad-id comparisons, so this is safe). One without a chat template gets ChatML
    with a warning (base models should use their instruct sibling's template).
    """
    path = resolve_model_path(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
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
    """
    if task not in TASKS:
        raise ValueError(f"unknown model task {task!r}; use one of {', '.join(TASKS)}")
    path = resolve_model_path(name_or_path)
    if not Path(path).exists() and "/" not in path:
        raise FileNotFoundError(
            f"model {name_or_path!r} is neither a local directory nor a hub id (owner/name) nor "
            f"one of {', '.join(EMBEDDED_ALIASES)}"
        )
    extra = {"num_labels": num_labels} if task == "score" else {}
    model = TASKS[task][0].from_pretrained(
        path,
        dtype=dtype,
        attn_implementation=attn_implementation,
        trust_remote_code=trust_remote_code,
        **extra,
    )
    if task == "score" and pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    return model.to(device)


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
