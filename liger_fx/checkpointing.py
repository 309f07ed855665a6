"""Activation checkpointing under Dynamo: the checkpointed layers stay in the graph, so they are rewritten too.

A non-reentrant `torch.utils.checkpoint` is traced by Dynamo into a `tag_activation_checkpoint` region, which the
rewrite inlines with recompute tags (canonicalize.inline_checkpoints): the patterns see the layer body and the
partitioner recomputes it in the backward, which is what checkpointing saves memory with.

Dynamo refuses a region whose forward writes Python state that lives outside it: eager checkpointing replays the
forward in the backward, side effects included, and compiled code cannot. It breaks the graph there, and the layer
then runs eagerly under `torch.utils.checkpoint`, which disables Dynamo for everything inside it: unfused, for
plain Inductor too. Since transformers 5.25 every HF layer with attention does this. transformers depends on Hugging
Face's hub-kernels package (`kernels` >= 0.19) and decorates each attention class with its `use_kernelized_func`,
whose forward wrapper sets a module-level `CompileableContextVar` (`kernels._internals.layer.layer.
_ACTIVE_KERNEL_FUNCS`) before the attention and resets it after. Under compilation that `set` is an attribute write
on a global object, so Dynamo logs "HOP: Unsafe side effect ... Attempted to mutate
UserDefinedObjectVariable(CompileableContextVar)" once per layer. Seen on the tiny 2-layer Llama with checkpointing:
6 graph breaks, rms_norm 1 of 5 and rope 0 of 4 fused (only the final norm and the loss were left in a graph).

The fix is Dynamo's own option for this, `skip_fwd_side_effects_in_bwd_under_checkpoint`: the region is traced,
its Python side effects run once, in the forward, and are not replayed in the backward's recompute. What that
drops for HF layers: the hub-kernels set is undone by its reset in the same forward (the global ends as it began),
and the output-capturing hooks (`output_attentions`) find no active collector in eager's recompute either, so they
append once there too. Tensors are recomputed as before: the partitioner does it from the region's tags.

Scoped, as `distributed.split_after_rewrite`: the option is set with torch's own `config.patch` for the duration of
`checkpoints_in_graph()` only, so a model compiled with another backend in the same process keeps Dynamo's default.
`liger_fx.apply` (and so the HF Trainer hook) enters it around every training call; with
`torch.compile(model, backend="liger")` enter it around the step (torch.compile gives a backend no hook around
Dynamo's trace: `_TorchCompileWrapper` drops `backend_ctx_ctor`). Without it, the backend logs one warning naming
this scope when Dynamo broke a graph at a checkpointed region (`warn_if_checkpoint_broke`).
"""

from __future__ import annotations

import contextlib
import logging

import torch

log = logging.getLogger("liger_fx")

# torch._dynamo.config's name for it; present in torch 2.11 (the GPU stack) and 2.13 (CPU CI), both checked.
OPTION = "skip_fwd_side_effects_in_bwd_under_checkpoint"

# The start of Dynamo's graph-break reason for a side effect inside a higher-order op; its hint names checkpoint.
_BREAK = "HOP: Unsafe side effect"

_warned = False


@contextlib.contextmanager
def checkpoints_in_graph():
    """While active, Dynamo traces an activation-checkpointed region whose forward writes outside Python state
    into the graph (its side effects run once, in the forward) instead of breaking the graph at it. Nothing changes
    when the option is already on or this torch has no such option. Cheap enough for every step: Dynamo reads it
    only when it traces; a cached frame never looks at it."""
    config = torch._dynamo.config
    if not hasattr(config, OPTION) or getattr(config, OPTION):
        yield
        return
    with config.patch(**{OPTION: True}):
        yield


def warn_if_checkpoint_broke(graph_index: int) -> None:
    """One warning per process when Dynamo broke a graph at a checkpointed region's side effect: those layers run
    eagerly and unfused, and the user can fix it with one scope."""
    global _warned
    if _warned:
        return
    from torch._dynamo.utils import counters

    # "graph_break" where Dynamo resumed after the region; "unimplemented" also where it gave up on the whole
    # function (a checkpoint inside a loop: "Failed to handle graph break gracefully", counted there only).
    breaks = [r for kind in ("graph_break", "unimplemented") for r in counters[kind]
              if r.startswith(_BREAK) and "checkpoint" in r]
    if not breaks:
        return
    _warned = True
    culprit = "outside Python state"
    if "Attempted to mutate " in breaks[0]:
        culprit = breaks[0].split("Attempted to mutate ", 1)[1].splitlines()[0].strip()
    why = (" (the hub-kernels wrapper transformers 5.25 puts around every attention does)"
           if "CompileableContextVar" in culprit else "")
    log.warning("liger_fx: graph %d: Dynamo left activation-checkpointed layers out of the graph: their forward "
                "writes %s%s, which it refuses inside a checkpoint; they run eagerly and unfused. Run the step inside "
                "`liger_fx.checkpointing.checkpoints_in_graph()`, or compile with `liger_fx.apply(model)` or the HF "
                "Trainer hook, which enter it by themselves.", graph_index, culprit, why)
