"""Generate and score: the shared engine of ``rlhfkit eval``, ``rs``, ``bon`` and ``filter``.

1. :func:`rlhfkit.data.prompts.load_prompt_rows`: a prompt source (any schema with a ``prompt``)
   rendered for sampling, with the fields every reward may ask for (``prompt``, ``answer``,
   ``verifier`` and the row's other fields).
2. :func:`sample_grid`: N completions for each of M prompts with a :class:`Generator`, in chunks
   of prompts so that the KV cache stays bounded.
3. :func:`score_grid`: the weighted sum of the named rewards for every completion, as an (M, N)
   matrix (NaN where a reward skipped a completion). Batched scorers (reward models) get the
   completions sorted by length, longest first, so that each batch pads little; the scores are
   put back in the original order.
4. :func:`cache_key` / :class:`GridCache`: samples and scores are cached on disk under a hash of
   everything that determines them (the model's files, the prompts, the sampling settings and,
   for scores, the reward specs and weights), so a re-run after a crash or with another
   selection rule reuses them.

:func:`sample_grid` with :func:`open_sampler`'s generator (rlhfkit's sampler on the loaded model,
or a vLLM server on it with ``--engine.backend vllm``), or
:func:`rlhfkit.rollout.sampler.chat_generator` on a model in training, is also how ``generate``,
``dpo online`` and the DPO evaluation sample: every command samples through one Generator.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from rlhfkit.atomic import atomic_write_text
from rlhfkit.config import EngineConfig, ModelConfig
from rlhfkit.data.prompts import PromptRow
from rlhfkit.models.load import load_model, load_tokenizer
from rlhfkit.models.precision import default_device, resolve_precision
from rlhfkit.models.steering import attach_steering
from rlhfkit.rewards import load_reward_fn, score_completions
from rlhfkit.rewards.shaping import weighted_sum
from rlhfkit.rollout.hf import SamplingConfig
from rlhfkit.rollout.sampler import Generator, HFGenerator, chat_generator
from rlhfkit.rollout.vllm import VLLMGenerator
from rlhfkit.rollout.vllm_server import require_engine, vllm_server


def load_sampler(
    cfg: ModelConfig, tokenizer: Any = None
) -> tuple[torch.nn.Module, Any, HFGenerator]:
    """The model (eval mode, compute dtype), its tokenizer and a KV-cache sampler on it.

    Args:
        cfg: Which model, at which precision.
        tokenizer: The model's tokenizer if the caller has loaded it already.
    """
    device = default_device()
    precision = resolve_precision(cfg.precision, device)
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.name, trust_remote_code=cfg.trust_remote_code)
    model = load_model(
        cfg.name, dtype=precision.compute, attn_implementation=cfg.attn_implementation,
        trust_remote_code=cfg.trust_remote_code, device=device, keep_layers=cfg.keep_layers,
    ).eval()  # fmt: skip
    attach_steering(model, cfg)  # --model.steer: the answers are steered
    return model, tokenizer, chat_generator(model, tokenizer)


@contextlib.contextmanager
def open_sampler(
    cfg: ModelConfig,
    tokenizer: Any,
    engine: EngineConfig | None = None,
    *,
    seed: int = 0,
    log_dir: Path | None = None,
) -> Iterator[Generator]:
    """A sampler on the model ``cfg`` names, on the engine ``engine`` names; freed on exit.

    ``hf`` (or None) loads the model and samples with rlhfkit's KV-cache sampler; ``vllm``
    starts a vLLM server on the model's directory (the model is not loaded here) or attaches to
    ``engine.vllm_url``, and stops a server it started.

    Args:
        cfg: Which model, at which precision.
        tokenizer: The model's tokenizer (its end-of-turn id ends completions).
        engine: The engine section of the command (None: ``hf``).
        seed: The engine's seed (vLLM).
        log_dir: Where the vLLM server's log goes (a temporary directory when None).
    """
    if engine is None or engine.backend == "hf":
        model, _, generator = load_sampler(cfg, tokenizer)
        try:
            yield generator
        finally:
            del model, generator
        return
    require_engine(engine, cfg)  # a model the engine cannot serve as asked
    compute = resolve_precision(cfg.precision, default_device()).compute
    with vllm_server(engine, cfg.name, compute, seed=seed, log_dir=log_dir) as server:
        yield VLLMGenerator(server, eos_ids=[tokenizer.eos_token_id])


@dataclass
class Grid:
    """N completions for each of M prompts (row i, column j: completion j of prompt i).

    Attributes:
        texts: (M, N) decoded completions.
        lengths: (M, N) completion lengths in tokens (the stop token included).
        finish: (M, N) finish reasons (``eos``, ``stop`` or ``length``).
        rewards: (M, N) weighted rewards, NaN where skipped; empty until scored.
        components: Each reward's (M, N) values (None where it skipped).
    """

    texts: list[list[str]]
    lengths: list[list[int]]
    finish: list[list[str]]
    rewards: list[list[float]] = field(default_factory=list)
    components: dict[str, list[list[float | None]]] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        """(M, N)."""
        return len(self.texts), len(self.texts[0]) if self.texts else 0

    def reward_matrix(self) -> torch.Tensor:
        """The rewards as an (M, N) fp64 tensor (NaN = skipped)."""
        if not self.rewards:
            raise ValueError("the grid has not been scored")
        return torch.tensor(self.rewards, dtype=torch.float64)  # (M, N)


def _rows(flat: Sequence[Any], n: int) -> list[list[Any]]:
    return [list(flat[i : i + n]) for i in range(0, len(flat), n)]


def sample_grid(
    generator: Any,
    tokenizer: Any,
    prompts: Sequence[PromptRow],
    sampling: SamplingConfig,
    *,
    chunk: int = 32,
    progress: Callable[[int], None] | None = None,
) -> Grid:
    """``sampling.num_samples`` completions of every prompt, ``chunk`` prompts at a time.

    Each chunk is sampled with the seed ``sampling.seed + first prompt index``, so the result
    does not depend on the chunk size's effect on the random stream of other chunks.

    Args:
        generator: A :class:`rlhfkit.rollout.sampler.Generator`.
        tokenizer: Decodes the completions (special tokens removed).
        prompts: The prompts.
        sampling: Sampling settings (N = ``num_samples``).
        chunk: Prompts per generator call.
        progress: Called with the number of prompts done after each chunk.
    """
    n = sampling.num_samples
    texts, lengths, finish = [], [], []
    for start in range(0, len(prompts), chunk):
        part = prompts[start : start + chunk]
        seeded = SamplingConfig(**{**asdict(sampling), "seed": sampling.seed + start})
        rollout = generator.generate([p.ids for p in part], seeded)
        texts += tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
        lengths += [len(c) for c in rollout.completion_ids]
        finish += list(rollout.finish_reasons)
        if progress is not None:
            progress(start + len(part))
    return Grid(_rows([t.strip() for t in texts], n), _rows(lengths, n), _rows(finish, n))


def score_sorted(
    fn: Callable[..., Any], completions: Sequence[str], fields: Sequence[dict[str, Any]]
) -> list[float | None]:
    """:func:`score_completions`, with batched scorers fed the completions longest first.

    The permutation is undone before returning, so the result equals unsorted scoring.
    """
    if getattr(fn, "score_batch", None) is None:
        return score_completions(fn, completions, fields)
    order = sorted(range(len(completions)), key=lambda i: -len(completions[i]))
    values = score_completions(fn, [completions[i] for i in order], [fields[i] for i in order])
    out: list[float | None] = [None] * len(completions)
    for position, i in enumerate(order):
        out[i] = values[position]
    return out


def load_rewards(specs: Sequence[str]) -> list[Callable[..., Any]]:
    """The reward functions named by ``specs`` (see :func:`rlhfkit.rewards.load_reward_fn`)."""
    if not specs:
        raise ValueError("give at least one reward (e.g. verifier:auto or rm:runs/rm/final)")
    return [load_reward_fn(spec) for spec in specs]


def score_grid(
    grid: Grid,
    prompts: Sequence[PromptRow],
    specs: Sequence[str],
    fns: Sequence[Callable[..., Any]],
    weights: Sequence[float] = (),
) -> Grid:
    """Fill ``grid.rewards`` (sum_k w_k r_k) and ``grid.components`` in place; returns it."""
    weights = list(weights) or [1.0] * len(specs)
    if len(weights) != len(specs):
        raise ValueError(f"{len(specs)} rewards but {len(weights)} weights")
    m, n = grid.shape
    flat = [t for row in grid.texts for t in row]
    fields = [prompts[i].fields for i in range(m) for _ in range(n)]
    components = {spec: score_sorted(fn, flat, fields) for spec, fn in zip(specs, fns, strict=True)}
    total = weighted_sum(components, dict(zip(specs, weights, strict=True)))
    grid.rewards = _rows([math.nan if v is None else v for v in total], n)
    grid.components = {k: _rows(v, n) for k, v in components.items()}
    return grid


def reward_fingerprints(rewards: Sequence[str]) -> list[str]:
    """What identifies each reward: its spec, plus the weights of the reward models it names.

    A retrained reward model at the same path must not find the old model's cached scores.
    """
    out = []
    for spec in rewards:
        dirs = []
        if spec.startswith("rm:"):
            dirs = [spec.removeprefix("rm:")]
        elif spec.startswith("rm-ensemble:"):
            dirs = spec.removeprefix("rm-ensemble:").partition(":")[2].split(",")
        out.append("|".join([spec, *(model_fingerprint(d) for d in dirs)]))
    return out


def model_fingerprint(name: str) -> str:
    """What identifies a model's weights: the name, plus file sizes and times for a local dir."""
    path = Path(name)
    if not path.is_dir():
        return name
    files = sorted(
        (p.name, p.stat().st_size, p.stat().st_mtime_ns)
        for p in path.iterdir()
        if p.suffix in {".safetensors", ".bin", ".gguf", ".json"}
    )
    return json.dumps([str(path.resolve()), files])


def cache_key(**parts: Any) -> str:
    """A short hash of JSON-serialisable ``parts`` (order of keyword arguments irrelevant)."""
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class GridCache:
    """Samples and scores on disk: ``<dir>/samples-<key>.json`` and ``scores-<key>.json``.

    Files are written atomically, so an interrupted run leaves either a complete file or none.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.dir = Path(directory).expanduser()

    def _path(self, kind: str, key: str) -> Path:
        return self.dir / f"{kind}-{key}.json"

    def load_samples(self, key: str) -> Grid | None:
        """The cached samples under ``key``, or None."""
        path = self._path("samples", key)
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        return Grid(data["texts"], data["lengths"], data["finish"])

    def save_samples(self, key: str, grid: Grid) -> Path:
        """Write the samples of ``grid`` under ``key``."""
        self.dir.mkdir(parents=True, exist_ok=True)
        data = {"texts": grid.texts, "lengths": grid.lengths, "finish": grid.finish}
        path = self._path("samples", key)
        atomic_write_text(path, json.dumps(data))
        return path

    def load_scores(self, key: str, grid: Grid) -> bool:
        """Fill ``grid``'s rewards from the cache under ``key``; False when there are none."""
        path = self._path("scores", key)
        if not path.is_file():
            return False
        data = json.loads(path.read_text())
        grid.rewards = [[math.nan if v is None else v for v in row] for row in data["rewards"]]
        grid.components = data["components"]
        return True

    def save_scores(self, key: str, grid: Grid) -> Path:
        """Write the rewards and components of ``grid`` under ``key`` (NaN stored as null)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        rewards = [[None if math.isnan(v) else v for v in row] for row in grid.rewards]
        path = self._path("scores", key)
        atomic_write_text(path, json.dumps({"rewards": rewards, "components": grid.components}))
        return path
