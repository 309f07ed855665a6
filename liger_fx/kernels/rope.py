"""Rotary position embedding: `liger_fx::rope(x, cos, sin, out_dtype)` and `liger_fx::rope_qk(q, k, cos, sin, ...)`.

    out[..., :rd] = x[..., :rd] * cos + rotate_half(x[..., :rd]) * sin,   rotate_half(u) = cat(-u2, u1)
    out[..., rd:] = x[..., rd:]                                           (partial rotary, rd = cos.shape[-1])

The rotated pairs are (i, i + rd/2) by default ("halves", HF's rotate_half). `x_pairs=True` reads them as interleaved
pairs (2i, 2i + 1) instead (GPT-J, GLM, Cohere, complex-number RoPE as in Meta's Llama), `y_pairs=True` writes
them so, and the tables are laid out as the result: both True is the interleaved rotation; `x_pairs` alone reads
interleaved pairs and writes halves, which is DeepSeek's (HF's `apply_rotary_pos_emb_interleave`; the result feeds
attention as halves, consistently for q and k).

`cos`/`sin` are passed already broadcastable to x (HF's `cos.unsqueeze(unsqueeze_dim)`), not 3-D plus a dim: in HF
the one unsqueeze feeds both q and k, so it sits outside either match, and a model that precomputes (1, 1, T, D)
tables needs no unsqueeze at all. One of x's non-channel axes must be broadcast in cos (the head axis).

One program per (batch, position) row: it loads the cos/sin row once, in fp32, and rotates every head of q, then
every head of k (GQA: their head counts differ) in the same launch. At Llama's 32 q + 8 kv heads of 128 channels in
bf16 a program moves 20 KB and reads cos/sin once for 40 heads. q and k are read through their strides (after HF's
transpose q is a (B, H, T, D) view of (B, T, H, D) memory), and outputs take x's layout, so the gradient flows back
through the transpose and the view to the linear's output without a copy.

The backward is the same kernel with the rotation transposed (dx = g*cos - rotate_half(g*sin), i.e. the rotation
by -sin when the two halves of sin are equal, as in every HF table); it needs only cos and sin, so nothing of the
size of q or k is saved for it. cos and sin get no gradient: the ops refuse inputs that require one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._library import triton_library_op


# --------------------------------------------------------------------------------------------------------------
# Triton kernels


@triton.jit
def _pair_cols(cols, HALF: tl.constexpr, PAIRS: tl.constexpr):
    """The channels of rotated pair i: (2i, 2i + 1) when PAIRS (interleaved), else (i, i + HALF). Interleaved loads
    are stride-2 but the two of a pair share their cache lines, so a row still moves its bytes once."""
    if PAIRS:
        first = 2 * cols
        second = first + 1
    else:
        first = cols
        second = cols + HALF
    return first, second


@triton.jit
def _rope_heads(
    X, Y, off_x, off_y, stride_xh, stride_yh, H, b_c1, b_c2, b_s1, b_s2,
    D: tl.constexpr, HALF: tl.constexpr, BACKWARD: tl.constexpr, IN_PAIRS: tl.constexpr, OUT_PAIRS: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
):
    """Rotate the H heads of one (batch, position) row, BLOCK_H heads at a time."""
    cols = tl.arange(0, BLOCK_HALF)
    col_mask = cols < HALF
    in1, in2 = _pair_cols(cols, HALF, IN_PAIRS)
    out1, out2 = _pair_cols(cols, HALF, OUT_PAIRS)
    for h0 in range(0, H, BLOCK_H):
        heads = h0 + tl.arange(0, BLOCK_H)
        mask = (heads < H)[:, None] & col_mask[None, :]
        p_x = X + off_x + heads[:, None] * stride_xh
        p_y = Y + off_y + heads[:, None] * stride_yh
        b_x1 = tl.load(p_x + in1[None, :], mask=mask, other=0.0).to(tl.float32)
        b_x2 = tl.load(p_x + in2[None, :], mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:  # the transpose of [[c1, -s1], [s2, c2]]
            b_y1 = b_x1 * b_c1 + b_x2 * b_s2
            b_y2 = b_x2 * b_c2 - b_x1 * b_s1
        else:
            b_y1 = b_x1 * b_c1 - b_x2 * b_s1
            b_y2 = b_x2 * b_c2 + b_x1 * b_s2
        tl.store(p_y + out1[None, :], b_y1.to(Y.dtype.element_ty), mask=mask)
        tl.store(p_y + out2[None, :], b_y2.to(Y.dtype.element_ty), mask=mask)
        if BLOCK_PASS > 0:  # channels past the rotary dim are copied (cast to the output dtype)
            pcols = 2 * HALF + tl.arange(0, BLOCK_PASS)
            pmask = (heads < H)[:, None] & (pcols < D)[None, :]
            b_p = tl.load(X + off_x + heads[:, None] * stride_xh + pcols[None, :], mask=pmask, other=0.0)
            tl.store(Y + off_y + heads[:, None] * stride_yh + pcols[None, :], b_p.to(Y.dtype.element_ty), mask=pmask)


@triton.jit
def _rope_kernel(
    X, Y, K, KY, COS, SIN,
    stride_x0, stride_x1, stride_x2, stride_y0, stride_y1, stride_y2,
    stride_k0, stride_k1, stride_k2, stride_ky0, stride_ky1, stride_ky2,
    stride_c0, stride_c2, stride_s0, stride_s2,
    N2, HX, HK,
    D: tl.constexpr, HALF: tl.constexpr, HAS_K: tl.constexpr, BACKWARD: tl.constexpr,
    IN_PAIRS: tl.constexpr, OUT_PAIRS: tl.constexpr, TABLE_PAIRS: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
):
    # Axis 1 is the head axis (cos is broadcast along it); a program owns one (axis 0, axis 2) position.
    # IN_PAIRS, OUT_PAIRS, TABLE_PAIRS: whether what it reads, what it writes and cos/sin hold interleaved pairs.
    pid = tl.program_id(0).to(tl.int64)
    i0 = pid // N2
    i2 = pid % N2
    cols = tl.arange(0, BLOCK_HALF)
    col_mask = cols < HALF
    t1, t2 = _pair_cols(cols, HALF, TABLE_PAIRS)
    p_c = COS + i0 * stride_c0 + i2 * stride_c2
    p_s = SIN + i0 * stride_s0 + i2 * stride_s2
    b_c1 = tl.load(p_c + t1, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    b_c2 = tl.load(p_c + t2, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    b_s1 = tl.load(p_s + t1, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    b_s2 = tl.load(p_s + t2, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    _rope_heads(
        X, Y, i0 * stride_x0 + i2 * stride_x2, i0 * stride_y0 + i2 * stride_y2, stride_x1, stride_y1, HX,
        b_c1, b_c2, b_s1, b_s2, D, HALF, BACKWARD, IN_PAIRS, OUT_PAIRS, BLOCK_H, BLOCK_HALF, BLOCK_PASS,
    )
    if HAS_K:
        _rope_heads(
            K, KY, i0 * stride_k0 + i2 * stride_k2, i0 * stride_ky0 + i2 * stride_ky2, stride_k1, stride_ky1, HK,
            b_c1, b_c2, b_s1, b_s2, D, HALF, BACKWARD, IN_PAIRS, OUT_PAIRS, BLOCK_H, BLOCK_HALF, BLOCK_PASS,
        )


# --------------------------------------------------------------------------------------------------------------
# Launchers (any device Triton runs on, the CPU interpreter included)


def _empty_like(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # x's own layout when it is dense (a transposed q stays (B, T, H, D) in memory), else contiguous; the fake
    # implementations allocate the same way so Inductor's stride assumptions hold. Tests poison through this hook.
    out = torch.empty_like(x, dtype=dtype)
    return out if out.stride(-1) == 1 or out.numel() <= 1 else torch.empty(x.shape, dtype=dtype, device=x.device)


def rope_axes(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k: torch.Tensor | None = None) -> list[int]:
    """Validate shapes (ValueError naming the problem); return the axes of x that can be the head axis, the one a
    program iterates: axes along which cos/sin are broadcast and, with k, the axis where q and k differ if they do.
    Chooses nothing, so a guard on symbolic shapes can call it without comparing sizes across symbols."""
    if x.dim() not in (3, 4):
        raise ValueError(f"liger_fx.rope: x must be 3-D or 4-D, got shape {tuple(x.shape)}")
    if cos.shape != sin.shape:
        raise ValueError(f"liger_fx.rope: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} differ in shape")
    rd = cos.shape[-1]
    if rd % 2 or rd == 0 or rd > x.shape[-1]:
        raise ValueError(f"liger_fx.rope: rotary dim {rd} must be even, positive and at most head dim {x.shape[-1]}")
    if cos.dim() > x.dim():
        raise ValueError(f"liger_fx.rope: cos {tuple(cos.shape)} has more dims than x {tuple(x.shape)}")
    cshape = (1,) * (x.dim() - cos.dim()) + tuple(cos.shape)
    for a in range(x.dim() - 1):
        if cshape[a] != 1 and cshape[a] != x.shape[a]:
            raise ValueError(f"liger_fx.rope: cos {tuple(cos.shape)} does not broadcast to x {tuple(x.shape)}")
    axes = [a for a in range(x.dim() - 1) if cshape[a] == 1]
    if not axes:
        raise ValueError(f"liger_fx.rope: cos {tuple(cos.shape)} varies along every axis of x {tuple(x.shape)}; "
                         "one (the head axis) must be broadcast")
    if k is None:
        return axes
    rope_axes(k, cos, sin)
    differ = [a for a in range(x.dim() - 1) if k.dim() == x.dim() and k.shape[a] != x.shape[a]]
    if k.dim() != x.dim() or k.shape[-1] != x.shape[-1] or len(differ) > 1 or (differ and differ[0] not in axes):
        raise ValueError(f"liger_fx.rope_qk: q {tuple(x.shape)} and k {tuple(k.shape)} may differ only on one axis "
                         f"along which cos {tuple(cos.shape)} is broadcast (the head axis)")
    return differ or axes


TUNE: dict = {}  # launch overrides for bench sweeps: {"block_h": .., "num_warps": ..}


def _launch(x, k, cos, sin, x_dtype, k_dtype, backward: bool, x_pairs: bool = False, y_pairs: bool = False):
    """Shared by all four ops: rotate x (and k) with cos/sin; `backward` applies the transposed rotation, reading a
    gradient laid out as the result (`y_pairs`) and writing one laid out as x (`x_pairs`)."""
    axis = max(rope_axes(x, cos, sin, k), key=lambda a: x.shape[a])  # the most heads per cos row
    nd = x.dim()
    D, rd = int(x.shape[-1]), int(cos.shape[-1])  # static head and rotary dims (see rms_norm's STATIC_ROW)
    y = _empty_like(x, x_dtype)
    ky = _empty_like(k, k_dtype) if k is not None else None
    if x.numel() == 0 and (k is None or k.numel() == 0):
        return y, ky
    # Broadcast cos/sin to x's non-head axes as views (stride 0 where shared); the kernel never indexes the head
    # axis of cos. Their last dim is read as contiguous: HF tables are, and a copy of a T x rd table is small.
    shape = list(x.shape[:-1]) + [rd]
    shape[axis] = 1
    cos, sin = (t.expand(shape) if t.stride(-1) == 1 else t.contiguous().expand(shape) for t in (cos, sin))

    def view(t):  # 4-D with the head axis at 1; a 3-D tensor gains a leading size-1 axis
        t = t if t.stride(-1) == 1 else t.contiguous()
        return t.movedim(axis, 1) if nd == 4 else t.unsqueeze(0).movedim(axis + 1, 1)

    x4, y4, c4, s4 = (view(t) for t in (x, y, cos, sin))
    k4, ky4 = (view(k), view(ky)) if k is not None else (x4, y4)
    N0, HX, N2 = x4.shape[0], x4.shape[1], x4.shape[2]
    HK = k4.shape[1] if k is not None else 0
    half = rd // 2
    block_half = triton.next_power_of_2(half)
    block_pass = triton.next_power_of_2(D - rd) if D > rd else 0
    # A (heads x half) tile of at most 4096 fp32 values a half: 32 heads of 128 fit in one step.
    # 8 heads a step over 4 warps: at B8 T2048 q32 k8 d128 bf16 the forward took 0.0915 ms on an H200 (roofline
    # 0.079), against 0.123 ms for all 32 heads in one step (register pressure) and 0.094 for 4 heads.
    block_h = TUNE.get("block_h") or min(triton.next_power_of_2(max(HX, HK, 1)), max(1, 512 // block_half))
    num_warps = TUNE.get("num_warps") or (4 if block_h * block_half >= 512 else (2 if block_h * block_half >= 128 else 1))
    # The outputs go to the kernel as the tensors allocated above (same storage and offset as their views y4, ky4,
    # whose strides it gets): a write through a view would cost a copy of the base under torch.compile.
    wrap_triton(_rope_kernel)[(N0 * N2,)](
        x4, y, k4, ky if k is not None else y, c4, s4,
        x4.stride(0), x4.stride(1), x4.stride(2), y4.stride(0), y4.stride(1), y4.stride(2),
        k4.stride(0), k4.stride(1), k4.stride(2), ky4.stride(0), ky4.stride(1), ky4.stride(2),
        c4.stride(0), c4.stride(2), s4.stride(0), s4.stride(2),
        N2, HX, HK,
        D=D, HALF=half, HAS_K=k is not None, BACKWARD=backward,
        IN_PAIRS=y_pairs if backward else x_pairs, OUT_PAIRS=x_pairs if backward else y_pairs, TABLE_PAIRS=y_pairs,
        BLOCK_H=block_h, BLOCK_HALF=block_half, BLOCK_PASS=block_pass, num_warps=num_warps,
    )
    return y, ky


def rope_fwd(x, cos, sin, out_dtype=None, x_pairs=False, y_pairs=False):
    return _launch(x, None, cos, sin, out_dtype or _promote(x, cos, sin), None, False, x_pairs, y_pairs)[0]


def rope_bwd(dy, cos, sin, x_dtype, x_pairs=False, y_pairs=False):
    return _launch(dy, None, cos, sin, x_dtype, None, True, x_pairs, y_pairs)[0]


def rope_qk_fwd(q, k, cos, sin, q_dtype=None, k_dtype=None, x_pairs=False, y_pairs=False):
    return _launch(q, k, cos, sin, q_dtype or _promote(q, cos, sin), k_dtype or _promote(k, cos, sin), False,
                   x_pairs, y_pairs)


def rope_qk_bwd(dq, dk, cos, sin, q_dtype, k_dtype, x_pairs=False, y_pairs=False):
    return _launch(dq, dk, cos, sin, q_dtype, k_dtype, True, x_pairs, y_pairs)


def _promote(x, cos, sin) -> torch.dtype:
    """The dtype eager gives `x * cos + rotate_half(x) * sin`."""
    return torch.promote_types(torch.promote_types(x.dtype, cos.dtype), sin.dtype)


# --------------------------------------------------------------------------------------------------------------
# Reference: the single source of truth for tests, benchmarks and the CPU implementation


def rotate_half(u: torch.Tensor) -> torch.Tensor:
    h = u.shape[-1] // 2
    return torch.cat((-u[..., h:], u[..., :h]), dim=-1)


def to_halves(u: torch.Tensor) -> torch.Tensor:
    """Interleaved pairs (u0, u1), (u2, u3), ... of the last dim to halves (u0, u2, ...; u1, u3, ...)."""
    return u.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)


def to_pairs(u: torch.Tensor) -> torch.Tensor:
    """The inverse of `to_halves`."""
    return u.unflatten(-1, (2, -1)).transpose(-1, -2).flatten(-2)


def rope_ref(x, cos, sin, out_dtype=None, x_pairs=False, y_pairs=False):
    """HF's formula in fp32, rounded once to `out_dtype` (default: the dtype eager would give). Interleaved layouts
    are the same rotation with the pairs permuted into halves before it and back after it."""
    out_dtype = out_dtype or _promote(x, cos, sin)
    rd = cos.shape[-1]
    xf, c, s = x.float(), cos.float(), sin.float()
    xr = to_halves(xf[..., :rd]) if x_pairs else xf[..., :rd]
    c, s = (to_halves(c), to_halves(s)) if y_pairs else (c, s)
    rot = xr * c + rotate_half(xr) * s
    return torch.cat((to_pairs(rot) if y_pairs else rot, xf[..., rd:]), dim=-1).to(out_dtype)


def rope_ref_backward(dy, cos, sin, x_dtype, x_pairs=False, y_pairs=False):
    """dx = dy*cos + R^T(dy*sin), R^T(u) = cat(u2, -u1): the transpose of the rotation (by -sin for HF tables). dy
    is laid out as the result (`y_pairs`), dx as x (`x_pairs`)."""
    rd = cos.shape[-1]
    h = rd // 2
    g, c, s = dy.float(), cos.float(), sin.float()
    gr = g[..., :rd]
    if y_pairs:
        gr, c, s = to_halves(gr), to_halves(c), to_halves(s)
    gs = gr * s
    rot = gr * c + torch.cat((gs[..., h:], -gs[..., :h]), dim=-1)
    return torch.cat((to_pairs(rot) if x_pairs else rot, g[..., rd:]), dim=-1).to(x_dtype)


def _cpu(fn, like, dtype, *args):
    # The reference returns a contiguous tensor; copy it into the layout the fake promises.
    out = _empty_like(like, dtype)
    out.copy_(fn(*args))
    return out


# --------------------------------------------------------------------------------------------------------------
# The library ops


# x_pairs / y_pairs (default False, HF's halves): the layouts of x and of the result, see the module docstring.


def _rope_cpu(x, cos, sin, out_dtype, x_pairs=False, y_pairs=False):
    rope_axes(x, cos, sin)
    return _cpu(rope_ref, x, out_dtype, x, cos, sin, out_dtype, x_pairs, y_pairs)


@triton_library_op("liger_fx::rope", cpu=_rope_cpu)
def _rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out_dtype: torch.dtype, x_pairs: bool = False,
    y_pairs: bool = False,
) -> torch.Tensor:
    return rope_fwd(x, cos, sin, out_dtype, x_pairs, y_pairs)


def _rope_backward_cpu(dy, cos, sin, x_dtype, x_pairs=False, y_pairs=False):
    return _cpu(rope_ref_backward, dy, x_dtype, dy, cos, sin, x_dtype, x_pairs, y_pairs)


@triton_library_op("liger_fx::rope_backward", cpu=_rope_backward_cpu)
def _rope_backward(
    dy: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, x_dtype: torch.dtype, x_pairs: bool = False,
    y_pairs: bool = False,
) -> torch.Tensor:
    return rope_bwd(dy, cos, sin, x_dtype, x_pairs, y_pairs)


def _rope_qk_cpu(q, k, cos, sin, q_dtype, k_dtype, x_pairs=False, y_pairs=False):
    rope_axes(q, cos, sin, k)
    return (_cpu(rope_ref, q, q_dtype, q, cos, sin, q_dtype, x_pairs, y_pairs),
            _cpu(rope_ref, k, k_dtype, k, cos, sin, k_dtype, x_pairs, y_pairs))


@triton_library_op("liger_fx::rope_qk", cpu=_rope_qk_cpu)
def _rope_qk(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_dtype: torch.dtype, k_dtype: torch.dtype,
    x_pairs: bool = False, y_pairs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    return rope_qk_fwd(q, k, cos, sin, q_dtype, k_dtype, x_pairs, y_pairs)


def _rope_qk_backward_cpu(dq, dk, cos, sin, q_dtype, k_dtype, x_pairs=False, y_pairs=False):
    return (_cpu(rope_ref_backward, dq, q_dtype, dq, cos, sin, q_dtype, x_pairs, y_pairs),
            _cpu(rope_ref_backward, dk, k_dtype, dk, cos, sin, k_dtype, x_pairs, y_pairs))


@triton_library_op("liger_fx::rope_qk_backward", cpu=_rope_qk_backward_cpu)
def _rope_qk_backward(
    dq: torch.Tensor, dk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_dtype: torch.dtype,
    k_dtype: torch.dtype, x_pairs: bool = False, y_pairs: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    return rope_qk_bwd(dq, dk, cos, sin, q_dtype, k_dtype, x_pairs, y_pairs)


def _refuse_table_grad(cos, sin):
    # A gradient into cos/sin would need a reduction over heads we do not compute; returning None would be silent.
    if cos.requires_grad or sin.requires_grad:
        raise RuntimeError("liger_fx.rope: cos and sin must not require grad (no gradient is computed for them)")


def _setup_rope(ctx, inputs, output):
    x, cos, sin, _, x_pairs, y_pairs = inputs
    _refuse_table_grad(cos, sin)
    ctx.save_for_backward(cos, sin)
    ctx.x_dtype, ctx.pairs = x.dtype, (x_pairs, y_pairs)


def _backward_rope(ctx, dy):
    cos, sin = ctx.saved_tensors
    return torch.ops.liger_fx.rope_backward(dy, cos, sin, ctx.x_dtype, *ctx.pairs), None, None, None, None, None


def _setup_rope_qk(ctx, inputs, output):
    q, k, cos, sin, _, _, x_pairs, y_pairs = inputs
    _refuse_table_grad(cos, sin)
    ctx.save_for_backward(cos, sin)
    ctx.dtypes, ctx.pairs = (q.dtype, k.dtype), (x_pairs, y_pairs)


def _backward_rope_qk(ctx, dq, dk):
    cos, sin = ctx.saved_tensors
    dq, dk = torch.ops.liger_fx.rope_qk_backward(dq, dk, cos, sin, *ctx.dtypes, *ctx.pairs)
    return dq, dk, None, None, None, None, None, None


_rope.register_autograd(_backward_rope, setup_context=_setup_rope)
_rope_qk.register_autograd(_backward_rope_qk, setup_context=_setup_rope_qk)


def rope(x, cos, sin, out_dtype: torch.dtype | None = None, x_pairs: bool = False, y_pairs: bool = False):
    """Rotate x by cos/sin (broadcastable to x, e.g. HF's `cos.unsqueeze(1)` for (B, H, T, D) x); channels past
    `cos.shape[-1]` pass through. Output dtype: `out_dtype`, default what eager would give. `x_pairs`/`y_pairs`:
    x's and the result's (and the tables') rotated channels are interleaved pairs rather than halves."""
    return torch.ops.liger_fx.rope(x, cos, sin, out_dtype or _promote(x, cos, sin), x_pairs, y_pairs)


def rope_qk(q, k, cos, sin, q_dtype: torch.dtype | None = None, k_dtype: torch.dtype | None = None,
            x_pairs: bool = False, y_pairs: bool = False):
    """`rope` of q and of k in one launch (their head counts may differ)."""
    return torch.ops.liger_fx.rope_qk(q, k, cos, sin, q_dtype or _promote(q, cos, sin),
                                      k_dtype or _promote(k, cos, sin), x_pairs, y_pairs)
