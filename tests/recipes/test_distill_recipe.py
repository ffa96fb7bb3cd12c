"""``rlhfkit distill`` on tiny models: exact properties of the step, the schedule of on- and
off-policy batches, the held-out metrics, and the user errors.

The teacher is a tiny model of another seed and width (same tokenizer); the student is the tiny
model.
"""

from __future__ import annotations

import json

import pytest
import torch
from recipe_helpers import read_metrics

from rlhfkit.config import from_dict
from rlhfkit.errors import ConfigError
from rlhfkit.losses.distill import DistillLoss
from rlhfkit.models.load import load_model
from rlhfkit.models.tiny import save_tiny_model, tiny_model, tiny_tokenizer
from rlhfkit.recipes import distill
from rlhfkit.recipes.sft import label_count, micro_batches
from rlhfkit.training.accumulate import accumulate
from rlhfkit.types import TokenizedExample

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A tiny teacher of another seed and a wider MLP, sharing the tokenizer."""
    path = tmp_path_factory.mktemp("tiny-teacher")
    return save_tiny_model(path, seed=7, intermediate_size=192)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("distill-data") / "prompts.jsonl"
    rows = [{"prompt": f"Say {chr(97 + i % 26)} {i}", "answer": "a", "completion": f"ok {i}"}
            for i in range(16)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(student, teacher, data, run_dir, **over) -> distill.DistillConfig:
    base = {
        "model": {"name": str(student), "precision": "fp32"},
        "teacher": {"name": str(teacher)},
        "data": {"train": str(data), "eval": str(data), "eval_split": "train",
                 "schema": "verifiable", "eval_limit": 6},
        "sampling": {"max_new_tokens": 8, "temperature": 1.0},
        "optim": {"lr": 3e-3, "warmup_ratio": 0.0, "schedule": "constant"},
        "loop": {"batch_size": 4, "max_steps": 6, "micro_batch_tokens": 64, "eval_every": 3},
        "log": {"run_dir": str(run_dir), "progress": False, "tensorboard": False},
    }  # fmt: skip
    for key, value in over.items():
        section, _, name = key.partition("__")
        base.setdefault(section, {})[name] = value
    return from_dict(distill.DistillConfig, base)


def _examples(n: int) -> list[TokenizedExample]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        prompt = torch.randint(3, 380, (3 + i % 4,), generator=gen).tolist()
        reply = torch.randint(3, 380, (2 + i % 5,), generator=gen).tolist()
        out.append(TokenizedExample(prompt + reply, [False] * len(prompt) + [True] * len(reply)))
    return out


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_gradient_does_not_depend_on_the_micro_batch_split(tiny_model_dir, teacher_dir, beta):
    """The summed divergence over the global label count: one micro-batch or many give the
    same loss and gradient."""
    student = load_model(str(tiny_model_dir), dtype=torch.float32)
    teacher = load_model(str(teacher_dir), dtype=torch.float32).requires_grad_(False)
    step_loss = distill.make_step_loss(student, teacher, DistillLoss(beta=beta, top_k=None))
    examples = _examples(6)
    results = []
    for budget in (1024, 12):
        student.zero_grad()
        parts = micro_batches(examples, packing=True, budget=budget, pad_id=0)
        stats = accumulate(parts, step_loss, count_fn=label_count)
        results.append((len(parts), stats.loss, [p.grad.clone() for p in student.parameters()]))
        assert all(p.grad is None for p in teacher.parameters())
    (n_one, loss_one, g_one), (n_many, loss_many, g_many) = results
    assert n_one == 1 and n_many > 1
    assert loss_many == pytest.approx(loss_one, rel=1e-5)
    for a, b in zip(g_one, g_many, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_the_loss_is_the_token_mean_of_the_divergence(tiny_model_dir, teacher_dir):
    student = load_model(str(tiny_model_dir), dtype=torch.float32)
    teacher = load_model(str(teacher_dir), dtype=torch.float32)
    loss = DistillLoss(beta=0.3, temperature=2.0)
    examples = _examples(3)
    expected = []
    with torch.no_grad():
        for e in examples:
            ids = torch.tensor([e.input_ids])
            start = e.loss_mask.index(True)
            s = student(ids).logits[0, start - 1 : -1]
            t = teacher(ids).logits[0, start - 1 : -1]
            expected.append(loss.from_logits(s.double(), t.double()))  # the fp64 truth
    expected_mean = torch.cat(expected).mean().item()
    parts = micro_batches(examples, packing=True, budget=1024, pad_id=0)
    stats = accumulate(
        parts,
        distill.make_step_loss(student, teacher, loss),
        count_fn=label_count,
        backward=False,
    )
    assert stats.loss == pytest.approx(expected_mean, rel=1e-5)


def test_a_teacher_equal_to_the_student_gives_zero_kl_and_full_agreement(
    tiny_model_dir, prompts_file, tmp_path
):
    cfg = config(tiny_model_dir, tiny_model_dir, prompts_file, tmp_path / "run", loop__max_steps=2)
    distill.main(cfg)
    rows = read_metrics(tmp_path / "run")
    first = rows[0]
    assert first["eval/forward_kl"] == pytest.approx(0.0, abs=1e-6)
    assert first["eval/reverse_kl"] == pytest.approx(0.0, abs=1e-6)
    assert first["eval/agreement"] == 1.0
    train = [r for r in rows if "train/loss" in r]
    assert train[0]["train/loss"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(("lmbda", "expected"), [(0.0, 0.0), (1.0, 1.0)])
def test_lambda_sets_who_samples(
    tiny_model_dir, teacher_dir, prompts_file, tmp_path, lmbda, expected
):
    cfg = config(tiny_model_dir, teacher_dir, prompts_file, tmp_path / "run", algo__lmbda=lmbda,
                 loop__max_steps=3, loop__eval_every=0)  # fmt: skip
    distill.main(cfg)
    flags = [r["train/on_policy"] for r in read_metrics(tmp_path / "run") if "train/loss" in r]
    assert flags == [expected] * 3


def test_the_mixed_schedule_is_seeded_and_the_student_moves_towards_the_teacher(
    tiny_model_dir, teacher_dir, prompts_file, tmp_path
):
    """lambda = 0.5: the on-policy steps are the seeded draws; training on the teacher's
    distributions lowers the held-out KL to it, both ways. (Top-1 agreement is not asserted: two
    tiny random models agree at every position already, so it could not fail.)"""
    cfg = config(tiny_model_dir, teacher_dir, prompts_file, tmp_path / "run", algo__lmbda=0.5,
                 loop__max_steps=12, loop__eval_every=0, algo__beta=0.5)  # fmt: skip
    distill.main(cfg)
    rows = read_metrics(tmp_path / "run")
    flags = [r["train/on_policy"] for r in rows if "train/loss" in r]
    assert flags == [float(distill.on_policy(cfg.loop.seed, k, 0.5)) for k in range(12)]
    assert 0 < sum(flags) < 12
    before, after = rows[0], rows[-1]
    assert after["eval/forward_kl"] < 0.7 * before["eval/forward_kl"]
    assert after["eval/reverse_kl"] < 0.7 * before["eval/reverse_kl"]


def test_dataset_completions_are_the_off_policy_sequences(
    tiny_model_dir, teacher_dir, prompts_file, tmp_path
):
    from rlhfkit.data.prompts import load_prompt_rows

    tokenizer = tiny_tokenizer()
    rows = load_prompt_rows(tokenizer, str(prompts_file), "verifiable", limit=2)
    examples = distill.dataset_examples(tokenizer, rows)
    reply = tokenizer("ok 0", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert examples[0].input_ids == rows[0].ids + reply
    assert examples[0].loss_mask == [False] * len(rows[0].ids) + [True] * len(reply)
    bare = prompts_file.parent / "bare.jsonl"
    bare.write_text(json.dumps({"prompt": "Say a", "answer": "a"}) + "\n")
    with pytest.raises(ConfigError, match=r"bare.jsonl:1: --algo.off-policy dataset needs"):
        distill.dataset_examples(tokenizer, load_prompt_rows(tokenizer, str(bare), "verifiable"))


def test_a_teacher_with_another_tokenizer_is_refused_before_loading(
    tiny_model_dir, prompts_file, tmp_path, capsys, monkeypatch
):
    import transformers

    from rlhfkit.cli import main as cli_main

    other = tmp_path / "other-teacher"
    tiny_model(seed=1, vocab_size=400).save_pretrained(other)
    tiny_tokenizer(vocab_size=400).save_pretrained(other)

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the tokenizers were compared")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_model)
    args = ["distill", "--model.name", str(tiny_model_dir), "--teacher.name", str(other),
            "--data.train", str(prompts_file), "--log.run-dir", str(tmp_path / "run")]  # fmt: skip
    with pytest.raises(SystemExit) as done:
        cli_main(args)
    err = capsys.readouterr().err
    assert done.value.code == 2 and "Traceback" not in err
    assert "--teacher.name" in err and "tokenizer differs from the student's" in err


def test_a_teacher_head_padded_past_the_vocabulary_is_cut_to_it(
    tiny_model_dir, prompts_file, tmp_path
):
    """Checkpoints of one family may pad their heads to different sizes past the tokenizer's
    vocabulary: both heads are cut to the vocabulary."""
    padded = tmp_path / "padded-teacher"
    teacher = tiny_model(seed=5, vocab_size=448)
    with torch.no_grad():  # the padding rows, as in a trained model: never the likely token
        teacher.get_output_embeddings().weight[384:] = 0.0
    save_tiny_model(padded, teacher)
    cfg = config(
        tiny_model_dir,
        padded,
        prompts_file,
        tmp_path / "run",
        loop__max_steps=2,
        algo__lmbda=1.0,
        data__eval=None,
    )  # the student samples: ids in its vocabulary
    distill.main(cfg)
    assert len([r for r in read_metrics(tmp_path / "run") if "train/loss" in r]) == 2
