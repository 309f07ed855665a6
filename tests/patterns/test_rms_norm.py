import logging

import pytest
import torch
import torch.nn as nn

import liger_fx
from liger_fx.models import mini_model
from tests.helpers import batch, compare_training, replaced

# RMSNorm sites per tiny model (2 layers): input + post-attention norm per layer, the final norm, and for Qwen3
# a q_norm and k_norm per layer.
SITES = {"llama": 5, "gemma": 5, "qwen3": 9}


@pytest.mark.parametrize("model_type", sorted(SITES))
def test_training_matches_eager_and_every_norm_is_fused(model_type):
    model = mini_model(model_type)
    ids, labels = batch(model.config.vocab_size)
    compare_training(model, ids, labels)
    assert replaced("rms_norm") == SITES[model_type]
    ops = [r.pattern for rec in liger_fx.get_records() for r in rec.replaced if r.flag == "rms_norm"]
    form = "gemma" if model_type == "gemma" else "llama"
    assert all(f"/{form}/" in p for p in ops), ops


@pytest.mark.parametrize("model_type", ["llama", "gemma"])
def test_inference_matches(model_type):
    model = mini_model(model_type).eval()
    ids, _ = batch(model.config.vocab_size)
    with torch.no_grad():
        ref = model(ids).logits
        out = torch.compile(model, backend="liger")(ids).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    assert replaced("rms_norm") == SITES[model_type]


def test_flag_off_gives_no_replacement_and_same_numbers():
    model = mini_model("llama")
    ids, labels = batch(model.config.vocab_size)
    compare_training(model, ids, labels, options={"rms_norm": False})
    assert replaced("rms_norm") == 0
    misses = [m for rec in liger_fx.get_records() for m in rec.misses if m.flag == "rms_norm"]
    assert len(misses) == SITES["llama"] and all("flag 'rms_norm' is off" in m.reason for m in misses)


def test_three_sequence_lengths_compile_at_most_twice():
    model = mini_model("llama")
    fn = torch.compile(model, backend="liger")
    graphs_first = None
    for t in (16, 24, 40):
        ids, labels = batch(model.config.vocab_size, t=t)
        fn(input_ids=ids, labels=labels).loss.backward()
        graphs_first = graphs_first or len(liger_fx.get_records())  # graphs of one compilation
    assert len(liger_fx.get_records()) <= 2 * graphs_first, [r.summary() for r in liger_fx.get_records()]
    # the dynamic-shape graph was rewritten too
    assert all(r.counts().get("rms_norm") == (5, 5) for r in liger_fx.get_records())


class EscapingNorm(nn.Module):
    """The normalized tensor is also used after the weight multiply: the pattern must not swallow it."""

    def __init__(self, n=32):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n))
        self.proj = nn.Linear(n, n)

    def forward(self, x):
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
        return (self.weight * normed + self.proj(normed)).sum()


def test_escaping_intermediate_keeps_numerics_and_is_reported():
    torch.manual_seed(0)
    m = EscapingNorm()
    x = torch.randn(3, 7, 32, requires_grad=True)
    ref = m(x)
    gx_ref, = torch.autograd.grad(ref, x)
    out = torch.compile(m, backend="liger")(x)
    gx, = torch.autograd.grad(out, x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gx, gx_ref, atol=1e-5, rtol=1e-4)
    assert replaced("rms_norm") == 0
    (miss,) = [m for rec in liger_fx.get_records() for m in rec.misses]
    assert "escapes" in miss.reason or "users" in miss.reason, miss.reason


class WrongAxisNorm(nn.Module):
    def __init__(self, n=32):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n))

    def forward(self, x):
        normed = x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-6)  # reduces over T, not the hidden dim
        return self.weight * normed


def test_reduction_over_non_last_dim_is_a_near_miss_with_reason():
    torch.manual_seed(0)
    m = WrongAxisNorm()
    x = torch.randn(3, 7, 32)
    out = torch.compile(m, backend="liger")(x)
    torch.testing.assert_close(out, m(x), atol=1e-5, rtol=1e-4)
    assert replaced("rms_norm") == 0
    (miss,) = [m for rec in liger_fx.get_records() for m in rec.misses]
    assert "reduces dims [-2]" in miss.reason, miss.reason


def test_eps_is_captured_not_fixed():
    class Norm(nn.Module):
        def __init__(self, eps):
            super().__init__()
            self.eps, self.weight = eps, nn.Parameter(torch.rand(16) + 0.5)

        def forward(self, x):
            return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    x = torch.randn(4, 16) * 1e-2  # small activations make eps matter
    for eps in (1e-2, 1e-6):
        torch._dynamo.reset()
        m = Norm(eps)
        torch.testing.assert_close(torch.compile(m, backend="liger")(x), m(x), atol=1e-6, rtol=1e-5)
    assert replaced("rms_norm") == 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_is_fused_and_within_torch_error(dtype):
    """In bf16/fp16 the casts are real; the llama variant of that dtype must match. The fused loss must be as close to
    the fp32 model's as eager's is (STYLE's rule, on the loss)."""
    from tests.tolerance import assert_close_rule

    model32 = mini_model("llama")
    ids, labels = batch(model32.config.vocab_size)
    ref32 = model32(input_ids=ids, labels=labels).loss.detach()
    model = mini_model("llama").to(dtype)
    eager = model(input_ids=ids, labels=labels).loss.detach()
    out = torch.compile(model, backend="liger")(input_ids=ids, labels=labels).loss.detach()
    assert replaced("rms_norm") == 5
    assert_close_rule(out, ref32, eager, atol=1e-2, name=f"loss {dtype}")


class TransposedNorm(nn.Module):
    """A norm on a transposed view (Gemma3's q/k norms run on (B, H, T, D) transposes): the op's real output must
    have the strides its fake promised, or Inductor's stride assertion fails at run time."""

    def __init__(self, n=16):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(n) + 0.5)
        self.proj = nn.Linear(n, n)

    def forward(self, x):
        x = self.proj(x).transpose(1, 2)
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)


def test_norm_of_transposed_view_trains():
    torch.manual_seed(0)
    m = TransposedNorm()
    x = torch.randn(2, 5, 3, 16)
    ref = m(x).sum()
    (gw_ref,) = torch.autograd.grad(ref, m.weight)
    out = torch.compile(m, backend="liger")(x).sum()
    (gw,) = torch.autograd.grad(out, m.weight)
    assert replaced("rms_norm") == 1
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gw, gw_ref, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# dynamic=True: Dynamo makes a float attribute (the eps) a graph input, a 0-d fp64 tensor read by `aten.item`


class SharedEpsNorms(nn.Module):
    """Two norms reading one float attribute, the way an HF norm keeps `variance_epsilon`."""

    def __init__(self, n=16, eps=1e-2):
        super().__init__()
        self.w1, self.w2 = nn.Parameter(torch.rand(n) + 0.5), nn.Parameter(torch.rand(n) + 0.5)
        self.eps = eps

    def _norm(self, x, w):
        xf = x.float()
        return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    def forward(self, x):
        return self._norm(self._norm(x, self.w1) * 1e-2, self.w2)


def test_dynamic_eps_is_fused_and_pinned_by_a_guard():
    """The fused op takes the eps it was compiled with as a constant; a guard makes a new eps recompile (as a static
    compile does) instead of reusing it. Activations of ~1e-2 make eps matter: mean(x^2) ~1e-4 against 1e-2."""
    torch.manual_seed(0)
    m = SharedEpsNorms()
    x = (torch.randn(3, 5, 16) * 1e-2).requires_grad_()
    fn = torch.compile(m, backend="liger", dynamic=True)
    for eps in (1e-2, 1e-6, 1e-2):  # the third reuses the first graph
        m.eps = eps
        params = (x, m.w1, m.w2)
        ref = m(x).sum()
        ref_grads = torch.autograd.grad(ref, params)
        out = fn(x).sum()
        grads = torch.autograd.grad(out, params)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)
    records = liger_fx.get_records()
    assert [r.counts() for r in records] == [{"rms_norm": (2, 2)}] * 2, [r.summary() for r in records]
    assert replaced("rms_norm") == 4


class BufferEpsNorm(nn.Module):
    def __init__(self, n=16):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(n) + 0.5)
        self.register_buffer("eps", torch.tensor(1e-6))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))


def test_tensor_eps_stays_a_near_miss_under_dynamic():
    """A real tensor eps (a buffer) is not a float input of the graph: no constant to pin, so no fusion."""
    m = BufferEpsNorm()
    x = torch.randn(3, 5, 16)
    out = torch.compile(m, backend="liger", dynamic=True)(x)
    torch.testing.assert_close(out, m(x), atol=1e-5, rtol=1e-4)
    assert replaced("rms_norm") == 0
    (miss,) = [m for rec in liger_fx.get_records() for m in rec.misses]
    assert "eps or offset is a tensor" in miss.reason, miss.reason
