"""SFT recipe on a tiny local model: golden first step, resume equivalence, outputs, failures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rlhfkit.config import LogConfig, LoopConfig, ModelConfig, OptimConfig
from rlhfkit.data import DataError
from rlhfkit.models.load import load_tokenizer
from rlhfkit.recipes import sft
from rlhfkit.training.run import NonFiniteLossError


def make_cfg(model_dir: Path, data: tuple[Path, Path], run_dir: Path, **loop) -> sft.SFTConfig:
    train, heldout = data
    loop_cfg = {"batch_size": 8, "micro_batch_tokens": 64, "max_steps": 4, "seed": 3, **loop}
    return sft.SFTConfig(
        model=ModelConfig(name=str(model_dir), precision="fp32"),
        data=sft.SFTDataConfig(train=str(train), eval=str(heldout), eval_split="train"),
        optim=OptimConfig(lr=3e-3, warmup_ratio=0.0),
        loop=LoopConfig(**loop_cfg),
        log=LogConfig(run_dir=str(run_dir), tensorboard=False, progress=False),
    )


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def poison_training_losses(monkeypatch, bad) -> None:
    """Make the n-th training micro-batch loss non-finite whenever ``bad(n)`` (n from 1)."""
    real, calls = sft.sft_loss, {"n": 0}

    def poisoned(**kwargs):
        out = real(**kwargs)
        if kwargs["logprobs"].requires_grad:
            calls["n"] += 1
            if bad(calls["n"]):
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(sft, "sft_loss", poisoned)


def train_losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["train/loss"] for m in metrics(run_dir) if "train/loss" in m}


def test_first_step_loss_is_the_token_mean_nll(tiny_model_dir, chat_data, tmp_path):
    cfg = make_cfg(tiny_model_dir, chat_data, tmp_path / "run", max_steps=1)
    sft.main(cfg)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    examples, _ = sft.tokenize_examples(tokenizer, cfg.data.train, "train", cfg.data)
    batch = [examples[i] for i in sft.batch_order(len(examples), 8, cfg.loop.seed, 0)]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    nll, count = 0.0, 0
    with torch.no_grad():
        for ex in batch:  # one at a time, full logits, plain cross-entropy
            logits = model(torch.tensor([ex.input_ids])).logits[0, :-1]
            labels = torch.tensor(
                [t if m else -100 for t, m in zip(ex.input_ids, ex.loss_mask, strict=True)]
            )[1:]
            nll += F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum").item()
            count += int((labels != -100).sum())
    assert train_losses(tmp_path / "run")[1] == pytest.approx(nll / count, abs=1e-5)


def test_resume_equals_uninterrupted(tiny_model_dir, chat_data, tmp_path, monkeypatch):
    full = tmp_path / "full"
    sft.main(make_cfg(tiny_model_dir, chat_data, full, save_every=2))

    # Crash during step 3 (after the step-2 checkpoint), then resume.
    broken = tmp_path / "broken"
    real = sft.accumulate
    calls = {"train": 0}

    def crashing(*args, **kwargs):
        if kwargs.get("backward", True):
            calls["train"] += 1
            if calls["train"] == 3:
                raise KeyboardInterrupt("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(sft, "accumulate", crashing)
    with pytest.raises(KeyboardInterrupt):
        sft.main(make_cfg(tiny_model_dir, chat_data, broken, save_every=2))
    monkeypatch.setattr(sft, "accumulate", real)
    assert (broken / "checkpoints" / "latest").read_text().strip() == "step-00000002"
    sft.main(make_cfg(tiny_model_dir, chat_data, broken, save_every=2, resume=True))

    a, b = train_losses(full), train_losses(broken)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-6)
    wa = load_file(str(full / "final" / "model.safetensors"))
    wb = load_file(str(broken / "final" / "model.safetensors"))
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-6, rtol=0)


def test_outputs_and_learning(tiny_model_dir, chat_data, tmp_path):
    run = tmp_path / "run"
    sft.main(make_cfg(tiny_model_dir, chat_data, run, max_steps=12, micro_batch_tokens=4096))
    for name in ("config.yaml", "run_info.json", "metrics.jsonl", "final/config.json"):
        assert (run / name).is_file(), name
    info = json.loads((run / "run_info.json").read_text())
    assert info["versions"]["torch"] and "revision" in info["git"]
    evals = [m["eval/loss"] for m in metrics(run) if "eval/loss" in m]
    assert evals[-1] < evals[0] - 0.5  # held-out NLL falls on a learnable task
    trained = AutoModelForCausalLM.from_pretrained(run / "final")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = [
        n
        for (n, p), (_, q) in zip(trained.named_parameters(), base.named_parameters(), strict=True)
        if not torch.equal(p, q)
    ]
    assert len(changed) == len(list(base.parameters()))


def test_bf16_compute_with_fp32_master(tiny_model_dir, chat_data, tmp_path):
    cfg = make_cfg(tiny_model_dir, chat_data, tmp_path / "run", max_steps=6)
    cfg.model.precision = "bf16"
    sft.main(cfg)
    evals = [m["eval/loss"] for m in metrics(tmp_path / "run") if "eval/loss" in m]
    assert evals[-1] < evals[0]
    saved = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    master = load_file(
        str(tmp_path / "run" / "checkpoints" / "step-00000006" / "model.safetensors")
    )
    assert all(t.dtype == torch.float32 for t in saved.values())
    for name, weight in master.items():  # the fp32 master weights, not bf16-rounded copies
        assert torch.equal(saved[name], weight), name
    assert any(not torch.equal(w, w.bfloat16().float()) for w in master.values())


def test_lora_trains_only_the_adapter(tiny_model_dir, chat_data, tmp_path):
    cfg = make_cfg(tiny_model_dir, chat_data, tmp_path / "run", max_steps=2)
    cfg.model.lora, cfg.model.lora_r = True, 4
    sft.main(cfg)
    ckpt = load_file(str(tmp_path / "run" / "checkpoints" / "step-00000002" / "model.safetensors"))
    assert ckpt and all("lora_" in name for name in ckpt)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_malformed_row_names_line_and_field(tiny_model_dir, chat_data, tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = chat_data[0].read_text().splitlines()
    row = json.loads(lines[4])
    row["messages"][1]["role"] = "user"
    lines[4] = json.dumps(row)
    bad.write_text("\n".join(lines) + "\n")
    cfg = make_cfg(tiny_model_dir, (bad, chat_data[1]), tmp_path / "run")
    with pytest.raises(DataError) as err:
        sft.main(cfg)
    text = str(err.value)
    assert "bad.jsonl:5" in text and "messages[1].role" in text
    cfg.data.on_error = "skip"
    sft.main(cfg)  # the bad row is skipped and training completes


def test_nonfinite_losses_abort_and_keep_last_checkpoint(
    tiny_model_dir, chat_data, tmp_path, monkeypatch
):
    run = tmp_path / "run"
    cfg = make_cfg(tiny_model_dir, chat_data, run, max_steps=6, save_every=2, max_nonfinite=2)
    poison_training_losses(monkeypatch, lambda n: n > 2 * 8)  # every micro-batch after a few
    with pytest.raises(NonFiniteLossError, match="consecutive non-finite"):
        sft.main(cfg)
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert (run / "checkpoints" / latest / "model.safetensors").is_file()
    assert not list((run / "checkpoints").glob(".tmp-*"))


def test_unroll_makes_one_example_per_assistant_turn(tiny_model_dir, tmp_path):
    rows = [
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"},
                {"role": "assistant", "content": "d"},
            ]
        }
    ] * 3
    path = tmp_path / "multi.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tokenizer = load_tokenizer(str(tiny_model_dir))
    data = sft.SFTDataConfig(train=str(path), mask_mode="final_turn", unroll=True)
    examples, counts = sft.tokenize_examples(tokenizer, str(path), "train", data)
    assert len(examples) == 6 and counts["dropped"] == 0
    labelled = [
        tokenizer.decode([t for t, m in zip(e.input_ids, e.loss_mask, strict=True) if m])
        for e in examples
    ]
    assert labelled[:2] == ["b<|im_end|>", "d<|im_end|>"]


def test_packing_and_micro_batching_do_not_change_the_step(tiny_model_dir, chat_data, tmp_path):
    losses = {}
    for name, packing, budget in (
        ("packed", True, 4096),
        ("buckets", False, 64),
        ("one", False, 4096),
    ):
        cfg = make_cfg(
            tiny_model_dir, chat_data, tmp_path / name, max_steps=2, micro_batch_tokens=budget
        )
        cfg.data.packing = packing
        sft.main(cfg)
        losses[name] = train_losses(tmp_path / name)
    for name in ("buckets", "one"):
        for step in (1, 2):
            assert losses[name][step] == pytest.approx(losses["packed"][step], abs=1e-5)


def test_tracker_without_its_package_gives_an_install_hint(tiny_model_dir, chat_data, tmp_path):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed")
    cfg = make_cfg(tiny_model_dir, chat_data, tmp_path / "run", max_steps=1)
    cfg.log.wandb = True
    with pytest.raises(ImportError, match="pip install wandb"):
        sft.main(cfg)


def test_one_nonfinite_batch_is_skipped_and_training_goes_on(
    tiny_model_dir, chat_data, tmp_path, monkeypatch
):
    run = tmp_path / "run"
    cfg = make_cfg(tiny_model_dir, chat_data, run, max_steps=3, micro_batch_tokens=4096)
    poison_training_losses(monkeypatch, lambda n: n == 2)  # one packed micro-batch per batch
    sft.main(cfg)
    rows = [m for m in metrics(run) if "train/loss" in m]
    assert [m["step"] for m in rows] == [1, 2, 3]  # three optimiser steps from four batches
    assert [m["train/skipped_batches"] for m in rows] == [0, 1, 1]


def test_lora_bf16_final_model_keeps_fp32_base_weights(tiny_model_dir, chat_data, tmp_path):
    cfg = make_cfg(tiny_model_dir, chat_data, tmp_path / "run", max_steps=2)
    cfg.model.lora, cfg.model.lora_r, cfg.model.precision = True, 4, "bf16"
    cfg.model.lora_target_modules = ["q_proj", "v_proj"]
    sft.main(cfg)
    final = tmp_path / "run" / "final"
    assert (final / "adapter" / "adapter_config.json").is_file()
    merged = load_file(str(final / "model.safetensors"))
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    # Untouched weights are bit-identical to the fp32 base (not rounded through bf16) ...
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(merged[name], base[name])
    # ... and adapted ones moved.
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[q], base[q])


def test_invalid_combinations_are_refused(tiny_model_dir, chat_data, tmp_path):
    cfg = make_cfg(tiny_model_dir, chat_data, tmp_path / "run", max_steps=1)
    cfg.model.precision = "fp16"
    with pytest.raises(ValueError, match="loss scaling"):
        sft.main(cfg)
    cfg = make_cfg(tiny_model_dir, chat_data, tmp_path / "run2", max_steps=1)
    cfg.data.unroll, cfg.data.mask_mode = True, "all_assistant_turns"
    with pytest.raises(ValueError, match="unroll needs"):
        sft.main(cfg)
