"""Row-chunked loops over the logits, made one computation again: shared by the loss families (not a family itself).

Trainers bound the memory of eager per-token work by looping over slices of the logits and joining the results:

    torch.stack([torch.logsumexp(lg, -1) for lg in logits])                          TRL selective_log_softmax, fp32
    torch.stack([F.log_softmax(r, -1).gather(-1, i) for r, i in zip(logits, index)])  the same, bf16
    torch.cat([-(exp(lp) * lp).sum(-1) for lp in map(log_softmax, flat.split(128))])  TRL entropy_from_logits
    torch.cat([F.cross_entropy(l, t, reduction="none") for l, t in zip(x.split(128), y.split(128))])  chunked CE

Dynamo unrolls the loop: k copies of one row-wise computation f, each on one chunk (`getitem(split(X, c, 0), i)` or
`select(X, 0, i)`), joined by `cat`/`stack` along the same leading dim. When the chunks are the complete, in-order
partition of X (and of any second tensor chunked alongside, e.g. the labels), and f only works along the trailing
dims (every op elementwise or reducing a dim other than the chunked one), then join(f(chunk_i)) == f(X): this pass
builds f(X) once in place of the join. The fused ops then see the plain spelling, and chunk by themselves (their
(C, V) buffer is what the user's loop was for). A family merges only loops it will then fuse (`accept`), so a loop
nothing fuses keeps the memory bound its author wrote.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from liger_fx.canonicalize import fake_value, same_sizes, val as _val

aten = torch.ops.aten

# Ops f may contain. position of the dim argument (None: elementwise), and whether it is a list of dims.
_ROWWISE = {
    aten.log_softmax.int: (1, False), aten._log_softmax.default: (1, False),
    aten.softmax.int: (1, False), aten._softmax.default: (1, False),
    aten.logsumexp.default: (1, True), aten.sum.dim_IntList: (1, True), aten.mean.dim: (1, True),
    aten.amax.default: (1, True), aten.gather.default: (1, False), aten.squeeze.dim: (1, False),
    aten.unsqueeze.default: (1, False),
    aten.exp.default: (None, False), aten.log.default: (None, False), aten.neg.default: (None, False),
    aten.mul.Tensor: (None, False), aten.div.Tensor: (None, False), aten.sub.Tensor: (None, False),
    aten.add.Tensor: (None, False), aten.to.dtype: (None, False), aten.clone.default: (None, False),
    aten.cross_entropy_loss.default: (None, False),
}
_SPLITS = (aten.split.Tensor, aten.split_with_sizes.default)


def _is(node, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _absolute(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


def chunk_of(node) -> tuple[fx.Node, tuple, int] | None:
    """(X, partition key, index) when `node` is chunk `index` of X along dim 0: `split(X, c, 0)[i]` (key: the split
    node) or `select(X, 0, i)` (key: ("select", X's leading size))."""
    if _is(node, operator.getitem) and _is(node.args[0], *_SPLITS):
        split = node.args[0]
        x = split.args[0]
        dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
        if isinstance(_val(x), torch.Tensor) and _absolute(dim, _val(x).dim()) == 0:
            return x, ("split", split), node.args[1]
    if _is(node, aten.select.int):
        x, dim, i = node.args[:3]
        xv = _val(x)
        if isinstance(xv, torch.Tensor) and _absolute(dim, xv.dim()) == 0 and isinstance(xv.shape[0], int):
            return x, ("select", xv.shape[0]), _absolute(i, xv.shape[0])
    return None


def _parts(key) -> int | None:
    if key[0] == "select":
        return key[1]
    vals = _val(key[1])
    return len(vals) if isinstance(vals, (list, tuple)) else None


def _dims_ok(node: fx.Node, chunked_rank) -> bool:
    """Whether the node's dim arguments stay off the chunked (leading) dim: negative after normalization, and, where
    the chunk keeps the leading dim (split), not reaching it."""
    pos, is_list = _ROWWISE[node.target]
    if node.target is aten.cross_entropy_loss.default:  # reduction 'none' only: the others reduce over the rows
        args = dict(zip(("self", "target", "weight", "reduction"), node.args))
        return args.get("reduction", node.kwargs.get("reduction", 1)) == 0 and args.get("weight") is None
    if pos is None:
        return True
    if len(node.args) <= pos:
        return False
    dims = node.args[pos] if is_list else [node.args[pos]]
    src = _val(node.args[0])
    rank = src.dim() + (1 if node.target is aten.unsqueeze.default else 0)
    keeps_leading = chunked_rank[node.args[0]] if node.args[0] in chunked_rank else True
    for d in dims:
        if not isinstance(d, int):
            return False
        a = _absolute(d, rank)
        if keeps_leading and a == 0:
            return False
    return True


def _subgraph(out: fx.Node):
    """The nodes computing `out` from its chunks, in graph order, with the chunk leaves and external inputs; None
    where an op is not row-wise."""
    nodes, leaves, external, stack = [], {}, set(), [out]
    seen = set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        c = chunk_of(n)
        if c is not None:
            leaves[n] = c
            continue
        if not _is(n, *_ROWWISE):
            external.add(n)
            continue
        nodes.append(n)
        stack.extend(n.all_input_nodes)
    order = {n: i for i, n in enumerate(out.graph.nodes)}
    return sorted(nodes, key=order.__getitem__), leaves, external


def _signature(nodes, leaves, external):
    """A structural key of one chunk's computation, equal across the chunks of an unrolled loop."""
    local = {n: i for i, n in enumerate(nodes)}

    def arg(a):
        if isinstance(a, fx.Node):
            if a in local:
                return ("n", local[a])
            if a in leaves:
                x, key, _ = leaves[a]
                return ("leaf", x, key if key[0] == "select" else ("split", key[1]))
            return ("ext", a)
        if isinstance(a, (list, tuple)):
            return tuple(arg(b) for b in a)
        return ("c", repr(a))

    return tuple((n.target, arg(n.args), arg(tuple(sorted(n.kwargs.items())))) for n in nodes)


def _external_ok(external) -> bool:
    """External operands must broadcast the same way against a chunk and against the whole: scalars only."""
    for e in external:
        v = _val(e)
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return False
    return True


def merge_row_chunks(graph: fx.Graph, accept) -> list[fx.Node]:
    """Replace each join of an unrolled row-chunked loop by the computation on the whole tensor, where
    `accept(sources, nodes)` (the chunked tensors, chunk 0's nodes) agrees. Returns the new output nodes."""
    merged = []
    for join in [n for n in graph.nodes if _is(n, aten.cat.default, aten.stack.default)]:
        out = _merge_one(graph, join, accept)
        if out is not None:
            merged.append(out)
    if merged:
        graph.eliminate_dead_code()
    return merged


def _merge_one(graph, join, accept):
    outs = join.args[0]
    dim = join.args[1] if len(join.args) > 1 else join.kwargs.get("dim", 0)
    if not isinstance(outs, (list, tuple)) or len(outs) < 2 or not all(isinstance(o, fx.Node) for o in outs):
        return None
    rank = _val(join).dim()
    if not isinstance(dim, int) or _absolute(dim, rank) != 0:
        return None
    parts = [_subgraph(o) for o in outs]
    if any(not nodes for nodes, _, _ in parts):
        return None
    sig = _signature(*parts[0])
    stacked = join.target is aten.stack.default
    for i, (nodes, leaves, external) in enumerate(parts):
        if _signature(nodes, leaves, external) != sig or not _external_ok(external) or not leaves:
            return None
        for leaf, (x, key, index) in leaves.items():
            if index != i or _parts(key) != len(outs) or stacked != (key[0] == "select"):
                return None
            if any(u not in nodes for u in leaf.users):
                return None
        inside = set(nodes)
        if any(u not in inside for n in nodes if n is not outs[i] for u in n.users) or set(outs[i].users) != {join}:
            return None  # an intermediate escapes the loop body (or the chunk result is used twice)
    nodes, leaves, _ = parts[0]
    chunked_rank = {leaf: key[0] == "split" for leaf, (_, key, _) in leaves.items()}
    for n in nodes:  # what keeps the leading dim: split chunks do, select chunks have none
        chunked_rank[n] = any(chunked_rank.get(a, False) for a in n.all_input_nodes)
    if not all(_dims_ok(n, chunked_rank) for n in nodes):
        return None
    sources = list(dict.fromkeys(x for x, _, _ in leaves.values()))
    if not accept(sources, nodes):
        return None
    env = {leaf: x for leaf, (x, _, _) in leaves.items()}
    with graph.inserting_before(join):
        for n in nodes:
            new = graph.node_copy(n, lambda a: env.get(a, a))
            new.meta = {k: v for k, v in n.meta.items() if k != "val"}
            new.meta["val"] = fake_value(new.target, new.args, new.kwargs)
            env[n] = new
    result = env[outs[0]]
    if not same_sizes(_val(result).shape, _val(join).shape) or _val(result).dtype != _val(join).dtype:
        for n in reversed(nodes):  # not the same value after all: leave the loop as it was
            graph.erase_node(env[n])
        return None
    join.replace_all_uses_with(result)
    graph.erase_node(join)
    return result
