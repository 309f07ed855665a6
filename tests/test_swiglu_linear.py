"""Option `fuse_swiglu_linear`: a recomputed SwiGLU/GeGLU whose one user is a bias-free linear (the down projection)
runs with it as one op whose backward writes act(gate) * up from the SwiGLU gradient kernel, instead of a recompute
launch of its own (patterns/swiglu.recompute_in_linear, kernels/swiglu.py). Training must equal eager, nothing more
may be saved than with the separate recompute, and the option follows `recompute` and its size threshold."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

import liger_fx.rewrite
from liger_fx import rewrite
from liger_fx.models import mini_model
from tests.helpers import batch, compare_training, replaced
from tests.test_recompute import CODES, _saved_bytes_and_step


@pytest.mark.parametrize("family", ["llama", "phi3", "gemma"])  # split SwiGLU, packed gate_up, GeGLU
def test_fused_with_the_down_projection_and_trains_as_eager(family):
    model = mini_model(family)
    ids, labels = batch(model.config.vocab_size, b=2, t=16)
    compare_training(model, ids, labels)
    layers = model.config.num_hidden_layers
    [record] = rewrite.get_records()
    assert len(record.swiglu_linear) == layers and all(w.endswith("mlp.down_proj") for w in record.swiglu_linear)
    assert replaced("swiglu_linear") == layers
    assert "SwiGLU(s) recomputed inside the down projection's backward" in record.summary()


def test_saves_what_the_separate_recompute_saves():
    """gate, up and the weight, as the recompute launch did: h is neither saved nor kept alive; and the compiled
    graph calls the fused op, with no gated product of its own left."""
    model = mini_model("llama")
    ids, labels = batch(model.config.vocab_size, b=2, t=16)
    CODES.clear()
    fused, (loss, grads) = _saved_bytes_and_step(copy.deepcopy(model), ids, labels, None, storages=True)
    code = CODES[-1]
    assert "liger_fx.swiglu_linear.default" in code and "liger_fx.swiglu.default" not in code
    apart, (loss_a, grads_a) = _saved_bytes_and_step(copy.deepcopy(model), ids, labels, {"fuse_swiglu_linear": False},
                                                     storages=True)
    assert "liger_fx.swiglu.default" in CODES[-1] and "swiglu_linear" not in CODES[-1]
    assert fused == apart, (fused, apart)
    saved_all, _ = _saved_bytes_and_step(copy.deepcopy(model), ids, labels, {"recompute": False}, storages=True)
    cfg = model.config
    assert saved_all - fused >= cfg.num_hidden_layers * 2 * 16 * cfg.intermediate_size * 4  # h of every layer
    torch.testing.assert_close(loss, loss_a, atol=1e-6, rtol=1e-6)
    for name, g in grads_a.items():
        torch.testing.assert_close(grads[name], g, atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("options", [{"fuse_swiglu_linear": False}, {"recompute": False}])
def test_off_with_the_option_or_without_recompute(options):
    model = mini_model("llama")
    ids, labels = batch(model.config.vocab_size, b=2, t=16)
    compare_training(model, ids, labels, options=options)
    assert replaced("swiglu") == model.config.num_hidden_layers
    assert replaced("swiglu_linear") == 0 and not rewrite.get_records()[0].swiglu_linear


def test_not_below_the_recompute_threshold(monkeypatch):
    """A whole step under rewrite.RECOMPUTE_MIN_BYTES (0 in the tests, tests/conftest.py) recomputes nothing: h is
    saved and the linear stays."""
    monkeypatch.setattr(liger_fx.rewrite, "RECOMPUTE_MIN_BYTES", 1 << 40)
    model = mini_model("llama")
    ids, labels = batch(model.config.vocab_size, b=2, t=16)
    compare_training(model, ids, labels)
    assert replaced("swiglu") and not rewrite.get_records()[0].swiglu_linear


class _MLP(nn.Module):
    def __init__(self, h=32, i=80, down_bias=False, lora=False):
        super().__init__()
        self.gate, self.up = nn.Linear(h, i, bias=False), nn.Linear(h, i, bias=False)
        self.down = nn.Linear(i, h, bias=down_bias)
        self.lora = nn.Sequential(nn.Linear(i, 4, bias=False), nn.Linear(4, h, bias=False)) if lora else None

    def forward(self, x):
        h = F.silu(self.gate(x)) * self.up(x)
        out = self.down(h)
        return x + (out + self.lora(h) if self.lora is not None else out)


def _train(module, x):
    module.zero_grad(set_to_none=True)
    module(x).square().mean().backward()
    return {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind, options, fused", [
    ("plain", None, 1), ("frozen_down", None, 1), ("down_bias", None, 0),
    ("lora", None, 1),  # down and the adapter's narrow A read h: fuse_projections makes them one linear, h one user
    ("lora", {"fuse_projections": False}, 0),  # two readers of h: the linear stays
])
def test_plain_module(kind, options, fused):
    """A bias or a second reader of h keeps the linear apart; a frozen down weight gets no gradient and the rest
    trains as eager."""
    torch.manual_seed(0)
    mlp = _MLP(down_bias=kind == "down_bias", lora=kind == "lora")
    if kind == "frozen_down":
        mlp.down.weight.requires_grad_(False)
    x = torch.randn(2, 16, 32, requires_grad=True)
    ref = _train(mlp, x)
    got = _train(torch.compile(copy.deepcopy(mlp), backend="liger", options=options), x)
    assert replaced("swiglu") == 1 and replaced("swiglu_linear") == fused
    assert set(got) == set(ref)
    for name, g in ref.items():
        torch.testing.assert_close(got[name], g, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_dynamic_lengths_compile_once():
    """Symbolic sizes always recompute, so the fused op is there; three lengths, one compile, grads as eager."""
    torch.manual_seed(0)
    mlp = _MLP()
    fn = torch.compile(copy.deepcopy(mlp), backend="liger", dynamic=True)
    for t in (16, 24, 40):
        x = torch.randn(2, t, 32)
        ref = _train(mlp, x)
        got = _train(fn, x)
        for name, g in ref.items():
            torch.testing.assert_close(got[name], g, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    assert len(rewrite.get_records()) == 1 and replaced("swiglu_linear") == 1
    assert counters["stats"]["unique_graphs"] == 1
