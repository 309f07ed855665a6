"""Option `recompute`: the fused RMSNorm and SwiGLU outputs are recomputed in the backward instead of saved.

What is saved is decided by AOTAutograd's min-cut partitioner, the one Inductor uses; these tests run it with no code
generation (seconds on CPU) and count the bytes the compiled forward hands to autograd through save_for_backward,
which `saved_tensors_hooks` sees."""

import copy
import re
from unittest import mock

import torch
from torch._dynamo.utils import counters

from liger_fx import backend
from liger_fx.checkpointing import checkpoints_in_graph
from liger_fx.models import mini_model
from tests.helpers import batch, replaced, train_step


CODES: list[str] = []  # the code of every graph handed to compile_fx, in order


def _partition_only(gm, example_inputs, config_patches=None):
    """compile_fx's AOTAutograd with Inductor's partitioner, without Inductor's codegen."""
    CODES.append(gm.code)
    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.backends.debugging import boxed_nop
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    return aot_autograd(fw_compiler=boxed_nop, bw_compiler=boxed_nop,
                        partition_fn=min_cut_rematerialization_partition)(gm, example_inputs)


def _saved_bytes_and_step(model, ids, labels, options, storages=False, **call_kwargs):
    """(bytes saved for backward by one forward, (loss, grads)) of model compiled with the liger backend. With
    `storages`, the bytes of the storages the saved tensors hold alive (a saved view keeps all of its base), not of
    the tensors themselves."""
    torch._dynamo.reset()
    fn = torch.compile(model, backend="liger", options=options)
    seen: dict[tuple, int] = {}

    def pack(t):
        if storages:
            seen[(t.untyped_storage().data_ptr(),)] = t.untyped_storage().nbytes()
        else:
            seen[(t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))] = t.nbytes
        return t

    # checkpoints_in_graph: a checkpointed HF layer writes a global since transformers 5.25, which Dynamo refuses
    # inside a checkpoint without it (the layers would run eagerly, liger_fx/checkpointing.py)
    with mock.patch.object(backend, "compile_fx", _partition_only), checkpoints_in_graph():
        # compile outside the hooks (they would see fake tensors)
        fn(input_ids=ids, labels=labels, **call_kwargs).loss.backward()
        model.zero_grad(set_to_none=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn(input_ids=ids, labels=labels, **call_kwargs)
        out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    activations = sum(n for (ptr, *_), n in seen.items() if ptr not in params)
    return activations, (out.loss.detach(), grads)


def test_fused_outputs_are_not_saved_and_gradients_do_not_change():
    model = mini_model("llama")
    cfg = model.config
    ids, labels = batch(cfg.vocab_size, b=2, t=16)
    ref = train_step(copy.deepcopy(model), ids, labels)
    on, step_on = _saved_bytes_and_step(copy.deepcopy(model), ids, labels, None)
    assert replaced("rms_norm") and replaced("swiglu")
    off, step_off = _saved_bytes_and_step(copy.deepcopy(model), ids, labels, {"recompute": False})
    # Per layer: the two norm outputs (B*T*H) that the q/k/v and gate/up projections would save for their weight
    # gradient, and the SwiGLU output (B*T*I) the down projection would. Not the final norm's output: the fused loss
    # needs nothing of it in the backward, and the logits this call returns are lazy (option lazy_logits), so it
    # leaves the graph as their h instead of being saved for the lm_head's backward (with plain logits it was).
    B, T = ids.shape
    per_layer = (2 * cfg.hidden_size + cfg.intermediate_size) * B * T * 4
    assert off - on == cfg.num_hidden_layers * per_layer, (off, on)
    for loss, grads in (step_on, step_off):
        torch.testing.assert_close(loss, ref[0], atol=1e-5, rtol=1e-4)
        for name, g in ref[1].items():
            torch.testing.assert_close(grads[name], g, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_checkpointed_layers_keep_recomputing_the_fused_ops():
    """Inside an activation-checkpointed layer everything is recomputed, the fused ops included, whatever the
    option: the replacement nodes carry the region's recompute tags (the matcher replaces under the matched node's
    metadata), so `recompute=False` must not make a checkpointed layer save its norm and SwiGLU outputs."""
    model = mini_model("llama")
    ids, labels = batch(model.config.vocab_size, b=2, t=16)
    plain, _ = _saved_bytes_and_step(copy.deepcopy(model), ids, labels, {"recompute": True})
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    saved = {}
    for recompute in (True, False):
        counters.clear()
        saved[recompute], _ = _saved_bytes_and_step(copy.deepcopy(model), ids, labels, {"recompute": recompute})
        assert replaced("rms_norm") == 5 and replaced("swiglu") == 2  # the checkpointed layers' too
    assert saved[True] == saved[False] < plain, (saved, plain)


def test_recompute_tags_change_the_cache_key():
    """AOTAutograd's cache keys a graph by its code, not by node metadata; the recompute tags must show in the
    code, or a compile with the other setting (or the same layers without checkpointing) gets the cached partition.
    On the H200, `recompute=False` after `recompute=True` came back from the cache with the recomputing partition."""
    model = mini_model("llama")
    ids, labels = batch(model.config.vocab_size, b=2, t=16)
    codes = {}
    for name, options, ckpt in (("on", None, False), ("off", {"recompute": False}, False), ("ckpt", None, True)):
        m = copy.deepcopy(model)
        if ckpt:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            m.train()
        CODES.clear()
        _saved_bytes_and_step(m, ids, labels, options)
        codes[name] = list(CODES)
    assert len(codes["on"]) == len(codes["off"]) == 1
    assert len({codes["on"][0], codes["off"][0], codes["ckpt"][0]}) == 3


def test_ops_without_backward_are_not_recomputed():
    """Only layer 0's down_proj trains (embeddings and everything else frozen, as LoRA on down_proj alone). Layer 0's
    norms and SwiGLU have no backward; of them only the SwiGLU output is saved, for down_proj's weight gradient.
    Recomputing it would save gate and up instead: I*B*T*4 bytes more, as tagging every fused op did. Layer 1 and
    the final norm do have a backward, but their outputs feed frozen projections, which save nothing of them; so the
    option changes nothing here."""
    model = mini_model("llama")
    for name, p in model.named_parameters():
        p.requires_grad_(name == "model.layers.0.mlp.down_proj.weight")
    ids, labels = batch(model.config.vocab_size, b=2, t=16)
    on, (loss_on, grads_on) = _saved_bytes_and_step(copy.deepcopy(model), ids, labels, None)
    off, (loss_off, grads_off) = _saved_bytes_and_step(copy.deepcopy(model), ids, labels, {"recompute": False})
    assert on == off, (on, off)
    assert set(grads_on) == {"model.layers.0.mlp.down_proj.weight"}
    torch.testing.assert_close(grads_on["model.layers.0.mlp.down_proj.weight"],
                               grads_off["model.layers.0.mlp.down_proj.weight"], atol=1e-6, rtol=1e-5)


def _fused_recomputed(code: str) -> bool:
    """Whether a fused norm or SwiGLU output is tagged for recomputation in the graph's code (rewrite.mark_in_code;
    the fused projections' weight concatenation carries the tag too, whatever the threshold)."""
    return re.search(r"\b(rms_norm|swiglu)\w*_recompute\b", code) is not None


def test_small_static_graphs_recompute_nothing(monkeypatch):
    """Under rewrite.RECOMPUTE_MIN_BYTES of fused outputs a static-shape graph recomputes nothing (a small step pays
    each recomputed op as a launch on the host); at or over it, everything recomputable is recomputed; a graph with
    symbolic sizes always is (its run-time sizes are unknown). The mini Llama at B2 T16: the threshold is set just
    above and at the exact bytes of its fused outputs, as the saved bytes then show."""
    import liger_fx.rewrite

    model = mini_model("llama")
    cfg = model.config
    ids, labels = batch(cfg.vocab_size, b=2, t=16)
    n = 2 * 16
    outputs = (2 * cfg.num_hidden_layers + 1) * n * cfg.hidden_size * 4 + cfg.num_hidden_layers * n * \
        cfg.intermediate_size * 4  # fp32: every norm's output and every SwiGLU's
    off, _ = _saved_bytes_and_step(copy.deepcopy(model), ids, labels, {"recompute": False})
    monkeypatch.setattr(liger_fx.rewrite, "RECOMPUTE_MIN_BYTES", outputs + 1)
    small, _ = _saved_bytes_and_step(copy.deepcopy(model), ids, labels, None)
    assert small == off
    assert not _fused_recomputed(CODES[-1])
    monkeypatch.setattr(liger_fx.rewrite, "RECOMPUTE_MIN_BYTES", outputs)
    at, _ = _saved_bytes_and_step(copy.deepcopy(model), ids, labels, None)
    assert at < off and _fused_recomputed(CODES[-1])

    monkeypatch.setattr(liger_fx.rewrite, "RECOMPUTE_MIN_BYTES", 1 << 40)
    torch._dynamo.reset()
    CODES.clear()
    with mock.patch.object(backend, "compile_fx", _partition_only):
        torch.compile(copy.deepcopy(model), backend="liger", dynamic=True)(input_ids=ids, labels=labels).loss.backward()
    assert CODES and all(_fused_recomputed(code) for code in CODES if "rms_norm" in code)


def test_a_graph_short_of_the_whole_step_recomputes_under_the_threshold(monkeypatch):
    """The threshold only judges a graph that runs the model from its embedding to its loss: a graph per layer (FSDP2
    wraps each decoder layer; a graph break) holds a fraction of the step's fused outputs, 0.38 GiB a Llama-3.2-1B
    layer at B8 T2048, under the threshold in each of 16 graphs and 6 GiB in all. Here: the mini Llama's decoder
    layer alone, as FSDP2 hands it to the backend, recomputes even under a threshold far above its bytes."""
    import liger_fx.rewrite

    model = mini_model("llama")
    layer = model.model.layers[0]
    B, T, H = 2, 16, model.config.hidden_size
    x = torch.randn(B, T, H, requires_grad=True)
    pos = model.model.rotary_emb(x, torch.arange(T)[None].expand(B, T))
    monkeypatch.setattr(liger_fx.rewrite, "RECOMPUTE_MIN_BYTES", 1 << 40)
    torch._dynamo.reset()
    CODES.clear()
    with mock.patch.object(backend, "compile_fx", _partition_only):
        out = torch.compile(layer, backend="liger")(x, position_embeddings=pos)
        (out[0] if isinstance(out, tuple) else out).sum().backward()
    assert replaced("rms_norm") == 2 and replaced("swiglu") == 1
    assert CODES and _fused_recomputed(CODES[-1])
    # and the whole model under the same threshold recomputes nothing (the case the threshold is for)
    CODES.clear()
    torch._dynamo.reset()
    with mock.patch.object(backend, "compile_fx", _partition_only):
        ids, labels = batch(model.config.vocab_size, b=B, t=T)
        torch.compile(copy.deepcopy(model), backend="liger")(input_ids=ids, labels=labels).loss.backward()
    assert CODES and not _fused_recomputed(CODES[-1])
