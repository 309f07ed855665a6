"""Option `fuse_projections`: sibling linears on one input with a narrow member run as one matmul
(liger_fx/projections.py). Training must equal eager, RoPE must still fuse on the split parts, wide or mixed-frozen
siblings stay apart, and the fused output must not be kept alive by what the backward saves."""

import copy
import os
from unittest import mock

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

from liger_fx import rewrite
from liger_fx.models import mini_model
from tests.helpers import batch, compare_training, replaced
from tests.test_recompute import _saved_bytes_and_step


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: biased q/k/v
def test_gqa_projections_fuse_and_train_as_eager(family):
    model = mini_model(family)
    ids, labels = batch(model.config.vocab_size, b=2, t=16)
    compare_training(model, ids, labels)
    layers = model.config.num_hidden_layers
    assert replaced("fused_projections") == layers
    assert replaced("rope") == 2 * layers  # the rotation still matches on the split parts of q and k
    [record] = rewrite.get_records()
    assert all(w.endswith("self_attn.q_proj") for w in record.fused_projections), record.fused_projections
    assert "sibling projection group(s) -> one matmul" in record.summary()


def test_option_off_leaves_the_linears():
    model = mini_model("llama")
    ids, labels = batch(model.config.vocab_size, b=2, t=16)
    compare_training(model, ids, labels, options={"fuse_projections": False})
    assert replaced("fused_projections") == 0
    assert not rewrite.get_records()[0].fused_projections


class _Block(nn.Module):
    """Plain PyTorch: three projections of one input, the last two narrow (grouped-query k and v), and an MLP whose
    two wide siblings must stay apart."""

    def __init__(self, h=32, kv=8, i=64, bias=False):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(h, h, bias=bias), nn.Linear(h, kv, bias=bias), nn.Linear(h, kv, bias=bias)
        self.gate, self.up, self.down = nn.Linear(h, i, bias=False), nn.Linear(h, i, bias=False), nn.Linear(i, h)

    def forward(self, x):
        B, T, _ = x.shape
        q = self.q(x).view(B, T, 4, 8).transpose(1, 2)
        k = self.k(x).view(B, T, 1, 8).transpose(1, 2)
        v = self.v(x).view(B, T, 1, 8).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        x = x + a.transpose(1, 2).reshape(B, T, -1)
        return x + self.down(F.silu(self.gate(x)) * self.up(x))


def _train(module, x):
    module.zero_grad(set_to_none=True)
    module(x).square().mean().backward()
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("bias", [False, True])
def test_plain_module_fuses_only_the_narrow_group(bias):
    torch.manual_seed(0)
    block, x = _Block(bias=bias), torch.randn(2, 16, 32)
    ref = _train(block, x)
    fn = torch.compile(copy.deepcopy(block), backend="liger")
    got = _train(fn, x)
    assert replaced("fused_projections") == 1  # q/k/v; gate/up (both wider than their input) stay two matmuls
    assert set(got) == {f"_orig_mod.{n}" for n in ref}
    for name, g in ref.items():
        torch.testing.assert_close(got[f"_orig_mod.{name}"], g, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_frozen_weight_is_not_fused_with_trained_ones():
    """k frozen: q and v (trained, v narrow) fuse; k stays alone and gets no gradient."""
    torch.manual_seed(0)
    block, x = _Block(), torch.randn(2, 16, 32)
    block.k.weight.requires_grad_(False)
    ref = _train(block, x)
    fn = torch.compile(copy.deepcopy(block), backend="liger")
    got = _train(fn, x)
    assert replaced("fused_projections") == 1
    assert "_orig_mod.k.weight" not in got
    for name, g in ref.items():
        torch.testing.assert_close(got[f"_orig_mod.{name}"], g, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("grouped_sdpa", [False, True])
def test_fusion_saves_no_more_for_backward(grouped_sdpa):
    """Neither the concatenated weight (recomputed in the backward) nor the fused output is saved. With transformers'
    grouped SDPA (enable_gqa, no repeat of k/v; forced here as on CUDA without a mask) SDPA saves v itself: without
    the copy of v's part, the saved view kept the whole fused output alive (+3x v's bytes a layer, seen)."""
    model = mini_model("llama")
    ids, labels = batch(model.config.vocab_size, b=2, t=16)
    env = {"TRANSFORMERS_SDPA_FORCE_GQA": "1" if grouped_sdpa else "0"}
    with mock.patch.dict(os.environ, env):
        # use_cache=False: with a cache, k and v reach SDPA through a concatenation (a copy), as no training does
        kw = dict(storages=True, use_cache=False)
        on, _ = _saved_bytes_and_step(copy.deepcopy(model), ids, labels, None, **kw)
        fused = counters["liger_fx"]["fused_projections"]
        off, _ = _saved_bytes_and_step(copy.deepcopy(model), ids, labels, {"fuse_projections": False}, **kw)
    assert fused == model.config.num_hidden_layers
    assert on == off, (on, off)


def test_symbolic_lengths_fuse_without_fallback():
    """dynamic=True: the fused matmul's fake value is computed on symbolic sizes (torch 2.11 needs the python
    dispatcher to decompose `linear` there: without it the whole rewrite fell back to plain Inductor, seen on the
    H200's GPU test). At two lengths: no fallback, every group fused, gradients as eager. (One compile serving many
lengths is tests/patterns/test_dynamic.py's and test_grouped_sdpa.py's check.)"""
    model = mini_model("qwen3")  # q/k norms: the q and k parts get copies (rms_norm saves its input)
    for t in (16, 24):
        ids, labels = batch(model.config.vocab_size, b=2, t=t)
        compare_training(copy.deepcopy(model), ids, labels, dynamic=True)
    records = rewrite.get_records()
    assert records and all(r.fallback is None for r in records), [r.summary() for r in records]
    assert all(len(r.fused_projections) == model.config.num_hidden_layers for r in records)


def _heads(x, *weights):
    """Sibling linears of one input whose weights are graph inputs (functional code, torch.func.functional_call)."""
    return [F.linear(x, w) for w in weights]


def _equal_to_eager(fn, x, weights, dynamic_hidden=False):
    leaves = [t.detach().clone().requires_grad_() for t in (x, *weights)]
    ref = _heads(*leaves)
    sum(o.square().mean() for o in ref).backward()
    ours_leaves = [t.detach().clone().requires_grad_() for t in (x, *weights)]
    if dynamic_hidden:
        for t in ours_leaves:
            torch._dynamo.mark_dynamic(t, t.dim() - 1)
    ours = fn(*ours_leaves)
    sum(o.square().mean() for o in ours).backward()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    for a, b in zip(ours_leaves, leaves):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4)


def test_symbolic_in_features_beside_fixed_widths():
    """dynamic=True with the weights as graph inputs: their widths and the hidden size are symbolic, except a width of
    1, which Dynamo specializes (a value or reward head). The two 1-wide heads are narrower than any hidden size
    (Dynamo's symbolic sizes are >= 2) and fuse; the wide one, of symbolic width, stays alone. Before, the symbolic
    in_features in the group's key raised (unhashable SymInt) and the whole graph fell back to plain Inductor."""
    torch.manual_seed(0)
    x, weights = torch.randn(2, 16, 32), [torch.randn(1, 32), torch.randn(1, 32), torch.randn(24, 32)]
    _equal_to_eager(torch.compile(_heads, backend="liger", dynamic=True), x, weights)
    [record] = rewrite.get_records()
    assert record.fallback is None, record.summary()
    assert len(record.fused_projections) == 1 and replaced("fused_projections") == 1


def test_dynamic_hidden_size_guards_the_narrow_choice():
    """q/k/v of fixed widths (16, 8, 8) on a hidden size marked dynamic: fused with a guard that the hidden size
    exceeds the narrowest width. Hidden 32 and 48 run one compiled graph; hidden 4 (every member wider than its
    input) recompiles, unfused. Every call equals eager."""
    torch.manual_seed(0)
    fn = torch.compile(_heads, backend="liger")
    for h in (32, 48, 4):
        _equal_to_eager(fn, torch.randn(2, 16, h), [torch.randn(n, h) for n in (16, 8, 8)], dynamic_hidden=True)
    records = rewrite.get_records()
    assert all(r.fallback is None for r in records), [r.summary() for r in records]
    assert [len(r.fused_projections) for r in records] == [1, 0], [r.summary() for r in records]
