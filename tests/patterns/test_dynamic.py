"""`torch.compile(..., dynamic=True)`. Dynamo turns float attributes into graph inputs there (every norm's
eps; Gemma2's final_logit_softcapping), read as a SymFloat; every family must still match as in a static compile,
with eager parity. Per-family details (a new eps recompiling, the softcap) are in test_rms_norm.py and
test_linear_cross_entropy.py."""

import logging

import pytest
import torch
from torch._dynamo.utils import counters

import liger_fx
from liger_fx.models import mini_model
from tests.helpers import batch, compare_training

# qwen3: Llama casting, q/k norms on a (B, T, H, D) view, RoPE, SwiGLU, lm_head + CE (9, 4, 2, 1 sites);
# gemma: Gemma casting (fp32, 1 + w), GeGLU (5, 4, 2, 1). Each family compiles in ~20 s on the 2-core CPU.
FAMILIES = {"qwen3": "llama", "gemma": "gemma"}


def _one_record():
    (record,) = liger_fx.get_records()  # Dynamo's restart (float inputs specialized) must leave no second record
    return record


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_dynamic_training_matches_eager_with_the_static_counts(model_type, caplog):
    model = mini_model(model_type)
    ids, labels = batch(model.config.vocab_size)
    compare_training(model, ids, labels)
    static, static_counters = _one_record().counts(), dict(counters["liger_fx"])
    assert static and all(r == c for r, c in static.values()), static  # every candidate fused, nothing missed

    torch._dynamo.reset()
    counters.clear()
    liger_fx.clear_records()
    with caplog.at_level(logging.WARNING, logger="liger_fx"):
        fn = compare_training(model, ids, labels, dynamic=True)
    warnings = [r.getMessage() for r in caplog.records if r.name == "liger_fx" and r.levelno >= logging.WARNING]
    assert not warnings, warnings  # Dynamo's restart is no failed compile to fall back from
    record = _one_record()
    assert record.counts() == static and not record.misses, record.summary()
    assert dict(counters["liger_fx"]) == static_counters
    forms = {r.pattern.split("/")[1] for r in record.replaced if r.flag == "rms_norm"}
    assert forms == {FAMILIES[model_type]}, forms

    # Another length runs the same symbolic graph, no recompile (with grad enabled: no_grad is a graph of its own),
    # and still equals eager.
    ids, labels = batch(model.config.vocab_size, t=23, seed=2)
    ref, out = model(input_ids=ids, labels=labels), fn(input_ids=ids, labels=labels)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-4)
    assert len(liger_fx.get_records()) == 1, [r.summary() for r in liger_fx.get_records()]
