"""SFT on 2 gloo ranks (torchrun's environment) equals SFT in one process."""

from __future__ import annotations

from recipe_helpers import assert_same_run, run_two_ranks

from rlhfkit.config import LogConfig, LoopConfig, ModelConfig, OptimConfig
from rlhfkit.recipes import sft


def config(model_dir: str, train: str, heldout: str, run_dir: str) -> sft.SFTConfig:
    return sft.SFTConfig(
        model=ModelConfig(name=model_dir, precision="fp32"),
        data=sft.SFTDataConfig(train=train, eval=heldout, eval_split="train"),
        optim=OptimConfig(lr=3e-3, warmup_ratio=0.0),
        loop=LoopConfig(batch_size=8, micro_batch_tokens=64, max_steps=3, seed=1),
        log=LogConfig(run_dir=run_dir, tensorboard=False, progress=False),
    )


def test_two_ranks_equal_one_process(tiny_model_dir, chat_data, tmp_path, monkeypatch):
    train, heldout = (str(p) for p in chat_data)
    single, double = tmp_path / "single", tmp_path / "double"
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    sft.main(config(str(tiny_model_dir), train, heldout, str(single)))
    run_two_ranks(sft.main, config(str(tiny_model_dir), train, heldout, str(double)))
    # eval, 3 steps, eval: only rank 0 wrote
    assert_same_run(single, double, ("train/loss", "eval/"), n_records=5)
