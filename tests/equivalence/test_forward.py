"""Model forward to log-probs (completion space) against naive references on the tiny model.

- ``completion_logprobs`` equals a per-token loop: for each t, run the model on the unpadded
  ``prompt + completion[:t]`` and take ``log_softmax(last logit / tau)[completion[t]]``. This
  reference needs no shift, no padding, no position ids and no mask, so it checks all of them.
- ``label_logprobs`` equals full-logits log-softmax for a padded batch, and per-document forwards
  for a packed batch.
- The fused head (chunked ``linear_logprobs``) and the fallback (the model's own logits) agree in
  values and parameter gradients.

The model is initialised with a larger ``initializer_range`` than the default so that its
distributions are far from uniform (log-probs spread over several nats): an off-by-one position
or a forgotten temperature then changes values by far more than the tolerance.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rlhfkit.models.forward as forward
from rlhfkit.data.collate import packed_batch, pad_batch
from rlhfkit.models.forward import completion_logprobs, label_logprobs
from rlhfkit.models.tiny import tiny_model
from rlhfkit.types import TokenizedExample

ATOL = 2e-5  # log-probs are fp32 (several nats in magnitude): a few fp32 ulps


@pytest.fixture(scope="module")
def model():
    m = tiny_model(initializer_range=0.2)
    m.eval()
    return m


def random_seqs(lengths, vocab, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen) for n in lengths]


def rl_batch(prompts, completions, *, extra_prompt=0, extra_completion=0, pad=None, seed=0):
    """Left-padded prompts and right-padded completions. ``pad=None`` fills padding with random
    token ids, which must not matter."""
    p = max(len(x) for x in prompts) + extra_prompt
    t = max(len(y) for y in completions) + extra_completion
    b = len(prompts)
    gen = torch.Generator().manual_seed(seed + 1000)
    if pad is None:
        prompt_ids = torch.randint(0, 300, (b, p), generator=gen)
        completion_ids = torch.randint(0, 300, (b, t), generator=gen)
    else:
        prompt_ids = torch.full((b, p), pad)
        completion_ids = torch.full((b, t), pad)
    prompt_mask = torch.zeros(b, p, dtype=torch.long)
    completion_mask = torch.zeros(b, t, dtype=torch.bool)
    for i, (x, y) in enumerate(zip(prompts, completions, strict=True)):
        prompt_ids[i, p - len(x) :] = x
        prompt_mask[i, p - len(x) :] = 1
        completion_ids[i, : len(y)] = y
        completion_mask[i, : len(y)] = True
    return prompt_ids, prompt_mask, completion_ids, completion_mask


@torch.no_grad()
def per_token_loop(model, prompts, completions, temperature=1.0):
    """Reference: one unpadded forward per completion token."""
    out = []
    for x, y in zip(prompts, completions, strict=True):
        row = []
        for t in range(len(y)):
            ids = torch.cat([x, y[:t]])[None]  # (1, |x| + t)
            last = model(input_ids=ids, use_cache=False).logits[0, -1].double() / temperature
            row.append(torch.log_softmax(last, -1)[y[t]].item())
        out.append(row)
    return out


def assert_matches_loop(out, mask, expected):
    assert out.dtype == torch.float32
    for b, row in enumerate(expected):
        assert int(mask[b].sum()) == len(row)
        torch.testing.assert_close(
            out[b, : len(row)].double(), torch.tensor(row, dtype=torch.float64), atol=ATOL, rtol=0
        )
        assert (out[b, len(row) :] == 0).all()  # masked positions are exactly 0


PROMPT_LENS = (3, 5, 1, 4)
COMPLETION_LENS = (4, 1, 6, 3)


@pytest.fixture(scope="module")
def seqs(model):
    vocab = model.config.vocab_size
    return random_seqs(PROMPT_LENS, vocab, 1), random_seqs(COMPLETION_LENS, vocab, 2)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "fallback"])
def test_completion_logprobs_equals_per_token_loop(model, seqs, temperature, fused, monkeypatch):
    if not fused:
        monkeypatch.setattr(forward, "fused_head", lambda m: None)
    else:
        assert forward.fused_head(model) is model.lm_head
    prompts, completions = seqs
    with torch.no_grad():
        out = completion_logprobs(model, *rl_batch(prompts, completions), temperature=temperature)
    expected = per_token_loop(model, prompts, completions, temperature)
    assert_matches_loop(out, rl_batch(prompts, completions)[3], expected)


def test_temperature_divides_logits(model, seqs):
    """tau != 1 really changes the values (so the test above can tell a forgotten division)."""
    prompts, completions = seqs
    batch = rl_batch(prompts, completions)
    with torch.no_grad():
        plain = completion_logprobs(model, *batch)
        hot = completion_logprobs(model, *batch, temperature=0.6)
    mask = batch[3]
    assert (plain[mask] - hot[mask]).abs().max() > 0.05
    expected = per_token_loop(model, prompts, completions, 1.0)
    with pytest.raises(AssertionError):
        assert_matches_loop(hot, mask, expected)


def test_single_token_completions(model):
    """T = 1: the log-prob of each completion's only token comes from the prompt's last state."""
    vocab = model.config.vocab_size
    prompts = random_seqs((2, 6, 4), vocab, 3)
    completions = random_seqs((1, 1, 1), vocab, 4)
    batch = rl_batch(prompts, completions, extra_prompt=2)
    with torch.no_grad():
        out = completion_logprobs(model, *batch)
    assert out.shape == (3, 1)
    assert_matches_loop(out, batch[3], per_token_loop(model, prompts, completions))


@pytest.mark.parametrize(("extra_prompt", "extra_completion"), [(0, 0), (3, 0), (0, 4), (5, 2)])
@pytest.mark.parametrize("pad", [None, 0])
def test_padding_invariance(model, seqs, extra_prompt, extra_completion, pad):
    prompts, completions = seqs
    base_batch = rl_batch(prompts, completions, pad=0)
    batch = rl_batch(prompts, completions, extra_prompt=extra_prompt,
                     extra_completion=extra_completion, pad=pad, seed=extra_prompt)  # fmt: skip
    with torch.no_grad():
        base = completion_logprobs(model, *base_batch)
        out = completion_logprobs(model, *batch)
    t = base.shape[1]
    assert out.shape[1] == t + extra_completion
    torch.testing.assert_close(out[:, :t], base, atol=ATOL, rtol=0)
    assert (out[:, t:] == 0).all()


@settings(max_examples=12, deadline=None)
@given(
    prompt_lens=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    extra_prompt=st.integers(0, 3),
    extra_completion=st.integers(0, 3),
    seed=st.integers(0, 1000),
)
def test_property_each_row_is_independent_of_its_batch(
    model, prompt_lens, extra_prompt, extra_completion, seed
):
    """A row's log-probs equal those of that row run alone, unpadded, whatever else is batched."""
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    completion_lens = [int(n) for n in torch.randint(1, 5, (len(prompt_lens),), generator=gen)]
    prompts = random_seqs(prompt_lens, vocab, seed)
    completions = random_seqs(completion_lens, vocab, seed + 1)
    batch = rl_batch(prompts, completions, extra_prompt=extra_prompt,
                     extra_completion=extra_completion, seed=seed)  # fmt: skip
    with torch.no_grad():
        out = completion_logprobs(model, *batch)
        for b, (x, y) in enumerate(zip(prompts, completions, strict=True)):
            alone = completion_logprobs(
                model, x[None], torch.ones(1, len(x)), y[None], torch.ones(1, len(y), dtype=bool)
            )
            torch.testing.assert_close(out[b, : len(y)], alone[0], atol=ATOL, rtol=0)


def param_grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params)


def test_fused_and_fallback_gradients_agree(seqs, monkeypatch):
    """The chunked op's custom backward, through the tied head and the backbone, equals autograd
    through the model's own logits."""
    model = tiny_model(initializer_range=0.2)
    prompts, completions = seqs
    batch = rl_batch(prompts, completions, extra_prompt=1, extra_completion=1)
    weights = torch.randn(batch[2].shape, generator=torch.Generator().manual_seed(9))

    def run():
        out = completion_logprobs(model, *batch, temperature=0.8)
        return out, param_grads(model, (out * weights).sum())

    fused_out, fused_grads = run()
    monkeypatch.setattr(forward, "fused_head", lambda m: None)
    ref_out, ref_grads = run()
    torch.testing.assert_close(fused_out, ref_out, atol=ATOL, rtol=0)
    for g, r in zip(fused_grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=2e-5, rtol=1e-4)


# ---------------------------------------------------------------- label_logprobs


def examples(vocab: int) -> list[TokenizedExample]:
    gen = torch.Generator().manual_seed(5)
    spec = [(7, 3), (4, 2), (10, 6), (5, 1)]  # (length, leading unlabelled tokens)
    out = []
    for n, prompt in spec:
        ids = torch.randint(3, vocab, (n,), generator=gen).tolist()
        out.append(TokenizedExample(ids, [i >= prompt for i in range(n)]))
    return out


def full_logits_reference(model, batch, temperature=1.0):
    """Row-major log pi of every label from the model's full logits."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    logits = model(**inputs, use_cache=False).logits[:, :-1].double() / temperature
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    lp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return lp[keep], keep.nonzero()[:, 0]


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "fallback"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("side", ["right", "left"])
def test_label_logprobs_padded(model, fused, temperature, side, monkeypatch):
    if not fused:
        monkeypatch.setattr(forward, "fused_head", lambda m: None)
    batch = pad_batch(examples(model.config.vocab_size), pad_id=0, side=side)
    with torch.no_grad():
        lp, rows = label_logprobs(model, batch, temperature=temperature)
        ref, ref_rows = full_logits_reference(model, batch, temperature)
    # Label counts by hand: lengths 7, 4, 10, 5 with 3, 2, 6, 1 leading unlabelled
    # tokens give 4, 2, 4 and 4 labels.
    assert rows.tolist() == [0] * 4 + [1] * 2 + [2] * 4 + [3] * 4
    assert torch.equal(rows, ref_rows) and lp.dtype == torch.float32
    torch.testing.assert_close(lp.double(), ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "fallback"])
def test_label_logprobs_packed_equals_per_document(model, fused, monkeypatch):
    if not fused:
        monkeypatch.setattr(forward, "fused_head", lambda m: None)
    docs = examples(model.config.vocab_size)
    with torch.no_grad():
        lp, rows = label_logprobs(model, packed_batch(docs))
        singles = [
            full_logits_reference(model, pad_batch([d], pad_id=0))[0] for d in docs
        ]  # fmt: skip
    assert (rows == 0).all()
    torch.testing.assert_close(lp.double(), torch.cat(singles), atol=ATOL, rtol=0)


def test_label_logprobs_gradients_fused_vs_fallback(monkeypatch):
    model = tiny_model(initializer_range=0.2)
    batch = pad_batch(examples(model.config.vocab_size), pad_id=0)
    lp, _ = label_logprobs(model, batch)
    fused = param_grads(model, lp.sum())
    monkeypatch.setattr(forward, "fused_head", lambda m: None)
    lp2, _ = label_logprobs(model, batch)
    fallback = param_grads(model, lp2.sum())
    for g, r in zip(fused, fallback, strict=True):
        torch.testing.assert_close(g, r, atol=2e-5, rtol=1e-4)
