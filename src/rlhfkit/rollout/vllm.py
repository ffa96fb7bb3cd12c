"""vLLM as the rollout engine: sampling through a server, weight sync, log-probs.

The server (its environment, process and HTTP API) is :mod:`rlhfkit.rollout.vllm_server`.
Completions come back as token ids with the sampler's log-probability of each token
(``logprobs=0``, ``return_tokens_as_token_ids``), so the learner's importance weight against the
sampler is exact.

Weight sync never writes a checkpoint: the learner's trainable tensors go to a file in shared
memory (``/dev/shm``), and a worker method that rlhfkit adds to vLLM
(:mod:`rlhfkit.rollout.vllm_worker`, ``--worker-extension-cls``) loads them through vLLM's own
``load_weights`` (which fuses q/k/v and gate/up) when called on ``/collective_rpc``; the prefix
cache is then reset, since cached keys and values belong to the old weights.

:class:`VLLMEngine` has the interface of :class:`rlhfkit.rollout.engine.LocalEngine` (push,
apply, latest, weights_hash), so the asynchronous producer drives either.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlhfkit.rollout.engine import StagedEngine
from rlhfkit.rollout.hf import SamplingConfig
from rlhfkit.rollout.vllm_server import EngineError, VLLMServer
from rlhfkit.rollout.vllm_worker import tensors_hash
from rlhfkit.types import Rollout

ADAPTER_NAME = "policy-lora"
"""The name of the LoRA adapter rlhfkit loads into a server (requests then name it)."""


class VLLMGenerator:
    """The :class:`rlhfkit.rollout.sampler.Generator` protocol on a vLLM server.

    Args:
        server: The server.
        eos_ids: End-of-turn ids (a completion ending with one finishes as ``eos``); stop
            strings are matched by the engine.
        chunk: Prompts per request.
    """

    def __init__(self, server: VLLMServer, *, eos_ids: Sequence[int], chunk: int = 64) -> None:
        self.server, self.eos_ids, self.chunk = server, set(eos_ids), chunk
        self.model_name = server.model
        """What requests name: the served model, or a LoRA adapter loaded into it."""

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig) -> Rollout:
        """``num_samples`` completions of each prompt with their sampler log-probs."""
        g = sampling.num_samples
        if sampling.temperature <= 0 and g > 1:
            raise ValueError("greedy decoding gives identical samples: use num_samples 1 or T > 0")
        completions: list[list[int]] = []
        logprobs: list[list[float]] = []
        reasons: list[str] = []
        for start in range(0, len(prompts), self.chunk):
            part = [list(map(int, p)) for p in prompts[start : start + self.chunk]]
            answer = self.server.post("/v1/completions", self._body(part, sampling))
            choices = sorted(answer["choices"], key=lambda c: c["index"])
            for choice in choices:  # prompt i's samples are choices i*g .. i*g+g-1
                ids, lps = _tokens(choice)
                completions.append(ids)
                logprobs.append(lps)
                reasons.append(self._reason(choice, ids))
        return Rollout.grouped(prompts, g, completions, logprobs, reasons)

    def _body(self, prompts: list[list[int]], s: SamplingConfig) -> dict[str, Any]:
        """The completion request for ``prompts``.

        No per-request seed: vLLM's CPU build cannot rewind a seeded generator when a long
        prefill is split into chunks, so engine samples are not reproducible run to run (the hf
        backend's are).
        """
        greedy = s.temperature <= 0
        body: dict[str, Any] = {
            "model": self.model_name, "prompt": prompts, "n": s.num_samples,
            "max_tokens": s.max_new_tokens, "temperature": 0.0 if greedy else s.temperature,
            "top_p": s.top_p, "top_k": s.top_k or -1, "min_p": s.min_p,
            "logprobs": 0, "return_tokens_as_token_ids": True,
            "skip_special_tokens": False, "stop_token_ids": sorted(self.eos_ids),
            "include_stop_str_in_output": True,
        }  # fmt: skip
        if s.stop:
            body["stop"] = list(s.stop)
        return body

    def _reason(self, choice: dict[str, Any], ids: list[int]) -> str:
        if choice.get("finish_reason") == "length":
            return "length"
        return "eos" if ids and ids[-1] in self.eos_ids else "stop"

    def sequence_logprobs(self, sequences: Sequence[Sequence[int]]) -> list[list[float]]:
        """Engine log-probs log pi(x_t | x_<t) of every token but the first of each sequence.

        One request per sequence: vLLM's CPU build (0.32) fails the prompt log-probs of several
        sequences in one request when LoRA is enabled.
        """
        out = []
        for seq in sequences:
            body = {
                "model": self.model_name, "prompt": [list(map(int, seq))], "max_tokens": 1,
                "temperature": 0.0, "prompt_logprobs": 0,
            }  # fmt: skip
            entries = self.server.post("/v1/completions", body)["choices"][0]["prompt_logprobs"]
            out.append(  # the first token has no log-prob
                [
                    float(e[str(int(t))]["logprob"])
                    for e, t in zip(entries[1:], seq[1:], strict=True)
                ]
            )
        return out


def _shared_memory() -> Path:
    """Where synced weights are written: ``/dev/shm`` (memory, not disk) where there is one."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() else Path(tempfile.gettempdir())


def _tokens(choice: dict[str, Any]) -> tuple[list[int], list[float]]:
    """Token ids and their log-probs of one choice (``return_tokens_as_token_ids``)."""
    lp = choice.get("logprobs") or {}
    ids = [int(t.split(":", 1)[1]) for t in lp.get("tokens", [])]
    return ids, [float(v) for v in lp.get("token_logprobs", [])]


class VLLMEngine(StagedEngine):
    """A vLLM server as the rollout engine.

    A :class:`StagedEngine` whose ``apply`` sends the staged weights to the server.
    Under LoRA the adapters are merged into the pushed weights (the server holds plain
    weights); :class:`VLLMAdapterEngine` sends the adapter itself instead.

    Args:
        server: The server (started from the model's starting weights).
        model: The learner's model.
        eos_ids: End-of-turn ids.
        dtype: The engine's dtype (pushed tensors are cast to it).
        version: The learner's step the server's weights belong to.
    """

    def __init__(
        self,
        server: VLLMServer,
        model: nn.Module,
        *,
        eos_ids: Sequence[int],
        dtype: torch.dtype,
        version: int = 0,
    ) -> None:
        super().__init__(model, version)
        self.server, self.dtype = server, dtype
        self.generator = VLLMGenerator(server, eos_ids=eos_ids)

    def _snapshot(self, model: nn.Module) -> dict[str, torch.Tensor]:
        weights = _plain_weights(model, self.synced)
        return {n: t.to(self.dtype).cpu().clone() for n, t in weights.items()}

    def _load(self, snapshot: dict[str, torch.Tensor]) -> None:
        """Send the weights through shared memory; the server must load every tensor.

        Raises:
            EngineError: The server did not load them (never left half-synced silently).
        """
        from safetensors.torch import save_file

        with tempfile.TemporaryDirectory(dir=_shared_memory(), prefix="rlhfkit-sync-") as tmp:
            path = Path(tmp) / "weights.safetensors"
            save_file({n: t.contiguous() for n, t in snapshot.items()}, str(path))
            loaded = self.server.rpc("rlhfkit_load", str(path))
        if not loaded or any(int(n) != len(snapshot) for n in loaded):
            raise EngineError(f"weight sync failed: the engine loaded {loaded} of {len(snapshot)}")
        self.server.post("/reset_prefix_cache", {})

    def close(self) -> None:
        """Nothing to free here (the server is closed by its owner)."""

    def weights_hash(self) -> str:
        """Hash of the weights the engine's workers last loaded ("" before any sync).

        Computed inside the engine from the tensors it loaded, after ``reload_weights``
        succeeded (the CPU build keeps linear weights only in repacked form, so its parameters
        cannot be read back); :meth:`expected_hash` gives the learner's side.
        """
        hashes = set(self.server.rpc("rlhfkit_hash"))
        if len(hashes) != 1:
            raise EngineError(f"the engine's workers hold different weights: {hashes}")
        return hashes.pop()

    @torch.no_grad()
    def expected_hash(self, model: nn.Module) -> str:
        """What :meth:`weights_hash` gives once ``model``'s weights are synced."""
        weights = _plain_weights(model, self.synced)
        return tensors_hash({n: t.to(self.dtype) for n, t in weights.items()})


class VLLMAdapterEngine(VLLMEngine):
    """A vLLM server serving the base model plus the learner's LoRA adapter, synced as an adapter.

    Each sync writes the adapter (peft's ``adapter_model.safetensors`` and
    ``adapter_config.json``, a few MB instead of the whole model) to a new directory in shared
    memory and loads it in place of the previous one (``/v1/load_lora_adapter``); requests then
    name the adapter. The server must have been started with LoRA enabled
    (``ServerSettings.lora_rank``).

    Args:
        server: The server, started with ``lora_rank`` at least the adapter's rank.
        model: The learner's peft model (one active adapter).
        options: :class:`VLLMEngine`'s ``eos_ids``, ``dtype`` (the adapter is sent in it) and
            ``version`` (the server holds the base model alone until the first sync: equal to a
            fresh adapter, whose B is zero).
    """

    def __init__(self, server: VLLMServer, model: nn.Module, **options: Any) -> None:
        super().__init__(server, model, **options)
        self.adapter = model.active_adapter
        self.config = model.peft_config[self.adapter]
        self._loaded: Path | None = None
        self._sent: dict[str, torch.Tensor] = {}

    def _snapshot(self, model: nn.Module) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(model, adapter_name=self.adapter)
        return {n: t.detach().to(self.dtype).cpu().clone() for n, t in state.items()}

    def _load(self, snapshot: dict[str, torch.Tensor]) -> None:
        """Write the adapter to a new directory and load it in place of the previous one.

        Raises:
            EngineError: The server refused the adapter (the message says why).
        """
        from safetensors.torch import save_file

        directory = Path(tempfile.mkdtemp(dir=_shared_memory(), prefix="rlhfkit-adapter-"))
        self.config.save_pretrained(str(directory))
        tensors = {n: t.contiguous() for n, t in snapshot.items()}
        save_file(tensors, str(directory / "adapter_model.safetensors"))
        # in place of any adapter of that name (an attached server may hold an older one)
        body = {"lora_name": ADAPTER_NAME, "lora_path": str(directory), "load_inplace": True}
        try:
            self.server.post("/v1/load_lora_adapter", body)
        except EngineError:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        self.server.post("/reset_prefix_cache", {})
        if self._loaded is not None:
            shutil.rmtree(self._loaded, ignore_errors=True)
        self._loaded, self._sent = directory, tensors
        self.generator.model_name = ADAPTER_NAME

    def weights_hash(self) -> str:
        """Hash of the adapter the server last accepted ("" before any sync)."""
        return tensors_hash(self._sent) if self._sent else ""

    @torch.no_grad()
    def expected_hash(self, model: nn.Module) -> str:
        """What :meth:`weights_hash` gives once ``model``'s adapter is synced."""
        return tensors_hash(self._snapshot(model))

    def close(self) -> None:
        """Remove the last adapter's directory (the server is closed by its owner)."""
        if self._loaded is not None:
            shutil.rmtree(self._loaded, ignore_errors=True)
            self._loaded = None


def _plain_weights(model: nn.Module, names: set[str]) -> dict[str, torch.Tensor]:
    """Hugging Face names -> tensors to push.

    The trainable parameters; under LoRA instead the merged weight W + s B A of every adapted
    layer, computed out of place in fp32 (merging in place and back would round the learner's
    own base weights each time).
    """
    if getattr(model, "get_base_model", None) is None:
        return {n: p.detach() for n, p in model.named_parameters() if n in names}
    out = {}
    for name, module in model.get_base_model().named_modules():
        if not (hasattr(module, "base_layer") and hasattr(module, "lora_A")):
            continue
        adapter = module.active_adapters[0]
        a, b = module.lora_A[adapter].weight.float(), module.lora_B[adapter].weight.float()
        weight = module.base_layer.weight.detach().float()
        out[f"{name}.weight"] = weight + module.scaling[adapter] * (b @ a)
    return out
