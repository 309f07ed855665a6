"""Whole models whose attention mask is not the plain causal triangle: packed sequences,
sliding windows mixed with full layers, softcapped attention. The rewrites around attention must leave these masks
alone (option `causal_sdpa` fires only on a provably causal mask) and the step must equal eager."""

import copy

import pytest
import torch
from torch._dynamo.utils import counters

import liger_fx
from liger_fx.models import mini_model
from tests.helpers import batch, train_step

ATOL, RTOL = 1e-5, 1e-4  # fp32, as tests/helpers.compare_training

_COMPILERS = {
    "torch_compile": lambda m: torch.compile(m, backend="liger"),
    "apply": liger_fx.apply,
}


def _assert_steps_equal(got, ref):
    (loss, grads), (ref_loss, ref_grads) = got, ref
    torch.testing.assert_close(loss, ref_loss, atol=ATOL, rtol=RTOL)
    assert set(grads) == set(ref_grads), set(grads) ^ set(ref_grads)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=ATOL, rtol=RTOL, msg=lambda m: f"{name}: {m}")


def _max_grad_diff(a, b):
    return max((a[1][n] - b[1][n]).abs().max().item() for n in a[1])


def _assert_no_mask_made_causal():
    records = liger_fx.get_records()
    assert records and not any(r.fallback for r in records), [r.summary() for r in records]
    assert all(r.causal_sdpa == [] for r in records), [r.causal_sdpa for r in records]
    assert counters["liger_fx"]["causal_sdpa"] == 0


# ---------------------------------------------------------------------------------------------------------------
# Packed sequences: several documents per row, position ids restarting at each, no padding, no attention mask.

# Row 0: documents of 5, 3 and 8 tokens; row 1: 3, 6, 2 and 5.
PACKED_POSITIONS = [[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 7],
                    [0, 1, 2, 0, 1, 2, 3, 4, 5, 0, 1, 0, 1, 2, 3, 4]]


def _packed_batch(vocab):
    """As transformers' DataCollatorWithFlattening (TRL's padding-free packing) builds it: each document's first label
    is -100, so no document's last token is trained to predict the next document's first."""
    ids, labels = batch(vocab, b=2, t=16)
    pos = torch.tensor(PACKED_POSITIONS)
    labels[pos == 0] = -100
    return ids, labels, pos


@pytest.mark.slow
@pytest.mark.parametrize("via", sorted(_COMPILERS))
def test_packed_sequences_keep_their_mask_fuse_the_loss_and_match_eager(via):
    """model(input_ids, labels, position_ids) with restarting positions, as the Trainer runs it (config.use_cache
    False: transformers detects packing only without a cache) builds a block-diagonal causal mask from the position
    ids. It is data: `causal_sdpa` must not make it is_causal, and the fused loss must still replace the lm_head."""
    import transformers.masking_utils as mu

    model = mini_model("llama", num_hidden_layers=1)
    model.config.use_cache = False
    ids, labels, pos = _packed_batch(model.config.vocab_size)
    ref = train_step(model, ids, labels, position_ids=pos)
    with pytest.MonkeyPatch.context() as mp:  # the test can tell: documents seeing each other change the grads
        mp.setattr(mu, "find_packed_sequence_indices", lambda position_ids: None)
        assert _max_grad_diff(train_step(model, ids, labels, position_ids=pos), ref) > 1e-2
    fn = _COMPILERS[via](copy.deepcopy(model))
    _assert_steps_equal(train_step(fn, ids, labels, position_ids=pos), ref)
    _assert_no_mask_made_causal()
    assert counters["liger_fx"]["fused_linear_cross_entropy"] == len(liger_fx.get_records()) == 1


@pytest.mark.slow
def test_apply_keeps_the_mask_eager_builds_when_the_config_keeps_a_cache():
    """A plain training loop on a model whose config has use_cache=True (the default): eager builds a KV cache in
    the step, and with a cache transformers does not look for packed sequences, so eager's documents see each other.
    liger_fx.apply must compute what eager computes; turning the cache off for the step (its memory default) would
    switch on the block-diagonal mask and change the loss (4.8652 against eager's 4.8757 here)."""
    model = mini_model("llama", num_hidden_layers=1)
    assert model.config.use_cache
    ids, labels, pos = _packed_batch(model.config.vocab_size)
    ref = train_step(model, ids, labels, position_ids=pos)
    fn = liger_fx.apply(copy.deepcopy(model))
    _assert_steps_equal(train_step(fn, ids, labels, position_ids=pos), ref)
    # With a cache eager's mask is the plain causal triangle: transformers 5.17 materializes it and causal_sdpa
    # may rewrite it (equal losses above); a block-diagonal mask is what must not appear, and it did not.
    records = liger_fx.get_records()
    assert records and not any(r.fallback for r in records), [r.summary() for r in records]
    assert counters["liger_fx"]["fused_linear_cross_entropy"] == 1


# ---------------------------------------------------------------------------------------------------------------
# Sliding windows mixed with full layers, softcapped attention. Windows of 8 over 16 tokens, so they cut.

WINDOWED = {
    # every layer sliding, SDPA (one is enough)
    "mistral": dict(sliding_window=8, num_hidden_layers=1),
    # layer 0 full, layer 1 sliding (max_window_layers), SDPA: a causal mask and a window mask in one graph
    "qwen2": dict(use_sliding_window=True, sliding_window=8, max_window_layers=1),
    # sliding and full layers alternating, attention scores softcapped at 50 and logits at 30, eager attention
    "gemma2": dict(sliding_window=8),
}


def _sliding_layers(config) -> list[int]:
    types = getattr(config, "layer_types", None) or ["sliding_attention"] * config.num_hidden_layers
    return [i for i, t in enumerate(types) if t == "sliding_attention"]


@pytest.mark.slow
@pytest.mark.parametrize("via,model_type", [("torch_compile", t) for t in WINDOWED] + [("apply", "qwen2")])
def test_sliding_window_and_softcapped_layers_train_like_eager(via, model_type):
    model = mini_model(model_type, **WINDOWED[model_type])
    sliding = _sliding_layers(model.config)
    assert sliding and (model_type == "mistral" or len(sliding) < model.config.num_hidden_layers)
    ids, labels = batch(model.config.vocab_size, t=16)
    ref = train_step(model, ids, labels)
    # the window cuts at this length: the same weights with a window past the sequence give other grads
    unwindowed = mini_model(model_type, **{**WINDOWED[model_type], "sliding_window": 64})
    assert _max_grad_diff(train_step(unwindowed, ids, labels), ref) > 1e-2
    fn = _COMPILERS[via](copy.deepcopy(model))
    _assert_steps_equal(train_step(fn, ids, labels), ref)
    records = liger_fx.get_records()
    assert records and not any(r.fallback for r in records), [r.summary() for r in records]
    # a full layer's mask may become is_causal; a sliding layer's never
    made_causal = [w for r in records for w in r.causal_sdpa]
    assert not [w for w in made_causal for i in sliding if f"layers.{i}." in w + "."], made_causal
    assert counters["liger_fx"]["causal_sdpa"] == len(made_causal)
    assert counters["liger_fx"]["rms_norm"] and counters["liger_fx"]["fused_linear_cross_entropy"] == 1
