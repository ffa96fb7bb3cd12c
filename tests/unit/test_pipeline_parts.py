"""The pipeline's pure parts: pair formation, the unseen-task filter, the headline."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from rlhfkit.data.tasks.preferences import gold_score
from rlhfkit.eval.intervals import mean_interval, paired_difference
from rlhfkit.pipeline import evaluation as pipeline_eval
from rlhfkit.pipeline import labels as pipeline_labels
from rlhfkit.pipeline import run as pipeline
from rlhfkit.pipeline.evaluation import headline

GOLD = pipeline.GOLD


def _row(i, completions):
    return {"id": i, "prompt": [{"role": "user", "content": f"q{i}"}], "reference": "w\nAnswer: 1",
            "task": "arithmetic", "completions": completions}  # fmt: skip


def test_pairs_are_every_two_distinct_non_blank_completions():
    rows = [_row(0, ["a", "b", "a", " ", "c"]), _row(1, ["x", "x"])]
    pairs = pipeline_labels.pairs_of(rows, None)
    assert [(p["id"], p["a"], p["b"]) for p in pairs] == [
        ("0:0-1", "a", "b"), ("0:0-4", "a", "c"), ("0:1-4", "b", "c")
    ]  # fmt: skip
    assert [p["id"] for p in pipeline_labels.pairs_of(rows, 2)] == ["0:0-1", "0:0-4"]
    assert pairs[0]["reference"] == "w\nAnswer: 1" and pairs[0]["task"] == "arithmetic"


def test_gold_groups_rate_each_distinct_completion_by_the_gold_judge():
    good, formatted, bare = "w\nAnswer: 1", "w\nAnswer: 2", "no answer"
    rows = [_row(0, [formatted, good, formatted, " ", bare]), _row(1, [formatted, formatted])]
    (group,) = pipeline_labels.gold_groups(rows)  # row 1: one distinct completion, no comparison
    assert group["completions"] == [formatted, good, bare]
    assert group["ratings"] == [
        gold_score(t, "w\nAnswer: 1", "arithmetic") for t in group["completions"]
    ]
    assert group["ratings"] == [0.3, 1.3, 0.0] and group["prompt"] == rows[0]["prompt"]
    assert pipeline_labels.gold_groups([_row(2, [formatted, "w\nAnswer: 3"])]) == []  # all tie


def test_pairs_become_two_completion_ratings_rows_keeping_their_fields():
    pair = {"prompt": "q", "chosen": "c", "rejected": "r", "category": "verbose"}
    assert pipeline_labels.pair_groups([pair]) == [
        {"prompt": "q", "category": "verbose", "completions": ["c", "r"], "ratings": [1.0, 0.0]}
    ]


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_rm_rows_are_ratings_groups_plus_the_builtin_pairs(tmp_path):
    pairs_cfg = replace(pipeline.PipelineConfig(), unseen_tasks=())  # the default: pairs
    data = replace(pairs_cfg.rm.data, schema="ratings")
    cfg = replace(pairs_cfg, rm=replace(pairs_cfg.rm, data=data))
    good, formatted = "w\nAnswer: 1", "w\nAnswer: 2"
    (tmp_path / "candidates.jsonl").write_text(json.dumps(_row(0, [formatted, good])) + "\n")
    pair = {"prompt": "q", "chosen": "a", "rejected": "b"}
    (tmp_path / "pairs.jsonl").write_text(json.dumps(pair) + "\n")
    builtin = pipeline.load_rows("builtin:preferences", split="train")
    builtin += pipeline.load_rows("builtin:wrong_answers", split="train")
    rows = _rows(pipeline._rm_train_file(cfg, tmp_path))
    assert rows[0]["completions"] == [formatted, good] and rows[0]["ratings"] == [0.3, 1.3]
    assert len(rows) == 1 + len(builtin)
    assert rows[1]["completions"] == [builtin[0].data["chosen"], builtin[0].data["rejected"]]
    assert all(r["ratings"] == [1.0, 0.0] for r in rows[1:])
    judged = replace(cfg, labels=replace(cfg.labels, mode="judge"))  # pairwise labels: K = 2 rows
    assert _rows(pipeline._rm_train_file(judged, tmp_path))[0] == {
        "prompt": "q", "completions": ["a", "b"], "ratings": [1.0, 0.0]
    }  # fmt: skip
    rows = _rows(pipeline._rm_train_file(pairs_cfg, tmp_path))
    assert rows[0] == pair and "chosen" in rows[1] and len(rows) == 1 + len(builtin)
    assert rows[-1]["category"] == "wrong_answer"  # the correctness pairs come last
    no_extra = replace(pairs_cfg, labels=replace(pairs_cfg.labels, mix_wrong_answers=False))
    assert len(_rows(pipeline._rm_train_file(no_extra, tmp_path))) == 1 + 828
    alone = replace(pairs_cfg, labels=replace(pairs_cfg.labels, mix_builtin=False))
    assert pipeline._rm_train_file(alone, tmp_path) == tmp_path / "pairs.jsonl"
    bad = replace(cfg, rm=replace(cfg.rm, data=replace(cfg.rm.data, schema="rankings")))
    assert [k for k, _ in bad.problems()] == ["rm.data.schema"]


def test_seen_rows_leave_out_the_unseen_task_types(tmp_path):
    cfg = replace(pipeline.PipelineConfig(), unseen_tasks=("capitals", "antonyms"))
    path, split = pipeline._seen(cfg, tmp_path, "builtin:preferences", "train")
    rows = [json.loads(x) for x in Path(path).read_text().splitlines()]
    assert split == "train" and rows
    assert not {r["task"] for r in rows} & {"capitals", "antonyms"}
    full = pipeline.load_rows("builtin:preferences", split="train")
    assert len(rows) == sum(r.data["task"] not in ("capitals", "antonyms") for r in full)
    assert pipeline._seen(cfg, tmp_path, "builtin:preferences", "train") == (path, "train")
    fewer = replace(cfg, unseen_tasks=("capitals",))
    assert pipeline._seen(fewer, tmp_path, "builtin:preferences", "train")[0] != path
    other, _ = pipeline._seen(cfg, tmp_path, "builtin:preferences", "heldout")
    assert other != path  # one file per source and split
    none = replace(cfg, unseen_tasks=())
    assert pipeline._seen(none, tmp_path, "builtin:x", "heldout") == ("builtin:x", "heldout")


def _grid(texts, reference):
    return SimpleNamespace(
        texts=texts, components={GOLD: [[gold_score(t, reference) for t in row] for row in texts]}
    )


def test_headline_figures_equal_their_formulas():
    ref = "w\nAnswer: 1"
    right, wrong, blank = "w\nAnswer: 1", "w\nAnswer: 2", ""
    prompts = [SimpleNamespace(fields={"reference": ref, "task": t}) for t in ("a", "a", "b", "b")]
    sft = _grid([[wrong, wrong], [right, wrong], [wrong, blank], [right, right]], ref)
    final = _grid([[right, wrong], [right, right], [wrong, wrong], [right, wrong]], ref)
    out = headline(prompts, sft, final, GOLD, 2, unseen_tasks=("b",))
    assert set(out) == {"all", "seen", "unseen"}
    before = [0.3, 0.8, 0.15, 1.3]
    after = [0.8, 1.3, 0.3, 0.8]
    assert out["all"]["sft"] == mean_interval(before)
    assert out["all"]["final"]["mean"] == pytest.approx(sum(after) / 4)
    assert out["all"]["gain"] == paired_difference(after, before)
    assert out["seen"]["gain"] == paired_difference(after[:2], before[:2])
    wtl = out["all"]["win_tie_loss"]  # per prompt: (win, tie), (tie, win), (tie, win), (tie, loss)
    assert wtl["win"]["mean"] == pytest.approx(3 / 8)
    assert wtl["tie"]["mean"] == pytest.approx(4 / 8)
    assert wtl["loss"]["mean"] == pytest.approx(1 / 8)
    assert wtl["wins_per_loss"] == 3.0
    assert out["unseen"]["prompts"] == 2
    given = pipeline_eval.gold_outcomes(prompts, sft, final, 2)
    assert headline(prompts, sft, final, GOLD, 2, ("b",), outcomes=given) == out
    assert "within noise" in out["all"]["sentence"] or "raised" in out["all"]["sentence"]


def test_headline_sentence_says_when_a_gain_is_real():
    ref = "w\nAnswer: 1"
    prompts = [SimpleNamespace(fields={"reference": ref, "task": "a"}) for _ in range(3)]
    sft = _grid([["w\nAnswer: 2"]] * 3, ref)
    final = _grid([["w\nAnswer: 1"]] * 3, ref)
    out = headline(prompts, sft, final, GOLD, 1)
    assert set(out) == {"all"}
    assert out["all"]["sentence"].startswith("RLHF raised the gold reward by 1.00")
    assert "beat the SFT model 100%" in out["all"]["sentence"]
    flat = headline(prompts, sft, sft, GOLD, 1)["all"]["sentence"]
    assert "within noise" in flat


def test_on_policy_agreement_counts_pairs_the_gold_judge_separates():
    from rlhfkit.pipeline.evaluation import on_policy_agreement

    proxy = [[2.0, 1.0, 1.0], [0.0, 5.0]]
    gold = [[1.3, 0.3, 0.0], [0.3, 0.3]]  # prompt 2: a gold tie, not counted
    out = on_policy_agreement(proxy, gold)
    # pairs (0,1) right, (0,2) right, (1,2) proxy tie = 1/2
    assert out["pairs"] == 3 and out["accuracy"] == pytest.approx(2.5 / 3)
    assert out["correctness_pairs"] == 2 and out["correctness_accuracy"] == 1.0
    flipped = on_policy_agreement([[1.0, 2.0]], [[1.3, 0.3]])
    assert flipped["accuracy"] == 0.0 and flipped["correctness_accuracy"] == 0.0


def test_seed_shifts_every_training_stage_and_the_candidates():
    base = pipeline.PipelineConfig()
    cfg = pipeline._seeded(replace(base, seed=7))
    assert cfg.sft.loop.seed == base.sft.loop.seed + 7
    assert cfg.rm.loop.seed == base.rm.loop.seed + 7
    assert cfg.rl.loop.seed == base.rl.loop.seed + 7
    assert cfg.rl.sampling.seed == base.rl.sampling.seed + 7
    assert cfg.dpo.loop.seed == base.dpo.loop.seed + 7
    assert cfg.candidates.sampling.seed == base.candidates.sampling.seed + 7
    assert cfg.eval == base.eval  # the evaluation samples alike for every seed
    assert pipeline._seeded(base) is base


def _rl_rows(golds, step=10, kl_step=0.04):
    return [{"step": i * step, "kl": i * kl_step, "proxy": 0.1 * i, "gold": g}
            for i, g in enumerate(golds)]  # fmt: skip


def test_rl_gold_peak_says_where_gold_peaked_and_how_far_the_run_went_past_it(tmp_path):
    import math

    from rlhfkit.eval.report import render_report, rl_gold_peak

    rows = _rl_rows([0.0, 0.3, 0.5, 0.4, 0.2, None, 0.1])[::-1]  # any order; one gold missing
    peak = rl_gold_peak(rows, d_star=0.35)
    assert (peak["step"], peak["gold"], peak["final_step"]) == (20, 0.5, 60)
    assert peak["d"] == pytest.approx(math.sqrt(0.08))
    assert peak["final_d"] == pytest.approx(math.sqrt(0.24))
    assert peak["reached"] and peak["past"] == pytest.approx(math.sqrt(0.24) - math.sqrt(0.08))
    sentence = peak["sentence"]
    assert sentence.startswith("The RL gold reward peaked (step 20, d = 0.283, gold 0.500)")
    assert (
        "d* = 0.350" in sentence and f"{peak['past']:+.3f} in d past the measured peak" in sentence
    )
    assert rl_gold_peak([{"step": 0, "kl": 0.1, "gold": None}]) is None
    assert "never turns down" in rl_gold_peak(rows, d_star=math.inf)["sentence"]
    page = render_report({"overoptimisation": {"rl": rows}}, tmp_path / "r.html").read_text()
    assert "The RL gold reward peaked (step 20" in page and "final d - peak d" in page


def test_rl_gold_peak_says_when_the_run_did_not_reach_its_peak(tmp_path):
    from rlhfkit.eval.report import render_report, rl_gold_peak

    peak = rl_gold_peak(_rl_rows([0.0, 0.1, 0.2, 0.2, 0.3]), d_star=2.0)
    assert not peak["reached"] and peak["past"] is None and peak["step"] == 40
    assert "did not reach its peak" in peak["sentence"]
    assert "d* = 2.000, beyond the run's final d" in peak["sentence"]
    tie = rl_gold_peak(_rl_rows([0.0, 0.3, 0.1, 0.3]))  # the first of equal golds is the peak
    assert tie["reached"] and tie["step"] == 10 and tie["d_star"] is None
    flat = rl_gold_peak(_rl_rows([0.2, 0.2, 0.2]))
    assert flat["flat"] and not flat["reached"] and "did not change" in flat["sentence"]
    data = {"overoptimisation": {"rl": _rl_rows([0.0, 0.1, 0.2, 0.3, 0.4])}}
    page = render_report(data, tmp_path / "r.html").read_text()
    # a Gao fit exists (4 points past d = 0); the gain grows as d^2, so its beta < 0
    assert "the run did not reach its peak; Gao&#x27;s fit never turns down" in page


def test_ensemble_scores_combine_per_pair_side():
    from rlhfkit.eval.reward_model import ScoredPair
    from rlhfkit.pipeline.ensemble import combine_pairs

    def pairs(*scores):
        return [ScoredPair(c, r, 5, 6, "cat", "src") for c, r in scores]

    members = [pairs((1.0, 0.0), (0.0, 2.0)), pairs((3.0, 4.0), (1.0, 1.0))]
    low = combine_pairs(members, "min", 0.0)
    assert [(p.chosen, p.rejected) for p in low] == [(1.0, 0.0), (0.0, 1.0)]
    mean = combine_pairs(members, "mean", 0.0)
    assert [(p.chosen, p.rejected) for p in mean] == [(2.0, 2.0), (0.5, 1.5)]
    uwo = combine_pairs(members, "uwo", 0.5)  # mean - 0.5 * population std
    assert [(p.chosen, p.rejected) for p in uwo] == [(1.5, 1.0), (0.25, 1.25)]
    assert uwo[0].category == "cat" and uwo[0].chosen_tokens == 5
    with pytest.raises(ValueError, match="pair counts"):
        combine_pairs([members[0], members[1][:1]], "mean", 0.0)


def test_rl_reward_spec_names_the_ensemble_or_the_warm_model(tmp_path):
    from rlhfkit.pipeline.ensemble import rl_reward_spec
    from rlhfkit.rewards.model import parse_ensemble_spec

    base = pipeline.PipelineConfig()
    assert rl_reward_spec(base, tmp_path) == f"rm:{tmp_path / 'rm' / 'final'}"
    warm = replace(base, rm_ensemble=3, rm_combine="warm")
    assert rl_reward_spec(warm, tmp_path) == f"rm:{tmp_path / 'rm' / 'final'}"
    spec = rl_reward_spec(replace(base, rm_ensemble=3, rm_uwo_lambda=0.25), tmp_path)
    members = [str(tmp_path / "rm" / "members" / f"s{k}" / "final") for k in range(3)]
    assert parse_ensemble_spec(spec) == ("uwo", 0.25, members)
    low = rl_reward_spec(replace(base, rm_ensemble=2, rm_combine="min"), tmp_path)
    assert parse_ensemble_spec(low) == ("min", 1.0, members[:2])


def test_rm_ensemble_options_are_checked():
    from rlhfkit.validation import config_problems

    base = pipeline.PipelineConfig(optimise=pipeline.OptimiseConfig(method="grpo"))
    assert not config_problems(replace(base, rm_ensemble=3))
    none = config_problems(replace(base, rm_ensemble=0))
    assert any(p.startswith("--rm-ensemble: must be >= 1") for p in none), none
    dpo = pipeline.PipelineConfig(rm_ensemble=2)  # the default optimiser trains on the pairs
    assert any(p.startswith("--rm-ensemble: optimise.method dpo") for p in config_problems(dpo))
    assert any(
        p.startswith("--rm-uwo-lambda") for p in config_problems(replace(base, rm_uwo_lambda=-1.0))
    )


def test_gold_labels_give_each_pair_its_gold_margin(tmp_path):
    """chosen/rejected by the gold judge, margin gold(chosen) - gold(rejected); ties dropped."""
    good, formatted, bare = "w\nAnswer: 1", "w\nAnswer: 2", "no answer"
    (tmp_path / "candidates.jsonl").write_text(
        json.dumps(_row(0, [formatted, good, bare, "v\nAnswer: 3"])) + "\n"
    )
    cfg = replace(pipeline.PipelineConfig(), unseen_tasks=())
    assert pipeline_labels.run_labels(cfg, tmp_path)
    pairs = _rows(tmp_path / "pairs.jsonl")
    margins = {(p["chosen"], p["rejected"]): p["margin"] for p in pairs}
    assert margins == {
        (good, formatted): 1.0, (good, bare): 1.3, (good, "v\nAnswer: 3"): 1.0,
        (formatted, bare): 0.3, ("v\nAnswer: 3", bare): 0.3,
    }  # fmt: skip


def test_rpo_imitates_only_clearly_better_replies_where_labels_give_margins(tmp_path, monkeypatch):
    """The default keeps RPO's NLL to pairs 0.5 gold apart; labels without margins (an LLM
    judge, people) keep it on every pair rather than dropping it."""
    seen = {}
    monkeypatch.setattr(pipeline.dpo, "main", lambda cfg: seen.update(algo=cfg.algo))
    cfg = pipeline.PipelineConfig()
    assert cfg.dpo.algo.loss == "rpo" and cfg.dpo.algo.rpo_nll_min_margin == 0.5
    pipeline.run_optimise(cfg, tmp_path)
    assert seen["algo"].rpo_nll_min_margin == 0.5
    for mode in ("judge", "human", "ai", "rubric"):
        pipeline.run_optimise(replace(cfg, labels=replace(cfg.labels, mode=mode)), tmp_path)
        assert seen["algo"].rpo_nll_min_margin is None and seen["algo"].rpo_alpha == 12.0
