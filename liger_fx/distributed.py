"""What distributed training changes in the graphs the backend receives, and how the record accounts for it.

DDP. Dynamo's DDPOptimizer (`torch._dynamo.config.optimize_ddp`, on by default) splits the captured graph where
DDP's gradient buckets end, so that each bucket's all-reduce can start while the backward of the earlier buckets
still runs, and calls the backend once per bucket. Each bucket arrives as an ordinary GraphModule with FakeTensor
inputs in Dynamo's fake mode and the node metadata (module paths) of the original graph, so `to_aten` and the
patterns work unchanged; a model whose parameters fit one bucket (25 MB by default) is not split at all.

What the split costs: a fusion whose ops straddle a boundary cannot match, since neither bucket holds all of it.
The boundary lands after whichever op fills the bucket, i.e. after a large projection. At Llama-3.2-1B proportions
(bf16, 25 MB buckets; simulated with every width divided by 16 and the bucket by 256) every decoder layer's MLP is cut
between `silu(gate)` and `* up`: the SwiGLU of every layer is lost, while RMSNorm, RoPE and lm_head + loss stayed
whole. We keep DDPOptimizer's default (we cannot change it from inside a backend call, and the user chose DDP's
overlap) and make the loss visible: a near miss in a bucket whose module's values leave the bucket gets the reason
below, and the first one logs a warning naming the setting that compiles one graph. With
`torch._dynamo.config.optimize_ddp = False` the backend receives the whole graph and every pattern can match; the
all-reduce then starts only after the whole backward (what that costs was not measured: no multi-GPU machine yet).

FSDP2. `fully_shard` hooks run under `torch._dynamo.disable`, so Dynamo breaks the graph at each wrapped module: one
graph per decoder layer, then the final norm, then lm_head + loss. Inside them every parameter is the all-gathered
plain tensor (a full-shape FakeTensor placeholder, never a DTensor), lm_head's included. Nothing to do here; the tests
check it (tests/test_distributed.py).
"""

from __future__ import annotations

import logging

import torch.fx as fx

from .canonicalize import where
from .rewrite import GraphRecord

log = logging.getLogger("liger_fx")

CUT_REASON = (
    "this graph is one DDPOptimizer bucket and values of this module leave it at the bucket boundary: a pattern cut "
    "there cannot match (torch._dynamo.config.optimize_ddp = False compiles one graph)"
)

_warned = False


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
