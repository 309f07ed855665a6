"""RoPE forward+backward of q and k at Llama-3-8B's attention shape: B8 T2048, q 32 heads, k 8 heads, d128, bf16.

q and k come as in HF: (B, H, T, D) transposes of (B, T, H, D) projections, and the upstream gradients have the
layout SDPA's backward gives them (that of its inputs), so no provider pays for a layout copy the model wouldn't.

Bytes fwd+bwd must move, one q = 8*2048*32*128 bf16 = 134 MB, one k = 33.5 MB:
    forward   read q, k; write q_out, k_out          2 x 168 MB
    backward  read dq_out, dk_out; write dq, dk      2 x 168 MB
    tables    cos, sin (2048 x 128 bf16) read once each way: 2 MB
    total     673 MB -> 0.157 ms at the H200's ~4.3 TB/s copy rate (the roofline; target <= 0.30 ms)
`liger_fx_separate` runs q and k as two `liger_fx::rope` launches, to show what the one-launch `rope_qk` buys.
"""

from __future__ import annotations

import torch

from bench.common import KernelBench, compile_liger

B, T, HQ, HK, D = 8, 2048, 32, 8, 128


def _tables(T, D, device, dtype):
    inv_freq = 1.0 / 500000 ** (torch.arange(0, D, 2, device=device, dtype=torch.float32) / D)
    freqs = torch.arange(T, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)[None]  # (1, T, D), as HF's rotary embedding returns
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _hf(q, k, cos, sin):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    return apply_rotary_pos_emb(q, k, cos, sin)


def _call(f, qb, kb, cos, sin, dq, dk):
    """fwd+bwd of f on HF-layout views of the (B, T, H, D) leaves qb, kb."""

    def call():
        qo, ko = f(qb.transpose(1, 2), kb.transpose(1, 2), cos, sin)
        torch.autograd.backward((qo, ko), (dq, dk))
        return qo, ko, qb.grad, kb.grad

    return call


def make_bench(device, smoke: bool = False) -> KernelBench:
    import liger_fx.kernels  # noqa: F401  (registers torch.ops.liger_fx.*)

    b, t, hq, hk, d = (2, 16, 4, 2, 16) if smoke else (B, T, HQ, HK, D)
    dtype = torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, generator=gen)

    qb, kb = randn(b, t, hq, d).requires_grad_(), randn(b, t, hk, d).requires_grad_()
    dq, dk = randn(b, t, hq, d).transpose(1, 2), randn(b, t, hk, d).transpose(1, 2)
    cos, sin = _tables(t, d, device, dtype)

    def fx_qk(q, k, cos, sin):
        return torch.ops.liger_fx.rope_qk(q, k, cos.unsqueeze(1), sin.unsqueeze(1), q.dtype, k.dtype)

    def fx_separate(q, k, cos, sin):
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        return torch.ops.liger_fx.rope(q, c, s, q.dtype), torch.ops.liger_fx.rope(k, c, s, k.dtype)

    providers = {
        "torch": _call(_hf, qb, kb, cos, sin, dq, dk),
        "inductor": _call(torch.compile(_hf, dynamic=False), qb, kb, cos, sin, dq, dk),
        "liger_fx": _call(fx_qk, qb, kb, cos, sin, dq, dk),
        "liger_fx_separate": _call(fx_separate, qb, kb, cos, sin, dq, dk),
        "liger_fx_compile": _call(compile_liger(_hf), qb, kb, cos, sin, dq, dk),
    }
    unavailable = {}
    try:
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
    except ImportError as e:
        unavailable["liger_kernel"] = f"not importable ({e.__class__.__name__}: {e})"
    else:
        if torch.device(device).type != "cuda":
            unavailable["liger_kernel"] = "needs CUDA"
        else:
            # liger-kernel rotates in place: q.transpose(1, 2) is the contiguous (B, T, H, D) leaf, which it
            # overwrites (and dq_out likewise). Give it its own copies so the other providers' tensors stay intact;
            # its inputs then drift call to call, which a memory-bound kernel's time does not depend on.
            qb_lk, kb_lk = qb.detach().clone().requires_grad_(), kb.detach().clone().requires_grad_()
            dq_lk, dk_lk = dq.clone(), dk.clone()

            def liger_kernel():
                qo, ko = liger_rotary_pos_emb(qb_lk.transpose(1, 2), kb_lk.transpose(1, 2), cos, sin)
                return (qo, ko, *torch.autograd.grad((qo, ko), (qb_lk, kb_lk), (dq_lk, dk_lk)))

            providers["liger_kernel"] = liger_kernel
    nbytes = 4 * (qb.numel() + kb.numel()) * qb.element_size() + 4 * cos.numel() * cos.element_size()
    return KernelBench(
        name="rope",
        shape=f"B{b} T{t} q{hq} k{hk} d{d} {str(dtype).removeprefix('torch.')}",
        providers=providers,
        grad_to_none=[qb, kb],
        bytes=nbytes,
        unavailable=unavailable,
    )
