"""``rlhfkit eval``: run a model on an evaluation set and score it (docs/methods/evaluation.md).

The loop:

1. Load the prompts (``data.source``; by default the held-out split of the built-in arithmetic
   task) and render them with the model's chat template.
2. Sample N = ``sampling.num_samples`` completions per prompt (greedy by default, N = 1; with
   T > 0 and N > 1 the pass@k family becomes meaningful).
3. Score every completion with the rewards (``verifier:auto`` by default: the verifier each row
   names; a reward model ``rm:<dir>``, a judge or any ``module:function`` works the same way).
   A completion is correct when its reward reaches ``threshold``.
   With ``--env.name`` each sample is an episode in that environment instead
   (:func:`evaluate_env`).
4. Report: accuracy (Avg@N), pass@k and pass^k (unbiased estimators, for every k in ``ks``
   up to N), maj@k (majority vote over the extracted answers of the first k samples), mean
   reward, length statistics and finish reasons, overall and per ``task`` field; JSON (with
   every sample when ``samples_output`` is set) plus a printed table.

Samples and scores are cached under ``cache_dir`` by a hash of the model files, prompts and
settings (:class:`rlhfkit.eval.run.GridCache`); a second run with the same inputs only reports.

With ``--env.name`` (:func:`evaluate_env`) the rows of ``data.source`` (by default the
environment's own held-out tasks) are opened by the environment, each sample is an episode (the
turn and token limits of ``--env``), its reward the environment's, and the report adds how the
tools were used (``episodes``): turns, tool calls, ``valid_calls`` (well-formed calls with
fitting arguments / calls made), ``right_tool`` and ``right_arguments`` (the first call against
the row's ``tool_call``), tool errors, turn-capped and truncated episodes.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from rlhfkit.atomic import atomic_write_text
from rlhfkit.config import EngineConfig, EnvConfig, ModelConfig
from rlhfkit.data.prompts import PromptRow, load_prompt_rows
from rlhfkit.envs.base import env_class, env_factory
from rlhfkit.eval.run import (
    Grid,
    GridCache,
    cache_key,
    load_rewards,
    model_fingerprint,
    open_sampler,
    reward_fingerprints,
    sample_grid,
    score_grid,
)
from rlhfkit.eval.summary import grid_report, print_grid_report
from rlhfkit.models.load import load_tokenizer
from rlhfkit.rewards.base import rewards_problems
from rlhfkit.rollout.hf import SamplingConfig
from rlhfkit.rollout.multiturn import TurnLimits, env_prompt_rows, episode_means, run_episodes
from rlhfkit.rollout.vllm_server import require_engine

log = logging.getLogger(__name__)


@dataclass
class EvalDataConfig:
    """The evaluation prompts."""

    source: str = "builtin:arithmetic"
    """A .jsonl/.json/.parquet/.csv file, a hub dataset, builtin:NAME, gsm8k:FILE or rgym:NAME."""
    split: str = "heldout"
    """Split of a hub or built-in source."""
    schema: str = "verifiable"
    """Row format (any schema with a prompt; 'verifiable' rows carry the answer)."""
    limit: int | None = None
    """Use only the first N rows."""
    max_prompt_len: int = 512
    """Prompts longer than this keep their last tokens."""
    distinct: bool = False
    """Keep each distinct prompt once (preference data repeats a prompt for each pair)."""
    max_prompts: int | None = None
    """Keep at most this many prompts (after distinct)."""


@dataclass
class EvalConfig:
    """rlhfkit eval: accuracy, pass@k, maj@k, reward and length statistics of a model."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(max_new_tokens=256, temperature=0.0)
    )
    engine: EngineConfig = field(default_factory=EngineConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    """With ``--env.name``: episodes in that environment (tool use, games), scored by its
    reward, with tool-use figures in the report's ``episodes``."""
    rewards: tuple[str, ...] = ("verifier:auto",)
    """Scorers: verifier:NAME (auto: each row's own), rm:DIR, rm-ensemble:MODE:DIR,DIR,
    judge:MODEL, rubric:FILE (|judge:MODEL, |implicit), module:function or file.py:fn."""
    weights: tuple[float, ...] = ()
    """One weight per reward (default 1 each)."""
    threshold: float = 1.0
    """A completion is correct when its reward is at least this."""
    ks: tuple[int, ...] = (1,)
    """The k of pass@k, pass^k and maj@k (those above N are left out)."""
    chunk: int = 32
    """Prompts per generator call."""
    cache_dir: str | None = "~/.cache/rlhfkit/samples"
    """Where samples and scores are cached (None: no cache)."""
    output: str | None = None
    """Write the report as JSON here."""
    samples_output: str | None = None
    """Write every sample (prompt, completion, reward, length, finish) as JSONL here."""

    def problems(self) -> list[tuple[str, str]]:
        """Rewards that cannot load, found before any model loads."""
        return rewards_problems(self.rewards)


def evaluate_prompts(
    model_cfg: ModelConfig,
    prompts: list[PromptRow] | None,
    data: EvalDataConfig,
    sampling: SamplingConfig,
    rewards: tuple[str, ...],
    weights: tuple[float, ...] = (),
    *,
    chunk: int = 32,
    cache_dir: str | None = None,
    engine: EngineConfig | None = None,
    log_dir: Path | None = None,
) -> tuple[list[PromptRow], Any]:
    """Steps 1-3: the prompts and their scored (M, N) grid (loaded from the cache if there).

    The model's weights are loaded (or its vLLM server started, per ``engine``) only when the
    samples are not in the cache (the tokenizer is needed either way: it renders the prompts,
    which are part of the cache key). ``log_dir`` keeps a vLLM server's log.
    """
    tokenizer = load_tokenizer(model_cfg.name, trust_remote_code=model_cfg.trust_remote_code)
    if prompts is None:
        prompts = load_prompt_rows(
            tokenizer, data.source, data.schema, split=data.split, limit=data.limit,
            max_prompt_len=data.max_prompt_len, distinct=data.distinct,
            max_prompts=data.max_prompts,
        )  # fmt: skip
    cache = GridCache(cache_dir) if cache_dir else None
    on_engine = {} if engine is None or engine.backend == "hf" else {"engine": engine.backend}
    sample_key = cache_key(
        model=model_fingerprint(model_cfg.name), precision=model_cfg.precision,
        prompts=[p.ids for p in prompts], sampling=asdict(sampling), **on_engine,
    )  # fmt: skip
    grid = cache.load_samples(sample_key) if cache else None
    if grid is None:
        columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn())
        with (
            open_sampler(model_cfg, tokenizer, engine, seed=sampling.seed, log_dir=log_dir) as gen,
            Progress(*columns, TimeElapsedColumn(), TimeRemainingColumn()) as bar,
        ):
            task = bar.add_task(f"sample x{sampling.num_samples}", total=len(prompts))
            grid = sample_grid(
                gen, tokenizer, prompts, sampling, chunk=chunk,
                progress=lambda done: bar.update(task, completed=done),
            )  # fmt: skip
        if cache:
            cache.save_samples(sample_key, grid)
    score_key = cache_key(samples=sample_key, rewards=reward_fingerprints(rewards),
                          weights=list(weights))  # fmt: skip
    if not (cache and cache.load_scores(score_key, grid)):
        score_grid(grid, prompts, rewards, load_rewards(rewards), weights)
        if cache:
            cache.save_scores(score_key, grid)
    return prompts, grid


def write_samples(path: str | Path, prompts: list[PromptRow], grid: Any) -> None:
    """Every sample as one JSONL row: prompt messages, answer, completion, reward, length."""
    lines = []
    for i, p in enumerate(prompts):
        for j, text in enumerate(grid.texts[i]):
            row = {
                "prompt": p.fields["prompt"], "answer": p.fields.get("answer"), "sample": j,
                "completion": text, "reward": grid.rewards[i][j], "length": grid.lengths[i][j],
                "finish": grid.finish[i][j],
            }  # fmt: skip
            lines.append(json.dumps(row))
    atomic_write_text(path, "\n".join(lines) + "\n")


def main(cfg: EvalConfig) -> dict[str, Any]:
    """Steps 1-4; returns the report (also printed, and written to ``cfg.output``)."""
    require_engine(cfg.engine)
    if cfg.env.name is not None:
        return evaluate_env(cfg)
    prompts, grid = evaluate_prompts(
        cfg.model, None, cfg.data, cfg.sampling, cfg.rewards, cfg.weights,
        chunk=cfg.chunk, cache_dir=cfg.cache_dir, engine=cfg.engine,
    )  # fmt: skip
    report = grid_report(grid, [p.fields for p in prompts], ks=cfg.ks, threshold=cfg.threshold)
    report["config"] = {
        "model": cfg.model.name, "source": cfg.data.source, "split": cfg.data.split,
        "sampling": asdict(cfg.sampling), "rewards": list(cfg.rewards),
        "engine": cfg.engine.backend,
    }  # fmt: skip
    print_grid_report(report, title=f"{cfg.model.name} on {cfg.data.source}[{cfg.data.split}]")
    if cfg.output:
        atomic_write_text(cfg.output, json.dumps(report, indent=2))
        log.info("report written to %s", cfg.output)
    if cfg.samples_output:
        write_samples(cfg.samples_output, prompts, grid)
    return report


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


def evaluate_env(cfg: EvalConfig) -> dict[str, Any]:
    """Steps 1-3 of an evaluation in ``cfg.env``; returns the report (printed and written)."""
    make_env = env_factory(cfg.env)
    data = cfg.data
    if data.source == EvalDataConfig.source:
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
