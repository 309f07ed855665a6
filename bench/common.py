"""What every benchmark shares: the KernelBench record, timing, the two measured ceilings, extra peak memory, and the
environment stamp that every result row carries.

Timing on CUDA is `triton.testing.do_bench` (CUDA events, L2 flushed before every rep, grads reset outside the timed
region); we ask it for the median and the 20th/80th percentiles. On CPU (the smoke mode) a perf_counter loop gives the
same three numbers, so the code path is identical and only the clock differs.
"""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

import torch

GiB = 1024**3

# How "extra peak memory" is defined; printed under every kernel table and stored in the JSON.
EXTRA_PEAK_DEFINITION = (
    "extra GiB = max_memory_allocated during one fwd+bwd call - memory_allocated just before it (inputs, weights and "
    "the upstream gradient already exist; input .grad set to None first). It INCLUDES the input gradients the call "
    "produces. net GiB = extra GiB - the size of those input gradients (dx, dW, ...: the inputs' own sizes), i.e. what "
    "an implementation holds beyond the outputs every implementation must return; negative when a provider writes "
    "gradients into storage it did not allocate in the call (liger-kernel's in-place backward)."
)


@dataclass
class KernelBench:
    """One kernel benchmark: the same fwd+bwd computed by several providers on the same inputs.

    providers: name -> zero-arg callable running forward AND backward once. It should return the tensors it produced
        (output, then input grads) so run.py can check each provider against "torch"; returning None skips the check.
        Names: "torch" (eager reference), "inductor" (torch.compile default), "liger_fx", "liger_kernel".
    grad_to_none: the leaf tensors whose .grad each call fills; reset to None before every timed call.
    bytes: the fewest bytes fwd+bwd must move (each input read once, each output written once) -> GB/s and roofline.
    flops: the FLOPs of fwd+bwd (for matmul-bound kernels) -> TFLOP/s against the measured matmul ceiling.
    unavailable: provider -> why it was not run (e.g. liger-kernel not installed); reported, never silently dropped.
    """

    name: str
    shape: str
    providers: dict[str, Callable[[], Any]]
    grad_to_none: list = field(default_factory=list)
    bytes: int | None = None
    flops: float | None = None
    unavailable: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------------
# Environment


def _git_commit() -> str:
    if os.environ.get("LIGER_FX_COMMIT"):
        return os.environ["LIGER_FX_COMMIT"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if not sha:
            return "unknown (no git here; set LIGER_FX_COMMIT)"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except Exception:
        return "unknown (no git here; set LIGER_FX_COMMIT)"


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def env_info() -> dict:
    """date, GPU, versions and commit: stamped on every result row."""
    import triton

    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
    else:
        gpu = f"cpu ({platform.machine()}, {os.cpu_count()} cores)"
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "gpu": gpu,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": _version("transformers"),
        "liger_kernel": _version("liger-kernel"),
        "commit": _git_commit(),
    }


# --------------------------------------------------------------------------------------------------------------
# Timing


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable, device, grad_to_none=(), warmup_ms: float = 25, rep_ms: float = 100,
            min_reps: int = 10) -> tuple:
    """(median, p20, p80) milliseconds of fn(), over at least `min_reps` timed calls."""
    grad_to_none = list(grad_to_none)
    if torch.device(device).type == "cuda":
        import triton.testing

        # do_bench sizes its reps from `rep` ms: a 90 ms linear+CE at rep=200 would get 2 samples, too few for a
        # p20/p80. Stretch rep to min_reps calls, from one timed call.
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for t in grad_to_none:
            t.grad = None
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        rep_ms = max(rep_ms, min_reps * start.elapsed_time(end))
        med, p20, p80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none or None,
                                                quantiles=[0.5, 0.2, 0.8])
        return float(med), float(p20), float(p80)
    def reset():
        for t in grad_to_none:
            t.grad = None

    times = []
    deadline = time.perf_counter() + warmup_ms / 1e3
    reset()
    fn()
    while time.perf_counter() < deadline:
        reset()
        fn()
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(times) < 3 or time.perf_counter() < deadline:
        reset()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=10, method="inclusive")  # deciles: q[1] = p20, q[7] = p80
    return statistics.median(times), q[1], q[7]


# --------------------------------------------------------------------------------------------------------------
# Ceilings, measured once per run on the machine itself (datasheet numbers are leads, not ceilings)


def copy_bandwidth_gbs(device, smoke: bool = False) -> float:
    """Device-to-device copy, counting bytes read plus written. 1 GiB per side on CUDA: 20x the H200's 60 MB L2."""
    n = (1 << 20) if smoke else (1 << 29)  # bf16 elements
    src = torch.randn(n, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    med, _, _ = time_ms(lambda: dst.copy_(src), device, warmup_ms=25, rep_ms=200)
    return 2 * src.nbytes / (med * 1e-3) / 1e9


def matmul_tflops(device, smoke: bool = False) -> float:
    """bf16 matmul rate on random data (zeros ran 13% faster on this H200 once: never time zeros)."""
    n = 256 if smoke else 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    med, _, _ = time_ms(lambda: a @ b, device, warmup_ms=50, rep_ms=300)
    return 2 * n**3 / (med * 1e-3) / 1e12


def compile_liger(fn: Callable) -> Callable:
    """`torch.compile(fn, backend="liger")` as a user writes it: the plain torch form is rewritten into our op, and
    the row measures the op as users call it (dispatch, launch, Inductor's code around it), not the bare kernel."""
    ensure_liger_backend()
    return torch.compile(fn, backend="liger", dynamic=False)


def ensure_liger_backend() -> None:
    """`backend="liger"` resolves through the package's entry point once liger-fx is pip-installed (bench/gpu.sh does
    that). In a bare source checkout there is no entry point: register the same function by name, and say so."""
    import liger_fx
    from torch._dynamo.backends.registry import lookup_backend, register_backend

    try:
        lookup_backend("liger")
    except Exception:
        print("note: liger-fx is not installed here; registering backend 'liger' from liger_fx.liger_backend", flush=True)
        register_backend(liger_fx.liger_backend, name="liger")


@contextlib.contextmanager
def smoke_codegen():
    """In the CPU smoke mode, swap Inductor's code generation for aot_eager.

    Inductor's C++ codegen costs 5-60 s per graph on the 2-core CI machine (a tiny Llama step: 60 s cold), which
    would make the smoke mode minutes long. Dynamo capture, AOTAutograd and liger-fx's whole rewrite still run; only
    the last step (compile_fx) changes. Inductor's codegen is covered by the backend's own tests and by the GPU run.
    """
    from unittest import mock

    import torch._inductor.compile_fx as cfx

    from liger_fx import backend

    def aot_eager_codegen(gm, example_inputs, *args, **kwargs):
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, example_inputs)

    with mock.patch.object(cfx, "compile_fx", aot_eager_codegen), \
            mock.patch.object(backend, "compile_fx", aot_eager_codegen):
        yield


# --------------------------------------------------------------------------------------------------------------
# Memory


def extra_peak_bytes(fn: Callable, device, grad_to_none=()) -> tuple[int | None, int | None]:
    """(extra bytes, input-gradient bytes) of one fn() call; see EXTRA_PEAK_DEFINITION. (None, None) off CUDA."""
    if torch.device(device).type != "cuda":
        return None, None
    for t in grad_to_none:
        t.grad = None
    gc.collect()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    # The input gradients every implementation must return have the inputs' sizes; counted statically, so a provider
    # that returns grads through autograd.grad (not .grad) or writes them into its inputs is measured the same way.
    return peak - base, sum(t.nbytes for t in grad_to_none)


def rel_err(ours, ref) -> float:
    """max over paired tensors of ||ours - ref|| / ||ref|| in fp32 (NaN anywhere -> nan)."""
    ours = ours if isinstance(ours, (tuple, list)) else (ours,)
    ref = ref if isinstance(ref, (tuple, list)) else (ref,)
    if len(ours) != len(ref):
        raise ValueError(f"provider returned {len(ours)} tensors, the torch reference {len(ref)}")
    worst = 0.0
    for a, b in zip(ours, ref):
        if a is None or b is None:
            if (a is None) != (b is None):
                raise ValueError("a provider returned None where the reference has a tensor (or vice versa)")
            continue
        a, b = a.detach().float(), b.detach().float()
        if a.shape != b.shape:
            raise ValueError(f"shape {tuple(a.shape)} != reference {tuple(b.shape)}")
        if not torch.isfinite(a).all():
            return float("nan")
        worst = max(worst, ((a - b).norm() / b.norm().clamp_min(1e-30)).item())
    return worst
