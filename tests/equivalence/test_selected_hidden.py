"""The last decoder layer run only at the read positions (``selected_hidden``) equals the full
backbone read at those positions: values and gradients, for padded, packed and prefix-tree
batches (with a shared context document), and the full path where the shortcut does not apply."""

from __future__ import annotations

import pytest
import torch

from rlhfkit.data.collate import packed_batch, pad_batch
from rlhfkit.data.groups import TokenizedGroup, tree_batch
from rlhfkit.models.forward import _model_inputs, backbone_hidden, selected_hidden
from rlhfkit.models.heads import last_positions
from rlhfkit.models.load import load_model
from rlhfkit.types import TokenizedExample


def _examples(lengths: list[int]) -> list[TokenizedExample]:
    gen = torch.Generator().manual_seed(1)
    return [
        TokenizedExample(
            torch.randint(5, 200, (n,), generator=gen).tolist(), [False] + [True] * (n - 1)
        )
        for n in lengths
    ]


def _tree(system: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    head = torch.randint(5, 200, (system,), generator=gen).tolist()
    groups = []
    for prompt_len, lens in ((5, (3, 6)), (2, (4, 2))):
        prompt = head + torch.randint(5, 200, (prompt_len,), generator=gen).tolist()
        seqs = [
            TokenizedExample(
                prompt + torch.randint(5, 200, (n,), generator=gen).tolist(),
                [False] * len(prompt) + [True] * n,
            )
            for n in lens
        ]
        groups.append(TokenizedGroup(seqs, [1.0, 0.0]))
    return tree_batch(groups)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(str(tiny_model_dir), dtype=torch.float64, task="score", pad_token_id=0)


BATCHES = {
    "padded": lambda: pad_batch(_examples([5, 9, 3]), pad_id=0),
    "packed": lambda: packed_batch(_examples([5, 9, 3])),
    "tree": lambda: _tree(0),
    "tree_with_context": lambda: _tree(4),
}


@pytest.mark.parametrize("kind", list(BATCHES))
def test_selected_hidden_equals_full_backbone(model, kind):
    batch = BATCHES[kind]()
    inputs = _model_inputs(batch)
    rows, cols = last_positions(batch)
    grads = []
    for fn in (lambda: selected_hidden(model, inputs, rows, cols),
               lambda: backbone_hidden(model, **inputs)[rows, cols]):  # fmt: skip
        model.zero_grad()
        out = fn()
        (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).sum().backward()
        grads.append(
            (
                out.detach(),
                {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
            )
        )
    (fast, fast_grads), (full, full_grads) = grads
    torch.testing.assert_close(fast, full, atol=1e-10, rtol=0)
    assert fast_grads.keys() == full_grads.keys()
    for name in full_grads:
        torch.testing.assert_close(fast_grads[name], full_grads[name], atol=1e-10, rtol=0)


def test_falls_back_to_the_full_backbone(model, monkeypatch):
    """Unsupported model types (and gradient checkpointing) never reach the shortcut."""
    batch = BATCHES["packed"]()
    inputs, (rows, cols) = _model_inputs(batch), last_positions(batch)
    expected = backbone_hidden(model, **inputs)[rows, cols]
    monkeypatch.setattr(model.config, "model_type", "gpt2")
    calls = []
    handle = model.model.layers[-1].register_forward_hook(lambda *a: calls.append(1))
    got = selected_hidden(model, inputs, rows, cols)
    handle.remove()
    assert calls == [1]  # the last layer ran as a whole
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


@pytest.mark.parametrize("where", ["layer", "mlp", "norm"])
def test_a_hook_on_the_last_layer_keeps_the_full_forward(model, where):
    """A steering edit or recording on the last layer (or one of its modules, or the final
    norm) must see, and may change, the whole row's output, which only the full forward
    gives: the shortcut steps aside."""
    batch = BATCHES["packed"]()
    inputs, (rows, cols) = _model_inputs(batch), last_positions(batch)

    seen = []

    def shift(_module, _args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        seen.append(hidden.dim())
        return (hidden + 0.5, *output[1:]) if isinstance(output, tuple) else hidden + 0.5

    last = model.model.layers[-1]
    module = {"layer": last, "mlp": last.mlp, "norm": model.model.norm}[where]
    handle = module.register_forward_hook(shift)
    try:
        expected = backbone_hidden(model, **inputs)[rows, cols]
        got = selected_hidden(model, inputs, rows, cols)
    finally:
        handle.remove()
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    assert seen == [3, 3]  # the hooked module saw the whole (B, L, H) row both times
    assert not torch.allclose(got, selected_hidden(model, inputs, rows, cols))


@pytest.mark.parametrize("kind", ["padded", "packed"])
def test_label_logprobs_read_the_last_layer_at_label_positions_only(tiny_model_dir, kind):
    """label_logprobs and label_hidden take the shortcut at the label positions: the same
    values and gradients as the full backbone's hidden states there (fp64)."""
    from rlhfkit.models.forward import _decoder, fused_head, label_hidden, label_logprobs
    from rlhfkit.ops.logprobs import linear_logprobs

    lm = load_model(str(tiny_model_dir), dtype=torch.float64)
    assert _decoder(lm) is not None  # the shortcut applies to this model
    batch = BATCHES[kind]()
    batch["labels"] = torch.where(batch["input_ids"] > 100, batch["input_ids"], -100)
    select = batch["labels"][:, 1:] != -100
    targets = batch["labels"][:, 1:][select]
    head = fused_head(lm).weight

    def full():
        hidden = backbone_hidden(lm, **_model_inputs(batch))[:, :-1][select]
        return linear_logprobs(hidden, head, targets)

    results = []
    for fn in (lambda: label_logprobs(lm, batch)[0], full):
        lm.zero_grad()
        value = fn()
        value.sum().backward()
        results.append((value.detach(), [p.grad.clone() for p in lm.parameters()]))
    (fast, fast_grads), (slow, slow_grads) = results
    assert 0 < fast.numel() < select.numel()
    torch.testing.assert_close(fast, slow, atol=1e-10, rtol=0)
    for a, b in zip(fast_grads, slow_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
    hidden, _ = label_hidden(lm, batch)
    expected = backbone_hidden(lm, **_model_inputs(batch))[:, :-1][select]
    torch.testing.assert_close(hidden, expected, atol=1e-10, rtol=0)
