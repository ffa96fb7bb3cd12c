"""Step 3 of ``rlhfkit pipeline``: who labels the candidate pairs (``<run>/pairs.jsonl``).

- ``gold``: the built-in task's programmatic judge (reproducible; ties dropped);
- ``judge``: an LLM judge (pairwise, both orders; inconsistent verdicts are ties, dropped);
- ``ai``: AI feedback under a constitution's principles (RLAIF: both orders, inconsistent pairs
  dropped; :mod:`rlhfkit.rewards.ai_labels`);
- ``rubric``: the higher rubric score wins (:mod:`rlhfkit.rewards.rubric`);
- ``human``: the pairs are exported to ``<run>/label_requests.jsonl``; the pipeline stops until
  ``<run>/human_labels.jsonl`` holds a ``{"id", "choice": "a"|"b"|"tie"}`` row per pair, then
  continues.

Every mode writes ``<run>/labels_quality.json``: how many pairs got a preference and how often
it agrees with the gold judge (plus the judge's consistency and position bias in the ai mode).
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from rlhfkit.atomic import atomic_write_text
from rlhfkit.data.tasks.preferences import gold_margin, gold_score, preference_of
from rlhfkit.pipeline.config import PipelineConfig

log = logging.getLogger(__name__)
console = Console()


def jsonl_text(rows: list[dict[str, Any]]) -> str:
    """Rows as JSON lines."""
    return "".join(json.dumps(r) + "\n" for r in rows)


def pairs_of(rows: list[dict[str, Any]], per_prompt: int | None) -> list[dict[str, Any]]:
    """Unlabelled pairs: every two distinct non-blank completions of a prompt, in order.

    These are InstructGPT's K-choose-2 comparisons, at most ``per_prompt`` of them per prompt
    (None: all).

    A pair's ``id`` is ``"<row id>:<i>-<j>"`` (the indices of its two completions).
    """
    pairs = []
    for r in rows:
        texts = r["completions"]
        kept = [i for i, t in enumerate(texts) if t.strip() and t not in texts[:i]]
        combos = [(i, j) for n, i in enumerate(kept) for j in kept[n + 1 :]]
        for i, j in combos[:per_prompt]:
            pairs.append(
                {
                    "id": f"{r['id']}:{i}-{j}",
                    **{k: r[k] for k in ("prompt", "reference", "task")},
                    "a": texts[i],
                    "b": texts[j],
                }
            )
    return pairs


def pair_groups(pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Labelled preference pairs as K = 2 ratings rows (chosen 1.0, rejected 0.0).

    Fields other than ``chosen`` and ``rejected`` are kept (``category``, ``source``, ...).
    """
    return [
        {
            **{k: v for k, v in p.items() if k not in ("chosen", "rejected")},
            "completions": [p["chosen"], p["rejected"]],
            "ratings": [1.0, 0.0],
        }
        for p in pairs
    ]


def gold_groups(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each candidate row's distinct non-blank completions with their gold scores (ratings rows).

    A reward model trained on them with the ``all_pairs`` loss learns all C(K, 2) comparisons
    of a prompt from one forward of its K completions (InstructGPT's K-wise batches). Rows
    whose completions all score alike carry no comparison and are left out.
    """
    groups = []
    for r in rows:
        texts = [
            t for i, t in enumerate(r["completions"]) if t.strip() and t not in r["completions"][:i]
        ]
        scores = [gold_score(t, r["reference"], r["task"]) for t in texts]
        if len(set(scores)) > 1:
            groups.append({"prompt": r["prompt"], "completions": texts, "ratings": scores,
                           "category": "sampled", "source": "gold"})  # fmt: skip
    return groups


MARGIN_MODES = frozenset({"gold"})
"""Label modes whose pairs carry a ``margin`` (gold(chosen) - gold(rejected)), which RPO's
``rpo_nll_min_margin`` reads; the other modes give a preference only."""


def _human_choices(cfg: PipelineConfig, run: Path, pairs: list[dict[str, Any]]) -> list | None:
    """People's labels: from the labelling app's task, or from ``human_labels.jsonl``.

    The first run exports the pairs (``label_requests.jsonl``) into a task of the labelling app
    (``<run>/labels.sqlite``, :mod:`rlhfkit.feedback`) and returns None; once every item of the
    task has its labels, they are written to ``human_labels.jsonl``, which is then read (a file
    written by hand works the same way).
    """
    from rlhfkit.feedback.bridge import create_task_from_requests, labels_for_task

    requests, answers = run / "label_requests.jsonl", run / "human_labels.jsonl"
    task_file, db = run / "label_task.json", run / "labels.sqlite"
    if not requests.exists():
        rows = [{"id": p["id"], "prompt": p["prompt"], "a": p["a"], "b": p["b"]} for p in pairs]
        atomic_write_text(requests, jsonl_text(rows))
    if not task_file.exists():
        task_id, info = create_task_from_requests(
            db,
            requests,
            name=run.name,
            mode=cfg.labels.likert,
            overlap=cfg.labels.overlap,
            guidelines=cfg.labels.guidelines,
        )
        atomic_write_text(task_file, json.dumps(info, indent=2, default=str))
    task_id = json.loads(task_file.read_text())["task_id"]
    if not answers.exists():
        labels = labels_for_task(db, task_id)
        if labels is None:
            console.print(
                f"[bold]labels needed[/] for task {task_id}: start the app with `rlhfkit label "
                f"serve --db {db}`, invite labellers with `rlhfkit label task --db {db} --task "
                f"{task_id} --invite NAME ...`, then run the same command again (or write "
                f'{answers} by hand: one {{"id", "choice": "a"|"b"|"tie"}} per pair).'
            )
            return None
        atomic_write_text(answers, jsonl_text(labels))
    choices, given = {"a": 1.0, "b": 0.0, "tie": 0.5}, {}
    for n, line in enumerate(answers.read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if row.get("choice") not in choices:
            raise ValueError(f"{answers}:{n}: field 'choice': expected 'a', 'b' or 'tie'")
        given[row.get("id")] = choices[row["choice"]]
    missing = [p["id"] for p in pairs if p["id"] not in given]
    if missing:
        raise ValueError(
            f"{answers}: no label for pair id(s) {missing[:10]} ({len(missing)} in all)"
        )
    return [given[p["id"]] for p in pairs]


def _judge_choices(cfg: PipelineConfig, pairs: list[dict[str, Any]]) -> list[float | None]:
    from rlhfkit.rewards.judge import PairwiseJudge, load_backend

    judge = PairwiseJudge(load_backend(cfg.labels.judge))
    result = judge.compare(
        [p["prompt"] for p in pairs], [p["a"] for p in pairs], [p["b"] for p in pairs]
    )
    log.info("judge: %s", result.metrics())
    return list(result.scores)


def _judge_backend(cfg: PipelineConfig, run: Path) -> Any:
    from rlhfkit.rewards.cache import cached
    from rlhfkit.rewards.judge import load_backend

    return cached(load_backend(cfg.labels.judge),
                  run / "judge_cache.sqlite" if cfg.labels.cache else None)  # fmt: skip


def _ai_choices(
    cfg: PipelineConfig, run: Path, pairs: list[dict[str, Any]], quality: dict[str, Any]
) -> list[float | None]:
    """RLAIF labels under the constitution (both orders; inconsistent pairs give None)."""
    from rlhfkit.data.constitution import load_constitution
    from rlhfkit.rewards.ai_labels import label_pairs

    labels = label_pairs(
        _judge_backend(cfg, run), [p["prompt"] for p in pairs], [p["a"] for p in pairs],
        [p["b"] for p in pairs], load_constitution(cfg.labels.constitution), seed=cfg.seed,
        max_tokens=cfg.labels.max_tokens, mode=cfg.labels.ai_verdict,
    )  # fmt: skip
    quality.update(labels.metrics())
    return [None if c is None else float(c == "a") for c in labels.preferred]


def _rubric_choices(
    cfg: PipelineConfig, run: Path, pairs: list[dict[str, Any]], quality: dict[str, Any]
) -> list[float | None]:
    """Labels by rubric score (the higher-scoring reply; equal scores are ties)."""
    from rlhfkit.data.rubric import load_rubrics
    from rlhfkit.rewards.rubric import RubricReward, rubric_preferences

    rubrics = load_rubrics(cfg.labels.rubric)
    backend = _judge_backend(cfg, run) if rubrics.needs_judge else None
    reward = RubricReward(rubrics, backend, max_tokens=cfg.labels.max_tokens)
    fields = [{k: p[k] for k in ("prompt", "reference", "task")} for p in pairs]
    choices = rubric_preferences(reward, fields, [p["a"] for p in pairs], [p["b"] for p in pairs])
    quality["unparseable"] = float(reward.unparseable)
    return choices


def _label_quality(
    pairs: list[dict[str, Any]], choices: list[float | None], margins: list[float]
) -> dict[str, float | None]:
    """How many pairs got a preference, and how often it agrees with the gold judge's.

    ``margins`` holds each pair's gold(a) - gold(b).
    """
    gold = [preference_of(m) for m in margins]
    both = [(c, g) for c, g in zip(choices, gold, strict=True)
            if c is not None and c != 0.5 and g != 0.5]  # fmt: skip
    return {
        "pairs": float(len(pairs)),
        "with_preference": float(sum(c is not None and c != 0.5 for c in choices)),
        "gold_agreement": sum(c == g for c, g in both) / len(both) if both else None,
        "gold_compared": float(len(both)),
    }


def run_labels(cfg: PipelineConfig, run: Path) -> bool:
    """Step 3; False when human labels are still missing (the pipeline stops there)."""
    rows = [json.loads(line) for line in (run / "candidates.jsonl").read_text().splitlines()]
    pairs = pairs_of(rows, cfg.candidates.pairs_per_prompt)
    margins = [gold_margin(p["a"], p["b"], p["reference"], p["task"]) for p in pairs]
    labelers: dict[str, Callable[[], list[float | None] | None]] = {
        "gold": lambda: [preference_of(m) for m in margins],
        "judge": lambda: _judge_choices(cfg, pairs),
        "ai": lambda: _ai_choices(cfg, run, pairs, quality),
        "rubric": lambda: _rubric_choices(cfg, run, pairs, quality),
        "human": lambda: _human_choices(cfg, run, pairs),
    }
    quality: dict[str, Any] = {"mode": cfg.labels.mode}
    choices = labelers[cfg.labels.mode]()
    if choices is None:
        console.print(
            f"[bold]labels needed[/]: label the {len(pairs)} pairs of "
            f"{run / 'label_requests.jsonl'} and write {run / 'human_labels.jsonl'} "
            '(one {"id": ..., "choice": "a" | "b" | "tie"} per line), then run the same command.'
        )
        return False
    out = []
    for p, c, m in zip(pairs, choices, margins, strict=True):
        if c is None or c == 0.5:  # ties and unparseable verdicts carry no preference
            continue
        chosen, rejected = (p["a"], p["b"]) if c == 1.0 else (p["b"], p["a"])
        row = {"prompt": p["prompt"], "chosen": chosen, "rejected": rejected}
        if cfg.labels.mode in MARGIN_MODES:
            row["margin"] = round(abs(m), 4)
        out.append({**row, "category": "sampled", "source": cfg.labels.mode})
    if not out and not cfg.labels.mix_builtin:
        raise ValueError("labelling left no pair with a preference (every pair was a tie)")
    random.Random(0).shuffle(out)
    quality.update(_label_quality(pairs, choices, margins))
    atomic_write_text(run / "labels_quality.json", json.dumps(quality, indent=2))
    log.info("labels: %s", quality)
    atomic_write_text(run / "pairs.jsonl", jsonl_text(out))
    log.info("labels: %d pairs, %d with a preference", len(pairs), len(out))
    return True
