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

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .canonicalize import val as _val

aten = torch.ops.aten

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
    """Skip expand / unsqueeze-at-a-leading-dim between the (L, S) mask and SDPA: they do not move the last two dims."""
    while isinstance(mask, fx.Node) and mask.op == "call_function":
        if mask.target is aten.expand.default:
            mask = mask.args[0]
        elif mask.target is aten.unsqueeze.default and mask.args[1] <= -3:
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
    if not isinstance(mask, fx.Node) or mask.op != "call_function" or getattr(_val(mask), "dtype", None) != torch.bool:
        return None
    mask = _strip_leading(mask)
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


def causal_sdpa(graph: fx.Graph) -> list[fx.Node]:
    """Rewrite every SDPA whose boolean mask is the causal triangle over equal query and key lengths to
    `is_causal=True` with no mask. Returns the rewritten SDPA nodes."""
    done = []
    for node, args, kwargs, mask in sdpa_calls(graph):
        is_causal = args[5] if len(args) > 5 else kwargs.get("is_causal", False)
        if not isinstance(mask, fx.Node) or is_causal:
            continue
        extent = causal_extent(mask)
        q, k = _val(args[0]), _val(args[1])
        if extent is None or q is None or k is None:
            continue
        L, S = extent
        if not (_same(L, S) and _same(q.shape[-2], L) and _same(k.shape[-2], S)):
            continue
        dropout = args[4] if len(args) > 4 else kwargs.pop("dropout_p", 0.0)
        kwargs.pop("attn_mask", None)
        kwargs.pop("is_causal", None)
        node.args = (*args[:3], None, dropout, True)
        node.kwargs = kwargs
        done.append(node)
    if done:
        graph.eliminate_dead_code()
    return done
