"""Reward-model recipe on a tiny local model: golden first step, split invariance, resume,
outputs, LoRA (data handling and the rm commands: test_rm_data_and_commands.py).

Expected values come from transformers' own ``AutoModelForSequenceClassification`` forward
(right-padded batch, pooled at the last non-pad token) and losses written out by hand in plain
Python, never from rlhfkit's loss functions.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from recipe_helpers import hf_reward_model, render_reply, rm_config, save_reward_model, write_jsonl
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from rlhfkit.data.groups import group_micro_batches
from rlhfkit.models.heads import score_examples
from rlhfkit.models.load import load_model, load_tokenizer
from rlhfkit.recipes import reward_model as rm
from rlhfkit.training.accumulate import accumulate

pytestmark = pytest.mark.usefixtures("one_thread")

# Data and helpers

PAIRS = [  # bt ignores "margin", the margin loss uses it
    {"prompt": "What is 2 + 3?", "chosen": "The answer is 5.", "rejected": "5", "margin": 0.5},
    {"prompt": "Reverse the word cat.", "chosen": "tac", "rejected": "cat", "margin": 2.0},
    {"prompt": "List three colours.", "chosen": "red, green, blue", "rejected": "No.",
     "margin": 1.0, "category": "lists"},
    {"prompt": [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Translate hello to French."}],
     "chosen": "bonjour", "rejected": "The quick brown fox jumps over the lazy dog.",
     "margin": 3.0},
    {"prompt": "Write a haiku about the sea.", "chosen": "The sea is blue. 1 2 3",
     "rejected": "The sea.", "margin": 0.25},
    {"prompt": "What is 7 + 3?", "chosen": "The answer is 10.", "rejected": "The answer is 11.",
     "margin": 1.5},
]  # fmt: skip
GROUPS = [  # K = 4, 3, 3, 4 completions of one prompt
    ("What is 2 + 3?", ["The answer is 5.", "5", "The answer is 6.", "No."]),
    ("Reverse cat.", ["tac", "cat", "act"]),
    ("List three colours.", ["red, green, blue", "red", "blue, red, green, fox"]),
    ("Translate hello to French.", ["bonjour", "hello", "bonjour!", "salut"]),
]
RATINGS = [  # all_pairs; ties give no pair
    {"prompt": p, "completions": c, "ratings": r}
    for (p, c), r in zip(GROUPS, [[5, 4, 1, 1], [2, 9, 2], [3, 1, 2], [4, 0, 3, 2]], strict=True)
]
RANKINGS = [  # plackett_luce; ranking = completion indices best first
    {"prompt": p, "completions": c, "ranking": r}
    for (p, c), r in zip(GROUPS, [[1, 0, 3, 2], [0, 2, 1], [1, 2, 0], [3, 0, 2, 1]], strict=True)
]


@pytest.fixture(scope="module")
def rm_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model as a reward model whose head has larger weights than a fresh one (rewards
    of order 1, far apart), saved with its head so that every run starts from it."""
    return save_reward_model(tiny_model_dir, tmp_path_factory.mktemp("rm-model"), seed=1)


@torch.no_grad()
def hf_scores(model: torch.nn.Module, sequences: list[list[int]], pad_id: int) -> list[float]:
    """Rewards from the transformers forward on one right-padded batch (pooled by pad id)."""
    assert all(s[-1] != pad_id for s in sequences)  # else transformers pools elsewhere
    width = max(len(s) for s in sequences)
    ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in sequences])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
    return model(input_ids=ids, attention_mask=mask).logits[:, 0].tolist()


def rewards_of(model, tokenizer, prompt, completions: list[str]) -> list[float]:
    seqs = [render_reply(tokenizer, prompt, c) for c in completions]
    return hf_scores(model, seqs, tokenizer.pad_token_id)


def softplus(x: float) -> float:
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def make_cfg(model_dir, train, run_dir, **loop) -> rm.RMConfig:
    return rm_config(model_dir, train, run_dir, **{"max_steps": 4, "seed": 3, **loop})


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def by_step(run_dir: Path, key: str) -> dict[int, float]:
    return {m["step"]: m[key] for m in metrics(run_dir) if key in m}


# 1. Golden first-step loss


def expected_pairwise(model, tok, rows, use_margin: bool) -> float:
    """(1/N) sum_i softplus(r_r - r_c + m_i), m_i = 0 for bt."""
    total = 0.0
    for row in rows:
        r_c, r_r = rewards_of(model, tok, row["prompt"], [row["chosen"], row["rejected"]])
        total += softplus(r_r - r_c + (row["margin"] if use_margin else 0.0))
    return total / len(rows)


def expected_all_pairs(model, tok, rows) -> float:
    """Per prompt: the mean over its P ordered pairs with rating_i > rating_j of
    softplus(r_j - r_i) (ties make no pair); then the mean over prompts."""
    total = 0.0
    for row in rows:
        r, s = rewards_of(model, tok, row["prompt"], row["completions"]), row["ratings"]
        terms = [softplus(r[j] - r[i]) for i in range(len(r)) for j in range(len(r)) if s[i] > s[j]]
        total += sum(terms) / len(terms)
    return total / len(rows)


def expected_plackett_luce(model, tok, rows) -> float:
    """-log P(ranking) = sum_k [log sum_{j >= k} exp(r_(j)) - r_(k)] in ranked order; mean."""
    total = 0.0
    for row in rows:
        r = rewards_of(model, tok, row["prompt"], row["completions"])
        ranked = [r[i] for i in row["ranking"]]
        for k in range(len(ranked)):
            total += math.log(sum(math.exp(x) for x in ranked[k:])) - ranked[k]
    return total / len(rows)


GOLDEN = {
    "bt": ("preference", PAIRS, lambda m, t, rows: expected_pairwise(m, t, rows, False)),
    "margin": ("preference", PAIRS, lambda m, t, rows: expected_pairwise(m, t, rows, True)),
    "all_pairs": ("ratings", RATINGS, expected_all_pairs),
    "plackett_luce": ("rankings", RANKINGS, expected_plackett_luce),
}


def first_step(loss: str, model_dir: Path, tmp_path: Path) -> tuple[dict, list[dict]]:
    """Run one step whose batch is every group (a mean does not depend on the shuffle) in
    several micro-batches; returns the step-1 metrics and the rows."""
    schema, rows, _ = GOLDEN[loss]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = make_cfg(model_dir, data, tmp_path / "run", batch_size=len(rows), max_steps=1)
    cfg.loop.micro_batch_tokens = 64
    cfg.data.schema, cfg.algo.loss = schema, loss
    rm.main(cfg)
    return next(m for m in metrics(tmp_path / "run") if "train/loss" in m), rows


@pytest.mark.parametrize("loss", list(GOLDEN))
def test_first_step_loss_matches_transformers_forward(loss, rm_model_dir, tmp_path):
    logged, rows = first_step(loss, rm_model_dir, tmp_path)
    tokenizer = load_tokenizer(str(rm_model_dir))
    expected = GOLDEN[loss][2](hf_reward_model(rm_model_dir), tokenizer, rows)
    assert logged["step"] == 1
    assert logged["train/loss"] == pytest.approx(expected, abs=2e-5)


def ranked(row: dict) -> tuple[str | list[dict], list[str], list[float]]:
    """(prompt, completions, scores): higher score = better (pairs [1, 0]; rankings K-1-p)."""
    if "chosen" in row:
        return row["prompt"], [row["chosen"], row["rejected"]], [1.0, 0.0]
    if "ranking" in row:
        k = len(row["ranking"])
        return row["prompt"], [row["completions"][i] for i in row["ranking"]], list(range(k))[::-1]
    return row["prompt"], row["completions"], row["ratings"]


@pytest.mark.parametrize(
    "loss",
    list(GOLDEN),
)
def test_first_step_train_accuracy_and_margin(loss, rm_model_dir, tmp_path):
    """Over every pair (i, j) of a group with s_i > s_j: mean 1[r_i > r_j] (ties 1/2) and mean
    r_i - r_j, from transformers' rewards before the update."""
    logged, rows = first_step(loss, rm_model_dir, tmp_path)
    model, tokenizer = hf_reward_model(rm_model_dir), load_tokenizer(str(rm_model_dir))
    wins, gaps = [], []
    for row in rows:
        prompt, completions, s = ranked(row)
        r = rewards_of(model, tokenizer, prompt, completions)
        for i, j in ((i, j) for i in range(len(r)) for j in range(len(r)) if s[i] > s[j]):
            wins.append(1.0 if r[i] > r[j] else 0.5 if r[i] == r[j] else 0.0)
            gaps.append(r[i] - r[j])
    assert 0 < sum(wins) < len(wins)  # some right, some wrong
    assert logged["train/accuracy"] == pytest.approx(sum(wins) / len(wins), abs=1e-9)
    assert logged["train/margin"] == pytest.approx(sum(gaps) / len(gaps), abs=2e-5)


# 2. Micro-batch split and packing invariance of the accumulated gradient


@pytest.mark.parametrize("loss", list(GOLDEN))
def test_gradient_does_not_depend_on_micro_batches_or_packing(loss, rm_model_dir, tmp_path):
    schema, rows, _ = GOLDEN[loss]
    cfg = make_cfg(rm_model_dir, write_jsonl(tmp_path / "d.jsonl", rows), tmp_path / "run")
    cfg.data.schema, cfg.algo.loss = schema, loss
    tokenizer = load_tokenizer(str(rm_model_dir))
    groups, _ = rm.load_groups(tokenizer, cfg.data.train, "train", cfg, 0)
    model = load_model(str(rm_model_dir), dtype=torch.float64, task="score")
    step_loss = rm.make_step_loss(model, rm.LOSSES[loss])
    results = {}
    for packing in (True, False):
        for budget in (10**6, 1):  # one micro-batch / one group per micro-batch
            parts = group_micro_batches(
                groups, max_tokens=budget, packing=packing, pad_id=tokenizer.pad_token_id
            )
            assert len(parts) == (1 if budget > 1 else len(groups))
            model.zero_grad(set_to_none=True)
            stats = accumulate(parts, step_loss, count_fn=rm.group_count)
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            results[packing, budget] = stats.loss, grads
    ref_loss, ref_grads = results[True, 10**6]
    assert ref_grads["score.weight"].abs().sum() > 0
    for key, (loss_value, grads) in results.items():
        assert loss_value == pytest.approx(ref_loss, abs=1e-10), key
        for name, grad in grads.items():
            torch.testing.assert_close(grad, ref_grads[name], atol=1e-10, rtol=1e-8)


# 3. Resume


def test_resume_equals_uninterrupted(rm_model_dir, tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "train.jsonl", PAIRS + PAIRS[::-1])
    full, broken = tmp_path / "full", tmp_path / "broken"
    rm.main(make_cfg(rm_model_dir, data, full, save_every=2))

    real, calls = rm.accumulate, {"n": 0}

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # during step 3, after the step-2 checkpoint
            raise KeyboardInterrupt("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(rm, "accumulate", crashing)
    with pytest.raises(KeyboardInterrupt):
        rm.main(make_cfg(rm_model_dir, data, broken, save_every=2))
    monkeypatch.setattr(rm, "accumulate", real)
    assert (broken / "checkpoints" / "latest").read_text().strip() == "step-00000002"
    rm.main(make_cfg(rm_model_dir, data, broken, save_every=2, resume=True))

    for key in ("train/loss", "train/accuracy", "eval/accuracy", "eval/loss"):
        a, b = by_step(full, key), by_step(broken, key)
        assert sorted(a) == sorted(b) and a, key
        for step in a:
            assert b[step] == pytest.approx(a[step], abs=1e-6), (key, step)
    assert sorted(by_step(full, "train/loss")) == [1, 2, 3, 4]
    wa = load_file(str(full / "final" / "model.safetensors"))
    wb = load_file(str(broken / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-6, rtol=0)


# 4. Outputs


def test_final_model_eval_report_and_metrics(rm_model_dir, tmp_path):
    run = tmp_path / "run"
    cfg = make_cfg(rm_model_dir, "builtin:preferences", run, batch_size=8, max_steps=3)
    cfg.data.eval, cfg.data.eval_split, cfg.data.limit = "builtin:preferences", "heldout", 24
    cfg.loop.micro_batch_tokens = 1024
    rm.main(cfg)
    final = run / "final"
    tokenizer = load_tokenizer(str(final))
    held_out, _ = rm.load_groups(tokenizer, "builtin:preferences", "heldout", cfg, 1)
    seqs = [s.input_ids for g in held_out for s in g.sequences]
    # transformers' class loads the directory as it is and scores like rlhfkit.
    reference = hf_scores(hf_reward_model(final), seqs, tokenizer.pad_token_id)
    ours = load_model(str(final), dtype=torch.float64, task="score").eval()
    got = score_examples(
        ours, [s for g in held_out for s in g.sequences], packing=True,
        pad_id=tokenizer.pad_token_id, max_tokens=300,
    )[:, 0].tolist()  # fmt: skip
    assert got == pytest.approx(reference, abs=1e-9)
    base = hf_scores(hf_reward_model(rm_model_dir), seqs, tokenizer.pad_token_id)
    assert max(abs(a - b) for a, b in zip(base, reference, strict=True)) > 1e-3  # it trained

    report = json.loads((run / "eval.json").read_text())
    assert {"overall", "per_category", "per_source"} <= report.keys()
    chosen, rejected = reference[0::2], reference[1::2]  # K = 2: chosen then rejected
    wins = [1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected, strict=True)]
    assert report["overall"]["pairs"] == len(held_out) == 24
    assert report["overall"]["accuracy"] == pytest.approx(sum(wins) / len(wins), abs=1e-9)
    categories = {g.meta["category"] for g in held_out}
    assert set(report["per_category"]) == categories and len(categories) > 1
    evals = by_step(run, "eval/accuracy")
    assert sorted(evals) == [0, 3] and evals[3] == pytest.approx(report["overall"]["accuracy"])
    last = [m for m in metrics(run) if m["step"] == 3 and "eval/accuracy" in m][-1]
    assert all(f"eval/accuracy/{c}" in last for c in categories)


# 6. LoRA


def test_lora_final_is_a_merged_sequence_classifier(rm_model_dir, tmp_path, monkeypatch):
    captured = {}
    real = rm.finish_run

    def keep_context(ctx, keep_last):
        captured["ctx"] = ctx
        return real(ctx, keep_last)

    monkeypatch.setattr(rm, "finish_run", keep_context)
    data = write_jsonl(tmp_path / "train.jsonl", PAIRS)
    cfg = make_cfg(rm_model_dir, data, tmp_path / "run", max_steps=3)
    cfg.model.lora, cfg.model.lora_r = True, 4
    cfg.model.lora_target_modules = ["q_proj", "v_proj"]
    rm.main(cfg)
    final = tmp_path / "run" / "final"
    merged = AutoModelForSequenceClassification.from_pretrained(final)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    weights, base = (
        load_file(str(final / "model.safetensors")),
        load_file(str(rm_model_dir / "model.safetensors")),
    )
    assert torch.equal(weights["model.layers.0.mlp.up_proj.weight"],
                       base["model.layers.0.mlp.up_proj.weight"])  # fmt: skip
    for name in ("model.layers.0.self_attn.q_proj.weight", "score.weight"):  # adapter, head
        assert not torch.equal(weights[name], base[name]), name

    tokenizer = load_tokenizer(str(final))
    groups, _ = rm.load_groups(tokenizer, str(data), "train", cfg, 1)
    seqs = [s for g in groups for s in g.sequences]
    ctx = captured["ctx"]
    pad_id = tokenizer.pad_token_id
    in_memory = score_examples(ctx.model.eval(), seqs, packing=True, pad_id=pad_id)[:, 0].tolist()
    reference = hf_scores(hf_reward_model(final), [s.input_ids for s in seqs], pad_id)
    assert in_memory == pytest.approx(reference, abs=1e-4)
