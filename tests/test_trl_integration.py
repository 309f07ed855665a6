"""liger_fx/integrations/trl.py against TRL's own fused LM head (`trl.trainer.utils.add_fused_lm_head`, checked with
TRL 1.16): the fused ops stand in for its `ChunkedLogProbFunction` with its values and every gradient, for every
output it computes and its transform (temperature, logit_scale, softcap); a model compiled by the hook runs them in
one graph, with TRL's forward's outputs. trl is not a dependency of liger-fx: without it these tests skip, saying
so (`PYTHONPATH=. /work/venvs/trl/bin/python -m pytest tests/test_trl_integration.py` runs them; the trainers
themselves: `python -m bench.trl_trainers`)."""

import copy
import logging

import pytest
import torch

trl = pytest.importorskip("trl", reason="trl is not installed (not a liger-fx dependency): TRL's head cannot be "
                                        "compared")
trl_utils = pytest.importorskip("trl.trainer.utils", reason="trl is installed but has no trl.trainer.utils")
if not hasattr(trl_utils, "add_fused_lm_head"):
    pytest.skip(f"trl {trl.__version__} has no add_fused_lm_head (TRL's fused LM head, 1.16)",
                allow_module_level=True)

import liger_fx  # noqa: E402
from liger_fx.integrations import trl as trl_integration  # noqa: E402
from liger_fx.models import mini_model  # noqa: E402
from tests.tolerance import assert_max_error_rule  # noqa: E402

ALL = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
N, H, V = 50, 24, 97


@pytest.fixture
def shims():
    """The shims installed as the hook installs them (flags at their defaults), removed afterwards."""
    trl_integration.install(liger_fx.LigerConfig())
    yield
    trl_integration.uninstall()


def _inputs(bias, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, H, generator=g) * 2).to(dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g) / 3).to(dtype).requires_grad_()
    b = torch.randn(V, generator=g).to(dtype).requires_grad_() if bias else None
    w.data[7] = w.data[11]  # two equal columns: TRL's is_top1 counts only the first argmax
    if b is not None:
        b.data[7] = b.data[11]
    h.data[:3] = w.data[11] * 4  # rows whose argmax is that tie
    t = torch.randint(0, V, (N,), generator=g)
    t[0], t[1], t[2] = 7, 11, 7
    return h, w, b, t


CASES = {  # (temperature, final_logit_softcapping, logit_scale, outputs)
    "grpo": (0.9, None, 1.0, ("log_probs", "entropy")),
    "reference": (1.0, None, 1.0, ("log_probs",)),
    "sft": (1.0, None, 1.0, ("log_probs", "entropy", "is_top1")),
    "dpo-wpo": (1.0, None, 1.0, ALL),
    "softcap-scale": (0.7, 5.0, 0.5, ALL),
    "negative-scale": (1.3, None, -2.0, ("log_probs", "entropy", "mean_logits")),
}


def _reference(h, w, b, t, temperature, softcap, scale, dtype=torch.float64):
    """TRL's head's five outputs from the materialized logits, as eager torch computes them in `dtype`:
    z = softcap * tanh(x * scale / softcap) / T."""
    x = torch.nn.functional.linear(h.to(dtype), w.to(dtype), b.to(dtype) if b is not None else None) * scale
    z = (softcap * torch.tanh(x / softcap) if softcap is not None else x) / temperature
    lse = torch.logsumexp(z, -1)
    lp = z.gather(-1, t[:, None]).squeeze(-1) - lse
    ent = lse - (torch.softmax(z, -1) * z).sum(-1)
    return lp, ent, torch.logsumexp(2 * z, -1) - 2 * lse, z.mean(-1), z.argmax(-1) == t


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_head_matches_trls_head(case, bias, shims):
    """Every output and the gradients of h, W, b through the differentiable ones (log-probs, entropies), with a
    different upstream gradient per token: ours against the fp64 reference within 2x eager fp32 torch's error (per
    tensor, tolerance.assert_max_error_rule), and the values of TRL's ChunkedLogProbFunction within fp32 noise (CPU).
    The flags: exactly TRL's."""
    temperature, softcap, scale, outputs = CASES[case]
    h, w, b, t = _inputs(bias)
    leaves = [x for x in (h, w, b) if x is not None]
    g = torch.Generator().manual_seed(1)
    up = [torch.randn(N, generator=g, dtype=torch.float64) for _ in range(2)]

    def loss_of(out):
        return (out[0] * up[0]).sum() + ((out[1] * up[1]).sum() if out[1] is not None and "entropy" in outputs else 0)

    def run(head):
        out = head.apply(h, w, b, t, temperature, 32, softcap, scale, outputs)
        return out, torch.autograd.grad(loss_of(out), leaves)

    exact = _reference(h, w, b, t, temperature, softcap, scale)
    exact_grads = torch.autograd.grad(loss_of(exact), leaves)
    same = _reference(h, w, b, t, temperature, softcap, scale, torch.float32)
    same_grads = torch.autograd.grad(loss_of(same), leaves)
    theirs, their_grads = run(trl_integration._original_head)
    ours, grads = run(trl_integration.FusedHead)  # the hook's flags: the fused ops
    for name, e, s, r, o in zip(ALL, exact, same, theirs, ours):
        assert (r is None) == (o is None) == (name not in outputs), name
        if r is None:
            continue
        assert o.dtype == r.dtype and o.shape == r.shape, name
        if r.dtype == torch.bool:
            assert torch.equal(o, r) and torch.equal(o, e), name
        else:
            assert_max_error_rule(o, e, s, name=name)
            torch.testing.assert_close(o, r, atol=1e-4, rtol=1e-5, msg=lambda m: f"{name} vs TRL's: {m}")
    if "is_top1" in outputs:
        assert ours[4][:3].tolist() == [True, False, True]  # the tie of columns 7 and 11: only the first counts
    for e, s, r, o, n in zip(exact_grads, same_grads, their_grads, grads, ("h", "W", "b")):
        assert o.dtype == r.dtype
        assert_max_error_rule(o, e, s, name=n)  # not against TRL's elementwise: dW has cancelling sums (one element
        # of 2328 differed by 0.3% of itself, 1.1e-4, each within the rule of the fp64 reference)


def test_bf16_within_trls_error():
    """bf16: TRL's head and ours against the fp32 reference; ours within 2x TRL's error (per tensor). TRL
    accumulates its gradient GEMMs in fp32 and rounds once; the fused op rounds dh, dW once too."""
    h, w, b, t = _inputs(bias=True, dtype=torch.bfloat16)
    h32, w32, b32 = (x.detach().float().requires_grad_() for x in (h, w, b))
    g = torch.Generator().manual_seed(1)
    up = torch.randn(N, generator=g)
    args = (0.9, 32, None, 1.0, ("log_probs", "entropy"))

    def run(head, leaves):
        out = head.apply(*leaves, t, *args)
        return out[0], torch.autograd.grad((out[0] * up).sum() + out[1].sum(), leaves)

    trl_integration.install(liger_fx.LigerConfig())
    try:
        ref, ref_grads = run(trl_integration._original_head, (h32, w32, b32))
        same, same_grads = run(trl_integration._original_head, (h, w, b))
        ours, grads = run(trl_integration.FusedHead, (h, w, b))
    finally:
        trl_integration.uninstall()
    assert_max_error_rule(ours, ref, same, name="log_probs")
    for o, r, s, n in zip(grads, ref_grads, same_grads, ("h", "W", "b")):
        assert o.dtype == torch.bfloat16
        assert_max_error_rule(o, r, s, name=n)


def test_off_flag_and_models_outside_the_hook_keep_trls_head(shims):
    """Flag fused_linear_logprobs off: TRL's head (its function is called). No hook (uninstalled): TRL's head."""
    calls = []
    original = trl_integration._original_head

    class Spy:
        @staticmethod
        def apply(*args):
            calls.append(len(args))
            return original.apply(*args)

    h, w, b, t = _inputs(False)
    trl_integration._original_head = Spy
    try:
        trl_integration._config = liger_fx.LigerConfig(fused_linear_logprobs=False)
        trl_integration.FusedHead.apply(h, w, b, t, 1.0, 32, None, 1.0, ("log_probs",))
        assert calls == [9]
        trl_integration._config = liger_fx.LigerConfig()
        trl_integration.FusedHead.apply(h, w, b, t, 1.0, 32, None, 1.0, ("log_probs", "a_new_output"))
        assert calls == [9, 9]  # an output the fused ops do not compute
    finally:
        trl_integration._original_head = original
    trl_integration.uninstall()
    assert trl_utils._ChunkedLogProbFunction is original


def test_hooked_model_runs_the_op_in_one_graph_and_says_so(caplog):
    """The Trainer hook on a model with TRL's fused LM head (as SFTTrainer leaves it): one graph, no break, the
    fused op inside it, TRL's outputs equal to the uncompiled model's, and one log line that names the op."""
    import liger_fx.integrations.transformers as hook
    from torch._dynamo.utils import counters

    hook.install("liger_fx")
    model = mini_model("llama", num_hidden_layers=1, vocab_size=256)
    trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    eager = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (2, 24), generator=g)
    labels = ids.masked_fill(torch.arange(24) < 5, -100)
    try:
        with caplog.at_level(logging.INFO, logger="liger_fx"):
            hook.apply_liger_kernel(model, {})
        assert any("runs liger_fx::fused_linear_logprobs_metrics inside the compiled graph" in r.getMessage()
                   for r in caplog.records), [r.getMessage() for r in caplog.records]
        counters.clear()
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
        ref = eager(input_ids=ids, labels=labels, fused_lm_head=True)
        assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
        for name in ("loss", "log_probs", "entropy", "is_top1"):
            torch.testing.assert_close(getattr(out, name), getattr(ref, name), atol=1e-5, rtol=1e-4)
        out.loss.backward()
        ref.loss.backward()
        for (n, p), (_, q) in zip(model.named_parameters(), eager.named_parameters()):
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}")
    finally:
        hook.uninstall()
        liger_fx.api.remove(model)
