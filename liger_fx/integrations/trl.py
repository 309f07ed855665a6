"""TRL's trainers through liger-fx's Trainer hook (integrations/transformers.py). Checked with TRL 1.16.

TRL's SFT, DPO, GRPO, RLOO and KTO trainers never see logits in a training step: at init each replaces the model's
forward with its own chunked LM head (`trl.trainer.utils.add_fused_lm_head`). Called with `fused_lm_head=True`, that
forward runs the backbone, then `ChunkedLogProbFunction` on the last hidden states, the lm_head's weight and the
labels, and returns per-token log-probs plus what the trainer asked for at init: entropies, the mean logit, whether
the label is the argmax, log(sum p^2). With `use_liger_kernel=True` the trainers set
`fused_linear_cross_entropy=False` (Liger's own fused loss would replace that forward) and import no liger-kernel, so
the hook compiles TRL's patched forward as it is: the backbone's norms, rotations and MLPs fuse, and Dynamo breaks the
graph twice inside TRL's head (`torch.mm(..., out=tile)` into a non-contiguous slice of its tile buffer), which then
runs eagerly beside the compiled graphs.

What this module changes, installed by the hook once TRL is imported (`install()`, from
`integrations.transformers.apply_liger_kernel`):
- TRL's head, when the hook compiled the trainer's model (flag `fused_linear_logprobs` on: the model's own inside
  its compiled forward, `api.running_config()`; the hook's for a frozen reference model, which runs eagerly) and is
  asked only for what the fused ops compute (every output of TRL 1.16's head: log-probs and entropies from
  `liger_fx::fused_linear_logprobs`; with the argmax flag of SFT's and DPO's accuracy metrics, the mean logit or
  WPO's log(sum p^2), `liger_fx::fused_linear_logprobs_metrics`, the same pass), calls them instead: one op in the
  compiled graph, no graph break, no N x V logits (on a GPU (C, V) chunks, C from the same budget as the linear +
  cross-entropy op). TRL's transform (logit_scale, then a softcap, then 1/temperature) folds into the op's (softcap,
  logit_scale). An output a later TRL adds runs TRL's own head, and `describe()` says why in the hook's log line. A
  reference model's head runs the op eagerly, forward only (TRL calls it under no_grad), so policy and reference
  log-probs come from one implementation. On a GPU TRL first selects the rows with a label (`hidden_states[mask]`, a
  data-dependent shape), where Dynamo may break the graph before the head: the op then runs in the graph after it.
- TRL's `selective_log_softmax` and `entropy_from_logits` send CUDA logits to TRL's Triton kernel; LazyLogits take
  their torch path instead, which lazy_logprobs.py runs fused (the kernel would read them, i.e. materialize them).
Everything else of TRL (its loss, masks, metrics) is untouched. `uninstall()` puts TRL's functions back.
"""

from __future__ import annotations

import logging
import sys
from typing import Optional

import torch

from .. import api
from ..kernels.fused_linear_logprobs import NO_IGNORE

log = logging.getLogger("liger_fx")

SUPPORTED = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
"""TRL `add_fused_lm_head` outputs the fused ops give: log-probs and entropies from `liger_fx::fused_linear_logprobs`;
with the metrics (SFT's and DPO's accuracy and logit means, WPO's weights) `liger_fx::fused_linear_logprobs_metrics`,
the same pass."""
METRICS = ("log_sum_sq_probs", "mean_logits", "is_top1")

_config = None  # the LigerConfig of the hook's last apply: for TRL heads on models it did not compile
_original_head = None  # trl.trainer.utils._ChunkedLogProbFunction, while ours is installed
_original_supports = None  # trl.trainer.utils._supports_trl_loss_kernel, likewise


def _trl_utils():
    return sys.modules.get("trl.trainer.utils")


def unsupported(outputs) -> list[str]:
    """The outputs of TRL's head that the fused ops do not compute (one a later TRL adds)."""
    return [o for o in outputs if o not in SUPPORTED]


class FusedHead:
    """Stands in for TRL's `ChunkedLogProbFunction` (same `apply` signature); see the module docstring."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None, logit_scale=1.0,
              outputs=("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")):
        # The compiled model's flags; outside its forward (a frozen reference model, run eagerly) the hook's.
        config = api.running_config() or _config
        softcap = final_logit_softcapping
        if (config is None or not config.fused_linear_logprobs or unsupported(outputs) or
                logit_scale == 0 or softcap == 0 or not temperature > 0):
            return _original_head.apply(hidden, weight, bias, targets, temperature, chunk_size,
                                        final_logit_softcapping, logit_scale, outputs)
        return fused_head(hidden, weight, bias, targets, temperature, softcap, logit_scale, outputs)


def fused_head(hidden, weight, bias, targets, temperature, softcap, logit_scale, outputs):
    """TRL's head's (log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1) from the fused ops (None where not
    asked for). TRL computes z = softcap * tanh(x * logit_scale / softcap) / temperature; the ops softcap' *
    tanh(x / softcap') * scale', equal with softcap' = softcap / |logit_scale| and scale' = logit_scale /
    temperature (tanh is odd)."""
    from ..kernels.fused_linear_logprobs import fused_linear_token_metrics

    if not torch.is_autocast_enabled(hidden.device.type) and weight.dtype != hidden.dtype:
        weight = weight.to(hidden.dtype)  # as TRL's head casts its tiles to the hidden states' dtype
        bias = bias.to(hidden.dtype) if bias is not None else None
    op_softcap = 0.0 if softcap is None else float(softcap) / abs(float(logit_scale))
    scale = float(logit_scale) / float(temperature)
    entropy = "entropy" in outputs
    lsq = mean = top1 = None
    if any(m in outputs for m in METRICS):
        zt, lse, ent, top1, mean, lsq = fused_linear_token_metrics(
            hidden, weight, targets, bias, NO_IGNORE, softcap=op_softcap, logit_scale=scale, entropy=entropy)
    else:
        zt, lse, ent = torch.ops.liger_fx.linear_logprobs(hidden, weight, bias, targets, NO_IGNORE, op_softcap, scale,
                                                          entropy)

    def asked(name, value):
        return value if name in outputs else None

    return (zt - lse, asked("entropy", ent), asked("log_sum_sq_probs", lsq), asked("mean_logits", mean),
            asked("is_top1", top1))


def _supports_trl_loss_kernel(logits, *args, **kwargs):
    from ..lazy_logits import LazyLogits

    if isinstance(logits, LazyLogits):
        return False  # TRL's torch path, which LazyLogits take fused (lazy_logprobs.py)
    return _original_supports(logits, *args, **kwargs)


def install(config=None) -> bool:
    """Install the shims into an imported TRL, TRL heads outside a compiled forward following `config` (the hook's
    flags); returns whether TRL was there. Safe to call again."""
    global _original_head, _original_supports, _config
    utils = _trl_utils()
    if utils is None:
        return False
    _config = config
    if _original_head is None and hasattr(utils, "_ChunkedLogProbFunction"):
        _original_head = utils._ChunkedLogProbFunction
        utils._ChunkedLogProbFunction = FusedHead
    if _original_supports is None and hasattr(utils, "_supports_trl_loss_kernel"):
        _original_supports = utils._supports_trl_loss_kernel
        utils._supports_trl_loss_kernel = _supports_trl_loss_kernel
    return True


def uninstall() -> None:
    global _original_head, _original_supports, _config
    _config = None
    utils = _trl_utils()
    if utils is not None and _original_head is not None:
        utils._ChunkedLogProbFunction = _original_head
    if utils is not None and _original_supports is not None:
        utils._supports_trl_loss_kernel = _original_supports
    _original_head = _original_supports = None


def trl_head(model) -> Optional[dict]:
    """What TRL's fused LM head on `model` was set up with ({"outputs", "softcap", "temperature"}), read from the
    forward `add_fused_lm_head` put on the instance; None when the model has none."""
    target = api.base_model(model)
    state = target.__dict__.get("_liger_fx")  # liger_fx.apply keeps the forward it replaced
    fwd = state.original_forward if state is not None else target.__dict__.get("forward")
    fn = getattr(fwd, "__func__", fwd)
    code = getattr(fn, "__code__", None)  # not __qualname__: functools.wraps gave it the model's forward's
    if code is None or getattr(code, "co_qualname", code.co_name).split(".")[0] not in ("add_fused_lm_head",
                                                                                         "_fused_forward") or \
            code.co_name != "_fused_forward" or "trl" not in code.co_filename:
        return None
    try:
        cells = dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__ or ())))
    except ValueError:  # an empty cell
        return {"outputs": None, "softcap": None, "temperature": None}
    return {"outputs": tuple(cells.get("outputs") or ()), "softcap": cells.get("final_logit_softcapping"),
            "temperature": cells.get("temperature")}


def describe(model, config) -> Optional[str]:
    """One line on what the hook does with the TRL head of `model`, or None when it has none."""
    head = trl_head(model)
    if head is None:
        return None
    outputs = head["outputs"]
    if not config.fused_linear_logprobs:
        return ("TRL's fused LM head runs its own chunked kernel (flag 'fused_linear_logprobs' is off): no N x V "
                "logits, but outside the compiled graph")
    if outputs is None:
        return "TRL's fused LM head: its outputs could not be read; liger_fx's op runs where it computes them all"
    missing = unsupported(outputs)
    if missing:
        return (f"TRL's fused LM head asks for {', '.join(missing)}, which liger_fx's fused log-prob ops do not "
                f"compute: TRL's own chunked head runs (no N x V logits either), outside the compiled graph (Dynamo "
                f"breaks the graph in it)")
    op = ("fused_linear_logprobs_metrics" if any(m in outputs for m in METRICS) else "fused_linear_logprobs")
    return f"TRL's fused LM head ({', '.join(outputs)}) runs liger_fx::{op} inside the compiled graph"
