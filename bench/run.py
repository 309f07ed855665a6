"""The one benchmark CLI: fused kernels (fwd+bwd) against torch, Inductor and liger-kernel, and the end-to-end step.

    python -m bench.run --kernels all --e2e llama-1b [--smoke] [--out DIR]
    python -m bench.run --kernels none --e2e none --post all      # GRPO/DPO steps (bench/post_training.py)
    python -m bench.run --kernels none --e2e none --distill llama-1b-jsd     # the distillation step (bench/distill.py)
    python -m bench.run <tool> [its options]      # profile, memory, warmup, trainer, convergence, distributed, trl

The tools (`python -m bench.run <tool> --help` for each; listed under TOOLS below) answer the other questions a user
asks of a training step: where its time or its memory goes, what the first step compiles, the same comparison
through the HF Trainer or TRL, over 50 steps of training, or at a world size.

Registry protocol (one function per kernel module, `bench/kernels_<key>.py`):

    make_bench(device, smoke: bool = False) -> KernelBench | list[KernelBench]

KernelBench (bench/common.py) holds {provider: zero-arg callable doing forward+backward once}, the tensors whose
.grad to reset, and the bytes (GB/s vs the measured copy rate) or FLOPs (TFLOP/s vs the measured bf16 matmul rate).
A plain dict with those keys (or just {provider: callable}) is accepted too. `smoke=True` must give tiny shapes that
run on CPU in well under a second.

Everything is guarded: a failing provider, kernel module or variant becomes a row with its error, the tables are
always printed at the end, and results.json / results.md are rewritten under --out (default $OUT) after every item,
so a run killed at its time limit still leaves what it measured.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import inspect
import json
import os
import sys
import time
import traceback

import torch

from bench import common, distill, e2e, post_training, report
from bench.common import GiB, KernelBench

# python -m bench.run <tool> ...: the tool's own CLI (each module also runs as `python -m <module>`).
TOOLS = {
    "profile": ("bench.profile_step", "where one step's GPU time goes: kernel classes, top kernels (--gemms, --gaps, "
                "--ops, --host)"),
    "memory": ("bench.mem_peak", "what is alive at one step's memory peak, by where it was allocated (CUDA)"),
    "warmup": ("bench.compile_profile", "where the first step's compile time goes (Dynamo, the rewrite, AOTAutograd, "
               "Inductor, Triton), from empty caches"),
    "trainer": ("bench.e2e_trainer", "Trainer.train() with the liger-fx hook, liger-kernel, torch_compile=True, eager"),
    "convergence": ("bench.convergence", "every model family trained as eager, Inductor and liger-fx: loss curves, "
                    "final weights"),
    "distributed": ("bench.distributed", "FSDP2 and DDP under torchrun at a world size (examples/train_fsdp2.py), "
                    "with a loss check across world sizes"),
    "trl": ("bench.trl_trainers", "TRL's SFT/DPO/GRPO trainers with and without the hook (needs trl)"),
}

KERNELS = {  # key -> module; the order is the run order
    "rms_norm": "bench.kernels_rms_norm",
    "rope": "bench.kernels_rope",
    "swiglu": "bench.kernels_swiglu",
    "flce": "bench.kernels_flce",
}
PROVIDERS = ("torch", "inductor", "liger_fx", "liger_kernel")  # torch first: it is the reference for the others
_ALIASES = {"eager": "torch", "torch_eager": "torch", "compile": "inductor", "torch_compile": "inductor",
            "liger-fx": "liger_fx", "ligerfx": "liger_fx", "liger-kernel": "liger_kernel", "liger": "liger_kernel"}
# bf16 outputs and grads of a correct kernel differ from torch eager's by ~1e-3 relative (||a-b||/||b||); 2e-2 is
# far outside rounding and far inside any real bug (a wrong eps or cast moves results by >5e-2).
MISMATCH_TOL = 2e-2
# Each e2e variant spends at most this long (a cold Inductor compile of the 1B model is the slow part).
VARIANT_TIMEOUT_S = 240


# --------------------------------------------------------------------------------------------------------------
# Kernel benchmarks


def _normalize(key: str, obj) -> KernelBench:
    """Accept the others' make_bench return shapes: KernelBench, {"providers": ..., "bytes": ...}, {name: fn}."""
    if isinstance(obj, KernelBench):
        kb = obj
    elif isinstance(obj, dict) and "providers" in obj:
        kb = KernelBench(
            name=obj.get("name", key), shape=str(obj.get("shape", "")), providers=dict(obj["providers"]),
            grad_to_none=list(obj.get("grad_to_none", [])), bytes=obj.get("bytes"), flops=obj.get("flops"),
            unavailable=dict(obj.get("unavailable", obj.get("skipped", {}))),
        )
    elif isinstance(obj, dict) and all(callable(v) for v in obj.values()):
        kb = KernelBench(name=key, shape="", providers=dict(obj))
    else:
        raise TypeError(f"bench.kernels_{key}.make_bench returned {type(obj).__name__}; expected KernelBench or dict")
    kb.providers = {_ALIASES.get(k, k): v for k, v in kb.providers.items()}
    kb.unavailable = {_ALIASES.get(k, k): v for k, v in kb.unavailable.items()}
    return kb


def load_benches(key: str, device, smoke: bool) -> list[KernelBench]:
    mod = importlib.import_module(KERNELS[key])
    make = mod.make_bench
    params = inspect.signature(make).parameters
    if "smoke" in params:
        out = make(device, smoke=smoke)
    elif smoke:
        raise TypeError(f"{KERNELS[key]}.make_bench has no smoke parameter; the smoke mode needs tiny shapes")
    else:
        out = make(device)
    return [_normalize(key, o) for o in (out if isinstance(out, (list, tuple)) else [out])]


def _free(device):
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def bench_kernel(key: str, kb: KernelBench, device, ceilings: dict, args, env: dict) -> list[dict]:
    rows = []
    ref = None
    order = [p for p in PROVIDERS if p in kb.providers] + [p for p in kb.providers if p not in PROVIDERS]
    for prov in order:
        row = {"key": key, "name": kb.name, "shape": kb.shape, "provider": prov, "env": env}
        fn = kb.providers[prov]
        out = None
        try:
            for t in kb.grad_to_none:
                t.grad = None
            out = fn()  # compiles (inductor) and gives the tensors to check
            common.sync(device)
            if prov == "torch":
                # a copy: later calls accumulate into (or reuse) the same .grad tensors
                ref = tuple(t.detach().clone() if isinstance(t, torch.Tensor) else t
                            for t in (out if isinstance(out, (tuple, list)) else (out,)))
            elif ref is not None and out is not None:
                row["rel_err"] = common.rel_err(out, ref)
            out = None
            med, p20, p80 = common.time_ms(fn, device, kb.grad_to_none, args.kernel_warmup_ms, args.kernel_rep_ms)
            row.update(median_ms=med, p20_ms=p20, p80_ms=p80)
            extra, grads = common.extra_peak_bytes(fn, device, kb.grad_to_none)
            if extra is not None:
                row.update(extra_gib=extra / GiB, net_gib=(extra - grads) / GiB)
            if kb.bytes:
                row["bytes"] = kb.bytes
                row["gbs"] = kb.bytes / (med * 1e-3) / 1e9
                if ceilings.get("copy_gbs"):
                    row["floor_ms"] = kb.bytes / (ceilings["copy_gbs"] * 1e9) * 1e3
            elif kb.flops:
                row["flops"] = kb.flops
                row["tflops"] = kb.flops / (med * 1e-3) / 1e12
                if ceilings.get("matmul_tflops"):
                    row["floor_ms"] = kb.flops / (ceilings["matmul_tflops"] * 1e12) * 1e3
            if row.get("floor_ms"):
                row["pct_of_ceiling"] = 100 * row["floor_ms"] / med
            err = row.get("rel_err")
            row["status"] = "ok" if err is None or err <= MISMATCH_TOL else f"MISMATCH vs torch (err {err:.1e})"
        except Exception as e:
            traceback.print_exc()
            row["status"] = f"error: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
        finally:
            out = None
            _free(device)
        print(f"  {key:9s} {prov:13s} {row.get('median_ms', float('nan')):9.3f} ms  {row['status']}", flush=True)
        rows.append(row)
    for prov, why in kb.unavailable.items():
        if prov not in kb.providers:
            rows.append({"key": key, "name": kb.name, "shape": kb.shape, "provider": prov, "env": env,
                         "status": f"unavailable: {why}"})
    return rows


# --------------------------------------------------------------------------------------------------------------
# The run


def _csv(value: str, universe, what: str) -> list[str]:
    if value in ("none", ""):
        return []
    if value == "all":
        return list(universe)
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in universe]
    if bad:
        raise SystemExit(f"unknown {what} {', '.join(bad)}; valid: all, none, {', '.join(universe)}")
    return items


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="tools:\n" + "\n".join(f"  {k:12s} {why}" for k, (_, why) in TOOLS.items()))
    p.add_argument("--kernels", default="all", help=f"all, none, or a comma list of {', '.join(KERNELS)}")
    p.add_argument("--e2e", default="llama-1b", help=f"none, all, or a comma list of {', '.join(e2e.SHAPES)}")
    p.add_argument("--variants", default="all",
                   help=f"all (each shape's own), or a comma list of {', '.join(e2e.ALL_VARIANTS)}")
    p.add_argument("--post", default="none",
                   help=f"post-training steps: none, all, or a comma list of {', '.join(post_training.WORKLOADS)}")
    p.add_argument("--post-variants", default="all", help=f"comma list of {', '.join(post_training.VARIANTS)}")
    p.add_argument("--post-steps", type=int, default=None, help="timed post-training steps (default 5; smoke 2)")
    p.add_argument("--distill", default="none",
                   help=f"distillation step shapes: none, all, or a comma list of {', '.join(distill.SHAPES)}")
    p.add_argument("--distill-variants", default=",".join(distill.DEFAULT_VARIANTS),
                   help=f"comma list of {', '.join(distill.VARIANTS)} (or all)")
    p.add_argument("--loss-rtol", type=float, default=0.01,
                   help="distillation variants agree if every step's loss is within this fraction of the "
                        "reference's (eager where it ran, else inductor)")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, reference ops: checks the code in seconds")
    p.add_argument("--device", default=None, help="default: cuda if available (cpu with --smoke)")
    p.add_argument("--out", default=os.environ.get("OUT"), help="write results.json/results.md/e2e.png here")
    p.add_argument("--steps", type=int, default=None, help="timed e2e steps (default 10; smoke 2)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up e2e steps (default 3; smoke 1)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop starting new work after this many seconds (the rest is reported as skipped)")
    p.add_argument("--variant-timeout", type=float, default=VARIANT_TIMEOUT_S)
    p.add_argument("--inprocess", action="store_true", help="run e2e variants in this process (default in smoke)")
    p.add_argument("--subprocess", action="store_true", help="force one process per variant, also in smoke")
    p.add_argument("--smoke-inductor", action="store_true", help="smoke with real Inductor codegen (slow on CPU)")
    p.add_argument("--loss-atol", type=float, default=0.02,
                   help="variants agree if every step's loss is within this of hf_eager's (ln V ~ 11.8 at init)")
    p.add_argument("--kernel-warmup-ms", type=float, default=None, help="do_bench warmup (default 25; smoke 1)")
    p.add_argument("--kernel-rep-ms", type=float, default=None, help="do_bench rep (default 200; smoke 5)")
    args = p.parse_args(argv)
    args.kernel_list = _csv(args.kernels, KERNELS, "kernel")
    args.shape_list = _csv(args.e2e, e2e.SHAPES, "e2e shape")
    # "all": each shape's own variants (e2e.variants_for: the reference decoder's differ from the HF models')
    args.variant_list = None if args.variants == "all" else _csv(args.variants, e2e.ALL_VARIANTS, "variant")
    args.post_list = _csv(args.post, post_training.WORKLOADS, "post-training workload")
    args.post_variant_list = _csv(args.post_variants, post_training.VARIANTS, "post-training variant")
    args.distill_list = _csv(args.distill, distill.SHAPES, "distill shape")
    args.distill_variant_list = _csv(args.distill_variants, distill.VARIANTS, "distill variant")
    args.device = args.device or ("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    args.steps = args.steps if args.steps is not None else (2 if args.smoke else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 3)
    args.kernel_warmup_ms = args.kernel_warmup_ms if args.kernel_warmup_ms is not None else (1 if args.smoke else 25)
    args.kernel_rep_ms = args.kernel_rep_ms if args.kernel_rep_ms is not None else (5 if args.smoke else 200)
    args.inprocess = (args.inprocess or args.smoke) and not args.subprocess
    return args


def save(results: dict, out: str | None) -> None:
    if not out:
        return
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(report.render_markdown(results))
        if results.get("post_training"):
            f.write("\n\n## Post-training steps (bench/post_training.py)\n\n" + post_training.table(
                results["post_training"]) + "\n")


def _work(args, results: dict, env: dict, left) -> None:
    if args.kernel_list:
        for name, fn in (("copy_gbs", common.copy_bandwidth_gbs), ("matmul_tflops", common.matmul_tflops)):
            try:
                results["ceilings"][name] = fn(args.device, smoke=args.smoke)
            except Exception as e:
                traceback.print_exc()
                results["notes"].append(f"ceiling {name} not measured: {type(e).__name__}: {e}")
        print(f"== ceilings: {results['ceilings']}", flush=True)
        save(results, args.out)

    for key in args.kernel_list:
        if left() <= 0:
            results["kernels"].append({"key": key, "provider": "-", "status": "skipped (time budget)", "env": env})
            continue
        print(f"== kernel {key}", flush=True)
        try:
            benches = load_benches(key, args.device, args.smoke)
        except Exception as e:
            traceback.print_exc()
            why = "module not written yet" if isinstance(e, ModuleNotFoundError) and KERNELS[key] in str(e) else (
                f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}")
            results["kernels"].append({"key": key, "provider": "-", "status": f"error: {why}", "env": env})
            save(results, args.out)
            continue
        for kb in benches:
            results["kernels"] += bench_kernel(key, kb, args.device, results["ceilings"], args, env)
        del benches
        torch._dynamo.reset()
        _free(args.device)
        save(results, args.out)

    # e2e: priority order, so a short budget keeps the headline comparisons; the expected crash goes last.
    if args.shape_list:
        B = args.batch or "default"
        results["e2e_setup"] = (f"steps {args.warmup} warm-up + {args.steps} timed, AdamW(lr={e2e.LR}, fused on "
                                f"CUDA), batch {B}, seq {args.seq or 'default'}, "
                                f"{'one process per variant' if not args.inprocess else 'in-process (smoke)'}; "
                                + "; ".join(f"{s}: {e2e.SHAPES[s].why}" for s in args.shape_list))
    for shape in args.shape_list:
        for variant in args.variant_list or e2e.variants_for(shape):
            row_env = {"env": env}
            if left() <= 30:  # less than a model build and one step: don't start a variant that cannot finish
                results["e2e"].append({"shape": shape, "variant": variant, "status": "skipped (time budget)",
                                       **row_env})
                continue
            print(f"== e2e {shape} {variant}: {e2e.variant_help(shape, variant)}", flush=True)
            kw = dict(smoke=args.smoke, device=args.device, steps=args.steps, warmup=args.warmup, batch=args.batch,
                      seq=args.seq)
            if args.inprocess:
                res = e2e.run_variant_inprocess(shape, variant, **kw)
            else:
                res = e2e.run_variant_subprocess(shape, variant, timeout=min(args.variant_timeout, left() - 5),
                                                 smoke_inductor=args.smoke_inductor, **kw)
                tail = res.get("log_tail", [])
                print("\n".join("    | " + ln for ln in (tail if res["status"] != "ok" else tail[-3:])), flush=True)
            res.update(row_env)
            results["e2e"].append(res)
            e2e.add_loss_diffs(results["e2e"])
            print(f"  -> {res['status']}  tok/s {res.get('tok_s')}  peak {res.get('peak_gib')}  "
                  f"warm-up {res.get('warmup_s')}  loss {res.get('final_loss')}", flush=True)
            save(results, args.out)
    _post_work(args, results, env, left)
    _distill_work(args, results, env, left)


def _post_work(args, results: dict, env: dict, left) -> None:
    """The post-training steps (bench/post_training.py), each variant in its own process as the e2e step."""
    post_steps = args.post_steps if args.post_steps is not None else (2 if args.smoke else 5)
    for workload in args.post_list:
        for variant in args.post_variant_list:
            if left() <= 30:
                results["post_training"].append({"workload": workload, "variant": variant,
                                                 "status": "skipped (time budget)", "env": env})
                continue
            print(f"== post-training {workload} {variant}", flush=True)
            kw = dict(smoke=args.smoke, device=args.device, steps=post_steps, warmup=1 if args.smoke else 2)
            if args.inprocess:
                res = post_training.run_inprocess(workload, variant, **kw)
            else:
                res = post_training.run_subprocess(workload, variant, timeout=min(args.variant_timeout, left() - 5),
                                                   **kw)
            res["env"] = env
            results["post_training"].append(res)
            post_training.add_loss_diffs(results["post_training"])
            print(f"  -> {res['status']}  tok/s {res.get('tok_s')}  peak {res.get('peak_gib')}  "
                  f"x inductor tok/s {res.get('tok_s_vs_inductor')} peak {res.get('peak_vs_inductor')}  "
                  f"loss diff {res.get('max_loss_diff')}", flush=True)
            save(results, args.out)



def _distill_work(args, results: dict, env: dict, left) -> None:
    """The distillation step (bench/distill.py), each variant in its own process as the e2e step."""
    if args.distill_list:
        results["distill_setup"] = (f"steps {args.warmup} warm-up + {args.steps} timed, AdamW(lr={distill.LR}) on the "
                                    f"student, batch {args.batch or 'default'}, seq {args.seq or 'default'}; "
                                    + "; ".join(f"{s}: {distill.SHAPES[s].why}" for s in args.distill_list))
    for shape in args.distill_list:
        for variant in args.distill_variant_list:
            if left() <= 30:
                results["distill"].append({"shape": shape, "variant": variant, "status": "skipped (time budget)",
                                           "env": env})
                continue
            print(f"== distill {shape} {variant}: {distill.VARIANT_HELP[variant]}", flush=True)
            kw = dict(smoke=args.smoke, device=args.device, steps=args.steps, warmup=args.warmup, batch=args.batch,
                      seq=args.seq)
            if args.inprocess:
                res = distill.run_variant_inprocess(shape, variant, **kw)
            else:
                res = distill.run_variant_subprocess(shape, variant, timeout=min(args.variant_timeout, left() - 5),
                                                     smoke_inductor=args.smoke_inductor, **kw)
                tail = res.get("log_tail", [])
                print("\n".join("    | " + ln for ln in (tail if res["status"] != "ok" else tail[-3:])), flush=True)
            res["env"] = env
            results["distill"].append(res)
            distill.add_loss_diffs(results["distill"])
            print(f"  -> {res['status']}  tok/s {res.get('tok_s')}  peak {res.get('peak_gib')}  "
                  f"warm-up {res.get('warmup_s')}  loss {res.get('final_loss')}", flush=True)
            save(results, args.out)


def run_tool(argv: list[str]) -> int:
    """`python -m bench.run <tool> ...`: the tool's own main with the rest of the arguments."""
    module, _ = TOOLS[argv[0]]
    return importlib.import_module(module).main(argv[1:]) or 0


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] in TOOLS:
        return run_tool(list(argv))
    args = parse_args(argv)
    if torch.device(args.device).type == "cpu":
        # Kernel modules may call Triton launchers on CPU tensors; the interpreter must be on before they import.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    start = time.perf_counter()

    def left() -> float:
        return float("inf") if args.budget_s is None else args.budget_s - (time.perf_counter() - start)

    env = common.env_info()
    results = {"env": env, "smoke": args.smoke, "device": args.device, "argv": list(argv),
               "loss_atol": args.loss_atol, "loss_rtol": args.loss_rtol, "ceilings": {}, "kernels": [], "e2e": [],
               "post_training": [], "distill": [], "notes": [],
               "definitions": {"extra_peak": common.EXTRA_PEAK_DEFINITION, "e2e": report.E2E_DEFINITIONS}}
    print("== " + report.env_line(env), flush=True)

    if args.smoke and not args.smoke_inductor:
        results["notes"].append("smoke: Inductor codegen replaced by aot_eager (bench.common.smoke_codegen)")
        with common.smoke_codegen():
            _work(args, results, env, left)
    else:
        _work(args, results, env, left)

    if args.out and results["e2e"]:
        why = report.plot_e2e(results, os.path.join(args.out, "e2e.png"))
        if why:
            results["notes"].append(f"no plot: {why}")
    results["total_s"] = time.perf_counter() - start
    save(results, args.out)
    print("\n" + report.render_markdown(results))
    if results["post_training"]:
        print("\n" + post_training.table(results["post_training"]))
    print(report.short_summary(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
