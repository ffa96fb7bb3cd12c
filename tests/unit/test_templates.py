"""Chat template rendering and assistant-only loss masks."""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhfkit.data.templates import check_roles, render_messages, render_prompt, unroll_turns
from rlhfkit.models.tiny import tiny_tokenizer

EOS = "<|im_end|>"

TWO_TURNS = [
    {"role": "system", "content": "S"},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "The answer is 5."},
    {"role": "user", "content": "Reverse the word cat"},
    {"role": "assistant", "content": "  tac, red green blue.\n"},
]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def n_tokens(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False)["input_ids"])


def labelled_text(tok, example) -> str:
    ids = [t for t, m in zip(example.input_ids, example.loss_mask, strict=True) if m]
    return tok.decode(ids, clean_up_tokenization_spaces=False)


def test_render_equals_chatml_literal(tok):
    msgs = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U"},
        {"role": "assistant", "content": "A"},
    ]
    literal = (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
        "<|im_start|>assistant\nA<|im_end|>\n"
    )
    assert tok.apply_chat_template(msgs, tokenize=False) == literal
    ex = render_messages(tok, msgs)
    assert ex.input_ids == tok(literal, add_special_tokens=False)["input_ids"]
    assert labelled_text(tok, ex) == "A<|im_end|>"
    assert ex.num_loss_tokens == 2


def test_mask_excludes_header_and_trailing_newline(tok):
    ex = render_messages(tok, TWO_TURNS)
    pieces = [tok.decode([t]) for t in ex.input_ids]
    first = ex.loss_mask.index(True)
    last = len(ex.loss_mask) - 1 - ex.loss_mask[::-1].index(True)
    # The header <|im_start|>assistant\n ends just before the first label.
    start = (
        len(ex.input_ids) - 1 - ex.input_ids[::-1].index(tok.convert_tokens_to_ids("<|im_start|>"))
    )
    assert tok.decode(ex.input_ids[start:first]) == "<|im_start|>assistant\n"
    assert not any(ex.loss_mask[:first])
    assert pieces[last] == EOS
    assert pieces[last + 1 :] == ["\n"] and not ex.loss_mask[last + 1]
    assert all(ex.loss_mask[first : last + 1])  # one contiguous span in final_turn mode


@pytest.mark.parametrize(
    ("mode", "turns"),
    [("final_turn", [4]), ("all_assistant_turns", [2, 4])],
)
def test_label_count_equals_hand_count(tok, mode, turns):
    ex = render_messages(tok, TWO_TURNS, mask_mode=mode)
    # Contents are whole pre-tokens (after "\n", before a special token): the BPE split of the
    # content alone equals its split inside the conversation.
    hand = sum(n_tokens(tok, TWO_TURNS[i]["content"].strip()) + 1 for i in turns)
    assert ex.num_loss_tokens == hand
    expected = "".join(TWO_TURNS[i]["content"].strip() + EOS for i in turns)
    assert labelled_text(tok, ex) == expected


def test_non_alternation_raises(tok):
    bad = [
        {"role": "user", "content": "a"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "c"},
    ]
    with pytest.raises(ValueError, match=r"row 7: message 1 has role 'user'"):
        render_messages(tok, bad, source="row 7")
    with pytest.raises(ValueError, match="message 0"):
        check_roles([{"role": "assistant", "content": "x"}])
    with pytest.raises(ValueError, match="last message must be an assistant"):
        render_messages(tok, TWO_TURNS[:4])
    check_roles(
        [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "call"},
            {"role": "tool", "content": "out"},
            {"role": "assistant", "content": "done"},
        ]
    )


def test_empty_completion_is_dropped(tok):
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]
    assert render_messages(tok, msgs) is None


def test_truncation_right_and_drop(tok):
    full = render_messages(tok, TWO_TURNS, max_len=10_000)
    n = len(full.input_ids)
    right = render_messages(tok, TWO_TURNS, max_len=n - 3, truncation="right")
    assert right.input_ids == full.input_ids[: n - 3]
    assert right.loss_mask == full.loss_mask[: n - 3]
    assert render_messages(tok, TWO_TURNS, max_len=n - 1, truncation="drop") is None
    assert render_messages(tok, TWO_TURNS, max_len=n, truncation="drop") == full
    # Cutting off every label drops the example.
    first = full.loss_mask.index(True)
    assert render_messages(tok, TWO_TURNS, max_len=first, truncation="right") is None
    assert (
        render_messages(tok, TWO_TURNS, max_len=first + 1, truncation="right").num_loss_tokens == 1
    )


def test_truncation_left_prompt(tok):
    full = render_messages(tok, TWO_TURNS, max_len=10_000)
    n = len(full.input_ids)
    first = full.loss_mask.index(True)
    completion = n - first
    left = render_messages(tok, TWO_TURNS, max_len=completion + 4, truncation="left_prompt")
    assert left.input_ids == full.input_ids[first - 4 :]
    assert left.num_loss_tokens == full.num_loss_tokens  # completion kept whole
    # Completion longer than max_len: keep one prompt token, cut the completion's end.
    short = render_messages(tok, TWO_TURNS, max_len=4, truncation="left_prompt")
    assert short.input_ids == full.input_ids[first - 1 : first + 3]
    assert short.loss_mask == [False, True, True, True]


def test_unroll_turns(tok):
    convs = unroll_turns(TWO_TURNS)
    assert convs == [TWO_TURNS[:3], TWO_TURNS[:5]]
    texts = [labelled_text(tok, render_messages(tok, c)) for c in convs]
    assert texts == ["The answer is 5.<|im_end|>", "tac, red green blue.<|im_end|>"]
    assert unroll_turns([{"role": "user", "content": "q"}]) == []


REWRITING_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' and not loop.last %}"
    "{{ '<|im_start|>assistant\n<|im_end|>\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] | trim + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""Drops the content of every assistant message but the last one (like reasoning stripping)."""


def test_history_rewriting_template_raises(tok):
    with pytest.raises(ValueError, match="rewrites history") as err:
        render_messages(
            tok,
            TWO_TURNS,
            mask_mode="all_assistant_turns",
            chat_template=REWRITING_TEMPLATE,
            source="f:3",
        )
    assert "f:3" in str(err.value)
    # The final turn alone is still well defined.
    ex = render_messages(tok, TWO_TURNS, chat_template=REWRITING_TEMPLATE)
    assert labelled_text(tok, ex) == "tac, red green blue.<|im_end|>"


DEFAULT_SYSTEM_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] | trim + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""Adds a default system message when none is given (like SmolLM2's template)."""


def test_default_system_message_template(tok):
    msgs = TWO_TURNS[1:]
    ex = render_messages(
        tok, msgs, mask_mode="all_assistant_turns", chat_template=DEFAULT_SYSTEM_TEMPLATE
    )
    assert tok.decode(ex.input_ids).startswith("<|im_start|>system\nYou are helpful.")
    assert labelled_text(tok, ex) == "The answer is 5.<|im_end|>tac, red green blue.<|im_end|>"


def test_render_prompt(tok):
    msgs = TWO_TURNS[:4]
    ids = render_prompt(tok, msgs)
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")
    assert render_prompt(tok, msgs, max_len=5) == ids[-5:]
    # The prompt is exactly the part of the rendered conversation before the final labels.
    full = render_messages(tok, TWO_TURNS)
    assert full.input_ids[: len(ids)] == ids
    assert full.loss_mask.index(True) == len(ids)
    with pytest.raises(ValueError, match="must not end with an assistant"):
        render_prompt(tok, TWO_TURNS)


TEXT = st.text(alphabet=string.printable + "éß中文🙂 \u00a0", max_size=30)


@st.composite
def conversations(draw):
    msgs = []
    if draw(st.booleans()):
        msgs.append({"role": "system", "content": draw(TEXT)})
    for _ in range(draw(st.integers(1, 3))):
        msgs.append({"role": "user", "content": draw(TEXT)})
        msgs.append({"role": "assistant", "content": draw(TEXT)})
    return msgs


@settings(max_examples=150, deadline=None)
@given(msgs=conversations(), mode=st.sampled_from(["final_turn", "all_assistant_turns"]))
def test_labelled_tokens_decode_to_contents(msgs, mode):
    tok = tiny_tokenizer()
    ex = render_messages(tok, msgs, mask_mode=mode, max_len=100_000)
    assistant = [m["content"] for m in msgs if m["role"] == "assistant"]
    labelled = assistant[-1:] if mode == "final_turn" else assistant
    if ex is None:
        assert all(not c.strip() for c in labelled)
        return
    assert labelled_text(tok, ex) == "".join(c.strip() + EOS for c in labelled)
