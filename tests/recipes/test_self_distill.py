"""Self-distillation (``--algo.teacher self``): the policy reads privileged context.

Exact properties: the sibling demo is a correct completion of another sample, never the
completion itself, drawn uniformly; rows without a context get no teacher term; the teacher's
log-probs are the policy's own on the privileged prompt, with no gradient; the EMA teacher moves
by alpha towards the policy; a frozen teacher does not move.
"""

from __future__ import annotations

import random

import pytest
import torch
from recipe_helpers import pg_config, pg_rollout, pg_setup, read_metrics

from rlhfkit.data.rollouts import rollout_micro_batches
from rlhfkit.models.forward import completion_logprobs
from rlhfkit.models.tiny import tiny_tokenizer
from rlhfkit.recipes import policy_gradient as pg
from rlhfkit.recipes.policy_gradient.self_distill import (
    SelfTeacher,
    _chat,
    answer_context,
    contexts,
    sibling_choice,
    teacher_prompt,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def self_config(model_dir, task, run_dir, **over):
    data, reward = task
    base = {
        "model": {"name": str(model_dir), "precision": "fp32"},
        "data": {"train": str(data)},
        "rewards": [f"{reward}:letter_a"],
        "algo": {"preset": "opd", "teacher": "self"},
        "sampling": {"num_samples": 4, "max_new_tokens": 8, "temperature": 1.0},
        "optim": {"lr": 5e-3, "warmup_ratio": 0.0, "schedule": "constant"},
        "loop": {"batch_size": 4, "max_steps": 3, "micro_batch_tokens": 64},
        "log": {"run_dir": str(run_dir), "progress": False, "tensorboard": False},
    }
    return pg_config(base, **over)


def test_the_sibling_is_correct_never_itself_and_uniform():
    rewards = torch.tensor(
        [[1.0, 0.0, 1.0, 1.0], [0.0, float("nan"), 0.0, 1.0]], dtype=torch.float64
    )
    rng = random.Random(0)
    seen = {sibling_choice(rewards, 0, 0, 1.0, rng) for _ in range(200)}
    assert seen == {2, 3}  # both other correct samples, never 0 itself or the wrong 1
    assert sibling_choice(rewards, 1, 3, 1.0, rng) is None  # the only correct one is itself
    assert sibling_choice(rewards, 1, 0, 1.0, rng) == 3
    draws = [sibling_choice(rewards, 0, 1, 1.0, rng) for _ in range(4000)]
    assert set(draws) == {0, 2, 3}
    assert all(abs(draws.count(j) / 4000 - 1 / 3) < 0.03 for j in (0, 2, 3))


def test_answer_context_and_teacher_prompt():
    assert answer_context({"answer": "42"}) == "42"
    assert answer_context({"reference": "Paris"}) == "Paris"
    assert answer_context({"prompt": "x"}) is None
    tokenizer = tiny_tokenizer()
    ids = teacher_prompt(tokenizer, [{"role": "user", "content": "Say a"}], "a a")
    text = tokenizer.decode(ids)
    assert "Say a" in text and "A correct solution:\na a" in text


@pytest.mark.parametrize("context", ["answer", "sibling"])
def test_teacher_logprobs_are_the_policy_on_the_privileged_prompt(
    tiny_model_dir, pg_task, tmp_path, context
):
    cfg = self_config(tiny_model_dir, pg_task, tmp_path / "run", algo__self_context=context,
                      algo__self_teacher="live", algo__pass_threshold=0.0)  # fmt: skip
    ctx, run, state = pg_setup(cfg)
    batch = pg_rollout(run, state)
    sampled, g = batch.sampled, cfg.sampling.num_samples
    found = contexts(run, sampled, ctx.step)  # the same seeded draws as the pass above
    checked = 0
    for b in batch.batches:
        assert b.teacher_logprobs is not None and not b.teacher_logprobs.requires_grad
        for i, row in enumerate(b.rows.tolist()):
            prompt, n = sampled.rollout.prompt_index[row], int(b.mask[i].sum())
            assert bool(b.teacher_rows[i]) == (found[row] is not None)
            if found[row] is None:
                continue
            if context == "answer":
                assert found[row] == sampled.prompts[prompt].fields["answer"]
            else:  # the text of a correct sample of the same group
                correct = [sampled.texts[prompt * g + j] for j in range(g)
                           if sampled.rewards[prompt, j] >= 0.0]  # fmt: skip
                assert found[row] in correct
            messages = _chat(sampled.prompts[prompt].fields["prompt"])
            ids = teacher_prompt(ctx.tokenizer, messages, found[row])
            comp = sampled.rollout.completion_ids[row][:n]
            part = rollout_micro_batches([ids], [comp], [[0.0] * n], ctx.pad_id, 1 << 20)[0]
            with torch.no_grad():
                expected = completion_logprobs(
                    ctx.model.eval(), part["prompt_ids"], part["prompt_mask"],
                    part["completion_ids"], part["completion_mask"],
                )[0]  # fmt: skip
            torch.testing.assert_close(b.teacher_logprobs[i, :n], expected, atol=1e-5, rtol=1e-5)
            checked += 1
    assert checked > 0


def test_rows_without_context_get_no_teacher_term(tiny_model_dir, pg_task, tmp_path):
    """With one sample per prompt no sibling exists: every teacher term is 0, as is the
    centred reward, so every advantage is 0."""
    cfg = self_config(tiny_model_dir, pg_task, tmp_path / "run", algo__self_context="sibling",
                      sampling__num_samples=1)  # fmt: skip
    _, run, state = pg_setup(cfg)
    batch = pg_rollout(run, state)
    for b in batch.batches:
        assert not bool(b.teacher_rows.any())
        assert b.advantages[b.mask].abs().max().item() == 0.0
    assert batch.stats["rollout/teacher_kl"] == 0.0


def test_ema_and_frozen_teachers(tiny_model_dir, pg_task, tmp_path):
    cfg = self_config(tiny_model_dir, pg_task, tmp_path / "run")
    ctx, _, _ = pg_setup(cfg)
    ema = SelfTeacher(ctx, "ema", 0.25)
    frozen = SelfTeacher(ctx, "frozen", 0.25)
    with ema.network(), frozen.network():  # both are built at their first pass
        pass
    before_ema = [p.detach().clone() for p in ema.model.parameters()]
    before_frozen = [p.detach().clone() for p in frozen.model.parameters()]
    with torch.no_grad():
        for p in ctx.model.parameters():
            p.add_(0.5)
    ema.update()
    frozen.update()
    for t, p, old in zip(ema.model.parameters(), ctx.model.parameters(), before_ema, strict=True):
        torch.testing.assert_close(t, 0.75 * old + 0.25 * p.detach())
        assert not t.requires_grad
    for t, old in zip(frozen.model.parameters(), before_frozen, strict=True):
        torch.testing.assert_close(t, old)
    frozen.close()


def test_a_self_distillation_run(tiny_model_dir, pg_task, tmp_path):
    cfg = self_config(tiny_model_dir, pg_task, tmp_path / "run", algo__self_context="answer",
                      algo__self_teacher="ema")  # fmt: skip
    pg.main(cfg)
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["rollout/teacher_kl"] == r["rollout/teacher_kl"] for r in rows)
