"""Reference log-probabilities for direct alignment, computed once and cached on disk.

The DPO family compares the policy with a frozen reference pi_ref on fixed (prompt, completion)
pairs, so log pi_ref of every completion is a constant of the dataset. rlhfkit computes it once,
with the model in eval mode before the first update (the starting policy *is* the reference;
with LoRA, the adapter is disabled), stores fp32 sums and token counts, and never holds a second
model while training (docs/methods/direct_alignment.md).

Cache key: a hash of the model's weights (per-parameter name, shape, dtype and fp64 sum and sum
of squares), the token ids of every sequence (which already encode the data, the chat template
and the truncation settings) and the temperature. A changed model, dataset or tokenisation
therefore misses the cache; an identical run reuses it across runs. Files live under
``$RLHFKIT_CACHE/reference/<key>.pt`` (written atomically).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from rlhfkit.data.groups import TokenizedGroup, collate_groups, group_bins
from rlhfkit.models.embedded import cache_root
from rlhfkit.models.forward import sequence_logprobs

log = logging.getLogger(__name__)


def model_fingerprint(model: nn.Module) -> str:
    """A content hash of the trainable and frozen weights (cheap: two reductions per tensor)."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            t = p.detach().double()
            digest.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
            digest.update(f"{float(t.sum()):.10e}{float(t.square().sum()):.10e}".encode())
    return digest.hexdigest()


def reference_key(
    model: nn.Module, groups: Sequence[TokenizedGroup], *, temperature: float = 1.0
) -> str:
    """Cache key of the reference log-probs of ``groups`` under ``model``."""
    digest = hashlib.sha256(model_fingerprint(model).encode())
    digest.update(f"T={temperature}".encode())
    for g in groups:
        for s in g.sequences:
            digest.update(b"|")
            digest.update(torch.tensor(s.input_ids, dtype=torch.int64).numpy().tobytes())
            digest.update(torch.tensor(s.loss_mask, dtype=torch.bool).numpy().tobytes())
    return digest.hexdigest()[:32]


@torch.no_grad()
def compute_reference(
    model: nn.Module,
    groups: Sequence[TokenizedGroup],
    *,
    max_tokens: int,
    packing: bool,
    pad_id: int,
    share_prefix: bool,
    temperature: float = 1.0,
    disable_adapter: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs and token counts of every sequence, in eval mode.

    With a peft model the adapter is disabled (unless ``disable_adapter`` is False), so the
    reference is the base model.

    Shapes:
        returns (G, K) fp32 sums and (G, K) counts (0 where a group has fewer completions).
    """
    k = max(len(g.sequences) for g in groups)
    sums = torch.zeros(len(groups), k)
    tokens = torch.zeros(len(groups), k, dtype=torch.long)
    was_training = model.training
    model.eval()
    disable = getattr(model, "disable_adapter", None) if disable_adapter else None
    device = next(model.parameters()).device
    with disable() if disable is not None else contextlib.nullcontext():
        for index in group_bins(groups, max_tokens=max_tokens, share_prefix=share_prefix):
            batch = collate_groups([groups[i] for i in index], packing, pad_id, share_prefix)
            slots, width = batch["slots"], batch["group_mask"].shape[1]
            batch = {key: v.to(device) for key, v in batch.items()}
            s, n = sequence_logprobs(model, batch, temperature=temperature)
            rows = torch.tensor(index)[slots // width]  # (S,) group of each sequence
            sums[rows, slots % width] = s.float().cpu()
            tokens[rows, slots % width] = n.cpu()
    model.train(was_training)
    return sums, tokens


def cached_reference(
    model: nn.Module,
    groups: Sequence[TokenizedGroup],
    *,
    max_tokens: int,
    packing: bool,
    pad_id: int,
    share_prefix: bool,
    temperature: float = 1.0,
    cache_dir: Path | None = None,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """:func:`compute_reference` through the on-disk cache.

    Returns:
        ``(sums, tokens, hit)``: hit is True when the values came from the cache.
    """
    key = reference_key(model, groups, temperature=temperature)
    path = (cache_dir or cache_root() / "reference") / f"{key}.pt"
    if path.exists():
        stored = torch.load(path, weights_only=True)
        log.info("reference log-probs: cache hit %s", path)
        return stored["sums"], stored["tokens"], True
    sums, tokens = compute_reference(
        model, groups, max_tokens=max_tokens, packing=packing, pad_id=pad_id,
        share_prefix=share_prefix, temperature=temperature,
    )  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({"sums": sums, "tokens": tokens}, tmp)
    tmp.replace(path)
    log.info("reference log-probs: computed %d groups, cached at %s", len(groups), path)
    return sums, tokens, False


@contextlib.contextmanager
def starting_model(model: nn.Module, load: Callable[[], nn.Module]) -> Iterator[nn.Module]:
    """pi_ref as a model, for log-probs of sequences that are not in the cache (fresh samples).

    Under LoRA it is the policy itself with the adapter disabled (no copy). Otherwise ``load``
    builds the starting model again (eval mode) and it is freed on exit, so no reference model
    stays in memory while training.
    """
    disable = getattr(model, "disable_adapter", None)
    if disable is not None:
        with disable():
            yield model
        return
    reference = load()
    try:
        yield reference
    finally:
        del reference
