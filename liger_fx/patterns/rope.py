"""Rotary position embedding, every way public model code writes it. One rotation of channel pairs (x1, x2) ->
(x1*cos - x2*sin, x2*cos + x1*sin), the pairs taken as halves (x[..., :h], x[..., h:]; HF Llama) or as interleaved
even/odd channels (x[..., 0::2], x[..., 1::2]; GPT-J, GLM, Cohere, DeepSeek, Meta's Llama), in three forms:

    rotate   x * cos + rot(x) * sin                        tables as wide as the rotation
               halves: rot(x) = cat(-x2, x1)                HF's rotate_half (or x.chunk(2, -1))
               pairs:  rot(x) = stack((-x2, x1), -1).flatten(-2)   GPT-J's rotate_every_two, tables repeat_interleave'd
                       (or x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1), as einops' rearrange writes it)
               halves through a view: x1, x2 = x.view(*x.shape[:-1], 2, d // 2).unbind(-2) (canonicalize makes
                       the parts the slices x[..., :h], x[..., h:]; lit-gpt's and OLMo-style rotate_half)
    join     join(x1*cos - x2*sin, x2*cos + x1*sin)        half-width tables; join = cat (halves out) or
                                                           stack(..).flatten(-2) (pairs out). DeepSeek-V3's HF
                                                           `apply_rotary_pos_emb_interleave` reads pairs, writes halves;
                                                           ChatGLM reads and writes pairs
    complex  view_as_real(view_as_complex(x.unflatten(-1, (-1, 2))) * freqs_cis).flatten(-2)
                                                           Meta's Llama, torchtitan, HF DeepSeek-V2 (pairs in and out)
             or on the halves packed as complex (halves in and out): view_as_complex(stack((x1, x2), -1)) or
             torch.complex(x1, x2), times freqs_cis, back by cat(chunk(view_as_real(.), 2, -1), -2).flatten(-2)
             (or .squeeze(-1), .view(x.shape)) or cat((r[..., 0], r[..., 1]), -1)
    upcast (ESM, Evolla):  (x.float() * cos + rotate_half(x.float()) * sin).to(x.dtype)

Each form is one search function; its variants come from a loop over (form, split, join, upcast), and each becomes
`liger_fx::rope(x, cos, sin, dtype, x_pairs, y_pairs)` with full-width tables (the join and complex forms build
theirs from the half-width ones: T x rd values, computed once per layer for q and k together). The tables are
pattern inputs, not part of the pattern: HF unsqueezes (and GPT-J repeat-interleaves) once per layer for both q and
k, so those nodes have users outside either match. The head split `h` is captured from the graph and checked to be
half the rotated width; the sequence length never appears in a pattern (canonicalize gives the pair views one
size-free spelling), so a dynamic T still matches.

After matching, `post_pass` makes the rotation one op where the model wrote more around it, every fold exact:
  - partial rotary `cat([rope(x[..., :rd]), x[..., rd:]])` (GPT-NeoX, Phi-3, GPT-J, GLM) -> rope(x): the op passes
    the channels past the tables' width through, so no pattern needs a partial variant;
  - DeepSeek's de-interleave `x.view(.., d/2, 2).transpose(-1, -2).reshape(.., d)` before a halves rotation -> the
    op reads x's pairs itself (x_pairs) and writes halves as the model did, without the permuted copy of q and k;
  - HF's casts (`x.float()` in, `.to(x.dtype)` out: the op computes in fp32 and rounds once);
  - equal table computations -> one (GPT-J builds its tables in each call, the join and complex forms' replacements
    in each rotation), so that
  - q and k rotated by one cos/sin -> a single `liger_fx::rope_qk` launch.
The counter `rope` counts rotated tensors (sites): 2 per attention layer, q and k, whether or not they were merged.
A rotation applied to the tail of the head (MLA's `cat([q_nope, rope(q_pe)])`) is fused as a rotation of the slice;
the cat stays Inductor's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import itertools
import operator

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

from liger_fx.canonicalize import same_sizes
from liger_fx.canonicalize import val as _val
from liger_fx.kernels.rope import rope_axes
from liger_fx.rewrite import Pattern, requires_grad

aten = torch.ops.aten
liger = torch.ops.liger_fx

# A distinctive trace-time value for the captured head split: no other literal in a pattern takes it (dims are -1
# and -2, slice starts 0 and 1, steps 2, open slice ends 2**63 - 1, pair sizes 2).
_HALF = 12

_PAIR_SPLITS = ("strided", "unbind")
_SPLITS = ("slice", "chunk") + _PAIR_SPLITS


@dataclasses.dataclass(frozen=True)
class _Form:
    form: str
    """"rotate", "join" or "complex" (module docstring)."""
    split: str
    """How x becomes (x1, x2): halves by "slice" or "chunk", pairs by "strided" (0::2, 1::2) or "unbind"
    (unflatten(-1, (-1, 2)) then [..., 0], [..., 1]); "complex" for the complex form."""
    join: str
    """The result's layout: "halves" (cat) or "pairs" (stack + flatten)."""
    upcast: str = "none"
    """"each": x.float() at each use, as ESM writes it."""
    pack: str = ""
    """Complex form on halves: how they become complex numbers, "stack" (view_as_complex(stack((x1, x2), -1))) or
    "complex" (torch.complex(x1, x2))."""
    unpack: str = ""
    """Complex form on halves: how the product's real view r becomes halves again, "chunk"
    (cat(chunk(r, 2, -1), -2).flatten(-2)) or "select" (cat((r[..., 0], r[..., 1]), -1))."""

    @property
    def x_pairs(self) -> bool:
        return self.split in _PAIR_SPLITS or self.split == "complex"

    @property
    def y_pairs(self) -> bool:
        return self.join == "pairs"

    @property
    def tables(self) -> tuple[str, ...]:
        return ("freqs",) if self.form == "complex" else ("cos", "sin")

    @property
    def name(self) -> str:
        if self.form == "complex":
            parts = [self.form] if self.split == "complex" else [self.form, self.split, self.pack, self.unpack]
        else:
            parts = [self.form, self.split, self.join]
        return "rope/" + "/".join(parts + ([self.upcast] if self.upcast != "none" else []))


def forms() -> list[_Form]:
    """Every variant: the rotate form in the split's own layout (upcast spellings for halves only: ESM's); the join
    form for every split and either join; the complex form."""
    out = [_Form("rotate", s, "pairs" if s in _PAIR_SPLITS else "halves", u)
           for s in _SPLITS for u in (("none",) if s in _PAIR_SPLITS else ("none", "each"))]
    out += [_Form("join", s, j) for s, j in itertools.product(_SPLITS, ("halves", "pairs"))]
    out.append(_Form("complex", "complex", "pairs"))
    out += [_Form("complex", s, "halves", pack=p, unpack=u)
            for s, p, u in itertools.product(("slice", "chunk"), ("stack", "complex"), ("chunk", "select"))]
    return out


def _split(x, split, half):
    if split == "slice":
        return x[..., :half], x[..., half:]
    if split == "chunk":
        return x.chunk(2, dim=-1)
    if split == "strided":
        return x[..., 0::2], x[..., 1::2]
    u = x.unflatten(-1, (-1, 2))
    return u[..., 0], u[..., 1]


def _join(a, b, layout):
    return torch.cat((a, b), dim=-1) if layout == "halves" else torch.stack((a, b), dim=-1).flatten(-2)


def _rotation(f: _Form, a: dict):
    """The search body: the rotation as the model writes it, from the named arguments."""
    x = a["x"]
    if f.form == "complex" and f.split == "complex":
        return torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2))) * a["freqs"]).flatten(-2)
    if f.form == "complex":
        x1, x2 = _split(x, f.split, a.get("half"))
        xc = torch.complex(x1, x2) if f.pack == "complex" else torch.view_as_complex(torch.stack((x1, x2), -1))
        r = torch.view_as_real(xc * a["freqs"])
        if f.unpack == "chunk":
            return torch.cat(r.chunk(2, -1), -2).flatten(-2)
        return torch.cat((r[..., 0], r[..., 1]), -1)
    cos, sin = a["cos"], a["sin"]
    if f.form == "rotate":
        xc, xr = (x.to(torch.float32), x.to(torch.float32)) if f.upcast == "each" else (x, x)
        x1, x2 = _split(xr, f.split, a.get("half"))
        return xc * cos + _join(-x2, x1, f.join) * sin
    x1, x2 = _split(x, f.split, a.get("half"))
    return _join(x1 * cos - x2 * sin, x2 * cos + x1 * sin, f.join)


def _widen(t, pairs: bool):
    """A half-width table as wide as the rotation, laid out as the result: (c, c) in halves, (c0, c0, c1, c1, ...)
    in pairs."""
    return torch.stack((t, t), dim=-1).flatten(-2) if pairs else torch.cat((t, t), dim=-1)


def _full_tables(f: _Form, a: dict):
    if f.form == "complex":
        r = torch.view_as_real(a["freqs"])
        return _widen(r[..., 0], f.y_pairs), _widen(r[..., 1], f.y_pairs)
    if f.form == "join":
        return _widen(a["cos"], f.y_pairs), _widen(a["sin"], f.y_pairs)
    return a["cos"], a["sin"]


def _out_dtype(f: _Form, x, tables) -> torch.dtype:
    """What eager gives: the product's promotion, after the upcast when the pattern has one; a complex product's
    real dtype."""
    dtype = torch.float32 if f.upcast != "none" else x.dtype
    for t in tables:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype.to_real() if dtype.is_complex else dtype


def _with_names(names: list[str], body):
    """A function of exactly `names`, which Pattern reads as the match's arguments (positional, or keyword for the
    captured ints), calling body with them as a dict."""

    def fn(*args, **kwargs):
        return body({**dict(zip(names, args)), **kwargs})

    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    fn.__signature__ = inspect.Signature([inspect.Parameter(n, kind) for n in names])
    return fn


def _make(f: _Form):
    names = ["x", *f.tables] + (["half"] if f.split == "slice" else [])

    def replace(a):
        x = a["x"]
        cos, sin = _full_tables(f, a)
        return liger.rope(x, cos, sin, _out_dtype(f, x, [a[t] for t in f.tables]), f.x_pairs, f.y_pairs)

    return _with_names(names, functools.partial(_rotation, f)), _with_names(names, replace)


def _check(f: _Form, match) -> str | None:
    kw = match.kwargs
    x, tables = _val(kw["x"]), [_val(kw[n]) for n in f.tables]
    if x is None or any(t is None for t in tables):
        return "no shape information"
    if f.form == "complex":
        if tables[0].dtype != torch.complex64 or x.dtype != torch.float32:
            return (f"complex rotation of {x.dtype} by {tables[0].dtype}: only complex64 (fp32 math, as the op "
                    "computes) is fused")
    elif not all(t.is_floating_point() for t in (x, *tables)):
        return f"dtypes {', '.join(str(t.dtype) for t in (x, *tables))} are not all floating point"
    if torch.float64 in (x.dtype, *(t.dtype for t in tables)):
        return "float64 operands: the op computes in fp32"
    if any(t.device != x.device for t in tables):
        return f"x on {x.device}, tables on {', '.join(str(t.device) for t in tables)}"
    if any(requires_grad(kw[n]) for n in f.tables):
        return "cos/sin require grad (learned rotary tables are not supported: the op gives them no gradient)"
    D = x.shape[-1]
    if not isinstance(D, int):
        return f"head dim {D} is symbolic"
    half = kw.get("half", D // 2)
    if D % 2:
        return f"odd rotated width {D} has no {'pairs' if f.x_pairs else 'halves'}"
    if not isinstance(half, int) or 2 * half != D:
        return f"rotate_half splits at {half}, not at half of the rotated width {D}"
    width = D if f.form == "rotate" else D // 2
    for name, t in zip(f.tables, tables):
        if t.shape[-1] != width:
            what = "the rotated width" if width == D else "half the rotated width"
            return f"{name} width {t.shape[-1]} is not {what} {D} ({width})"
    full = [t.new_empty((*t.shape[:-1], D), dtype=torch.float32) for t in tables]
    try:
        rope_axes(x, full[0], full[-1])
    except ValueError as e:
        return str(e).removeprefix("liger_fx.rope: ")
    out = _val(match.output_node())
    if out is not None and (out.dtype != _out_dtype(f, x, tables) or tuple(out.shape) != tuple(x.shape)):
        return f"result {out.dtype} {tuple(out.shape)} is not the rotation of x ({x.dtype} {tuple(x.shape)})"
    return None


def _example(f: _Form):
    """x (2, 3, 5, 24) and tables broadcast over the head axis; bf16 x for an upcast variant so its casts exist (in
    an fp32 model they vanish and the plain variant matches instead)."""
    w = 2 * _HALF
    x = torch.randn(2, 3, 5, w, dtype=torch.bfloat16 if f.upcast != "none" else torch.float32)
    if f.form == "complex":
        return [x, torch.randn(2, 1, 5, _HALF, dtype=torch.complex64)]
    tw = w if f.form == "rotate" else _HALF
    return [x, torch.randn(2, 1, 5, tw), torch.randn(2, 1, 5, tw)]


@functools.cache
def patterns() -> list[Pattern]:
    out = []
    for f in forms():
        search, replace = _make(f)
        out.append(Pattern(
            flag="rope",
            name=f.name,
            search=search,
            replace=replace,
            example_inputs=functools.partial(_example, f),
            scalars={"half": _HALF} if f.split == "slice" else {},
            check=functools.partial(_check, f),
        ))
    return out


# --------------------------------------------------------------------------------------------------------------
# After matching: fold what the model wrote around each rotation, then merge q and k.


def _is(node, target) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is target


def _new(graph: fx.Graph, before: fx.Node, target, args, meta_from: fx.Node) -> fx.Node:
    with graph.inserting_before(before):
        node = graph.call_function(target, tuple(args))
    node.meta = dict(meta_from.meta)
    vals = fx.map_arg(args, _val)
    fake_mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
    with fake_mode if fake_mode is not None else contextlib.nullcontext():
        node.meta["val"] = target(*vals)
    return node


def _ropes(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if _is(n, liger.rope.default)]


def _args(node: fx.Node):
    """(x, cos, sin, dtype, x_pairs, y_pairs) of a rope node (tracing drops trailing arguments equal to their
    defaults: a traced rope(x, cos, sin, dt, True, False) has five)."""
    x, cos, sin, dtype, *pairs = node.args
    pairs += [node.kwargs.get(n, False) for n in ("x_pairs", "y_pairs")[len(pairs):]]
    return x, cos, sin, dtype, *pairs


def _erase_if_unused(graph: fx.Graph, *nodes) -> None:
    for n in nodes:
        if isinstance(n, fx.Node) and not n.users and n.op == "call_function":
            graph.erase_node(n)


def _head(x: fx.Node):
    """(source, rd) when x is the first rd channels of source: `source[..., :rd]`, the alias pre-dispatch tracing
    makes of a slice that keeps every channel (Phi-3 at partial_rotary_factor 1.0), or x itself (rd = its width)."""
    if _is(x, aten.alias.default):
        return x.args[0], _val(x).shape[-1]
    if (_is(x, aten.slice.Tensor) and x.args[1] == -1 and (x.args[2] if len(x.args) > 2 else 0) in (0, None)
            and (x.args[4] if len(x.args) > 4 else 1) == 1):
        return x.args[0], _val(x).shape[-1]
    return x, _val(x).shape[-1]


def _fold_partial(graph: fx.Graph) -> None:
    """`cat([rope(x[..., :rd]), x[..., rd:]], -1)` -> rope(x): the op copies the channels past the tables' width
    (cast to its output dtype, which is the cat's: the rotation's dtype is x's promoted with the tables'). Also drops
    the alias of `x[..., :D]`, and the empty pass-through `x[..., D:]` Phi-3 writes at partial_rotary_factor 1.0."""
    for node in _ropes(graph):
        x, cos, sin, dtype, xp, yp = _args(node)
        src, rd = _head(x)
        users = list(node.users)
        cat = users[0] if len(users) == 1 and _is(users[0], aten.cat.default) else None
        parts = cat.args[0] if cat is not None else ()
        rest = parts[1] if len(parts) == 2 and parts[0] is node else None
        if (rest is not None and (cat.args[1] if len(cat.args) > 1 else 0) == -1 and _is(rest, aten.slice.Tensor)
                and rest.args[0] is src and rest.args[1] == -1 and rest.args[2] == rd
                and (rest.args[4] if len(rest.args) > 4 else 1) == 1
                and _val(cat).dtype == _val(node).dtype and same_sizes(_val(cat).shape, _val(src).shape)):
            new = _new(graph, cat, liger.rope.default, (src, cos, sin, dtype, xp, yp), node)
            if not same_sizes(_val(new).stride(), _val(cat).stride()):
                # The cat made a contiguous tensor; the op keeps x's layout (a permuted q stays (B, T, H, D) in
                # memory), and code after it may rely on the cat's: GPT-NeoX-Japanese views the result as
                # (B * H, T, D) after a `.contiguous()` that tracing dropped (a no-op on the cat), and the view
                # failed in AOTAutograd's trace (the graph fell back). Make the copy the cat made.
                if not _val(cat).is_contiguous():
                    graph.erase_node(new)
                    continue
                new = _new(graph, cat, aten.contiguous.default, (new,), cat)
            cat.replace_all_uses_with(new)
            graph.erase_node(cat)
            graph.erase_node(node)
            _erase_if_unused(graph, rest, x)
        elif _is(x, aten.alias.default):
            node.args = (src, *node.args[1:])
            _erase_if_unused(graph, x)


def _deinterleaved(x: fx.Node):
    """q when x = q.unflatten(-1, (-1, 2)).transpose(-1, -2) with the last two dims merged back: q's interleaved
    pairs permuted into halves (DeepSeek's `q.view(b, h, s, d // 2, 2).transpose(4, 3).reshape(b, h, s, d)`)."""
    merges = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints)
    if not isinstance(x, fx.Node) or x.op != "call_function" or x.target not in merges:
        return None
    t = x.args[0]
    if not _is(t, aten.transpose.int) or _val(t) is None or _val(x) is None:
        return None
    rank = _val(t).dim()
    u = t.args[0]
    if ({t.args[1] % rank, t.args[2] % rank} != {rank - 1, rank - 2} or not _is(u, aten.unflatten.int)
            or tuple(u.args[1:]) != (-1, [-1, 2]) or _val(x).dim() != rank - 1):
        return None
    q = u.args[0]
    return q if same_sizes(_val(q).shape, _val(x).shape) else None


def _fold_deinterleave(graph: fx.Graph) -> None:
    """rope(deinterleave(q)) in halves -> rope(q, x_pairs=True): the same rotation reading q's pairs in place, so the
    permuted copy of q (and of its gradient) is never made. Only a rotation over the whole head: a partial one
    would rotate a different set of channels."""
    for node in _ropes(graph):
        x, cos, sin, dtype, xp, yp = _args(node)
        q = _deinterleaved(x)
        if q is not None and not xp and _val(cos).shape[-1] == _val(x).shape[-1]:
            node.args = (q, cos, sin, dtype, True, yp)


def _fold_casts(graph: fx.Graph) -> None:
    """rope(x.to(fp32)) -> rope(x) for a lower-precision x, and rope(...fp32).to(dt) -> rope(..., dt). Exact: the op
    upcasts on load and rounds once on store, which is what the removed casts did."""
    for node in _ropes(graph):
        x, cos, sin, dtype, xp, yp = _args(node)
        if (_is(x, aten.to.dtype) and x.args[1] == torch.float32 and len(x.users) == 1
                and _val(x.args[0]).dtype in (torch.bfloat16, torch.float16)):
            node.args = (x.args[0], cos, sin, dtype, xp, yp)
            graph.erase_node(x)
        users = list(node.users)
        if dtype == torch.float32 and len(users) == 1 and _is(users[0], aten.to.dtype):
            cast = users[0]
            new = _new(graph, node, liger.rope.default, (node.args[0], cos, sin, cast.args[1], xp, yp), cast)
            cast.replace_all_uses_with(new)
            graph.erase_node(cast)
            graph.erase_node(node)


def _pure(n) -> bool:
    """An ATen op without side effects or randomness: two calls with equal arguments give equal tensors."""
    t = n.target
    return (isinstance(t, torch._ops.OpOverload) and not t._schema.is_mutable
            and torch.Tag.nondeterministic_seeded not in t.tags)


def _share_tables(graph: fx.Graph) -> None:
    """One node per table computation: q's and k's rotations are merged only when they read the same cos/sin nodes,
    but GPT-J repeat-interleaves its tables inside `apply_rotary_pos_emb`, once for q and once for k, and the join
    and complex replacements build full-width tables per rotation. Equal pure computations that feed nothing but
    tables and ropes become one (also one T x rd computation instead of two)."""
    ropes = set(_ropes(graph))
    tables: set[fx.Node] = set()
    stack = [t for r in ropes for t in r.args[1:3]]
    while stack:
        n = stack.pop()
        if (n in tables or not isinstance(n, fx.Node) or n.op != "call_function" or not _pure(n)
                or any(u not in ropes and u not in tables for u in n.users)):
            continue
        tables.add(n)
        stack.extend(n.all_input_nodes)
    seen: dict = {}
    for n in list(graph.nodes):  # graph order: a node's inputs are already shared when it is reached
        if n in tables:
            k = (n.target, repr(n.args), repr(sorted(n.kwargs.items())))
            if k in seen:
                n.replace_all_uses_with(seen[k])
                graph.erase_node(n)
            else:
                seen[k] = n


def _mergeable(a: fx.Node, b: fx.Node) -> bool:
    q, k, cos, sin = (_val(n) for n in (a.args[0], b.args[0], a.args[1], a.args[2]))
    try:
        rope_axes(q, cos, sin, k)
    except ValueError:
        return False
    return k.device == q.device


def _merge(graph: fx.Graph) -> None:
    """Pair the rope nodes that share cos, sin and layouts (q and k of one layer), in graph order, into rope_qk."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    groups: dict[tuple, list[fx.Node]] = {}
    for node in _ropes(graph):
        _, cos, sin, _, xp, yp = _args(node)
        groups.setdefault((cos, sin, xp, yp), []).append(node)
    for nodes in groups.values():
        while len(nodes) >= 2:
            a, b = nodes.pop(0), nodes[0]
            if not _mergeable(a, b):
                continue
            # The merged node goes right after the last of its inputs, which must precede every use of a and b;
            # otherwise the pair cannot share a launch without reordering the graph.
            last_input = max((x for x in (a.args[0], b.args[0], a.args[1], a.args[2]) if isinstance(x, fx.Node)),
                             key=order.__getitem__)
            if any(order[u] <= order[last_input] for u in itertools.chain(a.users, b.users)):
                continue
            at = last_input.next
            nodes.pop(0)
            (qa, cos, sin, qdt, xp, yp), kdt = _args(a), _args(b)[3]
            qk = _new(graph, at, liger.rope_qk.default, (qa, b.args[0], cos, sin, qdt, kdt, xp, yp), a)
            gets = [_new(graph, at, operator.getitem, (qk, i), old) for i, old in enumerate((a, b))]
            for old, get in zip((a, b), gets):  # erase only now: `at` may be a or b itself
                old.replace_all_uses_with(get)
                graph.erase_node(old)


def post_pass(graph: fx.Graph) -> None:
    # Casts before and after the partial fold: Meta's `x[..., :rd].float()` ... `.type_as(x)` sits between the
    # slice and the cat, Cohere's `x.float()` ... `.to(dtype)` outside them.
    _fold_casts(graph)
    _fold_partial(graph)
    _fold_casts(graph)
    _fold_deinterleave(graph)
    _share_tables(graph)
    _merge(graph)


# --------------------------------------------------------------------------------------------------------------
# Candidates and near-miss reasons, found without the matcher. Anchors, one per rotation:
#   rotate   the rotated copy rot(x): a join of -x2 and x1, two parts of one tensor
#   join     a join of two sums/differences of products that involve two parts of one tensor
#   complex  a product of view_as_complex(...) with anything


def _part(node):
    """(source, kind, index) when node is one of the two parts of a tensor's channels: a slice of the last dim
    ("slice", or "strided" with step 2), a chunk(2) ("chunk") or a pair member of unflatten(-1, (-1, 2))
    ("unbind"); else None."""
    if _is(node, aten.slice.Tensor) and node.args[1] == -1:
        step = node.args[4] if len(node.args) > 4 else 1
        kind = {1: "slice", 2: "strided"}.get(step)
        return (node.args[0], kind, node.args[2] if len(node.args) > 2 else 0) if kind else None
    if (_is(node, operator.getitem) and _is(node.args[0], aten.chunk.default)
            and tuple(node.args[0].args[1:]) == (2, -1)):
        return node.args[0].args[0], "chunk", node.args[1]
    if _is(node, aten.select.int) and node.args[1] == -1 and _is(node.args[0], aten.unflatten.int):
        return node.args[0].args[0], "unbind", node.args[2]
    return None


def _joined(node):
    """(parts, layout) when node joins two tensors on the last dim: cat(-1) (halves) or stack(-1).flatten(-2)
    (pairs)."""
    if _is(node, aten.cat.default) and (node.args[1] if len(node.args) > 1 else 0) == -1 and len(node.args[0]) == 2:
        return tuple(node.args[0]), "halves"
    stack = node.args[0] if _is(node, aten.flatten.using_ints) and tuple(node.args[1:]) == (-2, -1) else None
    if (_is(stack, aten.stack.default) and (stack.args[1] if len(stack.args) > 1 else 0) == -1
            and len(stack.args[0]) == 2):
        return tuple(stack.args[0]), "pairs"
    return None


def _rotated_copy(node):
    """(source, part of x2, part of x1, layout) when node = join(-x2, x1) for two parts of one source."""
    j = _joined(node)
    if j is None or not _is(j[0][0], aten.neg.default):
        return None
    p2, p1 = _part(j[0][0].args[0]), _part(j[0][1])
    if p1 is None or p2 is None or p1[0] is not p2[0]:
        return None
    return p1[0], p2, p1, j[1]


_SUMS = (aten.add.Tensor, aten.sub.Tensor)


def _products(node) -> list:
    """The operands of the two products summed or subtracted by node, [] when it is not such a sum."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target in _SUMS):
        return []
    if not all(_is(m, aten.mul.Tensor) for m in node.args[:2]):
        return []
    return [a for m in node.args[:2] for a in m.args]


def _rotated_parts(node):
    """(parts, layout) when node joins two sums of products whose operands include two parts of one tensor."""
    j = _joined(node)
    if j is None:
        return None
    operands = _products(j[0][0]) + _products(j[0][1])
    if len(operands) != 8:
        return None
    parts = [p for p in map(_part, operands) if p is not None]
    return j if any(p[0] is q[0] and p[1:] != q[1:] for p in parts for q in parts) else None


def _to_complex(node) -> bool:
    return _is(node, aten.view_as_complex.default) or _is(node, aten.complex.default)


def _complex_product(node) -> bool:
    return _is(node, aten.mul.Tensor) and any(_to_complex(a) for a in node.args)


def _kind(node) -> str | None:
    if _complex_product(node):
        return "complex"
    if _rotated_copy(node) is not None:
        return "rotate"
    if _rotated_parts(node) is not None:
        return "join"
    return None


def candidates(graph: fx.Graph) -> list[tuple[str, fx.Node]]:
    return [("rope", n) for n in graph.nodes if n.op == "call_function" and _kind(n) is not None]


def _split_reason(src, a, b) -> str | None:
    """Why parts a (x1) and b (x2) of src are not a rotation's pairs, or None."""
    (_, ka, ia), (_, kb, ib) = a, b
    width = _val(src).shape[-1] if _val(src) is not None else None
    if ka != kb:
        return f"x1 and x2 are taken from x in two ways ({ka}, {kb})"
    if ka == "slice":
        return None  # which bounds: the pattern's check says (a split that is not a half)
    if (ia, ib) != (0, 1):
        return f"x1 and x2 are parts {ia} and {ib} of x (of width {width}), not its first and second"
    return None


def explain(node: fx.Node) -> str:
    kind = _kind(node)
    if kind == "complex":
        return _explain_complex(node)
    if kind == "join":
        return _explain_join(node)
    src, p2, p1, layout = _rotated_copy(node)
    reason = _split_reason(src, p1, p2)
    if reason:
        return reason
    if p1[1] == "slice":
        (_, lower), _ = _joined(node)
        width, h, lo = _val(src).shape[-1], p2[2], (p1[2], lower.args[3] if len(lower.args) > 3 else None)
        if lo != (0, h) or 2 * h != width:
            return f"cat(-x[..., {h}:], x[..., {lo[0]}:{lo[1]}]) of width {width} is not a rotate-half"
    if (p1[1] in _PAIR_SPLITS) != (layout == "pairs"):
        return (f"the rotated copy of x joins {'pairs' if p1[1] in _PAIR_SPLITS else 'halves'} as "
                f"{layout}: not a rotation of x")
    rot = "rotate_half" if layout == "halves" else "rotate_every_two"
    users = list(node.users)
    if len(users) != 1:
        return f"{rot}(x) has {len(users)} users; it escapes the pattern"
    mul = users[0]
    if _is(mul, aten.to.dtype):
        mul = next(iter(mul.users), None) if len(mul.users) == 1 else None
    if not _is(mul, aten.mul.Tensor):
        return f"{rot}(x) does not feed a multiply by sin"
    if len(mul.users) != 1 or not _is(next(iter(mul.users)), aten.add.Tensor):
        return f"{rot}(x) * sin is not added to x * cos (or is used elsewhere)"
    add = next(iter(mul.users))
    other = add.args[0] if add.args[1] is mul else add.args[1]
    if not _is(other, aten.mul.Tensor):
        return "the other term of the sum is not x * cos"
    if add.args[0] is mul:
        return f"operands in an order the patterns do not cover ({rot}(x) * sin + x * cos)"
    if mul.args[0] is not node and mul.args[0] not in node.users:
        return f"operands in an order the patterns do not cover (sin * {rot}(x))"
    return "x * cos uses another tensor, or an intermediate is used outside the rotation"


def _explain_join(node: fx.Node) -> str:
    (first, second), _ = _joined(node)
    negated = any(_is(a, aten.neg.default) for a in _products(first) + _products(second))
    if first.target is aten.add.Tensor and (second.target is aten.sub.Tensor or negated):
        return ("(x1*cos + x2*sin, x2*cos - x1*sin) is the rotation by -sin (modded-nanogpt's sign convention), "
                "which the patterns do not cover")
    if first.target is not aten.sub.Tensor or second.target is not aten.add.Tensor:
        return "the rotated parts are not (x1*cos - x2*sin, x2*cos + x1*sin)"
    (a, b), (c, d) = (m.args for m in first.args[:2])
    (e, f), (g, h) = (m.args for m in second.args[:2])
    if not (_part(a) and _part(c) and _part(e) and _part(g)):
        return "operands in an order the patterns do not cover (cos * x1 instead of x1 * cos)"
    if not (a is g and c is e and b is f and d is h):
        return "the parts are not (x1*cos - x2*sin, x2*cos + x1*sin) of one x1, x2, cos and sin"
    reason = _split_reason(_part(a)[0], _part(a), _part(c))
    return reason or "an intermediate of the rotation is used outside it"


def _packed_halves(vc: fx.Node):
    """(x1 part, x2 part) when vc packs two parts of a tensor as complex numbers: view_as_complex(stack((x1, x2),
    -1)) or torch.complex(x1, x2); else None."""
    if _is(vc, aten.complex.default):
        a, b = vc.args[:2]
    else:
        st = vc.args[0]
        if not (_is(st, aten.stack.default) and (st.args[1] if len(st.args) > 1 else 0) == -1
                and len(st.args[0]) == 2):
            return None
        a, b = st.args[0]
    pa, pb = _part(a), _part(b)
    return (pa, pb) if pa is not None and pb is not None else None


def _joined_halves(real: fx.Node) -> bool:
    """Whether view_as_real's result r is made halves again by its one use: cat(chunk(r, 2, -1), -2) merged back
    (flatten(-2, -1)), or cat((r[..., 0], r[..., 1]), -1)."""
    users = list(real.users)
    if len(users) == 1 and _is(users[0], aten.chunk.default) and tuple(users[0].args[1:]) == (2, -1):
        gets = list(users[0].users)
        cats = {u for g in gets for u in g.users}
        if len(cats) != 1:
            return False
        cat = next(iter(cats))
        return (_is(cat, aten.cat.default) and (cat.args[1] if len(cat.args) > 1 else 0) == -2
                and len(cat.users) == 1 and _is(next(iter(cat.users)), aten.flatten.using_ints))
    cats = {u for s in users for u in s.users}
    return (len(users) == 2 and all(_is(s, aten.select.int) and s.args[1] == -1 for s in users)
            and len(cats) == 1 and _joined(next(iter(cats))) is not None)


def _explain_complex(mul: fx.Node) -> str:
    vc = next(a for a in mul.args if _to_complex(a))
    if mul.args[0] is not vc:
        return "operands in an order the patterns do not cover (freqs_cis * view_as_complex(x))"
    u = vc.args[0]
    halves = _packed_halves(vc)
    pairs = _is(vc, aten.view_as_complex.default) and _is(u, aten.unflatten.int) and tuple(u.args[1:]) == (-1, [-1, 2])
    if halves is not None:
        (src, ka, ia), (src2, kb, ib) = halves
        if src is not src2:
            return "the real and imaginary parts packed as complex are parts of two different tensors"
        reason = _split_reason(src, halves[0], halves[1])
        if reason:
            return reason
        if ka in _PAIR_SPLITS:
            return f"complex numbers packed from x's {ka} parts, not its halves"
        if ka == "slice":
            width, h = _val(src).shape[-1], ib
            if ia != 0 or 2 * h != width:
                return f"the complex numbers pack x[..., {ia}:..] and x[..., {ib}:] of width {width}: not its halves"
    elif not pairs:
        return ("view_as_complex of something other than x's pairs of the last dim (x.unflatten(-1, (-1, 2))) or "
                "its two halves stacked (stack(x.chunk(2, -1), -1))")
    users = list(mul.users)
    if len(users) != 1 or not _is(users[0], aten.view_as_real.default):
        return "the complex product is not viewed back as real (or is used elsewhere)"
    real = users[0]
    if halves is not None:
        if not _joined_halves(real):
            return ("view_as_real(x * freqs_cis) is not joined back into halves (cat(chunk(., 2, -1), -2) or "
                    "cat((r[..., 0], r[..., 1]), -1)), or a part is used elsewhere")
        return "an intermediate of the rotation is used outside it"
    if len(real.users) != 1 or not _is(next(iter(real.users)), aten.flatten.using_ints):
        return "view_as_real(x * freqs_cis) is not flattened back to x's shape (or is used elsewhere)"
    return "an intermediate of the rotation is used outside it"
