"""The run directory between attempts: what a killed run leaves, and what the next one does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlhfkit.errors import ConfigError, DiskSpaceError
from rlhfkit.training.checkpoint import (
    TrainerState,
    checkpoint_info,
    latest_checkpoint,
    remove_partial,
    save_checkpoint,
    tensor_bytes,
)
from rlhfkit.training.rundir import RunFinished, plan_run, prepare_run_dir, trim_records


def checkpoint(run: Path, step: int, **info) -> Path:
    state = TrainerState(step=step, optimizer={}, scheduler={})
    return save_checkpoint(run, {"w": torch.zeros(2)}, state, keep_last=None, info=info)


def metrics(run: Path, steps: list[int], tail: str = "") -> None:
    lines = "".join(json.dumps({"step": s, "train/loss": 1.0}) + "\n" for s in steps)
    (run / "metrics.jsonl").write_text(lines + tail)


def steps(run: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_latest_falls_back_to_the_newest_complete_checkpoint(tmp_path):
    first, second = checkpoint(tmp_path, 2), checkpoint(tmp_path, 4)
    assert latest_checkpoint(tmp_path) == second
    (tmp_path / "checkpoints" / "latest").write_text("step-00000009\n")  # deleted by hand
    assert latest_checkpoint(tmp_path) == second
    (tmp_path / "checkpoints" / "latest").unlink()
    (second / "model.safetensors").unlink()  # incomplete
    assert latest_checkpoint(tmp_path) == first
    assert checkpoint_info(first)["step"] == 2


def test_tensor_bytes_counts_each_tensor_once():
    w = torch.zeros(3, 4)  # 48 bytes
    state = {"a": w, "b": [w, torch.zeros(2, dtype=torch.bfloat16)], "c": (1, "x")}
    assert tensor_bytes(state) == 48 + 4


def test_a_full_disk_stops_before_writing_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    first = checkpoint(tmp_path, 2)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10**9, 10**9, 1000))
    with pytest.raises(DiskSpaceError, match=r"not enough free disk in .*checkpoints.*resume"):
        checkpoint(tmp_path, 4)
    assert latest_checkpoint(tmp_path) == first
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "latest", "step-00000002",
    ]  # fmt: skip


def test_leftovers_of_killed_writes_are_removed(tmp_path):
    checkpoint(tmp_path, 2)
    partial = [tmp_path / "checkpoints" / ".tmp-step-00000004-x", tmp_path / ".tmp-final-y"]
    for path in partial:
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"half")
    (tmp_path / "checkpoints" / ".latest.123.tmp").write_text("step-")
    assert sorted(remove_partial(tmp_path)) == sorted([*partial, tmp_path / "checkpoints" /
                                                       ".latest.123.tmp"])  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "latest", "step-00000002",
    ]  # fmt: skip


def test_records_after_the_checkpoint_are_dropped(tmp_path):
    metrics(tmp_path, [0, 1, 2, 2, 3, 4], tail='{"step": 5, "train/lo')  # cut by the kill
    (tmp_path / "samples.jsonl").write_text(
        "".join(json.dumps({"step": s, "text": "a"}) + "\n" for s in (2, 4))
    )
    trim_records(tmp_path, {"step": 2, "metrics_records": 4})  # the count wins over steps
    assert steps(tmp_path) == [0, 1, 2, 2]
    assert [json.loads(x)["step"] for x in (tmp_path / "samples.jsonl").open()] == [2]
    metrics(tmp_path, [1, 2, 3], tail="{")
    trim_records(tmp_path, {"step": 2})  # a checkpoint written before the count existed
    assert steps(tmp_path) == [1, 2]


def test_plan_by_resume_setting(tmp_path):
    run = tmp_path / "run"
    assert plan_run(run, None).checkpoint is None  # nothing there yet
    with pytest.raises(ConfigError, match="no checkpoint to continue from"):
        plan_run(run, True)
    ckpt = checkpoint(run, 3, metrics_records=2)
    assert plan_run(run, None).checkpoint == ckpt
    assert plan_run(run, True).checkpoint == ckpt
    assert plan_run(run, False).checkpoint is None
    (run / "final").mkdir()
    (run / "checkpoints" / "latest").unlink()
    (ckpt / "trainer_state.pt").unlink()
    with pytest.raises(RunFinished, match="finished run"):
        plan_run(run, None)  # a final model and no checkpoint left: nothing to do


def test_starting_over_deletes_only_the_previous_runs_outputs(tmp_path):
    run = tmp_path / "run"
    checkpoint(run, 3)
    metrics(run, [1, 2, 3])
    for name in ("final", "tb"):
        (run / name).mkdir()
    (run / "notes.txt").write_text("mine\n")
    assert prepare_run_dir(plan_run(run, False), {}) is None
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]


def test_continuing_trims_and_returns_the_purge_step(tmp_path):
    run = tmp_path / "run"
    checkpoint(run, 2, metrics_records=2)
    metrics(run, [1, 2, 3])
    assert prepare_run_dir(plan_run(run, None), {}) == 3
    assert steps(run) == [1, 2]


@pytest.mark.parametrize("blocker", ["self", "parent"])
def test_a_file_in_place_of_the_run_directory(tmp_path, blocker):
    path = tmp_path / "f"
    path.write_text("x")
    run = path if blocker == "self" else path / "run"
    with pytest.raises(ConfigError, match=r"--log.run-dir: .* is a file"):
        plan_run(run, None)
