"""Lazy logits: what a compiled model returns in place of its lm_head's output, so that a loss computed outside the
model still gets the fused lm_head + cross-entropy.

    model = torch.compile(model, backend="liger")
    pred = model(x)                                      # a LazyLogits: h, W (and b) of the lm_head, no B x T x V
    loss = F.cross_entropy(pred.flatten(0, 1).float(), y.flatten(0, 1), reduction="sum") / n   # fused: no logits

PyTorch-native trainers (torchtitan, lit-gpt, gpt-fast style loops) call the model and then the loss, so the lm_head's
logits leave the compiled graph and nothing in it can fuse them with the loss: every B*T*V logit is made (3.9 GiB at
Llama-3.2-1B B8 T2048 in bf16, twice that after `.float()`). Where the backend finds an lm_head linear whose output is a
graph output used by nothing else in a training graph (patterns/linear_cross_entropy.lazy_returned_logits), the graph
returns the linear's input h, weight W and bias b instead, and the caller gets a `LazyLogits`: a tensor subclass with
the logits' shape, dtype, device, strides and requires_grad, holding no data.

What a LazyLogits does with each use (`__torch_function__`, above autograd):
- views that keep the vocabulary as the last, contiguous dim (`flatten(0, 1)`, `view(-1, V)`, `reshape`, `[:, :-1]`,
  `narrow`, `split`, `chunk`, `unbind`, `transpose` of leading dims, `squeeze`/`unsqueeze`, `detach`, a no-op
  `contiguous`) return a LazyLogits of the same h rows (the op applied to h: a view of h, not of N x V);
- `float()`/`to(dtype)`, multiplication or division by a Python number (a temperature, a scale), a negation and
  `tanh` (a softcap) return a LazyLogits that replays them after the matmul;
- the same scales in place (`logits.div_(T)`) rebind a LazyLogits that no other live LazyLogits shares to the
  scaled logits (its autograd history rebased as eager's in-place op's); with another view alive they materialize;
- a consumer in `CONSUMERS` takes it fused: `F.cross_entropy` (any spelling that ends there, `nn.CrossEntropyLoss`
  too) with reduction "mean" or "sum" runs `liger_fx::linear_cross_entropy` on (h, W, b), folding the replayed casts,
  scales and softcap into the op's (softcap, logit_scale) as the in-graph rewrite does; token log-probs, entropies,
  a logsumexp and per-token losses (`reduction="none"`, `nll_loss` of a log-softmax) run
  `liger_fx::fused_linear_logprobs` through a small algebra of lazy log-softmaxes, softmaxes and their products
  (lazy_logprobs.py);
- anything else materializes: the logits are computed once (`F.linear(h, W, b)` and the replayed ops, exactly as
  eager computes them, with autograd to h and W) and kept; that use and every later one (in-place writes included)
  see that tensor, so the lazy tensor behaves as the eager one would. Printing shows the values.

What reading them costs (the logits are needed after all): one lm_head matmul outside Inductor (2*N*H*V FLOP, the
same cuBLAS call Inductor would make), with the same backward as eager (dh = g @ W, dW = g^T @ h), and h (N x H: 64 MiB
at Llama-3.2-1B B8 T2048 bf16, against 3.9 GiB of logits) kept alive with the LazyLogits until it is read or dropped.
A loop that never reads them (loss only) pays nothing but that N x H: the graph would have saved h for the lm_head's
backward anyway. Option `lazy_logits=False` (LigerConfig) returns plain logits.

Nothing is silently wrong:
- the weight can change before the logits are read (an optimizer step between `model(x)` and a metric on `pred`): a
  global optimizer step pre-hook, registered with the first LazyLogits, copies the weight (and bias) of every pending
  LazyLogits whose weight that optimizer updates, so the logits read later are the ones the model returned (the
  gradient still flows to the parameter). Any other in-place write to h, W or b before they are read raises, naming it;
- an op that reaches `__torch_dispatch__` (below autograd: `torch._C.DisableTorchFunctionSubclass` code) reads the
  logits' values and its gradient flows through the LazyLogits' own backward (the lm_head's); an in-place op there
  raises, as it could not be seen by later uses.

Extending: `register_consumer(func)` adds a fused consumer (lazy_logprobs.py registers its algebra this way); the
handler gets the function's arguments and returns NotImplemented to let the next one (and in the end
materialization) take the call.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import weakref
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch.utils._pytree import tree_flatten, tree_map_only

log = logging.getLogger("liger_fx")

__all__ = ["LazyLogits", "lazy_logits", "register_consumer", "CONSUMERS", "is_lazy", "fold"]


# --------------------------------------------------------------------------------------------------------------
# The source: h, W, b and the elementwise ops replayed after the matmul. Views of one LazyLogits share it (and its
# materialized value); an elementwise op makes a new source (a new tensor in eager too).

_Op = tuple  # ("cast", dtype) | ("mul", k) | ("div", k) | ("tanh",)


@dataclass(eq=False)
class _Source:
    h: torch.Tensor  # (*lead, H)
    weight: torch.Tensor  # (V, H)
    bias: Optional[torch.Tensor]  # (V,) or None
    ops: tuple[_Op, ...]
    autocast: Optional[tuple[str, torch.dtype]]  # (device type, dtype) of the autocast the lm_head ran under
    versions: tuple = ()
    value: Optional[torch.Tensor] = None  # the materialized logits (autograd to h, W, b)
    snapshot: bool = False  # W (and b) were copied before an optimizer step
    users: dict = field(default_factory=dict)  # id -> weakref of each LazyLogits of this source (not a WeakSet: it
    # compares tensors with ==, which would be an elementwise op on them)

    def add_user(self, t) -> None:
        self.users[id(t)] = weakref.ref(t)

    def live_users(self) -> list:
        alive = [r() for r in self.users.values()]
        self.users = {id(t): weakref.ref(t) for t in alive if t is not None}
        return [t for t in alive if t is not None]

    def __post_init__(self):
        self.versions = self._versions()
        _PENDING.add(self)

    def _versions(self) -> tuple:
        return tuple(t._version for t in (self.h, self.weight, self.bias) if t is not None)

    def check(self) -> None:
        if any(t.untyped_storage().nbytes() < (t.storage_offset() + 1) * t.element_size()
               for t in (self.h, self.weight, self.bias) if t is not None and t.numel()):
            raise RuntimeError(
                "liger_fx: lazy logits read after the storage of the lm_head's input or weight was freed (FSDP "
                "reshards parameters after the forward). Read them inside the forward's scope, or compile with "
                "options={'lazy_logits': False} to get plain logits from the compiled model."
            )
        if self._versions() != self.versions:
            raise RuntimeError(
                "liger_fx: lazy logits read after an in-place write to the lm_head's input, weight or bias (other "
                "than an optimizer step, which they are protected against). Read the logits before that write, or "
                "compile with options={'lazy_logits': False} to get plain logits from the compiled model."
            )

    def autocast_ctx(self):
        if self.autocast is None:  # the lm_head ran without autocast: so does its replay, whatever is active now
            return torch.autocast(self.h.device.type, enabled=False)
        device, dtype = self.autocast
        return torch.autocast(device, dtype=dtype)

    def compute(self, h, weight, bias) -> torch.Tensor:
        """The logits as eager computes them: the matmul under the lm_head's autocast state, then the ops."""
        with self.autocast_ctx():
            z = F.linear(h, weight, bias)
        return _replay(z, self.ops)

    def requires_grad(self) -> bool:
        return any(t is not None and t.requires_grad for t in (self.h, self.weight, self.bias))


def _replay(z: torch.Tensor, ops) -> torch.Tensor:
    for op in ops:
        if op[0] == "cast":
            z = z.to(op[1])
        elif op[0] == "mul":
            z = z * op[1]
        elif op[0] == "div":
            z = z / op[1]
        elif op[0] == "tanh":
            z = torch.tanh(z)
        elif op[0] == "log_softmax":  # the token log-prob algebra (lazy_logprobs.py)
            z = torch.log_softmax(z, -1)
        elif op[0] == "softmax":
            z = torch.softmax(z, -1)
        elif op[0] == "prod":  # two functions of the same logits, multiplied: ("prod", ops_a, ops_b)
            z = _replay(z, op[1]) * _replay(z, op[2])
        else:  # pragma: no cover - the ops are made here
            raise AssertionError(op)
    return z


def fold(ops) -> Optional[tuple[float, float]]:
    """(softcap, logit_scale) of the fused ops for replayed ops, or None when they do not fold (a cast to a dtype
    other than fp32 between the matmul and the loss, two tanh, a scale of 0 before the tanh, anything but casts,
    scales and a tanh). The fused ops compute transform(logits.float()) in fp32: as the in-graph rewrite
    (patterns/linear_cross_entropy._fold)."""
    pre, post, capped = 1.0, 1.0, False
    for op in ops:
        if op[0] == "cast":
            if op[1] != torch.float32:
                return None
        elif op[0] == "tanh":
            if capped:
                return None
            capped, post = True, pre
        elif op[0] in ("mul", "div"):
            k = op[1] if op[0] == "mul" else 1.0 / op[1]
            if capped:
                post *= k
            else:
                pre *= k
        else:
            return None
    if not capped:
        return 0.0, pre
    if pre == 0:
        return None
    return 1.0 / abs(pre), 1.0 if abs(post - 1.0) < 1e-12 else post


_PENDING: "weakref.WeakSet[_Source]" = weakref.WeakSet()
"""Sources not yet materialized, for the optimizer hook (weak: a dropped LazyLogits frees its h)."""
_HOOK = None


def _before_optimizer_step(optimizer, args, kwargs) -> None:
    """Copy W (and b) of each pending LazyLogits whose weight this optimizer updates in place: the logits read after
    the step are those the model returned. A copy of V x H (0.5 GiB at Llama-3.2-1B bf16), only while a LazyLogits
    is alive and unread at the step (a loop's `pred` usually is, until the next forward returns), against the N x V
    logits (3.9 GiB at B8 T2048) that plain logits would have held. The copy keeps its gradient path to the
    parameter."""
    if not _PENDING:
        return
    params = {p.data_ptr() for g in optimizer.param_groups for p in g["params"] if isinstance(p, torch.Tensor)}
    for src in list(_PENDING):
        if src.value is not None or src.snapshot:
            continue
        if any(t is not None and t.data_ptr() in params for t in (src.weight, src.bias)):
            try:
                src.check()
            except RuntimeError:  # already written to: reading them raises, not this unrelated step
                continue
            with torch.enable_grad():  # step() runs under no_grad; the copy keeps the path to the parameter
                src.weight = src.weight.clone()
                src.bias = src.bias.clone() if src.bias is not None else None
            src.versions = src._versions()
            src.snapshot = True


def _ensure_hook() -> None:
    global _HOOK
    if _HOOK is None:
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        _HOOK = register_optimizer_step_pre_hook(_before_optimizer_step)


# --------------------------------------------------------------------------------------------------------------
# The tensor subclass


class LazyLogits(torch.Tensor):
    """Logits `ops(h @ W^T + b)` not computed yet (see the module docstring). Made by `lazy_logits` (the compiled
    graph's caller) and by the views and elementwise ops above; never by users."""

    _src: _Source
    _h: torch.Tensor  # the rows of h this tensor's rows are: (*self.shape[:-1], H)
    _views: tuple  # (func, args, kwargs, index) replayed on the source's value
    _shadow: torch.Tensor  # a meta tensor with eager's size, strides and offset (views are applied to it first)
    _value: Optional[torch.Tensor]

    @staticmethod
    def __new__(cls, src, h, views, shadow):
        t = torch.Tensor._make_wrapper_subclass(
            cls, shadow.shape, strides=shadow.stride(), storage_offset=shadow.storage_offset(), dtype=shadow.dtype,
            device=src.h.device, requires_grad=False,
        )
        t._src, t._h, t._views, t._shadow, t._value = src, h, views, shadow, None
        src.add_user(t)
        return t

    def __init__(self, *args, **kwargs):
        super().__init__()

    # -- values -------------------------------------------------------------------------------------------------

    def materialize(self) -> torch.Tensor:
        """The logits as a plain tensor, computed once per source (later calls and views reuse it)."""
        if self._value is not None:
            return self._value
        src = self._src
        if src.value is None:
            src.check()
            # With autograd whatever the grad mode now: a metric read under no_grad must not leave a cached value
            # without a graph for a loss computed later.
            grad = src.requires_grad() and not torch.is_inference_mode_enabled()
            with torch.enable_grad() if grad else contextlib.nullcontext():
                src.value = src.compute(src.h, src.weight, src.bias)
            _PENDING.discard(src)
        out = src.value
        with torch.set_grad_enabled(self.requires_grad):
            for func, args, kwargs, index in self._views:
                out = func(out, *args, **kwargs)
                out = out if index is None else out[index]
        self._value = out
        return out

    def _plain(self) -> torch.Tensor:
        """The values for an op below autograd (`__torch_dispatch__`): never cached there, since a value computed
        below autograd has no graph for later uses."""
        if self._value is not None:
            return self._value
        src = self._src
        src.check()
        out = src.compute(src.h, src.weight, src.bias)
        for func, args, kwargs, index in self._views:
            out = func(out, *args, **kwargs)
            out = out if index is None else out[index]
        return out

    def operands(self) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """(h, W, b) of this tensor's rows, h shaped (*self.shape[:-1], H); detached where this tensor carries no
        gradient (a `.detach()`, a view taken under no_grad), as eager's logits would then carry none."""
        src = self._src
        src.check()
        h, w, b = self._h, src.weight, src.bias
        if not self.requires_grad:
            h, w, b = h.detach(), w.detach(), b.detach() if b is not None else None
        return h, w, b

    def fold(self) -> Optional[tuple[float, float]]:
        """(softcap, logit_scale) of the fused ops for this tensor's replayed ops (module-level `fold`), or None."""
        return fold(self._src.ops)

    @property
    def materialized(self) -> bool:
        return self._src.value is not None

    # -- torch function / dispatch --------------------------------------------------------------------------------

    @classmethod
    @torch._dynamo.disable
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        # Opaque to Dynamo: a compiled function that gets a LazyLogits (a `torch.compile`d loss_fn, as torchtitan
        # compiles it) breaks its graph once at each use and runs this eagerly, fused. Traced, Dynamo broke on each
        # metadata read inside (11 breaks and a warning for one flatten + float + cross_entropy).
        kwargs = kwargs or {}
        if func in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        special = _SPECIAL.get(func)
        if special is not None:
            return special(*args, **kwargs)
        lazies = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, LazyLogits)]
        if not any(t.materialized for t in lazies):
            for handler in CONSUMERS.get(func, ()) + _LAZY_OPS.get(func, ()):
                out = handler(func, *args, **kwargs)
                if out is not NotImplemented:
                    return out
        if not all(t.materialized for t in lazies):
            _note_materialized(func)
        args, kwargs = tree_map_only(LazyLogits, LazyLogits.materialize, (args, kwargs))
        return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        # Reached only by code that turns torch functions off for subclasses. The values are computed below autograd;
        # the gradient of the result reaches h and W through this tensor's own backward (`_Lazy`).
        if func._schema.is_mutable:
            raise RuntimeError(
                f"liger_fx: in-place {func} on lazy logits below autograd (torch functions disabled for tensor "
                "subclasses): its effect would be lost. Call .materialize() on them first, or compile with "
                "options={'lazy_logits': False}."
            )
        args, kwargs = tree_map_only(LazyLogits, LazyLogits._plain, (args, kwargs or {}))
        return func(*args, **kwargs)

    def __repr__(self, *, tensor_contents=None):
        return repr(self.materialize())


class _Lazy(torch.autograd.Function):
    """Gives a LazyLogits a gradient path to h, W and b. Used only by an op that reaches `__torch_dispatch__`: the
    ones that materialize above autograd differentiate the materialized logits directly. Its backward recomputes the
    logits with autograd from detached leaves (one more matmul: this path is a fallback)."""

    @staticmethod
    def forward(ctx, h, weight, bias, make):
        out = make()
        ctx.src, ctx.views = out._src, out._views
        ctx.set_materialize_grads(False)
        return out

    @staticmethod
    def backward(ctx, g):
        if g is None:
            return None, None, None, None
        src = ctx.src
        leaves = [t.detach().requires_grad_(need) if t is not None else None
                  for t, need in zip((src.h, src.weight, src.bias), ctx.needs_input_grad[:3])]
        with torch.enable_grad():
            out = src.compute(*leaves)
            for func, args, kwargs, index in ctx.views:
                out = func(out, *args, **kwargs)
                out = out if index is None else out[index]
            wanted = [t for t in leaves if t is not None and t.requires_grad]
            grads = iter(torch.autograd.grad(out, wanted, g, allow_unused=True))
        return (*(next(grads) if t is not None and t.requires_grad else None for t in leaves), None)


def _make(src: _Source, h, views, shadow, grad: bool = True) -> LazyLogits:
    """A LazyLogits with the gradient path eager's would have: none for a detach (`grad` False), under no_grad, or
    when nothing it is computed from requires grad."""
    def make():
        return LazyLogits(src, h, views, shadow)

    if not grad or not torch.is_grad_enabled() or not src.requires_grad():
        return make()
    return _Lazy.apply(src.h, src.weight, src.bias, make)


def lazy_logits(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, ops=()) -> LazyLogits:
    """The logits `ops(linear(h, weight, bias))` as a LazyLogits, under the autocast state active now (the one the
    compiled graph's lm_head ran under: Dynamo guards on it). `ops`: ("cast", dtype), ("mul", k), ("div", k),
    ("tanh",) in order."""
    device = h.device.type
    autocast = ((device, torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) and
                h.is_floating_point() else None)
    src = _Source(h, weight, bias, tuple(ops), autocast)
    _ensure_hook()
    return _make(src, h, (), _root_shadow(src))


_MATERIALIZED_BY: set[str] = set()


def _note_materialized(func) -> None:
    """A use that reads the logits: right (eager's values), but it costs the lm_head matmul outside the graph and
    the N x V logits the fused path avoids, so it is never silent: counted in
    `counters["liger_fx"]["lazy_logits_materialized"]`, and logged once per function that did it (INFO: reading
    logits for a metric is a legitimate use; the line names what to change where it was not meant)."""
    counters["liger_fx"]["lazy_logits_materialized"] += 1
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or str(func)
    if name not in _MATERIALIZED_BY:
        _MATERIALIZED_BY.add(name)
        log.info("liger_fx: lazy logits materialized by %s: the lm_head ran outside the compiled graph and made "
                 "the N x V logits (a loss on them fuses only as cross-entropy, log-softmax/gather, logsumexp or "
                 "entropy; options={'lazy_logits': False} returns plain logits instead)", name)


def _root_shadow(src: _Source) -> torch.Tensor:
    """A contiguous meta tensor with the logits' shape and dtype (the dtype from a meta run of the computation, so
    autocast and the casts give eager's)."""
    meta = [torch.empty(t.shape, dtype=t.dtype, device="meta") if t is not None else None
            for t in (src.h, src.weight, src.bias)]
    if src.autocast is not None:  # autocast has no meta device: cast as autocast casts a linear
        meta = [t.to(src.autocast[1]) if t is not None else None for t in meta]
    out = _replay(F.linear(*meta), src.ops)
    return torch.empty(out.shape, dtype=out.dtype, device="meta")


def is_lazy(t) -> bool:
    """Whether `t` is a LazyLogits whose logits are not computed yet."""
    return isinstance(t, LazyLogits) and not t.materialized


# --------------------------------------------------------------------------------------------------------------
# Views and elementwise ops that stay lazy


def _is_row_view(r: torch.Tensor, V: int) -> bool:
    """Whether a view of the (contiguous, (..., V)) source keeps every row whole: last dim V, stride 1, leading
    strides whole rows apart and none 0 (an expand would repeat rows)."""
    if r.dim() == 0 or r.shape[-1] != V or (r.stride(-1) != 1 and V > 1):
        return False
    return r.storage_offset() % V == 0 and all(s % V == 0 and (s != 0 or n == 1)
                                                 for s, n in zip(r.stride()[:-1], r.shape[:-1]))


# Views whose result is a row-major reinterpretation of the rows: h is reshaped to the result's leading shape.
_RESHAPES = {torch.Tensor.view, torch.Tensor.reshape, torch.reshape, torch.Tensor.flatten, torch.flatten,
             torch.Tensor.unflatten, torch.unflatten, torch.Tensor.squeeze, torch.squeeze, torch.Tensor.unsqueeze,
             torch.unsqueeze, torch.Tensor.view_as, torch.Tensor.reshape_as}
# Views that select or reorder rows: the same call on h gives its rows (checked against the result's shape).
_SELECTS = {torch.Tensor.__getitem__, torch.Tensor.narrow, torch.narrow, torch.Tensor.select, torch.select,
            torch.Tensor.split, torch.split, torch.Tensor.chunk, torch.chunk, torch.Tensor.unbind, torch.unbind,
            torch.Tensor.transpose, torch.transpose, torch.Tensor.swapaxes, torch.Tensor.permute, torch.permute,
            torch.Tensor.movedim, torch.movedim, torch.Tensor.tensor_split, torch.tensor_split}


def _index_is_rows(index, ndim: int) -> bool:
    """Basic indexing (ints, slices, None, one Ellipsis) that leaves the last dim to a slice: `[:, :-1]`,
    `[..., :-1, :]` (HF's old shift). Whether that slice keeps the whole vocabulary the caller checks on the result.
    Tensors, lists and bools index by value: a copy, and they could reach the vocabulary."""
    items = list(index) if isinstance(index, tuple) else [index]
    if any(not (it is None or it is Ellipsis or isinstance(it, slice) or
                (isinstance(it, int) and not isinstance(it, bool))) for it in items):
        return False
    if items.count(Ellipsis) > 1:
        return False
    if Ellipsis in items:
        k = items.index(Ellipsis)
        fill = ndim - sum(it is not None and it is not Ellipsis for it in items)
        if fill < 0:
            return False
        items = items[:k] + [slice(None)] * fill + items[k + 1:]
    consumed = [it for it in items if it is not None]
    if len(consumed) > ndim:
        return False
    return len(consumed) < ndim or isinstance(consumed[-1], slice)


def _view(func, *args, **kwargs):
    if not args or not isinstance(args[0], LazyLogits):
        return NotImplemented
    self, args = args[0], args[1:]
    if any(isinstance(a, torch.Tensor) and not isinstance(a, LazyLogits)
                                               for a in tree_flatten((args, kwargs))[0]):
        return NotImplemented
    if func is torch.Tensor.__getitem__ and not _index_is_rows(args[0], self.dim()):
        return NotImplemented
    if func in (torch.Tensor.view_as, torch.Tensor.reshape_as):  # the other tensor gives only a shape
        other = args[0]
        if not isinstance(other, torch.Tensor):
            return NotImplemented
        func, args, kwargs = (torch.Tensor.view if func is torch.Tensor.view_as else torch.Tensor.reshape,
                              (tuple(other.shape),), {})
    if func is torch.Tensor.view and args and isinstance(args[0], torch.dtype):
        return NotImplemented  # a reinterpretation of the bits
    V, H = self._src.weight.shape[0], self._h.shape[-1]
    try:
        out = func(self._shadow, *args, **kwargs)
    except Exception:
        return NotImplemented  # torch raises the user's error from the materialized call
    many = isinstance(out, (tuple, list))
    results = list(out) if many else [out]
    if func in _RESHAPES and not self._shadow.is_contiguous() and \
            not all(torch._C._is_alias_of(r, self._shadow) for r in results):
        # A reshape that copies (of `[:, :-1]`): eager's contiguous copy, then the view. The copy is a new source.
        return _view(func, _derive(self, None, self._shadow.contiguous()), *args, **kwargs)
    if not all(torch._C._is_alias_of(r, self._shadow) and _is_row_view(r, V) for r in results):
        return NotImplemented  # a copy (reshape of a non-contiguous view) or a view into the vocabulary dim
    if func in _RESHAPES:
        hs = [self._h.reshape(*r.shape[:-1], H) for r in results]
    else:
        h_out = func(self._h, *args, **kwargs)
        hs = list(h_out) if many else [h_out]
        if len(hs) != len(results) or any(tuple(x.shape) != (*r.shape[:-1], H) for x, r in zip(hs, results)):
            return NotImplemented
    made = [_make(self._src, h, self._views + ((func, args, kwargs, i if many else None),), r, self.requires_grad)
            for i, (h, r) in enumerate(zip(hs, results))]
    return type(out)(made) if many else made[0]


def _detach(func, *args, **kwargs):
    if len(args) != 1 or kwargs or not isinstance(args[0], LazyLogits):
        return NotImplemented
    self = args[0]
    return LazyLogits(self._src, self._h.detach(), self._views + ((torch.Tensor.detach, (), {}, None),), self._shadow)


def _contiguous(func, *args, **kwargs):
    if len(args) != 1 or not isinstance(args[0], LazyLogits) or \
            kwargs.get("memory_format", torch.contiguous_format) is not torch.contiguous_format:
        return NotImplemented
    self = args[0]
    if self._shadow.is_contiguous():
        return self  # as eager: the same tensor
    return _derive(self, None, self._shadow.contiguous())


def _derive(self: LazyLogits, op, shadow, ops=None) -> LazyLogits:
    """A new source (eager makes a new tensor) computing `op` after this tensor's ops (or `ops` of the linear's
    output in their place), over this tensor's rows; without a gradient path where this tensor has none (eager's
    result would have none)."""
    src = self._src
    h, weight, bias = self._h, src.weight, src.bias
    if not self.requires_grad:
        h, weight, bias = h.detach(), weight.detach(), bias.detach() if bias is not None else None
    if ops is None:
        ops = src.ops + ((op,) if op is not None else ())
    new = _Source(h, weight, bias, ops, src.autocast, snapshot=src.snapshot)
    return _make(new, h, (), torch.empty(shadow.shape, dtype=shadow.dtype, device="meta"))


class _Rebind(torch.autograd.Function):
    """The autograd record of an in-place scale of a LazyLogits (`_scale_in_place`): the tensor is marked dirty, so
    its history is rebased as eager's in-place op rebases it (the gradient through the dispatch fallback's
    `_Lazy` node is scaled)."""

    @staticmethod
    def forward(ctx, x, src, k):
        ctx.k = k
        x._src, x._views, x._value = src, (), None
        src.add_user(x)
        ctx.mark_dirty(x)
        return x

    @staticmethod
    def backward(ctx, g):
        return (g * ctx.k if g is not None else None), None, None


def _scale_in_place(func, *args, **kwargs):
    """`x.div_(k)`, `x.mul_(k)`, `x /= k`, `x *= k` by a number (a temperature: older GRPO loops write
    `logits.div_(T)`) on lazy logits that no other live LazyLogits shares: x becomes the lazy `x * k` (a new source
    over x's rows), so a log-prob or loss after it is still fused. Where another view of the same logits is alive it
    would have to see the write: that materializes, as any in-place op does."""
    if len(args) != 2 or kwargs or not isinstance(args[0], LazyLogits) or not _number(args[1]):
        return NotImplemented
    x, k = args[0], float(args[1])
    divide = func in (torch.Tensor.div_, torch.Tensor.__itruediv__)
    if divide and k == 0.0:
        return NotImplemented
    src = x._src
    live = src.live_users()
    if x._value is not None or src.value is not None or len(live) != 1 or live[0] is not x:
        return NotImplemented
    op = ("div", k) if divide else ("mul", k)
    h, weight, bias = x._h, src.weight, src.bias
    if not x.requires_grad:
        h, weight, bias = h.detach(), weight.detach(), bias.detach() if bias is not None else None
    new = _Source(h, weight, bias, src.ops + (op,), src.autocast, snapshot=src.snapshot)
    src.users.pop(id(x), None)
    _PENDING.discard(src)  # nothing can read the old source any more
    if x.requires_grad and torch.is_grad_enabled():
        with torch._C.DisableTorchFunctionSubclass():  # Function.apply would come back to __torch_function__
            _Rebind.apply(x, new, 1.0 / k if divide else k)
    else:
        x._src, x._views, x._value = new, (), None
        new.add_user(x)
    return x


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _elementwise_op(func, args, kwargs) -> Optional[_Op]:
    """The replayable op of a call on a LazyLogits (its first argument, or the second of `k * x`), or None."""
    if func in (torch.Tensor.float, torch.Tensor.half, torch.Tensor.bfloat16, torch.Tensor.double):
        if args[1:] or set(kwargs) - {"memory_format"} or kwargs.get("memory_format", torch.preserve_format) \
                is not torch.preserve_format:
            return None
        return ("cast", {torch.Tensor.float: torch.float32, torch.Tensor.half: torch.float16,
                         torch.Tensor.bfloat16: torch.bfloat16, torch.Tensor.double: torch.float64}[func])
    if func is torch.Tensor.to:
        rest, kw = args[1:], dict(kwargs)
        dtype = kw.pop("dtype", None)
        if rest and isinstance(rest[0], torch.dtype) and dtype is None:
            dtype, rest = rest[0], rest[1:]
        if dtype is None or rest or kw.pop("copy", False) or kw.pop("non_blocking", False) or \
                kw.pop("memory_format", torch.preserve_format) is not torch.preserve_format or kw:
            return None
        return ("cast", dtype) if dtype.is_floating_point else None
    if func in (torch.tanh, torch.Tensor.tanh):
        return ("tanh",) if len(args) == 1 and not kwargs else None
    if func in (torch.neg, torch.Tensor.neg, torch.Tensor.__neg__, torch.negative):  # -log_softmax (label smoothing)
        return ("mul", -1.0) if len(args) == 1 and not kwargs else None
    if func in (torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__, torch.multiply):
        if len(args) == 2 and not kwargs:
            a, b = args
            k = b if isinstance(a, LazyLogits) else a
            return ("mul", float(k)) if _number(k) else None
        return None
    if func in (torch.div, torch.Tensor.div, torch.Tensor.__truediv__, torch.divide, torch.true_divide):
        if len(args) == 2 and isinstance(args[0], LazyLogits) and _number(args[1]) and \
                kwargs.get("rounding_mode") is None and set(kwargs) <= {"rounding_mode"}:
            return ("div", float(args[1]))
        return None
    return None


def _elementwise(func, *args, **kwargs):
    op = _elementwise_op(func, args, kwargs)
    if op is None:
        return NotImplemented
    self = args[0] if isinstance(args[0], LazyLogits) else args[1]
    if any(isinstance(a, LazyLogits) and a is not self for a in args):
        return NotImplemented
    if op[0] == "cast":
        if op[1] == self.dtype:
            return self  # eager returns the same tensor
        shadow = self._shadow.to(op[1])
    elif op[0] == "tanh":
        shadow = torch.tanh(self._shadow)
    else:
        shadow = self._shadow * op[1] if op[0] == "mul" else self._shadow / op[1]
    if not shadow.is_floating_point():
        return NotImplemented
    return _derive(self, op, shadow)


# --------------------------------------------------------------------------------------------------------------
# Consumers that take the logits fused


CONSUMERS: dict[Callable, tuple[Callable, ...]] = {}
"""func -> handlers tried in order on a call with an unmaterialized LazyLogits among its arguments. A handler gets
`(func, *args, **kwargs)` and returns the result or NotImplemented."""


def register_consumer(func: Callable):
    """Decorator: add a fused consumer of LazyLogits for `func` (tried after the ones registered before it)."""
    def deco(handler):
        CONSUMERS[func] = CONSUMERS.get(func, ()) + (handler,)
        return handler
    return deco


_CE_SIGNATURE = inspect.signature(F.cross_entropy)


@register_consumer(F.cross_entropy)
def _cross_entropy(func, *args, **kwargs):
    """`F.cross_entropy(logits (N, V), target (N,))`, reduction "mean" or "sum", class-index targets, no class weight
    or label smoothing: `liger_fx::linear_cross_entropy` on (h, W, b), never making the N x V logits. What it does
    not take (3-D logits with the classes in dim 1, probability targets) falls through; reduction="none":
    lazy_logprobs._cross_entropy_none."""
    try:
        a = _CE_SIGNATURE.bind(*args, **kwargs).arguments
    except TypeError:
        return NotImplemented
    x, target = a["input"], a["target"]
    if not isinstance(x, LazyLogits) or not isinstance(target, torch.Tensor) or isinstance(target, LazyLogits):
        return NotImplemented
    reduction = a.get("reduction", "mean")
    if a.get("weight") is not None or a.get("size_average") is not None or a.get("reduce") is not None or \
            a.get("label_smoothing", 0.0) != 0.0 or reduction not in ("mean", "sum"):
        return NotImplemented
    if x.dim() != 2 or target.dim() != 1 or target.is_floating_point() or target.shape[0] != x.shape[0]:
        return NotImplemented
    fold = x.fold()
    if fold is None or not isinstance(a.get("ignore_index", -100), int):
        return NotImplemented
    h, w, b = x.operands()
    with x._src.autocast_ctx():
        loss = torch.ops.liger_fx.linear_cross_entropy(h, w, b, target, int(a.get("ignore_index", -100)), reduction,
                                                       float(fold[0]), float(fold[1]))
    return loss if x.dtype == torch.float32 else loss.to(x.dtype)  # torch's loss has the logits' dtype


# --------------------------------------------------------------------------------------------------------------
# Dispatch tables

_LAZY_OPS: dict[Callable, tuple[Callable, ...]] = {}
for _f in _RESHAPES | _SELECTS:
    _LAZY_OPS[_f] = (_view,)
for _f in (torch.Tensor.float, torch.Tensor.half, torch.Tensor.bfloat16, torch.Tensor.double, torch.Tensor.to,
           torch.tanh, torch.Tensor.tanh, torch.neg, torch.Tensor.neg, torch.Tensor.__neg__, torch.negative,
           torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__, torch.multiply, torch.div,
           torch.Tensor.div, torch.Tensor.__truediv__, torch.divide, torch.true_divide):
    _LAZY_OPS[_f] = (_elementwise,)
_LAZY_OPS[torch.Tensor.detach] = (_detach,)
for _f in (torch.Tensor.div_, torch.Tensor.mul_, torch.Tensor.__itruediv__, torch.Tensor.__imul__):
    _LAZY_OPS[_f] = (_scale_in_place,)
_LAZY_OPS[torch.Tensor.contiguous] = (_contiguous,)


def _grad(self):
    """`.grad` of the logits: that of the materialized tensor (after `retain_grad()`), else None, as a non-leaf's."""
    return self._value.grad if self._value is not None else None


def _requires_grad_(self, requires_grad=True):
    """On a detached LazyLogits (a leaf, as eager's detached logits): the gradient is wanted on the logits
    themselves, so they are made now and the flag set on both (`.grad` reads the materialized tensor's)."""
    value = self.materialize()
    value.requires_grad_(requires_grad)
    with torch._C.DisableTorchFunctionSubclass():
        torch.Tensor.requires_grad_(self, requires_grad)
    return self


_SPECIAL: dict[Callable, Callable] = {
    torch.Tensor.grad.__get__: _grad,
    torch.Tensor.requires_grad_: _requires_grad_,
}

# Reads of metadata the wrapper has (eager's size, strides, dtype, device, autograd state): no logits needed.
_METADATA = {
    torch.Tensor.shape.__get__, torch.Tensor.dtype.__get__, torch.Tensor.device.__get__,
    torch.Tensor.requires_grad.__get__, torch.Tensor.is_leaf.__get__, torch.Tensor.grad_fn.__get__,
    torch.Tensor.ndim.__get__, torch.Tensor.layout.__get__, torch.Tensor.is_cuda.__get__,
    torch.Tensor.is_cpu.__get__, torch.Tensor.is_meta.__get__, torch.Tensor.is_sparse.__get__,
    torch.Tensor.is_quantized.__get__, torch.Tensor.is_nested.__get__, torch.Tensor.output_nr.__get__,
    torch.Tensor.size, torch.Tensor.dim, torch.Tensor.ndimension, torch.Tensor.numel, torch.Tensor.nelement,
    torch.Tensor.is_floating_point, torch.Tensor.is_complex, torch.Tensor.element_size, torch.Tensor.get_device,
    torch.Tensor.stride, torch.Tensor.is_contiguous, torch.Tensor.storage_offset, torch.Tensor.__len__,
    torch.Tensor.__hash__, torch.Tensor.__dir__, torch.numel,
}


from . import lazy_logprobs  # noqa: E402,F401  (registers the token log-prob algebra's consumers)
