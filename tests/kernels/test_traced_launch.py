"""The CUDA launchers as Inductor traces and launches them, checked without a GPU.

Inductor decomposes a `triton_op` (tests/test_compiled_ops_gpu.py): the launcher's Python runs once, at trace time,
on symbolic sizes, and Inductor then launches the kernels with its own argument types. Two H200 failures came from
there, and both are checked here on fake CUDA tensors and Triton's front end, which need no GPU:

- a comparison of the token count in a launcher is a guard: `min(programs, blocks)` in the RMSNorm backward
  recompiled a `dynamic=True` graph for each new sequence length;
- Inductor passes a Python float to a user kernel as fp64 (torch 2.11), which reached the RMSNorm backward's
  loop-carried fp32 dW sum: Triton refused to compile it, and every Gemma model fell back.
"""

import os
import subprocess
import sys

import pytest
import torch
from torch._dynamo.source import ConstantSource
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

import liger_fx.kernels.rms_norm as rms_norm_kernels
import liger_fx.kernels.rope as rope_kernels
import liger_fx.kernels.swiglu as swiglu_kernels

BF16 = torch.bfloat16


class _Launch:
    """Stands in for `wrap_triton(kernel)`: records the launch instead of running it (on CPU the kernels are the
    interpreter's, which cannot run on fake tensors). Inductor needs the launch's constexprs and meta-parameters as
    numbers: a SymInt there fails its trace ("unhashable type: non-nested SymInt")."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            bad = {k: v for k, v in kwargs.items() if not isinstance(v, (bool, int, float, str))}
            assert not bad, f"{self.kernel.__name__}: symbolic constexprs {bad}"
            LAUNCHES.append(self.kernel.__name__)
        return launch


LAUNCHES: list[str] = []


def _guards(monkeypatch, build):
    """Run `build(sym)` on fake CUDA tensors whose sizes `sym(hint, name)` are symbolic; return the guards added."""
    monkeypatch.setattr(rms_norm_kernels, "num_sms", lambda device: 132)  # no CUDA device to ask
    for module in (rms_norm_kernels, rope_kernels, swiglu_kernels):
        monkeypatch.setattr(module, "wrap_triton", _Launch)
    LAUNCHES.clear()
    env = ShapeEnv()

    def sym(hint, name):
        return env.create_symintnode(
            env.create_symbol(hint, ConstantSource(name), dynamic_dim=DimDynamic.DYNAMIC), hint=hint)

    with FakeTensorMode(shape_env=env):
        build(sym)
    return [str(g.expr) for g in env.guards]


def _kernels(op):
    return {"rms_norm": 6, "swiglu": 2, "rope": 2, "lm_head_ce": 0}[op]  # launches of the CUDA bodies in OPS[op]


def _rms_norm(sym, n):
    x = torch.randn(2, sym(32, "T"), n(64), device="cuda", dtype=BF16)
    w = torch.randn(x.shape[-1], device="cuda", dtype=BF16)
    for casting, offset in (("llama", 0.0), ("gemma", 1.0)):
        torch.ops.liger_fx.rms_norm(x, w, 1e-6, offset, casting)
        torch.ops.liger_fx.rms_norm_backward(x, x, w, 1e-6, offset, casting)
    torch.ops.liger_fx.rms_norm(x, None, 1e-6, 0.0, "llama")  # no weight: its own backward op, dx only
    torch.ops.liger_fx.rms_norm_backward_dx(x, x, 1e-6)


def _swiglu(sym, n):
    g = torch.randn(2, sym(32, "T"), n(128), device="cuda", dtype=BF16)
    torch.ops.liger_fx.swiglu(g, g, "silu")
    torch.ops.liger_fx.swiglu_backward(g, g, g, "silu")


def _rope(sym, n):
    T = sym(32, "T")
    q = torch.randn(2, 4, T, n(16), device="cuda", dtype=BF16)
    k = torch.randn(2, 2, T, q.shape[-1], device="cuda", dtype=BF16)
    cos = torch.randn(1, 1, T, q.shape[-1], device="cuda", dtype=BF16)
    torch.ops.liger_fx.rope_qk(q, k, cos, cos, BF16, BF16)
    torch.ops.liger_fx.rope_qk_backward(q, k, cos, cos, BF16, BF16)


def _lm_head_ce(sym, n):
    rows = 2 * sym(32, "T")
    h = torch.randn(rows, n(64), device="cuda", dtype=BF16)
    w = torch.randn(1000, h.shape[-1], device="cuda", dtype=BF16)
    t = torch.randint(0, 1000, (rows,), device="cuda")
    torch.ops.liger_fx.fused_linear_cross_entropy(h, w, None, t, -100, "mean", 0.0, 1.0, True, True)
    logits, loss, lse = torch.ops.liger_fx.linear_cross_entropy_logits(h, w, None, t, -100, "mean", 0.0, 1.0, True)
    torch.ops.liger_fx.linear_cross_entropy_logits_backward(
        logits, loss, h, w, None, t, logits, lse, -100, "mean", 0.0, 1.0, True, True)


OPS = {"rms_norm": _rms_norm, "swiglu": _swiglu, "rope": _rope, "lm_head_ce": _lm_head_ce}


@pytest.mark.parametrize("op", OPS)
def test_no_guard_on_the_token_count(monkeypatch, op):
    """Fwd and bwd launchers on a symbolic sequence length add no guard: a new length reuses the compiled graph.
    (With `min(programs, blocks)` back in the RMSNorm backward: ['blocks < 264', 'blocks <= 1'].)"""
    assert _guards(monkeypatch, lambda sym: OPS[op](sym, lambda hint: hint)) == []
    assert len(LAUNCHES) == _kernels(op), LAUNCHES  # the CUDA bodies ran, not the CPU references


@pytest.mark.parametrize("op", OPS)
def test_row_length_is_specialized(monkeypatch, op):
    """A symbolic row length (opcheck's aot_dispatch_dynamic makes every size symbolic) is pinned to its value by
    equality guards, never carried into the tile computation or the constexprs (checked by _Launch)."""
    guards = _guards(monkeypatch, lambda sym: OPS[op](sym, lambda hint: sym(hint, "N")))
    assert all(g.startswith("Eq(") for g in guards), guards


# Triton's front end, run in a process of its own: under TRITON_INTERPRET=1 (tests/conftest.py) the interpreter
# patches triton.language, and the kernels are its wrappers, not JITFunctions.
_FRONT_END = """
import sys
import triton
from triton._C.libtriton import ir
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
from triton.compiler import ASTSource
import liger_fx.kernels.rms_norm as k

fn = getattr(k, sys.argv[1])
constexprs = {"GEMMA": sys.argv[2] == "gemma", "HAS_WEIGHT": sys.argv[2] != "noweight", "BLOCK_M": 2, "BLOCK_N": 64}
signature = {}
for p in fn.params:
    if p.name in constexprs:
        signature[p.name] = "constexpr"
    elif p.name in ("eps", "offset"):
        signature[p.name] = "fp64"  # as Inductor types a Python float argument
    elif p.name == "DW_PARTIAL":
        signature[p.name] = "*fp32"
    else:
        signature[p.name] = "*bf16" if p.name in ("X", "W", "Y", "DY", "DX") else "i32"
backend = CUDABackend(GPUTarget("cuda", 90, 32))
options = backend.parse_options({})
context = ir.context()
ir.load_dialects(context)
backend.load_dialects(context)
module = ASTSource(fn, signature, constexprs=constexprs).make_ir(
    backend.target, options, backend.get_codegen_implementation(options), backend.get_module_map(), context)
print("compiled", "tt.func" in str(module))
"""


@pytest.mark.parametrize("kernel", ["_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel"])
@pytest.mark.parametrize("casting", ["llama", "gemma", "noweight"])
def test_rms_norm_kernels_compile_with_fp64_scalars(kernel, casting):
    """eps and offset typed fp64, as Inductor types a Python float argument: Triton's front end (no GPU needed)
    must accept the kernel. Without the fp32 casts the Gemma backward fails here as on the H200 ("Loop-carried
    variable b_dw has initial type fp32 but is re-assigned to fp64")."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _FRONT_END, kernel, casting], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and "compiled True" in done.stdout, done.stderr[-2000:]


# --------------------------------------------------------------------------------------------------------------
# The cache of torch's store analysis for our kernels (kernels/_library.py): keyed by what the analysis depends on.


def _jit(kernel):
    """The JITFunction: under TRITON_INTERPRET=1 the module holds the interpreter's wrapper of it."""
    import triton

    return kernel if isinstance(kernel, triton.runtime.JITFunction) else triton.runtime.JITFunction(kernel.fn)


def test_analysis_key_ignores_sizes_and_pointers_but_not_constants():
    from liger_fx.kernels._library import _analysis_key

    kernel = _jit(swiglu_kernels._swiglu_bwd_flat_kernel)
    with FakeTensorMode():
        a, b = torch.empty(4096, device="cuda", dtype=BF16), torch.empty(8192, device="cuda", dtype=BF16)

    def args(t, n, write_y):
        return dict(DY=t, G=t, U=t, DG=t, DU=t, Y=t, n=n, ACT=0, WRITE_Y=write_y, BLOCK=1024, EVEN=True, num_warps=4)

    key = _analysis_key(kernel, args(a, 4096, True), {})
    assert key is not None and key == _analysis_key(kernel, args(b, 8192, True), {})
    assert key != _analysis_key(kernel, args(a, 4096, False), {})  # a constexpr: another kernel
    assert key != _analysis_key(kernel, args(a, 4097, True), {})  # another specialization of n

    def somebody_elses(G):
        pass

    assert _analysis_key(_jit(type("K", (), {"fn": somebody_elses})), {"G": a}, {}) is None  # torch's analysis


def test_memoized_analysis_runs_once_per_key_and_hands_out_copies():
    from liger_fx.kernels._library import memoized

    calls = []

    def analysis(kernel, kwargs, tma):
        calls.append(kernel)
        return ["DG", "DU"]

    cached = memoized(analysis)
    kernel = _jit(swiglu_kernels._swiglu_fwd_flat_kernel)
    with FakeTensorMode():
        x = torch.empty(64, device="cuda", dtype=BF16)
    kw = dict(G=x, U=x, Y=x, n=64, ACT=0, BLOCK=64, EVEN=True)
    first = cached(kernel, kw, {})
    first.append("mutated by a caller")
    assert cached(kernel, kw, {}) == ["DG", "DU"] and len(calls) == 1
    cached(kernel, {**kw, "ACT": 1}, {})
    cached("not a kernel", kw, {})
    cached("not a kernel", kw, {})
    assert len(calls) == 4  # once more for a new constant, and each time for what is not ours


def test_analysis_key_takes_any_tensor_form_and_refuses_symbolic_constants():
    """Inductor's lowering hands the analysis its IR nodes (TensorBox, StorageBox, InputBuffer, ...) where the
    joint trace handed fake tensors: a runtime argument that is no number is a tensor, whatever its class, and
    keys as one. A symbolic constexpr is not cached; a symbolic size is one key."""
    import sympy

    from liger_fx.kernels._library import _analysis_key

    kernel = _jit(swiglu_kernels._swiglu_bwd_flat_kernel)
    with FakeTensorMode():
        a = torch.empty(4096, device="cuda", dtype=BF16)

    class InputBuffer:  # stands in for an Inductor IR node
        pass

    def args(t, n, **kw):
        return dict(DY=t, G=t, U=t, DG=t, DU=t, Y=t, n=n, ACT=0, WRITE_Y=True, BLOCK=1024, EVEN=True, num_warps=4,
                    **kw)

    fake = _analysis_key(kernel, args(a, 4096), {})
    assert fake is not None and fake == _analysis_key(kernel, args(InputBuffer(), sympy.Integer(4096)), {})
    s = sympy.Symbol("s0", integer=True, positive=True)
    symbolic = _analysis_key(kernel, args(a, s), {})
    assert symbolic is not None and symbolic != fake and symbolic == _analysis_key(kernel, args(a, 2 * s), {})
    assert _analysis_key(kernel, {**args(a, 4096), "BLOCK": s}, {}) is None


def test_analysis_key_sees_through_the_autotuner_torch_wraps_a_launch_in():
    """A launch with num_warps reaches the analysis as a one-config Triton Autotuner around our kernel, a new one
    per launch (torch's TritonHOPifier moves the launch options into a config). Its key is the kernel's own, with
    the config's arguments, so every launch of a kernel with the same constants shares one entry."""
    import triton

    from liger_fx.kernels._library import _analysis_key, memoized

    kernel = _jit(swiglu_kernels._swiglu_fwd_flat_kernel)
    with FakeTensorMode():
        x = torch.empty(64, device="cuda", dtype=BF16)
    kw = dict(G=x, U=x, Y=x, n=64, ACT=0, BLOCK=64, EVEN=True)
    wrapped = [triton.autotune(configs=[triton.Config(kwargs={}, num_warps=w)], key=[])(kernel) for w in (4, 4, 8)]
    assert _analysis_key(kernel, kw, {}) is not None
    assert all(_analysis_key(a, kw, {}) == _analysis_key(kernel, kw, {}) for a in wrapped)
    with_config = triton.autotune(configs=[triton.Config(kwargs={"BLOCK": 128})], key=[])(kernel)
    assert _analysis_key(with_config, kw, {}) == _analysis_key(kernel, {**kw, "BLOCK": 128}, {})

    calls = []
    cached = memoized(lambda k, kwargs, tma: calls.append(k) or ["Y"])
    for k in [kernel, *wrapped]:
        assert cached(k, kw, {}) == ["Y"]
    assert len(calls) == 1 and not cached.liger_fx_uncached


def test_check_mode_compares_every_hit_with_a_fresh_analysis(monkeypatch):
    """LIGER_FX_ANALYSIS_CACHE=check (the GPU tests' mode): a hit runs torch's analysis again and raises, naming
    both answers, where they differ."""
    import liger_fx.kernels._library as library

    answers = iter([["Y"], ["Y"], ["Y", "G"]])
    cached = library.memoized(lambda k, kwargs, tma: next(answers))
    kernel = _jit(swiglu_kernels._swiglu_fwd_flat_kernel)
    with FakeTensorMode():
        x = torch.empty(64, device="cuda", dtype=BF16)
    kw = dict(G=x, U=x, Y=x, n=64, ACT=0, BLOCK=64, EVEN=True)
    monkeypatch.setattr(library, "CHECK", True)
    assert cached(kernel, kw, {}) == ["Y"] and cached(kernel, kw, {}) == ["Y"]
    with pytest.raises(AssertionError, match=r"cached store analysis .* is \['Y'\], torch's is \['Y', 'G'\]"):
        cached(kernel, kw, {})
