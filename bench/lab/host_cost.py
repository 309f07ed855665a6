"""What calling a fused op costs on the host, through a compiled graph, as users call it.

    python -m bench.lab.host_cost [--iters 400] [--json out.json]

Each op's plain PyTorch form (as HF writes it) is compiled with `backend="liger"` (rewritten to our op) and with
Inductor, at a tiny shape where the GPU work is a few microseconds, and one forward+backward is timed on the host
(wall clock over many iterations, one synchronize at the end). Both graphs launch their kernels the same way except
for the op itself, so `liger - inductor` is the op's host cost per forward+backward beyond a kernel Inductor generates.
Run it twice to compare the two registrations (kernels/_library.py): default (`triton_op`, Inductor launches our
kernels) and `LIGER_FX_OPAQUE_OPS=1` (opaque `custom_op`, the Python body runs per call); `--both` does that in two
subprocesses and prints one table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

EPS = 1e-6


def _rms_norm(x, w):
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)


def _swiglu(g, u):
    return F.silu(g) * u


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _rope(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _linear_ce(h, w, target):
    return F.cross_entropy(F.linear(h, w).float(), target)


def _cases(device):
    dt = torch.bfloat16
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*s, grad=True):
        return torch.randn(*s, device=device, dtype=dt, generator=g).requires_grad_(grad)

    pos = torch.arange(16, device=device, dtype=torch.float32)[:, None] * torch.rand(32, device=device)[None]
    ang = torch.cat([pos, pos], -1)[None].to(dt)
    return {
        "rms_norm": (_rms_norm, (rnd(16, 256), rnd(256)), "rms_norm"),
        "swiglu": (_swiglu, (rnd(16, 512), rnd(16, 512)), "swiglu"),
        "rope": (_rope, (rnd(1, 4, 16, 64), rnd(1, 2, 16, 64), ang.cos(), ang.sin()), "rope"),
        # the loss only: the logits are no output, so this is the opaque linear+CE op (the apply path's lm_head)
        "linear_cross_entropy": (_linear_ce, (rnd(16, 256), rnd(512, 256),
                                              torch.randint(0, 512, (16,), device=device, generator=g)),
                                 "fused_linear_cross_entropy"),
    }


def _time(fn, args, iters: int) -> float:
    """Host microseconds per forward+backward."""
    def step():
        out = fn(*args)
        out = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward([o.float().sum() for o in out])
        for a in args:
            a.grad = None

    for _ in range(20):  # compile and warm up
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters * 1e6


def measure(iters: int) -> list[dict]:
    import liger_fx  # noqa: F401  (registers the ops; `backend="liger"` resolves through the entry point)
    from torch._dynamo.utils import counters

    from bench.common import ensure_liger_backend
    from liger_fx.kernels._library import OPAQUE

    ensure_liger_backend()
    rows = []
    for name, (fn, args, flag) in _cases("cuda").items():
        # linear+CE calls cuBLAS, so it is an opaque custom op under either registration of the other ops
        opaque = OPAQUE or name == "linear_cross_entropy"
        out = {"op": name, "registration": "custom_op (opaque)" if opaque else "triton_op"}
        for backend in ("liger", "inductor"):
            torch._dynamo.reset()
            counters.clear()
            out[backend] = _time(torch.compile(fn, backend=backend, dynamic=False), args, iters)
            if backend == "liger":
                out["rewritten"] = counters["liger_fx"][flag]
        out["op_host_us"] = out["liger"] - out["inductor"]
        rows.append(out)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.lab.host_cost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=400)
    p.add_argument("--json", help="append the rows here (JSON lines)")
    p.add_argument("--both", action="store_true", help="both registrations, each in its own process")
    args = p.parse_args(argv)
    if args.both:
        rows = []
        for opaque in ("0", "1"):
            env = dict(os.environ, LIGER_FX_OPAQUE_OPS=opaque)
            res = subprocess.run([sys.executable, "-m", "bench.lab.host_cost", "--iters", str(args.iters)],
                                 env=env, capture_output=True, text=True)
            lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
            rows += [json.loads(ln) for ln in lines]
            if res.returncode:
                print(res.stderr[-3000:], file=sys.stderr)
        from tabulate import tabulate

        print(tabulate([[r["op"], r["registration"], r.get("rewritten"), f"{r['liger']:.0f}", f"{r['inductor']:.0f}",
                         f"{r['op_host_us']:+.0f}"] for r in rows],
                       headers=["op (fwd+bwd)", "registration", "rewritten", "liger us", "inductor us",
                                "op host cost us"]))
    else:
        rows = measure(args.iters)
        for r in rows:
            print(json.dumps(r))
    if args.json:
        with open(args.json, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
