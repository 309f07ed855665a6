"""The pipeline: entry point, options, mode, fallback, logging."""

import logging

import pytest
import torch
from torch._dynamo.utils import counters

import liger_fx
from liger_fx import backend
from liger_fx.models import mini_model
from tests.helpers import batch, compare_training


def test_backend_is_registered_by_entry_point_without_import():
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="torch_dynamo_backends") if e.name == "liger"]
    assert ep.value == "liger_fx.backend:liger_backend"
    assert "liger" in torch._dynamo.list_backends(exclude_tags=())


def test_bad_flag_raises_naming_it():
    model = mini_model("llama")
    ids, labels = batch(model.config.vocab_size)
    fn = torch.compile(model, backend="liger", options={"rms_nrom": False})
    with pytest.raises(Exception, match="rms_nrom"):
        fn(input_ids=ids, labels=labels)


def test_bad_mode_raises_naming_it():
    with pytest.raises(ValueError, match="'fastest'"):
        backend._mode_patches("fastest")
    assert backend._mode_patches("reduce-overhead") == {"triton.cudagraphs": True}


def test_failing_pass_falls_back_to_inductor_with_one_warning(monkeypatch, caplog):
    def broken(gm, config, record):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(backend, "PASSES", [*backend.passes(), ("broken", broken)])
    model = mini_model("llama")
    ids, labels = batch(model.config.vocab_size)
    with caplog.at_level(logging.WARNING, logger="liger_fx"):
        compare_training(model, ids, labels)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "liger_fx"]
    assert len(warnings) == 1 and "injected failure" in warnings[0].getMessage()
    (record,) = liger_fx.get_records()
    assert record.fallback and not record.replaced
    assert sum(counters["liger_fx"].values()) == 0  # a fallback counts nothing


def test_a_graph_whose_compile_raises_is_neither_recorded_nor_counted(monkeypatch, caplog):
    """A graph whose compile raises never runs: Dynamo restarts its trace (dynamic=True specializing a norm's eps)
    or, for a data-dependent op Inductor cannot trace (21 Mixtral graphs on torch 2.11 + transformers 5.17), runs
    the frame eagerly. Its replacements must not show in the record or the counters."""
    from torch._subclasses.fake_tensor import DataDependentOutputException

    calls = []

    def failing(gm, example_inputs, **kwargs):
        calls.append(gm)
        raise DataDependentOutputException(torch.ops.aten._local_scalar_dense.default)

    monkeypatch.setattr(backend, "compile_fx", failing)

    def fn(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))

    x, w = torch.randn(4, 16), torch.rand(16) + 0.5
    with caplog.at_level(logging.DEBUG, logger="liger_fx"):
        out = torch.compile(fn, backend="liger")(x, w)
    torch.testing.assert_close(out, fn(x, w))  # the frame ran eagerly
    assert any("rms_norm replaced" in r.getMessage() for r in caplog.records)  # the rewrite did happen
    assert any("discarded" in r.getMessage() for r in caplog.records)
    assert liger_fx.get_records() == [] and sum(counters["liger_fx"].values()) == 0
    # Not the rewrite's fault: no fallback warning and no second compile of the untouched graph per attempt.
    assert not any(r.levelno >= logging.WARNING for r in caplog.records if r.name == "liger_fx")
    assert calls and all(any(n.target is torch.ops.liger_fx.rms_norm.default for n in gm.graph.nodes) for gm in calls)


def test_info_log_has_one_summary_line_per_graph(caplog):
    model = mini_model("llama")
    ids, labels = batch(model.config.vocab_size)
    with caplog.at_level(logging.INFO, logger="liger_fx"):
        torch.compile(model, backend="liger")(input_ids=ids, labels=labels)
    lines = [r.getMessage() for r in caplog.records if r.name == "liger_fx" and r.levelno == logging.INFO]
    assert len(lines) == len(liger_fx.get_records()) >= 1
    assert "rms_norm 5/5" in lines[0]


def test_record_names_module_paths():
    model = mini_model("llama")
    ids, labels = batch(model.config.vocab_size)
    torch.compile(model, backend="liger")(input_ids=ids, labels=labels)
    wheres = {r.where for rec in liger_fx.get_records() for r in rec.replaced if r.flag == "rms_norm"}
    assert {"model.norm", "model.layers.0.input_layernorm", "model.layers.1.post_attention_layernorm"} <= wheres


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_encoders_fuse_their_masked_lm_loss_and_still_train(model_type):
    model = mini_model(model_type)
    ids, labels = batch(model.config.vocab_size)
    compare_training(model, ids, labels)
    # LayerNorm, absolute positions, a GELU MLP: no candidate for the norm, rotary and MLP families. The masked-LM
    # head + cross-entropy is fused (its logits are returned too: the lm_head + CE op), nothing is a near miss.
    records = liger_fx.get_records()
    assert records
    for rec in records:
        assert not rec.fallback and not rec.misses, (rec.replaced, rec.misses)
    assert [r.pattern for rec in records for r in rec.replaced] == [
        "fused_linear_cross_entropy/mean/bias/logits-returned"]
    # ... and its returned logits are lazy (option lazy_logits): the loss is the fused op without logits
    assert dict(counters["liger_fx"]) == {"fused_linear_cross_entropy": 1, "lazy_logits": 1}


def test_encoder_inference_has_no_applicable_patterns():
    """Without labels (an encoder's inference forward) nothing applies: one clean line, and the model compiles."""
    model = mini_model("bert").eval()
    ids, _ = batch(model.config.vocab_size)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        out = torch.compile(model, backend="liger")(input_ids=ids).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    (rec,) = liger_fx.get_records()
    assert rec.summary().endswith("no applicable patterns"), rec.summary()


def test_autocast_inside_the_graph_keeps_real_casts():
    """Inside an in-graph autocast region the traced dtypes ignore autocast, so a `.float()` of autocast logits looks
    like a no-op; dropping it changed the loss (4.125 vs 4.1126). Numerics must equal eager."""
    import torch.nn as nn

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(32, 50)

        def forward(self, h, t):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = self.head(h)
            return nn.functional.cross_entropy(logits.float(), t)

    torch.manual_seed(0)
    m, h, t = Head(), torch.randn(8, 32), torch.randint(0, 50, (8,))
    torch.testing.assert_close(torch.compile(m, backend="liger")(h, t), m(h, t), atol=1e-6, rtol=1e-6)


def test_mode_rides_in_options():
    """torch.compile(mode=..., options=...) is refused by torch; the mode may be given inside options instead."""
    model = mini_model("llama")
    ids, labels = batch(model.config.vocab_size)
    compare_training(model, ids, labels, options={"mode": "reduce-overhead", "rope": False})
    assert counters["liger_fx"]["rope"] == 0 and counters["liger_fx"]["rms_norm"] == 5
    with pytest.raises(Exception, match="'fastest'"):
        torch.compile(mini_model("llama"), backend="liger", options={"mode": "fastest"})(input_ids=ids, labels=labels)
