"""Fused lm_head + per-token (z_t, lse, entropy) against the reference (CPU: Triton interpreter at N=37, H=64,
V=1000 in chunks of 16 or 8 rows; CUDA: also large bf16 shapes with the default chunk size). The forward and every
gradient, each output's gradient on its own and all three together, fp32 and bf16, with every buffer the launchers
allocate poisoned."""

import pytest
import torch

from liger_fx.kernels import fused_linear_cross_entropy as flce_mod
from liger_fx.kernels.cross_entropy import transform_ref
from liger_fx.kernels.fused_linear_logprobs import (
    fused_linear_entropy,
    fused_linear_logprobs,
    fused_linear_logprobs_bwd,
    fused_linear_logprobs_fwd,
    fused_linear_logprobs_ref,
    fused_linear_logprobs_ref_backward,
    fused_linear_token_metrics,
    fused_linear_token_stats,
)
from tests.kernels.test_fused_linear_cross_entropy import _accumulation_slack, _chunked_logits, _propagate
from tests.kernels.test_fused_linear_cross_entropy import _inputs as _lce_inputs
from tests.tolerance import assert_close_rule, dlogits_rel_error, interpreter_slack, poison_, rounding_flips

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
EPS32 = torch.finfo(torch.float32).eps

# (N, H, V, chunk, block_v): 37 rows in chunks of 16 (16, 16, 5) or 8; V=1000 in one block or in four of 256
SHAPES = [(37, 64, 1000, 16, None), (37, 64, 1000, 8, 256)]
if CUDA:
    # 2048 rows at Qwen's vocabulary: the fp64 references hold several N x V tensors (4.6 GiB each at 4096 rows), which
    # ran an 80 GiB H100 out of memory.
    SHAPES += [(4133, 1024, 32011, None, None), (2048, 2048, 151936, None, None)]

CASES = {  # id -> (dtype, softcap, logit_scale (1/temperature), bias)
    "fp32": (torch.float32, 0.0, 1.0, False),
    "bf16": (torch.bfloat16, 0.0, 1.0, False),
    "bf16-temperature-bias": (torch.bfloat16, 0.0, 1 / 0.7, True),
    "fp32-softcap-scale-bias": (torch.float32, 5.0, 0.5, True),
    "bf16-softcap": (torch.bfloat16, 5.0, 1.0, False),
}
GRADS = ("zt", "lse", "ent", "all")  # which outputs get an upstream gradient


@pytest.fixture
def poisoned(monkeypatch):
    """Every torch.empty / empty_like the launchers call returns NaNs: an element they forget to write fails."""
    real_empty, real_empty_like = torch.empty, torch.empty_like
    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison_(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison_(real_empty_like(*a, **k)))


def _inputs(N, H, V, dtype, bias, seed, ignore_every=5):
    return _lce_inputs(N, H, V, dtype, bias, seed, ignore_every)


def _upstream(N, which, seed):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    grads = [torch.randn(N, generator=g, device=DEVICE) for _ in range(3)]
    return [gr if which in (name, "all") else None for gr, name in zip(grads, ("zt", "lse", "ent"))]


def _weighted(outs, grads):
    return sum((o * g).sum() for o, g in zip(outs, grads) if g is not None)


def _torch_same(logits, target, softcap, scale, grads):
    """Eager torch in the inputs' dtype from the same logits: the outputs, and dlogits by autograd rounded to the
    logits' dtype (where `.float()` hands the gradient back)."""
    x = logits.detach().requires_grad_()
    z = transform_ref(x.float(), softcap, scale)
    valid = target != -100
    lse = torch.where(valid, torch.logsumexp(z, -1), 0.0)
    zt = torch.where(valid, z.gather(-1, torch.where(valid, target, 0)[:, None]).squeeze(-1), 0.0)
    ent = torch.where(valid, torch.logsumexp(z, -1) - (torch.softmax(z, -1) * z).sum(-1), 0.0)
    (dl,) = torch.autograd.grad(_weighted((zt, lse, ent), grads), x)
    return (zt.detach(), lse.detach(), ent.detach()), dl


def _exact(logits, target, softcap, scale, grads):
    """fp64 outputs-to-dlogits from the given logits: (dlogits, lse, ent, p)."""
    x = logits.double().requires_grad_()
    z = transform_ref(x, softcap, scale)
    valid = target != -100
    lse_all = torch.logsumexp(z, -1)
    lse = torch.where(valid, lse_all, 0.0)
    zt = torch.where(valid, z.gather(-1, torch.where(valid, target, 0)[:, None]).squeeze(-1), 0.0)
    ent = torch.where(valid, lse_all - (torch.softmax(z, -1) * z).sum(-1), 0.0)
    (dl,) = torch.autograd.grad(_weighted((zt, lse, ent), [g.double() if g is not None else None for g in grads]), x)
    return dl, lse.detach(), ent.detach(), torch.softmax(z.detach(), -1) * valid[:, None], z.detach()


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:3])) + f"-c{s[3]}-b{s[4]}")
def test_forward_and_every_gradient(shape, case, poisoned):
    N, H, V, chunk, block_v = shape
    dtype, softcap, scale, bias = CASES[case]
    if block_v is not None and case not in ("bf16-softcap", "fp32"):
        pytest.skip("multi-block V: two cases are enough under the interpreter")
    h, w, b, target = _inputs(N, H, V, dtype, bias, seed=N + V)
    zt, lse, ent = fused_linear_logprobs_fwd(h, w, b, target, -100, softcap, scale, True, chunk=chunk,
                                             block_v=block_v)
    assert zt.dtype == lse.dtype == ent.dtype == torch.float32
    C = chunk or flce_mod.chunk_rows(N, V, h.element_size())
    logits = _chunked_logits(h, w, b, C)  # what the kernel's chunks compute (same calls, same rounding)
    leaves = [t.detach().double().requires_grad_() for t in (h, w) + ((b,) if bias else ())]
    ref = fused_linear_logprobs_ref(leaves[0], leaves[1], leaves[2] if bias else None, target, -100, softcap,
                                    scale, True)
    same, _ = _torch_same(logits, target, softcap, scale, [None, torch.ones(N, device=DEVICE), None])
    # Forward: fp32 sums over V of exp on either side, a few ulp of |lse| (and of |z| for the entropy's sum).
    for name, ours, r, s in zip(("z_t", "lse", "ent"), (zt, lse, ent), ref, same):
        atol = 8 * EPS32 * (ref[1].detach().abs().max().item() + 1)
        assert_close_rule(ours, r.detach(), s, atol, name)

    eps = torch.finfo(dtype).eps
    for which in GRADS:
        grads = _upstream(N, which, seed=hash(which) % 1000)
        dh, dw, db = fused_linear_logprobs_bwd(*grads, h, w, b, target, lse, ent, -100, softcap, scale,
                                               chunk=chunk, block_v=block_v)
        assert dh.dtype == dtype and dw.dtype == dtype
        rgrads = torch.autograd.grad(_weighted(ref, grads), leaves, retain_graph=True)
        _, dl_same = _torch_same(logits, target, softcap, scale, grads)
        same_grads = (dl_same @ w, dl_same.t() @ h, dl_same.sum(0) if bias else None)
        # Gradient bounds, each with a cause (the linear + CE kernel test has the measured background):
        # - dlogits from the saved fp32 lse: dlogits_rel_error relative, plus the entropy term's S - z, where S =
        #   lse - ent carries the roundings of both (eps * (|lse| + |ent| + |z|) * p * |g_ent| absolute);
        # - both sides round dlogits to the dtype once: one ulp where a rounding midpoint lies within that error;
        # - matmul summation order (ours: C-row chunks) and bf16 split-K, dW accumulated per chunk in bf16;
        # - the interpreter truncates fp32 -> bf16 (tests/tolerance.py).
        dl, lse64, ent64, p, z = _exact(logits, target, softcap, scale, grads)
        err = dlogits_rel_error(lse64, logits, softcap, scale) * dl.abs()
        if grads[2] is not None:
            err = err + EPS32 * (lse64.abs() + ent64.abs())[:, None] * p * grads[2].double().abs()[:, None] * (
                1 + z.abs())
        terms = _propagate(dl.abs(), h, w)
        carried = _propagate(err, h, w)
        flips = _propagate(rounding_flips(dl, err / dl.abs().clamp_min(1e-300), dtype), h, w)
        for i, (name, ours, K) in enumerate((("dh", dh, V), ("dw", dw, N), ("db", db, N))):
            r, s = (rgrads[i] if i < len(rgrads) else None), same_grads[i]
            if r is None:
                assert ours.numel() == 0, name
                continue
            atol = 4 * EPS32 * r.abs().max().item() + 1e-30
            own_ulp = 0.0 if dtype == torch.float32 else eps * r.abs()
            order = EPS32 * K**0.5 * terms[i]
            acc = _accumulation_slack(dl, h, C, dtype) if name == "dw" else 0.0
            split_k = eps / 2 * terms[i] if dtype != torch.float32 and name != "db" else 0.0
            slack = own_ulp + carried[i] + flips[i] + order + split_k + acc + interpreter_slack(terms[i], dtype, 1)
            assert_close_rule(ours, r, s, atol, f"{which}: {name}", slack=slack)


def test_ignored_rows_are_zero_and_never_read_at_their_target(poisoned):
    """-100 would read 100 elements before the row; the rows give 0 and no gradient. All rows ignored too."""
    h, w, b, target = _inputs(11, 32, 300, torch.float32, True, seed=3, ignore_every=2)
    zt, lse, ent = fused_linear_logprobs_fwd(h, w, b, target, -100, entropy=True, chunk=4)
    ign = target == -100
    assert (zt[ign] == 0).all() and (lse[ign] == 0).all() and (ent[ign] == 0).all()
    assert torch.isfinite(zt).all() and (lse[~ign] > 0).all()
    target_all = torch.full_like(target, -100)
    zt2, lse2, ent2 = fused_linear_logprobs_fwd(h, w, b, target_all, -100, entropy=True, chunk=4)
    g = torch.ones(11, device=DEVICE)
    dh, dw, db = fused_linear_logprobs_bwd(g, g, g, h, w, b, target_all, lse2, ent2, -100, chunk=4)
    for t in (zt2, lse2, ent2, dh, dw, db):
        assert torch.equal(t, torch.zeros_like(t))


def test_out_of_range_target_is_nan_not_a_wild_read():
    h, w, _, target = _inputs(5, 16, 50, torch.float32, False, seed=4)
    target[1] = 50
    target[2] = -7
    zt, _, _ = fused_linear_logprobs_fwd(h, w, None, target, -100)
    assert zt[1].isnan() and zt[2].isnan() and torch.isfinite(zt[3:]).all()


def test_without_target_or_entropy_outputs_are_empty_and_lse_agrees():
    h, w, b, target = _inputs(9, 32, 300, torch.float32, False, seed=5)
    zt, lse, ent = fused_linear_logprobs_fwd(h, w, b, None, entropy=True, chunk=4)
    assert zt.numel() == 0 and lse.shape == ent.shape == (9,)
    _, ref_lse, ref_ent = fused_linear_logprobs_ref(h.double(), w.double(), None, None, entropy=True)
    torch.testing.assert_close(lse, ref_lse.float(), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(ent, ref_ent.float(), atol=1e-5, rtol=1e-5)
    zt, lse2, ent = fused_linear_logprobs_fwd(h, w, b, target, chunk=4)
    assert ent.numel() == 0 and zt.shape == (9,)


def test_gradient_flags_skip_matmuls_and_leave_inputs_alone():
    """need_w False (a frozen lm_head): no dW; need_h False: no dh. Inputs are not written."""
    h, w, b, target = _inputs(21, 32, 300, torch.float32, True, seed=6)
    before = [t.clone() for t in (h, w, b, target)]
    _, lse, ent = fused_linear_logprobs_fwd(h, w, b, target, entropy=True, chunk=8)
    g = torch.randn(21, device=DEVICE)
    full = fused_linear_logprobs_bwd(g, g, g, h, w, b, target, lse, ent, chunk=8)
    only_h = fused_linear_logprobs_bwd(g, g, g, h, w, b, target, lse, ent, need_w=False, chunk=8)
    only_w = fused_linear_logprobs_bwd(g, g, g, h, w, b, target, lse, ent, need_h=False, chunk=8)
    assert only_h[1].numel() == 0 and only_h[2].numel() == 0 and only_w[0].numel() == 0
    assert torch.equal(only_h[0], full[0]) and torch.equal(only_w[1], full[1]) and torch.equal(only_w[2], full[2])
    for t0, t in zip(before, (h, w, b, target)):
        assert torch.equal(t0, t)


def test_reference_backward_equals_autograd_of_the_reference():
    """The CPU implementation's written-out backward against autograd (fp64, softcap and scale, ignored rows)."""
    h, w, b, target = _inputs(13, 16, 77, torch.float64, True, seed=7, ignore_every=3)
    leaves = [t.clone().requires_grad_() for t in (h, w, b)]
    outs = fused_linear_logprobs_ref(*leaves, target, -100, 3.0, 0.7, True)
    grads = [torch.randn(13, dtype=torch.float64, device=DEVICE) for _ in range(3)]
    ref = torch.autograd.grad(_weighted(outs, grads), leaves)
    ours = fused_linear_logprobs_ref_backward(*grads, h, w, b, target, outs[1].detach(), outs[2].detach(), -100,
                                              3.0, 0.7)
    for name, o, r in zip(("dh", "dw", "db"), ours, ref):
        torch.testing.assert_close(o, r, atol=1e-12, rtol=1e-10, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("bias", [False, True])
def test_op_opcheck_and_autograd_through_the_functionals(bias):
    """The library op (CPU: the reference; CUDA: the kernels) through autograd: log-probs with a temperature,
    entropy and per-token CE, each against fp64 autograd of eager torch; opcheck on schema, fake and autograd."""
    h, w, b, target = _inputs(19, 32, 300, torch.float32, bias, seed=8)
    torch.library.opcheck(torch.ops.liger_fx.fused_linear_logprobs, (h, w, b, target, -100, 2.0, 0.5, True))
    ids = target.clamp_min(0)
    leaves = [t.requires_grad_() for t in (h, w) + ((b,) if bias else ())]
    g1, g2, g3 = (torch.randn(19, device=DEVICE) for _ in range(3))
    logp = fused_linear_logprobs(h, w, ids, bias=b, temperature=0.7)
    ent = fused_linear_entropy(h, w, bias=b, temperature=0.7)
    ce = flce_mod.fused_linear_cross_entropy(h, w, target, bias=b, reduction="none")
    assert logp.dtype == ent.dtype == ce.dtype == torch.float32 and ce.shape == (19,)
    grads = torch.autograd.grad((logp * g1).sum() + (ent * g2).sum() + (ce * g3).sum(), leaves)

    def eager(leaves):  # eager torch on materialized logits, as trainers write it
        logits = torch.nn.functional.linear(leaves[0], leaves[1], leaves[2] if bias else None)
        outs = (torch.log_softmax(logits / 0.7, -1).gather(-1, ids[:, None]).squeeze(-1),
                -(torch.softmax(logits / 0.7, -1) * torch.log_softmax(logits / 0.7, -1)).sum(-1),
                torch.nn.functional.cross_entropy(logits, target, reduction="none"))
        return outs, torch.autograd.grad(sum((o * g.to(o.dtype)).sum() for o, g in zip(outs, (g1, g2, g3))), leaves)

    ref, rgrads = eager([t.detach().double().requires_grad_() for t in leaves])
    same, sgrads = eager([t.detach().clone().requires_grad_() for t in leaves])
    # The rule against fp32 eager: the entropy lse - E[z] and its gradient p * (E[z] - z) cancel (lse ~ 20 here,
    # entropy ~ 1) in torch's -(p * log p).sum() as in ours, to a few ulp of |lse|.
    for name, o, r, sm in zip(("logp", "ent", "ce"), (logp, ent, ce), ref, same):
        assert_close_rule(o.detach(), r.detach(), sm.detach(), 8 * EPS32 * 20, name)
    # Gradients: p = exp(z - lse) from the saved fp32 lse is off by up to eps/2 * |lse| relative, and the entropy's
    # S = lse - ent by ~eps * |lse| absolute, in every element of a row; the kernel test above bounds this element
    # by element (dlogits_rel_error); here, where the wiring is under test, as eps * |lse| * 4 of the largest value.
    lse_max = torch.logsumexp(torch.nn.functional.linear(h, w, b).detach() / 0.7, -1).abs().max().item()
    for name, g, rg, sg in zip("hwb", grads, rgrads, sgrads):
        assert_close_rule(g, rg, sg, 4 * EPS32 * lse_max * rg.abs().max().item(), f"d{name}")


def test_frozen_weight_and_no_grad():
    h, w, _, target = _inputs(11, 32, 300, torch.float32, False, seed=9)
    h.requires_grad_()
    zt, lse, ent = fused_linear_token_stats(h.view(1, 11, 32), w, target.view(1, 11), entropy=True)
    assert zt.shape == lse.shape == ent.shape == (1, 11)
    assert fused_linear_token_stats(h, w)[0] is None and fused_linear_token_stats(h, w)[2] is None
    logp = fused_linear_logprobs(h.view(1, 11, 32), w, target.clamp_min(0).view(1, 11))
    assert logp.shape == (1, 11)
    (dh,) = torch.autograd.grad(logp.sum(), h)  # w frozen: only dh
    hr = h.detach().double().requires_grad_()
    rl = torch.log_softmax(hr @ w.double().t(), -1).gather(-1, target.clamp_min(0)[:, None]).sum()
    (rdh,) = torch.autograd.grad(rl, hr)
    torch.testing.assert_close(dh, rdh.float(), atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        assert fused_linear_logprobs(h, w, target.clamp_min(0)).grad_fn is None


def test_bad_arguments_name_the_value():
    h, w, _, target = _inputs(3, 8, 20, torch.float32, False, seed=10)
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        fused_linear_logprobs(h, w, target, temperature=0.0)
    with pytest.raises(ValueError, match="softcap must be >= 0"):
        fused_linear_logprobs(h, w, target, softcap=-1.0)


def _metrics_exact(h, w, b, target, softcap, scale):
    """(is the target the first argmax, mean logit, log(sum p^2)) in fp64 from the logits in the matmul's dtype."""
    x = torch.nn.functional.linear(h, w, b).double()
    z = transform_ref(x, softcap, scale)
    valid = target != -100
    t = torch.where(valid, target, 0)
    top1 = (z.argmax(-1) == t) & valid  # torch.argmax takes the first maximum
    lsq = torch.logsumexp(2 * z, -1) - 2 * torch.logsumexp(z, -1)
    return top1, torch.where(valid, z.mean(-1), 0.0), torch.where(valid, lsq, 0.0)


@pytest.mark.parametrize("case", ["fp32", "bf16-temperature-bias", "fp32-softcap-scale-bias", "bf16-softcap"])
def test_metrics_from_the_same_pass(case, poisoned):
    """metrics=True (TRL's accuracy, mean logit and WPO weight): the argmax flag exact, ties going to the first column
    as torch.argmax, the mean logit and log(sum p^2) against fp64 of the same logits (fp32 accumulation: a few ulp of
    the row's sums), ignored rows 0; z_t, lse, ent as without metrics."""
    dtype, softcap, scale, bias = CASES[case]
    N, H, V = 37, 64, 1000
    h, w, b, target = _inputs(N, H, V, dtype, bias, seed=11)
    w[5], w[9] = w[9].clone(), w[9].clone()  # two equal columns: a tie
    if b is not None:
        b[5] = b[9]
    h[1:4] = w[9] * 3  # rows whose argmax is that tie
    target[1], target[2], target[3] = 5, 9, 5
    x = torch.nn.functional.linear(h, w, b).float()
    argmax = x.argmax(-1)
    target[6:12] = argmax[6:12]  # rows whose target is the argmax
    out = fused_linear_logprobs_fwd(h, w, b, target, -100, softcap, scale, True, chunk=16, block_v=256, metrics=True)
    plain = fused_linear_logprobs_fwd(h, w, b, target, -100, softcap, scale, True, chunk=16, block_v=256)
    for o, p in zip(out[:3], plain):
        assert torch.equal(o, p)
    top1, mean, lsq = out[3:]
    e_top1, e_mean, e_lsq = _metrics_exact(h, w, b, target, softcap, scale)
    assert top1.dtype == torch.bool and torch.equal(top1, e_top1)
    assert top1[1:4].tolist() == [True, False, True] and top1[6:12].all()
    zmax = transform_ref(x.double(), softcap, scale).abs().amax(-1).float()
    assert ((mean - e_mean).abs() <= 8 * EPS32 * zmax).all(), (mean - e_mean).abs().max()
    lse = out[1].double()
    assert ((lsq - e_lsq).abs() <= 16 * EPS32 * (lse.abs() + 1)).all(), (lsq - e_lsq).abs().max()
    ign = target == -100
    assert not top1[ign].any() and (mean[ign] == 0).all() and (lsq[ign] == 0).all()
    ref = fused_linear_logprobs_ref(h, w, b, target, -100, softcap, scale, True, metrics=True)
    assert torch.equal(ref[3], e_top1)


def test_metrics_op_opcheck_and_gradients_as_without_metrics():
    """`liger_fx::fused_linear_logprobs_metrics` (CPU: the reference): opcheck; its z_t, lse, ent and their gradients
    equal the plain op's, the metrics carry none; the functional's shapes and the no-target error."""
    h, w, b, target = _inputs(19, 32, 300, torch.float32, True, seed=12)
    torch.library.opcheck(torch.ops.liger_fx.fused_linear_logprobs_metrics, (h, w, b, target, -100, 2.0, 0.5, True))
    leaves = [t.clone().requires_grad_() for t in (h, w, b)]
    zt, lse, ent, top1, mean, lsq = fused_linear_token_metrics(leaves[0].view(1, 19, 32), leaves[1],
                                                               target.view(1, 19), leaves[2], -100, 0.7,
                                                               entropy=True)
    assert zt.shape == top1.shape == mean.shape == lsq.shape == (1, 19) and top1.dtype == torch.bool
    assert not mean.requires_grad and not lsq.requires_grad and zt.requires_grad
    g = [torch.randn(1, 19, device=DEVICE) for _ in range(3)]
    grads = torch.autograd.grad(sum((o * u).sum() for o, u in zip((zt, lse, ent), g)), leaves)
    leaves2 = [t.clone().requires_grad_() for t in (h, w, b)]
    ref = fused_linear_token_stats(leaves2[0].view(1, 19, 32), leaves2[1], target.view(1, 19), leaves2[2], -100,
                                   0.7, entropy=True)
    for o, r in zip((zt, lse, ent), ref):
        assert torch.equal(o, r)
    rgrads = torch.autograd.grad(sum((o * u).sum() for o, u in zip(ref, g)), leaves2)
    for a, r in zip(grads, rgrads):
        torch.testing.assert_close(a, r)
    with pytest.raises(ValueError, match="metrics need a target"):
        fused_linear_logprobs_fwd(h, w, b, None, metrics=True)
