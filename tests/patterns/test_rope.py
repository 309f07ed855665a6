"""RoPE pattern end to end on CPU: tiny HF models (every q and k rotation fused, training equal to eager), then small
attention fronts that call HF's own `apply_rotary_pos_emb` for the layouts, dtypes and near misses.

`counters["liger_fx"]["rope"]` counts rotated tensors: q and k of every attention layer, 2 per layer, also when the
pair was then merged into one `rope_qk` launch."""

import copy
import operator

import pytest
import torch
import torch.nn as nn
from transformers.models.esm.modeling_esm import apply_rotary_pos_emb as esm_rope
from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb as neox_rope
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_rope
from transformers.models.llama.modeling_llama import rotate_half

import liger_fx
from liger_fx import backend
from liger_fx.models import mini_model
from tests.helpers import batch, compare_training, replaced
from tests.tolerance import assert_close_rule

liger = torch.ops.liger_fx
LAYERS = 2  # every mini model


@pytest.fixture
def graphs(monkeypatch):
    """The rewritten graphs handed to Inductor, to look at which ops they hold."""
    out = []
    real = backend.rewrite_graph

    def spy(*args):
        gm = real(*args)
        out.append(gm)
        return gm

    monkeypatch.setattr(backend, "rewrite_graph", spy)
    return out


def targets(gms):
    return [n.target for gm in gms for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "phi3", "gpt_neox"])
def test_training_matches_eager_and_every_rotation_is_fused(model_type, graphs):
    model = mini_model(model_type)
    ids, labels = batch(model.config.vocab_size)
    compare_training(model, ids, labels)
    assert replaced("rope") == 2 * LAYERS
    ops = targets(graphs)
    # q and k of each layer share one launch; nothing of the rotation is left (Phi-3's empty pass-through included)
    assert ops.count(liger.rope_qk.default) == LAYERS and liger.rope.default not in ops, ops
    assert torch.ops.aten.neg.default not in ops
    assert not [m for rec in liger_fx.get_records() for m in rec.misses if m.flag == "rope"]


# --------------------------------------------------------------------------------------------------------------
# A small attention front with HF's rotary tables and HF's own apply_rotary_pos_emb (seconds to compile).


def _chunk_rope(q, k, cos, sin, unsqueeze_dim=1):
    """A plain-PyTorch spelling with chunk(2) instead of HF's slices."""
    def rot(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + rot(q) * sin, k * cos + rot(k) * sin


def _upcast_once_rope(q, k, cos, sin, unsqueeze_dim=1):
    """Cohere's vision-tower form: upcast q and k once, rotate in fp32 with fp32 tables, cast back."""
    dtype = q.dtype
    q, k = q.float(), k.float()
    cos, sin = cos.unsqueeze(unsqueeze_dim).float(), sin.unsqueeze(unsqueeze_dim).float()
    return ((q * cos) + (rotate_half(q) * sin)).to(dtype), ((k * cos) + (rotate_half(k) * sin)).to(dtype)


FORMS = {"llama": llama_rope, "neox": neox_rope, "esm": esm_rope, "chunk": _chunk_rope, "once": _upcast_once_rope}


class Front(nn.Module):
    def __init__(self, form="llama", heads=4, kv_heads=2, head_dim=16, rotary_dim=None, layout="bhtd",
                 table_dtype=None, escape=False, hidden=32):
        super().__init__()
        self.form, self.heads, self.kv_heads, self.head_dim = form, heads, kv_heads, head_dim
        self.layout, self.table_dtype, self.escape = layout, table_dtype, escape
        self.q = nn.Linear(hidden, heads * head_dim, bias=False)
        self.k = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        rd = rotary_dim or head_dim
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, rd, 2).float() / rd), persistent=False)

    def forward(self, x):
        B, T, _ = x.shape
        # as HF's rotary embeddings: fp32 tables, cast to the activations' dtype unless table_dtype says otherwise
        freqs = torch.arange(T, device=x.device).float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)[None]
        dt = self.table_dtype or x.dtype
        cos, sin = emb.cos().to(dt), emb.sin().to(dt)
        q = self.q(x).view(B, T, self.heads, self.head_dim)
        k = self.k(x).view(B, T, self.kv_heads, self.head_dim)
        if self.layout == "bhtd":
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        qr, kr = FORMS[self.form](q, k, cos, sin, unsqueeze_dim=1 if self.layout == "bhtd" else 2)
        out = qr.float().pow(2).mean() + kr.float().sin().mean()
        if self.escape:  # rotate_half(q) also used elsewhere: that rotation must stay unfused
            out = out + rotate_half(q).float().abs().mean()
        return out


def run(module, x, dtype=torch.float32, options=None):
    """[eager, compiled] lists of loss, input grad and parameter grads; in bf16 also the fp32 reference first
    (the same bf16 weights and input, upcast)."""
    passes = [(copy.deepcopy(module).to(dtype), False), (copy.deepcopy(module).to(dtype), True)]
    if dtype != torch.float32:
        passes.insert(0, (copy.deepcopy(passes[0][0]).float(), False))
    results = []
    for m, compiled in passes:
        xi = x.to(dtype).to(next(m.parameters()).dtype).requires_grad_()
        loss = (torch.compile(m, backend="liger", options=options) if compiled else m)(xi)
        loss.backward()
        results.append([loss.detach(), xi.grad] + [p.grad for p in m.parameters()])
    return results


def assert_same(results):
    if len(results) == 2:  # fp32: tight
        for ref, ours in zip(*results):
            torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)
        return
    # bf16: STYLE's rule against the fp32 reference. The fused op rounds q and k once where eager rounds three times,
    # so the two differ by bf16 roundings of q/k, which the linear backward sums into x's and W's grads; those
    # errors scale with the largest terms, not with each (possibly cancelled) sum, so atol is half a bf16 ulp of
    # the tensor's largest value (seen: x.grad 0.00112 vs 0.00114 fp32, in a tensor of max 0.02).
    for ref, eager, ours in zip(*results):
        assert_close_rule(ours, ref, eager, ref.float().abs().max().item() * 2**-8)


CASES = {
    "gqa_bhtd": dict(),
    "mqa_bthd": dict(kv_heads=1, layout="bthd"),
    "neox_partial25": dict(form="neox", rotary_dim=4),
    "neox_partial50_bthd": dict(form="neox", rotary_dim=8, layout="bthd", heads=3, kv_heads=3),
    "chunk": dict(form="chunk"),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_layouts_and_partial_rotary(case, graphs):
    torch.manual_seed(0)
    assert_same(run(Front(**CASES[case]), torch.randn(2, 7, 32)))
    assert replaced("rope") == 2
    assert targets(graphs).count(liger.rope_qk.default) == 1


@pytest.mark.parametrize(
    "form, table_dtype, out_dtype",
    [
        ("llama", None, torch.bfloat16),  # HF: tables cast to bf16 by the rotary embedding
        ("llama", torch.float32, torch.float32),  # tables left fp32: eager promotes q to fp32
        ("esm", torch.float32, torch.bfloat16),  # x.float() twice, .to(original_dtype) after
        ("once", None, torch.bfloat16),  # x.float() once, tables upcast after the unsqueeze
    ],
    ids=["bf16_tables", "fp32_tables", "esm_upcast", "upcast_once"],
)
def test_bf16_dtype_variants_fold_their_casts(form, table_dtype, out_dtype, graphs):
    torch.manual_seed(0)
    results = run(Front(form=form, table_dtype=table_dtype), torch.randn(2, 7, 32), torch.bfloat16)
    assert_same(results)
    assert replaced("rope") == 2
    (gm,) = graphs
    (qk,) = [n for n in gm.graph.nodes if n.target is liger.rope_qk.default]
    assert qk.args[4:] == (out_dtype, out_dtype)
    # the op reads bf16 q/k directly (no fp32 copy) and writes the final dtype (no cast back to bf16 after it; the
    # loss's own `.float()` may follow)
    assert all(a.meta["val"].dtype == torch.bfloat16 for a in qk.args[:2])
    for get in qk.users:
        assert get.target is operator.getitem
        assert not [u for u in get.users if u.target is torch.ops.aten.to.dtype and u.args[1] == torch.bfloat16]


def test_flag_off_gives_no_replacement_and_same_numbers():
    torch.manual_seed(0)
    assert_same(run(Front(form="neox", rotary_dim=8), torch.randn(2, 7, 32), options={"rope": False}))
    assert replaced("rope") == 0
    misses = [m for rec in liger_fx.get_records() for m in rec.misses if m.flag == "rope"]
    assert len(misses) == 2 and all("flag 'rope' is off" in m.reason for m in misses)


def test_dynamic_sequence_length_still_rewrites():
    torch.manual_seed(0)
    m = Front()
    fn = torch.compile(m, backend="liger")
    for t in (5, 9, 13):
        x = torch.randn(2, t, 32)
        torch.testing.assert_close(fn(x), m(x), atol=1e-5, rtol=1e-4)
    records = liger_fx.get_records()
    assert len(records) == 2, [r.summary() for r in records]  # static first, then one dynamic graph
    assert all(r.counts().get("rope") == (2, 2) for r in records), [r.summary() for r in records]


def test_inference_mode():
    torch.manual_seed(0)
    m = Front(form="neox", rotary_dim=8)
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(m, backend="liger")(x), m(x), atol=1e-5, rtol=1e-4)
    assert replaced("rope") == 2


def test_rotate_half_used_elsewhere_keeps_numerics_and_is_reported():
    torch.manual_seed(0)
    assert_same(run(Front(escape=True), torch.randn(2, 7, 32)))
    # The escaping rotate_half(q) is its own cat, so q's rotation still matches; the extra one is a near miss,
    # refused because its result is used outside any rotation.
    assert replaced("rope") == 2
    (miss,) = [m for rec in liger_fx.get_records() for m in rec.misses]
    assert "does not feed a multiply by sin" in miss.reason, miss.reason


class SharedRotate(nn.Module):
    """The rotate_half(q) inside q's rotation is itself reused: q's rotation cannot be fused, k's still is."""

    def __init__(self):
        super().__init__()
        self.q, self.k = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x, cos, sin):
        q, k = self.q(x).unflatten(-1, (2, 8)).transpose(1, 2), self.k(x).unflatten(-1, (2, 8)).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        rq = rotate_half(q)
        qe, ke = q * cos + rq * sin, k * cos + rotate_half(k) * sin
        return (qe * ke).sum() + rq.pow(2).sum()


def test_intermediate_of_the_rotation_escaping_is_not_fused():
    torch.manual_seed(0)
    m = SharedRotate()
    x, cos, sin = torch.randn(2, 5, 16, requires_grad=True), torch.randn(1, 5, 8), torch.randn(1, 5, 8)
    ref = m(x, cos, sin)
    gref = torch.autograd.grad(ref, [x, *m.parameters()])
    out = torch.compile(m, backend="liger")(x, cos, sin)
    g = torch.autograd.grad(out, [x, *m.parameters()])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    for a, b in zip(g, gref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert replaced("rope") == 1
    (miss,) = [m for rec in liger_fx.get_records() for m in rec.misses]
    assert "escapes" in miss.reason, miss.reason


class NotHalf(nn.Module):
    def forward(self, q, cos, sin):
        rot = torch.cat((-q[..., 3:], q[..., :3]), dim=-1)  # a 3/5 split of width 8: not a rotate-half
        return q * cos + rot * sin


def test_split_that_is_not_half_is_a_near_miss_with_reason():
    q, cos, sin = torch.randn(2, 3, 5, 8), torch.randn(1, 1, 5, 8), torch.randn(1, 1, 5, 8)
    torch.testing.assert_close(torch.compile(NotHalf(), backend="liger")(q, cos, sin), NotHalf()(q, cos, sin))
    assert replaced("rope") == 0
    (miss,) = [m for rec in liger_fx.get_records() for m in rec.misses]
    assert "splits at 3, not at half of the rotated width 8" in miss.reason, miss.reason


class LearnedTable(nn.Module):
    def __init__(self):
        super().__init__()
        self.cos, self.sin = nn.Parameter(torch.randn(1, 1, 5, 8)), nn.Parameter(torch.randn(1, 1, 5, 8))

    def forward(self, q):
        return (q * self.cos + rotate_half(q) * self.sin).pow(2).sum()


def test_tables_requiring_grad_are_refused_and_still_get_grads():
    torch.manual_seed(0)
    m, q = LearnedTable(), torch.randn(2, 3, 5, 8)
    ref = torch.autograd.grad(m(q), list(m.parameters()))
    ours = torch.autograd.grad(torch.compile(m, backend="liger")(q), list(m.parameters()))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert replaced("rope") == 0
    (miss,) = [m for rec in liger_fx.get_records() for m in rec.misses]
    assert "require grad" in miss.reason, miss.reason
