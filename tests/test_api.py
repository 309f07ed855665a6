"""liger_fx.apply: the training step hands SDPA is_causal=True (no materialized mask) exactly when that is right."""

import pytest
import torch

import liger_fx
import liger_fx.backend as backend
from liger_fx.models import mini_model
from tests.helpers import batch


@pytest.fixture
def sdpa_calls(monkeypatch):
    calls = []
    real = backend.rewrite_graph

    def spy(gm, example_inputs, config, record):
        out = real(gm, example_inputs, config, record)
        calls.extend(n for n in out.graph.nodes if n.target is torch.ops.aten.scaled_dot_product_attention.default)
        return out

    monkeypatch.setattr(backend, "rewrite_graph", spy)
    return calls


def _mask_and_causal(node):
    args = list(node.args) + [None, 0.0, False][len(node.args) - 3:]
    return args[3], args[5]


@pytest.mark.parametrize("mask", ["none", "all_ones"])
def test_unpadded_training_step_uses_causal_sdpa_and_matches_eager(sdpa_calls, mask):
    model = mini_model("llama")
    ids, labels = batch(model.config.vocab_size)
    kwargs = {} if mask == "none" else {"attention_mask": torch.ones_like(ids)}
    ref = model(input_ids=ids, labels=labels, **kwargs).loss
    liger_fx.apply(model)
    out = model(input_ids=ids, labels=labels, **kwargs).loss
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    assert sdpa_calls and all(_mask_and_causal(n) == (None, True) for n in sdpa_calls)


@pytest.mark.parametrize("case", ["padding", "sliding_window"])
def test_padding_or_sliding_window_keeps_the_mask(sdpa_calls, case):
    model = mini_model("mistral", sliding_window=8 if case == "sliding_window" else None)
    ids, labels = batch(model.config.vocab_size, t=16)
    mask = torch.ones_like(ids)
    if case == "padding":
        mask[0, :5] = 0
    ref = model(input_ids=ids, labels=labels, attention_mask=mask).loss
    liger_fx.apply(model)
    out = model(input_ids=ids, labels=labels, attention_mask=mask).loss
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert sdpa_calls and all(_mask_and_causal(n)[0] is not None for n in sdpa_calls)


def test_mode_and_flags_together():
    """torch.compile refuses mode= with options=; apply passes the mode inside the backend's options."""
    from torch._dynamo.utils import counters

    model = mini_model("llama")
    ids, labels = batch(model.config.vocab_size)
    ref = model(input_ids=ids, labels=labels).loss
    liger_fx.apply(model, mode="reduce-overhead", rope=False)
    out = model(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert counters["liger_fx"]["rope"] == 0 and counters["liger_fx"]["rms_norm"] == 5


def test_encoder_with_hooked_embedding_keeps_padding_aware_positions():
    """RoBERTa numbers positions from input_ids' padding; a hooked embedding (checkpointing, LoRA) must not make
    apply hand it inputs_embeds instead."""
    model = mini_model("roberta").train()
    model.get_input_embeddings().register_forward_hook(lambda m, i, o: o)
    ids, labels = batch(model.config.vocab_size)
    ids[0, -4:] = model.config.pad_token_id
    mask = (ids != model.config.pad_token_id).long()
    ref = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    liger_fx.apply(model)
    out = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
