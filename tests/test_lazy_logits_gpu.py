"""On a GPU: the loss outside the compiled model with lazy logits runs the Triton fused lm_head + loss eagerly,
matches the fp32 reference by the tolerance rule in bf16, and its step's peak is at least the bf16 logits below the
same loop with plain logits (option lazy_logits off). CPU machines skip this file; bench/gpu.sh runs it (PYTEST=...)."""

import copy

import pytest
import torch

from liger_fx.lazy_logits import is_lazy
from liger_fx.models import reference
from tests.tolerance import assert_close_rule

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# Logits-dominated: N = 8192 rows of V = 65536 are 1 GiB in bf16 (2 GiB after .float()), against a 2-layer body of
# width 256. The fused op's chunk buffer is 512 MiB (kernels/fused_linear_cross_entropy.CHUNK_BYTES: 4096 rows here).
SHAPE = dict(vocab_size=65536, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=512, max_seq_len=2048)
B, T = 4, 2048


def _peak_step(model, options, x, y):
    torch._dynamo.reset()
    fn = torch.compile(model, backend="liger", options=options)
    for _ in range(2):  # the first step compiles
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        pred = fn(x)
        lazy = is_lazy(pred)
        loss = reference.loss_fn(pred, y)
        del pred
        loss.backward()
        torch.cuda.synchronize()
    return loss.detach(), torch.cuda.max_memory_allocated() - base, lazy


def test_loss_outside_the_model_bf16_fused_on_cuda():
    model, _, _ = reference.build(reference.ReferenceConfig(**SHAPE), dtype=torch.float32, device="cuda")
    x, y = reference.batch(SHAPE["vocab_size"], B, T, device="cuda")
    ref = reference.loss_fn(model(x), y).detach()
    m16 = copy.deepcopy(model).to(torch.bfloat16)
    same = reference.loss_fn(m16(x), y).detach()
    loss_on, peak_on, lazy_on = _peak_step(copy.deepcopy(m16), None, x, y)
    loss_off, peak_off, lazy_off = _peak_step(copy.deepcopy(m16), {"lazy_logits": False}, x, y)
    assert lazy_on and not lazy_off
    assert_close_rule(loss_on, ref, same, atol=2e-3, name="loss (lazy)")
    assert_close_rule(loss_off, ref, same, atol=2e-3, name="loss (plain)")
    logits_bf16 = B * T * SHAPE["vocab_size"] * 2
    assert peak_off - peak_on >= logits_bf16, (peak_off / 2**20, peak_on / 2**20)


def test_trl_log_probs_and_entropy_on_lazy_logits_cuda():
    """TRL's selective_log_softmax (its torch path, as the Trainer hook routes lazy logits) and entropy_from_logits on
    lazy bf16 logits (N 8192, V 65536: 1 GiB of logits): the Triton log-prob op per sequence / per 128 rows, the
    values and gradients of h and W within 2x eager bf16's error of fp32 (per tensor), and the step's peak below one
    bf16 logits tensor."""
    from liger_fx.lazy_logits import lazy_logits
    from tests.patterns.test_linear_logprobs import entropy_from_logits, selective_log_softmax
    from tests.tolerance import assert_max_error_rule

    V, H = SHAPE["vocab_size"], 256
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(B, T, H, device="cuda", generator=g).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(V, H, device="cuda", generator=g) / 8).to(torch.bfloat16).requires_grad_()
    ids = torch.randint(0, V, (B, T), device="cuda", generator=g)
    adv = torch.randn(B, T, device="cuda", generator=g)

    def step(z):
        logps = selective_log_softmax(z / 0.9, ids)
        ent = entropy_from_logits(z, chunk_size=1024)
        return (logps * adv).mean() + 0.01 * ent.float().mean()

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = step(lazy_logits(h, w))
    grads = torch.autograd.grad(loss, (h, w))
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < B * T * V * 2, peak / 2**20
    h32, w32 = (t.detach().float().requires_grad_() for t in (h, w))
    ref = step(h32 @ w32.t())
    ref_grads = torch.autograd.grad(ref, (h32, w32))
    same = step(h @ w.t())
    same_grads = torch.autograd.grad(same, (h, w))
    assert_max_error_rule(loss.detach(), ref.detach(), same.detach(), name="loss")
    for o, r, s, n in zip(grads, ref_grads, same_grads, ("h", "W")):
        assert_max_error_rule(o, r, s, name=n)
