"""LazyLogits on their own (eager, no compile): a cross-entropy on them is the fused op on (h, W, b) with eager's
loss and gradients, views and casts stay lazy, any other use computes the logits once with eager's values and
gradients, and nothing is silently wrong (in-place writes, an optimizer step before the read, ops below autograd).
The compiled model that returns them: tests/test_lazy_logits_backend.py."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from liger_fx.lazy_logits import CONSUMERS, LazyLogits, is_lazy, lazy_logits, register_consumer
from tests.tolerance import assert_close_rule, assert_max_error_rule

B, T, H, V = 3, 13, 16, 40  # N = 39 rows: half the logits (780) is more than dW (640)


class BigTensors(TorchDispatchMode):
    """Records every op (below autograd, each custom op as one call) with an output of at least `numel` elements
    (and last dim `last_dim`, if given), meta tensors aside (a LazyLogits keeps its eager metadata on one)."""

    def __init__(self, numel, last_dim=None):
        super().__init__()
        self.numel, self.last_dim, self.seen = numel, last_dim, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() >= self.numel and t.device.type != "meta" and \
                    (self.last_dim is None or (t.dim() and t.shape[-1] == self.last_dim)):
                self.seen.append(f"{func}: {tuple(t.shape)}")
        return out


def _inputs(dtype=torch.float32, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(B, T, H, generator=g) * 2).to(dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g) / 3).to(dtype).requires_grad_()
    b = (torch.randn(V, generator=g)).to(dtype).requires_grad_() if bias else None
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, :3] = -100
    return h, w, b, y


def _grads(loss, leaves):
    return torch.autograd.grad(loss, [t for t in leaves if t is not None])


# Loss spellings on the logits (B, T, V), as loops outside the model write them. The same function runs on eager
# logits and on LazyLogits.
LOSSES = {
    "titan-sum-over-n": lambda z, y: F.cross_entropy(z.flatten(0, 1).float(), y.flatten(0, 1), reduction="sum")
    / (y != -100).sum(),
    "view-mean": lambda z, y: F.cross_entropy(z.view(-1, V), y.view(-1)),
    "reshape-float-mean": lambda z, y: F.cross_entropy(z.reshape(-1, z.size(-1)).float(), y.reshape(-1)),
    "module": lambda z, y: nn.CrossEntropyLoss()(z.float().view(-1, V), y.view(-1)),
    "row-slice-temperature": lambda z, y: F.cross_entropy((z[:, :-1].float() / 0.7).reshape(-1, V),
                                                          y[:, 1:].reshape(-1)),
    "hf-shift": lambda z, y: F.cross_entropy(z[..., :-1, :].contiguous().view(-1, V).float(),
                                            y[..., 1:].contiguous().view(-1)),
    "slice-reshape-copies": lambda z, y: F.cross_entropy(z[:, 1:].reshape(-1, V), y[:, :-1].reshape(-1),
                                                         reduction="sum"),
    "softcap": lambda z, y: F.cross_entropy((torch.tanh(z / 5.0) * 5.0).float().flatten(0, 1), y.flatten(0, 1)),
    "split-rows": lambda z, y: sum(F.cross_entropy(c.float(), t, reduction="sum")
                                   for c, t in zip(z.flatten(0, 1).split(8), y.flatten(0, 1).split(8))) / 36,
    "ignore-index-7": lambda z, y: F.cross_entropy(z.flatten(0, 1), y.clamp_min(0).flatten(0, 1), ignore_index=7),
}


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_cross_entropy_is_fused_and_matches_eager_fp32(name, bias):
    loss_fn = LOSSES[name]
    h, w, b, y = _inputs(bias=bias)
    ref = loss_fn(F.linear(h, w, b), y)
    ref_grads = _grads(ref, (h, w, b))
    z = lazy_logits(h, w, b)
    with BigTensors(B * T * V // 2) as big:  # no (N, V) tensor, nor half of one (a split of it)
        loss = loss_fn(z, y)
    assert big.seen == [], big.seen
    assert is_lazy(z), "the loss materialized the logits"
    grads = _grads(loss, (h, w, b))
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-5)
    for g, r, n in zip(grads, ref_grads, ("h", "W", "b")):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-5, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("name", ["titan-sum-over-n", "row-slice-temperature", "view-mean"])
def test_cross_entropy_bf16_within_torch_error(name):
    """bf16 logits: ours (the fused op computes the loss in fp32 from bf16 matmul chunks) against the fp32
    reference, within 2x eager bf16's own error (STYLE's rule), for the loss and each gradient."""
    loss_fn = LOSSES[name]
    h, w, b, y = _inputs(dtype=torch.bfloat16)
    h32, w32 = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    ref = loss_fn(F.linear(h32, w32), y)
    ref_grads = _grads(ref, (h32, w32))
    same = loss_fn(F.linear(h, w), y)
    same_grads = _grads(same, (h, w))
    z = lazy_logits(h, w)
    loss = loss_fn(z, y)
    assert is_lazy(z) and loss.dtype == same.dtype
    grads = _grads(loss, (h, w))
    assert_close_rule(loss.detach(), ref.detach(), same.detach(), atol=1e-5, name="loss")
    # Gradients per tensor (tolerance.assert_max_error_rule): the fused op rounds dh and dW to bf16 with the loss's
    # gradient taken as 1 and rescales them by the incoming one (1 / n_tokens here) in its backward, one more
    # rounding than eager's chain, so single elements may sit an ulp apart where eager's rounding happened to land
    # on the reference (the op's elementwise bounds: tests/kernels/test_fused_linear_cross_entropy.py).
    for g, r, s, n in zip(grads, ref_grads, same_grads, ("h", "W")):
        assert_max_error_rule(g, r, s, name=n)


def test_metadata_reads_do_not_materialize():
    h, w, b, y = _inputs()
    z = lazy_logits(h, w, b)
    eager = F.linear(h, w, b)
    assert isinstance(z, torch.Tensor) and type(z) is LazyLogits
    assert z.shape == eager.shape and z.size(1) == T and z.dim() == 3 and z.ndim == 3 and len(z) == B
    assert z.dtype == eager.dtype and z.device == eager.device and z.numel() == eager.numel()
    assert z.stride() == eager.stride() and z.is_contiguous() and z.is_floating_point()
    assert z.requires_grad and not z.is_leaf and z.grad_fn is not None and z.grad is None
    s = z[:, :-1]
    assert s.stride() == eager[:, :-1].stride() and not s.is_contiguous() and s.shape == (B, T - 1, V)
    assert z.float().dtype == torch.float32 and z.float() is z  # fp32 already: the same tensor, as eager's
    assert z.to(torch.bfloat16).dtype == torch.bfloat16
    d = z.detach()
    assert not d.requires_grad and d.is_leaf and is_lazy(d)
    assert is_lazy(z), "a metadata read materialized the logits"
    text = repr(z)  # printing reads the values: they are eager's
    assert text.startswith("tensor(") and f"{eager[0, 0, 0].item():.4f}" in text
    assert not is_lazy(z)


def test_other_uses_materialize_once_with_eager_values_and_gradients():
    """A z-loss and an accuracy read the logits: computed once (one matmul), eager's values and gradients, and the
    loss computed after them uses the same logits (no second matmul, no fused op)."""
    h, w, b, y = _inputs(bias=True)

    def step(z):
        acc = (z.argmax(-1) == y).float().mean()
        zloss = z.float().logsumexp(-1).pow(2).mean()
        loss = F.cross_entropy(z.flatten(0, 1), y.flatten(0, 1)) + 1e-2 * zloss
        return loss, acc

    ref, ref_acc = step(F.linear(h, w, b))
    ref_grads = _grads(ref, (h, w, b))
    z = lazy_logits(h, w, b)
    linears = []

    class CountLinear(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in (torch.ops.aten.addmm.default, torch.ops.aten.mm.default) and out.shape == (B * T, V):
                linears.append(func)
            if "liger_fx" in str(func):
                linears.append(func)
            return out

    with CountLinear():
        loss, acc = step(z)
    assert len(linears) == 1, linears  # the logits once, never the fused op beside them
    assert type(loss) is torch.Tensor and not is_lazy(z)
    torch.testing.assert_close(acc, ref_acc)
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-5)
    for g, r in zip(_grads(loss, (h, w, b)), ref_grads):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-5)


def test_in_place_writes_are_seen_by_every_later_use():
    """In-place ops materialize, and views taken before see the write (they share the logits, as eager's views do);
    an elementwise result taken before does not (eager copied). The loss afterwards equals eager's."""
    h, w, b, y = _inputs()

    def step(z):
        flat = z.view(-1, V)  # a view, taken before the writes
        before = z.float() * 1.0  # a copy, taken before the writes
        z.div_(2.0)
        z[..., 3] = -30.0
        loss = F.cross_entropy(flat, y.view(-1)) + before.mean()
        return loss, flat

    ref, ref_flat = step(F.linear(h, w, b).clone())
    ref_grads = _grads(ref, (h, w))
    z = lazy_logits(h, w)
    loss, flat = step(z)
    assert type(loss) is torch.Tensor
    torch.testing.assert_close(flat.materialize(), ref_flat)
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-5)
    for g, r in zip(_grads(loss, (h, w)), ref_grads):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-5)


def test_optimizer_step_before_the_read_keeps_the_returned_logits():
    """`pred = model(x); loss.backward(); opt.step(); metric(pred)`: the logits read after the step are those the
    model returned (W was copied before the step), not the updated weight's."""
    h, w, b, y = _inputs()
    head = nn.Linear(H, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(w)
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    before = F.linear(h, head.weight).detach().clone()
    z = lazy_logits(h, head.weight)
    F.cross_entropy(z.flatten(0, 1), y.flatten(0, 1)).backward()
    opt.step()
    assert not torch.allclose(F.linear(h, head.weight), before)  # the step moved W
    torch.testing.assert_close(z.materialize(), before)
    w_then = head.weight.detach().clone()
    z2 = lazy_logits(h, head.weight)  # the fused loss, read after a step, too
    opt.step()
    loss = F.cross_entropy(z2.flatten(0, 1), y.flatten(0, 1))
    assert is_lazy(z2)
    torch.testing.assert_close(loss, F.cross_entropy(F.linear(h, w_then).flatten(0, 1), y.flatten(0, 1)))
    head.zero_grad()
    loss.backward()  # the gradient at the weight the logits were made with, into the parameter's .grad
    w_ref = w_then.clone().requires_grad_()
    F.cross_entropy(F.linear(h, w_ref).flatten(0, 1), y.flatten(0, 1)).backward()
    torch.testing.assert_close(head.weight.grad, w_ref.grad)


def test_any_other_write_to_the_weight_before_the_read_raises():
    h, w, b, y = _inputs()
    z = lazy_logits(h, w)
    with torch.no_grad():
        w.mul_(2.0)
    with pytest.raises(RuntimeError, match="in-place write to the lm_head's input, weight or bias"):
        F.cross_entropy(z.flatten(0, 1), y.flatten(0, 1))
    with pytest.raises(RuntimeError, match="lazy_logits"):
        z.sum()


def test_a_freed_weight_storage_raises():
    """FSDP frees an unsharded parameter's storage after the forward (resize to 0): reading lazy logits made from it
    then must raise, not read freed memory."""
    h, w, b, y = _inputs()
    w2 = w.detach().clone()
    z = lazy_logits(h, w2)
    w2.untyped_storage().resize_(0)
    with pytest.raises(RuntimeError, match="storage of the lm_head's input or weight was freed"):
        F.cross_entropy(z.flatten(0, 1), y.flatten(0, 1))


def test_ops_below_autograd_get_values_and_the_lm_heads_gradient():
    """Code that turns torch functions off for subclasses reaches __torch_dispatch__: values computed there, and the
    gradient through the LazyLogits' own backward (the lm_head's); an in-place op there raises."""
    h, w, b, y = _inputs(bias=True)
    ref = (F.linear(h, w, b) * 3 + 1).pow(2).mean()
    ref_grads = _grads(ref, (h, w, b))
    z = lazy_logits(h, w, b)
    with torch._C.DisableTorchFunctionSubclass():
        out = (z * 3 + 1).pow(2).mean()
    assert type(out) is torch.Tensor
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    for g, r in zip(_grads(out, (h, w, b)), ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="in-place"):
        with torch._C.DisableTorchFunctionSubclass():
            lazy_logits(h, w, b).add_(1)


def test_gradient_state_follows_eager():
    """No gradient where eager's logits would have none: detached, or viewed under no_grad; the fused loss then
    gives no gradient to W either."""
    h, w, b, y = _inputs()
    z = lazy_logits(h, w)
    loss = F.cross_entropy(z.detach().flatten(0, 1), y.flatten(0, 1))
    assert not loss.requires_grad
    with torch.no_grad():
        flat = z.flatten(0, 1)
        assert not lazy_logits(h, w).requires_grad
    assert not flat.requires_grad and not F.cross_entropy(flat, y.flatten(0, 1)).requires_grad
    assert is_lazy(z)
    d = lazy_logits(h, w).detach().requires_grad_()  # a leaf wanting its own gradient: materialized
    F.cross_entropy(d.flatten(0, 1), y.flatten(0, 1)).backward()
    assert d.grad is not None and d.grad.shape == (B, T, V)


def test_a_view_into_the_vocabulary_materializes():
    h, w, b, y = _inputs()
    eager = F.linear(h, w)
    for fn in (lambda z: z[..., :10], lambda z: z[..., 5], lambda z: z[:, :, 3], lambda z: z[y.clamp_min(0) > 3],
               lambda z: z.view(B, -1), lambda z: z.transpose(1, 2), lambda z: z.t()
               if z.dim() == 2 else z.flatten(0, 1).t(), lambda z: z.expand(2, B, T, V)[0]):
        z = lazy_logits(h, w)
        out = fn(z)
        assert type(out) is torch.Tensor or not is_lazy(out) or out.shape[-1] == V
        torch.testing.assert_close(out if type(out) is torch.Tensor else out.materialize(), fn(eager))


def test_cross_entropy_forms_the_fused_op_does_not_take_materialize():
    """Label smoothing, a class weight: eager's result from materialized logits."""
    h, w, b, y = _inputs()
    flat = y.flatten(0, 1)
    for kwargs in ({"label_smoothing": 0.1}, {"weight": torch.rand(V)}, {"reduction": "none", "weight": torch.rand(V)}):
        z = lazy_logits(h, w)
        out = F.cross_entropy(z.flatten(0, 1), flat, **kwargs)
        torch.testing.assert_close(out, F.cross_entropy(F.linear(h, w).flatten(0, 1), flat, **kwargs))
        assert not is_lazy(z)


def test_per_token_cross_entropy_stays_fused():
    """reduction='none' runs the token log-prob op (lazy_logprobs.py; values and gradients: tests/test_lazy_logprobs.py)."""
    h, w, b, y = _inputs()
    z = lazy_logits(h, w)
    out = F.cross_entropy(z.flatten(0, 1), y.flatten(0, 1), reduction="none")
    assert is_lazy(z)
    torch.testing.assert_close(out, F.cross_entropy(F.linear(h, w).flatten(0, 1), y.flatten(0, 1), reduction="none"))


def test_register_consumer_adds_a_fused_consumer():
    h, w, b, y = _inputs()
    calls = []

    def amax_rows(func, x, dim, keepdim=False):
        if not isinstance(x, LazyLogits) or dim not in (-1, x.dim() - 1) or keepdim:
            return NotImplemented
        calls.append(x.shape)
        hh, ww, bb = x.operands()
        return torch.amax(F.linear(hh, ww, bb), -1)  # (a real consumer would chunk this)

    saved = dict(CONSUMERS)
    try:
        register_consumer(torch.amax)(amax_rows)
        z = lazy_logits(h, w)
        out = torch.amax(z.flatten(0, 1), -1)
        assert calls == [(B * T, V)] and is_lazy(z)
        torch.testing.assert_close(out, torch.amax(F.linear(h, w).flatten(0, 1), -1))
        torch.amax(z, 0)  # a handler may decline: then the logits are made
        assert not is_lazy(z)
    finally:
        CONSUMERS.clear()
        CONSUMERS.update(saved)
