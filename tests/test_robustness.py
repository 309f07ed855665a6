"""The whole pipeline where users push it: a rewrite that raises part-way through a graph,
changing sequence lengths, batch 1 and sequence length 1, generation, gradient checkpointing. Each on the tiny
Llama (hidden 64, 1 or 2 layers), against eager."""

import contextlib
import copy
import functools
import itertools
import logging

import pytest
import torch
from torch._dynamo.utils import counters

import liger_fx
from liger_fx import backend
from liger_fx.checkpointing import checkpoints_in_graph
from liger_fx.config import LigerConfig
from liger_fx.models import mini_model
from tests.helpers import batch, train_step

# fp32 bounds as in tests/helpers.compare_training: Inductor's reordered reductions move fp32 results by ~1e-7
# relative; a wrong eps, cast or mask moves them by 1e-3 or more.
ATOL, RTOL = 1e-5, 1e-4

# The tiny Llama's sites per compiled graph (2 layers): 5 norms, 4 rotations (q and k per layer), 2 MLPs, 1 loss.
# Tests that compile a graph no other test does use 1 layer (compiles faster: 3 norms, 2 rotations, 1 MLP); those
# whose graphs other tests compile too keep the default 2 layers, batch 2 x 16 (a hit in Inductor's cache in CI).
LLAMA = {"rms_norm": 5, "rope": 4, "swiglu": 2, "fused_linear_cross_entropy": 1}
NORMS_1_LAYER = 3


def _assert_steps_equal(got, ref, what=""):
    (loss, grads), (ref_loss, ref_grads) = got, ref
    if ref_loss.isnan():
        assert loss.isnan(), f"{what}: loss {loss.item()} where eager's is nan"
    else:
        torch.testing.assert_close(loss, ref_loss, atol=ATOL, rtol=RTOL, msg=lambda m: f"{what} loss: {m}")
    assert set(grads) == set(ref_grads), set(grads) ^ set(ref_grads)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=ATOL, rtol=RTOL,
                                   msg=lambda m: f"{what} {name}: {m}")


def _train(model, ids, labels, steps=3, lr=0.5):
    """A few SGD steps; returns the losses and the final parameters. lr 0.5 moves the tiny Llama's loss by ~0.5 a
    step (4.892, 4.420, 4.822), so each step really runs on the weights the previous one made."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    module = getattr(model, "_orig_mod", model)
    return torch.stack(losses), {n: p.detach().clone() for n, p in module.named_parameters()}


def _assert_trains_like_eager(model, compile_fn, ids, labels):
    ref_losses, ref_params = _train(copy.deepcopy(model), ids, labels)
    losses, params = _train(compile_fn(model), ids, labels)
    assert not torch.allclose(ref_losses[0], ref_losses[-1], atol=1e-3)  # the steps do train
    torch.testing.assert_close(losses, ref_losses, atol=ATOL, rtol=RTOL)
    for name, p in ref_params.items():
        torch.testing.assert_close(params[name], p, atol=ATOL, rtol=RTOL, msg=lambda m: f"{name}: {m}")


def _liger_counts():
    """The fused-op counters, not the option passes' (causal_sdpa, grouped_sdpa, fused_projections): whether a
    causal mask or a repeat of k/v reaches SDPA at all depends on the transformers release (5.17 materializes the mask
    under compile, newer ones do not); tests/test_causal_mask.py, test_grouped_sdpa.py and test_projections.py have
    them."""
    return {k: v for k, v in counters["liger_fx"].items() if v and k in LigerConfig.flag_names()}


# ---------------------------------------------------------------------------------------------------------------
# Fault injection: a rewrite that raises after it has already changed the graph.


def _injected(*args, **kwargs):
    raise RuntimeError("injected failure")


def _fault_between_families(monkeypatch):
    """A pass between the norm and the rotary families: the traced graph already holds 5 fused norms."""
    ps = backend.passes()
    i = [name for name, _ in ps].index("rms_norm") + 1
    monkeypatch.setattr(backend, "PASSES", [*ps[:i], ("broken", _injected), *ps[i:]])
    return "injected failure"


def _fault_in_third_replacement(monkeypatch):
    """The pattern machinery's third replacement raises (the first two norms are fused by then), from inside
    PatternMatcherPass.apply."""
    from torch._inductor.pattern_matcher import Match

    real, calls = Match.replace_by_example, itertools.count()

    def flaky(self, *args, **kwargs):
        if next(calls) == 2:
            _injected()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Match, "replace_by_example", flaky)
    return "injected failure"


def _fault_after_loss_replacement(monkeypatch):
    """The loss family's own matcher raises right after it replaced the lm_head + cross-entropy: the last family,
    with every other family's replacements made."""
    import liger_fx.patterns.linear_cross_entropy as lce

    real = lce.record_replacement

    def flaky(*args):
        real(*args)
        _injected()

    monkeypatch.setattr(lce, "record_replacement", flaky)
    return "injected failure"


def _fault_corrupts_graph(monkeypatch):
    """A pass that raises nothing but leaves the graph malformed (a value used before it is defined), as a buggy
    rewrite could: the graph's lint must catch it before Inductor sees it."""

    def corrupt(gm, config, record):
        norm = next(n for n in gm.graph.nodes if n.target is torch.ops.liger_fx.rms_norm.default)
        with gm.graph.inserting_before(norm):
            gm.graph.call_function(torch.ops.aten.neg.default, (norm,))

    monkeypatch.setattr(backend, "PASSES", [*backend.passes(), ("corrupt", corrupt)])
    return "used before it has been defined"


@functools.cache
def _op_without_fake():
    """An op whose fake (meta) implementation raises, as a fused op's would on a case its guards let through."""

    @torch.library.custom_op("liger_fx_test::fake_raises", mutates_args=())
    def op(x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @op.register_fake
    def _(x):
        raise RuntimeError("injected fake failure")

    return torch.ops.liger_fx_test.fake_raises.default


def _fault_in_compiling_the_rewrite(monkeypatch):
    """Every rewrite succeeds, then AOTAutograd's trace of the rewritten graph raises (in an op's fake): the model
    must still compile, with plain Inductor."""
    op = _op_without_fake()

    def wrap_norm(gm, config, record):
        norm = next(n for n in gm.graph.nodes if n.target is torch.ops.liger_fx.rms_norm.default)
        with gm.graph.inserting_after(norm):
            wrapped = gm.graph.call_function(op, (norm,))
        norm.replace_all_uses_with(wrapped, delete_user_cb=lambda user: user is not wrapped)

    monkeypatch.setattr(backend, "PASSES", [*backend.passes(), ("wrap_norm", wrap_norm)])
    return "injected fake failure"


@pytest.mark.slow
@pytest.mark.parametrize("inject", [_fault_between_families, _fault_in_third_replacement,
                                    _fault_after_loss_replacement, _fault_corrupts_graph,
                                    _fault_in_compiling_the_rewrite],
                         ids=lambda f: f.__name__[len("_fault_"):])
def test_fault_mid_graph_falls_back_with_one_warning_and_trains_like_eager(inject, monkeypatch, caplog):
    message = inject(monkeypatch)
    model = mini_model("llama")
    ids, labels = batch(model.config.vocab_size)
    with caplog.at_level(logging.WARNING, logger="liger_fx"):
        _assert_trains_like_eager(model, lambda m: torch.compile(m, backend="liger"), ids, labels)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name == "liger_fx"]
    assert len(warnings) == 1 and message in warnings[0] and "plain Inductor" in warnings[0], warnings
    (record,) = liger_fx.get_records()  # one graph, compiled once for all three steps
    assert record.fallback and not record.replaced and not record.misses and not record.causal_sdpa
    assert _liger_counts() == {}  # the replacements made before the fault are not counted: they were discarded


# ---------------------------------------------------------------------------------------------------------------
# Sequence lengths: Dynamo's automatic dynamic shapes recompile once with a symbolic length, then reuse it.

_COMPILERS = {
    "torch_compile": lambda m: torch.compile(m, backend="liger"),
    "apply": liger_fx.apply,
}


@pytest.mark.slow
@pytest.mark.parametrize("via", sorted(_COMPILERS))
def test_five_sequence_lengths_compile_at_most_twice_and_match_eager(via):
    model = mini_model("llama")
    ref = copy.deepcopy(model)
    fn = _COMPILERS[via](model)
    per_compile = None
    for i, t in enumerate((16, 24, 40, 11, 29)):  # the first three as tests/patterns/test_rms_norm.py's
        ids, labels = batch(model.config.vocab_size, t=t, seed=i)
        _assert_steps_equal(train_step(fn, ids, labels), train_step(ref, ids, labels), f"T={t}")
        per_compile = per_compile or (len(liger_fx.get_records()), counters["stats"]["unique_graphs"])
    records = liger_fx.get_records()
    assert per_compile[0] >= 1 and len(records) <= 2 * per_compile[0], [r.summary() for r in records]
    assert counters["stats"]["unique_graphs"] <= 2 * per_compile[1], dict(counters["stats"])
    # the symbolic-length graph is rewritten as fully as the first one
    assert all(not r.fallback and r.counts() == records[0].counts() for r in records), [r.summary() for r in records]
    assert {k: v for k, v in records[0].counts().items()} == {k: (n, n) for k, n in LLAMA.items()}


# ---------------------------------------------------------------------------------------------------------------
# Edge shapes: one row, one token.


@pytest.mark.slow
@pytest.mark.parametrize("b,t", [(1, 16), (2, 1)], ids=["batch1", "seqlen1"])
def test_edge_shapes_train_and_infer_like_eager(b, t):
    """Training and inference at batch 1 and at sequence length 1. With one token and `labels`, the shifted targets
    are all ignored and eager's loss is nan (0/0) with zero gradients; `shift_labels` (already aligned targets, as
    context-parallel training passes them) gives the same one-token step a real loss. Both must equal eager."""
    model = mini_model("llama", num_hidden_layers=1)
    ref = copy.deepcopy(model)
    fn = torch.compile(model, backend="liger")
    ids, labels = batch(model.config.vocab_size, b=b, t=t)
    _assert_steps_equal(train_step(fn, ids, labels), train_step(ref, ids, labels), "labels")
    if t == 1:
        _assert_steps_equal(train_step(fn, ids, labels, shift_labels=labels),
                            train_step(ref, ids, labels, shift_labels=labels), "shift_labels")
    fn.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(fn(input_ids=ids).logits, ref(input_ids=ids).logits, atol=ATOL, rtol=RTOL)
    records = liger_fx.get_records()
    assert records and not any(r.fallback for r in records), [r.summary() for r in records]
    assert counters["liger_fx"]["rms_norm"] == NORMS_1_LAYER * len(records)  # every graph, training and inference, fused


# ---------------------------------------------------------------------------------------------------------------
# Generation: greedy decoding through the compiled forward (prefill, then one-token steps against a growing cache).


def _generate(model, prompt, new_tokens=4):
    out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         return_dict_in_generate=True, output_logits=True, pad_token_id=0)
    return out.sequences, torch.stack(out.logits, 1)


@pytest.mark.slow
@pytest.mark.parametrize("via", ["forward", "apply"])
def test_greedy_generation_matches_eager_tokens(via):
    model = mini_model("llama", num_hidden_layers=1).eval()
    prompt, _ = batch(model.config.vocab_size, b=2, t=8)
    ref_tokens, ref_logits = _generate(model, prompt)
    # Greedy tokens are a fair comparison only where the choice is not a near tie that fp32 reordering could flip:
    # the chosen logit leads the next by far more than ATOL here.
    top2 = ref_logits.topk(2, dim=-1).values
    assert (top2[..., 0] - top2[..., 1]).min() > 100 * ATOL
    if via == "forward":
        model.forward = torch.compile(model.forward, backend="liger")
    else:
        liger_fx.apply(model)
    tokens, logits = _generate(model, prompt)
    assert torch.equal(tokens, ref_tokens), (tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=RTOL)
    records = liger_fx.get_records()
    assert records and not any(r.fallback for r in records), [r.summary() for r in records]
    assert all(r.counts().get("rms_norm") == (NORMS_1_LAYER,) * 2 for r in records), [r.summary() for r in records]


# ---------------------------------------------------------------------------------------------------------------
# Gradient checkpointing: the checkpointed layers are inlined and rewritten like plain ones.


@pytest.mark.slow
@pytest.mark.parametrize("via", sorted(_COMPILERS))
def test_gradient_checkpointing_same_counters_and_training_as_without(via):
    """Same replacements with checkpointing on as off, and training equal to eager. Through `torch.compile(model)`
    transformers' `use_cache=True is incompatible with gradient checkpointing` warning_once is a graph break
    (Dynamo does not trace logging.Logger methods): the model is cut before its lm_head into 2 graphs, and the
    counters still agree. `liger_fx.apply` defaults use_cache=False in training and keeps one graph.
    With transformers 5.25 each checkpointed layer writes a global (the hub-kernels wrapper around attention), which
    Dynamo refuses inside a checkpoint: `liger_fx.apply` enters `checkpoints_in_graph()` by itself, a plain
    `torch.compile` caller around the step (without it: 1 of 5 norms fused, 6 graph breaks)."""
    model = mini_model("llama")
    ids, labels = batch(model.config.vocab_size)
    seen, breaks = {}, {}
    for ckpt in (False, True):
        m = copy.deepcopy(model)
        if ckpt:
            m.gradient_checkpointing_enable()
            assert all(layer.gradient_checkpointing for layer in m.model.layers)
        torch._dynamo.reset()
        counters.clear()
        liger_fx.clear_records()
        scope = checkpoints_in_graph() if via == "torch_compile" else contextlib.nullcontext()
        with scope:
            _assert_trains_like_eager(m, _COMPILERS[via], ids, labels)
        seen[ckpt] = (_liger_counts(), len(liger_fx.get_records()))
        breaks[ckpt] = list(counters["graph_break"])
        assert not any(r.fallback or r.misses for r in liger_fx.get_records())
    assert seen[True][0] == seen[False][0] == LLAMA, seen
    assert not breaks[False]
    if via == "apply":
        assert seen[True] == seen[False] and not breaks[True], (seen, breaks)
    else:
        assert all("warning_once" in b for b in breaks[True]), breaks[True]
