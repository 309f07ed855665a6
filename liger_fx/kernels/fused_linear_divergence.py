"""Two lm_heads + a distillation divergence without the logits: `liger_fx::fused_linear_divergence(h_s, w_s, b_s,
h_t, w_t, b_t, row_weight, divergence, beta, scale_s, scale_t, reduction, grad flags) -> (loss, losses, dh_s, dw_s,
db_s, dh_t, dw_t, db_t)`, and its per-row form `liger_fx::fused_linear_divergence_rows`.

Per row i (student s, teacher t; the logits in their matmul's dtype, everything after in fp32):
    z_s = scale_s * (h_s W_s^T + b_s)         scale = 1 / temperature
    z_t = scale_t * (h_t W_t^T + b_t)
    p = softmax(z), lp = log_softmax(z)
    forward_kl   L_i = KL(p_t || p_s) = sum_j p_t (lp_t - lp_s)       F.kl_div(lp_s, lp_t, log_target=True)
    reverse_kl   L_i = KL(p_s || p_t) = sum_j p_s (lp_s - lp_t)       F.kl_div(lp_t, lp_s, log_target=True)
    jsd (beta)   L_i = beta KL(p_t || m) + (1 - beta) KL(p_s || m),  m = beta p_t + (1 - beta) p_s
    loss = sum_i w_i L_i * {sum: 1, batchmean: 1 / N, mean: 1 / (N V)}     (w: row_weight, or 1)
The generalized JSD is Liger's (`LigerFusedLinearJSDLoss`, liger-kernel 0.8.5) and TRL's (GKD's
`generalized_jsd_loss`): beta weighs the teacher in the mixture and its own KL. Both special-case beta = 0 as the
forward KL and beta = 1 as the reverse KL (the formula itself gives 0 there, m being one of the two); the public
functional below does the same, and the op takes 0 < beta < 1 for "jsd". "mean" is F.kl_div's: over the N x V
elements; "batchmean" divides by the rows N (F.kl_div's size(0) of a 2-D input).

Gradients (dL/dz, times scale for dL/dx):
    forward_kl   dz_s = p_s - p_t                        dz_t = p_t (lp_t - lp_s - L)
    reverse_kl   dz_s = p_s (lp_s - lp_t - L)             dz_t = p_t - p_s
    jsd          dz_s = (1-beta) p_s (lp_s - lm - KL_s)   dz_t = beta p_t (lp_t - lm - KL_t)      (lm = log m)
(the JSD student term: dL/dp_s = (1-beta)(lp_s - lm) once the mixture's own terms cancel, then softmax's Jacobian).

The (N, V) logits never exist. Rows run in chunks of C, two (C, V) buffers (student, teacher), per chunk:
    1. logits_s = h_s W_s^T (+ b_s), logits_t = h_t W_t^T (+ b_t)        cuBLAS, into the reused buffers
    2. one Triton launch, a program per row, over the vocabulary in BLOCK_V columns:
         pass 1   online max / sum-exp of z_s and z_t -> lse_s, lse_t
         pass 2   the row's divergence (and KL_s, KL_t for JSD)
         pass 3   dz_s (and dz_t) times the row's weight and the reduction's scale, written over the logits
       Where the gradient pass needs no row total (forward KL for the student alone: dz_s = p_s - p_t), passes 2
       and 3 are one: two reads of each row instead of three.
    3. dh_s = dz_s W_s;  dW_s += dz_s^T h_s;  db_s += sum(dz_s)     (and the teacher's, if it requires grad)
Why the gradient is computed in the forward (the reduced forms): the loss is one scalar, so dL/dz is known up to the
one factor grad_output, and the backward only multiplies the saved dh_s, dW_s by it, as the reduced linear +
cross-entropy op does. FLOP: 2 N V (H_s + H_t) for the two logits + 4 N V H_s for dh_s and dW_s = the 4 lm_head
matmuls of the step, the floor (eager: the same 4, plus N x V logits, log-softmaxes and their gradients in memory).
Recomputing in the backward instead would add both logits matmuls again, 2 N V (H_s + H_t): +50% at H_t = H_s,
+60% for a 3072-wide teacher of a 2048-wide student. A teacher that requires grad (co-training, or a teacher
not detached) gets dh_t, dW_t the same way: 2 more matmuls, its own.
The per-row form (`reduction="none"`: each row's value is used on its own downstream, e.g. masked and logged) has
per-row upstream gradients known only in the backward, which cannot be taken out of dW = sum_i g_i dz_i^T h_i:
its backward recomputes both logits per chunk (6 matmuls in training) and saves 16 bytes a row (lse_s, lse_t and
the two row totals the gradient reads).

Memory (N=16384, H_s=2048, V=128256, bf16; the teacher frozen): dW_s 0.49 GiB + dh_s 64 MiB (the gradients
themselves) + the two (C, V) buffers (0.25 GiB each at C=1024) + 12 bytes a row. The logits alone would be 3.9 GiB
per model, their fp32 log-softmaxes 7.8 GiB each.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .cross_entropy import _num_warps
from .fused_linear_cross_entropy import CHUNK_BYTES, _autocast, _chunk_grads, _logits_into

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
REDUCTIONS = ("sum", "mean", "batchmean", "none")
_FWD, _REV, _JSD = 0, 1, 2

# Two rows (student and teacher) are live per block, so half the single-row kernels' 4096 columns (cross_entropy.py).
BLOCK_V = 2048


def chunk_rows(N: int, V: int, itemsize_s: int, itemsize_t: int) -> int:
    """Rows per chunk: the two (C, V) buffers together hold CHUNK_BYTES (the linear + cross-entropy op's one buffer),
    rounded down to a multiple of 128 rows: 1024 at V=128256 in bf16. On the H200, the linear + cross-entropy op
    measured 82.3 ms at 1024 rows against 80.2 at 2048 (bench/lab/flce_breakdown.py): 2.6% of the head's time for half
    the buffer memory."""
    rows = max(128, (CHUNK_BYTES // (V * (itemsize_s + itemsize_t))) // 128 * 128)
    return max(1, min(N, rows))


# --------------------------------------------------------------------------------------------------------------
# Triton kernels


@triton.jit
def _log_mix(b_lpt, b_lps, log_beta, log_1mbeta):
    """log(beta p_t + (1 - beta) p_s) from the log-probabilities. log(1 + e) loses e's digits below fp32's eps when
    e = exp(-|a - b|) is tiny: an absolute error under 6e-8 in lm (log1p does not run in the CPU interpreter)."""
    a = b_lpt + log_beta
    b = b_lps + log_1mbeta
    mx = tl.maximum(a, b)
    return mx + tl.log(1.0 + tl.exp(-tl.abs(a - b)))


@triton.jit
def _load_z(S, T, cols, mask, scale_s, scale_t):
    b_zs = tl.load(S + cols, mask=mask, other=0.0).to(tl.float32) * scale_s
    b_zt = tl.load(T + cols, mask=mask, other=0.0).to(tl.float32) * scale_t
    return b_zs, b_zt


@triton.jit
def _lse_pass(S, T, V, scale_s, scale_t, BLOCK_V: tl.constexpr):
    """Pass 1: online max / sum-exp of both rows."""
    m_s = float("-inf")
    m_t = float("-inf")
    d_s = 0.0
    d_t = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        b_zs, b_zt = _load_z(S, T, cols, mask, scale_s, scale_t)
        b_zs = tl.where(mask, b_zs, float("-inf"))
        b_zt = tl.where(mask, b_zt, float("-inf"))
        ms_new = tl.maximum(m_s, tl.max(b_zs, axis=0))
        mt_new = tl.maximum(m_t, tl.max(b_zt, axis=0))
        d_s = d_s * tl.exp(m_s - ms_new) + tl.sum(tl.exp(b_zs - ms_new), axis=0)
        d_t = d_t * tl.exp(m_t - mt_new) + tl.sum(tl.exp(b_zt - mt_new), axis=0)
        m_s = ms_new
        m_t = mt_new
    return m_s + tl.log(d_s), m_t + tl.log(d_t)


@triton.jit
def _row_pass(S, T, DS, DT, V, scale_s, scale_t, lse_s, lse_t, k_s, k_t, g_s, g_t, beta, log_beta, log_1mbeta,
              DIV: tl.constexpr, WRITE_DS: tl.constexpr, WRITE_DT: tl.constexpr, BLOCK_V: tl.constexpr):
    """One pass over the row with the LSEs known. Returns the two row sums
        forward_kl (0, sum p_t (lp_t - lp_s));  reverse_kl (sum p_s (lp_s - lp_t), 0);  jsd (KL(p_s||m), KL(p_t||m))
    and, with WRITE_DS / WRITE_DT, writes g_s * dL/dz_s and g_t * dL/dz_t into DS / DT (which may be S / T: each
    block is read before it is written). k_s, k_t are the row totals the gradients read (see the module docstring);
    a gradient that needs its total is only written in a pass after the one that summed it."""
    acc_s = 0.0
    acc_t = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        b_zs, b_zt = _load_z(S, T, cols, mask, scale_s, scale_t)
        b_lps = b_zs - lse_s
        b_lpt = b_zt - lse_t
        b_ps = tl.exp(b_lps)
        b_pt = tl.exp(b_lpt)
        if DIV == 0:
            acc_t += tl.sum(tl.where(mask, b_pt * (b_lpt - b_lps), 0.0), axis=0)
            if WRITE_DS:
                tl.store(DS + cols, (g_s * (b_ps - b_pt)).to(DS.dtype.element_ty), mask=mask)
            if WRITE_DT:
                tl.store(DT + cols, (g_t * b_pt * (b_lpt - b_lps - k_t)).to(DT.dtype.element_ty), mask=mask)
        elif DIV == 1:
            acc_s += tl.sum(tl.where(mask, b_ps * (b_lps - b_lpt), 0.0), axis=0)
            if WRITE_DS:
                tl.store(DS + cols, (g_s * b_ps * (b_lps - b_lpt - k_s)).to(DS.dtype.element_ty), mask=mask)
            if WRITE_DT:
                tl.store(DT + cols, (g_t * (b_pt - b_ps)).to(DT.dtype.element_ty), mask=mask)
        else:
            b_lm = _log_mix(b_lpt, b_lps, log_beta, log_1mbeta)
            acc_s += tl.sum(tl.where(mask, b_ps * (b_lps - b_lm), 0.0), axis=0)
            acc_t += tl.sum(tl.where(mask, b_pt * (b_lpt - b_lm), 0.0), axis=0)
            if WRITE_DS:
                b_g = (g_s * (1.0 - beta)) * b_ps * (b_lps - b_lm - k_s)
                tl.store(DS + cols, b_g.to(DS.dtype.element_ty), mask=mask)
            if WRITE_DT:
                b_g = (g_t * beta) * b_pt * (b_lpt - b_lm - k_t)
                tl.store(DT + cols, b_g.to(DT.dtype.element_ty), mask=mask)
    return acc_s, acc_t


@triton.jit
def _row_loss(k_s, k_t, beta, DIV: tl.constexpr):
    if DIV == 0:
        return k_t
    elif DIV == 1:
        return k_s
    else:
        return beta * k_t + (1.0 - beta) * k_s


@triton.jit
def _write_zeros(DS, DT, V, WRITE_DS: tl.constexpr, WRITE_DT: tl.constexpr, BLOCK_V: tl.constexpr):
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        b_zero = tl.zeros((BLOCK_V,), dtype=tl.float32)
        if WRITE_DS:
            tl.store(DS + cols, b_zero.to(DS.dtype.element_ty), mask=cols < V)
        if WRITE_DT:
            tl.store(DT + cols, b_zero.to(DT.dtype.element_ty), mask=cols < V)


@triton.jit
def _fused_linear_divergence_fwd_kernel(
    S, T, W, LOSS, STATS, stride_s, stride_t, stride_w, V, scale_s, scale_t, beta, log_beta, log_1mbeta, grad_scale,
    DIV: tl.constexpr, WRITE_DS: tl.constexpr, WRITE_DT: tl.constexpr, ONE_PASS: tl.constexpr,
    STORE_STATS: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Per row: L_i into LOSS (unweighted), the 4 saved statistics (lse_s, lse_t, k_s, k_t) with STORE_STATS, and
    with WRITE_DS / WRITE_DT the gradient of w_i * L_i * grad_scale over the logits in S / T. ONE_PASS (forward KL,
    student gradient only: it reads no row total) sums the loss in the gradient pass itself. A row of weight 0 is
    skipped: L_i = 0, zero gradient."""
    scale_s, scale_t = tl.cast(scale_s, tl.float32), tl.cast(scale_t, tl.float32)
    beta, grad_scale = tl.cast(beta, tl.float32), tl.cast(grad_scale, tl.float32)
    row = tl.program_id(0).to(tl.int64)
    S += row * stride_s
    T += row * stride_t
    w = tl.load(W + row * stride_w).to(tl.float32)
    if w != 0.0:
        lse_s, lse_t = _lse_pass(S, T, V, scale_s, scale_t, BLOCK_V)
        g = w * grad_scale
        if ONE_PASS:
            k_s, k_t = _row_pass(S, T, S, T, V, scale_s, scale_t, lse_s, lse_t, 0.0, 0.0, g * scale_s, 0.0, beta,
                                 log_beta, log_1mbeta, DIV, True, False, BLOCK_V)
        else:
            k_s, k_t = _row_pass(S, T, S, T, V, scale_s, scale_t, lse_s, lse_t, 0.0, 0.0, 0.0, 0.0, beta,
                                 log_beta, log_1mbeta, DIV, False, False, BLOCK_V)
            if WRITE_DS or WRITE_DT:
                _row_pass(S, T, S, T, V, scale_s, scale_t, lse_s, lse_t, k_s, k_t, g * scale_s, g * scale_t, beta,
                          log_beta, log_1mbeta, DIV, WRITE_DS, WRITE_DT, BLOCK_V)
        tl.store(LOSS + row, _row_loss(k_s, k_t, beta, DIV))
        if STORE_STATS:
            tl.store(STATS + row * 4 + 0, lse_s)
            tl.store(STATS + row * 4 + 1, lse_t)
            tl.store(STATS + row * 4 + 2, k_s)
            tl.store(STATS + row * 4 + 3, k_t)
    else:
        tl.store(LOSS + row, 0.0)
        if STORE_STATS:
            for k in range(4):
                tl.store(STATS + row * 4 + k, 0.0)
        _write_zeros(S, T, V, WRITE_DS, WRITE_DT, BLOCK_V)


@triton.jit
def _fused_linear_divergence_bwd_kernel(
    S, T, G, STATS, stride_s, stride_t, V, scale_s, scale_t, beta, log_beta, log_1mbeta,
    DIV: tl.constexpr, WRITE_DS: tl.constexpr, WRITE_DT: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Per row: the gradient of G[row] * L_i over the recomputed logits in S / T, from the saved statistics: one
    pass. A row whose upstream gradient is 0 (masked) is written zeros without reading it."""
    scale_s, scale_t, beta = tl.cast(scale_s, tl.float32), tl.cast(scale_t, tl.float32), tl.cast(beta, tl.float32)
    row = tl.program_id(0).to(tl.int64)
    S += row * stride_s
    T += row * stride_t
    g = tl.load(G + row).to(tl.float32)
    if g != 0.0:
        lse_s = tl.load(STATS + row * 4 + 0)
        lse_t = tl.load(STATS + row * 4 + 1)
        k_s = tl.load(STATS + row * 4 + 2)
        k_t = tl.load(STATS + row * 4 + 3)
        _row_pass(S, T, S, T, V, scale_s, scale_t, lse_s, lse_t, k_s, k_t, g * scale_s, g * scale_t, beta,
                  log_beta, log_1mbeta, DIV, WRITE_DS, WRITE_DT, BLOCK_V)
    else:
        _write_zeros(S, T, V, WRITE_DS, WRITE_DT, BLOCK_V)


# --------------------------------------------------------------------------------------------------------------
# Launchers (any device Triton runs on, the CPU interpreter included; the matmuls are torch ops)


def _div_id(divergence: str) -> int:
    return DIVERGENCES.index(divergence)


def _logs(beta: float) -> tuple[float, float]:
    """log(beta), log(1 - beta) for the JSD mixture (unused otherwise: 0)."""
    if 0.0 < beta < 1.0:
        return math.log(beta), math.log1p(-beta)
    return 0.0, 0.0


def reduction_scale(reduction: str, N: int, V: int) -> float:
    """The factor of sum_i w_i L_i that the reduction applies; NaN for "mean"/"batchmean" of no rows (torch's 0/0)."""
    if reduction == "sum":
        return 1.0
    count = N * V if reduction == "mean" else N
    return 1.0 / count if count else float("nan")


class _Grads:
    """The gradient buffers of one side (student or teacher): dh, dW, db, each an empty (0,) tensor when not wanted."""

    def __init__(self, h, weight, bias, need_h: bool, need_w: bool):
        self.need_h, self.need_w, self.want_db = need_h, need_w, need_w and bias is not None
        self.dh = torch.empty_like(h, memory_format=torch.contiguous_format) if need_h else h.new_empty(0)
        self.dw = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_w else h.new_empty(0)
        self.db = torch.zeros(weight.shape[0], dtype=torch.float32, device=h.device) if self.want_db else None
        if need_w and h.shape[0] == 0:
            self.dw.zero_()

    @property
    def any(self) -> bool:
        return self.need_h or self.need_w

    def add_chunk(self, i, dlogits, h_c, weight, start, end):
        _chunk_grads(i, dlogits, h_c, weight, self.dh[start:end] if self.need_h else None,
                     self.dw if self.need_w else None, self.db if self.want_db else None)

    def result(self, bias, h):
        return self.dh, self.dw, self.db.to(bias.dtype) if self.want_db else h.new_empty(0)


def _prepare(h_s, h_t):
    h_s = h_s if h_s.stride(-1) == 1 else h_s.contiguous()
    h_t = h_t if h_t.stride(-1) == 1 else h_t.contiguous()
    return h_s, h_t


def _buffers(h_s, w_s, h_t, w_t, chunk):
    N, V = h_s.shape[0], w_s.shape[0]
    dt_s, dt_t = torch.result_type(h_s, w_s), torch.result_type(h_t, w_t)
    C = chunk or chunk_rows(N, V, dt_s.itemsize, dt_t.itemsize)
    rows = min(C, N)
    return C, torch.empty((rows, V), dtype=dt_s, device=h_s.device), torch.empty((rows, V), dtype=dt_t,
                                                                                 device=h_s.device)


def _chunk_logits(h_s, w_s, b_s, h_t, w_t, b_t, gs: _Grads, gt: _Grads, chunk):
    """Each chunk's (start, end, student logits, teacher logits) in two buffers reused across chunks. The caller's
    kernel overwrites the logits with their gradients where a side's are wanted; when the loop asks for the next
    chunk, those become each wanted side's share of its linear's gradients."""
    N = h_s.shape[0]
    C, buf_s, buf_t = _buffers(h_s, w_s, h_t, w_t, chunk)
    for i, start in enumerate(range(0, N, C)):
        end = min(start + C, N)
        s = _logits_into(buf_s, h_s[start:end], w_s, b_s)
        t = _logits_into(buf_t, h_t[start:end], w_t, b_t)
        yield start, end, s, t
        if gs.any:
            gs.add_chunk(i, s, h_s[start:end], w_s, start, end)
        if gt.any:
            gt.add_chunk(i, t, h_t[start:end], w_t, start, end)


def fused_linear_divergence_fwd(
    h_s, w_s, b_s, h_t, w_t, b_t, row_weight, divergence: str = "forward_kl", beta: float = 0.5,
    scale_s: float = 1.0, scale_t: float = 1.0, reduction: str = "batchmean", grad_hs: bool = True,
    grad_ws: bool = True, grad_ht: bool = False, grad_wt: bool = False, store_stats: bool = False,
    chunk: int | None = None, block_v: int | None = None,
):
    """h_s (N, Hs), w_s (V, Hs), h_t (N, Ht), w_t (V, Ht), biases (V,) or None, row_weight (N,) or None ->
    (loss fp32 0-d, losses fp32 (N,) unweighted per row, stats fp32 (N, 4) or (0,), dh_s, dw_s, db_s, dh_t, dw_t,
    db_t). The gradients are those of `loss` (the reduction's scale and row weights applied); each not wanted is an
    empty (0,) tensor. `reduction` "none" is the forward of the per-row form: no gradients, stats stored."""
    N, V = h_s.shape[0], w_s.shape[0]
    h_s, h_t = _prepare(h_s, h_t)
    div = _div_id(divergence)
    red = 1.0 if reduction == "none" else reduction_scale(reduction, N, V)
    gs = _Grads(h_s, w_s, b_s, grad_hs, grad_ws)
    gt = _Grads(h_t, w_t, b_t, grad_ht, grad_wt)
    losses = torch.empty(N, dtype=torch.float32, device=h_s.device)
    stats = torch.empty((N, 4) if store_stats else (0,), dtype=torch.float32, device=h_s.device)
    w = row_weight.contiguous() if row_weight is not None else torch.ones(1, dtype=torch.float32, device=h_s.device)
    log_b, log_1mb = _logs(beta)
    if N > 0:
        bv = block_v or min(BLOCK_V, triton.next_power_of_2(V))
        for start, end, s, t in _chunk_logits(h_s, w_s, b_s, h_t, w_t, b_t, gs, gt, chunk):
            _fused_linear_divergence_fwd_kernel[(end - start,)](
                s, t, w[start:end] if row_weight is not None else w, losses[start:end],
                stats[start:end] if store_stats else losses, s.stride(0), t.stride(0),
                1 if row_weight is not None else 0, V, float(scale_s), float(scale_t), float(beta), log_b, log_1mb,
                red, DIV=div, WRITE_DS=gs.any, WRITE_DT=gt.any, ONE_PASS=div == _FWD and gs.any and not gt.any,
                STORE_STATS=store_stats,
                BLOCK_V=bv, num_warps=_num_warps(bv),
            )
    weighted = losses * row_weight.float() if row_weight is not None else losses
    loss = weighted.sum() * red
    return (loss, losses, stats, *gs.result(b_s, h_s), *gt.result(b_t, h_t))


def fused_linear_divergence_rows_bwd(
    g, h_s, w_s, b_s, h_t, w_t, b_t, stats, divergence: str, beta: float, scale_s: float, scale_t: float,
    need_hs: bool, need_ws: bool, need_ht: bool, need_wt: bool, chunk: int | None = None,
    block_v: int | None = None,
):
    """The per-row form's backward: g (N,) the gradient of each row's L_i -> (dh_s, dw_s, db_s, dh_t, dw_t, db_t).
    Recomputes each chunk's two logits matmuls (see the module docstring)."""
    N, V = h_s.shape[0], w_s.shape[0]
    h_s, h_t = _prepare(h_s, h_t)
    gs = _Grads(h_s, w_s, b_s, need_hs, need_ws)
    gt = _Grads(h_t, w_t, b_t, need_ht, need_wt)
    g = g.float().contiguous()
    log_b, log_1mb = _logs(beta)
    if N > 0 and (gs.any or gt.any):
        bv = block_v or min(BLOCK_V, triton.next_power_of_2(V))
        for start, end, s, t in _chunk_logits(h_s, w_s, b_s, h_t, w_t, b_t, gs, gt, chunk):
            _fused_linear_divergence_bwd_kernel[(end - start,)](
                s, t, g[start:end], stats[start:end], s.stride(0), t.stride(0), V, float(scale_s), float(scale_t),
                float(beta), log_b, log_1mb, DIV=_div_id(divergence), WRITE_DS=gs.any, WRITE_DT=gt.any,
                BLOCK_V=bv, num_warps=_num_warps(bv),
            )
    return (*gs.result(b_s, h_s), *gt.result(b_t, h_t))


# --------------------------------------------------------------------------------------------------------------
# Reference: the single source of truth for tests, benchmarks and the CPU implementation


def _upcast(t):
    """fp32 for bf16/fp16/fp32 logits (what the kernels compute in); fp64 kept (the tests' exact reference)."""
    return torch.promote_types(t.dtype, torch.float32)


def _log_probs(x, scale):
    return torch.log_softmax(x.to(_upcast(x)) * scale, -1)


def _rows_from_log_probs(lps, lpt, divergence, beta):
    """(L (N,), k_s, k_t) per row from the two log-probability rows (differentiable)."""
    zero = torch.zeros_like(lps[:, 0])
    if divergence == "forward_kl":
        kt = (lpt.exp() * (lpt - lps)).sum(-1)
        return kt, zero, kt
    if divergence == "reverse_kl":
        ks = (lps.exp() * (lps - lpt)).sum(-1)
        return ks, ks, zero
    lm = torch.logaddexp(lpt + math.log(beta), lps + math.log1p(-beta))
    ks = (lps.exp() * (lps - lm)).sum(-1)
    kt = (lpt.exp() * (lpt - lm)).sum(-1)
    return beta * kt + (1 - beta) * ks, ks, kt


def divergence_rows_ref(logits_s, logits_t, divergence: str, beta: float = 0.5, scale_s: float = 1.0,
                        scale_t: float = 1.0) -> torch.Tensor:
    """Per-row divergence from materialized (N, V) logits, computed in fp32 (fp64 for fp64 logits); differentiable."""
    lps, lpt = _log_probs(logits_s, scale_s), _log_probs(logits_t, scale_t)
    return _rows_from_log_probs(lps, lpt, divergence, beta)[0]


def fused_linear_divergence_ref(h_s, w_s, b_s, h_t, w_t, b_t, row_weight=None, divergence: str = "forward_kl",
                                beta: float = 0.5, scale_s: float = 1.0, scale_t: float = 1.0,
                                reduction: str = "batchmean") -> torch.Tensor:
    """The loss as eager torch computes it from the materialized logits (in the inputs' dtype, then upcast).
    Differentiable; "none" gives the per-row values (row weights applied)."""
    s = torch.nn.functional.linear(h_s, w_s, b_s)
    t = torch.nn.functional.linear(h_t, w_t, b_t)
    rows = divergence_rows_ref(s, t, divergence, beta, scale_s, scale_t)
    if row_weight is not None:
        rows = rows * row_weight.to(rows.dtype)
    if reduction == "none":
        return rows
    return rows.sum() * reduction_scale(reduction, s.shape[0], s.shape[1])


def _dz_ref(xs, xt, g, divergence, beta, scale_s, scale_t):
    """(L, stats (N, 4), dL/dx_s, dL/dx_t) times the per-row g (N,), in fp32 (fp64 for fp64 logits), written out as
    the kernels compute them: the CPU implementations run below the autograd dispatch key. The tests check these
    against autograd of `fused_linear_divergence_ref`."""
    lps, lpt = _log_probs(xs, scale_s), _log_probs(xt, scale_t)
    L, ks, kt = _rows_from_log_probs(lps, lpt, divergence, beta)
    ps, pt = lps.exp(), lpt.exp()
    if divergence == "forward_kl":
        ds, dt = ps - pt, pt * (lpt - lps - kt[:, None])
    elif divergence == "reverse_kl":
        ds, dt = ps * (lps - lpt - ks[:, None]), pt - ps
    else:
        lm = torch.logaddexp(lpt + math.log(beta), lps + math.log1p(-beta))
        ds = (1 - beta) * ps * (lps - lm - ks[:, None])
        dt = beta * pt * (lpt - lm - kt[:, None])
    g = g.to(ds.dtype)[:, None]
    lse_s = torch.logsumexp(xs.to(_upcast(xs)) * scale_s, -1)
    lse_t = torch.logsumexp(xt.to(_upcast(xt)) * scale_t, -1)
    stats = torch.stack([lse_s, lse_t, ks, kt], -1).float()
    return L, stats, ds * (g * scale_s), dt * (g * scale_t)


def _linear_grads(dl, h, weight, bias, need_h, need_w):
    """dh, dW, db of a linear from dlogits rounded to the logits' dtype; not needed: fresh empty (0,) tensors (outputs
    of a custom op must not alias)."""
    dh = dl @ weight if need_h else h.new_empty(0)
    dw = dl.t() @ h if need_w else h.new_empty(0)
    db = dl.sum(0) if need_w and bias is not None else h.new_empty(0)
    return dh, dw, db


def fused_linear_divergence_ref_with_grads(h_s, w_s, b_s, h_t, w_t, b_t, row_weight, divergence, beta, scale_s,
                                           scale_t, reduction, grad_hs, grad_ws, grad_ht, grad_wt,
                                           store_stats=False):
    """What `fused_linear_divergence_fwd` returns, computed on the materialized logits."""
    s = torch.nn.functional.linear(h_s, w_s, b_s)
    t = torch.nn.functional.linear(h_t, w_t, b_t)
    N, V = s.shape
    red = 1.0 if reduction == "none" else reduction_scale(reduction, N, V)
    w = row_weight if row_weight is not None else torch.ones(N, dtype=torch.float32, device=s.device)
    w = w.to(torch.promote_types(w.dtype, torch.float32))
    g = w * (red if red == red else 0.0)
    L, stats, ds, dt = _dz_ref(s, t, g, divergence, beta, scale_s, scale_t)
    L = torch.where(w != 0, L, 0.0)  # the kernel skips rows of weight 0
    loss = ((L * w).sum() * red).float()
    L = L.float()
    grads_s = _linear_grads(ds.to(s.dtype), h_s, w_s, b_s, grad_hs, grad_ws)
    grads_t = _linear_grads(dt.to(t.dtype), h_t, w_t, b_t, grad_ht, grad_wt)
    stats = stats.contiguous() if store_stats else h_s.new_empty(0, dtype=torch.float32)
    return (loss, L.contiguous(), stats, *grads_s, *grads_t)


def fused_linear_divergence_rows_ref_bwd(g, h_s, w_s, b_s, h_t, w_t, b_t, stats, divergence, beta, scale_s,
                                         scale_t, need_hs, need_ws, need_ht, need_wt):
    s = torch.nn.functional.linear(h_s, w_s, b_s)
    t = torch.nn.functional.linear(h_t, w_t, b_t)
    _, _, ds, dt = _dz_ref(s, t, g.float(), divergence, beta, scale_s, scale_t)
    return (*_linear_grads(ds.to(s.dtype), h_s, w_s, b_s, need_hs, need_ws),
            *_linear_grads(dt.to(t.dtype), h_t, w_t, b_t, need_ht, need_wt))


# --------------------------------------------------------------------------------------------------------------
# The library ops


def _empty_like_or_none(x, on):
    return torch.empty_like(x, memory_format=torch.contiguous_format) if on else x.new_empty(0)


def _fake_grads(h, weight, bias, need_h, need_w):
    return (_empty_like_or_none(h, need_h), _empty_like_or_none(weight, need_w),
            torch.empty_like(bias) if need_w and bias is not None else h.new_empty(0))


@torch.library.custom_op("liger_fx::fused_linear_divergence", mutates_args=())
def _fld(
    h_s: torch.Tensor, w_s: torch.Tensor, b_s: Optional[torch.Tensor], h_t: torch.Tensor, w_t: torch.Tensor,
    b_t: Optional[torch.Tensor], row_weight: Optional[torch.Tensor], divergence: str, beta: float, scale_s: float,
    scale_t: float, reduction: str, grad_hs: bool, grad_ws: bool, grad_ht: bool, grad_wt: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:
    if reduction == "none":
        raise ValueError("liger_fx::fused_linear_divergence reduces; reduction='none' is "
                         "liger_fx::fused_linear_divergence_rows")
    args = (h_s, w_s, b_s, h_t, w_t, b_t, row_weight, divergence, beta, scale_s, scale_t, reduction, grad_hs,
            grad_ws, grad_ht, grad_wt)
    out = fused_linear_divergence_fwd(*args) if h_s.device.type == "cuda" else \
        fused_linear_divergence_ref_with_grads(*args)
    loss, losses, _stats, *grads = out
    return (loss, losses, *grads)


@_fld.register_fake
def _(h_s, w_s, b_s, h_t, w_t, b_t, row_weight, divergence, beta, scale_s, scale_t, reduction, grad_hs, grad_ws,
      grad_ht, grad_wt):
    return (h_s.new_empty((), dtype=torch.float32), h_s.new_empty(h_s.shape[:1], dtype=torch.float32),
            *_fake_grads(h_s, w_s, b_s, grad_hs, grad_ws), *_fake_grads(h_t, w_t, b_t, grad_ht, grad_wt))


def _fld_setup_context(ctx, inputs, output):
    row_weight, reduction = inputs[6], inputs[11]
    _, losses, *grads = output
    ctx.save_for_backward(losses if row_weight is not None else None, *grads)
    ctx.mark_non_differentiable(losses, *grads)
    ctx.set_materialize_grads(False)  # the per-row losses and gradients are never differentiated: no zeros made
    ctx.computed = (inputs[12] or inputs[13], inputs[14] or inputs[15])  # student, teacher gradients formed
    ctx.reduction, ctx.NV = reduction, (inputs[0].shape[0], inputs[1].shape[0])


def _fld_backward(ctx, grad, *_unused):
    losses, dh_s, dw_s, db_s, dh_t, dw_t, db_t = ctx.saved_tensors
    need = ctx.needs_input_grad
    student, teacher = ctx.computed
    if (any(need[0:3]) and not student) or (any(need[3:6]) and not teacher):
        raise RuntimeError(
            "liger_fx::fused_linear_divergence was called with its gradient flags off for an input that requires "
            "grad; pass the flags that match requires_grad (liger_fx::linear_divergence does)")
    if grad is None:
        return (None,) * 16
    # New tensors, never a write into the saved ones: retain_graph may run this again.
    scaled = [g * grad if n and g.numel() else None for g, n in zip((dh_s, dw_s, db_s, dh_t, dw_t, db_t), need[:6])]
    dweight = losses * (grad * reduction_scale(ctx.reduction, *ctx.NV)) if need[6] else None
    return (*scaled, dweight, *(None,) * 9)


_fld.register_autograd(_fld_backward, setup_context=_fld_setup_context)


@torch.library.custom_op("liger_fx::fused_linear_divergence_rows", mutates_args=())
def _fld_rows(
    h_s: torch.Tensor, w_s: torch.Tensor, b_s: Optional[torch.Tensor], h_t: torch.Tensor, w_t: torch.Tensor,
    b_t: Optional[torch.Tensor], divergence: str, beta: float, scale_s: float, scale_t: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    args = (h_s, w_s, b_s, h_t, w_t, b_t, None, divergence, beta, scale_s, scale_t, "none", False, False, False,
            False, True)
    if h_s.device.type == "cuda":
        _, losses, stats, *_ = fused_linear_divergence_fwd(*args)
    else:
        _, losses, stats, *_ = fused_linear_divergence_ref_with_grads(*args)
    return losses, stats


@_fld_rows.register_fake
def _(h_s, w_s, b_s, h_t, w_t, b_t, divergence, beta, scale_s, scale_t):
    N = h_s.shape[0]
    return h_s.new_empty((N,), dtype=torch.float32), h_s.new_empty((N, 4), dtype=torch.float32)


@torch.library.custom_op("liger_fx::fused_linear_divergence_rows_backward", mutates_args=())
def _fld_rows_backward(
    g: torch.Tensor, h_s: torch.Tensor, w_s: torch.Tensor, b_s: Optional[torch.Tensor], h_t: torch.Tensor,
    w_t: torch.Tensor, b_t: Optional[torch.Tensor], stats: torch.Tensor, divergence: str, beta: float,
    scale_s: float, scale_t: float, need_hs: bool, need_ws: bool, need_ht: bool, need_wt: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (g, h_s, w_s, b_s, h_t, w_t, b_t, stats, divergence, beta, scale_s, scale_t, need_hs, need_ws, need_ht,
            need_wt)
    if h_s.device.type == "cuda":
        return fused_linear_divergence_rows_bwd(*args)
    return fused_linear_divergence_rows_ref_bwd(*args)


@_fld_rows_backward.register_fake
def _(g, h_s, w_s, b_s, h_t, w_t, b_t, stats, divergence, beta, scale_s, scale_t, need_hs, need_ws, need_ht,
      need_wt):
    return (*_fake_grads(h_s, w_s, b_s, need_hs, need_ws), *_fake_grads(h_t, w_t, b_t, need_ht, need_wt))


def _rows_setup_context(ctx, inputs, output):
    h_s, w_s, b_s, h_t, w_t, b_t, *args = inputs
    ctx.save_for_backward(h_s, w_s, b_s, h_t, w_t, b_t, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.args = tuple(args)


def _rows_backward(ctx, g, _grad_stats):
    h_s, w_s, b_s, h_t, w_t, b_t, stats = ctx.saved_tensors
    need = ctx.needs_input_grad
    if g is None or not any(need[:6]):
        return (None,) * 10
    need_ws, need_wt = need[1] or need[2], need[4] or need[5]
    grads = torch.ops.liger_fx.fused_linear_divergence_rows_backward(
        g, h_s, w_s, b_s, h_t, w_t, b_t, stats, *ctx.args, need[0], need_ws, need[3], need_wt)
    return (*(gr if n else None for gr, n in zip(grads, need[:6])), *(None,) * 4)


_fld_rows.register_autograd(_rows_backward, setup_context=_rows_setup_context)


# `liger_fx::linear_divergence`: what the graph rewrite inserts. CompositeImplicitAutograd (as
# liger_fx::linear_cross_entropy): where autograd is visible it reads requires_grad and grad mode to pick the
# gradients to form, casts for autocast, flattens h (..., H) to rows and gives "none" its leading shape back.
_lib = torch.library.Library("liger_fx", "FRAGMENT")
_lib.define(
    "linear_divergence(Tensor h_s, Tensor w_s, Tensor? b_s, Tensor h_t, Tensor w_t, Tensor? b_t, Tensor? row_weight, "
    "str divergence, float beta, float scale_s, float scale_t, str reduction) -> Tensor"
)


def check_args(h_s, w_s, h_t, w_t, row_weight, divergence, beta, scale_s, scale_t, reduction):
    """ValueError naming the bad argument."""
    name = "liger_fx.fused_linear_divergence"
    if divergence not in DIVERGENCES:
        raise ValueError(f"{name}: divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{name}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if divergence == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"{name}: jsd needs 0 < beta < 1 (beta 0 is forward_kl and 1 reverse_kl, as Liger and TRL "
                         f"write them), got beta={beta}")
    for key, value in (("scale_s", scale_s), ("scale_t", scale_t)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name}: {key} (1 / temperature) must be a finite number > 0, got {value}")
    if w_s.shape[0] != w_t.shape[0]:
        raise ValueError(f"{name}: student and teacher vocabularies differ: {w_s.shape[0]} vs {w_t.shape[0]}")
    # Rows are matched by position after flattening (the graph rewrite may hand a (B, T, H) student beside a
    # (B*T, H) teacher): their counts must agree.
    rows = math.prod(h_s.shape[:-1])
    if math.prod(h_t.shape[:-1]) != rows:
        raise ValueError(f"{name}: student rows {tuple(h_s.shape[:-1])} and teacher rows {tuple(h_t.shape[:-1])} "
                         "differ")
    if row_weight is not None and reduction == "none":
        raise ValueError(f"{name}: row_weight is for the reduced forms; with reduction='none' weigh the rows after")
    if row_weight is not None and row_weight.numel() != rows:
        raise ValueError(f"{name}: row_weight has shape {tuple(row_weight.shape)}, the rows {tuple(h_s.shape[:-1])}")


def _linear_divergence(h_s, w_s, b_s, h_t, w_t, b_t, row_weight, divergence, beta, scale_s, scale_t, reduction):
    check_args(h_s, w_s, h_t, w_t, row_weight, divergence, beta, scale_s, scale_t, reduction)
    lead = h_s.shape[:-1]
    h_s, w_s, b_s = _autocast(h_s, w_s, b_s)
    h_t, w_t, b_t = _autocast(h_t, w_t, b_t)
    hs2, ht2 = h_s.reshape(-1, h_s.shape[-1]), h_t.reshape(-1, h_t.shape[-1])
    if reduction == "none":
        rows, _ = torch.ops.liger_fx.fused_linear_divergence_rows(hs2, w_s, b_s, ht2, w_t, b_t, divergence, beta,
                                                                  scale_s, scale_t)
        return rows.view(lead)
    on = torch.is_grad_enabled()
    learns = lambda t: on and t is not None and t.requires_grad  # noqa: E731
    w = row_weight.reshape(-1).float() if row_weight is not None else None
    return torch.ops.liger_fx.fused_linear_divergence(
        hs2, w_s, b_s, ht2, w_t, b_t, w, divergence, beta, scale_s, scale_t, reduction,
        learns(h_s), learns(w_s) or learns(b_s), learns(h_t), learns(w_t) or learns(b_t))[0]


_lib.impl("linear_divergence", _linear_divergence, "CompositeImplicitAutograd")


# --------------------------------------------------------------------------------------------------------------
# Public functional


def fused_linear_distillation(h_s, w_s, h_t, w_t, b_s=None, b_t=None, *, divergence: str = "forward_kl",
                              beta: float = 0.5, temperature: float = 1.0, reduction: str = "batchmean",
                              row_weight=None, target=None, ignore_index: int = -100) -> torch.Tensor:
    """The divergence between softmax(linear(h_s, w_s, b_s) / T) and softmax(linear(h_t, w_t, b_t) / T) without the
    logits: h_s (..., Hs) and h_t (..., Ht) of one leading shape, one vocabulary. fp32 result.

    divergence: "forward_kl" KL(p_t || p_s), "reverse_kl" KL(p_s || p_t), "jsd" the generalized JSD with `beta`
    (beta 0 and 1 are the forward and reverse KL, as Liger and TRL write them). reduction: "sum", "mean" (over the
    N x V elements, F.kl_div's), "batchmean" (over the N rows) or "none" (per row, of the leading shape). Rows are
    weighted by `row_weight`, or, with `target`, masked where target == ignore_index (Liger's convention divides by
    the unmasked count: use reduction="sum" and divide). Gradients reach whatever requires grad: a teacher under
    no_grad or detached gets none, at no cost. Multiply by T**2 yourself where your recipe does (Hinton's)."""
    if divergence == "jsd" and beta in (0.0, 1.0):
        divergence = "forward_kl" if beta == 0.0 else "reverse_kl"
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"liger_fx.fused_linear_distillation: temperature must be > 0, got {temperature!r}")
    if target is not None:
        if row_weight is not None:
            raise ValueError("liger_fx.fused_linear_distillation: give row_weight or target, not both")
        row_weight = (target != ignore_index).to(torch.float32)
    return torch.ops.liger_fx.linear_divergence(h_s, w_s, b_s, h_t, w_t, b_t, row_weight, divergence, float(beta),
                                                1.0 / temperature, 1.0 / temperature, reduction)
