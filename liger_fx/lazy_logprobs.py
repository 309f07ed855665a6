"""Token log-probs, entropies and per-token losses of LazyLogits, without the N x V logits: what post-training
trainers compute from a model's returned logits, outside the model (TRL's `selective_log_softmax` and
`entropy_from_logits`, GRPO/PPO/DPO loops, per-token losses).

A small algebra over the rows of one lm_head. A LazyLogits stands for one of these per-row values of the logits
Z = t(h @ W^T + b), t being the casts, scales (a temperature, a negation) and softcap lazy_logits.py keeps lazy:

    Z                  the logits
    LSM = log_softmax(Z, -1)
    P   = softmax(Z, -1)  = exp(LSM)
    P * LSM, P * Z     (the same rows of the same Z: the two products an entropy is summed from)

Each of these is a LazyLogits whose source replays it after the matmul (ops "log_softmax", "softmax", "prod"), so any
other use still materializes it with eager's values and gradients. What leaves the algebra without N x V:

    gather(Z, -1, idx)          t(h_i . W[idx_ik] + b[idx_ik])   row dot products: (N, K, H) read, never (N, V)
    gather(LSM, -1, idx)        z_t - lse                        `liger_fx::fused_linear_logprobs` (K > 1: row dot
    gather(P, -1, idx)          exp(z_t - lse)                   products, minus the op's lse)
    logsumexp(Z, -1)            lse                              the op, no target
    sum(P * LSM, -1)            -entropy                         the op with the entropy
    sum(P * Z, -1)              lse - entropy
    sum(Z, -1), sum(LSM, -1)    scale * (h . sum(W) + sum(b)) (- V * lse)   a label-smoothing loss; no softcap
    (mean(., -1): the same over V)
    cross_entropy(Z, y, reduction="none")   lse - z_t, 0 where y == ignore_index
    nll_loss(LSM, y, reduction)             the same, reduced as torch reduces

So TRL's fp32 `selective_log_softmax` (a gather of Z minus a per-row `logsumexp`) is O(N*H) plus one op call per
sequence, its bf16 branch (a `log_softmax` per row, then a gather) one op call per sequence, and its
`entropy_from_logits` (log_softmax, exp, product and sum per chunk of 128 rows) one op call per chunk, with the
entropy. Each op call computes its rows' logits in chunks (on a GPU) and never keeps them; its backward recomputes
them (kernels/fused_linear_logprobs.py). The gradient of a gather of Z runs through an embedding lookup of W's rows:
a V x H dense gradient of W, as the lm_head's own.

Values agree with eager's to its rounding: the op computes in fp32 from the logits in the matmul's dtype (a bf16
`logits / T` rounds in eager, not here), and each result is cast to the dtype eager's would have.

Only the last dim is reduced or gathered, with no `out=`, no class weights, label smoothing or `sparse_grad`; any
other form (a log-softmax over dim 0, a product with a mask, a sum over all elements) materializes, as
lazy_logits.py does for every unknown use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .lazy_logits import _CE_SIGNATURE, LazyLogits, _derive, _replay, fold, register_consumer

NO_IGNORE = -(2**31)  # kernels/fused_linear_logprobs.NO_IGNORE: no token id equals it


# --------------------------------------------------------------------------------------------------------------
# What a LazyLogits stands for


@dataclass(frozen=True)
class _Form:
    base: tuple
    """The logits' replayed ops on the linear's output: casts, scales, a softcap."""
    kind: str
    """"logits" (Z), "log_softmax", "softmax", "p_log_p" (P * LSM) or "p_z" (P * Z)."""
    tail: tuple = ()
    """Casts and scales (a negation) after a log_softmax or softmax: elementwise, so they commute with a gather and
    (scales) with a sum."""


def _form(x: LazyLogits) -> Optional[_Form]:
    ops = x._src.ops
    for i, op in enumerate(ops):
        if op[0] in ("log_softmax", "softmax"):
            tail = ops[i + 1:]
            if any(t[0] not in ("cast", "mul", "div") for t in tail):
                return None
            return _Form(ops[:i], op[0], tail)
        if op[0] == "prod":
            if i != 0 or len(ops) != 1:
                return None
            return _prod_form(op[1], op[2])
    return _Form(ops, "logits")


def _prod_form(a_ops, b_ops) -> Optional[_Form]:
    """The form of P * LSM or P * Z (the softmax first, as _product builds it)."""
    a, b = _Form(a_ops[:-1], "softmax"), None
    if not a_ops or a_ops[-1] != ("softmax",):
        return None
    if b_ops and b_ops[-1] == ("log_softmax",):
        b = _Form(b_ops[:-1], "log_softmax")
    elif all(op[0] in ("cast", "mul", "div", "tanh") for op in b_ops):
        b = _Form(b_ops, "logits")
    if b is None or a.base != b.base:
        return None
    return _Form(a.base, "p_log_p" if b.kind == "log_softmax" else "p_z")


def _linear_dtype(x: LazyLogits) -> torch.dtype:
    src = x._src
    return src.autocast[1] if src.autocast is not None else torch.result_type(src.h, src.weight)


def _dtype_after(x: LazyLogits, ops) -> torch.dtype:
    """The dtype eager's tensor has after `ops` of the linear's output."""
    return _replay(torch.empty(1, 1, dtype=_linear_dtype(x), device="meta"), ops).dtype


def _last(dim, ndim: int) -> bool:
    if isinstance(dim, (list, tuple)) and len(dim) == 1:
        dim = dim[0]
    return isinstance(dim, int) and not isinstance(dim, bool) and dim in (-1, ndim - 1)


def _rows_index(x: LazyLogits, index) -> bool:
    """An integer index with one entry per row of x (or K per row), on x's device."""
    return (isinstance(index, torch.Tensor) and not isinstance(index, LazyLogits) and not index.is_floating_point()
            and not index.is_complex() and index.dtype != torch.bool and index.device == x.device)


# --------------------------------------------------------------------------------------------------------------
# The fused reductions


def _stats(x: LazyLogits, base, target=None, ignore_index: int = NO_IGNORE, entropy: bool = False):
    """(z_t, lse, ent) of x's rows (fp32, x's leading shape), from `liger_fx::fused_linear_logprobs`; None when the
    base ops do not fold into the op's transform."""
    f = fold(base)
    if f is None:
        return None
    h, w, b = x.operands()
    if target is not None and target.dtype != torch.int64:
        target = target.long()
    with x._src.autocast_ctx():
        return torch.ops.liger_fx.linear_logprobs(h, w, b, target, int(ignore_index), float(f[0]), float(f[1]),
                                                  bool(entropy))


def _row_logits(x: LazyLogits, index: torch.Tensor) -> torch.Tensor:
    """The linear's output at (row, index[row, k]): (*lead, K) in the matmul's dtype, from K row dot products per row
    (an embedding lookup of W's rows and a batched matmul, the bias added in the same call as F.linear adds it)."""
    h, w, b = x.operands()
    H, K = h.shape[-1], index.shape[-1]
    i = index.reshape(-1, K)
    with x._src.autocast_ctx():
        wk = F.embedding(i, w)  # (M, K, H)
        hv = h.reshape(-1, H, 1)
        z = torch.bmm(wk, hv) if b is None else torch.baddbmm(F.embedding(i, b[:, None]), wk, hv)
    return z.reshape(*index.shape)


def _cast_like(x: LazyLogits, value: torch.Tensor, form: _Form) -> torch.Tensor:
    """An fp32 value of the log_softmax / softmax / product in the dtype eager's has, then the tail's casts and
    scales."""
    return _replay(value.to(_dtype_after(x, form.base + ((form.kind,),) if form.kind in ("log_softmax", "softmax")
                                         else form.base)), form.tail)


# --------------------------------------------------------------------------------------------------------------
# Lazy values: log_softmax, softmax, exp of a log_softmax, the products


def _bind(names, args, kwargs, keyword_only=()) -> Optional[dict]:
    """A call's arguments by name (the positional ones in `names`' order), or None where they do not bind as torch
    would take them: too many, a keyword that is neither in `names` nor in `keyword_only`, one given twice."""
    if len(args) > len(names) or set(kwargs) - set(names) - set(keyword_only):
        return None
    a = dict(zip(names, args))
    if set(a) & set(kwargs):
        return None
    a.update(kwargs)
    return a


def _softmax_args(func, args, kwargs):
    """(input, dim, dtype) of F/torch/Tensor log_softmax and softmax, or None."""
    names = ("input", "dim", "dtype")
    if func in (F.log_softmax, F.softmax):
        names = ("input", "dim", "_stacklevel", "dtype")
    a = _bind(names, args, kwargs)
    return None if a is None else (a.get("input"), a.get("dim"), a.get("dtype"))


def _softmaxes(kind):
    def handler(func, *args, **kwargs):
        parsed = _softmax_args(func, args, kwargs)
        if parsed is None:
            return NotImplemented
        x, dim, dtype = parsed
        if not isinstance(x, LazyLogits) or not _last(dim, x.dim()):
            return NotImplemented
        form = _form(x)
        if form is None or form.kind != "logits":
            return NotImplemented
        if dtype is not None and dtype != x.dtype:
            x = x.to(dtype)  # lazy: a cast, as torch casts before the softmax
            if not isinstance(x, LazyLogits):
                return NotImplemented
        shadow = (torch.log_softmax if kind == "log_softmax" else torch.softmax)(x._shadow, -1)
        return _derive(x, (kind,), shadow)

    return handler


for _f in (F.log_softmax, torch.log_softmax, torch.Tensor.log_softmax, torch.special.log_softmax):
    register_consumer(_f)(_softmaxes("log_softmax"))
for _f in (F.softmax, torch.softmax, torch.Tensor.softmax, torch.special.softmax):
    register_consumer(_f)(_softmaxes("softmax"))


def _exp(func, *args, **kwargs):
    """exp(log_softmax(Z)) is softmax(Z)."""
    if len(args) != 1 or kwargs or not isinstance(args[0], LazyLogits):
        return NotImplemented
    x = args[0]
    form = _form(x)
    if form is None or form.kind != "log_softmax" or form.tail:
        return NotImplemented
    return _derive(x, None, torch.exp(x._shadow), ops=form.base + (("softmax",),))


for _f in (torch.exp, torch.Tensor.exp):
    register_consumer(_f)(_exp)


def _same_rows(a: LazyLogits, b: LazyLogits) -> bool:
    """Whether a and b are functions of the same logits rows with the same gradient path: one weight and bias, one
    autocast state, and h the same rows (the same tensor, or a view with the same place, shape and strides)."""
    sa, sb, ha, hb = a._src, b._src, a._h, b._h
    if sa.weight is not sb.weight or sa.bias is not sb.bias or sa.autocast != sb.autocast:
        return False
    if a.requires_grad != b.requires_grad or a.shape != b.shape:
        return False
    return ha is hb or (ha.shape == hb.shape and ha.stride() == hb.stride() and ha.dtype == hb.dtype and
                        ha.data_ptr() == hb.data_ptr() and (not a.requires_grad or ha._base is hb._base))


def _product(func, *args, **kwargs):
    """P * LSM and P * Z of the same rows (either order): a product an entropy sums over the vocabulary."""
    if len(args) != 2 or kwargs or not all(isinstance(t, LazyLogits) for t in args):
        return NotImplemented
    a, b = args
    if not _same_rows(a, b):
        return NotImplemented
    fa, fb = _form(a), _form(b)
    if fa is None or fb is None or fa.tail or fb.tail or fa.base != fb.base:
        return NotImplemented
    if fb.kind == "softmax":
        a, b, fa, fb = b, a, fb, fa
    if fa.kind != "softmax" or fb.kind not in ("log_softmax", "logits"):
        return NotImplemented
    return _derive(a, None, a._shadow * b._shadow, ops=(("prod", a._src.ops, b._src.ops),))


for _f in (torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__, torch.multiply):
    register_consumer(_f)(_product)


# --------------------------------------------------------------------------------------------------------------
# Reductions that leave the algebra


def _gather(func, *args, **kwargs):
    """gather / take_along_dim along the last dim, with an index of x's leading shape and K entries per row."""
    if func in (torch.take_along_dim, torch.Tensor.take_along_dim):
        names = ("input", "indices", "dim")
    else:
        names = ("input", "dim", "index", "sparse_grad")
    a = _bind(names, args, kwargs)
    if a is None:
        return NotImplemented
    x, index = a.get("input"), a.get("index", a.get("indices"))
    if not isinstance(x, LazyLogits) or a.get("sparse_grad", False) or not _last(a.get("dim"), x.dim()):
        return NotImplemented
    if not _rows_index(x, index) or index.dim() != x.dim() or index.shape[:-1] != x.shape[:-1] or \
            index.shape[-1] < 1:
        return NotImplemented
    form = _form(x)
    if form is None:
        return NotImplemented
    if form.kind == "logits":  # eager's logits at the index, exactly: the ops are elementwise
        return _replay(_row_logits(x, index), form.base)
    if form.kind not in ("log_softmax", "softmax"):
        return NotImplemented
    if index.shape[-1] == 1:
        stats = _stats(x, form.base, index[..., 0])
        if stats is None:
            return NotImplemented
        zt, lse, _ = stats
        lp = (zt - lse)[..., None]
    else:  # several per row (top-k): the op's lse, and the k logits by row dot products through the same transform
        stats = _stats(x, form.base)
        if stats is None:
            return NotImplemented
        from .kernels.cross_entropy import transform_ref

        softcap, scale = fold(form.base)
        lp = transform_ref(_row_logits(x, index).float(), softcap, scale) - stats[1][..., None]
    return _cast_like(x, lp if form.kind == "log_softmax" else lp.exp(), form)


for _f in (torch.gather, torch.Tensor.gather, torch.take_along_dim, torch.Tensor.take_along_dim):
    register_consumer(_f)(_gather)


def _reduce_args(args, kwargs):
    """(input, dim, keepdim, dtype) of a reduction over a dim (logsumexp, sum, mean), or None."""
    a = _bind(("input", "dim", "keepdim"), args, kwargs, keyword_only=("dtype",))
    return None if a is None else (a.get("input"), a.get("dim"), bool(a.get("keepdim", False)), a.get("dtype"))


def _logsumexp(func, *args, **kwargs):
    parsed = _reduce_args(args, kwargs)
    if parsed is None:
        return NotImplemented
    x, dim, keepdim, dtype = parsed
    if not isinstance(x, LazyLogits) or not _last(dim, x.dim()) or dtype is not None:
        return NotImplemented
    form = _form(x)
    if form is None or form.kind != "logits":
        return NotImplemented
    stats = _stats(x, form.base)
    if stats is None:
        return NotImplemented
    lse = stats[1].to(x.dtype)
    return lse[..., None] if keepdim else lse


for _f in (torch.logsumexp, torch.Tensor.logsumexp, torch.special.logsumexp):
    register_consumer(_f)(_logsumexp)


def _row_sum(x: LazyLogits, base) -> Optional[torch.Tensor]:
    """sum_j z_j over the vocabulary, fp32, where z is linear in the matmul (no softcap): scale * (h . sum_j W_j +
    sum_j b_j), O(N*H + V*H); None under a softcap."""
    f = fold(base)
    if f is None or f[0] != 0.0:
        return None
    h, w, b = x.operands()
    with torch.autocast(h.device.type, enabled=False):
        total = h.float() @ w.float().sum(0)
        if b is not None:
            total = total + b.float().sum()
    return total * f[1]


def _scales(value: torch.Tensor, tail) -> torch.Tensor:
    """The tail's scales (a negation) on an fp32 sum; its casts are the caller's (a sum is not rounded per element)."""
    return _replay(value, tuple(op for op in tail if op[0] != "cast"))


def _sum(func, *args, **kwargs):
    """Sums (and means) over the vocabulary: of P * LSM (-entropy) or P * Z (lse - entropy) by the op's entropy; of
    the logits or their log-softmax (a label-smoothing loss) by the row sum of a linear function, minus V * lse."""
    parsed = _reduce_args(args, kwargs)
    if parsed is None:
        return NotImplemented
    x, dim, keepdim, dtype = parsed
    if not isinstance(x, LazyLogits) or dim is None or not _last(dim, x.dim()):
        return NotImplemented
    form = _form(x)
    if form is None:
        return NotImplemented
    V = x.shape[-1]
    if form.kind in ("p_log_p", "p_z"):
        stats = _stats(x, form.base, entropy=True)
        if stats is None:
            return NotImplemented
        _, lse, ent = stats
        out = -ent if form.kind == "p_log_p" else lse - ent
    elif form.kind in ("logits", "log_softmax"):
        total = _row_sum(x, form.base)
        if total is None:
            return NotImplemented
        if form.kind == "log_softmax":
            stats = _stats(x, form.base)
            if stats is None:
                return NotImplemented
            total = total - V * stats[1]
        out = _scales(total, form.tail)
    else:
        return NotImplemented
    if func in (torch.mean, torch.Tensor.mean):
        out = out / V
    out = out.to(dtype if dtype is not None else x.dtype)
    return out[..., None] if keepdim else out


for _f in (torch.sum, torch.Tensor.sum, torch.mean, torch.Tensor.mean):
    register_consumer(_f)(_sum)


@register_consumer(F.cross_entropy)
def _cross_entropy_none(func, *args, **kwargs):
    """`F.cross_entropy(logits (N, V), target (N,), reduction="none")`: per-token losses lse - z_t (0 where the target
    is ignore_index), for any weighting or masking downstream. The reduced forms: lazy_logits._cross_entropy."""
    try:
        a = _CE_SIGNATURE.bind(*args, **kwargs).arguments
    except TypeError:
        return NotImplemented
    x, target = a["input"], a["target"]
    if not isinstance(x, LazyLogits) or a.get("reduction", "mean") != "none" or a.get("weight") is not None or \
            a.get("size_average") is not None or a.get("reduce") is not None or a.get("label_smoothing", 0.0) != 0.0:
        return NotImplemented
    ignore_index = a.get("ignore_index", -100)
    if x.dim() != 2 or not _rows_index(x, target) or target.dim() != 1 or target.shape[0] != x.shape[0] or \
            not isinstance(ignore_index, int):
        return NotImplemented
    form = _form(x)
    if form is None or form.kind != "logits":
        return NotImplemented
    stats = _stats(x, form.base, target, ignore_index)
    if stats is None:
        return NotImplemented
    zt, lse, _ = stats
    return (lse - zt).to(x.dtype)


_NLL_NAMES = ("input", "target", "weight", "size_average", "ignore_index", "reduce", "reduction")


@register_consumer(F.nll_loss)
def _nll_loss(func, *args, **kwargs):
    """`F.nll_loss(log_softmax(logits (N, V), -1), target (N,))`, any reduction: -(z_t - lse), ignored rows out."""
    a = _bind(_NLL_NAMES, args, kwargs)
    if a is None:
        return NotImplemented
    x, target, reduction = a.get("input"), a.get("target"), a.get("reduction", "mean")
    ignore_index = a.get("ignore_index", -100)
    if not isinstance(x, LazyLogits) or a.get("weight") is not None or a.get("size_average") is not None or \
            a.get("reduce") is not None or reduction not in ("none", "mean", "sum") or \
            not isinstance(ignore_index, int):
        return NotImplemented
    if x.dim() != 2 or not _rows_index(x, target) or target.dim() != 1 or target.shape[0] != x.shape[0]:
        return NotImplemented
    form = _form(x)
    if form is None or form.kind != "log_softmax":
        return NotImplemented
    stats = _stats(x, form.base, target, ignore_index)
    if stats is None:
        return NotImplemented
    zt, lse, _ = stats
    per = -_cast_like(x, zt - lse, form)  # eager's log-probs in their dtype, negated; ignored rows are 0 already
    if reduction == "none":
        return per
    total = per.sum()
    if reduction == "sum":
        return total
    return total / (target != ignore_index).sum().to(per.dtype)
