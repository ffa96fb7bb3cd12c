"""``rlhfkit pipeline``: the three steps of RLHF in one run directory (InstructGPT's recipe).

1. **sft**: supervised fine-tuning of the starting model on instruction data
   (``<run>/sft/final``).
2. **candidates**: the SFT model samples ``candidates.num_samples`` (>= 2) completions for each
   preference prompt (``<run>/candidates.jsonl``).
3. **labels**: pairs of candidates are labelled (``<run>/pairs.jsonl``, preference schema):
   gold, an LLM judge, AI feedback under a constitution, a rubric, or people
   (:mod:`rlhfkit.pipeline.labels`). With ``labels.mix_builtin`` the task's own gold-labelled
   training pairs are added.
4. **rm**: a reward model is trained on the pairs (``<run>/rm/final``); its held-out accuracy
   against the gold preference is measured on the task's held-out pairs. With ``rm_ensemble``
   K > 1, K reward models with K seeds (``<run>/rm/members/s<k>/final``) and their WARM weight
   average as ``<run>/rm/final`` (:mod:`rlhfkit.pipeline.ensemble`).
5. **optimise**: the SFT model is optimised on the labelled pairs with a direct-alignment loss
   (``optimise.method dpo``, default; the loss is ``dpo.algo.loss``, default RPO), or against
   the reward model with any policy-gradient preset (``optimise.method grpo``, ``ppo`` as in
   InstructGPT, ...) under the preset's KL penalty (``<run>/policy/final``). Under RL with
   K > 1 the reward is the members' scores combined (``rm_combine`` mean, min or uwo) or the
   WARM model (warm), and the gold score rides along as a zero-weight reward component, so
   proxy and gold reward are logged at every step.
6. **eval**: gold reward, reward-model reward, win rate against the SFT model by the gold
   judge, KL to the SFT model, lengths, and the best-of-N curve of the SFT model
   (``<run>/eval.json``; :mod:`rlhfkit.pipeline.evaluation`).
7. **report**: ``<run>/report.html`` (:func:`rlhfkit.eval.report.render_report`; it needs the
   ``plot`` extra, which the pipeline checks before the first stage).

Every stage is skipped when its output exists (each is written atomically), and the training
stages resume from their last checkpoint, so re-running the same command after a crash or
Ctrl-C continues where it stopped. A training stage's checkpoints are deleted once its final
model is written (they are only needed to resume it). ``<run>/stages.json`` records what ran,
how long it took and its peak resident memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import resource
import shutil
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from rlhfkit.atomic import atomic_write_text
from rlhfkit.config import LogConfig
from rlhfkit.data.sources import load_rows
from rlhfkit.extras import require_extra
from rlhfkit.inference.evaluate import EvalDataConfig, evaluate_prompts
from rlhfkit.pipeline.config import CandidatesConfig as CandidatesConfig
from rlhfkit.pipeline.config import LabelsConfig as LabelsConfig
from rlhfkit.pipeline.config import OptimiseConfig as OptimiseConfig
from rlhfkit.pipeline.config import PipelineConfig
from rlhfkit.pipeline.ensemble import rl_reward_spec, train_members
from rlhfkit.pipeline.evaluation import evaluate_stage, report_data
from rlhfkit.pipeline.labels import MARGIN_MODES, gold_groups, jsonl_text, pair_groups, run_labels
from rlhfkit.recipes import distill, dpo, reward_model, sft
from rlhfkit.recipes import policy_gradient as pg
from rlhfkit.rollout.vllm_server import require_engine

log = logging.getLogger(__name__)
console = Console()

GOLD = "rlhfkit.data.tasks.preferences:gold_score"
"""The built-in task's gold judge as a reward (logged beside the proxy, weight 0)."""
BUILTIN_PAIRS = "builtin:preferences"
WRONG_ANSWERS = "builtin:wrong_answers"
"""Correctness pairs of the same prompts as BUILTIN_PAIRS, mixed into the reward model's rows
with labels.mix_wrong_answers when those are the task's pairs."""


def _sub_log(cfg: PipelineConfig, name: str) -> LogConfig:
    return replace(cfg.log, run_dir=str(Path(cfg.log.run_dir) / name))


def _resume(run_dir: Path) -> bool:
    return (run_dir / "checkpoints" / "latest").exists()


def _seen(cfg: PipelineConfig, run: Path, source: str, split: str) -> tuple[str, str]:
    """The rows of ``source`` the preference stages may use: without ``unseen_tasks`` types.

    With ``cfg.unseen_tasks`` set, the kept rows are written once to
    ``<run>/seen/<hash>.jsonl`` (the hash of source, split and the unseen tasks, so the same
    inputs find the same file) and that file is returned with split ``"train"`` (a local file
    has one split); otherwise ``(source, split)`` as given.
    """
    if not cfg.unseen_tasks:
        return source, split
    key = json.dumps([source, split, sorted(cfg.unseen_tasks)])
    path = run / "seen" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.jsonl"
    if not path.exists():
        rows = [r.data for r in load_rows(source, split=split)]
        kept = [r for r in rows if r.get("task") not in cfg.unseen_tasks]
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, jsonl_text(kept))
        log.info("%s (%s): %d of %d rows kept (unseen tasks left out)", source, split,
                 len(kept), len(rows))  # fmt: skip
    return str(path), "train"


def run_sft(cfg: PipelineConfig, run: Path) -> None:
    """Step 1: SFT on the SFT data, or with ``sft_teacher`` the teacher distilled on its prompts."""
    sub = cfg.sft
    loop = replace(sub.loop, resume=_resume(run / "sft"))
    if cfg.sft_teacher is None:
        sft.main(replace(sub, model=cfg.model, loop=loop, log=_sub_log(cfg, "sft")))
        return
    data = distill.DistillDataConfig(
        train=sub.data.train, train_split=sub.data.train_split, eval=None, schema="sft",
        limit=sub.data.limit, max_prompt_len=sub.data.max_len,
    )  # fmt: skip
    config = distill.DistillConfig(
        model=cfg.model, teacher=distill.TeacherConfig(name=cfg.sft_teacher), data=data,
        algo=cfg.distill, optim=sub.optim, loop=loop, log=_sub_log(cfg, "sft"),
    )  # fmt: skip
    distill.main(config)


def run_candidates(cfg: PipelineConfig, run: Path) -> None:
    """Step 2: sample, then write one row per prompt with its completions."""
    if cfg.candidates.sampling.num_samples < 2:
        raise ValueError("candidates.sampling.num_samples must be >= 2 to form pairs")
    source, split = _seen(cfg, run, cfg.candidates.source, "train")
    data = EvalDataConfig(
        source=source,
        split=split,
        schema="preference",
        max_prompt_len=cfg.rl.data.max_prompt_len,
        distinct=True,
        max_prompts=cfg.candidates.limit,
    )
    prompts, grid = evaluate_prompts(
        replace(cfg.model, name=str(run / "sft" / "final")),
        None,
        data,
        cfg.candidates.sampling,
        (GOLD,),
        chunk=32,
        cache_dir=str(run / "cache"),
        engine=cfg.engine,
        log_dir=run / "logs" / "candidates",
    )
    rows = [
        {
            "id": i,
            "prompt": p.fields["prompt"],
            "completions": grid.texts[i],
            "finish": grid.finish[i],
            "reference": p.fields.get("reference"),
            "task": p.fields.get("task"),
        }
        for i, p in enumerate(prompts)
    ]
    atomic_write_text(run / "candidates.jsonl", jsonl_text(rows))


def _rm_train_file(cfg: PipelineConfig, run: Path) -> Path:
    """The reward model's rows: the labels, plus the task's own gold pairs with mix_builtin.

    With ``labels.mix_wrong_answers`` and the built-in task's pairs, one more wrong-answer pair
    per training prompt.
    With ``rm.data.schema`` ``preference`` (the default), the labelled pairs as they are. With
    ``ratings``, ratings rows: with gold labels of every candidate pair, each prompt's
    candidates ranked by gold (:func:`gold_groups`); otherwise one K = 2 row per labelled pair,
    the task's pairs likewise (:func:`pair_groups`).
    """
    pairs = run / "pairs.jsonl"
    builtin: list[dict[str, Any]] = []
    sources = [(cfg.rm.data.train, cfg.rm.data.train_split)] if cfg.labels.mix_builtin else []
    if sources and cfg.labels.mix_wrong_answers and cfg.rm.data.train == BUILTIN_PAIRS:
        sources.append((WRONG_ANSWERS, "train"))
    for source, split in (_seen(cfg, run, *s) for s in sources):
        builtin += [r.data for r in load_rows(source, split=split)]
    if cfg.rm.data.schema != "ratings":
        if not builtin:
            return pairs
        text = pairs.read_text() + jsonl_text(builtin)
    else:
        if cfg.labels.mode == "gold" and cfg.candidates.pairs_per_prompt is None:
            lines = (run / "candidates.jsonl").read_text().splitlines()
            labelled = gold_groups([json.loads(line) for line in lines])
        else:
            labelled = pair_groups([json.loads(line) for line in pairs.read_text().splitlines()])
        text = jsonl_text(labelled + pair_groups(builtin))
    mixed = run / "rm_train.jsonl"
    atomic_write_text(mixed, text)
    return mixed


def run_rm(cfg: PipelineConfig, run: Path) -> None:
    """Step 4: one reward model, or with ``rm_ensemble`` > 1 the members and their WARM average."""
    data = replace(cfg.rm.data, train=str(_rm_train_file(cfg, run)), train_split="train")
    loop = replace(cfg.rm.loop, resume=_resume(run / "rm"))
    sub = replace(cfg.rm, model=cfg.model, data=data, loop=loop, log=_sub_log(cfg, "rm"))
    if cfg.rm_ensemble > 1:
        train_members(cfg, run, sub)
        return
    reward_model.main(sub)


def run_optimise(cfg: PipelineConfig, run: Path) -> None:
    """Step 5: RL against the reward model (gold logged at weight 0), or DPO on the pairs."""
    policy = replace(cfg.model, name=str(run / "sft" / "final"))
    if cfg.optimise.method == "dpo":
        data = replace(cfg.dpo.data, train=str(run / "pairs.jsonl"), train_split="train")
        loop = replace(cfg.dpo.loop, resume=_resume(run / "policy"))
        algo = cfg.dpo.algo
        if algo.rpo_nll_min_margin is not None and cfg.labels.mode not in MARGIN_MODES:
            log.info("optimise: %s labels carry no margin; RPO's NLL covers every pair",
                     cfg.labels.mode)  # fmt: skip
            algo = replace(algo, rpo_nll_min_margin=None)
        sub = replace(cfg.dpo, model=policy, data=data, algo=algo, loop=loop)
        dpo.main(replace(sub, log=_sub_log(cfg, "policy")))
        return
    rm_spec = rl_reward_spec(cfg, run)
    algo = replace(cfg.rl.algo, preset=cfg.optimise.method)
    train, split = _seen(cfg, run, cfg.rl.data.train, cfg.rl.data.train_split)
    loop = replace(cfg.rl.loop, resume=_resume(run / "policy"))
    sub = replace(
        cfg.rl,
        model=policy,
        data=replace(cfg.rl.data, train=train, train_split=split),
        algo=algo,
        rewards=(rm_spec, GOLD),
        weights=(1.0, 0.0),
        loop=loop,
        log=_sub_log(cfg, "policy"),
    )
    pg.main(sub)


@dataclass
class Stage:
    """One step: its name, the output whose existence means done, and how to run it.

    A training stage's ``checkpoints`` directory is removed once its final model exists: the
    checkpoints only serve to resume an unfinished stage, and each holds the weights and
    optimiser state (about 2 GB for the embedded model).
    """

    name: str
    output: str
    run: Callable[[PipelineConfig, Path], bool | None]
    checkpoints: str | None = None
    loads_models: bool = True
    """The stage loads models (run in its own process with ``isolate_stages``)."""
    trains: bool = False
    """Every rank of a torchrun job runs the stage together (a training recipe); the other
    stages run on rank 0 while the other ranks wait for their output."""


STAGES = [
    Stage("sft", "sft/final", run_sft, "sft/checkpoints", trains=True),
    Stage("candidates", "candidates.jsonl", run_candidates),
    Stage("labels", "pairs.jsonl", run_labels, loads_models=False),
    Stage("rm", "rm/final", run_rm, "rm/checkpoints", trains=True),
    Stage("optimise", "policy/final", run_optimise, "policy/checkpoints", trains=True),
    Stage("eval", "eval.json", lambda cfg, run: evaluate_stage(cfg, run, GOLD)),
    Stage("report", "report.html", lambda cfg, run: run_report(cfg, run), loads_models=False),
]
"""The pipeline, in order."""


def run_report(cfg: PipelineConfig, run: Path) -> None:
    """Step 7."""
    from rlhfkit.eval.report import render_report

    render_report(report_data(cfg, run, GOLD, _stages(run)), run / "report.html")


WAITING = "waiting for labels"
"""The status of a stage that stopped to wait for human labels (``stages.json``)."""


def _stages(run: Path) -> dict[str, Any]:
    path = run / "stages.json"
    return json.loads(path.read_text()) if path.exists() else {}


def print_summary(run: Path) -> None:
    """The one-screen summary: stage times and headline figures, and the report's path."""
    table = Table(title=f"rlhfkit pipeline: {run}")
    for name in ("stage", "status", "seconds", "peak GiB"):
        table.add_column(name, justify="left" if name in ("stage", "status") else "right")
    for name, s in _stages(run).items():
        peak = s.get("peak_rss_gib")
        table.add_row(
            name, s["status"], f"{s['seconds']:.0f}", "" if peak is None else f"{peak:.2f}"
        )
    console.print(table)
    if (run / "eval.json").exists():
        ev = json.loads((run / "eval.json").read_text())
        sft_m, final = ev["models"]["sft"], ev["models"]["final"]
        rm = ev["reward_model"]
        wrong = rm["by_category"].get("wrong_answer")
        console.print(
            f"RM reward {sft_m['proxy']:.3f} -> {final['proxy']:.3f} | KL {ev['kl']['k1']:.3f} "
            f"nats | RM held-out accuracy {rm['accuracy']:.3f}"
            + (f" ({wrong:.3f} on wrong answers)" if wrong is not None else "")
        )
        for name, group in (ev.get("headline") or {}).items():
            gain, wtl = group["gain"], group["win_tie_loss"]
            console.print(
                f"[bold]{name}[/] ({group['prompts']} held-out prompts): gold "
                f"{group['sft']['mean']:.3f} -> {group['final']['mean']:.3f}, gain "
                f"{gain['mean']:+.3f} [{gain['low']:+.3f}, {gain['high']:+.3f}]; win/tie/loss "
                f"{wtl['win']['mean']:.2f}/{wtl['tie']['mean']:.2f}/{wtl['loss']['mean']:.2f}\n"
                f"  {group['sentence']}"
            )
    if (run / "report.html").exists():
        console.print(f"report: [bold]{run / 'report.html'}[/]")


def demo(cfg: PipelineConfig) -> Path:
    """``rlhfkit demo`` (``make demo``): the pipeline with its defaults, in ``runs/demo``."""
    if cfg.log.run_dir == "runs/pipeline":
        cfg = replace(cfg, log=replace(cfg.log, run_dir="runs/demo"))
    return main(cfg)


def _seeded(cfg: PipelineConfig) -> PipelineConfig:
    """``cfg`` with ``cfg.seed`` added to every training stage's and the candidates' seeds."""
    if not cfg.seed:
        return cfg

    def loop(sub: Any) -> Any:
        return replace(sub, loop=replace(sub.loop, seed=sub.loop.seed + cfg.seed))

    samples = cfg.candidates.sampling
    rl = loop(cfg.rl)
    return replace(
        cfg,
        sft=loop(cfg.sft),
        candidates=replace(cfg.candidates, sampling=replace(samples, seed=samples.seed + cfg.seed)),
        rm=loop(cfg.rm),
        rl=replace(rl, sampling=replace(rl.sampling, seed=rl.sampling.seed + cfg.seed)),
        dpo=loop(cfg.dpo),
    )


def _stage_in_child(name: str, cfg: PipelineConfig, run: Path) -> tuple[bool | None, float]:
    """Run one stage (by name: the table's lambdas do not pickle) in a worker process.

    Returns:
        The stage's result and the peak resident memory of this process so far, in GiB (the
        stage's own peak when it ran in a fresh process).
    """
    result = next(s for s in STAGES if s.name == name).run(cfg, run)
    return result, peak_rss_gib()


def peak_rss_gib() -> float:
    """This process's peak resident memory in GiB (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


def _wait_for(stage: Stage, run: Path, poll: float = 1.0) -> bool:
    """On a rank other than 0: wait until rank 0 has run ``stage``.

    Returns:
        True when its output exists; False when rank 0 stopped to wait for human labels.
    """
    while not (run / stage.output).exists():
        if _stages(run).get(stage.name, {}).get("status") == WAITING:
            return False
        time.sleep(poll)
    return True


def _logged(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` with INFO logging set up (in a fresh process nothing configures it)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return fn(*args)


def run_in_child(fn: Callable[..., Any], *args: Any, isolate: bool = True) -> Any:
    """``fn(*args)`` in a fresh (spawned) process when ``isolate``, else here.

    A process of its own returns all of a step's memory to the system when it ends (models,
    optimiser state, allocator caches), so a multi-stage run peaks at its largest step rather
    than their sum. ``fn`` and ``args`` must pickle (module-level functions, dataclasses). An
    exception in the child (a user error included) is re-raised here; Ctrl-C reaches both.
    """
    if not isolate:
        return fn(*args)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_logged, fn, *args).result()


def _run_stage(stage: Stage, cfg: PipelineConfig, run: Path) -> tuple[bool | None, float]:
    """Run a stage, in a fresh process when it loads models and ``cfg.isolate_stages`` is set.

    Returns:
        The stage's result and its peak resident memory in GiB (:func:`_stage_in_child`).
    """
    return run_in_child(
        _stage_in_child, stage.name, cfg, run, isolate=cfg.isolate_stages and stage.loads_models
    )


def main(cfg: PipelineConfig) -> Path:
    """Run the stages in order, skipping finished ones; returns the run directory.

    Raises:
        MissingExtraError: Before any stage runs, when the report is still to be written and
            matplotlib (the ``plot`` extra) is not installed.
    """
    run = Path(cfg.log.run_dir)
    cfg = _seeded(cfg)
    if not (run / "report.html").exists():
        require_extra("plot", "the pipeline's report (report.html)")
    require_engine(cfg.engine, cfg.model)
    require_engine(cfg.rl.engine, cfg.model)
    run.mkdir(parents=True, exist_ok=True)
    if launch_rank() != 0:  # under torchrun: take part in the training stages only
        return _follow(cfg, run)
    status = _stages(run)
    for k, stage in enumerate(STAGES, 1):
        if (run / stage.output).exists():
            status[stage.name] = {"seconds": 0.0, **status.get(stage.name, {}), "status": "skipped"}
            console.print(f"[{k}/{len(STAGES)}] {stage.name}: done, skipped")
            continue
        console.rule(f"[{k}/{len(STAGES)}] {stage.name}")
        start = time.perf_counter()
        result, peak = _run_stage(stage, cfg, run)
        if result is False:  # waiting for human labels
            status[stage.name] = {"status": WAITING}
            atomic_write_text(run / "stages.json", json.dumps(status, indent=2))
            return run
        seconds = time.perf_counter() - start
        status[stage.name] = {"status": "done", "seconds": seconds, "peak_rss_gib": peak}
        atomic_write_text(run / "stages.json", json.dumps(status, indent=2))
        if stage.checkpoints and (run / stage.output).exists():
            shutil.rmtree(run / stage.checkpoints, ignore_errors=True)
    atomic_write_text(run / "stages.json", json.dumps(status, indent=2))
    print_summary(run)
    return run


def launch_rank() -> int:
    """This process's rank in a torchrun job (0 outside one), read before any process group."""
    return int(os.environ.get("RANK", "0"))


def _follow(cfg: PipelineConfig, run: Path) -> Path:
    """A rank other than 0: run the training stages with rank 0, wait out the others.

    Rank 0 alone samples, labels, evaluates, reports and keeps ``stages.json``, so every rank
    trains on the same files.
    """
    for stage in STAGES:
        if (run / stage.output).exists():
            continue
        if not stage.trains:
            if not _wait_for(stage, run):
                return run
            continue
        _run_stage(stage, cfg, run)
    return run
