"""RoPE pattern end to end on CPU: tiny HF models (every q and k rotation fused, training equal to eager), then small
attention fronts that call HF's own `apply_rotary_pos_emb` for the layouts, dtypes and near misses.

`counters["liger_fx"]["rope"]` counts rotated tensors: q and k of every attention layer, 2 per layer, also when the
pair was then merged into one `rope_qk` launch."""

import copy
import operator

import pytest
import torch
import torch.nn as nn
from transformers.models.cohere.modeling_cohere import apply_rotary_pos_emb as cohere_rope
from transformers.models.deepseek_v2.modeling_deepseek_v2 import apply_rotary_emb as deepseek_complex_rope
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
    apply_rotary_pos_emb_interleave as deepseek_interleave_rope,
)
from transformers.models.esm.modeling_esm import apply_rotary_pos_emb as esm_rope
from transformers.models.glm.modeling_glm import apply_rotary_pos_emb as glm_rope
from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb as neox_rope
from transformers.models.gptj.modeling_gptj import apply_rotary_pos_emb as gptj_rope
from transformers.models.gptj.modeling_gptj import rotate_every_two
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


# HF families whose rotary embedding is not HF's rotate_half, built from their own transformers classes at the
# reduced size `liger-fx report` uses: GPT-J (interleaved pairs, partial rotary 8 of 16, repeat-interleaved tables
# made inside apply_rotary_pos_emb), GLM (pairs, half rotary), Cohere (pairs, q upcast once), DeepSeek-V2 (complex
# freqs_cis), DeepSeek-V3 (pairs read, halves written, MLA with a single-head k_pe), GPT-NeoX-Japanese (partial
# rotary on a permuted q, then `.contiguous().view(B * H, T, D)`: the fused op must hand the view the contiguous
# tensor the cat made, or AOTAutograd's trace fails and the graph falls back).
OTHER_FAMILIES = {
    "gptj": dict(rotary_dim=8, n_head=4),
    "glm": dict(),
    "cohere": dict(),
    "deepseek_v2": dict(num_experts_per_tok=2, topk_method="greedy"),
    "deepseek_v3": dict(rope_interleave=True),
    "gpt_neox_japanese": dict(attention_dropout=0.0),  # compiled dropout draws other numbers than eager
}


@pytest.mark.parametrize("family", list(OTHER_FAMILIES))
def test_other_families_train_like_eager_with_every_rotation_fused(family, graphs):
    from transformers import AutoConfig

    from liger_fx.models import build, reduce_config

    model = build(reduce_config(AutoConfig.for_model(family, **OTHER_FAMILIES[family])))
    ids, labels = batch(model.config.vocab_size)
    compare_training(model, ids, labels)
    assert replaced("rope") == 2 * LAYERS
    assert not [m for rec in liger_fx.get_records() for m in rec.misses if m.flag == "rope"]
    ops = targets(graphs)
    assert torch.ops.aten.neg.default not in ops and torch.ops.aten.view_as_complex.default not in ops, ops


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


def assert_same(results, ulps=0.5):
    if len(results) == 2:  # fp32: tight
        for ref, ours in zip(*results):
            torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)
        return
    # bf16: STYLE's rule against the fp32 reference. The fused op rounds q and k once where eager rounds three times,
    # so the two differ by bf16 roundings of q/k, which the linear backward sums into x's and W's grads; those
    # errors scale with the largest terms, not with each (possibly cancelled) sum, so atol is half a bf16 ulp of
    # the tensor's largest value (seen: x.grad 0.00112 vs 0.00114 fp32, in a tensor of max 0.02). `ulps` of it.
    for ref, eager, ours in zip(*results):
        assert_close_rule(ours, ref, eager, ref.float().abs().max().item() * 2**-7 * ulps)


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
    assert qk.args[4:6] == (out_dtype, out_dtype)
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


def _assert_one_fused_one_escaping(make, half, reason):
    """`make()` builds a module rotating two tensors, one rotation with an intermediate used elsewhere: the model
    trains as eager, the other rotation fuses, and the escaping one is a near miss whose reason contains `reason`."""
    torch.manual_seed(0)
    m = make()
    x, cos, sin = torch.randn(2, 5, 16, requires_grad=True), torch.randn(1, 5, half), torch.randn(1, 5, half)
    ref = m(x, cos, sin)
    gref = torch.autograd.grad(ref, [x, *m.parameters()])
    out = torch.compile(m, backend="liger")(x, cos, sin)
    g = torch.autograd.grad(out, [x, *m.parameters()])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    for a, b in zip(g, gref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert replaced("rope") == 1
    (miss,) = [m for rec in liger_fx.get_records() for m in rec.misses]
    assert reason in miss.reason, miss.reason


def test_intermediate_of_the_rotation_escaping_is_not_fused():
    _assert_one_fused_one_escaping(SharedRotate, 8, "escapes")


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


# --------------------------------------------------------------------------------------------------------------
# Every way public model code writes RoPE: interleaved pairs, halves rotated with half-width tables and
# joined, complex multiplication, DeepSeek's permutation into halves; full and partial rotary, fp32 and bf16, a
# second sequence length, and an MLA front whose single-head k_pe is broadcast over the query heads. HF's own
# functions where transformers has the form; the others as their model code writes them.


def _deepseek_permute_rope(q, k, cos, sin):
    """transformers 4.x DeepSeek-V2/V3 (rope_interleave): the interleaved pairs permuted into halves, then HF's
    rotate_half; the result stays in halves."""
    def permute(x):
        b, h, s, d = x.shape
        return x.view(b, h, s, d // 2, 2).transpose(4, 3).reshape(b, h, s, d)

    q, k = permute(q), permute(k)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def _halves_join(x, cos, sin):
    """Both halves rotated with half-width tables, then concatenated."""
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def _halves_join_rope(q, k, cos, sin):
    return _halves_join(q, cos, sin), _halves_join(k, cos, sin)


def _lucidrains_rope(q, k, cos, sin):
    """rotary-embedding-torch: `rearrange(x, '... (d r) -> ... d r', r=2).unbind(-1)`, stacked back."""
    def rot(x):
        x1, x2 = x.reshape(*x.shape[:-1], -1, 2).unbind(dim=-1)
        return torch.stack((-x2, x1), dim=-1).reshape(x.shape)

    return q * cos + rot(q) * sin, k * cos + rot(k) * sin


def _chatglm_rope(q, k, cache):
    """ChatGLM2/3: a (T, rd/2, 2) cos/sin cache, each pair rotated and stacked back (x[..., 0] written twice)."""
    def rot(x):
        xs = x.reshape(*x.shape[:-1], -1, 2)
        return torch.stack([xs[..., 0] * cache[..., 0] - xs[..., 1] * cache[..., 1],
                            xs[..., 1] * cache[..., 0] + xs[..., 0] * cache[..., 1]], -1).flatten(3)

    return rot(q), rot(k)


def _meta_rope(xq, xk, freqs_cis):
    """Meta's Llama and torchtitan: (B, T, H, D) q and k, freqs_cis (T, D/2) complex64 reshaped for broadcast."""
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    freqs_cis = freqs_cis.view(1, xq_.shape[1], 1, xq_.shape[-1])
    xq_out = torch.view_as_real(xq_ * freqs_cis).flatten(3)
    xk_out = torch.view_as_real(xk_ * freqs_cis).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


def _unbind_view_rope(q, k, cos, sin):
    """rotate-half through a view and unbind (OLMo's `x.view(B, nh, T, 2, hs // 2).unbind(dim=-2)`)."""
    def rot(x):
        d = x.shape[-1]
        x1, x2 = x.view(*x.shape[:-1], 2, d // 2).unbind(-2)
        return torch.cat((-x2, x1), dim=-1)

    cos, sin = cos[:, None], sin[:, None]
    return q * cos + rot(q) * sin, k * cos + rot(k) * sin


def _complex_halves_rope(xq, xk, freqs_cis):
    """RoPE on the two halves packed as complex numbers, (B, T, H, D) q and k and (T, D/2) complex64 freqs_cis:
    view_as_complex(stack(chunk(x, 2, -1), -1)) * freqs_cis, back through view_as_real and cat(chunk(., 2, -1),
    -2), the trailing 1 squeezed."""
    def rot(x):
        xc = torch.view_as_complex(torch.stack(torch.chunk(x.float(), 2, dim=-1), dim=-1))
        out = torch.view_as_real(xc * freqs_cis.view(1, x.shape[1], 1, -1))
        return torch.cat(torch.chunk(out, 2, dim=-1), dim=-2).squeeze(-1).type_as(x)

    return rot(xq), rot(xk)


def _complex_halves_select_rope(xq, xk, freqs_cis):
    """The same with torch.complex(x1, x2) of the halves, and cat((r[..., 0], r[..., 1]), -1) back."""
    def rot(x):
        h = x.shape[-1] // 2
        xf = x.float()
        r = torch.view_as_real(torch.complex(xf[..., :h], xf[..., h:]) * freqs_cis.view(1, x.shape[1], 1, -1))
        return torch.cat((r[..., 0], r[..., 1]), dim=-1).type_as(x)

    return rot(xq), rot(xk)


def _tables(kind, freqs, dtype):
    """The rotary tables each family's rotary embedding returns, from (T, rd/2) angles."""
    if kind == "halves":  # HF: cat(freqs, freqs), cast to the activations' dtype
        emb = torch.cat((freqs, freqs), dim=-1)[None]
        return emb.cos().to(dtype), emb.sin().to(dtype)
    if kind == "pairs":  # Cohere: repeat_interleave(freqs, 2)
        emb = torch.repeat_interleave(freqs, 2, dim=-1)[None]
        return emb.cos().to(dtype), emb.sin().to(dtype)
    if kind == "half":  # half-width tables
        return freqs.cos().to(dtype)[None, None], freqs.sin().to(dtype)[None, None]
    if kind == "gptj":  # GPT-J: sin, cos of width rd/2, repeat-interleaved inside apply_rotary_pos_emb
        return freqs.sin().to(dtype)[None], freqs.cos().to(dtype)[None]
    if kind == "cache":
        return (torch.stack((freqs.cos(), freqs.sin()), dim=-1).to(dtype),)
    return (torch.polar(torch.ones_like(freqs), freqs)[None] if kind == "complex_hf"
            else torch.polar(torch.ones_like(freqs), freqs),)


# form -> (rotation of (q, k, *tables), table kind, layout (bthd: before the head transpose, as GPT-J and Meta),
#          whether the function slices the rotary dim itself (GLM))
FORMS2 = {
    "gptj": (lambda q, k, sin, cos: (gptj_rope(q, sin, cos), gptj_rope(k, sin, cos)), "gptj", "bthd", False),
    "glm": (glm_rope, "halves", "bhtd", True),
    "cohere": (cohere_rope, "pairs", "bhtd", False),
    "lucidrains": (lambda q, k, cos, sin: _lucidrains_rope(q, k, cos[:, None], sin[:, None]), "pairs", "bhtd", False),
    "deepseek_v3": (deepseek_interleave_rope, "halves", "bhtd", False),
    "deepseek_permute": (_deepseek_permute_rope, "half_permute", "bhtd", False),
    "halves_join": (_halves_join_rope, "half", "bhtd", False),
    "chatglm": (_chatglm_rope, "cache", "bhtd", False),
    "complex_hf": (deepseek_complex_rope, "complex_hf", "bhtd", False),
    "complex_meta": (_meta_rope, "complex_meta", "bthd", False),
    "unbind_view": (_unbind_view_rope, "halves", "bhtd", False),
    "complex_halves": (_complex_halves_rope, "complex_meta", "bthd", False),
    "complex_halves_select": (_complex_halves_select_rope, "complex_meta", "bthd", False),
}


class FormFront(nn.Module):
    """q and k projections rotated by one of FORMS2 over their first `rotary_dim` channels."""

    def __init__(self, form, heads=4, kv_heads=2, head_dim=16, rotary_dim=None, hidden=32):
        super().__init__()
        self.form, self.heads, self.kv_heads, self.head_dim = form, heads, kv_heads, head_dim
        self.rd = rotary_dim or head_dim
        self.q = nn.Linear(hidden, heads * head_dim, bias=False)
        self.k = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, self.rd, 2).float() / self.rd),
                             persistent=False)

    def forward(self, x):
        B, T, _ = x.shape
        fn, kind, layout, slices_itself = FORMS2[self.form]
        freqs = torch.arange(T, device=x.device).float()[:, None] * self.inv_freq[None, :]
        if kind == "half_permute":  # the permuted q is in halves: HF's full-width tables, broadcast over heads
            tables = tuple(t[:, None] for t in _tables("halves", freqs, x.dtype))
        else:
            tables = _tables(kind, freqs, x.dtype)
        q = self.q(x).view(B, T, self.heads, self.head_dim)
        k = self.k(x).view(B, T, self.kv_heads, self.head_dim)
        if layout == "bhtd":
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        if slices_itself:
            qr, kr = fn(q, k, *tables)
        else:
            rd = self.rd
            qr, kr = fn(q[..., :rd], k[..., :rd], *tables)
            qr, kr = torch.cat((qr, q[..., rd:]), dim=-1), torch.cat((kr, k[..., rd:]), dim=-1)
        return qr.float().pow(2).mean() + kr.float().sin().mean()


def assert_all_fused(graphs):
    """q's and k's rotation are one rope_qk launch, and nothing of the rotation is left: no neg, no stack (the
    pairs' join), no complex view, no permuting transpose (only the head transpose of the bhtd layout remains)."""
    ops = targets(graphs)
    assert ops.count(liger.rope_qk.default) == len(graphs) and liger.rope.default not in ops, ops
    for op in (torch.ops.aten.neg.default, torch.ops.aten.sub.Tensor, torch.ops.aten.view_as_complex.default,
               torch.ops.aten.unflatten.int):
        assert op not in ops, op
    assert not [m for rec in liger_fx.get_records() for m in rec.misses if m.flag == "rope"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rotary_dim", [16, 8], ids=["full", "partial"])
@pytest.mark.parametrize("form", list(FORMS2))
def test_every_form_fuses_and_trains_like_eager(form, rotary_dim, dtype, graphs):
    torch.manual_seed(0)
    assert_same(run(FormFront(form, rotary_dim=rotary_dim), torch.randn(2, 7, 32), dtype))
    assert replaced("rope") == 2
    assert_all_fused(graphs)


def _equal_at_two_lengths(m, fn):
    """Sequence lengths 5 and 9: the compiled front's forward and x's grad equal eager's."""
    for t in (5, 9):
        x = torch.randn(2, t, 32)
        xr, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        ref, out = m(xr), fn(xc)
        ref.backward(), out.backward()
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(xc.grad, xr.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("form", list(FORMS2))
def test_every_form_fuses_at_a_dynamic_sequence_length(form):
    """A second length recompiles once with a symbolic T; both graphs fuse both rotations, forward and x's grad equal
    eager's."""
    torch.manual_seed(0)
    m = FormFront(form, rotary_dim=8)
    fn = torch.compile(copy.deepcopy(m), backend="liger")
    _equal_at_two_lengths(m, fn)
    records = liger_fx.get_records()
    assert len(records) == 2, [r.summary() for r in records]
    assert all(r.counts().get("rope") == (2, 2) for r in records), [r.summary() for r in records]


@pytest.mark.parametrize("form", ["unbind_view", "complex_halves", "complex_halves_select", "complex_meta"])
def test_new_forms_fuse_under_dynamic_true(form):
    """`dynamic=True`: one symbolic graph serves both lengths, both rotations fused in it, forward and x's grad equal
    eager's."""
    torch.manual_seed(0)
    m = FormFront(form, rotary_dim=8)
    fn = torch.compile(copy.deepcopy(m), backend="liger", dynamic=True)
    _equal_at_two_lengths(m, fn)
    (record,) = liger_fx.get_records()
    assert record.counts().get("rope") == (2, 2), record.summary()


MLA_FORMS = {"deepseek_v3": FORMS2["deepseek_v3"][:2], "complex_hf": FORMS2["complex_hf"][:2],
             "llama": (llama_rope, "halves")}


class MLAFront(nn.Module):
    """DeepSeek's multi-head latent attention front: per-head q of nope + rd channels, rotated over rd of them
    (`at="head"`: `cat((rope(q[..., :rd]), q[..., rd:]))`; "tail": DeepSeek's own `split([nope, rd])` order), and a
    single-head k_pe of shape (B, 1, T, rd), rotated whole, broadcast over the query heads and joined with the
    per-head k_nope."""

    def __init__(self, form, at, heads=4, nope=8, rd=8, hidden=32):
        super().__init__()
        self.form, self.at, self.heads, self.nope, self.rd = form, at, heads, nope, rd
        self.q = nn.Linear(hidden, heads * (nope + rd), bias=False)
        self.kv = nn.Linear(hidden, heads * nope, bias=False)
        self.k_pe = nn.Linear(hidden, rd, bias=False)
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, rd, 2).float() / rd), persistent=False)

    def forward(self, x):
        B, T, _ = x.shape
        H, nope, rd = self.heads, self.nope, self.rd
        freqs = torch.arange(T, device=x.device).float()[:, None] * self.inv_freq[None, :]
        fn, kind = MLA_FORMS[self.form]
        q = self.q(x).view(B, T, H, nope + rd).transpose(1, 2)
        k_nope = self.kv(x).view(B, T, H, nope).transpose(1, 2)
        k_pe = self.k_pe(x).view(B, 1, T, rd)
        q_rot, q_pass = (q[..., :rd], q[..., rd:]) if self.at == "head" else q.split([nope, rd], dim=-1)[::-1]
        q_rot, k_pe = fn(q_rot, k_pe, *_tables(kind, freqs, x.dtype))
        k_pe = k_pe.expand(B, H, T, rd)
        if self.at == "head":
            q, k = torch.cat((q_rot, q_pass), dim=-1), torch.cat((k_pe, k_nope), dim=-1)
        else:
            q, k = torch.cat((q_pass, q_rot), dim=-1), torch.cat((k_nope, k_pe), dim=-1)
        return (q.float() * k.float()).sum(-1).pow(2).mean()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("at", ["head", "tail"])
@pytest.mark.parametrize("form", list(MLA_FORMS))
def test_mla_single_head_k_broadcast_over_query_heads(form, at, dtype, graphs):
    torch.manual_seed(0)
    # One bf16 ulp of the largest value, not half: this loss couples q and k (q . k), so the weight gradients sum
    # terms of both signs and cancel. Eager's own worst error on q.weight is 1.5 half-ulps of its largest value
    # (0.0038 at max 0.66, deepseek_v3/tail), ours 0.0039, our L2 error 0.0297 vs eager's 0.0288; per element the
    # two round differently (4 of 2048 elements past half an ulp: ours 0.625, fp32 0.6215, eager 0.6211).
    assert_same(run(MLAFront(form, at), torch.randn(2, 7, 32), dtype), ulps=1)
    assert replaced("rope") == 2
    ops = targets(graphs)
    # At the head, the op rotates q's first rd channels and copies the rest (one launch for all of q), and k_pe is
    # narrower than q, so the two stay two launches; at the tail, q's slice and k_pe share one.
    assert ops.count(liger.rope.default) + 2 * ops.count(liger.rope_qk.default) == 2, ops
    assert ops.count(liger.rope_qk.default) == (at == "tail")
    assert not [m for rec in liger_fx.get_records() for m in rec.misses if m.flag == "rope"]


def _unbind_rot(x):
    x1, x2 = x.view(*x.shape[:-1], 2, x.shape[-1] // 2).unbind(-2)
    return torch.cat((-x2, x1), dim=-1)


class EscapingForm(nn.Module):
    """q's rotation has an intermediate that the model uses elsewhere too, so it must stay unfused; k's fuses."""

    def __init__(self, form):
        super().__init__()
        self.form = form
        self.q, self.k = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x, cos, sin):
        q, k = self.q(x).unflatten(-1, (2, 8)), self.k(x).unflatten(-1, (2, 8))  # (B, T, H, D), as GPT-J
        if self.form == "pairs":  # GPT-J's rotate_every_two(q) reused
            cos, sin = cos.repeat_interleave(2, -1)[:, :, None], sin.repeat_interleave(2, -1)[:, :, None]
            rq = rotate_every_two(q)
            qe, ke = q * cos + rq * sin, k * cos + rotate_every_two(k) * sin
            extra = rq
        elif self.form == "join":  # x1 * cos of the join form reused
            cos, sin = cos[:, :, None], sin[:, :, None]
            q1, q2 = q[..., :4], q[..., 4:]
            q1c = q1 * cos
            qe, ke = torch.cat((q1c - q2 * sin, q2 * cos + q1 * sin), -1), _halves_join(k, cos, sin)
            extra = q1c
        elif self.form == "unbind":  # the rotate-half through a view and unbind, reused
            cos, sin = torch.cat((cos, cos), -1)[:, :, None], torch.cat((sin, sin), -1)[:, :, None]
            rq = _unbind_rot(q)
            qe, ke = q * cos + rq * sin, k * cos + _unbind_rot(k) * sin
            extra = rq
        elif self.form == "complex_halves":  # the complex product of the packed halves reused
            f = torch.polar(cos, sin)[:, :, None]
            prod = torch.view_as_complex(torch.stack(q.chunk(2, -1), -1)) * f
            qe = torch.cat(torch.view_as_real(prod).chunk(2, -1), -2).squeeze(-1)
            ke = torch.cat(torch.view_as_real(torch.view_as_complex(torch.stack(k.chunk(2, -1), -1)) * f)
                           .chunk(2, -1), -2).squeeze(-1)
            extra = prod.abs()
        else:  # the complex product reused
            f = torch.polar(cos, sin)[:, :, None]
            prod = torch.view_as_complex(q.reshape(*q.shape[:-1], -1, 2)) * f
            qe = torch.view_as_real(prod).flatten(3)
            ke = torch.view_as_real(torch.view_as_complex(k.reshape(*k.shape[:-1], -1, 2)) * f).flatten(3)
            extra = prod.abs()
        return (qe * ke).sum() + extra.pow(2).sum()


@pytest.mark.parametrize("form, reason", [
    ("pairs", "escapes the pattern"),
    ("join", "an intermediate of the rotation is used outside it"),
    ("complex", "the complex product is not viewed back as real (or is used elsewhere)"),
    ("unbind", "rotate_half(x) has 2 users; it escapes the pattern"),
    ("complex_halves", "the complex product is not viewed back as real (or is used elsewhere)"),
])
def test_intermediate_of_a_new_form_escaping_is_not_fused(form, reason):
    _assert_one_fused_one_escaping(lambda: EscapingForm(form), 4, reason)


class Guarded(nn.Module):
    """Rotations that must stay unfused, each for a reason the record names."""

    def __init__(self, case):
        super().__init__()
        self.case = case

    def forward(self, q, freqs):
        if self.case == "complex128":  # fp64 tables: eager computes the product in fp64, the op in fp32
            f = torch.polar(torch.ones_like(freqs), freqs)[:, None]
            return torch.view_as_real(torch.view_as_complex(q.reshape(*q.shape[:-1], -1, 2)) * f).flatten(3)
        if self.case == "float64":
            emb = torch.cat((freqs, freqs), -1)[:, None]
            return q * emb.cos() + rotate_half(q) * emb.sin()
        # modded-nanogpt's sign convention: the rotation by -sin
        cos, sin = freqs.cos()[:, None], freqs.sin()[:, None]
        x1, x2 = q[..., :4], q[..., 4:]
        return torch.cat((x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos), 3)


@pytest.mark.parametrize("case, dtype, reason", [
    ("complex128", torch.float64, "only complex64"),
    ("float64", torch.float64, "float64 operands: the op computes in fp32"),
    ("minus_sin", torch.float32, "the rotation by -sin"),
])
def test_forms_that_cannot_be_fused_are_near_misses_with_reasons(case, dtype, reason):
    q, freqs = torch.randn(2, 3, 5, 8, dtype=dtype), torch.randn(1, 5, 4, dtype=dtype)
    torch.testing.assert_close(torch.compile(Guarded(case), backend="liger")(q, freqs), Guarded(case)(q, freqs))
    assert replaced("rope") == 0
    (miss,) = [m for rec in liger_fx.get_records() for m in rec.misses]
    assert reason in miss.reason, miss.reason


class HalvesGuarded(nn.Module):
    """Complex RoPE on halves, spelled in ways that are not the rotation of x's halves, each a near miss whose reason
    names the cause."""

    def __init__(self, case):
        super().__init__()
        self.case = case

    def forward(self, q, k, freqs):
        f = torch.polar(torch.ones_like(freqs), freqs)[:, None]
        if self.case == "not_halves":  # x[..., :4] and x[..., 2:6] of width 8
            xc = torch.view_as_complex(torch.stack((q[..., :4], q[..., 2:6]), -1))
        elif self.case == "two_tensors":  # real part from q, imaginary part from k
            xc = torch.view_as_complex(torch.stack((q[..., :4], k[..., 4:]), -1))
        elif self.case == "strided":  # the even and odd channels stacked: pairs, in a spelling no pattern has
            xc = torch.view_as_complex(torch.stack((q[..., 0::2], q[..., 1::2]), -1))
        else:
            xc = torch.view_as_complex(torch.stack(q.chunk(2, -1), -1))
        r = torch.view_as_real(xc * f)
        if self.case == "pairs_out":  # halves in, interleaved pairs out
            return r.flatten(-2)
        return torch.cat(r.chunk(2, -1), -2).squeeze(-1)


@pytest.mark.parametrize("case, reason", [
    ("not_halves", "the complex numbers pack x[..., 0:..] and x[..., 2:] of width 8: not its halves"),
    ("two_tensors", "the real and imaginary parts packed as complex are parts of two different tensors"),
    ("strided", "complex numbers packed from x's strided parts, not its halves"),
    ("pairs_out", "view_as_real(x * freqs_cis) is not joined back into halves"),
])
def test_complex_halves_that_cannot_be_fused_are_near_misses_with_reasons(case, reason):
    q, k, freqs = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8), torch.randn(1, 5, 4)
    m = HalvesGuarded(case)
    torch.testing.assert_close(torch.compile(m, backend="liger")(q, k, freqs), m(q, k, freqs))
    assert replaced("rope") == 0
    (miss,) = [m for rec in liger_fx.get_records() for m in rec.misses]
    assert reason in miss.reason, miss.reason


def test_complex_halves_form_was_not_matched_as_pairs():
    """Before the halves form existed its near miss said 'view_as_complex of something other than x's pairs'. A
    view_as_complex of neither the pairs nor the stacked halves still says so, naming both."""
    class Other(nn.Module):
        def forward(self, q, freqs):
            f = torch.polar(torch.ones_like(freqs), freqs)[:, None]
            u = q.view(*q.shape[:-1], 2, 4).transpose(-1, -2).contiguous()  # halves as pairs, through a copy
            return torch.view_as_real(torch.view_as_complex(u) * f).flatten(-2)

    q, freqs = torch.randn(2, 3, 5, 8), torch.randn(1, 5, 4)
    torch.testing.assert_close(torch.compile(Other(), backend="liger")(q, freqs), Other()(q, freqs))
    (miss,) = [m for rec in liger_fx.get_records() for m in rec.misses]
    assert "view_as_complex of something other than x's pairs" in miss.reason and "halves" in miss.reason, miss.reason
