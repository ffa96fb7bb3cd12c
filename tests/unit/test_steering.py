"""Persona vectors, steering and capping: the math and the hooks, against exact properties."""

from __future__ import annotations

import pytest
import torch

from rlhfkit.data.traits import load_trait
from rlhfkit.eval.metrics import distinct_ngrams, ranks, spearman
from rlhfkit.models.steering import Cap, Steer, decoder_layers, edited, recording
from rlhfkit.models.tiny import tiny_model
from rlhfkit.ops.steering import (
    auroc,
    cap_hidden,
    masked_mean,
    mean_difference,
    project,
    steer_hidden,
    unit,
)


def test_the_vector_is_exactly_zero_when_both_sets_are_the_same():
    acts = torch.randn(6, 3, 8)
    assert torch.equal(mean_difference(acts, acts), torch.zeros(3, 8, dtype=torch.float64))
    shuffled = acts[torch.randperm(6)]  # the same set in another order
    assert mean_difference(acts, shuffled).abs().max() < 1e-12


def test_mean_difference_and_masked_mean_by_hand():
    pos = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    neg = torch.tensor([[0.0, 1.0]])
    assert mean_difference(pos, neg).tolist() == [2.0, 2.0]
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [9.0, 9.0]]])
    mask = torch.tensor([[True, True, False]])
    assert masked_mean(hidden, mask).tolist() == [[2.0, 1.0]]
    assert masked_mean(hidden, torch.zeros(1, 3, dtype=torch.bool)).tolist() == [[0.0, 0.0]]
    with pytest.raises(ValueError, match="at least one"):
        mean_difference(pos[:0], neg)


def test_project_steer_and_auroc_by_hand():
    v = torch.tensor([3.0, 4.0])
    h = torch.tensor([[[3.0, 4.0], [0.0, 0.0]]])
    assert project(h, v).tolist() == [[5.0, 0.0]]
    assert project(h, torch.zeros(2)).tolist() == [[0.0, 0.0]]
    steered = steer_hidden(h, v, 2.0, mask=torch.tensor([[False, True]]))
    assert steered.tolist() == [[[3.0, 4.0], [6.0, 8.0]]]
    assert torch.equal(steer_hidden(h, v, 0.0), h)
    assert auroc([3.0, 4.0], [1.0, 2.0]) == 1.0
    assert auroc([1.0], [1.0]) == 0.5
    assert auroc([1.0, 3.0], [2.0, 0.0]) == 0.75
    with pytest.raises(ValueError, match="zero"):
        unit(torch.zeros(3))


@pytest.mark.parametrize("side", ["below", "above"])
def test_capping_moves_only_what_is_past_tau_onto_it(side):
    torch.manual_seed(0)
    axis = torch.randn(16)
    hidden = torch.randn(4, 10, 16) * 3
    tau = 0.5
    capped = cap_hidden(hidden, axis, tau, side)
    before, after = project(hidden, axis), project(capped, axis)
    allowed = before >= tau if side == "below" else before <= tau
    assert allowed.any() and (~allowed).any()  # both kinds are present
    assert torch.equal(capped[allowed], hidden[allowed])  # already on the allowed side: untouched
    ok = after >= tau - 1e-5 if side == "below" else after <= tau + 1e-5
    assert bool(ok.all())
    assert torch.allclose(after[~allowed], torch.full_like(after[~allowed], tau), atol=1e-5)
    # only the component along the axis changed
    v = unit(axis)
    rest = (capped - hidden) - ((capped - hidden) @ v)[..., None] * v
    assert rest.abs().max() < 1e-5


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_alpha_zero_and_removed_hooks_leave_the_model_exactly_as_it_was():
    model = tiny_model(seed=0).eval()
    ids = torch.randint(5, 100, (2, 7))
    base = _logits(model, ids)
    v = torch.randn(model.config.hidden_size)
    with edited(model, [Steer(0, v, 0.0)]):
        assert torch.equal(_logits(model, ids), base)
    with edited(model, [Steer(1, v, 4.0)]):
        assert not torch.allclose(_logits(model, ids), base)
    assert torch.equal(_logits(model, ids), base)  # hooks removed
    with pytest.raises(RuntimeError), edited(model, [Steer(1, v, 4.0)]):
        raise RuntimeError("a failure inside the block")
    assert torch.equal(_logits(model, ids), base)  # removed after an exception too
    assert all(not layer._forward_hooks for layer in decoder_layers(model))


def test_steering_adds_alpha_v_to_the_layer_output_and_caps_bound_it():
    model = tiny_model(seed=0).eval()
    ids = torch.randint(5, 100, (2, 5))
    v = torch.randn(model.config.hidden_size)
    with torch.no_grad(), recording(model, [0]) as plain:
        model(input_ids=ids)
    with torch.no_grad(), edited(model, [Steer(0, v, 3.0)]), recording(model, [0]) as steered:
        model(input_ids=ids)
    assert torch.allclose(steered[0], plain[0] + 3.0 * v, atol=1e-5)
    tau = float(project(plain[0], v).median())
    with torch.no_grad(), edited(model, [Cap(0, v, tau, "above")]), recording(model, [0]) as cap:
        model(input_ids=ids)
    assert bool((project(cap[0], v) <= tau + 1e-4).all())
    with pytest.raises(ValueError, match="out of range"), edited(model, [Steer(9, v, 1.0)]):
        pass
    with pytest.raises(ValueError, match="hidden size"), edited(model, [Steer(0, v[:3], 1.0)]):
        pass


def test_positions_split_prefill_from_decode():
    model = tiny_model(seed=0).eval()
    v = torch.randn(model.config.hidden_size)
    prompt, step = torch.randint(5, 100, (1, 6)), torch.randint(5, 100, (1, 1))
    for positions, prompt_changes, step_changes in (
        ("prompt", True, False),
        ("response", False, True),
        ("all", True, True),
    ):
        with edited(model, [Steer(0, v, 5.0, positions)]):
            p, s = _logits(model, prompt), _logits(model, step)
        assert (not torch.equal(p, _logits(model, prompt))) == prompt_changes, positions
        assert (not torch.equal(s, _logits(model, step))) == step_changes, positions


def test_shipped_traits_load_and_score_their_markers():
    enthusiasm = load_trait("enthusiasm")
    assert len(enthusiasm.heldout_questions) == 10 and len(enthusiasm.train_questions) == 30
    assert enthusiasm.score("Wow! This is amazing!") == 4.0  # !, !, wow, amazing
    assert enthusiasm.score("The sky is blue.") == 0.0
    formality = load_trait("builtin:formality")
    assert formality.score("Furthermore, kindly note") == 2.0
    assert formality.score("hey, gonna be cool") == -3.0
    # contractions count against formality, a possessive does not
    assert formality.score("It's fine, isn't it? The cat's bowl.") == -2.0
    sycophancy = load_trait("sycophancy")
    # "what a", "great question", "you are so", "so smart"
    assert sycophancy.score("What a great question! You are so smart.") == 4.0
    assert enthusiasm.messages("Q?", "positive")[0]["content"] == enthusiasm.positive
    assert enthusiasm.messages("Q?", None) == [{"role": "user", "content": "Q?"}]


def test_ranks_and_spearman():
    assert ranks([10, 30, 20, 20]).tolist() == [1.0, 4.0, 2.5, 2.5]
    assert spearman([0, 2, 4, 6], [0.1, 0.5, 0.4, 3.0]) == pytest.approx(0.8)
    assert spearman([0, 1, 2], [5, 5, 5]) != spearman([0, 1, 2], [5, 5, 5])  # nan: constant


def test_distinct_ngrams_by_hand():
    assert distinct_ngrams([1, 2, 3, 4]) == 1.0
    assert distinct_ngrams([7, 7, 7, 7, 7]) == 0.25  # four bigrams, one distinct
    assert distinct_ngrams(["a", "b", "a", "b"]) == pytest.approx(2 / 3)
    assert distinct_ngrams([1, 2, 1, 2], n=1) == 0.5
    assert distinct_ngrams([1]) == 1.0  # no bigram: nothing repeats
