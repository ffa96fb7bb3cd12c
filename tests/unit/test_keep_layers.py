"""A student cut from a teacher (``--model.keep-layers``): the kept layers, renumbered, make a
normal Hugging Face model of the new depth."""

from __future__ import annotations

import pytest
import torch

from rlhfkit.models.load import load_model
from rlhfkit.models.tiny import save_tiny_model, tiny_tokenizer
from rlhfkit.rollout.hf import SamplingConfig
from rlhfkit.rollout.sampler import chat_generator


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-4")
    return save_tiny_model(path, seed=3, num_hidden_layers=4)


def test_kept_layers_compute_what_those_layers_compute(four_layers, tmp_path):
    full = load_model(str(four_layers)).eval()
    cut = load_model(str(four_layers), keep_layers=[0, 2]).eval()
    assert cut.config.num_hidden_layers == 2 and len(cut.model.layers) == 2
    ids = torch.tensor([[5, 9, 17, 33, 2, 41]])
    with torch.no_grad():  # the same computation by hand: embed, layers 0 and 2, norm, head
        hidden = full.model.embed_tokens(ids)
        positions = torch.arange(ids.shape[1])[None]
        rotary = full.model.rotary_emb(hidden, positions)
        for i in (0, 2):
            hidden = full.model.layers[i](hidden, position_embeddings=rotary,
                                          position_ids=positions)  # fmt: skip
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        expected = full.lm_head(full.model.norm(hidden))
        torch.testing.assert_close(cut(ids).logits, expected, atol=1e-5, rtol=1e-5)
    cut.save_pretrained(tmp_path / "cut")
    tiny_tokenizer().save_pretrained(tmp_path / "cut")
    again = load_model(str(tmp_path / "cut")).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, cut(ids).logits)


def test_a_cut_model_samples_with_its_kv_cache(four_layers):
    """Layers renumbered for the cache: greedy sampling equals the argmax of full forwards."""
    cut = load_model(str(four_layers), keep_layers=[3, 1]).eval()
    tokenizer = tiny_tokenizer()
    prompt = [5, 9, 17, 33]
    out = (
        chat_generator(cut, tokenizer)
        .generate([prompt], SamplingConfig(max_new_tokens=6, temperature=0.0))
        .completion_ids[0]
    )
    ids = list(prompt)
    with torch.no_grad():
        for token in out:
            assert int(cut(torch.tensor([ids])).logits[0, -1].argmax()) == token
            ids.append(token)


def test_bad_indices_are_refused(four_layers):
    from rlhfkit.config import ModelConfig
    from rlhfkit.errors import ConfigError

    with pytest.raises(
        ConfigError, match=r"--model.keep-layers 4: need distinct layer indices in 0\.\.3"
    ):
        load_model(str(four_layers), keep_layers=[4])
    with pytest.raises(ConfigError, match=r"--model.keep-layers 1 1"):
        load_model(str(four_layers), keep_layers=[1, 1])
    problems = ModelConfig(name=str(four_layers), keep_layers=[0, 2, 0]).problems()
    assert problems == [("keep_layers", "need distinct layer indices >= 0, got [0, 2, 0]")]
