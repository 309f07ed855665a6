"""lm_head + cross-entropy without the logits: `liger_fx::fused_linear_cross_entropy(h, weight, bias, target,
ignore_index, reduction, softcap, logit_scale, grad_input, grad_weight) -> (loss, dh, dw, db)`.

    loss = cross_entropy(transform((h @ weight.T + bias).float()), target)   (transform: see kernels/cross_entropy.py)

The (N, V) logits never exist. Rows are processed in chunks of C rows; per chunk:
    1. logits_c = h_c @ W^T (+ b)           cuBLAS, into one reused (C, V) buffer in h's dtype
    2. one Triton launch (`ce_rows`): per-row fp32 online max/LSE, the loss, and the logits' gradient written in
       place into the same buffer (ignored rows 0; already divided by the count for "mean")
    3. dh_c = dlogits_c @ W;  dW += dlogits_c^T @ h_c;  db += sum(dlogits_c)
Gradients are computed in the forward: 3 matmuls, 6*N*H*V FLOP, the floor. Recomputing in the backward instead would
add the logits matmul again (8*N*H*V, +33%) to save nothing: dh and dW have the size of the gradients the backward
must return anyway. The backward only multiplies the saved dh, dW, db by grad_output, into new tensors. Under
torch.compile that costs no memory: AOTAutograd donates saved tensors to the backward and Inductor writes the product
into the saved buffers (seen in its output code: `buf1 = getitem_2; del getitem_2  # reuse`). Called eagerly, the
backward briefly holds a second dW (0.98 GiB at the shape below).

Memory at N=16384, H=4096, V=128256 in bf16 (extra over h, W, target): dW 0.98 GiB + dh 0.125 GiB (the gradients
themselves) + the (C, V) chunk buffer (0.49 GiB at C=2048) + 64 KiB of per-row losses.
dW is accumulated in W's dtype with one cuBLAS addmm_ per chunk: an fp32 accumulator would be 1.96 GiB, twice the
whole budget. In bf16, cuBLAS rounds each chunk's product to bf16 and then the sum (measured on the H200: a product
of 1.29149e-4 entered the sum as 1.2875e-4). With N/C = 8 chunks that is up to 15 roundings of the running
sum, ~2-3x the error of torch's single matmul; the tests check it against the fp32 reference.

When no input needs a gradient (`grad_input` and `grad_weight` False) only step 1 and the loss run: 2*N*H*V FLOP; a
frozen lm_head (PEFT) skips the dW matmul. `liger_fx::linear_cross_entropy` (what the graph rewrite inserts and the
public functional calls) sets the flags from requires_grad and grad mode.
"""

from __future__ import annotations

from typing import Optional

import torch

from .cross_entropy import (REDUCTIONS, _count, _ref_lse, _reduce, ce_grad_rows, ce_rows, cross_entropy_fwd,
                            cross_entropy_ref, cross_entropy_ref_backward, grad_scale_of)

# Bytes of the (C, V) logits chunk buffer. C = CHUNK_BYTES / (V * itemsize), rounded down to a multiple of 128 rows
# (a GEMM tile): 2048 rows at V=128256 bf16. Measured on an H200 (bench/lab/flce_breakdown.py, N=16384 H=4096 V=128256;
# the three full-size matmuls take 75.5 ms there, 684 TFLOP/s, the floor no chunking beats):
#     C=1024 82.3 ms, 1.35 GiB extra | C=2048 80.2 ms, 1.59 GiB | C=3072 79.6 ms, 1.84 GiB | C=4096 79.9 ms, 2.08 GiB
# (extra includes dh and dW, 1.10 GiB). Smaller chunks lose to the dW update, which reads and writes all of dW per
# chunk (1.78 ms per 1024-row chunk against 1.68 for a plain mm), and to the CE kernel's per-launch tail; past 2048
# rows each further 0.25 GiB buys under 0.6 ms (0.25% of a Llama-1B step) while it sits on the step's peak.
CHUNK_BYTES = 512 << 20



def chunk_rows(N: int, V: int, itemsize: int) -> int:
    rows = max(128, (CHUNK_BYTES // (V * itemsize)) // 128 * 128)
    return max(1, min(N, rows))


# --------------------------------------------------------------------------------------------------------------
# Launcher (any device Triton runs on, the CPU interpreter included; the matmuls are torch ops)


def fused_linear_cross_entropy_fwd(
    h, weight, bias, target, ignore_index: int = -100, reduction: str = "mean", softcap: float = 0.0,
    logit_scale: float = 1.0, grad_input: bool = True, grad_weight: bool = True,
    chunk: int | None = None, block_v: int | None = None,
):
    """h (N, H), weight (V, H), bias (V,) or None, target (N,) -> (loss fp32 0-d, dh, dw, db).

    dh is (N, H) if grad_input, dw (V, H) and db (V,) (with a bias) if grad_weight; otherwise empty (0,) tensors."""
    N, H = h.shape
    V = weight.shape[0]
    h = h if h.stride(-1) == 1 else h.contiguous()
    target = target.contiguous()
    count = _count(target, ignore_index)
    losses = torch.empty(N, dtype=torch.float32, device=h.device)
    lse = torch.empty(N, dtype=torch.float32, device=h.device)  # written by the kernel, not needed after
    want_db = grad_weight and bias is not None
    dh = torch.empty_like(h) if grad_input else h.new_empty(0)
    dw = torch.empty_like(weight, memory_format=torch.contiguous_format) if grad_weight else h.new_empty(0)
    db = torch.zeros(V, dtype=torch.float32, device=h.device) if want_db else None
    grad_scale = None
    if grad_input or grad_weight:
        one = torch.ones(1, dtype=torch.float32, device=h.device)
        grad_scale = one / count if reduction == "mean" else one

    C = chunk or chunk_rows(N, V, h.element_size())
    buf = torch.empty((min(C, N), V), dtype=torch.result_type(h, weight), device=h.device)
    _chunks(h, weight, bias, target, losses, lse, dh, dw, db, grad_scale, buf, C, ignore_index, softcap, logit_scale,
            grad_input, grad_weight, want_db, block_v)
    if grad_weight and N == 0:
        dw.zero_()
    db = db.to(bias.dtype) if want_db else h.new_empty(0)
    return _reduce(losses, count, reduction), dh, dw, db


def _chunks(h, weight, bias, target, losses, lse, dh, dw, db, grad_scale, buf, C, ignore_index, softcap, logit_scale,
            grad_input, grad_weight, want_db, block_v):
    N = h.shape[0]
    for i, start in enumerate(range(0, N, C)):
        end = min(start + C, N)
        h_c = h[start:end]
        logits = _logits_into(buf, h_c, weight, bias)
        dlogits = logits if grad_scale is not None else None
        ce_rows(logits, target[start:end], losses[start:end], lse[start:end], ignore_index, softcap, logit_scale,
                dx=dlogits, grad_scale=grad_scale, block_v=block_v)
        _chunk_grads(i, dlogits, h_c, weight, dh[start:end] if grad_input else None, dw if grad_weight else None,
                     db if want_db else None)


def _logits_into(buf, h_c, weight, bias):
    """One chunk's logits h_c @ W^T (+ b), written into the first rows of the chunk buffer."""
    logits = buf[: h_c.shape[0]]
    if bias is not None:
        torch.addmm(bias, h_c, weight.t(), out=logits)
    else:
        torch.mm(h_c, weight.t(), out=logits)
    return logits


def _chunk_grads(i, dlogits, h_c, weight, dh_c, dw, db) -> None:
    """One chunk's share of the linear's gradients: dh_c = dlogits @ W; dW (+)= dlogits^T @ h_c (written by the first
    chunk, accumulated by the rest); db += column sums. None: not wanted."""
    if dh_c is not None:
        torch.mm(dlogits, weight, out=dh_c)
    if dw is not None:
        if i == 0:
            torch.mm(dlogits.t(), h_c, out=dw)
        else:
            dw.addmm_(dlogits.t(), h_c)
    if db is not None:
        db += dlogits.sum(0, dtype=torch.float32)


# --------------------------------------------------------------------------------------------------------------
# Reference: the single source of truth for tests, benchmarks and the CPU implementation


def fused_linear_cross_entropy_ref(h, weight, bias, target, ignore_index: int = -100, reduction: str = "mean",
                                   softcap: float = 0.0, logit_scale: float = 1.0) -> torch.Tensor:
    """What HF computes: logits in h's dtype, upcast, softcap, scale, cross-entropy. Materializes the logits."""
    logits = torch.nn.functional.linear(h, weight, bias)
    return cross_entropy_ref(logits, target, ignore_index, reduction, softcap, logit_scale)


def fused_linear_cross_entropy_ref_with_grads(h, weight, bias, target, ignore_index: int = -100,
                                              reduction: str = "mean", softcap: float = 0.0, logit_scale: float = 1.0,
                                              grad_input: bool = True, grad_weight: bool = True):
    """(loss, dh, dw, db) as eager autograd computes them (dlogits rounded to the logits' dtype, then the linear's
    backward), written out because the CPU implementation runs below the autograd key. Not computed: empty (0,)."""
    logits = torch.nn.functional.linear(h, weight, bias)
    loss = cross_entropy_ref(logits, target, ignore_index, reduction, softcap, logit_scale)
    one = torch.ones((), dtype=torch.float32, device=h.device)
    dl = cross_entropy_ref_backward(one, logits, target, ignore_index, reduction, softcap, logit_scale)
    # Outputs of a custom op must not alias each other: a fresh empty tensor for each one not computed.
    dh = dl @ weight if grad_input else h.new_empty(0)
    dw = dl.t() @ h if grad_weight else h.new_empty(0)
    db = dl.sum(0) if grad_weight and bias is not None else h.new_empty(0)
    return loss, dh, dw, db


# --------------------------------------------------------------------------------------------------------------
# The library op


@torch.library.custom_op("liger_fx::fused_linear_cross_entropy", mutates_args=())
def _flce(
    h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], target: torch.Tensor, ignore_index: int,
    reduction: str, softcap: float, logit_scale: float, grad_input: bool, grad_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (h, weight, bias, target, ignore_index, reduction, softcap, logit_scale, grad_input, grad_weight)
    if h.device.type == "cuda":
        return fused_linear_cross_entropy_fwd(*args)
    return fused_linear_cross_entropy_ref_with_grads(*args)


@_flce.register_fake
def _(h, weight, bias, target, ignore_index, reduction, softcap, logit_scale, grad_input, grad_weight):
    return (
        h.new_empty((), dtype=torch.float32),
        torch.empty_like(h, memory_format=torch.contiguous_format) if grad_input else h.new_empty(0),
        torch.empty_like(weight, memory_format=torch.contiguous_format) if grad_weight else h.new_empty(0),
        torch.empty_like(bias) if grad_weight and bias is not None else h.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    _, dh, dw, db = output
    ctx.save_for_backward(dh, dw, db)
    ctx.mark_non_differentiable(dh, dw, db)
    ctx.set_materialize_grads(False)  # the gradient outputs are never differentiated: no zeros of their size
    ctx.computed = inputs[8:10]


def _backward(ctx, grad, *_unused):
    dh, dw, db = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    grad_input, grad_weight = ctx.computed
    if (need_h and not grad_input) or ((need_w or need_b) and not grad_weight):
        raise RuntimeError(
            "liger_fx::fused_linear_cross_entropy was called with grad_input/grad_weight off for an input that "
            "requires grad; pass the flags that match requires_grad (the functional wrapper does)"
        )
    if grad is None:
        return (None,) * 10
    # New tensors, never a write into the saved ones: this runs once per saved graph, but retain_graph may run it again.
    return (
        dh * grad if need_h else None,
        dw * grad if need_w else None,
        db * grad if need_b else None,
        *(None,) * 7,
    )


_flce.register_autograd(_backward, setup_context=_setup_context)


# `liger_fx::linear_cross_entropy`: what the graph rewrite inserts. CompositeImplicitAutograd, so it decomposes where
# autograd is visible (eager, and AOTAutograd's trace of the rewritten graph) and picks the gradient flags from
# requires_grad and grad mode there. The pre-dispatch graph the patterns see has no requires_grad on its fake values,
# so the flags cannot be decided at rewrite time; a plain Python function as the node target would work too but
# makes AOTAutograd's cache bypass the graph.
_lib = torch.library.Library("liger_fx", "FRAGMENT")
_lib.define(
    "linear_cross_entropy(Tensor h, Tensor weight, Tensor? bias, Tensor target, int ignore_index, str reduction, "
    "float softcap, float logit_scale) -> Tensor"
)


def _linear_cross_entropy(h, weight, bias, target, ignore_index, reduction, softcap, logit_scale):
    if reduction not in REDUCTIONS:
        raise ValueError(f"liger_fx.fused_linear_cross_entropy: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if softcap < 0:
        raise ValueError(f"liger_fx.fused_linear_cross_entropy: softcap must be >= 0 (0 = none), got {softcap}")
    grad_on = torch.is_grad_enabled()
    grad_input = grad_on and h.requires_grad
    grad_weight = grad_on and (weight.requires_grad or (bias is not None and bias.requires_grad))
    h, weight, bias = _autocast(h, weight, bias)
    return torch.ops.liger_fx.fused_linear_cross_entropy(
        h.reshape(-1, h.shape[-1]), weight, bias, target.reshape(-1), ignore_index, reduction, softcap,
        logit_scale, grad_input, grad_weight,
    )[0]


def _autocast(h, weight, bias):
    """Cast as autocast casts a linear. Mixed precision (e.g. HF Trainer bf16=True: fp32 weights under autocast) runs
    the lm_head linear in autocast's lower dtype, and the opaque ops get no autocast kernel. Without this the three
    matmuls ran in fp32 (~10x slower on an H200)."""
    device = h.device.type
    if torch.is_autocast_enabled(device) and h.is_floating_point():
        low = torch.get_autocast_dtype(device)
        h, weight = h.to(low), weight.to(low)
        bias = bias.to(low) if bias is not None else None
    return h, weight, bias


_lib.impl("linear_cross_entropy", _linear_cross_entropy, "CompositeImplicitAutograd")


def fused_linear_cross_entropy(h, weight, target, bias=None, ignore_index: int = -100, reduction: str = "mean",
                               softcap: float = 0.0, logit_scale: float = 1.0) -> torch.Tensor:
    """cross_entropy(transform(linear(h, weight, bias).float()), target) without materializing the logits.

    h (..., H) is flattened to (N, H) and target to (N,). Returns the fp32 loss; gradients are computed only for the
    inputs that require grad (under grad mode). reduction="none" gives the per-token losses (target's shape, 0 where
    ignored) from `kernels/fused_linear_logprobs.py`, whose backward takes a gradient per token."""
    if reduction == "none":
        from .fused_linear_logprobs import fused_linear_cross_entropy_none

        return fused_linear_cross_entropy_none(h, weight, target, bias, ignore_index, softcap, logit_scale)
    return torch.ops.liger_fx.linear_cross_entropy(
        h, weight, bias, target, int(ignore_index), reduction, float(softcap), float(logit_scale)
    )


# --------------------------------------------------------------------------------------------------------------
# When the logits are also returned: `liger_fx::linear_cross_entropy_logits(h, weight, bias, target, ...)
# -> (logits, loss, lse)`
#
# `model(input_ids, labels=labels)` returns the logits beside the loss, so the (N, V) logits must exist. Fusing the loss
# without the linear then costs more than it saves: the op above recomputes the logits chunk by chunk (a second lm_head
# matmul beside the returned one), and in training AOTAutograd hands the returned logits a zeros gradient, which the
# linear's own backward runs through two more matmuls: ~26 ms per Llama-3.2-1B step at B8 T2048 on the H200.
# This op owns both the linear and the loss, so both gradients reach one backward:
#     forward   logits = h @ W^T (+ b)    one matmul, the logits the caller gets
#               loss, lse                  one pass over the logits (the CE row kernel, fp32, 4 bytes a row saved)
#     backward  per chunk of C rows: dlogits_c = dCE/dlogits_c * grad_loss + grad_logits_c    one pass, fp32, rounded
#               once; dh_c = dlogits_c @ W; dW += dlogits_c^T @ h_c; db += sum(dlogits_c)
# Three lm_head matmuls in all, as an unfused model. A gradient of the returned logits is read once in that pass and
# adds no matmul. Memory beyond the logits themselves: one (C, V) chunk buffer; computing dlogits in the forward
# instead would hold a second N x V buffer from the forward into the backward (3.9 GiB at B8 T2048, V 128256, bf16),
# which the (C, V) chunk avoids. Under torch.compile the backend passes `logits_grad=False` where the logits are only
# returned (patterns/linear_cross_entropy.detach_returned_logits): autograd then makes no zeros gradient of N x V for
# them (3.9 GiB more at the step's peak before), and `reattach_logits_grad` (end of this file) gives the returned
# logits the lm_head's gradient outside the graph, for a caller that differentiates them.


def linear_cross_entropy_logits_fwd(h, weight, bias, target, ignore_index: int = -100, reduction: str = "mean",
                                    softcap: float = 0.0, logit_scale: float = 1.0):
    """h (N, H) -> (logits (N, V) in h's dtype, loss fp32 0-d, lse fp32 (N,))."""
    logits = torch.nn.functional.linear(h, weight, bias)
    loss, lse = cross_entropy_fwd(logits, target, ignore_index, reduction, softcap, logit_scale)
    return logits, loss, lse


def linear_cross_entropy_logits_bwd(grad_logits, grad_loss, h, weight, bias, target, logits, lse,
                                    ignore_index: int = -100, reduction: str = "mean", softcap: float = 0.0,
                                    logit_scale: float = 1.0, need_h: bool = True, need_w: bool = True,
                                    chunk: int | None = None):
    """(dh, dw, db) from both incoming gradients; the ones not needed (or no bias) are empty (0,) tensors."""
    N, H = h.shape
    V = weight.shape[0]
    if need_w and h.stride(-1) != 1:
        h = h.contiguous()
    target = target.contiguous()
    if grad_loss is None:  # only the logits reach the loss of the caller: their gradient alone
        grad_loss = torch.zeros((), dtype=torch.float32, device=h.device)
    grad_scale = grad_scale_of(grad_loss, target, ignore_index, reduction)
    want_db = need_w and bias is not None
    dh = torch.empty((N, H), dtype=h.dtype, device=h.device) if need_h else h.new_empty(0)
    dw = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_w else h.new_empty(0)
    db = torch.zeros(V, dtype=torch.float32, device=h.device) if want_db else None
    if grad_logits is not None and grad_logits.stride(-1) != 1:
        grad_logits = grad_logits.contiguous()
    C = chunk or chunk_rows(N, V, logits.element_size())
    buf = torch.empty((min(C, N), V), dtype=logits.dtype, device=h.device)
    for i, start in enumerate(range(0, N, C)):
        end = min(start + C, N)
        dlogits, h_c = buf[: end - start], h[start:end]
        ce_grad_rows(logits[start:end], target[start:end], lse[start:end], grad_scale, dlogits, ignore_index,
                     softcap, logit_scale, add=grad_logits[start:end] if grad_logits is not None else None)
        _chunk_grads(i, dlogits, h_c, weight, dh[start:end] if need_h else None, dw if need_w else None,
                     db if want_db else None)
    if need_w and N == 0:
        dw.zero_()
    return dh, dw, db.to(bias.dtype) if want_db else h.new_empty(0)


def linear_cross_entropy_logits_ref_bwd(grad_logits, grad_loss, h, weight, bias, target, logits, lse,
                                        ignore_index: int = -100, reduction: str = "mean", softcap: float = 0.0,
                                        logit_scale: float = 1.0, need_h: bool = True, need_w: bool = True):
    """The backward's math in torch: dlogits in fp32 (both gradients), rounded once to the logits' dtype."""
    if grad_loss is None:
        grad_loss = torch.zeros((), dtype=torch.float32, device=h.device)
    dl = cross_entropy_ref_backward(grad_loss, logits.float(), target, ignore_index, reduction, softcap, logit_scale)
    if grad_logits is not None:
        dl = dl + grad_logits.float()
    dl = dl.to(logits.dtype)
    dh = dl @ weight if need_h else h.new_empty(0)
    dw = dl.t() @ h if need_w else h.new_empty(0)
    db = dl.sum(0) if need_w and bias is not None else h.new_empty(0)
    return dh, dw, db


@torch.library.custom_op("liger_fx::linear_cross_entropy_logits", mutates_args=())
def _lce_logits(
    h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], target: torch.Tensor, ignore_index: int,
    reduction: str, softcap: float, logit_scale: float, logits_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if h.device.type == "cuda":
        return linear_cross_entropy_logits_fwd(h, weight, bias, target, ignore_index, reduction, softcap, logit_scale)
    logits = torch.nn.functional.linear(h, weight, bias)
    loss = cross_entropy_ref(logits, target, ignore_index, reduction, softcap, logit_scale)
    return logits, loss, _ref_lse(logits, softcap, logit_scale)


@_lce_logits.register_fake
def _(h, weight, bias, target, ignore_index, reduction, softcap, logit_scale, logits_grad):
    N, V = h.shape[0], weight.shape[0]
    return (h.new_empty((N, V), dtype=torch.result_type(h, weight)), h.new_empty((), dtype=torch.float32),
            h.new_empty((N,), dtype=torch.float32))


@torch.library.custom_op("liger_fx::linear_cross_entropy_logits_backward", mutates_args=())
def _lce_logits_backward(
    grad_logits: Optional[torch.Tensor], grad_loss: Optional[torch.Tensor], h: torch.Tensor, weight: torch.Tensor,
    bias: Optional[torch.Tensor], target: torch.Tensor, logits: torch.Tensor, lse: torch.Tensor, ignore_index: int,
    reduction: str, softcap: float, logit_scale: float, need_h: bool, need_w: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (grad_logits, grad_loss, h, weight, bias, target, logits, lse, ignore_index, reduction, softcap,
            logit_scale, need_h, need_w)
    if h.device.type == "cuda":
        return linear_cross_entropy_logits_bwd(*args)
    return linear_cross_entropy_logits_ref_bwd(*args)


@_lce_logits_backward.register_fake
def _(grad_logits, grad_loss, h, weight, bias, target, logits, lse, ignore_index, reduction, softcap, logit_scale,
      need_h, need_w):
    return (
        torch.empty_like(h, memory_format=torch.contiguous_format) if need_h else h.new_empty(0),
        torch.empty_like(weight, memory_format=torch.contiguous_format) if need_w else h.new_empty(0),
        torch.empty_like(bias) if need_w and bias is not None else h.new_empty(0),
    )


def _lce_setup_context(ctx, inputs, output):
    h, weight, bias, target, *args, logits_grad = inputs
    logits, _, lse = output
    # h only feeds dW (and db needs nothing of it): a frozen lm_head (PEFT) keeps no (N, H) activation alive for it.
    learns = weight.requires_grad or (bias is not None and bias.requires_grad)
    ctx.save_for_backward(h if learns else None, weight, bias, target, logits, lse)
    ctx.h_meta = (h.shape, h.dtype)
    # logits_grad False: the logits leave the graph without a gradient path through this op, and the compiled
    # graph's caller attaches their gradient outside it (`reattach_logits_grad`): no zeros tangent of N x V.
    ctx.mark_non_differentiable(lse, *(() if logits_grad else (logits,)))
    ctx.set_materialize_grads(False)  # an unused loss or logits gradient stays None: nothing of N x V is made up
    ctx.args = tuple(args)


def _lce_backward(ctx, grad_logits, grad_loss, _grad_lse):
    h, weight, bias, target, logits, lse = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    if grad_logits is None and grad_loss is None or not (need_h or need_w or need_b):
        return (None,) * 9
    if h is None:  # frozen lm_head: the backward needs only h's shape (for dh) and never reads it
        shape, dtype = ctx.h_meta
        h = torch.empty_strided(shape, (0,) * len(shape), dtype=dtype, device=weight.device)
    dh, dw, db = torch.ops.liger_fx.linear_cross_entropy_logits_backward(
        grad_logits, grad_loss, h, weight, bias, target, logits, lse, *ctx.args, need_h, need_w or need_b)
    return dh if need_h else None, dw if need_w else None, db if need_b else None, *(None,) * 6


_lce_logits.register_autograd(_lce_backward, setup_context=_lce_setup_context)

# `liger_fx::lm_head_cross_entropy`: what the rewrite inserts where the logits are also used (returned). Composite,
# like `linear_cross_entropy`, for autocast; it also flattens h (..., H) and restores the logits' (..., V) shape.
_lib.define(
    "lm_head_cross_entropy(Tensor h, Tensor weight, Tensor? bias, Tensor target, int ignore_index, str reduction, "
    "float softcap, float logit_scale, bool logits_grad=True) -> (Tensor, Tensor)"
)


def _lm_head_cross_entropy(h, weight, bias, target, ignore_index, reduction, softcap, logit_scale,
                           logits_grad=True):
    if reduction not in REDUCTIONS:
        raise ValueError(f"liger_fx.lm_head_cross_entropy: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    lead = h.shape[:-1]
    h, weight, bias = _autocast(h, weight, bias)
    logits, loss, _ = torch.ops.liger_fx.linear_cross_entropy_logits(
        h.reshape(-1, h.shape[-1]), weight, bias, target.reshape(-1), ignore_index, reduction, softcap,
        logit_scale, logits_grad)
    return logits.view(*lead, logits.shape[-1]), loss


_lib.impl("lm_head_cross_entropy", _lm_head_cross_entropy, "CompositeImplicitAutograd")


def lm_head_cross_entropy(h, weight, target, bias=None, ignore_index: int = -100, reduction: str = "mean",
                          softcap: float = 0.0, logit_scale: float = 1.0):
    """(linear(h, weight, bias), cross_entropy(transform(logits.float()), target)) with three lm_head matmuls in all
    and the loss's gradient fused with the logits' own. h (..., H); target of h's leading size."""
    return torch.ops.liger_fx.lm_head_cross_entropy(
        h, weight, bias, target, int(ignore_index), reduction, float(softcap), float(logit_scale))


class _LogitsGrad(torch.autograd.Function):
    """Identity on returned logits whose backward is the lm_head's: dh = g @ W, dW = g^T @ h, db = sum(g). Applied
    by the compiled graph's caller to logits that left the graph without a gradient (`logits_grad=False`), so that
    differentiating them still reaches h and W; its backward runs only when something does. An undefined incoming
    gradient stays undefined (no zeros are made)."""

    @staticmethod
    def forward(ctx, logits, h, weight, bias):
        ctx.save_for_backward(h, weight)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.set_materialize_grads(False)
        return logits.view_as(logits)

    @staticmethod
    def backward(ctx, g):
        if g is None:
            return None, None, None, None
        h, weight = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        need_h, need_w, need_b = ctx.needs_input_grad[1:4]
        dh = (g2 @ weight.to(g2.dtype)).view(*h.shape[:-1], -1).to(h.dtype) if need_h else None
        dw = (g2.t() @ h.reshape(-1, h.shape[-1]).to(g2.dtype)).to(weight.dtype) if need_w else None
        db = g2.sum(0).to(ctx.bias_dtype) if need_b else None
        return None, dh, dw, db


def reattach_logits_grad(logits, h, weight, bias=None):
    """`logits` (a row-major view of `h @ weight^T + bias`, computed without a gradient path) with the lm_head's
    gradient attached; as is where nothing requires grad or grad mode is off."""
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in (h, weight, bias)):
        return logits
    return _LogitsGrad.apply(logits, h, weight, bias)
