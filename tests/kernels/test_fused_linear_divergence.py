"""Fused student + teacher lm_heads + distillation divergence against the reference (CPU: the Triton interpreter at
N=37 rows in chunks of 16, V=301 in blocks of 128; CUDA adds a large bf16 shape with the default chunking)."""

import math

import pytest
import torch
import torch.nn.functional as F

from liger_fx.kernels import fused_linear_divergence as fld
from liger_fx.kernels.fused_linear_divergence import (DIVERGENCES, fused_linear_distillation,
                                                      fused_linear_divergence_fwd, fused_linear_divergence_ref,
                                                      fused_linear_divergence_rows_bwd)
from tests.kernels.test_fused_linear_cross_entropy import _accumulation_slack
from tests.tolerance import assert_close_rule, interpreter_slack, poison_, rounding_flips

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
EPS32 = torch.finfo(torch.float32).eps

# (N, Hs, Ht, V, chunk, block_v): 37 rows in chunks of 16 (16, 16, 5); V=301 in three blocks of 128 (the last
# partial); the teacher wider than the student
SHAPES = [(37, 24, 40, 301, 16, 128)]
if CUDA:
    SHAPES += [(4133, 1024, 1536, 32011, None, None)]

# id -> (dtype, divergence, reduction, teacher learns, bias, row weights). Every divergence x reduction in fp32,
# every divergence in bf16; the teacher's gradient, biases and row weights spread over them.
CASES = {
    "fp32-fkl-batchmean": (torch.float32, "forward_kl", "batchmean", False, False, False),
    "fp32-fkl-sum-weights": (torch.float32, "forward_kl", "sum", False, True, True),
    "fp32-fkl-mean-teacher": (torch.float32, "forward_kl", "mean", True, False, False),
    "fp32-rkl-batchmean-bias": (torch.float32, "reverse_kl", "batchmean", False, True, False),
    "fp32-rkl-sum-teacher-weights": (torch.float32, "reverse_kl", "sum", True, False, True),
    "fp32-rkl-mean": (torch.float32, "reverse_kl", "mean", False, False, False),
    "fp32-jsd-batchmean-teacher-bias": (torch.float32, "jsd", "batchmean", True, True, False),
    "fp32-jsd-sum": (torch.float32, "jsd", "sum", False, False, False),
    "fp32-jsd-mean-weights": (torch.float32, "jsd", "mean", False, True, True),
    "bf16-fkl-batchmean-weights": (torch.bfloat16, "forward_kl", "batchmean", False, False, True),
    "bf16-rkl-sum-teacher": (torch.bfloat16, "reverse_kl", "sum", True, True, False),
    "bf16-jsd-batchmean": (torch.bfloat16, "jsd", "batchmean", False, False, False),
}
BETA, SCALE_S, SCALE_T = 0.3, 1 / 1.5, 1 / 1.5  # temperature 1.5


def _inputs(N, Hs, Ht, V, dtype, bias, weights, seed):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    h_s = torch.randn(N, Hs, generator=g, device=DEVICE).to(dtype)
    w_s = (torch.randn(V, Hs, generator=g, device=DEVICE) * (4 / Hs**0.5)).to(dtype)  # logits of std 4
    h_t = torch.randn(N, Ht, generator=g, device=DEVICE).to(dtype)
    w_t = (torch.randn(V, Ht, generator=g, device=DEVICE) * (4 / Ht**0.5)).to(dtype)
    b_s = torch.randn(V, generator=g, device=DEVICE).to(dtype) if bias else None
    b_t = torch.randn(V, generator=g, device=DEVICE).to(dtype) if bias else None
    rw = None
    if weights:  # a completion mask times a per-token weight: zeros skip the row
        rw = torch.rand(N, generator=g, device=DEVICE) + 0.5
        rw[::4] = 0.0
    return h_s, w_s, b_s, h_t, w_t, b_t, rw


def _chunked(h, w, b, C):
    """The logits as the launcher forms them: the same matmul on the same C-row chunks (cuBLAS picks its kernel by
    shape, so a whole-N matmul may round some bf16 logits the other way; see the linear + CE test)."""
    return torch.cat([torch.addmm(b, h[s:s + C], w.t()) if b is not None else h[s:s + C] @ w.t()
                      for s in range(0, h.shape[0], C)])


def _propagate(e, h, w):
    return e @ w.double().abs(), e.t() @ h.double().abs(), e.sum(0)


def _check_grads(ours, ref, same, xs, xt, g, div, hw, dtype, C, teacher=True):
    """(dh, dW, db) of each side against the fp64 reference, the torch term from eager torch on the same logits.
    Slack, each from its cause, carried through the matmuls (|dlogits| bounds times |W| or |h|):
    - fp32 dlogits (_dlogits64's bound), either side;
    - bf16: dlogits the two sides may round apart (tests/tolerance.rounding_flips), and each side's own rounding of
      the result (one ulp): where torch's errors happen to cancel, ours need not;
    - fp32 matmuls summing K products in another order: eps * sqrt(K) * sum |terms| (the linear + CE test's);
    - bf16 dW accumulated per chunk (_accumulation_slack); the interpreter's truncation of bf16 (tests/tolerance.py);
    - bf16 on CUDA: cuBLAS may split K and add the partial sums in bf16, up to u * sum |terms| on either side, not
      alike for our C-row calls and torch's N-row one (measured on the H200 for the linear + CE op's dh; its test).
    """
    N, V = xs.shape
    for side, (d64, bound) in enumerate(zip(*_dlogits64(xs, xt, g, div))):
        if side == 1 and not teacher:
            continue
        h, w = hw[2 * side], hw[2 * side + 1]
        terms, err = _propagate(d64.abs(), h, w), _propagate(bound, h, w)
        flips = _propagate(rounding_flips(d64, bound / d64.abs().clamp_min(1e-300), dtype), h, w)
        for i, name in enumerate(("dh", "dw", "db")):
            k = 3 * side + i
            r, s, o = ref[k], same[k], ours[k]
            name = ("student " if side == 0 else "teacher ") + name
            if r is None:
                assert o.numel() == 0, name
                continue
            own_ulp = 0.0 if dtype == torch.float32 else torch.finfo(dtype).eps * r.abs()
            order = EPS32 * (V if i == 0 else N) ** 0.5 * terms[i]
            acc = _accumulation_slack(d64, h, C, dtype) if i == 1 else 0.0
            split_k = torch.finfo(dtype).eps / 2 * terms[i] if dtype != torch.float32 and i < 2 and CUDA else 0.0
            slack = own_ulp + err[i] + flips[i] + order + acc + split_k + interpreter_slack(terms[i], dtype, 1)
            assert_close_rule(o, r, s, 4 * EPS32 * r.abs().max().item(), name, slack=slack)


def _dlogits64(xs, xt, g, div):
    """Exact (fp64) dL/dx_s, dL/dx_t of sum_i g_i L_i from the given logits, and for each a per-element bound on the
    error of an fp32 computation of it, ours or torch's. Each gradient is p * (D - K) (or p_s - p_t): D a difference
    of log-probabilities (or of one and the log-mixture), K the row's p-weighted mean of D.
    - p = exp(z - lse): relative error eps * (|lse_s| + |lse_t|) from the rounded LSEs, shared by the row;
    - D: the rounded z = x * scale and log-probabilities, a = eps * (|z_s| + |z_t| + |lp_s| + |lp_t| + 4)
      absolute (4 eps for exp and the products); a row's shared LSE error cancels in D - K;
    - K: the p-weighted mean of those, sum_k (p_s + p_t)_k a_k.
    Doubled: either side may err so."""
    xs64, xt64 = xs.double().requires_grad_(), xt.double().requires_grad_()
    rows = fld.divergence_rows_ref(xs64, xt64, div, BETA, SCALE_S, SCALE_T)
    ds, dt = torch.autograd.grad((rows * g.double()).sum(), (xs64, xt64))
    zs, zt = xs.double() * SCALE_S, xt.double() * SCALE_T
    lse_s, lse_t = torch.logsumexp(zs, -1, keepdim=True), torch.logsumexp(zt, -1, keepdim=True)
    lps, lpt = zs - lse_s, zt - lse_t
    a = EPS32 * (zs.abs() + zt.abs() + lps.abs() + lpt.abs() + 4)
    common = EPS32 * (lse_s.abs() + lse_t.abs())
    mag = lps.exp() + lpt.exp()
    err_k = (mag * a).sum(-1, keepdim=True)
    gs = g.double().abs()[:, None] * max(SCALE_S, SCALE_T)
    return (ds, dt), tuple(2 * (d.abs() * (a + common) + gs * mag * (a + err_k)) for d in (ds, dt))


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:4])) + f"-c{s[4]}-b{s[5]}")
def test_loss_and_every_gradient(shape, case, monkeypatch):
    """Loss, dh_s, dW_s, db_s (and the teacher's, where it learns) against autograd of the reference in fp64, with
    the tolerance rule's torch term from eager torch in the inputs' dtype on the same logits. Every buffer the
    launcher allocates is poisoned."""
    N, Hs, Ht, V, chunk, block_v = shape
    dtype, div, reduction, teacher, bias, weights = CASES[case]
    h_s, w_s, b_s, h_t, w_t, b_t, rw = _inputs(N, Hs, Ht, V, dtype, bias, weights, seed=N + V)
    real_empty, real_empty_like = torch.empty, torch.empty_like
    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison_(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison_(real_empty_like(*a, **k)))
    out = fused_linear_divergence_fwd(h_s, w_s, b_s, h_t, w_t, b_t, rw, div, BETA, SCALE_S, SCALE_T, reduction,
                                      True, True, teacher, teacher, chunk=chunk, block_v=block_v)
    monkeypatch.undo()
    loss, losses, _, *ours = out
    assert loss.dtype == torch.float32 and ours[0].dtype == dtype and ours[1].dtype == dtype
    if not teacher:
        assert all(t.numel() == 0 for t in ours[3:])

    # fp64 reference: autograd of the reference on the same (rounded) inputs
    inputs = (h_s, w_s, b_s, h_t, w_t, b_t)
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in inputs]
    ref = fused_linear_divergence_ref(*leaves, rw, div, BETA, SCALE_S, SCALE_T, reduction)
    ref_grads = torch.autograd.grad(ref, [t for t in leaves if t is not None])
    ref_grads = iter(ref_grads)
    ref_grads = [next(ref_grads) if t is not None else None for t in leaves]

    # eager torch in the inputs' dtype on the same logits: the loss in fp32 from them, its gradient to the logits
    # rounded to their dtype, then the linears' backward in that dtype
    C = chunk or fld.chunk_rows(N, V, dtype.itemsize, dtype.itemsize)
    xs, xt = _chunked(h_s, w_s, b_s, C), _chunked(h_t, w_t, b_t, C)
    xs_l, xt_l = xs.detach().requires_grad_(), xt.detach().requires_grad_()
    rows = fld.divergence_rows_ref(xs_l, xt_l, div, BETA, SCALE_S, SCALE_T)
    red = fld.reduction_scale(reduction, N, V)
    same_loss = ((rows * rw).sum() if rw is not None else rows.sum()) * red
    dls, dlt = torch.autograd.grad(same_loss, (xs_l, xt_l))
    same = [dls @ w_s, dls.t() @ h_s, dls.sum(0) if bias else None, dlt @ w_t, dlt.t() @ h_t,
            dlt.sum(0) if bias else None]

    # Loss: a sum of per-row fp32 sums over V of p * (log-prob differences), each log-prob within
    # eps * (|z| + |lse|) of exact on either side: bound that, weighted and reduced.
    zs, zt = xs.double() * SCALE_S, xt.double() * SCALE_T
    row_err = EPS32 * (zs.abs().amax(-1) + zt.abs().amax(-1) + torch.logsumexp(zs, -1).abs()
                       + torch.logsumexp(zt, -1).abs() + 4)
    wabs = rw.double().abs() if rw is not None else torch.ones(N, dtype=torch.float64, device=DEVICE)
    atol_loss = 2 * red * (wabs * row_err).sum().item()
    assert_close_rule(loss, ref, same_loss, atol=atol_loss, name="loss")
    ref_rows = fld.divergence_rows_ref(xs.double(), xt.double(), div, BETA, SCALE_S, SCALE_T)
    ref_rows = torch.where(wabs != 0, ref_rows, 0.0)
    assert_close_rule(losses, ref_rows, rows.detach(), atol=(2 * row_err).max().item(), name="losses")

    # Gradients: the rule per element, with slack whose causes are computed from the data (_check_grads).
    _check_grads(ours, ref_grads, same, xs, xt, (rw if rw is not None else torch.ones(N, device=DEVICE)) * red,
                 div, (h_s, w_s, h_t, w_t), dtype, C, teacher)


@pytest.mark.parametrize("div", DIVERGENCES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rows_forward_and_backward(div, dtype, monkeypatch):
    """The per-row form: forward stores L_i and the statistics, the backward recomputes both logits and takes a
    per-row upstream gradient (zeros for masked rows, as a mask downstream gives), into both sides' gradients."""
    N, Hs, Ht, V, chunk, block_v = SHAPES[0]
    h_s, w_s, b_s, h_t, w_t, b_t, _ = _inputs(N, Hs, Ht, V, dtype, True, False, seed=7)
    gen = torch.Generator(device=DEVICE).manual_seed(8)
    g = torch.randn(N, generator=gen, device=DEVICE)
    g[::3] = 0.0
    real_empty, real_empty_like = torch.empty, torch.empty_like
    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison_(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison_(real_empty_like(*a, **k)))
    _, rows, stats, *nothing = fused_linear_divergence_fwd(
        h_s, w_s, b_s, h_t, w_t, b_t, None, div, BETA, SCALE_S, SCALE_T, "none", False, False, False, False,
        store_stats=True, chunk=chunk, block_v=block_v)
    grads = fused_linear_divergence_rows_bwd(g, h_s, w_s, b_s, h_t, w_t, b_t, stats, div, BETA, SCALE_S, SCALE_T,
                                             True, True, True, True, chunk=chunk, block_v=block_v)
    monkeypatch.undo()
    assert all(t.numel() == 0 for t in nothing) and stats.shape == (N, 4)

    C = chunk
    xs, xt = _chunked(h_s, w_s, b_s, C), _chunked(h_t, w_t, b_t, C)
    ref_rows = fld.divergence_rows_ref(xs.double(), xt.double(), div, BETA, SCALE_S, SCALE_T)
    same_rows = fld.divergence_rows_ref(xs, xt, div, BETA, SCALE_S, SCALE_T)
    zs, zt = xs.double() * SCALE_S, xt.double() * SCALE_T
    row_err = EPS32 * (zs.abs().amax(-1) + zt.abs().amax(-1) + torch.logsumexp(zs, -1).abs()
                       + torch.logsumexp(zt, -1).abs() + 4)
    assert_close_rule(rows, ref_rows, same_rows, atol=(2 * row_err).max().item(), name="rows")
    torch.testing.assert_close(stats[:, 0].double(), torch.logsumexp(zs, -1), atol=1e-5, rtol=2e-6)
    torch.testing.assert_close(stats[:, 1].double(), torch.logsumexp(zt, -1), atol=1e-5, rtol=2e-6)

    xs_l, xt_l = xs.detach().requires_grad_(), xt.detach().requires_grad_()
    dls, dlt = torch.autograd.grad((fld.divergence_rows_ref(xs_l, xt_l, div, BETA, SCALE_S, SCALE_T) * g).sum(),
                                   (xs_l, xt_l))
    ds64, dt64 = _dlogits64(xs, xt, g, div)[0]
    ref, same = [], []
    for d64, dl, h, w in ((ds64, dls, h_s, w_s), (dt64, dlt, h_t, w_t)):
        ref += [d64 @ w.double(), d64.t() @ h.double(), d64.sum(0)]
        same += [dl @ w, dl.t() @ h, dl.sum(0)]
    _check_grads(grads, ref, same, xs, xt, g, div, (h_s, w_s, h_t, w_t), dtype, C)


# ---------------------------------------------------------------------------------------------------------------
# The reference's conventions against what trainers write (fp64)


def _logits(seed=0, N=7, V=33):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, V, generator=g, dtype=torch.float64) * 3, torch.randn(N, V, generator=g,
                                                                                  dtype=torch.float64) * 3


def test_reference_is_what_trainers_write():
    """forward KL = F.kl_div(log p_s, log p_t, log_target=True) and with probability targets; reverse KL swapped;
    the generalized JSD = TRL's stacked logsumexp form (GKD) = Liger's formula; "mean" is over N x V elements,
    "batchmean" over rows."""
    s, t = _logits()
    T = 2.0
    ls, lt = F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)
    rows = {d: fld.divergence_rows_ref(s, t, d, BETA, 1 / T, 1 / T) for d in DIVERGENCES}
    torch.testing.assert_close(rows["forward_kl"].sum() / 7, F.kl_div(ls, lt, reduction="batchmean",
                                                                       log_target=True), rtol=1e-12, atol=0)
    torch.testing.assert_close(rows["forward_kl"].sum() / (7 * 33), F.kl_div(ls, lt.exp(), reduction="mean"),
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(rows["reverse_kl"], F.kl_div(lt, ls, reduction="none", log_target=True).sum(-1),
                               rtol=1e-12, atol=0)
    b = torch.tensor(BETA, dtype=torch.float64)
    lm = torch.logsumexp(torch.stack([ls + torch.log1p(-b), lt + torch.log(b)]), 0)
    trl = b * F.kl_div(lm, lt, reduction="none", log_target=True) + (1 - b) * F.kl_div(lm, ls, reduction="none",
                                                                                      log_target=True)
    torch.testing.assert_close(rows["jsd"], trl.sum(-1), rtol=1e-12, atol=0)
    m = BETA * lt.exp() + (1 - BETA) * ls.exp()
    mixture = BETA * F.kl_div(m.log(), lt.exp(), reduction="none") + (1 - BETA) * F.kl_div(m.log(), ls.exp(),
                                                                                         reduction="none")
    torch.testing.assert_close(rows["jsd"], mixture.sum(-1), rtol=1e-10, atol=1e-14)
    assert (rows["jsd"] >= 0).all() and (rows["forward_kl"] >= 0).all()


def test_functional_beta_edges_are_the_kls_and_weights_and_targets():
    """Liger and TRL write beta 0 as the forward KL and beta 1 as the reverse KL; `target` masks rows where it is
    ignore_index."""
    g = torch.Generator().manual_seed(3)
    h_s, w_s = torch.randn(2, 5, 8, generator=g, dtype=torch.float64), torch.randn(40, 8, generator=g,
                                                                                   dtype=torch.float64)
    h_t, w_t = torch.randn(2, 5, 12, generator=g, dtype=torch.float64), torch.randn(40, 12, generator=g,
                                                                                    dtype=torch.float64)
    for beta, div in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        ours = fused_linear_distillation(h_s, w_s, h_t, w_t, divergence="jsd", beta=beta, temperature=2.0)
        ref = fused_linear_divergence_ref(h_s.view(10, 8), w_s, None, h_t.view(10, 12), w_t, None, None, div, 0.5,
                                          0.5, 0.5, "batchmean")
        torch.testing.assert_close(ours, ref.float(), rtol=1e-6, atol=0)
    target = torch.tensor([[1, -100, 3, 4, -100], [-100, 2, 2, 2, 2]])
    ours = fused_linear_distillation(h_s, w_s, h_t, w_t, reduction="sum", target=target)
    rows = fused_linear_divergence_ref(h_s.view(10, 8), w_s, None, h_t.view(10, 12), w_t, None, None,
                                       "forward_kl", reduction="none")
    torch.testing.assert_close(ours, rows[target.view(-1) != -100].sum().float(), rtol=1e-6, atol=0)
    none = fused_linear_distillation(h_s, w_s, h_t, w_t, reduction="none")
    assert none.shape == (2, 5)
    torch.testing.assert_close(none, rows.float().view(2, 5), rtol=1e-6, atol=0)


@pytest.mark.parametrize("div", DIVERGENCES)
def test_explicit_gradients_equal_autograd(div):
    """The CPU implementation's written-out dL/dz (kernels/fused_linear_divergence._dz_ref, the kernels' formulas)
    equals autograd of the reference, both sides, fp64."""
    s, t = _logits(seed=5)
    g = torch.rand(7, dtype=torch.float64)
    s_l, t_l = s.clone().requires_grad_(), t.clone().requires_grad_()
    rows = fld.divergence_rows_ref(s_l, t_l, div, BETA, 0.7, 0.4)
    ds, dt = torch.autograd.grad((rows * g).sum(), (s_l, t_l))
    L, stats, ds2, dt2 = fld._dz_ref(s, t, g, div, BETA, 0.7, 0.4)
    torch.testing.assert_close(L, rows.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ds2, ds, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(dt2, dt, rtol=1e-10, atol=1e-14)


# ---------------------------------------------------------------------------------------------------------------
# The library ops: autograd, gradient flags, errors


def _fp32_inputs(seed, bias=True):
    h_s, w_s, b_s, h_t, w_t, b_t, _ = _inputs(11, 16, 24, 90, torch.float32, bias, False, seed)
    return h_s, w_s, b_s, h_t, w_t, b_t


@pytest.mark.parametrize("div", DIVERGENCES)
def test_ops_opcheck(div):
    """Schema, fake and autograd registration of the three ops (torch.library.opcheck)."""
    h_s, w_s, b_s, h_t, w_t, b_t = _fp32_inputs(1)
    for t in (h_s, w_s, b_s):
        t.requires_grad_()
    rw = torch.rand(11, device=DEVICE)
    torch.library.opcheck(torch.ops.liger_fx.fused_linear_divergence,
                          (h_s, w_s, b_s, h_t, w_t, b_t, rw, div, BETA, 0.5, 0.5, "batchmean", True, True, False,
                           False))
    torch.library.opcheck(torch.ops.liger_fx.fused_linear_divergence_rows,
                          (h_s, w_s, b_s, h_t, w_t, b_t, div, BETA, 0.5, 0.5))


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
@pytest.mark.parametrize("teacher", ["frozen", "learns"])
def test_functional_autograd_matches_reference(reduction, teacher):
    """Through liger_fx::linear_divergence and autograd (CPU: the reference implementations): a frozen teacher
    gets no gradient and costs no matmul; a teacher that requires grad gets its own; a weight tensor that requires
    grad (a learned per-token weight) gets dL/dw_i = L_i times the reduction's scale. "none" goes through the
    per-row op and a non-uniform downstream gradient."""
    h_s, w_s, b_s, h_t, w_t, b_t = _fp32_inputs(2)
    h_s = h_s.view(1, 11, 16)
    h_t = h_t.view(1, 11, 24)
    learners = [h_s, w_s, b_s] + ([h_t, w_t, b_t] if teacher == "learns" else [])
    for t in learners:
        t.requires_grad_()
    rw = (torch.rand(1, 11, device=DEVICE) + 0.5).requires_grad_() if reduction != "none" else None
    if rw is not None:
        learners.append(rw)
    down = torch.linspace(-1, 2, 11, device=DEVICE).view(1, 11)
    out = fused_linear_distillation(h_s, w_s, h_t, w_t, b_s, b_t, divergence="jsd", beta=BETA, temperature=1.5,
                                    reduction=reduction, row_weight=rw)
    total = (out * down).sum() if reduction == "none" else out * 3.0
    grads = torch.autograd.grad(total, learners)
    leaves = [t.detach().double().requires_grad_(t.requires_grad) for t in (h_s, w_s, b_s, h_t, w_t, b_t)]
    rw64 = rw.detach().double().reshape(-1).requires_grad_() if rw is not None else None
    ref = fused_linear_divergence_ref(leaves[0].view(11, 16), leaves[1], leaves[2], leaves[3].view(11, 24),
                                      *leaves[4:], rw64, "jsd", BETA, 1 / 1.5, 1 / 1.5, reduction)
    rtotal = (ref * down.double().view(-1)).sum() if reduction == "none" else ref * 3.0
    rleaves = [t for t in leaves if t.requires_grad] + ([rw64] if rw64 is not None else [])
    rgrads = torch.autograd.grad(rtotal, rleaves)
    torch.testing.assert_close(total.double(), rtotal, rtol=2e-6, atol=1e-7)
    for gr, r in zip(grads, rgrads):
        torch.testing.assert_close(gr.double().reshape(r.shape), r, rtol=1e-5, atol=1e-6)
    if teacher == "frozen":
        assert h_t.grad is None and w_t.grad is None
    with torch.no_grad():
        assert fused_linear_distillation(h_s, w_s, h_t, w_t, reduction=reduction).grad_fn is None


def test_flags_off_refuse_backward():
    h_s, w_s, b_s, h_t, w_t, b_t = _fp32_inputs(3, bias=False)
    h_s.requires_grad_()
    loss = torch.ops.liger_fx.fused_linear_divergence(h_s, w_s, None, h_t, w_t, None, None, "forward_kl", 0.5, 1.0,
                                                      1.0, "sum", False, False, False, False)[0]
    with pytest.raises(RuntimeError, match="gradient flags off"):
        loss.backward()


@pytest.mark.parametrize("kwargs,match", [
    ({"divergence": "kl"}, "divergence must be one of"),
    ({"reduction": "avg"}, "reduction must be one of"),
    ({"divergence": "jsd", "beta": 1.5}, "0 < beta < 1"),
    ({"temperature": 0.0}, "temperature must be > 0"),
    ({"reduction": "none", "row_weight": torch.ones(11)}, "row_weight is for the reduced forms"),
    ({"row_weight": torch.ones(10)}, "row_weight has shape"),
])
def test_bad_arguments_name_themselves(kwargs, match):
    h_s, w_s, b_s, h_t, w_t, b_t = _fp32_inputs(4)
    with pytest.raises(ValueError, match=match):
        fused_linear_distillation(h_s, w_s, h_t, w_t, **kwargs)


def test_vocabularies_and_rows_must_agree():
    h_s, w_s, b_s, h_t, w_t, b_t = _fp32_inputs(5)
    with pytest.raises(ValueError, match="vocabularies differ: 90 vs 89"):
        fused_linear_distillation(h_s, w_s, h_t, w_t[:89])
    with pytest.raises(ValueError, match="rows"):
        fused_linear_distillation(h_s, w_s, h_t[:10], w_t)


def test_no_rows_and_all_rows_masked_match_torch():
    """No rows: "batchmean"/"mean" are 0/0 = NaN as in torch, "sum" 0; all rows weighted 0: loss 0, zero grads."""
    h_s, w_s, b_s, h_t, w_t, b_t = _fp32_inputs(6)
    for reduction in ("sum", "batchmean", "mean"):
        loss, *_ = fused_linear_divergence_fwd(h_s[:0], w_s, b_s, h_t[:0], w_t, b_t, None, "forward_kl",
                                               reduction=reduction, chunk=4)
        ref = F.kl_div(torch.empty(0, 90), torch.empty(0, 90), reduction=reduction, log_target=True)
        assert math.isnan(loss.item()) == math.isnan(ref.item()) and (loss.isnan() or loss == ref)
    out = fused_linear_divergence_fwd(h_s, w_s, b_s, h_t, w_t, b_t, torch.zeros(11, device=h_s.device), "jsd", 0.5, 1.0, 1.0, "sum",
                                      True, True, True, True, chunk=4, block_v=32)
    assert out[0].item() == 0.0 and torch.equal(out[1], torch.zeros_like(out[1]))
    for g in out[3:]:
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_same_loss_and_gradients_as_liger_kernel(beta):
    """liger-kernel 0.8.5's LigerFusedLinearJSDLoss (soft loss only: masked sum / unmasked count) is our
    divergence="jsd" with the same beta, beta 0 and 1 included, at temperature 2. Runs where liger-kernel is
    installed (the GPU run carries its wheel; its chunked losses are torch code and run on CPU too)."""
    chunked = pytest.importorskip("liger_kernel.chunked_loss")
    h_s, w_s, b_s, h_t, w_t, b_t, _ = _inputs(37, 24, 40, 301, torch.float32, False, False, seed=11)
    labels = torch.randint(0, 301, (37,), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    labels[::3] = -100
    theirs_h, ours_h = h_s.clone().requires_grad_(), h_s.clone().requires_grad_()
    theirs_w, ours_w = w_s.clone().requires_grad_(), w_s.clone().requires_grad_()
    loss_fn = chunked.LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta,
                                              ignore_index=-100, temperature=2.0, compiled=False, chunk_size=16)
    theirs = loss_fn(theirs_h, theirs_w, h_t, w_t, labels)
    ours = fused_linear_distillation(ours_h, ours_w, h_t, w_t, divergence="jsd", beta=beta, temperature=2.0,
                                     reduction="sum", target=labels) / (labels != -100).sum()
    theirs.backward()
    ours.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours_h.grad, theirs_h.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(ours_w.grad, theirs_w.grad, rtol=1e-4, atol=1e-7)
