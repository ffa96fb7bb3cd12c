"""Forward passes that return fp32 log-probabilities of labels without (B, L, V) fp32 logits.

Two entry points share one head computation:

- ``label_logprobs(model, batch)``: HF-style ``labels`` (-100 = ignore, the model's usual shift:
  the label at position i is predicted from positions < i). Only the hidden states of positions
  that predict a label go through the head, so prompt tokens cost no head FLOPs. Used by SFT and
  any loss over a flat set of labelled tokens, padded or packed.
- ``completion_logprobs(model, prompt_ids, ...)``: the RL / preference convention
  (docs/methods/index.md): prompts left-padded, completions right-padded, result in
  completion space (B, T).

Models whose head is a plain bias-free linear map use the fused chunked op of
:mod:`rlhfkit.ops.logprobs`; others (logit soft-capping, logit scaling, biased heads) fall back to
the model's own logits (the naive path, also used as the reference in tests).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rlhfkit.models.sharding import is_sharded
from rlhfkit.ops.logprobs import linear_logprobs, logits_logprobs
from rlhfkit.ops.masking import prefix_tree_mask


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (LoRA layers are injected in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def fused_head(model: nn.Module) -> nn.Linear | None:
    """The output head if it is a plain bias-free linear layer that can be fused, else None."""
    lm = _unwrap(model)
    head = lm.get_output_embeddings()
    config = lm.config
    special = any(
        getattr(config, name, None) not in (None, 1.0)
        for name in ("final_logit_softcapping", "logit_scale", "logits_scaling")
    )
    if special or not isinstance(head, nn.Linear) or head.bias is not None:
        return None
    return head


PACK_BUCKET = 64
"""Packed rows run padded to a multiple of this many tokens (:func:`bucketed`)."""


def bucketed(inputs: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
    """A packed row's model inputs padded with one dummy document to a multiple of PACK_BUCKET.

    On CPU, oneDNN generates a matmul kernel for every new shape, and a packed row's length
    changes from batch to batch, so every matmul of a training step used to meet a shape it had
    not seen: the first call of a new shape ran at a third of the rate of a cached one
    (SmolLM2-135M's MLP, 1,000-1,400 tokens, Intel Xeon with AMX). Rounding the length up to a
    multiple of 64 leaves a few shapes, each compiled once, for at most 63 extra tokens. The
    dummy document (token 0 at positions 0, 1, ...) attends only to itself, so the real
    documents compute exactly what they compute without it; callers drop its positions.

    Returns:
        The inputs (unchanged for padded batches, or when the row is already a multiple) and
        the row's own length (None when the inputs are not token ids).

    Shapes:
        input_ids, position_ids: (1, N) -> (1, N + P).
    """
    ids, cu = inputs.get("input_ids"), inputs.get("cu_seq_lens_q")
    n = None if ids is None else int(ids.shape[-1])
    pad = 0 if n is None else -n % PACK_BUCKET
    if cu is None or "position_ids" not in inputs or "attention_mask" in inputs or not pad:
        return inputs, n
    filler = torch.arange(pad, device=ids.device)[None]  # (1, P)
    out = dict(inputs)
    out["input_ids"] = torch.cat([ids, torch.zeros_like(filler)], dim=1)
    positions = inputs["position_ids"]
    out["position_ids"] = torch.cat([positions, filler.to(positions.dtype)], dim=1)
    out["cu_seq_lens_q"] = out["cu_seq_lens_k"] = torch.cat([cu, cu.new_tensor([n + pad])])
    out["max_length_q"] = out["max_length_k"] = max(int(inputs.get("max_length_q", 0)), pad)
    if "doc_masks" in inputs:
        out["doc_masks"] = [*inputs["doc_masks"], None]
    return out, n


def backbone_hidden(model: nn.Module, **inputs: torch.Tensor) -> torch.Tensor:
    """Final hidden states of the decoder (before the head); packed rows run :func:`bucketed`.

    Shapes:
        input_ids: (B, L); returns (B, L, H).
    """
    lm = _unwrap(model)
    backbone = getattr(lm, lm.base_model_prefix)
    padded, n = bucketed(inputs)
    return backbone(**padded, use_cache=False).last_hidden_state[:, :n]


PARTIAL_LAST_LAYER = frozenset({"llama", "mistral", "qwen2", "qwen3"})
"""Model types whose decoder layer is ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``: their last
layer's MLP can run only at the positions that are read (:func:`selected_hidden`)."""


class _StopBeforeLastLayer(Exception):
    """Raised by a pre-hook to end the backbone's forward at its last decoder layer."""


def _checkpointing(lm: nn.Module) -> bool:
    """Whether activation checkpointing is on (the newer transformers name first)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(lm), name):
            return bool(getattr(lm, name))
    return False


def _decoder(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(backbone, last decoder layer) when the last layer can run on selected positions.

    Not for an FSDP2-sharded model: its layers must run as whole forwards (a layer stopped in
    its pre-forward hook would skip FSDP's post-forward and stay gathered). Nor when the last
    layer, one of its modules or the final norm carries hooks (steering edits, recordings) or
    accelerate's dispatch wrapper (``_hf_hook``, device maps and offloading): they expect the
    layer's own forward on the whole row, which the partial path does not call.
    """
    lm = _unwrap(model)
    backbone = getattr(lm, lm.base_model_prefix, None)
    layers = getattr(backbone, "layers", None)
    if (
        getattr(lm.config, "model_type", None) not in PARTIAL_LAST_LAYER
        or not layers
        or _checkpointing(lm)
        or is_sharded(layers[-1])
        or not isinstance(getattr(backbone, "norm", None), nn.Module)
    ):
        return None
    last = layers[-1]
    if any(
        m._forward_hooks or m._forward_pre_hooks or hasattr(m, "_hf_hook")
        for m in (*last.modules(), backbone.norm)
    ):
        return None
    parts = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")
    return (backbone, last) if all(hasattr(last, a) for a in parts) else None


def selected_hidden(
    model: nn.Module, inputs: dict[str, torch.Tensor], rows: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """Final hidden states at the positions ``(rows, cols)`` only (reward heads, label positions).

    Equal to ``backbone_hidden(model, **inputs)[rows, cols]``. Every layer but the last runs
    on all positions; the last one's attention too (its keys and values are needed
    everywhere), but its MLP and the final norm run only at the selected positions: for a
    reward model read at one token per sequence that skips about three quarters of a layer
    (2.5% of SmolLM2-135M's forward and backward). Other model types, and sharded models, run
    the whole backbone.

    Shapes:
        rows, cols: (S,); returns (S, H).
    """
    found = _decoder(model)
    if found is None:
        return backbone_hidden(model, **inputs)[rows, cols]
    backbone, last = found
    captured: dict[str, object] = {}

    def stop(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured["args"], captured["kwargs"] = args, kwargs
        raise _StopBeforeLastLayer

    handle = last.register_forward_pre_hook(stop, with_kwargs=True)
    try:
        backbone(**bucketed(inputs)[0], use_cache=False)  # rows, cols index real positions
    except _StopBeforeLastLayer:
        pass
    finally:
        handle.remove()
    kwargs = dict(captured["kwargs"])  # type: ignore[arg-type]
    args = captured["args"]
    hidden = args[0] if args else kwargs.pop("hidden_states")  # type: ignore[index]
    attended, _ = last.self_attn(hidden_states=last.input_layernorm(hidden), **kwargs)
    picked = (hidden + attended)[rows, cols]  # (S, H)
    picked = picked + last.mlp(last.post_attention_layernorm(picked))
    return backbone.norm(picked)


def _model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Model keyword arguments of a batch.

    Packed rows also pass their document boundaries (the varlen keywords that ``varlen_sdpa``
    and flash-attention kernels read); prefix-tree documents (a prompt shared by several
    completions) pass one mask per document, which only ``varlen_sdpa`` reads.
    """
    keys = ("input_ids", "attention_mask", "position_ids")
    inputs = {k: batch[k] for k in keys if k in batch}
    if "cu_seqlens" in batch:
        inputs["cu_seq_lens_q"] = inputs["cu_seq_lens_k"] = batch["cu_seqlens"]
        longest = int(batch["seq_lens"].max())
        inputs["max_length_q"] = inputs["max_length_k"] = longest
    if "tree_prefix" in batch:  # documents that share a prefix among several branches
        context = int(batch["tree_context"][0]) if "tree_context" in batch else 0
        device = batch["input_ids"].device
        masks = [
            prefix_tree_mask(int(p), [b for b in bs if b > 0], device)
            for p, bs in zip(
                batch["tree_prefix"].tolist(), batch["tree_branches"].tolist(), strict=True
            )
        ]
        if context:  # a leading context document that every other document also sees
            masks = [None] + [torch.cat([m.new_ones(m.shape[0], context), m], dim=1) for m in masks]
            inputs["doc_context"] = context
        inputs["doc_masks"] = masks
    return inputs


def label_logprobs(
    model: nn.Module, batch: dict[str, torch.Tensor], *, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 log-probabilities of every labelled token of a (padded or packed) batch.

    The head, and the last decoder layer's MLP (:func:`selected_hidden`), run only at the
    positions that predict a label: for SFT rows, where about 45% of positions are labels,
    that skips 1.5% of SmolLM2-135M's backbone FLOPs besides the head's.

    Args:
        model: A causal LM.
        batch: ``input_ids`` and ``labels`` (-100 = not a label), optional ``attention_mask``
            and ``position_ids``.
        temperature: Logits are divided by it.

    Returns:
        ``(logprobs, rows)``: log pi of each label, in row-major order of the label positions,
        and the batch row each label belongs to.

    Shapes:
        input_ids, labels: (B, L); returns (N,), (N,) with N the number of labels.
    """
    labels = batch["labels"][:, 1:]  # (B, L-1): label i+1 is predicted at position i
    select = labels != -100  # (B, L-1)
    targets = labels[select]  # (N,)
    rows, cols = select.nonzero().unbind(1)  # (N,) each, row-major as select's order
    head = fused_head(model)
    if head is None:
        logits = model(**_model_inputs(batch), use_cache=False).logits[:, :-1]  # (B, L-1, V)
        return logits_logprobs(logits[select].float() / temperature, targets), rows
    hidden = selected_hidden(model, _model_inputs(batch), rows, cols)  # (N, H)
    return linear_logprobs(hidden, head.weight, targets, temperature=temperature), rows


def label_hidden(
    model: nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states at the positions that predict the labelled tokens, and the head.

    Row-major order of the label positions, as :func:`label_logprobs` (so two models' outputs
    on one batch line up position by position).

    Returns:
        ``(hidden, weight)``: (N, H) states, and the output head's (V, H) weight.

    Raises:
        ValueError: The model has no plain linear output head.

    Shapes:
        input_ids, labels: (B, L); returns (N, H), (V, H).
    """
    head = fused_head(model)
    if head is None:
        raise ValueError(f"{type(_unwrap(model)).__name__} has no plain linear output head")
    rows, cols = (batch["labels"][:, 1:] != -100).nonzero().unbind(1)  # (N,) each
    return selected_hidden(model, _model_inputs(batch), rows, cols), head.weight


def completion_inputs(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Model inputs of ``cat(prompt, completion)``, position ids counting attended tokens only.

    Column P-1+t of the output predicts completion token t (the state before it is emitted).

    Shapes:
        prompt_ids, prompt_mask: (B, P) left-padded; completion_ids, completion_mask: (B, T)
        right-padded; returns (B, P+T) tensors.
    """
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # (B, L)
    attention = torch.cat([prompt_mask, completion_mask], dim=1).long()  # (B, L)
    position_ids = (attention.cumsum(1) - 1).clamp(min=0)  # (B, L)
    return {"input_ids": input_ids, "attention_mask": attention, "position_ids": position_ids}


def completion_logprobs(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Log pi(y_t | x, y_<t) for every completion position (completion space).

    Runs ``cat(prompt, completion)`` with ``position_ids = cumsum(attention) - 1`` (clamped at
    0), takes the hidden states at columns P-1 .. P+T-2 (those that predict the completion
    tokens), divides the logits by ``temperature`` and returns fp32 log-softmax gathered at the
    completion ids. Positions where ``completion_mask`` is False get 0.

    Shapes:
        prompt_ids, prompt_mask: (B, P), left-padded; completion_ids, completion_mask: (B, T),
        right-padded; returns (B, T) fp32.
    """
    return completion_logprobs_and_hidden(
        model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature=temperature
    )[0]


def completion_logprobs_and_hidden(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    attention: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`completion_logprobs` and the final hidden states it read.

    ``attention`` (B, T) marks the completion tokens the model sees when it differs from
    ``completion_mask``, the tokens scored: a multi-turn row attends to its tool output but
    scores only the policy's tokens.

    Returns:
        (B, T) log-probs and the (N, H) hidden states at the N masked completion positions
        (row-major), or None for a model whose head is not a plain linear layer.
    """
    attend = completion_mask if attention is None else attention
    inputs = completion_inputs(prompt_ids, prompt_mask, completion_ids, attend)
    p = prompt_ids.shape[1]
    select = completion_mask.bool()  # (B, T)
    dtype = torch.promote_types(next(model.parameters()).dtype, torch.float32)
    out = torch.zeros(completion_ids.shape, dtype=dtype, device=completion_ids.device)
    head = fused_head(model)
    if head is None:
        logits = model(**inputs, use_cache=False).logits[:, p - 1 : -1]  # (B, T, V)
        out[select] = logits_logprobs(logits[select].float() / temperature, completion_ids[select])
        return out, None
    hidden = backbone_hidden(model, **inputs)[:, p - 1 : -1][select]  # (N, H)
    out[select] = linear_logprobs(
        hidden, head.weight, completion_ids[select], temperature=temperature
    )
    return out, hidden


def rollout_logprobs(
    model: nn.Module, batch: dict[str, torch.Tensor], *, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of a rollout micro-batch's completion tokens, padded or prefix-tree packed.

    A padded batch (``prompt_ids`` ...) goes through :func:`completion_logprobs_and_hidden`; a
    prefix-tree batch (:func:`rlhfkit.data.rollouts.rollout_tree_batches`) is one packed
    forward whose targets follow the row-major order of ``completion_mask``.

    Returns:
        (B, T) log-probs (0 off the mask) and the (N, H) final hidden states at the N masked
        positions (None for a model whose head is not a plain linear layer).
    """
    mask = batch["completion_mask"].bool()
    if "target_ids" not in batch:
        return completion_logprobs_and_hidden(
            model, batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"], mask,
            temperature=temperature, attention=batch.get("completion_attention"),
        )  # fmt: skip
    rows, cols, targets = batch["target_rows"], batch["target_cols"], batch["target_ids"]
    dtype = torch.promote_types(next(model.parameters()).dtype, torch.float32)
    out = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    head = fused_head(model)
    if head is None:
        logits = model(**_model_inputs(batch), use_cache=False).logits  # (1, L, V)
        out[mask] = logits_logprobs(logits[rows, cols].float() / temperature, targets)
        return out, None
    hidden = backbone_hidden(model, **_model_inputs(batch))[rows, cols]  # (N, H)
    out[mask] = linear_logprobs(hidden, head.weight, targets, temperature=temperature)
    return out, hidden


def target_logprobs(
    model: nn.Module, batch: dict[str, torch.Tensor], *, temperature: float = 1.0
) -> torch.Tensor:
    """fp32 log-probabilities of explicitly placed targets (prefix trees, packed or padded).

    ``target_ids[m]`` is predicted by the hidden state at ``(target_rows[m], target_cols[m])``
    (for a prefix tree the first token of a branch is predicted at the end of the shared
    prefix, not at the previous position of the row). Made by
    :func:`rlhfkit.data.groups.group_batch` and :func:`rlhfkit.data.groups.tree_batch`.

    Shapes:
        target_ids, target_rows, target_cols: (M,); returns (M,).
    """
    rows, cols, targets = batch["target_rows"], batch["target_cols"], batch["target_ids"]
    head = fused_head(model)
    if head is None:
        logits = model(**_model_inputs(batch), use_cache=False).logits  # (B, L, V)
        return logits_logprobs(logits[rows, cols].float() / temperature, targets)
    hidden = backbone_hidden(model, **_model_inputs(batch))  # (B, L, H)
    return linear_logprobs(hidden[rows, cols], head.weight, targets, temperature=temperature)


def sequence_logprobs(
    model: nn.Module, batch: dict[str, torch.Tensor], *, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probability and completion length of every sequence of a batch.

    Shapes:
        returns (S,) fp32 sums (differentiable) and (S,) token counts, S = number of sequences.
    """
    logprobs = target_logprobs(model, batch, temperature=temperature)  # (M,)
    seq = batch["target_seq"]  # (M,)
    count = int(batch["slots"].numel()) if "slots" in batch else int(seq.max()) + 1
    sums = logprobs.new_zeros(count).index_add(0, seq, logprobs)  # (S,)
    tokens = torch.bincount(seq, minlength=count)  # (S,)
    return sums, tokens
