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
  checkpointed layers are inlined with recompute tags, so they are rewritten too (canonicalize.inline_checkpoints),
  and kept in the graph on transformers 5.25, whose layers write a global Dynamo otherwise refuses inside a
  checkpoint (liger_fx.apply runs training steps inside checkpointing.checkpoints_in_graph());
- training steps return no logits (Liger's skip_logits), loss-only evaluation honours `skip_logits=True`, and
  `num_items_in_batch` reaches the loss (see liger_fx/api.py).

`TrainingArguments(torch_compile_backend="liger")` (torch.compile's way to name a backend) means the same as
`use_liger_kernel=True` while this hook routes to liger-fx, and `torch_compile_mode` becomes liger_fx.apply's `mode`:
the model is compiled once, by the hook, and accelerate compiles nothing. Why not through accelerate: its
`TorchDynamoPlugin` accepts only the names of its own `DynamoBackend` enum ("'LIGER' is not a valid DynamoBackend"
at Trainer init), and its plain `torch.compile(model)` would also lose what `liger_fx.apply` adds (no logits in
training steps, checkpointed layers kept in the graph). With `LIGER_FX_TRAINER=liger_kernel` the name is refused
with an error that says what to write. `torch_compile=True` with another backend beside `use_liger_kernel=True` would
compile the model again, with that backend, around ours: the hook logs a warning naming the fix.
"""

from __future__ import annotations

import copy
import logging
import os

from .. import api

log = logging.getLogger("liger_fx")

ENV = "LIGER_FX_TRAINER"
CHOICES = ("liger_fx", "liger_kernel")
DEFAULT = "liger_fx"

_original = None  # transformers' own apply_liger_kernel, while ours is installed
_original_build = None  # transformers' own Trainer._build_accelerator_args, while ours is installed

# The backend names `torch_compile_backend` may give for liger-fx (the entry point's name).
BACKEND_NAMES = ("liger",)


def apply_liger_kernel(model, kernel_config=None):
    """Drop-in for `transformers.integrations.liger.apply_liger_kernel`: compile `model` with backend="liger"."""
    flags = dict(kernel_config or {})
    api.apply(model, **flags)
    log.info("liger_fx: use_liger_kernel=True -> %s compiled with backend='liger' (flags %s)",
             type(api.base_model(model)).__name__, flags or "default")
    from . import trl

    config = api.base_model(model)._liger_fx.config
    if trl.install(config):  # TRL's trainers: their own LM head on the model's forward (integrations/trl.py)
        line = trl.describe(model, config)
        if line is not None:
            (log.info if "runs liger_fx::" in line else log.warning)("liger_fx: %s", line)


def _build_accelerator_args(self, **kwargs):
    """`Trainer._build_accelerator_args` (called once, at Trainer init, where accelerate's TorchDynamoPlugin is built)
    with `torch_compile_backend="liger"` routed to the hook: use_liger_kernel=True, and accelerate told to compile
    nothing, so the model is compiled once."""
    args = self.args
    backend = args.torch_compile_backend
    if not (isinstance(backend, str) and backend.lower() in BACKEND_NAMES):
        if args.torch_compile and args.use_liger_kernel and installed():
            log.warning("liger_fx: torch_compile=True (backend %r) and use_liger_kernel=True: accelerate compiles the "
                        "liger-compiled model again, with %r, around it. Write torch_compile_backend='liger' (or "
                        "drop torch_compile) to compile it once, with liger-fx.", backend, backend)
        return _original_build(self, **kwargs)
    if not installed():
        raise ValueError(
            f"liger_fx: torch_compile_backend={backend!r} compiles through liger-fx's Trainer hook, which "
            f"{ENV}=liger_kernel switched off (use_liger_kernel=True runs liger-kernel). Unset {ENV} (or call "
            "liger_fx.integrations.transformers.install('liger_fx')) to compile with liger-fx; for liger-kernel "
            "write use_liger_kernel=True without torch_compile_backend.")
    if not args.use_liger_kernel:
        args.use_liger_kernel = True
        log.info("liger_fx: torch_compile_backend=%r -> use_liger_kernel=True (the model is compiled by the hook)",
                 backend)
    config = dict(args.liger_kernel_config or {})
    if args.torch_compile_mode is not None and "mode" not in config:
        config["mode"] = args.torch_compile_mode  # liger_fx.apply's mode=, as torch.compile's
        args.liger_kernel_config = config
    # accelerate builds its TorchDynamoPlugin from args.torch_compile_backend; it gets "no" from a copy, so that it
    # compiles nothing, and the user's args keep saying what they asked for.
    plugin_args = copy.copy(args)
    plugin_args.torch_compile_backend = "no"
    self.args = plugin_args
    try:
        return _original_build(self, **kwargs)
    finally:
        self.args = args


def install(backend: str | None = None) -> str:
    """Route `use_liger_kernel=True` to `backend`: "liger_fx" (default; or `$LIGER_FX_TRAINER`) or "liger_kernel"
    (transformers' own integration). Returns the choice. Safe to call again."""
    choice = backend or os.environ.get(ENV) or DEFAULT
    if choice not in CHOICES:
        raise ValueError(f"liger_fx: {ENV}/backend must be one of {', '.join(CHOICES)}, got {choice!r}")
    global _original, _original_build
    import transformers.integrations.liger as hf_liger
    import transformers.trainer as hf_trainer

    if choice == "liger_kernel":
        uninstall()
        log.info("liger_fx: use_liger_kernel=True runs liger-kernel (%s=liger_kernel)", ENV)
    elif _original is None:
        _original = hf_liger.apply_liger_kernel
    if _original_build is None:  # both choices: with liger_kernel it refuses torch_compile_backend="liger", naming why
        _original_build = hf_trainer.Trainer._build_accelerator_args
        hf_trainer.Trainer._build_accelerator_args = _build_accelerator_args
    if choice == "liger_kernel":
        return choice
    hf_liger.apply_liger_kernel = apply_liger_kernel
    hf_trainer.apply_liger_kernel = apply_liger_kernel
    from transformers.utils import is_liger_kernel_available

    if is_liger_kernel_available():
        log.info("liger_fx: liger-kernel is installed too; use_liger_kernel=True runs liger-fx "
                 "(set %s=liger_kernel to run liger-kernel)", ENV)
    return choice


def uninstall() -> None:
    """Give transformers its own `apply_liger_kernel` and `Trainer._build_accelerator_args` back."""
    global _original, _original_build
    import transformers.integrations.liger as hf_liger
    import transformers.trainer as hf_trainer

    if _original_build is not None:
        hf_trainer.Trainer._build_accelerator_args = _original_build
        _original_build = None
    from . import trl

    trl.uninstall()
    if _original is None:
        return
    hf_liger.apply_liger_kernel = _original
    hf_trainer.apply_liger_kernel = _original
    _original = None


def installed() -> bool:
    import transformers.trainer as hf_trainer

    return hf_trainer.apply_liger_kernel is apply_liger_kernel


install()
