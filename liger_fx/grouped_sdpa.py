"""Step 1c of the pipeline (option `grouped_sdpa`): SDPA on k and v repeated to every query head runs on the
unrepeated k and v with `enable_gqa=True`.

    k = x_k[:, :, None].expand(B, kv, g, T, d).reshape(B, kv * g, T, d)        (transformers' repeat_kv; v alike)
    scaled_dot_product_attention(q, k, v, is_causal=True)
 -> scaled_dot_product_attention(q, x_k, x_v, is_causal=True, enable_gqa=True)

Why, measured on the H200 before building it (bench/lab/gemm_levers.py --attention, causal SDPA fwd+bwd at B8 T2048
bf16, commit 7ed726d): cuDNN runs grouped heads itself (its backward adds one kernel that reduces dk and dv over the
group), so the repeated copies are neither written in the forward, saved for the backward, nor summed back:
Llama-3.2-1B 1.754 -> 1.512 ms a layer, Llama-3-8B 2.793 -> 2.297, Qwen2-1.5B 1.218 -> 0.934 (3.9, 4.0 and 8.0 ms a
step), and the saved k and v shrink g-fold (1.5 GiB less at Llama-3-8B with 8 layers, B8 T2048).

transformers repeats k and v itself whenever it hands SDPA a mask (`use_gqa_in_sdpa`), and on torch 2.11 under
torch.compile it always builds one, which causal_sdpa then proves causal and drops. So only an SDPA left without a
mask is rewritten: with a mask, grouped heads have no fused kernel on CUDA (transformers' own note: the math
fallback). The repeat is recognised by its values, not its spelling: a new axis of size 1 at dim 2 of a 4-D tensor,
expanded to g, merged into the head axis, which is exactly SDPA's own `repeat_interleave(g, dim=-3)` for grouped
heads.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .canonicalize import val as _val
from .causal_mask import sdpa_calls

aten = torch.ops.aten

_MERGES = (aten.reshape.default, aten.view.default, aten._unsafe_view.default)


def _known(cond) -> bool:
    try:
        return bool(statically_known_true(cond))
    except Exception:
        return False


def unrepeated(node) -> tuple[fx.Node, int] | None:
    """(x, g) if node is x (B, kv, T, d) with each head repeated g times in place, else None."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target in _MERGES):
        return None
    expand = node.args[0]
    if not (isinstance(expand, fx.Node) and expand.target is aten.expand.default):
        return None
    unsqueeze = expand.args[0]
    if not (isinstance(unsqueeze, fx.Node) and unsqueeze.target is aten.unsqueeze.default):
        return None
    x = unsqueeze.args[0]
    xv, ev, rv = _val(x), _val(expand), _val(node)
    if not all(isinstance(t, torch.Tensor) for t in (xv, ev, rv)) or (xv.dim(), ev.dim(), rv.dim()) != (4, 5, 4):
        return None
    if unsqueeze.args[1] % 5 != 2:
        return None
    B, kv, T, d = xv.shape
    g = ev.shape[2]
    if not isinstance(g, int) or g < 2:
        return None
    same = [ev.shape[i] == s for i, s in ((0, B), (1, kv), (3, T), (4, d))]
    same += [rv.shape[1] == kv * g] + [rv.shape[i] == s for i, s in ((0, B), (2, T), (3, d))]
    return (x, g) if all(_known(c) for c in same) else None


def grouped_sdpa(graph: fx.Graph) -> list[fx.Node]:
    """Rewrite every unmasked SDPA whose k and v are repeats of grouped heads; returns the rewritten SDPA nodes."""
    done = []
    for node, args, kwargs, mask in sdpa_calls(graph):
        if mask is not None or kwargs.get("enable_gqa", False):
            continue
        k, v = unrepeated(args[1]), unrepeated(args[2])
        qv = _val(args[0])
        if k is None or v is None or k[1] != v[1] or not isinstance(qv, torch.Tensor):
            continue
        if not _known(qv.shape[-3] == _val(k[0]).shape[1] * k[1]):
            continue
        args[1], args[2] = k[0], v[0]
        node.args, node.kwargs = tuple(args), {**kwargs, "enable_gqa": True}  # same output: (B, H, L, d)
        done.append(node)
    if done:
        graph.eliminate_dead_code()
    return done
