"""Distillation: the divergence between a student's and a teacher's next-token distributions, each from its own
lm_head, as one op that never makes their N x V logits (kernels/fused_linear_divergence.py).

What trainers write (s = student_lm_head(h_s), t = teacher_lm_head(h_t); t often under torch.no_grad() in the same
compiled function, or `.detach()`ed; T a temperature):
    F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), reduction=..., log_target=True) * T**2   forward KL
    F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean")                       forward KL
    F.kl_div(F.log_softmax(t / T, -1), F.log_softmax(s / T, -1), log_target=True)                          reverse KL
    (p_t * (log p_t - log p_s)).sum(-1)                                                       a KL written out
    m = 0.5 * (p + q);  0.5 * F.kl_div(m.log(), p, ...) + 0.5 * F.kl_div(m.log(), q, ...)                  JSD
    TRL's GKD / Liger: lm = logsumexp(stack([lp_s + log(1 - b), lp_t + log(b)]), 0);
                       jsd = b * kl_div(lm, lp_t, "none", True) + (1 - b) * kl_div(lm, lp_s, "none", True)   JSD(b)
then reduced: by kl_div itself (sum, mean, batchmean = sum / size(0)), or `.sum(-1)` per token and then
`.mean()`, `.sum()`, `(x * mask).sum()` (completion masks), or per-token values used otherwise.
flag `fused_linear_distillation`: the vocabulary-sized part becomes `liger_fx::linear_divergence(h_s, W_s, b_s,
h_t, W_t, b_t, row_weight, divergence, beta, 1/T_s, 1/T_t, reduction)`:
- a scalar (kl_div's reductions, a sum or mean of the per-token values, a masked sum): the reduced op, which takes
  the student's gradient in the forward (the 4 lm_head matmuls of the step, the floor); a mask (a tensor that does
  not require grad, of the per-token shape) multiplying the per-token values before the sum becomes its row_weight;
- per-token values used any other way: the per-row op (`reduction="none"`), whose backward recomputes the logits.
Everything downstream stays in the graph: the T**2, batchmean's division, the mask's count, the mean over
sequences, a hard-label loss added to it (on the same student logits it is then fused by `linear_cross_entropy`,
which runs after this family). Constant factors inside the divergence (0.5 * KL + 0.5 * KL) are multiplied back
onto the op's result in the graph.

Which side is the student: the one whose logits reach the divergence with a gradient path (no detach, not under
no_grad, something upstream requires grad); the other is the teacher. A teacher under no_grad or detached gets
its inputs detached where the op is inserted, so a teacher whose parameters still require grad gets none, as in
eager. When both sides learn (mutual learning) the op forms both gradients. The divergence is read in whichever
direction the roles give: KL(student || teacher) is the reverse KL, JSD's beta is the teacher's mixture weight
(Liger's and TRL's convention; kernels/fused_linear_divergence.py).

Why a walk and not `Pattern`s: the spellings above are dozens of search graphs (log_target or not, mixture by
softmaxes or by logsumexp, each KL reduced by kl_div or after the combination, constants as floats, 0-d tensors
or graph inputs, temperature as division or multiplication, casts, views, row slices, detach), and the teacher's
logits are made in another grad-mode region than the loss. Here each node in the vocabulary-sized region gets a
small symbolic value (the logits of a side, a log-probability, a probability, a mixture, a linear combination of
pointwise KL terms sum_j p (log p - log q), reduced or not), and a divergence is recognised from the final
combination: {KL(a||b)}, or {beta KL(t||m), (1-beta) KL(s||m)} with m = beta t + (1-beta) s. An intermediate used
outside the divergence (a log-softmax also returned) keeps the whole site unfused: the N x V tensors would exist
anyway, and the near miss names it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch._inductor.pattern_matcher import stable_topological_sort

from liger_fx.canonicalize import equal_sizes, grad_regions, same_sizes, val as _val, where
from liger_fx.patterns.linear_cross_entropy import _autocast_regions, _insert, _is, _region_reason
from liger_fx.rewrite import Pattern, record_replacement, requires_grad, scalar_hint, specialize

aten = torch.ops.aten
FLAG = "fused_linear_distillation"

_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.alias.default,
          aten.contiguous.default, aten.clone.default)
_LOG_SOFTMAX = (aten.log_softmax.int, aten._log_softmax.default)
_SOFTMAX = (aten.softmax.int, aten._softmax.default)
_KL_RED = {0: None, 1: "mean", 2: "sum"}
_CONST_OPS = {aten.lift_fresh_copy.default, aten.detach_.default, aten.detach.default, aten.clone.default,
              aten.neg.default, aten.log.default, aten.log1p.default, aten.exp.default, aten.sqrt.default,
              aten.rsub.Scalar, aten.rsub.Tensor, aten.sub.Tensor, aten.add.Tensor, aten.mul.Tensor, aten.div.Tensor,
              aten.to.dtype, aten._to_copy.default, aten.reciprocal.default}


def patterns() -> list[Pattern]:
    return []  # matched by `rewrite` below


# --------------------------------------------------------------------------------------------------------------
# Symbolic values of the vocabulary-sized region


@dataclass(frozen=True)
class Side:
    """One lm_head's logits as the divergence reads them: z = scale * (linear(h, W, b) with row slices)."""
    linear: fx.Node
    scale: float = 1.0
    slices: tuple = ()  # the row slices' (dim, start, end, step), in forward order: applied to h
    detached: bool = False
    reshaped: bool = False  # a reshape between the lm_head and here (a row slice after it is refused)
    scalars: tuple = field(default=(), compare=False)  # graph floats folded into scale (specialized on replace)
    lead: tuple = field(default=(), compare=False)  # h's leading shape after the row slices: the op's rows

    def label(self) -> str:
        return where(self.linear)


@dataclass(frozen=True)
class Mix:
    """sum_k w_k p_k over sides (weights summing to 1)."""
    parts: tuple  # ((Side, weight), ...) in a fixed order


@dataclass
class Term:
    kind: str  # logits | logp | p | shift | wsum | stack | ratio | kl
    dist: object = None  # Side (logits) or Side/Mix (logp, p, shift); ratio: log p
    other: object = None  # ratio: log q
    shift: float = 0.0  # shift: log p + shift
    parts: tuple = ()  # wsum: ((Side, w), ...); stack: (Term, Term)
    form: dict = field(default_factory=dict)  # kl: {(P, Q): coef} for sum of coef * p (log p - log q)
    red: str | None = None  # kl: None (pointwise), "sum", "mean" (over elements), "rows" (per-token sums)
    keepdim: bool = False  # rows: a trailing 1
    factors: tuple = ()  # kl: ((node, +1 | -1), ...) symbolic multipliers (sizes, float graph inputs)
    shape: tuple = ()  # kl: the pointwise shape (rows..., V)
    nodes: frozenset = frozenset()  # the region's nodes computing this value (not the logits chains)
    scalars: tuple = ()  # graph floats read as numbers (specialized on replace)


def _number(graph_mod, x):
    """A scalar known now: a Python number, a constant subgraph of 0-d tensors (TRL's `torch.tensor(beta)`), or a
    float input of the graph read at its hint (dynamic=True; pinned by a guard if the rewrite uses it). Returns
    (value, [graph float nodes]) or None."""
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x), []
    if not isinstance(x, fx.Node):
        return None
    hint = scalar_hint(x)
    if hint is not None:
        return float(hint), [x]
    value = _const_value(graph_mod, x, 0)
    return (value, []) if value is not None else None


def _const_value(gm, node, depth):
    if depth > 12 or not isinstance(node, fx.Node):
        return float(node) if isinstance(node, (int, float)) and not isinstance(node, bool) else None
    if node.op == "get_attr":
        v = getattr(gm, node.target, None) if gm is not None else None
        if isinstance(v, torch.Tensor) and v.numel() == 1 and not isinstance(
                v, torch._subclasses.fake_tensor.FakeTensor):
            return float(v.item())
        return None
    if node.op != "call_function" or node.target not in _CONST_OPS:
        return None
    v = _val(node)
    if not isinstance(v, torch.Tensor) or v.numel() != 1:
        return None
    args = []
    for a in node.args:
        if isinstance(a, fx.Node):
            c = _const_value(gm, a, depth + 1)
            if c is None:
                return None
            args.append(torch.tensor(c, dtype=torch.float64))
        else:
            args.append(a)
    if node.target in (aten.to.dtype, aten._to_copy.default):
        return float(args[0])
    try:
        return float(node.target(*args))
    except Exception:
        return None


def _sym_factor(x) -> bool:
    """A size or a float of the graph (a SymInt/SymFloat node), usable as a multiplier of the op's result."""
    return isinstance(x, fx.Node) and isinstance(_val(x), (torch.SymInt, torch.SymFloat, int, float))


def _merge_forms(a: dict, b: dict, sign: float) -> dict:
    out = dict(a)
    for k, c in b.items():
        out[k] = out.get(k, 0.0) + sign * c
    return {k: c for k, c in out.items() if c != 0.0}


def _mix_of(parts: dict) -> Mix | str:
    """A mixture from {Side: weight}: two sides, weights summing to 1 (1e-6), each in (0, 1)."""
    if len(parts) != 2:
        return f"a mixture of {len(parts)} distributions (the op mixes two)"
    total = sum(parts.values())
    if abs(total - 1.0) > 1e-6:
        return f"mixture weights sum to {total:g}, not 1"
    if any(not 0.0 < w < 1.0 for w in parts.values()):
        return "a mixture weight outside (0, 1)"
    return Mix(tuple(sorted(parts.items(), key=lambda kv: kv[0].linear.name)))


def _dims(node, pos, default=None):
    return node.args[pos] if len(node.args) > pos else node.kwargs.get("dim", default)


def _kwarg(node, pos, name, default):
    return node.args[pos] if len(node.args) > pos else node.kwargs.get(name, default)


class _Eval:
    """Symbolic values of every node of the graph's vocabulary-sized region; a node the rules reach but cannot give
    a value gets the reason why (`fails`)."""

    def __init__(self, graph: fx.Graph):
        self.graph = graph
        self.gm = graph.owning_module
        self.terms: dict[fx.Node, Term] = {}
        self.fails: dict[fx.Node, str] = {}
        self.hops: dict[fx.Node, int] = {}  # how far a failure was carried (see _rule)
        for node in graph.nodes:
            if node.op != "call_function":
                continue
            out = self._rule(node)
            if isinstance(out, Term):
                self.terms[node] = out
            elif isinstance(out, str):
                self.fails[node] = out

    def t(self, x) -> Term | None:
        return self.terms.get(x) if isinstance(x, fx.Node) else None

    def num(self, x):
        return _number(self.gm, x)

    def _rule(self, node: fx.Node):
        tgt, args = node.target, node.args
        ins = [self.t(a) for a in node.all_input_nodes]
        if tgt is aten.linear.default:
            w = _val(args[1])
            if isinstance(w, torch.Tensor) and w.dim() == 2 and _val(node) is not None:
                return Term("logits", Side(node, lead=tuple(_val(node).shape[:-1])))
            return None
        if not any(ins):
            # a failure upstream carried along elementwise (a softcap's tanh, its scale, then the log-softmax): a
            # kl_div after it is still a candidate, and its near miss names the first cause. At most 3 ops on: every
            # linear of a model is a candidate lm_head here, and carried further a q projection's failure would reach
            # the whole residual stream and give an unrelated kl_div its reason.
            failed = [a for a in node.all_input_nodes if a in self.fails and self.hops.get(a, 0) < 3]
            v = _val(node)
            if failed and isinstance(v, torch.Tensor) and any(
                    isinstance(_val(a), torch.Tensor) and same_sizes(_val(a).shape, v.shape) for a in failed):
                self.hops[node] = self.hops.get(failed[0], 0) + 1
                return self.fails[failed[0]]
            return None
        if tgt is aten.mul.Tensor and len(args) == 2 and self.t(args[0]) is None and self.t(args[1]) is not None \
                and self.t(args[1]).kind == "logits":
            args = (args[1], args[0])  # c * logits
        x = self.t(args[0]) if args else None
        if x is not None and x.kind == "logits" and tgt in (aten.mul.Tensor, aten.div.Tensor):
            return self._logits_rule(node, x, args)
        kinds = "/".join(sorted({t.kind for t in ins if t}))

        if tgt in _LOG_SOFTMAX or tgt in _SOFTMAX:
            return self._softmax_rule(node, x)
        # the logits chain: views, row slices, fp32 casts, detach, temperature
        if x is not None and x.kind == "logits":
            return self._logits_rule(node, x, args)
        if tgt is aten.exp.default and x is not None and x.kind == "logp":
            return dataclasses.replace(x, kind="p", nodes=x.nodes | {node})
        if tgt is aten.log.default and x is not None and x.kind in ("p", "wsum"):
            dist = x.dist if x.kind == "p" else _mix_of(dict(x.parts))
            if isinstance(dist, str):
                return dist
            return Term("logp", dist, nodes=x.nodes | {node}, scalars=x.scalars)
        if tgt is aten.stack.default:
            return self._stack_rule(node)
        if tgt is aten.logsumexp.default:
            return self._logsumexp_rule(node, x)
        if tgt is aten.kl_div.default:
            return self._kl_div_rule(node)
        if tgt in (aten.sum.dim_IntList, aten.sum.default, aten.mean.dim, aten.mean.default):
            return self._reduce_rule(node, x)
        if tgt in (aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.neg.default,
                   aten.rsub.Scalar, aten.to.dtype, *_VIEWS):
            out = self._arith_rule(node)
            if out is not None:
                return out
        if tgt is aten.mul.Tensor and kinds == "logp":
            return ("log-probabilities scaled: a mixture taken in log space (beta * log p_t + (1 - beta) * log p_s) is "
                    "not the log of a mixture, and no divergence the op computes")
        what = {"kl": "the pointwise divergence" if all(t.red is None for t in ins if t and t.kind == "kl")
                else "the divergence"}.get(kinds, f"the {kinds.replace('logp', 'log-probabilities')}")
        return f"{tgt} on {what} (not a KL or JSD form the op computes)"

    def _logits_rule(self, node, x: Term, args):
        side: Side = x.dist
        tgt = node.target
        v, src = _val(node), _val(args[0])
        if tgt in _VIEWS:
            if v is None or v.dim() == 0 or src is None or not same_sizes(v.shape[-1:], src.shape[-1:]):
                return f"a {tgt} changes the vocabulary dim of the logits"
            changed = not same_sizes(v.shape, src.shape)
            return Term("logits", dataclasses.replace(side, reshaped=side.reshaped or changed))
        if tgt is aten.slice.Tensor:
            dim = args[1] if len(args) > 1 else 0
            if dim == -1 or (isinstance(dim, int) and src is not None and dim == src.dim() - 1):
                return "the vocabulary dim of the logits is sliced"
            if side.reshaped:
                return "a reshape of the logits before a row slice"
            dim = dim - src.dim() if dim >= 0 else dim
            spec = (dim, *args[2:]) if len(args) > 2 else (dim,)
            return Term("logits", dataclasses.replace(side, slices=side.slices + (spec,), lead=tuple(v.shape[:-1])))
        if tgt is aten.detach.default:
            return Term("logits", dataclasses.replace(side, detached=True))
        if tgt is aten.to.dtype:
            if args[1] != torch.float32:
                return f"a cast of the logits to {args[1]} (the op computes in fp32)"
            return Term("logits", side)
        if tgt in (aten.mul.Tensor, aten.div.Tensor):
            other = args[1]
            k = self.num(other)
            if k is None:
                return f"the logits are scaled by a tensor ({tgt}), not a constant"
            if tgt is aten.div.Tensor:
                if self.t(args[1]) is x:
                    return "a constant divided by the logits"
                if k[0] == 0:
                    return "the logits are divided by 0"
                k = (1.0 / k[0], k[1])
            if not k[0] > 0:
                return f"the logits are multiplied by {k[0]:g} (a temperature must be > 0)"
            return Term("logits", dataclasses.replace(side, scale=side.scale * k[0],
                                                      scalars=side.scalars + tuple(k[1])))
        return f"{tgt} on the logits before the softmax (the op reads linear(h) * 1/T)"

    def _softmax_rule(self, node, x: Term | None):
        if x is None or x.kind != "logits":
            return "a softmax of something other than one lm_head's scaled logits"
        dim = node.args[1]
        xv = _val(node.args[0])
        if dim not in (-1, xv.dim() - 1):
            return "a softmax over another dim than the vocabulary"
        dtype = node.kwargs.get("dtype", node.args[2] if len(node.args) > 2 else None)
        if node.target in _LOG_SOFTMAX + _SOFTMAX and not isinstance(dtype, bool) and dtype not in (
                None, torch.float32):
            return f"a softmax in {dtype}"
        vv = _val(node)
        if vv is None or vv.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return "the logits are not fp32/bf16/fp16"
        kind = "logp" if node.target in _LOG_SOFTMAX else "p"
        return Term(kind, x.dist, nodes=frozenset({node}))

    def _stack_rule(self, node):
        items = node.args[0]
        if len(items) != 2 or not all(isinstance(i, fx.Node) for i in items):
            return "a stack of other than two log-probabilities"
        ts = [self.t(i) for i in items]
        if not all(t is not None and t.kind in ("logp", "shift") and isinstance(t.dist, Side) for t in ts):
            return "a stack of other than two shifted log-probabilities"
        rank = _val(items[0]).dim()
        if _dims(node, 1, 0) % (rank + 1) != 0:
            return "log-probabilities stacked along another dim than a new first one"
        return Term("stack", parts=tuple(ts), nodes=frozenset({node}).union(*(t.nodes for t in ts)),
                    scalars=tuple(s for t in ts for s in t.scalars))

    def _logsumexp_rule(self, node, x):
        if x is None or x.kind != "stack":
            return "a logsumexp of other than stacked log-probabilities"
        dims = node.args[1]
        rank = _val(node.args[0]).dim()
        if list(dims) not in ([0], [-rank]) or _kwarg(node, 2, "keepdim", False):
            return "a logsumexp over another dim than the stacked one"
        parts = {}
        for t in x.parts:
            parts[t.dist] = parts.get(t.dist, 0.0) + math.exp(t.shift if t.kind == "shift" else 0.0)
        mix = _mix_of(parts)
        if isinstance(mix, str):
            return mix
        return Term("logp", mix, nodes=x.nodes | {node}, scalars=x.scalars)

    def _kl_div_rule(self, node):
        inp, target = node.args[0], node.args[1]
        reduction = node.args[2] if len(node.args) > 2 else node.kwargs.get("reduction", 1)
        log_target = node.kwargs.get("log_target", False)
        q, p = self.t(inp), self.t(target)
        for operand in (inp, target):  # an operand that failed upstream: that is the cause
            if isinstance(operand, fx.Node) and operand in self.fails:
                return self.fails[operand]
        for operand in (inp, target):
            if self.t(operand) is None and _from_graph_input(operand):
                return ("a distribution's logits are an input of this graph: a graph break between its lm_head and "
                        "the divergence (e.g. transformers' output_hidden_states hooks); the op needs both in one graph")
        if q is None or q.kind != "logp":
            return "kl_div's input is not the log-softmax of an lm_head's logits or a log-mixture of two"
        want = "logp" if log_target else "p"
        if p is not None and p.kind == "wsum" and want == "p":
            mix = _mix_of(dict(p.parts))
            if isinstance(mix, str):
                return mix
            p = Term("p", mix, nodes=p.nodes)
        if p is None or p.kind != want:
            return (f"kl_div's target is not the {'log-' if log_target else ''}softmax of an lm_head's logits or a "
                    f"mixture of two (log_target={log_target})")
        if reduction not in _KL_RED:
            return f"kl_div reduction {reduction!r}"
        shape = tuple(_val(inp).shape)
        return Term("kl", form={(p.dist, q.dist): 1.0}, red=_KL_RED[reduction], shape=shape,
                    nodes=q.nodes | p.nodes | {node}, scalars=q.scalars + p.scalars)

    def _reduce_rule(self, node, x):
        if x is None or x.kind != "kl":
            return f"{node.target} of the {x.kind if x else 'values'} (not a KL or JSD form the op computes)"
        if x.red is not None:
            if x.red == "rows":
                return None  # the per-token values reduced further: a downstream of the divergence
            return f"{node.target} of a reduced divergence"
        rank = len(x.shape)
        dims = None if node.target in (aten.sum.default, aten.mean.default) else _dims(node, 1)
        keepdim = False if dims is None else _kwarg(node, 2, "keepdim", False)
        dims = None if dims is None or len(dims) == 0 else sorted(d % rank for d in dims)
        mean = node.target in (aten.mean.dim, aten.mean.default)
        if dims is None or dims == list(range(rank)):
            if keepdim:
                return "a reduction over every dim with keepdim"
            return dataclasses.replace(x, red="mean" if mean else "sum", nodes=x.nodes | {node})
        if dims == [rank - 1]:
            factors = x.factors
            form = x.form
            if mean:  # mean over the vocabulary: the per-token sum / V
                V = x.shape[-1]
                if isinstance(V, int):
                    form = {k: c / V for k, c in form.items()}
                else:
                    return "a mean over a symbolic vocabulary"
            return dataclasses.replace(x, red="rows", keepdim=bool(keepdim), form=form, factors=factors,
                                       nodes=x.nodes | {node})
        return f"a {node.target} over dims {dims} of the pointwise divergence (the op sums over the vocabulary)"

    def _arith_rule(self, node):
        tgt, args = node.target, node.args
        a = self.t(args[0]) if args else None
        b = self.t(args[1]) if len(args) > 1 else None
        if tgt in _VIEWS or tgt is aten.to.dtype:
            if a is None or a.kind != "kl" or a.red not in ("sum", "mean"):
                return None
            if tgt is aten.to.dtype and args[1] != torch.float32:
                return None
            return dataclasses.replace(a, nodes=a.nodes | {node})  # a scalar viewed or upcast
        if tgt is aten.neg.default:
            if a is not None and a.kind == "kl":
                return dataclasses.replace(a, form={k: -c for k, c in a.form.items()}, nodes=a.nodes | {node})
            return None
        if tgt is aten.rsub.Scalar:
            return None
        if tgt in (aten.add.Tensor, aten.sub.Tensor):
            alpha = node.kwargs.get("alpha", 1)
            sign = (-1.0 if tgt is aten.sub.Tensor else 1.0) * alpha
            if a is not None and b is not None:
                return self._add_terms(node, a, b, sign)
            t, other, first = (a, args[1], True) if a is not None else (b, args[0], False)
            k = self.num(other)
            if k is None or t.kind not in ("logp", "shift"):
                return None
            if not isinstance(t.dist, Side):
                return None
            if not first and tgt is aten.sub.Tensor:
                return None  # c - log p
            base = t.shift if t.kind == "shift" else 0.0
            return Term("shift", t.dist, shift=base + (sign if first else 1.0) * k[0], nodes=t.nodes | {node},
                        scalars=t.scalars + tuple(k[1]))
        if tgt in (aten.mul.Tensor, aten.div.Tensor):
            if a is not None and b is not None:
                if tgt is aten.div.Tensor:
                    return None
                return self._mul_terms(node, a, b)
            t, other, first = (a, args[1], True) if a is not None else (b, args[0], False)
            if tgt is aten.div.Tensor and not first:
                return None  # c / term
            k = self.num(other)
            if k is None:
                if t.kind == "kl" and _sym_factor(other) and t.red in ("sum", "mean"):
                    return dataclasses.replace(t, factors=t.factors + ((other, -1 if tgt is aten.div.Tensor else 1),),
                                               nodes=t.nodes | {node})
                return None
            c = 1.0 / k[0] if tgt is aten.div.Tensor else k[0]
            if tgt is aten.div.Tensor and k[0] == 0:
                return None
            if t.kind == "kl":
                if k[1]:  # a float of the graph: keep it as a factor rather than pin it
                    return dataclasses.replace(t, factors=t.factors + ((other, -1 if tgt is aten.div.Tensor else 1),),
                                               nodes=t.nodes | {node})
                return dataclasses.replace(t, form={key: c * v for key, v in t.form.items()}, nodes=t.nodes | {node})
            if t.kind == "p" and isinstance(t.dist, Side):
                return Term("wsum", parts=((t.dist, c),), nodes=t.nodes | {node}, scalars=t.scalars + tuple(k[1]))
            if t.kind == "wsum":
                return Term("wsum", parts=tuple((s, w * c) for s, w in t.parts), nodes=t.nodes | {node},
                            scalars=t.scalars + tuple(k[1]))
            return None
        return None

    def _add_terms(self, node, a: Term, b: Term, sign: float):
        if a.kind in ("p", "wsum") and b.kind in ("p", "wsum") and sign == 1.0:
            parts = {}
            for t in (a, b):
                for s, w in (((t.dist, 1.0),) if t.kind == "p" else t.parts):
                    if not isinstance(s, Side):
                        return None
                    parts[s] = parts.get(s, 0.0) + w
            return Term("wsum", parts=tuple(parts.items()), nodes=a.nodes | b.nodes | {node},
                        scalars=a.scalars + b.scalars)
        if a.kind == "logp" and b.kind == "logp" and sign == -1.0:
            return Term("ratio", a.dist, other=b.dist, nodes=a.nodes | b.nodes | {node},
                        scalars=a.scalars + b.scalars)
        if a.kind == "kl" and b.kind == "kl":
            if (a.red, a.keepdim) != (b.red, b.keepdim):
                return "a sum of divergences reduced differently"
            if sorted(map(_factor_key, a.factors)) != sorted(map(_factor_key, b.factors)):
                return "a sum of divergences scaled by different sizes"
            return dataclasses.replace(a, form=_merge_forms(a.form, b.form, sign), nodes=a.nodes | b.nodes | {node},
                                       scalars=a.scalars + b.scalars)
        return None

    def _mul_terms(self, node, a: Term, b: Term):
        if a.kind == "ratio":
            a, b = b, a
        if b.kind != "ratio" or a.kind != "p":
            return None
        p, (x, y) = a.dist, (b.dist, b.other)
        if p == x:
            form = {(x, y): 1.0}
        elif p == y:
            form = {(y, x): -1.0}
        else:
            return "p * (log q - log r) with p neither q nor r"
        return Term("kl", form=form, red=None, shape=tuple(_val(node).shape), nodes=a.nodes | b.nodes | {node},
                    scalars=a.scalars + b.scalars)


def _from_graph_input(node) -> bool:
    """Whether a (log-)softmax operand is computed, through softmaxes, casts, views, slices and scalar arithmetic
    alone, from an input of the graph."""
    for _ in range(16):
        if not isinstance(node, fx.Node):
            return False
        if node.op == "placeholder":
            v = _val(node)
            return isinstance(v, torch.Tensor) and v.dim() >= 2
        if node.op != "call_function" or node.target not in (*_LOG_SOFTMAX, *_SOFTMAX, *_VIEWS, aten.to.dtype,
                                                             aten.slice.Tensor, aten.detach.default, aten.mul.Tensor,
                                                             aten.div.Tensor, aten.exp.default, aten.log.default):
            return False
        tensors = [a for a in node.args if isinstance(a, fx.Node) and isinstance(_val(a), torch.Tensor)
                   and _val(a).dim() >= 1]
        if len(tensors) != 1:
            return False
        node = tensors[0]
    return False


def _factor_key(f):
    return (f[0].name, f[1])


# --------------------------------------------------------------------------------------------------------------
# Recognising a divergence, and the replacement plan


@dataclass
class _Plan:
    root: fx.Node  # the first node at which the value is a whole divergence
    replaced: fx.Node  # what the op's result replaces (the root, or the masked/plain sum after per-token values)
    student: Side
    teacher: Side
    divergence: str
    beta: float
    reduction: str  # sum | mean | batchmean | none
    coef: float
    factors: tuple
    weight: fx.Node | None  # row weights (a mask)
    interior: set  # nodes that die with the rewrite
    scalars: tuple
    keepdim: bool = False


def _learns(side: Side, regions: dict) -> bool:
    return not side.detached and regions.get(side.linear) is not False and requires_grad(side.linear)


def _classify(term: Term, regions: dict):
    """(student, teacher, divergence, beta, coef) or the reason the combination is none of ours."""
    form = {k: c for k, c in term.form.items() if c != 0.0}
    sides = set()
    for p, q in form:
        for d in (p, q):
            sides.update([d] if isinstance(d, Side) else [s for s, _ in d.parts])
    if len(sides) != 2:
        if len(sides) == 1:
            return "both distributions come from the same logits"
        linears = {s.linear for s in sides}
        if len(linears) < len(sides):
            return "one lm_head's logits enter the divergence in two forms (e.g. detached and not)"
        return f"the divergence involves {len(sides)} distributions (the op takes a student and a teacher)"
    if len(form) == 1:
        (p, q), c = next(iter(form.items()))
        if not (isinstance(p, Side) and isinstance(q, Side)):
            return "a KL to or from a mixture alone (half of a JSD)"
        if _learns(p, regions) and not _learns(q, regions):
            return p, q, "reverse_kl", 0.5, c  # KL(student || teacher): student p
        return q, p, "forward_kl", 0.5, c  # KL(teacher || student): student q
    if len(form) == 2:
        (k1, c1), (k2, c2) = form.items()
        mixes = {k1[1], k2[1]}
        if len(mixes) != 1 or not isinstance(k1[1], Mix) or not all(isinstance(k[0], Side) for k in (k1, k2)):
            return "two KL terms that are not a JSD (each distribution against one mixture of both)"
        mix = dict(k1[1].parts)
        x, y = k1[0], k2[0]
        if x == y or set(mix) != {x, y}:
            return "two KL terms that are not a JSD (each distribution against one mixture of both)"
        wx, wy = mix[x], mix[y]
        if abs(c1 * wy - c2 * wx) > 1e-6 * max(abs(c1), abs(c2)):
            return (f"KL weights {c1:g}, {c2:g} against mixture weights {wx:g}, {wy:g}: not a generalized JSD "
                    "(its weights are the mixture's)")
        coef = c1 + c2
        if _learns(x, regions) and not _learns(y, regions):
            return x, y, "jsd", wy, coef
        return y, x, "jsd", wx, coef
    return "more than two KL terms"


def _rows_extension(eval_: _Eval, root: fx.Node):
    """For per-token values: (replaced node, reduction, weight node or None, extra interior nodes) when their one use
    is a sum or mean over every token, or a sum of them times a mask that does not require grad."""
    users = list(root.users)
    term = eval_.terms[root]
    rows_shape = _val(root).shape
    if len(users) != 1:
        return root, "none", None, set()
    u = users[0]
    if _whole(u, rows_shape):
        return u, "batchmean" if u.target in (aten.mean.default, aten.mean.dim) else "sum", None, {u}
    if _is(u, aten.mul.Tensor) and len(u.users) == 1 and not term.keepdim:
        m = u.args[1] if u.args[0] is root else u.args[0]
        s = next(iter(u.users))
        mv = _val(m)
        if (isinstance(m, fx.Node) and isinstance(mv, torch.Tensor) and not requires_grad(m)
                and equal_sizes(mv.shape, rows_shape) and _whole(s, rows_shape)
                and s.target in (aten.sum.default, aten.sum.dim_IntList)):
            return s, "sum", m, {u, s}
    return root, "none", None, set()


def _whole(node, shape) -> bool:
    """A sum or mean over every dim of a tensor of `shape`, no keepdim."""
    if _is(node, aten.sum.default, aten.mean.default):
        return True
    if _is(node, aten.sum.dim_IntList, aten.mean.dim):
        dims = _dims(node, 1)
        rank = len(shape)
        keep = _kwarg(node, 2, "keepdim", False)
        return not keep and (dims is None or sorted(d % rank for d in dims) == list(range(rank)))
    return False


def _side_reason(side: Side, V) -> str | None:
    lin = side.linear
    h, w = lin.args[0], lin.args[1]
    b = lin.args[2] if len(lin.args) > 2 else None
    hv, wv, bv = _val(h), _val(w), _val(b)
    if hv is None or wv is None or (b is not None and bv is None):
        return "no shape information on an lm_head's inputs"
    if hv.dtype != wv.dtype or (bv is not None and bv.dtype != wv.dtype):
        return f"an lm_head's hidden states are {hv.dtype}, its weight {wv.dtype}"
    if wv.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"an lm_head in {wv.dtype}"
    if not same_sizes(wv.shape[:1], (V,)):
        return f"the student's and teacher's vocabularies differ ({wv.shape[0]} vs {V})"
    return None


def _plan(eval_: _Eval, root: fx.Node, regions: dict, autocast: dict) -> _Plan | str:
    term = eval_.terms[root]
    cls = _classify(term, regions)
    if isinstance(cls, str):
        return cls
    student, teacher, divergence, beta, coef = cls
    V = _val(student.linear.args[1]).shape[0]
    for side in (student, teacher):
        reason = _side_reason(side, V) or _region_reason(root, side.linear, autocast)
        if reason:
            return reason
    if (len(term.shape) < 2 or any(len(_val(s.linear).shape) < 1 for s in (student, teacher))):
        return "the divergence is not over rows of vocabulary-sized logits"
    if term.red == "rows":
        replaced, reduction, weight, extra = _rows_extension(eval_, root)
        rows = _val(root).shape[:-1] if term.keepdim else _val(root).shape
        if reduction == "none" and not (same_sizes(student.lead, rows) or len(rows) == 1):
            return (f"the per-token values {tuple(rows)} are reshaped from the lm_head's rows "
                    f"{tuple(student.lead)} (the per-row op returns those)")
    else:
        replaced, reduction, weight, extra = root, term.red, None, set()
    interior = set(term.nodes) | {root} | extra
    return _Plan(root, replaced, student, teacher, divergence, beta, reduction, coef, term.factors, weight, interior,
                 term.scalars + student.scalars + teacher.scalars, term.keepdim)


def _escapes(plan: _Plan, allowed: set) -> str | None:
    """An intermediate of the divergence used outside it: its N x V tensor would exist anyway."""
    for n in plan.interior:
        if n is plan.replaced:
            continue
        for u in n.users:
            if u not in allowed:
                what = "log-softmax" if n.target in _LOG_SOFTMAX else "softmax" if n.target in _SOFTMAX else str(
                    n.target)
                return f"the divergence's {what} ({n.name}) is also used by {u.name} ({u.target if u.op == 'call_function' else u.op}) outside it"
    return None


def _analyze(graph: fx.Graph):
    """(eval, [(root, plan or reason)]) with the escape check done over all sites together: two divergences may
    share a log-softmax (KL(t||s) + KL(s||t))."""
    ev = _Eval(graph)
    regions, autocast = grad_regions(graph), _autocast_regions(graph)
    roots = []
    for node, term in ev.terms.items():
        if term.kind != "kl" or term.red is None:
            continue
        if any((t := ev.terms.get(a)) is not None and t.kind == "kl" and t.red is not None
               and not isinstance(_classify(t, regions), str) for a in node.all_input_nodes):
            continue  # a whole divergence already before this node: the site is there
        if isinstance(_classify(term, regions), str) and any(
                (t := ev.terms.get(u)) is not None and t.kind == "kl" for u in node.users):
            continue  # half of something larger: judged there
        roots.append(node)
    plans = {r: _plan(ev, r, regions, autocast) for r in roots}
    while True:
        ok = [p for p in plans.values() if isinstance(p, _Plan)]
        allowed = set().union(*(p.interior for p in ok)) if ok else set()
        changed = False
        for r, p in list(plans.items()):
            if isinstance(p, _Plan):
                reason = _escapes(p, allowed)
                if reason:
                    plans[r] = reason
                    changed = True
        if not changed:
            return ev, plans


# --------------------------------------------------------------------------------------------------------------
# The rewrite


def _side_inputs(graph, at, side: Side, detach: bool):
    lin = side.linear
    h, w = lin.args[0], lin.args[1]
    b = lin.args[2] if len(lin.args) > 2 else None
    for spec in side.slices:
        h = _insert(graph, at, aten.slice.Tensor, (h, *spec))
    if detach:
        h, w = (_insert(graph, at, aten.detach.default, (x,)) for x in (h, w))
        b = _insert(graph, at, aten.detach.default, (b,)) if b is not None else None
    return h, w, b


def _replace(graph: fx.Graph, plan: _Plan, regions: dict) -> str:
    for s in plan.scalars:  # the op takes scale and beta as constants: guard the values they were read at
        specialize(s)
    at = plan.replaced
    hs, ws, bs = _side_inputs(graph, at, plan.student, plan.student.detached or regions.get(
        plan.student.linear) is False)
    ht, wt, bt = _side_inputs(graph, at, plan.teacher, plan.teacher.detached or regions.get(
        plan.teacher.linear) is False)
    args = (hs, ws, bs, ht, wt, bt, plan.weight, plan.divergence, float(plan.beta), float(plan.student.scale),
            float(plan.teacher.scale), plan.reduction)
    new = _insert(graph, at, torch.ops.liger_fx.linear_divergence.default, args)
    if plan.reduction == "none":
        rows = _val(plan.root).shape[:-1] if plan.keepdim else _val(plan.root).shape
        if not same_sizes(_val(new).shape, rows):  # 1-D per-token values of a (B, T) lm_head (checked in _plan)
            new = _insert(graph, at, aten.reshape.default, (new, [-1]))
        if plan.keepdim:
            new = _insert(graph, at, aten.unsqueeze.default, (new, -1))
    if plan.coef != 1.0:
        new = _insert(graph, at, aten.mul.Tensor, (new, plan.coef))
    for node, power in plan.factors:
        new = _insert(graph, at, aten.mul.Tensor if power > 0 else aten.div.Tensor, (new, node))
    dtype = _val(plan.replaced).dtype
    if _val(new).dtype != dtype:
        new = _insert(graph, at, aten.to.dtype, (new, dtype))
    plan.replaced.replace_all_uses_with(new)
    for n in sorted(plan.interior, key=_order(graph), reverse=True):
        if not n.users:
            graph.erase_node(n)
    stable_topological_sort(graph)  # the weight (a mask) may be defined after the divergence's inputs
    name = f"{FLAG}/{plan.divergence}/{plan.reduction}"
    if plan.weight is not None:
        name += "/masked"
    if _learns(plan.teacher, regions):
        name += "/teacher-learns"
    return name


def _order(graph):
    index = {n: i for i, n in enumerate(graph.nodes)}
    return lambda n: index.get(n, -1)


def rewrite(graph: fx.Graph, config) -> None:
    if not getattr(config, FLAG):
        return
    ev, plans = _analyze(graph)
    regions = grad_regions(graph)
    for root, plan in plans.items():
        if not isinstance(plan, _Plan):
            continue
        anchor = next((n for n in sorted(plan.interior, key=_order(graph)) if _anchor(n, ev)), root)
        name = _replace(graph, plan, regions)
        record_replacement(FLAG, name, anchor)


# --------------------------------------------------------------------------------------------------------------
# Candidates and near-miss reasons


def _anchor(node: fx.Node, ev: _Eval) -> bool:
    """A kl_div, or a pointwise KL written out (p * (log p - log q)), fed by an lm_head's distributions."""
    if _is(node, aten.kl_div.default):
        return any(isinstance(a, fx.Node) and (a in ev.terms or a in ev.fails) for a in node.args[:2])
    t = ev.terms.get(node)
    return t is not None and t.kind == "kl" and _is(node, aten.mul.Tensor) and t.red is None and len(t.form) == 1 \
        and not any(_is(a, aten.kl_div.default) for a in node.all_input_nodes)


def candidates(graph: fx.Graph) -> list[tuple[str, fx.Node]]:
    ev = _Eval(graph)
    out, seen = [], set()
    for n in graph.nodes:
        if n.op == "call_function" and _anchor(n, ev) and not (_in_other_site(n, ev, seen)):
            out.append((FLAG, n))
    return out


def _in_other_site(node, ev, seen) -> bool:
    """One candidate per site: a JSD's two kl_divs are one site (the first counts)."""
    site = _site_root(node, ev)
    if site in seen:
        return True
    seen.add(site)
    return False


def _site_root(node, ev):
    """Follow the node's value forward while it stays a divergence value: the last such node names the site."""
    cur = node
    while True:
        nxt = [u for u in cur.users if (t := ev.terms.get(u)) is not None and t.kind == "kl"]
        if len(nxt) != 1:
            return cur
        cur = nxt[0]


def explain(node: fx.Node) -> str:
    graph = node.graph
    ev, plans = _analyze(graph)
    if node in ev.fails:
        return ev.fails[node]
    for root, plan in plans.items():
        if isinstance(plan, str) and (root is node or node in ev.terms.get(root, Term("x")).nodes):
            return plan
    # the value never became a whole divergence: why, at the first node that could not carry it on
    frontier, seen = [node], set()
    while frontier:
        cur = frontier.pop(0)
        if cur in seen:
            continue
        seen.add(cur)
        for u in cur.users:
            if u in ev.fails:
                return ev.fails[u]
            if u in ev.terms:
                frontier.append(u)
            elif u.op == "output":
                t = ev.terms.get(cur)
                what = "pointwise divergence (N x V)" if t is not None and t.kind == "kl" else "value"
                return f"the {what} is a graph output"
    t = ev.terms.get(node)
    if t is not None and t.kind == "kl":
        cls = _classify(t, grad_regions(graph))
        if isinstance(cls, str):
            return cls
        if t.red is None:
            return "the pointwise divergence is never summed over the vocabulary"
    return "the kl_div's operands are not an lm_head's (log-)softmax or a mixture of two"
