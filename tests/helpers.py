"""Shared helpers for pipeline tests: one eager and one compiled training step on identical copies of a model."""

from __future__ import annotations

import contextlib
import copy

import torch
from torch._dynamo.utils import counters



def batch(vocab: int, b: int = 2, t: int = 16, seed: int = 1, ignore: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    labels = ids.clone()
    if ignore:
        labels[:, :ignore] = -100
    return ids, labels


def train_step(model, ids, labels, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels, **kwargs)
    out.loss.backward()
    module = getattr(model, "_orig_mod", model)  # a compiled module prefixes parameter names with _orig_mod
    grads = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads


def compare_training(model, ids, labels, options=None, atol=1e-5, rtol=1e-4, dynamic=None, **kwargs):
    """Train one step eager and one under backend="liger" (torch.compile's `dynamic`) on a deep copy; assert loss and
    every grad match. fp32 tolerances: Inductor reorders reductions, which moves fp32 results by ~1e-7 relative;
    1e-4/1e-5 is tight against any real error (a wrong eps or cast moves results by 1e-3 or more)."""
    compiled = copy.deepcopy(model)
    ref_loss, ref_grads = train_step(model, ids, labels, **kwargs)
    fn = torch.compile(compiled, backend="liger", options=options, dynamic=dynamic)
    loss, grads = train_step(fn, ids, labels, **kwargs)
    torch.testing.assert_close(loss, ref_loss, atol=atol, rtol=rtol)
    assert set(grads) == set(ref_grads), set(grads) ^ set(ref_grads)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
    return fn


def replaced(flag: str) -> int:
    return counters["liger_fx"][flag]


def moe_traces_whole(dtype: torch.dtype) -> bool:
    """Whether transformers' Mixtral experts compile as one graph on the CPU in `dtype`. transformers 5.17 (our
    floor) routes them under torch.compile to its `grouped_mm_fallback` op for every dtype but bf16, and that op's
    backward calls `offs.tolist()`: a data-dependent graph break, for plain Inductor as for us, which leaves part
    of each MoE block outside our graphs. Newer releases give the backward an op of its own (traced whole). On the
    H200 (bf16, torch._grouped_mm) every site fuses with 5.17: bench/RESULTS.md, convergence."""
    import transformers.integrations.moe as moe

    return dtype == torch.bfloat16 or hasattr(moe, "_grouped_mm_fallback_backward_fake")


MOE_SPLIT_BY_TRANSFORMERS = (
    "transformers' fp32/fp16 MoE fallback backward calls .tolist() under compile in this release (5.17): "
    "a graph break for plain Inductor too (tests/helpers.py: moe_traces_whole)"
)



class AotGraphs:
    """The forward and backward graphs AOTAutograd hands to Inductor for every graph the liger backend compiles
    (`capture_aot_graphs`), to check what a compiled step holds."""

    def __init__(self):
        self.graphs: list = []  # (kind, GraphModule), kind "forward" or "backward"

    def largest(self, dim: int | None = None) -> tuple[int, str]:
        """(elements, where) of the largest tensor any node of any graph holds (symbolic sizes at their hint); with
        `dim`, of the largest that has a dim of that size."""
        best = (0, "")
        for kind, gm in self.graphs:
            for node in gm.graph.nodes:
                vals = node.meta.get("val")
                for v in vals if isinstance(vals, (list, tuple)) else (vals,):
                    if isinstance(v, torch.Tensor) and (dim is None or dim in [_hint(d) for d in v.shape]):
                        n = _hint(v.numel())
                        if n > best[0]:
                            best = (n, f"{kind} {node.name} {node.target} {tuple(v.shape)}")
        return best

    def assert_none_of(self, numel: int, dim: int | None = None) -> None:
        """No tensor of `numel` (e.g. N x V logits) or more elements in any captured forward or backward graph; with
        `dim` (e.g. V), only tensors with a dim of that size count: logits, probabilities, their gradients, any
        transpose, but not a tiny model's own weights and attention scores, which may exceed a tiny N x V."""
        assert {k for k, _ in self.graphs} >= {"forward"}, "no graph captured"
        n, where = self.largest(dim)
        assert n < numel, f"a tensor of {n} >= {numel} elements exists: {where}"


def _hint(n) -> int:
    if isinstance(n, torch.SymInt):
        return int(n.node.hint)
    return int(n)


@contextlib.contextmanager
def capture_aot_graphs():
    """Capture AOTAutograd's partitioned forward and backward graphs of every liger compile in the block. The
    autograd cache is off inside (a hit would skip the inner compiler, so nothing would be seen)."""
    import liger_fx.backend
    from torch._inductor.compile_fx import compile_fx_inner

    seen = AotGraphs()
    real = liger_fx.backend.compile_fx

    def inner(gm, example_inputs, **kwargs):
        seen.graphs.append(("backward" if kwargs.get("is_backward") else "forward", gm))
        return compile_fx_inner(gm, example_inputs, **kwargs)

    liger_fx.backend.compile_fx = lambda gm, ex, **kw: real(gm, ex, inner_compile=inner, **kw)
    try:
        with torch._functorch.config.patch(enable_autograd_cache=False):
            yield seen
    finally:
        liger_fx.backend.compile_fx = real
