"""Methods rlhfkit adds to vLLM's workers (``--worker-extension-cls``), for weight sync.

This file runs inside the vLLM engine's own environment, which does not have rlhfkit: it imports
only torch and safetensors (both installed with vLLM). rlhfkit copies it next to the server and
puts it on the server's ``PYTHONPATH``; the methods are called through vLLM's
``/collective_rpc`` endpoint with string arguments.

Loading goes through the model runner's ``reload_weights``: it maps Hugging Face names onto
vLLM's fused layers (q, k and v into ``qkv_proj``, gate and up into ``gate_up_proj``) and
processes them again as after the first load (on the CPU build each linear layer's weight is
repacked for oneDNN and the plain copy dropped, so vLLM's parameters no longer show it).
"""

from __future__ import annotations

import hashlib

import torch


def tensors_hash(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names and exact bytes, in name order (rlhfkit computes the same)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _refresh_cpu_kernels(model: torch.nn.Module) -> None:
    """Rebuild the CPU build's packed GEMM of layers that keep their plain weight.

    The output head tied to the input embedding is not in the pushed weights under its own name
    and keeps a oneDNN handle packed from the old values; reloading the embedding updates the
    shared tensor but not that handle.
    """
    try:
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
        from vllm.platforms import current_platform
    except ImportError:
        return
    if not current_platform.is_cpu():
        return
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if hasattr(module, "cpu_linear") and weight is not None and weight.numel() > 0:
            dispatch_cpu_unquantized_gemm(module, remove_weight=False)


class WeightSync:
    """Mixed into each vLLM worker: load pushed weights, report what was loaded."""

    def rlhfkit_load(self, path: str) -> int:
        """Load the tensors of the safetensors file at ``path`` (Hugging Face names).

        Returns how many tensors were loaded; their hash is kept for :meth:`rlhfkit_hash`.
        """
        from safetensors.torch import load_file

        weights = load_file(path)
        runner = self.model_runner
        if hasattr(runner, "reload_weights"):
            runner.reload_weights(weights_iterator=iter(weights.items()))
        else:  # older runners: plain loading (no repacking to redo)
            runner.model.load_weights(weights=iter(weights.items()))
        _refresh_cpu_kernels(runner.model)
        self._rlhfkit_loaded = tensors_hash(weights)
        return len(weights)

    def rlhfkit_hash(self) -> str:
        """The hash of the last weights this worker loaded without error ("" before any)."""
        return getattr(self, "_rlhfkit_loaded", "")
