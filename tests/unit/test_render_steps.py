"""Process-reward rendering and reward-scoring rendering.

Expected positions are derived independently of ``render_steps``: the full text comes from the
tokenizer's own ``apply_chat_template``, the reply is found in it by search, and step spans are
counted from the step lengths; the prompt length comes from ``render_prompt``.
"""

from __future__ import annotations

import itertools
import string

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from rlhfkit.data.sources import DataError
from rlhfkit.data.steps import STEP_SEPARATOR, render_sequence, render_steps
from rlhfkit.data.templates import render_messages, render_prompt
from rlhfkit.models.embedded import EMBEDDED_NAME, cache_root
from rlhfkit.models.tiny import tiny_tokenizer
from rlhfkit.types import StepExample

EOS = "<|im_end|>"
PROMPT = "What is 2 + 3? Write the steps."
STEPS = ["Take 2 and add 3.", "2 + 3 = 5.", "The answer is 6."]
LABELS = [1, 0, -1]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _smol_tokenizer():
    path = cache_root() / "models" / EMBEDDED_NAME
    if not (path / "tokenizer.json").is_file():
        pytest.skip(f"the embedded SmolLM2 tokenizer is not cached at {path}")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def reference(tok, prompt, steps, separator=STEP_SEPARATOR):
    """Full text, its token offsets and each stripped step's span ``[a, b)``, found by search."""
    texts = [s.strip() for s in steps]
    reply = separator.join(texts)
    msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]
    full = tok.apply_chat_template(msgs, tokenize=False)
    a = full.rindex(reply + EOS)
    spans = []
    for text in texts:
        spans.append((a, a + len(text)))
        a += len(text) + len(separator)
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    return full, enc["input_ids"], enc["offset_mapping"], spans


def decode(tok, ids):
    return tok.decode(ids, clean_up_tokenization_spaces=False)


def check_step_ends(tok, ex, full, spans, lo=0):
    """With the default separator every step ends at a token boundary, so decoding the ids up to
    and including a step's position gives exactly the text up to the step's last character
    (the first ``lo`` tokens were cut by truncation)."""
    head = len(decode(tok, tok(full, add_special_tokens=False)["input_ids"][:lo]))
    for position, (a, b) in zip(ex.step_positions, spans, strict=False):
        text = decode(tok, ex.input_ids[: position + 1])
        assert text == full[head:b]
        assert text.endswith(full[a:b])
        assert not decode(tok, ex.input_ids[:position]).endswith(full[a:b])


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_positions_are_step_ends(tok, which):
    tokenizer = tok if which == "tiny" else _smol_tokenizer()
    ex = render_steps(tokenizer, PROMPT, STEPS, LABELS, source="f:1")
    full, ids, _, spans = reference(tokenizer, PROMPT, STEPS)
    assert ex.input_ids == ids  # the full text tokenised once
    assert ex.num_steps == len(STEPS)
    assert ex.step_labels == LABELS
    assert ex.source == "f:1"
    check_step_ends(tokenizer, ex, full, spans)
    # The last step's token is followed by the end-of-turn token.
    assert decode(tokenizer, ex.input_ids[ex.step_positions[-1] + 1 :]).startswith(EOS)
    labels = ex.token_labels()
    assert [i for i, y in enumerate(labels) if y != -100] == ex.step_positions
    assert [labels[p] for p in ex.step_positions] == LABELS


def test_smollm2_multibyte_and_message_prompt():
    """SmolLM2 adds a default system message; a message-list prompt and non-ASCII steps work."""
    tokenizer = _smol_tokenizer()
    steps = ["Café: 2 + 3 🙂", "  so 5 = 5  ", "done."]
    ex = render_steps(tokenizer, [{"role": "user", "content": PROMPT}], steps, [1, 1, 1])
    full, _, _, spans = reference(tokenizer, PROMPT, steps)
    assert full.startswith("<|im_start|>system\n")
    check_step_ends(tokenizer, ex, full, spans)


def test_labels_round_trip(tok):
    for labels in itertools.product([-1, 0, 1], repeat=len(STEPS)):
        assert render_steps(tok, PROMPT, STEPS, list(labels)).step_labels == list(labels)


def test_bad_steps_and_labels_raise(tok):
    with pytest.raises(DataError, match=r"data.jsonl:4: field 'steps\[1\]'.*separator"):
        render_steps(tok, PROMPT, ["a", "b\n<step>\nc", "d"], [1, 1, 1], source="data.jsonl:4")
    with pytest.raises(DataError, match=r"row 2: field 'steps\[0\]'.*separator"):
        render_steps(tok, PROMPT, ["a || b"], [1], separator=" || ", source="row 2")
    # A step that only touches the separator would still be split differently by it.
    with pytest.raises(DataError, match=r"x:1: field 'steps'"):
        render_steps(tok, PROMPT, ["a\n<step>", "b"], [1, 1], source="x:1")
    with pytest.raises(DataError, match=r"x:1: field 'steps\[1\]'.*empty"):
        render_steps(tok, PROMPT, ["a", " \n", "c"], [1, 1, 1], source="x:1")
    with pytest.raises(DataError, match=r"x:1: field 'labels\[2\]'.*got 2"):
        render_steps(tok, PROMPT, STEPS, [1, 0, 2], source="x:1")
    with pytest.raises(DataError, match=r"x:1: field 'labels'.*2 labels for 3 steps"):
        render_steps(tok, PROMPT, STEPS, [1, 0], source="x:1")
    with pytest.raises(DataError, match=r"x:1: field 'steps'.*no steps"):
        render_steps(tok, PROMPT, [], [], source="x:1")
    with pytest.raises(ValueError, match="non-empty"):
        render_steps(tok, PROMPT, STEPS, LABELS, separator="")
    with pytest.raises(ValueError, match="max_len"):
        render_steps(tok, PROMPT, STEPS, LABELS, max_len=0)


def test_steps_are_stripped(tok):
    padded = render_steps(tok, PROMPT, [" " + s + " \n" for s in STEPS], LABELS)
    assert padded == render_steps(tok, PROMPT, STEPS, LABELS)


def test_custom_separator(tok):
    ex = render_steps(tok, PROMPT, STEPS, LABELS, separator=" ки\n")
    full, ids, _, spans = reference(tok, PROMPT, STEPS, separator=" ки\n")
    assert " ки\n" in full and ex.input_ids == ids
    check_step_ends(tok, ex, full, spans)


LONG_STEPS = [
    f"Step {i}: " + "the quick brown fox jumps over the lazy dog. " * 20 for i in range(12)
]
LONG_LABELS = [(-1, 0, 1)[i % 3] for i in range(12)]


def test_chunking_twelve_steps(tok):
    """12 steps that do not fit in max_len: the prompt is first cut to one token, so the window
    starts at ``first - 1`` (``first`` = prompt length from render_prompt); a step is kept iff
    its last token index in the full rendering is ``< first - 1 + max_len``."""
    full_ex = render_steps(tok, PROMPT, LONG_STEPS, LONG_LABELS, max_len=100_000)
    full, ids, _, spans = reference(tok, PROMPT, LONG_STEPS)
    first = len(render_prompt(tok, [{"role": "user", "content": PROMPT}]))
    lo = first - 1
    assert len(ids) > 2048  # the spec's case: 12 steps that overflow 2048 tokens
    for max_len in (2048, full_ex.step_positions[6] - lo + 1, full_ex.step_positions[6] - lo):
        ex = render_steps(tok, PROMPT, LONG_STEPS, LONG_LABELS, max_len=max_len)
        kept = [p for p in full_ex.step_positions if p < lo + max_len]
        assert 0 < len(kept) < 12
        assert ex.input_ids == ids[lo : lo + max_len]
        assert ex.step_positions == [p - lo for p in kept]
        assert ex.step_labels == LONG_LABELS[: len(kept)]
        check_step_ends(tok, ex, full, spans, lo=lo)
    assert (
        render_steps(
            tok, PROMPT, LONG_STEPS, LONG_LABELS, max_len=full_ex.step_positions[6] - lo
        ).num_steps
        == 6
    )


def test_left_prompt_truncation_keeps_steps(tok):
    prompt = "Translate hello to French: bonjour. " * 10
    full_ex = render_steps(tok, prompt, STEPS, LABELS)
    n = len(full_ex.input_ids)
    first = len(render_prompt(tok, [{"role": "user", "content": prompt}]))
    # Cut 5 prompt tokens: everything shifts left by 5, every step is kept.
    ex = render_steps(tok, prompt, STEPS, LABELS, max_len=n - 5)
    assert ex.input_ids == full_ex.input_ids[5:]
    assert ex.step_positions == [p - 5 for p in full_ex.step_positions]
    assert ex.step_labels == LABELS
    # The reply plus exactly one prompt token.
    one = render_steps(tok, prompt, STEPS, LABELS, max_len=n - first + 1)
    assert one.input_ids == full_ex.input_ids[first - 1 :]
    assert one.step_positions == [p - first + 1 for p in full_ex.step_positions]
    # A window ending before the first step's last token leaves no step.
    p0 = full_ex.step_positions[0]
    assert render_steps(tok, prompt, STEPS, LABELS, max_len=p0 - first + 1) is None
    assert render_steps(tok, prompt, STEPS, LABELS, max_len=p0 - first + 2).num_steps == 1


def test_step_example_validation():
    with pytest.raises(ValueError, match="differ in length"):
        StepExample(input_ids=[1, 2, 3], step_positions=[1, 2], step_labels=[1])
    with pytest.raises(ValueError, match="strictly increasing"):
        StepExample(input_ids=[1, 2, 3], step_positions=[2, 2], step_labels=[1, 1])
    with pytest.raises(ValueError, match="strictly increasing"):
        StepExample(input_ids=[1, 2, 3], step_positions=[3], step_labels=[1])
    with pytest.raises(ValueError, match="-1, 0 or 1"):
        StepExample(input_ids=[1, 2, 3], step_positions=[1], step_labels=[2])
    ex = StepExample(input_ids=[5, 6, 7, 8], step_positions=[1, 3], step_labels=[-1, 1])
    assert ex.token_labels() == [-100, -1, -100, 1]
    assert ex.token_labels(ignore_index=-7) == [-7, -1, -7, 1]


def test_render_sequence(tok):
    prompt = [{"role": "user", "content": "What is 2 + 3?"}]
    ex = render_sequence(tok, prompt, "The answer is 5.", source="p:1")
    expected = render_messages(
        tok,
        [*prompt, {"role": "assistant", "content": "The answer is 5."}],
        truncation="left_prompt",
    )
    assert ex.input_ids == expected.input_ids and ex.loss_mask == expected.loss_mask
    assert ex.source == "p:1"
    labelled = [t for t, m in zip(ex.input_ids, ex.loss_mask, strict=True) if m]
    assert decode(tok, labelled) == "The answer is 5." + EOS
    assert render_sequence(tok, "What is 2 + 3?", "The answer is 5.").input_ids == ex.input_ids
    # The prompt is cut from the left; the completion and its end-of-turn token stay whole.
    short = render_sequence(
        tok, "What is 2 + 3?", "The answer is 5.", max_len=ex.num_loss_tokens + 2
    )
    assert short.input_ids == ex.input_ids[-(ex.num_loss_tokens + 2) :]
    assert short.num_loss_tokens == ex.num_loss_tokens
    assert render_sequence(tok, "q", "   ") is None


STEP_TEXT = st.text(alphabet=string.printable.replace("<", "") + "éß中文🙂 \u00a0", max_size=25)


@settings(max_examples=150, deadline=None)
@given(
    steps=st.lists(STEP_TEXT, min_size=1, max_size=6),
    separator=st.sampled_from([STEP_SEPARATOR, " ки\n", "\n\n"]),
    data=st.data(),
)
def test_positions_are_last_overlapping_tokens(steps, separator, data):
    """Each position is the last token whose non-empty offsets overlap its step's span."""
    assume(all(s.strip() and separator not in s for s in steps))
    texts = [s.strip() for s in steps]
    assume(separator.join(texts).split(separator) == texts)
    labels = data.draw(
        st.lists(st.sampled_from([-1, 0, 1]), min_size=len(steps), max_size=len(steps))
    )
    tok = tiny_tokenizer()
    ex = render_steps(tok, PROMPT, steps, labels, separator=separator, max_len=100_000)
    _, ids, offsets, spans = reference(tok, PROMPT, steps, separator)
    assert ex.input_ids == ids
    assert ex.step_labels == labels
    assert all(a < b for a, b in itertools.pairwise(ex.step_positions))
    for position, (a, b) in zip(ex.step_positions, spans, strict=True):
        overlapping = [t for t, (s, e) in enumerate(offsets) if e > s and s < b and e > a]
        assert overlapping and position == overlapping[-1]
