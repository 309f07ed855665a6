"""Where one end-to-end training step spends its GPU time, by kernel class, for one variant.

    python -m bench.profile_step --variant hf_hook [--shape llama-1b] [--top 20]

Builds the same model and batch as bench/e2e.py, warms up (compilation included), profiles one step (forward,
backward, fused AdamW) and prints the CUDA time per class (matmul, attention, our fused ops, Inductor's generated
kernels, optimizer, other) and the top kernels. This tells the next optimization where the step's time goes.
"""

from __future__ import annotations

import argparse
import re
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
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="hf_hook", choices=e2e.VARIANTS)
    p.add_argument("--shape", default="llama-1b", choices=sorted(e2e.SHAPES))
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--ops", action="store_true",
                   help="also a second profiled step by op with input shapes: the lm_head-sized matmuls (an operand "
                        "with the vocabulary's size) and attention, forward and backward (issue 14's table)")
    p.add_argument("--host", type=int, default=0, metavar="N",
                   help="also profile N steps' Python with cProfile (host time per step, top functions by own time)")
    args = p.parse_args(argv)

    shape = e2e.SHAPES[args.shape]
    model = e2e.build_model(shape, smoke=False, device="cuda", dtype=torch.bfloat16)
    fn = e2e.make_variant(args.variant, model, "cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=e2e.LR, fused=True)
    g = torch.Generator(device="cuda").manual_seed(1234)
    B, T = args.batch or shape.batch, args.seq or shape.seq
    ids = torch.randint(0, model.config.vocab_size, (B, T), device="cuda", generator=g)

    def step():
        loss = fn(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) / 5 * 1e3
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    per_class, per_kernel = defaultdict(float), defaultdict(lambda: [0.0, 0])
    for evt in prof.key_averages():
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
    print(f"== {args.variant} on {args.shape} B{B} T{T}: {total / 1e3:.1f} ms of CUDA kernel time in one step, "
          f"{sum(launches.values())} kernel launches; wall {wall_ms:.1f} ms a step")
    for label, t in sorted(per_class.items(), key=lambda kv: -kv[1]):
        print(f"  {label:42s} {t / 1e3:8.2f} ms  {100 * t / total:5.1f}%  x{launches[label]}")
    print(f"== top {args.top} kernels")
    for name, (t, n) in sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[: args.top]:
        print(f"  {t / 1e3:8.2f} ms  x{n:<4d} {name[:110]}")
    if args.ops:
        lm_head_and_attention(step, model.config.vocab_size)
    if args.host:
        # Where the host's time goes when the GPU waits on it (small batches): cProfile over N steps. Its own
        # overhead inflates every Python call alike, so read the ranking, not the absolute milliseconds.
        import cProfile
        import io
        import pstats

        prof = cProfile.Profile()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        prof.enable()
        for _ in range(args.host):
            step()
        prof.disable()
        torch.cuda.synchronize()
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


if __name__ == "__main__":
    main()
