"""Option `causal_sdpa`: an SDPA whose boolean mask is provably the causal triangle runs with is_causal=True.

Plain PyTorch attention blocks build the mask in the usual spellings; the rewrite must happen for exactly those and
nothing else, and the step must equal eager (the masked kernel)."""

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import liger_fx
from liger_fx.causal_mask import causal_sdpa


def _mask(kind, T, device):
    i = torch.arange(T, device=device)
    if kind == "le":  # transformers' sdpa_mask under compile: kv_idx <= q_idx
        return (i[None, :] <= i[:, None])[None, None]
    if kind == "ge":
        return (i[:, None] >= i[None, :])[None, None]
    if kind == "tril_bool":
        return torch.tril(torch.ones(T, T, dtype=torch.bool, device=device))
    if kind == "tril_float_then_bool":
        return torch.ones(T, T, device=device).tril().bool()
    # near misses: each is a different mask
    if kind == "strict":  # kv < q: the diagonal masked out
        return (i[None, :] < i[:, None])[None, None]
    if kind == "anti":  # q <= kv: the upper triangle
        return (i[:, None] <= i[None, :])[None, None]
    if kind == "window":  # causal and within 4 positions
        return ((i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < 4))[None, None]
    if kind == "offset":  # the query index shifted by one against the key index
        return (i[None, :] <= (i + 1)[:, None])[None, None]
    if kind == "tril_float":  # 0/1 floats are ADDED to the scores: not a boolean mask
        return torch.ones(T, T, device=device).tril()
    if kind in ("packed_arange", "packed_restart"):
        return _packed_mask(kind, T, device)
    raise ValueError(kind)


def _packed_mask(kind, T, device, B=2):
    """transformers' mask with its packed-sequence check, as torch 2.11 traces it on the GPU (transformers 5.17 and
    5.24): True & (kv <= q) & (doc[b, q] == doc[b, kv]), doc the cumsum of `diff(pos) != 1`. From the model's own
    arange positions doc is all 0 (causal); from positions that restart every 5 tokens (packed documents) it is not."""
    i = torch.arange(T, device=device)
    pos = (i + 0)[None, :].expand(B, -1)
    if kind == "packed_restart":
        pos = pos % 5
    doc = (torch.diff(pos, prepend=pos[:, :1] - 1, dim=-1) != 1).cumsum(-1)
    b = torch.arange(B, device=device)[:, None, None, None]
    q, kv = i[None, None, :, None], i[None, None, None, :]
    return torch.ones((), dtype=torch.bool, device=device).new_ones(()) & (kv <= q) & (doc[b, q] == doc[b, kv])


class Block(torch.nn.Module):
    def __init__(self, kind, d=32, heads=4):
        super().__init__()
        self.kind, self.heads = kind, heads
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.out = torch.nn.Linear(d, d)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        mask = _mask(self.kind, T, x.device)
        if mask.dim() == 4:
            mask = mask.expand(B, 1, T, T)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(B, T, D))


def _step(model, x):
    model.zero_grad(set_to_none=True)
    y = model(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    module = getattr(model, "_orig_mod", model)
    return y.detach(), {n: p.grad.clone() for n, p in module.named_parameters()}


def _compiled_step(kind, options=None, T=16, dynamic=False):
    torch.manual_seed(0)
    ref = Block(kind)
    model = Block(kind)
    model.load_state_dict(ref.state_dict())
    x = torch.randn(2, T, 32)
    torch._dynamo.reset()  # Dynamo caches per code object: an earlier test's compile of Block.forward would be reused
    counters.clear()
    liger_fx.clear_records()
    y_ref, g_ref = _step(ref, x)
    y, g = _step(torch.compile(model, backend="liger", options=options, dynamic=dynamic), x)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    return counters["liger_fx"]["causal_sdpa"]


@pytest.mark.parametrize("kind", ["le", "ge", "tril_bool", "tril_float_then_bool", "packed_arange"])
def test_causal_masks_become_is_causal(kind):
    assert _compiled_step(kind) == 1
    (record,) = liger_fx.get_records()
    assert record.causal_sdpa and "causal mask(s) -> SDPA is_causal" in record.summary()


@pytest.mark.parametrize("kind", ["strict", "anti", "window", "offset", "tril_float", "packed_restart"])
def test_other_masks_are_left_alone(kind):
    assert _compiled_step(kind) == 0


def test_option_off():
    assert _compiled_step("le", options={"causal_sdpa": False}) == 0


def test_dynamic_sequence_length_one_compile():
    """With a symbolic T the proof is symbolic (the two aranges share the SymInt), and a second length reuses it."""
    assert _compiled_step("le", T=16, dynamic=True) == 1
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = torch.compile(Block("le"), backend="liger", dynamic=True)
    counters.clear()
    for T in (9, 13):
        model(torch.randn(2, T, 32)).sum().backward()
    assert counters["liger_fx"]["causal_sdpa"] == 1  # one graph for both lengths


@pytest.mark.parametrize("q_len,q_start", [(8, 0), (3, 5)])
def test_query_shorter_than_keys_is_left_alone(q_len, q_start):
    """A KV-cache step (3 queries at positions 5..7 against 8 keys): the mask is causal but aligned to the end, and
    is_causal would align it to the start. The same code with 8 queries from 0 is rewritten."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(q, k, v):
        qi, ki = torch.arange(q_start, q_start + q_len), torch.arange(8)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=ki[None, :] <= qi[:, None])

    gm = make_fx(f, pre_dispatch=True)(torch.randn(1, 4, q_len, 8), torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8))
    assert len(causal_sdpa(gm.graph)) == (1 if q_len == 8 else 0)
