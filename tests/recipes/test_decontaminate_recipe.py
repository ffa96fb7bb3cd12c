"""rlhfkit decontam on small JSONL files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhfkit.config import parse_cli
from rlhfkit.inference.decontaminate import DecontamConfig, main, row_text

GSM = "Natalia sold clips to forty eight of her friends in April and then half as many in May"
POEM = "Write a haiku about the sea and the moon over the quiet harbour at night please"


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.fixture
def files(tmp_path: Path) -> tuple[str, str, str, list[dict]]:
    words = GSM.split()
    train_rows = [
        {"prompt": "Add 2 and 3, then explain your answer in one short sentence.", "answer": "5"},
        {"prompt": user(f"Story: {' '.join(words[2:10])} and more."), "answer": "x"},  # gsm
        {
            "messages": [
                *user(f"Please {' '.join(POEM.split()[1:9])}"),  # poems
                {"role": "assistant", "content": "Waves."},
            ]
        },
        {"prompt": " ".join(words[0:7]), "answer": "7-gram only: clean"},
        {
            "messages": [  # the eval text only in the reply: prompt-only matching ignores it
                *user("Tell me something."),
                {"role": "assistant", "content": GSM},
            ]
        },
    ]
    train = write_jsonl(tmp_path / "train.jsonl", train_rows)
    gsm = write_jsonl(tmp_path / "gsm.jsonl", [{"prompt": GSM, "answer": "72"}])
    poems = write_jsonl(tmp_path / "poems.jsonl", [{"messages": user(POEM)}, {"prompt": "Hi"}])
    return train, gsm, poems, train_rows


def test_row_text():
    assert row_text({"prompt": "a b"}) == "a b"
    assert row_text({"prompt": [*user("one"), {"role": "assistant", "content": "two"}, *user("3")]})
    assert row_text({"prompt": user("one") + user("two")}) == "one\ntwo"
    sft = {"messages": [*user("q"), {"role": "assistant", "content": "a"}]}
    assert row_text(sft) == "q"
    assert row_text(sft, ("messages",)) == "q\na"
    assert row_text({"prompt": "p", "answer": 5}, ("prompt", "answer", "missing")) == "p\n5"
    assert row_text({"other": 1}) == ""


def test_decontam_writes_report_and_clean_rows(files, tmp_path, capsys):
    train, gsm, poems, train_rows = files
    cfg = DecontamConfig(
        train=train,
        eval=(gsm, poems),
        output=str(tmp_path / "clean.jsonl"),
        report=str(tmp_path / "report.json"),
    )
    report = main(cfg)
    assert report["sets"][gsm]["flagged"] == [1]
    assert report["sets"][poems]["flagged"] == [2]
    assert report["sets"][poems]["eval_too_short"] == 1
    assert report["any"]["flagged"] == [1, 2] and report["any"]["rate"] == pytest.approx(0.4)
    assert report["sets"][gsm]["locations"] == [f"{train}:2"]
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved == report
    clean = [json.loads(line) for line in (tmp_path / "clean.jsonl").read_text().splitlines()]
    assert clean == [train_rows[0], train_rows[3], train_rows[4]]
    out = capsys.readouterr().out
    assert "20.00%" in out and "40.00%" in out and "kept 3 of 5" in out


def test_decontam_fields_and_substring(files):
    train, gsm, _, _ = files
    # Comparing whole conversations catches row 4, whose reply quotes the eval text.
    report = main(DecontamConfig(train=train, eval=(gsm,), fields=("prompt", "messages")))
    assert report["any"]["flagged"] == [1, 4]
    # A smaller n catches the planted 7-gram too.
    assert main(DecontamConfig(train=train, eval=(gsm,), n=7))["any"]["flagged"] == [1, 3]
    # Character windows: row 1 shares " clips to ... friends in " (40 characters) with the eval
    # prompt, row 3 its first 36 characters.
    for length, flagged in [(36, [1, 3]), (37, [1]), (40, [1]), (41, [])]:
        sub = main(DecontamConfig(train=train, eval=(gsm,), n=20, substring=length))
        assert sub["substring"] == length and sub["any"]["flagged"] == flagged


def test_decontam_builtin_sources(tmp_path):
    # A builtin eval set against a file holding some of its prompts.
    from rlhfkit.data.sources import load_rows

    heldout = load_rows("builtin:instructions", split="heldout")[:3]
    rows = [r.data for r in heldout] + [{"prompt": "nothing like any eval prompt at all here"}]
    train = write_jsonl(tmp_path / "t.jsonl", rows)
    report = main(DecontamConfig(train=train, eval=("builtin:instructions",)))
    long = [i for i, r in enumerate(heldout) if len(row_text(r.data).split()) >= 8]
    assert report["any"]["flagged"] == long and long


def test_decontam_config_errors_and_cli(files):
    train, gsm, poems, _ = files
    with pytest.raises(ValueError, match="--train"):
        main(DecontamConfig(eval=(gsm,)))
    with pytest.raises(ValueError, match="--eval"):
        main(DecontamConfig(train=train))
    with pytest.raises(FileNotFoundError):
        main(DecontamConfig(train=train, eval=("missing.jsonl",)))
    cfg = parse_cli(
        DecontamConfig,
        ["--train", train, "--eval", gsm, poems, "--substring", "50", "--n", "6"],
        prog="rlhfkit decontam",
        description="",
    )
    assert cfg.eval == (gsm, poems) and cfg.substring == 50 and cfg.n == 6
