"""What is alive at the peak of one training step, by where it was allocated: which tensors make a variant's peak.

    python -m bench.run memory --variant liger_fx [--shape llama-1b] [--batch 8] [--seq 2048] [--save snap.pickle]
    python -m bench.run memory --load snap.pickle        # analyse a saved snapshot anywhere (no GPU needed)
(or `python -m bench.mem_peak ...`).

Warms up (compilation and the optimizer's state included), then records the CUDA caching allocator's history for
one step (torch.cuda.memory._record_memory_history, Python stacks), replays the alloc/free events to find the moment
of the peak, and prints the blocks alive then, grouped by the innermost frame that names them (a line of Inductor's
generated code, one of our ops, the optimizer), largest first.
"""

from __future__ import annotations

import argparse
import pickle
from collections import defaultdict

GiB = 1 << 30
_SKIP = ("torch/cuda/memory.py", "torch/utils/_", "torch/_ops.py", "torch/_library/", "torch/autograd/",
         "torch/_functorch/", "torch/_dynamo/", "torch/_inductor/runtime/", "contextlib.py", "<frozen", "bench/")


def _where(frames) -> str:
    """The innermost frame outside torch's plumbing, with its source line where the file is here (Inductor's
    generated code names the buffer and the kernel or extern call that fills it)."""
    import linecache

    for f in frames or []:
        name = f.get("filename", "")
        if not any(s in name for s in _SKIP):
            text = linecache.getline(name, f.get("line") or 0).strip()
            return f"{name.split('/')[-1]}:{f.get('line')} {f.get('name')}" + (f" | {text[:90]}" if text else "")
    return "(no python frame)"


def _blocks_at_end(snapshot: dict) -> dict:
    """address -> size of every block allocated when the snapshot was taken (after the recorded step)."""
    out = {}
    for seg in snapshot["segments"]:
        addr = seg["address"]
        for blk in seg["blocks"]:
            if blk["state"] == "active_allocated":
                out[addr] = blk["size"]
            addr += blk["size"]
    return out


def analyse(snapshot: dict, top: int = 25) -> dict:
    """Replay the recorded step's alloc/free events; at the maximum of live bytes, group the live blocks by the
    frame that allocated them. Blocks alive before the step (parameters, optimizer state, anything allocated before
    the recording began) have no frames and are one group, "alive before the step"."""
    events = next((t for t in snapshot["device_traces"] if t), [])
    first = {}  # address -> its first event's action: a block first freed was alive before the step
    for e in events:
        if e["action"] in ("alloc", "free_requested"):
            first.setdefault(e["addr"], e)
    before = "(alive before the step: parameters, optimizer state, ...)"
    alive = {a: (n, before) for a, n in _blocks_at_end(snapshot).items() if a not in first}
    alive.update({a: (e["size"], before) for a, e in first.items() if e["action"] == "free_requested"})
    cur = sum(n for n, _ in alive.values())
    peak, peak_alive, peak_i = cur, dict(alive), -1
    for i, e in enumerate(events):
        if e["action"] == "alloc":
            alive[e["addr"]] = (e["size"], _where(e.get("frames")))
            cur += e["size"]
            if cur > peak:
                peak, peak_alive, peak_i = cur, dict(alive), i
        elif e["action"] == "free_requested" and e["addr"] in alive:
            cur -= alive.pop(e["addr"])[0]
    groups = defaultdict(lambda: [0, 0])
    for size, where in peak_alive.values():
        groups[where][0] += size
        groups[where][1] += 1
    ranked = sorted(groups.items(), key=lambda kv: -kv[1][0])
    at = events[peak_i] if peak_i >= 0 else None
    return {"peak_gib": peak / GiB, "events": len(events), "peak_event": peak_i,
            "peak_at": _where(at.get("frames")) if at else "(before the step)",
            "groups": [(w, b / GiB, n) for w, (b, n) in ranked[:top]],
            "rest_gib": sum(b for _, (b, _n) in ranked[top:]) / GiB}


def record(variant: str, shape: str, batch, seq, path) -> dict:
    import torch

    from bench import e2e
    from bench.common import ensure_liger_backend

    ensure_liger_backend()
    sh = e2e.SHAPES[shape]
    model = e2e.build_model(sh, smoke=False, device="cuda", dtype=torch.bfloat16)
    fn = e2e.make_variant(variant, model, "cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=e2e.LR, fused=True)
    g = torch.Generator(device="cuda").manual_seed(1234)
    ids = torch.randint(0, model.config.vocab_size, (batch or sh.batch, seq or sh.seq), device="cuda", generator=g)

    def step():
        loss = fn(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks="python")
    step()
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    snap["max_allocated_gib"] = torch.cuda.max_memory_allocated() / GiB
    if path:
        with open(path, "wb") as f:
            pickle.dump(snap, f)
    return snap


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="liger_fx")
    p.add_argument("--shape", default="llama-1b")
    p.add_argument("--batch", type=int)
    p.add_argument("--seq", type=int)
    p.add_argument("--save")
    p.add_argument("--load")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args(argv)
    if args.load:
        with open(args.load, "rb") as f:
            snap = pickle.load(f)
    else:
        snap = record(args.variant, args.shape, args.batch, args.seq, args.save)
    r = analyse(snap, args.top)
    print(f"== {args.load or args.variant}: peak {r['peak_gib']:.2f} GiB by replay (max_memory_allocated "
          f"{snap.get('max_allocated_gib', float('nan')):.2f}), at event {r['peak_event']} of {r['events']}, "
          f"allocated by {r['peak_at']}")
    for where, gib, n in r["groups"]:
        print(f"  {gib:7.3f} GiB  x{n:<5d} {where[:130]}")
    print(f"  {r['rest_gib']:7.3f} GiB  (the rest)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
