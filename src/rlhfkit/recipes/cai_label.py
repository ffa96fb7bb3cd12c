"""``rlhfkit cai label`` (AI preference labels) and ``rlhfkit cai rubric`` (generated checklists).

``cai label``: Constitutional AI's RL stage, or RLAIF. Each pair of replies to a prompt is put to
a judge model under a principle drawn from the constitution, in both orders
(:func:`rlhfkit.rewards.ai_labels.label_pairs`); with ``--rubric`` the pair is labelled by its
rubric scores instead. Input rows have a ``prompt`` (a string or messages) and two replies,
``a`` and ``b`` or ``chosen`` and ``rejected`` (whose existing order is ignored). Written under
``--output``:

- ``labels.jsonl``: per input pair, the principle, both verdicts, the judge's answers, the
  label (``a``, ``b`` or null) and, where the backend gives verdict log-probs, ``p_a``;
- ``pairs.jsonl``: ``preference`` rows of the pairs that kept a label, with the principle and,
  from the soft label, ``p_chosen`` and ``margin`` = log(p_chosen / (1 - p_chosen)) (for the
  reward model's margin loss);
- ``metrics.json``: pairs, kept, consistency, position bias, unparseable answers, soft labels.

Pairs are labelled ``--chunk`` at a time and ``labels.jsonl`` grows by whole chunks, so the same
command continues where it stopped; the judge's answers are kept in ``--cache`` as well, so a
rerun from scratch asks the judge nothing.

``cai rubric``: a model writes a rubric (7-20 weighted criteria) for each prompt; the rows are
written with a ``rubric`` field, ready for ``--rewards rubric:<file>|judge:<model>``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rlhfkit.atomic import atomic_write_text
from rlhfkit.data.constitution import Constitution, load_constitution
from rlhfkit.data.rubric import load_rubrics
from rlhfkit.data.sources import DataError, load_rows
from rlhfkit.errors import ConfigError
from rlhfkit.recipes.cai import load_prompts, output_dir
from rlhfkit.rewards.ai_labels import label_pairs, verdict_metrics
from rlhfkit.rewards.cache import cached
from rlhfkit.rewards.chat import load_backend
from rlhfkit.rewards.rubric import RubricReward, rubric_problem

log = logging.getLogger(__name__)


@dataclass
class CAILabelConfig:
    """rlhfkit cai label: AI preference labels for pairs of replies (RLAIF / CAI's RL stage)."""

    pairs: str = "runs/cai/pairs.jsonl"
    """Pairs to label: a .jsonl/.json/.parquet/.csv file with 'prompt' and 'a'/'b' (or
    'chosen'/'rejected') per row (default: what rlhfkit cai revise wrote)."""
    split: str = "train"
    """Split of a built-in or hub source."""
    limit: int | None = None
    """Label only the first N pairs (None: all)."""
    judge: str = "smollm2-135m-instruct"
    """The judge: a model name or path, or openai:<base_url>#<model>."""
    constitution: str = "default"
    """The principles: 'default' (shipped) or a .yaml/.json file (those with a 'preference'
    question are used)."""
    rubric: str | None = None
    """Label by this rubric's scores instead (a rubric file or builtin:NAME); rows need the
    fields its rules read (e.g. 'reference')."""
    mode: Literal["auto", "classic", "generative"] = "auto"
    """How the verdict is read: classic (P(A) vs P(B) after "The answer is: (", one forward
    pass; local models), generative (the judge explains, then writes [[A]] or [[B]]), auto
    (classic for a local judge, generative for an endpoint)."""
    max_tokens: int = 256
    """Tokens the judge may write per answer (generative)."""
    seed: int = 0
    """Seed of the principle draws."""
    chunk: int = 32
    """Pairs per judge batch; labels.jsonl grows one chunk at a time."""
    output: str = "runs/cai_labels"
    """Directory for labels.jsonl, pairs.jsonl and metrics.json."""
    cache: str | None = "judge_cache.sqlite"
    """The judge's answers are kept in this file (relative: under --output; None: no cache)."""
    backend_options: dict[str, str] = field(default_factory=dict)
    """Extra options of the backend (e.g. api_key_env for an endpoint)."""

    def problems(self) -> list[tuple[str, str]]:
        """Counts below their minimum, and a rubric that cannot load."""
        out = [(n, f"must be at least 1, got {getattr(self, n)}")
               for n in ("max_tokens", "chunk") if getattr(self, n) < 1]  # fmt: skip
        if self.limit is not None and self.limit < 1:
            out.append(("limit", f"must be at least 1 (or None), got {self.limit}"))
        if self.rubric is not None:
            problem = rubric_problem(f"rubric:{self.rubric}|judge:{self.judge}")
            out += [("rubric", problem)] if problem else []
        return out


def load_pairs(source: str, split: str, limit: int | None) -> list[dict[str, Any]]:
    """Rows with ``prompt``, ``a`` and ``b`` (from ``a``/``b`` or ``chosen``/``rejected``).

    Raises:
        DataError: A row without a prompt or without two replies (naming the row).
    """
    out = []
    for row in load_rows(source, split=split):
        data = dict(row.data)
        keys = ("a", "b") if "a" in data or "b" in data else ("chosen", "rejected")
        for key in keys:
            if not isinstance(data.get(key), str):
                raise DataError(row.location, key, "expected a reply string (rows need a/b or "
                                "chosen/rejected)")  # fmt: skip
        if data.get("prompt") is None:
            raise DataError(row.location, "prompt", "missing")
        out.append({**data, "a": data[keys[0]], "b": data[keys[1]], "id": row.location})
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise ConfigError(f"--pairs {source}: no rows")
    return out


def _complete_lines(path: Path) -> list[str]:
    """The complete lines of ``path`` (a line cut short by a killed run is dropped)."""
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")[:-1]
    if not text.endswith("\n"):
        path.write_text("".join(x + "\n" for x in lines), encoding="utf-8")
    return lines


def _label_chunk(
    cfg: CAILabelConfig, judge: Any, constitution: Constitution | None,
    part: list[dict[str, Any]], start: int,
) -> list[dict[str, Any]]:  # fmt: skip
    """The ``labels.jsonl`` records of one chunk (``judge``: a rubric reward or a backend)."""
    a, b = [p["a"] for p in part], [p["b"] for p in part]
    if isinstance(judge, RubricReward):
        reward = judge
        fields = [{k: v for k, v in p.items() if k not in ("a", "b", "chosen", "rejected")}
                  for p in part]  # fmt: skip
        scores = reward.score_batch([*a, *b], [*fields, *fields])
        n = len(part)
        return [
            {"id": p["id"], "rubric": cfg.rubric, "score_a": sa, "score_b": sb,
             "label": None if sa is None or sb is None or sa == sb else "a" if sa > sb else "b"}
            for p, sa, sb in zip(part, scores[:n], scores[n:], strict=True)
        ]  # fmt: skip
    assert constitution is not None
    labels = label_pairs(judge, [p["prompt"] for p in part], a, b, constitution,
                         seed=cfg.seed, start=start, max_tokens=cfg.max_tokens,
                         mode=cfg.mode)  # fmt: skip
    soft = labels.soft or [None] * len(part)
    return [
        {"id": p["id"], "principle": pr.name, "verdicts": list(v), "outputs": list(o),
         "label": label, "p_a": s}
        for p, pr, v, o, label, s in zip(part, labels.principles, labels.verdicts,
                                         labels.outputs, labels.preferred, soft, strict=True)
    ]  # fmt: skip


def _judge(cfg: CAILabelConfig, cache: Path | None) -> Any:
    """The rubric reward (``--rubric``) or the judge backend, each loaded once per run."""
    if cfg.rubric is None:
        return cached(load_backend(cfg.judge, **cfg.backend_options), cache)
    rubrics = load_rubrics(cfg.rubric)
    backend = None
    if rubrics.needs_judge:  # a rule-checked rubric needs no model at all
        backend = cached(load_backend(cfg.judge, **cfg.backend_options), cache)
    return RubricReward(rubrics, backend, max_tokens=cfg.max_tokens)


def _summary(records: list[dict[str, Any]], pairs: list[dict[str, Any]]) -> tuple[list, dict]:
    """``pairs.jsonl`` rows and ``metrics.json`` from every record."""
    rows, soft = [], []
    for record, pair in zip(records, pairs, strict=True):
        if record["label"] is None:
            continue
        first = record["label"] == "a"
        row = {"prompt": pair["prompt"], "chosen": pair["a"] if first else pair["b"],
               "rejected": pair["b"] if first else pair["a"], "source": "ai"}  # fmt: skip
        row.update({k: record[k] for k in ("principle", "rubric") if k in record})
        if record.get("p_a") is not None:
            p = record["p_a"] if first else 1.0 - record["p_a"]
            soft.append(p)
            row["p_chosen"] = p
            clipped = min(max(p, 1e-6), 1 - 1e-6)
            row["margin"] = math.log(clipped / (1 - clipped))
        rows.append(row)
    if records and "verdicts" in records[0]:
        judged = verdict_metrics([r["label"] for r in records], [r["verdicts"] for r in records])
    else:  # labelled by rubric scores: no verdicts, an ungraded reply leaves no label
        unscored = sum(r["score_a"] is None or r["score_b"] is None for r in records)
        judged = {"pairs": float(len(records)), "kept": len(rows) / len(records),
                  "unparseable": float(unscored)}  # fmt: skip
    metrics = {
        **{k: None if v != v else v for k, v in judged.items()},  # NaN -> null in the JSON
        "soft_labels": len(soft), "mean_p_chosen": sum(soft) / len(soft) if soft else None,
    }  # fmt: skip
    return rows, metrics


def main(cfg: CAILabelConfig) -> Path:
    """Label the pairs; returns the output directory."""
    pairs = load_pairs(cfg.pairs, cfg.split, cfg.limit)
    out = output_dir(cfg.output)
    labels_file = out / "labels.jsonl"
    done = len(_complete_lines(labels_file))
    if done:
        log.info("continuing after %d pairs already labelled in %s", done, labels_file)
    if done < len(pairs):
        cache = None if cfg.cache is None else out / cfg.cache
        judge, constitution = _judge(cfg, cache), None
        if not isinstance(judge, RubricReward):
            constitution = load_constitution(cfg.constitution)
        for first in range(done, len(pairs), cfg.chunk):
            part = pairs[first : first + cfg.chunk]
            records = _label_chunk(cfg, judge, constitution, part, first)
            with labels_file.open("a", encoding="utf-8") as f:
                f.write("".join(json.dumps(r) + "\n" for r in records))
            log.info("%d / %d pairs", first + len(records), len(pairs))
    records = [json.loads(line) for line in _complete_lines(labels_file)][: len(pairs)]
    rows, metrics = _summary(records, pairs)
    atomic_write_text(out / "pairs.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    log.info("labels: %s", metrics)
    return out


@dataclass
class CAIRubricConfig:
    """rlhfkit cai rubric: a model writes a weighted checklist (rubric) for each prompt."""

    prompts: str = "builtin:instructions"
    """Prompt source (a 'prompt' string or 'messages' per row) or builtin:NAME."""
    split: str = "train"
    """Split of a built-in or hub source."""
    limit: int | None = 32
    """Use only the first N prompts (None: all)."""
    model: str = "smollm2-135m-instruct"
    """The model that writes the rubrics: a model name or path, or openai:<base_url>#<model>."""
    max_tokens: int = 512
    """Tokens per rubric."""
    output: str = "runs/cai_rubrics/prompts.jsonl"
    """The prompts with their 'rubric' field (prompts without a usable rubric are left out)."""
    cache: str | None = "judge_cache.sqlite"
    """The model's answers are kept in this file, beside --output (None: no cache)."""
    backend_options: dict[str, str] = field(default_factory=dict)
    """Extra options of the backend."""


def rubric_main(cfg: CAIRubricConfig) -> Path:
    """Write the rubrics; returns the output file."""
    from rlhfkit.rewards.rubric import generate_checklists

    prompts = load_prompts(cfg.prompts, cfg.split, cfg.limit)
    out = Path(cfg.output)
    output_dir(str(out.parent))
    cache = None if cfg.cache is None else out.parent / cfg.cache
    backend = cached(load_backend(cfg.model, **cfg.backend_options), cache)
    rubrics = generate_checklists(backend, prompts, max_tokens=cfg.max_tokens)
    rows = [
        {"prompt": p, "rubric": [
            {"title": c.title, "description": c.description, "weight": c.weight}
            for c in r.criteria]}
        for p, r in zip(prompts, rubrics, strict=True) if r is not None
    ]  # fmt: skip
    atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in rows))
    log.info("rubrics for %d of %d prompts written to %s", len(rows), len(prompts), out)
    return out
