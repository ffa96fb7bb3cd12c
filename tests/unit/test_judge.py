"""LLM-as-judge: parsers, position swap, ratings, backends."""

from __future__ import annotations

import re
import socket

import pytest

from fake_openai import FakeOpenAI
from rlhfkit.rewards.base import score_completions
from rlhfkit.rewards.judge import (
    PAIRWISE_SYSTEM,
    RATING_SYSTEM,
    ChatBackend,
    JudgeBackendError,
    JudgeResult,
    LocalChatBackend,
    OpenAIChatBackend,
    PairwiseJudge,
    RatingJudge,
    judge_reward,
    load_backend,
    pairwise_messages,
    parse_rating,
    parse_verdict,
    rating_messages,
    win_rate,
)

KEY = "sk-test-secret-123"


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests to the fake server must not go through a proxy from the environment."""
    for name in (
        "http_proxy",
        "HTTP_PROXY",
        "https_proxy",
        "HTTPS_PROXY",
        "all_proxy",
        "ALL_PROXY",
    ):
        monkeypatch.delenv(name, raising=False)


# --- parsers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "verdict"),
    [
        ("[[A]]", "A"),
        ("Assistant B is more accurate.\n\n[[B]]", "B"),
        ("Both are fine, so it is a tie: [[C]]", "C"),
        # a verdict quoted inside the explanation, then the final one: the last counts
        ("The format asks for [[A]] or [[B]]; B is wrong, so [[A]]", "A"),
        ("First I thought [[A]], but on reflection [[B]]. Final: [[C]]", "C"),
        ("[[ b ]].", "B"),
        ("verdict: **[[a]]**", "A"),
        ("[[\tC\n]]", "C"),
        ("no verdict at all", None),
        ("", None),
        ("[A]", None),
        ("[[D]]", None),
        ("[[AB]]", None),
        ("[[Tie]]", None),
        ("[[A]", None),
        ("[[B]] then a bogus [[D]]", "B"),  # only A/B/C count
    ],
)
def test_parse_verdict(text: str, verdict: str | None) -> None:
    assert parse_verdict(text) == verdict


@pytest.mark.parametrize(
    ("text", "rating"),
    [
        ("Rating: [[7]]", 7.0),
        ("[[10]]", 10.0),
        ("[[1]]", 1.0),
        ("[[7.5]]", 7.5),
        ("[[ 8 ]].", 8.0),
        ("[[7/10]]", 7.0),
        ("[[ 9 / 10 ]]", 9.0),
        ("I'd say [[3]] at first... no, [[9]]", 9.0),
        ("[[0]]", None),
        ("[[11]]", None),
        ("[[10.5]]", None),
        ("[[9]] then [[12]]", None),  # the last number is out of range: no rating
        ("[[rating]]", None),
        ("[[-3]]", None),
        ("[[A]]", None),
        ("7/10", None),
        ("", None),
    ],
)
def test_parse_rating(text: str, rating: float | None) -> None:
    assert parse_rating(text) == rating


# --- prompts -----------------------------------------------------------------------------------


def test_pairwise_messages_show_both_replies_in_order() -> None:
    chat = pairwise_messages("What is 2 + 3?", "It is 5.", "It is 6.")
    assert [m["role"] for m in chat] == ["system", "user"]
    assert chat[0]["content"] == PAIRWISE_SYSTEM
    for word in ("impartial", "order", "length", "names", "[[A]]", "[[B]]", "[[C]]"):
        assert word in chat[0]["content"]
    user = chat[1]["content"]
    assert "User: What is 2 + 3?" in user
    assert user.index("[Reply of Assistant A]\nIt is 5.") < user.index(
        "[Reply of Assistant B]\nIt is 6."
    )
    assert "Reference" not in user and "reference" not in chat[0]["content"]


def test_pairwise_messages_reference_and_multi_turn() -> None:
    conversation = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": "Another one?"},
    ]
    chat = pairwise_messages(conversation, "Blue.", "Red.", reference="Any colour but red.")
    user = chat[1]["content"]
    turns = ["System: Be terse.", "User: Name a colour.", "Assistant: Red.", "User: Another one?"]
    positions = [user.index(t) for t in turns]
    assert positions == sorted(positions)
    assert user.index("[Reference answer]\nAny colour but red.") < user.index(
        "[Reply of Assistant A]"
    )
    assert "reference answer" in chat[0]["content"]


def test_rating_messages() -> None:
    chat = rating_messages([{"role": "user", "content": "Hi"}], "Hello!", reference="Hello.")
    assert chat[0]["content"].startswith(RATING_SYSTEM)
    assert "[[rating]]" in chat[0]["content"] and "1" in chat[0]["content"]
    user = chat[1]["content"]
    assert "User: Hi" in user and "[Reply of the assistant]\nHello!" in user
    assert "[Reference answer]\nHello." in user
    assert "Reference" not in rating_messages("Hi", "Hello!")[1]["content"]


@pytest.mark.parametrize("bad", [[], [{"content": "no role"}], ["a string"]])
def test_bad_prompt_raises(bad: list) -> None:
    with pytest.raises(ValueError, match="judge prompt"):
        pairwise_messages(bad, "a", "b")


# --- mock judges -------------------------------------------------------------------------------


class MockBackend:
    """A ChatBackend answering each chat with ``fn(chat)``; records every call."""

    def __init__(self, fn) -> None:
        self.fn, self.calls = fn, []

    def complete(self, messages_batch, *, max_tokens, temperature=0.0):
        self.calls.append((len(messages_batch), max_tokens, temperature))
        return [self.fn(m) for m in messages_batch]


def shown_replies(chat: list[dict[str, str]]) -> tuple[str, str]:
    """(reply shown as A, reply shown as B) in a pairwise chat."""
    user = chat[1]["content"]
    a = re.search(r"\[Reply of Assistant A\]\n(.*?)\n\[End of Reply of Assistant A\]", user, re.S)
    b = re.search(r"\[Reply of Assistant B\]\n(.*?)\n\[End of Reply of Assistant B\]", user, re.S)
    assert a and b
    return a.group(1), b.group(1)


def longer_wins(chat: list[dict[str, str]]) -> str:
    """An order-robust judge: the longer reply wins, equal lengths tie; garbage for '???'."""
    a, b = shown_replies(chat)
    if "???" in a + b:
        return "I cannot decide."
    verdict = "A" if len(a) > len(b) else "B" if len(b) > len(a) else "C"
    return f"Assistant {verdict} gives more detail. [[{verdict}]]"


def test_mock_backend_is_a_chat_backend() -> None:
    assert isinstance(MockBackend(longer_wins), ChatBackend)


def test_always_a_judge_gives_ties_after_swap() -> None:
    backend = MockBackend(lambda chat: "Assistant A is better. [[A]]")
    result = PairwiseJudge(backend).compare(["p1", "p2", "p3"], ["x", "yy", "z"], ["zz", "y", "z"])
    assert result.scores == [0.5, 0.5, 0.5]
    assert result.consistency == 0.0
    assert result.ties == 3 and result.unparseable == 0
    assert result.verdicts == [("A", "A")] * 3
    assert win_rate(result) == 0.5
    assert backend.calls == [(6, 256, 0.0)]  # both orders of every pair in one batch


def test_always_a_judge_without_swap_always_picks_a() -> None:
    backend = MockBackend(lambda chat: "[[A]]")
    result = PairwiseJudge(backend, swap=False, max_tokens=32).compare(
        ["p", "q"], ["x", "y"], ["z", "w"]
    )
    assert result.scores == [1.0, 1.0]
    assert result.consistency is None
    assert result.verdicts == [("A", None), ("A", None)]
    assert result.outputs == [("[[A]]", None), ("[[A]]", None)]
    assert backend.calls == [(2, 32, 0.0)]


def test_order_robust_judge_gives_consistent_wins() -> None:
    a = ["long answer", "s", "same", "a much longer answer"]
    b = ["short", "longer", "SAME", "tiny"]
    result = PairwiseJudge(MockBackend(longer_wins)).compare(["p"] * 4, a, b)
    assert result.scores == [1.0, 0.0, 0.5, 1.0]
    assert result.verdicts == [("A", "B"), ("B", "A"), ("C", "C"), ("A", "B")]
    assert result.consistency == 1.0
    assert result.ties == 1 and result.unparseable == 0
    assert win_rate(result) == pytest.approx(2.5 / 4)
    assert result.outputs[0][0].endswith("[[A]]") and result.outputs[0][1].endswith("[[B]]")


def test_swapped_order_really_shows_b_first() -> None:
    seen = []
    backend = MockBackend(lambda chat: seen.append(shown_replies(chat)) or "[[C]]")
    PairwiseJudge(backend).compare(["p"], ["alpha"], ["beta"])
    assert seen == [("alpha", "beta"), ("beta", "alpha")]


def test_inconsistent_partial_disagreement_is_a_tie() -> None:
    # A wins when shown first, tie when shown second: the orders disagree -> tie (0.5)
    backend = MockBackend(lambda chat: "[[A]]" if shown_replies(chat)[0] == "x" else "[[C]]")
    result = PairwiseJudge(backend).compare(["p"], ["x"], ["y"])
    assert result.scores == [0.5] and result.consistency == 0.0


def test_unparseable_verdicts_are_counted_and_excluded() -> None:
    a = ["long answer", "???", "x", "bbb"]
    b = ["short", "fine", "yy", "a"]
    result = PairwiseJudge(MockBackend(longer_wins)).compare(["p"] * 4, a, b)
    assert result.scores == [1.0, None, 0.0, 1.0]
    assert result.unparseable == 1 and result.unparseable_outputs == 2
    assert result.consistency == 1.0  # among pairs parsed in both orders
    assert win_rate(result) == pytest.approx(2 / 3)
    metrics = result.metrics()
    assert metrics == {
        "win_rate": pytest.approx(2 / 3),
        "pairs": 4,
        "ties": 0,
        "unparseable": 1,
        "unparseable_outputs": 2,
        "consistency": 1.0,
    }


def test_one_unparseable_order_voids_the_pair() -> None:
    backend = MockBackend(lambda chat: "[[A]]" if shown_replies(chat)[0] == "x" else "hmm")
    result = PairwiseJudge(backend).compare(["p"], ["x"], ["y"])
    assert result.scores == [None] and result.verdicts == [("A", None)]
    assert result.unparseable == 1 and result.unparseable_outputs == 1
    assert result.consistency is None and win_rate(result) is None


def test_win_rate_of_plain_scores() -> None:
    assert win_rate([1.0, 0.0, 0.5, None, 1.0]) == pytest.approx(0.625)
    assert win_rate([None, None]) is None
    assert win_rate([]) is None
    assert (
        win_rate(JudgeResult([0.0, 0.5], [("B", "A"), ("C", "C")], [("", ""), ("", "")], True))
        == 0.25
    )


def test_references_reach_the_judge() -> None:
    seen = []
    backend = MockBackend(lambda chat: seen.append(chat[1]["content"]) or "[[C]]")
    PairwiseJudge(backend).compare(["p", "q"], ["a", "b"], ["c", "d"], references=["R1", None])
    assert "[Reference answer]\nR1" in seen[0] and "[Reference answer]\nR1" in seen[2]
    assert "Reference" not in seen[1] and "Reference" not in seen[3]


def test_length_mismatch_raises() -> None:
    judge = PairwiseJudge(MockBackend(longer_wins))
    with pytest.raises(ValueError, match="differ in length"):
        judge.compare(["p", "q"], ["a", "b"], ["c"])
    with pytest.raises(ValueError, match="differ in length"):
        judge.compare(["p"], ["a"], ["c"], references=["r", "s"])


def test_backend_returning_too_few_replies_raises() -> None:
    class Short:
        def complete(self, messages_batch, *, max_tokens, temperature=0.0):
            return ["[[A]]"]

    with pytest.raises(ValueError, match="1 replies for 4 chats"):
        PairwiseJudge(Short()).compare(["p", "q"], ["a", "b"], ["c", "d"])


# --- ratings -----------------------------------------------------------------------------------


def rate_by_length(chat: list[dict[str, str]]) -> str:
    """Rating = length of the reply (so 0 and > 10 are out of range); garbage for '???'."""
    reply = re.search(r"\[Reply of the assistant\]\n(.*?)\n\[End of", chat[1]["content"], re.S)
    assert reply
    text = reply.group(1)
    return "No idea." if text == "???" else f"Rating: [[{len(text)}]]"


def test_rating_judge_rates_and_counts_unparseable() -> None:
    backend = MockBackend(rate_by_length)
    judge = RatingJudge(backend, max_tokens=64)
    result = judge.rate(["p"] * 4, ["abc", "???", "abcdefghijkl", "abcdefghij"])
    assert result.scores == [3.0, None, None, 10.0]
    assert result.unparseable == 2
    assert result.outputs[0] == "Rating: [[3]]"
    assert backend.calls == [(4, 64, 0.0)]
    assert (judge.rated, judge.unparseable) == (4, 2)


def test_rating_judge_is_a_batched_reward() -> None:
    seen = []

    def fn(chat):
        seen.append(chat[1]["content"])
        return rate_by_length(chat)

    judge = RatingJudge(MockBackend(fn))
    fields = [
        {"prompt": [{"role": "user", "content": "Say hi"}], "reference": "hi"},
        {"prompt": "Count", "answer": "3"},
    ]
    assert score_completions(judge, ["hello", "1 2 3 4"], fields) == [5.0, 7.0]
    assert "User: Say hi" in seen[0] and "[Reference answer]\nhi" in seen[0]
    assert "Reference" not in seen[1]
    assert judge(completion="hey", prompt="Greet") == 3.0
    with pytest.raises(ValueError, match="completion 0: the judge needs the example's 'prompt'"):
        judge.score_batch(["x"], [{"answer": "1"}])


def test_rating_judge_reference_field() -> None:
    seen = []
    judge = RatingJudge(
        MockBackend(lambda chat: seen.append(chat[1]["content"]) or "[[5]]"),
        reference_field="answer",
    )
    assert judge.score_batch(["x"], [{"prompt": "2 + 2?", "answer": 4}]) == [5.0]
    assert "[Reference answer]\n4" in seen[0]


# --- OpenAI-compatible backend against a local fake server ---------------------------------------


def echo(body: dict) -> str:
    return "echo:" + body["messages"][-1]["content"]


def test_openai_backend_request_and_reply(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JUDGE_TEST_KEY", KEY)
    with FakeOpenAI(echo) as server:
        backend = OpenAIChatBackend(
            server.base_url + "/", "fake-judge", api_key_env="JUDGE_TEST_KEY"
        )
        chats = [
            [{"role": "system", "content": "S"}, {"role": "user", "content": f"q{i}"}]
            for i in range(3)
        ]
        assert backend.complete(chats, max_tokens=17) == ["echo:q0", "echo:q1", "echo:q2"]
        assert isinstance(backend, ChatBackend)
    assert len(server.requests) == 3
    for request in server.requests:
        assert request["path"] == "/v1/chat/completions"
        assert request["headers"]["authorization"] == f"Bearer {KEY}"
        assert request["headers"]["content-type"] == "application/json"
        body = request["body"]
        assert set(body) == {"model", "messages", "temperature", "max_tokens"}
        assert body["model"] == "fake-judge" and body["max_tokens"] == 17
        assert body["temperature"] == 0.0
        assert body["messages"][0] == {"role": "system", "content": "S"}
    assert sorted(r["body"]["messages"][1]["content"] for r in server.requests) == [
        "q0",
        "q1",
        "q2",
    ]
    assert KEY not in repr(backend)


def test_openai_backend_without_key_sends_no_authorization(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JUDGE_TEST_KEY", raising=False)
    with FakeOpenAI(echo) as server:
        backend = OpenAIChatBackend(server.base_url, "m", api_key_env="JUDGE_TEST_KEY")
        assert backend.complete([[{"role": "user", "content": "x"}]], max_tokens=4) == ["echo:x"]
        assert backend.complete([], max_tokens=4) == []
    assert "authorization" not in server.requests[0]["headers"]


def test_openai_backend_retries_429_then_succeeds() -> None:
    with FakeOpenAI(echo, statuses=[429, 503]) as server:
        backend = OpenAIChatBackend(server.base_url, "m", backoff=0.0, concurrency=1)
        assert backend.complete([[{"role": "user", "content": "x"}]], max_tokens=4) == ["echo:x"]
    assert len(server.requests) == 3  # 429, 503, then success


def test_openai_backend_500_forever_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    with FakeOpenAI(echo, status_forever=500) as server:
        backend = OpenAIChatBackend(server.base_url, "m", max_retries=2, backoff=0.0)
        with pytest.raises(JudgeBackendError) as err:
            backend.complete([[{"role": "user", "content": "x"}]], max_tokens=4)
    message = str(err.value)
    assert f"{server.base_url}/chat/completions" in message
    assert "HTTP 500" in message and "fake error 500" in message and "3 attempts" in message
    assert KEY not in message
    assert len(server.requests) == 3  # 1 + max_retries


def test_openai_backend_client_error_is_not_retried() -> None:
    with FakeOpenAI(echo, status_forever=401) as server:
        backend = OpenAIChatBackend(server.base_url, "m", backoff=0.0)
        with pytest.raises(JudgeBackendError, match=r"/v1/chat/completions: HTTP 401"):
            backend.complete([[{"role": "user", "content": "x"}]], max_tokens=4)
    assert len(server.requests) == 1


def test_openai_backend_bad_answer_is_a_clear_error() -> None:
    with FakeOpenAI(echo) as server:
        server._answer = lambda body: (200, {"choices": []})  # type: ignore[method-assign]
        backend = OpenAIChatBackend(server.base_url, "m")
        with pytest.raises(JudgeBackendError, match=r"no choices\[0\]\.message\.content"):
            backend.complete([[{"role": "user", "content": "x"}]], max_tokens=4)


def test_openai_backend_connection_refused_is_retried_then_raises() -> None:
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = OpenAIChatBackend(f"http://127.0.0.1:{port}/v1", "m", max_retries=1, backoff=0.0)
    with pytest.raises(
        JudgeBackendError, match=rf"127\.0\.0\.1:{port}/v1/chat/completions.*2 attempts"
    ):
        backend.complete([[{"role": "user", "content": "x"}]], max_tokens=4)


@pytest.mark.parametrize("url", ["127.0.0.1:8000/v1", "ftp://host/v1", "http://"])
def test_openai_backend_rejects_bad_urls(url: str) -> None:
    with pytest.raises(ValueError, match="http"):
        OpenAIChatBackend(url, "m")


def test_openai_backend_concurrency_keeps_order() -> None:
    def delay(body: dict) -> float:  # earlier requests answer later
        return 0.01 * (8 - int(body["messages"][-1]["content"][1:]))

    with FakeOpenAI(echo, delay=delay) as server:
        backend = OpenAIChatBackend(server.base_url, "m", concurrency=4)
        chats = [[{"role": "user", "content": f"q{i}"}] for i in range(8)]
        assert backend.complete(chats, max_tokens=4) == [f"echo:q{i}" for i in range(8)]
    assert 2 <= server.max_in_flight <= 4
    with FakeOpenAI(echo, delay=delay) as server:
        serial = OpenAIChatBackend(server.base_url, "m", concurrency=1)
        assert serial.complete(chats[:3], max_tokens=4) == ["echo:q0", "echo:q1", "echo:q2"]
    assert server.max_in_flight == 1


def test_pairwise_judge_over_http_end_to_end() -> None:
    with FakeOpenAI(lambda body: longer_wins(body["messages"])) as server:
        judge = PairwiseJudge(OpenAIChatBackend(server.base_url, "m"))
        result = judge.compare(["p"] * 3, ["long answer", "a", "same"], ["short", "bb", "SAME"])
    assert result.scores == [1.0, 0.0, 0.5] and result.consistency == 1.0
    assert len(server.requests) == 6


# --- specs ---------------------------------------------------------------------------------------


def test_judge_reward_openai_spec_scores_completions() -> None:
    with FakeOpenAI(lambda body: rate_by_length(body["messages"])) as server:
        reward = judge_reward(f"judge:openai:{server.base_url}#fake-judge", backoff=0.0)
        assert isinstance(reward, RatingJudge)
        assert isinstance(reward.backend, OpenAIChatBackend)
        assert reward.backend.url == f"{server.base_url}/chat/completions"
        values = score_completions(reward, ["abcd", "???"], [{"prompt": "p"}, {"prompt": "q"}])
    assert values == [4.0, None] and reward.unparseable == 1
    assert {r["body"]["model"] for r in server.requests} == {"fake-judge"}


@pytest.mark.parametrize(
    "spec", ["judge:openai:http://127.0.0.1:1/v1", "judge:openai:#m", "judge:openai:http://h/v1#"]
)
def test_bad_openai_specs(spec: str) -> None:
    with pytest.raises(ValueError, match="openai:<base_url>#<model>"):
        load_backend(spec)


# --- local backend (tiny random model) -----------------------------------------------------------


def test_local_backend_batches_keep_order(tiny_model_dir) -> None:
    backend = LocalChatBackend(str(tiny_model_dir), precision="fp32", batch_size=2)
    # the random model only writes whitespace; forbid it so that each prompt gets visible text
    blank = [i for i in range(len(backend.tokenizer)) if not backend.tokenizer.decode([i]).strip()]

    def no_blank(module, args, kwargs, out):
        out.logits[..., blank] = -1e4
        return out

    backend.model.register_forward_hook(no_blank, with_kwargs=True)
    chats = [
        [{"role": "user", "content": "What is 2 + 3?"}],
        [{"role": "user", "content": "Write a haiku about the sea. Reverse the word cat"}],
        [{"role": "system", "content": "List three colours"}, {"role": "user", "content": "red"}],
    ]
    batched = backend.complete(chats, max_tokens=4)
    alone = [backend.complete([c], max_tokens=4)[0] for c in chats]
    assert batched == alone
    assert all(batched) and len(set(batched)) > 1
    assert all(len(backend.tokenizer(t)["input_ids"]) <= 4 for t in batched)
    with pytest.raises(ValueError, match="temperature 0"):
        backend.complete(chats, max_tokens=4, temperature=0.7)
    with pytest.raises(ValueError, match="tokenizer"):
        LocalChatBackend(model=backend.model)
