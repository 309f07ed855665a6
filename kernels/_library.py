"""How the `liger_fx::` ops whose work is Triton kernels are registered: `torch.library.triton_op`.

A `custom_op` is opaque to the compiler: Inductor calls it through the dispatcher, and the op's Python body runs on
every call (argument checks, allocation, Triton's launcher binding the arguments). Measured on the H200 through
`torch.compile(fn, backend="liger")`, fwd + bwd: RMSNorm 16384x4096 took 1.52 ms against a kernel time of 0.21, RoPE
1.49 against 0.19, and a Llama-3.2-1B step at B1 T1024 spent ~36 ms calling ops rather than running them (issue 18).
A `triton_op` is decomposed when AOTAutograd traces it: Inductor sees the allocations and the kernel launches
(`wrap_triton(kernel)[grid](...)`), decides shapes, grids and strides at compile time, and launches the kernels
from its own generated code as it launches its own; CUDA graphs (`mode="reduce-overhead"`) can capture them.

Rules for an op body, so that the decomposition stays exact and copy-free:
- launch with `wrap_triton(kernel)[grid](...)` written literally: torch finds the kernels by reading the source,
  and puts their source into AOTAutograd's cache key (a changed kernel must not hit a stale cache entry);
- a kernel writes only into tensors the body allocated itself, passed whole (not as views): a write through a view
  makes functionalization copy the base back.

Off CUDA the op calls its torch reference as an opaque op of its own, `<name>_cpu`. Inlined instead, the reference's
intermediates would be what the partitioner saves or recomputes on the CPU, so CPU tests of what a compiled graph
saves (tests/test_recompute.py) would no longer describe the GPU graph, where the op's output is one kernel's.

Compile time: for every launch a traced graph holds, torch works out which tensors the kernel writes by compiling
it to Triton IR and reading its stores (`triton_kernel_wrap`), once in functionalization and again in Inductor's
lowering (torch 2.11: three call sites), and keeps nothing. A Qwen2-1.5B step holds ~300 launches of our kernels,
most of them the same kernel with the same constants: on the H200 its compile spent 19.2 s in Inductor's
GraphLowering.run against plain Inductor's 9.4, and 13.3 s tracing the joint graph against 8.6. `memoized` keeps the
answer per (kernel, constants) for OUR kernels only: what a kernel stores to depends on its source and its constexpr
arguments, not on sizes or pointers. Other kernels go to torch's analysis as before. Measured on the H200 from empty
caches: warm-up 47.7 -> 43.5 s (Llama-3.2-1B), 33.1 -> 30.1 s (Llama-3-8B, 8 layers; bench/RESULTS.md).
`LIGER_FX_ANALYSIS_CACHE=0` (read at import) leaves torch's function alone.

`LIGER_FX_OPAQUE_OPS=1` (read at import) registers the same bodies as opaque `custom_op`s instead: the
implementation the project used before, kept to measure against and as a way out if a torch version mishandles
`triton_op`.
"""

from __future__ import annotations

import copy
import functools
import os

import sympy
import torch
from torch._library.infer_schema import infer_schema
from torch._library.triton import set_wrap_triton_enabled

OPAQUE = os.environ.get("LIGER_FX_OPAQUE_OPS", "0") == "1"


def _device_type(args) -> str:
    return next(a.device.type for a in args if isinstance(a, torch.Tensor))


def triton_library_op(name: str, *, cpu):
    """Register the decorated CUDA body as op `name` (`torch.library.triton_op`, or an opaque `custom_op` with
    LIGER_FX_OPAQUE_OPS=1) that runs `cpu`, the torch reference with the same signature, off CUDA. The body is also
    the fake implementation (it allocates exactly what the real call allocates)."""

    def register(fn):
        schema = infer_schema(fn, mutates_args=())
        ref_op = torch.library.custom_op(f"{name}_cpu", cpu, mutates_args=(), schema=schema)
        ref_op.register_fake(cpu)  # torch code: it runs on fake tensors as it is

        @functools.wraps(fn)
        def body(*args):
            return fn(*args) if _device_type(args) == "cuda" else ref_op(*args)

        if not OPAQUE:
            return torch.library.triton_op(name, body, mutates_args=())

        def impl(*args):
            with set_wrap_triton_enabled(False):  # plain launches: no higher-order-op dispatch in eager
                return body(*args)

        op = torch.library.custom_op(name, impl, mutates_args=(), schema=schema)
        op.register_fake(body)
        return op

    return register


_SYMBOLIC = object()


def _analysis_key(kernel, kwargs, tma_descriptor_metadata):
    """What a kernel's store analysis depends on, for kernels of this package; None for anything else (not cached).
    Tensors (fake, or Inductor's IR buffers) count by argument name only; constexpr arguments and launch options by
    value; other numbers by the specializations Triton makes of them (== 1, divisible by 16), which change the IR
    but not where it stores."""
    fn = getattr(kernel, "fn", None)
    params = getattr(kernel, "params", None)
    if fn is None or params is None or tma_descriptor_metadata:
        return None
    if not getattr(fn, "__module__", "").startswith("liger_fx.kernels."):
        return None
    names, constexpr = {p.name for p in params}, {p.name for p in params if p.is_constexpr}
    key = [id(kernel)]  # not the kernel: hashing a JITFunction hashes its source and dependencies
    for name, value in sorted(kwargs.items()):
        if isinstance(value, sympy.Expr):  # Inductor's lowering passes sizes as sympy
            value = int(value) if value.is_Integer else _SYMBOLIC
        if isinstance(value, (bool, str)) or value is None or (isinstance(value, int) and name in constexpr):
            key.append((name, value))
        elif isinstance(value, int) and name not in names:  # a launch option (num_warps)
            key.append((name, value))
        elif isinstance(value, int):
            key.append((name, "int", value == 1, value % 16 == 0))
        elif isinstance(value, float) and name not in constexpr:
            key.append((name, "float"))
        elif (value is _SYMBOLIC or isinstance(value, (torch.SymInt, torch.SymFloat))) and name not in constexpr:
            key.append((name, "sym"))
        elif isinstance(value, torch.Tensor) or type(value).__name__ in ("TensorBox", "StorageBox", "ReinterpretView"):
            key.append((name, "tensor"))
        else:
            return None
    return tuple(key)


def memoized(original):
    """`original` (torch's store analysis) with a cache for this package's kernels; see the module docstring."""
    cache: dict = {}

    @functools.wraps(original)
    def analysed(kernel, kwargs, tma_descriptor_metadata, *args, **kw):
        key = _analysis_key(kernel, kwargs, tma_descriptor_metadata) if not args and not kw else None
        if key is None:
            return original(kernel, kwargs, tma_descriptor_metadata, *args, **kw)
        if key not in cache:  # the kernel is kept with its entry, so its id is never another's
            cache[key] = (kernel, original(kernel, kwargs, tma_descriptor_metadata))
        return copy.deepcopy(cache[key][1])  # callers own what they get, as from a fresh analysis

    analysed.liger_fx_cache = cache
    return analysed


def _memoize_kernel_analysis() -> None:
    """Wrap torch's per-launch store analysis of user Triton kernels (`identify_accessed_tensors` on torch 2.13,
    `identify_mutated_tensors` on 2.11; its callers look it up in the module at each call) with `memoized`."""
    from torch._higher_order_ops import triton_kernel_wrap as tkw

    name = next((n for n in ("identify_accessed_tensors", "identify_mutated_tensors") if hasattr(tkw, n)), None)
    if name is not None and not hasattr(getattr(tkw, name), "liger_fx_cache"):
        setattr(tkw, name, memoized(getattr(tkw, name)))


if os.environ.get("LIGER_FX_ANALYSIS_CACHE", "1") != "0":
    _memoize_kernel_analysis()
