"""A key/value cache written in place: the sampler's replacement for ``DynamicCache``'s growth.

transformers' ``DynamicLayer`` appends each decode step's keys and values with ``torch.cat``,
which copies the whole cache every step, and drops finished rows by indexing, which copies it
again: decoding B rows for T steps moves O(B T^2) bytes for O(B T) new ones. On the AMX CPU,
sampling 128 rows of the embedded model spent about a fifth of its time in those two copies.

:class:`PreallocatedCache` holds each layer's keys and values in buffers with room for the
prompt and every new token (``capacity``), writes a step's keys into the next free positions
and hands attention views of the filled part: no copy per step. Rows are dropped only when the
caller asks (:meth:`PreallocatedLayer.batch_select_indices`), which the sampler does in bulk
(:data:`rlhfkit.rollout.sampler.COMPACT_FRACTION`). The attention it feeds computes exactly what
it computed on ``DynamicCache``: the same keys and values, in the same order.

The buffers are zero-filled when allocated, so every position beyond the filled part holds a
finite value (zeros, or keys of positions since cropped): a step that attends over a whole
buffer with the unfilled part masked (:class:`rlhfkit.models.decode.DecodeStep`) multiplies
them by weights of exactly 0 and adds exact zeros.

transformers' ``StaticLayer`` writes in place too, but hands attention its whole buffer every
step (a mask hides the unfilled part, so each step attends over the capacity) and cannot drop or
repeat rows, which the sampler needs.
"""

from __future__ import annotations

from functools import partial

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer


class PreallocatedLayer(DynamicLayer):
    """One layer's keys and values in fixed buffers; ``keys``/``values`` view the filled part.

    Args:
        capacity: Positions to allocate (prompt width + new tokens); a longer sequence grows the
            buffers (doubling), so capacity is a hint, never a limit.

    Shapes:
        buffers: (B, H_kv, capacity, D); ``keys``, ``values``: (B, H_kv, length, D) views.
    """

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity, self.length = capacity, 0
        self._keys = self._values = torch.empty(0)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Allocate the buffers for the batch, heads and dtype of the first update."""
        self.device = key_states.device
        b, heads, n, d = key_states.shape
        size = max(self.capacity, n)
        self._keys = key_states.new_zeros(b, heads, size, d)
        self._values = value_states.new_zeros(b, heads, size, value_states.shape[-1])
        self.is_initialized = True

    def _views(self) -> None:
        self.keys = self._keys[:, :, : self.length]
        self.values = self._values[:, :, : self.length]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new positions after the filled ones; return views of all filled positions.

        Shapes:
            key_states, value_states: (B, H_kv, n, D); returns two (B, H_kv, length + n, D) views.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        self.reserve(end)
        self._keys[:, :, self.length : end] = key_states
        self._values[:, :, self.length : end] = value_states
        self.length = end
        self._views()
        return self.keys, self.values

    def _grow(self, size: int) -> None:
        for name in ("_keys", "_values"):
            old = getattr(self, name)
            new = old.new_zeros(*old.shape[:2], size, old.shape[-1])
            new[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, new)

    def get_seq_length(self) -> int:
        """Filled positions."""
        return self.length

    def reserve(self, size: int) -> None:
        """Make room for ``size`` positions (the buffers double until they hold it)."""
        if size > self._keys.shape[-2]:
            self._grow(max(size, 2 * self._keys.shape[-2]))

    def advance(self, n: int) -> None:
        """Count ``n`` more positions as filled (written into the buffers by the caller)."""
        self.length += n
        self._views()

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last ``-tokens_to_remove`` positions (transformers' convention: negative)."""
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of positions to remove")
        self.length = max(0, self.length + tokens_to_remove)
        self._views()

    def reset(self) -> None:
        """Empty the cache (the buffers are kept)."""
        self.length = 0
        if self.is_initialized:
            self._views()

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every row ``repeats`` times (the samples of one prompt share its prefill)."""
        if self.is_initialized:
            self._keys = self._keys.repeat_interleave(repeats, dim=0)
            self._values = self._values.repeat_interleave(repeats, dim=0)
            self._views()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the rows ``indices`` (one copy of the filled part)."""
        if self.is_initialized:
            for name in ("_keys", "_values"):
                old = getattr(self, name)
                new = old.new_zeros(len(indices), *old.shape[1:])
                new[:, :, : self.length] = old[indices, :, : self.length]
                setattr(self, name, new)
            self._views()


class PreallocatedCache(DynamicCache):
    """A ``DynamicCache`` whose layers are :class:`PreallocatedLayer` of ``capacity`` positions.

    Besides transformers' interface (the model's forward calls ``update``), a caller that
    computes the step itself (:class:`rlhfkit.models.decode.DecodeStep`) writes into
    :meth:`buffers` (within their capacity) and then calls :meth:`advance`.
    """

    def __init__(self, capacity: int) -> None:
        Cache.__init__(self, layer_class_to_replicate=partial(PreallocatedLayer, capacity))

    def buffers(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Every layer's whole key and value buffer (filled part, then finite values).

        Shapes:
            each: (B, H_kv, capacity, D).
        """
        return [layer._keys for layer in self.layers], [layer._values for layer in self.layers]

    def advance(self, n: int = 1) -> None:
        """Count ``n`` more positions as filled in every layer."""
        for layer in self.layers:
            layer.advance(n)
