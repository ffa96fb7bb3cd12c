"""The command line: help from docstrings, YAML presets, overrides, errors, generate."""

from __future__ import annotations

from dataclasses import replace

import pytest

from rlhfkit import cli
from rlhfkit.config import from_dict, load_yaml, parse_cli
from rlhfkit.inference.generate import GenerateConfig
from rlhfkit.inference.generate import main as generate_main
from rlhfkit.recipes.sft import SFTConfig


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["sft", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for flag, words in {
        "--model.name": "embedded default",
        "--data.mask-mode": "assistant turns",
        "--optim.warmup-ratio": "warming up",
        "--loop.micro-batch-tokens": "never changes the gradient",
        "--log.run-dir": "checkpoints",
    }.items():
        assert flag in text and words in text, flag


def test_usage_lists_commands(capsys):
    cli.main([])
    out = capsys.readouterr().out
    assert "sft" in out and "generate" in out and "demo" in out


def test_unknown_command(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["nope"])
    assert done.value.code == 2
    assert "unknown command 'nope'" in capsys.readouterr().err


def test_yaml_preset_then_flag_override(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("optim:\n  lr: 0.001\n  betas: [0.8, 0.9]\nloop:\n  batch_size: 4\n")
    cfg = parse_cli(
        SFTConfig, ["--config", str(preset), "--loop.batch-size", "2"], prog="t", description=""
    )
    assert cfg.optim.lr == 0.001 and cfg.optim.betas == (0.8, 0.9)
    assert cfg.loop.batch_size == 2  # the flag wins over the preset
    assert cfg.loop.seed == 0  # untouched fields keep defaults


def test_shipped_preset_loads():
    cfg = load_yaml(SFTConfig, "configs/sft.yaml")
    assert cfg.loop.max_steps == 30 and cfg.data.train == "builtin:instructions"


def test_pipeline_preset_is_the_demo():
    """configs/pipeline.yaml says it is what `make demo` runs: it must equal the defaults."""
    from rlhfkit.pipeline.config import PipelineConfig

    cfg = load_yaml(PipelineConfig, "configs/pipeline.yaml")
    defaults = PipelineConfig()
    assert replace(cfg, log=defaults.log) == defaults


def test_unknown_yaml_key_names_its_path(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ValueError, match=r"p.yaml.optim: unknown field 'learning_rate'"):
        load_yaml(SFTConfig, preset)
    with pytest.raises(ValueError, match="must be a mapping"):
        from_dict(SFTConfig, {"optim": 3})


def test_generate_on_a_local_model(tiny_model_dir, tmp_path, capsys):
    cfg = GenerateConfig(
        prompts=["What is 2 + 3?", "Reverse cat"], output=str(tmp_path / "o.jsonl")
    )
    cfg.model.name = str(tiny_model_dir)
    cfg.model.precision = "fp32"
    cfg.sampling.max_new_tokens = 5
    cfg.sampling.num_samples = 2
    outs = generate_main(cfg)
    assert len(outs) == 2 and all(len(o) == 2 for o in outs)
    assert "What is 2 + 3?" in capsys.readouterr().out
    assert len((tmp_path / "o.jsonl").read_text().splitlines()) == 2
    cfg.sampling.temperature = 0.0  # greedy decoding is deterministic
    with pytest.raises(ValueError, match="identical samples"):
        generate_main(cfg)
    cfg.sampling.num_samples = 1
    assert generate_main(cfg) == generate_main(cfg)


def test_generate_samples_with_the_rollout_generator(tiny_model_dir, monkeypatch):
    """generate samples as RL and eval do: chat-template prompts through the HFGenerator, never
    transformers' generate."""
    from transformers import GenerationMixin

    from rlhfkit.data.prompts import conversation_rows
    from rlhfkit.eval.run import load_sampler, sample_grid

    cfg = GenerateConfig(prompts=["What is 2 + 3?", "Reverse cat"], system="Be brief.")
    cfg.model.name = str(tiny_model_dir)
    cfg.model.precision = "fp32"
    cfg.sampling.max_new_tokens = 6
    cfg.sampling.num_samples = 3
    cfg.sampling.seed = 7
    monkeypatch.setattr(GenerationMixin, "generate", lambda *a, **k: pytest.fail("HF generate"))
    outs = generate_main(cfg)
    _, tokenizer, generator = load_sampler(cfg.model)
    conversations = [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": p}]
        for p in cfg.prompts
    ]
    rows = conversation_rows(tokenizer, conversations)
    assert outs == sample_grid(generator, tokenizer, rows, cfg.sampling).texts


@pytest.mark.parametrize("command", ["generate", "demo"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main([command, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "--model.name" in text or "--sft.model.name" in text
    assert "temperature" in text.lower()


def test_yaml_values_are_type_checked(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("optim:\n  lr: 1e-5\n  warmup_ratio: 0\nloop:\n  max_steps: null\n")
    cfg = load_yaml(SFTConfig, preset)  # YAML reads 1e-5 as a string and 0 as an int
    assert cfg.optim.lr == 1e-5 and isinstance(cfg.optim.warmup_ratio, float)
    assert cfg.loop.max_steps is None
    for bad, message in (
        ("model:\n  precision: bf17\n", r"p.yaml.model.precision: expected one of"),
        ("loop:\n  batch_size: many\n", r"p.yaml.loop.batch_size: expected int"),
        ("optim:\n  lr: fast\n", r"p.yaml.optim.lr: expected float"),
        ("optim:\n  betas: 0.9\n", r"p.yaml.optim.betas: expected a list"),
    ):
        preset.write_text(bad)
        with pytest.raises(ValueError, match=message):
            load_yaml(SFTConfig, preset)


def test_config_equals_form(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("loop:\n  batch_size: 4\n")
    cfg = parse_cli(SFTConfig, [f"--config={preset}"], prog="t", description="")
    assert cfg.loop.batch_size == 4
