"""On-policy distillation as a policy-gradient preset (``--algo.preset opd --algo.teacher``).

Exact properties: a teacher equal to the policy gives A = 0; each sampled token's advantage is
c * sum_{s >= t} gamma^(s-t) (log pi_T(a_s) - log pi_old(a_s)) (checked against a direct
computation, gamma 0 and 0.5); training lowers the sampled reverse KL to the teacher.
"""

from __future__ import annotations

import pytest
import torch
from recipe_helpers import pg_config, pg_rollout, pg_setup, read_metrics

from rlhfkit.errors import ConfigError
from rlhfkit.models.forward import rollout_logprobs
from rlhfkit.models.load import load_model
from rlhfkit.models.tiny import save_tiny_model, tiny_model, tiny_tokenizer
from rlhfkit.recipes import policy_gradient as pg

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("opd-teacher")
    return save_tiny_model(path, seed=11, intermediate_size=96)


@pytest.fixture(scope="module")
def sharp_teacher_dir(tmp_path_factory):
    """A teacher with a peaked next-token distribution (its head scaled up): far from the
    near-uniform tiny student."""
    path = tmp_path_factory.mktemp("opd-sharp-teacher")
    model = tiny_model(seed=11, tie_word_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight.mul_(6.0)
    return save_tiny_model(path, model)


def opd_config(model_dir, teacher, task, run_dir, **over):
    data, reward = task
    base = {
        "model": {"name": str(model_dir), "precision": "fp32"},
        "data": {"train": str(data)},
        "rewards": [f"{reward}:letter_a"],
        "algo": {"preset": "opd", "teacher": str(teacher)},
        "sampling": {"num_samples": 1, "max_new_tokens": 8, "temperature": 1.0},
        "optim": {"lr": 5e-3, "warmup_ratio": 0.0, "schedule": "constant"},
        "loop": {"batch_size": 4, "max_steps": 3, "micro_batch_tokens": 64},
        "log": {"run_dir": str(run_dir), "progress": False, "tensorboard": False},
    }
    return pg_config(base, **over)


def test_a_teacher_equal_to_the_policy_gives_zero_advantages(tiny_model_dir, pg_task, tmp_path):
    cfg = opd_config(tiny_model_dir, tiny_model_dir, pg_task, tmp_path / "run")
    _, run, state = pg_setup(cfg)
    batch = pg_rollout(run, state)
    for b in batch.batches:
        assert b.advantages[b.mask].abs().max().item() < 1e-4
    assert abs(batch.stats["rollout/teacher_kl"]) < 1e-4


@pytest.mark.parametrize(("gamma", "coef"), [(0.0, 1.0), (0.5, 0.7)])
def test_each_token_gets_the_discounted_teacher_gap(
    tiny_model_dir, teacher_dir, pg_task, tmp_path, gamma, coef
):
    cfg = opd_config(tiny_model_dir, teacher_dir, pg_task, tmp_path / "run",
                     algo__teacher_gamma=gamma, algo__teacher_coef=coef)  # fmt: skip
    _, run, state = pg_setup(cfg)
    batch = pg_rollout(run, state)  # one sample per prompt: the centred reward is 0
    teacher = load_model(str(teacher_dir), dtype=torch.float32).eval()
    for b in batch.batches:
        with torch.no_grad():
            lp_teacher = rollout_logprobs(teacher, b.inputs)[0].double()
        gap = torch.where(b.mask, lp_teacher - b.kl_logprobs.double(), 0.0)  # (B, T)
        expected = torch.zeros_like(gap)
        for row in range(gap.shape[0]):
            tokens = b.mask[row].nonzero()[:, 0].tolist()
            for i, t in enumerate(tokens):
                expected[row, t] = sum(gamma ** (j - i) * gap[row, s] for j, s in
                                       enumerate(tokens) if j >= i)  # fmt: skip
        torch.testing.assert_close(b.advantages.double(), coef * expected, atol=1e-5, rtol=1e-5)


def test_training_lowers_the_reverse_kl_to_the_teacher(
    tiny_model_dir, sharp_teacher_dir, pg_task, tmp_path
):
    """The sampled per-token reverse KL to a peaked teacher falls (24 steps of 8 x 8 samples:
    about 0.42 -> 0.34 nats per token here; a wrong sign would raise it)."""
    cfg = opd_config(tiny_model_dir, sharp_teacher_dir, pg_task, tmp_path / "run",
                     loop__max_steps=24, loop__batch_size=8, loop__micro_batch_tokens=512,
                     sampling__num_samples=8, optim__lr=3e-3)  # fmt: skip
    pg.main(cfg)
    kl = [r["rollout/teacher_kl"] for r in read_metrics(tmp_path / "run")]
    assert len(kl) == 24
    assert sum(kl[-8:]) / 8 < 0.9 * sum(kl[:4]) / 4, kl


def test_opd_needs_a_teacher_with_the_same_tokenizer(tiny_model_dir, pg_task, tmp_path):
    cfg = opd_config(tiny_model_dir, tiny_model_dir, pg_task, tmp_path / "run")
    cfg.algo.teacher = None
    with pytest.raises(ConfigError, match=r"--algo.teacher: the opd preset distils a teacher"):
        pg.main(cfg)
    other = tmp_path / "other"
    tiny_model(seed=1, vocab_size=400).save_pretrained(other)
    tiny_tokenizer(vocab_size=400).save_pretrained(other)
    cfg.algo.teacher = str(other)
    with pytest.raises(ConfigError, match=r"--algo.teacher .*tokenizer differs"):
        pg.main(cfg)
