"""Token-level reward models (ORM, PRM) through the rm recipe, on the tiny model.

Golden values are computed independently: transformers' own forward of the saved
sequence-classification model gives per-token head outputs (``score`` applied to every hidden
state); BCE / cross-entropy are then written out by hand at the positions the spec names
(every completion token for the ORM, the last token of each step for the PRM).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from rlhfkit.config import from_dict
from rlhfkit.models.load import load_model, load_tokenizer
from rlhfkit.recipes.reward_model import RMConfig, main, make_task
from rlhfkit.training.accumulate import accumulate


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def orm_file(tmp_path_factory) -> Path:
    rows = []
    for i in range(12):
        ok = i % 2 == 0
        answer = 10 + i if ok else 11 + i
        rows.append({"prompt": f"What is {i} + 10?", "completion": f"It is {answer}.", "label": ok})
    return _write(tmp_path_factory.mktemp("orm") / "orm.jsonl", rows)


@pytest.fixture(scope="module")
def prm_file(tmp_path_factory) -> Path:
    rows = []
    for i in range(12):
        labels = [1, -1 if i % 3 == 0 else 1, 0 if i % 2 else 1]
        steps = [f"Take {i}.", f"Add {i + 1} to it.", f"So {2 * i + 1}."]
        rows.append({"prompt": f"Add {i} and {i + 1}.", "steps": steps, "labels": labels})
    return _write(tmp_path_factory.mktemp("prm") / "prm.jsonl", rows)


def _cfg(model_dir: Path, data: Path, loss: str, schema: str, run_dir: Path, **algo) -> RMConfig:
    return from_dict(
        RMConfig,
        {
            "model": {"name": str(model_dir), "precision": "fp32", "attn_implementation": "sdpa"},
            "data": {"train": str(data), "eval": str(data), "schema": schema},
            "algo": {"loss": loss, **algo},
            "loop": {"batch_size": 4, "max_steps": 2},
            "log": {"run_dir": str(run_dir), "progress": False, "tensorboard": False},
        },
    )


def _token_logits(model_dir: Path, num_labels: int, ids: list[int]) -> torch.Tensor:
    """transformers' forward, head applied to every position: (L, C)."""
    torch.manual_seed(0)
    model = load_model(str(model_dir), task="score", num_labels=num_labels).eval()
    with torch.no_grad():
        hidden = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0]
        return model.score(hidden)


def _step_loss(cfg: RMConfig, items: list, model) -> float:
    task = make_task(cfg)
    batches = task.micro_batches(items, max_tokens=64, packing=True, pad_id=0)
    with torch.no_grad():
        return accumulate(batches, task.step_loss(model), count_fn=task.count, backward=False).loss


@pytest.mark.parametrize("loss", ["orm", "orm_sequence"])
def test_orm_first_step_loss_matches_hand_bce(tiny_model_dir, orm_file, tmp_path, loss):
    """orm: mean over sequences of the mean over completion tokens of BCE(sigma(z_t), y);
    orm_sequence: mean over sequences of BCE(sigma(mean_t z_t), y)."""
    cfg = _cfg(tiny_model_dir, orm_file, loss, "unpaired_preference", tmp_path)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    task = make_task(cfg)
    items, counts = task.load(tokenizer, str(orm_file), "train", 0)
    assert counts == {"rows": 12, "kept": 12, "positive": 6}
    torch.manual_seed(0)
    model = load_model(str(tiny_model_dir), task="score").eval()
    got = _step_loss(cfg, items, model)
    expected = 0.0
    for item in items:
        z = _token_logits(tiny_model_dir, 1, item.sequence.input_ids)[:, 0]
        zs = z[torch.tensor(item.sequence.loss_mask)].double()  # completion tokens only
        y = item.label
        if loss == "orm":
            p = torch.sigmoid(zs)
            expected += float(-(y * p.log() + (1 - y) * (1 - p).log()).mean())
        else:
            p = torch.sigmoid(zs.mean())
            expected += float(-(y * p.log() + (1 - y) * (1 - p).log()))
    assert got == pytest.approx(expected / len(items), abs=1e-5)


@pytest.mark.parametrize("mode", ["3class", "binary"])
def test_prm_first_step_loss_at_step_ends(tiny_model_dir, prm_file, tmp_path, mode):
    """3class: mean over steps of -log softmax(z)[label + 1]; binary with neutral 'drop':
    mean over the non-neutral steps of BCE(sigma(z), 1[label = +1])."""
    cfg = _cfg(tiny_model_dir, prm_file, "prm", "process", tmp_path, prm_mode=mode)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    task = make_task(cfg)
    items, counts = task.load(tokenizer, str(prm_file), "train", 0)
    assert counts["steps"] == 36 and task.num_labels == (3 if mode == "3class" else 1)
    torch.manual_seed(0)
    model = load_model(str(tiny_model_dir), task="score", num_labels=task.num_labels).eval()
    got = _step_loss(cfg, items, model)
    terms = []
    for item in items:
        z = _token_logits(tiny_model_dir, task.num_labels, item.input_ids).double()
        for pos, label in zip(item.step_positions, item.step_labels, strict=True):
            if mode == "3class":
                terms.append(float(-torch.log_softmax(z[pos], -1)[label + 1]))
            elif label != 0:
                p = torch.sigmoid(z[pos, 0])
                terms.append(float(-(p.log() if label > 0 else (1 - p).log())))
    assert got == pytest.approx(sum(terms) / len(terms), abs=1e-5)


def test_prm_labels_sit_on_step_end_tokens(tiny_model_dir, prm_file, tmp_path):
    cfg = _cfg(tiny_model_dir, prm_file, "prm", "process", tmp_path)
    task = make_task(cfg)
    items, _ = task.load(load_tokenizer(str(tiny_model_dir)), str(prm_file), "train", 0)
    for packing in (True, False):
        (batch,) = task.micro_batches(items[:3], max_tokens=4096, packing=packing, pad_id=0)
        assert int((batch["labels"] != -100).sum()) == sum(it.num_steps for it in items[:3])
        assert batch["step_labels"].tolist() == [y for it in items[:3] for y in it.step_labels]


@pytest.mark.parametrize(
    ("loss", "schema", "fixture"),
    [("orm", "unpaired_preference", "orm_file"), ("prm", "process", "prm_file")],
)
def test_token_rm_trains_and_saves(tiny_model_dir, tmp_path, loss, schema, fixture, request):
    data = request.getfixturevalue(fixture)
    run = main(_cfg(tiny_model_dir, data, loss, schema, tmp_path / loss))
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "train/loss" in m] == [1, 2]
    assert all(math.isfinite(m["train/loss"]) for m in lines if "train/loss" in m)
    report = json.loads((run / "eval.json").read_text())
    key = "accuracy" if loss == "orm" else "step_accuracy"
    assert 0.0 <= report[key] <= 1.0
    from transformers import AutoModelForSequenceClassification

    saved = AutoModelForSequenceClassification.from_pretrained(run / "final")
    assert saved.config.num_labels == (1 if loss == "orm" else 3)


def test_token_loss_needs_its_schema(tiny_model_dir, orm_file, tmp_path):
    cfg = _cfg(tiny_model_dir, orm_file, "orm", "preference", tmp_path)
    with pytest.raises(ValueError, match="unpaired_preference"):
        make_task(cfg).load(load_tokenizer(str(tiny_model_dir)), str(orm_file), "train", 0)


def test_padded_and_packed_orm_losses_agree(tiny_model_dir, orm_file, tmp_path):
    cfg = _cfg(tiny_model_dir, orm_file, "orm", "unpaired_preference", tmp_path)
    task = make_task(cfg)
    items, _ = task.load(load_tokenizer(str(tiny_model_dir)), str(orm_file), "train", 0)
    torch.manual_seed(0)
    model = load_model(str(tiny_model_dir), task="score", attn_implementation="sdpa").eval()
    fn = task.step_loss(model)
    with torch.no_grad():
        losses = [
            accumulate(
                task.micro_batches(items, max_tokens=budget, packing=packing, pad_id=0),
                fn,
                count_fn=task.count,
                backward=False,
            ).loss
            for packing, budget in ((True, 4096), (False, 4096), (True, 40))
        ]
    assert losses[1] == pytest.approx(losses[0], abs=1e-5)
    assert losses[2] == pytest.approx(losses[0], abs=1e-5)
