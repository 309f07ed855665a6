"""Step 2b of the pipeline (option `fuse_projections`): sibling linears that read one input become one matmul when
one of them is narrow.

    q, k, v = linear(x, Wq, bq), linear(x, Wk, bk), linear(x, Wv, bv)
 -> q, k, v = split_with_sizes(linear(x, cat([Wq, Wk, Wv]), cat([bq, bk, bv])), [nq, nkv, nkv], -1)

Why, measured on the H200 before building it (bench/lab/gemm_levers.py, one layer's projections fwd+bwd, B8 T2048 bf16,
commit 63cc925): the k and v projections of grouped-query attention are narrow matmuls (512 outputs at Llama-3.2-1B,
256 at Qwen2-1.5B) that cuBLAS ran at 415-541 TFLOP/s against 640-760 for the wide ones, and the backward adds their
three input gradients. As one matmul: Llama-3.2-1B 0.988 -> 0.930 ms a layer, Qwen2-1.5B 0.832 -> 0.611, Llama-3-8B
3.886 -> 3.820 (0.9, 6.2 and 0.5 ms a step). Siblings that are all wide gain nothing and pay for the concatenation:
gate/up fused measured -0.04, +0.10 and +0.53 ms a layer on the same shapes. Hence the rule: a group fuses only if
one member has fewer outputs than inputs (out_features < in_features).

The concatenated weight is rebuilt every step and marked for recomputation, so the backward concatenates again
(12-50 MiB a layer of copies) instead of keeping it alive from forward to backward; the weight gradient comes back as
row slices of one buffer (views, no copy). Grouped only: one input node, plain `aten.linear`, weights of one dtype,
device and in_features, and one `requires_grad` (a frozen LoRA base fused with a trained weight would compute a
weight gradient for nothing), biases all present or all absent.
"""

from __future__ import annotations

import logging
import operator

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import guard_bool, statically_known_true
from torch.utils.checkpoint import CheckpointPolicy

from .canonicalize import fake_value, mark_in_code, val as _val, where

log = logging.getLogger("liger_fx")
aten = torch.ops.aten


def _operands(node: fx.Node):
    """(weight, bias or None) of a plain `aten.linear(x, W[, b])` call, else None."""
    if node.op != "call_function" or node.target is not aten.linear.default:
        return None
    args = list(node.args) + [node.kwargs.get("bias")] * (3 - len(node.args))
    w, b = args[1], args[2]
    if not isinstance(w, fx.Node) or not (b is None or isinstance(b, fx.Node)):
        return None
    return w, b


def _key(node: fx.Node):
    """What siblings must share to be one matmul, or None if this linear cannot take part. Their in_features need
    not be in it: every sibling reads one x, so each has x's last dim (under dynamic shapes a symbolic size, which
    is not hashable: a width-1 head beside a symbolic hidden size made this raise, and the graph fall back). A
    symbolic width (a weight passed as a graph input under dynamic=True) cannot take part: the split needs fixed
    widths, and which member is narrow would change with the sizes."""
    ops = _operands(node)
    if ops is None:
        return None
    w, b = ops
    wv, bv, xv = _val(w), _val(b), _val(node.args[0])
    if not all(isinstance(t, torch.Tensor) for t in (wv, xv)) or wv.dim() != 2 or not isinstance(wv.shape[0], int):
        return None
    if b is not None and (not isinstance(bv, torch.Tensor) or bv.dim() != 1 or bv.requires_grad != wv.requires_grad):
        return None
    return wv.dtype, wv.device, wv.requires_grad, b is None


def _has_narrow(widths: list[int], in_features) -> bool:
    """Whether a member has fewer outputs than inputs. A symbolic in_features (a hidden size marked dynamic) decides
    on its value now with a guard, so only a call where the answer differs recompiles (a size no larger than the
    narrowest width); one with no value at compile time (unbacked) declines."""
    narrow = min(widths) < in_features
    if statically_known_true(narrow):
        return True
    if isinstance(narrow, bool) or not narrow.node.has_hint():
        return False
    return guard_bool(narrow)


def _add(graph: fx.Graph, target, args: tuple, meta: dict) -> fx.Node:
    """Insert `target(*args)` with `meta` (the replaced linear's module stack and tags) and its fake value."""
    node = graph.call_function(target, args)
    node.meta = dict(meta)
    node.meta["val"] = fake_value(target, args)
    return node


def _recompute(node: fx.Node) -> None:
    """A parameter concatenation costs a copy of the weights to redo and their full size to keep: redo it."""
    if "recompute" not in node.meta:  # inside a checkpointed region the region's tags already say so
        node.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
        mark_in_code(node, "recompute")


def fuse_sibling_linears(graph: fx.Graph) -> list[str]:
    """Fuse every qualifying group; returns where each fused group sits (its first linear's module)."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    fused = []
    for x in list(graph.nodes):
        groups: dict[tuple, list[fx.Node]] = {}
        for user in x.users:
            key = _key(user) if user.args[0] is x else None
            if key is not None:
                groups.setdefault(key, []).append(user)
        for (_, _, _, no_bias), linears in groups.items():
            widths = [_val(_operands(n)[0]).shape[0] for n in linears]
            if len(linears) < 2 or not _has_narrow(widths, _val(x).shape[-1]):
                continue
            linears.sort(key=order.__getitem__)
            first = linears[0]
            weights = [_operands(n)[0] for n in linears]
            biases = [] if no_bias else [_operands(n)[1] for n in linears]
            if any(order[p] > order[first] for p in weights + biases):
                continue  # a weight computed between the siblings (none in the models we know): leave them
            _fuse(graph, x, linears, weights, biases, widths)
            fused.append(where(first))
            log.debug("liger_fx: %d sibling linears at %s (widths %s) fused into one matmul",
                      len(linears), where(first), widths)
    return fused


def _fuse(graph, x, linears, weights, biases, widths) -> None:
    first = linears[0]
    with graph.inserting_before(first):
        w = _add(graph, aten.cat.default, (weights, 0), first.meta)
        _recompute(w)
        args = (x, w)
        if biases:
            b = _add(graph, aten.cat.default, (biases, 0), first.meta)
            _recompute(b)
            args = (x, w, b)
        y = _add(graph, aten.linear.default, args, first.meta)
        parts = _add(graph, aten.split_with_sizes.default, (y, widths, -1), first.meta)
        outs = [_add(graph, operator.getitem, (parts, i), lin.meta) for i, lin in enumerate(linears)]
    for lin, out in zip(linears, outs):
        lin.replace_all_uses_with(out)
        graph.erase_node(lin)
        if not _only_rotated(out):  # something may save it for backward: give it its own storage
            with graph.inserting_after(out):
                own = _add(graph, aten.clone.default, (out,), out.meta)
            out.replace_all_uses_with(own, delete_user_cb=lambda user: user is not own)


_VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.transpose.int, aten.permute.default,
          aten.unsqueeze.default, aten.squeeze.dim, aten.expand.default, aten.slice.Tensor, aten.select.int,
          aten.t.default, aten.alias.default}


def _only_rotated(node: fx.Node, depth: int = 8) -> bool:
    """Whether node reaches nothing but RoPE (through views). A split part is a view of the fused output, so an op
    that saves a part for its backward keeps the whole (N, nq + 2 nkv) output alive, not its (N, nkv): with
    transformers' SDPA on grouped heads (`enable_gqa`, no repeat) that held 3x v's bytes a layer (CPU test,
    tests/test_projections.py). RoPE saves nothing of its input; anything else gets a copy of its part (N x nkv,
    ~10 us at Llama-3.2-1B B8 T2048) and the whole output dies after the forward's rotation."""
    rotations = (torch.ops.liger_fx.rope.default, torch.ops.liger_fx.rope_qk.default)
    for user in node.users:
        if user.op == "call_function" and user.target in rotations:
            continue
        if user.op == "call_function" and user.target in _VIEWS and user.args[0] is node and depth:
            if _only_rotated(user, depth - 1):
                continue
        return False
    return True
