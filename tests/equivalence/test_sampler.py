"""The KV-cache rollout sampler against transformers ``generate`` and a full forward pass.

- Greedy completions equal ``generate``'s greedy output token for token.
- The recorded sampler log-probs equal the log-probs a full forward pass (at the same
  temperature) gives the sampled tokens.
- The G samples of a prompt share one prefill; finished rows stop; finish reasons are right.
"""

from __future__ import annotations

import pytest
import torch

from rlhfkit.models.forward import completion_logprobs
from rlhfkit.models.load import load_model, load_tokenizer
from rlhfkit.rollout.hf import SamplingConfig
from rlhfkit.rollout.sampler import Generator, HFGenerator, filter_logits

PROMPTS = [[5, 17, 33, 8], [40, 2], [9, 9, 12, 60, 71, 3, 44]]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(str(tiny_model_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


def _generator(model, tokenizer, **kw) -> HFGenerator:
    return HFGenerator(model, pad_id=0, eos_ids=[tokenizer.eos_token_id], tokenizer=tokenizer, **kw)


def test_protocol(model, tokenizer):
    assert isinstance(_generator(model, tokenizer), Generator)


def test_greedy_equals_transformers_generate(model, tokenizer):
    sampling = SamplingConfig(max_new_tokens=12, temperature=0.0)
    rollout = _generator(model, tokenizer).generate(PROMPTS, sampling)
    for prompt, completion, reason in zip(
        PROMPTS, rollout.completion_ids, rollout.finish_reasons, strict=True
    ):
        ids = torch.tensor([prompt])
        ref = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=0,
        )[0, len(prompt):].tolist()  # fmt: skip
        if tokenizer.eos_token_id in ref:
            ref = ref[: ref.index(tokenizer.eos_token_id) + 1]
        assert completion == ref
        assert reason == ("eos" if completion[-1] == tokenizer.eos_token_id else "length")


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprobs_equal_full_forward(model, tokenizer, temperature):
    sampling = SamplingConfig(
        max_new_tokens=10, temperature=temperature, num_samples=3, seed=3, top_k=20
    )
    rollout = _generator(model, tokenizer).generate(PROMPTS, sampling)
    assert len(rollout) == 9 and rollout.prompt_index == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for prompt, completion, logprobs in zip(
        rollout.prompt_ids, rollout.completion_ids, rollout.logprobs, strict=True
    ):
        full = completion_logprobs(
            model, torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long),
            torch.tensor([completion]), torch.ones(1, len(completion), dtype=torch.long),
            temperature=temperature,
        )[0]  # fmt: skip
        assert logprobs == pytest.approx(full.tolist(), abs=1e-4)


def test_samples_share_one_prefill_and_finished_rows_leave_the_batch(model, tokenizer):
    batch_sizes = []
    handle = model.register_forward_pre_hook(
        lambda m, args, kwargs: batch_sizes.append(tuple(kwargs["input_ids"].shape)),
        with_kwargs=True,
    )
    try:
        first = _generator(model, tokenizer).generate(
            PROMPTS, SamplingConfig(max_new_tokens=6, num_samples=4, seed=1)
        )
    finally:
        handle.remove()
    assert batch_sizes[0] == (3, 7)  # one prefill row per distinct prompt
    assert all(shape[1] == 1 for shape in batch_sizes[1:])
    assert len(batch_sizes) <= 6
    stop_after = first.completion_ids[0][1]  # a token that appears in some sample
    rollout = _generator(model, tokenizer, stop_ids=[stop_after]).generate(
        PROMPTS, SamplingConfig(max_new_tokens=6, num_samples=4, seed=1)
    )
    assert rollout.completion_ids[0] == first.completion_ids[0][:2]
    assert rollout.finish_reasons[0] == "stop"
    for ids, reason in zip(rollout.completion_ids, rollout.finish_reasons, strict=True):
        assert (reason == "length") == (
            len(ids) == 6 and stop_after not in ids and tokenizer.eos_token_id not in ids
        )


def test_at_most_max_rows_decode_together(model, tokenizer, monkeypatch):
    """Beyond MAX_ROWS rows, whole prompts are sampled in turn; greedy results do not change,
    samples keep their prompt order and log-probabilities."""
    from rlhfkit.rollout import sampler

    def run(sampling):
        prefills = []
        handle = model.register_forward_pre_hook(
            lambda m, args, kwargs: prefills.append(kwargs["input_ids"].shape[0])
            if kwargs["input_ids"].shape[1] > 1 else None,
            with_kwargs=True,
        )  # fmt: skip
        try:
            return _generator(model, tokenizer).generate(PROMPTS, sampling), prefills
        finally:
            handle.remove()

    greedy = SamplingConfig(max_new_tokens=8, temperature=0.0)
    whole, prefills = run(greedy)
    assert prefills == [3]
    monkeypatch.setattr(sampler, "MAX_ROWS", 1)
    split, prefills = run(greedy)
    assert prefills == [1, 1, 1]  # one prompt per batch
    assert split.completion_ids == whole.completion_ids
    assert split.finish_reasons == whole.finish_reasons
    monkeypatch.setattr(sampler, "MAX_ROWS", 5)  # two prompts x 2 samples fit, not three
    sampled, prefills = run(SamplingConfig(max_new_tokens=6, num_samples=2, seed=4))
    assert prefills == [2, 1]
    assert sampled.prompt_index == [0, 0, 1, 1, 2, 2]
    assert [len(lp) for lp in sampled.logprobs] == [len(c) for c in sampled.completion_ids]
    assert all(p == PROMPTS[i // 2] for i, p in enumerate(sampled.prompt_ids))


def test_stop_strings_end_at_the_completing_token(model, tokenizer):
    greedy = _generator(model, tokenizer).generate(
        PROMPTS[:1], SamplingConfig(max_new_tokens=8, temperature=0.0)
    )
    ids = greedy.completion_ids[0]
    text = tokenizer.decode(ids[:3])
    target = text[-2:] if len(text) >= 2 else text
    rollout = _generator(model, tokenizer).generate(
        PROMPTS[:1], SamplingConfig(max_new_tokens=8, temperature=0.0, stop=(target,))
    )
    got = rollout.completion_ids[0]
    assert rollout.finish_reasons[0] == "stop"
    assert target in tokenizer.decode(got) and target not in tokenizer.decode(got[:-1])
    assert got == ids[: len(got)]


def test_filter_logits():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    inf = float("-inf")
    assert filter_logits(logits, top_k=2).isinf().tolist() == [[False, False, True, True]]
    assert filter_logits(logits, top_p=0.8).isinf().tolist() == [[False, False, True, True]]
    assert filter_logits(logits, top_p=0.81).isinf().tolist() == [[False, False, False, True]]
    assert filter_logits(logits, min_p=0.2).isinf().tolist() == [[False, False, False, True]]
    assert filter_logits(logits, top_p=0.1)[0, 0] != inf  # the most likely token always stays
    top1 = _generator_free_sample(logits)
    assert top1 == 0


def _generator_free_sample(logits: torch.Tensor) -> int:
    probs = torch.softmax(filter_logits(logits, top_k=1), -1)
    return int(torch.multinomial(probs, 1)[0, 0])


def test_greedy_with_several_samples_is_refused(model, tokenizer):
    with pytest.raises(ValueError, match="greedy"):
        _generator(model, tokenizer).generate(
            PROMPTS, SamplingConfig(temperature=0.0, num_samples=2)
        )


def test_inverse_cdf_sampling_matches_the_distribution():
    """Frequencies of 200k draws are within 5 standard errors of the probabilities; a
    zero-probability entry is never drawn."""
    from rlhfkit.rollout.sampler import sample_from

    probs = torch.tensor([0.5, 0.0, 0.3, 0.15, 0.05]).repeat(200_000, 1)
    draws = sample_from(probs, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=5).double() / len(draws)
    p = probs[0].double()
    stderr = (p * (1 - p) / len(draws)).sqrt()
    assert freq[1] == 0
    assert ((freq - p).abs() <= 5 * stderr + 1e-12).all()


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_vocab_weights_are_the_tempered_softmax(temperature):
    """e / s = softmax(z / T), w - log s = log_softmax, log s - sum e w / s = the entropy; the
    logits are left as they were, buffers give the same values, and weights below
    exp(UNDERFLOW) relative to the largest are exactly 0 (never denormal)."""
    from rlhfkit.rollout.sampler import UNDERFLOW, VocabBuffers, vocab_weights

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 700, generator=gen) * 30  # ranges well beyond 87 / T
    logits[2, 10] = float("-inf")  # a masked logit
    before = logits.clone()
    shifted, weights, total, flushed = vocab_weights(logits, temperature)
    assert torch.equal(logits, before)
    z = (logits / temperature).double()
    ref = torch.softmax(z, -1)
    torch.testing.assert_close((weights / total).double(), ref, atol=1e-7, rtol=1e-5)
    keep = ~flushed
    torch.testing.assert_close(
        (shifted - total.log())[keep].double(), torch.log_softmax(z, -1)[keep], atol=2e-5, rtol=0
    )
    entropy = -(ref * torch.log_softmax(z, -1)).nan_to_num().sum(-1)
    mine = total.log()[:, 0] - torch.linalg.vecdot(weights, shifted) / total[:, 0]
    torch.testing.assert_close(mine.double(), entropy, atol=1e-5, rtol=0)
    assert flushed.any() and flushed[2, 10]
    assert torch.equal(flushed, z - z.amax(-1, keepdim=True) < UNDERFLOW)
    assert (weights[flushed] == 0).all() and (weights[keep] >= 1.1754944e-38).all()
    buffers = VocabBuffers(8, 700, logits.device)
    again = vocab_weights(logits, temperature, buffers=buffers)
    for a, b in zip(again, (shifted, weights, total, flushed), strict=True):
        assert torch.equal(a, b)
    assert again[1].data_ptr() == buffers.weights.data_ptr()  # written in place


def test_two_level_draw_over_several_blocks():
    """A vocabulary of 3 blocks and a remainder: frequencies within 5 standard errors of the
    weights (unnormalised), zero weights never drawn, also at block edges and in the padded
    tail; the same seed gives the same draws."""
    from rlhfkit.rollout.sampler import BLOCK, sample_from

    vocab = 3 * BLOCK + 37
    weights = torch.zeros(vocab)
    support = {0: 2.0, BLOCK - 1: 1.0, BLOCK: 3.0, 2 * BLOCK + 5: 0.5, vocab - 1: 1.5}
    for index, w in support.items():
        weights[index] = w
    rows = weights.repeat(100_000, 1)
    draws = sample_from(rows, torch.Generator().manual_seed(1))
    counts = torch.bincount(draws, minlength=vocab).double()
    assert set(counts.nonzero()[:, 0].tolist()) == set(support)
    p = weights.double() / weights.sum()
    freq = counts / len(draws)
    stderr = (p * (1 - p) / len(draws)).sqrt()
    assert ((freq - p).abs() <= 5 * stderr + 1e-12).all()
    assert torch.equal(draws, sample_from(rows, torch.Generator().manual_seed(1)))


def test_sampled_logprobs_and_entropy_are_unfiltered_at_every_filter():
    """The recorded log-prob and entropy are those of softmax(z / T) before filtering; the
    filtered draw stays inside the kept set."""
    gen = torch.Generator().manual_seed(2)
    logits = (torch.randn(6, 300, generator=gen) * 4).to(torch.bfloat16)
    z = logits.double() / 0.8
    logp_all = torch.log_softmax(z, -1)
    for kw in ({}, {"top_k": 5}, {"top_p": 0.5}, {"min_p": 0.2}):
        sampling = SamplingConfig(temperature=0.8, seed=0, **kw)
        tokens, logprobs, entropies = HFGenerator._sample(logits, sampling, gen)
        expected = logp_all.gather(1, tokens[:, None])[:, 0]
        assert logprobs == pytest.approx(expected.tolist(), abs=1e-5)
        ent = -(logp_all.exp() * logp_all).sum(-1)
        assert entropies == pytest.approx(ent.tolist(), abs=1e-5)
        kept = ~filter_logits(z.float(), **kw).isinf()
        assert kept.gather(1, tokens[:, None]).all()


@pytest.mark.parametrize("fraction", [1e-9, 0.25, 1.0])
def test_finished_rows_leave_in_bulk_without_changing_a_sample(
    model, tokenizer, monkeypatch, fraction
):
    """Dropping finished rows at once (1e-9), in bulk (0.25) or never (1.0) gives the same
    completions, finish reasons and log-probs, and the log-probs are a full forward's."""
    from rlhfkit.rollout import sampler

    sampling = SamplingConfig(max_new_tokens=9, num_samples=4, seed=2)
    stop = list(range(1, len(tokenizer), 6))  # a sixth of the ids: rows end at many steps
    monkeypatch.setattr(sampler, "COMPACT_FRACTION", 1e-9)
    at_once = _generator(model, tokenizer, stop_ids=stop).generate(PROMPTS, sampling)
    ends = {
        len(ids)
        for ids, r in zip(at_once.completion_ids, at_once.finish_reasons, strict=True)
        if r == "stop"
    }
    assert len(ends) >= 3  # the rows finished at different steps
    monkeypatch.setattr(sampler, "COMPACT_FRACTION", fraction)
    rows = []
    handle = model.register_forward_pre_hook(
        lambda m, args, kwargs: rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        rollout = _generator(model, tokenizer, stop_ids=stop).generate(PROMPTS, sampling)
    finally:
        handle.remove()
    if fraction == 1.0:
        assert rows[1:] == [12] * (len(rows) - 1)  # every decode step carries all 12 rows
    assert rollout.completion_ids == at_once.completion_ids
    assert rollout.finish_reasons == at_once.finish_reasons
    for got, want in zip(rollout.logprobs, at_once.logprobs, strict=True):
        assert got == pytest.approx(want, abs=1e-5)
    for prompt, completion, logprobs in zip(
        rollout.prompt_ids, rollout.completion_ids, rollout.logprobs, strict=True
    ):
        full = completion_logprobs(
            model, torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long),
            torch.tensor([completion]), torch.ones(1, len(completion), dtype=torch.long),
            temperature=sampling.temperature,
        )[0]  # fmt: skip
        assert logprobs == pytest.approx(full.tolist(), abs=1e-4)
