"""Completion log-probabilities of preference pairs computed as prefix trees equal those of
separate sequences (the DPO family's chosen and rejected in one forward, prompt once)."""

from __future__ import annotations

import pytest
import torch

from rlhfkit.data.groups import TokenizedGroup, group_batch, tree_batch
from rlhfkit.models.forward import completion_logprobs, sequence_logprobs
from rlhfkit.models.load import load_model
from rlhfkit.types import TokenizedExample


def _groups(system: int) -> list[TokenizedGroup]:
    gen = torch.Generator().manual_seed(3)
    head = torch.randint(5, 200, (system,), generator=gen).tolist()
    groups = []
    for prompt_len, lens in ((5, (3, 6)), (2, (4, 2)), (7, (1, 5))):
        prompt = head + torch.randint(5, 200, (prompt_len,), generator=gen).tolist()
        seqs = []
        for n in lens:
            tail = torch.randint(5, 200, (n,), generator=gen).tolist()
            seqs.append(TokenizedExample(prompt + tail, [False] * len(prompt) + [True] * n))
        groups.append(TokenizedGroup(seqs, [1.0, 0.0]))
    # chosen and rejected that also share their first reply token
    groups[0].sequences[1].input_ids[system + 5] = groups[0].sequences[0].input_ids[system + 5]
    return groups


def _reference(model, groups) -> torch.Tensor:
    """Per-sequence sums by completion_logprobs (the one shift function), one at a time."""
    out = []
    for g in groups:
        for s in g.sequences:
            p = s.loss_mask.index(True)
            lp = completion_logprobs(
                model,
                torch.tensor([s.input_ids[:p]]),
                torch.ones(1, p, dtype=torch.long),
                torch.tensor([s.input_ids[p:]]),
                torch.ones(1, len(s.input_ids) - p, dtype=torch.long),
            )
            out.append(lp.sum())
    return torch.stack(out)


@pytest.mark.parametrize("system", [0, 3])
def test_tree_packed_and_padded_sums_equal_separate_sequences(tiny_model_dir, system):
    torch.manual_seed(0)
    model = load_model(str(tiny_model_dir), dtype=torch.float64)
    groups = _groups(system)
    expected = _reference(model, groups)
    lengths = torch.tensor([s.num_loss_tokens for g in groups for s in g.sequences])
    for batch in (
        tree_batch(groups),
        group_batch(groups, packing=True, pad_id=0),
        group_batch(groups, packing=False, pad_id=0),
    ):
        sums, tokens = sequence_logprobs(model, batch)
        torch.testing.assert_close(sums, expected, atol=1e-10, rtol=0)
        assert torch.equal(tokens, lengths)
