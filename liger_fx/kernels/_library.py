"""How the `liger_fx::` ops whose work is Triton kernels are registered: `torch.library.triton_op`.

A `custom_op` is opaque to the compiler: Inductor calls it through the dispatcher, and the op's Python body runs on
every call (argument checks, allocation, Triton's launcher binding the arguments). Measured on the H200 through
`torch.compile(fn, backend="liger")`, fwd + bwd: RMSNorm 16384x4096 took 1.52 ms against a kernel time of 0.21, RoPE
1.49 against 0.19, and a Llama-3.2-1B step at B1 T1024 spent ~36 ms calling ops rather than running them.
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
arguments, not on sizes or pointers. Other kernels go to torch's analysis as before. Measured on the H200
(bench/compile_profile.py, a Llama-3.2-1B compile from empty caches): 364 analyses, 8.9 s of Triton IR generation,
before the key saw through torch's Autotuner wrapper (`_unwrap_autotuner`); 7 and 0.18 s after. Warm-up 31.1 s
against plain Inductor's 40.7 (Qwen2-1.5B: 51.2 against 63.4; bench/RESULTS.md, 2026-11-30 03:32 section).
`LIGER_FX_ANALYSIS_CACHE=0` (read at import) leaves torch's function alone; `=check` runs torch's analysis on
every hit too and raises where the answers differ (the GPU tests run so).

`LIGER_FX_OPAQUE_OPS=1` (read at import) registers the same bodies as opaque `custom_op`s instead: the
implementation the project used before, kept to measure against and as a way out if a torch version mishandles
`triton_op`.
"""

from __future__ import annotations

import collections
import copy
import functools
import os

import sympy
import torch
from torch._library.infer_schema import infer_schema
from torch._library.triton import set_wrap_triton_enabled

OPAQUE = os.environ.get("LIGER_FX_OPAQUE_OPS", "0") == "1"
# LIGER_FX_ANALYSIS_CACHE=check: compare every cache hit with torch's own analysis (raises on a difference)
CHECK = os.environ.get("LIGER_FX_ANALYSIS_CACHE") == "check"


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


def _unwrap_autotuner(kernel, kwargs):
    """The JITFunction and the arguments its IR is made from. Torch's kernel side table hands the later analyses
    (Inductor's lowering) our kernel wrapped in a Triton `Autotuner` of one config; torch's analysis then reads
    the wrapped function with the first config's arguments added, and so does this key (on the H200 the wrapped
    form missed the cache: a Llama-3.2-1B compile analysed 357 of our launches uncached beside 6 cache entries)."""
    inner = getattr(kernel, "fn", None)
    if hasattr(kernel, "configs") and hasattr(inner, "params"):
        configs = kernel.configs
        return inner, ({**kwargs, **configs[0].kwargs} if configs else kwargs)
    return kernel, kwargs


def _analysis_key(kernel, kwargs, tma_descriptor_metadata):
    """What a kernel's store analysis depends on, for kernels of this package; None for anything else (not cached).
    Constexpr arguments and launch options count by value; other numbers by the specializations Triton makes of
    them (== 1, divisible by 16), which change the IR but not where it stores; symbolic sizes as "symbolic" (torch
    puts one stand-in value in their place before it generates the IR); any other runtime argument is a tensor, in
    whatever form the caller holds it (fake tensor, Inductor IR node: TensorBox, StorageBox, InputBuffer,
    ReinterpretView, ...) and counts by its name only."""
    kernel, kwargs = _unwrap_autotuner(kernel, kwargs)
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
        if name in constexpr or name not in names:  # the IR is this value's (a launch option: num_warps)
            if value is _SYMBOLIC or not isinstance(value, (bool, int, float, str, type(None), torch.dtype)):
                return None  # a symbolic or unhashable constant: ask torch every time
            key.append((name, value))
        elif value is None or isinstance(value, bool):
            key.append((name, value))
        elif isinstance(value, int):
            key.append((name, "int", value == 1, value % 16 == 0))
        elif isinstance(value, float):
            key.append((name, "float"))
        elif value is _SYMBOLIC or isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            key.append((name, "symbolic"))
        else:
            key.append((name, "tensor"))
    return tuple(key)


def memoized(original):
    """`original` (torch's store analysis) with a cache for this package's kernels; see the module docstring."""
    cache: dict = {}

    @functools.wraps(original)
    def analysed(kernel, kwargs, tma_descriptor_metadata, *args, **kw):
        key = _analysis_key(kernel, kwargs, tma_descriptor_metadata) if not args and not kw else None
        if key is None:
            inner = _unwrap_autotuner(kernel, kwargs)[0]
            if getattr(getattr(inner, "fn", None), "__module__", "").startswith("liger_fx.kernels."):
                analysed.liger_fx_uncached[inner.fn.__name__] += 1  # ours, not cached: compile_profile reports it
            return original(kernel, kwargs, tma_descriptor_metadata, *args, **kw)
        if key not in cache:  # the kernel is kept with its entry, so its id is never another's
            cache[key] = (kernel, original(kernel, kwargs, tma_descriptor_metadata))
        elif CHECK:  # every hit against a fresh analysis (the GPU tests run this way)
            fresh = original(kernel, kwargs, tma_descriptor_metadata)
            if fresh != cache[key][1]:
                raise AssertionError(f"liger_fx: cached store analysis of {kernel} is {cache[key][1]}, "
                                     f"torch's is {fresh}; key {key}")
        return copy.deepcopy(cache[key][1])  # callers own what they get, as from a fresh analysis

    analysed.liger_fx_cache = cache
    analysed.liger_fx_uncached = collections.Counter()
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
