"""Weight averaging of fine-tuned models: WARM.

Ramé et al. 2024, "WARM: On the Benefits of Weight Averaged Reward Models".

Reward models fine-tuned from one initialisation (different seeds, data orders or
hyper-parameters) stay linearly connected, so the element-wise mean of their weights is itself
a reward model, often more robust to distribution shift and reward hacking than any member
and as cheap to run as one.

- :func:`average_state_dicts`: the element-wise mean, key by key (accumulated in fp32, cast
  back to each tensor's dtype).
- :func:`average_model_dirs`: the same on saved Hugging Face directories: every ``*.safetensors``
  file of the members is averaged into the same file layout, and every other file (config,
  tokenizer) is copied from the first member; the result loads like any member.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def average_state_dicts(members: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Theta = (1/K) sum_k theta_k, key by key.

    Args:
        members: K >= 1 state dicts with the same keys and shapes.

    Raises:
        ValueError: No member, or members whose keys or shapes differ (naming the first).
    """
    if not members:
        raise ValueError("need at least one model to average")
    first = members[0]
    out = {}
    for k, member in enumerate(members[1:], 1):
        if set(member) != set(first):
            missing = sorted(set(first) ^ set(member))[:3]
            raise ValueError(f"member {k} has other weights than member 0 (e.g. {missing})")
    for name, tensor in first.items():
        total = torch.zeros(tensor.shape, dtype=torch.float32)
        for k, member in enumerate(members):
            if member[name].shape != tensor.shape:
                raise ValueError(f"member {k}: {name} has shape {tuple(member[name].shape)}, "
                                 f"member 0 {tuple(tensor.shape)}")  # fmt: skip
            total += member[name].float()
        out[name] = (total / len(members)).to(tensor.dtype)
    return out


def _config(path: Path) -> dict:
    config = path / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{path}: no config.json (not a saved model directory)")
    data = json.loads(config.read_text())
    return {k: data.get(k) for k in ("architectures", "model_type", "num_labels", "hidden_size",
                                    "num_hidden_layers", "vocab_size")}  # fmt: skip


def average_model_dirs(members: Sequence[str | Path], output: str | Path) -> Path:
    """Write the WARM average of saved model directories to ``output`` (atomically).

    Raises:
        FileNotFoundError: A member is not a saved model directory.
        ValueError: Members of different architectures, files or weights.
    """
    paths = [Path(m) for m in members]
    if not paths:
        raise ValueError("need at least one model to average")
    reference = _config(paths[0])
    files = sorted(p.name for p in paths[0].glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{paths[0]}: no *.safetensors weights")
    for path in paths[1:]:
        if _config(path) != reference:
            raise ValueError(f"{path}: another architecture than {paths[0]} ({_config(path)})")
        if sorted(p.name for p in path.glob("*.safetensors")) != files:
            raise ValueError(f"{path}: other weight files than {paths[0]}")
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    for item in paths[0].iterdir():
        if item.is_file() and item.suffix != ".safetensors":
            shutil.copy2(item, staging / item.name)
    for name in files:
        averaged = average_state_dicts([load_file(path / name) for path in paths])
        save_file(averaged, staging / name, metadata={"format": "pt"})
    (staging / "warm.json").write_text(json.dumps({"members": [str(p) for p in paths]}, indent=2))
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return out
