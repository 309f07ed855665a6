import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

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
    """An intermediate of the norm is used outside it: the pattern must not swallow it. `escape` names which: the
    rstd (`rsqrt`) or the variance (the mean of squares). (The normalized tensor itself is no such intermediate: it
    is the no-weight form's output, test_fp32_normalized_tensor_used_twice_fuses_the_normalization.)"""

    def __init__(self, escape, n=32):
        super().__init__()
        self.escape = escape
        self.weight = nn.Parameter(torch.randn(n))
        self.proj = nn.Linear(n, n)

    def forward(self, x):
        xf = x.float()
        var = xf.pow(2).mean(-1, keepdim=True)
        rstd = torch.rsqrt(var + 1e-6)
        out = self.weight * (xf * rstd).to(x.dtype)
        return self.proj(out).float().sum() + (rstd if self.escape == "rstd" else var).sin().sum()


@pytest.mark.parametrize("escape, dtype, reason", [
    ("rstd", torch.float32, "rsqrt has 2 users; the normalization is shared outside one norm"),
    ("rstd", torch.bfloat16, "rsqrt has 2 users; the normalization is shared outside one norm"),
    ("variance", torch.float32, "the mean of squares (the variance) is used outside the norm"),
])
def test_escaping_intermediate_keeps_numerics_and_is_reported(escape, dtype, reason):
    torch.manual_seed(0)
    m = EscapingNorm(escape).to(dtype)
    x = torch.randn(3, 7, 32, dtype=dtype, requires_grad=True)
    ref = m(x)
    gx_ref, = torch.autograd.grad(ref, x)
    out = torch.compile(m, backend="liger")(x)
    gx, = torch.autograd.grad(out, x)
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)  # same ops as eager
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(gx, gx_ref, **tol)
    assert replaced("rms_norm") == 0
    (miss,) = [m for rec in liger_fx.get_records() for m in rec.misses]
    assert reason in miss.reason, miss.reason


def test_fp32_normalized_tensor_used_twice_fuses_the_normalization():
    """In fp32 the normalized tensor itself is what the no-weight form produces: the op normalizes, and the weight
    multiply and the other use read its output (nothing inside the op escapes)."""
    torch.manual_seed(0)

    class Twice(nn.Module):
        def __init__(self, n=32):
            super().__init__()
            self.weight, self.proj = nn.Parameter(torch.randn(n)), nn.Linear(n, n)

        def forward(self, x):
            normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
            return (self.weight * normed + self.proj(normed)).sum()

    m = Twice()
    x = torch.randn(3, 7, 32, requires_grad=True)
    ref = m(x)
    refs = torch.autograd.grad(ref, [x, *m.parameters()])
    out = torch.compile(m, backend="liger")(x)
    grads = torch.autograd.grad(out, [x, *m.parameters()])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    for g, r in zip(grads, refs):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)
    patterns = [r.pattern for rec in liger_fx.get_records() for r in rec.replaced]
    assert patterns == ["rms_norm/noweight/float32"], patterns


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


# ---------------------------------------------------------------------------------------------------------------
# RMSNorm as PyTorch-native trainers write it: torch's own nn.RMSNorm / F.rms_norm (with and without a weight, eps
# None), per-head q/k norms on (B, T, H, D) views, MLA's q/kv norms, bodies under `torch.autocast(dev,
# enabled=False)` (OLMo-style), lit-gpt's fp32 weight multiply, Meta's/gpt-fast's `_norm(x.float()).type_as(x) *
# weight`, Llama-4's weightless q/k norm, DeepSeek-V4's weightless norm with its rstd rounded first.


def _olmo_body(h, eps):
    """An OLMo-style body: autocast off, upcast, normalize, cast back (the weight multiply is the caller's)."""
    with torch.autocast(h.device.type, enabled=False):
        og_dtype = h.dtype
        h = h.to(torch.float32)
        variance = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(variance + eps)
        return h.to(og_dtype)


def _autocast_off_body(h, weight, eps):
    """The form of the table: x.pow(2).mean(-1, keepdim=True), x * rsqrt(var + eps), weight.type_as(x) * x,
    .to(dtype), all inside torch.autocast(dev, enabled=False)."""
    with torch.autocast(h.device.type, enabled=False):
        dtype = h.dtype
        h = h.float()
        var = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(var + eps)
        return (weight.type_as(h) * h).to(dtype)


class NormFront(nn.Module):
    """A projection, then one of FORMS' norms (per-head on a (B, T, H, D) view for the q/k forms), then a loss."""

    def __init__(self, form, hidden=32, heads=4, eps=1e-5):
        super().__init__()
        self.form, self.heads, self.eps = form, heads, eps
        self.proj = nn.Linear(hidden, 2 * hidden, bias=False)
        if form in ("functional", "fused_op", "autocast_off", "olmo", "litgpt", "meta"):  # a weight of its own
            self.weight = nn.Parameter(torch.rand(2 * hidden) + 0.5)
        d = 2 * hidden // heads
        self.norm = {
            "nn": lambda: nn.RMSNorm(2 * hidden, eps=1e-5),
            "nn_noaffine": lambda: nn.RMSNorm(2 * hidden, elementwise_affine=False),  # eps None: finfo(dtype).eps
            "qk_heads": lambda: nn.ModuleList([nn.RMSNorm(d, eps=1e-6), nn.RMSNorm(d, eps=1e-6)]),
            "mla": lambda: nn.ModuleList([nn.RMSNorm(hidden, eps=1e-6), nn.RMSNorm(hidden - 8, eps=1e-6)]),
        }.get(form, nn.Identity)()
        with torch.no_grad():  # weights other than ones, so a weight applied wrongly shows
            for p in self.norm.parameters():
                p.uniform_(0.5, 1.5)

    def forward(self, x):
        h = self.proj(x)
        B, T, _ = h.shape
        f = self.form
        if f in ("nn", "nn_noaffine"):
            out = self.norm(h)
        elif f == "functional":
            out = F.rms_norm(h, (h.shape[-1],), self.weight, None)
        elif f == "fused_op":  # the op F.rms_norm dispatches to (CUDA's kernel; its composite on the CPU)
            out = torch.ops.aten._fused_rms_norm(h, [h.shape[-1]], self.weight, 1e-6)[0]
        elif f == "qk_heads":  # torchtitan/OLMo-style q/k norms over each head
            q, k = h.view(B, T, self.heads, -1), h.flip(-1).view(B, T, self.heads, -1)
            out = torch.cat((self.norm[0](q), self.norm[1](k)), -1).flatten(-2)
        elif f == "mla":  # DeepSeek-V2/V3 reference code: q_a_norm, and kv_a_norm on the compressed kv slice
            q_a, kv = h.split([h.shape[-1] // 2, h.shape[-1] // 2], -1)
            out = torch.cat((self.norm[0](q_a), self.norm[1](kv[..., :-8]), kv[..., -8:]), -1)
        elif f == "autocast_off":
            out = _autocast_off_body(h, self.weight, self.eps)
        elif f == "olmo":
            out = self.weight * _olmo_body(h, self.eps)
        elif f == "litgpt":  # lit-gpt's RMSNorm
            dtype, hf = h.dtype, h.float()
            x_normed = hf * torch.rsqrt(torch.mean(hf * hf, dim=-1, keepdim=True) + self.eps)
            out = (x_normed * self.weight.float()).to(dtype=dtype)
        elif f == "meta":  # Meta's Llama and gpt-fast
            hf = h.float()
            out = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(h) * self.weight
        elif f == "llama4":  # Llama4TextL2Norm: no weight
            hf = h.float()
            out = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(h)
        else:  # DeepseekV4UnweightedRMSNorm: no weight, the rstd rounded to h's dtype first
            out = h * torch.rsqrt(h.float().square().mean(-1, keepdim=True) + self.eps).to(h.dtype)
        return out.float().pow(2).mean() + out.float().sin().mean()


NORM_FORMS = {"nn": 1, "nn_noaffine": 1, "functional": 1, "fused_op": 1, "qk_heads": 2, "mla": 2,
              "autocast_off": 1, "olmo": 1, "litgpt": 1, "meta": 1, "llama4": 1, "dsv4": 1}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("form", list(NORM_FORMS))
def test_native_norm_forms_fuse_and_train_like_eager(form, dtype):
    from tests.patterns.test_rope import assert_same, run

    torch.manual_seed(0)
    # bf16: one bf16 ulp of the largest value (see test_rope.assert_same): the fused op rounds once where eager
    # rounds the normalized value, then the product (llama, meta, olmo) or the rstd, then the product (dsv4).
    assert_same(run(NormFront(form), torch.randn(2, 7, 32), dtype), ulps=1)
    assert replaced("rms_norm") == NORM_FORMS[form]
    assert not [m for rec in liger_fx.get_records() for m in rec.misses], [r.summary() for r in liger_fx.get_records()]


@pytest.mark.parametrize("form", ["nn", "nn_noaffine", "autocast_off", "llama4", "dsv4", "qk_heads"])
def test_native_norm_forms_in_inference(form):
    torch.manual_seed(0)
    m = NormFront(form)
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(m, backend="liger")(x), m(x), atol=1e-5, rtol=1e-4)
    assert replaced("rms_norm") == NORM_FORMS[form]


@pytest.mark.parametrize("dynamic", [True, None], ids=["dynamic_true", "automatic"])
@pytest.mark.parametrize("form", ["nn", "nn_noaffine", "functional", "autocast_off", "llama4", "dsv4", "mla"])
def test_native_norm_forms_fuse_at_dynamic_sequence_lengths(form, dynamic):
    """dynamic=True: one symbolic graph for every length; automatic: a second length recompiles once with a
    symbolic T, a third reuses it. Every graph fuses every norm; forward and x's grad equal eager's."""
    torch.manual_seed(0)
    m = NormFront(form)
    fn = torch.compile(m, backend="liger", dynamic=dynamic)
    for t in (5, 9, 13):
        xr, xc = torch.randn(2, t, 32).requires_grad_(), None
        xc = xr.detach().clone().requires_grad_()
        ref, out = m(xr), fn(xc)
        ref.backward(), out.backward()
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(xc.grad, xr.grad, atol=1e-5, rtol=1e-4)
    records = liger_fx.get_records()
    assert len(records) == (1 if dynamic else 2), [r.summary() for r in records]
    assert all(r.counts().get("rms_norm") == (NORM_FORMS[form],) * 2 for r in records), [r.summary() for r in records]


class AutocastFront(nn.Module):
    """bf16 autocast entered inside the graph, the norm body in a region that disables it (OLMo-style): the norm's
    input comes from a linear under autocast, traced fp32 but bf16 at run time, so its `.to(torch.float32)` is a
    real cast and must stay."""

    def __init__(self, n=32):
        super().__init__()
        self.proj, self.out = nn.Linear(n, n), nn.Linear(n, n)
        self.weight = nn.Parameter(torch.rand(n) + 0.5)

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = self.proj(x)
            y = self.weight * _olmo_body(h, 1e-6)
            return self.out(y).float().pow(2).mean()


def test_norm_inside_an_enabled_autocast_region_keeps_the_real_casts_and_matches_eager():
    torch.manual_seed(0)
    m = AutocastFront()
    x = torch.randn(2, 7, 32)
    ref = m(x)
    refs = torch.autograd.grad(ref, list(m.parameters()))
    out = torch.compile(m, backend="liger")(x)
    grads = torch.autograd.grad(out, list(m.parameters()))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)  # the same bf16 ops in both
    for g, r in zip(grads, refs):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-3)
    assert replaced("rms_norm") == 1


def test_autocast_kept_casts_are_the_unknown_dtypes_only():
    """canonicalize.normalize_casts: in a graph that enters autocast, a no-op cast of a value computed under enabled
    autocast stays (marked), one of a value whose dtype is the traced one goes."""
    from liger_fx.canonicalize import to_aten

    seen = []

    def backend(gm, example_inputs):
        seen.append(to_aten(gm, example_inputs))
        return gm

    torch.compile(AutocastFront(), backend=backend)(torch.randn(2, 7, 32))
    casts = [n for n in seen[0].graph.nodes if n.target is torch.ops.aten.to.dtype]
    kept = [n for n in casts if n.meta.get("autocast_kept")]
    # Kept: h.to(float32) in the norm and the loss's .float(), each of an autocast linear's output (real casts:
    # bf16 -> fp32). Also there, not a no-op: the norm's .to(og_dtype), og_dtype being the bf16 Dynamo saw.
    # Dropped: nothing else was a cast of an unknown dtype.
    linears = [n for n in seen[0].graph.nodes if n.target is torch.ops.aten.linear.default]
    assert [n.args for n in kept] == [(lin, torch.float32) for lin in linears], [(n.name, n.args) for n in casts]
    assert [n.args[1] for n in casts if n not in kept] == [torch.bfloat16], [(n.name, n.args) for n in casts]


# ---------------------------------------------------------------------------------------------------------------
# Each lowering of F.rms_norm: pre-dispatch tracing keeps `aten.rms_norm` on every device (torch 2.13, checked on
# fake CPU and CUDA tensors); a graph traced below autograd holds `aten._fused_rms_norm` on CUDA (its kernel) and the
# composite's ops on the CPU (test_native_norm_forms: "fused_op" and the hand-written fp32w forms). The CUDA path is
# traced here with fake CUDA tensors, which need no GPU.


@pytest.fixture
def fake_launches(monkeypatch):
    """The replacement traces the op's CUDA body on the fake CUDA tensors: its launches are recorded, not run (the
    interpreter's kernels cannot run on fake tensors; tests/kernels/test_traced_launch.py)."""
    import liger_fx.kernels.rms_norm as rms_norm_kernels
    from tests.kernels import test_traced_launch

    monkeypatch.setattr(rms_norm_kernels, "wrap_triton", test_traced_launch._Launch)
    test_traced_launch.LAUNCHES.clear()
    return test_traced_launch.LAUNCHES


def _rewrite_on_fake_cuda(fn, shapes, dtype=torch.bfloat16):
    """Run the backend's rewrite (to_aten, every family) on `fn` traced by torch.fx, with fake CUDA inputs of
    `shapes`."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from liger_fx import rewrite
    from liger_fx.backend import rewrite_graph
    from liger_fx.config import LigerConfig

    gm = torch.fx.symbolic_trace(fn)
    # Without requires_grad: on a CPU-only build, autograd of the CUDA op `_fused_rms_norm` asks for a CUDA device
    # guard even on fake tensors, and the process aborts ("PyTorch is not linked with support for cuda devices").
    # The pre-dispatch graph is the same either way.
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        args = [torch.empty(s, device="cuda", dtype=dtype) for s in shapes]
    assert all(a.device.type == "cuda" for a in args) and mode is not None
    record = rewrite.GraphRecord(0)
    out = rewrite_graph(gm, args, LigerConfig(), record)
    return out, record


@pytest.mark.parametrize("case", ["weight", "noweight", "eps_none", "fused_op"])
def test_cuda_lowerings_fuse_on_fake_cuda_tensors(case, fake_launches):
    def fn(x, w):
        if case == "fused_op":
            return torch.ops.aten._fused_rms_norm(x, [16], w, 1e-6)[0]
        return F.rms_norm(x, (16,), None if case == "noweight" else w, None if case == "eps_none" else 1e-6)

    gm, record = _rewrite_on_fake_cuda(fn, [(2, 5, 16), (16,)])
    ops = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    (norm,) = [n for n in gm.graph.nodes if n.target is torch.ops.liger_fx.rms_norm.default]
    assert torch.ops.aten.rms_norm.default not in ops and torch.ops.aten._fused_rms_norm.default not in ops, ops
    assert norm.meta["val"].device.type == "cuda" and norm.meta["val"].dtype == torch.bfloat16
    weight, eps, offset, casting = norm.args[1:5]
    assert (weight is None) == (case == "noweight"), norm.args
    assert eps == (torch.finfo(torch.float32).eps if case == "eps_none" else 1e-6)
    # torch's semantics: the weight multiplies in fp32, then one rounding to x's dtype (gemma casting at offset 0)
    assert (offset, casting) == (0.0, "gemma") or weight is None, norm.args
    assert [r.flag for r in record.replaced] == ["rms_norm"] and not record.misses
    assert fake_launches == ["_rms_norm_fwd_kernel"]  # the replacement traced the op's CUDA body, not the CPU one


def test_fused_op_whose_rstd_is_used_is_a_near_miss_on_fake_cuda(fake_launches):
    def fn(x, w):
        out, rstd = torch.ops.aten._fused_rms_norm(x, [16], w, 1e-6)
        return out, rstd * 2

    gm, record = _rewrite_on_fake_cuda(fn, [(2, 5, 16), (16,)])
    assert not record.replaced
    (miss,) = record.misses
    assert "rsqrt has 2 users" in miss.reason, miss.reason


@pytest.mark.parametrize("case, reason", [
    ("two_dims", "mean of squares reduces dims [-2, -1], not the last dim alone"),
    ("float64", "float64 operands: the op computes in fp32"),
])
def test_rms_norm_that_cannot_be_fused_is_a_near_miss_with_reason(case, reason):
    dtype = torch.float64 if case == "float64" else torch.float32
    shape = (5, 16) if case == "two_dims" else (16,)
    m = nn.RMSNorm(shape, eps=1e-6).to(dtype)
    x = torch.randn(2, 5, 16, dtype=dtype)
    torch.testing.assert_close(torch.compile(m, backend="liger")(x), m(x), atol=1e-6, rtol=1e-5)
    assert replaced("rms_norm") == 0
    (miss,) = [m for rec in liger_fx.get_records() for m in rec.misses]
    assert reason in miss.reason, miss.reason


# ---------------------------------------------------------------------------------------------------------------
# Two families whose norms were left unfused: Llama-4 (its q/k norm has no weight) and DeepSeek-V4 (weightless
# norms in its hyper-connections and q_b; fp32 weighted ones elsewhere), built from their transformers configs.


@pytest.mark.parametrize("model_type", ["llama4_text", "deepseek_v4"])
def test_families_with_weightless_norms_fuse_every_norm(model_type):
    from transformers import AutoConfig

    from liger_fx.models import build, reduce_config
    from tests.helpers import train_step

    model = build(reduce_config(AutoConfig.for_model(model_type)))
    ids, labels = batch(model.config.vocab_size)
    ref_loss, ref_grads = train_step(model, ids, labels)
    import copy

    loss, grads = train_step(torch.compile(copy.deepcopy(model), backend="liger"), ids, labels)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-4)
    for name, g in grads.items():
        if name in ref_grads:
            torch.testing.assert_close(g, ref_grads[name], atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
        else:  # DeepSeek-V4's compressor weights: eager leaves no grad, a compiled step (plain Inductor too) zeros
            assert not g.any(), name
    assert set(ref_grads) <= set(grads)
    # One graph on transformers 5.25. On 5.17 DeepSeek-V4's graph holds an op whose trace reads a tensor's value
    # (aten._local_scalar_dense), so Dynamo breaks the graph there, plain aot_eager alike, and 5 of its 16 norms run
    # eagerly between the graphs: every norm in a graph counts, and fuses.
    import transformers
    from packaging.version import Version

    records = liger_fx.get_records()
    summaries = [rec.summary() for rec in records]
    one_graph = model_type == "llama4_text" or Version(transformers.__version__) >= Version("5.25")
    if one_graph:
        assert len(records) == 1, summaries
    done, sites = (sum(rec.counts().get("rms_norm", (0, 0))[i] for rec in records) for i in (0, 1))
    assert done == sites and sites >= (7 if model_type == "llama4_text" else 16 if one_graph else 11), summaries
    assert not [m for rec in records for m in rec.misses if m.flag == "rms_norm"], summaries
    if model_type == "llama4_text":  # the q/k norm (of its one RoPE layer here) is the weightless one
        patterns = [r.pattern for rec in records for r in rec.replaced]
        assert sum("/noweight/" in p for p in patterns) == 2, patterns
