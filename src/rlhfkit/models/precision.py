"""Precision policy: bf16 compute where the hardware has it, fp32 master weights and loss math.

``resolve_precision("auto")`` picks bf16 on CUDA devices that support it and on CPUs with AMX or
AVX512-BF16 (read from /proc/cpuinfo), fp32 otherwise. Training keeps an fp32 master copy of the
trainable weights and the optimiser state in fp32 (``training.precision.MasterWeights``); the
model itself runs entirely in the compute dtype, which avoids the per-op casts of autocast.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import torch

PrecisionName = Literal["auto", "bf16", "fp32", "fp16"]
_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """Resolved precision.

    Attributes:
        compute: dtype the model's forward and backward run in.
        master: dtype of master weights and optimiser state (always fp32 when training).
        reason: Why ``auto`` chose ``compute``.
    """

    compute: torch.dtype
    master: torch.dtype = torch.float32
    reason: str = ""

    @property
    def mixed(self) -> bool:
        """True when compute and master dtypes differ (a master copy is needed)."""
        return self.compute != self.master


@lru_cache(maxsize=1)
def cpu_bf16_flags() -> tuple[str, ...]:
    """CPU feature flags that give fast bf16 matmuls (AMX tiles, AVX512-BF16)."""
    cpuinfo = Path("/proc/cpuinfo")
    if platform.system() != "Linux" or not cpuinfo.is_file():
        return ()
    flags: set[str] = set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return tuple(sorted(f for f in flags if f in ("amx_bf16", "amx_tile", "avx512_bf16")))


def default_device() -> torch.device:
    """The first CUDA device when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_precision(
    name: PrecisionName | str = "auto", device: str | torch.device = "cpu"
) -> Precision:
    """Turn a precision name into dtypes for ``device``.

    Args:
        name: ``auto``, ``bf16``, ``fp32`` or ``fp16``.
        device: The device the model runs on.

    Raises:
        ValueError: For an unknown name.
    """
    if name in _DTYPES:
        return Precision(compute=_DTYPES[name], reason="requested")
    if name != "auto":
        raise ValueError(f"unknown precision {name!r}; choose auto, bf16, fp32 or fp16")
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return Precision(compute=torch.bfloat16, reason="CUDA device supports bf16")
    if device.type == "cpu" and cpu_bf16_flags():
        return Precision(compute=torch.bfloat16, reason="CPU has " + ", ".join(cpu_bf16_flags()))
    return Precision(compute=torch.float32, reason=f"no fast bf16 on {device.type}")
