"""RMSNorm: `liger_fx::rms_norm(x, weight, eps, offset, casting)`.

    llama:  (weight + offset) * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype)
    gemma:  ((x.float() * rsqrt(mean(x.float()^2) + eps)) * (offset + weight.float())).to(x.dtype)
            (offset 0 is torch's own `nn.RMSNorm` / `F.rms_norm`: the weight multiply in fp32, one rounding)
    no weight (`weight=None`: Llama-4's q/k norm, DeepSeek-V4's unweighted norms, `nn.RMSNorm(elementwise_affine=
            False)`): (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype), either casting. The backward returns
            no weight gradient and reads no weight (HAS_WEIGHT=False): nothing of a ones-weight is made or reduced.

One program per row: a 4096-wide bf16 row is 8 KB, loaded once, reduced in fp32 registers, written once. The backward
recomputes rstd from x, which it must load anyway, so nothing but x and weight is saved (no fp32 rstd tensor). dW is
reduced in fp32: each program sums its rows into one partial row, and a (programs x N) fp32 sum finishes it.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._library import triton_library_op

CASTINGS = ("llama", "gemma")


# --------------------------------------------------------------------------------------------------------------
# Triton kernels
#
# _FP32_SCALARS: eps and offset are cast to fp32 first. Inductor launches these kernels itself (triton_op) and types
# a Python float argument as fp64 (torch 2.11: inductor.config._use_fp64_for_unbacked_floats); uncast, fp64 spreads
# through the row math, and in the backward it reaches the loop-carried dW sum, which Triton refuses to compile
# ("b_dw has initial type fp32 but is re-assigned to fp64"): every Gemma model failed to compile on the H200.


@triton.jit
def _rms_norm_fwd_kernel(
    X, W, Y, stride_x, stride_y, M, N, eps, offset,
    GEMMA: tl.constexpr, HAS_WEIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    eps, offset = tl.cast(eps, tl.float32), tl.cast(offset, tl.float32)  # see _FP32_SCALARS
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    b_x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(b_x * b_x, axis=1) / N + eps)
    b_xhat = b_x * rstd[:, None]
    if not HAS_WEIGHT:  # W is not read (the launcher passes X in its place)
        b_y = b_xhat
    elif GEMMA:
        b_y = b_xhat * (tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32) + offset)[None, :]
    else:
        # Round the normalized value to x's dtype before the weight, as the eager module does.
        b_w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32) + offset
        b_y = b_w[None, :] * b_xhat.to(X.dtype.element_ty).to(tl.float32)
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], b_y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(
    DY, X, W, DX, DW_PARTIAL, stride_dy, stride_x, stride_dx, M, N, eps, offset, blocks_per_program,
    GEMMA: tl.constexpr, HAS_WEIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # HAS_WEIGHT=False: W and DW_PARTIAL are neither read nor written (the launcher passes X and DX in their place).
    eps, offset = tl.cast(eps, tl.float32), tl.cast(offset, tl.float32)  # see _FP32_SCALARS
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    if HAS_WEIGHT:
        b_w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32) + offset
    b_dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for i in range(0, blocks_per_program):
        rows = (pid * blocks_per_program + i).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < M) & col_mask[None, :]
        b_x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        b_dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(b_x * b_x, axis=1) / N + eps)
        b_xhat = b_x * rstd[:, None]
        if HAS_WEIGHT:
            if GEMMA:
                b_dw += tl.sum(b_dy * b_xhat, axis=0)
            else:
                b_dw += tl.sum(b_dy * b_xhat.to(X.dtype.element_ty).to(tl.float32), axis=0)
            b_g = b_dy * b_w[None, :]
        else:
            b_g = b_dy
        b_dx = rstd[:, None] * (b_g - b_xhat * (tl.sum(b_g * b_xhat, axis=1) / N)[:, None])
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], b_dx.to(DX.dtype.element_ty), mask=mask)
    if HAS_WEIGHT:
        tl.store(DW_PARTIAL + pid * N + cols, b_dw, mask=col_mask)


# --------------------------------------------------------------------------------------------------------------
# Launchers (any device Triton runs on, the CPU interpreter included)


def _out_dtype(x: torch.Tensor, weight: torch.Tensor | None, casting: str) -> torch.dtype:
    return x.dtype if casting == "gemma" or weight is None else torch.promote_types(weight.dtype, x.dtype)


# STATIC_ROW: the row length sets the tile (constexprs), so it must be a number when the launcher is traced with
# symbolic shapes (AOTAutograd under dynamic=True, opcheck): int() specializes it, a guard that never fails for a
# model's hidden or head size. Left symbolic, it reached the constexprs ("unhashable type: non-nested SymInt").


def _tile(N: int, block_m=None, num_warps=None):
    """(BLOCK_M, BLOCK_N, num_warps). Rows are packed until a tile holds ~4096 elements: a q/k norm over
    head_dim 128 would otherwise launch one 128-element program per row (524k programs at B8 T2048 H32).
    4096 bf16 columns over 8 warps is 16 elements a thread: two 16-byte loads, no spills."""
    block_n = triton.next_power_of_2(N)
    block_m = block_m or max(1, min(64, 4096 // block_n))
    warps = num_warps or min(max(block_m * block_n // 512, 1), 16)
    return block_m, block_n, warps


def rms_norm_fwd(x, weight, eps: float, offset: float = 0.0, casting: str = "llama", block_m=None,
                 num_warps=None) -> torch.Tensor:
    N = int(x.shape[-1])  # STATIC_ROW
    x2 = x.reshape(-1, N)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(x2.shape, dtype=_out_dtype(x, weight, casting), device=x.device)
    M = x2.shape[0]
    if M == 0:
        return y.view(x.shape)
    block_m, block_n, warps = _tile(N, block_m, num_warps)
    wrap_triton(_rms_norm_fwd_kernel)[(triton.cdiv(M, block_m),)](
        x2, x2 if weight is None else weight, y, x2.stride(0), y.stride(0), M, N, float(eps), float(offset),
        GEMMA=casting == "gemma", HAS_WEIGHT=weight is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
    )
    return y.view(x.shape)


# Backward launch, from H200 sweeps at 16384x4096 bf16 (kernel only; the copy roofline of its 3 passes is 0.094 ms):
# one row a block, 8 warps: programs/SM 1 -> 0.257 ms, 2 -> 0.164, 4 -> 0.185, 16 -> 0.161; two rows a block,
# 8 warps: 2 -> 0.135, 4 -> 0.148, 16 -> 0.154 (16 warps: 0.195+). Two rows in flight per program hide the
# load latency that one row a step exposes; few programs keep the fp32 dW partials small (264 x N).
PROGRAMS_PER_SM = 2
BWD_TILE_ELEMENTS = 8192


@functools.cache
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (4 elsewhere: the interpreter runs programs one by one)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def rms_norm_bwd(dy, x, weight, eps: float, offset: float = 0.0, casting: str = "llama",
                 programs_per_sm=PROGRAMS_PER_SM, block_m=None, num_warps=None):
    N = int(x.shape[-1])  # STATIC_ROW
    x2 = x.reshape(-1, N)
    dy2 = dy.reshape(-1, N)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if dy2.stride(-1) != 1:
        dy2 = dy2.contiguous()
    M = x2.shape[0]
    dx = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    block_m, block_n, warps = _tile(N, block_m or max(1, min(64, BWD_TILE_ELEMENTS // triton.next_power_of_2(N))),
                                    num_warps or 8)
    # A fixed number of programs, not min(programs, blocks): under dynamic shapes M is symbolic there, and each
    # comparison of it in Python is a guard (`blocks <= 1`, `blocks < 264`) that recompiled the graph for a new
    # sequence length on the H200. Programs past the last row store zero partials (264 x N fp32 at most).
    programs = num_sms(x.device) * programs_per_sm
    blocks_per_program = triton.cdiv(triton.cdiv(M, block_m), programs)
    has_weight = weight is not None
    dw_partial = torch.empty((programs, N), dtype=torch.float32, device=x.device) if has_weight else dx
    wrap_triton(_rms_norm_bwd_kernel)[(programs,)](
        dy2, x2, weight if has_weight else x2, dx, dw_partial, dy2.stride(0), x2.stride(0), dx.stride(0), M, N,
        float(eps), float(offset), blocks_per_program,
        GEMMA=casting == "gemma", HAS_WEIGHT=has_weight, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
    )
    dw = dw_partial.sum(0).to(weight.dtype) if has_weight else None
    return dx.view(x.shape), dw


# --------------------------------------------------------------------------------------------------------------
# Reference: the single source of truth for tests, benchmarks and the CPU implementation


def rms_norm_ref(x, weight, eps: float, offset: float = 0.0, casting: str = "llama") -> torch.Tensor:
    xf = x.float()
    xhat = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is None:
        return xhat.to(x.dtype)
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
    g = dyf if weight is None else dyf * (weight.float() + offset)
    dx = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))
    if weight is None:
        return dx.to(x.dtype), None
    dw_rows = dyf * (xhat if casting == "gemma" else xhat.to(x.dtype).float())
    return dx.to(x.dtype), dw_rows.reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)


# --------------------------------------------------------------------------------------------------------------
# The library op


def _rms_norm_cpu(x, weight, eps, offset, casting):
    # Contiguous like the Triton path: the reference keeps a transposed input's strides (Gemma3's q/k norms), and
    # Inductor asserts the strides the fake promised.
    return rms_norm_ref(x, weight, eps, offset, casting).contiguous()


@triton_library_op("liger_fx::rms_norm", cpu=_rms_norm_cpu)
def _rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, offset: float, casting: str) -> torch.Tensor:
    return rms_norm_fwd(x, weight, eps, offset, casting)


def _rms_norm_backward_cpu(dy, x, weight, eps, offset, casting):
    dx, dw = rms_norm_ref_backward(dy, x, weight, eps, offset, casting)
    return dx.contiguous(), dw


@triton_library_op("liger_fx::rms_norm_backward", cpu=_rms_norm_backward_cpu)
def _rms_norm_backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float, casting: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return rms_norm_bwd(dy, x, weight, eps, offset, casting)


# Without a weight there is no weight gradient: an op of its own returning dx alone, rather than a placeholder
# tensor for dW (a schema's outputs are fixed).
def _rms_norm_backward_dx_cpu(dy, x, eps):
    return rms_norm_ref_backward(dy, x, None, eps)[0].contiguous()


@triton_library_op("liger_fx::rms_norm_backward_dx", cpu=_rms_norm_backward_dx_cpu)
def _rms_norm_backward_dx(dy: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    return rms_norm_bwd(dy, x, None, eps)[0]


def _setup_context(ctx, inputs, output):
    x, weight, eps, offset, casting = inputs
    ctx.save_for_backward(x, weight)
    ctx.args = (eps, offset, casting)


def _backward(ctx, dy):
    x, weight = ctx.saved_tensors
    if weight is None:
        return torch.ops.liger_fx.rms_norm_backward_dx(dy, x, ctx.args[0]), None, None, None, None
    dx, dw = torch.ops.liger_fx.rms_norm_backward(dy, x, weight, *ctx.args)
    return dx, dw, None, None, None


_rms_norm.register_autograd(_backward, setup_context=_setup_context)


def rms_norm(x, weight=None, eps: float = 1e-6, offset: float = 0.0, casting: str = "llama") -> torch.Tensor:
    """Fused RMSNorm over the last dim. `casting` is `llama` (weight applied in x's dtype) or `gemma` (in fp32);
    `weight=None` normalizes only (offset must then be 0)."""
    if casting not in CASTINGS:
        raise ValueError(f"liger_fx.rms_norm: casting must be one of {CASTINGS}, got {casting!r}")
    if weight is None and offset:
        raise ValueError(f"liger_fx.rms_norm: offset={offset} needs a weight (weight=None normalizes only)")
    return torch.ops.liger_fx.rms_norm(x, weight, float(eps), float(offset), casting)
