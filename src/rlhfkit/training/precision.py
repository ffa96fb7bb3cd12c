"""fp32 master weights for a model that computes in bf16 (or fp16).

The model's parameters are cast to the compute dtype once, so forward and backward run without
per-op autocast casts. An fp32 copy of every trainable parameter holds the master weights; the
optimiser (and its state) works on that copy. After each micro-batch's backward, the low-precision
gradients are added into fp32 master gradients (so accumulation over micro-batches happens in
fp32), and after each optimiser step the master weights are copied back into the model.

With an fp32 compute dtype the master parameters *are* the model's parameters and every method
is a no-op, so recipes use one code path for both.
"""

from __future__ import annotations

import torch
from torch import nn

from rlhfkit.models.sharding import full_tensor


class MasterWeights:
    """fp32 master copy of a model's trainable parameters.

    Args:
        model: The model; its parameters are cast to ``compute_dtype`` in place.
        compute_dtype: The dtype forward and backward run in.
    """

    def __init__(self, model: nn.Module, compute_dtype: torch.dtype = torch.float32) -> None:
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.model_params = [p for p in model.parameters() if p.requires_grad]
        self.mixed = compute_dtype != torch.float32
        self._collected = False  # whether this step's first micro-batch was collected
        if not self.mixed:
            self.master = self.model_params
            return
        self.master = [nn.Parameter(p.detach().float().clone()) for p in self.model_params]
        # Parameters only: buffers such as RoPE's inv_freq stay fp32, as from_pretrained(dtype=)
        # leaves them, so training and inference compute the same function.
        for param in model.parameters():
            param.data = param.data.to(compute_dtype)

    def params(self) -> list[nn.Parameter]:
        """Parameters the optimiser updates (fp32)."""
        return list(self.master)

    @torch.no_grad()
    def collect_grads(self) -> None:
        """Add the model's low-precision gradients into the fp32 master gradients.

        The master gradient buffers outlive the step (:meth:`zero_grad` only marks them stale):
        the first micro-batch of a step copies into them instead of allocating 4 bytes per
        parameter again, which on a CPU costs page faults on every step.
        """
        if not self.mixed:
            return
        first, self._collected = not self._collected, True
        for param, master in zip(self.model_params, self.master, strict=True):
            if param.grad is None:
                if first:
                    master.grad = None  # no stale gradient may reach the optimiser
                continue
            if master.grad is None:
                master.grad = param.grad.float()
            elif first:
                master.grad.copy_(param.grad)
            else:
                master.grad.add_(param.grad)
            param.grad = None

    @torch.no_grad()
    def sync_to_model(self) -> None:
        """Copy the master weights into the model (after an optimiser step or a load)."""
        if not self.mixed:
            return
        for param, master in zip(self.model_params, self.master, strict=True):
            param.copy_(master)

    def zero_grad(self) -> None:
        """Drop model gradients; master gradients become stale.

        The next :meth:`collect_grads` overwrites them; in full precision (no separate master)
        they are dropped.
        """
        self._collected = False
        if not self.mixed:
            for p in self.master:
                p.grad = None
        for p in self.model_params:
            p.grad = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Master weights by parameter name (fp32, detached)."""
        return {n: m.detach() for n, m in zip(self.names, self.master, strict=True)}

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Master weights by name, whole: sharded ones are gathered (every rank must call)."""
        return {n: full_tensor(m.detach()) for n, m in zip(self.names, self.master, strict=True)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load master weights by name and copy them into the model.

        Raises:
            KeyError: If a trainable parameter is missing from ``state``.
        """
        missing = [n for n in self.names if n not in state]
        if missing:
            raise KeyError(f"checkpoint lacks trainable parameters: {missing[:5]}")
        for name, master in zip(self.names, self.master, strict=True):
            master.copy_(state[name])
        self.sync_to_model()
