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
    for prompt, completion, logps in zip(
        rollout.prompt_ids, rollout.completion_ids, rollout.logprobs, strict=True
    ):
        full = completion_logprobs(
            model, torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long),
            torch.tensor([completion]), torch.ones(1, len(completion), dtype=torch.long),
            temperature=temperature,
        )[0]  # fmt: skip
        assert logps == pytest.approx(full.tolist(), abs=1e-4)


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
