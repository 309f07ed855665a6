"""HF Trainer hook: `TrainingArguments(use_liger_kernel=True, liger_kernel_config={...})` compiles the model with
`backend="liger"`. The one line to add to a training script:

    import liger_fx.integrations.transformers

How: `Trainer.train()` calls `apply_liger_kernel(model, args.liger_kernel_config)` (transformers 5.x,
`transformers/integrations/liger.py`, imported by name into `transformers.trainer`) right after `model_init` and
before gradient checkpointing is switched on. Importing this module replaces that function, in both places, by
`apply_liger_kernel` below, which calls `liger_fx.apply(model, **liger_kernel_config)`. Nothing is planted in
site-packages and `is_liger_kernel_available()` keeps telling the truth (other libraries, e.g. TRL, read it to
import liger_kernel itself). `liger-kernel` need not be installed.

Which implementation runs when liger-kernel is installed too: liger-fx, by default, since importing this module
is the request for it. `LIGER_FX_TRAINER=liger_kernel` in the environment (or `install("liger_kernel")`) leaves
transformers' own function, i.e. liger-kernel, in place, so one script can A/B both. The choice is logged.

What the hook guarantees, per call of `train()`:
- a bad `liger_kernel_config` key or value raises ValueError naming it before the first step;
- with `model_init`, the fresh model is the one compiled (train() calls the hook after re-initializing);
- a PEFT model is compiled through its base model (`liger_fx.api.base_model`);
- gradient checkpointing, switched on by train() after the hook, is traced by Dynamo at the first step; the
  checkpointed layers are inlined with recompute tags, so they are rewritten too (canonicalize.inline_checkpoints);
- training steps return no logits (Liger's skip_logits), loss-only evaluation honours `skip_logits=True`, and
  `num_items_in_batch` reaches the loss (see liger_fx/api.py).
Do not also set `torch_compile=True`: the Trainer would compile the model again, with Inductor, around ours.
"""

from __future__ import annotations

import logging
import os

from .. import api

log = logging.getLogger("liger_fx")

ENV = "LIGER_FX_TRAINER"
CHOICES = ("liger_fx", "liger_kernel")
DEFAULT = "liger_fx"

_original = None  # transformers' own apply_liger_kernel, while ours is installed


def apply_liger_kernel(model, kernel_config=None):
    """Drop-in for `transformers.integrations.liger.apply_liger_kernel`: compile `model` with backend="liger"."""
    flags = dict(kernel_config or {})
    api.apply(model, **flags)
    log.info("liger_fx: use_liger_kernel=True -> %s compiled with backend='liger' (flags %s)",
             type(api.base_model(model)).__name__, flags or "default")


def install(backend: str | None = None) -> str:
    """Route `use_liger_kernel=True` to `backend`: "liger_fx" (default; or `$LIGER_FX_TRAINER`) or "liger_kernel"
    (transformers' own integration). Returns the choice. Safe to call again."""
    choice = backend or os.environ.get(ENV) or DEFAULT
    if choice not in CHOICES:
        raise ValueError(f"liger_fx: {ENV}/backend must be one of {', '.join(CHOICES)}, got {choice!r}")
    if choice == "liger_kernel":
        uninstall()
        log.info("liger_fx: use_liger_kernel=True runs liger-kernel (%s=liger_kernel)", ENV)
        return choice
    global _original
    import transformers.integrations.liger as hf_liger
    import transformers.trainer as hf_trainer

    if _original is None:
        _original = hf_liger.apply_liger_kernel
    hf_liger.apply_liger_kernel = apply_liger_kernel
    hf_trainer.apply_liger_kernel = apply_liger_kernel
    from transformers.utils import is_liger_kernel_available

    if is_liger_kernel_available():
        log.info("liger_fx: liger-kernel is installed too; use_liger_kernel=True runs liger-fx "
                 "(set %s=liger_kernel to run liger-kernel)", ENV)
    return choice


def uninstall() -> None:
    """Give transformers its own `apply_liger_kernel` back."""
    global _original
    if _original is None:
        return
    import transformers.integrations.liger as hf_liger
    import transformers.trainer as hf_trainer

    hf_liger.apply_liger_kernel = _original
    hf_trainer.apply_liger_kernel = _original
    _original = None


def installed() -> bool:
    import transformers.trainer as hf_trainer

    return hf_trainer.apply_liger_kernel is apply_liger_kernel


install()
