"""Distillation losses through backend="liger" on CPU (the op runs its torch reference): every spelling trainers
write is fused into one liger_fx::linear_divergence, the loss and every gradient equal eager (tolerance rule, fp32
and bf16, static and dynamic lengths), no N x V tensor is left in the compiled forward or backward graph, and a site
whose intermediates escape is left alone with a near miss that names why."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

import liger_fx
from tests.helpers import capture_aot_graphs
from tests.tolerance import assert_close_rule, assert_max_error_rule

FLAG = "fused_linear_distillation"
T = 2.0
B, L, HS, HT, V = 2, 20, 16, 24, 97  # N x V = 3880 elements; the largest other tensor is W_t, 97 x 24 = 2328


def _records(kind="replaced"):
    return [x for rec in liger_fx.get_records() for x in getattr(rec, kind) if x.flag == FLAG]


# ---------------------------------------------------------------------------------------------------------------
# The spellings: each maps (student logits s, teacher logits t, mask) to the loss, as trainers write it


def _trl_jsd(s, t, mask, beta=0.3):
    """TRL GKD's generalized_jsd_loss, then its per-token mask and mean."""
    ls, lt = F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)
    b = torch.tensor(beta, dtype=ls.dtype)
    lm = torch.logsumexp(torch.stack([ls + torch.log1p(-b), lt + torch.log(b)]), dim=0)
    jsd = b * F.kl_div(lm, lt, reduction="none", log_target=True) + (1 - b) * F.kl_div(lm, ls, reduction="none",
                                                                                      log_target=True)
    return (jsd.sum(-1) * mask).sum() / mask.sum()


def _liger_jsd(s, t, mask, beta=0.7):
    """Liger's chunked JSD, written eagerly: math.log weights, sum over tokens, / count."""
    ls, lt = F.log_softmax(s.float() / T, -1), F.log_softmax(t.float() / T, -1)
    lm = torch.logsumexp(torch.stack([ls + math.log(1 - beta), lt + math.log(beta)], 0), 0)
    jsd = beta * F.kl_div(lm, lt, reduction="none", log_target=True) + (1 - beta) * F.kl_div(lm, ls,
                                                                                           reduction="none",
                                                                                           log_target=True)
    return jsd.sum(-1).sum() / s.shape[0] / s.shape[1]


def _mixture_jsd(s, t, mask):
    p, q = F.softmax(s, -1), F.softmax(t, -1)
    m = 0.5 * (p + q)
    return 0.5 * F.kl_div(m.log(), p, reduction="batchmean") + 0.5 * F.kl_div(m.log(), q, reduction="batchmean")


SPELLINGS = {  # id -> (loss(s, t, mask), the recorded pattern)
    "kl-logtarget-batchmean-T2": (
        lambda s, t, m: F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), reduction="batchmean",
                                 log_target=True) * T**2, "forward_kl/sum"),
    "kl-probs-batchmean-flat": (
        lambda s, t, m: F.kl_div(F.log_softmax(s.view(-1, V) / T, -1), F.softmax(t.view(-1, V) / T, -1),
                                 reduction="batchmean") * T * T, "forward_kl/sum"),
    "kl-mean-elements": (
        lambda s, t, m: F.kl_div(F.log_softmax(s.float(), -1), F.softmax(t.float(), -1), reduction="mean"),
        "forward_kl/mean"),
    "reverse-kl-sum": (
        lambda s, t, m: F.kl_div(F.log_softmax(t, -1), F.log_softmax(s, -1), reduction="sum", log_target=True),
        "reverse_kl/sum"),
    "kl-written-out-masked": (
        lambda s, t, m: ((F.softmax(t * 0.5, -1) * (F.log_softmax(t * 0.5, -1) - F.log_softmax(s * 0.5, -1)))
                         .sum(-1) * m).sum() / m.sum(), "forward_kl/sum/masked"),
    "jsd-trl-masked": (_trl_jsd, "jsd/sum/masked"),
    "jsd-liger-mean": (_liger_jsd, "jsd/sum"),
    "jsd-mixture-batchmean": (_mixture_jsd, "jsd/sum"),
    "kl-per-token-returned": (  # per-token values used as they are: the per-row op
        lambda s, t, m: (F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), reduction="none",
                                  log_target=True).sum(-1) * m), "forward_kl/none"),
}


class Heads(nn.Module):
    """A student lm_head (with bias) and a wider teacher's, over one vocabulary."""

    def __init__(self, dtype):
        super().__init__()
        torch.manual_seed(0)
        self.student = nn.Linear(HS, V, bias=True).to(dtype)
        self.teacher = nn.Linear(HT, V, bias=False).to(dtype)
        with torch.no_grad():
            self.student.weight.mul_(3.0)
            self.teacher.weight.mul_(4.0)


def _step(heads, loss_fn, teacher="no_grad"):
    def step(h_s, h_t, mask):
        s = heads.student(h_s)
        if teacher == "no_grad":
            with torch.no_grad():
                t = heads.teacher(h_t)
        elif teacher == "detach":
            t = heads.teacher(h_t).detach()
        else:
            t = heads.teacher(h_t)
        return loss_fn(s, t, mask)
    return step


def _data(dtype, length=L, seed=1):
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(B, length, HS, generator=g).to(dtype)
    h_t = torch.randn(B, length, HT, generator=g).to(dtype)
    mask = (torch.rand(B, length, generator=g) > 0.25).to(dtype)
    return h_s, h_t, mask


def _run(step, heads, h_s, h_t, mask, learners_extra=()):
    """The loss (summed if per-token) and the gradients of h_s and every parameter that requires grad."""
    for p in heads.parameters():
        p.grad = None
    h_s = h_s.detach().clone().requires_grad_()
    out = step(h_s, h_t, mask)
    loss = out.float().sum() if out.dim() else out
    loss.backward()
    grads = {"h_s": h_s.grad}
    grads.update({n: p.grad for n, p in heads.named_parameters() if p.grad is not None})
    return out.detach(), grads


def _check(case_id, dtype, ours, ref64, same):
    """STYLE's rule: the loss per element (atol: fp32 rounding of a sum over the vocabulary, 16 eps of it), each
    gradient per tensor (flash-attn's form: the per-element agreement of two roundings through a matmul is chance;
    tests/tolerance.assert_max_error_rule)."""
    out, grads = ours
    r_out, r_grads = ref64
    s_out, s_grads = same
    assert_close_rule(out, r_out, s_out, atol=16 * torch.finfo(torch.float32).eps * r_out.abs().max().item(),
                      name=f"{case_id} loss")
    assert set(grads) == set(r_grads), set(grads) ^ set(r_grads)
    for name in r_grads:
        assert grads[name].dtype == dtype
        assert_max_error_rule(grads[name], r_grads[name], s_grads[name], name=f"{case_id} d{name}")


def _eager_refs(loss_fn, dtype, data, teacher="no_grad"):
    same_heads = Heads(dtype)
    heads64 = Heads(dtype).double()  # the same (rounded) weights, exact arithmetic
    ref64 = _run(_step(heads64, loss_fn, teacher), heads64, *(x.double() for x in data))
    same = _run(_step(same_heads, loss_fn, teacher), same_heads, *data)
    return ref64, same


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", sorted(SPELLINGS))
def test_spelling_fused_and_equal_to_eager(case, dtype):
    loss_fn, pattern = SPELLINGS[case]
    heads = Heads(dtype)
    data = _data(dtype)
    with capture_aot_graphs() as graphs:
        ours = _run(torch.compile(_step(heads, loss_fn), backend="liger"), heads, *data)
    assert counters["liger_fx"][FLAG] == 1, liger_fx.get_records()[-1].summary()
    assert [r.pattern for r in _records()] == [f"{FLAG}/{pattern}"]
    assert not _records("misses")
    _check(case, dtype, ours, *_eager_refs(loss_fn, dtype, data))
    graphs.assert_none_of(B * L * V, dim=V)
    assert heads.teacher.weight.grad is None  # computed under no_grad: no gradient, as eager


@pytest.mark.parametrize("case", ["kl-logtarget-batchmean-T2", "jsd-trl-masked", "kl-per-token-returned"])
def test_dynamic_lengths_one_recompile(case):
    """Three sequence lengths: the second recompiles once with a symbolic length (fused again), the third reuses
    it; every length equals eager."""
    loss_fn, pattern = SPELLINGS[case]
    heads = Heads(torch.float32)
    fn = torch.compile(_step(heads, loss_fn), backend="liger")
    with capture_aot_graphs() as graphs:
        for length in (20, 13, 29):
            data = _data(torch.float32, length, seed=length)
            ours = _run(fn, heads, *data)
            _check(f"{case} T={length}", torch.float32, ours, *_eager_refs(loss_fn, torch.float32, data))
    assert counters["liger_fx"][FLAG] == 2 and len(liger_fx.get_records()) == 2
    assert all(r.pattern == f"{FLAG}/{pattern}" for r in _records())
    graphs.assert_none_of(B * 13 * V, dim=V)  # the symbolic graphs at their hint (13): still no N x V


@pytest.mark.parametrize("case", ["kl-probs-batchmean-flat", "jsd-mixture-batchmean"])
def test_dynamic_true(case):
    loss_fn, pattern = SPELLINGS[case]
    heads = Heads(torch.float32)
    data = _data(torch.float32)
    ours = _run(torch.compile(_step(heads, loss_fn), backend="liger", dynamic=True), heads, *data)
    _check(case, torch.float32, ours, *_eager_refs(loss_fn, torch.float32, data))
    assert [r.pattern for r in _records()] == [f"{FLAG}/{pattern}"]


@pytest.mark.parametrize("teacher", ["detach", "learns"])
def test_teacher_detached_or_learning(teacher):
    """A detached teacher whose weight requires grad gets none (as eager); a teacher that is not detached (mutual
    learning) gets its own gradient from the op, equal to eager's."""
    loss_fn, _ = SPELLINGS["jsd-trl-masked"]
    heads = Heads(torch.float32)
    data = _data(torch.float32)
    ours = _run(torch.compile(_step(heads, loss_fn, teacher), backend="liger"), heads, *data)
    assert counters["liger_fx"][FLAG] == 1
    ref64, same = _eager_refs(loss_fn, torch.float32, data, teacher)
    _check(teacher, torch.float32, ours, ref64, same)
    assert ("teacher.weight" in ours[1]) == (teacher == "learns")
    assert _records()[0].pattern.endswith("/teacher-learns") == (teacher == "learns")


def test_hard_label_loss_beside_the_divergence_fuses_both():
    """alpha * CE(s, labels) + (1 - alpha) * T^2 KL: the divergence first, then the lm_head's only other use is the
    cross-entropy, which the linear + CE family fuses: no N x V in either graph."""
    heads = Heads(torch.float32)
    h_s, h_t, _ = _data(torch.float32)
    labels = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(3))

    def step(h_s, h_t, mask):
        s = heads.student(h_s)
        with torch.no_grad():
            t = heads.teacher(h_t)
        kd = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), reduction="batchmean", log_target=True)
        return 0.3 * F.cross_entropy(s.view(-1, V), labels.view(-1)) + 0.7 * kd * T**2

    ref = _run(step, heads, h_s, h_t, None)
    with capture_aot_graphs() as graphs:
        ours = _run(torch.compile(step, backend="liger"), heads, h_s, h_t, None)
    assert counters["liger_fx"][FLAG] == 1 and counters["liger_fx"]["fused_linear_cross_entropy"] == 1
    torch.testing.assert_close(ours[0], ref[0], atol=1e-6, rtol=1e-5)
    for k in ref[1]:
        torch.testing.assert_close(ours[1][k], ref[1][k], atol=1e-6, rtol=1e-5)
    graphs.assert_none_of(B * L * V, dim=V)


def test_inference_under_no_grad():
    loss_fn, _ = SPELLINGS["jsd-liger-mean"]
    heads = Heads(torch.float32)
    data = _data(torch.float32)
    with torch.no_grad():
        ref = _step(heads, loss_fn)(*data)
        out = torch.compile(_step(heads, loss_fn), backend="liger")(*data)
    assert counters["liger_fx"][FLAG] == 1
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=2e-6)


# ---------------------------------------------------------------------------------------------------------------
# Not fused, still right: the near miss names the cause


def _returns_log_softmax(s, t, m):
    ls = F.log_softmax(s / T, -1)
    kl = F.kl_div(ls, F.log_softmax(t / T, -1), reduction="batchmean", log_target=True)
    return kl + 0.0 * ls.sum()  # the student's log-probs are used again outside the divergence


def _clamped_pointwise(s, t, m):
    ls, lt = F.log_softmax(s, -1), F.log_softmax(t, -1)
    return F.kl_div(ls, lt, reduction="none", log_target=True).clamp(max=0.05).sum(-1).mean()


def _log_space_mixture(s, t, m):
    """TRL's GKD before it used logsumexp: beta * log p_t + (1 - beta) * log p_s is not log of the mixture."""
    ls, lt = F.log_softmax(s, -1), F.log_softmax(t, -1)
    lm = 0.5 * lt + 0.5 * ls
    return (0.5 * F.kl_div(lm, lt, reduction="none", log_target=True)
            + 0.5 * F.kl_div(lm, ls, reduction="none", log_target=True)).sum() / (s.shape[0] * s.shape[1])


def _softcapped_teacher(s, t, m):
    return F.kl_div(F.log_softmax(s, -1), F.softmax(torch.tanh(t / 30.0) * 30.0, -1), reduction="batchmean")


NEGATIVE = {  # id -> (loss, a fragment of the near miss's reason)
    "log-softmax-escapes": (_returns_log_softmax, "log-softmax (log_softmax) is also used by"),
    "pointwise-clamped": (_clamped_pointwise, "aten.clamp.default on the pointwise divergence"),
    "log-space-mixture": (_log_space_mixture, "a mixture taken in log space"),
    "softcapped-teacher": (_softcapped_teacher, "aten.tanh.default on the logits before the softmax"),
}


@pytest.mark.parametrize("case", sorted(NEGATIVE))
def test_not_fused_still_right(case):
    loss_fn, reason = NEGATIVE[case]
    heads = Heads(torch.float32)
    data = _data(torch.float32)
    ours = _run(torch.compile(_step(heads, loss_fn), backend="liger"), heads, *data)
    ref = _run(_step(heads, loss_fn), heads, *data)
    assert counters["liger_fx"][FLAG] == 0
    misses = _records("misses")
    assert misses and all(reason in m.reason for m in misses), misses
    torch.testing.assert_close(ours[0], ref[0], atol=1e-6, rtol=1e-5)
    for k in ref[1]:
        torch.testing.assert_close(ours[1][k], ref[1][k], atol=1e-6, rtol=1e-5)


def test_flag_off_is_a_near_miss_and_the_summary_says_so(caplog):
    import logging

    loss_fn, _ = SPELLINGS["jsd-trl-masked"]
    heads = Heads(torch.float32)
    with caplog.at_level(logging.INFO, logger="liger_fx"):
        torch.compile(_step(heads, loss_fn), backend="liger", options={FLAG: False})(*_data(torch.float32))
    assert counters["liger_fx"][FLAG] == 0
    assert [m.reason for m in _records("misses")] == [f"flag {FLAG!r} is off"]
    assert f"{FLAG} 0/1" in caplog.text
    torch._dynamo.reset()
    liger_fx.clear_records()
    with caplog.at_level(logging.INFO, logger="liger_fx"):
        torch.compile(_step(heads, loss_fn), backend="liger")(*_data(torch.float32))
    assert f"{FLAG} 1/1" in caplog.text


def test_report_counts_the_site():
    """liger_fx.report on a module whose forward is a distillation step: the flag's entry, 1/1."""

    class Distill(nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = Heads(torch.float32)

        def forward(self, h_s, h_t, mask):
            return _step(self.heads, SPELLINGS["jsd-trl-masked"][0])(h_s, h_t, mask)

    entry = liger_fx.report(Distill().train(), *_data(torch.float32))
    assert entry["patterns"][FLAG] == {"replaced": 1, "candidates": 1, "misses": []}
    entry = liger_fx.report(Distill().train(), *_data(torch.float32), options={FLAG: False})
    assert entry["patterns"][FLAG]["replaced"] == 0 and entry["patterns"][FLAG]["candidates"] == 1


# ---------------------------------------------------------------------------------------------------------------
# The compiled step against eager: a warm-up call, then the call that is measured (on a GPU, its peak memory)


COMPILED_STEP_CASES = ["jsd-trl-masked", "kl-logtarget-batchmean-T2", "kl-per-token-returned"]


def _compiled_step_vs_eager(case, dev, n_b, n_t, hs, ht, vocab):
    """The compiled bf16 step (a warm-up call that compiles, then a second call on the same inputs) and eager fp32
    and bf16 on the same weights and data: each (loss, dh_s, dW_s, peak bytes over the call or None off CUDA); the
    compiled one also returns its warm-up call's (loss, dh_s, dW_s)."""
    torch.manual_seed(0)
    loss_fn, _ = SPELLINGS[case]
    cuda = torch.device(dev).type == "cuda"

    # Weights and data rounded to bf16 once: the fp32 run is then the exact result of the bf16 runs' own inputs,
    # which the rule's reference must be (with unrounded fp32 inputs, the input rounding alone put one of 48
    # per-token losses outside the bound at the CPU shape).
    def heads(dtype):
        torch.manual_seed(0)
        s = nn.Linear(hs, vocab, bias=False, device=dev)
        t = nn.Linear(ht, vocab, bias=False, device=dev)
        with torch.no_grad():
            s.weight.mul_(4.0)
            t.weight.mul_(6.0)
        return s.to(torch.bfloat16).to(dtype), t.to(torch.bfloat16).to(dtype)

    g = torch.Generator(device=dev).manual_seed(1)
    h_s = torch.randn(n_b, n_t, hs, device=dev, generator=g).to(torch.bfloat16).float()
    h_t = torch.randn(n_b, n_t, ht, device=dev, generator=g).to(torch.bfloat16).float()
    mask = (torch.rand(n_b, n_t, device=dev, generator=g) > 0.25).float()

    def run(dtype, compiled):
        s_head, t_head = heads(dtype)

        def step(h_s, h_t, mask):
            s = s_head(h_s)
            with torch.no_grad():
                t = t_head(h_t)
            return loss_fn(s, t, mask)

        fn = torch.compile(step, backend="liger") if compiled else step
        # A fresh leaf per run: `h_s.to(torch.float32)` is h_s itself, so without the copy the fp32 run made h_s
        # require grad, and the next run's `h_s.to(torch.bfloat16)` was a non-leaf whose .grad stays None.
        x = h_s.to(dtype, copy=True).requires_grad_()
        warm = None
        if compiled:  # warm-up (compile), then measure one call
            out = fn(x, h_t.to(dtype), mask.to(dtype))
            out.float().sum().backward()
            warm = (out.detach().float(), x.grad.float(), s_head.weight.grad.float())
            x.grad, s_head.weight.grad = None, None
        if cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        out = fn(x, h_t.to(dtype), mask.to(dtype))
        out.float().sum().backward()
        extra = None
        if cuda:
            torch.cuda.synchronize()
            extra = torch.cuda.max_memory_allocated() - base
        return (out.detach().float(), x.grad.float(), s_head.weight.grad.float(), extra), warm

    ours, warm = run(torch.bfloat16, True)
    ref, _ = run(torch.float32, False)
    same, _ = run(torch.bfloat16, False)
    return ours, warm, ref, same


def _check_compiled_step(case, ours, ref, same):
    assert counters["liger_fx"][FLAG] >= 1 and _records()[0].pattern == f"{FLAG}/{SPELLINGS[case][1]}"
    assert_close_rule(ours[0], ref[0], same[0], atol=1e-6 * ref[0].abs().max().item(), name="loss")
    for i, name in ((1, "dh_s"), (2, "dW_s")):
        assert_max_error_rule(ours[i], ref[i], same[i], name=name)


@pytest.mark.parametrize("case", COMPILED_STEP_CASES)
def test_compiled_step_second_call_equals_first_and_eager(case):
    """The GPU test's body on CPU at a small shape (the op's torch reference): the second call of the compiled step
    (no recompile) gives the first call's loss and gradients, bit for bit, and both equal eager by the rule."""
    ours, warm, ref, same = _compiled_step_vs_eager(case, "cpu", 2, 24, 32, 48, 301)
    _check_compiled_step(case, ours, ref, same)
    assert len(liger_fx.get_records()) == 1  # one compile: the second call ran the same code
    for a, b, name in zip(ours, warm, ("loss", "dh_s", "dW_s")):
        assert torch.equal(a, b), f"{name}: the second compiled call differs from the first"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", COMPILED_STEP_CASES)
def test_cuda_compiled_step_matches_and_holds_no_logits(case):
    """bf16, N = 8 x 2048 rows, V = 32011, a 1024-wide student and a 1536-wide teacher: the compiled step (CUDA: the
    Triton launcher, 4096-row chunks) against eager fp32 (rule: torch's own bf16 error), and its peak memory over
    the call below one model's bf16 logits (N x V x 2 bytes = 1.05 GB; eager holds both models' and fp32 copies)."""
    N_B, N_T, Vg = 8, 2048, 32011
    ours, _, ref, same = _compiled_step_vs_eager(case, "cuda", N_B, N_T, 1024, 1536, Vg)
    _check_compiled_step(case, ours, ref, same)
    assert ours[3] < N_B * N_T * Vg * 2, f"peak extra {ours[3] / 2**30:.2f} GiB >= one bf16 logits"
