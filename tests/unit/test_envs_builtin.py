"""The built-in environments: the calculator tool, the calculator task and guess-the-number."""

from __future__ import annotations

import pytest

from rlhfkit.data.tasks.tool_tasks import calculator_rows, guess_number_rows
from rlhfkit.envs.base import StepResult, ToolEnv, env_class, with_tools
from rlhfkit.envs.builtin import CalculatorEnv, GuessNumberEnv, calculator


@pytest.mark.parametrize(
    ("expression", "value"),
    [("347 * 128", "44416"), ("(2 + 3) * 4", "20"), ("7 / 2", "3.5"), ("8 / 2", "4"),
     ("2 ** 10", "1024"), ("-3 + 1", "-2"), ("17 // 5 + 17 % 5", "5"), ("6 × 7", "42")],
)  # fmt: skip
def test_calculator_evaluates_exactly(expression, value):
    assert calculator(expression) == value


@pytest.mark.parametrize(
    "expression", ["__import__('os')", "x + 1", "2 ** 1000", "[1, 2]", "'a' * 3", "abs(-1)"]
)
def test_calculator_refuses_anything_but_arithmetic(expression):
    with pytest.raises((ValueError, SyntaxError)):
        calculator(expression)


def test_calculator_env_rewards_the_right_final_number_only():
    row = calculator_rows(1, seed=5)[0]
    env = CalculatorEnv()
    opening = env.reset(row)
    assert opening[-1] == {"role": "user", "content": row["prompt"]}
    assert env.step(f"It is {int(row['answer']) + 1}.") == StepResult(
        [], 0.0, True, {"calls": 0.0, "malformed_calls": 0.0, "answered": 1.0}
    )
    env.reset(row)
    assert env.step(f"The answer is {row['answer']}.").reward == 1.0


def test_a_call_with_wrong_arguments_is_answered_with_the_reason():
    env = CalculatorEnv()
    env.reset(calculator_rows(1, seed=5)[0])
    body = '{"name": "calculator", "arguments": {"expr": "1+1"}}'
    step = env.step(f"<tool_call>\n{body}\n</tool_call>")
    assert not step.done and step.info["tool_errors"] == 1 and step.info["right_tool"] == 1
    assert step.info["right_arguments"] == 0
    assert step.messages[0]["role"] == "tool" and "expr" in step.messages[0]["content"]


def test_tools_go_into_the_system_prompt_or_to_the_template():
    env = CalculatorEnv()
    opening = env.reset(calculator_rows(1, seed=5)[0])
    messages, tools = with_tools(opening, env.tools, env.call_format, native=False)
    assert tools is None and messages[0]["role"] == "system"
    assert '"name": "calculator"' in messages[0]["content"]
    assert messages[0]["content"].endswith(CalculatorEnv.SYSTEM)
    messages, tools = with_tools(opening, env.tools, env.call_format, native=True)
    assert messages == opening and tools == env.tools


def test_guess_the_number_answers_higher_lower_and_ends_on_the_secret():
    row = {**guess_number_rows(1, seed=2)[0], "secret": 37, "high": 100}
    env = GuessNumberEnv()
    env.reset(row)
    low = env.step("I guess 20")
    assert not low.done and "Higher" in low.messages[0]["content"]
    high = env.step("50")
    assert not high.done and "Lower" in high.messages[0]["content"]
    odd = env.step("10")  # below what "higher" ruled out
    assert odd.info["inconsistent"] == 1
    none = env.step("hmm")
    assert none.info == {"invalid": 1.0} and none.messages[0]["role"] == "user"
    win = env.step("37")
    assert win.done and win.reward == 1.0 and win.info["solved"] == 1


def test_guess_the_number_stops_after_max_guesses():
    env = GuessNumberEnv(max_guesses=2)
    env.reset({"secret": 5, "high": 10})
    assert not env.step("1").done
    last = env.step("2")
    assert last.done and last.reward == 0.0 and last.messages == []


def test_builtin_names_resolve():
    assert env_class("calculator") is CalculatorEnv and issubclass(CalculatorEnv, ToolEnv)
    assert env_class("rlhfkit.envs.builtin:GuessNumberEnv") is GuessNumberEnv


def test_a_smaller_range_maps_the_secret_into_it():
    env = GuessNumberEnv(high=10)
    opening = env.reset({"prompt": "Game 7", "secret": 37, "high": 100})
    assert opening[-1]["content"] == (
        "Game 7: I am thinking of a whole number between 1 and 10. Your guess?"
    )
    assert env.secret == 7 and env.step("7").reward == 1.0


def test_guess_number_traces_follow_the_feedback():
    """Each trace is a game the environment would play out: consistent guesses, right end."""
    from rlhfkit.data.tasks import builtin_rows

    rows = [r.data for r in builtin_rows("guess_number_traces", "heldout")[:50]]
    games = [r.data for r in builtin_rows("guess_number", "heldout")[:50]]
    for trace, game in zip(rows, games, strict=True):
        env = GuessNumberEnv(max_guesses=6)
        assert trace["messages"][:2] == env.reset(game)
        for k, message in enumerate(trace["messages"][2:]):
            if message["role"] != "assistant":
                continue
            step = env.step(message["content"])
            assert step.info["inconsistent"] == 0
            follow = trace["messages"][2 + k + 1 :]
            assert step.done == (not follow) or step.messages == follow[:1]
        assert trace["solved"] == (env.guesses <= 6 and step.reward == 1.0)
    assert 0.5 < sum(r["solved"] for r in rows) / len(rows) < 1.0
