"""RMSNorm forward+backward at 16384x4096 bf16 (Llama casting, eps 1e-6): the model for a kernel benchmark module.

Bytes fwd+bwd must move: read x, write y; read dy and x again, write dx (5 M*N bf16 = 671 MB), plus the weight and dW.
At the H200's ~4.3 TB/s copy rate that is a 0.157 ms roofline.
"""

from __future__ import annotations

import torch

from bench.common import KernelBench, compile_liger

EPS = 1e-6


def _fwd_bwd(f, x, w, dy):
    def call():
        y = f(x, w)
        y.backward(dy)
        return y, x.grad, w.grad

    return call


def make_bench(device, smoke: bool = False) -> KernelBench:
    import liger_fx.kernels  # noqa: F401  (registers torch.ops.liger_fx.*)
    from liger_fx.kernels.rms_norm import rms_norm_ref

    M, N = (64, 256) if smoke else (16384, 4096)
    dtype = torch.bfloat16
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(M, N, device=device, dtype=dtype, generator=g).requires_grad_()
    w = (1 + 0.1 * torch.randn(N, device=device, dtype=dtype, generator=g)).requires_grad_()
    dy = torch.randn(M, N, device=device, dtype=dtype, generator=g)

    def ref(x, w):
        return rms_norm_ref(x, w, EPS)

    def hf(x, w):  # LlamaRMSNorm's forward: what a user's model hands the compiler
        xf = x.float()
        return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)

    providers = {
        "torch": _fwd_bwd(ref, x, w, dy),
        "inductor": _fwd_bwd(torch.compile(hf, dynamic=False), x, w, dy),
        "liger_fx": _fwd_bwd(lambda x, w: torch.ops.liger_fx.rms_norm(x, w, EPS, 0.0, "llama"), x, w, dy),
        "liger_fx_compile": _fwd_bwd(compile_liger(hf), x, w, dy),
    }
    unavailable = {}
    try:
        from liger_kernel.transformers.functional import liger_rms_norm
    except ImportError as e:
        unavailable["liger_kernel"] = f"not importable ({e.__class__.__name__}: {e})"
    else:
        if torch.device(device).type != "cuda":
            unavailable["liger_kernel"] = "needs CUDA"
        else:
            # liger's default (in_place=True, as its monkeypatch uses) writes dx into dy: give it its own dy so the
            # other providers' upstream gradient stays intact.
            dy_lk = dy.clone()
            providers["liger_kernel"] = _fwd_bwd(lambda x, w: liger_rms_norm(x, w, EPS), x, w, dy_lk)
    return KernelBench(
        name="rms_norm",
        shape=f"{M}x{N} {str(dtype).removeprefix('torch.')}",
        providers=providers,
        grad_to_none=[x, w],
        bytes=5 * M * N * x.element_size() + 3 * N * w.element_size(),
        unavailable=unavailable,
    )
