"""Resume equals an uninterrupted run: RL with learner state outside the weights, offline DPO.

Each case runs 4 steps straight, and 2 steps then ``--loop.resume True`` to step 4 from the
step-2 checkpoint (constant learning rate, so the 2-step and the 4-step runs share a schedule).
Steps 3-4 must log the same metrics and both runs must save the same final weights.

The RL cases carry two pieces of state besides the weights and the optimiser: the EMA
reward baseline (``--algo.advantage ema_baseline``) and the adaptive KL coefficient
(``--algo.kl_target``). The coefficient is checked to move at every step, and the logged
advantage mean is checked against the EMA recursion rebuilt from the logged rewards, so that
a resume which forgot either would change the logged step-3 numbers: a forgotten coefficient
logs the preset's value again at step 3 and shifts the loss, a forgotten baseline restarts at
the step-3 batch mean (advantage mean 0). This was checked by deleting ``kl_coef`` and
``ema_baseline`` from the step-2 checkpoint's ``trainer_state.pt`` before resuming (commit
1a0b603). GRPO at step 3: without the coefficient ``train/kl_coef`` 0.038976 -> 0.04 and
``train/loss`` 0.0033413 -> 0.0033758; without the baseline ``train/loss`` -> 0.0013119 and
``rollout/advantage_mean`` -0.0020294 -> 0. REINFORCE at step 3: ``train/loss`` 0.038151 ->
0.038956 (coefficient) and -> 4e-9 (baseline). Each is far outside the 1e-6 tolerance.

All runs go through the command line with flags only (the KL coefficient is the preset's
default), so they keep working when the recipe modules move or the coefficient flag is renamed.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhfkit.cli import main as cli_main

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_cache")


EMA_DECAY = 0.9
"""The default ``--algo.ema_decay``."""


def _common(model_dir: Path) -> list[str]:
    return [
        "--model.name", str(model_dir), "--model.precision", "fp32",
        "--log.progress", "False", "--log.tensorboard", "False",
        "--optim.warmup_ratio", "0.0", "--optim.schedule", "constant", "--loop.save_every", "2",
    ]  # fmt: skip


def train_records(run_dir: Path) -> list[dict]:
    """The training-step records of metrics.jsonl (not the evaluations), without wall time."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time"} for r in rows if "train/loss" in r]


def run_straight_and_resumed(args: list[str], tmp_path: Path) -> tuple[Path, Path]:
    """``args`` for 4 steps in one go, and for 2 steps then resumed to 4."""
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    cli_main([*args, "--log.run_dir", str(straight), "--loop.max_steps", "4"])
    cli_main([*args, "--log.run_dir", str(cut), "--loop.max_steps", "2"])
    assert [r["step"] for r in train_records(cut)] == [1, 2]
    assert (cut / "checkpoints" / "latest").read_text().strip() == "step-00000002"
    cli_main([*args, "--log.run_dir", str(cut), "--loop.max_steps", "4", "--loop.resume", "True"])
    return straight, cut


def assert_resumed_equals_straight(straight: Path, cut: Path) -> list[dict]:
    """Same step records (keys and values) and the same final weights; returns the records."""
    a, b = train_records(straight), train_records(cut)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b, strict=True):
        assert ra.keys() == rb.keys()
        for key in ra:
            assert rb[key] == pytest.approx(ra[key], rel=1e-6, abs=1e-8), (ra["step"], key)
    wa = load_file(str(straight / "final" / "model.safetensors"))
    wb = load_file(str(cut / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], atol=1e-6, rtol=0)
    return a


@pytest.mark.parametrize(
    ("preset", "start_coef", "kl_in_reward"),
    [("grpo", 0.04, False), ("reinforce", 0.05, True)],
    ids=["grpo-kl-in-loss", "reinforce-kl-in-reward"],
)
def test_rl_resume_restores_ema_baseline_and_kl_coefficient(
    tiny_model_dir, pg_task, tmp_path, preset, start_coef, kl_in_reward
):
    """GRPO keeps its k3 KL in the loss, REINFORCE its sequence k1 in the reward; both with
    the EMA baseline and the adaptive controller (target 0.01 nats, far below the KL the
    lr-1e-2 policy reaches, so the coefficient grows by the clipped 16 / 20 * 0.2 each step).
    """
    data, reward = pg_task
    args = [
        "rl", *_common(tiny_model_dir), "--algo.preset", preset,
        "--algo.advantage", "ema_baseline", "--algo.kl_target", "0.01",
        "--algo.kl_horizon", "20", "--data.train", str(data), "--rewards",
        f"{reward}:letter_a", "--sampling.num_samples", "4", "--sampling.max_new_tokens", "12",
        "--optim.lr", "1e-2", "--loop.batch_size", "4", "--sample_every", "0",
    ]  # fmt: skip
    straight, cut = run_straight_and_resumed(args, tmp_path)
    records = assert_resumed_equals_straight(straight, cut)

    coefs = [r["train/kl_coef"] for r in records]
    assert coefs[0] == start_coef
    assert all(b != a for a, b in itertools.pairwise(coefs)), coefs  # it moves
    if not kl_in_reward:
        assert records[2]["train/kl_per_token"] > 0  # the coefficient weighs a live KL term

    # The EMA baseline: b_1 = mean r_1, b_{t+1} = decay b_t + (1 - decay) mean r_t, and
    # A = r - c KL_seq (KL in the reward) - b, so mean A = mean r - c mean KL_seq - b.
    baseline = None
    for r in records:
        mean = r["rollout/reward"]
        baseline = mean if baseline is None else baseline
        shaped = mean - (r["train/kl_coef"] * r["rollout/kl_seq"] if kl_in_reward else 0.0)
        assert r["rollout/advantage_mean"] == pytest.approx(shaped - baseline, abs=1e-6)
        baseline = EMA_DECAY * baseline + (1 - EMA_DECAY) * mean
    # a baseline restarted at step 3 would make its advantage mean (about) 0
    assert abs(records[2]["rollout/advantage_mean"]) > 1e-4


def test_dpo_resume_equals_uninterrupted(tiny_model_dir, pairs_file, tmp_path):
    args = [
        "dpo", *_common(tiny_model_dir), "--data.train", str(pairs_file),
        "--data.eval", str(pairs_file), "--algo.loss", "dpo", "--optim.lr", "1e-3",
        "--loop.batch_size", "8", "--eval.win_rate", "False",
    ]  # fmt: skip
    straight, cut = run_straight_and_resumed(args, tmp_path)
    records = assert_resumed_equals_straight(straight, cut)
    assert records[2]["train/loss"] < records[0]["train/loss"]  # it trains
