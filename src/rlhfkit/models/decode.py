"""One decode step of a Llama-family model in fewer operators: the sampler's fast path on CPU.

A decode step feeds one token per row through every layer. Through the model's own forward, a
step of the embedded model (30 layers) with the sampler's work on its logits dispatches about
8,700 ATen operators (2,300 at the top level, the rest nested inside them), most of them on
(rows x 576) blocks that take microseconds, plus the Python of the modules around them; its
matmuls, the only real work, take about half of the step. :class:`DecodeStep` computes the same
function with the weights of the same modules in about 4,600 (1,800 at the top level):

1. h = embed(token); cos, sin from the model's own rotary module at each row's position.
2. Per layer: x = RMSNorm(h); [q k v] = x W_qkv^T (one matmul over the three projections'
   weights stacked); rotary on q and k together; k and v written at column ``length`` of the
   layer's key/value buffers; attention over the whole buffer with a mask (positions beyond
   the filled part hold finite values, zeros where never written, and are masked; a
   power-of-two softmax scale is applied inside the product, any other after it, as the
   model's path rounds); h += o W_o^T; x = RMSNorm(h);
   [g u] = x W_gu^T; h += (silu(g) * u) W_down^T.
3. logits = RMSNorm(h) W_head^T.

Attention reads the whole buffer, not a view of its filled part: on CPU, ``bmm`` copies any
operand whose batch stride is not packed, and a view of the first L of C positions is not, so
the view costs a copy of the cache per layer and step (in bf16, 64 rows, 3 key/value heads of
64: 0.32-0.56 ms per product over 64-192 positions, against 0.07-0.15 ms for the packed
buffer). Masked positions get weight exactly 0 and their keys and values are finite, so they
add exact zeros to every sum.

Only models whose layers are checked to compute exactly these formulas take this path
(:func:`decode_step`): the Llama, Mistral and Qwen2 decoder layers, plain ``nn.Linear``
projections (no LoRA wrapper, no quantised weights), SiLU, RMSNorm of transformers' formula,
full attention, no hooks. Everything else decodes through the model's own forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from rlhfkit.models.fused import _is_plain_rms_norm, _same_formula
from rlhfkit.ops.fused import rms_norm

DECODE_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2"})
"""``config.model_type`` values whose decoder layers :class:`DecodeStep` reproduces."""


PACKED_DTYPES = frozenset({torch.bfloat16})
"""Weight dtypes whose projections run on weights prepacked for oneDNN (see :class:`Linear`)."""


class Linear:
    """y = x W^T + b, on W prepacked into oneDNN's blocked layout where that is available.

    A bf16 matmul through ``F.linear`` hands oneDNN the weight in its plain layout, and oneDNN
    reorders it into its blocked layout on every call; at the few rows of a decode step the
    reorder costs as much as the product. Reordered once per sampling call
    (``torch.ops.mkldnn._reorder_linear_weight``), the products of the embedded model's shapes
    take 0.55-0.75 of the time at 64 rows and 0.5-0.75 at 16 (AMD EPYC, 2 threads), with results
    equal to ``F.linear``'s there. Other dtypes, other devices and builds without oneDNN use
    ``F.linear``.

    Args:
        weight: (out, in).
        bias: (out,) or None.
        rows: The number of rows expected (oneDNN's hint for the layout; any number works).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, rows: int = 64):
        self.bias = bias
        self.packed = _pack(weight, rows)
        # the plain weight only where it is used (a stacked copy would double the memory)
        self.weight = weight if self.packed is None else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Shapes: x (B, in); returns (B, out)."""
        if self.packed is None:
            return nn.functional.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def _pack(weight: torch.Tensor, rows: int) -> torch.Tensor | None:
    """``weight`` in oneDNN's layout for ``rows`` rows, or None where it cannot be."""
    if (
        weight.dtype not in PACKED_DTYPES
        or weight.device.type != "cpu"
        or not torch.backends.mkldnn.is_available()
    ):
        return None
    supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        if supported is None or not supported():
            return None
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)
        probe = weight.new_zeros(1, weight.shape[1])
        torch.ops.mkldnn._linear_pointwise(probe, packed, None, "none", [], "")
    except (RuntimeError, AttributeError, NotImplementedError):  # a build without it
        return None
    return packed


@dataclass(frozen=True)
class LayerWeights:
    """One layer's weights as :class:`DecodeStep` uses them.

    Shapes:
        qkv: ((H + 2 H_kv) D, hidden) with its bias if any; out: (hidden, H D);
        gate_up: (2 I, hidden); down: (hidden, I); norms: (hidden,).
    """

    qkv: Linear
    out: Linear
    gate_up: Linear
    down: Linear
    attn_norm: torch.Tensor
    mlp_norm: torch.Tensor
    intermediate: int


class DecodeStep:
    """The decode step of a Llama-family model (see the module docstring).

    Build it with :func:`decode_step`, once per sampling call: it stacks the projection weights
    (W_qkv, W_gu) and prepacks them (:class:`Linear`), so a model trained after it was built
    needs a new one.

    Args:
        model: The causal LM (checked by :func:`decode_step`).
        rows: The batch's rows (the layout hint of :class:`Linear`).
    """

    def __init__(self, model: nn.Module, rows: int = 64) -> None:
        inner = model.model
        attn = inner.layers[0].self_attn
        self.heads = model.config.num_attention_heads
        self.kv_heads = model.config.num_key_value_heads
        self.head_dim = attn.head_dim
        self.scale = attn.scaling
        # a power-of-two scale commutes with rounding, so it can scale inside the product
        self.exact_alpha = math.frexp(self.scale)[0] == 0.5
        self.eps = inner.norm.variance_epsilon
        self.embed = inner.embed_tokens.weight
        self.final_norm = inner.norm.weight
        self.head = Linear(model.lm_head.weight, rows=rows)
        self.rotary = inner.rotary_emb
        self.layers = [_layer_weights(layer, rows) for layer in inner.layers]

    @torch.no_grad()
    def __call__(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        length: int,
    ) -> torch.Tensor:
        """Feed one token per row; write its keys and values at ``length``; return the logits.

        Args:
            tokens: The new token of each row.
            positions: Its position id (rotary).
            mask: Which buffer positions each row attends to (True = attend); it must already
                include ``length``.
            keys: Per layer, the key buffer; positions ``length`` and later are written or
                zero.
            values: Per layer, the value buffer, likewise.
            length: The buffer position the new token's keys and values go to.

        Shapes:
            tokens, positions: (B,) long; mask: (B, C) bool; keys, values: (B, H_kv, C, D);
            returns (B, V) in the model's dtype.
        """
        b, heads, kv_heads, d = tokens.shape[0], self.heads, self.kv_heads, self.head_dim
        groups, capacity = heads // kv_heads, mask.shape[1]
        h = self.embed[tokens]  # (B, hidden)
        cos, sin = self.rotary(h[:, None], positions[:, None])  # (B, 1, D) each
        # 0 where a row attends, -inf elsewhere, once per key/value head: (B H_kv, 1, C)
        bias = torch.zeros(mask.shape, dtype=h.dtype).masked_fill_(~mask, float("-inf"))
        bias = bias[:, None].expand(b, kv_heads, capacity).reshape(b * kv_heads, 1, capacity)
        qk_width = (heads + kv_heads) * d
        for w, k_buf, v_buf in zip(self.layers, keys, values, strict=True):
            qkv = w.qkv(rms_norm(h, w.attn_norm, self.eps))
            qk = _rotate(qkv[:, :qk_width].view(b, heads + kv_heads, d), cos, sin)
            k_buf[:, :, length] = qk[:, heads:]
            v_buf[:, :, length] = qkv[:, qk_width:].view(b, kv_heads, d)
            q = qk[:, :heads].reshape(b * kv_heads, groups, d)
            keys_t = k_buf.view(b * kv_heads, capacity, d).transpose(1, 2)
            if self.exact_alpha:  # round(scale * acc) == round(acc) * scale: one operator
                scores = torch.baddbmm(bias, q, keys_t, alpha=self.scale)  # (B H_kv, G, C)
            else:  # the model's order: round the product, then scale, then mask
                scores = torch.bmm(q, keys_t).mul_(self.scale).add_(bias)
            dtype = torch.promote_types(scores.dtype, torch.float32)
            weights = torch.softmax(scores, dim=-1, dtype=dtype).to(v_buf.dtype)
            attended = weights @ v_buf.view(b * kv_heads, capacity, d)  # (B H_kv, G, D)
            h = h + w.out(attended.view(b, heads * d))
            gate_up = w.gate_up(rms_norm(h, w.mlp_norm, self.eps))
            act = nn.functional.silu(gate_up[:, : w.intermediate])
            h = h + w.down(act * gate_up[:, w.intermediate :])
        return self.head(rms_norm(h, self.final_norm, self.eps))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding: x cos + rotate_half(x) sin, with rotate_half(x) = [-x2, x1].

    Shapes:
        x: (B, heads, D); cos, sin: (B, 1, D); returns (B, heads, D).
    """
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def _layer_weights(layer: nn.Module, rows: int) -> LayerWeights:
    attn, mlp = layer.self_attn, layer.mlp
    projections = (attn.q_proj, attn.k_proj, attn.v_proj)
    biases = [p.bias for p in projections]
    return LayerWeights(
        qkv=Linear(
            torch.cat([p.weight for p in projections]),
            None if biases[0] is None else torch.cat(biases),
            rows,
        ),
        out=Linear(attn.o_proj.weight, rows=rows),
        gate_up=Linear(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), rows=rows),
        down=Linear(mlp.down_proj.weight, rows=rows),
        attn_norm=layer.input_layernorm.weight,
        mlp_norm=layer.post_attention_layernorm.weight,
        intermediate=mlp.gate_proj.out_features,
    )


def _hooked(model: nn.Module) -> bool:
    """Does any module run hooks in its forward (steering, recording, sharding)?"""
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@torch.no_grad()
def _is_silu(act: object) -> bool:
    """Is ``act`` SiLU (``nn.SiLU`` or transformers' activation), checked on a probe?"""
    if not isinstance(act, nn.Module) or "silu" not in type(act).__name__.lower():
        return False
    probe = torch.linspace(-6.0, 6.0, 97)
    return torch.equal(act(probe), nn.functional.silu(probe))


def _plain_layer(layer: nn.Module) -> bool:
    """Is this decoder layer exactly the Llama formula :class:`DecodeStep` computes?"""
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    linears = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    linears += [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    if not all(type(m) is nn.Linear and type(m.weight) is nn.Parameter for m in linears):
        return False  # LoRA wrappers, quantised weights (tensor subclasses)
    q, k, v, o, gate, up, down = linears
    biases = [m.bias is not None for m in (q, k, v)]
    norms = [getattr(layer, n, None) for n in ("input_layernorm", "post_attention_layernorm")]
    return (
        len(set(biases)) == 1
        and all(m.bias is None for m in (o, gate, up, down))
        and _is_silu(getattr(mlp, "act_fn", None))
        and all(n is not None and _is_plain_rms_norm(n) and _same_formula(n) for n in norms)
        and hasattr(attn, "head_dim")
        and hasattr(attn, "scaling")
        and getattr(attn, "sliding_window", None) is None
    )


def _full_attention(config: object) -> bool:
    """Does every layer attend to all earlier positions (no sliding window)?

    Mistral applies ``sliding_window`` whatever else its config says, so it must be None there.
    """
    if getattr(config, "model_type", None) == "mistral":
        return getattr(config, "sliding_window", None) is None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return all(t == "full_attention" for t in layer_types)
    return (
        getattr(config, "sliding_window", None) is None
        or getattr(config, "use_sliding_window", True) is False
    )


def decode_step(model: nn.Module, rows: int = 64) -> DecodeStep | None:
    """The fast decode step for ``model``, or None where it does not compute the model exactly.

    Taken only on CPU (where operator overhead is what it removes) for the model types of
    :data:`DECODE_MODEL_TYPES` whose every layer passes the checks of the module docstring.

    Args:
        model: The causal LM.
        rows: The batch's rows (a layout hint).
    """
    config = getattr(model, "config", None)
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if (
        config is None
        or getattr(config, "model_type", None) not in DECODE_MODEL_TYPES
        or layers is None
        or not hasattr(model, "lm_head")
        or type(model.lm_head) is not nn.Linear
        or type(getattr(inner, "embed_tokens", None)) is not nn.Embedding
        or len(layers) != getattr(config, "num_hidden_layers", len(layers))
        or model.lm_head.bias is not None
        or any(p.device.type != "cpu" for p in model.parameters())
        or getattr(config, "final_logit_softcapping", None)
        or not _full_attention(config)
        or _hooked(model)
        or not all(_plain_layer(layer) for layer in layers)
        or not (_is_plain_rms_norm(inner.norm) and _same_formula(inner.norm))
    ):
        return None
    return DecodeStep(model, rows)
