"""Option `grouped_sdpa`: an unmasked SDPA on k/v repeated to every query head (transformers' repeat_kv) runs on the
unrepeated k/v with enable_gqa=True (liger_fx/grouped_sdpa.py). Same gradients as eager, k and v saved g-fold
smaller, and nothing rewritten where a mask or an unrepeated operand makes it a different computation."""

import copy
from unittest import mock

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

from liger_fx import backend, rewrite
from tests.helpers import replaced
from tests.test_recompute import _partition_only

H, KV, D = 4, 2, 8


def repeat_kv(x, n_rep):  # transformers' spelling
    b, kv, t, d = x.shape
    return x[:, :, None, :, :].expand(b, kv, n_rep, t, d).reshape(b, kv * n_rep, t, d)


class _Attention(nn.Module):
    def __init__(self, repeat_v=True, mask=False):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(32, H * D), nn.Linear(32, KV * D), nn.Linear(32, KV * D)
        self.o = nn.Linear(H * D, 32)
        self.repeat_v, self.mask = repeat_v, mask

    def forward(self, x):
        B, T, _ = x.shape
        q = self.q(x).view(B, T, H, D).transpose(1, 2)
        k = repeat_kv(self.k(x).view(B, T, KV, D).transpose(1, 2), H // KV)
        v = self.v(x).view(B, T, KV, D).transpose(1, 2)
        v = repeat_kv(v, H // KV) if self.repeat_v else v.repeat(1, H // KV, 1, 1)  # repeat: tiled, not grouped
        if self.mask:  # a padding mask: the last two keys of the first sequence hidden
            m = torch.ones(B, 1, T, T, dtype=torch.bool, device=x.device)
            m[0, :, :, -2:] = False
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
        else:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(a.transpose(1, 2).reshape(B, T, -1))


def _step(module, x, options=None, dynamic=None):
    """Gradients of one step, and the bytes the forward saved for backward (storages, parameters excluded)."""
    fn = torch.compile(module, backend="liger", options=options, dynamic=dynamic) if options is not False else module
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with mock.patch.object(backend, "compile_fx", _partition_only):
        fn(x).square().mean().backward()  # compile outside the hooks
        module.zero_grad(set_to_none=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn(x)
        out.square().mean().backward()
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    return grads, sum(n for ptr, n in seen.items() if ptr not in params and ptr != x.untyped_storage().data_ptr())


def _assert_grads(got, ref):
    for name, g in ref.items():
        torch.testing.assert_close(got[name], g, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_repeated_kv_runs_grouped_and_saves_them_unrepeated():
    torch.manual_seed(0)
    module, x = _Attention(), torch.randn(2, 16, 32)
    ref, _ = _step(copy.deepcopy(module), x, options=False)
    off_grads, off = _step(copy.deepcopy(module), x, {"grouped_sdpa": False, "fuse_projections": False})
    assert replaced("grouped_sdpa") == 0
    torch._dynamo.reset()
    got, on = _step(copy.deepcopy(module), x, {"fuse_projections": False})
    assert replaced("grouped_sdpa") == 1
    assert "1 SDPA on grouped k/v (no repeat)" in rewrite.get_records()[-1].summary()
    _assert_grads(got, ref)
    _assert_grads(off_grads, ref)
    B, T = x.shape[:2]
    assert off - on == 2 * B * (H - KV) * T * D * 4, (off, on)  # repeated k and v, saved for SDPA's backward


@pytest.mark.parametrize("variant", ["mask", "tiled_v"])
def test_other_computations_are_left_alone(variant):
    """A masked SDPA (no fused grouped kernel on CUDA), and v tiled with `repeat` (head i is v[i % kv], not the
    grouped v[i // g]): neither is rewritten, and both still train as eager."""
    torch.manual_seed(0)
    module = _Attention(mask=variant == "mask", repeat_v=variant != "tiled_v")
    x = torch.randn(2, 16, 32)
    ref, _ = _step(copy.deepcopy(module), x, options=False)
    got, _ = _step(copy.deepcopy(module), x, {})
    assert replaced("grouped_sdpa") == 0
    _assert_grads(got, ref)


def test_symbolic_lengths_one_compile():
    torch.manual_seed(0)
    module = _Attention()
    ref_module = copy.deepcopy(module)
    fn = torch.compile(module, backend="liger", dynamic=True)
    for T in (12, 16, 20):
        x = torch.randn(2, T, 32)
        torch.testing.assert_close(fn(x), ref_module(x), atol=1e-5, rtol=1e-4)
    assert replaced("grouped_sdpa") == 1
    assert counters["stats"]["unique_graphs"] == 1
