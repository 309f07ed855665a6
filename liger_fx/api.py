"""`liger_fx.apply(model, **flags)`: compile a model in place with `backend="liger"`, for training loops without a
Trainer. The HF Trainer hook (`liger_fx.integrations.transformers`) calls the same function.

    model = AutoModelForCausalLM.from_pretrained(...)
    liger_fx.apply(model, rope=True)            # Liger's flag names; an unknown one raises, naming it
    loss = model(input_ids=ids, labels=labels).loss      # training with labels: loss only, outputs.logits is None
    model.eval(); logits = model(input_ids=ids).logits   # inference and generation keep their logits

What it does, and why:
- The model's `forward` (the base model's, under a PEFT wrapper) is replaced on the instance by a compiled one. Not
  `nn.Module.compile()`: PEFT's tuner reaches the base model through `.forward` in some versions, which would skip
  a compiled `__call__`. The object, its class, its parameter names and `save_pretrained` stay as they were (no
  `_orig_mod.` prefixes as with `torch.compile(model)`).
- Liger's `skip_logits` semantics: in training mode with `labels` (or `shift_labels`) the output carries no logits,
  so the compiled graph returns only the loss and the lm_head + cross-entropy rewrite never materializes the B*T*V
  logits (Llama-3 vocabulary, B8 T2048: 4.2 GB in fp32 for the logits alone). `skip_logits=True` asks for the same in
  evaluation (the Trainer passes it for loss-only evaluation); `skip_logits=False` keeps them in training.
- In that same training step `use_cache` defaults to False where the model takes it: a KV cache is never read in a
  training step, and with gradient checkpointing on, transformers' "use_cache=True is incompatible" `warning_once`
  is a graph break that cut the model from its lm_head (2 graphs instead of 1, seen on transformers 5.24).
  Not when the caller gives position ids: transformers looks for packed sequences in them (documents restarting at
  0, which get a block-diagonal mask) only when there is no cache, so there the default would change the math
  (the 2-layer mini Llama, packed: loss 4.8902 with the cache off, eager's 4.8871 with the config's use_cache=True).
- A hooked input embedding runs eagerly, just before the compiled forward, which then gets `inputs_embeds`:
  gradient checkpointing makes transformers (and PEFT) hook the embedding with `output.requires_grad_(True)`, which
  Dynamo cannot trace when the embedding is frozen (LoRA): 7 graph breaks and frames skipped to eager on a tiny
  LoRA Llama. NEFTune's noise hook keeps its eager semantics the same way. Same math, one lookup outside the graph.
- Everything else (`num_items_in_batch`, attention masks, position ids) passes through to the model untouched;
  `num_items_in_batch` reaches the loss, which the fused op divides by.
- Inside DistributedDataParallel's forward (the model applied to, then wrapped, or `apply(DDP(model))`), every call
  runs inside `distributed.split_after_rewrite()`: the backend gets the whole graph and cuts it at DDP's buckets
  after the rewrite, so no bucket boundary falls inside a fused site and each bucket's all-reduce still overlaps the
  backward. Dynamo's own split, before the rewrite, cut every SwiGLU of Llama-3.2-1B (liger_fx/distributed.py).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
import logging
import types
from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import distributed
from .config import LigerConfig
from .models import is_encoder

log = logging.getLogger("liger_fx")


@dataclass
class _Applied:
    flags: dict[str, bool]
    compile_kwargs: dict[str, Any]
    compiled: Callable
    original_forward: Callable | None
    """The instance-level `forward` that was there before (e.g. accelerate's device hooks), or None for the class's."""


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model under a DDP wrapper and a PEFT wrapper (`PeftModel.get_base_model()`), else the model itself.

    Compiling the base model keeps the LoRA layers inside one graph with everything else, so every rewrite still
    matches (LoRA adds `B(A(x)) * s` next to the frozen linear and touches no norm, rotation or loss); the PEFT
    wrapper's own forward only dispatches on its config and stays eager. DDP's forward calls the wrapped module's,
    so applying to `DDP(model)` is applying to `model`: its forward runs inside DDP's, where the buckets are cut after
    the rewrite (distributed.split_after_rewrite)."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        model = model.module
    if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
        return model.get_base_model()
    return model


def apply(model: torch.nn.Module, *, mode: str | None = None, dynamic: bool | None = None, **flags) -> torch.nn.Module:
    """Compile `model` in place with `backend="liger"` and Liger's flags; returns the model.

    `flags` are LigerConfig's (Liger's names: rms_norm, rope, swiglu, geglu, cross_entropy,
    fused_linear_cross_entropy); a bad key or non-bool value raises ValueError here, before any compilation.
    `mode` and `dynamic` go to `torch.compile`. Calling it again with the same arguments does nothing; with other
    arguments it recompiles. `remove(model)` undoes it.
    """
    LigerConfig.from_options(flags)  # raises, naming the key
    target = base_model(model)
    compile_kwargs = {"mode": mode, "dynamic": dynamic}
    state: _Applied | None = target.__dict__.get("_liger_fx")
    if state is not None:
        if state.flags == flags and state.compile_kwargs == compile_kwargs:
            return model
        remove(target)
    original = target.__dict__.get("forward")
    # torch.compile refuses mode= with options=; the backend reads a "mode" entry of its options instead.
    options = {**flags, **({"mode": mode} if mode not in (None, "default") else {})}
    compiled = torch.compile(_run, backend="liger", options=options or None, dynamic=dynamic)
    target._liger_fx = _Applied(dict(flags), compile_kwargs, compiled, original)
    target.forward = types.MethodType(_make_forward(target), target)
    log.info("liger_fx: %s.forward compiled with backend='liger'%s", type(target).__name__,
             f", flags {flags}" if flags else "")
    return model


def remove(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `apply`: the model's forward is its own again."""
    target = base_model(model)
    state: _Applied | None = target.__dict__.pop("_liger_fx", None)
    if state is not None:
        del target.forward
        if state.original_forward is not None:
            target.forward = state.original_forward
    return model


def is_applied(model: torch.nn.Module) -> bool:
    return "_liger_fx" in base_model(model).__dict__


# ----------------------------------------------------------------------------------------------------------------


def _make_forward(target: torch.nn.Module) -> Callable:
    """The forward put on the instance: plain Python that decides `skip` and calls the compiled `_run`.

    Wrapping the class's forward keeps `inspect.signature(model.forward)` the model's own: the Trainer reads it to
    decide which dataset columns to keep. Bound with MethodType and named `forward`, so a `copy.deepcopy` of the model
    rebuilds it as the copy's plain class forward instead of calling back into the original model."""
    cls_forward = type(target).forward
    params = list(inspect.signature(cls_forward).parameters)
    labels_at = params.index("labels") - 1 if "labels" in params else None  # -1: self is bound
    positions_at = params.index("position_ids") - 1 if "position_ids" in params else None
    takes_use_cache = "use_cache" in params
    takes_embeds = "inputs_embeds" in params
    config = getattr(target, "config", None)
    encoder = config is not None and is_encoder(config)

    @functools.wraps(cls_forward)
    def forward(self, *args, skip_logits: bool | None = None, **kwargs):
        labels = kwargs.get("labels")
        if labels is None and labels_at is not None and len(args) > labels_at:
            labels = args[labels_at]
        has_labels = labels is not None or kwargs.get("shift_labels") is not None
        skip = self.training and has_labels if skip_logits is None else bool(skip_logits)
        if skip and not has_labels:
            raise ValueError("liger_fx: skip_logits=True needs labels (or shift_labels): without them the model "
                             "computes no loss and would return nothing")
        positions_given = kwargs.get("position_ids") is not None or (
            positions_at is not None and len(args) > positions_at and args[positions_at] is not None)
        if skip and self.training and takes_use_cache and "use_cache" not in kwargs and not positions_given:
            kwargs["use_cache"] = False
        # Not for encoders: RoBERTa-style models derive position ids from input_ids' padding, and from
        # inputs_embeds they would number padded positions as real ones.
        if takes_embeds and not encoder and kwargs.get("input_ids") is not None and kwargs.get("inputs_embeds") is None:
            emb = self.get_input_embeddings() if hasattr(self, "get_input_embeddings") else None
            if emb is not None and (emb._forward_hooks or emb._forward_pre_hooks):
                kwargs["inputs_embeds"] = emb(kwargs.pop("input_ids"))
        with contextlib.ExitStack() as scope:
            if distributed.in_ddp_forward():  # DDP's buckets are cut after our rewrite, not through a fused site
                scope.enter_context(distributed.split_after_rewrite())
            if skip and len(args) <= 1:  # a training step: let SDPA take its causal fast path when it may
                mask = kwargs.get("attention_mask")
                if isinstance(mask, torch.Tensor) and mask.dim() == 2 and bool(mask.all()):
                    kwargs["attention_mask"] = None  # no padding: the same as no mask (one host sync a step)
                if kwargs.get("attention_mask") is None and kwargs.get("position_ids") is None:
                    scope.enter_context(_plain_causal_attention())
            return self._liger_fx.compiled(self, skip, *args, **kwargs)

    forward.__name__ = "forward"
    return forward


@contextlib.contextmanager
def _plain_causal_attention():
    """For a training step with no attention mask and no position ids: tell transformers' mask builder what is true
    here, so SDPA gets `is_causal=True` and no materialized B x 1 x T x T mask.

    Under torch.compile transformers cannot see it by itself: with no cache it looks for packed sequences in the
    position ids (`find_packed_sequence_indices`), which it can only rule out by reading data, so it returns a
    tensor and builds a full mask; and 5.17's `_ignore_causal_mask_sdpa` refuses the causal skip whenever it is
    traced. Here the position ids are transformers' own arange (the caller gave none), so nothing is packed, and with
    no padding mask and equal query/key lengths the causal skip is exactly what eager transformers does. Measured on
    the H200 (Llama-3.2-1B shape, B8 T2048, cuDNN flash kernels): attention took 64.9 ms of a 262 ms compiled step
    with the mask against 24.6 ms in eager liger-kernel without it. Both functions are swapped for this call only, on
    every such call, so Dynamo's guards on them see the same objects each time; nothing changes outside the call.
    """
    mu = sys.modules.get("transformers.masking_utils")
    swaps = []
    if mu is not None and hasattr(mu, "find_packed_sequence_indices"):
        swaps.append(("find_packed_sequence_indices", _no_packing))
    ignore = getattr(mu, "_ignore_causal_mask_sdpa", None) if mu is not None else None
    if ignore is not None and list(inspect.signature(ignore).parameters)[:5] == _MASK_SKIP_PARAMS:
        swaps.append(("_ignore_causal_mask_sdpa", _skip_for(ignore)))
    originals = [(name, getattr(mu, name)) for name, _ in swaps]
    for name, fn in swaps:
        setattr(mu, name, fn)
    try:
        yield
    finally:
        for name, fn in originals:
            setattr(mu, name, fn)


def _no_packing(position_ids):
    return None


_MASK_SKIP_PARAMS = ["padding_mask", "q_length", "kv_length", "q_offset", "kv_offset"]


@functools.cache
def _skip_for(original):
    def _ignore_causal_mask_sdpa(padding_mask, q_length, kv_length, q_offset, kv_offset, local_attention_size=None):
        if padding_mask is None and q_length == kv_length and (
            local_attention_size is None or kv_length < local_attention_size
        ):
            return True
        return original(padding_mask, q_length, kv_length, q_offset, kv_offset, local_attention_size)

    return _ignore_causal_mask_sdpa


def _run(module: torch.nn.Module, skip: bool, *args, **kwargs):
    """What Dynamo traces: the model's own forward, then (when `skip`) the same output without its logits, so the
    logits are no graph output and only the loss consumes the lm_head."""
    original = module._liger_fx.original_forward
    out = original(*args, **kwargs) if original is not None else type(module).forward(module, *args, **kwargs)
    return _without_logits(out) if skip else out


def _without_logits(out):
    if isinstance(out, dict) and "logits" in out:  # a ModelOutput (setting `.logits = None` would keep the key)
        return type(out)(**{k: v for k, v in out.items() if k != "logits"})
    if isinstance(out, tuple) and len(out) > 1 and not isinstance(out, dict):
        return out[:1] + out[2:]  # (loss, logits, ...) as `ModelOutput.to_tuple()` orders it
    return out
