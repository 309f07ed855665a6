"""Where one end-to-end training step spends its GPU time, by kernel class, for one variant.

    python -m bench.run profile --variant hf_hook [--shape llama-1b] [--top 20]     # or python -m bench.profile_step
    python -m bench.run profile --smoke                  # CPU, tiny model, the host's op times: checks this script

Builds the same model and batch as bench/e2e.py, warms up (compilation included), profiles one step (forward,
backward, fused AdamW) and prints the CUDA time per class (matmul, attention, our fused ops, Inductor's generated
kernels, optimizer, other) and the top kernels. This tells the next optimization where the step's time goes.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import tempfile
import time
from collections import defaultdict

import torch

from bench import e2e

CLASSES = [  # first match wins
    ("liger_fx op", re.compile(r"^_(rms_norm|rope|swiglu|ce_|cross_entropy|flce|linear_cross)", re.I)),
    ("attention", re.compile(r"flash|fmha|attention|sdpa|cudnn.*(mha|attn)", re.I)),
    ("matmul", re.compile(r"gemm|cutlass|nvjet|sm90_xmma|cublas|matmul|wgmma", re.I)),
    ("optimizer", re.compile(r"adam|multi_tensor|foreach", re.I)),
    ("inductor triton", re.compile(r"^triton_", re.I)),
    ("liger-kernel", re.compile(r"liger|_kernel$", re.I)),
]


def classify(name: str) -> str:
    for label, pattern in CLASSES:
        if pattern.search(name):
            return label
    return "other (copies, elementwise, reductions)"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.run profile", description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="hf_hook", choices=e2e.VARIANTS)
    p.add_argument("--shape", default="llama-1b", choices=sorted(e2e.SHAPES))
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--ops", action="store_true",
                   help="also a second profiled step by op with input shapes: the lm_head-sized matmuls (an operand "
                        "with the vocabulary's size) and attention, forward and backward")
    p.add_argument("--gemms", action="store_true",
                   help="also a profiled step's matmuls one row per (op, input shapes, cuBLAS kernel): calls, ms, "
                        "TFLOP/s (the step's per-GEMM budget; the kernel name ends in its layout, e.g. NNT)")
    p.add_argument("--gaps", action="store_true",
                   help="also a profiled step's GPU idle time: the gaps between kernels, the kernels around the "
                        "largest and the CUDA runtime calls (syncs, mallocs) that overlap them; the trace goes to $OUT")
    p.add_argument("--host", type=int, default=0, metavar="N",
                   help="also profile N steps' Python with cProfile (host time per step, top functions by own time)")
    p.add_argument("--smoke", action="store_true",
                   help="CPU, the shape's tiny config, fp32, aot_eager codegen: the host's op times stand in for "
                        "kernels (checks this script; --ops, --gemms and --gaps need CUDA)")
    args = p.parse_args(argv)
    if args.smoke and (args.ops or args.gemms or args.gaps):
        raise SystemExit("python -m bench.run profile: --ops, --gemms and --gaps read CUDA kernels; not with --smoke")
    if not args.smoke:
        return _profile(args)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    from bench.common import smoke_codegen

    with smoke_codegen():
        return _profile(args)


def _profile(args) -> None:
    cuda = not args.smoke
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    shape = e2e.SHAPES[args.shape]
    B, T = args.batch or (shape.batch if cuda else 2), args.seq or (shape.seq if cuda else 32)
    model, step = e2e.training_step(args.shape, args.variant, smoke=args.smoke, batch=B, seq=T)

    for _ in range(args.warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(5):
        step()
    sync()
    wall_ms = (time.perf_counter() - t0) / 5 * 1e3
    activity = torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU
    with torch.profiler.profile(activities=[activity]) as prof:
        step()
        sync()
    per_class, per_kernel = defaultdict(float), defaultdict(lambda: [0.0, 0])
    for evt in prof.key_averages():
        if not cuda:  # the CPU ops' own time, so that the tables below are filled as on a GPU
            t = evt.self_cpu_time_total
        else:
            t = evt.device_time_total if hasattr(evt, "device_time_total") else evt.cuda_time_total
        if t <= 0:
            continue
        per_class[classify(evt.key)] += t
        per_kernel[evt.key][0] += t
        per_kernel[evt.key][1] += evt.count
    total = sum(per_class.values())
    launches = defaultdict(int)
    for name, (_, n) in per_kernel.items():
        launches[classify(name)] += n
    what = "CUDA kernel time" if cuda else "CPU op time (smoke)"
    print(f"== {args.variant} on {args.shape} B{B} T{T}: {total / 1e3:.1f} ms of {what} in one step, "
          f"{sum(launches.values())} {'kernel launches' if cuda else 'op calls'}; wall {wall_ms:.1f} ms a step")
    for label, t in sorted(per_class.items(), key=lambda kv: -kv[1]):
        print(f"  {label:42s} {t / 1e3:8.2f} ms  {100 * t / total:5.1f}%  x{launches[label]}")
    print(f"== top {args.top} kernels")
    for name, (t, n) in sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[: args.top]:
        print(f"  {t / 1e3:8.2f} ms  x{n:<4d} {name[:110]}")
    if args.ops:
        lm_head_and_attention(step, model.config.vocab_size)
    if args.gemms:
        gemm_table(step)
    if args.gaps:
        gap_table(step, os.environ.get("OUT"), f"{args.variant}-{args.shape}")
    if args.host:
        # Where the host's time goes when the GPU waits on it (small batches): cProfile over N steps. Its own
        # overhead inflates every Python call alike, so read the ranking, not the absolute milliseconds.
        import cProfile
        import io
        import pstats

        prof = cProfile.Profile()
        sync()
        t0 = time.perf_counter()
        prof.enable()
        for _ in range(args.host):
            step()
        prof.disable()
        sync()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(args.top)
        print(f"== host: {(time.perf_counter() - t0) / args.host * 1e3:.1f} ms a step under cProfile; top {args.top} "
              "functions by own time (tottime per N steps)")
        print("\n".join(line[:150] for line in out.getvalue().splitlines() if line.strip())[-6000:])


def lm_head_and_attention(step, vocab: int) -> None:
    """GPU time of one step's lm_head-sized matmuls (aten mm/addmm with an operand whose shape has the vocabulary
    size) and attention ops, by op and input shapes. The CPU op events carry the CUDA time of the kernels they
    launched, so this works the same for Inductor's extern matmuls and for matmuls inside our ops."""
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts, record_shapes=True) as prof:
        step()
        torch.cuda.synchronize()
    rows = []
    for evt in prof.key_averages(group_by_input_shape=True):
        t = getattr(evt, "self_device_time_total", None)
        t = evt.self_cuda_time_total if t is None else t
        if t <= 0:
            continue
        shapes = str(evt.input_shapes)
        if not evt.key.startswith("aten::"):  # kernel events repeat their op's time
            continue
        if evt.key in ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm") and str(vocab) in shapes:
            rows.append(("lm_head matmul", evt.key, shapes, evt.count, t))
        elif "attention" in evt.key:
            rows.append(("attention", evt.key, shapes, evt.count, t))
    for label in ("lm_head matmul", "attention"):
        mine = [r for r in rows if r[0] == label]
        print(f"== {label}: {sum(r[4] for r in mine) / 1e3:.2f} ms of GPU time in one step, {sum(r[3] for r in mine)} calls")
        for _, key, shapes, n, t in sorted(mine, key=lambda r: -r[4]):
            print(f"  {t / 1e3:8.2f} ms  x{n:<3d} {key} {shapes[:120]}")


_MM_OPERANDS = {"aten::mm": (0, 1), "aten::addmm": (1, 2), "aten::addmm_": (1, 2), "aten::bmm": (0, 1),
                "aten::baddbmm": (1, 2)}


def _matmul_flop(name: str, shapes) -> float:
    a, b = (shapes[i] for i in _MM_OPERANDS[name])
    batch = a[0] if len(a) == 3 else 1
    return 2.0 * batch * a[-2] * a[-1] * b[-1]


def gemm_table(step) -> None:
    """One profiled step's matmuls: each aten matmul op event with its input shapes and the kernels it launched
    (the profiler links a kernel to the op whose launch it came from), grouped by (op, shapes, kernel)."""
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts, record_shapes=True) as prof:
        step()
        torch.cuda.synchronize()
    rows = defaultdict(lambda: [0, 0.0, 0.0])  # key -> calls, us, flop
    for evt in prof.events():
        if evt.name not in _MM_OPERANDS or not evt.kernels:
            continue
        kernels = "+".join(sorted({k.name for k in evt.kernels}))
        key = (evt.name, str(evt.input_shapes[: max(_MM_OPERANDS[evt.name]) + 1]), kernels)
        r = rows[key]
        r[0] += 1
        r[1] += sum(k.duration for k in evt.kernels)
        r[2] += _matmul_flop(evt.name, evt.input_shapes)
    total_us, total_flop = sum(r[1] for r in rows.values()), sum(r[2] for r in rows.values())
    print(f"== matmuls: {total_us / 1e3:.2f} ms of GPU time, {total_flop / 1e12:.1f} TFLOP "
          f"({total_flop / total_us / 1e6:.0f} TFLOP/s), {sum(r[0] for r in rows.values())} calls")
    print("  ms       calls  TFLOP/s  op            shapes / kernel")
    for (name, shapes, kernels), (n, us, flop) in sorted(rows.items(), key=lambda kv: -kv[1][1]):
        print(f"  {us / 1e3:7.2f}  x{n:<4d}  {flop / us / 1e6:6.0f}   {name:13s} {shapes[:70]} {kernels[:60]}")


def gap_table(step, out_dir, tag: str, min_us: float = 10.0, top: int = 15) -> None:
    """Where the GPU idles within one step: wall time minus busy time, the gaps between consecutive GPU activities
    (kernels, copies, fills) of at least `min_us`, and the CUDA runtime calls on the host that overlap each gap (a
    synchronize or a cudaFree there is the host making the GPU wait)."""
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=acts) as prof:
        step()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as td:
        path = os.path.join(td, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
            with open(path, "rb") as f, gzip.open(os.path.join(out_dir, f"trace-{tag}.json.gz"), "wb") as g:
                g.write(f.read())
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    gpu = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"])
    runtime = [e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")]
    if not gpu:
        print("== gaps: no GPU events in the trace")
        return
    busy, gaps, end, last = 0.0, [], gpu[0]["ts"], gpu[0]
    for e in gpu:
        if e["ts"] > end:
            if e["ts"] - end >= min_us:
                gaps.append((e["ts"] - end, end, last, e))
            busy += e["dur"]
        else:
            busy += max(0.0, e["ts"] + e["dur"] - end)
        if e["ts"] + e["dur"] >= end:
            end, last = e["ts"] + e["dur"], e
    span = end - gpu[0]["ts"]
    print(f"== gaps: GPU span {span / 1e3:.1f} ms, busy {busy / 1e3:.1f} ms, idle {(span - busy) / 1e3:.1f} ms; "
          f"{len(gaps)} gaps >= {min_us:.0f} us sum {sum(g[0] for g in gaps) / 1e3:.1f} ms")
    calls = defaultdict(lambda: [0, 0.0])
    for e in runtime:
        calls[e["name"]][0] += 1
        calls[e["name"]][1] += e["dur"]
    print("  runtime calls (count, ms on the host): " + ", ".join(
        f"{n} x{c} {t / 1e3:.1f}" for n, (c, t) in sorted(calls.items(), key=lambda kv: -kv[1][1])[:8]))
    for dur, start, before, after in sorted(gaps, key=lambda g: -g[0])[:top]:
        during = [e for e in runtime if e["ts"] < start + dur and e["ts"] + e["dur"] > start and e["dur"] > 5]
        what = ", ".join(sorted({f"{e['name']}" for e in during}))[:80]
        print(f"  {dur / 1e3:6.2f} ms at +{(start - gpu[0]['ts']) / 1e3:6.1f}  after {before['name'][:40]}  before "
              f"{after['name'][:40]}  [{what}]")


if __name__ == "__main__":
    main()
