"""Multi-turn rollouts: the trajectory's ids, its mask, and every limit of an episode."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence

import pytest

from rlhfkit.data.prompts import PromptRow
from rlhfkit.data.tasks.tool_tasks import calculator_rows, guess_number_rows
from rlhfkit.envs.builtin import CalculatorEnv, GuessNumberEnv
from rlhfkit.models.tiny import tiny_tokenizer
from rlhfkit.rollout.hf import SamplingConfig
from rlhfkit.rollout.multiturn import (
    TurnLimits,
    env_prompt_rows,
    episode_means,
    observation_ids,
    run_episodes,
)
from rlhfkit.types import Rollout

VERBATIM_CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""ChatML that renders every message as it stands (no trimming): it preserves prefixes."""


class Scripted:
    """A generator whose reply to a context is ``reply(context_text)``, ended by <|im_end|>.

    Its ids are the tokeniser's encoding of the reply; each gets log-prob -0.5.
    """

    def __init__(self, tokenizer, reply: Callable[[str], str], max_ids: int | None = None):
        self.tokenizer, self.reply, self.max_ids = tokenizer, reply, max_ids
        self.calls: list[list[list[int]]] = []

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig) -> Rollout:
        self.calls.append([list(p) for p in prompts])
        ids, reasons = [], []
        for prompt in prompts:
            text = self.tokenizer.decode(list(prompt))
            for _ in range(sampling.num_samples):
                out = self.tokenizer(self.reply(text), add_special_tokens=False)["input_ids"]
                out = [*out, self.tokenizer.eos_token_id]
                cut = min(len(out), sampling.max_new_tokens)
                ids.append(out[:cut])
                reasons.append("eos" if cut == len(out) else "length")
        return Rollout.grouped(prompts, sampling.num_samples, ids,
                               [[-0.5] * len(x) for x in ids], reasons)  # fmt: skip


def call(expression: str) -> str:
    body = json.dumps({"name": "calculator", "arguments": {"expression": expression}})
    return f"<tool_call>\n{body}\n</tool_call>"


def calculator_reply(context: str) -> str:
    """Call the calculator on the problem's numbers, then answer with its result."""
    if "<|im_start|>tool" not in context:
        return call("347 * 128")
    result = context.rsplit("<|im_start|>tool\n", 1)[1].split("<|im_end|>")[0]
    return f"The answer is {result}."


@pytest.fixture
def tokenizer():
    tok = copy.deepcopy(tiny_tokenizer())  # tiny_tokenizer() is shared: change a copy only
    tok.chat_template = VERBATIM_CHATML
    return tok


def calculator_setup(tokenizer, **env_options):
    row = {
        **calculator_rows(1, seed=3)[0],
        "answer": str(347 * 128),
        "tool_call": {"name": "calculator", "arguments": {"expression": "347*128"}},
    }
    make = lambda: CalculatorEnv(**env_options)  # noqa: E731
    return env_prompt_rows(tokenizer, [PromptRow([], row)], make), make


def run(tokenizer, rows, make, reply, limits=None, g=1, max_new_tokens=256, **kw):
    generator = Scripted(tokenizer, reply)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, num_samples=g, temperature=1.0)
    return run_episodes(generator, tokenizer, rows, make, sampling, limits or TurnLimits(), **kw)


def test_trajectory_is_the_generated_ids_plus_the_observation_ids(tokenizer):
    rows, make = calculator_setup(tokenizer)
    episodes = run(tokenizer, rows, make, calculator_reply)
    ids, mask = episodes.rollout.completion_ids[0], episodes.rollout.masks[0]
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    first = [*enc(call("347 * 128")), tokenizer.eos_token_id]
    second = [*enc("The answer is 44416."), tokenizer.eos_token_id]
    conversation = episodes.conversations[0]
    obs = observation_ids(tokenizer, conversation[:-2], [conversation[-2]], None)
    assert ids == first + obs + second
    assert mask == [True] * len(first) + [False] * len(obs) + [True] * len(second)
    assert len(mask) == len(ids) == len(episodes.rollout.logprobs[0])
    assert episodes.rollout.logprobs[0] == [-0.5] * len(first) + [0.0] * len(obs) + [-0.5] * len(
        second
    )
    assert tokenizer.decode(obs) == "\n<|im_start|>tool\n44416<|im_end|>\n<|im_start|>assistant\n"
    assert episodes.rewards == [1.0]
    info = episodes.info[0]
    assert info["calls"] == 1 and info["malformed_calls"] == 0 and info["turns"] == 2
    assert info["right_tool"] == 1 and info["right_arguments"] == 1 and info["answered"] == 1
    assert episodes.rollout.finish_reasons == ["eos"]


def test_a_prefix_preserving_template_gives_the_whole_conversation(tokenizer):
    rows, make = calculator_setup(tokenizer)
    episodes = run(tokenizer, rows, make, calculator_reply)
    whole = tokenizer.apply_chat_template(episodes.conversations[0], tokenize=False)
    expected = tokenizer(whole, add_special_tokens=False)["input_ids"]
    got = episodes.rollout.prompt_ids[0] + episodes.rollout.completion_ids[0]
    assert got + tokenizer("\n", add_special_tokens=False)["input_ids"] == expected


def test_each_round_generates_for_the_live_episodes_only(tokenizer):
    """G episodes of a prompt share the first call; later rounds carry one context each."""
    rows, make = calculator_setup(tokenizer)
    generator = Scripted(tokenizer, calculator_reply)
    sampling = SamplingConfig(max_new_tokens=256, num_samples=3, temperature=1.0)
    episodes = run_episodes(generator, tokenizer, rows, make, sampling, TurnLimits())
    assert len(generator.calls[0]) == 1 and len(generator.calls[1]) == 3
    assert episodes.rollout.prompt_index == [0, 0, 0] and episodes.rewards == [1.0] * 3


def test_the_turn_cap_ends_an_episode_that_keeps_calling(tokenizer):
    rows, make = calculator_setup(tokenizer)
    episodes = run(tokenizer, rows, make, lambda _: call("1 + 1"), TurnLimits(max_turns=3))
    assert episodes.rollout.finish_reasons == ["turns"]
    assert episodes.info[0]["turns"] == 3 and episodes.rewards == [0.0]
    assert episodes.info[0]["calls"] == 3
    mask = episodes.rollout.masks[0]  # three policy turns, two observations between them
    runs = [k for k in range(1, len(mask)) if mask[k] != mask[k - 1]]
    assert len(runs) == 4 and mask[0] and mask[-1]


def test_malformed_calls_are_reported_to_the_model_not_raised(tokenizer):
    rows, make = calculator_setup(tokenizer)
    replies = iter(["<tool_call>{not json</tool_call>", "The answer is 44416."])
    episodes = run(tokenizer, rows, make, lambda _: next(replies))
    assert episodes.info[0]["malformed_calls"] == 1 and episodes.rewards == [1.0]
    tool = [m for m in episodes.conversations[0] if m["role"] == "tool"]
    assert len(tool) == 1 and tool[0]["content"].startswith("error:")


def test_a_tool_error_reaches_the_model(tokenizer):
    rows, make = calculator_setup(tokenizer)
    replies = iter([call("1 / 0"), "The answer is 44416."])
    episodes = run(tokenizer, rows, make, lambda _: next(replies))
    tool = [m for m in episodes.conversations[0] if m["role"] == "tool"]
    assert "ZeroDivisionError" in tool[0]["content"] and episodes.info[0]["tool_errors"] == 1


def test_the_token_cap_stops_a_trajectory(tokenizer):
    rows, make = calculator_setup(tokenizer)
    episodes = run(tokenizer, rows, make, lambda _: call("1 + 1"), TurnLimits(max_tokens=60))
    assert episodes.rollout.finish_reasons == ["length"]
    assert len(episodes.rollout.completion_ids[0]) <= 60


def test_a_turn_cut_by_max_new_tokens_is_not_shown_to_the_environment(tokenizer):
    rows, make = calculator_setup(tokenizer)
    episodes = run(tokenizer, rows, make, calculator_reply, max_new_tokens=5)
    assert episodes.rollout.finish_reasons == ["length"] and episodes.info[0]["turns"] == 1
    assert "calls" not in episodes.info[0] and all(episodes.rollout.masks[0])


def test_long_tool_output_is_cut_to_the_observation_cap(tokenizer):
    def shout(text: str) -> str:
        """Repeat a text.

        Args:
            text: What to repeat.
        """
        return text * 400

    row = {"prompt": "Shout.", "answer": "x"}
    make = lambda: CalculatorEnv(tools=[shout], isolation="inline")  # noqa: E731
    rows = env_prompt_rows(tokenizer, [PromptRow([], row)], make)
    body = json.dumps({"name": "shout", "arguments": {"text": "ab"}})
    replies = iter([f"<tool_call>\n{body}\n</tool_call>", "x"])
    episodes = run(tokenizer, rows, make, lambda _: next(replies),
                   TurnLimits(max_observation_tokens=60))  # fmt: skip
    mask = episodes.rollout.masks[0]
    assert 0 < mask.count(False) <= 60
    tool = [m for m in episodes.conversations[0] if m["role"] == "tool"]
    assert tool[0]["content"].endswith("[truncated]")


def test_guess_the_number_by_bisection_wins(tokenizer):
    row = guess_number_rows(1, seed=0)[0]
    make = GuessNumberEnv
    rows = env_prompt_rows(tokenizer, [PromptRow([], row)], make)
    state = {"low": 1, "high": row["high"]}

    def bisect(context: str) -> str:
        last = context.rsplit("<|im_start|>user\n", 1)[1]
        guess = (state["low"] + state["high"]) // 2
        if "Higher" in last:
            state["low"] = state.pop("guess") + 1
        elif "Lower" in last:
            state["high"] = state.pop("guess") - 1
        guess = (state["low"] + state["high"]) // 2
        state["guess"] = guess
        return str(guess)

    episodes = run(tokenizer, rows, make, bisect, TurnLimits(max_turns=7))
    assert episodes.rewards == [1.0] and episodes.info[0]["turns"] <= 7
    assert episodes.info[0]["inconsistent"] == 0
    stats = episode_means(episodes.info)
    assert stats["env/success"] == 1.0 and stats["env/solved"] == 1.0


def test_a_turn_ended_by_a_stop_string_gets_the_marker_from_the_environment(tokenizer):
    """Stopping at </tool_call>: <|im_end|> was not sampled, so the observation starts with it."""
    rows, make = calculator_setup(tokenizer)

    class StopAtCall(Scripted):
        def generate(self, prompts, sampling):
            out = super().generate(prompts, sampling)
            for i, ids in enumerate(out.completion_ids):
                if "</tool_call>" in self.tokenizer.decode(ids):
                    out.completion_ids[i] = ids[:-1]  # no <|im_end|>: stopped at the string
                    out.logprobs[i] = out.logprobs[i][:-1]
                    out.finish_reasons[i] = "stop"
            return out

    generator = StopAtCall(tokenizer, calculator_reply)
    sampling = SamplingConfig(max_new_tokens=256, num_samples=1, temperature=1.0)
    episodes = run_episodes(generator, tokenizer, rows, make, sampling, TurnLimits())
    whole = tokenizer.apply_chat_template(episodes.conversations[0], tokenize=False)
    expected = tokenizer(whole, add_special_tokens=False)["input_ids"]
    got = episodes.rollout.prompt_ids[0] + episodes.rollout.completion_ids[0]
    assert got + tokenizer("\n", add_special_tokens=False)["input_ids"] == expected
    first_hole = episodes.rollout.masks[0].index(False)
    assert episodes.rollout.completion_ids[0][first_hole] == tokenizer.eos_token_id
    assert episodes.rewards == [1.0]


def test_calculator_traces_label_the_assistant_turns_only():
    """SFT on a tool-use trace: the call and the answer are labelled, the tool's output not."""
    from rlhfkit.data.tasks import builtin_rows
    from rlhfkit.data.templates import render_messages
    from rlhfkit.envs.builtin import calculator
    from rlhfkit.envs.calls import get_format

    tok = tiny_tokenizer()  # not changed here
    row = builtin_rows("calculator_traces", "heldout")[0].data
    messages = row["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "assistant"]
    (call,) = get_format("hermes").parse(messages[2]["content"]).calls
    assert calculator(**call.arguments) == messages[3]["content"]
    ex = render_messages(tok, messages, mask_mode="all_assistant_turns")
    labelled = tok.decode([i for i, m in zip(ex.input_ids, ex.loss_mask, strict=True) if m])
    assert labelled == messages[2]["content"] + "<|im_end|>" + messages[4]["content"] + "<|im_end|>"


def test_env_options_are_checked_before_loading(tmp_path):
    from rlhfkit.config import EnvConfig, from_dict
    from rlhfkit.envs.base import env_factory
    from rlhfkit.errors import ConfigError
    from rlhfkit.recipes.policy_gradient.config import PGConfig
    from rlhfkit.validation import config_problems

    cfg = from_dict(PGConfig, {"env": {"name": "calculator", "max_turns": 0, "options": "[1]"}})
    problems = config_problems(cfg)
    assert "--env.max-turns: must be at least 1, got 0" in problems
    assert any(p.startswith("--env.options: must be a JSON object") for p in problems)
    with pytest.raises(ConfigError, match="unknown environment 'calculater'"):
        env_factory(EnvConfig(name="calculater"))
    with pytest.raises(ConfigError, match="do not fit CalculatorEnv"):
        env_factory(EnvConfig(name="calculator", options='{"colour": 1}'))
    with pytest.raises(ConfigError, match="cannot import"):
        env_factory(EnvConfig(name="no_such_module:Env"))


def test_a_template_without_the_eos_marker_is_refused(tokenizer):
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    tokenizer.eos_token = "<|endoftext|>"  # not what the template ends turns with
    with pytest.raises(ValueError, match="does not end a turn"):
        observation_ids(tokenizer, conversation, [{"role": "user", "content": "again"}], None)
