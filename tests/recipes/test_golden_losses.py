"""Golden values of the first logged steps of ``rlhfkit rl`` (GRPO, PPO) and ``rlhfkit dpo``.

The constants were recorded from commit 1a0b603 (before the policy-gradient recipe became the
package ``rlhfkit.recipes.policy_gradient``) on the tiny random model, fp32, one intra-op
thread, and reproduced bit for bit by a second run. A refactor that keeps the math gives the
same numbers; one that changes an advantage, a KL term, the aggregation, the clip, the value
loss or the data order does not.

The runs go through the command line (flags only, preset defaults for the KL coefficient), so
the test does not depend on where the recipe modules live nor on the name of the KL flag.
GRPO keeps its KL in the loss (k3, coefficient 0.04). Each GRPO step is logged; PPO (4 epochs
per rollout, critic from the policy's weights) logs once per rollout batch, so its three
records are optimiser steps 4, 8 and 12. The first DPO step is log 2 (policy = reference).

The PPO values were recorded again when the head's weight gradient became D^T (g h) instead of
(g D)^T h (the same sum, rounded in another order; ``rlhfkit.ops.logprobs``): rewards and clip
fractions are unchanged, losses and norms moved by at most 3e-5 relative (the first record
already follows three updates). GRPO and DPO kept their values.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhfkit.cli import main as cli_main

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_cache")


RTOL, ATOL = 1e-5, 1e-7
"""Relative tolerance of every golden value; absolute floor for values at zero."""

GOLDEN: dict[str, dict[str, list[float]]] = {
    "grpo": {
        "train/loss": [-1.4901161193847656e-08, 0.0020835325121879578, 0.00372978113591671],
        "train/grad_norm": [0.8832134008407593, 0.5239642858505249, 0.5898666381835938],
        "train/kl_per_token": [0.0, 0.05330969184957525, 0.0932430624961853],
        "rollout/reward": [0.023149793292456335, 0.035263190702915934, 0.017715517241379312],
        "rollout/advantage_std": [0.8912001107303946, 0.7722966519875731, 0.8910766365570825],
    },
    "ppo": {
        "train/loss": [-0.04605234041810036, -0.12403789907693863, -0.10958211869001389],
        "critic/value_loss": [0.01325333739320437, 0.014138291279474894, 0.01589932789405187],
        "train/grad_norm": [0.7361106872558594, 0.1313076764345169, 0.12740348279476166],
        "train/grad_norm/critic": [0.2837117314338684, 0.19185307621955872, 0.3145498037338257],
        "train/clip_frac": [0.4635416666666667, 0.8125, 0.7760416666666666],
        "rollout/reward": [0.023149793292456335, 0.04471238186263341, 0.049781199246659774],
        "rollout/advantage_std": [0.17852021406685653, 0.3035574524509292, 0.45377400066391227],
    },
    "dpo": {
        "train/loss": [0.6931471824645996, 0.439889132976532, 0.34544259309768677],
        "train/grad_norm": [3.8052780628204346, 2.2595930099487305, 1.7726067304611206],
        "train/rewards/margin": [0.0, 0.5933035016059875, 0.8853106498718262],
    },
}
"""Per run: metric -> its value at each of the first three logged records."""


def _common(model_dir: Path, run_dir: Path) -> list[str]:
    return [
        "--model.name", str(model_dir), "--model.precision", "fp32",
        "--log.run_dir", str(run_dir), "--log.progress", "False", "--log.tensorboard", "False",
    ]  # fmt: skip


def rl_args(model_dir: Path, task: tuple[Path, Path], run_dir: Path, preset: str) -> list[str]:
    """``rlhfkit rl`` on the toy task: 4 prompts x 4 samples of at most 12 tokens per rollout."""
    data, reward = task
    return [
        "rl", *_common(model_dir, run_dir), "--algo.preset", preset,
        "--data.train", str(data), "--rewards", f"{reward}:letter_a",
        "--sampling.num_samples", "4", "--sampling.max_new_tokens", "12",
        "--sampling.temperature", "1.0",
        "--optim.lr", "1e-2", "--optim.warmup_ratio", "0.0", "--optim.schedule", "constant",
        "--loop.batch_size", "4", "--sample_every", "0",
    ]  # fmt: skip


def dpo_args(model_dir: Path, pairs: Path, run_dir: Path) -> list[str]:
    """``rlhfkit dpo`` (sigmoid loss, beta by default) on 24 pairs, 8 per step."""
    return [
        "dpo", *_common(model_dir, run_dir), "--data.train", str(pairs),
        "--data.eval", str(pairs), "--algo.loss", "dpo", "--optim.lr", "1e-3",
        "--optim.warmup_ratio", "0.0", "--loop.batch_size", "8", "--eval.win_rate", "False",
    ]  # fmt: skip


def train_records(run_dir: Path) -> list[dict]:
    """The records of metrics.jsonl that log a training step (not the evaluations)."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "train/loss" in r]


def check_golden(name: str, records: list[dict]) -> None:
    golden = GOLDEN[name]
    got = {key: [r.get(key) for r in records[:3]] for key in golden}
    message = f"{name}: recorded {golden}, got {got}"
    assert len(records) >= 3, message
    for key, values in golden.items():
        assert got[key] == pytest.approx(values, rel=RTOL, abs=ATOL), message


def test_grpo_first_three_steps(tiny_model_dir, pg_task, tmp_path):
    run = tmp_path / "grpo"
    cli_main([*rl_args(tiny_model_dir, pg_task, run, "grpo"), "--loop.max_steps", "3"])
    records = train_records(run)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[0]["train/kl_coef"] == 0.04  # the preset's coefficient, KL in the loss
    assert records[-1]["train/kl_per_token"] > 0  # the KL path is live
    check_golden("grpo", records)


def test_ppo_first_three_rollouts(tiny_model_dir, pg_task, tmp_path):
    run = tmp_path / "ppo"
    cli_main([*rl_args(tiny_model_dir, pg_task, run, "ppo"), "--loop.max_steps", "12"])
    records = train_records(run)
    assert [r["step"] for r in records] == [4, 8, 12]  # 4 epochs per rollout
    assert all("critic/value_loss" in r for r in records)
    check_golden("ppo", records)


def test_dpo_first_three_steps(tiny_model_dir, pairs_file, tmp_path):
    run = tmp_path / "dpo"
    cli_main([*dpo_args(tiny_model_dir, pairs_file, run), "--loop.max_steps", "3"])
    records = train_records(run)
    assert [r["step"] for r in records] == [1, 2, 3]
    check_golden("dpo", records)
