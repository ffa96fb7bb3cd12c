"""Judge backends for AI feedback: verdict log-probs (local and endpoint), the disk cache, soft
labels from both orders, and ``rlhfkit cai label`` on a stub judge."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pytest
import torch

from fake_openai import FakeOpenAI
from rlhfkit.data.constitution import load_constitution
from rlhfkit.models.tiny import tiny_model, tiny_tokenizer
from rlhfkit.recipes import cai_label
from rlhfkit.rewards.ai_labels import label_pairs, soft_label
from rlhfkit.rewards.cache import CachedBackend, cached
from rlhfkit.rewards.chat import (
    LocalChatBackend,
    OpenAIChatBackend,
    VerdictBackend,
    verdict_position,
)


@pytest.mark.parametrize(
    ("pieces", "found"),
    [
        (["Because", " [[", "A", "]]"], 2),
        (["[[", "B", "]]", " no,", " [[", "A", "]]"], 5),  # the last verdict counts
        (["[[", "Y", "ES", "]]"], 1),
        (["[[", "C", "]]"], None),
        (["A", " [[", "]]"], None),
    ],
)
def test_verdict_position(pieces: list[str], found: int | None) -> None:
    assert verdict_position(pieces, ("A", "B", "YES")) == found


def _tokens(text_pieces: list[str], verdict_alternatives: dict[str, float]) -> list[dict]:
    out = []
    for piece in text_pieces:
        alts = [{"token": piece, "logprob": -0.1}]
        if piece.strip() in ("A", "B"):
            alts = [{"token": t, "logprob": v} for t, v in verdict_alternatives.items()]
        out.append({"token": piece, "logprob": alts[0]["logprob"], "top_logprobs": alts})
    return out


def test_endpoint_verdict_logprobs() -> None:
    pieces = ["Fine", ".", " [[", "A", "]]"]
    alts = {"A": math.log(0.6), " A": math.log(0.1), "B": math.log(0.3)}
    with FakeOpenAI(lambda body: "Fine. [[A]]", logprobs=lambda b, c: _tokens(pieces, alts)) as s:
        backend = OpenAIChatBackend(s.base_url, "judge", api_key_env=None)
        [(text, logprobs)] = backend.complete_with_verdict(
            [[{"role": "user", "content": "q"}]], max_tokens=16, choices=("A", "B")
        )
        body = s.requests[0]["body"]
    assert text == "Fine. [[A]]" and body["logprobs"] is True and body["top_logprobs"] == 20
    assert logprobs == {"A": pytest.approx(math.log(0.7)), "B": pytest.approx(math.log(0.3))}
    assert isinstance(backend, VerdictBackend)


def test_endpoint_without_logprobs_gives_none() -> None:
    with FakeOpenAI(lambda body: "[[B]]") as server:
        backend = OpenAIChatBackend(server.base_url, "judge", api_key_env=None)
        out = backend.complete_with_verdict([[{"role": "user", "content": "q"}]],
                                            max_tokens=8, choices=("A", "B"))  # fmt: skip
    assert out == [("[[B]]", None)]


def test_local_verdict_logprobs_read_the_verdict_step(monkeypatch) -> None:
    tokenizer = tiny_tokenizer()
    backend = LocalChatBackend(model=tiny_model(seed=0), tokenizer=tokenizer)
    ids = tokenizer.encode("ok [[B]]", add_special_tokens=False)
    pieces = [tokenizer.decode([i]) for i in ids]
    step = verdict_position(pieces, ("A", "B"))
    assert step is not None
    logits = torch.zeros(len(ids), len(tokenizer))
    a, b = (tokenizer.encode(c, add_special_tokens=False)[0] for c in "AB")
    logits[step, a], logits[step, b] = 1.0, 3.0
    replies = [("ok [[B]]", ids, logits)]
    monkeypatch.setattr(backend, "generate_replies", lambda *a, **k: replies)
    [(_, logprobs)] = backend.complete_with_verdict([[]], max_tokens=8, choices=("A", "B"))
    expected = torch.log_softmax(logits[step], -1)
    assert logprobs == {
        "A": pytest.approx(float(expected[a])),
        "B": pytest.approx(float(expected[b])),
    }


def test_local_generate_replies_on_a_tiny_model() -> None:
    backend = LocalChatBackend(model=tiny_model(seed=0), tokenizer=tiny_tokenizer())
    chats = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "a longer one"}]]
    out = backend.generate_replies(chats, 5, logits=True)
    plain = backend.complete(chats, max_tokens=5)
    for (text, ids, logits), again in zip(out, plain, strict=True):
        assert text == again and logits is not None and logits.shape[0] == len(ids) <= 5
        assert ids == logits.argmax(-1).tolist()  # greedy: every token is its step's argmax


class Counting:
    """A stub backend that counts what it is asked."""

    def __init__(self) -> None:
        self.asked = 0

    def __repr__(self) -> str:
        return "Counting()"

    def complete(self, batch, *, max_tokens, temperature=0.0):
        self.asked += len(batch)
        return [f"reply to {chat[-1]['content']}" for chat in batch]

    def complete_with_verdict(self, batch, *, max_tokens, choices):
        self.asked += len(batch)
        return [(f"[[{choices[0]}]]", {c: -float(i) for i, c in enumerate(choices)})
                for _ in batch]  # fmt: skip


def test_the_cache_makes_a_rerun_call_the_backend_zero_times(tmp_path: Path) -> None:
    chats = [[{"role": "user", "content": str(i)}] for i in range(5)]
    first = Counting()
    backend = CachedBackend(first, tmp_path / "cache.sqlite")
    answers = backend.complete(chats, max_tokens=8)
    verdicts = backend.complete_with_verdict(chats[:2], max_tokens=8, choices=("A", "B"))
    assert first.asked == 7 and backend.calls == 7
    backend.close()
    second = Counting()
    again = cached(second, tmp_path / "cache.sqlite")
    assert again.complete(chats, max_tokens=8) == answers
    assert again.complete_with_verdict(chats[:2], max_tokens=8, choices=("A", "B")) == verdicts
    assert second.asked == 0
    more = [*chats[::-1], [{"role": "user", "content": "new"}]]
    assert again.complete(more, max_tokens=8)[:5] == answers[::-1]  # order kept
    assert second.asked == 1  # only the new conversation
    again.complete(chats, max_tokens=9)  # other settings are other requests
    assert second.asked == 6
    assert cached(second, None) is second


class VerdictJudge:
    """Prefers the reply containing 'good', with P = 0.8 (and no position bias)."""

    def complete_with_verdict(self, batch, *, max_tokens, choices):
        out = []
        for chat in batch:
            text = chat[1]["content"]
            first = text.split("[Reply of Assistant A]\n")[1].split("\n[End")[0]
            p = 0.8 if "good" in first else 0.2
            verdict = "A" if p > 0.5 else "B"
            out.append((f"[[{verdict}]]", {"A": math.log(p), "B": math.log(1 - p)}))
        return out

    def complete(self, batch, *, max_tokens, temperature=0.0):
        return [text for text, _ in self.complete_with_verdict(batch, max_tokens=0, choices=())]


def test_soft_labels_are_the_softmax_of_the_verdict_logprobs() -> None:
    labels = label_pairs(VerdictJudge(), ["q1", "q2"], ["good", "bad"], ["bad", "good"],
                         load_constitution())  # fmt: skip
    assert labels.preferred == ["a", "b"]
    assert labels.soft == [pytest.approx(0.8), pytest.approx(0.2)]
    forward, swapped = (math.log(0.8), math.log(0.2)), (math.log(0.2), math.log(0.8))
    assert soft_label(forward, swapped) == pytest.approx(0.8)
    p_a = math.exp(1.3) / (math.exp(1.3) + math.exp(-0.4))
    assert soft_label((1.3, -0.4), (-0.4, 1.3)) == pytest.approx(p_a)
    assert soft_label((0.0, -math.inf), (-math.inf, 0.0)) == 1.0


def _write_pairs(path: Path, n: int) -> Path:
    rows = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cai_label_writes_pairs_with_soft_labels_and_resumes(tmp_path: Path, monkeypatch) -> None:
    judge = VerdictJudge()
    asked: list[int] = []
    original = judge.complete_with_verdict

    def counted(batch, **kw):
        asked.append(len(batch))
        return original(batch, **kw)

    judge.complete_with_verdict = counted  # type: ignore[method-assign]
    monkeypatch.setattr(cai_label, "load_backend", lambda spec, **kw: judge)
    cfg = cai_label.CAILabelConfig(pairs=str(_write_pairs(tmp_path / "p.jsonl", 5)),
                                   output=str(tmp_path / "out"), chunk=2)  # fmt: skip
    out = cai_label.main(cfg)
    rows = [json.loads(x) for x in (out / "pairs.jsonl").read_text().splitlines()]
    assert [r["chosen"] for r in rows] == [f"good {i}" for i in range(5)]
    assert all(r["p_chosen"] == pytest.approx(0.8) for r in rows)
    assert rows[0]["margin"] == pytest.approx(math.log(4)) and rows[0]["principle"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["pairs"] == 5 and metrics["kept"] == 1.0 and metrics["consistency"] == 1
    assert metrics["position_bias"] == 0.5 and metrics["soft_labels"] == 5
    assert asked == [4, 4, 2]  # both orders of each chunk in one batch
    lines = (out / "labels.jsonl").read_text().splitlines()
    (out / "labels.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:10])  # killed
    asked.clear()
    cai_label.main(cfg)  # resumes after the 3 complete lines; the rest is in the cache
    assert asked == [] and len((out / "labels.jsonl").read_text().splitlines()) == 5


class PrefixJudge:
    """Classic-mode stub: log-probs that favour the reply containing 'good', plus a bias."""

    def __init__(self, bias: float = 0.0) -> None:
        self.bias, self.batches = bias, []

    def prefix_logprobs(self, batch, *, prefix, choices):
        self.batches.append((batch, prefix))
        out = []
        for chat in batch:
            text = chat[1]["content"]
            first = text.split("[Reply of Assistant A]\n")[1].split("\n[End")[0]
            lead = (1.0 if "good" in first else -1.0) + self.bias  # logit of A over B
            out.append({"A": lead - 5.0, "B": -5.0})  # unnormalised over the vocabulary
        return out

    def complete(self, batch, *, max_tokens, temperature=0.0):
        raise AssertionError("the classic mode generates nothing")


def test_classic_mode_renormalises_p_a_against_p_b() -> None:
    judge = PrefixJudge()
    labels = label_pairs(judge, ["q1", "q2"], ["good", "bad"], ["bad", "good"],
                         load_constitution(), mode="auto")  # fmt: skip
    [(batch, prefix)] = judge.batches
    assert prefix == "The answer is: (" and len(batch) == 4
    assert "Answer with (A) or (B)." in batch[0][1]["content"]
    p = 1 / (1 + math.exp(-1.0))  # P(A) + P(B) = 1 over the two letters
    assert labels.preferred == ["a", "b"]
    assert labels.soft == [pytest.approx(p), pytest.approx(1 - p)]
    assert labels.outputs[0][0] == f"P(A) = {p:.4f} [[A]]"
    biased = label_pairs(PrefixJudge(bias=3.0), ["q"], ["good"], ["bad"], load_constitution(),
                         mode="classic")  # fmt: skip
    assert biased.preferred == [None] and biased.metrics()["position_bias"] == 1.0
    with pytest.raises(ValueError, match="generative"):
        label_pairs(Counting(), ["q"], ["a"], ["b"], load_constitution(), mode="classic")
    with pytest.raises(ValueError, match="mode"):
        label_pairs(judge, ["q"], ["a"], ["b"], load_constitution(), mode="fast")


def test_local_prefix_logprobs_equal_one_unpadded_forward() -> None:
    tokenizer = tiny_tokenizer()
    model = tiny_model(seed=0).eval()
    backend = LocalChatBackend(model=model, tokenizer=tokenizer, batch_size=3)
    chats = [[{"role": "user", "content": "x" * n}] for n in (1, 9, 4)]
    got = backend.prefix_logprobs(chats, prefix="The answer is: (", choices=("A", "B"))
    from rlhfkit.data.templates import render_prompt

    for chat, lp in zip(chats, got, strict=True):
        ids = render_prompt(tokenizer, chat) + tokenizer.encode(
            "The answer is: (", add_special_tokens=False
        )
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)
        for c in "AB":
            token = tokenizer.encode(c, add_special_tokens=False)[0]
            assert lp[c] == pytest.approx(float(logp[token]), abs=1e-4)
    cache = CachedBackend(backend, Path(tempfile.mkdtemp()) / "c.sqlite")
    assert cache.prefix_logprobs(chats, prefix="(", choices=("A", "B")) == cache.prefix_logprobs(
        chats, prefix="(", choices=("A", "B")
    )
    assert cache.calls == 3 and cache.hits == 3


def test_cai_label_by_a_rule_rubric_loads_no_judge(tmp_path: Path, monkeypatch) -> None:
    def no_model(spec, **kw):
        raise AssertionError("a rule-checked rubric needs no judge model")

    monkeypatch.setattr(cai_label, "load_backend", no_model)
    reference = "The opposite of 'up' is 'down'.\nAnswer: down"
    rows = [{"prompt": "Opposite of 'up'?", "reference": reference, "task": "antonyms",
             "a": "Sorry, I cannot.", "b": reference}]  # fmt: skip
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n")
    out = cai_label.main(cai_label.CAILabelConfig(pairs=str(path), rubric="builtin:instructions",
                                                  output=str(tmp_path / "out")))  # fmt: skip
    [row] = [json.loads(x) for x in (out / "pairs.jsonl").read_text().splitlines()]
    assert row["chosen"] == reference and row["rubric"] == "builtin:instructions"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["kept"] == 1.0 and metrics["unparseable"] == 0
