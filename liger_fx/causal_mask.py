"""Step 1b of the pipeline (option `causal_sdpa`): an SDPA whose mask is provably the causal triangle runs causal.

    kv = arange(S) + c;  q = arange(L) + c;  mask = (kv[None, :] <= q[:, None]).expand(B, 1, L, S)   (L == S)
    mask = tril(ones(L, S, dtype=bool))                                                                (L == S)
    scaled_dot_product_attention(q, k, v, attn_mask=mask)  ->  scaled_dot_product_attention(q, k, v, is_causal=True)

Why: SDPA cannot see that a mask tensor is causal, so it runs its masked kernels and reads a B x 1 x T x T mask. On
the H200 (Llama-3.2-1B shape, B8 T2048, cuDNN flash kernels) attention took 64.9 ms of a step with the mask and 24.6
ms causal. transformers 5.17 builds exactly the first spelling under torch.compile for an unpadded batch (its
`sdpa_mask` cannot rule out packed sequences while traced); plain PyTorch decoders often write the second.

The proof is structural and exact: both index vectors start at the same offset (the same int, or the same node),
have the same length, and stand along the query (-2) and key (-1) dims; everything between the comparison and SDPA
only adds leading dims. Anything else (a padding mask and-ed in, a sliding window, a query shorter than the keys, as
with a KV cache) is left as it is.

The triangle may be and-ed with terms that are provably all True. transformers (5.17 and 5.24 alike) on torch 2.11,
the GPU stack, traces its packed-sequence check into every training mask when no position ids are given:

    pos = arange(T) + c, expanded to (B, T)                    the model's own position ids
    doc = cumsum(diff(pos, prepend=pos[:, :1] - 1) != 1, -1)   `find_packed_sequence_indices`: all 0 here
    mask = ones(()) & (kv <= q) & (doc[b, q] == doc[b, kv])

Seen in the graph of a tiny Llama under torch 2.11 (torch 2.13 drops the check while tracing, which is why the CPU
tests passed and the H200 did not fire). The diff of an arange with that prepend is 1 everywhere, so `doc` is constant
along its last dim and the equality always holds. Position ids given by the caller (packed sequences, TRL's packing)
are a graph input: nothing can be proven about them and the mask stays.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .canonicalize import val as _val

aten = torch.ops.aten
log = logging.getLogger("liger_fx")

_ARANGES = (aten.arange.default, aten.arange.start, aten.arange.start_step)
_UNSQUEEZES = (aten.unsqueeze.default, aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def _same(a, b) -> bool:
    """Two sizes or offsets that are equal for every input: the same node, or ints / SymInts provably equal."""
    if a is b:
        return True
    a, b = (_val(x) if isinstance(x, fx.Node) else x for x in (a, b))
    if a is None or b is None or isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    try:
        return bool(statically_known_true(a == b))
    except Exception:
        return False


def _only_dim(node: fx.Node) -> int | None:
    """The one dim of node's value that is not 1 (negative index), or None."""
    val = _val(node)
    if val is None:
        return None
    dims = [d - val.dim() for d, s in enumerate(val.shape) if not statically_known_true(s == 1)]
    return dims[0] if len(dims) == 1 else None


def _full_slice(node) -> bool:
    """`x[..., :]`: a slice that keeps everything (`i[None, :]` with a symbolic length keeps one in the graph)."""
    if not (isinstance(node, fx.Node) and node.target is aten.slice.Tensor):
        return False
    start = node.args[2] if len(node.args) > 2 else 0
    step = node.args[4] if len(node.args) > 4 else 1
    out, src = _val(node), _val(node.args[0])
    return (start in (0, None) and step == 1 and out is not None and src is not None
            and len(out.shape) == len(src.shape) and all(_same(a, b) for a, b in zip(out.shape, src.shape)))


def _index(node: fx.Node):
    """(offset, length) if node is `arange(length) [+ offset]`, possibly given singleton dims; else None."""
    while isinstance(node, fx.Node) and node.op == "call_function" and (node.target in _UNSQUEEZES
                                                                       or _full_slice(node)):
        if _only_dim(node) is None or _only_dim(node.args[0]) is None:
            return None  # a view that splits or merges the index dim
        node = node.args[0]
    offset = 0
    if isinstance(node, fx.Node) and node.target is aten.add.Tensor:
        a, b = node.args[:2]
        node, offset = (a, b) if isinstance(a, fx.Node) and a.target in _ARANGES else (b, a)
        if isinstance(offset, fx.Node) and _val(offset) is not None and isinstance(_val(offset), torch.Tensor):
            return None  # a tensor offset (a cache position): not provably the same for q and k here
    if not (isinstance(node, fx.Node) and node.target in _ARANGES):
        return None
    args = list(node.args)
    if node.target is aten.arange.default:
        start, end, step = 0, args[0], 1
    else:
        start, end = args[0], args[1]
        step = args[2] if len(args) > 2 else 1
    if not (_same(start, 0) and _same(step, 1)):
        return None
    return offset, end


def _strip_leading(mask: fx.Node) -> fx.Node:
    """Skip expand / unsqueeze-at-a-leading-dim between the (L, S) mask and SDPA, and slices that keep everything
    (transformers' `mask[:, :, :, :S]` with S the mask's own length): they do not move the last two dims."""
    while isinstance(mask, fx.Node) and mask.op == "call_function":
        if mask.target is aten.expand.default:
            mask = mask.args[0]
        elif mask.target is aten.unsqueeze.default and mask.args[1] <= -3:
            mask = mask.args[0]
        elif _full_slice(mask) or mask.target is aten.alias.default:
            mask = mask.args[0]
        else:
            break
    return mask


def _is_ones(node) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.target is aten.to.dtype:
        return _is_ones(node.args[0])
    if node.target is aten.ones.default:
        return True
    return node.target is aten.full.default and node.args[1] in (1, 1.0, True)


_ANDS = (aten.__and__.Tensor, aten.bitwise_and.Tensor, aten.logical_and.default)


def _and_terms(mask: fx.Node) -> list:
    """The factors of a boolean conjunction (nested ands, expands and leading unsqueezes in between), else [mask]."""
    mask = _strip_leading(mask)
    if isinstance(mask, fx.Node) and mask.op == "call_function" and mask.target in _ANDS:
        return [t for a in mask.args[:2] for t in _and_terms(a)]
    return [mask]


def _along_last(node):
    """`node` with expands and unsqueezes that keep the last dim skipped (a (T,) index broadcast to (B, T))."""
    while isinstance(node, fx.Node) and node.op == "call_function":
        if node.target is aten.expand.default and node.args[1][-1] in (-1, _val(node.args[0]).shape[-1]):
            node = node.args[0]
        elif node.target is aten.unsqueeze.default and node.args[1] < -1:
            node = node.args[0]
        else:
            break
    return node


def _is_arange_last(node) -> bool:
    """`arange(T) [+ c]` along the last dim, possibly broadcast over leading dims: consecutive steps of exactly 1."""
    node = _along_last(node)
    return isinstance(node, fx.Node) and _index(node) is not None and _only_dim(node) == -1


def _all_ones_diff(node) -> bool:
    """`diff(p, prepend=p[..., :1] - 1)` along the last dim of an arange p: 1 at every position."""
    if not (isinstance(node, fx.Node) and node.target is aten.diff.default):
        return False
    args = list(node.args) + [None] * (5 - len(node.args))
    p, n, dim, prepend, append = args[:5]
    n, dim = node.kwargs.get("n", n if n is not None else 1), node.kwargs.get("dim", dim if dim is not None else -1)
    prepend, append = node.kwargs.get("prepend", prepend), node.kwargs.get("append", append)
    rank = _val(p).dim() if _val(p) is not None else None
    if n != 1 or append is not None or rank is None or dim not in (-1, rank - 1) or not _is_arange_last(p):
        return False
    # prepend = p[..., 0:1] - 1: the first difference is p[0] - (p[0] - 1) = 1
    if not (isinstance(prepend, fx.Node) and prepend.op == "call_function"):
        return False
    if prepend.target is aten.sub.Tensor and prepend.args[1] == 1:
        first = prepend.args[0]
    elif prepend.target is aten.add.Tensor and prepend.args[1] == -1:
        first = prepend.args[0]
    else:
        return False
    return (isinstance(first, fx.Node) and first.target is aten.slice.Tensor and first.args[0] is p
            and first.args[1] in (-1, rank - 1) and _same(first.args[2], 0) and _same(first.args[3], 1)
            and (len(first.args) < 5 or first.args[4] == 1))


def _constant_along_last(node) -> bool:
    """A tensor provably constant along its last dim: the cumsum of an all-False `diff != 1` (transformers'
    packed-sequence index of its own arange position ids)."""
    if not (isinstance(node, fx.Node) and node.target is aten.cumsum.default):
        return False
    z = node.args[0]
    return (node.args[1] in (-1, _val(z).dim() - 1 if _val(z) is not None else -1)
            and isinstance(z, fx.Node) and z.target in (aten.ne.Scalar, aten.ne.Tensor) and z.args[1] == 1
            and _all_ones_diff(z.args[0]))


def _all_true(node) -> bool:
    """A boolean term provably True everywhere: ones (or True fills), or `s[i.., q] == s[i.., kv]` for an `s`
    constant along its last dim, indexed by the same leading index tensors."""
    node = _strip_leading(node)
    if _is_ones(node) or (isinstance(node, fx.Node) and node.target is aten.new_ones.default):
        return True
    if not (isinstance(node, fx.Node) and node.target is aten.eq.Tensor):
        return False
    a, b = node.args[:2]
    if not all(isinstance(x, fx.Node) and x.target is aten.index.Tensor for x in (a, b)):
        return False
    (sa, ia), (sb, ib) = a.args[:2], b.args[:2]
    rank = _val(sa).dim() if _val(sa) is not None else None
    return (sa is sb and rank is not None and len(ia) == len(ib) == rank
            and all(x is y for x, y in zip(ia[:-1], ib[:-1])) and _constant_along_last(sa))


def causal_extent(mask: fx.Node):
    """(L, S) if the boolean `mask` is exactly the causal triangle (True where key <= query) in its last two dims,
    else None. The triangle may be and-ed with provably all-True terms (see the module docstring)."""
    if not isinstance(mask, fx.Node) or _val(mask) is None or _val(mask).dtype != torch.bool:
        return None  # a float mask is added to the scores: another meaning
    terms = _and_terms(mask)
    extents = [_triangle(t) for t in terms]
    found = [e for e in extents if e is not None]
    if len(found) != 1 or not all(_all_true(t) for t, e in zip(terms, extents) if e is None):
        return None
    L, S = found[0]
    shape = _val(mask).shape  # an all-True factor must not broadcast the triangle to other lengths
    if not (_same(shape[-2], L) and _same(shape[-1], S)):
        return None
    return L, S


def _triangle(mask) -> tuple | None:
    """(L, S) if `mask` (one factor) is the causal triangle itself."""
    if not isinstance(mask, fx.Node) or getattr(_val(mask), "dtype", None) != torch.bool:
        return None
    mask = _strip_leading(mask)
    if _marked_input(mask):
        shape = _val(mask).shape
        return shape[-2], shape[-1]
    if mask.op != "call_function":
        return None
    if mask.target is aten.to.dtype:
        mask = mask.args[0]  # tril(ones(float)).bool(): the cast to bool was checked above
    if mask.target is aten.tril.default:
        diagonal = mask.args[1] if len(mask.args) > 1 else mask.kwargs.get("diagonal", 0)
        if diagonal != 0 or not _is_ones(mask.args[0]):
            return None
        shape = _val(mask).shape
        return shape[-2], shape[-1]
    if mask.target is aten.le.Tensor:
        kv, q = mask.args[:2]
    elif mask.target is aten.ge.Tensor:
        q, kv = mask.args[:2]
    else:
        return None
    if not (isinstance(kv, fx.Node) and isinstance(q, fx.Node)) or _only_dim(kv) != -1 or _only_dim(q) != -2:
        return None
    kv_index, q_index = _index(kv), _index(q)
    if kv_index is None or q_index is None or not _same(kv_index[0], q_index[0]):
        return None
    return q_index[1], kv_index[1]


def sdpa_calls(graph: fx.Graph):
    """(node, args as a list, kwargs as a dict, attn_mask) of every SDPA call, for a pass to edit and write back."""
    for node in graph.nodes:
        if node.op == "call_function" and node.target is aten.scaled_dot_product_attention.default:
            args, kwargs = list(node.args), dict(node.kwargs)
            yield node, args, kwargs, (args[3] if len(args) > 3 else kwargs.get("attn_mask"))


def causal_sdpa(graph: fx.Graph, relied: list | None = None, unmarked: list | None = None) -> list[fx.Node]:
    """Rewrite every SDPA whose boolean mask is the causal triangle over equal query and key lengths to
    `is_causal=True` with no mask. Returns the rewritten SDPA nodes. Appends to `relied` the graph inputs taken as
    causal because an earlier graph marked them, and to `unmarked` the bool mask inputs that would have been, had
    they carried a mark (their callers guard on the mark, present or absent: see MaskPlan)."""
    done = []
    for node, args, kwargs, mask in sdpa_calls(graph):
        is_causal = args[5] if len(args) > 5 else kwargs.get("is_causal", False)
        if not isinstance(mask, fx.Node) or is_causal:
            continue
        extent = causal_extent(mask)
        q, k = _val(args[0]), _val(args[1])
        if q is None or k is None:
            continue
        if extent is None:
            base = _strip_leading(mask)
            if (unmarked is not None and base.op == "placeholder" and "dynamo_source" in base.meta
                    and _same(q.shape[-2], k.shape[-2]) and base not in unmarked):
                unmarked.append(base)
            continue
        L, S = extent
        if not (_same(L, S) and _same(q.shape[-2], L) and _same(k.shape[-2], S)):
            continue
        if relied is not None:
            relied.extend(p for p in marked_inputs(mask) if p not in relied)
        dropout = args[4] if len(args) > 4 else kwargs.pop("dropout_p", 0.0)
        kwargs.pop("attn_mask", None)
        kwargs.pop("is_causal", None)
        node.args = (*args[:3], None, dropout, True)
        node.kwargs = kwargs
        done.append(node)
    if done:
        graph.eliminate_dead_code()
    return done



# --------------------------------------------------------------------------------------------------------------
# Masks that cross graphs.
#
# Where a graph break falls between the code that builds the mask and the attention (FSDP2 breaks the graph at every
# fully_shard layer; a user's block-by-block compile; any graph break), the mask reaches each layer's graph as an
# input, and nothing about an input can be proven from its graph: every layer would run the masked kernel (the
# FSDP2 plain path on the H200: 0.99x Inductor, from 1.13x through liger_fx.apply, which avoids the mask). So the
# graph that builds the mask states the fact on the tensor it returns, and the graphs that read it rely on it only
# under a guard:
#   1. builder: an output that is provably the causal triangle (causal_extent) is marked when the graph returns it
#      (`mark`: an attribute on that tensor object holding its version counter). An output that has a causal-looking
#      factor (a <= / >= comparison, tril) but no proof, e.g. transformers' mask built from position ids that an
#      eager part of the model made, is compared with the triangle inside the same graph (`triangle_check`, one
#      reduction fused by Inductor), and marked when that says True: one host sync where it runs, once a step.
#   2. reader: an SDPA whose mask is a marked input (through expands and full slices) is a causal SDPA like any
#      other (`_triangle`). The backend adds a Dynamo guard that the input carries the mark (a tensor without it,
#      e.g. a padded evaluation batch's mask, recompiles the graph, which then keeps its mask), and checks at every
#      call that the mark is current (`is_marked`: an in-place write since the marking bumps the version counter);
#      a stale one runs Dynamo's own graph instead, with its mask.
# A mark is never set on what was not proven or checked, and a view or copy of a marked tensor is a new object
# without it: padding, sliding windows, packed documents keep their masks (tests/test_causal_mask.py).

MARK = "_liger_fx_causal_mask"
"""The attribute `mark` sets on a mask tensor."""


class CausalMark:
    """The tensor carrying this is the causal triangle (True where key index <= query index) over its last two dims,
    for every leading index, as of its version counter `version`."""

    __slots__ = ("version",)

    def __init__(self, version: int):
        self.version = version


def mark(t) -> None:
    """State on `t` (a bool tensor a compiled graph returns) that it is the causal triangle."""
    try:
        setattr(t, MARK, CausalMark(t._version))
    except (AttributeError, RuntimeError):  # an inference-mode tensor has no version counter: no mark, no rewrite
        pass


def is_marked(t) -> bool:
    """Whether `t` carries a current mark: not written in place since it was marked."""
    m = getattr(t, MARK, None) if isinstance(t, torch.Tensor) else None
    if type(m) is not CausalMark or t.dtype != torch.bool or t.dim() < 2:
        return False
    try:
        return m.version == t._version
    except RuntimeError:
        return False


def _marked_input(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "placeholder" and node.meta.get("causal_mask_marked", False)


def note_mask_inputs(gm: fx.GraphModule, relied: list, unmarked: list) -> None:
    """Keep, on the traced graph module, (input index, Dynamo source) of the mask inputs relied on as marked and of
    those read unmarked, for MaskPlan."""
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    gm.liger_marked_inputs = [(inputs.index(p), p.meta["dynamo_source"]) for p in relied]
    gm.liger_unmarked_inputs = [(inputs.index(p), p.meta["dynamo_source"]) for p in unmarked]


def marked_inputs(mask: fx.Node) -> list[fx.Node]:
    """The marked graph inputs among the factors of `mask`."""
    return [t for t in (_strip_leading(x) for x in _and_terms(mask)) if _marked_input(t)]


def triangle_check(mask: torch.Tensor) -> torch.Tensor:
    """True (0-d) where `mask` equals the causal triangle over its last two dims at every leading index. Called inside
    the graph (AOTAutograd traces it), so its cost is one fused reduction over the mask, read once."""
    q = torch.arange(mask.shape[-2], device=mask.device).unsqueeze(-1)
    kv = torch.arange(mask.shape[-1], device=mask.device)
    return torch.eq(mask, kv <= q).all()


_CAUSAL_LOOKING = (aten.le.Tensor, aten.ge.Tensor, aten.tril.default)


def _causal_looking(mask: fx.Node) -> bool:
    """A factor that compares indices or takes a lower triangle: worth a check at run time."""
    for t in _and_terms(mask):
        t = _strip_leading(t)
        if isinstance(t, fx.Node) and t.op == "call_function" and t.target is aten.to.dtype:
            t = t.args[0]
        if isinstance(t, fx.Node) and t.op == "call_function" and t.target in _CAUSAL_LOOKING:
            return True
    return False


def mask_outputs(graph: fx.Graph, checks: bool) -> tuple[list[int], list[tuple[int, int]]]:
    """Which outputs of the graph are causal masks to mark when it returns them: (positions proven causal,
    [(position, position of its check output)]). With `checks`, each causal-looking bool output without a proof gets
    a `triangle_check` output appended after the others (the caller drops it)."""
    out_node = graph.output_node()
    outs = out_node.args[0]
    if not isinstance(outs, (tuple, list)):
        return [], []
    proven, checked, extra = [], [], []
    for i, o in enumerate(outs):
        v = _val(o)
        if not (isinstance(v, torch.Tensor) and v.dtype == torch.bool and v.dim() >= 2):
            continue
        if causal_extent(o) is not None:
            proven.append(i)
        elif checks and _causal_looking(o):
            with graph.inserting_before(out_node):
                check = graph.call_function(triangle_check, (o,))
            with v.fake_mode if isinstance(v, FakeTensor) else contextlib.nullcontext():
                check.meta["val"] = triangle_check(v)
            checked.append((i, len(outs) + len(extra)))
            extra.append(check)
    if extra:
        out_node.args = (type(outs)([*outs, *extra]),)
    return proven, checked


def guard_marks(sources) -> None:
    """Have Dynamo guard the compiled frame on whether each input carries a mark, as it does now (`hasattr`, or
    `not hasattr`): a graph that took a marked mask as causal is not reused for one without a mark, and one that kept
    an unmarked mask is not reused for a marked one (which then compiles its causal graph once)."""
    import functools
    import inspect

    from torch._dynamo.guards import GuardBuilder
    from torch._dynamo.source import AttrSource
    from torch._guards import TracingContext

    guards = TracingContext.get().guards_context.dynamo_guards
    for source in sources:
        if "attr" in inspect.signature(GuardBuilder.HASATTR).parameters:  # torch 2.13: the base and the name
            guards.add(source.make_guard(functools.partial(GuardBuilder.HASATTR, attr=MARK)))
        else:  # torch 2.11: the attribute's source
            guards.add(AttrSource(source, MARK).make_guard(GuardBuilder.HASATTR))


class MaskPlan:
    """What the backend's wrapper does around one compiled graph for masks that cross graphs: mark the causal masks
    it returns (proven, or checked in the graph: the check outputs are appended and dropped again), and before each
    call check that the marked inputs it took as causal still carry a current mark, running Dynamo's own graph
    (`eager`, masks kept) where one does not. Built from the rewritten graph before it is compiled; appends the check
    outputs to it (the caller recompiles)."""

    def __init__(self, traced: fx.GraphModule, eager: fx.GraphModule, checks: bool):
        self.eager = eager
        self.inputs = list(getattr(traced, "liger_marked_inputs", []))
        self.unmarked = list(getattr(traced, "liger_unmarked_inputs", []))
        self.proven, self.checked = mask_outputs(traced.graph, checks)

    def wrap(self, compiled, record):
        """The compiled callable with the marks handled; adds Dynamo's guards on the mask inputs' marks."""
        if self.inputs or self.unmarked:
            try:
                guard_marks([source for _, source in self.inputs + self.unmarked])
            except Exception as e:  # correct without it (the check below), only no recompile where the mark changes
                log.debug("liger_fx: graph %d: no guard on the mask inputs' marks (%s)", record.index, e)
        if not (self.inputs or self.proven or self.checked):
            return compiled
        if self.inputs:
            record.causal_from_marks = len(self.inputs)
        positions = [i for i, _ in self.inputs]
        proven, checked, eager = self.proven, self.checked, self.eager
        n_out = min((j for _, j in checked), default=None)
        warned = []

        def run(*args):
            if positions and not all(is_marked(args[i]) for i in positions):
                if not warned:
                    warned.append(True)
                    log.warning("liger_fx: graph %d: a mask it takes as causal was written in place after it was "
                                "marked; running Dynamo's graph with the mask instead", record.index)
                return eager(*args)
            outs = compiled(*args)
            for i in proven:
                mark(outs[i])
            for i, j in checked:
                if bool(outs[j]):  # one host sync: the check ran in the graph
                    mark(outs[i])
            if n_out is not None:
                outs = type(outs)(outs[:n_out]) if isinstance(outs, tuple) else outs[:n_out]
            return outs

        return run
