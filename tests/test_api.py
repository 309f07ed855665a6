"""liger_fx.apply: the training step hands SDPA is_causal=True (no materialized mask) exactly when that is right, and
makes no logits, vision-language models included."""

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


# ---------------------------------------------------------------------------------------------------------------
# Vision-language models whose code breaks the graph before the lm_head


def _vlm(name: str):
    """A tiny LLaVA or Qwen2-VL (2 text layers, a 2-layer vision tower) and a batch with one image per sample, its
    placeholder tokens labelled -100 as processors do."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    text = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 100, (2, 16), generator=g)
    if name == "llava":
        cfg = AutoConfig.for_model(
            "llava", text_config=dict(model_type="llama", **text), image_token_index=120, vision_feature_layer=-1,
            vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14))
        ids[:, 1:5] = 120  # 4 patches of 14 in a 28 x 28 image
        inputs = dict(pixel_values=torch.randn(2, 3, 28, 28, generator=g))
    else:
        cfg = AutoConfig.for_model(
            "qwen2_vl", image_token_id=120, video_token_id=121, vision_start_token_id=122, vision_end_token_id=123,
            text_config=dict(model_type="qwen2_vl_text", **text,
                             rope_parameters=dict(rope_type="default", rope_theta=1e4, mrope_section=[2, 3, 3])),
            vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                               spatial_merge_size=2, temporal_patch_size=2))
        ids[:, 1], ids[:, 2], ids[:, 3] = 122, 120, 123  # 2 x 2 patches merged into one image token
        inputs = dict(pixel_values=torch.randn(8, 3 * 2 * 14 * 14, generator=g),
                      image_grid_thw=torch.tensor([[1, 2, 2]] * 2), mm_token_type_ids=(ids == 120).long())
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(cfg).float().train()
    return model, dict(input_ids=ids, labels=ids.masked_fill(ids >= 120, -100), **inputs)


def _all_grads(model) -> dict[str, torch.Tensor]:
    """Every parameter's gradient, zeros where none: a vision tower's unused post-norm gets None in eager and zeros
    through a compiled graph that returns its output, plain Inductor alike."""
    return {n: (p.grad if p.grad is not None else torch.zeros_like(p)).clone() for n, p in model.named_parameters()}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llava", "qwen2_vl"])
def test_vlm_training_step_makes_no_logits_where_the_graph_breaks_before_the_lm_head(name):
    """With images, LLaVA's and Qwen2-VL's code breaks the graph before the lm_head: the lm_head's graph returns the
    logits to the model's forward beside the loss, and apply drops them only after it. Lazy logits return them
    unmade (a LazyLogits of h and the head), so none are ever made: the loss is fused, the returned logits are lazy
    and never materialized, and loss and every gradient equal eager. Evaluation still gets real logits."""
    import copy

    from torch._dynamo.utils import counters

    model, inputs = _vlm(name)
    ref = copy.deepcopy(model)
    ref_out = ref(**inputs)
    ref_out.loss.backward()
    liger_fx.apply(model)
    out = model(**inputs)
    out.loss.backward()
    assert getattr(out, "logits", None) is None
    torch.testing.assert_close(out.loss, ref_out.loss, atol=1e-5, rtol=1e-4)
    ref_grads, grads = _all_grads(ref), _all_grads(model)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], atol=1e-5, rtol=1e-4, msg=lambda m: f"{k}: {m}")
    records = liger_fx.get_records()
    assert any(r.flag == "fused_linear_cross_entropy" for rec in records for r in rec.replaced)
    assert sum(rec.lazy_logits for rec in records) >= 1, records
    assert counters["liger_fx"]["lazy_logits_materialized"] == 0
    assert not [r.fallback for r in records if r.fallback]

    model.eval()
    ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, ref(**inputs).logits, atol=1e-5, rtol=1e-4)
