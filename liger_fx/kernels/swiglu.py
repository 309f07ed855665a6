"""Gated MLP activations: `liger_fx::swiglu(gate, up, act)` and `liger_fx::swiglu_packed(gate_up, act)`, and the
same followed by the down projection, `liger_fx::swiglu_linear(gate, up, weight, act)` and
`liger_fx::swiglu_packed_linear(gate_up, weight, act)`.

    swiglu(gate, up, act)        = act(gate) * up
    swiglu_packed(gate_up, act)  = act(gate_up[..., :I]) * gate_up[..., I:]        (gate_up.shape[-1] == 2 * I)
    swiglu_linear(gate, up, w, act) = swiglu(gate, up, act) @ w.T                   (w: (H, I); section below)
    act in ACTS: silu (SwiGLU), gelu_tanh (GeGLU, Gemma's gelu_pytorch_tanh), gelu (exact, erf)

The activation and the product are computed in fp32 and rounded once. Only the inputs are saved: the backward
reloads gate and up, which it must read anyway, and recomputes act(gate) and act'(gate) in registers, so no
activation tensor is stored. Gradients are new tensors; nothing is written into the saved inputs.

Why a packed op and not strided views of the two halves. Reading the halves through their row stride is free in the
forward (each half-row is contiguous), but in the backward the autograd of `chunk` concatenates d(gate) and d(up).
Inductor cannot make an opaque op write into the concat buffer, so it copies: 2 more reads and 2 more writes of an
(M, I) tensor on top of the op's 8 (fwd: read g, u, write y; bwd: read dy, g, u, write dg, du), 12/8 = 1.5x the
bytes, plus both gradient halves and the concat buffer alive at once (+2 (M, I) tensors of peak memory). Checked in
Inductor's output code (CPU, torch 2.13): the split op on chunk halves gets a `fused_cat` copy kernel in the backward;
the packed op's gradient feeds both matmuls of the linear's backward directly. The packed backward writes both
halves of one (M, 2I) buffer, which is exactly the gradient of `gate_up`. One kernel serves
both ops: it takes the halves as (pointer, row stride) pairs. The split op stays for two separate linears (Llama).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._library import triton_library_op

ACTS = ("silu", "gelu_tanh", "gelu")
_ACT_ID = {name: i for i, name in enumerate(ACTS)}

_SQRT_2_OVER_PI = 0.7978845608028654
_GELU_C = 0.044715
_SQRT_HALF = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


# --------------------------------------------------------------------------------------------------------------
# Triton kernels


@triton.jit
def _act_and_grad(b_g, ACT: tl.constexpr):
    """act(g) and d act / d g, in fp32 (constants as in the reference below: sqrt(2/pi), 0.044715, sqrt(1/2),
    1/sqrt(2 pi)).

    GELU-tanh without tanh (tl has none on Triton 3.6): with z = sqrt(2/pi) (g + 0.044715 g^3), p = sigmoid(2z) and
    q = sigmoid(-2z), 1 + tanh z = 2p and 1 - tanh^2 z = 4pq. Both factors keep full relative precision where tanh
    saturates; `1 - tanh^2` from a tanh near 1 loses it all, which at g = 5 puts a 2e-6 relative error on the
    gradient (measured against fp64; torch's fp32 kernel has the same loss)."""
    if ACT == 0:
        s = tl.sigmoid(b_g)
        b_a = b_g * s
        b_da = s * (1.0 + b_g * (1.0 - s))
    elif ACT == 1:
        b_g2 = b_g * b_g
        z2 = 2.0 * 0.7978845608028654 * b_g * (1.0 + 0.044715 * b_g2)
        p = tl.sigmoid(z2)
        b_a = b_g * p
        b_da = p + 2.0 * b_g * p * tl.sigmoid(-z2) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * b_g2)
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(b_g * 0.7071067811865476))
        b_a = b_g * cdf
        b_da = cdf + b_g * 0.3989422804014327 * tl.exp(-0.5 * b_g * b_g)
    return b_a, b_da


@triton.jit
def _swiglu_fwd_kernel(
    G, U, Y, stride_g, stride_u, stride_y, N,
    ACT: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    b_g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    b_u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    b_a, _ = _act_and_grad(b_g, ACT)  # the unused derivative is dead code to the compiler
    tl.store(Y + row * stride_y + cols, (b_a * b_u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    DY, G, U, DG, DU, Y, stride_dy, stride_g, stride_u, stride_dg, stride_du, stride_y, N, du_offset,
    ACT: tl.constexpr, PACKED: tl.constexpr, WRITE_Y: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """PACKED: d(up) goes into DG's own buffer at `du_offset` (the packed gradient is one tensor, written whole so the
    compiler sees a write into the buffer it allocated, not through two views of it); DU is unused. WRITE_Y: also
    store the forward's act(gate) * up into Y, which may be DY itself (each element is read before it is written, by
    the same program)."""
    if PACKED:
        DU = DG + du_offset
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    b_dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    b_g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    b_u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    b_a, b_da = _act_and_grad(b_g, ACT)
    tl.store(DG + row * stride_dg + cols, (b_dy * b_u * b_da).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + row * stride_du + cols, (b_dy * b_a).to(DU.dtype.element_ty), mask=mask)
    if WRITE_Y:
        tl.store(Y + row * stride_y + cols, (b_a * b_u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_fwd_flat_kernel(G, U, Y, n, ACT: tl.constexpr, BLOCK: tl.constexpr, EVEN: tl.constexpr):
    """Contiguous g, u, y as one run of n elements: one int64 block offset per program, int32 offsets within it, and
    no mask when BLOCK divides the row length (hence n). The 2-D kernel's traffic with less work per element."""
    base = tl.program_id(0).to(tl.int64) * BLOCK
    offs = tl.arange(0, BLOCK)
    G, U, Y = G + base, U + base, Y + base
    if EVEN:
        b_g = tl.load(G + offs).to(tl.float32)
        b_u = tl.load(U + offs).to(tl.float32)
    else:
        mask = offs < tl.minimum(n - base, BLOCK).to(tl.int32)
        b_g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        b_u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    b_a, _ = _act_and_grad(b_g, ACT)
    if EVEN:
        tl.store(Y + offs, (b_a * b_u).to(Y.dtype.element_ty))
    else:
        tl.store(Y + offs, (b_a * b_u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_flat_kernel(
    DY, G, U, DG, DU, Y, n, ACT: tl.constexpr, WRITE_Y: tl.constexpr, BLOCK: tl.constexpr, EVEN: tl.constexpr,
):
    base = tl.program_id(0).to(tl.int64) * BLOCK
    offs = tl.arange(0, BLOCK)
    DY, G, U, DG, DU, Y = DY + base, G + base, U + base, DG + base, DU + base, Y + base
    if EVEN:
        b_dy = tl.load(DY + offs).to(tl.float32)
        b_g = tl.load(G + offs).to(tl.float32)
        b_u = tl.load(U + offs).to(tl.float32)
    else:
        mask = offs < tl.minimum(n - base, BLOCK).to(tl.int32)
        b_dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        b_g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        b_u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    b_a, b_da = _act_and_grad(b_g, ACT)
    if EVEN:
        tl.store(DG + offs, (b_dy * b_u * b_da).to(DG.dtype.element_ty))
        tl.store(DU + offs, (b_dy * b_a).to(DU.dtype.element_ty))
        if WRITE_Y:
            tl.store(Y + offs, (b_a * b_u).to(Y.dtype.element_ty))
    else:
        tl.store(DG + offs, (b_dy * b_u * b_da).to(DG.dtype.element_ty), mask=mask)
        tl.store(DU + offs, (b_dy * b_a).to(DU.dtype.element_ty), mask=mask)
        if WRITE_Y:
            tl.store(Y + offs, (b_a * b_u).to(Y.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------------------
# Launchers (any device Triton runs on, the CPU interpreter included)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., N) -> (M, N) with unit column stride; a view whenever the leading dims merge (chunk halves do)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _launch_config(N: int) -> tuple[int, int]:
    # Pure streaming: 1024 columns over 4 warps is 8 elements a thread, one 16-byte load of bf16 per operand. At
    # 16384 x 14336 that is 229k programs of 6 KB (fwd) each, plenty to hide DRAM latency. Rows go on grid axis 0
    # (2^31 limit), column blocks on axis 1 (65535 limit, i.e. N up to 67M).
    # H200, 16384x14336 bf16, fwd/bwd ms: 1024 cols x 4 warps 0.341/0.575, 4096 x 8 warps 0.338/0.568 (the copy
    # roofline of 3 and 5 passes is 0.336/0.560): the wider block shaves the tail of the last wave, nothing more.
    block_n = min(triton.next_power_of_2(int(N)), 4096)  # int(): a static row length (see rms_norm's STATIC_ROW)
    return block_n, max(1, min(block_n // 512, 8))


FLAT_CONFIG = (1024, 4)
"""(BLOCK, num_warps) of the flat kernels; see _flat."""


def _flat(*ts) -> bool:
    """Contiguous (M, N) tensors run the flat kernels. Measured on the H200 (bench/lab/sweep_swiglu.py, 16384 x 14336
    bf16): Inductor's own kernels for the same traffic took 0.327 ms (fwd) and 0.549 (bwd), the 2-D kernels 0.339 and
    0.570 at their best config, 4% slower; the 2-D grid with Inductor's block shape (1024 columns, 4 warps) was
    0.344 / 0.577, so the difference is per-element work (int64 row offsets, masks), not the block shape. The flat
    kernels at (1024, 4): 0.327 / 0.549, Inductor's times (sweep at 15b3b9b; 512x2 and 2048x8 within 0.3%, 4096x4
    10% slower); through torch.compile fwd+bwd 0.872 ms, Inductor 0.872 (was 0.906). Packed halves (row stride 2N)
    keep the 2-D kernels. Decided on strides alone (N is static): no guard on the token count, which a size test
    would add (tests/kernels/test_traced_launch.py)."""
    N = ts[0].shape[1]
    return all(t.stride(0) == N and t.stride(1) == 1 for t in ts)


def _fwd_into(g2, u2, y2, act: str) -> None:
    M, N = g2.shape
    if M == 0 or N == 0:
        return
    if _flat(g2, u2, y2):
        block, warps = FLAT_CONFIG
        wrap_triton(_swiglu_fwd_flat_kernel)[(triton.cdiv(M * N, block),)](
            g2, u2, y2, M * N, ACT=_ACT_ID[act], BLOCK=block, EVEN=int(N) % block == 0, num_warps=warps,
        )
        return
    block_n, num_warps = _launch_config(N)
    wrap_triton(_swiglu_fwd_kernel)[(M, triton.cdiv(N, block_n))](
        g2, u2, y2, g2.stride(0), u2.stride(0), y2.stride(0), N,
        ACT=_ACT_ID[act], BLOCK_N=block_n, num_warps=num_warps,
    )


def _bwd_into(dy2, g2, u2, dg2, du2, act: str, du_offset: int | None = None, y2=None) -> None:
    """du_offset given: packed, d(up) written into dg2's buffer that many elements on (du2 is ignored). y2 given: the
    forward's output is written there too (it may be dy2 itself)."""
    M, N = g2.shape
    if M == 0 or N == 0:
        return
    packed, write_y = du_offset is not None, y2 is not None
    y2 = y2 if write_y else dg2  # an unused pointer when not written
    if not packed and _flat(dy2, g2, u2, dg2, du2, y2):
        block, warps = FLAT_CONFIG
        wrap_triton(_swiglu_bwd_flat_kernel)[(triton.cdiv(M * N, block),)](
            dy2, g2, u2, dg2, du2, y2, M * N, ACT=_ACT_ID[act], WRITE_Y=write_y, BLOCK=block,
            EVEN=int(N) % block == 0, num_warps=warps,
        )
        return
    block_n, num_warps = _launch_config(N)
    wrap_triton(_swiglu_bwd_kernel)[(M, triton.cdiv(N, block_n))](
        dy2, g2, u2, dg2, dy2 if packed else du2, y2, dy2.stride(0), g2.stride(0), u2.stride(0), dg2.stride(0),
        dg2.stride(0) if packed else du2.stride(0), y2.stride(0), N, du_offset or 0,
        ACT=_ACT_ID[act], PACKED=packed, WRITE_Y=write_y, BLOCK_N=block_n, num_warps=num_warps,
    )


# The launchers take optional output buffers (contiguous, of the result's shape) so tests can poison them. Without
# one they allocate the 2-D buffer the kernel writes and return a view of it (a kernel writing through a view would
# cost a copy under torch.compile: kernels/_library.py).


def _out2(out, shape2, like) -> torch.Tensor:
    return out.view(shape2) if out is not None else torch.empty(shape2, dtype=like.dtype, device=like.device)


def swiglu_fwd(gate, up, act: str, out=None) -> torch.Tensor:
    g2, u2 = _rows(gate), _rows(up)
    y2 = _out2(out, g2.shape, gate)
    _fwd_into(g2, u2, y2, act)
    return y2.view(gate.shape)


def swiglu_bwd(dy, gate, up, act: str, out=None) -> tuple[torch.Tensor, torch.Tensor]:
    g2, u2, dy2 = _rows(gate), _rows(up), _rows(dy)
    dg2 = _out2(out[0] if out is not None else None, g2.shape, gate)
    du2 = _out2(out[1] if out is not None else None, u2.shape, up)
    _bwd_into(dy2, g2, u2, dg2, du2, act)
    return dg2.view(gate.shape), du2.view(up.shape)


def _packed_shape(gate_up: torch.Tensor) -> list:
    return [*gate_up.shape[:-1], gate_up.shape[-1] // 2]


def swiglu_packed_fwd(gate_up, act: str, out=None) -> torch.Tensor:
    gu2 = _rows(gate_up)
    half = gu2.shape[1] // 2
    y2 = _out2(out, (gu2.shape[0], half), gate_up)
    _fwd_into(gu2[:, :half], gu2[:, half:], y2, act)
    return y2.view(_packed_shape(gate_up))


def swiglu_packed_bwd(dy, gate_up, act: str, out=None) -> torch.Tensor:
    gu2, dy2 = _rows(gate_up), _rows(dy)
    half = gu2.shape[1] // 2
    dgu2 = _out2(out, gu2.shape, gate_up)
    _bwd_into(dy2, gu2[:, :half], gu2[:, half:], dgu2, None, act, du_offset=half)
    return dgu2.view(gate_up.shape)


# --------------------------------------------------------------------------------------------------------------
# Reference: the single source of truth for tests, benchmarks and the CPU implementation


def _act_ref(gf: torch.Tensor, act: str) -> torch.Tensor:
    if act == "silu":
        return torch.nn.functional.silu(gf)
    return torch.nn.functional.gelu(gf, approximate="tanh" if act == "gelu_tanh" else "none")


def _act_grad_ref(gf: torch.Tensor, act: str) -> torch.Tensor:
    if act == "silu":
        s = torch.sigmoid(gf)
        return s * (1 + gf * (1 - s))
    if act == "gelu_tanh":  # as the kernel: 1 + tanh z = 2 sigmoid(2z), 1 - tanh^2 z = 4 sigmoid(2z) sigmoid(-2z)
        z2 = 2 * _SQRT_2_OVER_PI * (gf + _GELU_C * gf.pow(3))
        p = torch.sigmoid(z2)
        return p + 2 * gf * p * torch.sigmoid(-z2) * _SQRT_2_OVER_PI * (1 + 3 * _GELU_C * gf * gf)
    return 0.5 * (1 + torch.erf(gf * _SQRT_HALF)) + gf * _INV_SQRT_2PI * torch.exp(-0.5 * gf * gf)


def swiglu_ref(gate, up, act: str) -> torch.Tensor:
    return (_act_ref(gate.float(), act) * up.float()).to(gate.dtype)


def swiglu_ref_backward(dy, gate, up, act: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton backward's math in torch (fp32). Autograd can't serve here: the op's CPU implementation runs below
    the autograd dispatch key, so nothing inside it records a graph."""
    gf, uf, dyf = gate.float(), up.float(), dy.float()
    return (dyf * uf * _act_grad_ref(gf, act)).to(gate.dtype), (dyf * _act_ref(gf, act)).to(up.dtype)


def swiglu_packed_ref(gate_up, act: str) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return swiglu_ref(gate, up, act)


def swiglu_packed_ref_backward(dy, gate_up, act: str) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.cat(swiglu_ref_backward(dy, gate, up, act), dim=-1)


# --------------------------------------------------------------------------------------------------------------
# The library ops


def _swiglu_cpu(gate, up, act):
    return swiglu_ref(gate, up, act).contiguous()


@triton_library_op("liger_fx::swiglu", cpu=_swiglu_cpu)
def _swiglu(gate: torch.Tensor, up: torch.Tensor, act: str) -> torch.Tensor:
    return swiglu_fwd(gate, up, act)


def _swiglu_backward_cpu(dy, gate, up, act):
    dg, du = swiglu_ref_backward(dy, gate, up, act)
    return dg.contiguous(), du.contiguous()


@triton_library_op("liger_fx::swiglu_backward", cpu=_swiglu_backward_cpu)
def _swiglu_backward(
    dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return swiglu_bwd(dy, gate, up, act)


def _setup_context(ctx, inputs, output):
    gate, up, act = inputs
    ctx.save_for_backward(gate, up)
    ctx.act = act


def _backward(ctx, dy):
    gate, up = ctx.saved_tensors
    dgate, dup = torch.ops.liger_fx.swiglu_backward(dy, gate, up, ctx.act)
    return dgate, dup, None


_swiglu.register_autograd(_backward, setup_context=_setup_context)


def _swiglu_packed_cpu(gate_up, act):
    return swiglu_packed_ref(gate_up, act).contiguous()


@triton_library_op("liger_fx::swiglu_packed", cpu=_swiglu_packed_cpu)
def _swiglu_packed(gate_up: torch.Tensor, act: str) -> torch.Tensor:
    return swiglu_packed_fwd(gate_up, act)


def _swiglu_packed_backward_cpu(dy, gate_up, act):
    return swiglu_packed_ref_backward(dy, gate_up, act).contiguous()


@triton_library_op("liger_fx::swiglu_packed_backward", cpu=_swiglu_packed_backward_cpu)
def _swiglu_packed_backward(dy: torch.Tensor, gate_up: torch.Tensor, act: str) -> torch.Tensor:
    return swiglu_packed_bwd(dy, gate_up, act)


def _setup_context_packed(ctx, inputs, output):
    gate_up, act = inputs
    ctx.save_for_backward(gate_up)
    ctx.act = act


def _backward_packed(ctx, dy):
    (gate_up,) = ctx.saved_tensors
    return torch.ops.liger_fx.swiglu_packed_backward(dy, gate_up, ctx.act), None


_swiglu_packed.register_autograd(_backward_packed, setup_context=_setup_context_packed)


# --------------------------------------------------------------------------------------------------------------
# The gated product with the down projection that consumes it: out = (act(gate) * up) @ weight.T
#
# Why: the down projection's weight gradient needs h = act(gate) * up. Saved, h costs B*T*I*2 bytes a layer (256 MiB
# at Llama-3.2-1B B8 T2048); recomputed by the partitioner (option `recompute`) it costs one more forward launch in
# the backward, which reads gate and up a second time (2 x 256 MiB there). Here the backward computes
# dh = d(out) @ weight first (it needs no h), then ONE kernel reads dh, gate and up and writes d(gate), d(up) and h,
# h into dh's own buffer (each element is read before the same program overwrites it; the buffer is the op's own, so
# Inductor runs the kernel in place, no copy), and d(weight) = d(out).T @ h last. Per layer that is 2 x B*T*I
# elements less traffic and one launch less than the recompute, at the same saved tensors (gate, up, weight) and the
# same backward peak (dh, dgate, dup). The matmuls are torch's (cuBLAS under Inductor), as in an nn.Linear.


def _linear_out(h2: torch.Tensor, weight: torch.Tensor, lead) -> torch.Tensor:
    return torch.mm(h2, weight.t()).view(*lead, weight.shape[0])


def swiglu_linear_fwd(gate, up, weight, act: str) -> torch.Tensor:
    g2, u2 = _rows(gate), _rows(up)
    h2 = torch.empty(g2.shape, dtype=gate.dtype, device=gate.device)
    _fwd_into(g2, u2, h2, act)
    return _linear_out(h2, weight, gate.shape[:-1])


def swiglu_linear_bwd(dout, gate, up, weight, act: str, out=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d gate, d up, h): h is what d(weight) needs, returned in the buffer that held dh."""
    g2, u2 = _rows(gate), _rows(up)
    dh2 = torch.mm(_rows(dout), weight)
    dg2 = _out2(out[0] if out is not None else None, g2.shape, gate)
    du2 = _out2(out[1] if out is not None else None, u2.shape, up)
    _bwd_into(dh2, g2, u2, dg2, du2, act, y2=dh2)
    return dg2.view(gate.shape), du2.view(up.shape), dh2.view(gate.shape)


def swiglu_packed_linear_fwd(gate_up, weight, act: str) -> torch.Tensor:
    gu2 = _rows(gate_up)
    half = gu2.shape[1] // 2
    h2 = torch.empty((gu2.shape[0], half), dtype=gate_up.dtype, device=gate_up.device)
    _fwd_into(gu2[:, :half], gu2[:, half:], h2, act)
    return _linear_out(h2, weight, gate_up.shape[:-1])


def swiglu_packed_linear_bwd(dout, gate_up, weight, act: str, out=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(d gate_up, h)."""
    gu2 = _rows(gate_up)
    half = gu2.shape[1] // 2
    dh2 = torch.mm(_rows(dout), weight)
    dgu2 = _out2(out, gu2.shape, gate_up)
    _bwd_into(dh2, gu2[:, :half], gu2[:, half:], dgu2, None, act, du_offset=half, y2=dh2)
    return dgu2.view(gate_up.shape), dh2.view(_packed_shape(gate_up))


def _swiglu_linear_cpu(gate, up, weight, act):
    return torch.nn.functional.linear(swiglu_ref(gate, up, act), weight).contiguous()


@triton_library_op("liger_fx::swiglu_linear", cpu=_swiglu_linear_cpu)
def _swiglu_linear(gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor, act: str) -> torch.Tensor:
    return swiglu_linear_fwd(gate, up, weight, act)


def _swiglu_linear_backward_cpu(dout, gate, up, weight, act):
    dg, du = swiglu_ref_backward(dout @ weight, gate, up, act)
    return dg.contiguous(), du.contiguous(), swiglu_ref(gate, up, act).contiguous()


@triton_library_op("liger_fx::swiglu_linear_backward", cpu=_swiglu_linear_backward_cpu)
def _swiglu_linear_backward(
    dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor, act: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return swiglu_linear_bwd(dout, gate, up, weight, act)


def _weight_grad(ctx, dout, h):
    """d(weight) = d(out).T @ h over all rows, when the weight wants one (a frozen down projection does not)."""
    if not ctx.needs_input_grad[-2]:
        return None
    return torch.mm(dout.reshape(-1, dout.shape[-1]).t(), h.reshape(-1, h.shape[-1]))


def _setup_context_linear(ctx, inputs, output):
    *tensors, act = inputs
    ctx.save_for_backward(*tensors)
    ctx.act = act


def _backward_linear(ctx, dout):
    gate, up, weight = ctx.saved_tensors
    dgate, dup, h = torch.ops.liger_fx.swiglu_linear_backward(dout, gate, up, weight, ctx.act)
    return dgate, dup, _weight_grad(ctx, dout, h), None


_swiglu_linear.register_autograd(_backward_linear, setup_context=_setup_context_linear)


def _swiglu_packed_linear_cpu(gate_up, weight, act):
    return torch.nn.functional.linear(swiglu_packed_ref(gate_up, act), weight).contiguous()


@triton_library_op("liger_fx::swiglu_packed_linear", cpu=_swiglu_packed_linear_cpu)
def _swiglu_packed_linear(gate_up: torch.Tensor, weight: torch.Tensor, act: str) -> torch.Tensor:
    return swiglu_packed_linear_fwd(gate_up, weight, act)


def _swiglu_packed_linear_backward_cpu(dout, gate_up, weight, act):
    dgu = swiglu_packed_ref_backward(dout @ weight, gate_up, act)
    return dgu.contiguous(), swiglu_packed_ref(gate_up, act).contiguous()


@triton_library_op("liger_fx::swiglu_packed_linear_backward", cpu=_swiglu_packed_linear_backward_cpu)
def _swiglu_packed_linear_backward(
    dout: torch.Tensor, gate_up: torch.Tensor, weight: torch.Tensor, act: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return swiglu_packed_linear_bwd(dout, gate_up, weight, act)


def _backward_packed_linear(ctx, dout):
    gate_up, weight = ctx.saved_tensors
    dgate_up, h = torch.ops.liger_fx.swiglu_packed_linear_backward(dout, gate_up, weight, ctx.act)
    return dgate_up, _weight_grad(ctx, dout, h), None


_swiglu_packed_linear.register_autograd(_backward_packed_linear, setup_context=_setup_context_linear)


# --------------------------------------------------------------------------------------------------------------
# Public functionals


def _check_act(act: str) -> None:
    if act not in ACTS:
        raise ValueError(f"liger_fx.swiglu: act must be one of {ACTS}, got {act!r}")


def _check_gate_up(name: str, gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(
            f"liger_fx.{name}: gate and up must match in shape and dtype, got {tuple(gate.shape)} {gate.dtype} "
            f"and {tuple(up.shape)} {up.dtype}"
        )


def _check_packed(name: str, gate_up: torch.Tensor) -> None:
    if gate_up.dim() == 0 or gate_up.shape[-1] % 2:
        raise ValueError(f"liger_fx.{name}: last dim must be even, got shape {tuple(gate_up.shape)}")


def _check_weight(name: str, gate: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.dim() != 2 or weight.shape[1] != gate.shape[-1] or weight.dtype != gate.dtype:
        raise ValueError(
            f"liger_fx.{name}: weight must be (out, {gate.shape[-1]}) of dtype {gate.dtype}, got "
            f"{tuple(weight.shape)} {weight.dtype}"
        )


def swiglu(gate: torch.Tensor, up: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """Fused `act(gate) * up`; gate and up of one shape and dtype (views with a row stride are read in place)."""
    _check_act(act)
    _check_gate_up("swiglu", gate, up)
    return torch.ops.liger_fx.swiglu(gate, up, act)


def swiglu_packed(gate_up: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """Fused `act(gate) * up` with `gate, up = gate_up.chunk(2, dim=-1)`; its gradient is one (..., 2I) tensor."""
    _check_act(act)
    _check_packed("swiglu_packed", gate_up)
    return torch.ops.liger_fx.swiglu_packed(gate_up, act)


def swiglu_linear(gate: torch.Tensor, up: torch.Tensor, weight: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """`F.linear(act(gate) * up, weight)` whose backward recomputes act(gate) * up in its gradient kernel."""
    _check_act(act)
    _check_gate_up("swiglu_linear", gate, up)
    _check_weight("swiglu_linear", gate, weight)
    return torch.ops.liger_fx.swiglu_linear(gate, up, weight, act)


def swiglu_packed_linear(gate_up: torch.Tensor, weight: torch.Tensor, act: str = "silu") -> torch.Tensor:
    """`F.linear(swiglu_packed(gate_up), weight)`, as swiglu_linear."""
    _check_act(act)
    _check_packed("swiglu_packed_linear", gate_up)
    _check_weight("swiglu_packed_linear", gate_up[..., : gate_up.shape[-1] // 2], weight)
    return torch.ops.liger_fx.swiglu_packed_linear(gate_up, weight, act)
