"""The transformers sweep behind `liger-fx report --transformers-all`: every decoder family the installed
transformers registers (`models.decoder_types`), built from its default config at the reduced size and run for one
training step, eager and compiled with the liger backend.

Each family is a `FamilyJob`. It builds the model with dropout off (so the compiled loss can be held to eager's) and
runs the eager step; a family that cannot get that far raises `Skip` with why, and the report lists it as skipped. A
compiled step that raises or whose loss differs from eager's is an error, unless plain torch.compile with the same
compiler fails it the same way (`plain_failure`): then it is skipped too, with both reasons. `compiler("aot_eager")`
scopes a cheaper compile for the sweep (AOTAutograd without Inductor's codegen).
"""

from __future__ import annotations

import contextlib
import math

COMPILERS = ("inductor", "aot_eager")


class Skip(Exception):
    """A sweep family that cannot be run here: the message is the report's `skipped` reason."""


def one_line(e: BaseException) -> str:
    """The exception's type and the first line of its message that says something: a message opening with a
    line that ends in a colon (huggingface_hub's validation errors) gets the line after it too."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if text.endswith(":") and len(lines) > 1:
        text += " " + lines[1]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class FamilyJob:
    """One family of the sweep: calling it returns (model, args, kwargs, eager loss) or raises Skip."""

    def __init__(self, model_type: str, mode: str):
        self.model_type, self.mode = model_type, mode

    def __call__(self):
        import torch

        from .models import build, default_config
        from .report import eager_step, example_batch

        try:
            config = no_dropout(default_config(self.model_type))
        except Exception as e:
            raise Skip(f"no config at the reduced size: {one_line(e)}") from None
        try:
            model = build(config)
        except Exception as e:
            raise Skip(f"cannot be built from its default config at the reduced size: {one_line(e)}") from None
        for m in model.modules():  # a dropout module whose rate is no config attribute
            if isinstance(m, torch.nn.modules.dropout._DropoutNd):
                m.p = 0.0
        try:
            batch = example_batch(model)
        except Exception as e:
            raise Skip(f"no token-id inputs can be made for it: {one_line(e)}") from None
        try:
            loss = eager_step(model, (), batch, mode=self.mode)
        except Exception as e:
            raise Skip(f"its eager {self.mode} step fails at the reduced size: {one_line(e)}") from None
        return model, (), batch, loss


def plain_failure(model, args, kwargs, mode: str, compiler_name: str, eager_loss) -> str | None:
    """How one step of `model` under plain torch.compile with the same compiler fails (raises, or a loss other than
    eager's), or None when it does not."""
    import torch

    from .report import eager_step

    torch._dynamo.reset()
    try:
        backend = "inductor" if compiler_name == "inductor" else aot_eager
        loss = eager_step(torch.compile(model, backend=backend), args, kwargs, mode=mode)
    except Exception as e:
        return f"its step raises {one_line(e)}"
    finally:
        torch._dynamo.reset()
    if eager_loss is not None and not losses_close(loss, eager_loss):
        return f"its loss {loss!r} differs from eager's {eager_loss!r}"
    return None


def no_dropout(config):
    """Every dropout-like probability of the config and its sub-configs at 0 (`attention_dropout`, GPT-2's
    `resid_pdrop`, BART's `decoder_layerdrop`, `drop_path_rate`): a compiled step draws other random numbers than
    eager, and the sweep compares their losses (CTRL's `*_pdrop` at 0.1 moved its loss by 0.02). Nothing else of the
    structure changes."""
    from transformers import PretrainedConfig

    for name, value in list(vars(config).items()):
        if "drop" in name and isinstance(value, float):
            setattr(config, name, 0.0)
        elif isinstance(value, PretrainedConfig):  # a sub-config
            no_dropout(value)
    return config


def aot_eager(gm, example_inputs, config_patches=None):
    """AOTAutograd with Inductor's partitioner and no codegen: `--compiler aot_eager` (and, as a torch.compile
    backend, the plain compile it is compared with)."""
    from functorch.compile import min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd
    from torch._dynamo.backends.debugging import boxed_nop

    return aot_autograd(fw_compiler=boxed_nop, bw_compiler=boxed_nop,
                        partition_fn=min_cut_rematerialization_partition)(gm, example_inputs)


@contextlib.contextmanager
def compiler(name: str):
    """Scope which compiler the backend hands the rewritten graph to. "aot_eager" runs AOTAutograd (the joint trace
    and the partition into forward and backward: where a fused op's fake or autograd formula would fail and the
    backend fall back) and then the traced graphs as they are, without Inductor's codegen. Measured on the 2-core
    CPU: a mini Llama's training step compiled in 3.8 s of CPU against 21 s through a cold Inductor."""
    if name == "inductor":
        yield
        return
    if name != "aot_eager":
        raise ValueError(f"unknown compiler {name!r}; expected one of {', '.join(COMPILERS)}")
    from . import backend

    saved = backend.compile_fx
    backend.compile_fx = aot_eager
    try:
        yield
    finally:
        backend.compile_fx = saved


def losses_close(a: float | None, b: float) -> bool:
    """Losses of one fp32 step, compiled and eager: Inductor reorders reductions (~1e-7 relative), a wrong eps or
    cast moves a loss by 1e-3 or more."""
    return a is not None and math.isfinite(a) == math.isfinite(b) and (
        not math.isfinite(b) or abs(a - b) <= 1e-5 + 1e-4 * abs(b))
