"""Log-likelihood multiple-choice scoring on the tiny random model."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhfkit.data.templates import render_prompt
from rlhfkit.eval.loglik import (
    argmax_first,
    mc_accuracy,
    option_logprobs,
    pick_option,
    prompt_text,
    split_option_ids,
)
from rlhfkit.models.tiny import tiny_tokenizer

TRANSLATE = [{"role": "user", "content": "Translate hello to French:"}]
REVERSE = [{"role": "user", "content": "Reverse the word cat:"}]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    # Two OpenMP threads on the two shared cores make training steps ~100x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def brute_force(model, prompt_ids: list[int], option_ids: list[int]) -> float:
    """Sum of log-softmax at the option tokens, one unpadded full forward of one sequence."""
    ids = torch.tensor([prompt_ids + option_ids])
    with torch.no_grad():
        logprobs = model(input_ids=ids).logits[0].double().log_softmax(-1)  # (L, V)
    p = len(prompt_ids)
    return sum(float(logprobs[p - 1 + t, y]) for t, y in enumerate(option_ids))


def separate_ids(tok, prompt, option: str) -> tuple[list[int], list[int]]:
    """Prompt and option tokenised separately (equal to the joint split for these cases)."""
    plain = isinstance(prompt, str)
    prompt_ids = tok(prompt)["input_ids"] if plain else render_prompt(tok, prompt)
    return prompt_ids, tok(option, add_special_tokens=False)["input_ids"]


OPTIONS = ["bonjour", "hello", "The quick brown fox jumps", "red, green, blue"]


@pytest.mark.parametrize(
    ("prompt", "options"),
    [
        (TRANSLATE, OPTIONS),
        (REVERSE, ["tac", "cat", "t"]),
        ("Reverse the word cat:", [" tac", " cat", " the lazy dog."]),
    ],
)
def test_matches_brute_force_per_option(model, tok, prompt, options):
    scores = option_logprobs(model, tok, prompt, options)
    normalised = option_logprobs(model, tok, prompt, options, length_normalise=True)
    for option, score, norm in zip(options, scores, normalised, strict=True):
        prompt_ids, option_ids = separate_ids(tok, prompt, option)
        # The joint tokenisation splits exactly there for these cases.
        text = prompt_text(tok, prompt)
        joint = split_option_ids(tok, text, option, add_special_tokens=isinstance(prompt, str))
        assert joint == (prompt_ids, option_ids)
        expected = brute_force(model, prompt_ids, option_ids)
        assert score == pytest.approx(expected, abs=1e-5)
        assert norm == pytest.approx(expected / len(option_ids), abs=1e-5)
    assert len({len(separate_ids(tok, prompt, o)[1]) for o in options}) > 1  # padding is used


def test_plain_prompt_is_not_templated(model, tok):
    text = "Translate hello to French:"
    plain = option_logprobs(model, tok, text, [" bonjour"])[0]
    chat = option_logprobs(model, tok, [{"role": "user", "content": text}], [" bonjour"])[0]
    assert plain == pytest.approx(brute_force(model, *separate_ids(tok, text, " bonjour")))
    assert plain != pytest.approx(chat)


def test_token_straddling_the_boundary_belongs_to_the_option(tok):
    # "...cat: t" + "ac" tokenises as "...cat:" + "Ġtac": the straddling token is the option's.
    prompt_ids, option_ids = split_option_ids(
        tok, "Reverse the word cat: t", "ac", add_special_tokens=False
    )
    assert tok.convert_ids_to_tokens(option_ids) == ["Ġtac"]
    assert tok.decode(prompt_ids) == "Reverse the word cat:"


def test_errors(model, tok):
    with pytest.raises(ValueError, match="non-empty"):
        option_logprobs(model, tok, TRANSLATE, ["bonjour", ""])
    with pytest.raises(ValueError, match="at least one option"):
        option_logprobs(model, tok, TRANSLATE, [])
    with pytest.raises(ValueError, match="nothing precedes"):
        option_logprobs(model, tok, "", ["bonjour"])
    with pytest.raises(ValueError, match="assistant"):
        option_logprobs(model, tok, [*TRANSLATE, {"role": "assistant", "content": "x"}], ["a"])


def test_argmax_first_ties_and_nan():
    assert argmax_first([1.0, 3.0, 3.0]) == 1
    assert argmax_first([-2.0]) == 0
    assert argmax_first([math.nan, -5.0, -1.0]) == 2
    assert argmax_first([-1.0, math.nan]) == 0
    with pytest.raises(ValueError):
        argmax_first([])


def planted_model(tiny_model_dir: Path, tok, lessons: list[tuple[list, str]]):
    """The tiny model after 40 Adam steps on each prompt -> planted reply (HF loss, not ours)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    optim = torch.optim.Adam(model.parameters(), lr=1e-2)
    batches = []
    for messages, reply in lessons:
        prompt_ids, option_ids = separate_ids(tok, messages, reply)
        ids = torch.tensor([prompt_ids + option_ids])
        labels = torch.tensor([[-100] * len(prompt_ids) + option_ids])
        batches.append((ids, labels))
    for _ in range(40):
        optim.zero_grad()
        sum(model(input_ids=i, labels=y).loss for i, y in batches).backward()
        optim.step()
    return model.eval()


def test_loglik_picks_the_planted_option(tiny_model_dir, tok, model):
    lessons = [(TRANSLATE, "bonjour"), (REVERSE, "tac")]
    trained = planted_model(tiny_model_dir, tok, lessons)
    options = ["hello", "red, green, blue", "bonjour", "tac", "The answer is 5."]
    for messages, reply in lessons:
        for normalise in (False, True):
            assert pick_option(trained, tok, messages, options, length_normalise=normalise) == (
                options.index(reply)
            )
        scores = option_logprobs(trained, tok, messages, options)
        planted = scores[options.index(reply)]
        assert planted > -2.0
        assert planted > max(s for o, s in zip(options, scores, strict=True) if o != reply) + 5.0
    rows = [
        {"prompt": TRANSLATE, "options": options, "label": 2},
        {"prompt": REVERSE, "options": options, "label": "tac"},
    ]
    assert mc_accuracy(trained, tok, rows) == 1.0
    wrong = [{**rows[0], "label": 0}, rows[1]]
    assert mc_accuracy(trained, tok, wrong) == 0.5
    # The untrained model does not know the answers: the planting is what made the pick.
    untrained = [option_logprobs(model, tok, m, options) for m, _ in lessons]
    assert all(s[options.index(r)] < -5 for s, (_, r) in zip(untrained, lessons, strict=True))


def test_length_normalisation_changes_the_pick(model, tok):
    # The random tiny model gives every token about log(1/384) = -5.95, repeated tokens a bit
    # more (tied embeddings favour the current token): "aaaa" has a lower sum than "!" but a
    # higher per-token mean.
    short, long = "!", "aaaa"
    s_short = brute_force(model, *separate_ids(tok, REVERSE, short))
    ids_long = separate_ids(tok, REVERSE, long)
    n_long = len(ids_long[1])
    s_long = brute_force(model, *ids_long)
    assert n_long > 1
    assert s_long < s_short < s_long / n_long  # the constructed case holds
    options = [short, long]
    assert pick_option(model, tok, REVERSE, options) == 0
    assert pick_option(model, tok, REVERSE, options, length_normalise=True) == 1


def test_mc_accuracy_validates_rows(model, tok):
    assert math.isnan(mc_accuracy(model, tok, []))
    with pytest.raises(ValueError, match="row 0: label"):
        mc_accuracy(model, tok, [{"prompt": "Q:", "options": [" a", " b"], "label": 2}])
    with pytest.raises(ValueError, match="row 0: label"):
        mc_accuracy(model, tok, [{"prompt": "Q:", "options": [" a", " b"], "label": " c"}])
    with pytest.raises(ValueError, match="missing 'prompt'"):
        mc_accuracy(model, tok, [{"options": [" a"], "label": 0}])
