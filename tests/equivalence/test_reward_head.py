"""Reward-model head: padding side, packing and batching invariance; Hugging Face round trip.

docs/methods/reward_models.md: the reward is read at the last non-pad token, computed from the mask
(``T - 1 - argmax(flip(mask))``), so left and right padding give the same reward, and a batch
gives the same rewards as scoring one sequence at a time.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from rlhfkit.data.collate import packed_batch, pad_batch
from rlhfkit.data.groups import tree_batch
from rlhfkit.models.heads import score_examples, sequence_scores, token_scores
from rlhfkit.models.load import load_model
from rlhfkit.ops.masking import last_token_index, unpack_rows
from rlhfkit.types import TokenizedExample


def _examples(lengths: list[int], seed: int = 0) -> list[TokenizedExample]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(5, 200, (n,), generator=gen).tolist()
        out.append(TokenizedExample(ids, [False] + [True] * (n - 1)))
    return out


@pytest.fixture(scope="module")
def reward_model(tiny_model_dir):
    torch.manual_seed(0)
    model = load_model(
        str(tiny_model_dir), dtype=torch.float64, attn_implementation="sdpa", task="score",
        pad_token_id=0,
    )  # fmt: skip
    return model.eval()


def test_last_token_index_left_and_right_padding():
    """Right padding [1,1,0] -> 1; left padding [0,1,1] -> 2; no padding -> T-1."""
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [1, 1, 1, 1], [0, 1, 0, 0]])
    assert last_token_index(mask).tolist() == [1, 3, 3, 1]
    assert last_token_index(mask.bool()).tolist() == [1, 3, 3, 1]


def test_unpack_rows_roundtrip():
    values = torch.arange(7.0)
    padded, mask = unpack_rows(values, torch.tensor([3, 1, 3]))
    assert padded.tolist() == [[0, 1, 2], [3, 0, 0], [4, 5, 6]]
    assert mask.sum().item() == 7 and torch.equal(padded[mask], values)


@torch.no_grad()
def test_left_right_padding_packing_and_batching_agree(reward_model):
    examples = _examples([5, 9, 3, 12])
    right = sequence_scores(reward_model, pad_batch(examples, pad_id=0, side="right"))
    left = sequence_scores(reward_model, pad_batch(examples, pad_id=0, side="left"))
    packed = sequence_scores(reward_model, packed_batch(examples))
    single = torch.cat([sequence_scores(reward_model, pad_batch([e], pad_id=0)) for e in examples])
    assert right.shape == (4, 1)
    torch.testing.assert_close(left, right, atol=1e-9, rtol=0)
    torch.testing.assert_close(packed, right, atol=1e-9, rtol=0)
    torch.testing.assert_close(single, right, atol=1e-9, rtol=0)


@torch.no_grad()
def test_score_examples_restores_order(reward_model):
    examples = _examples([7, 2, 11, 4, 9], seed=1)
    expected = torch.cat([sequence_scores(reward_model, packed_batch([e])) for e in examples])
    for packing in (True, False):
        got = score_examples(reward_model, examples, packing=packing, pad_id=0, max_tokens=16)
        torch.testing.assert_close(got, expected, atol=1e-9, rtol=0)


@torch.no_grad()
def test_score_examples_as_prefix_trees_equals_one_at_a_time(tiny_model_dir, monkeypatch):
    """Completions of a prompt scored as prefix trees get exactly their scores one at a time.

    Three prompts share a 4-token "system prompt" (the cross-tree context); one has more
    completions than a tree holds, one completion equals another's first tokens, and the token
    budget forces several forward passes.
    """
    from rlhfkit.models import heads

    torch.manual_seed(0)
    model = load_model(
        str(tiny_model_dir), dtype=torch.float64, attn_implementation="varlen_sdpa",
        task="score", pad_token_id=0,
    ).eval()  # fmt: skip
    monkeypatch.setattr(heads, "TREE_BRANCHES", 3)
    gen = torch.Generator().manual_seed(2)
    system = [11, 12, 13, 14]
    prompts = [system + torch.randint(5, 200, (n,), generator=gen).tolist() for n in (6, 3, 9)]
    examples, keys = [], []
    for key, count in ((0, 7), (1, 2), (2, 1), (0, 1)):
        for _ in range(count):
            completion = torch.randint(5, 200, (int(torch.randint(1, 6, (1,))),)).tolist()
            ids = prompts[key] + completion
            mask = [False] * len(prompts[key]) + [True] * len(completion)
            examples.append(TokenizedExample(ids, mask))
            keys.append(key)
    cut = examples[0].input_ids[:-1]  # a prefix of another sequence of its tree
    examples.append(TokenizedExample(cut, [False] * (len(cut) - 1) + [True]))
    keys.append(0)
    expected = torch.cat([sequence_scores(model, packed_batch([e])) for e in examples])
    trees = []
    monkeypatch.setattr(
        heads, "tree_batch", lambda groups: trees.append(groups) or tree_batch(groups)
    )
    for budget in (40, 8192):
        got = score_examples(model, examples, packing=True, pad_id=0, max_tokens=budget,
                             prefix_keys=keys)  # fmt: skip
        torch.testing.assert_close(got, expected, atol=1e-9, rtol=0)
    assert max(len(g.sequences) for groups in trees for g in groups) == 3  # trees were scored
    with pytest.raises(ValueError, match="prefix_keys"):
        score_examples(model, examples, packing=True, pad_id=0, prefix_keys=keys[:-1])


@torch.no_grad()
def test_token_scores_last_position_equals_sequence_score(reward_model):
    examples = _examples([6, 4])
    batch = pad_batch(examples, pad_id=0, side="left")
    select = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)
    select[:, -1] = True  # left padding: every sequence ends in the last column
    torch.testing.assert_close(
        token_scores(reward_model, batch, select), sequence_scores(reward_model, batch)
    )


@torch.no_grad()
def test_saved_model_loads_in_transformers_with_same_scores(reward_model, tmp_path):
    """AutoModelForSequenceClassification pools at the last non-pad id: same rewards."""
    reward_model.save_pretrained(tmp_path)
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path, dtype=torch.float64)
    hf.eval()
    examples = _examples([5, 9, 3])
    for side in ("left", "right"):
        batch = pad_batch(examples, pad_id=0, side=side)
        ours = sequence_scores(reward_model, batch)
        theirs = hf(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
        ).logits
        torch.testing.assert_close(ours, theirs, atol=1e-9, rtol=0)


def test_head_gradient_reaches_backbone(reward_model):
    examples = _examples([5, 8])
    reward_model.zero_grad()
    sequence_scores(reward_model, packed_batch(examples)).sum().backward()
    assert reward_model.score.weight.grad.abs().sum() > 0
    assert reward_model.model.embed_tokens.weight.grad.abs().sum() > 0
    reward_model.zero_grad()


def test_prefix_tree_mask_hand_layout():
    """Prefix of 2, branches of 2 and 1: branch tokens see the prefix and their own branch."""
    from rlhfkit.ops.masking import prefix_tree_mask

    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0],
            [1, 1, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(prefix_tree_mask(2, [2, 1]), expected)


def _groups(seed: int, system: int = 0) -> list:
    """Groups whose sequences share prompts of different lengths (and sometimes more); with
    ``system`` > 0 every sequence starts with the same ``system`` tokens (a template's default
    system prompt)."""
    from rlhfkit.data.groups import TokenizedGroup

    gen = torch.Generator().manual_seed(seed)
    head = torch.randint(5, 200, (system,), generator=gen).tolist()
    out = []
    for k, prompt_len in ((2, 6), (3, 3), (2, 1), (2, 9)):
        prompt = head + torch.randint(5, 200, (prompt_len,), generator=gen).tolist()
        prompt_len += system
        seqs = []
        for j in range(k):
            tail = torch.randint(5, 200, (3 + 2 * j,), generator=gen).tolist()
            seqs.append(TokenizedExample(prompt + tail, [False] * prompt_len + [True] * len(tail)))
        if k == 3:  # two completions that also share their first token
            seqs[2].input_ids[prompt_len] = seqs[1].input_ids[prompt_len]
        out.append(TokenizedGroup(seqs, [float(k - j) for j in range(k)]))
    return out


@pytest.mark.parametrize("system", [0, 4], ids=["per-group", "with-shared-context"])
def test_prefix_trees_give_the_rewards_and_gradients_of_separate_sequences(tiny_model_dir, system):
    from rlhfkit.data.groups import group_batch, scatter_rewards, shared_prefix_length, tree_batch

    torch.manual_seed(0)
    model = load_model(str(tiny_model_dir), dtype=torch.float64, task="score", pad_token_id=0)
    groups = _groups(0, system)
    assert shared_prefix_length([s.input_ids for s in groups[1].sequences]) == 3 + system
    assert int(tree_batch(groups)["tree_context"][0]) == system
    results = []
    for batch in (group_batch(groups, packing=True, pad_id=0), tree_batch(groups)):
        model.zero_grad()
        rewards = sequence_scores(model, batch)[:, 0]
        matrix = scatter_rewards(rewards, batch["slots"], batch["group_mask"])
        (matrix * torch.arange(1.0, 1 + matrix.numel()).view_as(matrix)).sum().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        results.append((matrix.detach(), grads))
    (flat, flat_grads), (tree, tree_grads) = results
    assert (
        tree_batch(groups)["input_ids"].shape[1]
        < group_batch(groups, packing=True, pad_id=0)["input_ids"].shape[1]
    )
    torch.testing.assert_close(tree, flat, atol=1e-10, rtol=0)
    # Gradients agree to fp32 rounding, not fp64: transformers' RMSNorm computes in fp32 even for
    # an fp64 model, and the tree adds the two branches' gradients of a shared prompt token
    # inside that fp32 backward where the flat layout adds them after it (checked layer by layer:
    # the gradients entering each RMSNorm agree to 1e-16).
    for a, b in zip(tree_grads, flat_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6 * float(b.abs().max()), rtol=0)
