"""Constitutional AI's critique and revision with a seeded stub model: deterministic, complete,
resumable, and the principles drawn as the constitution says."""

from __future__ import annotations

import hashlib
import json

import pytest

from rlhfkit.config import from_dict
from rlhfkit.data.constitution import load_constitution
from rlhfkit.recipes import cai


class Stub:
    """A chat model whose reply is a seeded hash of the conversation; counts its calls."""

    def __init__(self, seed: int = 0) -> None:
        self.seed, self.calls, self.conversations = seed, 0, 0

    def complete(self, batch, *, max_tokens, temperature=0.0):
        self.calls += 1
        self.conversations += len(batch)
        out = []
        for messages in batch:
            digest = hashlib.sha256(f"{self.seed}{json.dumps(messages)}".encode()).hexdigest()
            out.append(f" reply-{digest[:8]} ")
        return out


PROMPTS = [[{"role": "user", "content": f"Question {i}?"}] for i in range(5)]


def test_critique_and_revision_are_deterministic_and_complete():
    constitution = load_constitution()
    first = cai.critique_and_revise(Stub(), PROMPTS, constitution, rounds=2, seed=3)
    again = cai.critique_and_revise(Stub(), PROMPTS, constitution, rounds=2, seed=3)
    assert first == again
    other = cai.critique_and_revise(Stub(seed=1), PROMPTS, constitution, rounds=2, seed=3)
    assert other != first
    for i, record in enumerate(first):
        assert record["prompt"] == PROMPTS[i] and record["initial"].startswith("reply-")
        assert len(record["rounds"]) == 2
        for r, step in enumerate(record["rounds"]):
            principle = constitution.draw(3, i * 2 + r)
            assert step["principle"] == principle.name
            assert step["critique_request"] == principle.critique
            assert step["revision_request"] == principle.revision
            assert step["critique"].startswith("reply-") and step["revision"].startswith("reply-")
        assert record["final"] == record["rounds"][-1]["revision"] != record["initial"]


def test_each_stage_is_one_batch_and_conversations_carry_the_history():
    seen = []

    class Recording(Stub):
        def complete(self, batch, *, max_tokens, temperature=0.0):
            seen.append(batch)
            return super().complete(batch, max_tokens=max_tokens, temperature=temperature)

    records = cai.critique_and_revise(Recording(), PROMPTS, load_constitution(), rounds=1)
    assert [len(b) for b in seen] == [5, 5, 5]  # answers, critiques, revisions
    revision_chat = seen[2][0]
    assert [m["role"] for m in revision_chat] == ["user", "assistant", "user", "assistant", "user"]
    assert revision_chat[1]["content"] == records[0]["initial"]
    assert revision_chat[3]["content"] == records[0]["rounds"][0]["critique"]


def _config(tmp_path, prompts, **over):
    return from_dict(cai.CAIReviseConfig, {
        "prompts": str(prompts), "limit": None, "chunk": 2, "output": str(tmp_path / "out"),
        **over,
    })  # fmt: skip


def test_the_command_writes_sft_rows_and_pairs_and_resumes(tmp_path, monkeypatch):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Q{i}?"}) + "\n" for i in range(5)))
    stub = Stub()
    monkeypatch.setattr(cai, "load_backend", lambda *a, **k: stub)
    out = cai.main(_config(tmp_path, prompts))
    rows = {n: [json.loads(x) for x in (out / n).read_text().splitlines()] for n in cai.OUTPUTS}
    assert all(len(v) == 5 for v in rows.values())
    steps, sft, pairs = rows["steps.jsonl"], rows["sft.jsonl"], rows["pairs.jsonl"]
    assert sft[0]["messages"][-1] == {"role": "assistant", "content": steps[0]["final"]}
    assert pairs[0]["chosen"] == steps[0]["final"] and pairs[0]["rejected"] == steps[0]["initial"]
    assert pairs[0]["principles"] == [steps[0]["rounds"][0]["principle"]]
    # a run killed while appending: one file a row short, another with a cut line
    lines = (out / "pairs.jsonl").read_text().splitlines(keepends=True)
    (out / "pairs.jsonl").write_text("".join(lines[:3]))
    (out / "sft.jsonl").write_text("".join((out / "sft.jsonl").read_text().splitlines(True)[:4])
                                   + '{"messa')  # fmt: skip
    stub.calls = 0
    cai.main(_config(tmp_path, prompts))
    again = {n: [json.loads(x) for x in (out / n).read_text().splitlines()] for n in cai.OUTPUTS}
    assert again == rows and stub.calls == 3  # prompts 4 and 5: one chunk of three stages
    stub.calls = 0
    cai.main(_config(tmp_path, prompts))
    assert stub.calls == 0  # everything done: the backend is not even asked


def test_bad_options_and_prompts_fail_clearly(tmp_path):
    from rlhfkit.data.rows import DataError
    from rlhfkit.validation import config_problems

    assert "--rounds: must be at least 1, got 0" in config_problems(cai.CAIReviseConfig(rounds=0))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "x"}) + "\n")
    with pytest.raises(DataError, match="prompt"):
        cai.load_prompts(str(bad), "train", None)
