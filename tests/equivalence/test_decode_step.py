"""The fused decode step against the model's own forward, and the sampler on both paths.

- :class:`DecodeStep` gives the logits the model's forward gives at every decode step (left
  padding, grouped-query heads, q/k/v biases, a softmax scale that is not a power of two), and
  writes the same keys and values into the cache.
- ``HFGenerator`` samples the same completions with the same log-probabilities on both paths,
  through finished rows leaving the batch; the fused path is really taken.
- Models it does not reproduce exactly are left to their forward: hooks, LoRA, another
  activation, biases it does not compute, a sliding window.
"""

from __future__ import annotations

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from rlhfkit.models.decode import DecodeStep, Linear, decode_step
from rlhfkit.models.tiny import tiny_model
from rlhfkit.rollout.hf import SamplingConfig
from rlhfkit.rollout.kv_cache import PreallocatedCache
from rlhfkit.rollout.sampler import HFGenerator

PROMPTS = [[5, 17, 33, 8], [40, 2], [9, 9, 12, 60, 71, 3, 44]]

PACKABLE = torch.backends.mkldnn.is_available() and bool(
    getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)()
)
"""Whether this CPU and build run bf16 products on prepacked oneDNN weights."""


def _qwen2(**overrides: object) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=False, **overrides,
    )  # fmt: skip
    torch.manual_seed(3)
    return Qwen2ForCausalLM(config).eval()


MODELS = {
    "llama": lambda: tiny_model(seed=1).eval(),
    "llama-bf16": lambda: tiny_model(seed=2, dtype=torch.bfloat16).eval(),
    # head_dim 24: the softmax scale 24^-0.5 is not a power of two
    "llama-head24": lambda: tiny_model(seed=4, hidden_size=96, num_attention_heads=4).eval(),
    "llama-head24-bf16": lambda: tiny_model(
        seed=4, hidden_size=96, num_attention_heads=4, dtype=torch.bfloat16
    ).eval(),
    "qwen2-bias": _qwen2,
}


def _prefill(model: torch.nn.Module, capacity: int) -> tuple[PreallocatedCache, torch.Tensor]:
    width = max(map(len, PROMPTS))
    ids = torch.zeros(len(PROMPTS), width, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for row, prompt in enumerate(PROMPTS):  # left padding, as the sampler pads
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        attention[row, width - len(prompt) :] = 1
    cache = PreallocatedCache(capacity)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    model(input_ids=ids, attention_mask=attention, position_ids=positions, cache=cache)
    return cache, attention


@pytest.mark.parametrize("name", sorted(MODELS))
@torch.no_grad()
def test_decode_steps_equal_the_model_forward(name):
    model = MODELS[name]()
    step = decode_step(model)
    assert isinstance(step, DecodeStep)
    steps, width = 5, max(map(len, PROMPTS))
    ours, attention = _prefill(model, width + steps)
    theirs, _ = _prefill(model, width + steps)
    mask = torch.zeros(len(PROMPTS), width + steps, dtype=torch.bool)
    mask[:, :width] = attention.bool()
    positions = attention.sum(-1)
    gen = torch.Generator().manual_seed(0)
    tol = {"atol": 2e-2, "rtol": 2e-2} if model.dtype == torch.bfloat16 else {}
    for _ in range(steps):
        tokens = torch.randint(1, 90, (len(PROMPTS),), generator=gen)
        attention = torch.cat([attention, attention.new_ones(len(PROMPTS), 1)], dim=1)
        want = model(
            input_ids=tokens[:, None], attention_mask=attention, position_ids=positions[:, None],
            cache=theirs,
        ).logits[:, -1]  # fmt: skip
        length = ours.get_seq_length()
        mask[:, length] = True
        keys, values = ours.buffers()
        got = step(tokens, positions, mask, keys, values, length)
        ours.advance(1)
        torch.testing.assert_close(got, want, **tol)
        for a, b in zip(ours.layers, theirs.layers, strict=True):
            torch.testing.assert_close(a.keys, b.keys, **tol)
            torch.testing.assert_close(a.values, b.values, **tol)
        positions = positions + 1


def test_sampler_paths_give_the_same_rollout(monkeypatch):
    """Temperature 1, three samples per prompt, a stop id that ends rows early (so finished rows
    are fed padding, then leave the batch and the cache): same ids, same log-probs."""
    model = tiny_model(seed=5).eval()
    calls = []
    original = DecodeStep.__call__

    def spy(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DecodeStep, "__call__", spy)
    selections = []
    select = PreallocatedCache.batch_select_indices
    monkeypatch.setattr(
        PreallocatedCache, "batch_select_indices",
        lambda self, rows: selections.append(len(rows)) or select(self, rows),
    )  # fmt: skip
    sampling = SamplingConfig(max_new_tokens=12, temperature=1.0, num_samples=3, seed=7)
    stops = list(range(10, 384, 24))  # one id in 24 ends a row
    rollouts = {}
    for mode in ("model", "auto"):
        generator = HFGenerator(model, pad_id=0, eos_ids=[1], stop_ids=stops, decode=mode)
        rollouts[mode] = generator.generate(PROMPTS, sampling)
        assert bool(calls) == (mode == "auto")
        assert selections  # finished rows left the batch and the cache
        selections.clear()
    fused, plain = rollouts["auto"], rollouts["model"]
    assert fused.completion_ids == plain.completion_ids
    assert fused.finish_reasons == plain.finish_reasons
    assert "stop" in fused.finish_reasons and "length" in fused.finish_reasons
    for a, b in zip(fused.logprobs, plain.logprobs, strict=True):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["model", "auto"])
def test_sampling_leaves_the_global_random_stream_alone(mode):
    """Training after a rollout draws the same numbers whichever path sampled it (the checks'
    probes and the sampler use generators of their own)."""
    model = tiny_model(seed=6).eval()
    torch.manual_seed(11)
    want = torch.rand(3)
    torch.manual_seed(11)
    sampling = SamplingConfig(max_new_tokens=3, temperature=1.0, num_samples=2)
    HFGenerator(model, pad_id=0, eos_ids=[1], decode=mode).generate(PROMPTS, sampling)
    assert torch.equal(torch.rand(3), want)


def test_unknown_decode_mode_is_refused():
    with pytest.raises(ValueError, match="decode"):
        HFGenerator(tiny_model(), pad_id=0, eos_ids=[1], decode="fast")


def _mistral_sliding() -> MistralForCausalLM:
    config = MistralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, sliding_window=4,
    )  # fmt: skip
    return MistralForCausalLM(config)


def _mistral_sliding_listed_as_full() -> MistralForCausalLM:
    """A config carrying ``layer_types`` that Mistral's layers ignore (they apply the window)."""
    model = _mistral_sliding()
    model.config.layer_types = ["full_attention"] * model.config.num_hidden_layers
    return model


def _hooked() -> torch.nn.Module:
    model = tiny_model()
    model.model.layers[0].register_forward_hook(lambda *_: None)
    return model


def _lora() -> torch.nn.Module:
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    return peft.get_peft_model(tiny_model(), config).base_model.model


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(_hooked, id="forward-hook"),
        pytest.param(_lora, id="lora"),
        pytest.param(lambda: tiny_model(hidden_act="gelu"), id="gelu"),
        pytest.param(lambda: tiny_model(attention_bias=True), id="output-bias"),
        pytest.param(lambda: tiny_model(mlp_bias=True), id="mlp-bias"),
        pytest.param(_mistral_sliding, id="sliding-window"),
        pytest.param(_mistral_sliding_listed_as_full, id="sliding-window-layer-types"),
    ],
)
def test_models_it_does_not_reproduce_keep_their_forward(build):
    assert decode_step(build()) is None


@pytest.mark.parametrize("rows", [1, 7, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_on_prepacked_weights_equals_f_linear(rows, bias):
    """bf16 weights are prepacked for oneDNN (where the build has it) and give F.linear's
    result at any number of rows; fp32 weights keep F.linear."""
    gen = torch.Generator().manual_seed(rows)
    weight = torch.randn(40, 24, generator=gen).to(torch.bfloat16)
    b = torch.randn(40, generator=gen).to(torch.bfloat16) if bias else None
    x = torch.randn(rows, 24, generator=gen).to(torch.bfloat16)
    linear = Linear(weight, b, rows=16)
    assert (linear.packed is not None) == PACKABLE
    torch.testing.assert_close(linear(x), torch.nn.functional.linear(x, weight, b))
    assert Linear(weight.float(), rows=16).packed is None


def test_bf16_decode_step_runs_on_prepacked_weights():
    step = decode_step(tiny_model(dtype=torch.bfloat16).eval(), rows=3)
    names = ("qkv", "out", "gate_up", "down")
    linears = [step.head] + [getattr(w, n) for w in step.layers for n in names]
    assert all((m.packed is not None) == PACKABLE for m in linears)
