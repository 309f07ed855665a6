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

`LIGER_FX_OPAQUE_OPS=1` (read at import) registers the same bodies as opaque `custom_op`s instead: the
implementation the project used before, kept to measure against and as a way out if a torch version mishandles
`triton_op`.
"""

from __future__ import annotations

import functools
import os

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
