"""lm_head + cross-entropy: a linear feeding `cross_entropy`, as transformers 5 computes the causal-LM loss
(`ForCausalLMLoss`), the masked-LM loss (BERT/RoBERTa) or a training loop on labels its loader already shifted.

    logits = linear(h, W[, b])                    h may be a slice for logits_to_keep (it stays outside)
    [softcap: tanh(logits / c) * c]               Gemma2 final_logit_softcapping (in the model's dtype)
    [scale: logits * s  or  logits / s]           Cohere multiplies, Granite divides
    [.float()]                                    anywhere in between
    loss = cross_entropy(logits.view(-1, V), labels, ignore_index, reduction)    ["sum" then / num_items_in_batch]

flag `fused_linear_cross_entropy`:
- where the loss is the logits' only use (the HF hook's training step, a loop that keeps only the loss): replaced by
  `liger_fx::linear_cross_entropy(h, W, b, labels, ...)`, which never materializes the logits;
- where the logits are also used (`model(ids, labels=labels)` returns them): the linear and the loss become one
  `liger_fx::lm_head_cross_entropy`, which computes the logits once and fuses the loss's gradient with the logits'
  own, so the step runs three lm_head matmuls as an unfused model does (recorded with the suffix `/logits-returned`;
  the INFO line says `lm_head+CE on returned logits`). Fusing the loss alone there cost ~26 ms of extra matmuls per
  Llama-3.2-1B step on the H200 (issue 14). Where the logits are only returned, the backend then takes them out of
  the graph's autograd (`detach_returned_logits`, end of this file) so that no zeros gradient of N x V is made for
  them; their gradient is attached outside the graph (the INFO line adds "their gradient outside the graph").
The label pad + shift and the division by num_items_in_batch (int or tensor) stay in the graph untouched.
flag `cross_entropy`: where no linear feeds the loss (or the flag above is off), the loss on the materialized logits
becomes `liger_fx::cross_entropy` (fp32 math without an fp32 copy of the logits).

Scope: every cross-entropy on class-index targets, whatever produced the targets (HF's shift, a loader that shifted
them already, masked-LM labels). An earlier version fused only causal-LM losses so that BERT/RoBERTa would read "no
applicable patterns"; a masked-LM head's linear + cross-entropy is the same computation at the same size (V = 30522
or 50265 classes) and now fuses too (issue 16).

Why a walk and not `Pattern`s: the chain between the lm_head and the loss is any order of casts, scalar mul/div,
views and at most one tanh (2 x 3 x 2 x 3 = 36 search variants with Inductor's matcher), and a plain
`model(ids, labels=labels)` also returns the logits, so the linear (Gemma2: the softcapped logits) has a user outside
the loss, which the matcher must refuse. Here the chain is folded into the op's (softcap, logit_scale): scalars
before the tanh fold into the cap (c * tanh(a*x / c) = a * (c/a) * tanh(x / (c/a))), scalars after it into the scale.
Intermediates with other users simply stay in the graph for them.
"""

from __future__ import annotations

import contextlib
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch._inductor.pattern_matcher import stable_topological_sort

from liger_fx.canonicalize import val as _val
from liger_fx.rewrite import Pattern, record_replacement, scalar_hint, specialize

aten = torch.ops.aten
FLCE, CE = "fused_linear_cross_entropy", "cross_entropy"

_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.alias.default,
          aten.contiguous.default, aten.clone.default}
_REDUCTION = {1: "mean", 2: "sum"}


def patterns() -> list[Pattern]:
    return []  # matched by `rewrite` below


def _is(node, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


@dataclass
class _Loss:
    """What the walk back from one `cross_entropy_loss` found."""

    source: fx.Node | None = None  # the logits before any cast/softcap/scale/view
    target: fx.Node | None = None
    ignore_index: int = -100
    reduction: str = "mean"
    softcap: float = 0.0
    scale: float = 1.0
    shared: bool = False  # an intermediate (or the linear) has users outside the loss
    row_slices: list = field(default_factory=list)  # slices of non-vocabulary dims, moved onto h (last first)
    reason: str | None = None  # why neither op can take this loss
    linear_reason: str | None = None  # why the fused linear op cannot (source is not a usable linear)
    symbolic: list = field(default_factory=list)  # float inputs of the graph folded into softcap/scale (dynamic=True)


def _tensor_arg(node: fx.Node) -> fx.Node:
    """The input the chain continues through: the first arg, or for `scalar * x` the second."""
    a = node.args[0]
    return node.args[1] if _is(node, aten.mul.Tensor) and scalar_hint(a) is not None else a


def _ce_args(ce: fx.Node) -> dict:
    schema = ce.target._schema.arguments
    vals = {a.name: a.default_value for a in schema if a.has_default_value()}
    vals.update(zip([a.name for a in schema], ce.args))
    vals.update(ce.kwargs)
    return vals


def _fold(chain: list[fx.Node]) -> tuple[float, float, str | None]:
    """(softcap, logit_scale, reason) for the elementwise chain, in forward order."""
    pre, post, capped = 1.0, 1.0, False
    for node in chain:
        if _is(node, aten.tanh.default):
            if capped:
                return 0.0, 1.0, "two tanh between the lm_head and the loss"
            capped, post = True, pre  # tanh(a*x) = a * c * tanh(x / c) with c = 1/|a|
        elif _is(node, aten.mul.Tensor, aten.div.Tensor):
            # A constant, or a float input of the graph (dynamic=True makes Gemma2's final_logit_softcapping one),
            # pinned by a guard when the loss is replaced (`_Loss.symbolic`).
            a, b = scalar_hint(node.args[0]), scalar_hint(node.args[1])
            if (a is None) == (b is None):
                return 0.0, 1.0, f"the logits are scaled by a tensor ({node.target}), not a constant"
            k = b if a is None else a
            if _is(node, aten.div.Tensor):
                if a is not None:
                    return 0.0, 1.0, "a constant divided by the logits"
                k = 1.0 / k
            if capped:
                post *= k
            else:
                pre *= k
    if not capped:
        return 0.0, pre, None
    if pre == 0:
        return 0.0, 1.0, "the logits are multiplied by 0 before the tanh"
    # Gemma2's x / 30 ... * 30 folds to a post scale of (1/30) * 30, which fp64 may round off 1.0 by an ulp.
    return 1.0 / abs(pre), 1.0 if abs(post - 1.0) < 1e-12 else post, None


def _args_reason(args: dict, xv, tv) -> str | None:
    if args.get("weight") is not None:
        return "a class weight (the fused ops have none)"
    if args.get("label_smoothing", 0.0) != 0.0:
        return f"label_smoothing={args['label_smoothing']} (the fused ops have none)"
    if args.get("reduction") not in _REDUCTION:
        return "reduction='none' (per-token losses; the fused ops reduce)"
    if not isinstance(args.get("ignore_index"), int):
        return "ignore_index is not a constant int"
    if xv.dim() != 2 or tv.dim() != 1:
        return f"input is {xv.dim()}-D and target {tv.dim()}-D; the fused ops take (N, V) logits, (N,) targets"
    if tv.is_floating_point():
        return "probability targets (float), not class indices"
    return None


def _walk(x: fx.Node, V, out: _Loss) -> str | None:
    """From the loss input back to the logits' source through views, row slices, fp32 casts, scalar mul/div and
    tanh; fills out.source, shared, row_slices, softcap, scale. Returns a reason if the chain cannot be folded."""
    chain, node = [], x
    while True:
        if not isinstance(node, fx.Node):  # e.g. `c / logits`: the chain reached the constant, not the logits
            return "the logits are a divisor (a constant divided by them), which does not fold into a scale"
        out.shared |= len(node.users) > 1
        if _is(node, *_VIEWS):
            v = _val(node.args[0])
            if v is None or v.dim() == 0 or v.shape[-1] != V:
                return f"a {node.target} changes the vocabulary dim before the loss"
            if out.row_slices and tuple(v.shape) != tuple(_val(node).shape):
                return "a reshape before a row slice of the logits"  # the slice's dims would not be h's
        elif _is(node, aten.slice.Tensor):
            if node.args[1] == -1:  # canonical dims are negative
                return "the vocabulary dim is sliced before the loss"
            out.row_slices.append(node)  # rows only (e.g. the old `logits[:, :-1]` shift): commutes with the linear
        elif _is(node, aten.to.dtype):
            if node.args[1] != torch.float32:
                return f"a cast to {node.args[1]} before the loss (the fused ops compute in fp32)"
        elif _is(node, aten.mul.Tensor, aten.div.Tensor, aten.tanh.default):
            chain.append(node)
        else:
            break
        node = _tensor_arg(node)
    out.source = node
    out.softcap, out.scale, reason = _fold(chain[::-1])
    out.symbolic = [a for n in chain for a in n.args[:2] if isinstance(a, fx.Node) and scalar_hint(a) is not None]
    sv = _val(node)
    if reason is None and (sv is None or not sv.is_floating_point() or sv.dtype == torch.float64):
        reason = "the logits are not fp32/bf16/fp16"
    return reason


def _analyze(ce: fx.Node) -> _Loss:
    out = _Loss()
    args = _ce_args(ce)
    x, out.target = args["self"], args["target"]
    xv, tv = _val(x), _val(out.target)
    if xv is None or tv is None:
        out.reason = "no shape information"
        return out
    chain_reason = _walk(x, xv.shape[-1], out)
    out.reason = _args_reason(args, xv, tv) or chain_reason
    if out.reason is None:
        out.ignore_index, out.reduction = args["ignore_index"], _REDUCTION[args["reduction"]]
        out.linear_reason = _linear_reason(out.source, xv.shape[-1])
    return out


def _linear_reason(node: fx.Node, V: int) -> str | None:
    if not _is(node, aten.linear.default):
        return f"the loss input is computed by {node.target if node.op == 'call_function' else node.op}, not a linear"
    h, w, b = node.args[0], node.args[1], node.args[2] if len(node.args) > 2 else None
    hv, wv, bv = _val(h), _val(w), _val(b)
    if hv is None or wv is None or (b is not None and bv is None):
        return "no shape information on the lm_head's inputs"
    if wv.dim() != 2 or wv.shape[0] != V or hv.shape[-1] != wv.shape[1]:
        return f"lm_head weight {tuple(wv.shape)} does not map hidden {hv.shape[-1]} to {V} classes"
    if b is not None and (bv.dim() != 1 or bv.dtype != wv.dtype):
        return "lm_head bias is not a (V,) vector of the weight's dtype"
    if hv.dtype != wv.dtype:
        return f"hidden states are {hv.dtype}, lm_head weight {wv.dtype}"
    if len({t.device for t in (hv, wv) + ((bv,) if b is not None else ())}) != 1:
        return "lm_head inputs on different devices"
    return None


def _autocast_regions(graph: fx.Graph) -> dict:
    """node -> the in-graph autocast regions (their `_enter_autocast` nodes) open at it. The fused op runs where the
    loss was; autocast applies to it there (see `_linear_cross_entropy`), so the lm_head must be in the same regions."""
    enter, exit_ = torch.amp.autocast_mode._enter_autocast, torch.amp.autocast_mode._exit_autocast
    open_, out = [], {}
    for n in graph.nodes:
        if n.op == "call_function" and n.target is enter:
            open_.append(n)
        elif n.op == "call_function" and n.target is exit_ and n.args and n.args[0] in open_:
            open_.remove(n.args[0])
        out[n] = tuple(open_)
    return out


def _region_reason(ce: fx.Node, linear: fx.Node, regions: dict | None = None) -> str | None:
    regions = regions if regions is not None else _autocast_regions(ce.graph)
    if regions.get(linear) != regions.get(ce):
        return "the lm_head and the loss are in different autocast regions"
    return None


def _insert(graph: fx.Graph, ce: fx.Node, target, args) -> fx.Node:
    """`target(*args)` before ce with ce's metadata and a fake value."""
    with graph.inserting_before(ce):
        node = graph.call_function(target, tuple(args))
    node.meta = {k: v for k, v in ce.meta.items() if k != "val"}
    vals = fx.map_arg(args, _val)
    mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
    with mode if mode is not None else contextlib.nullcontext():
        node.meta["val"] = target(*vals)
    return node


def _replace(graph: fx.Graph, ce: fx.Node, loss: _Loss, fused_linear: bool) -> str:
    """Replace the loss; returns the pattern name for the record. Three forms:
    - the loss is the logits' only use: `linear_cross_entropy`, no logits at all;
    - the logits are used besides (returned): `lm_head_cross_entropy`, the logits computed once and both gradients
      taken in one backward (kernels/fused_linear_cross_entropy.py: three lm_head matmuls, not six). With a row
      slice between the logits and the loss (the pre-4.46 `logits[:, :-1]` shift) the loss covers fewer rows than
      the logits: the linear then stays and `cross_entropy` takes the loss on its output, also three matmuls;
    - no usable linear (flag `cross_entropy`): `cross_entropy` on the materialized logits."""
    src = loss.source
    for scalar in loss.symbolic:  # the op takes softcap and scale as constants: guard the values they were read at
        specialize(scalar)
    common = (loss.target, loss.ignore_index, loss.reduction, float(loss.softcap), float(loss.scale))
    returned = fused_linear and loss.shared
    bias = fused_linear and len(src.args) > 2 and src.args[2] is not None
    if returned and not loss.row_slices:
        h, w = src.args[0], src.args[1]
        b = src.args[2] if len(src.args) > 2 else None
        # logits_grad spelled out (True: the logits keep their gradient path; detach_returned_logits may set False):
        # the argument is then in the graph's code, which keys AOTAutograd's and Inductor's caches; left to its
        # default, graphs cached before the argument existed came back calling the inner op without it.
        pair = _insert(graph, ce, torch.ops.liger_fx.lm_head_cross_entropy.default, (h, w, b, *common, True))
        logits = _insert(graph, ce, operator.getitem, (pair, 0))
        new = _insert(graph, ce, operator.getitem, (pair, 1))
        src.replace_all_uses_with(logits)  # the loss chain dies with ce below; what the caller gets now reads these
    elif fused_linear and not returned:
        h, w = src.args[0], src.args[1]
        b = src.args[2] if len(src.args) > 2 else None
        for sl in reversed(loss.row_slices):  # in forward order
            h = _insert(graph, ce, aten.slice.Tensor, (h, *sl.args[1:]))
        new = _insert(graph, ce, torch.ops.liger_fx.linear_cross_entropy.default, (h, w, b, *common))
    else:
        x = src
        for sl in reversed(loss.row_slices):
            x = _insert(graph, ce, aten.slice.Tensor, (x, *sl.args[1:]))
        x = _insert(graph, ce, aten.reshape.default, (x, [-1, _val(src).shape[-1]]))
        pair = _insert(graph, ce, torch.ops.liger_fx.cross_entropy.default, (x, *common))
        new = _insert(graph, ce, operator.getitem, (pair, 0))
    if _val(ce).dtype != torch.float32:  # torch's loss has the logits' dtype when nothing upcast them
        new = _insert(graph, ce, aten.to.dtype, (new, _val(ce).dtype))
    ce.replace_all_uses_with(new)
    graph.erase_node(ce)
    if returned and not loss.row_slices:
        graph.erase_node(src)
        # Users of the logits that stood before the loss now read a node defined at the loss: move them after it.
        stable_topological_sort(graph)
    name = FLCE if fused_linear else CE
    name += f"/{loss.reduction}" + ("/softcap" if loss.softcap else "") + ("/scale" if loss.scale != 1.0 else "")
    return name + ("/bias" if bias else "") + (RETURNED if returned else "")


RETURNED = "/logits-returned"
"""Suffix of a replacement where the logits are also used: lm_head kept as one matmul, CE fused with its gradient
(`GraphRecord.summary` says `lm_head+CE on returned logits`)."""


def rewrite(graph: fx.Graph, config) -> None:
    regions = None
    for ce in [n for n in graph.nodes if _is(n, aten.cross_entropy_loss.default)]:
        loss = _analyze(ce)
        if loss.reason is not None:
            continue
        if loss.linear_reason is None:
            regions = regions or _autocast_regions(graph)
            loss.linear_reason = _region_reason(ce, loss.source, regions)
        if getattr(config, FLCE) and loss.linear_reason is None:
            flag = FLCE
        elif getattr(config, CE):
            flag = CE
        else:
            continue
        name = _replace(graph, ce, loss, flag == FLCE)
        record_replacement(flag, name, ce)  # reads ce's module path from its metadata, kept after erasure


# --------------------------------------------------------------------------------------------------------------
# Candidates and near-miss reasons


def candidates(graph: fx.Graph) -> list[tuple[str, fx.Node]]:
    out = []
    for ce in graph.nodes:
        if _is(ce, aten.cross_entropy_loss.default):
            loss = _analyze(ce)
            out.append((FLCE if loss.source is not None and _is(loss.source, aten.linear.default) else CE, ce))
    return out


def explain(ce: fx.Node) -> str:
    loss = _analyze(ce)
    if loss.reason is None and loss.linear_reason is None:
        loss.linear_reason = _region_reason(ce, loss.source)
    return loss.reason or loss.linear_reason or "the loss input has an unsupported form"


# --------------------------------------------------------------------------------------------------------------
# Returned logits: their gradient taken outside the compiled graph


_RESHAPES = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.alias.default)


@dataclass
class ReturnedLogits:
    """Where the compiled graph's caller re-attaches the gradient of returned logits (backend.py, step 5): output
    `outputs[i]` for i in `positions` is a row-major view of the logits of `h @ W^T (+ b)`, and `h`, `W`, `b` are the
    extra outputs at `extra` (b: None without a bias)."""
    positions: list[int]
    extra: tuple[int, int, int | None]


def detach_returned_logits(graph: fx.Graph) -> list[ReturnedLogits]:
    """Take the returned logits of each `lm_head_cross_entropy` out of the graph's autograd (`logits_grad=False`) and
    add the op's h, W (and b) as graph outputs, where the logits reach the graph's outputs only through views.

    Why: AOTAutograd's compiled function is one autograd.Function, and autograd hands every output that requires
    grad a gradient in the backward; for logits the caller never differentiates (`model(ids, labels=ids).loss
    .backward()`) it makes one of zeros, N x V (3.9 GiB at B8 T2048, V 128256, bf16), allocated as the backward
    starts, i.e. at the step's peak, and read once by the op's backward (measured on the H200: 3.914 GiB alive at
    the peak of 30.00 GiB, allocated with no Python frame). With the logits non-differentiable inside, the caller
    attaches their gradient with `kernels.fused_linear_cross_entropy.reattach_logits_grad`, whose backward runs only
    when something differentiates the logits. Logits used by anything else in the graph (a z-loss, a softcap
    applied to what is returned) keep their gradient path inside: returns []."""
    out_node = next(n for n in reversed(graph.nodes) if n.op == "output")
    outs = out_node.args[0]
    if not isinstance(outs, (tuple, list)):
        return []
    specs = []
    extra = []
    for op in [n for n in graph.nodes if _is(n, torch.ops.liger_fx.lm_head_cross_entropy.default)]:
        if op.args[8] is not True:  # already decided
            continue
        logits = [u for u in op.users if u.target is operator.getitem and u.args[1] == 0]
        chain, ok, frontier = set(), True, list(logits)
        while frontier and ok:
            n = frontier.pop()
            chain.add(n)
            for u in n.users:
                if u is out_node:
                    continue
                if u.op == "call_function" and u.target in _RESHAPES and u.args[0] is n:
                    frontier.append(u)
                else:
                    ok = False
        positions = [i for i, o in enumerate(outs) if isinstance(o, fx.Node) and o in chain]
        if not ok or not positions:
            continue
        v = _val(op.args[1]).shape[0]
        if any(_val(outs[i]).shape[-1] != v for i in positions):  # a view that moved the vocabulary axis
            continue
        op.args = (*op.args[:8], False)
        h, w, b = op.args[0], op.args[1], op.args[2]
        start = len(outs) + len(extra)
        extra += [h, w] + ([b] if b is not None else [])
        specs.append(ReturnedLogits(positions, (start, start + 1, start + 2 if b is not None else None)))
    if extra:
        out_node.args = (type(outs)([*outs, *extra]),)
    return specs
