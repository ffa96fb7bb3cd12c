"""RMSNorm as a pure function, with a compiled twin that fuses it into one kernel each way.

In eager PyTorch a Llama-style RMSNorm is eight operators (an fp32 upcast, square, mean, add,
rsqrt, multiply, downcast, weight multiply), each reading and writing the whole (tokens x
hidden) block, and autograd adds about as many again in the backward. Fused by
``torch.compile`` the forward is one row-wise kernel and so is the backward. Measured on
SmolLM2-135M's shapes (1,317 tokens x 576, bf16, Intel Xeon with AMX, 2 threads): 3.6 ms eager
against 0.85 ms compiled for forward plus backward, 61 times per optimiser step.

The eager functions are the references the compiled twins are tested against, and the
fallback where compilation is impossible (:func:`rlhfkit.ops.compiled.compiled`).
"""

from __future__ import annotations

import torch

from rlhfkit.ops.compiled import compiled


def rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Root-mean-square normalisation as Llama, Mistral and Qwen define it.

    y = weight * cast(h / sqrt(mean(h^2) + eps)), with h the input in fp32 and the cast back
    to the input's dtype before the weight multiplies it (so a bf16 input with an fp32 weight
    gives an fp32 output, as in transformers).

    Shapes:
        hidden: (..., H); weight: (H,); returns (..., H).
    """
    dtype = hidden.dtype
    h = hidden.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


rms_norm_compiled = compiled(rms_norm)
