"""What distributed training changes in the graphs the backend receives, and how the record accounts for it.

DDP. Dynamo's DDPOptimizer (`torch._dynamo.config.optimize_ddp`, on by default) splits the captured graph where
DDP's gradient buckets end, so that each bucket's all-reduce can start while the backward of the earlier buckets
still runs, and calls the backend once per bucket. A fusion whose ops straddle a boundary cannot match. The boundary
lands after the op that fills a bucket, i.e. after a large projection: on the Llama-3.2-1B shape (bf16, 16 layers,
DDP's 25 MiB buckets) Dynamo cuts the graph into 50 buckets and every MLP between `silu(gate)` and `* up`: SwiGLU
0/16, while RMSNorm 33/33, RoPE 32/32 and lm_head + loss 1/1 stayed whole (`python -m bench.ddp_buckets`: rewrite
only, on CPU, 2 min).

What we do: `split_after_rewrite` (below) has Dynamo hand the backend the whole graph; the backend rewrites it and
only then cuts it with torch's own DDPOptimizer at the DDP module's bucket cap. A fused op is one node, so no
boundary can fall inside it, and everything else about the cut is Dynamo's. On the same shape: SwiGLU 16/16, the
others as before, and the same parameters in the same buckets in the same order: 50 buckets with the loss alone
returned (`--loss-only`, liger_fx.apply's graph), 51 with the logits returned too, where the tied lm_head weight
feeds both the logits matmul and the fused loss and DDPOptimizer, which counts a parameter at each use, opens one
more bucket between them holding nothing new (tests/test_distributed.py checks the layout at 1/16 of the widths).
Each bucket stays its own compiled autograd function, so its gradients are ready, and all-reduced, while the earlier
buckets' backward runs: the overlap is kept.

Not chosen: moving Dynamo's cut points (which nodes make a fusable site is only known after our canonicalization
and matching, so it would mean re-implementing DDPOptimizer's bucketing on our side); `optimize_ddp="python_reducer"`
(experimental, compiled autograd: DDP reads the mode once in its `__init__`, before any backend runs, needs
compiled autograd switched on, and its constructor then changes Inductor's config and Dynamo's trace rules
globally); and
`optimize_ddp = False` (one graph: every all-reduce waits for the whole backward).

Dynamo decides to split before it calls any backend, so the backend cannot do this by itself; see
`split_after_rewrite` for who enters it. Where nobody does (plain `torch.compile(DDP(model), backend="liger")`
called outside it), Dynamo's split stands, and a near miss in a bucket whose module's values leave the bucket gets
CUT_REASON below; the first one logs a warning.

FSDP2. `fully_shard` hooks run under `torch._dynamo.disable`, so Dynamo breaks the graph at each wrapped module: one
graph per decoder layer, then the final norm, then lm_head + loss. Inside them every parameter is the all-gathered
plain tensor (a full-shape FakeTensor placeholder, never a DTensor), lm_head's included. Nothing to do here; the tests
check it (tests/test_distributed.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import contextvars
import logging
from typing import Callable

import torch
import torch.fx as fx

from .canonicalize import where
from .config import LigerConfig
from .rewrite import GraphRecord

log = logging.getLogger("liger_fx")

CUT_REASON = (
    "this graph is one DDPOptimizer bucket and values of this module leave it at the bucket boundary: a pattern cut "
    "there cannot match (liger_fx.apply, or the compiled call inside liger_fx.distributed.split_after_rewrite(), "
    "rewrites before the cut)"
)

_warned = False


def ddp_config(config: LigerConfig) -> LigerConfig:
    """The config a graph that DDP will cut into buckets is rewritten with: no fused projections. DDPOptimizer puts
    each parameter in the bucket where it is used, so one concatenation of q/k/v's weights would move the bucket
    boundaries (tests/test_distributed.py checks that the layout stays Dynamo's); not measured under DDP."""
    return dataclasses.replace(config, fuse_projections=False) if config.fuse_projections else config


def is_ddp_bucket(gm: fx.GraphModule) -> bool:
    """True for a graph that DDPOptimizer split off; it names itself in the reason it gives Dynamo."""
    return "DDPOptimizer" in str(getattr(gm, "compile_subgraph_reason", ""))


def note_bucket_cuts(gm: fx.GraphModule, traced: fx.GraphModule, record: GraphRecord) -> int:
    """Append CUT_REASON to each near miss in a DDP bucket whose module sends values out of the bucket. Returns how
    many. Misses whose flag is off keep their reason: the flag explains them."""
    global _warned
    if not is_ddp_bucket(gm):
        return 0
    leaving = {where(n) for n in traced.graph.output_node().all_input_nodes if n.op != "placeholder"}
    noted = 0
    for miss in record.misses:
        if miss.where in leaving and not miss.reason.startswith("flag "):
            miss.reason = f"{miss.reason}; {CUT_REASON}"
            noted += 1
    if noted and not _warned:
        _warned = True
        log.warning("liger_fx: graph %d: %d pattern(s) at a DDP bucket boundary not fused; %s",
                    record.index, noted, CUT_REASON)
    return noted


# --------------------------------------------------------------------------------------------------------------
# Rewrite first, then split: the whole graph reaches the backend, and DDP's buckets are cut after the rewrite.

_OWN_SPLIT = contextvars.ContextVar("liger_fx_own_ddp_split", default=False)


@contextlib.contextmanager
def split_after_rewrite():
    """While active, a graph Dynamo compiles inside DDP's forward reaches the liger backend whole; the backend
    rewrites it, then cuts it at DDP's gradient buckets with torch's own DDPOptimizer. A fused op is one node, so no
    boundary can fall inside it, and each bucket is still its own compiled autograd function whose gradients are
    ready (and all-reduced) while the earlier buckets' backward runs: the overlap DDPOptimizer exists for is kept.

    Why a context and not something the backend does by itself: Dynamo decides to split before it calls any backend
    (convert_frame reads `optimize_ddp` when the frame starts, then hands the backend one bucket at a time), and
    `torch.compile` wraps every non-Inductor backend in `_TorchCompileWrapper`, which drops the `backend_ctx_ctor`
    hook a backend could otherwise use to run code around the frame. `liger_fx.apply` (and so the HF Trainer hook)
    enters this context around every call of the compiled forward; with `torch.compile(model, backend="liger")`
    enter it around the training step.

    Scoped: `optimize_ddp` is set to False through torch's own `config.patch` for the duration only (so enter it
    around liger-compiled calls: another backend compiling under DDP inside it would get one uncut graph), and
    nothing is touched when the user chose another mode (`optimize_ddp=False` compiles one graph, as before; the
    `python_reducer` modes are DDP's own, fixed when DDP was built). Cheap enough to enter on every step (35 us per
    enter and exit on the 2-core CPU machine; a Llama-3.2-1B step at B8 T2048 takes 0.3 s on the H200): Dynamo reads
    the setting only when it compiles, and a cached frame never looks at it.
    """
    from torch._dynamo.utils import get_optimize_ddp_mode

    if _OWN_SPLIT.get() or get_optimize_ddp_mode() != "ddp_optimizer":
        yield
        return
    token = _OWN_SPLIT.set(True)
    try:
        with torch._dynamo.config.patch(optimize_ddp=False):
            yield
    finally:
        _OWN_SPLIT.reset(token)


def in_ddp_forward() -> bool:
    """True while a DistributedDataParallel module runs its wrapped module's forward (DDP sets this around the call;
    Dynamo reads the same to decide on DDPOptimizer)."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel._get_active_ddp_module() is not None


def owned_ddp_module():
    """The DDP module whose forward is being compiled, when `split_after_rewrite` handed its split to us; else None."""
    if not _OWN_SPLIT.get():
        return None
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel._get_active_ddp_module()


def compile_in_buckets(gm: fx.GraphModule, example_inputs, ddp_module, compile_fn: Callable, record: GraphRecord):
    """Cut `gm` (the rewritten graph, with `carry_dynamo_meta`, or Dynamo's own after a fallback) at DDP's buckets and
    compile each piece with `compile_fn`, as Dynamo would have done with its graph: same DDPOptimizer, same cap."""
    from torch._dynamo.backends.distributed import DDPOptimizer

    cap = ddp_module.bucket_bytes_cap
    # DDPOptimizer refuses a first bucket larger than the others, and Dynamo builds it with DDP's 1 MiB default:
    # under plain Dynamo a bucket_cap_mb below 1 fails at the first step. Capping the first bucket at the others
    # keeps every size torch accepts as torch has it and accepts the small ones (the CPU tests scale 25 MB down).
    first = min(getattr(torch.distributed, "_DEFAULT_FIRST_BUCKET_BYTES", cap), cap)
    optimizer = DDPOptimizer(bucket_bytes_cap=cap, backend_compile_fn=compile_fn, first_bucket_cap=first)
    compiled = optimizer.compile_fn(gm, example_inputs)
    record.ddp_buckets = len(optimizer.buckets)
    log.info("liger_fx: graph %d: cut into %d DDP bucket(s) of %.2f MiB after the rewrite", record.index,
             record.ddp_buckets, cap / 2**20)
    return compiled


def carry_dynamo_meta(dynamo_gm: fx.GraphModule, traced: fx.GraphModule) -> None:
    """What DDPOptimizer reads from Dynamo's graph, put on the retraced one: each placeholder's example value (a
    Parameter there, which is how it counts a bucket's bytes) and Dynamo source, the graph's meta and its parameter
    sources. The placeholders correspond one to one, in order (canonicalize.to_aten)."""
    ours = [n for n in traced.graph.nodes if n.op == "placeholder"]
    theirs = [n for n in dynamo_gm.graph.nodes if n.op == "placeholder"]
    if len(ours) != len(theirs):
        raise RuntimeError(f"retraced graph has {len(ours)} inputs, Dynamo's {len(theirs)}")
    for mine, orig in zip(ours, theirs):
        if "example_value" in orig.meta:
            mine.meta["example_value"] = orig.meta["example_value"]
        mine._dynamo_source = getattr(orig, "_dynamo_source", None)
    traced.meta = dynamo_gm.meta
    traced._param_name_to_source = getattr(dynamo_gm, "_param_name_to_source", None)
