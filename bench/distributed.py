"""Distributed training as users write it, on the Llama-3.2-1B shape (bf16, tied lm_head, B8 T2048 per GPU, AdamW,
random weights): examples/train_fsdp2.py under torchrun with --nproc ranks, one run per wrapper and backend.

    python -m bench.run distributed --nproc 1                   # one GPU (carry .whl for the liger-kernel row)
    python -m bench.run distributed --nproc 2                   # two GPUs: the same runs, then the loss check below
    python -m bench.run distributed --nproc 1 --runs ddp:liger,ddp:inductor --steps 8
    python -m bench.run distributed --smoke --runs ddp:eager    # CPU (gloo), tiny model: checks this script

Runs (--runs, a comma list of wrap:backend[:entry]; default all of RUNS; `none` for the loss check alone):
  fsdp2:liger          torch.compile(model, backend="liger") with fully_shard per layer (the plain path)
  fsdp2:inductor       torch.compile(model), the same wrapping
  fsdp2:liger_kernel   liger-kernel's monkeypatch, eager (needs the carried wheel)
  fsdp2:liger:apply    liger_fx.apply(model)
  ddp:liger            the bare torch.compile(DDP(model), backend="liger"), DDP's default 25 MB buckets
  ddp:inductor         torch.compile(DDP(model))
(`eager` is a backend too.) Each prints every rank's rewrite counters and DDP buckets, tok/s (all GPUs, and per GPU),
peak memory and the last loss; a table of all runs comes last, with each run's ratio to Inductor under the same
wrapper. With --nproc > 1 (or --losses) it then checks the losses (--loss-steps 20 steps, global batch 8 x nproc,
T = --loss-seq 512 so that one GPU holds the global batch): eager on 1 GPU twice (run-to-run noise) and on nproc GPUs
(what distribution alone changes), liger (FSDP2 plain path) on 1 and on nproc GPUs; it prints the largest difference
of each pair over the steps. Success: liger's nproc-vs-1 difference within eager's (<= 2x the larger eager one).

A run that would start less than 60 s before --budget-s is reported "skipped (time budget)". Files in --out (default
$OUT): <run>.txt (its output) and <run>.json (what rank 0 wrote) for each run, losses_*.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "train_fsdp2.py")
RUNS = ("fsdp2:liger", "fsdp2:inductor", "fsdp2:liger_kernel", "fsdp2:liger:apply", "ddp:liger", "ddp:inductor")
LLAMA_1B = ["--device", "cuda", "--dtype", "bf16", "--hidden", "2048", "--intermediate", "8192", "--layers", "16",
            "--heads", "32", "--kv-heads", "8", "--vocab", "128256", "--tie"]
SMOKE_MODEL = ["--device", "cpu", "--tie"]  # the example's own tiny defaults, gloo


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.run distributed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=1, help="world size: ranks (GPUs) per run (default 1)")
    p.add_argument("--runs", default=",".join(RUNS), help="comma list of wrap:backend[:entry], or none")
    p.add_argument("--steps", type=int, default=None, help="steps per run (default 12; smoke 3)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default 2048; smoke 32)")
    p.add_argument("--run-timeout", type=float, default=150.0, help="seconds a run (default 150)")
    p.add_argument("--budget-s", type=float, default=560.0, help="start no run after this many seconds minus 60")
    p.add_argument("--losses", default=None, action=argparse.BooleanOptionalAction,
                   help="the loss check across world sizes (default: on when --nproc > 1)")
    p.add_argument("--loss-steps", type=int, default=None, help="default 20; smoke 3")
    p.add_argument("--loss-seq", type=int, default=None, help="default 512; smoke 32")
    p.add_argument("--extra", default="", help="more arguments for every run of the table (one string)")
    p.add_argument("--tag", default="", help="a suffix for the runs' file names")
    p.add_argument("--smoke", action="store_true", help="CPU (gloo), tiny model: a check of this script")
    p.add_argument("--out", default=os.environ.get("OUT") or ".out")
    args = p.parse_args(argv)
    args.run_list = [] if args.runs in ("none", "") else [r.strip() for r in args.runs.split(",") if r.strip()]
    for spec in args.run_list:
        if not 2 <= len(spec.split(":")) <= 3:
            p.error(f"--runs: {spec!r} is not wrap:backend[:entry]")
    args.steps = args.steps or (3 if args.smoke else 12)
    args.seq = args.seq or (32 if args.smoke else 2048)
    args.loss_steps = args.loss_steps or (3 if args.smoke else 20)
    args.loss_seq = args.loss_seq or (32 if args.smoke else 512)
    args.losses = args.nproc > 1 if args.losses is None else args.losses
    return args


def run_name(nproc: int, spec: str, tag: str = "") -> str:
    wrap, backend, *entry = spec.split(":")
    return f"x{nproc}_{wrap}_{backend}{'_' + entry[0] if entry else ''}{tag}"


class Runner:
    """One torchrun per run, each bounded by its timeout and the call's budget; output and JSON in `out`."""

    def __init__(self, args):
        self.args, self.t0 = args, time.perf_counter()
        self.model = SMOKE_MODEL if args.smoke else LLAMA_1B
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, self.env.get("PYTHONPATH")) if p)
        if args.smoke:
            self.env.update(TRITON_INTERPRET="1", OMP_NUM_THREADS="1", TORCHINDUCTOR_COMPILE_THREADS="1")

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def __call__(self, name: str, nproc: int, extra: list[str]) -> None:
        out = self.args.out
        if self.elapsed() > self.args.budget_s - 60:
            print(f"== {name}: skipped (time budget)", flush=True)
            return
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), EXAMPLE,
               *self.model, *extra, "--out", os.path.join(out, name + ".json")]
        with open(os.path.join(out, name + ".txt"), "w") as log:
            # Own session: on timeout the whole group goes (torchrun's workers and their compile workers).
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=self.args.run_timeout)
            except subprocess.TimeoutExpired:
                rc = f"timeout after {self.args.run_timeout:.0f} s"
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
        print(f"== {name}: exit {rc} at {self.elapsed():.0f} s", flush=True)
        if not os.path.exists(os.path.join(out, name + ".json")):
            with open(os.path.join(out, name + ".txt")) as f:
                print("".join(f.readlines()[-5:]), end="", flush=True)


def _load(out: str, name: str):
    path = os.path.join(out, name + ".json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def table(out: str, nproc: int, names: list[str], seq: int, model: str) -> None:
    """Every rank's rewrites of the liger runs, then tok/s, peak and last loss per run, liger's ratio to Inductor."""
    rows, inductor = [], {}
    for name in names:
        r = _load(out, name)
        if r is not None and r["args"]["backend"] == "inductor":
            inductor[r["args"]["wrap"]] = r["tokens_per_s"]
        rows.append((name, r))
    print("\n== rewrite counts per rank")
    for name, r in rows:
        if r is None or r["args"]["backend"] != "liger":
            continue
        for rank in r["ranks"]:
            recs = rank["records"]
            buckets = [x["ddp_buckets"] for x in recs if x.get("ddp_buckets")]
            print(f"{name} rank {rank['rank']}: {rank['counters']}; graphs {len(recs)}, DDP buckets {buckets or '-'}, "
                  f"near misses {sum(len(x['misses']) for x in recs)}, "
                  f"fallbacks {sum(x['fallback'] is not None for x in recs)}")
    print(f"\n== world size {nproc}: {model}, B8 T{seq} per rank")
    print(f"{'run':34} {'tok/s':>9} {'tok/s/GPU':>9} {'peak GiB':>8} {'vs Inductor':>11}  last loss")
    for name, r in rows:
        if r is None:
            print(f"{name:34} failed or skipped")
            continue
        tps, base = r["tokens_per_s"], inductor.get(r["args"]["wrap"])
        ratio = f"{tps / base:.3f}x" if base and r["args"]["backend"] != "inductor" else "-"
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        print(f"{name:34} {tps:9.0f} {tps / r['world']:9.0f} {peak:>8} {ratio:>11}  {r['losses'][-1]:.4f}")


def loss_check(out: str, nproc: int) -> bool | None:
    """The largest loss difference of each pair over the steps; True when liger's nproc-vs-1 difference is within 2x
    eager's noise, None when a run is missing."""
    names = ("losses_eager_x1", "losses_eager_x1_again", f"losses_eager_x{nproc}", "losses_liger_x1",
             f"losses_liger_x{nproc}")
    losses = {n: _load(out, n) for n in names}

    def diff(a, b):
        if losses[a] is None or losses[b] is None:
            return None
        return max(abs(x - y) for x, y in zip(losses[a]["losses"], losses[b]["losses"]))

    pairs = [("eager x1 vs x1 again (run-to-run)", "losses_eager_x1", "losses_eager_x1_again"),
             (f"eager x{nproc} vs x1 (distribution)", f"losses_eager_x{nproc}", "losses_eager_x1"),
             (f"liger x{nproc} vs x1", f"losses_liger_x{nproc}", "losses_liger_x1"),
             ("liger x1 vs eager x1", "losses_liger_x1", "losses_eager_x1")]
    steps = len((losses["losses_eager_x1"] or {}).get("losses", []))
    print(f"\n== first {steps} losses, global batch {8 * nproc}: largest difference over the steps")
    got = {}
    for label, a, b in pairs:
        got[label] = d = diff(a, b)
        print(f"{label:40} {'-' if d is None else f'{d:.5f}'}")
    noise = [d for label, d in got.items() if label.startswith("eager") and d is not None]
    mine = got[pairs[2][0]]
    if not noise or mine is None:
        return None
    ok = mine <= 2 * max(noise) + 1e-6
    print(f"liger x{nproc} vs x1 within 2x eager's noise ({2 * max(noise):.5f}): {'yes' if ok else 'NO'}")
    return ok


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    run = Runner(args)
    print(f"== distributed: world size {args.nproc}, runs {','.join(args.run_list) or 'none'}"
          f"{', then the loss check' if args.losses else ''}", flush=True)
    names = []
    for spec in args.run_list:
        wrap, backend, *entry = spec.split(":")
        name = run_name(args.nproc, spec, args.tag)
        names.append(name)
        run(name, args.nproc, ["--wrap", wrap, "--backend", backend, "--entry", entry[0] if entry else "compile",
                               "--steps", str(args.steps), "--batch", str(8 * args.nproc), "--seq", str(args.seq),
                               *args.extra.split()])
    ok = None
    if args.losses:
        common = ["--wrap", "fsdp2", "--steps", str(args.loss_steps), "--batch", str(8 * args.nproc),
                  "--seq", str(args.loss_seq)]
        run("losses_eager_x1", 1, [*common, "--backend", "eager"])
        run("losses_eager_x1_again", 1, [*common, "--backend", "eager"])
        if args.nproc > 1:
            run(f"losses_eager_x{args.nproc}", args.nproc, [*common, "--backend", "eager"])
        run("losses_liger_x1", 1, [*common, "--backend", "liger"])
        if args.nproc > 1:
            run(f"losses_liger_x{args.nproc}", args.nproc, [*common, "--backend", "liger"])
    model = "tiny Llama, CPU (smoke)" if args.smoke else "Llama-3.2-1B shape, bf16"
    table(args.out, args.nproc, names, args.seq, model)
    if args.losses:
        ok = loss_check(args.out, args.nproc)
    print(f"== distributed done at {run.elapsed():.0f} s", flush=True)
    missing = [n for n in names if _load(args.out, n) is None]
    return 1 if missing or ok is False else 0


if __name__ == "__main__":
    sys.exit(main())
