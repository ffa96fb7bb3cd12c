"""rlhfkit pipeline on the tiny model: every stage, resuming after a crash, human labels."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
from recipe_helpers import tiny_sft

from rlhfkit.config import LogConfig, LoopConfig, ModelConfig
from rlhfkit.pipeline import run as pipeline
from rlhfkit.pipeline.evaluation import EvalStageConfig
from rlhfkit.rollout.hf import SamplingConfig
from rlhfkit.training.run import RunContext


def _cfg(model_dir: Path, run_dir: Path, **over) -> pipeline.PipelineConfig:
    base = pipeline.PipelineConfig()
    log = LogConfig(run_dir=str(run_dir), tensorboard=False, progress=False)
    tiny_loop = {"batch_size": 4, "micro_batch_tokens": 512}
    cfg = replace(
        base,
        model=ModelConfig(name=str(model_dir), precision="fp32"),
        sft=tiny_sft(base.sft, limit=24, steps=2),
        candidates=pipeline.CandidatesConfig(
            limit=12, sampling=SamplingConfig(max_new_tokens=8, temperature=1.0, num_samples=2)
        ),
        rm=replace(
            base.rm,
            data=replace(base.rm.data, limit=24, max_len=256),
            loop=LoopConfig(max_steps=2, **tiny_loop),
        ),
        rl=replace(
            base.rl,
            data=replace(base.rl.data, limit=8),
            algo=replace(base.rl.algo, truncation_penalty=None),  # tiny replies never finish
            sampling=SamplingConfig(max_new_tokens=8, temperature=1.0, num_samples=2),
            loop=LoopConfig(batch_size=2, max_steps=6, save_every=2),
            sample_every=0,
        ),
        dpo=replace(base.dpo, loop=LoopConfig(max_steps=2, **tiny_loop)),
        eval=EvalStageConfig(max_prompts=4, samples=2, bon_n=4, max_new_tokens=8, show=3),
        log=log,
        optimise=pipeline.OptimiseConfig(method="grpo"),  # RL: the gold rides along per step
        isolate_stages=False,  # in-process, so tests can patch and count what runs
    )
    return replace(cfg, **over)


def _stamp(path: Path) -> int:
    return path.stat().st_mtime_ns


def test_pipeline_runs_every_stage_and_skips_them_on_rerun(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    pipeline.main(_cfg(tiny_model_dir, run, isolate_stages=True))  # each stage in a process
    for output in ("sft/final", "candidates.jsonl", "pairs.jsonl", "rm/final", "policy/final",
                   "eval.json", "report.html"):  # fmt: skip
        assert (run / output).exists(), output
    for stage in ("sft", "rm", "policy"):  # finished stages keep their final model only
        assert not (run / stage / "checkpoints").exists(), stage
    ev = json.loads((run / "eval.json").read_text())
    assert set(ev["models"]) == {"sft", "final"}
    assert "all" in ev["headline"] and ev["headline"]["all"]["prompts"] == 4
    gain = ev["headline"]["all"]["gain"]
    assert gain["low"] <= gain["mean"] <= gain["high"]
    assert "gold reward" in ev["headline"]["all"]["sentence"]
    assert abs(sum(ev["win_rates"]["gold"][k] for k in ("win", "tie", "loss")) - 1) < 1e-9
    assert [p["n"] for p in ev["bon"]] == [1, 2, 4]
    assert ev["bon"][0]["kl"] == 0.0
    metrics = [json.loads(x) for x in (run / "policy/metrics.jsonl").read_text().splitlines()]
    gold_key = f"rollout/reward/{pipeline.GOLD}"
    assert any(gold_key in m for m in metrics)  # gold rides along at weight 0
    html = (run / "report.html").read_text()
    for section in ("summary", "curves", "reward-model", "win-rates", "overoptimisation",
                    "samples"):  # fmt: skip
        assert f'id="{section}"' in html
    pairs = [json.loads(x) for x in (run / "pairs.jsonl").read_text().splitlines()]
    assert all(p["chosen"] != p["rejected"] for p in pairs)
    peaks = {k: s["peak_rss_gib"] for k, s in json.loads((run / "stages.json").read_text()).items()}
    assert all(0.05 < peak < 64 for peak in peaks.values())  # each stage's own process, in GiB
    assert "peak memory" in html
    stamps = {p: _stamp(run / p) for p in ("sft/final", "rm/final", "policy/final", "eval.json")}
    pipeline.main(_cfg(tiny_model_dir, run))
    assert {p: _stamp(run / p) for p in stamps} == stamps
    stages = json.loads((run / "stages.json").read_text())
    assert all(s["status"] == "skipped" for s in stages.values())
    assert {k: s["peak_rss_gib"] for k, s in stages.items()} == peaks  # kept when skipped


def test_killed_during_rl_resumes_from_the_last_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    cfg = _cfg(tiny_model_dir, run, optimise=pipeline.OptimiseConfig(method="ppo"))
    cfg = replace(cfg, rl=replace(cfg.rl, algo=replace(cfg.rl.algo, epochs=2)))
    original = RunContext.log_step

    def crash(self, metrics, every):
        original(self, metrics, every)
        if self.run_dir.name == "policy" and self.step == 4:
            raise KeyboardInterrupt  # Ctrl-C after step 4, before its checkpoint

    monkeypatch.setattr(RunContext, "log_step", crash)
    with pytest.raises(KeyboardInterrupt):
        pipeline.main(cfg)
    assert not (run / "policy/final").exists()
    assert (run / "policy/checkpoints/latest").exists()
    stamps = {p: _stamp(run / p) for p in ("sft/final", "rm/final", "pairs.jsonl")}
    monkeypatch.setattr(RunContext, "log_step", original)
    pipeline.main(cfg)
    assert {p: _stamp(run / p) for p in stamps} == stamps  # finished stages not recomputed
    steps = [json.loads(x)["step"] for x in (run / "policy/metrics.jsonl").read_text().splitlines()]
    # two steps per rollout batch (2 PPO epochs); checkpoint at 2, crash after 4: steps 3-4
    # redone, and the crashed attempt's record of step 4 dropped (each step logged once)
    assert steps == [2, 4, 6]
    assert (run / "report.html").exists()


def _vote_a_everywhere(db: Path, task_id: int) -> int:
    """One labeller prefers reply A strongly on every item, through the app's voting code."""
    from rlhfkit.feedback import storage, voting

    conn = storage.connect(db)
    try:
        [(labeller, _, _)] = storage.invite(conn, task_id, ["ann"])
        task = storage.get_task(conn, task_id)
        votes = 0
        while (shown := voting.next_presentation(conn, labeller, task)) is not None:
            given = 1 if shown.order[0] == 0 else 5  # canonical 1 = A much better than B
            voting.record_vote(conn, labeller, task.mode, {"nonce": shown.nonce,
                                                           "choice": str(given)})  # fmt: skip
            votes += 1
    finally:
        conn.close()
    return votes


def test_human_labels_come_from_the_labelling_app(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    cfg = _cfg(tiny_model_dir, run, labels=pipeline.LabelsConfig(mode="human", mix_builtin=False))
    pipeline.main(cfg)  # exports the pairs into a task of the app, then stops
    requests = [json.loads(x) for x in (run / "label_requests.jsonl").read_text().splitlines()]
    assert requests and not (run / "pairs.jsonl").exists() and not (run / "rm").exists()
    task = json.loads((run / "label_task.json").read_text())
    assert task["items"] == len(requests)
    pipeline.main(cfg)  # still waiting: no labels yet
    assert not (run / "pairs.jsonl").exists()
    assert _vote_a_everywhere(run / "labels.sqlite", task["task_id"]) == len(requests)
    pipeline.main(replace(cfg, optimise=pipeline.OptimiseConfig(method="dpo")))
    labels = [json.loads(x) for x in (run / "human_labels.jsonl").read_text().splitlines()]
    assert sorted(x["id"] for x in labels) == sorted(r["id"] for r in requests)
    assert {x["choice"] for x in labels} == {"a"}
    pairs = [json.loads(x) for x in (run / "pairs.jsonl").read_text().splitlines()]
    assert sorted((p["chosen"], p["rejected"]) for p in pairs) == sorted(
        (r["a"], r["b"]) for r in requests
    )
    curves = (run / "report.html").read_text().split('id="curves"', 1)[1].split("</section>")[0]
    assert "<img" in curves  # the DPO stage's loss and log-prob curves


def test_human_labels_file_is_validated(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    cfg = _cfg(tiny_model_dir, run, labels=pipeline.LabelsConfig(mode="human", mix_builtin=False))
    pipeline.main(cfg)
    requests = [json.loads(x) for x in (run / "label_requests.jsonl").read_text().splitlines()]
    labels = run / "human_labels.jsonl"
    labels.write_text(json.dumps({"id": requests[0]["id"], "choice": "left"}) + "\n")
    with pytest.raises(ValueError, match=r"human_labels\.jsonl:1: field 'choice'"):
        pipeline.main(cfg)
    labels.write_text(json.dumps({"id": requests[0]["id"], "choice": "a"}) + "\n")
    if len(requests) > 1:
        with pytest.raises(ValueError, match="no label for pair id"):
            pipeline.main(cfg)


def _longer_wins(body: dict) -> str:
    """A fake judge endpoint: the longer of the two shown replies wins (order-robust)."""
    user = body["messages"][-1]["content"]
    a, b = (
        re.search(rf"\[Reply of Assistant {x}\]\n(.*?)\n\[End of Reply of Assistant {x}\]", user,
                  re.S).group(1)
        for x in "AB"
    )  # fmt: skip
    return f"[[{'A' if len(a) > len(b) else 'B' if len(b) > len(a) else 'C'}]]"


def test_llm_judge_labels_pairs_and_judges_the_final_model(tiny_model_dir, tmp_path):
    from fake_openai import FakeOpenAI

    run = tmp_path / "run"
    with FakeOpenAI(_longer_wins) as server:
        spec = f"judge:openai:{server.base_url}#fake-judge"
        cfg = _cfg(
            tiny_model_dir, run, labels=pipeline.LabelsConfig(mode="judge", judge=spec),
            optimise=pipeline.OptimiseConfig(method="rloo"),
        )  # fmt: skip
        cfg = replace(cfg, eval=replace(cfg.eval, judge=spec))
        pipeline.main(cfg)
        assert server.requests  # the judge was asked, over HTTP
    pairs = [json.loads(x) for x in (run / "pairs.jsonl").read_text().splitlines()]
    sampled = [p for p in pairs if p.get("source") == "judge"]
    assert sampled and all(len(p["chosen"]) > len(p["rejected"]) for p in sampled)
    judge = json.loads((run / "eval.json").read_text())["win_rates"]["judge"]
    assert judge["consistency"] == 1.0 and judge["unparseable"] == 0
    assert 'id="win-rates"' in (run / "report.html").read_text()


def test_the_sft_stage_can_distil_a_teacher(tiny_model_dir, tmp_path):
    """With --sft-teacher the first stage is rlhfkit distill on the SFT data's prompts (word-level
    KD on their replies by default), and its model is the stage's output."""
    import json

    cfg = _cfg(tiny_model_dir, tmp_path / "run")
    cfg = replace(cfg, sft_teacher=str(tiny_model_dir))
    pipeline.run_sft(cfg, tmp_path / "run")
    assert (tmp_path / "run" / "sft" / "final" / "model.safetensors").exists()
    rows = [
        json.loads(x) for x in (tmp_path / "run" / "sft" / "metrics.jsonl").read_text().splitlines()
    ]
    train = [r for r in rows if "train/loss" in r]
    assert len(train) == 2 and all(r["train/on_policy"] == 0.0 for r in train)
    assert train[0]["train/loss"] == pytest.approx(0.0, abs=1e-6)  # the teacher is the student


def test_ai_labels_under_the_constitution_report_their_gold_agreement(tiny_model_dir, tmp_path):
    """--labels.mode ai: the judge answers each principle's question in both orders over HTTP;
    the report states how often its labels agree with the gold judge."""
    from fake_openai import FakeOpenAI

    run = tmp_path / "run"
    with FakeOpenAI(_longer_wins) as server:
        spec = f"judge:openai:{server.base_url}#fake-judge"
        cfg = _cfg(tiny_model_dir, run, labels=pipeline.LabelsConfig(mode="ai", judge=spec))
        cfg = replace(cfg, optimise=pipeline.OptimiseConfig(method="dpo"))
        pipeline.main(cfg)
        questions = [r["body"]["messages"][1]["content"] for r in server.requests]
    assert questions and all("Question: " in q for q in questions)
    quality = json.loads((run / "labels_quality.json").read_text())
    assert quality["mode"] == "ai" and quality["consistency"] == 1.0
    assert quality["pairs"] > 0 and quality["with_preference"] > 0
    agreement = quality["gold_agreement"]  # None when gold ties every pair of the tiny model
    assert (agreement is None) == (quality["gold_compared"] == 0)
    assert agreement is None or 0.0 <= agreement <= 1.0
    assert (run / "judge_cache.sqlite").is_file()
    pairs = [json.loads(x) for x in (run / "pairs.jsonl").read_text().splitlines()]
    sampled = [p for p in pairs if p.get("source") == "ai"]
    assert sampled and all(len(p["chosen"]) > len(p["rejected"]) for p in sampled)
    assert "ai labels: agreement with the gold judge" in (run / "report.html").read_text()


def test_rubric_labels_need_no_judge(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"id": "r1", "prompt": "What is the opposite of 'up'?", "task": "antonyms",
             "reference": "The opposite of 'up' is 'down'.\nAnswer: down",
             "completions": ["It is down.\nAnswer: down", "Sorry, I cannot.",
                             "Answer: up"]}]  # fmt: skip
    (run / "candidates.jsonl").write_text(json.dumps(rows[0]) + "\n")
    cfg = _cfg(tiny_model_dir, run, labels=pipeline.LabelsConfig(mode="rubric", mix_builtin=False))
    assert pipeline.run_labels(cfg, run)
    pairs = [json.loads(x) for x in (run / "pairs.jsonl").read_text().splitlines()]
    assert {(p["chosen"], p["rejected"]) for p in pairs} == {
        ("It is down.\nAnswer: down", "Sorry, I cannot."),
        ("It is down.\nAnswer: down", "Answer: up"),
        ("Answer: up", "Sorry, I cannot."),
    }
    assert not any("margin" in p for p in pairs)  # only gold labels give one
    assert json.loads((run / "labels_quality.json").read_text())["gold_agreement"] == 1.0


def test_ai_and_rubric_label_options_are_checked_before_any_model_loads(tiny_model_dir, tmp_path):
    from rlhfkit.validation import config_problems

    for labels, option in ((pipeline.LabelsConfig(mode="ai", constitution="none.yaml"),
                            "--labels.constitution: "),
                           (pipeline.LabelsConfig(mode="rubric", rubric="builtin:nope"),
                            "--labels.rubric: ")):  # fmt: skip
        cfg = _cfg(tiny_model_dir, tmp_path / "run", labels=labels)
        assert any(p.startswith(option) for p in config_problems(cfg)), config_problems(cfg)


def test_a_reward_model_ensemble_trains_members_averages_them_and_reports_each(
    tiny_model_dir, tmp_path
):
    """--rm-ensemble 2 --rm-combine min: two members, rm/final their WARM average, RL against
    the ensemble's minimum, and every member, mode and WARM in eval.json and the report."""
    import torch
    from safetensors.torch import load_file

    run = tmp_path / "run"
    pipeline.main(_cfg(tiny_model_dir, run, rm_ensemble=2, rm_combine="min"))
    members = [run / "rm" / "members" / f"s{k}" for k in range(2)]
    for member in members:
        assert (member / "final" / "model.safetensors").is_file()
        assert not (member / "checkpoints").exists()  # deleted once the member is done
    weights = [load_file(m / "final" / "model.safetensors") for m in members]
    warm = load_file(run / "rm" / "final" / "model.safetensors")
    assert set(warm) == set(weights[0])
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in warm)  # two seeds
    for name, tensor in warm.items():
        mean = (weights[0][name].float() + weights[1][name].float()) / 2
        tol = 1e-2 if tensor.dtype == torch.bfloat16 else 1e-6
        torch.testing.assert_close(tensor.float(), mean, atol=tol, rtol=tol)
    metrics = [json.loads(x) for x in (run / "policy/metrics.jsonl").read_text().splitlines()]
    spec = f"rm-ensemble:min:{members[0] / 'final'},{members[1] / 'final'}"
    assert any(f"rollout/reward/{spec}" in m for m in metrics)
    ens = json.loads((run / "eval.json").read_text())["reward_model"]["ensemble"]
    assert [m["seed"] for m in ens["members"]] == [0, 1]
    assert set(ens["modes"]) == {"mean", "min", "uwo"} and ens["modes"]["uwo"]["lambda"] == 0.5
    assert ens["used"] == "min" and ens["proxy"] == spec
    for block in [*ens["members"], *ens["modes"].values(), ens["warm"]]:
        assert 0.0 <= block["accuracy"] <= 1.0 and block["pairs"] > 0 and block["by_category"]
    html = (run / "report.html").read_text()
    rows = ("member 0 (seed 0)", "member 1 (seed 1)", "ensemble mean", "ensemble min",
            "ensemble uwo (lambda 0.5)", "WARM (weight average)")  # fmt: skip
    for row in rows:
        assert f'<td class="">{row}</td>' in html, row
    used = r'<td class="">ensemble min</td>(?:<td[^>]*>[^<]*</td>)*<td class="">RL reward</td></tr>'
    assert re.search(used, html)
    stamps = {p: _stamp(run / p) for p in ("rm/final", "rm/members/s0/final", "policy/final")}
    pipeline.main(_cfg(tiny_model_dir, run, rm_ensemble=2, rm_combine="min"))
    assert {p: _stamp(run / p) for p in stamps} == stamps


def test_reward_model_trains_on_gold_ranked_candidate_groups(tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    cfg = _cfg(tiny_model_dir, run)
    rm = replace(cfg.rm, data=replace(cfg.rm.data, schema="ratings"))
    cfg = replace(cfg, rm=replace(rm, algo=replace(rm.algo, loss="all_pairs")))
    rows = [r.data for r in pipeline.load_rows("builtin:preferences", split="train")][:6]
    candidates = [  # the tiny model's own replies all score 0: give the stage scored ones
        {"id": i, "prompt": r["prompt"], "reference": r["reference"], "task": r["task"],
         "completions": [r["chosen"], r["rejected"], "no answer"]}
        for i, r in enumerate(rows)
    ]  # fmt: skip
    run.mkdir()
    (run / "candidates.jsonl").write_text("".join(json.dumps(c) + "\n" for c in candidates))
    pipeline.main(cfg)
    rm_rows = [json.loads(x) for x in (run / "rm_train.jsonl").read_text().splitlines()]
    assert all("ratings" in r for r in rm_rows)
    groups = rm_rows[:6]  # the candidates' groups, then the task's pairs as K = 2 rows
    assert [len(g["completions"]) for g in groups] == [3] * 6  # K-wise, not pairs
    assert all(g["ratings"][0] == max(g["ratings"]) for g in groups)  # the reference scores best
    assert all(len(r["completions"]) == 2 for r in rm_rows[6:])
    assert (run / "rm" / "final").exists() and (run / "eval.json").exists()
