"""WARM weight averaging and the unbiased best-of-n estimator (over-optimisation mitigations)."""

from __future__ import annotations

import itertools
import math
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForSequenceClassification

from rlhfkit.eval.overopt import bon_unbiased
from rlhfkit.models.merge import average_model_dirs, average_state_dicts
from rlhfkit.models.tiny import tiny_tokenizer
from rlhfkit.recipes import warm
from rlhfkit.rewards.model import RewardModelScorer


def _brute_force(proxy: list[float], gold: list[float], n: int) -> tuple[float, float]:
    picks = []
    for subset in itertools.combinations(range(len(proxy)), n):
        best = max(subset, key=lambda i: (proxy[i], -i))  # argmax, ties to the lowest index
        picks.append((proxy[best], gold[best]))
    return (sum(p for p, _ in picks) / len(picks), sum(g for _, g in picks) / len(picks))


def test_unbiased_bon_equals_enumeration() -> None:
    rng = random.Random(0)
    for _ in range(30):
        size = rng.randint(1, 8)
        proxy = [float(rng.randint(0, 3)) for _ in range(size)]  # ties on purpose
        gold = [rng.uniform(-1, 1) for _ in range(size)]
        for n in range(1, size + 1):
            got = bon_unbiased(proxy, gold, n)
            assert got == pytest.approx(_brute_force(proxy, gold, n), abs=1e-12)
    assert bon_unbiased([1.0, 2.0, 3.0], [0.0, 0.0, 1.0], 1) == pytest.approx((2.0, 1 / 3))
    assert bon_unbiased([1.0, 2.0, 3.0], [0.0, 0.0, 1.0], 3) == (3.0, 1.0)
    for bad in (([1.0], [1.0, 2.0], 1), ([1.0], [1.0], 2), ([math.nan], [1.0], 1)):
        with pytest.raises(ValueError):
            bon_unbiased(*bad)


def test_average_state_dicts_is_the_elementwise_mean() -> None:
    half = torch.bfloat16
    members = [{"w": torch.tensor([1.0, 2.0]), "h": torch.tensor([[0.0]], dtype=half)},
               {"w": torch.tensor([3.0, 6.0]), "h": torch.tensor([[1.0]], dtype=half)}]  # fmt: skip
    out = average_state_dicts(members)
    assert torch.equal(out["w"], torch.tensor([2.0, 4.0])) and out["h"].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="other weights"):
        average_state_dicts([{"w": torch.zeros(1)}, {"v": torch.zeros(1)}])
    with pytest.raises(ValueError, match="shape"):
        average_state_dicts([{"w": torch.zeros(1)}, {"w": torch.zeros(2)}])


def _reward_model(path: Path, seed: int, layers: int = 2) -> Path:
    tokenizer = tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         num_labels=1, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    torch.manual_seed(seed)
    LlamaForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_warm_writes_the_mean_and_loads_as_a_reward_model(tmp_path: Path) -> None:
    members = [_reward_model(tmp_path / f"rm{k}", seed=k) for k in range(3)]
    out = warm.main(warm.WarmConfig(members=tuple(map(str, members)),
                                    output=str(tmp_path / "warm")))  # fmt: skip
    states = [load_file(m / "model.safetensors") for m in members]
    averaged = load_file(out / "model.safetensors")
    assert set(averaged) == set(states[0])
    for name, tensor in averaged.items():
        mean = sum(s[name].float() for s in states) / 3
        assert torch.allclose(tensor.float(), mean, atol=1e-6), name
    scorer = RewardModelScorer(str(out), precision="fp32")
    scores = scorer.score_batch(["a reply"], [{"prompt": "a question"}])
    assert isinstance(scores[0], float) and math.isfinite(scores[0])
    other = _reward_model(tmp_path / "deeper", seed=0, layers=3)
    with pytest.raises(ValueError, match="architecture"):
        average_model_dirs([members[0], other], tmp_path / "bad")
    assert warm.WarmConfig(members=(str(members[0]),)).problems()


def test_reward_model_ensemble_combines_its_members(tmp_path: Path) -> None:
    from rlhfkit.rewards.base import load_reward_fn, reward_models, reward_spec_problem

    members = [_reward_model(tmp_path / f"rm{k}", seed=k) for k in range(3)]
    singles = [RewardModelScorer(str(m), precision="fp32") for m in members]
    replies, fields = ["one reply", "another, longer reply"], [{"prompt": "q"}, {"prompt": "q"}]
    grid = torch.tensor([s.score_batch(replies, fields) for s in singles], dtype=torch.float64)
    dirs = ",".join(map(str, members))
    expected = {
        "mean": grid.mean(0), "min": grid.min(0).values,
        "uwo": grid.mean(0) - grid.std(0, correction=0),
        "uwo=0.5": grid.mean(0) - 0.5 * grid.std(0, correction=0),
    }  # fmt: skip
    for mode, want in expected.items():
        fn = load_reward_fn(f"rm-ensemble:{mode}:{dirs}", precision="fp32")
        got = torch.tensor(fn.score_batch(replies, fields), dtype=torch.float64)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert len(reward_models([fn])) == 3
    assert reward_spec_problem(f"rm-ensemble:mean:{dirs}") is None
    missing = f"{members[0]},{tmp_path}/nope"
    for bad in (f"rm-ensemble:max:{dirs}", f"rm-ensemble:mean:{members[0]}",
                f"rm-ensemble:min=2:{dirs}", f"rm-ensemble:mean:{missing}"):  # fmt: skip
        assert reward_spec_problem(bad), bad
