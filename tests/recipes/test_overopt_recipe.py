"""rlhfkit overopt on the tiny model: every step, ensembles and WARM, resuming, bad options."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
from recipe_helpers import tiny_sft
from safetensors.torch import load_file

from rlhfkit.cli import main as cli_main
from rlhfkit.config import LogConfig, LoopConfig, ModelConfig
from rlhfkit.data.tasks.preferences import gold_score
from rlhfkit.eval.overopt import bon_unbiased
from rlhfkit.ops.ensemble import rm_ensemble
from rlhfkit.pipeline import overopt
from rlhfkit.rollout.hf import SamplingConfig


def _cfg(model_dir: Path, run_dir: Path, **over) -> overopt.OveroptConfig:
    base = overopt.OveroptConfig()
    tiny_loop = {"batch_size": 4, "micro_batch_tokens": 512}
    cfg = replace(
        base,
        model=ModelConfig(name=str(model_dir), precision="fp32"),
        sft=tiny_sft(base.sft, limit=16, steps=1),
        candidates=replace(
            base.candidates,
            limit=6,
            sampling=SamplingConfig(max_new_tokens=6, temperature=1.0, num_samples=3),
        ),
        proxies=overopt.ProxiesConfig(
            budgets=(8, 16), ensemble=2, warm=True, min_steps=1, epochs=0.25
        ),
        rm=replace(base.rm, data=replace(base.rm.data, max_len=256), loop=LoopConfig(**tiny_loop)),
        bon=overopt.BonConfig(prompts=3, samples=4, max_n=4, max_new_tokens=6),
        rl_on=("single", "min"),
        rl_block=1,
        rl_eval_samples=2,
        rl=replace(
            base.rl,
            data=replace(base.rl.data, limit=4),
            sampling=SamplingConfig(max_new_tokens=6, temperature=1.0, num_samples=2),
            loop=LoopConfig(batch_size=2, max_steps=3, save_every=2),
            sample_every=0,
        ),
        log=LogConfig(run_dir=str(run_dir), tensorboard=False, progress=False),
        isolate_stages=False,
    )
    return replace(cfg, **over)


def test_overopt_runs_every_step_and_its_figures_follow_the_formulas(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    cfg = _cfg(tiny_model_dir, run)
    overopt.main(cfg)
    outputs = ["sft/final", "pool.jsonl", "rm/b8-s0/final", "rm/b16-s1/final", "rm/b16-warm/final",
               "samples.json", "bon.json", "rl.json", "overopt.html"]  # fmt: skip
    for output in outputs:
        assert (run / output).exists(), output
    assert not (run / "rm/b8-s0/checkpoints").exists()
    # the budgets are nested prefixes of one shuffled pool
    b8 = (run / "rm/pairs-b8.jsonl").read_text().splitlines()
    b16 = (run / "rm/pairs-b16.jsonl").read_text().splitlines()
    assert len(b8) == 8 and b16[:8] == b8
    # WARM is the element-wise mean of its members
    members = [load_file(run / f"rm/b16-s{k}/final/model.safetensors") for k in range(2)]
    warm = load_file(run / "rm/b16-warm/final/model.safetensors")
    for name, value in warm.items():
        expected = (members[0][name].double() + members[1][name].double()) / 2
        assert (value.double() - expected).abs().max() < 1e-2, name  # stored in the model dtype
    # best-of-n points are the unbiased estimator over every prompt's samples
    scores = json.loads((run / "samples.json").read_text())["scores"]
    bon = json.loads((run / "bon.json").read_text())
    assert bon["ns"] == [1, 2, 4]
    proxies = {(c["budget"], c["proxy"]) for c in bon["curves"]}
    assert proxies == {(b, p) for b in (8, 16) for p in ("single", "mean", "min", "uwo", "warm")}
    single = next(c for c in bon["curves"] if c["budget"] == 8 and c["proxy"] == "single")
    for point in single["points"]:
        picks = [bon_unbiased(p, g, point["n"]) for p, g in zip(scores["b8-s0"], scores["gold"],
                                                                strict=True)]  # fmt: skip
        assert point["gold"] == pytest.approx(sum(g for _, g in picks) / len(picks))
        assert point["d"] == pytest.approx(math.sqrt(math.log(point["n"]) - 1 + 1 / point["n"]))
    import torch

    worst = next(c for c in bon["curves"] if c["budget"] == 16 and c["proxy"] == "min")
    stacked = torch.tensor([scores["b16-s0"], scores["b16-s1"]], dtype=torch.float64)
    grid = rm_ensemble(stacked.view(2, -1), "min").view(len(scores["gold"]), -1).tolist()
    top = sum(max(row) for row in grid) / len(grid)  # n = N: the proxy's best sample
    assert worst["points"][-1]["proxy"] == pytest.approx(top)
    accuracy = bon["heldout_accuracy"]
    assert set(accuracy) == {"b8-s0", "b8-s1", "b16-s0", "b16-s1", "b8-warm", "b16-warm"}
    assert all(0.0 <= a["all"] <= 1.0 and "wrong_answer" in a for a in accuracy.values())
    assert all(0.0 <= c["on_policy_accuracy"] <= 1.0 or math.isnan(c["on_policy_accuracy"])
               for c in bon["curves"])  # fmt: skip
    rl = json.loads((run / "rl.json").read_text())["runs"]
    assert {(r["budget"], r["proxy"]) for r in rl} == {(b, p) for b in (8, 16)
                                                       for p in ("single", "min")}  # fmt: skip
    for r in rl:  # the start (best-of-n's n = 1 point), then one point per step (rl_block 1)
        start = next(c for c in bon["curves"] if c["budget"] == r["budget"]
                     and c["proxy"] == r["proxy"])["points"][0]  # fmt: skip
        assert len(r["points"]) == 4 and r["points"][0]["d"] == 0.0
        assert r["points"][0]["gold"] == start["gold"] and r["points"][0]["proxy"] == start["proxy"]
        # the final policy on best-of-n's prompts: gold per prompt is the judge's mean there
        held = r["heldout"]
        assert held["samples"] == 2 and len(held["gold_per_prompt"]) == 3
        for texts, ref, gold in zip(held["completions"], held["references"],
                                    held["gold_per_prompt"], strict=True):  # fmt: skip
            assert len(texts) == 2
            judged = [gold_score(t, ref["reference"], ref["task"]) for t in texts]
            assert gold == pytest.approx(sum(judged) / 2)
        assert held["gold"] == pytest.approx(sum(held["gold_per_prompt"]) / 3)
    html = (run / "overopt.html").read_text()
    assert "Best-of-n" in html and "RL" in html and "<img" in html
    # a second run skips every step
    stamp = (run / "bon.json").stat().st_mtime_ns
    overopt.main(cfg)
    assert (run / "bon.json").stat().st_mtime_ns == stamp


def test_label_noise_flips_the_stated_share_and_keeps_the_rest():
    pool = [{"chosen": f"c{i}", "rejected": f"r{i}"} for i in range(40)]
    pairs = overopt.budget_pairs(pool, 20, 0.25, seed=3)
    flipped = [p for p in pairs if p["chosen"].startswith("r")]
    assert len(pairs) == 20 and len(flipped) == 5
    assert overopt.budget_pairs(pool, 20, 0.25, seed=3) == pairs  # seeded
    assert all(pool[i]["chosen"] == f"c{i}" for i in range(40))  # the pool is untouched


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--proxies.budgets", "1"], "--proxies.budgets"),
        (["--proxies.label-noise", "0.5"], "--proxies.label-noise"),
        (["--bon.max-n", "128"], "--bon.max-n"),
        (["--rl-on", "min"], "proxies.ensemble >= 2"),
        (["--rl-on", "best"], "unknown proxy"),
        (["--rl-eval-samples", "-1"], "--rl-eval-samples"),
        (["--policy", "/nonexistent/model"], "policy"),
    ],
)
def test_bad_options_are_one_line_errors_before_any_model_loads(args, needle, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["overopt", "--log.run-dir", str(tmp_path / "r"), *args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_rl_points_average_blocks_of_steps_after_the_start():
    gold = f"rollout/reward/{overopt.GOLD}"
    rows = [
        {"step": s, "rollout/reward": 9.0, "rollout/reward/rm:x": float(s), gold: 0.1 * s,
         "rollout/kl_seq": float(s)}
        for s in range(1, 8)
    ] + [{"step": 8, "train/loss": 0.0}]  # fmt: skip
    points = overopt.rl_points(rows, {"proxy": -1.0, "gold": 0.05}, block=3)
    assert [p["step"] for p in points] == [0, 3, 6]  # step 7 is an incomplete block
    assert points[0] == {"step": 0, "kl": 0.0, "d": 0.0, "proxy": -1.0, "gold": 0.05}
    assert points[1]["kl"] == pytest.approx(2.0) and points[1]["d"] == pytest.approx(2**0.5)
    assert points[2]["proxy"] == pytest.approx(5.0) and points[2]["gold"] == pytest.approx(0.5)
    summary = overopt.rl_summary(points)
    assert summary["gold_peak_step"] == 6 and summary["final_d"] == pytest.approx(5**0.5)


def test_warm_members_share_their_initialisation_and_differ_in_data_order():
    warm = overopt.OveroptConfig(proxies=overopt.ProxiesConfig(ensemble=3, warm=True), seed=2)
    assert [overopt.member_seeds(warm, k) for k in range(3)] == [
        {"seed": 2, "data_seed": 2 + k} for k in range(3)
    ]
    plain = replace(warm, proxies=overopt.ProxiesConfig(ensemble=3, warm=False))
    assert [overopt.member_seeds(plain, k) for k in range(3)] == [{"seed": 2 + k} for k in range(3)]
