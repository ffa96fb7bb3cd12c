"""Fused RMSNorm (ops.fused, models.fused): the pure function is transformers' formula, the
compiled twin equals it, and patching a model changes its outputs only by rounding."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from rlhfkit.models import fused as fused_module
from rlhfkit.models.fused import FUSE_MIN_HIDDEN, fuse_norms
from rlhfkit.models.load import load_model
from rlhfkit.models.tiny import save_tiny_model
from rlhfkit.ops.fused import rms_norm, rms_norm_compiled


def _inputs(dtype: torch.dtype, hidden: int = 48):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 7, hidden, generator=gen) * 3).to(dtype)
    w = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype)
    return x, w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_is_transformers_formula_bit_for_bit(dtype):
    x, w = _inputs(dtype)
    norm = LlamaRMSNorm(x.shape[-1], eps=1e-5).to(dtype)
    norm.weight.data.copy_(w)
    assert torch.equal(rms_norm(x, w, 1e-5), norm(x))


def test_rms_norm_closed_form():
    x = torch.tensor([[3.0, 4.0]])  # mean square 12.5
    w = torch.tensor([1.0, 2.0])
    expected = torch.tensor([[3.0, 8.0]]) / (12.5 + 1e-6) ** 0.5
    torch.testing.assert_close(rms_norm(x, w, 1e-6), expected, atol=1e-7, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_twin_equals_eager_in_value_and_gradient(dtype, compiled_kernels):
    x, w = _inputs(dtype)
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    results = []
    for fn in (rms_norm, rms_norm_compiled):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = fn(xi, wi, 1e-5)
        out.backward(upstream)
        results.append((out.detach().float(), xi.grad.float(), wi.grad.float()))
    # fp32: reassociation only; bf16: one rounding of the output (and of the weight's sum)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0.1, "rtol": 2e-2}
    for eager, fused in zip(*results, strict=True):
        torch.testing.assert_close(fused, eager, **tol)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-fused"), seed=2)


def _patched(model: nn.Module) -> int:
    return sum("forward" in vars(m) for m in model.modules())


def test_fused_model_computes_the_same_logits_and_stays_fused(
    tiny_dir, monkeypatch, compiled_kernels
):
    monkeypatch.setattr(fused_module, "FUSE_MIN_ELEMENTS", 0)  # compiled even at this size
    ids = torch.tensor([[5, 17, 99, 3, 42, 8]])
    plain = load_model(str(tiny_dir), fuse="off").eval()
    fused = load_model(str(tiny_dir), fuse="on")
    layers = plain.config.num_hidden_layers
    assert _patched(plain) == 0
    assert _patched(fused) == 2 * layers + 1  # two norms per layer and the final one
    fused.train()
    fused.eval()  # switching modes must not undo the patch (transformers' hub kernels did)
    assert _patched(fused) == 2 * layers + 1
    with torch.no_grad():
        torch.testing.assert_close(fused(ids).logits, plain(ids).logits, atol=1e-5, rtol=1e-5)


def test_auto_fuses_only_wide_norms(tiny_dir):
    model = load_model(str(tiny_dir))  # hidden size 64 < FUSE_MIN_HIDDEN
    assert model.config.hidden_size < FUSE_MIN_HIDDEN
    assert _patched(model) == 0
    wide = nn.Sequential(LlamaRMSNorm(FUSE_MIN_HIDDEN), LlamaRMSNorm(FUSE_MIN_HIDDEN - 1))
    assert fuse_norms(wide, "auto") == 1
    assert fuse_norms(nn.Sequential(LlamaRMSNorm(FUSE_MIN_HIDDEN)), "off") == 0


class OnePlusRMSNorm(nn.Module):
    """A norm with another formula (Gemma's 1 + weight) but the same attribute names."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden))
        self.variance_epsilon = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (1 + self.weight) * rms_norm(x, torch.ones_like(self.weight), self.variance_epsilon)


def test_a_norm_with_another_formula_is_left_alone():
    model = nn.Sequential(OnePlusRMSNorm(300), LlamaRMSNorm(300))
    assert fuse_norms(model, "on") == 1
    assert "forward" not in vars(model[0]) and "forward" in vars(model[1])
