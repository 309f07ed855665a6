"""The liger backend: the whole pipeline in one place.

    torch.compile(model, backend="liger", options={"rope": False})

Dynamo hands us its FX graph and example inputs. We
  1. retrace it to canonical pre-dispatch ATen (canonicalize.to_aten); an SDPA whose mask is provably causal runs
     with is_causal=True instead (causal_mask.causal_sdpa; option `causal_sdpa`), and an unmasked SDPA on k/v
     repeated to every query head runs on the grouped k/v with enable_gqa (grouped_sdpa; option `grouped_sdpa`),
  2. run the enabled pattern families in order (rewrite.apply_family), each replacing subgraphs with one fused op
     that carries its own backward; run sibling linears on one input as one matmul where one is narrow (GQA's k/v:
     projections.fuse_sibling_linears; option `fuse_projections`); and mark the cheap ones' outputs for
     recomputation in the backward (rewrite.tag_recompute; option `recompute`), a SwiGLU's inside the down
     projection's backward kernel (swiglu.recompute_in_linear; option `fuse_swiglu_linear`),
  3. in a training graph, return the lm_head's h, W, b in place of logits that nothing else in it reads
     (linear_cross_entropy.lazy_returned_logits; option `lazy_logits`): the caller gets lazy logits, which a loss
     outside the graph consumes fused; else take logits returned beside a fused loss out of the graph's autograd,
     with the lm_head's inputs as extra outputs (linear_cross_entropy.detach_returned_logits): autograd would
     otherwise make them a zeros gradient of N x V at the step's peak,
  4. hand the result to Inductor (compile_fx), which does AOTAutograd and fuses everything else; under DDP, where
     DDP's whole graph was handed to us (distributed.install_ddp_hook, split_after_rewrite), first cut it at DDP's
     gradient buckets,
  5. call it through a wrapper that builds the lazy logits (lazy_logits.lazy_logits), re-attaches the returned
     logits' gradient (reattach_logits_grad) and drops the extra outputs; and that marks the causal masks it
     returns for the graphs that read them, where a graph break separates them (FSDP2's layers), and checks the
     marks of those it reads (causal_mask.MaskPlan).
If 1-3 raise, or 4 raises on the rewritten graph, we log one warning and compile Dynamo's untouched graph: a model
that compiles with Inductor never fails with liger. A backward graph (compiled autograd hands the backend the step's
backward too) goes to Inductor as it is: our ops' backward formulas are in it already, and no pattern is a backward.
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections import Counter
from typing import Callable

import torch
import torch.fx as fx
from torch._dynamo.exc import RestartAnalysis
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException
from torch._dynamo.utils import counters, dynamo_timed
from torch._inductor.compile_fx import compile_fx

from . import causal_mask, checkpointing, distributed, grouped_sdpa, projections, rewrite
from .kernels.fused_linear_cross_entropy import reattach_logits_grad
from .lazy_logits import lazy_logits
from .patterns import linear_cross_entropy, swiglu
from .canonicalize import to_aten, where
from .config import LigerConfig, split_options

log = logging.getLogger("liger_fx")

_graph_index = itertools.count()

# The ordered passes after tracing, each `(gm, config, record) -> None`, switchable by its flag. A test (or a
# debugging user) may insert its own here.
PASSES: list[tuple[str, Callable]] = []


def _family_pass(family):
    return lambda gm, config, record: rewrite.apply_family(family, gm, config, record)


def passes() -> list[tuple[str, Callable]]:
    if not PASSES:
        PASSES.extend((fam.__name__.rsplit(".", 1)[-1], _family_pass(fam)) for fam in rewrite.families())
    return PASSES


def _op_counts(gm: fx.GraphModule) -> Counter:
    return Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")


def rewrite_graph(gm: fx.GraphModule, example_inputs, config: LigerConfig, record: rewrite.GraphRecord):
    """Steps 1 and 2: canonical ATen, then every pattern family. Returns a new GraphModule."""
    traced = to_aten(gm, example_inputs)
    if config.causal_sdpa:
        relied, unmarked = [], []  # mask inputs taken as causal on an earlier graph's mark, or without one
        record.causal_sdpa = [where(n) for n in causal_mask.causal_sdpa(traced.graph, relied, unmarked)]
        causal_mask.note_mask_inputs(traced, relied, unmarked)  # for MaskPlan: guards and the check at each call
    if config.grouped_sdpa:
        record.grouped_sdpa = [where(n) for n in grouped_sdpa.grouped_sdpa(traced.graph)]
    before = _op_counts(traced) if log.isEnabledFor(logging.DEBUG) else None
    for name, fn in passes():
        fn(traced, config, record)
    if config.fuse_projections:
        record.fused_projections = projections.fuse_sibling_linears(traced.graph)
    if config.recompute:
        tagged = rewrite.tag_recompute(traced.graph)
        log.debug("liger_fx: graph %d: %d fused outputs recomputed in the backward", record.index, len(tagged))
        if config.fuse_swiglu_linear:
            record.swiglu_linear = swiglu.recompute_in_linear(traced.graph, tagged)
    traced.graph.lint()
    traced.recompile()
    if before is not None:
        after = _op_counts(traced)
        diff = {k: after[k] - before[k] for k in set(before) | set(after) if after[k] != before[k]}
        log.debug("liger_fx: graph %d op count changes: %s", record.index, diff)
    return traced


def _mode_patches(mode: str | None) -> dict:
    if mode in (None, "default"):
        return {}
    try:
        return dict(torch._inductor.list_mode_options(mode))
    except Exception:
        raise ValueError(
            f"liger_fx: unknown mode {mode!r}; valid modes are default, reduce-overhead, max-autotune, "
            "max-autotune-no-cudagraphs"
        ) from None


def liger_backend(gm: fx.GraphModule, example_inputs, options: dict | None = None, mode: str | None = None):
    """The `torch_dynamo_backends` entry point `liger`."""
    config, inductor_options = split_options(options)  # a bad flag raises here, before any work
    mode = (options or {}).get("mode", mode)  # torch.compile takes mode= or options=, not both
    compile_one = functools.partial(compile_fx, config_patches={**_mode_patches(mode), **inductor_options} or None)
    record = rewrite.GraphRecord(next(_graph_index))
    rewrite.RECORDS.append(record)
    if distributed.is_backward_graph():  # compiled autograd's capture of a backward: nothing of ours to find
        return _compile_backward(gm, example_inputs, compile_one, record)
    checkpointing.warn_if_checkpoint_broke(record.index)  # checkpointed layers Dynamo left out of every graph
    ddp_caps = distributed.owned_split()  # DDP's whole graph, ours to cut after the rewrite (or None)
    if ddp_caps is not None:
        config = distributed.ddp_config(config)
    returned: list[linear_cross_entropy.ReturnedLogits] = []
    lazy: list[linear_cross_entropy.LazyReturned] = []
    n_out = _n_outputs(gm)
    masks = None
    try:
        with dynamo_timed("liger_fx.rewrite_graph"):  # in torch._dynamo.utils.compile_times(), beside Inductor's
            compiled_gm = rewrite_graph(gm, example_inputs, config, record)  # steps 1 and 2
        distributed.note_bucket_cuts(gm, compiled_gm, record)  # a DDP bucket: say which misses its boundary explains
        if ddp_caps is not None:
            distributed.carry_dynamo_meta(gm, compiled_gm)  # what DDPOptimizer reads from Dynamo's graph
        else:  # (under DDP the bucket cut would have to carry the extra outputs across submodules: not done)
            returned, lazy = _logits_out_of_autograd(gm, compiled_gm, config, record)  # step 3
        if config.causal_sdpa:  # causal masks this graph returns: marked for the graphs that read them
            masks = causal_mask.MaskPlan(compiled_gm, gm, checks=ddp_caps is None)
            record.causal_masks_out, record.causal_masks_checked = len(masks.proven), len(masks.checked)
        compiled_gm.recompile()
    except Exception as e:  # the fallback is the product's promise: never worse than Inductor
        _fall_back(record, "rewrite", e)
        compiled_gm, returned, lazy, masks = gm, [], [], None

    def compile_graph(graph: fx.GraphModule):
        if ddp_caps is not None:  # cut now, at DDP's buckets: no boundary can fall inside a fused op
            return distributed.compile_in_buckets(graph, example_inputs, ddp_caps, compile_one, record)
        return compile_one(graph, example_inputs)

    try:
        if compiled_gm is not gm:
            # A rewritten graph that fails to compile falls back too: a fused op whose fake or autograd formula
            # raises where its guards let a case through fails in AOTAutograd's trace of forward and backward, here.
            # (Inductor compiles the backward's kernels at the first backward, out of this reach.) Errors that the
            # untouched graph also raises stay Inductor's own. A restart is no failure: Dynamo traces the frame again.
            try:
                compiled = compile_graph(compiled_gm)
            except _NOT_OURS:
                raise
            except Exception as e:
                _fall_back(record, "compiling the rewrite", e)
            else:
                if masks is not None:
                    compiled = masks.wrap(compiled, record)
                _commit(record)
                return _with_logits_grad(compiled, n_out, returned, lazy)
        compiled = compile_graph(gm)
    except Exception as e:
        _discard(record, e)
        raise
    _commit(record)
    return compiled


def _compile_backward(gm: fx.GraphModule, example_inputs, compile_one: Callable, record: rewrite.GraphRecord):
    """A backward graph (compiled autograd) goes to Inductor as it is: our ops' backward formulas are in it already."""
    record.kind = "backward"
    try:
        compiled = compile_one(gm, example_inputs)
    except Exception as e:
        _discard(record, e)
        raise
    _commit(record)
    return compiled


def _logits_out_of_autograd(gm: fx.GraphModule, rewritten: fx.GraphModule, config: LigerConfig,
                            record: rewrite.GraphRecord) -> tuple[list, list]:
    """Step 3 on the rewritten graph: lm_head outputs that only leave it become (h, W, b) outputs for lazy logits,
    and logits returned beside a fused loss leave its autograd, with (h, W, b) appended to re-attach their gradient.
    Lazy only where the call records gradients (Dynamo guards on grad mode, so this is the call's) and not in a
    DDPOptimizer bucket, whose outputs feed the next bucket's compiled function, which takes plain tensors."""
    lazy = []
    if config.lazy_logits and torch.is_grad_enabled() and not distributed.is_ddp_bucket(gm):
        lazy = linear_cross_entropy.lazy_returned_logits(rewritten.graph)
    returned = linear_cross_entropy.detach_returned_logits(rewritten.graph)
    if returned or lazy:
        record.logits_grad_outside = sum(len(r.positions) for r in returned)
        record.lazy_logits = sum(len(r.positions) for r in lazy)
    return returned, lazy


def _n_outputs(gm: fx.GraphModule) -> int | None:
    outs = next(n for n in reversed(gm.graph.nodes) if n.op == "output").args[0]
    return len(outs) if isinstance(outs, (tuple, list)) else None


def _with_logits_grad(compiled: Callable, n_out: int | None, returned: list, lazy: list) -> Callable:
    """Step 5: the compiled graph as Dynamo expects it (its first `n_out` outputs), with lazy logits built from the
    h it returned in their place and the extra outputs W, b, and the gradient of returned logits re-attached outside
    it from the extra outputs (h, W, b) that step 3 appended after them."""
    if not returned and not lazy:
        return compiled

    def run(*args):
        outs = compiled(*args)
        if len(outs) <= n_out:  # Dynamo's own graph ran (a stale causal mark: causal_mask.MaskPlan), its logits whole
            return outs
        mine = list(outs[:n_out])
        for r in lazy:
            w, b = outs[r.extra[0]], outs[r.extra[1]] if r.extra[1] is not None else None
            logits = lazy_logits(mine[r.positions[0]], w, b, r.ops)
            for i in r.positions:
                mine[i] = logits
        for r in returned:
            h, w = outs[r.extra[0]], outs[r.extra[1]]
            b = outs[r.extra[2]] if r.extra[2] is not None else None
            for i in r.positions:
                mine[i] = reattach_logits_grad(mine[i], h, w, b)
        return type(outs)(mine) if isinstance(outs, (list, tuple)) else mine

    return run


# Raised while compiling a graph for reasons the rewrite does not change: Dynamo's own control flow (a restart of the
# trace), and ops Inductor cannot trace (a data-dependent output shape: Mixtral's MoE routing on torch 2.11, where
# plain Inductor raises the same and Dynamo runs the frame eagerly). Falling back would warn and compile twice for
# nothing.
_NOT_OURS = (RestartAnalysis, DataDependentOutputException, DynamicOutputShapeException)


def _fall_back(record: rewrite.GraphRecord, step: str, e: Exception) -> None:
    record.fallback = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    record.replaced.clear()
    record.misses.clear()
    record.causal_sdpa = []
    record.causal_masks_out = record.causal_masks_checked = record.causal_from_marks = 0
    record.fused_projections = []
    record.grouped_sdpa = []
    record.swiglu_linear = []
    record.logits_grad_outside = 0
    record.lazy_logits = 0
    log.warning("liger_fx: %s of graph %d failed (%s); compiling it with plain Inductor",
                step, record.index, record.fallback)


def _discard(record: rewrite.GraphRecord, e: Exception) -> None:
    """Forget a graph whose compile raised: it never runs, so its record and counts would describe nothing. Dynamo
    restarts its trace (RestartAnalysis; under dynamic=True with the float inputs no tensor arithmetic consumed
    specialized: a fused norm's eps, SDPA's scale, so plain Inductor restarts an HF Llama too), runs the frame
    eagerly (a data-dependent op Inductor cannot trace: 21 Mixtral graphs on torch 2.11 + transformers 5.17, plain
    Inductor alike), or the error reaches the user. Counted, the restart made a dynamic=True Llama count rope 8 for
    its 4 sites."""
    rewrite.RECORDS.remove(record)
    log.info("liger_fx: graph %d discarded: compiling it raised %s (Dynamo traces the frame again or runs it "
             "eagerly)", record.index, type(e).__name__)


def _commit(record: rewrite.GraphRecord) -> None:
    """Count the graph's replacements once it is compiled, so a fallback or a discarded attempt counts nothing."""
    for r in record.replaced:
        counters["liger_fx"][r.flag] += 1
    if record.causal_sdpa:
        counters["liger_fx"]["causal_sdpa"] += len(record.causal_sdpa)
    if record.grouped_sdpa:
        counters["liger_fx"]["grouped_sdpa"] += len(record.grouped_sdpa)
    if record.fused_projections:
        counters["liger_fx"]["fused_projections"] += len(record.fused_projections)
    if record.swiglu_linear:
        counters["liger_fx"]["swiglu_linear"] += len(record.swiglu_linear)
    if record.lazy_logits:
        counters["liger_fx"]["lazy_logits"] += record.lazy_logits
    log.info(record.summary())


# Inside DDP's forward, Dynamo hands the whole graph to DDPOptimizer before any backend runs; torch.compile looking
# this backend up (this import) is the one moment we can have its DDPOptimizer pass liger's graphs on whole.
distributed.install_ddp_hook()
