"""lm_head + per-token statistics without the logits: `liger_fx::fused_linear_logprobs(h, weight, bias, target,
ignore_index, softcap, logit_scale, entropy) -> (z_t, lse, ent)`, one value of each per row.

    z   = transform((h @ weight.T + b).float())       (transform: softcap, then logit_scale; kernels/cross_entropy.py;
                                                       a temperature tau is logit_scale = 1 / tau)
    z_t = z[t]                   the target's logit (gathered; no target: not computed)
    lse = logsumexp(z)
    ent = lse - sum_j p_j z_j    the entropy of p = softmax(z) (only with `entropy`)

Every per-token quantity of post-training is one of these: a token log-prob is z_t - lse (GRPO/PPO/DPO), a
per-token cross-entropy lse - z_t (`reduction="none"`), the entropy ent. A row whose target is `ignore_index` gets
0 for all three and no gradient, and is never read at its target (-100 would index out of range).

The (N, V) logits never exist. Rows run in chunks of C (the (C, V) buffer of kernels/fused_linear_cross_entropy.py):
    forward    logits_c = h_c @ W^T (+ b) into the buffer; one launch: per-row fp32 online max / sum-exp (and
               sum exp(z - m) * z for the entropy), the gathered z_t. Saves 4-8 bytes a row (lse, ent).
    backward   logits_c again; one launch writes, in place of the logits,
                   dz_ij = p_ij * (g_lse_i + g_ent_i * (S_i - z_ij)) + g_zt_i * [j == t_i],   S_i = lse_i - ent_i
               (dent/dz_j = p_j (S - z_j)), times dz/dx; then dh_c = dx_c @ W, dW += dx_c^T @ h_c, db += sum(dx_c).
Why the backward recomputes the logits (4 lm_head matmuls in training, 8*N*H*V FLOP, against the reduced linear +
cross-entropy op's 3): that op's loss is one scalar, so its forward can form the whole gradient and the backward only
scales it by grad_output. Here each row has its own upstream gradients (g_zt_i, g_lse_i, g_ent_i: the advantage,
the mask, the clipped ratio of that token), unknown until the backward; dW = sum_i dz_i^T h_i cannot take them out
of the sum, and keeping the (N, V) dz of each output for later is the tensor this op exists to avoid.
The matmuls not needed are skipped: a frozen lm_head (PEFT, or a reference model's) runs no dW matmul, an h that
needs no gradient no dh matmul, and a call under no_grad (a frozen reference model's log-probs) only the forward:
one matmul, nothing saved.

Memory at N=32768 (8 x 4096), H=1536, V=151936 in bf16, training: the (C, V) chunk buffer (0.5 GiB), dW (0.43 GiB)
and dh (0.09 GiB), 8 bytes a row; the logits alone would be 9.3 GiB in bf16 and their fp32 log-softmax 18.6 GiB.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .cross_entropy import _block_v, _num_warps, _transform, _transform_and_grad, transform_ref
from .fused_linear_cross_entropy import _autocast, _chunk_grads, _logits_into, chunk_rows

NO_IGNORE = -(2**31)
"""ignore_index for spellings without one (a gather of log-probs): no int64 token id equals it, so no row is
skipped; a negative id other than ignore_index gives NaN, loudly, as torch's gather raises."""


# --------------------------------------------------------------------------------------------------------------
# Triton kernels


@triton.jit
def _fused_linear_logprobs_fwd_kernel(
    X, TARGET, ZT, LSE, ENT, TOP1, ZMEAN, LSQ, stride_x, V, ignore_index, softcap, scale,
    HAS_TARGET: tl.constexpr, HAS_SOFTCAP: tl.constexpr, ENTROPY: tl.constexpr, METRICS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Per row of X (logits in the matmul's dtype): lse, and z_t (HAS_TARGET) and the entropy (ENTROPY), fp32; with
    METRICS (needs a target) whether the target is the first argmax, the mean logit and log(sum p^2)."""
    softcap, scale = tl.cast(softcap, tl.float32), tl.cast(scale, tl.float32)  # fp64 from Inductor: see rms_norm.py
    row = tl.program_id(0).to(tl.int64)
    X += row * stride_x
    valid = True
    if HAS_TARGET:
        t = tl.load(TARGET + row).to(tl.int64)
        valid = t != ignore_index
    if valid:
        m = float("-inf")
        d = 0.0
        s = 0.0  # sum exp(z - m) * z: the entropy's expectation of z, rescaled with d
        m_before = float("-inf")  # METRICS: the max over the columns before the target (argmax takes the first)
        z_sum = 0.0
        sq = 0.0  # sum exp(2 (z - m)), rescaled with d's alpha squared
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < V
            b_x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
            b_zf = _transform(b_x, softcap, scale, HAS_SOFTCAP)  # finite past V too (x = 0 there)
            b_z = tl.where(mask, b_zf, float("-inf"))
            m_new = tl.maximum(m, tl.max(b_z, axis=0))
            alpha = tl.exp(m - m_new)
            b_e = tl.exp(b_z - m_new)  # 0 past V
            d = d * alpha + tl.sum(b_e, axis=0)
            if ENTROPY:
                s = s * alpha + tl.sum(b_e * b_zf, axis=0)
            if METRICS:
                m_before = tl.maximum(m_before, tl.max(tl.where(cols < t, b_z, float("-inf")), axis=0))
                z_sum += tl.sum(tl.where(mask, b_zf, 0.0), axis=0)
                sq = sq * alpha * alpha + tl.sum(b_e * b_e, axis=0)
            m = m_new
        lse = m + tl.log(d)
        tl.store(LSE + row, lse)
        if ENTROPY:
            tl.store(ENT + row, lse - s / d)
        if HAS_TARGET:
            # An out-of-range target (torch's gather raises) gives NaN: loud, and no out-of-bounds read.
            in_range = (t >= 0) & (t < V)
            x_t = tl.load(X + t, mask=in_range, other=0.0).to(tl.float32)
            z_t = tl.where(in_range, _transform(x_t, softcap, scale, HAS_SOFTCAP), float("nan"))
            tl.store(ZT + row, z_t)
            if METRICS:  # z_t and m are the same fp32 values of the same logit: equal at the argmax
                tl.store(TOP1 + row, (z_t >= m) & (z_t > m_before))
                tl.store(ZMEAN + row, z_sum / V)
                tl.store(LSQ + row, tl.log(sq) - 2.0 * tl.log(d))
    else:
        tl.store(LSE + row, 0.0)
        if ENTROPY:
            tl.store(ENT + row, 0.0)
        if HAS_TARGET:
            tl.store(ZT + row, 0.0)
            if METRICS:
                tl.store(TOP1 + row, tl.zeros((), dtype=tl.int1))
                tl.store(ZMEAN + row, 0.0)
                tl.store(LSQ + row, 0.0)


@triton.jit
def _fused_linear_logprobs_bwd_kernel(
    X, DX, TARGET, LSE, ENT, G_ZT, G_LSE, G_ENT, stride_x, stride_dx, V, ignore_index, softcap, scale,
    HAS_TARGET: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_G_ZT: tl.constexpr, HAS_G_LSE: tl.constexpr,
    HAS_G_ENT: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Per row: d(g_zt z_t + g_lse lse + g_ent ent) / dx into DX (DX may be X: each block is read before written),
    rounded once to DX's dtype. Ignored rows get zeros."""
    softcap, scale = tl.cast(softcap, tl.float32), tl.cast(scale, tl.float32)
    row = tl.program_id(0).to(tl.int64)
    X += row * stride_x
    DX += row * stride_dx
    valid = True
    t = -1
    if HAS_TARGET:
        t = tl.load(TARGET + row).to(tl.int64)
        valid = t != ignore_index
    if valid:
        lse = tl.load(LSE + row)
        g_lse = 0.0
        if HAS_G_LSE:
            g_lse = tl.load(G_LSE + row).to(tl.float32)
        g_zt = 0.0
        if HAS_G_ZT:
            g_zt = tl.load(G_ZT + row).to(tl.float32)
        g_ent = 0.0
        s = 0.0
        if HAS_G_ENT:
            g_ent = tl.load(G_ENT + row).to(tl.float32)
            s = lse - tl.load(ENT + row)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < V
            b_x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
            b_z, b_dz = _transform_and_grad(b_x, softcap, scale, HAS_SOFTCAP)
            b_p = tl.exp(b_z - lse)
            if HAS_G_ENT:
                b_g = b_p * (g_lse + g_ent * (s - b_z))
            else:
                b_g = b_p * g_lse
            if HAS_G_ZT:
                b_g += tl.where(cols == t, g_zt, 0.0)
            tl.store(DX + cols, (b_g * b_dz).to(DX.dtype.element_ty), mask=mask)
    else:
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            tl.store(DX + cols, tl.zeros((BLOCK_V,), dtype=tl.float32).to(DX.dtype.element_ty), mask=cols < V)


# --------------------------------------------------------------------------------------------------------------
# Launchers (any device Triton runs on, the CPU interpreter included; the matmuls are torch ops)


def _empty(h):
    return h.new_empty(0, dtype=torch.float32)


def fused_linear_logprobs_fwd(h, weight, bias, target, ignore_index: int = -100, softcap: float = 0.0,
                              logit_scale: float = 1.0, entropy: bool = False, chunk: int | None = None,
                              block_v: int | None = None, metrics: bool = False):
    """h (N, H), weight (V, H), bias (V,) or None, target (N,) or None -> (z_t, lse, ent), each fp32 (N,); z_t
    without a target and ent without `entropy` are empty (0,) tensors. With `metrics` (a target needed) three more,
    no gradient: whether the target is the (first) argmax (bool), the mean logit and log(sum_j p_j^2) (fp32)."""
    N = h.shape[0]
    V = weight.shape[0]
    h = h if h.stride(-1) == 1 else h.contiguous()
    has_target = target is not None
    if metrics and not has_target:
        raise ValueError("liger_fx.fused_linear_logprobs: metrics need a target")
    if has_target:
        target = target.contiguous()
    lse = torch.empty(N, dtype=torch.float32, device=h.device)
    zt = torch.empty(N, dtype=torch.float32, device=h.device) if has_target else _empty(h)
    ent = torch.empty(N, dtype=torch.float32, device=h.device) if entropy else _empty(h)
    extra = ()
    if metrics:
        extra = (torch.empty(N, dtype=torch.bool, device=h.device),
                 *(torch.empty(N, dtype=torch.float32, device=h.device) for _ in range(2)))
    if N == 0:
        return (zt, lse, ent) + extra
    C = chunk or chunk_rows(N, V, h.element_size())
    buf = torch.empty((min(C, N), V), dtype=torch.result_type(h, weight), device=h.device)
    bv = _block_v(V, block_v)
    for start in range(0, N, C):
        end = min(start + C, N)
        logits = _logits_into(buf, h[start:end], weight, bias)
        _fused_linear_logprobs_fwd_kernel[(end - start,)](
            logits, target[start:end] if has_target else lse, zt[start:end] if has_target else lse,
            lse[start:end], ent[start:end] if entropy else lse,
            *(e[start:end] for e in extra) if metrics else (lse, lse, lse), logits.stride(0), V, ignore_index,
            float(softcap), float(logit_scale), HAS_TARGET=has_target, HAS_SOFTCAP=softcap != 0.0, ENTROPY=entropy,
            METRICS=metrics, BLOCK_V=bv, num_warps=_num_warps(bv),
        )
    return (zt, lse, ent) + extra


def fused_linear_logprobs_bwd(g_zt, g_lse, g_ent, h, weight, bias, target, lse, ent, ignore_index: int = -100,
                              softcap: float = 0.0, logit_scale: float = 1.0, need_h: bool = True,
                              need_w: bool = True, chunk: int | None = None, block_v: int | None = None):
    """(dh, dw, db) of sum_i g_zt_i z_t_i + g_lse_i lse_i + g_ent_i ent_i (a None gradient counts as 0); the ones
    not needed (or no bias) are empty (0,) tensors. Recomputes each chunk's logits (see the module docstring)."""
    N, H = h.shape
    V = weight.shape[0]
    h = h if h.stride(-1) == 1 else h.contiguous()
    has_target = target is not None
    if has_target:
        target = target.contiguous()
    g_zt, g_lse, g_ent = (g.contiguous() if g is not None else None for g in (g_zt, g_lse, g_ent))
    if not has_target:
        g_zt = None  # no z_t was computed, so nothing can have flowed into it
    want_db = need_w and bias is not None
    dh = torch.empty((N, H), dtype=h.dtype, device=h.device) if need_h else h.new_empty(0)
    dw = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_w else h.new_empty(0)
    db = torch.zeros(V, dtype=torch.float32, device=h.device) if want_db else None
    if need_w and N == 0:
        dw.zero_()
    if N > 0 and (need_h or need_w):
        C = chunk or chunk_rows(N, V, h.element_size())
        buf = torch.empty((min(C, N), V), dtype=torch.result_type(h, weight), device=h.device)
        bv = _block_v(V, block_v)
        for i, start in enumerate(range(0, N, C)):
            end = min(start + C, N)
            h_c = h[start:end]
            logits = _logits_into(buf, h_c, weight, bias)
            _fused_linear_logprobs_bwd_kernel[(end - start,)](
                logits, logits, target[start:end] if has_target else lse, lse[start:end],
                ent[start:end] if g_ent is not None else lse, *(g[start:end] if g is not None else lse
                                                                 for g in (g_zt, g_lse, g_ent)),
                logits.stride(0), logits.stride(0), V, ignore_index, float(softcap), float(logit_scale),
                HAS_TARGET=has_target, HAS_SOFTCAP=softcap != 0.0, HAS_G_ZT=g_zt is not None,
                HAS_G_LSE=g_lse is not None, HAS_G_ENT=g_ent is not None, BLOCK_V=bv, num_warps=_num_warps(bv),
            )
            _chunk_grads(i, logits, h_c, weight, dh[start:end] if need_h else None, dw if need_w else None,
                         db if want_db else None)
    return dh, dw, db.to(bias.dtype) if want_db else h.new_empty(0)


# --------------------------------------------------------------------------------------------------------------
# Reference: the single source of truth for tests, benchmarks and the CPU implementation


def _upcast(t):
    """fp32 for bf16/fp16/fp32 logits (what the kernels compute in), fp64 kept (the tests' exact reference)."""
    return torch.promote_types(t.dtype, torch.float32)


def _valid_rows(target, ignore_index, N, device):
    return target != ignore_index if target is not None else torch.ones(N, dtype=torch.bool, device=device)


def fused_linear_logprobs_ref(h, weight, bias, target, ignore_index: int = -100, softcap: float = 0.0,
                              logit_scale: float = 1.0, entropy: bool = False, metrics: bool = False):
    """(z_t, lse, ent) as eager torch computes them from materialized logits (in h's dtype, upcast); differentiable.
    Not computed: empty (0,) tensors. With `metrics`, also (is the target the first argmax, the mean logit,
    log(sum p^2)), 0 in ignored rows."""
    logits = torch.nn.functional.linear(h, weight, bias)
    z = transform_ref(logits.to(_upcast(logits)), softcap, logit_scale)
    valid = _valid_rows(target, ignore_index, z.shape[0], z.device)
    lse = torch.where(valid, torch.logsumexp(z, -1), 0.0)
    zt = _empty(h)
    if target is not None:
        zt = z.gather(-1, torch.where(valid, target, 0)[:, None]).squeeze(-1)
        zt = torch.where(valid, zt, 0.0)
    ent = _empty(h)
    if entropy:
        ent = torch.where(valid, torch.logsumexp(z, -1) - (torch.softmax(z, -1) * z).sum(-1), 0.0)
    if not metrics:
        return zt, lse, ent
    t = torch.where(valid, target, 0)
    before = torch.arange(z.shape[-1], device=z.device) < t[:, None]
    first = (zt >= z.amax(-1)) & (zt > z.masked_fill(~before, float("-inf")).amax(-1))  # argmax takes the first
    return (zt, lse, ent, first & valid, torch.where(valid, z.mean(-1), 0.0),
            torch.where(valid, torch.logsumexp(2 * z, -1) - 2 * torch.logsumexp(z, -1), 0.0))


def fused_linear_logprobs_ref_backward(g_zt, g_lse, g_ent, h, weight, bias, target, lse, ent,
                                       ignore_index: int = -100, softcap: float = 0.0, logit_scale: float = 1.0,
                                       need_h: bool = True, need_w: bool = True):
    """The backward's math in torch: dlogits in fp32 from the saved lse/ent, rounded once to the logits' dtype, then
    the linear's backward. Written out because the CPU implementation runs below the autograd dispatch key; the
    tests check it against autograd of `fused_linear_logprobs_ref`."""
    logits = torch.nn.functional.linear(h, weight, bias)
    x = logits.to(_upcast(logits))
    z = transform_ref(x, softcap, logit_scale)
    valid = _valid_rows(target, ignore_index, z.shape[0], z.device)
    p = torch.exp(z - lse.to(z.dtype)[:, None])
    g = torch.zeros_like(z)
    if g_lse is not None:
        g = g + p * g_lse.to(z.dtype)[:, None]
    if g_ent is not None:
        g = g + p * g_ent.to(z.dtype)[:, None] * ((lse - ent).to(z.dtype)[:, None] - z)
    if g_zt is not None and target is not None:
        g = g.scatter_add(-1, torch.where(valid, target, 0)[:, None], g_zt.to(z.dtype)[:, None])
    g = torch.where(valid[:, None], g, 0.0)
    if softcap != 0.0:
        g = g * (1 - torch.tanh(x / softcap) ** 2)
    dl = (g * logit_scale if logit_scale != 1.0 else g).to(logits.dtype)
    dh = dl @ weight if need_h else h.new_empty(0)
    dw = dl.t() @ h if need_w else h.new_empty(0)
    db = dl.sum(0) if need_w and bias is not None else h.new_empty(0)
    return dh, dw, db


# --------------------------------------------------------------------------------------------------------------
# The library op


@torch.library.custom_op("liger_fx::fused_linear_logprobs", mutates_args=())
def _fused_linear_logprobs(
    h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], target: Optional[torch.Tensor],
    ignore_index: int, softcap: float, logit_scale: float, entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (h, weight, bias, target, ignore_index, softcap, logit_scale, entropy)
    if h.device.type == "cuda":
        return fused_linear_logprobs_fwd(*args)
    with torch.no_grad():
        return tuple(t.float().contiguous() for t in fused_linear_logprobs_ref(*args))


@_fused_linear_logprobs.register_fake
def _(h, weight, bias, target, ignore_index, softcap, logit_scale, entropy):
    N = h.shape[0]
    row = lambda on: h.new_empty((N,) if on else (0,), dtype=torch.float32)  # noqa: E731
    return row(target is not None), row(True), row(entropy)


@torch.library.custom_op("liger_fx::fused_linear_logprobs_metrics", mutates_args=())
def _fused_linear_logprobs_metrics(
    h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], target: torch.Tensor, ignore_index: int,
    softcap: float, logit_scale: float, entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`fused_linear_logprobs` and, from the same pass, three per-row metrics without gradient: whether the target
    is the (first) argmax, the mean logit, log(sum p^2) (TRL's accuracy, logit and WPO metrics)."""
    args = (h, weight, bias, target, ignore_index, softcap, logit_scale, entropy)
    if h.device.type == "cuda":
        return fused_linear_logprobs_fwd(*args, metrics=True)
    with torch.no_grad():
        out = fused_linear_logprobs_ref(*args, metrics=True)
        return tuple(t.float().contiguous() if t.dtype != torch.bool else t.contiguous() for t in out)


@_fused_linear_logprobs_metrics.register_fake
def _(h, weight, bias, target, ignore_index, softcap, logit_scale, entropy):
    N = h.shape[0]
    row = lambda on: h.new_empty((N,) if on else (0,), dtype=torch.float32)  # noqa: E731
    return row(True), row(True), row(entropy), h.new_empty((N,), dtype=torch.bool), row(True), row(True)


@torch.library.custom_op("liger_fx::fused_linear_logprobs_backward", mutates_args=())
def _fused_linear_logprobs_backward(
    g_zt: Optional[torch.Tensor], g_lse: Optional[torch.Tensor], g_ent: Optional[torch.Tensor], h: torch.Tensor,
    weight: torch.Tensor, bias: Optional[torch.Tensor], target: Optional[torch.Tensor], lse: torch.Tensor,
    ent: torch.Tensor, ignore_index: int, softcap: float, logit_scale: float, need_h: bool, need_w: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (g_zt, g_lse, g_ent, h, weight, bias, target, lse, ent, ignore_index, softcap, logit_scale, need_h, need_w)
    if h.device.type == "cuda":
        return fused_linear_logprobs_bwd(*args)
    return fused_linear_logprobs_ref_backward(*args)


@_fused_linear_logprobs_backward.register_fake
def _(g_zt, g_lse, g_ent, h, weight, bias, target, lse, ent, ignore_index, softcap, logit_scale, need_h, need_w):
    return (
        torch.empty_like(h, memory_format=torch.contiguous_format) if need_h else h.new_empty(0),
        torch.empty_like(weight, memory_format=torch.contiguous_format) if need_w else h.new_empty(0),
        torch.empty_like(bias) if need_w and bias is not None else h.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    h, weight, bias, target, ignore_index, softcap, logit_scale, entropy = inputs
    _, lse, ent = output
    # h and W both: the backward recomputes the logits from them (a frozen lm_head still needs h for that).
    ctx.save_for_backward(h, weight, bias, target, lse, ent)
    ctx.set_materialize_grads(False)  # an output nobody differentiates gets None, not N zeros
    ctx.args = (ignore_index, softcap, logit_scale)


def _backward(ctx, g_zt, g_lse, g_ent):
    h, weight, bias, target, lse, ent = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    if (g_zt is None and g_lse is None and g_ent is None) or not (need_h or need_w or need_b):
        return (None,) * 8
    if ent.numel() == 0:
        g_ent = None  # entropy not computed: it has no user
    dh, dw, db = torch.ops.liger_fx.fused_linear_logprobs_backward(
        g_zt, g_lse, g_ent, h, weight, bias, target, lse, ent, *ctx.args, need_h, need_w or need_b)
    return dh if need_h else None, dw if need_w else None, db if need_b else None, *(None,) * 5


_fused_linear_logprobs.register_autograd(_backward, setup_context=_setup_context)


def _setup_metrics(ctx, inputs, output):
    _setup_context(ctx, inputs, output[:3])
    ctx.mark_non_differentiable(*output[3:])


def _backward_metrics(ctx, g_zt, g_lse, g_ent, *_metrics):
    return _backward(ctx, g_zt, g_lse, g_ent)


_fused_linear_logprobs_metrics.register_autograd(_backward_metrics, setup_context=_setup_metrics)


# `liger_fx::linear_logprobs`: what the graph rewrite inserts. CompositeImplicitAutograd like
# `liger_fx::linear_cross_entropy`: it casts for autocast (the opaque op gets no autocast kernel) and flattens
# h (..., H) and target (...) to rows, restoring the leading shape on the outputs.
_lib = torch.library.Library("liger_fx", "FRAGMENT")
_lib.define(
    "linear_logprobs(Tensor h, Tensor weight, Tensor? bias, Tensor? target, int ignore_index, float softcap, "
    "float logit_scale, bool entropy) -> (Tensor, Tensor, Tensor)"
)


def _linear_logprobs(h, weight, bias, target, ignore_index, softcap, logit_scale, entropy):
    if softcap < 0:
        raise ValueError(f"liger_fx.fused_linear_logprobs: softcap must be >= 0 (0 = none), got {softcap}")
    lead = h.shape[:-1]
    h, weight, bias = _autocast(h, weight, bias)
    zt, lse, ent = torch.ops.liger_fx.fused_linear_logprobs(
        h.reshape(-1, h.shape[-1]), weight, bias, target.reshape(-1) if target is not None else None,
        ignore_index, softcap, logit_scale, entropy)
    return (zt.view(lead) if target is not None else zt, lse.view(lead), ent.view(lead) if entropy else ent)


_lib.impl("linear_logprobs", _linear_logprobs, "CompositeImplicitAutograd")


# --------------------------------------------------------------------------------------------------------------
# Public functionals


def _scale(temperature: float, logit_scale: float) -> float:
    if not temperature > 0:
        raise ValueError(f"liger_fx: temperature must be > 0, got {temperature}")
    return float(logit_scale) / float(temperature)


def fused_linear_token_stats(h, weight, target=None, bias=None, ignore_index: int = -100, temperature: float = 1.0,
                             softcap: float = 0.0, logit_scale: float = 1.0, entropy: bool = False):
    """(z_t, lse, ent) of z = transform(linear(h, weight, bias).float()) / temperature per token, without the
    logits: h (..., H), target (...) or None; each output fp32 of h's leading shape (z_t None without a target, ent
    None without `entropy`). Rows whose target is `ignore_index` give 0 and no gradient."""
    zt, lse, ent = torch.ops.liger_fx.linear_logprobs(
        h, weight, bias, target, int(ignore_index), float(softcap), _scale(temperature, logit_scale), bool(entropy))
    return (zt if target is not None else None), lse, (ent if entropy else None)


def fused_linear_token_metrics(h, weight, target, bias=None, ignore_index: int = NO_IGNORE,
                               temperature: float = 1.0, softcap: float = 0.0, logit_scale: float = 1.0,
                               entropy: bool = False):
    """(z_t, lse, ent, is_top1, mean_logit, log_sum_sq_probs) per token of target's shape, without the logits: the
    first three as `fused_linear_token_stats` (ent None without `entropy`), the others without gradient (is_top1
    bool: the target is the first argmax, as torch.argmax picks). 0 / False in rows whose target is ignore_index."""
    if softcap < 0:
        raise ValueError(f"liger_fx.fused_linear_logprobs: softcap must be >= 0 (0 = none), got {softcap}")
    lead = h.shape[:-1]
    h, weight, bias = _autocast(h, weight, bias)
    out = torch.ops.liger_fx.fused_linear_logprobs_metrics(
        h.reshape(-1, h.shape[-1]), weight, bias, target.reshape(-1), int(ignore_index), float(softcap),
        _scale(temperature, logit_scale), bool(entropy))
    zt, lse, ent, top1, mean, lsq = (t.view(lead) if t.numel() else t for t in out)
    return zt, lse, (ent if entropy else None), top1, mean, lsq


def fused_linear_logprobs(h, weight, target, bias=None, temperature: float = 1.0, softcap: float = 0.0,
                          logit_scale: float = 1.0, ignore_index: int = NO_IGNORE):
    """log_softmax(transform(linear(h, weight, bias).float()) / temperature).gather(-1, target) per token (fp32, of
    target's shape) without the logits. With `ignore_index`, those rows give 0."""
    zt, lse, _ = fused_linear_token_stats(h, weight, target, bias, ignore_index, temperature, softcap, logit_scale)
    return zt - lse


def fused_linear_entropy(h, weight, bias=None, temperature: float = 1.0, softcap: float = 0.0,
                         logit_scale: float = 1.0):
    """The entropy of softmax(transform(linear(h, weight, bias).float()) / temperature) per token (fp32)."""
    return fused_linear_token_stats(h, weight, None, bias, temperature=temperature, softcap=softcap,
                                    logit_scale=logit_scale, entropy=True)[2]


def fused_linear_cross_entropy_none(h, weight, target, bias=None, ignore_index: int = -100, softcap: float = 0.0,
                                    logit_scale: float = 1.0):
    """cross_entropy(..., reduction="none"): lse - z_t per token, 0 where target == ignore_index (fp32)."""
    zt, lse, _ = fused_linear_token_stats(h, weight, target, bias, ignore_index, 1.0, softcap, logit_scale)
    return lse - zt
