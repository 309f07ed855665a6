"""Cross-entropy row kernels and `liger_fx::cross_entropy` against the reference (CPU: Triton interpreter at small
shapes; CUDA: also a large bf16 shape)."""

import pytest
import torch

from liger_fx.kernels.cross_entropy import (
    ce_rows,
    cross_entropy,
    cross_entropy_bwd,
    cross_entropy_fwd,
    cross_entropy_ref,
    transform_ref,
)
from tests.tolerance import assert_close_rule, dlogits_rel_error, interpreter_slack, poison_

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

# (N, V, block_v): V=1000 in one 1024 block and in four 256 blocks (the last one partial)
SHAPES = [(37, 1000, None), (37, 1000, 256)]
if CUDA:
    SHAPES += [(4133, 32011, None), (1024, 128256, None)]

CASES = {  # id -> (dtype, reduction, softcap, logit_scale)
    "fp32-mean": (torch.float32, "mean", 0.0, 1.0),
    "bf16-mean": (torch.bfloat16, "mean", 0.0, 1.0),
    "bf16-sum-softcap": (torch.bfloat16, "sum", 5.0, 1.0),
    "fp32-sum-softcap-scale": (torch.float32, "sum", 5.0, 0.5),
    "bf16-mean-scale": (torch.bfloat16, "mean", 0.0, 1.75),
}


def _inputs(N, V, dtype, seed, ignore_every=4):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    logits = (torch.randn(N, V, generator=g, device=DEVICE) * 4).to(dtype)  # std 4: softcap 5 bends them
    target = torch.randint(0, V, (N,), generator=g, device=DEVICE)
    target[::ignore_every] = -100
    return logits, target


def _reference(logits, target, reduction, softcap, scale, grad, dtype):
    x = logits.detach().to(dtype).requires_grad_()
    loss = cross_entropy_ref(x, target, -100, reduction, softcap, scale)
    (dx,) = torch.autograd.grad(loss, x, grad)
    return loss.detach(), dx


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}-b{s[2]}")
def test_forward_and_grad(shape, case):
    N, V, block_v = shape
    dtype, reduction, softcap, scale = CASES[case]
    logits, target = _inputs(N, V, dtype, seed=N + V)
    grad = torch.tensor(0.37, device=DEVICE)  # not 1: checks that grad_output is folded in
    loss, lse = cross_entropy_fwd(logits, target, -100, reduction, softcap, scale, block_v=block_v)
    dx = cross_entropy_bwd(grad, logits, target, lse, -100, reduction, softcap, scale, block_v=block_v)
    ref, rdx = _reference(logits, target, reduction, softcap, scale, grad, torch.float64)
    same, sdx = _reference(logits, target, reduction, softcap, scale, grad, dtype)
    assert loss.dtype == torch.float32 and dx.dtype == dtype
    # The loss is an fp32 sum over N rows of O(5) values: fp32 rounding of the sum is ~N * 6e-8 * 5.
    assert_close_rule(loss, ref, same, atol=1e-6 * N, name="loss")
    # dx is O(1/N) for mean; fp32 exp/tanh in the kernel vs torch's: a few ulp of |dx|; per element, the saved fp32
    # LSE and the softcap's dz (dlogits_rel_error). In bf16 both sides round once; where the roundings differ the
    # exact value sits at a midpoint, so the rule's torch term covers it.
    atol = 4 * torch.finfo(torch.float32).eps * rdx.abs().max().item()
    lse = torch.logsumexp(transform_ref(logits.double(), softcap, scale), -1)
    own = dlogits_rel_error(lse, logits, softcap, scale) * rdx.abs()
    assert_close_rule(dx, rdx, sdx, atol, "dx", slack=own + interpreter_slack(rdx, dtype, 1))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_targets_ignored_matches_torch(reduction):
    """torch: mean of nothing is NaN (0/0), sum is 0; the gradient is 0 either way."""
    logits, target = _inputs(9, 300, torch.float32, seed=3)
    target.fill_(-100)
    loss, lse = cross_entropy_fwd(logits, target, -100, reduction)
    dx = cross_entropy_bwd(torch.tensor(1.0, device=DEVICE), logits, target, lse, -100, reduction)
    ref = torch.nn.functional.cross_entropy(logits, target, reduction=reduction)
    assert torch.equal(loss.isnan(), ref.isnan()) and (loss.isnan() or loss == ref)
    assert torch.equal(dx, torch.zeros_like(dx))


def test_row_kernel_writes_every_element():
    """Poisoned outputs: every loss, lse and gradient element (ignored rows included) must be written."""
    logits, target = _inputs(11, 700, torch.bfloat16, seed=5, ignore_every=3)
    # On the inputs' device: a CUDA launch cannot read or write CPU tensors.
    losses, lse = poison_(torch.empty(11, device=DEVICE)), poison_(torch.empty(11, device=DEVICE))
    dx = poison_(torch.empty_like(logits))
    ce_rows(logits, target, losses, lse, -100, 0.0, 1.0, dx=dx, grad_scale=torch.ones(1, device=DEVICE), block_v=256)
    assert torch.isfinite(losses).all() and torch.isfinite(lse).all() and torch.isfinite(dx).all()
    assert (dx[::3] == 0).all() and (losses[::3] == 0).all()


def test_other_ignore_index_and_out_of_range_target():
    logits, target = _inputs(6, 100, torch.float32, seed=7)
    target[0] = 5  # the ignore_index itself is ignored; -100 is now an out-of-range target
    loss, _ = cross_entropy_fwd(logits[1:], target[1:] * 0 + 5, 5, "sum")
    assert loss == 0
    loss, _ = cross_entropy_fwd(logits, target, 5, "sum")
    assert loss.isnan()  # torch raises on a target outside [0, V); we never read out of bounds and give NaN


def test_inputs_are_not_written():
    logits, target = _inputs(8, 300, torch.bfloat16, seed=9)
    before = logits.clone(), target.clone()
    loss, lse = cross_entropy_fwd(logits, target, -100, "mean", 5.0)
    cross_entropy_bwd(torch.tensor(1.0, device=DEVICE), logits, target, lse, -100, "mean", 5.0)
    assert torch.equal(before[0], logits) and torch.equal(before[1], target)


@pytest.mark.parametrize("reduction,softcap,scale,all_ignored", [
    ("mean", 0.0, 1.0, False), ("sum", 5.0, 0.5, False), ("mean", 5.0, 1.0, True)])
def test_op_autograd_and_fake(reduction, softcap, scale, all_ignored):
    """The library op (CPU: the written-out reference backward) against autograd of the reference; opcheck covers
    schema, fake tensor, autograd registration and AOT dispatch."""
    logits, target = _inputs(7, 50, torch.float32, seed=11)
    if all_ignored:
        target.fill_(-100)
    logits.requires_grad_()
    args = (-100, reduction, softcap, scale)
    if not all_ignored:  # opcheck compares outputs without equal_nan; the NaN mean is checked below
        torch.library.opcheck(torch.ops.liger_fx.cross_entropy, (logits, target, *args))
    loss = cross_entropy(logits, target, *args) / 13
    (dx,) = torch.autograd.grad(loss, logits)
    x = logits.detach().requires_grad_()
    ref = cross_entropy_ref(x, target, *args) / 13
    (rdx,) = torch.autograd.grad(ref, x)
    torch.testing.assert_close(loss, ref, atol=0, rtol=1e-6, equal_nan=True)
    torch.testing.assert_close(dx, rdx, atol=1e-8, rtol=1e-5)
