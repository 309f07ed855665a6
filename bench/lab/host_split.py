"""Where a small training step's host time goes, per phase, for several variants.

    python -m bench.lab.host_split [--shape llama-1b] [--batch 1] [--seq 1024] [--steps 30] [--variants ...]

At B1 T1024 the host (Python, guards, launches) takes about as long as the GPU, so the step time is the host's.
For each variant, in one process after warm-up:
- `wall ms`: steps run back to back without a synchronize, as bench/e2e.py times them;
- `fwd/bwd/opt host ms`: the same steps with a synchronize after each, so the host never waits on a full queue;
  each phase is the time until its call returns;
- `gc ms`: time spent in Python's garbage collector per step (gc.callbacks), which lands in whatever frame runs;
- `gpu ms`: CUDA-event time of a step in the synchronized loop.
`hf_hook_logits` is `liger_fx.apply(model)` called with `skip_logits=False`: the plain path's graph (logits
returned, CE on them) behind apply's wrapper, so `hf_hook - hf_hook_logits` is the fused linear+CE op's host cost
and `hf_hook_logits - liger_fx` the wrapper's.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch

from bench import e2e
from bench.common import ensure_liger_backend


def _gc_timer():
    state = {"t": 0.0, "start": None}

    def cb(phase, info):
        if phase == "start":
            state["start"] = time.perf_counter()
        elif state["start"] is not None:
            state["t"] += time.perf_counter() - state["start"]
            state["start"] = None

    gc.callbacks.append(cb)
    return state, cb


def measure(shape_name: str, variant: str, B: int, T: int, steps: int) -> dict:
    shape = e2e.SHAPES[shape_name]
    torch._dynamo.reset()
    model = e2e.build_model(shape, smoke=False, device="cuda", dtype=torch.bfloat16)
    base = "hf_hook" if variant == "hf_hook_logits" else variant
    fn = e2e.make_variant(base, model, "cuda")
    kw = {"skip_logits": False} if variant == "hf_hook_logits" else {}
    opt = torch.optim.AdamW(model.parameters(), lr=e2e.LR, fused=True)
    g = torch.Generator(device="cuda").manual_seed(1234)
    ids = [torch.randint(0, model.config.vocab_size, (B, T), device="cuda", generator=g) for _ in range(4)]
    graphs = variant.endswith("_ro")

    def fwd(x):
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        return fn(input_ids=x, labels=x, **kw).loss

    def step(x):
        loss = fwd(x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(5):
        step(ids[i % 4])
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        step(ids[i % 4])
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / steps * 1e3

    state, cb = _gc_timer()
    rows = []
    try:
        for i in range(steps):
            torch.cuda.synchronize()
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            gc0 = state["t"]
            t0 = time.perf_counter()
            e0.record()
            loss = fwd(ids[i % 4])
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            t3 = time.perf_counter()
            e1.record()
            torch.cuda.synchronize()
            rows.append(((t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3, e0.elapsed_time(e1), (state["t"] - gc0) * 1e3))
    finally:
        gc.callbacks.remove(cb)
    med = [statistics.median(c) for c in zip(*rows)]
    del model, fn, opt
    torch.cuda.empty_cache()
    return {"shape": shape_name, "variant": variant, "batch": B, "seq": T, "wall_ms": wall, "fwd_host_ms": med[0],
            "bwd_host_ms": med[1], "opt_host_ms": med[2], "gpu_ms": med[3], "gc_ms": med[4]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.lab.host_split", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama-1b", choices=sorted(e2e.SHAPES))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--variants", default="inductor,liger_fx,hf_hook,hf_hook_logits")
    p.add_argument("--json", help="append the rows here (JSON lines)")
    args = p.parse_args(argv)
    ensure_liger_backend()
    rows = []
    for v in args.variants.split(","):
        r = measure(args.shape, v, args.batch, args.seq, args.steps)
        print(json.dumps(r), flush=True)
        rows.append(r)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(r) + "\n")
    from tabulate import tabulate

    print(tabulate([[r["variant"], f"{r['wall_ms']:.2f}", f"{r['fwd_host_ms']:.2f}", f"{r['bwd_host_ms']:.2f}",
                     f"{r['opt_host_ms']:.2f}", f"{r['gc_ms']:.2f}", f"{r['gpu_ms']:.2f}"] for r in rows],
                   headers=["variant", "wall ms", "fwd host ms", "bwd host ms", "opt host ms", "gc ms", "gpu ms"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
