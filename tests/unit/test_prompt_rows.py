"""Prompt rows from conversations: the prompt is what precedes the last assistant message, whose
text becomes the row's ``completion`` (what ``rlhfkit distill`` and the pipeline's distilled SFT
stage read)."""

from __future__ import annotations

import json

from rlhfkit.data.prompts import load_prompt_rows
from rlhfkit.data.templates import render_prompt
from rlhfkit.models.tiny import tiny_tokenizer


def test_a_conversation_gives_its_last_turn_as_prompt_and_completion(tmp_path):
    rows = [{"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Say a"},
        {"role": "assistant", "content": "a"},
    ]}]  # fmt: skip
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer = tiny_tokenizer()
    (row,) = load_prompt_rows(tokenizer, str(path), "sft")
    assert row.fields["prompt"] == rows[0]["messages"][:4]
    assert row.fields["completion"] == "a"
    assert row.ids == render_prompt(tokenizer, rows[0]["messages"][:4])
