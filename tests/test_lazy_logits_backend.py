"""The loss outside the compiled model: `pred = torch.compile(model, backend="liger")(x); loss = loss_fn(pred, y)`.

The compiled model returns LazyLogits (option `lazy_logits`), so the loop gets the fused lm_head + loss with no change:
loss and every gradient equal eager (fp32 exactly as Inductor reorders, bf16 by the tolerance rule), no N x V tensor in
the compiled graphs or the eager loss path, one graph for every sequence length after the first, and logits that are
read after all equal eager's. The model is the plain-PyTorch reference decoder (liger_fx/models/reference.py)."""

import copy
from unittest import mock

import pytest
import torch
from torch._dynamo.utils import counters

import liger_fx
import liger_fx.backend
from liger_fx.lazy_logits import LazyLogits, is_lazy
from liger_fx.models import mini_model, reference
from tests.helpers import batch as hf_batch, compare_training
from tests.test_recompute import _partition_only
from tests.test_lazy_logits import BigTensors
from tests.tolerance import assert_close_rule, assert_max_error_rule

ATOL, RTOL = 1e-5, 1e-4  # fp32, as tests/helpers.compare_training: Inductor reorders reductions (~1e-7)


def _step(fn, model, x, y, loss_fn=reference.loss_fn):
    model.zero_grad(set_to_none=True)
    pred = fn(x)
    loss = loss_fn(pred, y)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return pred, loss.detach(), grads


def _assert_same(loss, grads, ref_loss, ref_grads):
    torch.testing.assert_close(loss, ref_loss, atol=ATOL, rtol=RTOL)
    assert set(grads) == set(ref_grads), set(grads) ^ set(ref_grads)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, atol=ATOL, rtol=RTOL, msg=lambda m: f"{name}: {m}")


@pytest.fixture
def graphs(monkeypatch):
    """The forward and backward graphs AOTAutograd hands to Inductor, per compile (as the lm_head+CE tests' spy)."""
    seen = []
    real = liger_fx.backend.compile_fx

    def inner(gm, example_inputs, **kwargs):
        seen.append(gm)
        from torch._inductor.compile_fx import compile_fx_inner
        return compile_fx_inner(gm, example_inputs, **kwargs)

    monkeypatch.setattr(liger_fx.backend, "compile_fx", lambda gm, ex, **kw: real(gm, ex, inner_compile=inner, **kw))
    with torch._functorch.config.patch(enable_autograd_cache=False):  # a cache hit skips inner_compile
        yield seen


def _vocab_sized(gm, n_rows, vocab):
    """Nodes of a graph whose value has the vocabulary as last dim and at least n_rows rows: (N, V) logits."""
    out = []
    for node in gm.graph.nodes:
        for v in (lambda x: x if isinstance(x, (tuple, list)) else (x,))(node.meta.get("val")):
            if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[-1] == vocab and v.numel() >= n_rows * vocab:
                out.append(f"{node.name}: {tuple(v.shape)}")
    return out


def test_loss_outside_the_model_is_fused_and_matches_eager(graphs):
    model, (x,), y = reference.build("tiny", n_layers=1, norm="manual", batch_size=2, seq=16)
    y[:, :3] = reference.IGNORE_INDEX
    compiled = copy.deepcopy(model)
    _, ref_loss, ref_grads = _step(model, model, x, y)
    fn = torch.compile(compiled, backend="liger")
    pred = fn(x)
    assert type(pred) is LazyLogits and pred.shape == (2, 16, 512) and pred.requires_grad
    with BigTensors(x.numel() * 512 // 2, last_dim=512) as big:  # the eager loss: no (N, V), nor half of one
        loss = reference.loss_fn(pred, y)
    assert big.seen == [] and is_lazy(pred), big.seen
    compiled.zero_grad(set_to_none=True)
    loss.backward()
    grads = {n: p.grad for n, p in compiled.named_parameters()}
    _assert_same(loss.detach(), grads, ref_loss, ref_grads)
    (rec,) = liger_fx.get_records()
    assert rec.lazy_logits == 1 and counters["liger_fx"]["lazy_logits"] == 1, rec.summary()
    assert "1 logits output(s) lazy" in rec.summary()
    assert len(graphs) == 2  # forward and backward: neither holds anything of N x V
    for gm in graphs:
        assert _vocab_sized(gm, x.numel() // 2, 512) == [], _vocab_sized(gm, x.numel() // 2, 512)


def test_loss_outside_the_model_bf16_within_torch_error():
    """bf16 model against its fp32 copy (the reference) and eager bf16: loss by the elementwise rule, every
    gradient per tensor (tolerance.assert_max_error_rule: whole-model gradients round in every op on both sides)."""
    model, (x,), y = reference.build("tiny", n_layers=1, norm="manual", batch_size=2, seq=16)
    _, ref_loss, ref_grads = _step(model, model, x, y)  # fp32
    model16 = copy.deepcopy(model).to(torch.bfloat16)
    _, same_loss, same_grads = _step(model16, model16, x, y)
    compiled = copy.deepcopy(model16)
    pred, loss, grads = _step(torch.compile(compiled, backend="liger"), compiled, x, y)
    assert type(pred) is LazyLogits and is_lazy(pred) and pred.dtype == torch.bfloat16
    assert_close_rule(loss, ref_loss, same_loss, atol=1e-3, name="loss")
    for name, g in ref_grads.items():
        assert grads[name].dtype == torch.bfloat16
        assert_max_error_rule(grads[name], g, same_grads[name], name=name)


def test_sequence_lengths_share_one_graph_after_the_first():
    model, _, _ = reference.build("tiny", n_layers=1, norm="manual")
    fn = torch.compile(copy.deepcopy(model), backend="liger")
    for t in (9, 16, 23, 30):
        x, y = reference.batch(512, 2, t, seed=t)
        pred = fn(x)
        assert is_lazy(pred) and pred.shape == (2, t, 512)
        torch.testing.assert_close(reference.loss_fn(pred, y), reference.loss_fn(model(x), y), atol=ATOL, rtol=RTOL)
    records = liger_fx.get_records()
    assert len(records) == 2 and all(r.lazy_logits == 1 for r in records), [r.summary() for r in records]


def test_logits_that_are_read_match_eager():
    """Accuracy, a z-loss and the loss from the same returned logits: materialized once, eager's values and
    gradients."""
    model, (x,), y = reference.build("tiny", n_layers=1, norm="manual")

    def loss_fn(pred, y):
        acc = (pred.argmax(-1) == y).float().mean()
        zloss = pred.float().logsumexp(-1).pow(2).mean()
        return reference.loss_fn(pred, y) + 1e-3 * zloss + 0 * acc

    compiled = copy.deepcopy(model)
    _, ref_loss, ref_grads = _step(model, model, x, y, loss_fn)
    pred, loss, grads = _step(torch.compile(compiled, backend="liger"), compiled, x, y, loss_fn)
    assert type(pred) is LazyLogits and not is_lazy(pred)
    _assert_same(loss, grads, ref_loss, ref_grads)
    torch.testing.assert_close(pred.materialize(), model(x), atol=ATOL, rtol=RTOL)


def test_option_off_and_inference_return_plain_logits():
    model, (x,), y = reference.build("tiny", n_layers=1, norm="manual")
    ref = model(x)
    off = torch.compile(copy.deepcopy(model), backend="liger", options={"lazy_logits": False})(x)
    assert type(off) is torch.Tensor
    torch.testing.assert_close(off, ref, atol=ATOL, rtol=RTOL)
    with torch.no_grad():  # inference reads its logits (sampling): no lazy tensor there
        out = torch.compile(copy.deepcopy(model), backend="liger")(x)
    assert type(out) is torch.Tensor
    torch.testing.assert_close(out, ref.detach(), atol=ATOL, rtol=RTOL)
    assert all(r.lazy_logits == 0 for r in liger_fx.get_records())


def test_a_compiled_loss_function_gets_the_fused_loss_too():
    """torchtitan compiles its loss function as well: the LazyLogits is opaque to Dynamo (one graph break per use,
    run eagerly), so the loss is still fused and equals eager."""
    model, (x,), y = reference.build("tiny", n_layers=1, norm="manual")
    compiled = copy.deepcopy(model)
    _, ref_loss, ref_grads = _step(model, model, x, y)
    loss_fn = torch.compile(reference.loss_fn, backend="liger")
    pred, loss, grads = _step(torch.compile(compiled, backend="liger"), compiled, x, y, loss_fn)
    assert is_lazy(pred)
    _assert_same(loss, grads, ref_loss, ref_grads)


def test_blocks_compiled_one_by_one_train_as_eager():
    """torchtitan's per-block compile: each block is its own graph (norms, RoPE, SwiGLU fused there); the lm_head
    runs eagerly, outside any graph, so its logits are plain."""
    model, (x,), y = reference.build("tiny", norm="manual")
    compiled = reference.compile_blocks(copy.deepcopy(model), backend="liger")
    _, ref_loss, ref_grads = _step(model, model, x, y)
    pred, loss, grads = _step(compiled, compiled, x, y)
    assert type(pred) is torch.Tensor
    _assert_same(loss, grads, ref_loss, ref_grads)
    records = liger_fx.get_records()
    assert len(records) >= 1 and all(r.counts().get("rope") == (2, 2) for r in records), [r.summary() for r in records]


def test_hf_model_returns_lazy_logits_beside_its_fused_loss(graphs):
    """HF's `model(ids, labels=ids)` in training: the in-graph loss becomes the fused op without logits, and the
    returned logits are lazy (made only if read): nothing of N x V in the compiled graphs. Loss, every gradient and
    the logits, read afterwards, equal eager."""
    model = mini_model("llama", num_hidden_layers=1, vocab_size=320)  # not 128: fused q/k/v is 64 + 32 + 32 wide
    ids, labels = hf_batch(model.config.vocab_size, ignore=3)
    fn = compare_training(model, ids, labels)
    out = fn(input_ids=ids, labels=labels)
    assert is_lazy(out.logits)
    torch.testing.assert_close(out.logits, model(input_ids=ids).logits, atol=ATOL, rtol=RTOL)
    rec = liger_fx.get_records()[-1]
    assert rec.lazy_logits == 1 and rec.logits_grad_outside == 0, rec.summary()
    ops = {str(n.target) for gm in graphs for n in gm.graph.nodes}
    assert "liger_fx.fused_linear_cross_entropy.default" in ops and not any("logits" in op for op in ops), ops
    for gm in graphs:
        assert _vocab_sized(gm, ids.numel() // 2, model.config.vocab_size) == []


def test_bytes_kept_from_forward_to_backward():
    """What a step holds between its forward and its loss's backward, on CPU: the outputs and the tensors the graph
    saved. Plain logits hold N x V (fp32 here: B*T*V*4 bytes) where the lazy ones hold h (N x H), which the graph
    had saved for the lm_head's backward anyway."""
    model, _, _ = reference.build("tiny", n_layers=1, norm="manual")
    x, y = reference.batch(512, 4, 64)
    N, V, H = x.numel(), 512, model.cfg.dim

    def kept(options):
        torch._dynamo.reset()
        saved = {}

        def pack(t):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        m = copy.deepcopy(model)
        params = {p.untyped_storage().data_ptr() for p in m.parameters()}
        fn = torch.compile(m, backend="liger", options=options)
        with mock.patch.object(liger_fx.backend, "compile_fx", _partition_only):
            fn(x)  # compile outside the hooks (they would see fake tensors)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                pred = fn(x)
        out = pred._h if isinstance(pred, LazyLogits) else pred
        saved[out.untyped_storage().data_ptr()] = out.untyped_storage().nbytes()
        assert all(r.fallback is None for r in liger_fx.get_records())
        return sum(n for ptr, n in saved.items() if ptr not in params)

    lazy, plain = kept(None), kept({"lazy_logits": False})
    # Plain: the (N, V) fp32 logits; the final norm's output is recomputed for the lm_head's backward (option
    # recompute). Lazy: that output h (N, H) is returned instead, and nothing else is kept for the lm_head.
    assert plain - lazy == N * V * 4 - N * H * 4, (plain, lazy)
