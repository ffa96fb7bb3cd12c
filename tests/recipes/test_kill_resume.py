"""A run killed with SIGKILL continues when the same command is run again.

Each training command runs as ``python -m rlhfkit ...`` with the default checkpointing (every
20 steps, ``--loop.save-every`` is not passed) for 40 steps. Once its step-20 checkpoint is
written and a later step has been logged, the process is killed with SIGKILL (no cleanup runs).
The same command, run again, must say that it resumes from the step-20 checkpoint, finish, and
leave a ``metrics.jsonl`` in which every step 1..40 appears exactly once: the killed attempt's
records after step 20 are dropped before the steps are redone. Running the command of a
finished run again reports it as finished and exits 0; raising ``--loop.max-steps`` continues
it (both tested in-process).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhfkit.cli import main as cli_main

pytestmark = pytest.mark.usefixtures("fresh_cache")

STEPS = 40
CHECKPOINT = 20
"""The default ``--loop.save-every``: the step of the first checkpoint."""

COMMON = [
    "--model.precision", "fp32", "--log.progress", "False", "--log.tensorboard", "False",
    "--loop.max-steps", str(STEPS),
]  # fmt: skip


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def command_args(command: str, model: Path, root: Path) -> list[str]:
    """The command line of a tiny 40-step run of ``command`` (data written under ``root``)."""
    if command == "sft":
        rows = [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                              {"role": "assistant", "content": f"It is {2 * i}."}]}
                for i in range(16)]  # fmt: skip
        data = write_rows(root / "chat.jsonl", rows)
        return ["sft", "--data.train", str(data), "--data.eval", "None",
                "--loop.batch-size", "4"]  # fmt: skip
    if command in ("rm train", "dpo"):
        rows = [{"prompt": f"What is {i} + {i}?", "chosen": f"It is {2 * i}.",
                 "rejected": f"Maybe {2 * i + 1}."} for i in range(16)]  # fmt: skip
        data = write_rows(root / "pairs.jsonl", rows)
        extra = ["--eval.win-rate", "False", "--eval.kl-prompts", "0"] if command == "dpo" else []
        return [*command.split(), "--data.train", str(data), "--data.eval", "None",
                "--loop.batch-size", "4", *extra]  # fmt: skip
    rows = [{"prompt": f"Say a {i}", "answer": "a"} for i in range(16)]
    data = write_rows(root / "prompts.jsonl", rows)
    reward = root / "reward.py"
    reward.write_text("def length(completion):\n    return float(len(completion))\n")
    return ["rl", "--data.train", str(data), "--rewards", f"{reward}:length",
            "--sampling.num-samples", "2", "--sampling.max-new-tokens", "4",
            "--loop.batch-size", "2", "--sample-every", "0"]  # fmt: skip


def logged_steps(run_dir: Path) -> list[int]:
    """Steps of the training records in metrics.jsonl (a line cut by the kill is skipped)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if "train/loss" in record:
            steps.append(record["step"])
    return steps


def start_and_kill(command: list[str], run_dir: Path, env: dict[str, str]) -> None:
    """Start ``command``; SIGKILL it once step 20 is checkpointed and a later step is logged."""
    proc = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if latest.is_file() and max(logged_steps(run_dir), default=0) > CHECKPOINT:
                break
            time.sleep(0.005)
        assert proc.poll() is None, f"the run ended before it was killed:\n{proc.stderr.read()}"
        assert latest.read_text().strip() == f"step-{CHECKPOINT:08d}"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "final").exists()


@pytest.mark.parametrize("command", ["sft", "rm train", "dpo", "rl"])
def test_killed_run_continues_from_its_last_checkpoint(command, tiny_model_dir, tmp_path):
    run = tmp_path / "run"
    args = [
        *command_args(command, tiny_model_dir, tmp_path), "--model.name", str(tiny_model_dir),
        *COMMON, "--log.run-dir", str(run),
    ]  # fmt: skip
    cli = [sys.executable, "-m", "rlhfkit", *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    start_and_kill(cli, run, env)
    killed_steps = logged_steps(run)
    assert killed_steps[:CHECKPOINT] == list(range(1, CHECKPOINT + 1))
    assert len(killed_steps) > CHECKPOINT  # records after the checkpoint, to be dropped

    again = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"resuming from {run / 'checkpoints' / f'step-{CHECKPOINT:08d}'} at step 20" in (
        again.stderr
    )
    assert logged_steps(run) == list(range(1, STEPS + 1))
    assert (run / "final" / "config.json").is_file()
    assert not list(run.glob(".tmp-*")) and not list((run / "checkpoints").glob(".tmp-*"))


def test_a_finished_run_says_so_and_continues_when_max_steps_is_raised(
    tiny_model_dir, tmp_path, caplog
):
    run = tmp_path / "run"
    args = [
        *command_args("sft", tiny_model_dir, tmp_path), "--model.name", str(tiny_model_dir),
        *COMMON, "--log.run-dir", str(run),
    ]  # fmt: skip
    short = [*args, "--loop.max-steps", "3"]
    cli_main(short)
    final = (run / "final" / "model.safetensors").stat().st_mtime_ns
    caplog.set_level(logging.INFO, logger="rlhfkit")
    cli_main(short)  # returns: status 0
    assert f"{run} holds a finished run at step 3" in caplog.text
    assert (run / "final" / "model.safetensors").stat().st_mtime_ns == final
    assert logged_steps(run) == [1, 2, 3]
    cli_main([*args, "--loop.max-steps", "5"])
    assert logged_steps(run) == [1, 2, 3, 4, 5]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000005"
