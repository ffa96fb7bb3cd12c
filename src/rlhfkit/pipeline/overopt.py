"""``rlhfkit overopt``: the reward over-optimisation experiment (Gao, Schulman & Hilton 2023).

Proxy reward models are trained on gold-labelled pairs at several label budgets; the policy is
then optimised against each proxy, by best-of-n and by RL, and every point is scored by the
proxy and by the gold judge (the built-in task's programmatic judge, which labelled the pairs).
The proxy keeps rising as the policy moves away from its start; the gold reward rises, peaks
and, for a proxy trained on few labels, falls.

1. **sft**: the policy, the embedded model fine-tuned on the built-in instructions (skipped
   with ``--policy``).
2. **candidates**: the policy samples ``candidates.sampling.num_samples`` completions for each
   training prompt; every two distinct ones with different gold scores form a gold-labelled pair
   (the higher score is chosen), pooled with the task's own gold pairs (``proxies.mix_builtin``)
   and shuffled once (``pool.jsonl``).
3. **proxies**: for each budget b, ``proxies.ensemble`` reward models (seeds 0..K-1, each its own
   data order) on the pool's first b pairs, with a share ``proxies.label_noise`` of them flipped
   (``rm/b<b>-s<k>/final``); with ``proxies.warm`` also their weight average (WARM,
   ``rm/b<b>-warm/final``).
4. **samples**: N = ``bon.samples`` samples of each held-out prompt from the policy, scored by
   the gold judge and by every reward model (``samples/``, cached).
5. **bon**: the best-of-n curves for n = 1, 2, 4, ... up to ``bon.max_n`` with the unbiased
   estimator (:func:`rlhfkit.eval.overopt.bon_unbiased`, every sample used), for every proxy,
   ensemble mode and WARM model, with Gao's fit R_bon(d) = d (alpha - beta d), its R^2 and peak
   (``bon.json``).
6. **rl**: a GRPO run against each proxy named by ``rl_on`` (gold logged beside it at weight 0);
   the per-step proxy and gold rewards against d = sqrt(KL) are fitted with
   R_rl(d) = d (alpha - beta log d) (``rl/<proxy>/``, ``rl.json``).
7. **report**: ``overopt.html``, the curves per budget, the fits and a table.

Every stage is skipped when its output exists, and the training runs resume from their
checkpoints, so running the same command again continues where it stopped.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from rlhfkit.atomic import atomic_write_text
from rlhfkit.data.sources import load_rows
from rlhfkit.data.tasks.preferences import gold_prefers
from rlhfkit.eval.overopt import bon_curve_unbiased, gao_fit, pairwise_agreement
from rlhfkit.eval.reward_model import rm_report
from rlhfkit.extras import require_extra
from rlhfkit.inference.evaluate import EvalDataConfig, evaluate_prompts
from rlhfkit.models.merge import average_model_dirs
from rlhfkit.ops.ensemble import rm_ensemble
from rlhfkit.pipeline.ensemble import accuracy_summary
from rlhfkit.pipeline.labels import jsonl_text, pairs_of
from rlhfkit.pipeline.overopt_config import BonConfig as BonConfig
from rlhfkit.pipeline.overopt_config import OveroptConfig
from rlhfkit.pipeline.overopt_config import ProxiesConfig as ProxiesConfig
from rlhfkit.pipeline.run import GOLD, run_in_child
from rlhfkit.recipes import policy_gradient as pg
from rlhfkit.recipes import reward_model, reward_model_eval, sft
from rlhfkit.rollout.hf import SamplingConfig

log = logging.getLogger(__name__)
console = Console()


# ----------------------------------------------------------------------------- names


def members(cfg: OveroptConfig, budget: int) -> list[str]:
    """The reward-model names of one budget: ``b<b>-s<k>`` for k < ensemble."""
    return [f"b{budget}-s{k}" for k in range(cfg.proxies.ensemble)]


def proxies(cfg: OveroptConfig, budget: int) -> list[str]:
    """Every proxy of a budget: ``single``, the ensemble modes, ``warm``."""
    out = ["single"]
    if cfg.proxies.ensemble > 1:
        out += list(cfg.proxies.modes) + (["warm"] if cfg.proxies.warm else [])
    return out


def _policy(cfg: OveroptConfig, run: Path) -> str:
    return cfg.policy or str(run / "sft" / "final")


def _cache(cfg: OveroptConfig, run: Path) -> str:
    return cfg.cache_dir or str(run / "cache")


def _rm_dir(run: Path, name: str) -> Path:
    return run / "rm" / name / "final"


def _reward_spec(cfg: OveroptConfig, run: Path, budget: int, proxy: str) -> str:
    """The reward spec of a proxy (``rm:<dir>`` or ``rm-ensemble:<mode>:<dirs>``)."""
    dirs = [str(_rm_dir(run, m)) for m in members(cfg, budget)]
    if proxy == "single":
        return f"rm:{dirs[0]}"
    if proxy == "warm":
        return f"rm:{_rm_dir(run, f'b{budget}-warm')}"
    mode = f"uwo={cfg.proxies.uwo_lambda}" if proxy == "uwo" else proxy
    return f"rm-ensemble:{mode}:{','.join(dirs)}"


# ----------------------------------------------------------------------------- stages


def run_sft(cfg: OveroptConfig, run: Path) -> None:
    """Step 1: the policy."""
    loop = replace(cfg.sft.loop, resume=(run / "sft" / "checkpoints" / "latest").exists(),
                   seed=cfg.sft.loop.seed + cfg.seed)  # fmt: skip
    log_cfg = replace(cfg.log, run_dir=str(run / "sft"))
    sft.main(replace(cfg.sft, model=cfg.model, loop=loop, log=log_cfg))


def run_candidates(cfg: OveroptConfig, run: Path) -> None:
    """Step 2: sampled pairs labelled by gold, pooled with the task's pairs, shuffled once."""
    sampling = replace(cfg.candidates.sampling, seed=cfg.candidates.sampling.seed + cfg.seed)
    data = EvalDataConfig(source=cfg.candidates.source, split="train", schema="preference",
                          distinct=True, max_prompts=cfg.candidates.limit)  # fmt: skip
    model = replace(cfg.model, name=_policy(cfg, run))
    cache = _cache(cfg, run)
    prompts, grid = evaluate_prompts(model, None, data, sampling, (GOLD,), cache_dir=cache)
    rows = [
        {"id": i, "prompt": p.fields["prompt"], "completions": grid.texts[i],
         "reference": p.fields.get("reference"), "task": p.fields.get("task")}
        for i, p in enumerate(prompts)
    ]  # fmt: skip
    pool = []
    for p in pairs_of(rows, cfg.candidates.pairs_per_prompt):
        choice = gold_prefers(p["a"], p["b"], p["reference"], p["task"])
        if choice in (0.0, 1.0):
            chosen, rejected = (p["a"], p["b"]) if choice == 1.0 else (p["b"], p["a"])
            pool.append({"prompt": p["prompt"], "chosen": chosen, "rejected": rejected,
                         "category": "sampled"})  # fmt: skip
    if cfg.proxies.mix_builtin:
        pool += [r.data for r in load_rows(cfg.candidates.source, split="train")]
    random.Random(cfg.seed).shuffle(pool)
    if len(pool) < max(cfg.proxies.budgets):
        log.warning("the pool has %d pairs, fewer than the largest budget %d: that proxy uses all",
                    len(pool), max(cfg.proxies.budgets))  # fmt: skip
    atomic_write_text(run / "pool.jsonl", jsonl_text(pool))


def budget_pairs(pool: list[dict[str, Any]], budget: int, noise: float, seed: int) -> list[dict]:
    """The pool's first ``budget`` pairs, round(noise * budget) of them flipped (seeded)."""
    pairs = [dict(p) for p in pool[:budget]]
    flipped = random.Random(seed).sample(range(len(pairs)), round(noise * len(pairs)))
    for i in flipped:
        pairs[i]["chosen"], pairs[i]["rejected"] = pairs[i]["rejected"], pairs[i]["chosen"]
    return pairs


def member_seeds(cfg: OveroptConfig, k: int) -> dict[str, int]:
    """Member k's loop seeds.

    With WARM the members share one initialisation (seed) and each has its own data order
    (data_seed), as weight averaging needs; otherwise member k has its own seed for both.
    """
    seed = cfg.rm.loop.seed + cfg.seed
    if cfg.proxies.warm:
        return {"seed": seed, "data_seed": seed + k}
    return {"seed": seed + k}


def run_proxies(cfg: OveroptConfig, run: Path) -> None:
    """Step 3: every budget's reward models (and their WARM average)."""
    pool = [json.loads(line) for line in (run / "pool.jsonl").read_text().splitlines()]
    for budget in cfg.proxies.budgets:
        path = run / "rm" / f"pairs-b{budget}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        pairs = budget_pairs(pool, budget, cfg.proxies.label_noise, cfg.seed + budget)
        atomic_write_text(path, jsonl_text(pairs))
        epochs = cfg.proxies.epochs * len(pairs) / cfg.rm.loop.batch_size
        steps = max(cfg.proxies.min_steps, math.ceil(epochs))
        for k, name in enumerate(members(cfg, budget)):
            out = run / "rm" / name
            if (out / "final").exists():
                continue
            loop = replace(cfg.rm.loop, max_steps=steps, **member_seeds(cfg, k),
                           resume=(out / "checkpoints" / "latest").exists())  # fmt: skip
            data = replace(cfg.rm.data, train=str(path), train_split="train")
            sub = replace(cfg.rm, model=cfg.model, data=data, loop=loop,
                          log=replace(cfg.log, run_dir=str(out)))  # fmt: skip
            run_in_child(reward_model.main, sub, isolate=cfg.isolate_stages)
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
        warm = _rm_dir(run, f"b{budget}-warm")
        if cfg.proxies.warm and cfg.proxies.ensemble > 1 and not warm.exists():
            average_model_dirs([_rm_dir(run, m) for m in members(cfg, budget)], warm)
    atomic_write_text(run / "rm" / "done.json", json.dumps({"budgets": list(cfg.proxies.budgets)}))


def _models(cfg: OveroptConfig) -> list[str]:
    """Every reward model that scores the samples (members, and WARM models)."""
    out = [m for b in cfg.proxies.budgets for m in members(cfg, b)]
    if cfg.proxies.warm and cfg.proxies.ensemble > 1:
        out += [f"b{b}-warm" for b in cfg.proxies.budgets]
    return out


def run_samples(cfg: OveroptConfig, run: Path) -> None:
    """Step 4: the policy's N samples of each held-out prompt, scored by gold and every RM."""
    b = cfg.bon
    data = EvalDataConfig(source=b.source, split=b.split, schema="preference", distinct=True,
                          max_prompts=b.prompts)  # fmt: skip
    sampling = SamplingConfig(max_new_tokens=b.max_new_tokens, temperature=b.temperature,
                              num_samples=b.samples, seed=1234)  # fmt: skip
    model = replace(cfg.model, name=_policy(cfg, run))
    scores: dict[str, list[list[float]]] = {}
    for name, spec in [("gold", GOLD), *((m, f"rm:{_rm_dir(run, m)}") for m in _models(cfg))]:
        prompts, grid = evaluate_prompts(model, None, data, sampling, (spec,),
                                         cache_dir=_cache(cfg, run))  # fmt: skip
        scores[name] = [[float(x) for x in row] for row in grid.rewards]
    texts = {"prompts": [p.fields["prompt"] for p in prompts], "completions": grid.texts}
    names = _models(cfg)  # every model's accuracy on the task's held-out pairs, by category
    rm_eval = reward_model_eval.RMEvalConfig(model=cfg.model, data=b.source, split=b.split)
    scored, _ = reward_model_eval.score_models(rm_eval, [str(_rm_dir(run, n)) for n in names])
    accuracy = {}
    for name, pairs in zip(names, scored, strict=True):
        summary = accuracy_summary(rm_report(pairs))
        accuracy[name] = {"all": summary["accuracy"], **summary["by_category"]}
    out = {"scores": scores, "heldout_accuracy": accuracy, **texts}
    atomic_write_text(run / "samples.json", json.dumps(out))


def _proxy_grid(cfg: OveroptConfig, scores: dict[str, Any], budget: int, proxy: str) -> list:
    """The (M, N) proxy scores of one proxy: a member's, WARM's or an ensemble's combination."""
    if proxy == "single":
        return scores[members(cfg, budget)[0]]
    if proxy == "warm":
        return scores[f"b{budget}-warm"]
    import torch

    stacked = torch.tensor([scores[m] for m in members(cfg, budget)], dtype=torch.float64)
    k, m, n = stacked.shape
    combined = rm_ensemble(stacked.view(k, m * n), proxy, cfg.proxies.uwo_lambda)
    return combined.view(m, n).tolist()


def run_bon(cfg: OveroptConfig, run: Path) -> None:
    """Step 5: the unbiased best-of-n curves and their Gao fits, per budget and proxy."""
    samples = json.loads((run / "samples.json").read_text())
    scores, accuracy = samples["scores"], samples["heldout_accuracy"]
    ns = [2**i for i in range(int(math.log2(cfg.bon.max_n)) + 1)]
    curves = []
    for budget in cfg.proxies.budgets:
        for proxy in proxies(cfg, budget):
            grid = _proxy_grid(cfg, scores, budget, proxy)
            points = bon_curve_unbiased(grid, scores["gold"], ns)
            d = [p["d"] for p in points]
            fit = gao_fit(d, [p["gold"] - points[0]["gold"] for p in points], rl=False)
            best = max(points, key=lambda p: p["gold"])
            name = {"single": members(cfg, budget)[0], "warm": f"b{budget}-warm"}.get(proxy)
            curves.append({
                "budget": budget, "proxy": proxy, "points": points, "gold_fit": fit,
                "gold_peak_n": best["n"], "gold_peak": best["gold"],
                "on_policy_accuracy": pairwise_agreement(grid, scores["gold"]),
                "heldout_accuracy": accuracy.get(name) if name else None,
            })  # fmt: skip
    out = {"ns": ns, "curves": curves, "heldout_accuracy": accuracy}
    atomic_write_text(run / "bon.json", json.dumps(out, indent=2))


def run_rl(cfg: OveroptConfig, run: Path) -> None:
    """Step 6: GRPO against each chosen proxy of each budget; proxy and gold per step, fitted."""
    bon = json.loads((run / "bon.json").read_text())
    results = []
    for budget in cfg.proxies.budgets:
        for proxy in cfg.rl_on:
            name = f"b{budget}-{proxy}"
            out = run / "rl" / name
            spec = _reward_spec(cfg, run, budget, proxy)
            if not (out / "final").exists() or (
                cfg.rl_eval_samples and not (out / "heldout.json").exists()
            ):
                run_in_child(rl_train_and_evaluate, cfg, run, out, spec,
                             isolate=cfg.isolate_stages)  # fmt: skip
            curve = next(c for c in bon["curves"] if c["budget"] == budget and c["proxy"] == proxy)
            rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]
            points = rl_points(rows, curve["points"][0], cfg.rl_block)
            held = out / "heldout.json"
            heldout = json.loads(held.read_text()) if held.exists() else None
            results.append({"budget": budget, "proxy": proxy, **rl_summary(points),
                            "heldout": heldout})  # fmt: skip
    atomic_write_text(run / "rl.json", json.dumps({"runs": results}, indent=2))


def rl_train_and_evaluate(cfg: OveroptConfig, run: Path, out: Path, spec: str) -> None:
    """One RL run against ``spec`` (resumed if interrupted), then its held-out evaluation.

    One process for both: the evaluation does not pay a second start-up and import.
    """
    if not (out / "final").exists():
        loop = replace(cfg.rl.loop, seed=cfg.rl.loop.seed + cfg.seed,
                       resume=(out / "checkpoints" / "latest").exists())  # fmt: skip
        sub = replace(cfg.rl, model=replace(cfg.model, name=_policy(cfg, run)),
                      rewards=(spec, GOLD), weights=(1.0, 0.0), loop=loop,
                      log=replace(cfg.log, run_dir=str(out)))  # fmt: skip
        pg.main(sub)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    if cfg.rl_eval_samples and not (out / "heldout.json").exists():
        rl_heldout(cfg, run, out, spec)


def rl_heldout(cfg: OveroptConfig, run: Path, out: Path, spec: str) -> None:
    """An RL run's final policy on the held-out best-of-n prompts (``<out>/heldout.json``).

    ``rl_eval_samples`` samples of each of best-of-n's prompts at its temperature and length,
    scored by gold and by the run's proxy: the same test set as the best-of-n curves, so the
    start (their n = 1 point) and every RL run are compared on the same prompts. The per-prompt
    gold means (M,) allow paired intervals between runs.
    """
    b = cfg.bon
    data = EvalDataConfig(source=b.source, split=b.split, schema="preference", distinct=True,
                          max_prompts=b.prompts)  # fmt: skip
    sampling = SamplingConfig(max_new_tokens=b.max_new_tokens, temperature=b.temperature,
                              num_samples=cfg.rl_eval_samples, seed=4321)  # fmt: skip
    model = replace(cfg.model, name=str(out / "final"))
    means: dict[str, list[float]] = {}
    for name, reward in (("gold", GOLD), ("proxy", spec)):
        prompts, grid = evaluate_prompts(model, None, data, sampling, (reward,),
                                         cache_dir=_cache(cfg, run))  # fmt: skip
        means[name] = [sum(map(float, row)) / len(row) for row in grid.rewards]
    result = {
        "samples": cfg.rl_eval_samples,
        "gold": sum(means["gold"]) / len(means["gold"]),
        "proxy": sum(means["proxy"]) / len(means["proxy"]),
        "gold_per_prompt": means["gold"],
        "completions": grid.texts,
        "references": [{k: p.fields.get(k) for k in ("reference", "task")} for p in prompts],
    }
    atomic_write_text(out / "heldout.json", json.dumps(result))


def rl_points(rows: list[dict[str, Any]], start: dict[str, Any], block: int) -> list[dict]:
    """The RL curve: the starting policy, then the rollout means of each block of steps.

    One step's rollouts cover a few prompts, so their mean reward moves with the prompts drawn;
    each point averages ``block`` consecutive logged steps (their KL, proxy and gold means) and
    stands at d = sqrt(mean KL). The first point is the starting policy at d = 0, with its proxy
    and gold means over the held-out best-of-n samples (n = 1: the same policy and sampling).

    Args:
        rows: The run's ``metrics.jsonl`` records.
        start: The n = 1 point of the proxy's best-of-n curve (``proxy``, ``gold``).
        block: Steps averaged per point.
    """
    logged = [r for r in rows if "rollout/reward" in r]
    proxy_key = next((k for r in logged[:1] for k in r if k.startswith("rollout/reward/rm")), None)
    points = [{"step": 0, "kl": 0.0, "d": 0.0, "proxy": start["proxy"], "gold": start["gold"]}]
    for i in range(0, len(logged) - block + 1, block):
        part = logged[i : i + block]
        kl = max(0.0, sum(float(r.get("rollout/kl_seq", 0.0)) for r in part) / len(part))
        golds = [
            r[f"rollout/reward/{GOLD}"] for r in part if r.get(f"rollout/reward/{GOLD}") is not None
        ]
        proxies = [r.get(proxy_key, r["rollout/reward"]) for r in part]
        points.append({
            "step": part[-1]["step"], "kl": kl, "d": math.sqrt(kl),
            "proxy": sum(proxies) / len(proxies),
            "gold": sum(golds) / len(golds) if golds else None,
        })  # fmt: skip
    return points


def rl_summary(points: list[dict[str, Any]]) -> dict[str, Any]:
    """The points, Gao's RL fit of their gold gains over the start, the peak and the final d."""
    start = points[0]["gold"]
    scored = [p for p in points if p["gold"] is not None]
    fit = gao_fit([p["d"] for p in scored], [p["gold"] - start for p in scored], rl=True)
    best = max(scored, key=lambda p: p["gold"])
    return {"points": points, "gold_fit": fit, "gold_peak_step": best["step"],
            "gold_peak_d": best["d"], "final_d": points[-1]["d"]}  # fmt: skip


def run_report(cfg: OveroptConfig, run: Path) -> None:
    """Step 7: ``overopt.html``."""
    from rlhfkit.eval.overopt_report import render_overopt_report

    bon = json.loads((run / "bon.json").read_text())
    rl = json.loads((run / "rl.json").read_text()) if (run / "rl.json").exists() else {"runs": []}
    render_overopt_report({"bon": bon, "rl": rl, "config": asdict(cfg)}, run / "overopt.html")


@dataclass
class Step:
    """A stage: its name, the output that marks it done, and whether it loads models."""

    name: str
    output: str
    run: Any
    loads_models: bool = True


STEPS = [
    Step("sft", "sft/final", run_sft),
    Step("candidates", "pool.jsonl", run_candidates),
    Step("proxies", "rm/done.json", run_proxies, loads_models=False),  # each RM isolates itself
    Step("samples", "samples.json", run_samples),
    Step("bon", "bon.json", run_bon, loads_models=False),
    Step("rl", "rl.json", run_rl, loads_models=False),  # each run isolates itself
    Step("report", "overopt.html", run_report, loads_models=False),
]


def _step_in_child(name: str, cfg: OveroptConfig, run: Path) -> None:
    next(s for s in STEPS if s.name == name).run(cfg, run)


def print_summary(run: Path) -> None:
    """Per budget and proxy: gold under best-of-n (start, peak, n = max, R^2) and under RL."""
    table = Table(title=f"rlhfkit overopt: {run} (gold reward)")
    for name in ("proxy", "acc.", "BoN n=1", "peak (n)", "n=max", "R^2", "RL peak (step)",
                 "RL end", "RL end, held-out"):  # fmt: skip
        table.add_column(name, justify="right")
    rl = json.loads((run / "rl.json").read_text())["runs"] if (run / "rl.json").exists() else []
    for c in json.loads((run / "bon.json").read_text())["curves"]:
        pts, fit = c["points"], c["gold_fit"]
        r = next((x for x in rl if x["budget"] == c["budget"] and x["proxy"] == c["proxy"]), None)
        golds = [p["gold"] for p in r["points"] if p["gold"] is not None] if r else []
        table.add_row(
            f"{c['budget']} {c['proxy']}", f"{c['on_policy_accuracy']:.2f}",
            f"{pts[0]['gold']:.3f}",
            f"{c['gold_peak']:.3f} ({c['gold_peak_n']})", f"{pts[-1]['gold']:.3f}",
            f"{fit['r2']:.2f}" if fit else "",
            f"{max(golds):.3f} ({r['gold_peak_step']})" if golds else "",
            f"{golds[-1]:.3f}" if golds else "",
            f"{r['heldout']['gold']:.3f}" if r and r.get("heldout") else "",
        )  # fmt: skip
    console.print(table)
    console.print("proxy: label budget and proxy; acc.: its agreement with gold on the policy's "
                  "own samples")  # fmt: skip
    console.print(f"report: [bold]{run / 'overopt.html'}[/]")


def main(cfg: OveroptConfig) -> Path:
    """Run the steps in order, skipping finished ones; returns the run directory."""
    run = Path(cfg.log.run_dir)
    if not (run / "overopt.html").exists():
        require_extra("plot", "the over-optimisation report (overopt.html)")
    run.mkdir(parents=True, exist_ok=True)
    times_path = run / "stages.json"
    times = json.loads(times_path.read_text()) if times_path.exists() else {}
    for k, step in enumerate(STEPS, 1):
        if (run / step.output).exists() or (step.name == "sft" and cfg.policy):
            console.print(f"[{k}/{len(STEPS)}] {step.name}: done, skipped")
            continue
        console.rule(f"[{k}/{len(STEPS)}] {step.name}")
        start = time.perf_counter()
        if step.loads_models:
            run_in_child(_step_in_child, step.name, cfg, run, isolate=cfg.isolate_stages)
        else:
            step.run(cfg, run)
        times[step.name] = time.perf_counter() - start
        atomic_write_text(times_path, json.dumps(times, indent=2))
        if step.name == "sft":
            shutil.rmtree(run / "sft" / "checkpoints", ignore_errors=True)
    print_summary(run)
    return run
