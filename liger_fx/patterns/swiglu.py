"""Gated MLP activations: `act(gate) * up` -> `liger_fx::swiglu`, and, when gate and up are the two halves of one
tensor, `liger_fx::swiglu_packed`.

    split   (Llama, Mistral, Qwen2, Gemma):  act(gate_proj(x)) * up_proj(x)
    packed  (Phi-3):                          gate, up = gate_up_proj(x).chunk(2, dim=-1); up * act(gate)
    experts (Mixtral and other MoE in transformers 5): the same chunk -> act(gate) * up between the two grouped (or
            batched) matmuls that run all experts of a layer at once; one site per MoE layer.

act is SiLU (flag `swiglu`), tanh-GELU (flag `geglu`; Gemma's gelu_pytorch_tanh) or exact GELU (flag `geglu`, its
own variant: `aten.gelu` without `approximate`). One search function, parametrized by activation and operand order,
matches whatever produced gate and up; the guards want one shape, dtype and device and unit stride on the last dim.

The packed form is found after matching (`post_pass`) rather than by more search variants: chunk, split,
split_with_sizes and a pair of slices all spell "two halves of X", and 4 spellings x 3 activations x 2 orders would
be 24 near-copies. The post pass turns `swiglu(X[..., :I], X[..., I:])` into `swiglu_packed(X)`, whose backward
writes d(X) as one buffer instead of two halves Inductor then concatenates (kernels/swiglu.py has the numbers).
"""

from __future__ import annotations

import functools
import itertools
import logging
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

from liger_fx.canonicalize import val as _val
from liger_fx.rewrite import Pattern

log = logging.getLogger("liger_fx")
aten = torch.ops.aten


def recomputable() -> tuple:
    """Ops whose output the backward recomputes rather than saves (LigerConfig.recompute): the backward saves gate
    and up anyway; the down projection would save act(gate) * up, B*T*I*2 bytes (256 MiB per Llama-3.2-1B layer at
    B8 T2048), for the price of one more forward launch (~0.2 ms there)."""
    return (torch.ops.liger_fx.swiglu.default, torch.ops.liger_fx.swiglu_packed.default)

ACTS = {  # name -> (flag, the eager spelling)
    "silu": ("swiglu", F.silu),
    "gelu_tanh": ("geglu", functools.partial(F.gelu, approximate="tanh")),
    "gelu": ("geglu", F.gelu),
}


def _make(act: str, act_first: bool):
    fn = ACTS[act][1]

    def search(gate, up):
        return fn(gate) * up if act_first else up * fn(gate)

    def replace(gate, up):
        return torch.ops.liger_fx.swiglu(gate, up, act)

    return search, replace


def _known(cond) -> bool:
    """True only if provable without adding a shape guard (sizes may be symbolic)."""
    return statically_known_true(cond)


def _reason(gate, up) -> str | None:
    """Why `act(gate) * up` can't be one swiglu call, or None."""
    if not isinstance(up, fx.Node):
        return f"multiplied by the constant {up!r}, not by a tensor"
    gv, uv = _val(gate), _val(up)
    if not isinstance(gv, torch.Tensor) or not isinstance(uv, torch.Tensor):
        return "no shape information"
    if not gv.is_floating_point():
        return f"gate dtype {gv.dtype} is not floating point"
    if gv.dtype != uv.dtype:
        return f"gate is {gv.dtype} but up is {uv.dtype} (the product promotes)"
    if gv.device != uv.device:
        return f"gate on {gv.device}, up on {uv.device}"
    if gv.dim() == 0 or gv.dim() != uv.dim() or not all(_known(a == b) for a, b in zip(gv.shape, uv.shape)):
        return f"gate {tuple(gv.shape)} and up {tuple(uv.shape)} differ in shape (a broadcast product)"
    for name, v in (("gate", gv), ("up", uv)):
        if not _known(v.stride(-1) == 1):
            return f"{name}'s last dim has stride {v.stride(-1)}; the kernel streams contiguous rows"
    return None


def _check(match) -> str | None:
    return _reason(match.kwargs["gate"], match.kwargs["up"])


@functools.cache
def patterns() -> list[Pattern]:
    out = []
    for act, act_first in itertools.product(ACTS, (True, False)):
        search, replace = _make(act, act_first)
        out.append(
            Pattern(
                flag=ACTS[act][0],
                name=f"{ACTS[act][0]}/{act}/{'act*up' if act_first else 'up*act'}",
                search=search,
                replace=replace,
                example_inputs=lambda: [torch.randn(2, 3, 8), torch.randn(2, 3, 8)],
                check=_check,
            )
        )
    return out


# --------------------------------------------------------------------------------------------------------------
# Post pass: two halves of one tensor -> the packed op.

_SPLITS = {aten.chunk.default, aten.split.Tensor, aten.split_with_sizes.default}
_END = 2**63 - 1


def _is(node, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _slice(n: fx.Node):
    """(dim, start, end, step) of an `aten.slice.Tensor` node, defaults filled in."""
    dim, start, end, step = (list(n.args[1:]) + [0, None, None, 1][len(n.args) - 1:])[:4]
    return dim, 0 if start is None else start, _END if end is None else end, step


def _halves_of(gate: fx.Node, up: fx.Node):
    """X if gate is X[..., :I] and up is X[..., I:] with X.shape[-1] == 2I, each half used only once; else None."""
    if len(gate.users) != 1 or len(up.users) != 1:
        return None
    if _is(gate, operator.getitem) and _is(up, operator.getitem):
        split = gate.args[0]
        if up.args[0] is not split or (gate.args[1], up.args[1]) != (0, 1) or not _is(split, *_SPLITS):
            return None
        dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
        if dim != -1 or len(_val(split) or ()) != 2:
            return None
        x = split.args[0]
    elif _is(gate, aten.slice.Tensor) and _is(up, aten.slice.Tensor) and up.args[0] is gate.args[0]:
        x, half = gate.args[0], _val(gate).shape[-1]
        if _slice(gate)[:2] != (-1, 0) or _slice(gate)[3] != 1 or not _known(_slice(gate)[2] == half):
            return None
        dim, start, end, step = _slice(up)
        if dim != -1 or step != 1 or not _known(start == half) or not _known(end >= 2 * half):
            return None
    else:
        return None
    xv, gv, uv = _val(x), _val(gate), _val(up)
    if not isinstance(xv, torch.Tensor) or not _known(xv.shape[-1] == 2 * gv.shape[-1]):
        return None
    if not (_known(gv.shape[-1] == uv.shape[-1]) and _known(xv.stride(-1) == 1)):
        return None
    return x


def post_pass(graph: fx.Graph) -> None:
    for node in list(graph.nodes):
        if not _is(node, torch.ops.liger_fx.swiglu.default):
            continue
        gate, up, act = node.args
        x = _halves_of(gate, up)
        if x is None:
            continue
        with graph.inserting_before(node):
            packed = graph.call_function(torch.ops.liger_fx.swiglu_packed.default, (x, act))
        packed.meta = dict(node.meta)  # same output: shape (..., I), x's dtype and device
        node.replace_all_uses_with(packed)
        graph.erase_node(node)
        split = gate.args[0] if _is(gate, operator.getitem) else None
        for half in {gate, up}:
            graph.erase_node(half)
        if split is not None and not split.users:
            graph.erase_node(split)
        log.debug("liger_fx: swiglu on the two halves of %s packed into one swiglu_packed", x.name)


# --------------------------------------------------------------------------------------------------------------
# Recomputed inside the down projection (option `fuse_swiglu_linear`, under `recompute`).

def _linear_ops() -> dict:
    return {
        torch.ops.liger_fx.swiglu.default: torch.ops.liger_fx.swiglu_linear.default,
        torch.ops.liger_fx.swiglu_packed.default: torch.ops.liger_fx.swiglu_packed_linear.default,
    }


def _down_weight(node: fx.Node):
    """The weight W when the gated product's one user is `linear(node, W)` without bias, W (H, I) of its dtype and
    device; else None. A bias, a second user (LoRA's adapter reads the same input) or a cast keep the two apart."""
    if len(node.users) != 1:
        return None
    (lin,) = node.users
    if not _is(lin, aten.linear.default) or lin.args[0] is not node or len(lin.args) < 2 or lin.kwargs:
        return None
    if len(lin.args) > 2 and lin.args[2] is not None:
        return None
    w, hv = lin.args[1], _val(node)
    wv = _val(w)
    if not isinstance(wv, torch.Tensor) or not isinstance(hv, torch.Tensor) or wv.dim() != 2:
        return None
    if wv.dtype != hv.dtype or wv.device != hv.device or not _known(wv.shape[1] == hv.shape[-1]):
        return None
    return w


def recompute_in_linear(graph: fx.Graph, nodes) -> list[str]:
    """Of `nodes` (gated products tagged for recomputation), each whose one user is a bias-free linear becomes one
    `swiglu_linear` op with that linear, whose backward recomputes act(gate) * up inside its own gradient kernel
    instead of in a launch of its own (kernels/swiglu.py, "The gated product with the down projection"). Returns
    where each one was made."""
    from liger_fx.canonicalize import where

    made, ops = [], _linear_ops()
    for node in nodes:
        op = ops.get(node.target) if isinstance(node, fx.Node) and node.op == "call_function" else None
        w = _down_weight(node) if op is not None else None
        if w is None:
            continue
        (lin,) = node.users
        *inputs, act = node.args
        with graph.inserting_before(lin):
            fused = graph.call_function(op, (*inputs, w, act))
        fused.meta = {k: v for k, v in lin.meta.items() if k != "recompute"}  # the linear's output, not recomputed
        lin.replace_all_uses_with(fused)
        made.append(where(lin))
        graph.erase_node(lin)
        graph.erase_node(node)
        log.debug("liger_fx: %s recomputed inside %s's backward", node.name, made[-1])
    return made


# --------------------------------------------------------------------------------------------------------------
# Candidates and near-miss reasons, independent of the matcher: an activation whose output is multiplied by a
# tensor, where the activation's input comes from a projection (linear, matmul, grouped matmul); or such an
# activation that leaves the graph as an output before any multiply (a graph cut inside the gated MLP).

_ACT_TARGETS = {aten.silu.default, aten.gelu.default}
_PROJECTIONS = {
    aten.linear.default, aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default,
    aten.matmul.default, *([aten._grouped_mm.default] if hasattr(aten, "_grouped_mm") else []),
}
_PASS_THROUGH = {
    operator.getitem, *_SPLITS, aten.slice.Tensor, aten.view.default, aten.reshape.default,
    aten._unsafe_view.default, aten.to.dtype, aten.squeeze.dim, aten.unsqueeze.default, aten.add.Tensor,
}


def _from_projection(node, depth: int = 6) -> bool:
    """Whether `node` is a projection's output, seen through splits, views, casts and (LoRA's) adds. An opaque
    non-aten op (transformers' grouped_mm fallback, a quantized linear) counts as a projection."""
    if depth == 0 or not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    if node.target in _PROJECTIONS:
        return True
    if isinstance(node.target, torch._ops.OpOverload) and node.target.namespace not in ("aten", "prims", "liger_fx"):
        return True
    if node.target in _PASS_THROUGH:
        inputs = node.args[:2] if node.target is aten.add.Tensor else node.args[:1]
        return any(_from_projection(a, depth - 1) for a in inputs)
    return False


def _act_name(node: fx.Node) -> str:
    if node.target is aten.silu.default:
        return "silu"
    return "gelu_tanh" if node.kwargs.get("approximate", "none") == "tanh" else "gelu"


def _product(act_node: fx.Node):
    """(mul node, the other operand) of the first multiply that uses the activation, or (None, None)."""
    for user in act_node.users:
        if _is(user, aten.mul.Tensor) and act_node in user.args[:2]:
            other = user.args[1] if user.args[0] is act_node else user.args[0]
            return user, other
    return None, None


def _leaves_unmultiplied(act_node: fx.Node) -> bool:
    """The activation is a graph output and nothing in this graph multiplies it: the gated product, if any, is in a
    later graph. DDPOptimizer cuts there at Llama-1B proportions (liger_fx/distributed.py), as does a graph break.
    Both conditions keep ordinary models out: in a whole graph an activation is never returned bare."""
    return any(u.op == "output" for u in act_node.users) and _product(act_node)[0] is None


def candidates(graph: fx.Graph) -> list[tuple[str, fx.Node]]:
    out = []
    for n in graph.nodes:
        if _is(n, *_ACT_TARGETS) and _from_projection(n.args[0]):
            mul, other = _product(n)
            if (mul is not None and isinstance(other, fx.Node)) or _leaves_unmultiplied(n):
                out.append((ACTS[_act_name(n)][0], n))
    return out


def explain(act_node: fx.Node) -> str:
    if _leaves_unmultiplied(act_node):
        return ("the activation's output leaves the graph (e.g. a DDP bucket boundary or a graph break) before the "
                "multiply by up; neither graph holds the whole act(gate) * up")
    if len(act_node.users) != 1:
        return (f"the {_act_name(act_node)} output has {len(act_node.users)} users; it escapes the gated product "
                "(only act(gate) * up is fused)")
    _, up = _product(act_node)
    return _reason(act_node.args[0], up) or "the activation or its product has an unsupported form"
