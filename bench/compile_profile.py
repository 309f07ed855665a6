"""Where a variant's warm-up spends its host time: the first training step (Dynamo, our rewrite, AOT autograd,
Inductor) under cProfile, from empty compile caches, as a new user's first run.

    python -m bench.run warmup --variant hf_hook [--shape llama-1b] [--cprofile] [--out DIR]  # or bench.compile_profile
    python -m bench.run warmup --smoke                   # CPU, tiny model: checks this script

Prints the first step's wall time, the seconds of each compile phase where a warm-up goes (joint-graph trace, our
rewrite, Inductor's lowering and codegen, the Triton analyses of our kernels' launches), Triton's front end by kernel
and by who asked for it, and with --cprofile the top functions by own time; writes the raw profile to
DIR/compile-<variant>-<shape>.prof for pstats.
"""

from __future__ import annotations

import os
import tempfile

import argparse
import cProfile
import pstats
import time

import torch

from bench import e2e

# (label, substring of pstats' "file:line(function)" key); cumulative time of the first match in each row
PHASES = [
    ("dynamo: whole first step's compile", "convert_frame.py", "_compile"),
    ("liger_fx rewrite_graph", "liger_fx/backend.py", "rewrite_graph"),
    ("  to_aten", "liger_fx/", "to_aten"),
    ("  replace_by_example", "pattern_matcher.py", "replace_by_example"),
    ("aot: graph capture (joint trace)", "graph_capture.py", "aot_dispatch_autograd_graph"),
    ("aot: stage 2 (partition, compile fwd)", "graph_compile.py", "aot_stage2_autograd"),
    ("partitioner", "partitioners.py", "min_cut_rematerialization_partition"),
    ("inductor: compile_fx_inner", "compile_fx.py", "compile_fx_inner"),
    ("inductor: GraphLowering.run", "graph.py", "run"),
    ("inductor: codegen", "graph.py", "codegen"),
    ("user kernel store analysis", "triton_kernel_wrap.py", "identify_mutated_tensors"),
    ("user kernel store analysis (2.13)", "triton_kernel_wrap.py", "identify_accessed_tensors"),
    ("user kernel ttir", "triton_kernel_wrap.py", "generate_ttir"),
    ("triton_kernel_wrapper_mutation (traced)", "triton_kernel_wrap.py", "triton_kernel_wrapper_mutation_dense"),
    ("functionalize user kernel", "triton_kernel_wrap.py", "triton_kernel_wrapper_mutation_functionalize"),
    ("fake tensor dispatch", "fake_tensor.py", "dispatch"),
    ("async compile wait", "async_compile.py", "wait"),
]


def phase_table(stats: pstats.Stats) -> list[tuple[str, float, int]]:
    rows = []
    for label, path, func in PHASES:
        best = None
        for (file, line, name), (cc, nc, tt, ct, callers) in stats.stats.items():
            if name == func and path in file and (best is None or ct > best[0]):
                best = (ct, nc)
        if best:
            rows.append((label, best[0], best[1]))
    return rows


class TtirLog:
    """Triton's front end (Python AST to Triton IR) timed by who asked: torch's store analysis of a traced launch, a
    JIT compile at a launch in this process, or anything else; with the kernel's name."""

    def __init__(self):
        from collections import defaultdict

        import triton.compiler.code_generator as cg

        self.original = cg.ast_to_ttir
        self.seconds, self.calls = defaultdict(float), defaultdict(int)

        def timed(fn, *args, **kwargs):
            import traceback

            files = [f.filename for f in traceback.extract_stack(limit=60)]
            who = ("torch store analysis" if any("triton_kernel_wrap" in f for f in files)
                   else "JIT compile at a launch" if any(f.endswith("runtime/jit.py") for f in files)
                   else "other")
            t0 = time.perf_counter()
            try:
                return self.original(fn, *args, **kwargs)
            finally:
                key = (who, getattr(fn, "__name__", "?"))
                self.seconds[key] += time.perf_counter() - t0
                self.calls[key] += 1

        cg.ast_to_ttir = timed

    def report(self) -> None:
        total = sum(self.seconds.values())
        print(f"== Triton front end (AST -> TTIR) in this process: {total:.2f} s, {sum(self.calls.values())} calls")
        for (who, name), sec in sorted(self.seconds.items(), key=lambda kv: -kv[1]):
            print(f"{sec:8.2f} s  {self.calls[(who, name)]:4d} calls  {who}: {name}")
        try:
            from torch._higher_order_ops import triton_kernel_wrap as tkw

            for n in ("identify_accessed_tensors", "identify_mutated_tensors"):
                cache = getattr(getattr(tkw, n, None), "liger_fx_cache", None)
                if cache is not None:
                    fn = getattr(tkw, n)
                    print(f"== liger_fx store-analysis cache ({n}): {len(cache)} entries; our launches analysed "
                          f"uncached: {dict(getattr(fn, 'liger_fx_uncached', {}))}")
                    print("   entries by kernel: " + ", ".join(sorted(f"{k.fn.__name__}" for k, _ in cache.values())))
        except Exception as e:  # a report, not a failure
            print("== store-analysis cache: unreadable:", e)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.run warmup", description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="hf_hook", choices=e2e.VARIANTS)
    p.add_argument("--shape", default="llama-1b", choices=sorted(e2e.SHAPES))
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--cprofile", action="store_true", help="also cProfile the step (slows it ~2x; python 3.12's "
                   "cumulative times are unreliable, own times are fine)")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model, fp32: checks this script in seconds")
    args = p.parse_args(argv)
    # Empty caches of this run's own, as a new user's first run (bench/e2e.py's subprocesses do the same); torch
    # and Triton read these at their first compile.
    cache = tempfile.mkdtemp(prefix="liger_fx_compile_profile_")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(cache, "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(cache, "triton"))

    _, run = e2e.training_step(args.shape, args.variant, smoke=args.smoke)

    def step():
        run()
        if not args.smoke:
            torch.cuda.synchronize()

    ttir = TtirLog() if not args.smoke else None
    prof = cProfile.Profile() if args.cprofile else None
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    step()
    if prof:
        prof.disable()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    step()
    second = time.perf_counter() - t0
    print(f"== {args.variant} {args.shape}: first step {first:.1f} s{' under cProfile' if prof else ''}, second step "
          f"{second:.2f} s; torch {torch.__version__}")
    print("== compile phases (s): " + ", ".join(f"{k} {v}" for k, v in e2e._compile_times().items()))
    if ttir:
        ttir.report()
    if prof:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"compile-{args.variant}-{args.shape}.prof")
        prof.dump_stats(path)
        stats = pstats.Stats(prof)
        print(f"== profile {path}")
        for label, ct, nc in phase_table(stats):
            print(f"{ct:8.2f} s  {nc:6d} calls  {label}")
        print(f"== top {args.top} by own time")
        stats.sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
