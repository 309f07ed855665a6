"""lm_head + cross-entropy through backend="liger" on CPU (the ops run their torch reference): the loss is fused, and
loss and every gradient equal eager."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import liger_fx
import liger_fx.backend
from liger_fx.models import mini_model
from tests.helpers import batch, compare_training, replaced
from tests.tolerance import assert_close_rule

FLCE = "fused_linear_cross_entropy"


def _patterns(flag=FLCE):
    return [r.pattern for rec in liger_fx.get_records() for r in rec.replaced if r.flag == flag]


def _misses():
    return [m for rec in liger_fx.get_records() for m in rec.misses]


# ---------------------------------------------------------------------------------------------------------------
# HF models: ForCausalLMLoss, logits also returned (lm_head + loss become one op that returns the logits)

MODELS = {  # id -> (model_type, config overrides, what the fused op must have captured)
    "llama": ("llama", {}, "/mean/logits-returned"),
    "llama-tied": ("llama", {"tie_word_embeddings": True}, "/mean/logits-returned"),
    "gemma2-softcap": ("gemma2", {}, "/mean/softcap/logits-returned"),
    "qwen2": ("qwen2", {}, "/mean/logits-returned"),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_training_matches_eager_with_ignored_targets(name):
    model_type, overrides, form = MODELS[name]
    model = mini_model(model_type, num_hidden_layers=1, **overrides)
    ids, labels = batch(model.config.vocab_size, ignore=5)  # 5 of 16 labels per row are -100
    compare_training(model, ids, labels)
    assert replaced(FLCE) == 1
    assert _patterns() == [FLCE + form]


def test_liger_1338_ignore_index_loss_is_not_silently_wrong_under_compile():
    """Liger #1338: with ignore_index targets, Liger's FLCE gave a wrong loss under torch.compile. Most targets
    ignored, mean and sum / n, against eager."""
    torch.manual_seed(0)
    head = nn.Linear(32, 50, bias=False)
    h = torch.randn(4, 9, 32, requires_grad=True)
    shift_labels = torch.randint(0, 50, (36,))
    shift_labels[torch.rand(36) < 0.7] = -100

    def loss_fn(h, n):
        logits = head(h).float()
        if n is None:
            return F.cross_entropy(logits.view(-1, 50), shift_labels)
        return F.cross_entropy(logits.view(-1, 50), shift_labels, reduction="sum") / n

    for n in (None, torch.tensor(11.0), 11):  # mean; sum / num_items_in_batch as a tensor and as an int
        ref = loss_fn(h, n)
        ref_grads = torch.autograd.grad(ref, (h, head.weight))
        out = torch.compile(loss_fn, backend="liger")(h, n)
        grads = torch.autograd.grad(out, (h, head.weight))
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-5)
    assert replaced(FLCE) == 3


def test_other_ignore_index_is_honoured():
    torch.manual_seed(0)
    head = nn.Linear(32, 50)
    h = torch.randn(40, 32, requires_grad=True)
    shift_labels = torch.randint(0, 50, (40,))
    shift_labels[::3] = 7  # a real class elsewhere, ignored here

    def fn(h):
        return F.cross_entropy(head(h), shift_labels, ignore_index=7)

    ref = fn(h)
    ref_grads = torch.autograd.grad(ref, (h, head.weight, head.bias))
    out = torch.compile(fn, backend="liger")(h)
    grads = torch.autograd.grad(out, (h, head.weight, head.bias))
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-5)
    assert _patterns() == [FLCE + "/mean/bias"]


def test_liger_802_gradient_accumulation_with_num_items_equals_one_big_batch():
    """Liger #802: two micro-batches, each `loss = sum / num_items_in_batch` (the count over both), accumulated,
    give the gradients of one batch of both with the mean loss. Uneven ignored counts make a per-micro-batch mean
    wrong, so this catches a fused loss that ignores num_items_in_batch."""
    model = mini_model("llama", num_hidden_layers=1)
    ids1, labels1 = batch(model.config.vocab_size, seed=1, ignore=2)
    ids2, labels2 = batch(model.config.vocab_size, seed=2, ignore=9)
    # the count HF's Trainer passes: labels after the shift, not ignored
    n = sum((lab[:, 1:] != -100).sum() for lab in (labels1, labels2))

    model.zero_grad(set_to_none=True)
    model(input_ids=torch.cat([ids1, ids2]), labels=torch.cat([labels1, labels2])).loss.backward()
    ref = {k: p.grad.clone() for k, p in model.named_parameters()}

    model.zero_grad(set_to_none=True)
    fn = torch.compile(model, backend="liger")
    for ids, labels in ((ids1, labels1), (ids2, labels2)):
        fn(input_ids=ids, labels=labels, num_items_in_batch=n).loss.backward()
    assert replaced(FLCE) >= 1 and all("/sum" in p for p in _patterns())
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[k], atol=1e-5, rtol=1e-4, msg=lambda m: f"{k}: {m}")


@pytest.fixture
def flag_args(monkeypatch):
    """Per graph AOTAutograd hands to Inductor: the (grad_input, grad_weight) of each fused linear+CE op, and the
    (need_h, need_w) of each returned-logits backward."""
    seen = []
    real = liger_fx.backend.compile_fx
    ops = {torch.ops.liger_fx.fused_linear_cross_entropy.default: slice(8, 10),
           torch.ops.liger_fx.linear_cross_entropy_logits_backward.default: slice(12, 14)}

    def inner(gm, example_inputs, **kwargs):
        for n in gm.graph.nodes:
            if n.target in ops:
                seen.append((n.target.__name__.split(".")[0], *n.args[ops[n.target]]))
        from torch._inductor.compile_fx import compile_fx_inner
        return compile_fx_inner(gm, example_inputs, **kwargs)

    monkeypatch.setattr(liger_fx.backend, "compile_fx", lambda gm, ex, **kw: real(gm, ex, inner_compile=inner, **kw))
    # A cache hit skips inner_compile. Torch config only through its own patch(): pytest 9's monkeypatch.setattr
    # deletes a torch config entry on undo (it looks for the old value in the module's __dict__), and every later
    # compile then failed with "enable_autograd_cache does not exist" (issue 13).
    with torch._functorch.config.patch(enable_autograd_cache=False):
        yield seen


def _loss_only(model):
    """What the HF hook compiles in a training step: the loss is the logits' only use."""
    return lambda ids, labels: model(input_ids=ids, labels=labels).loss


def test_gradients_are_computed_only_where_needed(flag_args):
    """Loss only: training computes dh and dW in the forward; a frozen lm_head (PEFT) dh only; no_grad neither (only
    the logits matmul runs)."""
    seen = flag_args
    model = mini_model("llama", num_hidden_layers=1)
    ids, labels = batch(model.config.vocab_size, ignore=3)
    for frozen, expected in ((False, (True, True)), (True, (True, False))):
        torch._dynamo.reset()
        seen.clear()
        model.lm_head.weight.requires_grad_(not frozen)
        model.zero_grad(set_to_none=True)
        ref = _loss_only(model)(ids, labels)
        ref.backward()
        ref_grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        out = torch.compile(_loss_only(model), backend="liger")(ids, labels)
        out.backward()
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
        for k, p in model.named_parameters():
            if p.grad is not None or k in ref_grads:
                torch.testing.assert_close(p.grad, ref_grads[k], atol=1e-5, rtol=1e-4, msg=lambda m: f"{k}: {m}")
        assert seen == [("fused_linear_cross_entropy", *expected)], seen
    model.lm_head.weight.requires_grad_(True)

    seen.clear()
    torch._dynamo.reset()
    with torch.no_grad():
        ref = model(input_ids=ids, labels=labels).loss
        out = torch.compile(_loss_only(model), backend="liger")(ids, labels)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    assert seen == [("fused_linear_cross_entropy", False, False)]


def test_returned_logits_take_one_backward_with_only_the_needed_gradients(flag_args):
    """Logits returned: the backward of lm_head + loss is one op, which computes dW only where the lm_head learns.
    Its forward has one lm_head matmul (the logits) and no fused linear+CE op beside it."""
    seen = flag_args
    model = mini_model("llama", num_hidden_layers=1)
    ids, labels = batch(model.config.vocab_size, ignore=3)
    compare_training(model, ids, labels)
    assert seen == [("linear_cross_entropy_logits_backward", True, True)], seen
    seen.clear()
    torch._dynamo.reset()
    model.lm_head.weight.requires_grad_(False)
    compare_training(model, ids, labels)
    assert seen == [("linear_cross_entropy_logits_backward", True, False)], seen


def test_returned_logits_gradient_reaches_the_model():
    """A loss on the returned logits as well (distillation, a z-loss): both gradients flow through the one op,
    equal to eager."""
    model = mini_model("llama", num_hidden_layers=1)
    ids, labels = batch(model.config.vocab_size, ignore=3)

    def step(fn):
        model.zero_grad(set_to_none=True)
        out = fn(input_ids=ids, labels=labels)
        total = out.loss + 1e-2 * out.logits.float().logsumexp(-1).pow(2).mean()
        total.backward()
        return total.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}

    ref, ref_grads = step(model)
    out, grads = step(torch.compile(model, backend="liger"))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], atol=1e-5, rtol=1e-4, msg=lambda m: f"{k}: {m}")
    assert _patterns() == [FLCE + "/mean/logits-returned"]


class _ZerosOfSize(TorchDispatchMode):
    """Records every zeros/fill/empty op whose output has `numel` elements."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.seen = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(w in str(func) for w in ("zero", "fill", "empty")) and getattr(out, "numel", lambda: 0)() == self.numel:
            self.seen.append(str(func))
        return out


def test_returned_logits_get_no_zeros_gradient():
    """`model(ids, labels=labels).loss.backward()` with the logits returned: autograd made a zeros gradient of N x V
    for them at the backward's start (3.9 GiB of a 30.0 GiB peak on the H200, Llama-1B B8); now the logits leave
    the graph without a gradient path, so nothing of their size is made up. Training still equals eager."""
    model = mini_model("llama", num_hidden_layers=1)
    ids, labels = batch(model.config.vocab_size, ignore=3)
    compare_training(model, ids, labels)  # equal to eager (loss and every gradient)
    model.zero_grad(set_to_none=True)
    out = torch.compile(model, backend="liger")(input_ids=ids, labels=labels)
    assert out.logits.requires_grad  # differentiable as eager's (test below)
    with _ZerosOfSize(out.logits.numel()) as mode:
        out.loss.backward()
    assert mode.seen == [], mode.seen
    assert all(r.logits_grad_outside == 1 for r in liger_fx.get_records())
    assert "(their gradient outside the graph)" in liger_fx.get_records()[-1].summary()


class _HeadWithBias(nn.Module):
    def __init__(self, frozen_weight=False):
        super().__init__()
        self.body = nn.Linear(24, 32)
        self.head = nn.Linear(32, 50, bias=True)
        self.head.weight.requires_grad_(not frozen_weight)

    def forward(self, x, labels):
        logits = self.head(torch.tanh(self.body(x)))
        return logits, F.cross_entropy(logits.view(-1, 50).float(), labels.view(-1))


@pytest.mark.parametrize("frozen_weight", [False, True])
def test_returned_logits_gradient_outside_the_graph_with_bias_and_frozen_weight(frozen_weight):
    """The gradient attached outside the graph is the lm_head's whole backward: dh, dW and db, each only where it
    is needed, equal to eager for a loss on the logits beside the fused one."""
    torch.manual_seed(0)
    model = _HeadWithBias(frozen_weight)
    x, labels = torch.randn(3, 7, 24), torch.randint(0, 50, (3, 7))

    def step(fn):
        model.zero_grad(set_to_none=True)
        logits, loss = fn(x, labels)
        (loss + (logits.float() * torch.linspace(-1, 1, 50)).sum() / 100).backward()
        return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    ref = step(model)
    torch._dynamo.reset()
    got = step(torch.compile(model, backend="liger"))
    assert sorted(got) == sorted(ref) and ("head.weight" in got) != frozen_weight
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-5, rtol=1e-4, msg=lambda m: f"{k}: {m}")
    assert liger_fx.get_records()[-1].logits_grad_outside == 1


def test_logits_used_inside_the_graph_keep_their_gradient_path():
    """A z-loss computed in the compiled function reads the logits inside the graph: their gradient must stay
    there (nothing is detached), and training equals eager."""
    model = mini_model("llama", num_hidden_layers=1)
    ids, labels = batch(model.config.vocab_size, ignore=3)

    def fn(ids, labels):
        out = model(input_ids=ids, labels=labels)
        return out.loss + 1e-2 * out.logits.float().logsumexp(-1).pow(2).mean(), out.logits

    def step(f):
        model.zero_grad(set_to_none=True)
        total, logits = f(ids, labels)
        (total + logits.float().mean()).backward()
        return {k: p.grad.clone() for k, p in model.named_parameters()}

    ref = step(fn)
    got = step(torch.compile(fn, backend="liger"))
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-5, rtol=1e-4, msg=lambda m: f"{k}: {m}")
    assert _patterns() == [FLCE + "/mean/logits-returned"]
    assert liger_fx.get_records()[-1].logits_grad_outside == 0


def test_eval_loss_with_logits():
    """model.eval() with labels (an evaluation loop): loss and logits equal eager, no backward."""
    model = mini_model("llama", num_hidden_layers=1).eval()
    ids, labels = batch(model.config.vocab_size, ignore=3)
    with torch.no_grad():
        ref = model(input_ids=ids, labels=labels)
        out = torch.compile(model, backend="liger")(input_ids=ids, labels=labels)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-6, rtol=1e-5)
    assert _patterns() == [FLCE + "/mean/logits-returned"]


def test_bf16_model_loss_within_torch_error():
    """bf16: the bf16 logits are upcast inside the op (no fp32 copy); the fused loss is as close to the fp32 model's
    as eager bf16 is (STYLE's rule). Gradients in bf16 are checked by the kernel tests: here the rest of the model
    (fused by Inductor) moves them by an ulp anyway."""
    model32 = mini_model("llama", num_hidden_layers=1)
    ids, labels = batch(model32.config.vocab_size, ignore=4)
    ref = model32(input_ids=ids, labels=labels).loss.detach()
    model = mini_model("llama", num_hidden_layers=1).to(torch.bfloat16)
    eager = model(input_ids=ids, labels=labels).loss.detach()
    out = torch.compile(model, backend="liger")(input_ids=ids, labels=labels).loss
    out.backward()
    assert replaced(FLCE) == 1
    assert out.dtype == torch.float32 and model.lm_head.weight.grad.dtype == torch.bfloat16
    assert_close_rule(out.detach(), ref, eager, atol=1e-3, name="loss")


# ---------------------------------------------------------------------------------------------------------------
# Spellings of the chain between the linear and the loss, on a small head (compiles in a few seconds)


class Head(nn.Module):
    def __init__(self, chain, bias=False, shift=False):
        super().__init__()
        self.proj = nn.Linear(32, 60, bias=bias)
        self.chain, self.shift = chain, shift

    def forward(self, h, shift_labels):
        # `shift_labels`: already shifted, as ForCausalLMLoss's argument or a data loader gives them.
        logits = self.chain(self.proj(h))
        if self.shift:  # the pre-transformers-4.46 shift: slice the logits, not the labels
            logits, shift_labels = logits[:, :-1, :].contiguous(), shift_labels[:, 1:].contiguous()
        return F.cross_entropy(logits.reshape(-1, 60), shift_labels.reshape(-1), ignore_index=-100), logits


CHAINS = {  # id -> (chain, bias, shift, expected pattern suffix)
    "cohere-scale": (lambda x: (x * 0.0625).float(), False, False, "/mean/scale"),
    "granite-div": (lambda x: x.float() / 8.0, True, False, "/mean/scale/bias"),
    "gemma2-softcap": (lambda x: (torch.tanh(x / 3.0) * 3.0).float(), False, False, "/mean/softcap"),
    "scale-before-tanh": (lambda x: torch.tanh(x * 0.25) * 2.0, False, False, "/mean/softcap/scale"),
    "shift-logits": (lambda x: x.float(), False, True, "/mean"),
}


@pytest.mark.parametrize("name", sorted(CHAINS))
def test_chain_spellings_fold_into_the_op(name):
    chain, bias, shift, suffix = CHAINS[name]
    torch.manual_seed(0)
    m = Head(chain, bias, shift)
    h = torch.randn(3, 7, 32, requires_grad=True) * 3
    shift_labels = torch.randint(0, 60, (3, 7))
    shift_labels[:, :2] = -100
    params = (h, *m.parameters())
    ref, ref_logits = m(h, shift_labels)
    ref_grads = torch.autograd.grad(ref, params)
    out, logits = torch.compile(m, backend="liger")(h, shift_labels)
    grads = torch.autograd.grad(out, params)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(logits, ref_logits, atol=1e-6, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-5)
    assert _patterns() == [FLCE + suffix + "/logits-returned"]


def test_dynamic_sequence_length_compiles_at_most_twice():
    m = Head(lambda x: x.float())
    fn = torch.compile(m, backend="liger")
    for t in (5, 9, 14):
        h = torch.randn(2, t, 32)
        shift_labels = torch.randint(0, 60, (2, t))
        out, _ = fn(h, shift_labels)
        torch.testing.assert_close(out, m(h, shift_labels)[0], atol=1e-6, rtol=1e-5)
    assert len(liger_fx.get_records()) <= 2
    assert replaced(FLCE) == len(liger_fx.get_records())


class AttributeSoftcapHead(nn.Module):
    """Gemma2's final softcap read from a float attribute (its config's final_logit_softcapping)."""

    def __init__(self, cap):
        super().__init__()
        self.proj = nn.Linear(32, 60, bias=False)
        self.cap = cap

    def forward(self, h, shift_labels):
        logits = torch.tanh(self.proj(h) / self.cap) * self.cap
        return F.cross_entropy(logits.float().reshape(-1, 60), shift_labels.reshape(-1))


def test_dynamic_softcap_from_a_float_attribute_is_fused_and_pinned_by_a_guard():
    """dynamic=True makes the cap a graph input (a SymFloat), which used to read 'scaled by a tensor'. The fused op
    takes it as a constant; a new cap recompiles. Logits of ~10 make the cap matter: tanh(10/3) against tanh(10/30)."""
    torch.manual_seed(0)
    m = AttributeSoftcapHead(3.0)
    h = (torch.randn(2, 7, 32) * 3).requires_grad_()
    shift_labels = torch.randint(0, 60, (2, 7))
    fn = torch.compile(m, backend="liger", dynamic=True)
    for cap in (3.0, 30.0):
        m.cap = cap
        params = (h, m.proj.weight)
        ref = m(h, shift_labels)
        ref_grads = torch.autograd.grad(ref, params)
        out = fn(h, shift_labels)
        grads = torch.autograd.grad(out, params)
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-5)
    assert _patterns() == [FLCE + "/mean/softcap"] * 2 and not _misses()


def test_autocast_runs_the_fused_matmuls_in_the_autocast_dtype():
    """Mixed precision (fp32 weights, bf16 autocast; HF Trainer bf16=True) as ambient state and as a region in the
    graph: the fused op gets bf16 inputs as autocast gives the linear, so loss and grads equal eager autocast (an fp32
    op would differ from it by ~1e-3 here)."""
    torch.manual_seed(0)
    head = nn.Linear(32, 50)
    h = torch.randn(10, 32, requires_grad=True)
    shift_labels = torch.randint(0, 50, (10,))

    def ambient(h):
        return F.cross_entropy(head(h).float(), shift_labels)

    def region(h):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return F.cross_entropy(head(h).float(), shift_labels)

    for fn, ctx in ((ambient, lambda: torch.autocast("cpu", dtype=torch.bfloat16)), (region, torch.enable_grad)):
        torch._dynamo.reset()
        with ctx():
            ref = fn(h)
            out = torch.compile(fn, backend="liger")(h)
        ref_grads = torch.autograd.grad(ref, (h, head.weight, head.bias))
        grads = torch.autograd.grad(out, (h, head.weight, head.bias))
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-5)
    assert replaced(FLCE) == 2


def test_lm_head_and_loss_in_different_autocast_regions_is_a_near_miss():
    head = nn.Linear(32, 50)
    shift_labels = torch.randint(0, 50, (10,))

    def fn(h):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = head(h)
        return F.cross_entropy(logits.float(), shift_labels)

    torch.compile(fn, backend="liger")(torch.randn(10, 32))
    assert replaced(FLCE) == 0
    (miss,) = _misses()
    assert "different autocast regions" in miss.reason, miss.reason


# ---------------------------------------------------------------------------------------------------------------
# What must not be fused, and the cross_entropy flag


@pytest.mark.parametrize("kwargs,reason", [
    ({"label_smoothing": 0.1}, "label_smoothing=0.1"),
    ({"weight": torch.rand(60)}, "class weight"),
    ({"reduction": "none"}, "reduction='none'"),
])
def test_unsupported_cross_entropy_is_a_near_miss_with_reason(kwargs, reason):
    torch.manual_seed(0)
    proj = nn.Linear(32, 60)
    h = torch.randn(10, 32)
    shift_labels = torch.randint(0, 60, (10,))

    def fn(h):
        return F.cross_entropy(proj(h).float(), shift_labels, **kwargs).sum()

    torch.testing.assert_close(torch.compile(fn, backend="liger")(h), fn(h), atol=1e-6, rtol=1e-5)
    assert replaced(FLCE) == 0 and replaced("cross_entropy") == 0
    (miss,) = _misses()
    assert miss.flag == FLCE and reason in miss.reason, miss.reason


def test_a_loss_on_any_labels_is_fused():
    """Issue 16: every linear feeding a cross-entropy is a site, whatever produced the targets: labels the loader
    already aligned (torchtitan, nanoGPT: no shift in the graph), a masked-LM head's labels. The lm_head written as
    `h @ W.t()` is a linear too."""
    torch.manual_seed(0)
    head = nn.Linear(32, 50)
    h = torch.randn(10, 32, requires_grad=True)
    labels = torch.randint(0, 50, (10,))
    labels[:3] = -100

    def mlm(h):
        return F.cross_entropy(head(h), labels)

    def aligned(h):  # torchtitan's spelling
        return F.cross_entropy((h @ head.weight.t()).float(), labels)

    for fn in (mlm, aligned):
        torch._dynamo.reset()
        liger_fx.clear_records()
        ref = fn(h)
        ref_grads = torch.autograd.grad(ref, (h, head.weight))
        out = torch.compile(fn, backend="liger")(h)
        grads = torch.autograd.grad(out, (h, head.weight))
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-5)
        (rec,) = liger_fx.get_records()
        assert [r.pattern for r in rec.replaced] == [FLCE + "/mean" + ("/bias" if fn is mlm else "")], rec.replaced
    assert replaced(FLCE) == 2


def test_cross_entropy_flag_fuses_a_loss_without_a_linear():
    """The logits come from a batched matmul with an (H, V) table (no linear): `fused_linear_cross_entropy` cannot
    take it, `cross_entropy` (off by default) does."""
    torch.manual_seed(0)
    emb = nn.Parameter(torch.randn(2, 32, 60) * 0.3)
    h = torch.randn(2, 6, 32, requires_grad=True)
    shift_labels = torch.randint(0, 60, (2, 6))
    shift_labels[0, :3] = -100

    def fn(h):
        logits = torch.tanh(torch.bmm(h, emb) / 4.0) * 4.0
        return F.cross_entropy(logits.float().view(-1, 60), shift_labels.view(-1), reduction="sum") / 7

    ref = fn(h)
    ref_grads = torch.autograd.grad(ref, (h, emb))
    out = torch.compile(fn, backend="liger")(h)
    assert replaced("cross_entropy") == 0
    (miss,) = _misses()
    assert miss.flag == "cross_entropy" and "flag 'cross_entropy' is off" in miss.reason

    torch._dynamo.reset()
    out = torch.compile(fn, backend="liger", options={"cross_entropy": True})(h)
    grads = torch.autograd.grad(out, (h, emb))
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-5)
    assert replaced("cross_entropy") == 1 and _patterns("cross_entropy") == ["cross_entropy/sum/softcap"]


def test_flag_off_leaves_the_loss_and_says_so():
    model = mini_model("llama", num_hidden_layers=1)
    ids, labels = batch(model.config.vocab_size)
    compare_training(model, ids, labels, options={FLCE: False})
    assert replaced(FLCE) == 0
    misses = [m for m in _misses() if m.flag == FLCE]
    assert len(misses) == 1 and f"flag '{FLCE}' is off" in misses[0].reason


def test_constant_divided_by_logits_is_a_miss_not_a_fallback():
    """Logits as a divisor (`c / logits`) do not fold into a scale: the loss stays unfused, and nothing may send the
    whole graph (norms and all) to plain Inductor. (The walk also guards a non-Node arg for this form.)"""
    import torch.nn as nn

    import liger_fx

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(16, 40)

        def forward(self, h, labels):
            logits = torch.div(torch.full((), 2.0), self.head(h) + 5.0)
            shift = nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
            return nn.functional.cross_entropy(logits.view(-1, 40), shift.reshape(-1))

    torch.manual_seed(0)
    m, h, t = M(), torch.randn(2, 6, 16), torch.randint(0, 40, (2, 6))
    torch.testing.assert_close(torch.compile(m, backend="liger")(h, t), m(h, t), atol=1e-6, rtol=1e-6)
    assert all(rec.fallback is None for rec in liger_fx.get_records())


def test_cross_entropy_flag_alone_on_a_model_with_returned_logits():
    """cross_entropy=True, fused_linear_cross_entropy=False: the lm_head stays a linear (one matmul forward, two
    backward) and the loss on its logits is the fused cross-entropy."""
    model = mini_model("llama", num_hidden_layers=1)
    ids, labels = batch(model.config.vocab_size, ignore=3)
    compare_training(model, ids, labels, options={FLCE: False, "cross_entropy": True})
    assert replaced(FLCE) == 0 and _patterns("cross_entropy") == ["cross_entropy/mean"]
