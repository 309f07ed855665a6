"""Cross-entropy on materialized logits: `liger_fx::cross_entropy(logits, target, ignore_index, reduction, softcap,
logit_scale) -> (loss, lse)`, and the row kernels that `fused_linear_cross_entropy` runs on each chunk of logits.

    z = logit_scale * softcap * tanh(x / softcap)      (softcap > 0; Gemma2's final_logit_softcapping)
    z = logit_scale * x                                (softcap == 0; Cohere multiplies, Granite divides)
    loss_i = logsumexp(z_i) - z_i[t_i]                 (0 where t_i == ignore_index)
    loss = sum_i loss_i  [/ count of t_i != ignore_index  for "mean"]

Everything is computed in fp32 from the logits' own dtype, so a bf16 model never gets an fp32 copy of its logits
(torch's `logits.float()` costs 2x the bf16 logits, i.e. 7.8 GiB at N=16384, V=128256).

One program per row, looping over the vocabulary in BLOCK_V columns with an online max / sum-exp. The forward reads
the row once and saves only the fp32 LSE (4 bytes a row). The gradient `(softmax - onehot) * dz/dx * grad / count`
is computed in the backward, reading the row once more and writing dlogits once, with grad_output folded in: that is
the minimum traffic (1 read forward, 1 read + 1 write backward) and holds nothing across forward->backward beyond the
logits themselves (which the caller keeps anyway) -- computing it in the forward would hold an extra N x V dlogits
until the backward and need a second N x V pass there to scale it by grad_output.
Precision cost of saving one fp32 LSE: p = exp(z - lse) inherits lse's rounding, up to eps/2 * |lse| relative
(1.2e-6 at lse = 20, std-4 logits over V = 128k) where torch, subtracting the row max first, keeps ~1 ulp. Saving
the max and the log-sum apart would fix it for 4 more bytes a row; the tests bound it instead (dlogits_rel_error).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

REDUCTIONS = ("mean", "sum")

# 4096 fp32 columns over 8 warps is 16 values a thread; 32 iterations cover V=128256.
BLOCK_V = 4096


# --------------------------------------------------------------------------------------------------------------
# Triton kernels


@triton.jit
def _tanh(y):
    # libdevice.tanh does not run in the CPU interpreter, so tanh comes from exp. (1 - e) / (1 + e) with e = exp(-2|y|)
    # loses relative precision to cancellation for small |y|; below 0.1 the odd Taylor series to y^7 is exact to
    # 2e-11 relative (the next term is 62/2835 y^9).
    a = tl.abs(y)
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    a2 = a * a
    small = a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0))))
    t = tl.where(a < 0.1, small, big)
    return tl.where(y < 0, -t, t)


@triton.jit
def _transform(b_x, softcap, scale, HAS_SOFTCAP: tl.constexpr):
    """Logits (fp32) -> z."""
    if HAS_SOFTCAP:
        return scale * softcap * _tanh(b_x / softcap)
    return scale * b_x


@triton.jit
def _transform_and_grad(b_x, softcap, scale, HAS_SOFTCAP: tl.constexpr):
    """Logits (fp32) -> (z, dz/dx)."""
    if HAS_SOFTCAP:
        b_t = _tanh(b_x / softcap)
        b_z = scale * softcap * b_t
        b_dz = scale * (1.0 - b_t * b_t)
    else:
        b_z = scale * b_x
        b_dz = scale
    return b_z, b_dz


@triton.jit
def _write_grad(X, DX, ADD, t, lse, grad_scale, V, softcap, scale, HAS_SOFTCAP: tl.constexpr, HAS_ADD: tl.constexpr,
                BLOCK_V: tl.constexpr):
    """dx = (softmax(z) - onehot(t)) * grad_scale * dz/dx [+ add] over one row, rounded once to dx's dtype."""
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        b_x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
        b_z, b_dz = _transform_and_grad(b_x, softcap, scale, HAS_SOFTCAP)
        b_p = tl.exp(b_z - lse)
        b_g = (tl.where(cols == t, b_p - 1.0, b_p) * grad_scale) * b_dz
        if HAS_ADD:
            b_g += tl.load(ADD + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + cols, b_g.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _write_zeros(DX, ADD, V, HAS_ADD: tl.constexpr, BLOCK_V: tl.constexpr):
    """An ignored row: no loss gradient, so dx is zeros [or a copy of add]."""
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        if HAS_ADD:
            b_g = tl.load(ADD + cols, mask=cols < V, other=0.0)
        else:
            b_g = tl.zeros((BLOCK_V,), dtype=tl.float32)
        tl.store(DX + cols, b_g.to(DX.dtype.element_ty), mask=cols < V)


@triton.jit
def _ce_fwd_kernel(
    X, DX, TARGET, LOSS, LSE, GRAD_SCALE, stride_x, stride_dx, V, ignore_index, softcap, scale,
    HAS_SOFTCAP: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Per row: loss (and lse); with WRITE_GRAD also the gradient times GRAD_SCALE[0] into DX (DX may be X)."""
    row = tl.program_id(0).to(tl.int64)
    X += row * stride_x
    DX += row * stride_dx
    t = tl.load(TARGET + row).to(tl.int64)
    if t != ignore_index:
        m = float("-inf")
        d = 0.0
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < V
            b_x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
            b_z = _transform(b_x, softcap, scale, HAS_SOFTCAP)
            b_z = tl.where(mask, b_z, float("-inf"))
            m_new = tl.maximum(m, tl.max(b_z, axis=0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(b_z - m_new), axis=0)
            m = m_new
        lse = m + tl.log(d)
        # An out-of-range target (torch raises a device assert) gives a NaN loss: loud, and no out-of-bounds read.
        in_range = (t >= 0) & (t < V)
        x_t = tl.load(X + t, mask=in_range, other=0.0).to(tl.float32)
        z_t = _transform(x_t, softcap, scale, HAS_SOFTCAP)
        tl.store(LOSS + row, tl.where(in_range, lse - z_t, float("nan")))
        tl.store(LSE + row, lse)
        if WRITE_GRAD:
            _write_grad(X, DX, X, t, lse, tl.load(GRAD_SCALE), V, softcap, scale, HAS_SOFTCAP, False, BLOCK_V)
    else:
        tl.store(LOSS + row, 0.0)
        tl.store(LSE + row, 0.0)
        if WRITE_GRAD:
            _write_zeros(DX, X, V, False, BLOCK_V)


@triton.jit
def _ce_bwd_kernel(
    X, DX, ADD, TARGET, LSE, GRAD_SCALE, stride_x, stride_dx, stride_add, V, ignore_index, softcap, scale,
    HAS_SOFTCAP: tl.constexpr, HAS_ADD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Per row: the gradient times GRAD_SCALE[0], plus the row of ADD (a gradient that reaches the logits another
    way, e.g. the returned logits' own), into DX."""
    row = tl.program_id(0).to(tl.int64)
    X += row * stride_x
    DX += row * stride_dx
    ADD += row * stride_add
    t = tl.load(TARGET + row).to(tl.int64)
    if t != ignore_index:
        _write_grad(X, DX, ADD, t, tl.load(LSE + row), tl.load(GRAD_SCALE), V, softcap, scale, HAS_SOFTCAP, HAS_ADD,
                    BLOCK_V)
    else:
        _write_zeros(DX, ADD, V, HAS_ADD, BLOCK_V)


# --------------------------------------------------------------------------------------------------------------
# Launchers (any device Triton runs on, the CPU interpreter included)


def _block_v(V: int, block_v: int | None) -> int:
    return block_v or min(BLOCK_V, triton.next_power_of_2(V))


def _num_warps(block_v: int) -> int:
    return min(max(block_v // 512, 1), 8)


def _count(target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Number of counted targets as an fp32 0-d tensor, on the device: no host sync."""
    return (target != ignore_index).sum(dtype=torch.float32)


def _reduce(losses: torch.Tensor, count: torch.Tensor, reduction: str) -> torch.Tensor:
    loss = losses.sum()
    return loss / count if reduction == "mean" else loss  # mean of nothing is 0/0 = NaN, as torch


def ce_rows(x, target, losses, lse, ignore_index, softcap, scale, dx=None, grad_scale=None, block_v=None):
    """Run the forward row kernel on a (rows, V) block: per-row loss and lse, and the gradient into dx if given."""
    rows, V = x.shape
    if rows == 0:
        return
    bv = _block_v(V, block_v)
    write_grad = dx is not None
    _ce_fwd_kernel[(rows,)](
        x, dx if write_grad else x, target, losses, lse, grad_scale if write_grad else losses,
        x.stride(0), dx.stride(0) if write_grad else 0, V, ignore_index, float(softcap), float(scale),
        HAS_SOFTCAP=softcap != 0.0, WRITE_GRAD=write_grad, BLOCK_V=bv, num_warps=_num_warps(bv),
    )


def cross_entropy_fwd(logits, target, ignore_index: int, reduction: str, softcap: float = 0.0,
                      logit_scale: float = 1.0, block_v: int | None = None):
    """(N, V) logits -> (loss fp32 0-d, lse fp32 (N,))."""
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    target = target.contiguous()
    N = logits.shape[0]
    losses = torch.empty(N, dtype=torch.float32, device=logits.device)
    lse = torch.empty(N, dtype=torch.float32, device=logits.device)
    ce_rows(logits, target, losses, lse, ignore_index, softcap, logit_scale, block_v=block_v)
    return _reduce(losses, _count(target, ignore_index), reduction), lse


def ce_grad_rows(x, target, lse, grad_scale, dx, ignore_index, softcap, scale, add=None, block_v=None):
    """Run the backward row kernel on a (rows, V) block: dx = d loss / dx * grad_scale[0] (+ add)."""
    rows, V = x.shape
    if rows == 0:
        return
    bv = _block_v(V, block_v)
    has_add = add is not None
    _ce_bwd_kernel[(rows,)](
        x, dx, add if has_add else x, target, lse, grad_scale, x.stride(0), dx.stride(0),
        add.stride(0) if has_add else 0, V, ignore_index, float(softcap), float(scale),
        HAS_SOFTCAP=softcap != 0.0, HAS_ADD=has_add, BLOCK_V=bv, num_warps=_num_warps(bv),
    )


def cross_entropy_bwd(grad, logits, target, lse, ignore_index: int, reduction: str, softcap: float = 0.0,
                      logit_scale: float = 1.0, block_v: int | None = None):
    """dlogits in the logits' dtype, grad_output folded in."""
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    target = target.contiguous()
    dlogits = torch.empty_like(logits, memory_format=torch.contiguous_format)
    ce_grad_rows(logits, target, lse, grad_scale_of(grad, target, ignore_index, reduction), dlogits, ignore_index,
                 softcap, logit_scale, block_v=block_v)
    return dlogits


def grad_scale_of(grad, target, ignore_index: int, reduction: str) -> torch.Tensor:
    """grad_output [/ count], a 1-element fp32 tensor on the device (no host sync)."""
    scale = grad.float().reshape(1)
    return scale / _count(target, ignore_index) if reduction == "mean" else scale


# --------------------------------------------------------------------------------------------------------------
# Reference: the single source of truth for tests, benchmarks and the CPU implementation


def transform_ref(x: torch.Tensor, softcap: float, logit_scale: float) -> torch.Tensor:
    if softcap != 0.0:
        x = torch.tanh(x / softcap) * softcap
    return x * logit_scale if logit_scale != 1.0 else x


def cross_entropy_ref(logits, target, ignore_index: int = -100, reduction: str = "mean", softcap: float = 0.0,
                      logit_scale: float = 1.0) -> torch.Tensor:
    """As HF's ForCausalLMLoss: upcast, softcap, scale, cross-entropy. fp32 loss."""
    z = transform_ref(logits.float(), softcap, logit_scale)
    return torch.nn.functional.cross_entropy(z, target, ignore_index=ignore_index, reduction=reduction)


def cross_entropy_ref_backward(grad, logits, target, ignore_index: int = -100, reduction: str = "mean",
                               softcap: float = 0.0, logit_scale: float = 1.0) -> torch.Tensor:
    """d loss / d logits in the logits' dtype, written out: the CPU implementations run below the autograd dispatch
    key, where autograd records nothing. The tests check it against autograd of `cross_entropy_ref`."""
    x = logits.float()
    z = transform_ref(x, softcap, logit_scale)
    valid = target != ignore_index
    g = torch.softmax(z, -1)
    g = g.scatter_add(-1, torch.where(valid, target, 0)[:, None], -valid[:, None].float())
    scale = grad.float() / valid.sum() if reduction == "mean" else grad.float()
    g = torch.where(valid[:, None], g * scale, 0.0)  # after scaling: 1/0 for an all-ignored mean must not leak NaN
    if softcap != 0.0:
        g = g * (1 - torch.tanh(x / softcap) ** 2)
    return (g * logit_scale if logit_scale != 1.0 else g).to(logits.dtype)


def _ref_lse(logits, softcap, logit_scale):
    return torch.logsumexp(transform_ref(logits.float(), softcap, logit_scale), -1)


# --------------------------------------------------------------------------------------------------------------
# The library op


def _check_args(reduction: str, softcap: float):
    if reduction not in REDUCTIONS:
        raise ValueError(f"liger_fx.cross_entropy: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if softcap < 0:
        raise ValueError(f"liger_fx.cross_entropy: softcap must be >= 0 (0 = none), got {softcap}")


@torch.library.custom_op("liger_fx::cross_entropy", mutates_args=())
def _cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int, reduction: str, softcap: float, logit_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if logits.device.type == "cuda":
        return cross_entropy_fwd(logits, target, ignore_index, reduction, softcap, logit_scale)
    loss = cross_entropy_ref(logits, target, ignore_index, reduction, softcap, logit_scale)
    return loss, _ref_lse(logits, softcap, logit_scale)


@_cross_entropy.register_fake
def _(logits, target, ignore_index, reduction, softcap, logit_scale):
    return logits.new_empty((), dtype=torch.float32), logits.new_empty(logits.shape[:1], dtype=torch.float32)


@torch.library.custom_op("liger_fx::cross_entropy_backward", mutates_args=())
def _cross_entropy_backward(
    grad: torch.Tensor, logits: torch.Tensor, target: torch.Tensor, lse: torch.Tensor, ignore_index: int,
    reduction: str, softcap: float, logit_scale: float,
) -> torch.Tensor:
    if logits.device.type == "cuda":
        return cross_entropy_bwd(grad, logits, target, lse, ignore_index, reduction, softcap, logit_scale)
    return cross_entropy_ref_backward(grad, logits, target, ignore_index, reduction, softcap, logit_scale)


@_cross_entropy_backward.register_fake
def _(grad, logits, target, lse, ignore_index, reduction, softcap, logit_scale):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    logits, target, ignore_index, reduction, softcap, logit_scale = inputs
    ctx.save_for_backward(logits, target, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # lse is never differentiated: no zeros for it
    ctx.args = (ignore_index, reduction, softcap, logit_scale)


def _backward(ctx, grad, _grad_lse):
    logits, target, lse = ctx.saved_tensors
    dlogits = None
    if ctx.needs_input_grad[0] and grad is not None:
        dlogits = torch.ops.liger_fx.cross_entropy_backward(grad, logits, target, lse, *ctx.args)
    return dlogits, None, None, None, None, None


_cross_entropy.register_autograd(_backward, setup_context=_setup_context)


def cross_entropy(logits, target, ignore_index: int = -100, reduction: str = "mean", softcap: float = 0.0,
                  logit_scale: float = 1.0) -> torch.Tensor:
    """Fused cross-entropy over (N, V) logits of any float dtype, computed in fp32 without an fp32 copy. Returns the
    fp32 loss."""
    _check_args(reduction, softcap)
    return torch.ops.liger_fx.cross_entropy(
        logits, target, int(ignore_index), reduction, float(softcap), float(logit_scale)
    )[0]
