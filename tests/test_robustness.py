"""The whole pipeline where users push it (issue 16, section 3): a rewrite that raises part-way through a graph,
changing sequence lengths, batch 1 and sequence length 1, generation, gradient checkpointing. Each on the tiny
Llama (hidden 64, 2 layers), against eager."""

import copy
import itertools
import logging

import pytest
import torch
from torch._dynamo.utils import counters

import liger_fx
from liger_fx import backend
from liger_fx.models import mini_model
from tests.helpers import batch, train_step

# fp32 bounds as in tests/helpers.compare_training: Inductor's reordered reductions move fp32 results by ~1e-7
# relative; a wrong eps, cast or mask moves them by 1e-3 or more.
ATOL, RTOL = 1e-5, 1e-4

# The tiny Llama's sites per compiled graph (2 layers): 5 norms, 4 rotations (q and k per layer), 2 MLPs, 1 loss.
LLAMA = {"rms_norm": 5, "rope": 4, "swiglu": 2, "fused_linear_cross_entropy": 1}


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
    """A few SGD steps; returns the losses and the final parameters. lr 0.5 moves the tiny model's loss by ~0.1 a
    step, so each step really runs on the weights the previous one made."""
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
    return {k: v for k, v in counters["liger_fx"].items() if v}


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


@pytest.mark.slow
@pytest.mark.parametrize("inject", [_fault_between_families, _fault_in_third_replacement,
                                    _fault_after_loss_replacement, _fault_corrupts_graph],
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
