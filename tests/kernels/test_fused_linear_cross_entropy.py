"""Fused lm_head + cross-entropy against the reference (CPU: Triton interpreter at N=37, H=64, V=1000 with several
chunks; CUDA: also large bf16 shapes with the default chunk size)."""

import pytest
import torch

from liger_fx.kernels import fused_linear_cross_entropy as flce_mod
from liger_fx.kernels.fused_linear_cross_entropy import (
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_fwd,
    fused_linear_cross_entropy_ref,
)
from liger_fx.kernels.cross_entropy import cross_entropy_ref, transform_ref
from tests.tolerance import assert_close_rule, dlogits_rel_error, interpreter_slack, rounding_flips

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

# (N, H, V, chunk, block_v): 37 rows in chunks of 16 (16, 16, 5); V=1000 in one block or in four of 256
SHAPES = [(37, 64, 1000, 16, None), (37, 64, 1000, 8, 256)]
if CUDA:
    SHAPES += [(4133, 1024, 32011, None, None), (4096, 4096, 128256, None, None)]

CASES = {  # id -> (dtype, reduction, softcap, logit_scale, bias)
    "fp32-mean": (torch.float32, "mean", 0.0, 1.0, False),
    "bf16-mean-bias": (torch.bfloat16, "mean", 0.0, 1.0, True),
    "bf16-sum-softcap": (torch.bfloat16, "sum", 5.0, 1.0, False),
    "fp32-sum-softcap-scale-bias": (torch.float32, "sum", 5.0, 0.5, True),
    "bf16-mean-scale": (torch.bfloat16, "mean", 0.0, 1.75, False),
}


def _inputs(N, H, V, dtype, bias, seed, ignore_every=4):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    h = torch.randn(N, H, generator=g, device=DEVICE).to(dtype)
    w = (torch.randn(V, H, generator=g, device=DEVICE) * (4 / H**0.5)).to(dtype)  # logits of std 4
    b = torch.randn(V, generator=g, device=DEVICE).to(dtype) if bias else None
    target = torch.randint(0, V, (N,), generator=g, device=DEVICE)
    target[::ignore_every] = -100
    return h, w, b, target


def _reference(h, w, b, target, reduction, softcap, scale, dtype):
    """(loss, dh, dw, db) of the reference in `dtype`, by autograd."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (h, w) + ((b,) if b is not None else ())]
    loss = fused_linear_cross_entropy_ref(*leaves[:2], leaves[2] if b is not None else None, target, -100,
                                          reduction, softcap, scale)
    grads = torch.autograd.grad(loss, leaves)
    return (loss.detach(), *grads) + ((None,) if b is None else ())


def _chunked_logits(h, w, b, C):
    """The logits as the kernel forms them: the same cuBLAS call on the same C-row chunks. cuBLAS picks its kernel
    by shape, so one (N, H) @ (H, V) call may sum in another order than C-row calls and round some bf16 logits the
    other way: one ulp of a logit of 4 is 2^-6, 1.6% of its softmax probability, an error both sides are equally
    entitled to but that the element-wise rule cannot pair up. With the same logits, ours and torch's differ only in
    what follows them."""
    parts = [torch.addmm(b, h[s:s + C], w.t()) if b is not None else torch.mm(h[s:s + C], w.t())
             for s in range(0, h.shape[0], C)]
    return torch.cat(parts)


def _torch_same(logits, h, w, b, target, reduction, softcap, scale):
    """Eager torch in the inputs' dtype from those logits: autograd of the loss to dlogits, then the linear's
    backward (dlogits @ W, dlogits^T @ h, sum over rows)."""
    x = logits.detach().requires_grad_()
    loss = cross_entropy_ref(x, target, -100, reduction, softcap, scale)
    (dl,) = torch.autograd.grad(loss, x)
    return loss.detach(), dl @ w, dl.t() @ h, None if b is None else dl.sum(0)


def _dlogits64(logits, target, reduction, softcap, scale):
    """Exact (fp64) dlogits and per-row LSE from the given logits."""
    x = logits.double().requires_grad_()
    z = transform_ref(x, softcap, scale)
    loss = torch.nn.functional.cross_entropy(z, target, ignore_index=-100, reduction=reduction)
    return torch.autograd.grad(loss, x)[0], torch.logsumexp(z.detach(), -1)


def _propagate(e, h, w):
    """An (N, V) bound on |dlogits| errors carried through the linear's backward into (dh, dW, db) bounds."""
    return e @ w.double().abs(), e.t() @ h.double().abs(), e.sum(0)


def _accumulation_slack(dl, h, chunk, dtype):
    """dW is accumulated in W's dtype, one `addmm_` per chunk (torch rounds once, at the end, which the rule's torch
    term covers). Measured on the H200: cuBLAS's bf16 addmm_ rounds the chunk's product P_k to bf16 BEFORE adding it
    to the running sum, then rounds the sum: a chunk product of 1.29149e-4 entered the sum as 1.2875e-4 (the nearest
    bf16), and a product of -3.1525e-6 cancelled a running sum of 3.1590e-6 to exactly 0. Bound for the extra
    roundings: u * (sum over chunks after the first of |P_k|, plus sum over all but the last of |S_k|), with P_k
    the exact chunk products and S_k the exact partial sums."""
    if dtype == torch.float32:
        return 0.0
    u = torch.finfo(dtype).eps / 2
    partial = torch.zeros(dl.shape[1], h.shape[1], dtype=torch.float64, device=h.device)
    total = torch.zeros_like(partial)
    starts = list(range(0, h.shape[0], chunk))
    for k, start in enumerate(starts):
        product = dl[start:start + chunk].t() @ h[start:start + chunk].double()
        partial += product
        if k > 0:
            total += product.abs()
        if k < len(starts) - 1:
            total += partial.abs()
    return u * total


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:3])) + f"-c{s[3]}-b{s[4]}")
def test_loss_and_grads(shape, case):
    N, H, V, chunk, block_v = shape
    dtype, reduction, softcap, scale, bias = CASES[case]
    if block_v is not None and case not in ("bf16-sum-softcap", "fp32-mean"):
        pytest.skip("multi-block V: two cases are enough under the interpreter")
    h, w, b, target = _inputs(N, H, V, dtype, bias, seed=N + V)
    loss, dh, dw, db = fused_linear_cross_entropy_fwd(
        h, w, b, target, -100, reduction, softcap, scale, True, True, chunk=chunk, block_v=block_v
    )
    assert loss.dtype == torch.float32 and dh.dtype == dtype and dw.dtype == dtype
    ref = _reference(h, w, b, target, reduction, softcap, scale, torch.float64)
    C = chunk or flce_mod.chunk_rows(N, V, h.element_size())
    logits = _chunked_logits(h, w, b, C)
    same = _torch_same(logits, h, w, b, target, reduction, softcap, scale)

    # The loss is an fp32 sum of N per-row values: a few fp32 ulp of it.
    assert_close_rule(loss, ref[0], same[0], atol=2e-6 * ref[0].abs().item(), name="loss")

    # Gradients. Bounds with a cause each, all in fp64 from the data:
    # - atol: fp32 exp/tanh in the kernel vs torch's, a few ulp of the largest value;
    # - own_ulp: both round each gradient to its dtype once; where torch's errors happen to cancel, ours need not:
    #   one ulp of the element (0 in fp32);
    # - lse: the fp32 dlogits of either side within dlogits_rel_error of the exact ones (the saved LSE: eps/2*|lse|,
    #   1.2e-6 relative at lse = 20), carried through the matmuls; in fp32 this was failing on CUDA;
    # - flips: in bf16, dlogits that the two sides may round apart (tolerance.rounding_flips), carried through the
    #   matmuls;
    # - order: cuBLAS sums the K products of a matmul in an order it picks by shape (ours: C-row chunks; torch: N
    #   rows). Two orders differ by a random walk of K roundings, each <= u * sum|terms|: std <= u*sqrt(K/3)*terms;
    #   we allow eps*sqrt(K)*terms (3.5 std). fp32 needs it (K = 32011 products for dh); in bf16 it is << one ulp.
    # - split-K (bf16 dh, dW): cuBLAS may split K and, at torch's default allow_bf16_reduced_precision_reduction,
    #   add the partial sums in bf16: up to u * sum|terms| on either side, uncorrelated between our C-row calls and
    #   torch's N-row one. H200, 4133x1024x32011 mean-bias, dh[1066, 692]: ours and torch's dlogits times W sum
    #   exactly to 2.5039e-6 and 2.5016e-6, cuBLAS returned 2.5332e-6 and 2.4736e-6 (exact 2.4588e-6; u * terms
    #   = 2.3e-7). torch's error happened to be small there, so the rule's torch term alone did not cover ours.
    # - accumulation (bf16 dW): each chunk's product and the running sum rounded once per chunk (_accumulation_slack);
    # - interpreter: each bf16 dlogits truncated once, summed over V for dh, N for dW (tests/tolerance.py).
    dl, lse = _dlogits64(logits, target, reduction, softcap, scale)
    rel = dlogits_rel_error(lse, logits, softcap, scale)
    terms = _propagate(dl.abs(), h, w)
    lse_err = _propagate(rel * dl.abs(), h, w)
    flips = _propagate(rounding_flips(dl, rel, dtype), h, w)
    del rel
    eps32 = torch.finfo(torch.float32).eps
    for i, (name, ours, K) in enumerate((("dh", dh, V), ("dw", dw, N), ("db", db, N))):
        r, s = ref[i + 1], same[i + 1]
        if r is None:
            assert ours.numel() == 0, name
            continue
        atol = 4 * eps32 * r.abs().max().item()
        own_ulp = 0.0 if dtype == torch.float32 else torch.finfo(dtype).eps * r.abs()
        order = eps32 * K**0.5 * terms[i]
        acc = _accumulation_slack(dl, h, C, dtype) if name == "dw" else 0.0
        split_k = torch.finfo(dtype).eps / 2 * terms[i] if dtype != torch.float32 and name != "db" else 0.0
        slack = own_ulp + lse_err[i] + flips[i] + order + split_k + acc + interpreter_slack(terms[i], dtype, 1)
        assert_close_rule(ours, r, s, atol, name, slack=slack)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_targets_ignored_matches_torch(reduction):
    """torch: mean of nothing is NaN (0/0), sum is 0; every gradient is 0."""
    h, w, b, target = _inputs(9, 32, 300, torch.float32, True, seed=3)
    target.fill_(-100)
    loss, dh, dw, db = fused_linear_cross_entropy_fwd(h, w, b, target, -100, reduction, chunk=4)
    ref = torch.nn.functional.cross_entropy(h @ w.t() + b, target, reduction=reduction)
    assert torch.equal(loss.isnan(), ref.isnan()) and (loss.isnan() or loss == ref)
    for g in (dh, dw, db):
        assert torch.equal(g, torch.zeros_like(g))


def test_gradient_flags_skip_work_and_inputs_are_not_written():
    """grad_input only (a frozen lm_head, e.g. PEFT) and no gradient at all (inference)."""
    h, w, b, target = _inputs(21, 32, 300, torch.float32, False, seed=4)
    before = [t.clone() for t in (h, w, target)]
    loss, dh, dw, db = fused_linear_cross_entropy_fwd(h, w, b, target, grad_input=True, grad_weight=False, chunk=8)
    # Same chunks, so the same logits matmuls: cuBLAS may sum a 21-row matmul in another order than 8-row ones, and
    # the bit-equality below is about the flags, not about cuBLAS.
    loss0, dh0, dw0, db0 = fused_linear_cross_entropy_fwd(h, w, b, target, grad_input=False, grad_weight=False,
                                                          chunk=8)
    ref = _reference(h, w, b, target, "mean", 0.0, 1.0, torch.float64)
    assert dw.numel() == 0 and db.numel() == 0 and dh0.numel() == 0 and dw0.numel() == 0
    torch.testing.assert_close(loss, ref[0].float(), atol=0, rtol=2e-6)
    torch.testing.assert_close(loss0, loss, atol=0, rtol=0)
    torch.testing.assert_close(dh, ref[1].float(), atol=1e-7, rtol=1e-5)
    for t0, t in zip(before, (h, w, target)):
        assert torch.equal(t0, t)


@pytest.mark.parametrize("bias", [False, True])
def test_op_autograd_sum_over_num_items(bias):
    """`op(..., "sum") / num_items_in_batch` as HF's fixed_cross_entropy: the backward scales the saved gradients by
    grad_output = 1/n (CPU: the reference implementation; CUDA: the Triton path). opcheck: schema, fake, autograd."""
    dtype = torch.float32
    h, w, b, target = _inputs(19, 32, 300, dtype, bias, seed=6)
    leaves = [t.requires_grad_() for t in (h, w) + ((b,) if bias else ())]
    n = torch.tensor(13.0, device=DEVICE)
    args = (h, w, b, target, -100, "sum", 5.0, 1.0, True, True)
    torch.library.opcheck(torch.ops.liger_fx.fused_linear_cross_entropy, args)
    loss = fused_linear_cross_entropy(h, w, target, bias=b, reduction="sum", softcap=5.0) / n
    grads = torch.autograd.grad(loss, leaves)
    rleaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = fused_linear_cross_entropy_ref(rleaves[0], rleaves[1], rleaves[2] if bias else None, target, -100, "sum",
                                         5.0) / n
    rgrads = torch.autograd.grad(ref, rleaves)
    torch.testing.assert_close(loss, ref.float(), atol=0, rtol=2e-6)
    for name, g, r in zip("hwb", grads, rgrads):
        torch.testing.assert_close(g, r.float(), atol=1e-7, rtol=1e-5, msg=lambda m: f"d{name}: {m}")


def test_op_frozen_weight_and_no_grad():
    h, w, b, target = _inputs(11, 32, 300, torch.float32, False, seed=8)
    h.requires_grad_()
    loss = fused_linear_cross_entropy(h, w, target)  # w frozen: only dh is computed
    (dh,) = torch.autograd.grad(loss, h)
    hr = h.detach().double().requires_grad_()
    (rdh,) = torch.autograd.grad(fused_linear_cross_entropy_ref(hr, w.double(), None, target), hr)
    torch.testing.assert_close(dh, rdh.float(), atol=1e-7, rtol=1e-5)
    with torch.no_grad():
        assert fused_linear_cross_entropy(h, w, target).grad_fn is None


def test_op_with_flags_off_refuses_backward():
    h, w, b, target = _inputs(5, 16, 50, torch.float32, False, seed=9)
    h.requires_grad_()
    loss = torch.ops.liger_fx.fused_linear_cross_entropy(h, w, None, target, -100, "mean", 0.0, 1.0, False, False)[0]
    with pytest.raises(RuntimeError, match="grad_input/grad_weight off"):
        loss.backward()


# ---------------------------------------------------------------------------------------------------------------
# `lm_head_cross_entropy`: the logits returned too; the backward takes their gradient and the loss's in one pass


@pytest.mark.parametrize("reduction,softcap,scale,bias", [
    ("mean", 0.0, 1.0, False), ("sum", 5.0, 0.5, True), ("mean", 0.0, 1.75, True),
], ids=["mean", "sum-softcap-scale-bias", "mean-scale-bias"])
@pytest.mark.parametrize("grad_logits", [True, False], ids=["logits-grad", "loss-only"])
def test_returned_logits_forward_and_both_gradients(reduction, softcap, scale, bias, grad_logits, monkeypatch):
    """fp32, 37 rows in chunks of 16: logits, loss and (dh, dW, db) of loss*g + <logits, G> against autograd of the
    reference, with every buffer the launchers allocate poisoned. Ignored rows get only the logits' own gradient."""
    from liger_fx.kernels.fused_linear_cross_entropy import (linear_cross_entropy_logits_bwd,
                                                             linear_cross_entropy_logits_fwd)
    from tests.tolerance import poison_

    real_empty, real_empty_like = torch.empty, torch.empty_like
    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison_(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison_(real_empty_like(*a, **k)))
    N, H, V = 37, 64, 1000
    h, w, b, target = _inputs(N, H, V, torch.float32, bias, seed=5)
    g = torch.tensor(0.7, device=DEVICE)
    G = torch.randn(N, V, device=DEVICE) * 1e-3 if grad_logits else None

    leaves = [t.detach().clone().requires_grad_() for t in (h, w) + ((b,) if bias else ())]
    ref_logits = torch.nn.functional.linear(*leaves[:2], leaves[2] if bias else None)
    ref_loss = cross_entropy_ref(ref_logits, target, -100, reduction, softcap, scale)
    total = ref_loss * g + ((ref_logits * G).sum() if grad_logits else 0)
    ref_grads = torch.autograd.grad(total, leaves)

    logits, loss, lse = linear_cross_entropy_logits_fwd(h, w, b, target, -100, reduction, softcap, scale)
    dh, dw, db = linear_cross_entropy_logits_bwd(G, g, h, w, b, target, logits, lse, -100, reduction, softcap, scale,
                                                 chunk=16)
    torch.testing.assert_close(logits, ref_logits.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, ref_loss.detach(), atol=1e-5, rtol=1e-5)
    for name, ours, ref in zip(("dh", "dW", "db"), (dh, dw, db), ref_grads):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_returned_logits_frozen_lm_head_and_op_autograd():
    """Through the library op and autograd: a frozen lm_head gets no dW (h is not even saved for it), dh still
    flows; the loss and logits gradients both reach h."""
    from liger_fx.kernels.fused_linear_cross_entropy import lm_head_cross_entropy

    h, w, _, target = _inputs(37, 64, 1000, torch.float32, False, seed=6)
    h = h.view(1, 37, 64).requires_grad_()
    logits, loss = lm_head_cross_entropy(h, w, target.view(1, 37))
    assert logits.shape == (1, 37, 1000)
    (loss + logits.float().square().mean()).backward()
    h_ref = h.detach().clone().requires_grad_()
    ref_logits = torch.nn.functional.linear(h_ref, w)
    (cross_entropy_ref(ref_logits.view(-1, 1000), target) + ref_logits.square().mean()).backward()
    torch.testing.assert_close(h.grad, h_ref.grad, atol=1e-5, rtol=1e-4)
    assert not w.requires_grad
