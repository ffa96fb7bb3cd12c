"""rlhfkit eval, rs, bon and filter on the tiny model, and the generate-and-score engine."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from rlhfkit.config import LogConfig, LoopConfig, ModelConfig, OptimConfig
from rlhfkit.eval.run import Grid, GridCache, score_sorted
from rlhfkit.inference import best_of_n, difficulty, evaluate, rejection_sampling
from rlhfkit.inference.evaluate import EvalDataConfig
from rlhfkit.ops.selection import bon_kl
from rlhfkit.recipes.policy_gradient.collect import informative_groups
from rlhfkit.rollout.hf import SamplingConfig

REWARDS = '''
import json
from pathlib import Path

LOG = Path(__file__).with_name("calls.txt")


def letter_a(completion):
    """Share of the letter 'a' in the completion."""
    with LOG.open("a") as f:
        f.write("x")
    text = completion.strip()
    return sum(c == "a" for c in text) / max(len(text), 1)


COUNTS = {}


def planted(completion, idx, passes):
    """1.0 for the first ``passes`` samples of prompt ``idx``, then 0.0 (a known pass count)."""
    COUNTS[idx] = COUNTS.get(idx, 0) + 1
    return float(COUNTS[idx] <= passes)
'''


@pytest.fixture
def task(tmp_path) -> tuple[Path, Path]:
    (tmp_path / "rewards.py").write_text(REWARDS)
    rows = [{"prompt": f"Say a {i}", "answer": "a", "idx": i, "passes": i % 5} for i in range(10)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path / "prompts.jsonl", tmp_path / "rewards.py"


def _calls(task) -> int:
    log = task[1].with_name("calls.txt")
    return len(log.read_text()) if log.exists() else 0


def _model(tiny_model_dir) -> ModelConfig:
    return ModelConfig(name=str(tiny_model_dir), precision="fp32")


def _data(task) -> EvalDataConfig:
    return EvalDataConfig(source=str(task[0]), split="train", schema="verifiable")


class _Batched:
    """A batched scorer that records the order it was given."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def __call__(self, completion: str) -> float:
        return float(len(completion)) + 0.5 * completion.count("b")

    def score_batch(self, completions, fields):
        self.seen = list(completions)
        return [self(c) for c in completions]


def test_length_sorted_scores_equal_unsorted_scores():
    texts = ["bb", "a", "bbbbb", "", "abab", "b"]
    scorer = _Batched()
    sorted_scores = score_sorted(scorer, texts, [{}] * len(texts))
    assert sorted_scores == [scorer(t) for t in texts]
    assert [len(t) for t in scorer.seen] == sorted((len(t) for t in texts), reverse=True)


def test_grid_cache_round_trip_keeps_skipped_rewards(tmp_path):
    grid = Grid(
        [["a", "b"]], [[1, 2]], [["eos", "length"]], [[0.5, math.nan]], {"r": [[0.5, None]]}
    )
    cache = GridCache(tmp_path)
    cache.save_samples("k", grid)
    cache.save_scores("s", grid)
    again = cache.load_samples("k")
    assert again.texts == grid.texts and again.finish == grid.finish
    assert cache.load_scores("s", again)
    assert again.rewards[0][0] == 0.5 and math.isnan(again.rewards[0][1])
    assert cache.load_samples("other") is None


def test_eval_report_obeys_the_pass_at_k_identities_and_caches(
    tiny_model_dir, task, tmp_path, monkeypatch
):
    cfg = evaluate.EvalConfig(
        model=_model(tiny_model_dir), data=_data(task),
        sampling=SamplingConfig(max_new_tokens=6, temperature=1.0, num_samples=4),
        rewards=(f"{task[1]}:letter_a",), threshold=0.1, ks=(1, 2, 4, 8),
        cache_dir=str(tmp_path / "cache"), output=str(tmp_path / "report.json"),
        samples_output=str(tmp_path / "samples.jsonl"),
    )  # fmt: skip
    report = evaluate.main(cfg)
    overall = report["overall"]
    assert report["ks"] == [1, 2, 4]  # k = 8 exceeds N = 4
    assert overall["pass@1"] == pytest.approx(overall["accuracy"])
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 40
    correct = [[r["reward"] >= 0.1 for r in rows[i * 4 : i * 4 + 4]] for i in range(10)]
    assert overall["pass@4"] == pytest.approx(sum(any(c) for c in correct) / 10)
    assert overall["pass^4"] == pytest.approx(sum(all(c) for c in correct) / 10)
    assert json.loads((tmp_path / "report.json").read_text())["overall"] == overall
    calls = _calls(task)
    assert calls == 40
    import rlhfkit.eval.run

    def no_weights(*args, **kwargs):
        raise AssertionError("the model's weights were loaded for cached samples")

    monkeypatch.setattr(rlhfkit.eval.run, "load_model", no_weights)
    assert evaluate.main(cfg)["overall"] == overall  # cached: no model, sampling or scoring
    assert _calls(task) == calls


def test_rs_selects_the_best_trains_and_controls(tiny_model_dir, task, tmp_path):
    run_dir = tmp_path / "rs"
    cfg = rejection_sampling.RSConfig(
        model=_model(tiny_model_dir), data=_data(task),
        sampling=SamplingConfig(max_new_tokens=6, temperature=1.0, num_samples=4),
        rewards=(f"{task[1]}:letter_a",),
        selection=rejection_sampling.SelectionConfig(finished_only=False, seed=3),
        optim=OptimConfig(lr=1e-3, warmup_ratio=0.0),
        loop=LoopConfig(batch_size=4, max_steps=2, micro_batch_tokens=256),
        heldout=rejection_sampling.HeldoutConfig(source=str(task[0]), split="train", limit=4),
        log=LogConfig(run_dir=str(run_dir), tensorboard=False, progress=False),
    )  # fmt: skip
    summary = rejection_sampling.main(cfg)
    cached = [json.loads(p.read_text()) for p in (run_dir / "cache").glob("scores-*.json")]
    samples = next(c["rewards"] for c in cached if len(c["rewards"][0]) == 4)  # not held-out
    selected = [json.loads(line) for line in (run_dir / "selected.jsonl").read_text().splitlines()]
    control = [json.loads(line) for line in (run_dir / "control.jsonl").read_text().splitlines()]
    assert [r["prompt_index"] for r in selected] == list(range(10))
    for r in selected:  # the argmax, ties to the first sample
        row = samples[r["prompt_index"]]
        assert r["sample"] == row.index(max(row)) and r["reward"] == max(row)
        assert r["messages"][-1]["role"] == "assistant"
    assert sorted(r["prompt_index"] for r in control) == list(range(10))
    assert (
        summary["selection"]["selected"]["reward_mean"]
        >= summary["selection"]["control"]["reward_mean"]
    )
    assert set(summary["heldout"]) == {"start", "sft", "control"}
    assert (run_dir / "sft" / "final").is_dir() and (run_dir / "control" / "final").is_dir()
    # a re-run reuses the cached samples and scores and the finished SFT stages
    calls, stamp = _calls(task), (run_dir / "sft" / "final").stat().st_mtime_ns
    rejection_sampling.main(cfg)
    assert _calls(task) == calls and (run_dir / "sft" / "final").stat().st_mtime_ns == stamp


def test_rs_min_reward_and_finished_only_filter_the_selection():
    grid = Grid(
        texts=[["a", "b"], ["c", "d"], ["e", "f"]],
        lengths=[[1, 1]] * 3,
        finish=[["eos", "length"], ["eos", "eos"], ["length", "length"]],
        rewards=[[0.2, 0.9], [0.7, 0.4], [1.0, 1.0]],
    )
    chosen, control = rejection_sampling.pick(
        grid, rejection_sampling.SelectionConfig(min_reward=0.5, seed=0)
    )
    assert chosen == [(1, 0)]  # prompt 0's best is truncated, its other is below 0.5; 2 all cut
    assert [i for i, _ in control] == [1]
    chosen, control = rejection_sampling.pick(
        grid, rejection_sampling.SelectionConfig(mode="top_k_overall", k=2, seed=0)
    )
    assert chosen == [(1, 0), (1, 1)] and len(control) == 2
    assert all(grid.finish[i][j] == "eos" for i, j in control)


def test_bon_report_takes_the_argmax_and_the_analytic_kl():
    rewards = [[0.1, 0.7, 0.7, 0.2], [1.0, 0.0, 0.0, 0.0], [math.nan, 0.3, 0.2, 0.1]]
    report = best_of_n.bon_report(rewards, threshold=0.5)
    assert report["picks"] == [(0, 1), (1, 0), (2, 1)]
    assert report["reward_best"] == pytest.approx((0.7 + 1.0 + 0.3) / 3)
    assert report["reward_single"] == pytest.approx((0.1 + 1.0) / 2)
    assert report["accuracy_best"] == pytest.approx(2 / 3)
    assert report["kl_bon"] == pytest.approx(bon_kl(4))


def test_bon_command_writes_the_best_completions(tiny_model_dir, task, tmp_path):
    cfg = best_of_n.BoNConfig(
        model=_model(tiny_model_dir), data=_data(task),
        sampling=SamplingConfig(max_new_tokens=6, temperature=1.0, num_samples=4),
        rewards=(f"{task[1]}:letter_a",), cache_dir=None, output=str(tmp_path / "bon.jsonl"),
    )  # fmt: skip
    report = best_of_n.main(cfg)
    rows = [json.loads(line) for line in (tmp_path / "bon.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and report["reward_best"] >= report["reward_single"]
    assert all(r["reward"] == max(r["rewards"]) for r in rows)


def test_filter_keeps_exactly_the_band(tiny_model_dir, task, tmp_path):
    cfg = difficulty.FilterConfig(
        model=_model(tiny_model_dir), data=_data(task),
        sampling=SamplingConfig(max_new_tokens=4, temperature=1.0, num_samples=4),
        rewards=(f"{task[1]}:planted",), low=0.25, high=0.75, cache_dir=None,
        output=str(tmp_path / "kept.jsonl"),
    )  # fmt: skip
    result = difficulty.main(cfg)
    kept = [json.loads(line) for line in (tmp_path / "kept.jsonl").read_text().splitlines()]
    # prompt i passes (i % 5) of 4 samples (4 % 5 = 4: all); keep 1..3 passes
    assert [r["idx"] for r in kept] == [i for i in range(10) if 1 <= i % 5 <= 3]
    assert [r["pass_rate"] for r in kept] == [(r["idx"] % 5) / 4 for r in kept]
    assert result["kept"] == 6 and result["total"] == 10


def test_online_band_keeps_groups_by_pass_rate():
    nan = math.nan
    rewards = torch.tensor(
        [[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [1.0, 0.0, nan, nan]]
    )
    assert informative_groups(rewards) == [0, 1, 3]
    assert informative_groups(rewards, (0.3, 0.8)) == [1, 3]
    assert informative_groups(rewards, (0.0, 0.25)) == [0]
