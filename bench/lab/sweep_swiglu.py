"""SwiGLU kernel-only times on a GPU: our launch configs against Inductor's own kernels for the same math (the
per-op row that asked: through torch.compile ours took 0.906 ms against Inductor's 0.872 at 16384x14336 bf16, fwd+bwd).

    python -m bench.lab.sweep_swiglu

Rows: the forward (read g, u; write y) and backward (read dy, g, u; write dg, du) separately, median of do_bench,
and GB/s over those bytes. `inductor` compiles the same math as plain torch functions (fwd, and the backward written
out), so its kernels are Inductor's pointwise codegen for exactly this traffic.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from liger_fx.kernels import swiglu as S


def _bwd_math(dy, g, u):
    gf = g.float()
    s = torch.sigmoid(gf)
    a = gf * s
    dg = dy.float() * u.float() * s * (1 + gf * (1 - s))
    return dg.to(g.dtype), (dy.float() * a).to(u.dtype)


def main() -> None:
    M, N = 16384, 14336
    dt = torch.bfloat16
    g, u, dy = (torch.randn(M, N, device="cuda", dtype=dt) for _ in range(3))
    nbytes = g.numel() * g.element_size()
    t = lambda f: do_bench(f, warmup=25, rep=200, return_mode="median")  # noqa: E731
    rows = []
    fwd_i = torch.compile(lambda g, u: F.silu(g) * u, dynamic=False)
    bwd_i = torch.compile(_bwd_math, dynamic=False)
    rows.append(("inductor", t(lambda: fwd_i(g, u)), t(lambda: bwd_i(dy, g, u))))
    rows.append(("ours (default)", t(lambda: S.swiglu_fwd(g, u, "silu")), t(lambda: S.swiglu_bwd(dy, g, u, "silu"))))
    default_cfg, default_flat, default_2d = S.FLAT_CONFIG, S._flat, S._launch_config
    try:
        for bn, nw in itertools.product((512, 1024, 2048, 4096), (2, 4, 8)):
            S.FLAT_CONFIG = (bn, nw)
            rows.append((f"flat bn={bn} nw={nw}", t(lambda: S.swiglu_fwd(g, u, "silu")),
                         t(lambda: S.swiglu_bwd(dy, g, u, "silu"))))
        S._flat = lambda *ts: False  # the 2-D kernels (packed halves use them)
        for bn, nw in ((1024, 4), (4096, 8), (8192, 16)):
            S._launch_config = lambda N, bn=bn, nw=nw: (bn, nw)
            rows.append((f"2-D bn={bn} nw={nw}", t(lambda: S.swiglu_fwd(g, u, "silu")),
                         t(lambda: S.swiglu_bwd(dy, g, u, "silu"))))
    finally:
        S.FLAT_CONFIG, S._flat, S._launch_config = default_cfg, default_flat, default_2d
    print(f"{'config':24s} {'fwd ms':>8s} {'GB/s':>6s} {'bwd ms':>8s} {'GB/s':>6s} {'sum ms':>8s}")
    for name, f, b in rows:
        print(f"{name:24s} {f:8.4f} {3 * nbytes / f / 1e6:6.0f} {b:8.4f} {5 * nbytes / b / 1e6:6.0f} {f + b:8.4f}")


if __name__ == "__main__":
    main()
