"""SwiGLU forward+backward at 16384x14336 bf16 (Llama-3-8B's intermediate size): split and packed gate/up.

Bytes fwd+bwd must move, M = 16384, I = 14336, one (M, I) bf16 tensor = 470 MB:
    forward   read gate, up; write y                      3 tensors
    backward  read dy, gate, up; write dgate, dup         5 tensors
    total     8 x 470 MB = 3.76 GB  -> 0.88 ms at the H200's ~4.3 TB/s copy rate (the roofline)
The packed bench moves the same bytes (gate_up is 2 tensors wide). `liger_fx_strided` runs the split op on the two
chunk views: autograd then concatenates dgate and dup into d(gate_up), 4 more tensors (12 in all, 1.32 ms floor);
that gap is why the pattern emits the packed op for chunked projections.

Would fusing the activation into the matmuls beat this op's roofline? (analysis, no GPU measurement yet)
Per Llama-3-8B MLP at these shapes (H = 4096): the up projection is 2*M*H*2I = 3.85 TFLOP, the down projection 1.92
TFLOP, fwd+bwd 3x that = 17.3 TFLOP, ~25 ms at ~700 TFLOP/s. The separate op is 0.88 ms of that, 3.5%.
  - up-proj epilogue (forward): the epilogue must still write gate and up (the backward needs them, and recomputing
    them costs a 3.85 TFLOP matmul, ~5 ms, to save 0.2 ms), so it only adds y (1 tensor) and saves the op's 3 tensor
    passes (~0.33 ms). The extra 470 MB written during a ~5.5 ms compute-bound GEMM is ~2% of its bandwidth: hidden.
    It needs gate and up columns in the same output tile, i.e. a dual GEMM (two accumulators) or an interleaved
    gate/up weight layout; the plain `gate_up_proj` layout puts them 14336 columns apart.
  - down-proj dgrad epilogue (backward): the GEMM producing dy (= d(out) @ W_down, 1.92 TFLOP, ~2.7 ms) reads gate and
    up in its epilogue and writes dgate, dup directly: 4 tensor passes under a compute-bound GEMM instead of writing
    dy (1) and the op's 5, i.e. ~0.55 ms saved.
  - down-proj prologue (computing y while loading the A tiles) is worse: each A tile is re-read ~H/256 = 16 times,
    so it doubles A-operand traffic and puts the activation on the TMA -> shared memory -> WGMMA path.
So yes: epilogue fusion on both sides would remove up to ~0.88 ms per MLP per step, all of this op's time, because
the bytes ride under compute-bound GEMMs instead of being moved again. The price is our own dual-GEMM/epilogue
matmuls (cuBLAS can't take the epilogue; Inductor's Triton mm templates under max-autotune can fuse pointwise
epilogues, but not one reading two column ranges of the same output) - a matmul project worth ~3.5% of MLP time,
left for a measured follow-up.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.common import KernelBench, compile_liger


def _split_call(f, g, u, dy):
    def call():
        y = f(g, u)
        y.backward(dy)
        return y, g.grad, u.grad

    return call


def _packed_call(f, gu, dy):
    def call():
        y = f(gu)
        y.backward(dy)
        return y, gu.grad

    return call


def _eager_split(g, u):
    return F.silu(g) * u


def _eager_packed(gu):
    g, u = gu.chunk(2, dim=-1)
    return F.silu(g) * u


def _liger_kernel():
    """liger-kernel's SwiGLU autograd function, or the reason it can't run here."""
    try:
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    except ImportError as e:
        return None, f"not importable ({e.__class__.__name__}: {e})"
    return LigerSiLUMulFunction, None


def make_bench(device, smoke: bool = False) -> list[KernelBench]:
    import liger_fx.kernels  # noqa: F401  (registers torch.ops.liger_fx.*)

    M, I = (64, 256) if smoke else (16384, 14336)
    dtype = torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, generator=gen)

    nbytes = 8 * M * I * torch.finfo(dtype).bits // 8
    lk, lk_why = _liger_kernel()
    if lk is not None and torch.device(device).type != "cuda":
        lk, lk_why = None, "needs CUDA"

    # Split: gate and up from two linears (Llama).
    g, u, dy = randn(M, I).requires_grad_(), randn(M, I).requires_grad_(), randn(M, I)
    split = {
        "torch": _split_call(_eager_split, g, u, dy),
        "inductor": _split_call(torch.compile(_eager_split, dynamic=False), g, u, dy),
        "liger_fx": _split_call(lambda g, u: torch.ops.liger_fx.swiglu(g, u, "silu"), g, u, dy),
        "liger_fx_compile": _split_call(compile_liger(_eager_split), g, u, dy),
    }
    split_unavailable = {}
    if lk is None:
        split_unavailable["liger_kernel"] = lk_why
    else:
        # liger's backward writes dgate/dup into its saved inputs, which are the caller's tensors when contiguous:
        # give it its own copies so the other providers' inputs stay intact, and take the grads without .grad (they
        # alias its inputs). Its inputs then drift call to call; a memory-bound kernel's time doesn't depend on them.
        g_lk, u_lk = g.detach().clone().requires_grad_(), u.detach().clone().requires_grad_()

        def liger_split():
            y = lk.apply(g_lk, u_lk)
            return (y, *torch.autograd.grad(y, (g_lk, u_lk), dy))

        split["liger_kernel"] = liger_split

    # Packed: one gate_up projection, then chunk (Phi-3, transformers 5 MoE experts).
    gu, dy_p = randn(M, 2 * I).requires_grad_(), randn(M, I)
    packed = {
        "torch": _packed_call(_eager_packed, gu, dy_p),
        "inductor": _packed_call(torch.compile(_eager_packed, dynamic=False), gu, dy_p),
        "liger_fx": _packed_call(lambda gu: torch.ops.liger_fx.swiglu_packed(gu, "silu"), gu, dy_p),
        "liger_fx_strided": _packed_call(
            lambda gu: torch.ops.liger_fx.swiglu(*gu.chunk(2, dim=-1), "silu"), gu, dy_p
        ),
        "liger_fx_compile": _packed_call(compile_liger(_eager_packed), gu, dy_p),
    }
    packed_unavailable = {}
    if lk is None:
        packed_unavailable["liger_kernel"] = lk_why
    else:
        # On chunk halves liger's ensure_contiguous copies each half first, so its in-place grads land in the copies.
        packed["liger_kernel"] = _packed_call(lambda gu: lk.apply(*gu.chunk(2, dim=-1)), gu, dy_p)

    shape = f"{M}x{I} {str(dtype).removeprefix('torch.')}"
    return [
        KernelBench(name="swiglu", shape=shape, providers=split, grad_to_none=[g, u], bytes=nbytes,
                    unavailable=split_unavailable),
        KernelBench(name="swiglu_packed", shape=f"{M}x(2x{I}) {str(dtype).removeprefix('torch.')}",
                    providers=packed, grad_to_none=[gu], bytes=nbytes, unavailable=packed_unavailable),
    ]
