"""The vLLM backend's plumbing without an engine: server settings from the config, the request
a sampling config becomes, the Rollout an answer becomes, and the sample cache keyed by engine.

The engine itself is tested in tests/slow/test_vllm.py (where it is installed).
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from rlhfkit.config import EngineConfig, ModelConfig
from rlhfkit.eval import run as eval_run
from rlhfkit.inference import evaluate
from rlhfkit.models.load import resolve_model_path
from rlhfkit.rollout import vllm, vllm_server
from rlhfkit.rollout.hf import SamplingConfig
from rlhfkit.types import Rollout


class RecordedServer:
    """Stands for :class:`VLLMServer`: records its settings and answers canned completions."""

    made: ClassVar[list[RecordedServer]] = []

    def __init__(self, settings, *, url=None, log_dir=None):
        self.settings, self.url, self.log_dir = settings, url, log_dir
        self.model, self.closed, self.bodies = "policy", False, []
        RecordedServer.made.append(self)

    def post(self, path, body, timeout=600):
        self.bodies.append(body)
        choices = []
        for i, prompt in enumerate(body["prompt"]):
            for j in range(body["n"]):
                ids = [prompt[-1] + j + 1, 7] if j % 2 == 0 else [prompt[-1] + j + 1]
                choices.append({
                    "index": i * body["n"] + j,
                    "finish_reason": "stop" if j % 2 == 0 else "length",
                    "logprobs": {"tokens": [f"token_id:{t}" for t in ids],
                                 "token_logprobs": [-0.5] * len(ids)},
                })  # fmt: skip
        return {"choices": choices[::-1]}  # out of order: the generator sorts by index

    def close(self):
        self.closed = True


@pytest.fixture
def recorded(monkeypatch):
    RecordedServer.made = []
    monkeypatch.setattr(vllm_server, "VLLMServer", RecordedServer)
    # no engine environment is needed to record: these tests also run where it cannot be built
    monkeypatch.setattr(vllm_server, "engine_python", lambda python: Path(sys.executable))
    return RecordedServer.made


def test_server_settings_come_from_the_engine_section(recorded, tiny_model_dir):
    engine = EngineConfig(backend="vllm", vllm_memory=0.25, vllm_max_model_len=512)
    with vllm_server.vllm_server(engine, str(tiny_model_dir), torch.bfloat16, seed=3) as server:
        assert not server.closed
    s = server.settings
    assert (s.model, s.dtype, s.memory_fraction, s.max_model_len, s.seed) == (
        resolve_model_path(str(tiny_model_dir)),
        "bfloat16",
        0.25,
        512,
        3,
    )
    assert server.closed and server.url is None


def test_generator_request_and_rollout(recorded, tiny_model_dir):
    server = RecordedServer(None)
    generator = vllm.VLLMGenerator(server, eos_ids=[7], chunk=2)
    sampling = SamplingConfig(max_new_tokens=5, temperature=0.7, top_p=0.9, top_k=4,
                              num_samples=2, stop=("\n\n",))  # fmt: skip
    rollout = generator.generate([[1, 2], [3], [4, 5, 6]], sampling)
    assert [len(b["prompt"]) for b in server.bodies] == [2, 1]  # chunks of 2 prompts
    body = server.bodies[0]
    assert body["n"] == 2 and body["max_tokens"] == 5 and body["temperature"] == 0.7
    assert body["top_p"] == 0.9 and body["top_k"] == 4 and body["stop"] == ["\n\n"]
    assert body["logprobs"] == 0 and body["return_tokens_as_token_ids"]
    assert body["stop_token_ids"] == [7]
    assert isinstance(rollout, Rollout)
    assert rollout.prompt_index == [0, 0, 1, 1, 2, 2]
    assert rollout.completion_ids == [[3, 7], [4], [4, 7], [5], [7, 7], [8]]
    # a completion ending with the end-of-turn id is "eos", one cut at the limit "length"
    assert rollout.finish_reasons == ["eos", "length"] * 3
    assert rollout.logprobs == [[-0.5] * len(c) for c in rollout.completion_ids]


def test_open_sampler_on_vllm_loads_no_model(recorded, tiny_model_dir, monkeypatch):
    from rlhfkit.models.load import load_tokenizer

    def no_model(*args, **kwargs):
        raise AssertionError("the vllm backend must not load the model here")

    monkeypatch.setattr(eval_run, "load_sampler", no_model)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    cfg = ModelConfig(name=str(tiny_model_dir), precision="fp32")
    with eval_run.open_sampler(cfg, tokenizer, EngineConfig(backend="vllm"), seed=5) as gen:
        assert isinstance(gen, vllm.VLLMGenerator)
        assert gen.eos_ids == {tokenizer.eos_token_id}
    assert recorded[0].settings.dtype == "float32" and recorded[0].settings.seed == 5
    assert recorded[0].closed


def test_samples_are_cached_per_engine(tiny_model_dir, tmp_path, monkeypatch):
    """The hf and the vllm backend's samples are cached apart; each is reused by its own."""
    opened = []

    @contextlib.contextmanager
    def fake_sampler(cfg, tokenizer, engine=None, *, seed=0, log_dir=None):
        opened.append("hf" if engine is None else engine.backend)
        yield FixedGenerator()

    class FixedGenerator:
        def generate(self, prompts, sampling):
            n = len(prompts) * sampling.num_samples
            return Rollout(
                prompt_index=list(range(n)), prompt_ids=[list(p) for p in prompts],
                completion_ids=[[5, 6]] * n, logprobs=[[0.0, 0.0]] * n,
                finish_reasons=["length"] * n, entropies=[],
            )  # fmt: skip

    monkeypatch.setattr(evaluate, "open_sampler", fake_sampler)
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {i}", "answer": "a"}) + "\n"
                            for i in range(3)))  # fmt: skip
    source = evaluate.EvalDataConfig(source=str(data), split="train")
    model = ModelConfig(name=str(tiny_model_dir), precision="fp32")
    sampling = SamplingConfig(max_new_tokens=2, temperature=0.0)

    def run(engine):
        return evaluate.evaluate_prompts(
            model, None, source, sampling, ("rlhfkit.rewards.answers:exact_answer",),
            cache_dir=str(tmp_path / "cache"), engine=engine,
        )[1]  # fmt: skip

    run(EngineConfig())
    run(EngineConfig(backend="vllm"))
    run(EngineConfig(backend="vllm"))
    run(None)  # None is the hf backend
    assert opened == ["hf", "vllm"]


def test_adapter_engine_sends_peft_files_and_names_the_adapter(tiny_model_dir):
    """A LoRA sync writes peft's adapter files (only the adapter's tensors, in the engine's
    dtype), loads them in place under one name, resets the prefix cache, and requests then
    name the adapter."""
    from safetensors.torch import load_file

    from rlhfkit.models.load import LoraSpec, apply_lora, load_model

    seen = []

    class AdapterServer(RecordedServer):
        def post(self, path, body, timeout=600):
            if path == "/v1/load_lora_adapter":
                directory = body["lora_path"]
                config = json.loads((Path(directory) / "adapter_config.json").read_text())
                tensors = load_file(str(Path(directory) / "adapter_model.safetensors"))
                seen.append((body, config, tensors))
            self.bodies.append((path, body))
            return {}

    model = apply_lora(load_model(str(tiny_model_dir), dtype=torch.float32), LoraSpec(r=4))
    server = AdapterServer(None)
    engine = vllm.VLLMAdapterEngine(server, model, eos_ids=[2], dtype=torch.bfloat16)
    assert engine.generator.model_name == "policy"  # the base model until the first sync
    engine.push(model, version=3)
    assert engine.apply() == 3
    body, config, tensors = seen[0]
    assert body["lora_name"] == vllm.ADAPTER_NAME and body["load_inplace"]
    assert config["r"] == 4 and config["peft_type"] == "LORA"
    lora = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(tensors) == len(lora) and all(".lora_" in n for n in tensors)
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert [p for p, _ in server.bodies] == ["/v1/load_lora_adapter", "/reset_prefix_cache"]
    assert engine.generator.model_name == vllm.ADAPTER_NAME
    assert engine.weights_hash() == engine.expected_hash(model)
    engine.close()
    assert not Path(body["lora_path"]).exists()
