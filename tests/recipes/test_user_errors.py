"""Mistakes in the input: one message naming the culprit, status 2, no traceback, no damage.

Every training command is driven through ``rlhfkit.cli.main`` with a missing file, an empty
file, malformed lines, invalid option values, a batch size of 0, a typo in a YAML config, a run
directory that cannot be created and a mistyped model path. Each must exit with status 2 and
print ``rlhfkit <command>: error: ...`` naming the file, line, option or path; an exception that
escaped as a traceback would fail the test (``pytest.raises(SystemExit)`` catches nothing
else). All the failing attempts share the run directory of a correct run made afterwards, which
must succeed and log each of its steps once. One case runs as a real process, to see what a
user sees on stderr.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from rlhfkit.cli import main as cli_main

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_cache")

COMMON = [
    "--model.precision", "fp32", "--log.progress", "False", "--log.tensorboard", "False",
    "--loop.max-steps", "2",
]  # fmt: skip


def sft_args(model: Path, data: Path, root: Path) -> list[str]:
    return ["sft", "--model.name", str(model), "--data.train", str(data), "--data.eval", "None",
            "--loop.batch-size", "4", *COMMON]  # fmt: skip


def rm_args(model: Path, data: Path, root: Path) -> list[str]:
    return ["rm", "train", "--model.name", str(model), "--data.train", str(data),
            "--data.eval", "None", "--loop.batch-size", "4", *COMMON]  # fmt: skip


def dpo_args(model: Path, data: Path, root: Path) -> list[str]:
    return ["dpo", "--model.name", str(model), "--data.train", str(data), "--data.eval", "None",
            "--loop.batch-size", "4", "--eval.win-rate", "False", "--eval.kl-prompts", "0",
            *COMMON]  # fmt: skip


def rl_args(model: Path, data: Path, root: Path) -> list[str]:
    reward = root / "reward.py"
    reward.write_text("def length(completion):\n    return float(len(completion))\n")
    return ["rl", "--model.name", str(model), "--data.train", str(data),
            "--rewards", f"{reward}:length", "--sampling.num-samples", "2",
            "--sampling.max-new-tokens", "4", "--loop.batch-size", "2", "--sample-every", "0",
            *COMMON]  # fmt: skip


def online_args(model: Path, data: Path, root: Path) -> list[str]:
    return ["dpo", "online", "--model.name", str(model), "--data.train", str(data),
            "--data.eval", "None", "--online.rounds", "1", "--online.prompts-per-round", "4",
            "--online.num-samples", "2", "--online.max-new-tokens", "4",
            "--online.steps-per-round", "2", "--online.reward",
            "rlhfkit.data.tasks.preferences:gold_score", "--loop.batch-size", "2",
            "--eval.win-rate", "False", "--eval.kl-prompts", "0", *COMMON]  # fmt: skip


def chat_row(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                         {"role": "assistant", "content": f"It is {2 * i}."}]}  # fmt: skip


def pair_row(i: int) -> dict:
    return {"prompt": f"What is {i} + {i}?", "chosen": f"It is {2 * i}.",
            "rejected": f"Maybe {2 * i + 1}."}  # fmt: skip


def prompt_row(i: int) -> dict:
    return {"prompt": f"Say a {i}", "answer": "a"}


COMMANDS: dict[str, tuple[Callable[..., list[str]], Callable[[int], dict], str]] = {
    "sft": (sft_args, chat_row, "messages"),
    "rm train": (rm_args, pair_row, "rejected"),
    "dpo": (dpo_args, pair_row, "rejected"),
    "rl": (rl_args, prompt_row, "answer"),
}
"""Command -> (its arguments, a valid data row, a field every row needs)."""


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the command line, which must fail with status 2; returns its stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        cli_main(args)
    err = capsys.readouterr().err
    assert done.value.code == 2, err
    assert "Traceback" not in err
    return err


def replace_option(args: list[str], option: str, value: str) -> list[str]:
    """``args`` with ``option``'s value replaced (the option must be there)."""
    out = list(args)
    out[out.index(option) + 1] = value
    return out


def train_steps(run_dir: Path) -> list[int]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "train/loss" in r]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_user_errors_name_the_culprit_and_leave_no_damage(
    command, tiny_model_dir, tmp_path, capsys
):
    make_args, row, needed = COMMANDS[command]
    good = write_rows(tmp_path / "good.jsonl", [row(i) for i in range(8)])
    run = tmp_path / "run"
    args = [*make_args(tiny_model_dir, good, tmp_path), "--log.run-dir", str(run)]
    prefix = f"rlhfkit {command}: error: "

    # data files: missing, empty, malformed lines (every bad line is named)
    err = run_cli(replace_option(args, "--data.train", str(tmp_path / "nope.jsonl")), capsys)
    assert err.startswith(prefix) and "nope.jsonl: no such file" in err
    (tmp_path / "empty.jsonl").write_text("")
    err = run_cli(replace_option(args, "--data.train", str(tmp_path / "empty.jsonl")), capsys)
    assert "empty.jsonl: the file is empty" in err
    rows = [row(i) for i in range(8)]
    lines = [json.dumps(r) for r in rows]
    lines[2] = lines[2][:-1]  # line 3: cut JSON
    lines[4] = json.dumps({k: v for k, v in rows[4].items() if k != needed})  # line 5
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    err = run_cli(replace_option(args, "--data.train", str(bad)), capsys)
    assert "2 bad rows" in err, err
    assert f"{bad}:3: invalid JSON" in err and f"{bad}:5: field '{needed}': missing" in err

    # option values
    err = run_cli([*args, "--optim.lr", "-1"], capsys)
    assert err.startswith(prefix) and "--optim.lr: must be a positive number, got -1.0" in err
    err = run_cli(replace_option(args, "--loop.batch-size", "0"), capsys)
    assert "--loop.batch-size: must be at least 1, got 0" in err
    err = run_cli([*args, "--loop.keep-last", "0", "--loop.save-every", "-1"], capsys)
    assert "2 invalid options" in err and "--loop.keep-last" in err and "--loop.save-every" in err

    # a YAML typo, and invalid YAML
    typo = tmp_path / "typo.yaml"
    typo.write_text("optim:\n  weight_decay: 0.0\n  lrr: 0.1\n")
    err = run_cli([*args, "--config", str(typo)], capsys)
    assert f"{typo}.optim: unknown field 'lrr' (line 3); did you mean 'lr'?" in err
    typo.write_text("loop:\n  batch_size: [4\n")
    err = run_cli([*args, "--config", str(typo)], capsys)
    assert f"{typo}:3:1: invalid YAML" in err

    # a run directory under a regular file, a mistyped local model path
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    err = run_cli(replace_option(args, "--log.run-dir", str(blocker / "run")), capsys)
    assert f"--log.run-dir: cannot create {blocker / 'run'}: {blocker} is a file" in err
    err = run_cli(replace_option(args, "--log.run-dir", str(blocker)), capsys)
    assert f"--log.run-dir: {blocker} is a file, not a directory" in err
    typo_model = f"{tiny_model_dir}x"
    err = run_cli(replace_option(args, "--model.name", typo_model), capsys)
    assert f"--model.name: no such directory: {typo_model} (did you mean {tiny_model_dir}?)" in err

    # nothing left behind trips the correct run in the same directory
    cli_main(args)
    assert (run / "final" / "config.json").is_file()
    assert train_steps(run) == [1, 2]


def test_dpo_online_options_are_checked_before_loading(tiny_model_dir, tmp_path, capsys):
    good = write_rows(tmp_path / "good.jsonl", [pair_row(i) for i in range(8)])
    args = [*online_args(tiny_model_dir, good, tmp_path), "--log.run-dir", str(tmp_path / "r")]
    err = run_cli(replace_option(args, "--data.train", str(tmp_path / "nope.jsonl")), capsys)
    assert err.startswith("rlhfkit dpo online: error: --data.train: ")
    err = run_cli(replace_option(args, "--online.num-samples", "1"), capsys)
    assert "--online.num-samples: must be at least 2, got 1" in err
    err = run_cli(replace_option(args, "--online.reward", "rm:nowhere/rm"), capsys)
    assert "--online.reward: reward 'rm:nowhere/rm': no such directory: nowhere/rm" in err
    err = run_cli(replace_option(args, "--loop.batch-size", "0"), capsys)
    assert "--loop.batch-size" in err
    assert not (tmp_path / "r").exists()  # nothing was created


def test_resume_true_without_a_checkpoint_is_an_error(tiny_model_dir, tmp_path, capsys):
    good = write_rows(tmp_path / "good.jsonl", [chat_row(i) for i in range(8)])
    args = [*sft_args(tiny_model_dir, good, tmp_path), "--log.run-dir", str(tmp_path / "run")]
    err = run_cli([*args, "--loop.resume", "True"], capsys)
    assert "--loop.resume True: " in err and "has no checkpoint" in err
    assert not (tmp_path / "run").exists()


def test_hub_model_offline_fails_at_once(tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    good = write_rows(tmp_path / "good.jsonl", [chat_row(i) for i in range(8)])
    args = ["sft", "--model.name", "rlhfkit-no-such-owner/no-such-model", "--data.train",
            str(good), "--log.run-dir", str(tmp_path / "run")]  # fmt: skip
    err = run_cli(args, capsys)
    assert "model 'rlhfkit-no-such-owner/no-such-model': no such local directory" in err
    assert "HF_HUB_OFFLINE" in err
    assert not (tmp_path / "run").exists()


def test_group_alone_lists_its_commands(capsys):
    err = run_cli(["rm"], capsys)
    assert "rlhfkit rm train" in err and "rlhfkit rm score" in err
    err = run_cli(["label", "exprot"], capsys)
    assert "did you mean 'rlhfkit label export'?" in err and "rlhfkit label serve" in err
    err = run_cli(["sfy"], capsys)
    assert "unknown command 'sfy'; did you mean 'sft'?" in err


def test_a_real_process_prints_one_line_and_debug_shows_the_traceback(tiny_model_dir, tmp_path):
    """``rm train --loop.batch-size 0`` was a ZeroDivisionError traceback."""
    good = write_rows(tmp_path / "good.jsonl", [pair_row(i) for i in range(8)])
    args = replace_option(rm_args(tiny_model_dir, good, tmp_path), "--loop.batch-size", "0")
    command = [sys.executable, "-m", "rlhfkit", *args, "--log.run-dir", str(tmp_path / "run")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("RLHFKIT_DEBUG", None)
    out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 2
    assert out.stderr == "rlhfkit rm train: error: --loop.batch-size: must be at least 1, got 0\n"
    out = subprocess.run([*command, "--debug"], capture_output=True, text=True, env=env,
                         timeout=300)  # fmt: skip
    assert out.returncode != 0 and "Traceback" in out.stderr and "ConfigError" in out.stderr


def sampling_args(command: str, model: Path, data: Path, root: Path) -> list[str]:
    """Arguments of each command that samples, on ``data`` (prompt rows)."""
    source = ["--model.name", str(model), "--data.source", str(data), "--data.split", "train"]
    pipeline_dir = ["--log.run-dir", str(root / "pipeline")]
    return {
        "rl": lambda: rl_args(model, data, root),
        "dpo online": lambda: online_args(model, data, root),
        "eval": lambda: ["eval", *source, "--cache-dir", "None"],
        "bon": lambda: ["bon", *source, "--cache-dir", "None"],
        "rs": lambda: ["rs", *source, "--log.run-dir", str(root / "rs")],
        "generate": lambda: ["generate", "--model.name", str(model), "--prompts", "Hi"],
        "pipeline": lambda: ["pipeline", "--model.name", str(model), *pipeline_dir],
    }[command]()


@pytest.mark.parametrize(
    "command", ["rl", "dpo online", "eval", "bon", "rs", "generate", "pipeline"]
)
def test_a_missing_vllm_engine_is_named_with_its_install_command(
    command, tiny_model_dir, tmp_path, capsys, monkeypatch
):
    """Every command that samples says how to install the engine, before loading any model."""
    import transformers

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the engine was checked")

    data = write_rows(tmp_path / "prompts.jsonl", [prompt_row(i) for i in range(4)])
    args = sampling_args(command, tiny_model_dir, data, tmp_path)
    args += ["--engine.backend", "vllm", "--engine.vllm-python", str(tmp_path / "no-python")]
    for auto in (
        transformers.AutoModelForCausalLM,
        transformers.AutoModelForSequenceClassification,
    ):
        monkeypatch.setattr(auto, "from_pretrained", no_model)
    err = run_cli(args, capsys)
    assert "vLLM engine is not installed" in err and "make vllm" in err


def test_the_pipeline_refuses_an_engine_url(tiny_model_dir, tmp_path, capsys):
    args = sampling_args("pipeline", tiny_model_dir, tmp_path, tmp_path)
    err = run_cli([*args, "--engine.backend", "vllm", "--engine.vllm-url", "http://x"], capsys)
    assert "--engine.vllm-url: the pipeline starts a vLLM server per model" in err
