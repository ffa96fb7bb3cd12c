"""``rlhfkit eval --env.name ...``: a model's episodes in an environment, and how it used tools.

1. The rows of ``data.source`` (by default the environment's own held-out tasks) are opened by
   the environment (its tools in the system prompt).
2. ``sampling.num_samples`` episodes per row (greedy by default), with the turn and token limits
   of ``--env``.
3. Report: the episode reward's accuracy, pass@k and pass^k (a success is a reward of at least
   ``threshold``), as ``rlhfkit eval`` reports completions, and how the tools were used
   (``episodes``): turns, tool calls per episode, ``valid_calls`` (the share of calls that
   parsed and named their arguments correctly, over episodes that called), ``right_tool`` and
   ``right_arguments`` (the first call against the row's expected ``tool_call``), tool errors,
   turn-capped and truncated episodes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any

from rlhfkit.atomic import atomic_write_text
from rlhfkit.data.prompts import load_prompt_rows
from rlhfkit.envs.base import env_class, env_factory
from rlhfkit.eval.run import Grid, open_sampler
from rlhfkit.eval.summary import grid_report, print_grid_report
from rlhfkit.models.load import load_tokenizer
from rlhfkit.rollout.multiturn import TurnLimits, env_prompt_rows, episode_means, run_episodes

if TYPE_CHECKING:
    from rlhfkit.inference.evaluate import EvalConfig


def tool_use_summary(infos: list[dict[str, float]]) -> dict[str, float]:
    """Episode means (``env/...``) plus ``valid_calls``: well-formed calls / calls made.

    Args:
        infos: Each episode's counters (:func:`rlhfkit.rollout.multiturn.run_episodes`).
    """
    out = {k.removeprefix("env/"): v for k, v in episode_means(infos).items()}
    calls = sum(info.get("calls", 0.0) for info in infos)
    bad = sum(info.get("malformed_calls", 0.0) for info in infos)
    if calls:
        out["valid_calls"] = 1.0 - bad / calls
    return out


def evaluate_env(cfg: EvalConfig, default_source: str) -> dict[str, Any]:
    """Steps 1-3 of an evaluation in ``cfg.env``; returns the report (printed and written)."""
    make_env = env_factory(cfg.env)
    data = cfg.data
    if data.source == default_source:
        data = replace(data, source=getattr(env_class(cfg.env.name), "DATASET", data.source))
    tokenizer = load_tokenizer(cfg.model.name, trust_remote_code=cfg.model.trust_remote_code)
    rows = load_prompt_rows(
        tokenizer, data.source, data.schema, split=data.split, limit=data.limit,
        max_prompt_len=data.max_prompt_len, max_prompts=data.max_prompts,
    )  # fmt: skip
    rows = env_prompt_rows(tokenizer, rows, make_env, native_tools=cfg.env.native_tools)
    limits, n = TurnLimits.of(cfg.env), cfg.sampling.num_samples
    texts, lengths, finish, rewards, infos, conversations = [], [], [], [], [], []
    with open_sampler(cfg.model, tokenizer, cfg.engine, seed=cfg.sampling.seed) as generator:
        for start in range(0, len(rows), cfg.chunk):
            part = rows[start : start + cfg.chunk]
            episodes = run_episodes(
                generator, tokenizer, part, make_env, cfg.sampling, limits,
                native_tools=cfg.env.native_tools,
            )  # fmt: skip
            r = episodes.rollout
            for i in range(len(part)):
                cols = range(i * n, (i + 1) * n)
                texts.append([episodes.replies[k] for k in cols])
                lengths.append([len(r.completion_ids[k]) for k in cols])
                finish.append([r.finish_reasons[k] for k in cols])
                rewards.append([episodes.rewards[k] for k in cols])
            infos += episodes.info
            conversations += episodes.conversations
    grid = Grid(texts, lengths, finish, rewards)
    report = grid_report(grid, [row.fields for row in rows], ks=cfg.ks, threshold=cfg.threshold)
    report["episodes"] = tool_use_summary(infos)
    report["config"] = {
        "model": cfg.model.name, "source": data.source, "split": data.split,
        "env": asdict(cfg.env), "sampling": asdict(cfg.sampling), "engine": cfg.engine.backend,
    }  # fmt: skip
    print_grid_report(report, title=f"{cfg.model.name} in {cfg.env.name} on {data.source}")
    print(json.dumps(report["episodes"], indent=2))
    if cfg.output:
        atomic_write_text(cfg.output, json.dumps(report, indent=2))
    if cfg.samples_output:
        records = [
            {"row": k // n, "sample": k % n, "reward": infos[k].get("reward"),
             "messages": conversations[k], "info": infos[k]}
            for k in range(len(conversations))
        ]  # fmt: skip
        lines = [json.dumps(record) for record in records]
        atomic_write_text(cfg.samples_output, "\n".join(lines) + "\n")
    return report
