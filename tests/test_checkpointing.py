"""Activation checkpointing keeps every fusion (liger_fx/checkpointing.py): a checkpointed layer whose forward writes
outside Python state, as every HF attention does since transformers 5.25 (the hub-kernels wrapper), stays in the
graph inside `checkpoints_in_graph()`, is rewritten, trains as eager and keeps checkpointing's memory saving.

The first tests use a two-block model of our own whose blocks write a global as that wrapper does, so they show the
mechanism on every transformers release (5.17 has no such wrapper); the last ones use the HF mini Llama."""

import contextlib
import copy
import logging

import pytest
import torch
from torch._dynamo.utils import counters
from torch.utils.checkpoint import checkpoint
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import liger_fx
from liger_fx import checkpointing
from liger_fx.checkpointing import checkpoints_in_graph
from liger_fx.models import mini_model
from tests.helpers import batch

ATOL, RTOL = 1e-5, 1e-4  # fp32, as tests/helpers.compare_training


class _Active:
    """A module-level holder written inside each checkpointed block, as kernels' `_ACTIVE_KERNEL_FUNCS`."""

    block = None


ACTIVE = _Active()


class Block(torch.nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.norm = LlamaRMSNorm(hidden, eps=1e-6)
        self.proj = torch.nn.Linear(hidden, hidden, bias=False)

    def forward(self, x):
        previous, ACTIVE.block = ACTIVE.block, self  # set ... reset: the global ends as it began
        try:
            return x + self.proj(self.norm(x))
        finally:
            ACTIVE.block = previous


class Net(torch.nn.Module):
    def __init__(self, hidden: int = 32, blocks: int = 2):
        super().__init__()
        self.blocks = torch.nn.ModuleList(Block(hidden) for _ in range(blocks))
        self.head_norm = LlamaRMSNorm(hidden, eps=1e-6)

    def forward(self, x):
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False)
        return self.head_norm(x).square().mean()


def _step(fn, model, x):
    model.zero_grad(set_to_none=True)
    loss = fn(x)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_same_step(got, ref):
    torch.testing.assert_close(got[0], ref[0], atol=ATOL, rtol=RTOL)
    for name, g in ref[1].items():
        torch.testing.assert_close(got[1][name], g, atol=ATOL, rtol=RTOL, msg=lambda m: f"{name}: {m}")


def _compiled_step(scope):
    torch.manual_seed(0)
    model = Net()
    ref_model = copy.deepcopy(model)
    x = torch.randn(2, 8, 32, requires_grad=False)
    ref = _step(ref_model, ref_model, x)
    fn = torch.compile(model, backend="liger")
    with scope:
        got = _step(fn, model, x)
    _assert_same_step(got, ref)
    assert ACTIVE.block is None  # the set/reset pair left the global as it was
    return got


def test_a_checkpointed_block_that_writes_a_global_is_rewritten_inside_the_scope():
    _compiled_step(checkpoints_in_graph())
    assert counters["liger_fx"]["rms_norm"] == 3  # both blocks' norms and the head's, in one graph
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert len(liger_fx.get_records()) == 1


def test_without_the_scope_the_break_is_named_once(monkeypatch, caplog):
    """A plain torch.compile outside the scope: Dynamo breaks the graph at each block, which then runs eagerly
    under torch.utils.checkpoint (unfused, still correct), and the backend says how to fix it, once."""
    monkeypatch.setattr(checkpointing, "_warned", False)
    with caplog.at_level(logging.WARNING, logger="liger_fx"):
        _compiled_step(contextlib.nullcontext())
    # the loop makes Dynamo give up on Net.forward as a whole: counted as "unimplemented", not as a graph break
    assert any(r.startswith("HOP: Unsafe side effect") for r in counters["unimplemented"]), dict(counters)
    assert counters["liger_fx"]["rms_norm"] == 1  # the head's norm only
    warnings = [r.getMessage() for r in caplog.records if "checkpoints_in_graph" in r.getMessage()]
    assert len(warnings) == 1 and "_Active" in warnings[0], warnings


def test_the_scope_sets_dynamos_option_for_its_duration_only():
    option = checkpointing.OPTION
    assert getattr(torch._dynamo.config, option) is False
    with checkpoints_in_graph():
        assert getattr(torch._dynamo.config, option) is True
        with checkpoints_in_graph():  # nested: nothing to do
            assert getattr(torch._dynamo.config, option) is True
        assert getattr(torch._dynamo.config, option) is True
    assert getattr(torch._dynamo.config, option) is False


# ---------------------------------------------------------------------------------------------------------------
# The HF mini Llama through liger_fx.apply (what the Trainer hook calls): every site, and checkpointing's memory.


def _saved_float_bytes(model, ids, labels):
    """Bytes of floating-point activations one compiled forward saves for its backward (parameters excluded), and
    the step. Inductor's own partitioner, no code generation (tests/test_recompute.py)."""
    from unittest import mock

    from liger_fx import backend
    from tests.test_recompute import _partition_only

    seen = {}

    def pack(t):
        if t.is_floating_point():
            seen[(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))] = t.nbytes
        return t

    with mock.patch.object(backend, "compile_fx", _partition_only):
        model(input_ids=ids, labels=labels).loss.backward()  # compile outside the hooks (they would see fakes)
        model.zero_grad(set_to_none=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(input_ids=ids, labels=labels)
        out.loss.backward()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return sum(n for (ptr, *_), n in seen.items() if ptr not in params), (out.loss.detach(), grads)


@pytest.mark.slow
def test_checkpointed_llama_fuses_every_site_and_saves_one_hidden_state_per_layer():
    """Through liger_fx.apply, with HF gradient checkpointing: the same replacements as without, gradients equal to
    eager's, and per layer the forward saves exactly what transformers' checkpointing keeps, the layer's input
    (B*T*H fp32): the partitioner recomputes the rest from the region's tags. Measured as the growth from 2 to 4
    layers: 296,960 bytes a layer without checkpointing at B2 T64 H64, 32,768 with (a saved CPU generator state per
    region, 5,056 bytes of uint8, is kept by eager checkpointing as well and not counted here)."""
    ids, labels = batch(128, b=2, t=64)
    growth, counts = {}, {}
    for ckpt in (False, True):
        saved = {}
        for layers in (2, 4):
            model = mini_model("llama", num_hidden_layers=layers)
            ref = copy.deepcopy(model)
            if ckpt:
                model.gradient_checkpointing_enable()
                ref.gradient_checkpointing_enable()
            model.train()
            ref.train()
            torch._dynamo.reset()
            counters.clear()
            liger_fx.apply(model)
            saved[layers], step = _saved_float_bytes(model, ids, labels)
            ref_loss = ref(input_ids=ids, labels=labels).loss
            ref_loss.backward()
            _assert_same_step(step, (ref_loss.detach(), {n: p.grad for n, p in ref.named_parameters()}))
            counts[ckpt, layers] = {k: v for k, v in counters["liger_fx"].items()
                                    if k in ("rms_norm", "rope", "swiglu", "fused_linear_cross_entropy")}
            assert not counters["graph_break"], dict(counters["graph_break"])
        growth[ckpt] = (saved[4] - saved[2]) // 2
    for layers in (2, 4):
        assert counts[True, layers] == counts[False, layers] == {
            "rms_norm": 2 * layers + 1, "rope": 2 * layers, "swiglu": layers, "fused_linear_cross_entropy": 1}
    B, T = ids.shape
    assert growth[True] == B * T * 64 * 4, growth
    assert growth[False] > 8 * growth[True], growth
