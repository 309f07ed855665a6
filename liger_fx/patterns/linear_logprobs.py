"""lm_head + per-token log-probs and entropies: the vocabulary-sized part of post-training (GRPO/PPO/DPO) as one op.

    logits = linear(h, W[, b])  [row slices, .float(), / temperature (also in place), softcap]   -> x
    log-prob   log_softmax(x, -1).gather(-1, ids[..., None])             -> z_t - lse
               x.gather(-1, ids[..., None]) - logsumexp(x, -1)            -> z_t, lse    (TRL selective_log_softmax)
    entropy    -(exp(lp) * lp).sum(-1), -(softmax(x) * lp).sum(-1)         -> -ent        (lp = log_softmax(x))
               logsumexp(x, -1) - (softmax(x) * x).sum(-1)                -> lse, lse - ent
flag `fused_linear_logprobs`: every such use of one x becomes `liger_fx::linear_logprobs(h, W, b, ids, ...)`
(kernels/fused_linear_logprobs.py), whose outputs replace the gathered, reduced values; the N x V logits, their
fp32 copy and their log-softmax are never made. The rest (the subtraction, masks, sums per sequence, DPO's sigmoid,
GRPO's clipped ratios) stays in the graph for Inductor. Loops over row chunks of x (TRL's per-row and 128-row loops)
are first made one computation (patterns/_row_chunks.py).

Grad mode: TRL computes a reference model's log-probs, and the policy's entropy, under `torch.no_grad()`. A use in a
grad-disabled region must stay without gradient, one in an enabled region keep it: the uses of one x are fused per
region, each with its own op at the region's first use (the no-grad one runs its forward only, one lm_head matmul).

Why a walk and not `Pattern`s: the uses of one x are several nodes that share it (a gather and a logsumexp, or an
entropy beside the log-probs), and all of them must be replaced for the logits to die; the chain from the lm_head
is the loss family's (`linear_cross_entropy._walk`: casts, scalars, softcap, row slices, views).
Per-token cross-entropy (`reduction="none"`, the same op) belongs to the loss family and its flag.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from liger_fx.canonicalize import equal_sizes, grad_regions, same_sizes, val as _val
from liger_fx.patterns._row_chunks import chunk_of, merge_row_chunks
from liger_fx.patterns.linear_cross_entropy import (_VIEWS, _autocast_regions, _insert, _is, _region_reason,
                                                    erase_dead_chain, logits_source)
from liger_fx.rewrite import Pattern, record_miss, record_replacement, specialize

aten = torch.ops.aten
FLAG = "fused_linear_logprobs"

_LOG_SOFTMAX = (aten.log_softmax.int, aten._log_softmax.default)
_SOFTMAX = (aten.softmax.int, aten._softmax.default)
# What marks a site: a log-softmax or a logsumexp of lm_head logits. A softmax alone does not: a MoE router's
# softmax(linear(h)) feeds a top-k (Mixtral: 2 sites of 2 layers were counted as misses when it did); every entropy
# spelling has a log-softmax or a logsumexp beside its softmax.
_ANCHORS = (*_LOG_SOFTMAX, aten.logsumexp.default)
_SUMS = (aten.sum.dim_IntList,)


def patterns() -> list[Pattern]:
    return []  # matched by `rewrite` below


@dataclass
class _Use:
    node: fx.Node  # what is replaced
    kind: str  # "logp": z_t - lse | "zt" | "lse" | "negent": -ent | "ez": sum p z = lse - ent
    idx: fx.Node | None = None
    keepdim: bool = False
    flat: bool = False  # taken from x.reshape(-1, V): the value is reshaped to rows


@dataclass
class _Site:
    x: fx.Node
    uses: list = field(default_factory=list)
    inner: set = field(default_factory=set)  # the N x V intermediates (log-softmax, softmax, products) that die
    reason: str | None = None


def _last_dim(node, pos=1, is_list=False) -> bool:
    """Whether the op at `node` works on the last dim only."""
    if len(node.args) <= pos:
        return False
    dims = node.args[pos] if is_list else [node.args[pos]]
    rank = _val(node.args[0]).dim()
    return isinstance(dims, (list, tuple)) and len(dims) == 1 and isinstance(dims[0], int) and (
        dims[0] == -1 or dims[0] == rank - 1)


def _keepdim(node, pos=2) -> bool:
    return bool(node.args[pos]) if len(node.args) > pos else bool(node.kwargs.get("keepdim", False))


def _flat_rows(n) -> bool:
    """`x.reshape(-1, V)` (view, flatten(0, 1), ...): the rows of x in order, as TRL's entropy_from_logits flattens."""
    if not _is(n, *_VIEWS):
        return False
    v, src = _val(n), _val(n.args[0])
    return (isinstance(v, torch.Tensor) and isinstance(src, torch.Tensor) and v.dim() == 2 and src.dim() >= 2
            and same_sizes(v.shape[-1:], src.shape[-1:]))


def root_of(x: fx.Node) -> fx.Node:
    """x with row flattening views stripped: uses of the flat rows are uses of the same logits."""
    while _flat_rows(x) and _val(x.args[0]).dim() >= 2:
        x = x.args[0]
    return x


def _classify(x: fx.Node, flat: bool = False) -> _Site:
    """Every use of x, as a value the op gives, or the reason one cannot be."""
    site = _Site(x)
    probs, logps = set(), set()  # softmax(x) and exp(log_softmax(x)); log_softmax(x)
    for u in x.users:
        if not flat and _flat_rows(u):
            sub = _classify(u, flat=True)
            if sub.reason is not None:
                return _refuse(site, sub.reason)
            site.uses += sub.uses
            site.inner |= sub.inner | {u}
        elif _is(u, *_LOG_SOFTMAX) and _last_dim(u):
            if _is(u, aten.log_softmax.int) and len(u.args) > 2 and u.args[2] not in (None, torch.float32):
                site.reason = f"log_softmax computes in {u.args[2]}"
                return site
            logps.add(u)
        elif _is(u, *_SOFTMAX) and _last_dim(u):
            probs.add(u)
        elif _is(u, aten.logsumexp.default) and _last_dim(u, 1, True):
            site.uses.append(_Use(u, "lse", keepdim=_keepdim(u), flat=flat))
        elif _is(u, aten.gather.default) and u.args[0] is x and _last_dim(u):
            site.uses.append(_Use(u, "zt", u.args[2], flat=flat))
        elif not _is(u, aten.mul.Tensor):  # products are judged from their softmax side below
            return _refuse(site, f"the logits are also used by {_name(u)} (beyond log-probs and entropies)")
    for lp in logps:
        for u in lp.users:
            if _is(u, aten.gather.default) and u.args[0] is lp and _last_dim(u):
                site.uses.append(_Use(u, "logp", u.args[2], flat=flat))
            elif _is(u, aten.exp.default):
                probs.add(u)
            elif not _is(u, aten.mul.Tensor):
                return _refuse(site, f"the log-softmax is also used by {_name(u)} (beyond gathered log-probs and "
                                     "the entropy)")
    products = {u for n in (x, *logps, *probs) for u in n.users if _is(u, aten.mul.Tensor)}
    for p in probs:
        if any(u not in products for u in p.users):
            return _refuse(site, "the softmax is used beyond the entropy (only sum(p * log p) and sum(p * z) fuse)")
    for m in products:
        a, b = m.args[:2]
        kinds = {("p" if n in probs else "lp" if n in logps else "x" if n is x else None) for n in (a, b)}
        kind = {frozenset({"p", "lp"}): "negent", frozenset({"p", "x"}): "ez"}.get(frozenset(kinds))
        users = list(m.users)
        if kind is None or len(users) != 1 or not _is(users[0], *_SUMS) or not _last_dim(users[0], 1, True):
            return _refuse(site, f"a product of the logits' softmax terms is not summed over the vocabulary "
                                 f"({_name(m)} of {sorted(k for k in kinds if k)})")
        site.uses.append(_Use(users[0], kind, keepdim=_keepdim(users[0]), flat=flat))
        site.inner.add(m)
    site.inner |= logps | probs
    if not site.uses and not flat:
        return _refuse(site, "no per-token value is taken from the logits' softmax (nothing to fuse)")
    return site


def _refuse(site: _Site, reason: str) -> _Site:
    site.reason = reason
    return site


def _name(node: fx.Node) -> str:
    return str(node.target) if node.op == "call_function" else node.op


def _index_reason(uses: list) -> str | None:
    if len({u.idx for u in uses if u.idx is not None}) > 1:
        return "log-probs gathered at two different index tensors (the op gathers one per token)"
    for use in uses:
        if use.idx is None:
            continue
        iv, xv = _val(use.idx), _val(use.node.args[0])  # the index and what it gathers from
        if iv is None or iv.dim() != xv.dim() or not same_sizes(iv.shape[-1:], (1,)):
            return "more than one gathered value per token (top-K); the op gathers one"
        if not equal_sizes(iv.shape[:-1], xv.shape[:-1]):
            return "the index covers fewer tokens than the logits"
    return None


def _replace_group(graph: fx.Graph, site: _Site, found, uses: list, order: dict, grad) -> str:
    src = found.source
    h, w = src.args[0], src.args[1]
    b = src.args[2] if len(src.args) > 2 else None
    idxs = {u.idx for u in uses if u.idx is not None}
    entropy = any(u.kind in ("negent", "ez") for u in uses)
    # Before the group's first use, so in its grad region; the index feeds a gather of the group, so it is defined.
    first = min((u.node for u in uses), key=order.__getitem__)
    for sl in reversed(found.row_slices):
        h = _insert(graph, first, aten.slice.Tensor, (h, *sl.args[1:]))
    target = _insert(graph, first, aten.squeeze.dim, (next(iter(idxs)), -1)) if idxs else None
    stats = _insert(graph, first, torch.ops.liger_fx.linear_logprobs.default,
                    (h, w, b, target, _NO_IGNORE, float(found.softcap), float(found.scale), entropy))
    outs = {i: _insert(graph, first, operator.getitem, (stats, i)) for i in (0, 1, 2)}
    out = outs.__getitem__  # the ones not used die in dead-code elimination

    for use in uses:
        node = use.node
        if use.kind == "logp":
            new = _insert(graph, node, aten.unsqueeze.default, (_insert(graph, node, aten.sub.Tensor, (out(0), out(1))),
                                                                 -1))
        elif use.kind == "zt":
            new = _insert(graph, node, aten.unsqueeze.default, (out(0), -1))
        elif use.kind == "lse":
            new = out(1)
        elif use.kind == "negent":
            new = _insert(graph, node, aten.neg.default, (out(2),))
        else:  # "ez"
            new = _insert(graph, node, aten.sub.Tensor, (out(1), out(2)))
        if use.kind in ("lse", "negent", "ez") and use.keepdim:
            new = _insert(graph, node, aten.unsqueeze.default, (new, -1))
        if use.flat:  # x's leading shape -> the flattened rows the use had
            new = _insert(graph, node, aten.reshape.default, (new, [-1] + [1] * (_val(node).dim() - 1)))
        if _val(node).dtype != torch.float32:  # torch's value has the logits' dtype when nothing upcast them
            new = _insert(graph, node, aten.to.dtype, (new, _val(node).dtype))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    kinds = []
    if idxs:
        kinds.append("logprob")
    if entropy:
        kinds.append("entropy")
    if not kinds:
        kinds.append("logsumexp")
    name = f"{FLAG}/" + "+".join(kinds) + ("/softcap" if found.softcap else "") + (
        "/scale" if found.scale != 1.0 else "") + ("/bias" if b is not None else "")
    return name + ("/no-grad" if grad is False else "")


_NO_IGNORE = -(2**31)  # kernels/fused_linear_logprobs.NO_IGNORE: a gather has no ignored tokens


# --------------------------------------------------------------------------------------------------------------
# The pass


_REASONS: dict = {}
"""anchor node -> why its site was not fused, from the last `rewrite` (read by `explain`)."""


def _accept_chunks(sources, nodes) -> bool:
    """Merge a loop over row chunks of lm_head logits whose body is log-softmax / entropy work (not a loss: the loss
    family owns those)."""
    if any(_is(n, aten.cross_entropy_loss.default) for n in nodes) or not any(_is(n, *_ANCHORS) for n in nodes):
        return False
    for x in sources:
        xv = _val(x)
        if isinstance(xv, torch.Tensor) and xv.is_floating_point():
            found = logits_source(root_of(x))
            return found.reason is None and found.linear_reason is None and not found.shared
    return False


def _sites(graph: fx.Graph) -> dict:
    """x -> its anchors (log_softmax, logsumexp consuming it), for every x that comes from a linear."""
    out: dict = {}
    for n in graph.nodes:
        if _is(n, *_ANCHORS):
            x = n.args[0]
            chunk = chunk_of(x)
            key = root_of(chunk[0] if chunk is not None else x)
            found = logits_source(key)
            if found.source is not None and _is(found.source, aten.linear.default):
                out.setdefault(key, []).append(n)
    return out


def rewrite(graph: fx.Graph, config) -> None:
    _REASONS.clear()
    if not getattr(config, FLAG):
        return
    merged = merge_row_chunks(graph, _accept_chunks)
    merged_anchors = {n for m in merged for n in _upstream_anchors(m)}
    for x, anchors in _sites(graph).items():
        if getattr(x, "_erased", False):
            continue
        reason = _fuse_site(graph, x)
        if reason is None:
            continue
        for a in anchors:
            _REASONS[a] = reason
            if a in merged_anchors:  # not among the candidates taken before the merge
                record_miss(FLAG, a, reason)
    graph.eliminate_dead_code()


def _upstream_anchors(node: fx.Node) -> set:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen or not isinstance(n, fx.Node):
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return {n for n in seen if _is(n, *_ANCHORS)}


def _fuse_site(graph: fx.Graph, x: fx.Node) -> str | None:
    """Fuse every use of x (one op per grad region); the reason where it cannot."""
    found = logits_source(x)
    if found.reason is not None or found.linear_reason is not None:
        return found.reason or found.linear_reason
    if found.shared:
        return ("the logits are also used elsewhere (returned, or read by another op): the fused op would compute "
                "them a second time beside the materialized ones")
    if any(chunk_of(u) is not None for n in (x, *(u for u in x.users if _flat_rows(u))) for u in n.users):
        return "a loop over row chunks of the logits whose body does more than log-probs and entropies"
    site = _classify(x)
    if site.reason is not None:
        return site.reason
    autocast = _autocast_regions(graph)
    for use in site.uses:
        reason = _region_reason(use.node, found.source, autocast)
        if reason is not None:
            return reason
    reason = _index_reason(site.uses)
    if reason is not None:
        return reason
    grads = grad_regions(graph)
    groups: dict = {}
    for use in site.uses:
        groups.setdefault(grads[use.node], []).append(use)
    for scalar in found.symbolic:  # the op takes softcap and scale as constants: guard the values read
        specialize(scalar)
    order = {n: i for i, n in enumerate(graph.nodes)}
    for grad, uses in groups.items():
        anchor = min((u.node for u in uses), key=order.__getitem__)
        name = _replace_group(graph, site, found, uses, order, grad)
        record_replacement(FLAG, name, anchor)
    for n in sorted(site.inner, key=order.__getitem__, reverse=True):  # products, then softmaxes, then log-softmax
        if not n.users:
            graph.erase_node(n)
    erase_dead_chain(graph, found.nodes)
    return None


# --------------------------------------------------------------------------------------------------------------
# Candidates and near-miss reasons


def candidates(graph: fx.Graph) -> list[tuple[str, fx.Node]]:
    """One anchor per lm_head site and grad region: the first log_softmax / logsumexp of logits that come from a
    linear (through row chunks of a loop too)."""
    grads = grad_regions(graph)
    out, seen = [], set()
    for x, anchors in _sites(graph).items():
        for a in anchors:
            key = (x, grads[a])
            if key not in seen:
                seen.add(key)
                out.append((FLAG, a))
    return out


def explain(node: fx.Node) -> str:
    if node in _REASONS:
        return _REASONS[node]
    x = node.args[0]
    chunk = chunk_of(x)
    found = logits_source(root_of(chunk[0] if chunk is not None else x))
    return found.reason or found.linear_reason or "the log-softmax's uses have an unsupported form"
