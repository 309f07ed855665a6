"""lm_head + cross-entropy forward+backward at N=16384, H=4096, V=128256 bf16 (Llama-3-8B's vocabulary, B8 x T2048).

FLOPs: logits h @ W^T, dh = dlogits @ W, dW = dlogits^T @ h: 3 matmuls of 2*N*H*V = 6*N*H*V = 51.7 TFLOP, ~65 ms at the
H200's measured ~790 TFLOP/s (the matmul floor). Anchors measured when the target was set: torch 97.9 ms / 23.8 GiB,
Inductor 80.3 ms / 5.27 GiB, liger-kernel 89.3 ms / 1.48 GiB; target <= 75 ms.

Memory arithmetic (extra over h, W, target; bench/common.py's EXTRA_PEAK_DEFINITION):
    the gradients themselves: dW 0.98 GiB + dh 0.125 GiB = 1.10 GiB -- every provider returns them, so the "extra"
        column can't go below 1.10 GiB and the target "<= 1.0 GiB extra peak" can only mean the "net" column;
    liger_fx (compiled): + one (C, V) bf16 logits chunk, 0.49 GiB at C=2048 (kernels/fused_linear_cross_entropy.py:
        CHUNK_BYTES, 512 MiB) -> ~1.59 GiB extra, ~0.49 GiB net. The backward's `grad_output * dW` reuses the saved
        dW buffer in place (AOTAutograd donates saved tensors; checked in Inductor's output code: `buf1 = getitem_2;
        del getitem_2  # reuse`);
    liger_fx_eager (the op called directly, no compile): the backward's grad_output * dW is a new 0.98 GiB tensor
        while the saved one is alive -> ~1.1 GiB more than compiled.
liger_fx@<size>: the compiled provider with CHUNK_BYTES set to <size>, for the chunk-size sweep.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from bench.common import KernelBench

SWEEP_CHUNK_MIB = (256,)  # besides the default 512 MiB; bench/lab/flce_breakdown.py sweeps 1024..4096 rows per step


def _loss(h, w, shift_labels):
    # The argument's name matters: the rewrite is scoped to causal-LM losses (patterns/linear_cross_entropy.py), and
    # a graph input named shift_labels qualifies. Named `target`, the compiled provider silently measured plain
    # Inductor (82.7 ms, 5.02 GiB extra at 563f046), which is what tests/test_bench_smoke.py now guards against.
    return F.cross_entropy(F.linear(h, w).float(), shift_labels)


def _fwd_bwd(f, h, w, target):
    def call():
        loss = f(h, w, target)
        loss.backward()
        return loss, h.grad, w.grad

    return call


@contextlib.contextmanager
def _chunk_bytes(n: int):
    from liger_fx.kernels import fused_linear_cross_entropy as mod

    old, mod.CHUNK_BYTES = mod.CHUNK_BYTES, n
    try:
        yield
    finally:
        mod.CHUNK_BYTES = old


def _with_chunk(call, n):
    def run():
        with _chunk_bytes(n):
            return call()

    return run


def _liger_kernel():
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except ImportError as e:
        return None, f"not importable ({e.__class__.__name__}: {e})"
    loss_fn = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="mean")

    def f(h, w, target):
        out = loss_fn(w, h, target)  # (lin_weight, input, target)
        return out[0] if isinstance(out, (tuple, list)) else getattr(out, "loss", out)

    return f, None


def make_bench(device, smoke: bool = False) -> KernelBench:
    import liger_fx  # noqa: F401  (registers the ops and the backend)
    from liger_fx.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy

    N, H, V = (64, 32, 100) if smoke else (16384, 4096, 128256)
    dtype = torch.bfloat16
    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(N, H, device=device, dtype=dtype, generator=g).requires_grad_()
    # std 1 logits, as a trained lm_head on normed states gives: softmax neither one-hot nor uniform
    w = (torch.randn(V, H, device=device, dtype=dtype, generator=g) * H**-0.5).requires_grad_()
    target = torch.randint(0, V, (N,), device=device, generator=g)

    compiled = torch.compile(_loss, backend="liger", dynamic=False)
    providers = {
        "torch": _fwd_bwd(_loss, h, w, target),
        "inductor": _fwd_bwd(torch.compile(_loss, dynamic=False), h, w, target),
        "liger_fx": _fwd_bwd(compiled, h, w, target),
        "liger_fx_eager": _fwd_bwd(lambda h, w, t: fused_linear_cross_entropy(h, w, t), h, w, target),
    }
    for mib in SWEEP_CHUNK_MIB:
        providers[f"liger_fx@{mib}MiB"] = _with_chunk(_fwd_bwd(compiled, h, w, target), mib << 20)
    unavailable = {}
    lk, why = _liger_kernel()
    if lk is None:
        unavailable["liger_kernel"] = why
    elif torch.device(device).type != "cuda":
        unavailable["liger_kernel"] = "needs CUDA"
    else:
        providers["liger_kernel"] = _fwd_bwd(lk, h, w, target)
    return KernelBench(
        name="fused_linear_cross_entropy",
        shape=f"N{N} H{H} V{V} {str(dtype).removeprefix('torch.')}",
        providers=providers,
        grad_to_none=[h, w],
        flops=6 * N * H * V,
        unavailable=unavailable,
    )
