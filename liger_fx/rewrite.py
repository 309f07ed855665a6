"""Step 2 of the pipeline: patterns, how they are matched, and the record of what happened.

A pattern is a plain PyTorch `search` function and a `replace` function that calls one of our ops. Both are traced
by `canonicalize.trace_pattern` into the same IR as the model, and matched with Inductor's pattern machinery
(`fx_to_pattern` + `PatternMatcherPass`, as `fx_passes/fuse_attention.py` does). A match is refused when an
intermediate value has users outside the pattern, or when the pattern's `check` returns a reason.

Every family module in `liger_fx/patterns/` exposes:
    patterns() -> list[Pattern]              the variants (built lazily: tracing costs ~10 ms each)
    candidates(graph) -> list[(flag, node)]  anchors found independently of the matcher (e.g. an rsqrt of a mean
                                             of squares); an anchor still in the graph after the pass is a near miss
    explain(node) -> str                     why an anchor did not match when no variant even got to its check
and optionally `recomputable() -> tuple of ops` whose outputs the backward should recompute rather than save
(`tag_recompute`), `post_pass(graph)`, run after its patterns (e.g. pairing q and k rotations into one launch), and
`rewrite(graph, config)`: the family's own matcher, for a structure the pattern machinery cannot express (the
lm_head's logits feed the loss AND are a graph output: a shared intermediate the matcher must refuse). It calls
`record_replacement` for each rewrite and checks its own flags.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import logging
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
from torch._inductor.pattern_matcher import (
    Match,
    PatternMatcherPass,
    fx_to_pattern,
    register_graph_pattern,
)
from torch.fx.experimental.symbolic_shapes import guard_scalar
from torch.utils._sympy.symbol import SymT, symbol_is_type

from .canonicalize import mark_in_code, trace_pattern, where
from .config import LigerConfig

log = logging.getLogger("liger_fx")


@dataclass(frozen=True, eq=False)  # hashed by identity: families cache their patterns
class Pattern:
    flag: str
    """The config flag that gates this pattern, and the counter it increments."""
    name: str
    """Variant name, e.g. `rms_norm/llama/bf16/w*y`; shows up in the record and in near-miss reasons."""
    search: Callable
    replace: Callable
    """Called with the search function's arguments (tensors as fake values, scalars as matched)."""
    example_inputs: Callable[[], list]
    """Factory of the tensor arguments used to trace `search` (scalars come from `scalars`)."""
    scalars: dict[str, Any] = field(default_factory=dict)
    """Scalar arguments captured from the graph, with a distinctive example value used only for tracing."""
    check: Callable[[Match], str | None] = lambda match: None
    """Guard: None to accept, or the reason for refusing (kept for the coverage report)."""
    ignore_types: tuple = ()
    """Literal types not compared structurally (e.g. `int` for view sizes that depend on the batch)."""

    @functools.cached_property
    def argnames(self) -> list[str]:
        return list(inspect.signature(self.search).parameters)


# --------------------------------------------------------------------------------------------------------------
# The record of one compiled graph.


@dataclass
class Rewrite:
    flag: str
    pattern: str
    where: str


@dataclass
class Miss:
    flag: str
    where: str
    reason: str


@dataclass
class GraphRecord:
    index: int
    replaced: list[Rewrite] = dataclasses.field(default_factory=list)
    misses: list[Miss] = dataclasses.field(default_factory=list)
    fallback: str | None = None
    """Set when the rewrite failed and the graph was compiled by plain Inductor; the exception, in one line."""
    causal_sdpa: list[str] = dataclasses.field(default_factory=list)
    """Where an SDPA's provably causal mask was replaced by is_causal=True (option `causal_sdpa`)."""
    ddp_buckets: int = 0
    """How many DDP gradient buckets the graph was cut into after the rewrite (distributed.split_after_rewrite); 0
    when the backend did not cut it."""
    grouped_sdpa: list[str] = dataclasses.field(default_factory=list)
    """Where SDPA runs on unrepeated grouped k/v with enable_gqa (option `grouped_sdpa`; liger_fx/grouped_sdpa.py)."""
    fused_projections: list[str] = dataclasses.field(default_factory=list)
    """Where sibling linears on one input became one matmul (option `fuse_projections`; liger_fx/projections.py)."""
    swiglu_linear: list[str] = dataclasses.field(default_factory=list)
    """Where a SwiGLU and the down projection after it became one op that recomputes the SwiGLU inside its backward
    (option `fuse_swiglu_linear`; patterns/swiglu.recompute_in_linear)."""
    logits_grad_outside: int = 0
    """How many returned logits leave the graph without a gradient path, theirs attached by the caller
    (patterns/linear_cross_entropy.detach_returned_logits): no zeros gradient of N x V in the backward."""

    def counts(self) -> dict[str, tuple[int, int]]:
        """flag -> (replaced, candidates)."""
        out: dict[str, list[int]] = {}
        for r in self.replaced:
            out.setdefault(r.flag, [0, 0])[0] += 1
            out[r.flag][1] += 1
        for m in self.misses:
            out.setdefault(m.flag, [0, 0])[1] += 1
        return {k: (v[0], v[1]) for k, v in out.items()}

    def summary(self) -> str:
        if self.fallback:
            return f"liger_fx: graph {self.index}: rewrite failed, compiled with plain Inductor ({self.fallback})"
        counts = self.counts()
        causal = f"; {len(self.causal_sdpa)} causal mask(s) -> SDPA is_causal" if self.causal_sdpa else ""
        if self.grouped_sdpa:
            causal += f"; {len(self.grouped_sdpa)} SDPA on grouped k/v (no repeat)"
        if self.fused_projections:
            causal += f"; {len(self.fused_projections)} sibling projection group(s) -> one matmul"
        if self.swiglu_linear:
            causal += f"; {len(self.swiglu_linear)} SwiGLU(s) recomputed inside the down projection's backward"
        if not counts:
            return f"liger_fx: graph {self.index}: no applicable patterns{causal}"
        parts = [f"{flag} {r}/{c}" for flag, (r, c) in counts.items()]
        returned = sum(r.pattern.endswith("/logits-returned") for r in self.replaced)
        if returned:  # the logits are also used: lm_head kept as one matmul beside the fused loss (patterns/...)
            parts.append(f"{returned} lm_head+CE on returned logits"
                         + (" (their gradient outside the graph)" if self.logits_grad_outside else ""))
        text = f"liger_fx: graph {self.index}: replaced " + ", ".join(parts) + causal
        if self.misses:
            text += f"; {len(self.misses)} near miss(es), first: {self.misses[0].where}: {self.misses[0].reason}"
        if self.ddp_buckets:
            text += f"; then cut into {self.ddp_buckets} DDP buckets" if self.ddp_buckets > 1 else "; one DDP bucket"
        return text


RECORDS: list[GraphRecord] = []
"""Every graph compiled by the backend in this process, in order. `clear_records()` resets it."""


def get_records() -> list[GraphRecord]:
    return list(RECORDS)


def clear_records() -> None:
    RECORDS.clear()


# --------------------------------------------------------------------------------------------------------------
# Families and their compiled matchers.


@functools.cache
def families() -> list[Any]:
    """The pattern modules in `liger_fx.patterns`, in a fixed order: norms first, the loss last, so the loss
    pattern sees the final norm already fused. Adding a family is adding a file."""
    import liger_fx.patterns as pkg

    order = {"rms_norm": 0, "rope": 1, "swiglu": 2, "linear_cross_entropy": 3}
    names = [m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_")]
    names.sort(key=lambda n: (order.get(n, 10), n))
    return [importlib.import_module(f"liger_fx.patterns.{n}") for n in names]


class _Run:
    """State of one family pass over one graph: refusal reasons by node, and the record to fill."""

    current: "_Run | None" = None

    def __init__(self, record: GraphRecord):
        self.record = record
        self.refused: dict[fx.Node, str] = {}


@functools.cache
def _matcher(pattern_list: tuple[Pattern, ...]) -> PatternMatcherPass:
    matcher = PatternMatcherPass(pass_name="liger_fx")
    for p in pattern_list:
        gm = trace_pattern(functools.partial(p.search, **p.scalars), p.example_inputs())
        expr = fx_to_pattern(
            gm,
            ignore_types=p.ignore_types,
            argnames=[a for a in p.argnames if a not in p.scalars],
            scalar_workaround=p.scalars,
        )
        register_graph_pattern(expr, extra_check=functools.partial(_check, p), pass_dict=matcher)(
            functools.partial(_handle, p)
        )
    return matcher


def _check(p: Pattern, match: Match) -> bool:
    reason = p.check(match)
    if reason is not None and _Run.current is not None:
        for node in match.nodes:
            _Run.current.refused.setdefault(node, f"{p.name}: {reason}")
    return reason is None


def _handle(p: Pattern, match: Match, *args, **kwargs) -> None:
    site = where(match.output_node())
    # A captured scalar that is a float input of the graph (dynamic=True) enters the replacement as its constant.
    values = [specialize(match.kwargs[name]) if name in p.scalars else match.kwargs[name] for name in p.argnames]
    match.replace_by_example(p.replace, values, trace_fn=trace_pattern)
    if _Run.current is not None:
        _Run.current.record.replaced.append(Rewrite(p.flag, p.name, site))
    log.debug("liger_fx: %s replaced at %s (%s)", p.flag, site, p.name)


def record_replacement(flag: str, pattern: str, node: fx.Node) -> None:
    """Record one replacement made by a family's own `rewrite` (the matcher's are recorded by `_handle`); `node` is
    the replaced node, read for its module path before it is erased."""
    if _Run.current is not None:
        _Run.current.record.replaced.append(Rewrite(flag, pattern, where(node)))
    log.debug("liger_fx: %s replaced at %s (%s)", flag, where(node), pattern)


# --------------------------------------------------------------------------------------------------------------
# Scalars captured from the graph.


def _symbolic_scalar(value):
    """The SymFloat a graph node carries when it is computed from float inputs of the graph alone (backed, with a
    hint), else None. Not a SymInt: pinning one that depends on a sequence length would recompile per length."""
    v = value.meta.get("val") if isinstance(value, fx.Node) else None
    if not isinstance(v, torch.SymFloat) or not v.node.has_hint():
        return None
    free = v.node.expr.free_symbols  # none once `specialize` pinned it (two norms reading one eps)
    return v if all(symbol_is_type(s, SymT.FLOAT) for s in free) else None


def scalar_hint(value):
    """The number a captured scalar (an RMSNorm's eps, a softcap) stands for, or None when it is not a number known
    at compile time.

    A constant is itself. Under `torch.compile(..., dynamic=True)` Dynamo does not bake a float attribute of a
    module into the graph: `self.variance_epsilon` becomes a 0-d fp64 tensor input read by `aten.item`, a backed
    SymFloat whose hint is the attribute's value (torch 2.11 and 2.13 alike). That is a number too: its hint is
    what the guard in `specialize` will pin. A tensor, a value computed from a tensor at run time (unbacked, e.g.
    `.item()` of data under capture_scalar_outputs) or one that depends on a size is not: None."""
    if isinstance(value, (bool, int, float)):
        return value
    sym = _symbolic_scalar(value)
    return None if sym is None else sym.node.hint


def specialize(value):
    """`scalar_hint`'s number for a scalar a replacement consumes, guarding that it stays so: the fused op then gets
    a compile-time constant, exactly as in a static compile (the kernels take eps as a plain fp32 scalar argument).

    Why a guard and not a tensor argument: Dynamo's tensorify pass (AOTAutograd, torch 2.11 and 2.13) keeps a float
    input dynamic only where it feeds tensor arithmetic (add/mul/...); a float input any other op consumes, even as
    the 0-d tensor itself, makes Dynamo restart the frame with that float specialized (checked on both versions: a
    backend passing the eps tensor straight to an op got its restart and a constant eps), so a tensor-eps op would
    only ever run in the attempt Dynamo throws away. The guard makes the rewrite correct on its own, restart or
    not: the compiled code is reused only for the same eps, and a new eps recompiles as in a static compile.
    Anything else is returned as it is."""
    sym = _symbolic_scalar(value)
    return guard_scalar(sym) if sym is not None else value


_NO_GRAD = {torch.ops.aten.detach.default, torch.ops.aten.arange.default, torch.ops.aten.arange.start,
            torch.ops.aten.arange.start_step}


def requires_grad(node) -> bool:
    """Whether a graph value depends on an input that requires grad (traced values drop the flag; `to_aten` keeps it
    on placeholders). Conservative: any path counts, except through detach. HF's rotary tables come from the
    inv_freq buffer and position ids, a few nodes deep."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if not isinstance(n, fx.Node) or n in seen or (n.op == "call_function" and n.target in _NO_GRAD):
            continue
        seen.add(n)
        if n.op == "placeholder" and n.meta.get("requires_grad", True):
            return True
        if n.op == "get_attr":  # lifted constants and buffers of a traced module
            v = getattr(n.graph.owning_module, n.target, None) if n.graph.owning_module is not None else None
            if isinstance(v, torch.Tensor) and v.requires_grad:
                return True
        stack.extend(n.all_input_nodes)
    return False


RECOMPUTE_MIN_BYTES = 1 << 30
"""Below this many bytes of recomputable outputs in a static-shape graph nothing is recomputed: the memory saved is
small and each recomputed op is one more kernel launch in the backward, which a small step pays on the host. Llama-
3.2-1B shape: 6.1 GiB at B8 T2048 (recompute on), 0.39 GiB at B1 T1024 (off: 941 launches a step instead of 989
on the H200, where the plain path's step is host-bound; before, it launched ~150 more a step than Inductor and
spent ~3.8 ms more host time in the backward, bench/host_split.py). A graph with symbolic sizes always recomputes: its sizes at run time
are not known here. Nor does a graph that does not hold the whole step (`_whole_step`): under FSDP2 each decoder layer
is its own graph, 0.38 GiB of fused outputs at Llama-3.2-1B B8 T2048, "small" in each of 16 graphs and 6 GiB in all."""


_LOSSES = ("lm_head_cross_entropy", "linear_cross_entropy", "fused_linear_cross_entropy", "cross_entropy",
           "cross_entropy_loss", "nll_loss_forward", "nll_loss", "nll_loss_nd")  # ours (any form), then aten's


def _whole_step(graph: fx.Graph) -> bool:
    """Whether the graph runs a model from its embedding lookup to its loss, so that its fused outputs are all the
    step has alive at once. A graph per layer (FSDP2 wraps each layer; a graph break) sees a fraction of them."""
    names = {getattr(n.target, "__name__", "").split(".")[0] for n in graph.nodes if n.op == "call_function"}
    return "embedding" in names and any(loss in names for loss in _LOSSES)


def _recomputable_bytes(nodes) -> int | None:
    """Bytes of the nodes' outputs, or None when a size is symbolic."""
    total = 0
    for node in nodes:
        vals = node.meta.get("val")
        for v in vals if isinstance(vals, (tuple, list)) else (vals,):
            if isinstance(v, torch.Tensor):
                if not isinstance(v.numel(), int):
                    return None
                total += v.numel() * v.element_size()
    return total


def tag_recompute(graph: fx.Graph) -> list[fx.Node]:
    """Mark the families' `recomputable()` ops for recomputation in the backward (LigerConfig.recompute). The
    min-cut partitioner honours `recompute=MUST_RECOMPUTE` as it does for selective activation checkpointing (an
    infinite edge to the backward side), so it saves the op's inputs, which the op's own backward saves anyway,
    instead of its output. Nodes already tagged by a checkpointed region keep their region's tags. An op none of
    whose inputs requires grad has no backward and saves nothing (a frozen first layer before the first trainable
    module, e.g. LoRA on down_proj only): recomputing its output would save its inputs instead, 2x for SwiGLU's gate
    and up, so it is left alone. Returns how many nodes were tagged."""
    from torch.utils.checkpoint import CheckpointPolicy

    ops = {op for fam in families() for op in (fam.recomputable() if hasattr(fam, "recomputable") else ())}
    nodes = [node for node in graph.nodes
             if node.op == "call_function" and node.target in ops and "recompute" not in node.meta
             and any(requires_grad(a) for a in node.all_input_nodes)]
    size = _recomputable_bytes(nodes)
    if size is not None and size < RECOMPUTE_MIN_BYTES and _whole_step(graph):
        log.debug("liger_fx: nothing recomputed: the fused outputs hold %.2f GiB, under %.2f GiB",
                  size / 2**30, RECOMPUTE_MIN_BYTES / 2**30)
        return []
    for node in nodes:
        node.meta["recompute"] = CheckpointPolicy.MUST_RECOMPUTE
        mark_in_code(node, "recompute")
    return nodes


def apply_family(family, gm: fx.GraphModule, config: LigerConfig, record: GraphRecord) -> None:
    graph = gm.graph
    anchors = family.candidates(graph)
    enabled = tuple(p for p in family.patterns() if getattr(config, p.flag))
    run = _Run(record)
    _Run.current = run
    try:
        if enabled:
            _matcher(enabled).apply(graph)
            if hasattr(family, "post_pass"):
                family.post_pass(graph)
        if hasattr(family, "rewrite"):
            family.rewrite(graph, config)
    finally:
        _Run.current = None
    for flag, node in anchors:
        if getattr(node, "_erased", False):
            continue
        if not getattr(config, flag):
            reason = f"flag {flag!r} is off"
        else:
            reason = run.refused.get(node) or family.explain(node)
        record.misses.append(Miss(flag, where(node), reason))
    graph.eliminate_dead_code()
