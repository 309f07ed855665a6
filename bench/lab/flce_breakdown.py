"""Where the fused linear + cross-entropy op spends its time, per chunk size, to choose the
chunk size by measurement. CUDA only.

    python -m bench.lab.flce_breakdown [--chunks 1024,2048,3072,4096] [--out breakdown.json]

At N=16384, H=4096, V=128256 bf16 it times, for each chunk of C rows: the logits matmul, the CE row kernel, the dh
matmul, the dW update (addmm into bf16 dW, and a plain mm for comparison), their sum times N/C, and the whole op;
then the three full-size matmuls (the problem's own matmul floor, what no chunking can beat) and extra peak memory of
the op. Prints one table; --out also writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import json

import torch

from bench.common import time_ms


def _ms(fn) -> float:
    return time_ms(fn, "cuda", warmup_ms=25, rep_ms=150)[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chunks", default="1024,2048,3072,4096")
    p.add_argument("--out")
    a = p.parse_args(argv)
    import liger_fx  # noqa: F401
    from liger_fx.kernels.cross_entropy import ce_rows
    from liger_fx.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy_fwd

    N, H, V, dt = 16384, 4096, 128256, torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(N, H, device="cuda", dtype=dt, generator=g)
    w = torch.randn(V, H, device="cuda", dtype=dt, generator=g) * H**-0.5
    target = torch.randint(0, V, (N,), device="cuda", generator=g)
    wt = w.t()
    rows = []

    # The problem's matmul floor: the same three products at full size (materializes 4 GiB of logits).
    full = torch.mm(h, wt)
    f_logits = _ms(lambda: torch.mm(h, wt, out=full))
    dh_full = torch.empty_like(h)
    f_dh = _ms(lambda: torch.mm(full, w, out=dh_full))
    dw = torch.empty_like(w)
    f_dw = _ms(lambda: torch.mm(full.t(), h, out=dw))
    del full
    torch.cuda.empty_cache()
    floor = f_logits + f_dh + f_dw
    flop = 6 * N * H * V
    rows.append(dict(C="full", logits=f_logits, ce=None, dh=f_dh, dw_addmm=None, dw_mm=f_dw, est=floor, op=None,
                     tflops=flop / floor / 1e9, extra_gib=None))

    for C in [int(c) for c in a.chunks.split(",")]:
        buf = torch.empty(C, V, device="cuda", dtype=dt)
        h_c, t_c = h[:C], target[:C]
        losses = torch.empty(C, device="cuda")
        lse = torch.empty(C, device="cuda")
        scale = torch.full((1,), 1.0 / N, device="cuda")
        t_logits = _ms(lambda: torch.mm(h_c, wt, out=buf))

        def logits_ce():
            torch.mm(h_c, wt, out=buf)
            ce_rows(buf, t_c, losses, lse, -100, 0.0, 1.0, dx=buf, grad_scale=scale)

        t_ce = _ms(logits_ce) - t_logits
        dh_c = torch.empty_like(h_c)
        t_dh = _ms(lambda: torch.mm(buf, w, out=dh_c))
        t_dw_addmm = _ms(lambda: dw.addmm_(buf.t(), h_c))
        t_dw_mm = _ms(lambda: torch.mm(buf.t(), h_c, out=dw))
        est = (t_logits + t_ce + t_dh + t_dw_addmm) * N / C
        del buf, dh_c
        torch.cuda.empty_cache()
        op = _ms(lambda: fused_linear_cross_entropy_fwd(h, w, None, target, chunk=C))
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fused_linear_cross_entropy_fwd(h, w, None, target, chunk=C)
        torch.cuda.synchronize()
        extra = (torch.cuda.max_memory_allocated() - base) / 2**30
        del out
        rows.append(dict(C=C, logits=t_logits, ce=t_ce, dh=t_dh, dw_addmm=t_dw_addmm, dw_mm=t_dw_mm, est=est, op=op,
                         tflops=flop / op / 1e9, extra_gib=extra))

    def f(x, d=3):
        return "-" if x is None else (f"{x:.{d}f}" if isinstance(x, float) else str(x))

    print(f"flce breakdown N{N} H{H} V{V} bf16, {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("per chunk ms: logits | ce | dh | dW addmm | dW mm || est. op = N/C * sum (addmm) | op ms | TFLOP/s | "
          "extra GiB (incl. dh, dW)")
    for r in rows:
        print(f"C={f(r['C'])}: {f(r['logits'])} | {f(r['ce'])} | {f(r['dh'])} | {f(r['dw_addmm'])} | {f(r['dw_mm'])}"
              f" || {f(r['est'], 2)} | {f(r['op'], 2)} | {f(r['tflops'], 0)} | {f(r['extra_gib'], 2)}")
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows), fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
