r"""Multi-turn rollouts: the policy and an environment take turns, tools run between turns.

An episode's *trajectory* is everything after the prompt: the policy's turns and, between them,
the environment's answers (tool results, a game's feedback) with the chat template's markers
around them. It is one row of the rollout, with a mask that is True on the policy's tokens and
False on the environment's, so tool output is a hole inside the row: it conditions the later
turns but takes no part in any loss, advantage or KL.

One round of :func:`run_episodes`:

1. Every live episode's context (prompt + trajectory so far) goes to the generator in one batch
   (the first round samples ``num_samples`` episodes per prompt; later rounds one per episode).
   A turn ends at the end-of-turn id (or a stop string), or at ``sampling.max_new_tokens``.
2. Each turn's ids and sampler log-probs are appended as they were sampled: the trajectory is
   never re-tokenised, so the learner scores exactly the ids the policy drew.
3. The turn's text goes to ``env.step``. When the episode goes on, the environment's messages
   are rendered by the chat template after the turn's end-of-turn marker, with the next
   generation prompt (``<|im_end|>`` has been sampled; ``\n<|im_start|>tool\n...<|im_end|>\n
   <|im_start|>assistant\n`` is the observation), tokenised, capped at
   ``max_observation_tokens`` and appended with mask False and log-prob 0. A turn that ended at
   a stop string (``</tool_call>``) rather than the end-of-turn id gets the marker as the
   first part of the observation.

An episode ends when the environment says done (finish ``eos``/``stop`` as the sampler reports
the last turn), when a turn is cut by the token limit (``length``: the environment does not see
a half-written turn), after ``max_turns`` turns (``turns``), or when the trajectory would pass
``max_tokens`` (``length``). Its reward is the sum of the environment's step rewards.

For a chat template that renders every message as it stands (no trimming, no rewriting of
earlier turns), prompt + trajectory equals the template applied to the whole conversation
whenever the policy's ids are the tokeniser's own encoding of its text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from rlhfkit.config import EnvConfig
from rlhfkit.data.prompts import PromptRow
from rlhfkit.envs.base import Environment, Message, with_tools
from rlhfkit.rollout.hf import SamplingConfig
from rlhfkit.rollout.sampler import Generator
from rlhfkit.types import Rollout

TURNS = "turns"
"""Finish reason of an episode stopped by ``max_turns``."""


@dataclass
class TurnLimits:
    """Bounds of a multi-turn episode.

    Attributes:
        max_turns: Policy turns per episode.
        max_tokens: Trajectory tokens per episode (the policy's and the environment's).
        max_observation_tokens: Tokens of one environment answer (longer tool output is cut).
    """

    max_turns: int = 8
    max_tokens: int = 1024
    max_observation_tokens: int = 256

    @classmethod
    def of(cls, env: EnvConfig) -> TurnLimits:
        """The limits an ``--env`` section sets."""
        return cls(env.max_turns, env.max_tokens, env.max_observation_tokens)


@dataclass
class Episode:
    """One episode in progress: its environment, conversation and trajectory."""

    env: Environment
    prompt_ids: list[int]
    messages: list[Message]
    tools: list[dict] | None
    ids: list[int] = field(default_factory=list)
    mask: list[bool] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    entropies: list[float] = field(default_factory=list)
    reward: float = 0.0
    info: dict[str, float] = field(default_factory=dict)
    turns: int = 0
    finish: str | None = None
    last_reply: str = ""

    def add(self, ids: Sequence[int], policy: bool, logprobs=None, entropies=None) -> None:
        """Append ids of the policy (with their log-probs) or of the environment (mask False)."""
        self.ids += ids
        self.mask += [policy] * len(ids)
        self.logprobs += list(logprobs) if logprobs is not None else [0.0] * len(ids)
        self.entropies += list(entropies) if entropies else [0.0] * len(ids)


@dataclass
class Episodes:
    """Finished episodes, as a rollout plus what the environment said.

    Attributes:
        rollout: One row per episode (grouped by prompt), ``masks`` True on the policy's tokens.
        rewards: Each episode's summed step rewards.
        info: Each episode's counters (the environment's, summed) plus ``turns``, ``reward``,
            ``turn_capped`` and ``truncated`` (0 or 1) and ``policy_token_share``.
        replies: Each episode's last policy turn, as text (what reward functions score).
        conversations: Each episode's messages (the opening ones included).
    """

    rollout: Rollout
    rewards: list[float]
    info: list[dict[str, float]]
    replies: list[str]
    conversations: list[list[Message]]


def render(tokenizer: Any, messages: Sequence[Message], tools: list[dict] | None, gen: bool) -> str:
    """The chat template's text of ``messages`` (with ``tools`` when the template takes them)."""
    kwargs = {"tools": tools} if tools else {}
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=gen, **kwargs
    )


def env_prompt_rows(
    tokenizer: Any,
    rows: Sequence[PromptRow],
    make_env: Callable[[], Environment],
    *,
    native_tools: bool = False,
    max_prompt_len: int | None = None,
) -> list[PromptRow]:
    """The rows with their prompts as the environment opens them (tools in the system prompt).

    ``env.reset`` must give the same opening for the same row (the episodes of a group share
    it). The fields are kept as they are: each episode's ``env.reset`` reads them again.
    """
    out = []
    for row in rows:
        env = make_env()
        messages, tools = with_tools(
            env.reset(row.fields), env.tools, env.call_format, native=native_tools
        )
        ids = list(tokenizer(render(tokenizer, messages, tools, True), add_special_tokens=False)
                   ["input_ids"])  # fmt: skip
        if max_prompt_len is not None:
            ids = ids[-max_prompt_len:]
        out.append(PromptRow(ids, row.fields, row.location))
    return out


def observation_ids(
    tokenizer: Any,
    conversation: Sequence[Message],
    answer: Sequence[Message],
    tools: list[dict] | None,
    *,
    marker_sampled: bool = True,
) -> list[int]:
    """Token ids of the environment's ``answer`` after the conversation's last (policy) turn.

    The text the template puts after the last turn's end-of-turn marker, through the next
    generation prompt: ``render(conversation + answer, gen) - render(conversation)`` cut at
    the marker, which the policy has already sampled. A turn that ended at a stop string
    (``</tool_call>``, say) has no marker yet: with ``marker_sampled`` False the observation
    starts with it.

    Raises:
        ValueError: The template does not keep the conversation as a prefix of its extension.
    """
    before = render(tokenizer, conversation, tools, False)
    after = render(tokenizer, [*conversation, *answer], tools, True)
    eos = tokenizer.eos_token
    found = before.rfind(eos) if eos else -1
    if found < 0:
        raise ValueError(
            f"the chat template does not end a turn with the tokenizer's eos_token {eos!r}, so "
            "the end of the policy's turn cannot be found in the rendered conversation"
        )
    end = found if not marker_sampled else found + len(eos)
    if not after.startswith(before[:end]):
        raise ValueError(
            "the chat template rewrites earlier turns when a message is added, so an "
            "environment's answer cannot be appended to the sampled ids"
        )
    return list(tokenizer(after[end:], add_special_tokens=False)["input_ids"])


def capped_observation(
    tokenizer: Any,
    conversation: Sequence[Message],
    answer: list[Message],
    tools: list[dict] | None,
    cap: int,
    marker_sampled: bool = True,
) -> tuple[list[int], list[Message]]:
    """Observation ids within ``cap`` tokens: the longest message contents cut as needed.

    Returns the ids and the answer as rendered (contents cut, marked ``[truncated]``).
    """
    ids = observation_ids(tokenizer, conversation, answer, tools, marker_sampled=marker_sampled)
    marker = " [truncated]"
    extra = len(tokenizer(marker, add_special_tokens=False)["input_ids"]) + 2
    for _ in range(4):
        if len(ids) <= cap:
            break
        excess = len(ids) - cap
        longest = max(range(len(answer)), key=lambda i: len(str(answer[i].get("content", ""))))
        content = tokenizer(str(answer[longest]["content"]), add_special_tokens=False)
        keep = max(0, len(content["input_ids"]) - excess - extra)
        text = tokenizer.decode(content["input_ids"][:keep]) + marker
        answer = [*answer[:longest], {**answer[longest], "content": text}, *answer[longest + 1 :]]
        ids = observation_ids(tokenizer, conversation, answer, tools, marker_sampled=marker_sampled)
    return ids, answer


def _advance(tokenizer: Any, ep: Episode, turn: list[int], finish: str, limits: TurnLimits) -> None:
    """Give the environment the episode's new turn; append its answer or end the episode."""
    ep.turns += 1
    text = tokenizer.decode(turn, skip_special_tokens=True)
    ep.last_reply = text
    if finish == "length":
        ep.finish = "length"  # a half-written turn is not shown to the environment
        return
    step = ep.env.step(text)
    ep.reward += float(step.reward)
    for key, value in step.info.items():
        ep.info[key] = ep.info.get(key, 0.0) + float(value)
    ep.messages.append({"role": "assistant", "content": text})
    if step.done:
        ep.finish = finish
        return
    if ep.turns >= limits.max_turns:
        ep.finish = TURNS
        return
    obs, shown = capped_observation(
        tokenizer, ep.messages, list(step.messages), ep.tools, limits.max_observation_tokens,
        marker_sampled=bool(turn) and turn[-1] == tokenizer.eos_token_id,
    )  # fmt: skip
    if len(obs) > limits.max_observation_tokens or len(ep.ids) + len(obs) >= limits.max_tokens:
        ep.finish = "length"
        return
    ep.messages += shown
    ep.add(obs, policy=False)


def run_episodes(
    generator: Generator,
    tokenizer: Any,
    rows: Sequence[PromptRow],
    make_env: Callable[[], Environment],
    sampling: SamplingConfig,
    limits: TurnLimits,
    *,
    native_tools: bool = False,
) -> Episodes:
    """``sampling.num_samples`` episodes of every row (rows from :func:`env_prompt_rows`).

    Returns:
        The episodes grouped by row (episode ``i * G + j`` is sample ``j`` of row ``i``).
    """
    g = sampling.num_samples
    episodes = []
    for row in rows:
        for _ in range(g):
            env = make_env()
            opening = env.reset(row.fields)
            messages, tools = with_tools(opening, env.tools, env.call_format, native=native_tools)
            episodes.append(Episode(env, list(row.ids), messages, tools))
    round_ = 0
    while live := [ep for ep in episodes if ep.finish is None]:
        budget = max(limits.max_tokens - len(ep.ids) for ep in live)
        turn_sampling = replace(
            sampling, num_samples=g if round_ == 0 else 1, seed=sampling.seed + 7919 * round_,
            max_new_tokens=max(1, min(sampling.max_new_tokens, budget)),
        )  # fmt: skip
        contexts = [r.ids for r in rows] if round_ == 0 else [ep.prompt_ids + ep.ids for ep in live]
        out = generator.generate(contexts, turn_sampling)
        for k, ep in enumerate(live):
            room = limits.max_tokens - len(ep.ids)
            turn, finish = out.completion_ids[k], out.finish_reasons[k]
            if len(turn) > room:
                turn, finish = turn[:room], "length"
            entropies = out.entropies[k][: len(turn)] if out.entropies else None
            ep.add(turn, policy=True, logprobs=out.logprobs[k][: len(turn)], entropies=entropies)
            _advance(tokenizer, ep, turn, finish, limits)
        round_ += 1
    rollout = Rollout.grouped(
        [r.ids for r in rows], g, [ep.ids for ep in episodes], [ep.logprobs for ep in episodes],
        [ep.finish or "length" for ep in episodes], [ep.entropies for ep in episodes],
    )  # fmt: skip
    rollout.masks = [ep.mask for ep in episodes]
    return Episodes(
        rollout, [ep.reward for ep in episodes], [_info(ep) for ep in episodes],
        [ep.last_reply for ep in episodes], [ep.messages for ep in episodes],
    )  # fmt: skip


def _info(ep: Episode) -> dict[str, float]:
    """An episode's counters with its turns, reward, how it ended and its share of policy ids."""
    return {
        **ep.info, "turns": float(ep.turns), "reward": ep.reward,
        "turn_capped": float(ep.finish == TURNS), "truncated": float(ep.finish == "length"),
        "policy_token_share": sum(ep.mask) / max(1, len(ep.mask)),
    }  # fmt: skip


def episode_means(infos: Sequence[dict[str, float]]) -> dict[str, float]:
    """Means over episodes for the log (``env/<counter>``), and ``env/success``.

    A counter an episode does not report (``right_tool`` when its row names no call) is
    averaged over the episodes that report it; success is the share with a positive reward.
    """
    if not infos:
        return {}
    keys = sorted({k for info in infos for k in info})
    out = {}
    for key in keys:
        values = [info[key] for info in infos if key in info]
        out[f"env/{key}"] = sum(values) / len(values)
    out["env/success"] = sum(info.get("reward", 0.0) > 0 for info in infos) / len(infos)
    return out
