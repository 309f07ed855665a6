"""Step 1 of the pipeline: one spelling per computation.

Dynamo's graph is torch-level: `x.float()`, `x.to(torch.float32)`, `x.pow(2)`, `x * x`, `F.silu` and `torch.nn.SiLU`
all look different. We retrace it to pre-dispatch ATen under Dynamo's own fake mode (about 0.1 s for a tiny Llama,
0.26 s with a symbolic sequence length), where each cast is one op and each reduction one overload, then apply a few
rewrites that make equal math equal graphs. Patterns are traced by the same `trace_pattern`, so they live in the same
IR and match by structure.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import operator
import re

import torch
import torch.fx as fx
import torch.fx.traceback as fx_traceback
from torch._dispatch.python import enable_python_dispatcher
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily
from torch.fx.experimental.proxy_tensor import make_fx

aten = torch.ops.aten


def to_aten(gm: fx.GraphModule, example_inputs) -> fx.GraphModule:
    """Retrace a Dynamo graph to canonical pre-dispatch ATen; node metadata (module path, stack trace) survives."""
    from .causal_mask import is_marked

    fake_mode = detect_fake_mode(example_inputs)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    args = []
    for value, node in zip(example_inputs, placeholders):
        if isinstance(value, torch.Tensor):
            # Converting in Dynamo's mode returns the memoized fake, symbolic sizes included. A fresh fake mode
            # would break Dynamo's guard creation (DESIGN.md, checked on torch 2.13).
            args.append(fake_mode.from_tensor(value) if fake_mode else value)
        else:
            args.append(node.meta.get("example_value", value))
    gm = inline_checkpoints(gm)
    ctx = fake_mode if fake_mode is not None else contextlib.nullcontext()
    with ctx, fx_traceback.preserve_node_meta():
        traced = make_fx(_Retrace(gm).run, pre_dispatch=True)(*args)
    # Dead code first: a vmap's `out_dims` move of its untracked real output is traced too, unused (the recorded
    # vmap nodes carry the value), and its constant is no lost tensor.
    traced.graph.eliminate_dead_code()
    _no_fake_constants(traced)
    # The traced values drop requires_grad; keep it on the inputs, so a guard can tell a learned tensor from a buffer.
    # Also Dynamo's name of the input (e.g. "L['kwargs']['shift_labels']"): make_fx renames placeholders arg<i>_1.
    for node, value, orig, real in zip((n for n in traced.graph.nodes if n.op == "placeholder"), args, placeholders,
                                       example_inputs):
        node.meta["requires_grad"] = bool(getattr(value, "requires_grad", False))
        source = getattr(orig.meta.get("grapharg"), "source", None)
        name = getattr(source, "name", orig.name)  # a property on torch 2.13, a method on older torch
        node.meta["source_name"] = name() if callable(name) else str(name)
        # What a guard on this input needs (causal_mask.MaskPlan); and whether it is a causal mask an earlier graph
        # handed on, relied on only where Dynamo can be asked to guard on its mark.
        if source is not None and torch._guards.TracingContext.try_get() is not None:
            node.meta["dynamo_source"] = source
            if is_marked(real):
                node.meta["causal_mask_marked"] = True
    canonicalize(traced.graph)
    traced.recompile()
    return traced


class _Retrace(fx.Interpreter):
    """Runs Dynamo's graph under make_fx, keeping its functorch transforms (a `torch.vmap` in the model) as graph
    nodes.

    Dynamo writes a vmap as `torch._functorch.predispatch._add_batch_dim`, the body on the batched tensor, then
    `_remove_batch_dim`. make_fx's pre-dispatch tracer records those calls only while torch.export runs
    (`torch.compiler.is_exporting()`); otherwise they run for real, the body runs under the batching rules below the
    tracer, and the vmap's output reaches the trace as an untracked tensor, lifted as a constant: a FakeTensor
    attribute, made from the traced inputs of this one call. Seen: transformers 5.25 builds Gemma3's sliding-window
    mask for an image with vmap (`_tensor_constant7`, the (B, 1, T, T) mask); AOTAutograd then refused the graph
    ("expected FakeTensor for arg"), and had it accepted it, the mask of the first batch would have been baked in.
    We hand those calls to the tracer's own pre-dispatch handler, as export does: they stay nodes, the body is traced
    on the batched tensors (logical shapes, as in Dynamo's graph), and AOTAutograd runs the vmap as it does for
    Dynamo's graph."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        if any(_is_functorch_call(n) for n in gm.graph.nodes):
            _keep_functorch_calls()

    def call_function(self, target, args, kwargs):
        if _is_functorch_call(target):
            mode = _pre_dispatch_function_mode()
            if mode is not None:
                return mode.__torch_function__(target, (), args, kwargs)
        if target in _BELOW_DISPATCH:
            mode = _pre_dispatch_function_mode()
            if mode is not None:
                return _record(mode.tracer, target, args, kwargs)
        return super().call_function(target, args, kwargs)


# Functions that make a tensor without going through the dispatcher, so make_fx never sees the op and lifts the
# result as a constant, a FakeTensor attribute standing for an input. `param.data` (Dynamo's `_get_data_attr`) is
# one: Gemma-3n clamps `self.prediction_coefs.weight.data` in place every forward; retraced, the clamp mutated a
# constant aliasing the parameter, and AOTAutograd refused the graph ("non-differentiable view input mutations ...
# _tensor_constant1 and args[17] share storage"): it fell back. Recorded as a node, as in Dynamo's graph.
_BELOW_DISPATCH = {torch._C._autograd._get_data_attr}


def _record(tracer, target, args, kwargs):
    """Run `target` and record it as one node of the trace, its result tracked (what make_fx's pre-dispatch mode
    does for the functorch calls above)."""
    from torch.fx.experimental.proxy_tensor import _fetch_proxies_and_all_constant_flag, track_tensor_tree

    _, proxies, _ = _fetch_proxies_and_all_constant_flag(args, tracer)
    out = tracer.create_proxy("call_function", target, proxies, kwargs)
    result = target(*args, **kwargs)
    track_tensor_tree(result, out, constant=None, tracer=tracer)
    return result


def _no_fake_constants(gm: fx.GraphModule) -> None:
    """A FakeTensor constant in the retraced graph is a value the tracer lost track of (it stands for this one
    call's inputs): raise, naming where the model made it, rather than compile it."""
    for node in gm.graph.nodes:
        if node.op == "get_attr" and isinstance(getattr(gm, node.target, None), FakeTensor):
            made = (node.meta.get("stack_trace") or "").strip().splitlines()[-1:] or ["?"]
            raise RuntimeError(f"the retrace lost track of a tensor (lifted as the constant {node.target}); made by "
                               f"`{made[0].strip()}`")


def _is_functorch_call(x) -> bool:
    target = x.target if isinstance(x, fx.Node) else x
    return getattr(target, "__module__", None) == "torch._functorch.predispatch"


@functools.cache
def _keep_functorch_calls() -> None:
    """Tell fx's dead-code elimination that entering and leaving a vmap (or jvp) level has a side effect: their int
    results are unused, and without this every `eliminate_dead_code` (ours, the pattern matcher's) drops them, and
    the batched ops between them fail ("your tensor may have escaped from inside a function being vmapped").
    Registered once, when a graph first holds such calls; it is true of these functions everywhere."""
    from torch._functorch import predispatch
    from torch.fx.node import has_side_effect

    for name in ("_vmap_increment_nesting", "_vmap_decrement_nesting", "_jvp_increment_nesting",
                 "_jvp_decrement_nesting", "_enter_dual_level", "_exit_dual_level", "lazy_load_decompositions"):
        fn = getattr(predispatch, name, None)
        if fn is not None:
            has_side_effect(fn)


def _pre_dispatch_function_mode():
    from torch.fx.experimental.proxy_tensor import PreDispatchTorchFunctionMode

    modes = [m for m in torch.overrides._get_current_function_mode_stack()
             if isinstance(m, PreDispatchTorchFunctionMode)]
    return modes[-1] if modes else None


def inline_checkpoints(gm: fx.GraphModule) -> fx.GraphModule:
    """Inline each activation-checkpointed region (`tag_activation_checkpoint(body, *args)`, what Dynamo makes of a
    non-reentrant `torch.utils.checkpoint`, e.g. HF gradient checkpointing) into a copy of the graph, tagging its
    nodes as AOTAutograd's own tracing of that op does: `recompute=PREFER_RECOMPUTE` and one increasing
    `ac_graph_id` per region. The partitioner then recomputes them in the backward as before, and the patterns see
    the layer body.

    Why: left as a sub-graph, the body is invisible to the matcher, and on torch 2.13 pre-dispatch tracing of the op
    raises (KeyError `_checkpoint_context_fn`, read for selective checkpointing only), so a checkpointed tiny Llama
    fell back to plain Inductor with 0 of 5 norms fused. Both tags are in torch.fx.proxy._COPY_META_FIELDS, so they
    survive our retrace, the pattern replacement and AOTAutograd's. A region with a selective-checkpointing policy
    (`context_fn`) is left alone: its per-op policy cannot be replayed as tags here. Dynamo's own graph is not
    touched (the fallback compiles it as it was).
    """
    from torch.utils.checkpoint import CheckpointPolicy

    hop = torch.ops.higher_order.tag_activation_checkpoint

    def inlinable(node):
        if node.op != "call_function" or node.target is not hop or node.args[0].op != "get_attr":
            return False
        body = getattr(gm, node.args[0].target)
        return "_checkpoint_context_fn" not in body.meta and all(
            u.op == "call_function" and u.target is operator.getitem for u in node.users
        )

    if not any(inlinable(n) for n in gm.graph.nodes):
        return gm
    gm = fx.GraphModule(gm, copy.deepcopy(gm.graph))  # shares the sub-modules, owns its graph
    graph = gm.graph
    for region, node in enumerate([n for n in graph.nodes if inlinable(n)], start=1):
        body = getattr(gm, node.args[0].target)
        env = dict(zip([n for n in body.graph.nodes if n.op == "placeholder"], node.args[1:]))
        with graph.inserting_before(node):
            for b in body.graph.nodes:
                if b.op == "placeholder":
                    continue
                if b.op == "output":
                    outs = fx.map_arg(b.args[0], env.__getitem__)
                    break
                if b.op == "get_attr":  # a constant or nested sub-graph: carry it over under a fresh name
                    name = f"_ckpt{region}_{b.target.replace('.', '_')}"
                    setattr(gm, name, getattr(body, b.target))
                    new = graph.get_attr(name)
                    new.meta = dict(b.meta)
                else:
                    new = graph.node_copy(b, env.__getitem__)
                new.meta["recompute"] = CheckpointPolicy.PREFER_RECOMPUTE
                new.meta["ac_graph_id"] = region
                mark_in_code(new, f"ckpt{region}")
                env[b] = new
        for u in list(node.users):
            u.replace_all_uses_with(outs[u.args[1]])
            graph.erase_node(u)
        graph.erase_node(node)
    graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def mark_in_code(node: fx.Node, tag: str) -> None:
    """Put a recompute tag into the node's name, hence into the graph's code. AOTAutograd's cache keys a graph by
    its code, not its node metadata: without this, a layer compiled once with recompute tags and once without (the
    same model checkpointed or not; option `recompute` on or off) shares one cache entry and gets the other's
    partition. Seen on the H200: `recompute=False` after `recompute=True` came back from the cache in 8 s with the
    recomputing partition's peak memory."""
    if not node.name.endswith("_" + tag):
        node._rename(f"{node.name}_{tag}")


def trace_pattern(fn, args, **_ignored) -> fx.GraphModule:
    """Trace a pattern's search or replacement function into the same IR as `to_aten` (the trace_fn for patterns)."""
    # The fake mode of the arguments themselves: `detect_fake_mode` would return Dynamo's ambient mode even for the
    # real tensors we trace patterns with at build time.
    fakes = [a for a in args if isinstance(a, FakeTensor)]
    ctx = fakes[0].fake_mode if fakes else unset_fake_temporarily()
    with ctx, fx_traceback.preserve_node_meta():
        gm = make_fx(fn, pre_dispatch=True)(*args)
    canonicalize(gm.graph)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


# --------------------------------------------------------------------------------------------------------------
# Normalizations. Each one keeps `meta["val"]` valid so later guards can read dtypes and shapes.

_CASTS = {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.type_as.default, aten.to.other}


def val(node):
    """The fake value a traced node carries (None for a non-node argument): what every pass reads shapes from."""
    return node.meta.get("val") if isinstance(node, fx.Node) else None


_val = val


def fake_value(target, args, kwargs=None):
    """`target(*args, **kwargs)` on the nodes' fake values: the `val` of a node a pass inserts. Under the python
    dispatcher, which decomposes composite ops (linear) on symbolic sizes: torch 2.11 without it raised "Cannot call
    numel() on tensor with symbolic sizes" under dynamic=True (seen on the H200, liger_fx/projections.py)."""
    vals = fx.map_arg((tuple(args), kwargs or {}), _val)
    tensors = []
    fx.node.map_aggregate(vals, lambda v: tensors.append(v) if isinstance(v, torch.Tensor) else None)
    fake_mode = detect_fake_mode(tensors)
    with fake_mode if fake_mode is not None else contextlib.nullcontext(), enable_python_dispatcher():
        return target(*vals[0], **vals[1])


def _replace(graph: fx.Graph, node: fx.Node, target, args, kwargs=None) -> fx.Node:
    """Insert `target(*args)` before `node`, give it node's metadata and a fresh fake value, and take its uses."""
    with graph.inserting_before(node):
        new = graph.call_function(target, tuple(args), kwargs or {})
    new.meta = dict(node.meta)
    new.meta["val"] = fake_value(target, args, kwargs)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    return new


def _cast_target_dtype(node: fx.Node):
    """The dtype a cast node produces if it changes nothing but dtype, else None."""
    src, out = _val(node.args[0]), _val(node)
    if not isinstance(src, torch.Tensor) or not isinstance(out, torch.Tensor):
        return None
    if src.device != out.device or src.layout != out.layout:
        return None
    if node.kwargs.get("memory_format") not in (None, torch.preserve_format):
        return None
    return out.dtype


_ENTER_AUTOCAST = torch.amp.autocast_mode._enter_autocast
_EXIT_AUTOCAST = torch.amp.autocast_mode._exit_autocast
_RELATIVE_CASTS = {aten.type_as.default, aten.to.other}  # the dtype comes from a second tensor


def _sets_dtype(node: fx.Node) -> bool:
    """Whether a cast names its result's dtype itself (`x.to(torch.float32)`, `_to_copy(x, dtype=...)`)."""
    if node.target is aten.to.dtype:
        return True
    return node.target in (aten.to.dtype_layout, aten._to_copy.default) and node.kwargs.get("dtype") is not None


def autocast_dtype_unknown(graph: fx.Graph) -> set[fx.Node]:
    """The nodes whose traced dtype may not be the dtype they have at run time, because of autocast regions entered
    inside the graph.

    Pre-dispatch tracing records `_enter_autocast`/`_exit_autocast` but does not apply autocast (it runs above the
    Autocast dispatch key), so a linear inside an enabled region reads fp32 here and runs in bf16. Such a value, and
    anything computed from it without an explicit cast, has an unknown dtype. Inside a region that DISABLES autocast
    for the node's device (the innermost region for that device decides, `torch.autocast(dev, enabled=False)`: the
    RMSNorm bodies of OLMo-style trainers) ops run in the dtypes of their inputs, as traced: a value there is
    unknown only if an input is. A cast that names its dtype (`.float()`, `.to(torch.bfloat16)`) is known wherever it
    is (autocast never changes a cast), so the explicit upcast at the top of a norm makes the rest of its body known.
    """
    regions: list[tuple[str, bool]] = []  # (device type, enabled), innermost last
    unknown: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is _ENTER_AUTOCAST:
            enabled = node.args[2] if len(node.args) > 2 and node.args[2] is not None else True
            regions.append((node.args[0], bool(enabled)))
            continue
        if node.target is _EXIT_AUTOCAST:
            if regions:
                regions.pop()
            continue
        v = _val(node)
        outs = v if isinstance(v, (tuple, list)) else (v,)
        first = next((t for t in outs if isinstance(t, torch.Tensor)), None)  # the device the node runs on
        if node.target in _CASTS and _sets_dtype(node):
            continue
        if node.target in _CASTS and node.target not in _RELATIVE_CASTS:  # `_to_copy` without a dtype: x's dtype
            if node.args[0] in unknown:
                unknown.add(node)
            continue
        if any(a in unknown for a in node.all_input_nodes):
            unknown.add(node)
        elif first is not None and node.target not in _RELATIVE_CASTS:
            state = next((enabled for dev, enabled in reversed(regions) if dev == first.device.type), False)
            if state:
                unknown.add(node)
    return unknown


def normalize_casts(graph: fx.Graph) -> None:
    """Every dtype-only cast becomes `aten.to.dtype`; a cast to the dtype a tensor already has disappears.

    The second matters most: in an fp32 model `x.to(torch.float32)` returns x itself, so the tracer hands the cast node
    to every later use of x (the residual add too); the cast then has users outside the RMSNorm and the match is
    refused. Seen on a tiny fp32 Llama: 1 of 5 norms matched before this pass, 5 of 5 after.

    Under autocast entered inside the graph a cast that looks like a no-op may be real: the linear in an enabled
    region reads fp32 here but runs in bf16 (seen: `.float()` of autocast logits dropped, loss 4.125 vs eager
    4.1126). Such casts of a value whose dtype is not known (`autocast_dtype_unknown`) are kept, marked
    `meta["autocast_kept"]` for the near-miss reasons; every other no-op cast goes, inside a region with autocast
    disabled too. Before, any autocast in the graph kept every cast: an RMSNorm body written inside
    `torch.autocast(dev, enabled=False)` kept `weight.type_as(x)`, which read x as a second use of the normalized
    tensor, and never fused.
    """
    unknown = autocast_dtype_unknown(graph) if any(
        n.op == "call_function" and n.target is _ENTER_AUTOCAST for n in graph.nodes) else set()
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _CASTS:
            continue
        dtype = _cast_target_dtype(node)
        if dtype is None:
            continue
        src = node.args[0]
        if _val(src).dtype == dtype:
            if src in unknown or (node.target in _RELATIVE_CASTS and node.args[1] in unknown):
                node.meta["autocast_kept"] = True
                if node.target is not aten.to.dtype or len(node.args) != 2 or node.kwargs:
                    _replace(graph, node, aten.to.dtype, (src, dtype)).meta["autocast_kept"] = True
                continue
            node.replace_all_uses_with(src)
            graph.erase_node(node)
        elif node.target is not aten.to.dtype or len(node.args) != 2 or node.kwargs:
            _replace(graph, node, aten.to.dtype, (src, dtype))


def expand_rms_norm(graph: fx.Graph) -> None:
    """torch's own RMSNorm (`nn.RMSNorm`, `F.rms_norm`, `torch.rms_norm`) written out as the ops it computes, so that
    the RMSNorm patterns see it as they see a hand-written norm:

        xf = x.to(float32); y = xf * rsqrt(mean(xf^2, -1, keepdim=True) + eps); y = y * w.to(float32); y.to(x.dtype)

    What it lowers to depends on the tracer and the device. `aten.rms_norm` is CompositeImplicitAutograd; its
    composite calls `aten._fused_rms_norm` (torch 2.13's native_functions.yaml: CUDA, XPU and MPS kernels, and the
    same composite elsewhere; a weight of another dtype than x's takes the composite everywhere). Pre-dispatch
    tracing, ours, runs no CompositeImplicit decomposition (proxy_tensor's proxy_call skips it when pre_dispatch, as
    since torch 2.1, so on 2.11 too), so our graphs hold `aten.rms_norm` on every device: checked on torch 2.13
    with fake CPU and CUDA tensors. A graph traced below autograd holds `_fused_rms_norm` on CUDA (output 0 the
    result, output 1 the rstd) and the composite's ops on the CPU, which are a hand-written norm already. Both ops
    get this expansion; their semantics, the composite's and the CUDA kernel's alike: the weight multiplies in fp32
    (a bf16 weight upcast first: exact, as promotion does it), one rounding to x's dtype; eps=None is the
    computation dtype's machine epsilon (fp32's for fp32, bf16 and fp16 inputs). A norm over several trailing dims
    is expanded too, so that its near miss says which dims it reduces. The rstd output of `_fused_rms_norm`, where
    used, becomes the rsqrt node (the pattern then refuses it: it escapes)."""
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is aten.rms_norm.default:
            result, rstd_users = node, []
        elif node.target is aten._fused_rms_norm.default:
            gets = list(node.users)
            if not all(g.target is operator.getitem for g in gets):
                continue
            result = next((g for g in gets if g.args[1] == 0), None)
            rstd_users = [g for g in gets if g.args[1] == 1]
        else:
            continue
        args = list(node.args) + [None] * (4 - len(node.args))
        x, shape = args[0], args[1]
        w = args[2] if args[2] is not None else node.kwargs.get("weight")
        eps = args[3] if args[3] is not None else node.kwargs.get("eps")
        xv = _val(x)
        if not isinstance(xv, torch.Tensor) or not xv.is_floating_point() or not shape or len(shape) > xv.dim():
            continue
        opmath = torch.float64 if xv.dtype == torch.float64 else torch.float32
        if eps is None:
            eps = torch.finfo(opmath).eps
        dims = [-i - 1 for i in reversed(range(len(shape)))]

        def add(target, *a):
            with graph.inserting_before(node):
                new = graph.call_function(target, tuple(a))
            new.meta = dict(node.meta)
            new.meta["val"] = fake_value(target, a)
            return new

        xf = add(aten.to.dtype, x, opmath) if xv.dtype != opmath else x
        rstd = add(aten.rsqrt.default, add(aten.add.Tensor, add(aten.mean.dim, add(aten.pow.Tensor_Scalar, xf, 2),
                                                                    dims, True), eps))
        y = add(aten.mul.Tensor, xf, rstd)
        if w is not None:
            wv = _val(w)
            wf = add(aten.to.dtype, w, opmath) if wv.dtype in (torch.bfloat16, torch.float16) else w
            y = add(aten.mul.Tensor, y, wf)
        if _val(y).dtype != xv.dtype:
            y = add(aten.to.dtype, y, xv.dtype)
        for old, new in [(result, y)] + [(g, rstd) for g in rstd_users]:
            if old is not None:
                old.replace_all_uses_with(new)
                if old is not node:
                    graph.erase_node(old)
        graph.erase_node(node)


def normalize_arithmetic(graph: fx.Graph) -> None:
    """`x*x` and `square(x)` become `pow(x, 2)`; `1/sqrt(v)`, `pow(v, -0.5)` become `rsqrt(v)`; `x / sqrt(v)`
    becomes `x * rsqrt(v)`."""
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        t, a = node.target, node.args
        if t is aten.mul.Tensor and len(a) == 2 and a[0] is a[1] and isinstance(a[0], fx.Node):
            _replace(graph, node, aten.pow.Tensor_Scalar, (a[0], 2))
        elif t is aten.square.default:
            _replace(graph, node, aten.pow.Tensor_Scalar, (a[0], 2))
        elif t is aten.pow.Tensor_Scalar and a[1] == -0.5:
            _replace(graph, node, aten.rsqrt.default, (a[0],))
        elif t is aten.reciprocal.default and _is(a[0], aten.sqrt.default):
            _replace(graph, node, aten.rsqrt.default, (a[0].args[0],))
        elif t is aten.div.Tensor and _is(a[1], aten.sqrt.default) and len(a[1].users) == 1:
            sqrt = a[1]
            with graph.inserting_before(node):
                r = graph.call_function(aten.rsqrt.default, (sqrt.args[0],))
            r.meta = dict(sqrt.meta)
            r.meta["val"] = _val(sqrt)  # rsqrt has sqrt's shape and dtype
            _replace(graph, node, aten.mul.Tensor, (a[0], r))
            graph.erase_node(sqrt)


_TRANSPOSES = {aten.t.default, aten.numpy_T.default, aten.transpose.int, aten.permute.default}


def _transposed_2d(node):
    """W if node is W.t() (or .T, transpose, permute) of a 2-D W, else None."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target in _TRANSPOSES):
        return None
    w = node.args[0]
    if not isinstance(_val(w), torch.Tensor) or _val(w).dim() != 2:
        return None
    if node.target is aten.transpose.int and sorted(d % 2 for d in node.args[1:3]) != [0, 1]:
        return None
    if node.target is aten.permute.default and [d % 2 for d in node.args[1]] != [1, 0]:
        return None
    return w


def normalize_linear(graph: fx.Graph) -> None:
    """`h @ W.t()` (matmul or mm with a transposed 2-D weight) becomes `linear(h, W)`: the same product, and the
    spelling of torchtitan's and nanoGPT-style lm_heads (`F.cross_entropy((h @ W.t()).float(), labels)`), which the
    loss family would otherwise not see as an lm_head."""
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (aten.matmul.default, aten.mm.default):
            continue
        h, wt = node.args[:2]
        w = _transposed_2d(wt)
        hv = _val(h)
        if w is None or not isinstance(hv, torch.Tensor) or hv.dim() < 1 or hv.dtype != _val(w).dtype:
            continue
        if getattr(hv, "fake_mode", None) is not getattr(_val(w), "fake_mode", None):
            continue  # a constant lifted with a fake mode of its own (a pattern's closure): leave it
        _replace(graph, node, aten.linear.default, (h, w))


def _is(node, target) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is target


# Ops whose `dim` argument we rewrite to a negative index, so `mean(2)` on a 3-D tensor reads as `mean(-1)`:
# target -> (position of dim in args, whether it is a list)
_DIM_ARGS = {
    aten.mean.dim: (1, True),
    aten.sum.dim_IntList: (1, True),
    aten.amax.default: (1, True),
    aten.cat.default: (1, False),
    aten.slice.Tensor: (1, False),
    aten.split.Tensor: (2, False),
    aten.split_with_sizes.default: (2, False),
    aten.chunk.default: (2, False),
    aten.unsqueeze.default: (1, False),
    aten.stack.default: (1, False),
    aten.select.int: (1, False),
    aten._softmax.default: (1, False),
    aten.softmax.int: (1, False),
    aten.log_softmax.int: (1, False),
}


def normalize_dims(graph: fx.Graph) -> None:
    for node in graph.nodes:
        spec = _DIM_ARGS.get(node.target) if node.op == "call_function" else None
        if spec is None:
            continue
        pos, is_list = spec
        src = node.args[0][0] if node.target in (aten.cat.default, aten.stack.default) else node.args[0]
        val = _val(src)
        if not isinstance(val, torch.Tensor):
            continue
        rank = val.dim() + (1 if node.target in (aten.unsqueeze.default, aten.stack.default) else 0)
        args = list(node.args)
        if len(args) <= pos:
            continue
        dims = args[pos]
        if is_list:
            if not isinstance(dims, (list, tuple)):
                continue
            args[pos] = [d - rank if isinstance(d, int) and d >= 0 else d for d in dims]
        elif isinstance(dims, int) and dims >= 0:
            args[pos] = dims - rank
        node.args = tuple(args)


_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unflatten.int,
             aten.flatten.using_ints}


def same_sizes(a, b) -> bool:
    """Shapes equal without guarding on a symbolic size (a sequence length compares equal only to itself)."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return len(a) == len(b) and all(statically_known_true(x == y) for x, y in zip(a, b))


def equal_sizes(a, b) -> bool:
    """Sizes equal, guarding where they are symbolic and equal now: two inputs that must agree row for row (a mask
    and the hidden states, the ids and the hidden states) get separate symbols for their lengths from Dynamo (s0 - 1
    against s1 - 1 after a shift). A call where they differ recompiles, and there the sizes are unequal."""
    from torch.fx.experimental.symbolic_shapes import guard_bool

    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        eq = x == y
        if not (eq if isinstance(eq, bool) else guard_bool(eq)):
            return False
    return True


def grad_regions(graph: fx.Graph) -> dict:
    """node -> the grad mode set by the last `_set_grad_enabled` before it (None: the caller's)."""
    mode, out = None, {}
    for n in graph.nodes:
        if n.op == "call_function" and n.target is torch._C._set_grad_enabled:
            mode = bool(n.args[0])
        out[n] = mode
    return out


def normalize_pair_views(graph: fx.Graph) -> None:
    """The even/odd pairs of interleaved RoPE in one spelling each: a view, reshape or unflatten that splits the last
    dim into (n, 2) becomes `unflatten(x, -1, [-1, 2])`, one that merges a trailing pair back becomes
    `flatten(x, -2, -1)`, and `x.unbind(d)[i]` becomes `x.select(d, i)`.

    Why: models write the same split as `x.reshape(*x.shape[:-1], -1, 2)` (Meta's Llama), `x.view(b, h, s, d // 2, 2)`
    (DeepSeek), `x.unflatten(-1, (-1, 2))` or einops' `rearrange`, and the merge as `flatten(-2)`, `flatten(3)` or
    `view(x.shape)`. Their size lists hold the batch and sequence length, as ints or as symbolic-size nodes, so a
    pattern traced at one shape matches none of them; the canonical forms hold only -1, -2 and 2. Only tensors of 3
    or more dims with a trailing pair of exactly 2 are touched (a q or k is 3-D or 4-D): a (B, T) label tensor's
    `view(-1)` or a packed gate/up `view(..., 2, I)` stays as it was, for the families that walk through views.
    All of these are views wherever the original was one (a split of one dim always is), so aliasing is unchanged.
    """
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is operator.getitem and _is(node.args[0], aten.unbind.int):
            unbind = node.args[0]
            dim = unbind.args[1] if len(unbind.args) > 1 else unbind.kwargs.get("dim", 0)
            _replace(graph, node, aten.select.int, (unbind.args[0], dim, node.args[1]))
            if not unbind.users:
                graph.erase_node(unbind)
            continue
        if (node.target in (aten.squeeze.dim, aten.squeeze.dims) and isinstance(_val(node.args[0]), torch.Tensor)
                and _val(node.args[0]).dim() >= 4 and same_sizes(_val(node.args[0]).shape[-1:], (1,))
                and node.args[1] in (-1, [-1], (-1,), _val(node.args[0]).dim() - 1, [_val(node.args[0]).dim() - 1])):
            # `.squeeze(-1)` of a trailing 1 merges it as `flatten(-2, -1)` does (complex RoPE on halves writes
            # its result as cat(chunk(view_as_real(.), 2, -1), -2), of shape (..., D, 1))
            _replace(graph, node, aten.flatten.using_ints, (node.args[0], -2, -1))
            continue
        if node.target not in _RESHAPES:
            continue
        src, out = _val(node.args[0]), _val(node)
        if not isinstance(src, torch.Tensor) or not isinstance(out, torch.Tensor) or src.dim() < 3:
            continue
        if (out.dim() == src.dim() + 1 and same_sizes(out.shape[:-2], src.shape[:-1])  # splits the last dim
                and same_sizes(out.shape[-1:], (2,)) and node.args[1:] != (-1, [-1, 2])):
            _replace(graph, node, aten.unflatten.int, (node.args[0], -1, [-1, 2]))
        elif (src.dim() >= 4 and out.dim() == src.dim() - 1 and same_sizes(out.shape[:-1], src.shape[:-2])  # merges
              and (same_sizes(src.shape[-1:], (2,)) or same_sizes(src.shape[-1:], (1,)))
              and node.args[1:] != (-2, -1)):
            _replace(graph, node, aten.flatten.using_ints, (node.args[0], -2, -1))


_END = 2**63 - 1  # the end tracing gives an open slice `x[..., h:]`


def normalize_half_views(graph: fx.Graph) -> None:
    """`x.view(*x.shape[:-1], 2, h).unbind(-2)` (or a reshape/unflatten into (2, h) and `[..., i, :]`) is x's two
    halves: each part becomes the slice `x[..., :h]` or `x[..., h:]` that HF's rotate_half writes, the same view
    (same storage offset, sizes and strides). Why: a rotate-half spelled so reads the halves through a view whose
    sizes hold the batch and sequence length, which no pattern can spell; as slices the halves patterns match it.
    Runs after normalize_pair_views, which makes unbind's parts selects."""
    for node in list(graph.nodes):
        if not _is(node, aten.select.int):
            continue
        view, dim, index = node.args[0], node.args[1], node.args[2]
        if not (isinstance(view, fx.Node) and view.op == "call_function"
                and (view.target in _RESHAPES or view.target is aten.unflatten.int)):
            continue
        src, out = _val(view.args[0]), _val(view)
        if not isinstance(src, torch.Tensor) or not isinstance(out, torch.Tensor) or out.dim() != src.dim() + 1:
            continue
        h = out.shape[-1]
        if (dim % out.dim() != out.dim() - 2 or not same_sizes(out.shape[:-2], src.shape[:-1])
                or not same_sizes(out.shape[-2:-1], (2,)) or not isinstance(h, int) or src.shape[-1] != 2 * h
                or index not in (0, 1, -1, -2)):
            continue
        first = index in (0, -2)
        _replace(graph, node, aten.slice.Tensor, (view.args[0], -1, 0 if first else h, h if first else _END))
        if not view.users:
            graph.erase_node(view)


def drop_full_slices(graph: fx.Graph) -> None:
    """A slice that keeps every element (`x[:, :, :, ::2]`'s leading colons over a symbolic length; tracing drops
    them only over static sizes) is x itself: the same storage, offset, sizes and strides. Seen: GPT-J's
    rotate_every_two matched at a static length and missed at the dynamic one, its x1 being
    `slice(slice(x, -3, 0, 2**63 - 1), -1, 0, 2**63 - 1, 2)` there."""
    for node in list(graph.nodes):
        if not _is(node, aten.slice.Tensor):
            continue
        start = node.args[2] if len(node.args) > 2 else 0
        step = node.args[4] if len(node.args) > 4 else 1
        out, src = _val(node), _val(node.args[0])
        if (start in (0, None) and step == 1 and isinstance(out, torch.Tensor) and isinstance(src, torch.Tensor)
                and same_sizes(out.shape, src.shape)):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)


def dedupe_selects(graph: fx.Graph) -> None:
    """One node per `select` of one tensor with equal arguments. Why: ChatGLM writes its rotation as
    `xs[..., 0] * c - xs[..., 1] * s` and `xs[..., 1] * c + xs[..., 0] * s`, and tracing makes a node of each
    `xs[..., 0]`, so the pattern, which uses x1 twice, sees two tensors. Two equal views of one tensor are one tensor
    (the same memory). Selects only: merging equal slices too made the slices of a model's second, separate
    `rotate_half(q)` shared with its rotation's, which then escaped the pattern (tests/patterns/test_rope.py,
    test_rotate_half_used_elsewhere...: 1 of 2 rotations fused)."""
    seen: dict = {}
    for node in list(graph.nodes):
        if not _is(node, aten.select.int):
            continue
        key = (node.args[0], repr(node.args[1:]), repr(sorted(node.kwargs.items())))
        if key in seen:
            node.replace_all_uses_with(seen[key])
            graph.erase_node(node)
        else:
            seen[key] = node


def canonicalize(graph: fx.Graph) -> None:
    expand_rms_norm(graph)
    normalize_casts(graph)
    normalize_arithmetic(graph)
    normalize_linear(graph)
    drop_full_slices(graph)
    normalize_pair_views(graph)  # before normalize_dims: the selects it makes take unbind's dim as written
    normalize_half_views(graph)
    normalize_dims(graph)
    dedupe_selects(graph)  # after normalize_dims: x[..., 0] and x[:, :, :, 0] are one view
    graph.eliminate_dead_code()


# --------------------------------------------------------------------------------------------------------------
_PREFIX = re.compile(r"^(L\['[^']*'\](\[\d+\])?(\.|$))+")


def where(node: fx.Node) -> str:
    """The module path a node was computed in, e.g. `model.layers.0.input_layernorm`, from Dynamo's metadata."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "<top>"
    path = list(stack.values())[-1][0]
    path = _PREFIX.sub("", path)
    path = re.sub(r"\._modules\['([^']*)'\]", r".\1", path)
    return path or "<top>"
