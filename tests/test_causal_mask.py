"""Option `causal_sdpa`: an SDPA whose boolean mask is provably the causal triangle runs with is_causal=True.

Plain PyTorch attention blocks build the mask in the usual spellings; the rewrite must happen for exactly those and
nothing else, and the step must equal eager (the masked kernel)."""

import sys

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


def _step(model, x, params=None):
    """One forward and backward of `model(x)`; the gradients of `params`' parameters (default: the model's own)."""
    module = params if params is not None else getattr(model, "_orig_mod", model)
    module.zero_grad(set_to_none=True)
    y = model(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
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


# --------------------------------------------------------------------------------------------------------------
# Masks that cross a graph break (FSDP2's layers, block-by-block compiles): the graph that builds the mask marks it,
# the graphs that read it rely on the mark under a guard (liger_fx/causal_mask.py, "Masks that cross graphs").


class Attention(torch.nn.Module):
    """An attention block that takes its mask from the caller and slices it to its length (transformers' SDPA path)."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.out = torch.nn.Linear(d, d)

    def forward(self, x, mask):
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, :, :, :T])
        return x + self.out(y.transpose(1, 2).reshape(B, T, D))


def _positions_mask(pos, padding=None):
    """transformers 5.25's training mask from position ids, as its graph holds it when the ids come from eager code
    (FSDP2 on torch 2.13): True & (pos[b, kv] <= pos[b, q]) & (doc[b, q] == doc[b, kv]) [& padding[b, kv]]. Causal
    exactly when every row of pos counts up by one and nothing is padded."""
    B, T = pos.shape
    doc = (torch.diff(pos, prepend=pos[:, :1] - 1, dim=-1) != 1).cumsum(-1)
    b = torch.arange(B)[:, None, None, None]
    q, kv = torch.arange(T)[None, None, :, None], torch.arange(T)[None, None, None, :]
    mask = q.new_ones((), dtype=torch.bool) & (pos[b, kv] <= pos[b, q]) & (doc[b, q] == doc[b, kv])
    return mask if padding is None else mask & padding.bool()[b, kv]


class MaskThenBlocks(torch.nn.Module):
    """The mask is built, then a graph break (as at a fully_shard layer), then two blocks read it."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.blocks = torch.nn.ModuleList([Attention(), Attention()])

    def forward(self, x, pos=None, padding=None):
        B, T, _ = x.shape
        if self.kind == "positions":
            mask = _positions_mask(pos, padding)
        else:
            mask = _mask(self.kind, T, x.device)
            mask = (mask if mask.dim() == 4 else mask[None, None]).expand(B, 1, T, T)
        torch._dynamo.graph_break()
        for block in self.blocks:
            x = block(x, mask)
        return x


def _steps(kind, inputs: list[dict], T=16, before_step=lambda i: None):
    """Train `MaskThenBlocks(kind)` one step per inputs entry, compiled and eager; output and grads equal each step.
    Returns the causal_sdpa counter."""
    torch.manual_seed(0)
    ref, model = MaskThenBlocks(kind), MaskThenBlocks(kind)
    model.load_state_dict(ref.state_dict())
    compiled = torch.compile(model, backend="liger")
    for i, kwargs in enumerate(inputs):
        before_step(i)
        x = torch.randn(2, T, 32)
        y_ref, g_ref = _step(lambda x: ref(x, **kwargs), x, ref)
        y, g = _step(lambda x: compiled(x, **kwargs), x, model)
        torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
        for name in g_ref:
            torch.testing.assert_close(g[name], g_ref[name], atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    return counters["liger_fx"]["causal_sdpa"]


@pytest.mark.parametrize("kind", ["le", "tril_bool", "packed_arange"])
def test_causal_mask_crossing_a_graph_break_is_marked_and_read_as_causal(kind):
    assert _steps(kind, [{}, {}]) == 2  # both blocks, one graph, compiled once for both steps
    builder, reader = liger_fx.get_records()
    assert builder.causal_masks_out == 1 and not builder.causal_masks_checked, builder.summary()
    assert reader.causal_from_marks == 1 and "marked causal by an earlier graph" in reader.summary()


@pytest.mark.parametrize("kind", ["window", "packed_restart", "anti", "offset", "strict"])
def test_other_masks_crossing_a_graph_break_keep_their_mask(kind):
    assert _steps(kind, [{}]) == 0
    assert not any(r.causal_from_marks for r in liger_fx.get_records())


def test_mask_from_position_ids_is_checked_when_it_runs(monkeypatch):
    """Position ids from outside the graph: nothing provable, so the graph compares its mask with the triangle as it
    runs. Consecutive ids: marked, the blocks run causal. Packed documents (ids restarting) or padding: no mark, so
    Dynamo's guard on the mark recompiles the blocks' graph, which keeps the mask; and that graph, guarded on the
    mark's absence, is not reused for the next marked mask. Every step equals eager."""
    import liger_fx.causal_mask as cm

    T = 16
    arange = torch.arange(T)[None].expand(2, T)
    padding = torch.ones(2, T, dtype=torch.long)
    padding[1, -3:] = 0
    steps = [{"pos": arange + 3}, {"pos": arange % 5}, {"pos": arange, "padding": padding}, {"pos": arange + 1}]
    checks = []  # the causal graph's wrapper checks its input's mark at every call (MaskPlan's run): count them

    def counting(t, f=cm.is_marked):
        if sys._getframe(2).f_code.co_name == "run":  # run -> its generator expression -> here
            checks.append(1)
        return f(t)

    monkeypatch.setattr(cm, "is_marked", counting)
    counts = []
    assert _steps("positions", steps, T, before_step=lambda i: counts.append(len(checks))) == 2  # one causal graph
    counts.append(len(checks))
    ran_causal = [b > a for a, b in zip(counts, counts[1:])]
    assert ran_causal == [True, False, False, True], counts
    records = liger_fx.get_records()
    assert records[0].causal_masks_checked == 1, records[0].summary()
    readers = [r for r in records if r.causal_from_marks or (not r.causal_masks_checked and not r.causal_masks_out)]
    assert [r.causal_from_marks for r in readers] == [1, 0], [r.summary() for r in records]  # no third compile


def test_stale_mark_runs_with_the_mask():
    """A marked mask written in place afterwards (its version counter moves) is no longer taken as causal: the graph
    that relied on it runs Dynamo's own graph, with the mask, and warns once."""
    torch.manual_seed(0)
    block = Attention()
    build = torch.compile(lambda T: torch.tril(torch.ones(T, T, dtype=torch.bool))[None, None], backend="liger")
    attend = torch.compile(block, backend="liger")
    mask = build(8)
    x = torch.randn(2, 8, 32)
    torch.testing.assert_close(attend(x, mask), block(x, mask), atol=1e-5, rtol=1e-5)
    assert counters["liger_fx"]["causal_sdpa"] == 1
    mask[..., 3, 0] = False  # no longer causal
    torch.testing.assert_close(attend(x, mask), block(x, mask), atol=1e-5, rtol=1e-5)


def test_unmarked_mask_recompiles_and_keeps_its_mask():
    """Dynamo guards the reading graph on the mark: the same triangle built eagerly (no mark) recompiles, and that
    graph, which cannot prove its input causal, keeps the mask."""
    torch.manual_seed(0)
    block = Attention()
    build = torch.compile(lambda T: torch.tril(torch.ones(T, T, dtype=torch.bool))[None, None], backend="liger")
    attend = torch.compile(block, backend="liger")
    x = torch.randn(2, 8, 32)
    attend(x, build(8))
    eager_mask = torch.tril(torch.ones(8, 8, dtype=torch.bool))[None, None]
    torch.testing.assert_close(attend(x, eager_mask), block(x, eager_mask), atol=1e-5, rtol=1e-5)
    assert counters["liger_fx"]["causal_sdpa"] == 1 and len(liger_fx.get_records()) == 3, \
        [r.summary() for r in liger_fx.get_records()]
