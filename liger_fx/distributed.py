"""What distributed training changes in the graphs the backend receives, and how the record accounts for it.

DDP. Dynamo's DDPOptimizer (`torch._dynamo.config.optimize_ddp`, on by default) splits the captured graph where
DDP's gradient buckets end, so that each bucket's all-reduce can start while the backward of the earlier buckets
still runs, and calls the backend once per bucket. A fusion whose ops straddle a boundary cannot match. The boundary
lands after the op that fills a bucket, i.e. after a large projection: on the Llama-3.2-1B shape (bf16, 16 layers,
DDP's 25 MiB buckets) Dynamo cuts the graph into 50 buckets and every MLP between `silu(gate)` and `* up`: SwiGLU
0/16, while RMSNorm 33/33, RoPE 32/32 and lm_head + loss 1/1 stayed whole (`python -m bench.lab.ddp_buckets`: rewrite
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

Who hands the backend the whole graph. Dynamo decides to split before it calls any backend: inside DDP's forward,
convert_frame builds a `torch._dynamo.backends.distributed.DDPOptimizer(bucket_bytes_cap=..., backend_compile_fn=
<the user's backend>)` and has Dynamo call its `compile_fn` with the whole graph, which cuts it and calls the backend
once per bucket. `install_ddp_hook` (run when liger_fx is imported, which is when `torch.compile(..., backend=
"liger")` looks the backend up: the only moment our code runs before that) puts a subclass in that module's place
whose `compile_fn`, when the backend it was given is ours, hands the whole graph to it with DDPOptimizer's own bucket
caps; for any other backend it is DDPOptimizer itself. So the bare `torch.compile(DDP(model), backend="liger")` fuses
every site with `optimize_ddp` left alone. Narrow on purpose: convert_frame looks the class up at call time (`from
torch._dynamo.backends.distributed import DDPOptimizer` inside CatchErrorsWrapper.__call__, torch 2.11 and 2.13
alike), and the hook is installed only where that call site and DDPOptimizer's signature are as read in those
versions. `split_after_rewrite` does the same through a scope (`optimize_ddp=False` for its duration), for
`liger_fx.apply` and for torch versions the hook does not know. Where neither applies, Dynamo's split stands, and a
near miss in a bucket whose module's values leave the bucket gets CUT_REASON below; the first one logs a warning
that names why.

FSDP2. `fully_shard` hooks run under `torch._dynamo.disable`, so Dynamo breaks the graph at each wrapped module: one
graph per decoder layer, then the final norm, then lm_head + loss. Inside them every parameter is the all-gathered
plain tensor (a full-shape FakeTensor placeholder, never a DTensor), lm_head's included: the patterns match as without
FSDP (tests/test_distributed.py). What the breaks do change: transformers' causal mask becomes an input of every
layer's graph, which liger_fx/causal_mask.py handles ("Masks that cross graphs").
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
        why = f" (the DDPOptimizer hook is not installed: {_HOOK_MISSING})" if _HOOK_MISSING else ""
        log.warning("liger_fx: graph %d: %d pattern(s) at a DDP bucket boundary not fused%s; %s",
                    record.index, noted, why, CUT_REASON)
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
    hook a backend could otherwise use to run code around the frame. On the torch versions it knows,
    `install_ddp_hook` makes this unnecessary for `torch.compile(DDP(model), backend="liger")`; the context stays
    for any other version, and `liger_fx.apply` (so the HF Trainer hook) enters it around every call of the compiled
    forward.

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


@dataclasses.dataclass(frozen=True)
class BucketCaps:
    """DDP's bucket sizes in bytes, as DDPOptimizer takes them."""

    bucket_bytes_cap: int
    first_bucket_cap: int


def _first_bucket_cap(cap: int, first: int | None = None) -> int:
    # DDPOptimizer refuses a first bucket larger than the others, and Dynamo builds it with DDP's 1 MiB default:
    # under plain Dynamo a bucket_cap_mb below 1 fails at the first step. Capping the first bucket at the others
    # keeps every size torch accepts as torch has it and accepts the small ones (the CPU tests scale 25 MB down).
    if first is None:
        first = getattr(torch.distributed, "_DEFAULT_FIRST_BUCKET_BYTES", cap)
    return min(first, cap)


_HOOK_CAPS: contextvars.ContextVar[BucketCaps | None] = contextvars.ContextVar("liger_fx_ddp_hook", default=None)


def owned_split() -> BucketCaps | None:
    """DDP's bucket caps when the graph being compiled is DDP's whole graph and ours to cut after the rewrite (handed
    over by the DDPOptimizer hook, or inside `split_after_rewrite`); else None."""
    caps = _HOOK_CAPS.get()
    if caps is not None:
        return caps
    if not _OWN_SPLIT.get():
        return None
    from torch.nn.parallel import DistributedDataParallel

    module = DistributedDataParallel._get_active_ddp_module()
    if module is None:
        return None
    return BucketCaps(module.bucket_bytes_cap, _first_bucket_cap(module.bucket_bytes_cap))


def compile_in_buckets(gm: fx.GraphModule, example_inputs, caps: BucketCaps, compile_fn: Callable,
                       record: GraphRecord):
    """Cut `gm` (the rewritten graph, with `carry_dynamo_meta`, or Dynamo's own after a fallback) at DDP's buckets and
    compile each piece with `compile_fn`, as Dynamo would have done with its graph: same DDPOptimizer, same caps."""
    cap = caps.bucket_bytes_cap
    optimizer = _TORCH_DDP_OPTIMIZER(bucket_bytes_cap=cap, backend_compile_fn=compile_fn,
                                     first_bucket_cap=caps.first_bucket_cap)
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


# --------------------------------------------------------------------------------------------------------------
# Compiled autograd: the backward reaches the backend too.


def is_backward_graph() -> bool:
    """Whether the graph being compiled is a backward captured by compiled autograd.

    With `torch._dynamo.config.compiled_autograd` on (which DDP's `optimize_ddp="python_reducer"` requires), the
    autograd engine's work for `loss.backward()` is traced into one FX graph and compiled with the backend of the
    torch.compile that ran the forward: liger's. Dynamo traces it when it first runs, inside compiled autograd's
    runtime wrapper, which sets `torch._dynamo.compiled_autograd.in_compiled_autograd_region` (torch 2.11 and 2.13)
    for that call. Such a graph holds the forward graphs' backward (ours
    included, as their own backward ops), DDP's reducer hooks and the gradient accumulation: no forward pattern to
    look for, and the forward's rewrite already chose its kernels."""
    import torch._dynamo.compiled_autograd as ca

    return bool(getattr(ca, "in_compiled_autograd_region", False))


# --------------------------------------------------------------------------------------------------------------
# The bare entry point: DDPOptimizer hands the whole graph to the liger backend.

_TORCH_DDP_OPTIMIZER = None
"""torch's own DDPOptimizer class (what the hook subclasses; what compile_in_buckets cuts with)."""

_HOOK_MISSING: str | None = None
"""Why the hook is not installed (None when it is)."""

_HOOKED_VERSIONS = ((2, 11), (2, 12), (2, 13))
"""torch versions whose DDPOptimizer call site was read: 2.11 and 2.13 (2.12 lies between, with the same call)."""


def _is_liger(fn) -> bool:
    """Whether a backend as Dynamo holds it is the liger backend: Dynamo wraps it (WrapBackendDebug ->
    `_torchdynamo_orig_backend`), torch.compile too (`_TorchCompileWrapper` -> `compiler_fn`), a user may partial it."""
    from .backend import liger_backend

    for _ in range(8):
        if fn is liger_backend:
            return True
        nxt = (getattr(fn, "_torchdynamo_orig_backend", None) or getattr(fn, "compiler_fn", None)
               or getattr(fn, "func", None))
        if nxt is None or nxt is fn:
            return False
        fn = nxt
    return False


def _hook_blocker() -> str | None:
    """Why the hook cannot be installed on this torch, or None: the version, and the structure it relies on."""
    import inspect

    try:
        version = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    except ValueError:
        return f"torch {torch.__version__} is not a release version"
    if version not in _HOOKED_VERSIONS:
        return f"torch {torch.__version__}: the hook was checked against torch 2.11 to 2.13 only"
    try:
        import torch._dynamo.backends.distributed as dist_backend
        import torch._dynamo.convert_frame as convert_frame

        params = list(inspect.signature(dist_backend.DDPOptimizer.__init__).parameters)
        if params[:4] != ["self", "bucket_bytes_cap", "backend_compile_fn", "first_bucket_cap"]:
            return f"DDPOptimizer takes {params[1:]}"
        if not callable(getattr(dist_backend.DDPOptimizer, "compile_fn", None)):
            return "DDPOptimizer has no compile_fn"
        site = inspect.getsource(convert_frame.CatchErrorsWrapper.__call__)
        if "from torch._dynamo.backends.distributed import DDPOptimizer" not in site or \
                "ddp_optimizer.compile_fn" not in site:
            return "convert_frame no longer builds DDPOptimizer where the hook expects it"
    except Exception as e:  # any surprise in torch's layout: no hook
        return f"{type(e).__name__}: {e}"
    return None


def install_ddp_hook() -> bool:
    """Put the liger-aware DDPOptimizer in torch's module, once; returns whether it is installed. Where this torch is
    not one the hook was checked against, nothing changes and `_HOOK_MISSING` says why."""
    global _TORCH_DDP_OPTIMIZER, _HOOK_MISSING
    import torch._dynamo.backends.distributed as dist_backend

    current = dist_backend.DDPOptimizer
    if getattr(current, "_liger_fx_hook", False):
        return True
    _TORCH_DDP_OPTIMIZER = current
    _HOOK_MISSING = _hook_blocker()
    if _HOOK_MISSING is not None:
        log.debug("liger_fx: DDPOptimizer hook not installed: %s", _HOOK_MISSING)
        return False

    class DDPOptimizer(current):
        """torch's DDPOptimizer, except when the backend it compiles for is liger: then `compile_fn` hands that
        backend the whole graph with the bucket caps, and the backend cuts it after the rewrite with torch's own
        DDPOptimizer (compile_in_buckets). Same buckets, same overlap; every site fused."""

        _liger_fx_hook = True

        def __init__(self, bucket_bytes_cap, backend_compile_fn, first_bucket_cap=None):
            self._liger_fx = _is_liger(backend_compile_fn)
            if self._liger_fx:
                first_bucket_cap = _first_bucket_cap(bucket_bytes_cap, first_bucket_cap)
            super().__init__(bucket_bytes_cap, backend_compile_fn, first_bucket_cap)

        def compile_fn(self, gm, example_inputs, **compiler_configs):
            if not self._liger_fx:
                return super().compile_fn(gm, example_inputs, **compiler_configs)
            token = _HOOK_CAPS.set(BucketCaps(self.bucket_bytes_cap, self.first_bucket_cap))
            try:
                return self.backend_compile_fn(gm, example_inputs, **compiler_configs)
            finally:
                _HOOK_CAPS.reset(token)

    DDPOptimizer.__module__ = __name__
    DDPOptimizer.__qualname__ = "DDPOptimizer"
    dist_backend.DDPOptimizer = DDPOptimizer
    return True


def uninstall_ddp_hook() -> None:
    """Give torch its own DDPOptimizer back (tests)."""
    import torch._dynamo.backends.distributed as dist_backend

    if getattr(dist_backend.DDPOptimizer, "_liger_fx_hook", False):
        dist_backend.DDPOptimizer = _TORCH_DDP_OPTIMIZER
