"""Token log-probs, entropies and per-token losses on LazyLogits (liger_fx/lazy_logprobs.py), eager, no compile: each
spelling post-training trainers write runs the fused log-prob op (or O(N*H) row dot products) with eager's values
and every gradient, no N x V tensor is made forward or backward, and every other use still materializes with eager's
values. The compiled model that returns them, with TRL's functions on its logits: the last tests."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import liger_fx
from liger_fx.lazy_logits import LazyLogits, is_lazy, lazy_logits
from tests.patterns.test_linear_logprobs import entropy_from_logits, selective_log_softmax
from tests.test_lazy_logits import BigTensors
from tests.tolerance import assert_max_error_rule

B, T, H, V = 3, 13, 16, 40  # N = 39 rows: half the logits (780) is more than W (640) and its gradient


def _inputs(dtype=torch.float32, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(B, T, H, generator=g) * 2).to(dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g) / 3).to(dtype).requires_grad_()
    b = torch.randn(V, generator=g).to(dtype).requires_grad_() if bias else None
    ids = torch.randint(0, V, (B, T), generator=g)
    return h, w, b, ids


def trl_selective_bf16_branch(z, ids):
    """TRL's selective_log_softmax as it runs on bf16 logits (a log_softmax per sequence, then a gather), whatever
    the dtype here."""
    rows = [F.log_softmax(r, dim=-1).gather(dim=-1, index=i[:, None]) for r, i in zip(z, ids)]
    return torch.stack(rows).squeeze(-1)


def label_smoother(z, ids, epsilon=0.1):
    """transformers' LabelSmoother (Trainer's label_smoothing_factor; TRL's SFT with it), as written there: the
    Trainer pops the labels, so the model returns its logits."""
    logits, labels = z[..., :-1, :].contiguous(), ids[..., 1:].contiguous()
    log_probs = -F.log_softmax(logits, dim=-1)
    labels = labels.unsqueeze(-1).masked_fill(labels.unsqueeze(-1) % 7 == 0, -100)
    padding_mask = labels.eq(-100)
    labels = torch.clamp(labels, min=0)
    nll_loss = log_probs.gather(dim=-1, index=labels)
    smoothed_loss = log_probs.sum(dim=-1, keepdim=True, dtype=torch.float32)
    nll_loss.masked_fill_(padding_mask, 0.0)
    smoothed_loss.masked_fill_(padding_mask, 0.0)
    n = padding_mask.numel() - padding_mask.long().sum()
    return torch.stack([(1 - epsilon) * nll_loss.sum() / n, epsilon * smoothed_loss.sum() / (n * log_probs.shape[-1])])


def _top3(ids):
    return torch.stack([ids, ids.flip(0), (ids * 7 + 3) % V], -1)


# Per-token (or per-entry) values of the logits z (B, T, V), as trainers compute them outside the model.
SPELLINGS = {
    # GRPO/PPO/DPO token log-probs
    "log_softmax-gather": lambda z, ids: F.log_softmax(z[:, :-1].float() / 0.7, -1).gather(-1, ids[:, 1:, None]),
    "trl-selective-fp32": lambda z, ids: selective_log_softmax(z[:, :-1] / 0.9, ids[:, 1:]),
    "trl-selective-rows": lambda z, ids: trl_selective_bf16_branch(z / 0.9, ids),
    "gather-minus-logsumexp": lambda z, ids: z.gather(-1, ids[..., None]).squeeze(-1) - torch.logsumexp(z, dim=-1),
    "take_along_dim": lambda z, ids: torch.take_along_dim(z.log_softmax(-1), ids[..., None], dim=-1),
    "softcap": lambda z, ids: selective_log_softmax(torch.tanh(z / 5.0) * 5.0, ids),
    "softmax-gather": lambda z, ids: torch.softmax(z, -1).gather(-1, ids[..., None]),
    "top3-log-probs": lambda z, ids: F.log_softmax(z, -1).gather(-1, _top3(ids)),
    "logits-gather": lambda z, ids: z.float().gather(-1, _top3(ids)) * 0.5,
    "logsumexp-keepdim": lambda z, ids: z.logsumexp(-1, keepdim=True),
    # per-token losses
    "ce-none": lambda z, ids: -F.cross_entropy(z.flatten(0, 1), ids.flatten(0, 1), reduction="none"),
    "ce-none-ignore": lambda z, ids: F.cross_entropy(z[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1).masked_fill(
        ids[:, 1:].reshape(-1) % 5 == 0, -100), reduction="none"),
    "nll-log_softmax": lambda z, ids: F.nll_loss(F.log_softmax(z.flatten(0, 1), dim=-1), ids.flatten(0, 1),
                                                 reduction="none"),
    "nll-mean-ignore": lambda z, ids: F.nll_loss(torch.log_softmax(z.flatten(0, 1), -1),
                                                 ids.flatten(0, 1).masked_fill(ids.flatten(0, 1) < 8, 7),
                                                 ignore_index=7),
    # label smoothing, sums and means over the vocabulary
    "label-smoother": label_smoother,
    "mean-logits": lambda z, ids: (z / 0.8).mean(-1),
    "sum-log-probs-keepdim": lambda z, ids: torch.log_softmax(z.float(), -1).sum(dim=-1, keepdim=True),
    "neg-log-probs-gather": lambda z, ids: (-torch.log_softmax(z, -1)).gather(-1, ids[..., None]),
    # entropies
    "trl-entropy_from_logits": lambda z, ids: entropy_from_logits(z[:, :-1]),
    "p-log-p": lambda z, ids: -(torch.softmax(z.float(), -1) * torch.log_softmax(z.float(), -1)).sum(-1),
    "exp-lsm-times-lsm": lambda z, ids: (lambda lp: -(lp * lp.exp()).sum(dim=-1, keepdim=True))(z.log_softmax(-1)),
    "lse-minus-expected-logit": lambda z, ids: torch.logsumexp(z / 1.3, -1) - (torch.softmax(z / 1.3, -1) *
                                                                               (z / 1.3)).sum(-1),
}


def _weighted(out, seed=1):
    """A scalar from per-token values with a different upstream gradient for each (as advantages, masks do)."""
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    return (out * g).sum()


def _leaves(h, w, b):
    return [t for t in (h, w, b) if t is not None]


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("name", sorted(SPELLINGS))
def test_spelling_is_fused_and_matches_eager_fp32(name, bias):
    fn = SPELLINGS[name]
    h, w, b, ids = _inputs(bias=bias)
    ref = fn(F.linear(h, w, b), ids)
    ref_grads = torch.autograd.grad(_weighted(ref), _leaves(h, w, b))
    z = lazy_logits(h, w, b)
    with BigTensors(B * T * V // 2, last_dim=V) as big:  # no (N, V) nor half of one, forward or backward
        out = fn(z, ids)
        grads = torch.autograd.grad(_weighted(out), _leaves(h, w, b))
    assert big.seen == [], big.seen
    assert is_lazy(z), "the spelling materialized the logits"
    assert type(out) is torch.Tensor and out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for g, r, n in zip(grads, ref_grads, ("h", "W", "b")):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("name", ["trl-selective-rows", "gather-minus-logsumexp", "ce-none", "p-log-p",
                                  "trl-entropy_from_logits", "top3-log-probs", "logits-gather", "label-smoother"])
def test_spelling_bf16_within_torch_error(name):
    """bf16 lm_head: ours against the fp32 reference within 2x eager bf16's own error, per tensor
    (tolerance.assert_max_error_rule) for the values and each gradient. Not elementwise: both sides start from the
    same bf16 logits, whose rounding (half an ulp of |z|, 0.03 at z = 8) dominates a log-prob's error; eager then
    rounds `z / T` and its log-softmax again in bf16, which at single tokens happens to cancel part of it (one
    token: ours 2 ulps from the fp32 reference, eager's 1), while ours computes from the bf16 logits in fp32."""
    fn = SPELLINGS[name]
    h, w, b, ids = _inputs(dtype=torch.bfloat16, bias=True)
    h32, w32, b32 = (t.detach().float().requires_grad_() for t in (h, w, b))
    ref = fn(F.linear(h32, w32, b32), ids)
    ref_grads = torch.autograd.grad(_weighted(ref), (h32, w32, b32))
    same = fn(F.linear(h, w, b), ids)
    same_grads = torch.autograd.grad(_weighted(same), (h, w, b))
    z = lazy_logits(h, w, b)
    out = fn(z, ids)
    assert is_lazy(z) and out.dtype == same.dtype
    grads = torch.autograd.grad(_weighted(out), (h, w, b))
    assert_max_error_rule(out.detach(), ref.detach(), same.detach(), name="value")
    for g, r, s, n in zip(grads, ref_grads, same_grads, ("h", "W", "b")):
        assert g.dtype == torch.bfloat16
        assert_max_error_rule(g, r, s, name=n)


def test_op_calls_per_spelling():
    """What runs: the fused op once per sequence (TRL's per-row loops) or per chunk of rows; a gather of the logits
    themselves is no op at all (row dot products)."""
    calls = []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if str(func).startswith("liger_fx."):
                calls.append(str(func))
            return func(*args, **(kwargs or {}))

    h, w, b, ids = _inputs()
    for name, expected in (("trl-selective-fp32", B), ("trl-selective-rows", B), ("ce-none", 1),
                           ("trl-entropy_from_logits", -(-B * (T - 1) // 4)), ("logits-gather", 0)):
        calls.clear()
        with Ops():
            SPELLINGS[name](lazy_logits(h, w, b), ids)
        assert calls == ["liger_fx.fused_linear_logprobs.default"] * expected, (name, calls)


def test_no_grad_reference_model_log_probs():
    """A frozen reference model's log-probs under no_grad: lazy, fused, no gradient, eager's values."""
    h, w, b, ids = _inputs(bias=True)
    with torch.no_grad():
        z = lazy_logits(h, w, b)
        out = selective_log_softmax(z / 0.9, ids)
        ent = entropy_from_logits(z)
    assert is_lazy(z) and not out.requires_grad and not ent.requires_grad
    torch.testing.assert_close(out, selective_log_softmax(F.linear(h, w, b).detach() / 0.9, ids))
    torch.testing.assert_close(ent, entropy_from_logits(F.linear(h, w, b).detach()), atol=1e-5, rtol=1e-5)


def test_detached_factor_keeps_eagers_gradient_path():
    """`p.detach() * log p` is not the entropy's product (its gradient flows through one factor): it materializes,
    with eager's gradients; a detached log-prob gather gives no gradient."""
    h, w, b, ids = _inputs()

    def fn(z):
        lp = torch.log_softmax(z, -1)
        return -(lp.exp().detach() * lp).sum(-1)

    ref = fn(F.linear(h, w))
    ref_grads = torch.autograd.grad(_weighted(ref), (h, w))
    z = lazy_logits(h, w)
    out = fn(z)
    torch.testing.assert_close(out, ref)
    for g, r in zip(torch.autograd.grad(_weighted(out), (h, w)), ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)
    z = lazy_logits(h, w)
    lp = F.log_softmax(z.detach(), -1).gather(-1, ids[..., None])
    assert is_lazy(z) and not lp.requires_grad


OTHER_USES = {
    "log_softmax-dim0": lambda z, ids: F.log_softmax(z, 0).gather(-1, ids[..., None]),
    "gather-dim1": lambda z, ids: torch.log_softmax(z, -1).gather(1, (ids[:, :5, None] % T).expand(B, 5, V)),
    "log-probs-summed": lambda z, ids: torch.log_softmax(z, -1).sum(),
    "probs-times-mask": lambda z, ids: (torch.softmax(z, -1) * (z > 0)).sum(-1),
    "entropy-summed-over-all": lambda z, ids: (torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(),
    "softmax-of-log_softmax": lambda z, ids: torch.softmax(torch.log_softmax(z, -1) * 2.0, -1).gather(
        -1, ids[..., None]),
    "argmax": lambda z, ids: (torch.log_softmax(z, -1).argmax(-1) == ids).float() + z.logsumexp(-1),
    "gather-broadcast-index": lambda z, ids: torch.log_softmax(z, -1).gather(-1, ids[:1, :, None]),
    "softcapped-log-probs-summed": lambda z, ids: torch.log_softmax(torch.tanh(z / 3.0) * 3.0, -1).sum(-1),
    "ce-none-label-smoothing": lambda z, ids: F.cross_entropy(z.flatten(0, 1), ids.flatten(0, 1), reduction="none",
                                                              label_smoothing=0.1),
}


@pytest.mark.parametrize("name", sorted(OTHER_USES))
def test_other_uses_materialize_with_eager_values_and_gradients(name):
    fn = OTHER_USES[name]
    h, w, b, ids = _inputs(bias=True)
    ref = fn(F.linear(h, w, b), ids)
    z = lazy_logits(h, w, b)
    out = fn(z, ids)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    if ref.requires_grad:
        ref_grads = torch.autograd.grad(_weighted(ref), (h, w, b))
        for g, r in zip(torch.autograd.grad(_weighted(out), (h, w, b)), ref_grads):
            torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def test_log_probs_stay_lazy_until_read_and_read_as_eager():
    """A log_softmax of lazy logits is itself lazy (a LazyLogits: printing, indexing into the vocabulary, or any
    unknown op reads it) and its views stay lazy; once read it is eager's tensor."""
    h, w, b, ids = _inputs()
    z = lazy_logits(h, w)
    lp = F.log_softmax(z.float(), dim=-1)
    assert type(lp) is LazyLogits and is_lazy(lp) and lp.shape == (B, T, V) and lp.dtype == torch.float32
    rows = lp[:, 1:]
    assert is_lazy(rows)
    torch.testing.assert_close(rows[..., :7], F.log_softmax(F.linear(h, w), -1)[:, 1:, :7])
    assert is_lazy(z), "reading the log-probs made the logits too"


def test_a_compiled_model_returns_lazy_logits_that_trl_functions_take_fused():
    """`liger_fx.apply` in training without labels (as a trainer asks for logits and computes its log-probs itself,
    or HF's Trainer with label_smoothing_factor, which pops the labels): the logits come back lazy; TRL's
    selective_log_softmax and entropy_from_logits on them in a GRPO-style loss, plus transformers' LabelSmoother: no
    N x V tensor in the eager part, loss and every gradient equal eager's (Inductor reorders: fp32 1e-5)."""
    from transformers.trainer_pt_utils import LabelSmoother

    from liger_fx.models import mini_model

    policy = mini_model("llama", num_hidden_layers=1, vocab_size=256)
    compiled = copy.deepcopy(policy)
    liger_fx.apply(compiled)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (4, 40), generator=g)  # half of N x V (19968) exceeds W (256 x 64)
    adv = torch.randn(4, 1, generator=g)

    def loss_fn(logits):
        logits = logits[:, :-1]
        logps = selective_log_softmax(logits / 0.9, ids[:, 1:])
        with torch.no_grad():
            ent = entropy_from_logits(logits)
        smoothed = LabelSmoother(epsilon=0.1)({"logits": logits}, ids[:, 1:])
        return -(torch.exp(logps - logps.detach()) * adv).mean() + 0 * ent.mean() + smoothed

    ref = loss_fn(policy(input_ids=ids).logits)
    ref.backward()
    logits = compiled(input_ids=ids).logits  # outside the dispatch mode, which would turn torch.compile off
    assert isinstance(logits, LazyLogits) and is_lazy(logits), type(logits)
    with BigTensors(4 * 39 * 256 // 2, last_dim=256) as big:
        loss = loss_fn(logits)
    assert big.seen == [] and is_lazy(logits), big.seen
    loss.backward()
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-4)
    for (n, p), (_, q) in zip(compiled.named_parameters(), policy.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}")


def test_in_place_temperature_stays_fused_when_nothing_else_shares_the_logits():
    """Older GRPO loops: `logits = model(...).logits; logits = logits[:, :-1]; logits = logits[:, -K:];
    logits.div_(T)`: with no other view of the logits alive, the division is lazy and the log-probs fused (values,
    gradients, no N x V); where another view is alive (it must see the write) it materializes, with eager's values
    in both; `/=` under no_grad too. The dispatch fallback after it gets the scaled gradient."""
    h, w, b, ids = _inputs(bias=True)
    K = 8

    def grpo(head, views):
        # The logits are made here, as the loop's `model(...).logits`, not passed in: an argument may stay referenced
        # from the caller's stack for the whole call (CPython 3.11 borrows it where it does not inline the call, as
        # with a PEP 523 frame hook installed), so the root would be alive. Seen in the full suite after a test whose
        # compile raised (test_backend's bad flag): the root held by nothing Python's gc can see.
        logits = head(h, w, b)
        logits = logits[:, :-1]
        logits = logits[:, -K:]
        views.append(logits)
        logits.div_(0.7)
        return selective_log_softmax(logits, ids[:, -K:])

    ref = grpo(F.linear, [])
    ref_grads = torch.autograd.grad(_weighted(ref), (h, w, b))
    views = []
    with BigTensors(B * K * V // 2, last_dim=V) as big:
        out = grpo(lazy_logits, views)  # the root and the first view are gone when div_ runs
        grads = torch.autograd.grad(_weighted(out), (h, w, b))
    assert big.seen == [] and is_lazy(views[0]), big.seen
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)

    eager = F.linear(h, w, b)
    eager_view = eager[:, 1:]
    eager_view.mul_(3.0)
    z = lazy_logits(h, w, b)
    view = z[:, 1:]
    view.mul_(3.0)  # z is alive and must see it
    assert not is_lazy(z)
    torch.testing.assert_close(z.materialize(), eager)
    torch.testing.assert_close(view.materialize(), eager_view)

    with torch.no_grad():
        z = lazy_logits(h, w, b)
        z /= 2.0
        assert is_lazy(z)
        torch.testing.assert_close(torch.logsumexp(z, -1), torch.logsumexp(F.linear(h, w, b) / 2.0, -1))

    z = lazy_logits(h, w, b)[:, 2:]
    z.mul_(3.0)
    with torch._C.DisableTorchFunctionSubclass():  # below autograd: the rebased history carries the scale
        o = (z * 1.0).pow(2).mean()
    e = F.linear(h, w, b)[:, 2:] * 3.0
    r = e.pow(2).mean()
    torch.testing.assert_close(o, r)
    for g, rg in zip(torch.autograd.grad(o, (h, w, b)), torch.autograd.grad(r, (h, w, b))):
        torch.testing.assert_close(g, rg, atol=1e-5, rtol=1e-5)
