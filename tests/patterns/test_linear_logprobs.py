"""lm_head + per-token log-probs and entropies through backend="liger" on CPU (the op runs its torch reference): every
spelling trainers use becomes one `liger_fx::linear_logprobs`, values and every gradient equal eager (fp32, and
bf16 by the tolerance rule), static and dynamic sequence lengths, training and no_grad, and no N x V tensor is left
in the compiled forward or backward graph."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import liger_fx
from tests.helpers import capture_aot_graphs, replaced
from tests.tolerance import assert_close_rule, assert_max_error_rule

FLAG = "fused_linear_logprobs"
H, V = 32, 61  # an odd vocabulary


def _patterns():
    return [r.pattern for rec in liger_fx.get_records() for r in rec.replaced if r.flag == FLAG]


def _misses():
    return [m for rec in liger_fx.get_records() for m in rec.misses]


# ---------------------------------------------------------------------------------------------------------------
# The spellings, on logits `lg` (B, T, V) from an lm_head and next-token ids (B, T)


def naive_logprobs(lg, ids):  # GRPO/PPO as the issue quotes it: shift, upcast, temperature, log_softmax, gather
    return F.log_softmax(lg[:, :-1].float() / 0.7, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)


def selective_log_softmax(logits, index):  # TRL's, both branches (fp32: gather - per-row logsumexp; else a row loop)
    squeeze = index.ndim == logits.ndim - 1
    if squeeze:
        index = index.unsqueeze(-1)
    if logits.dtype in [torch.float32, torch.float64]:
        selected_logits = torch.gather(logits, dim=-1, index=index)
        logsumexp_values = torch.stack([torch.logsumexp(lg, dim=-1) for lg in logits])
        per_token_logps = selected_logits - logsumexp_values.unsqueeze(-1)
    else:
        per_token_logps = []
        for row_logits, row_labels in zip(logits, index, strict=True):
            row_logps = F.log_softmax(row_logits, dim=-1)
            per_token_logps.append(row_logps.gather(dim=-1, index=row_labels))
        per_token_logps = torch.stack(per_token_logps)
    if squeeze:
        per_token_logps = per_token_logps.squeeze(-1)
    return per_token_logps


def entropy_from_logits(logits, chunk_size: int = 4):  # TRL's (chunk_size 128 there; 4 makes several chunks here)
    original_shape = logits.shape[:-1]
    flat_logits = logits.reshape(-1, logits.shape[-1])
    entropies = []
    for chunk in flat_logits.split(chunk_size, dim=0):
        logps = F.log_softmax(chunk, dim=-1)
        entropies.append(-(torch.exp(logps) * logps).sum(-1))
    return torch.cat(entropies, dim=0).reshape(original_shape)


def trl_logprobs(lg, ids):
    logits = lg[:, :-1, :]
    logits = logits / 0.9  # GRPO divides in place (`logits.div_`); test_in_place_temperature covers that
    return selective_log_softmax(logits, ids[:, 1:])


def trl_entropy(lg, ids):
    return entropy_from_logits(lg[:, :-1, :])


def softmax_times_log_softmax(lg, ids):
    x = lg.float()
    return -(torch.softmax(x, -1) * torch.log_softmax(x, -1)).sum(-1)


def lse_minus_expected_logit(lg, ids):
    x = lg.float() / 1.3
    return torch.logsumexp(x, -1) - (torch.softmax(x, -1) * x).sum(-1)


def logprobs_and_entropy(lg, ids):  # one logits tensor, both uses: one op with the entropy output
    lp = torch.log_softmax(lg.float(), -1)
    return lp.gather(-1, ids[..., None]).squeeze(-1) + 0.1 * (-(lp.exp() * lp).sum(-1))


SPELLINGS = {
    "log_softmax-gather": (naive_logprobs, "logprob/scale"),
    "trl-selective_log_softmax": (trl_logprobs, "logprob/scale"),
    "trl-entropy_from_logits": (trl_entropy, "entropy"),
    "softmax-times-log_softmax": (softmax_times_log_softmax, "entropy"),
    "logsumexp-minus-expected-logit": (lse_minus_expected_logit, "entropy/scale"),
    "logprobs-and-entropy": (logprobs_and_entropy, "logprob+entropy"),
}


class Head(nn.Module):
    def __init__(self, spelling, bias=False):
        super().__init__()
        self.body = nn.Linear(24, H)
        self.head = nn.Linear(H, V, bias=bias)
        self.spelling = spelling

    def forward(self, x, ids, weights):
        per_token = self.spelling(self.head(torch.tanh(self.body(x))), ids)
        return (per_token * weights[..., : per_token.shape[-1]]).sum(), per_token


def _data(T, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(2, T, 24, generator=g) * 2).to(dtype)
    ids = torch.randint(0, V, (2, T), generator=g)
    weights = torch.randn(2, T, generator=g).to(dtype)  # a different upstream gradient per token
    return x, ids, weights


def _step(fn, model, x, ids, weights, train=True):
    model.zero_grad(set_to_none=True)
    if not train:
        with torch.no_grad():
            return fn(x, ids, weights)[1], {}
    loss, per_token = fn(x, ids, weights)
    loss.backward()
    return per_token.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("train", [True, False], ids=["train", "no_grad"])
@pytest.mark.parametrize("name", sorted(SPELLINGS))
def test_spelling_fuses_and_matches_eager_static_and_dynamic(name, train):
    """Two sequence lengths: a static compile, then one recompile with a symbolic length; both fuse, both equal
    eager, neither holds a tensor of N x V elements in its forward or backward graph."""
    spelling, form = SPELLINGS[name]
    torch.manual_seed(0)
    model = Head(spelling, bias=name == "log_softmax-gather")
    fn = torch.compile(model, backend="liger")
    with capture_aot_graphs() as graphs:
        for T in (25, 31):  # N x V (48 x 61 at the shorter) exceeds every weight (W: 61 x 32)
            x, ids, weights = _data(T)
            ref, ref_grads = _step(model, model, x, ids, weights, train)
            out, grads = _step(fn, model, x, ids, weights, train)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
            for k in ref_grads:
                torch.testing.assert_close(grads[k], ref_grads[k], atol=1e-5, rtol=1e-4, msg=lambda m: f"{k}: {m}")
    assert len(liger_fx.get_records()) == 2 and replaced(FLAG) == 2, [r.summary() for r in liger_fx.get_records()]
    suffix = "/bias" if name == "log_softmax-gather" else ""
    assert _patterns() == [f"{FLAG}/{form}{suffix}"] * 2 and not _misses()
    assert {k for k, _ in graphs.graphs} == ({"forward", "backward"} if train else {"forward"})
    graphs.assert_none_of(2 * 24 * V)  # the shorter step's logits, shifted


@pytest.mark.parametrize("name", sorted(SPELLINGS))
def test_bf16_values_and_gradients_within_torch_error(name):
    """bf16 weights and activations: per-token values and every gradient as close to the fp32 model's as eager
    bf16 is (values element by element, gradients by their largest error: tests/tolerance.py)."""
    spelling, _ = SPELLINGS[name]
    torch.manual_seed(0)
    model32 = Head(spelling)
    model = Head(spelling).to(torch.bfloat16)
    model.load_state_dict({k: v.to(torch.bfloat16) for k, v in model32.state_dict().items()})
    model32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})  # the same (rounded) weights
    x, ids, weights = _data(11, dtype=torch.bfloat16)
    ref, ref_grads = _step(model32, model32, x.float(), ids, weights.float())
    same, same_grads = _step(model, model, x, ids, weights)
    out, grads = _step(torch.compile(model, backend="liger"), model, x, ids, weights)
    assert replaced(FLAG) == 1 and out.dtype == same.dtype
    # The values: bf16 of an fp32 value on either side; eps32 * |lse| for the op's own fp32 sums.
    assert_close_rule(out, ref, same, atol=1e-5 * (1 + ref.abs()), name="per-token")
    for k in ref_grads:
        assert_max_error_rule(grads[k], ref_grads[k], same_grads[k], name=k)


def test_in_place_temperature_and_no_grad_entropy_are_separate_ops():
    """TRL's GRPO: `logits.div_(temperature)` in place, log-probs with grad, the entropy under no_grad. The log-probs
    keep their gradient, the entropy gets none (one op each: the no-grad one runs its forward only), and the in-place
    division does not keep the lm_head's matmul alive."""
    torch.manual_seed(0)
    head = nn.Linear(H, V, bias=False)

    def fn(h, ids):
        logits = head(h)[:, :-1, :]
        logits.div_(0.7)
        logps = selective_log_softmax(logits, ids[:, 1:])
        with torch.no_grad():
            entropies = entropy_from_logits(logits)
        return (logps * entropies).sum(), logps, entropies

    h = torch.randn(2, 25, H, requires_grad=True)
    ids = torch.randint(0, V, (2, 25))
    ref = fn(h, ids)
    ref_grads = torch.autograd.grad(ref[0], (h, head.weight))
    with capture_aot_graphs() as graphs:
        out = torch.compile(fn, backend="liger")(h, ids)
        grads = torch.autograd.grad(out[0], (h, head.weight))
    assert not out[2].requires_grad and out[1].requires_grad
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)
    assert sorted(_patterns()) == [f"{FLAG}/entropy/scale/no-grad", f"{FLAG}/logprob/scale"]
    graphs.assert_none_of(2 * 24 * V)
    fwd = next(gm for kind, gm in graphs.graphs if kind == "forward")
    assert not any(n.target is torch.ops.aten.mm.default and n.meta["val"].shape[-1] == V for n in fwd.graph.nodes)


def test_frozen_reference_under_no_grad_and_policy_with_grad():
    """DPO: chosen and rejected concatenated, masked sums of token log-probs for the policy (with grad) and a frozen
    reference model (under no_grad): one op each, the reference's without gradient; DPO's sigmoid stays in the graph."""
    torch.manual_seed(0)
    policy, reference = nn.Linear(H, V), nn.Linear(H, V)
    reference.requires_grad_(False)

    def logps(head, h, ids, mask):
        lp = selective_log_softmax(head(h)[:, :-1], ids[:, 1:])
        return (lp * mask[:, 1:]).sum(-1)

    def dpo(h, ids, mask):
        pol = logps(policy, h, ids, mask)
        with torch.no_grad():
            ref = logps(reference, h.detach(), ids, mask)
        chosen, rejected = (pol - ref).chunk(2)
        return -F.logsigmoid(0.1 * (chosen - rejected)).mean()

    h = torch.randn(4, 13, H, requires_grad=True)
    ids = torch.randint(0, V, (4, 13))
    mask = (torch.rand(4, 13) > 0.3).float()
    ref = dpo(h, ids, mask)
    params = (h, policy.weight, policy.bias)
    ref_grads = torch.autograd.grad(ref, params)
    with capture_aot_graphs() as graphs:
        out = torch.compile(dpo, backend="liger")(h, ids, mask)
        grads = torch.autograd.grad(out, params)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-5)
    assert sorted(_patterns()) == [f"{FLAG}/logprob/bias", f"{FLAG}/logprob/bias/no-grad"]
    graphs.assert_none_of(4 * 12 * V)


# ---------------------------------------------------------------------------------------------------------------
# What must not be fused, and why


def test_logits_also_returned_is_a_near_miss_and_still_correct():
    """The logits leave the function too: they must exist, and the fused op would compute them a second time."""
    torch.manual_seed(0)
    head = nn.Linear(H, V)
    h, ids = torch.randn(2, 7, H), torch.randint(0, V, (2, 7))

    def fn(h, ids):
        logits = head(h)
        return naive_logprobs(logits, ids), logits

    out = torch.compile(fn, backend="liger")(h, ids)
    torch.testing.assert_close(out[0], fn(h, ids)[0], atol=1e-6, rtol=1e-5)
    assert replaced(FLAG) == 0
    (miss,) = _misses()
    assert miss.flag == FLAG and "also used elsewhere" in miss.reason, miss.reason


def test_log_softmax_escaping_is_a_near_miss():
    """The whole log-softmax is returned (an intermediate escapes): nothing is fused, the reason says which use."""
    torch.manual_seed(0)
    head = nn.Linear(H, V)
    h, ids = torch.randn(2, 7, H), torch.randint(0, V, (2, 7))

    def fn(h, ids):
        lp = torch.log_softmax(head(h).float(), -1)
        return lp.gather(-1, ids[..., None]).squeeze(-1), lp

    out = torch.compile(fn, backend="liger")(h, ids)
    torch.testing.assert_close(out[1], fn(h, ids)[1], atol=1e-6, rtol=1e-5)
    assert replaced(FLAG) == 0
    (miss,) = _misses()
    assert "log-softmax is also used by output" in miss.reason, miss.reason


def test_top_k_gather_is_a_near_miss():
    torch.manual_seed(0)
    head = nn.Linear(H, V)
    h, ids = torch.randn(2, 7, H), torch.randint(0, V, (2, 7, 3))

    def fn(h, ids):
        return torch.log_softmax(head(h), -1).gather(-1, ids)

    torch.testing.assert_close(torch.compile(fn, backend="liger")(h, ids), fn(h, ids), atol=1e-6, rtol=1e-5)
    (miss,) = _misses()
    assert "top-K" in miss.reason, miss.reason


def test_flag_off_says_so_and_a_loop_stays_a_loop():
    torch.manual_seed(0)
    model = Head(trl_entropy)
    x, ids, weights = _data(9)
    out = torch.compile(model, backend="liger", options={FLAG: False})(x, ids, weights)[1]
    torch.testing.assert_close(out, model(x, ids, weights)[1], atol=1e-6, rtol=1e-5)
    assert replaced(FLAG) == 0
    misses = _misses()
    assert misses and all(m.flag == FLAG and f"flag '{FLAG}' is off" in m.reason for m in misses), misses


def test_a_router_softmax_is_not_a_site():
    """A MoE router: softmax(linear(h)) then top-k. No log-softmax or logsumexp, so no log-prob site and no near miss
    (Mixtral's two routers were counted as misses before)."""
    router = nn.Linear(H, 8, bias=False)

    def fn(h):
        weights, experts = torch.topk(torch.softmax(router(h), -1, dtype=torch.float), 2, -1)
        return weights.sum() + experts.float().sum()

    h = torch.randn(2, 5, H)
    torch.testing.assert_close(torch.compile(fn, backend="liger")(h), fn(h))
    assert replaced(FLAG) == 0 and not [m for m in _misses() if m.flag == FLAG]
