"""Batched sampling with a KV cache on any Hugging Face causal LM: the always-available Generator.

:class:`Generator` is the protocol every rollout backend implements (a vLLM backend comes later:
it returns the same :class:`rlhfkit.types.Rollout` from token ids). :class:`HFGenerator` runs the
model's own forward with a key/value cache written in place
(:class:`rlhfkit.rollout.kv_cache.PreallocatedCache`):

1. Each distinct prompt is prefilled once (left-padded batch); the cache and the last logits are
   then repeated ``num_samples`` times, so the G samples of a prompt share one prefill. The
   decode steps that follow run through the model's forward, or, for Llama-family models on
   CPU, through :class:`rlhfkit.models.decode.DecodeStep`, which computes the same function
   with far fewer operators (``decode="auto"``, the default).
2. Each step samples one token per live row from softmax(logits / T) after top-k, top-p and
   min-p filtering (greedy when T = 0), and records log pi_sampler of the token: the log-softmax
   of logits / T before filtering (that is what a learner's forward at the same temperature
   computes, and what truncated importance sampling compares against).
3. A row ends at the end-of-sequence id ("eos"), a stop id or stop string ("stop", the token that
   completed it kept), or after ``max_new_tokens`` ("length"). Finished rows leave the batch and
   the cache in bulk (:data:`COMPACT_FRACTION`), and decoding stops when no row is left. The
   entropy of each step's tempered distribution is recorded too (the policy-entropy metric at no
   extra forward).

The per-step work over the vocabulary is one exp pass (:func:`vocab_weights`, weights below
e^-87 of the largest flushed to 0 so that no denormal is ever computed) and a two-level
inverse-CDF draw (:func:`sample_from`), in buffers allocated once per call
(:class:`VocabBuffers`): fresh vocabulary-sized tensors each step cost more in page faults than
the arithmetic done on them.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, Literal, Protocol, runtime_checkable

import torch

from rlhfkit.models.decode import DecodeStep, decode_step
from rlhfkit.rollout.hf import SamplingConfig
from rlhfkit.rollout.kv_cache import PreallocatedCache
from rlhfkit.types import FinishReason, Rollout

DecodeMode = Literal["auto", "model"]
"""How :class:`HFGenerator` runs decode steps (see its ``decode`` argument)."""


@runtime_checkable
class Generator(Protocol):
    """A rollout backend: token-id prompts in, sampled completions with log-probs out."""

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig) -> Rollout:
        """``sampling.num_samples`` completions of every prompt, grouped by prompt."""
        ...


def filter_logits(
    logits: torch.Tensor, *, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0
) -> torch.Tensor:
    """Logits with the tokens outside top-k, the top-p nucleus or the min-p floor set to -inf.

    top-k keeps the k largest; top-p keeps the smallest prefix of the sorted distribution whose
    mass reaches p (the most likely token always stays); min-p keeps tokens with probability at
    least ``min_p`` times the largest probability.

    Shapes:
        logits: (B, V) fp32 (already divided by the temperature); returns (B, V).
    """
    out = logits
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(out, top_k, dim=-1).values[:, -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if min_p > 0:
        probs = torch.softmax(out, dim=-1)
        floor = min_p * probs.max(dim=-1, keepdim=True).values
        out = out.masked_fill(probs < floor, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, dim=-1, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p  # mass before >= p
        drop[:, 0] = False
        out = out.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return out


UNDERFLOW = -87.0
"""Log-ratio to the largest logit below which a token's weight is taken as exactly 0.

exp(-87) = 1.6e-38 is the smallest power of e that fp32 holds as a normal number; below it exp
returns denormals, which x86 vector units handle by microcode assists: on this project's CPU, exp
over a (64, 49152) batch takes 1.3 ms when no output is denormal and 14 ms when a third are
(logit ranges beyond 87 are common, more so at low temperature). Such a token has probability
under 1.6e-38 in any distribution over the vocabulary, so flushing it changes the sampled
distribution by a total variation below V * 1.6e-38."""

BLOCK = 256
"""Vocabulary entries per block of the two-level inverse-CDF draw."""


class VocabBuffers:
    """Vocabulary-sized fp32 and bool buffers reused across the decode steps of one call.

    A fresh (64, 49152) fp32 tensor is 12 MB, which the allocator maps anew each step; its first
    touch then costs about 3,000 page faults, several times the arithmetic done on it (measured:
    870k minor faults per 64 x 64 batch, and the per-step sampling 23-30 ms instead of 9 ms).
    Rows only ever leave the batch, so the first ``rows`` rows of the buffers serve every step.

    Shapes:
        shifted, weights, flushed: (B, V) for the B rows of the first step.
    """

    def __init__(self, rows: int, vocab: int, device: torch.device) -> None:
        self.shifted = torch.empty(rows, vocab, device=device)
        self.weights = torch.empty(rows, vocab, device=device)
        self.flushed = torch.empty(rows, vocab, dtype=torch.bool, device=device)

    def take(self, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The first ``rows`` rows of each buffer (contiguous views)."""
        return self.shifted[:rows], self.weights[:rows], self.flushed[:rows]


def vocab_weights(
    logits: torch.Tensor, temperature: float = 1.0, *, buffers: VocabBuffers | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tempered, unnormalised softmax weights in one exp pass, free of denormals.

    With z = logits / T and w = z - max z, the weight of token v is e_v = exp(w_v), flushed to 0
    where w_v is below :data:`UNDERFLOW` (and for masked, -inf logits); s = sum_v e_v, so
    p_v = e_v / s, log p_v = w_v - log s and logsumexp(z) = max z + log s. Dividing is left to
    the callers: p itself can underflow. ``logits`` is not modified.

    Args:
        logits: Raw logits (any float dtype).
        temperature: T > 0.
        buffers: Reused storage for w, e and the flush mask (fresh tensors if None).

    Shapes:
        logits: (B, V); returns w (B, V) fp32 with the flushed entries set to 0 (so e_v w_v is
        finite everywhere), e (B, V) fp32, s (B, 1) and the flush mask (B, V) bool.
    """
    rows, vocab = logits.shape
    if buffers is None:
        buffers = VocabBuffers(rows, vocab, logits.device)
    shifted, weights, flushed = buffers.take(rows)
    shifted.copy_(logits)
    if temperature != 1.0:
        shifted.div_(temperature)
    shifted.sub_(shifted.amax(dim=-1, keepdim=True))
    torch.lt(shifted, UNDERFLOW, out=flushed)  # also True for -inf
    # where() into its own input: the same values as masked_fill_, in about half the time on
    # a (64, 49152) batch (0.9 against 1.7 ms, AMD EPYC)
    zero = shifted.new_zeros(())
    torch.where(flushed, zero, shifted, out=shifted)
    torch.exp(shifted, out=weights)
    torch.where(flushed, zero, weights, out=weights)
    return shifted, weights, weights.sum(dim=-1, keepdim=True), flushed


def sample_from(weights: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One index per row drawn with probability proportional to ``weights`` (inverse CDF, exact).

    Two levels, so that no pass over the vocabulary is sequential: the weights are summed in
    blocks of :data:`BLOCK`, one uniform u in (0, 1] per row picks the first block whose fp64
    cumulative sum reaches u * total, and the same search inside that block's fp64 cumulative sum
    picks the entry. Both searches take the first position reaching the target, and the target
    inside the block is clamped into (0, block total], so an entry of weight 0 can never be
    drawn. On a (64, 49152) batch this takes about 1 ms where one fp64 cumulative sum over the
    vocabulary takes 14 ms (and ``torch.multinomial``, an exponential variate per entry, about
    30x longer).

    Shapes:
        weights: (B, V) non-negative, each row with positive mass; returns (B,) long.
    """
    rows, vocab = weights.shape
    blocks = -(-vocab // BLOCK)
    if blocks * BLOCK != vocab:
        weights = torch.nn.functional.pad(weights, (0, blocks * BLOCK - vocab))
    grid = weights.view(rows, blocks, BLOCK)
    cumulative = grid.sum(dim=-1).double().cumsum(dim=-1)  # (B, blocks)
    u = 1.0 - torch.rand(rows, 1, generator=generator, dtype=torch.float64)
    target = u.to(weights.device) * cumulative[:, -1:]  # (B, 1) in (0, total]
    block = torch.searchsorted(cumulative, target).clamp_(max=blocks - 1)  # (B, 1)
    before = cumulative.gather(1, (block - 1).clamp(min=0)).masked_fill_(block == 0, 0.0)
    inside = grid[torch.arange(rows, device=weights.device), block[:, 0]].double().cumsum(-1)
    rest = torch.minimum(
        (target - before).clamp(min=torch.finfo(torch.float64).tiny), inside[:, -1:]
    )  # (B, 1) in (0, block total]
    entry = torch.searchsorted(inside, rest).clamp_(max=BLOCK - 1)
    return (block * BLOCK + entry)[:, 0]


MAX_ROWS = 512
"""Most rows (prompts x samples) decoded together; it bounds the key/value cache, which holds
every row's prompt and new tokens (for the embedded model 23 KB per position: 512 rows of 250
positions take 2.9 GB). Measured on the AMX CPU when the cache still grew by concatenation: 8
prompts x 64 samples per batch took 25-30 s per 512 samples and 24 x 64 in one batch 131 s (44 s
per 512); 2 x 64 and 1 x 64 were slower again (38 and 53 s per 512), as small batches leave the
matmuls idle."""


COMPACT_FRACTION = 0.25
"""Finished rows are dropped from the batch and its cache once they are this fraction of it.

Until then they are decoded along (fed padding, their outputs never read): dropping rows copies
the whole cache, so doing it at every step that ends a row cost more than the extra rows'
forward. The live rows' logits, draws and random stream are those of a batch without them."""


class HFGenerator:
    """The batched KV-cache sampler on a Hugging Face model (see the module docstring).

    Args:
        model: A causal LM (any device, any dtype).
        pad_id: Padding id for the prefill batch.
        eos_ids: Ids that end a completion with "eos".
        stop_ids: Further ids that end a completion with "stop".
        tokenizer: Needed only for stop strings (to decode completions).
        decode: ``"auto"`` runs decode steps through :class:`rlhfkit.models.decode.DecodeStep`
            where :func:`rlhfkit.models.decode.decode_step` accepts the model (Llama-family
            layers on CPU) and through the model's forward otherwise; ``"model"`` always
            through the model's forward. The prefill always runs the model's forward.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        pad_id: int,
        eos_ids: Sequence[int],
        stop_ids: Sequence[int] = (),
        tokenizer: Any = None,
        decode: DecodeMode = "auto",
    ) -> None:
        if decode not in ("auto", "model"):
            raise ValueError(f"decode must be 'auto' or 'model', not {decode!r}")
        self.model, self.pad_id, self.decode = model, pad_id, decode
        self.eos_ids, self.stop_ids = set(eos_ids), set(stop_ids)
        self.tokenizer = tokenizer
        # transformers 5 renamed ``past_key_values`` to ``cache`` (the old name warns)
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        # the prefill needs the last position's logits only (skips a (P, W, V) head matmul)
        self._keep_last = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    def _stopped_by_string(self, ids: list[int], stops: Sequence[str]) -> bool:
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        return any(s in text for s in stops)

    def _prefill(
        self, prompts: Sequence[Sequence[int]], g: int, new_tokens: int
    ) -> tuple[PreallocatedCache, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prefill each prompt once, then repeat cache and state ``g`` times.

        The cache has room for the prompts and ``new_tokens`` more positions.

        Shapes:
            returns the cache, last logits (P*G, V) in the model's dtype, attention (P*G, W)
            and the next position of each row (P*G,).
        """
        device = next(self.model.parameters()).device
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):  # left padding
            ids[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
            attention[row, width - len(prompt) :] = 1
        ids, attention = ids.to(device), attention.to(device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        cache = PreallocatedCache(width + new_tokens)
        out = self.model(
            input_ids=ids, attention_mask=attention, position_ids=positions,
            **{self._cache_kw: cache}, **self._keep_last, use_cache=True,
        )  # fmt: skip
        logits = out.logits[:, -1]  # (P, V)
        if g > 1:  # the G samples of a prompt share its prefill
            cache.batch_repeat_interleave(g)
            logits, attention = logits.repeat_interleave(g, 0), attention.repeat_interleave(g, 0)
            positions = positions.repeat_interleave(g, 0)
        return cache, logits, attention, positions[:, -1] + 1

    @staticmethod
    def _sample(
        logits: torch.Tensor,
        sampling: SamplingConfig,
        gen: torch.Generator,
        buffers: VocabBuffers | None = None,
    ) -> tuple[torch.Tensor, list[float], list[float]]:
        """One token per row, its log pi_sampler and the entropy (tempered, before filtering).

        One exp pass serves all three (:func:`vocab_weights`): with w = z - max z, e = exp(w) and
        s = sum e, log p_t = w_t - log s and H = log s - sum_v e_v w_v / s. Filtering only zeroes
        weights, so the filtered draw reuses e. The entropy's product is formed in w's own
        storage, after the draw and the log-probabilities have read w.

        Shapes:
            logits: (B, V) any float dtype; returns (B,) ids, B log-probs and B entropies.
        """
        greedy = sampling.temperature <= 0
        temperature = 1.0 if greedy else sampling.temperature
        shifted, weights, total, flushed = vocab_weights(logits, temperature, buffers=buffers)
        log_total = total.log()  # (B, 1)
        if greedy:
            tokens = logits.argmax(dim=-1)
        elif sampling.top_k or sampling.top_p < 1.0 or sampling.min_p > 0:
            filtered = filter_logits(
                shifted.masked_fill(flushed, float("-inf")),
                top_k=sampling.top_k, top_p=sampling.top_p, min_p=sampling.min_p,
            )  # fmt: skip
            tokens = sample_from(weights.masked_fill(filtered == float("-inf"), 0.0), gen)
        else:
            tokens = sample_from(weights, gen)
        # a drawn token has weight > 0, so its w was not flushed (the argmax has w = 0)
        logprobs = shifted.gather(1, tokens[:, None])[:, 0] - log_total[:, 0]
        # last, as the product e * w overwrites w: a (B, V) temporary would be a fresh 12 MB a
        # step, whose page faults made the entropy 3.3 ms of a 94 ms step (64 x 49152, AMD EPYC)
        entropy = log_total[:, 0] - shifted.mul_(weights).sum(dim=-1) / total[:, 0]
        return tokens, logprobs.tolist(), entropy.tolist()

    def _finish_reason(self, ids: list[int], stops: Sequence[str]) -> str | None:
        """Why the completion ``ids`` ends after its last token, or None if it goes on."""
        if ids[-1] in self.eos_ids:
            return "eos"
        if ids[-1] in self.stop_ids or (stops and self._stopped_by_string(ids, stops)):
            return "stop"
        return None

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig) -> Rollout:
        """Sample ``num_samples`` completions per prompt; rows are grouped by prompt.

        At most :data:`MAX_ROWS` rows decode together: more prompts are sampled in turn, whole
        prompts per batch, continuing one random stream.
        """
        stops, g = tuple(sampling.stop), sampling.num_samples
        if stops and self.tokenizer is None:
            raise ValueError("stop strings need the tokenizer (HFGenerator(tokenizer=...))")
        if sampling.temperature <= 0 and g > 1:
            raise ValueError("greedy decoding gives identical samples: use num_samples 1 or T > 0")
        was_training = self.model.training
        self.model.eval()
        gen = torch.Generator(device="cpu").manual_seed(sampling.seed)
        step = max(1, MAX_ROWS // g)  # prompts per batch
        parts = [self._decode(prompts[i : i + step], sampling, gen)
                 for i in range(0, len(prompts), step)]  # fmt: skip
        self.model.train(was_training)
        completions, logprobs, reasons, entropies = (
            [row for part in parts for row in part[k]] for k in range(4)
        )
        return Rollout.grouped(prompts, g, completions, logprobs, reasons, entropies)

    def _decode(
        self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, gen: torch.Generator
    ) -> tuple[list[list[int]], list[list[float]], list[FinishReason], list[list[float]]]:
        """One batch: completions, their log-probabilities, finish reasons and entropies."""
        stops, g = tuple(sampling.stop), sampling.num_samples
        cache, logits, attention, next_pos = self._prefill(prompts, g, sampling.max_new_tokens)
        fast = decode_step(self.model, rows=len(logits)) if self.decode == "auto" else None
        forward = (
            _ModelSteps(self.model, self._cache_kw, attention)
            if fast is None
            else _FusedSteps(fast, attention, cache)
        )
        n = len(prompts) * g
        buffers = VocabBuffers(n, logits.shape[-1], logits.device)
        batch = n  # rows in the batch, finished ones included
        live = torch.arange(n)  # global rows still decoding
        alive = torch.arange(n, device=logits.device)  # their positions in the batch
        completions: list[list[int]] = [[] for _ in range(n)]
        logprobs: list[list[float]] = [[] for _ in range(n)]
        entropies: list[list[float]] = [[] for _ in range(n)]
        reasons: list[FinishReason] = ["length"] * n
        for step in range(sampling.max_new_tokens):
            if len(alive) < batch:  # finished rows stay in the batch until the next compaction
                logits = logits.index_select(0, alive)
            tokens, chosen, entropy = self._sample(logits, sampling, gen, buffers)
            keep = []
            for b, (row, token, lp, h) in enumerate(
                zip(live.tolist(), tokens.tolist(), chosen, entropy, strict=True)
            ):
                completions[row].append(token)
                logprobs[row].append(lp)
                entropies[row].append(h)
                reason = self._finish_reason(completions[row], stops)
                if reason is None:
                    keep.append(b)
                else:
                    reasons[row] = reason
            if not keep or step == sampling.max_new_tokens - 1:
                break
            if len(keep) < len(live):
                index = torch.tensor(keep, device=alive.device)  # tokens live there too
                live, tokens, alive = live[index.cpu()], tokens[index], alive[index]
            if len(alive) <= (1 - COMPACT_FRACTION) * batch:  # drop finished rows at last
                cache.batch_select_indices(alive)
                forward.select(alive)
                next_pos = next_pos[alive]
                batch, alive = len(live), torch.arange(len(live), device=alive.device)
            step_tokens = tokens
            if len(alive) < batch:  # finished rows are fed padding, their outputs ignored
                step_tokens = tokens.new_full((batch,), self.pad_id).index_copy_(0, alive, tokens)
            logits, next_pos = forward(step_tokens, next_pos, cache), next_pos + 1
        return completions, logprobs, reasons, entropies


class _ModelSteps:
    """Decode steps through the model's own forward; it keeps the attention mask it needs.

    Shapes:
        attention: (B, W) 0/1, one column more per step.
    """

    def __init__(self, model: torch.nn.Module, cache_kw: str, attention: torch.Tensor) -> None:
        self.model, self.cache_kw, self.attention = model, cache_kw, attention

    def select(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` of the batch."""
        self.attention = self.attention[rows]

    def __call__(
        self, tokens: torch.Tensor, positions: torch.Tensor, cache: PreallocatedCache
    ) -> torch.Tensor:
        """Logits (B, V) after feeding ``tokens`` (B,) at ``positions`` (B,)."""
        attention = self.attention
        self.attention = torch.cat([attention, attention.new_ones(len(attention), 1)], dim=1)
        out = self.model(
            input_ids=tokens[:, None], attention_mask=self.attention,
            position_ids=positions[:, None], **{self.cache_kw: cache}, use_cache=True,
        )  # fmt: skip
        return out.logits[:, -1]


class _FusedSteps:
    """Decode steps through :class:`DecodeStep`, attending over the cache's whole buffers.

    The cache was sized for the prompt and every new token (:meth:`HFGenerator._prefill`), and
    the last token sampled is never fed, so the buffers never grow while decoding.

    Shapes:
        mask: (B, C) bool over the buffer positions: the prompt's attention, then True for
        every position fed since (finished rows too, as the model's path does).
    """

    def __init__(self, step: DecodeStep, attention: torch.Tensor, cache: PreallocatedCache) -> None:
        self.step = step
        capacity = cache.buffers()[0][0].shape[2]
        self.mask = attention.new_zeros(len(attention), capacity, dtype=torch.bool)
        self.mask[:, : attention.shape[1]] = attention.bool()

    def select(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` of the batch."""
        self.mask = self.mask[rows]

    def __call__(
        self, tokens: torch.Tensor, positions: torch.Tensor, cache: PreallocatedCache
    ) -> torch.Tensor:
        """Logits (B, V) after feeding ``tokens`` (B,) at ``positions`` (B,)."""
        length = cache.get_seq_length()
        keys, values = cache.buffers()
        self.mask[:, length] = True
        logits = self.step(tokens, positions, self.mask, keys, values, length)
        cache.advance(1)
        return logits


def chat_generator(model: torch.nn.Module, tokenizer: Any) -> HFGenerator:
    """The :class:`HFGenerator` every command samples a chat model with.

    Rows are padded with the tokenizer's pad id, a completion ends at its ``eos_token`` (the
    chat template's end-of-turn marker) and the tokenizer decodes for stop strings.

    Args:
        model: A causal LM (any device, any dtype).
        tokenizer: Its tokenizer (with a pad token; see :func:`rlhfkit.models.load.load_tokenizer`).
    """
    return HFGenerator(
        model, pad_id=int(tokenizer.pad_token_id), eos_ids=[tokenizer.eos_token_id],
        tokenizer=tokenizer,
    )  # fmt: skip
