"""Bugs the fallback used to hide: each made the backend warn and compile a graph with plain Inductor, so the model
trained unfused. A fallback is a bug to fix; each test here checks the graph is now rewritten (no fallback, every
candidate replaced) and that the step equals eager."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import liger_fx


def _no_fallback_all_replaced(expect: dict[str, int] | None = None) -> dict[str, tuple[int, int]]:
    """Every compiled graph was rewritten (no fallback) and every candidate replaced; returns flag -> (replaced,
    candidates) over all graphs."""
    records = liger_fx.get_records()
    assert records
    assert not [r.fallback for r in records if r.fallback], [r.summary() for r in records]
    totals: dict[str, list[int]] = {}
    for r in records:
        for flag, (done, total) in r.counts().items():
            t = totals.setdefault(flag, [0, 0])
            t[0] += done
            t[1] += total
    assert all(done == total for done, total in totals.values()), totals
    for flag, n in (expect or {}).items():
        assert totals.get(flag, [0])[0] == n, (flag, totals)
    return {k: (v[0], v[1]) for k, v in totals.items()}


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


# --------------------------------------------------------------------------------------------------------------
# torch.vmap in the model: transformers 5.25 builds Gemma3's sliding-window mask for an image with it.


class VmapMasked(nn.Module):
    """An RMSNorm, then attention under a mask that torch.vmap builds from the token ids: tokens attend to earlier
    tokens of the same id. The mask depends on the input; a retrace that loses the vmap would bake in the first
    batch's."""

    def __init__(self, dim: int = 32):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(dim) + 0.5)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, ids):
        t = x.shape[1]

        def row(q):
            k = torch.arange(t)
            return (ids[:, k] == ids[:, q][:, None]) & (k <= q)

        mask = torch.vmap(row, out_dims=1)(torch.arange(t))[:, None]  # (B, 1, T, T)
        h = x.float()
        h = self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))
        q = self.proj(h)[:, None]
        return F.scaled_dot_product_attention(q, q, q, attn_mask=mask)


def _vmap_step(model, x, ids):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = model(x, ids)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return out.detach(), x.grad, _grads(getattr(model, "_orig_mod", model))


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_vmap_in_the_graph_is_retraced_not_baked_in(dynamic):
    """Dynamo writes a vmap as `_add_batch_dim`, the body, `_remove_batch_dim`; retraced to ATen, they ran for real
    below the tracer and the vmap's output became a constant, a FakeTensor attribute that AOTAutograd refused
    ("expected FakeTensor for arg"): the whole graph fell back. Now the vmap stays in the graph, and the mask of a
    second batch is that batch's."""
    torch.manual_seed(0)
    model = VmapMasked()
    compiled = torch.compile(copy.deepcopy(model), backend="liger", dynamic=dynamic)
    for seed, t in ((1, 12), (2, 12), (3, 9)):  # new ids (a new mask), then a new length
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(2, t, 32, generator=g)
        ids = torch.randint(0, 3, (2, t), generator=g)
        ref, ref_dx, ref_grads = _vmap_step(model, x, ids)
        out, dx, grads = _vmap_step(compiled, x, ids)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(dx, ref_dx, atol=1e-5, rtol=1e-4)
        assert set(grads) == set(ref_grads)
        for name in ref_grads:
            torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    _no_fallback_all_replaced({"rms_norm": len(liger_fx.get_records())})


def _gemma3_with_image():
    """A tiny Gemma3 vision-language model (SigLIP tower, 2 text layers: one sliding, one full attention) and a batch
    with one image of 4 soft tokens per sample, marked in token_type_ids as the processor does."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    cfg = Gemma3Config(
        text_config=dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=32,
                         layer_types=["sliding_attention", "full_attention"], max_position_embeddings=256),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=56, patch_size=14),
        mm_tokens_per_image=4, image_token_index=120, boi_token_index=118, eoi_token_index=119)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(cfg).float().train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 100, (2, 16), generator=g)
    ids[:, 2], ids[:, 3:7], ids[:, 7] = 118, 120, 119
    labels = ids.masked_fill(ids == 120, -100)
    batch = dict(input_ids=ids, labels=labels, pixel_values=torch.randn(2, 3, 56, 56, generator=g),
                 token_type_ids=(ids == 120).long())
    return model, batch


@pytest.mark.slow
def test_gemma3_with_an_image_fuses_every_site():
    """With an image, transformers builds the sliding-window layer's mask with torch.vmap; the rewrite of the
    language model's graph fell back ("expected FakeTensor for arg", the mask lifted as `_tensor_constant7`) while
    the same model without an image fused every site."""
    model, batch = _gemma3_with_image()
    compiled = torch.compile(copy.deepcopy(model), backend="liger")
    ref = model(**batch)
    ref.loss.backward()
    out = compiled(**batch)
    out.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-4)
    ref_grads, grads = _grads(model), _grads(compiled._orig_mod)
    assert set(grads) == set(ref_grads)
    for name in ref_grads:
        # atol scaled by the gradient's magnitude: the image projector's reaches 403, where fp32 reordering moves
        # elements by 2.7e-4 under plain Inductor (1.8e-4 here), 7e-7 of the largest.
        scale = max(1.0, ref_grads[name].abs().max().item())
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5 * scale, rtol=1e-4,
                                   msg=lambda m: f"{name}: {m}")
    # 2 layers x (4 norms + q/k norms) + the final norm + the vision projector's soft-embedding norm
    _no_fallback_all_replaced({"rms_norm": 14, "rope": 4, "geglu": 2, "fused_linear_cross_entropy": 1})


# --------------------------------------------------------------------------------------------------------------
# `param.data` in the forward: Gemma-3n clamps `self.prediction_coefs.weight.data` in place at every step.


class ClampsItsData(nn.Module):
    def __init__(self, dim: int = 16):
        super().__init__()
        self.norm_weight = nn.Parameter(torch.rand(dim) + 0.5)
        self.coefs = nn.Parameter(torch.linspace(-3, 3, dim * dim).view(dim, dim))

    def forward(self, x):
        self.coefs.data.clamp_(-2.0, 2.0)
        h = x.float()
        h = self.norm_weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))
        return h @ self.coefs


def test_param_data_mutated_in_the_forward_is_traced_not_lifted():
    """`.data` makes its tensor below the dispatcher: the retrace lifted it as a FakeTensor constant aliasing the
    parameter, and AOTAutograd refused the graph ("non-differentiable view input mutations"). Now it is a node of
    the graph: the norm fuses, the real parameter is clamped, and the step equals eager."""
    torch.manual_seed(0)
    model = ClampsItsData()
    compiled = torch.compile(copy.deepcopy(model), backend="liger")
    x = torch.randn(2, 5, 16)
    ref = (model(x) * torch.linspace(-1, 1, 16)).sum()
    ref.backward()
    out = (compiled(x) * torch.linspace(-1, 1, 16)).sum()
    out.backward()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    mine = compiled._orig_mod
    torch.testing.assert_close(mine.coefs.detach(), model.coefs.detach())  # clamped in place, as eager
    assert mine.coefs.abs().max().item() == 2.0
    for (name, p), q in zip(model.named_parameters(), mine.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)
    _no_fallback_all_replaced({"rms_norm": 1})


# --------------------------------------------------------------------------------------------------------------
# A norm without a weight, scaled by a Python float


class ScaledWeightlessNorm(nn.Module):
    def forward(self, x):
        h = x.float()
        y = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return (2.0 * y).to(x.dtype)


def test_weightless_norm_times_a_float_is_not_a_fallback():
    """The norm pattern's `w * y` bound w to the float 2.0 and its guard read `w.meta`: AttributeError ("'float'
    object has no attribute 'meta'"), and the whole graph fell back to plain Inductor. Now the graph is rewritten:
    the norm fuses, or it is a near miss that names the constant; either way the result equals eager."""
    x = torch.randn(2, 5, 16, requires_grad=True)
    ref = ScaledWeightlessNorm()(x)
    (ref * torch.linspace(-1, 1, 16)).sum().backward()
    ref_dx, x.grad = x.grad, None
    out = torch.compile(ScaledWeightlessNorm(), backend="liger")(x)
    (out * torch.linspace(-1, 1, 16)).sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(x.grad, ref_dx, atol=1e-5, rtol=1e-4)
    (record,) = liger_fx.get_records()
    assert record.fallback is None, record.summary()
    assert [r.flag for r in record.replaced] == ["rms_norm"] or [
        m.reason for m in record.misses if "constant 2.0" in m.reason]
