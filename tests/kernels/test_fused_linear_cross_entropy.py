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
from tests.tolerance import assert_close_rule, interpreter_slack

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


def _dlogits64(h, w, b, target, reduction, softcap, scale):
    x = torch.nn.functional.linear(h.double(), w.double(), None if b is None else b.double()).requires_grad_()
    z = torch.tanh(x / softcap) * softcap if softcap else x
    loss = torch.nn.functional.cross_entropy(z * scale, target, ignore_index=-100, reduction=reduction)
    return torch.autograd.grad(loss, x)[0]


def _accumulation_slack(dl, h, chunk, dtype):
    """dW is accumulated in W's dtype, one addmm per chunk, each rounding the running sum once (torch rounds once
    at the end, which the rule's torch term covers). Bound for the K-1 extra roundings: u * sum_k |S_k|, with S_k
    the exact partial sums."""
    if dtype == torch.float32:
        return 0.0
    u = torch.finfo(dtype).eps / 2
    partial, total = torch.zeros(dl.shape[1], h.shape[1], dtype=torch.float64, device=h.device), 0.0
    starts = list(range(0, h.shape[0], chunk))
    for start in starts[:-1]:
        partial += dl[start:start + chunk].t() @ h[start:start + chunk].double()
        total = total + partial.abs()
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
    ref = _reference(h, w, b, target, reduction, softcap, scale, torch.float64)
    same = _reference(h, w, b, target, reduction, softcap, scale, dtype)
    assert loss.dtype == torch.float32 and dh.dtype == dtype and dw.dtype == dtype

    # The loss is an fp32 sum of N per-row values: a few fp32 ulp of it.
    assert_close_rule(loss, ref[0], same[0], atol=2e-6 * ref[0].abs().item(), name="loss")
    # Gradients: fp32 exp/tanh in the kernel and fp32 accumulation in the matmuls, a few ulp of the largest value;
    # under the interpreter each bf16 dlogits is truncated once (tests/tolerance.py), summed over V for dh, N for dW.
    # Both torch and we round each gradient to its dtype once at the end; where torch's errors happen to cancel,
    # ours need not, so an element may also differ by one ulp of its own value (0 in fp32).
    dl = _dlogits64(h, w, b, target, reduction, softcap, scale)
    C = chunk or flce_mod.chunk_rows(N, V, h.element_size())
    for name, ours, r, s, terms, extra in (
        ("dh", dh, ref[1], same[1], dl.abs() @ w.double().abs(), 0.0),
        ("dw", dw, ref[2], same[2], dl.abs().t() @ h.double().abs(), _accumulation_slack(dl, h, C, dtype)),
        ("db", db, ref[3], same[3], dl.abs().sum(0), 0.0),
    ):
        if r is None:
            assert ours.numel() == 0, name
            continue
        atol = 4 * torch.finfo(torch.float32).eps * r.abs().max().item()
        own_ulp = 0.0 if dtype == torch.float32 else torch.finfo(dtype).eps * r.abs()
        assert_close_rule(ours, r, s, atol, name, slack=interpreter_slack(terms, dtype, 1) + extra + own_ulp)


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
    loss0, dh0, dw0, db0 = fused_linear_cross_entropy_fwd(h, w, b, target, grad_input=False, grad_weight=False)
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
