"""Reward-model data handling (truncation, bad rows) and the ``rlhfkit rm eval`` / ``rm score``
commands through the command line, on a tiny reward model.

Expected rewards come from transformers' own ``AutoModelForSequenceClassification`` forward,
one sequence at a time (no padding), on ids rendered by the tokenizer's chat template.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from recipe_helpers import hf_reward_model, render_reply, rm_config, save_reward_model, write_jsonl

from rlhfkit import cli
from rlhfkit.data import DataError
from rlhfkit.models.tiny import tiny_tokenizer
from rlhfkit.recipes import reward_model as rm

pytestmark = pytest.mark.usefixtures("one_thread")

PAIRS = [
    {"prompt": "What is 2 + 3?", "chosen": "The answer is 5.", "rejected": "5", "category": "math"},
    {"prompt": "Reverse the word cat.", "chosen": "tac", "rejected": "cat", "category": "words"},
    {"prompt": "List three colours.", "chosen": "red, green, blue", "rejected": "No."},
    {"prompt": "Translate hello to French.", "chosen": "bonjour", "rejected": "hello hello",
     "category": "words"},
    {"prompt": "Write a haiku about the sea.", "chosen": "The sea is blue.", "rejected": "The sea.",
     "category": "math"},
    {"prompt": "What is 7 + 3?", "chosen": "The answer is 10.", "rejected": "The answer is 11."},
]  # fmt: skip


@pytest.fixture(scope="module")
def rm_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model as a 1-label reward model with a unit-scale head (rewards of units)."""
    return save_reward_model(tiny_model_dir, tmp_path_factory.mktemp("rm-cli-model"), seed=2)


@pytest.fixture(scope="module")
def reference(rm_dir) -> torch.nn.Module:
    """The reward model in transformers' own class, fp64, sdpa attention."""
    return hf_reward_model(rm_dir)


@torch.no_grad()
def reward_alone(model: torch.nn.Module, prompt: str | list[dict], completion: str) -> float:
    """transformers' forward on the single rendered sequence (no padding)."""
    ids = render_reply(tiny_tokenizer(), prompt, completion)
    return float(model(input_ids=torch.tensor([ids])).logits[0, 0])


def make_cfg(model_dir: Path, train: Path, run_dir: Path) -> rm.RMConfig:
    return rm_config(model_dir, train, run_dir, max_steps=1)


# Truncation

LONG = "The quick brown fox jumps over the lazy dog. " * 6  # > 24 tokens on its own


def test_pairs_identical_after_truncation_are_dropped_and_counted(rm_dir, tmp_path):
    rows = [
        {"prompt": "Say it.", "chosen": LONG + "red", "rejected": LONG + "blue"},  # dropped
        {"prompt": LONG, "chosen": "The answer is 5.", "rejected": "The answer is 6."},  # kept
        {"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "6"},  # kept, not truncated
        {"prompt": "Again.", "chosen": LONG + "1", "rejected": LONG + "2 3"},  # dropped
    ]
    cfg = make_cfg(rm_dir, write_jsonl(tmp_path / "t.jsonl", rows), tmp_path / "run")
    cfg.data.max_len = 24
    tokenizer = tiny_tokenizer()
    groups, counts = rm.load_groups(tokenizer, cfg.data.train, "train", cfg, 0)
    assert counts == {
        "examples": 4, "groups": 4, "skipped_ties": 0, "dropped_identical": 2,
        "dropped_empty": 0, "kept": 2, "bad_rows": 0, "ending_with_pad": 0,
    }  # fmt: skip
    # A pad token equal to the template's last token would make transformers pool elsewhere:
    # every such sequence is counted (and warned about).
    last = groups[0].sequences[0].input_ids[-1]
    other = copy.deepcopy(tokenizer)  # tiny_tokenizer() is shared: never mutate it
    other.pad_token = other.convert_ids_to_tokens(last)
    assert rm.load_groups(other, cfg.data.train, "train", cfg, 0)[1]["ending_with_pad"] == 4
    assert [g.source.rsplit(":", 1)[1] for g in groups] == ["2", "3"]
    # The long prompt is cut from the left; the completions stay whole, end of turn included.
    for seq, text in zip(groups[0].sequences, ("5.", "6."), strict=True):
        assert len(seq.input_ids) == 24
        assert tokenizer.decode(seq.input_ids).endswith(f"The answer is {text}<|im_end|>\n")

    # K = 3: a completion identical to a better one after truncation is removed, the group
    # kept with the other two; all three identical drops the group.
    ranked = [
        {"prompt": "Say it.", "completions": [LONG + "a", "No.", LONG + "b"], "ranking": [0, 2, 1]},
        {"prompt": "Say it.", "completions": [LONG + "a", LONG + "b", LONG + "c"],
         "ranking": [0, 1, 2]},
    ]  # fmt: skip
    cfg.data.train, cfg.data.schema = str(write_jsonl(tmp_path / "k.jsonl", ranked)), "rankings"
    cfg.algo.loss = "plackett_luce"
    groups, counts = rm.load_groups(tokenizer, cfg.data.train, "train", cfg, 0)
    assert (counts["dropped_identical"], counts["kept"]) == (1, 1)
    (group,) = groups
    assert len(group.sequences) == 2 and group.scores == [2.0, 0.0]
    assert tokenizer.decode(group.sequences[1].input_ids).endswith("No.<|im_end|>\n")


def test_group_left_with_only_tied_completions_is_dropped(rm_dir, tmp_path):
    row = {
        "prompt": "Say it.",
        "completions": [LONG + "a", "No.", LONG + "b"],
        "ratings": [5, 5, 1],
    }
    cfg = make_cfg(rm_dir, write_jsonl(tmp_path / "t.jsonl", [row]), tmp_path / "run")
    cfg.data.max_len, cfg.data.schema, cfg.algo.loss = 24, "ratings", "all_pairs"
    groups, counts = rm.load_groups(tiny_tokenizer(), cfg.data.train, "train", cfg, 0)
    assert groups == [] and counts["dropped_identical"] == 1


# Bad data


def test_bad_row_names_file_row_and_field_and_can_be_skipped(rm_dir, tmp_path):
    rows = [*PAIRS[:2], {"prompt": "Say hi.", "chosen": "Hello!"}, *PAIRS[2:]]
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    cfg = make_cfg(rm_dir, bad, tmp_path / "run")
    cfg.data.eval = str(write_jsonl(tmp_path / "good.jsonl", PAIRS))
    with pytest.raises(DataError) as err:
        rm.main(cfg)
    assert "bad.jsonl:3" in str(err.value) and err.value.field == "rejected"
    cfg.data.on_error = "skip"
    groups, counts = rm.load_groups(tiny_tokenizer(), str(bad), "train", cfg, 0)
    assert counts["bad_rows"] == 1 and len(groups) == len(PAIRS)
    rm.main(cfg)
    logged = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(m)["step"] for m in logged if "train/loss" in m] == [1]


# rm eval and rm score


def test_rm_eval_reports_the_accuracy_of_the_rewards(rm_dir, reference, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    out = tmp_path / "report.json"
    cli.main([
        "rm", "eval", "--model.name", str(rm_dir), "--model.precision", "fp32",
        "--data", str(data), "--split", "train", "--max_tokens", "40", "--output", str(out),
    ])  # fmt: skip
    report = json.loads(out.read_text())
    wins: dict[str, list[float]] = {}
    for row in PAIRS:  # by hand: 1 if r_c > r_r, 0.5 for a tie, else 0
        r_c = reward_alone(reference, row["prompt"], row["chosen"])
        r_r = reward_alone(reference, row["prompt"], row["rejected"])
        wins.setdefault(row.get("category", "all"), []).append(
            1.0 if r_c > r_r else 0.5 if r_c == r_r else 0.0
        )
    overall = [w for ws in wins.values() for w in ws]
    assert 0 < sum(overall) < len(overall)  # a mix of right and wrong: accuracy is informative
    assert report["overall"]["pairs"] == len(PAIRS)
    assert report["overall"]["accuracy"] == pytest.approx(sum(overall) / len(overall), abs=1e-9)
    assert set(report["per_category"]) == set(wins)
    for name, ws in wins.items():
        assert report["per_category"][name]["accuracy"] == pytest.approx(sum(ws) / len(ws))


def test_rm_score_keeps_row_order_and_scores_each_row_alone(rm_dir, reference, tmp_path):
    long = "The quick brown fox jumps over the lazy dog. " * 5
    rows = [
        {"id": 0, "prompt": "What is 2 + 3?", "completion": long},
        {"id": 1, "prompt": "Say hi.", "completion": "5"},
        {"id": 2, "prompt": long, "completion": "The answer is 5.", "extra": [1, 2]},
        {"id": 3, "prompt": [{"role": "user", "content": "Reverse cat."}], "completion": "tac"},
        {"id": 4, "prompt": "Colours?", "completion": "red, green, blue"},
    ]
    out = tmp_path / "scored.jsonl"
    cli.main([
        "rm", "score", "--model.name", str(rm_dir), "--model.precision", "fp32",
        "--input", str(write_jsonl(tmp_path / "in.jsonl", rows)), "--output", str(out),
        "--max_tokens", "64",
    ])  # fmt: skip
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert [{k: v for k, v in s.items() if k != "reward"} for s in scored] == rows
    expected = [reward_alone(reference, r["prompt"], r["completion"]) for r in rows]
    assert [s["reward"] for s in scored] == pytest.approx(expected, abs=1e-5)
    assert len(set(expected)) == len(expected)  # distinct: a permutation would show


def test_rm_score_names_the_row_missing_its_completion(rm_dir, tmp_path, capsys):
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}, {"prompt": "e"}]
    with pytest.raises(SystemExit) as done:  # a data error: one line on stderr, status 2
        cli.main([
            "rm", "score", "--model.name", str(rm_dir), "--model.precision", "fp32",
            "--input", str(write_jsonl(tmp_path / "in.jsonl", rows)),
            "--output", str(tmp_path / "out.jsonl"),
        ])  # fmt: skip
    err = capsys.readouterr().err
    assert done.value.code == 2 and "Traceback" not in err
    assert "in.jsonl:3: field 'completion'" in err
    assert not (tmp_path / "out.jsonl").exists()
