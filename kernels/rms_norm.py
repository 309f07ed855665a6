"""RMSNorm: `liger_fx::rms_norm(x, weight, eps, offset, casting)`.

    llama:  (weight + offset) * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype)
    gemma:  ((x.float() * rsqrt(mean(x.float()^2) + eps)) * (offset + weight.float())).to(x.dtype)

One program per row: a 4096-wide bf16 row is 8 KB, loaded once, reduced in fp32 registers, written once. The backward
recomputes rstd from x, which it must load anyway, so nothing but x and weight is saved (no fp32 rstd tensor). dW is
reduced in fp32: each program sums its rows into one partial row, and a (programs x N) fp32 sum finishes it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CASTINGS = ("llama", "gemma")


# --------------------------------------------------------------------------------------------------------------
# Triton kernels


@triton.jit
def _rms_norm_fwd_kernel(
    X, W, Y, stride_x, stride_y, N, eps, offset,
    GEMMA: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    b_x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    b_w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset
    rstd = tl.rsqrt(tl.sum(b_x * b_x, axis=0) / N + eps)
    if GEMMA:
        b_y = b_x * rstd * b_w
    else:
        # Round the normalized value to x's dtype before the weight, as the eager module does.
        b_y = b_w * (b_x * rstd).to(X.dtype.element_ty).to(tl.float32)
    tl.store(Y + row * stride_y + cols, b_y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    DY, X, W, DX, DW_PARTIAL, stride_dy, stride_x, stride_dx, M, N, eps, offset, rows_per_program,
    GEMMA: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    b_w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset
    b_dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row_start = pid * rows_per_program
    for i in range(0, rows_per_program):
        row = (row_start + i).to(tl.int64)
        if row < M:
            b_x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            b_dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.rsqrt(tl.sum(b_x * b_x, axis=0) / N + eps)
            b_xhat = b_x * rstd
            if GEMMA:
                b_dw += b_dy * b_xhat
            else:
                b_dw += b_dy * b_xhat.to(X.dtype.element_ty).to(tl.float32)
            b_g = b_dy * b_w
            b_dx = rstd * (b_g - b_xhat * (tl.sum(b_g * b_xhat, axis=0) / N))
            tl.store(DX + row * stride_dx + cols, b_dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW_PARTIAL + pid * N + cols, b_dw, mask=mask)


# --------------------------------------------------------------------------------------------------------------
# Launchers (any device Triton runs on, the CPU interpreter included)


def _out_dtype(x: torch.Tensor, weight: torch.Tensor, casting: str) -> torch.dtype:
    return x.dtype if casting == "gemma" else torch.promote_types(weight.dtype, x.dtype)


def _num_warps(block_n: int) -> int:
    # 4096 bf16 columns over 8 warps is 16 elements a thread: two 16-byte loads, no spills.
    return min(max(block_n // 512, 1), 16)


def rms_norm_fwd(x, weight, eps: float, offset: float = 0.0, casting: str = "llama", num_warps=None) -> torch.Tensor:
    N = x.shape[-1]
    x2 = x.reshape(-1, N)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(x2.shape, dtype=_out_dtype(x, weight, casting), device=x.device)
    M = x2.shape[0]
    if M == 0:
        return y.view(x.shape)
    block_n = triton.next_power_of_2(N)
    _rms_norm_fwd_kernel[(M,)](
        x2, weight, y, x2.stride(0), y.stride(0), N, float(eps), float(offset),
        GEMMA=casting == "gemma", BLOCK_N=block_n, num_warps=num_warps or _num_warps(block_n),
    )
    return y.view(x.shape)


def rms_norm_bwd(dy, x, weight, eps: float, offset: float = 0.0, casting: str = "llama", programs_per_sm=4,
                 num_warps=None):
    N = x.shape[-1]
    x2 = x.reshape(-1, N)
    dy2 = dy.reshape(-1, N)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if dy2.stride(-1) != 1:
        dy2 = dy2.contiguous()
    M = x2.shape[0]
    dx = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if x.device.type == "cuda":
        programs = torch.cuda.get_device_properties(x.device).multi_processor_count * programs_per_sm
    else:
        programs = 4
    programs = max(1, min(programs, M))
    rows_per_program = triton.cdiv(M, programs)
    dw_partial = torch.empty((programs, N), dtype=torch.float32, device=x.device)
    if M > 0:
        block_n = triton.next_power_of_2(N)
        _rms_norm_bwd_kernel[(programs,)](
            dy2, x2, weight, dx, dw_partial, dy2.stride(0), x2.stride(0), dx.stride(0), M, N,
            float(eps), float(offset), rows_per_program,
            GEMMA=casting == "gemma", BLOCK_N=block_n, num_warps=num_warps or _num_warps(block_n),
        )
    else:
        dw_partial.zero_()
    dw = dw_partial.sum(0).to(weight.dtype)
    return dx.view(x.shape), dw


# --------------------------------------------------------------------------------------------------------------
# Reference: the single source of truth for tests, benchmarks and the CPU implementation


def rms_norm_ref(x, weight, eps: float, offset: float = 0.0, casting: str = "llama") -> torch.Tensor:
    xf = x.float()
    xhat = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if casting == "gemma":
        return (xhat * (offset + weight.float())).to(x.dtype)
    return (weight + offset) * xhat.to(x.dtype)


def rms_norm_ref_backward(dy, x, weight, eps: float, offset: float = 0.0, casting: str = "llama"):
    """The Triton backward's math in torch (fp32). Autograd can't serve here: the op's CPU implementation runs below
    the autograd dispatch key, so nothing inside it records a graph."""
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    xhat = xf * rstd
    dyf = dy.float()
    dw_rows = dyf * (xhat if casting == "gemma" else xhat.to(x.dtype).float())
    g = dyf * (weight.float() + offset)
    dx = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))
    return dx.to(x.dtype), dw_rows.reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)


# --------------------------------------------------------------------------------------------------------------
# The library op


@torch.library.custom_op("liger_fx::rms_norm", mutates_args=())
def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float, casting: str) -> torch.Tensor:
    if x.device.type == "cuda":
        return rms_norm_fwd(x, weight, eps, offset, casting)
    return rms_norm_ref(x, weight, eps, offset, casting)


@_rms_norm.register_fake
def _(x, weight, eps, offset, casting):
    return x.new_empty(x.shape, dtype=_out_dtype(x, weight, casting))


@torch.library.custom_op("liger_fx::rms_norm_backward", mutates_args=())
def _rms_norm_backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float, casting: str
) -> tuple[torch.Tensor, torch.Tensor]:
    if x.device.type == "cuda":
        return rms_norm_bwd(dy, x, weight, eps, offset, casting)
    return rms_norm_ref_backward(dy, x, weight, eps, offset, casting)


@_rms_norm_backward.register_fake
def _(dy, x, weight, eps, offset, casting):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight)


def _setup_context(ctx, inputs, output):
    x, weight, eps, offset, casting = inputs
    ctx.save_for_backward(x, weight)
    ctx.args = (eps, offset, casting)


def _backward(ctx, dy):
    x, weight = ctx.saved_tensors
    dx, dw = torch.ops.liger_fx.rms_norm_backward(dy, x, weight, *ctx.args)
    return dx, dw, None, None, None


_rms_norm.register_autograd(_backward, setup_context=_setup_context)


def rms_norm(x, weight, eps: float = 1e-6, offset: float = 0.0, casting: str = "llama") -> torch.Tensor:
    """Fused RMSNorm over the last dim. `casting` is `llama` (weight applied in x's dtype) or `gemma` (in fp32)."""
    if casting not in CASTINGS:
        raise ValueError(f"liger_fx.rms_norm: casting must be one of {CASTINGS}, got {casting!r}")
    return torch.ops.liger_fx.rms_norm(x, weight, float(eps), float(offset), casting)
