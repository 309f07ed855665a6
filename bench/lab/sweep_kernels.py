"""Kernel-only timings and launch-config sweeps on a GPU (python -m bench.lab.sweep_kernels), plus a profile of the bench providers' per-call overhead. Produced the kernel-only table of bench/RESULTS.md."""
import torch, itertools
from triton.testing import do_bench
import liger_fx
import liger_fx.kernels.rope as R
import liger_fx.kernels.swiglu as S
from liger_fx.kernels.rms_norm import rms_norm_fwd, rms_norm_bwd

def t(f):
    return do_bench(f, warmup=25, rep=100, return_mode="median")

print("== rms_norm")
for (M, N) in ((16384, 4096), (16384 * 32, 128)):
    x = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(N, device="cuda", dtype=torch.bfloat16) + 0.5
    dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    print(f"{M}x{N}: fwd {t(lambda: rms_norm_fwd(x, w, 1e-6)):.4f} bwd {t(lambda: rms_norm_bwd(dy, x, w, 1e-6)):.4f}")
    if N == 4096:
        for bm, pps, nw in itertools.product((1, 2), (2, 4, 16), (8, 16)):
            print(f"  bwd bm={bm} pps={pps} nw={nw}: {t(lambda: rms_norm_bwd(dy, x, w, 1e-6, programs_per_sm=pps, block_m=bm, num_warps=nw)):.4f}")

print("== rope (B8 T2048 q32 k8 d128, q/k as HF's transposed views)")
B, T, HQ, HK, D = 8, 2048, 32, 8, 128
q = torch.randn(B, T, HQ, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
k = torch.randn(B, T, HK, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
cos = torch.randn(B, T, D, device="cuda", dtype=torch.bfloat16).unsqueeze(1)
sin = torch.randn(B, T, D, device="cuda", dtype=torch.bfloat16).unsqueeze(1)
print(f"default: fwd {t(lambda: R.rope_qk_fwd(q, k, cos, sin)):.4f} bwd {t(lambda: R.rope_qk_bwd(q, k, cos, sin, q.dtype, k.dtype)):.4f}")
for bh, nw in itertools.product((4, 8, 16, 32), (1, 2, 4, 8)):
    R.TUNE.update(block_h=bh, num_warps=nw)
    try:
        print(f"  block_h={bh} nw={nw}: fwd {t(lambda: R.rope_qk_fwd(q, k, cos, sin)):.4f}")
    except Exception as e:
        print(f"  block_h={bh} nw={nw}: {type(e).__name__}")
R.TUNE.clear()

print("== swiglu 16384x14336")
M, N = 16384, 14336
g = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
u = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
dy = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
gu = torch.randn(M, 2 * N, device="cuda", dtype=torch.bfloat16)
orig = S._launch_config
print(f"default: fwd {t(lambda: S.swiglu_fwd(g, u, 'silu')):.4f} bwd {t(lambda: S.swiglu_bwd(dy, g, u, 'silu')):.4f} packed fwd {t(lambda: S.swiglu_packed_fwd(gu, 'silu')):.4f} bwd {t(lambda: S.swiglu_packed_bwd(dy, gu, 'silu')):.4f}")
for bn, nw in ((1024, 4), (2048, 4), (2048, 8), (4096, 8), (512, 2), (1024, 8)):
    S._launch_config = lambda N, bn=bn, nw=nw: (bn, nw)
    print(f"  bn={bn} nw={nw}: fwd {t(lambda: S.swiglu_fwd(g, u, 'silu')):.4f} bwd {t(lambda: S.swiglu_bwd(dy, g, u, 'silu')):.4f} packed bwd {t(lambda: S.swiglu_packed_bwd(dy, gu, 'silu')):.4f}")
S._launch_config = orig
src = torch.empty(M * N, dtype=torch.bfloat16, device="cuda"); dst = torch.empty_like(src)
print(f"copy {M}x{N} bf16: {t(lambda: dst.copy_(src)):.4f} ms")

print("== profile of bench providers (one fwd+bwd call each)")
import bench.kernels_rms_norm as KB
from torch.profiler import profile, ProfilerActivity
kb = KB.make_bench("cuda")
kb = kb[0] if isinstance(kb, list) else kb
provs = getattr(kb, "providers", kb)
for name in ("liger_fx", "inductor"):
    fn = provs.get(name) if isinstance(provs, dict) else None
    if fn is None:
        continue
    for _ in range(3): fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(); torch.cuda.synchronize()
    print(name); print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8))
