"""The one configuration object: which rewrites run.

Flag names are Liger's, so a `liger_kernel_config` written for liger-kernel means the same here. Unknown keys and
non-bool values are errors that name the key: Liger drops a typo such as `rms_nrom` silently and the user trains
unfused without knowing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping


@dataclass(frozen=True)
class LigerConfig:
    rms_norm: bool = True
    """Fuse RMSNorm (Llama and Gemma casting, q/k norms) into `liger_fx::rms_norm`."""

    rope: bool = True
    """Fuse the rotary embedding of q and k (rotate-half, interleaved pairs, half-width tables, complex freqs_cis)
    into `liger_fx::rope`."""

    swiglu: bool = True
    """Fuse `silu(gate) * up` (split or packed gate/up, MoE experts) into `liger_fx::swiglu`."""

    geglu: bool = True
    """Fuse `gelu(gate) * up` (tanh-approximate, as Gemma; exact GELU too) into `liger_fx::swiglu`."""

    cross_entropy: bool = False
    """Fuse cross-entropy on already materialized logits. Off by default, as in Liger. When
    `fused_linear_cross_entropy` is also on, the fused linear form wins wherever it matches, and this covers the
    losses it could not fuse (Liger raises instead; we keep both useful)."""

    fused_linear_cross_entropy: bool = True
    """Fuse lm_head + cross-entropy so the B*T*V logits are never materialized for the loss."""

    # -- liger-fx's own options (not rewrites; not counted, not in the coverage report) --

    recompute: bool = True
    """Recompute the outputs of the fused RMSNorm and SwiGLU/GeGLU in the backward instead of saving them. Their
    inputs are saved anyway (each backward reads them), so the outputs are pure extra: per Llama-3.2-1B layer at
    B8 T2048 bf16, two norm outputs of 64 MiB and one SwiGLU output of 256 MiB, 6 GiB over 16 layers. The price is
    one more forward launch of each op in the backward (bench/RESULTS.md has both numbers). Liger cannot do this: in
    eager mode the next nn.Linear saves its input. A static-shape graph that holds the whole step (embedding to
    loss) and whose fused outputs hold under 1 GiB recomputes nothing (rewrite.RECOMPUTE_MIN_BYTES: 0.39 GiB at
    Llama-3.2-1B B1 T1024, where the extra launches cost host time and the memory does not matter); a graph per layer
    (FSDP2) always recomputes."""

    causal_sdpa: bool = True
    """Run SDPA with `is_causal=True` where its boolean mask is provably the causal triangle (built from aranges,
    or tril of ones, over equal query and key lengths): transformers 5.17 hands SDPA such a mask under
    torch.compile, and masked attention took 64.9 ms of a Llama-3.2-1B step on the H200 against 24.6 ms causal
    (liger_fx/causal_mask.py)."""

    grouped_sdpa: bool = True
    """Run an unmasked SDPA whose k and v are repeated to every query head (transformers' repeat_kv) on the
    unrepeated k and v with `enable_gqa=True`: cuDNN handles the groups itself. Causal SDPA fwd+bwd on the H200,
    B8 T2048: 1.218 -> 0.934 ms a layer at Qwen2-1.5B, 1.754 -> 1.512 at Llama-3.2-1B; k and v are saved g-fold
    smaller (liger_fx/grouped_sdpa.py)."""

    fuse_projections: bool = True
    """Run sibling linears that read one input as one matmul on their concatenated weights when one of them is
    narrow (out_features < in_features: grouped-query attention's k and v projections). One layer's q/k/v, fwd+bwd
    on the H200: 0.832 -> 0.611 ms at Qwen2-1.5B B8 T2048, 0.988 -> 0.930 at Llama-3.2-1B (liger_fx/projections.py).
    Not under DDP, whose bucket layout counts each parameter where it is used."""

    fuse_swiglu_linear: bool = True
    """Where `recompute` recomputes a SwiGLU/GeGLU output whose one user is a bias-free linear (the down projection),
    run the two as one op whose backward computes the output in the same kernel as the SwiGLU's gradient, instead of
    in a launch of its own that reads gate and up again: 2 x B*T*I elements less traffic and one launch less per
    layer, nothing more saved (liger_fx/kernels/swiglu.py, liger_fx/patterns/swiglu.recompute_in_linear). Off, or with `recompute` off,
    the linear stays an nn.Linear's matmul."""

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return ("recompute", "causal_sdpa", "grouped_sdpa", "fuse_projections", "fuse_swiglu_linear")

    @classmethod
    def flag_names(cls) -> tuple[str, ...]:
        """The rewrite flags (Liger's names), in pipeline order."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.name not in cls.option_names())

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> "LigerConfig":
        """Build from `torch.compile(..., options=...)` flag entries; raises ValueError naming a bad key or value."""
        options = dict(options or {})
        valid = cls.flag_names() + cls.option_names()
        for key, value in options.items():
            if key not in valid:
                raise ValueError(
                    f"liger_fx: unknown flag {key!r}; valid flags are {', '.join(valid)}"
                )
            if not isinstance(value, bool):
                raise ValueError(
                    f"liger_fx: flag {key!r} must be True or False, got {value!r} ({type(value).__name__})"
                )
        return cls(**options)

    def enabled(self) -> tuple[str, ...]:
        return tuple(name for name in self.flag_names() if getattr(self, name))


def split_options(options: Mapping[str, Any] | None) -> tuple[LigerConfig, dict[str, Any]]:
    """Split `torch.compile(options=...)` into our flags and Inductor config entries.

    Inductor keys (e.g. `"max_autotune": True`, `"triton.cudagraphs": False`) keep their Inductor meaning and are
    applied to the compile of this graph only. `"mode"` is read by the backend (torch.compile does not accept
    `mode=` together with `options=`). Anything else raises, naming the key.
    """
    from torch._inductor import config as inductor_config

    flags, inductor = {}, {}
    inductor_keys = set(inductor_config.get_config_copy())
    for key, value in dict(options or {}).items():
        if key == "mode":  # torch.compile refuses mode= and options= together: the mode may ride in options
            continue
        if key in LigerConfig.flag_names() + LigerConfig.option_names():
            flags[key] = value
        elif key in inductor_keys:
            inductor[key] = value
        else:
            raise ValueError(
                f"liger_fx: unknown option {key!r}; valid flags are {', '.join(LigerConfig.flag_names())}, "
                f"options {', '.join(LigerConfig.option_names())} (Inductor config keys are accepted too)"
            )
    return LigerConfig.from_options(flags), inductor
