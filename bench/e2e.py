"""End-to-end training step: forward, backward and fused AdamW on a random-init HF model, one variant per process.

    python -m bench.e2e --shape llama-1b --variant liger_fx --result r.json      # one variant (what run.py spawns)

Each variant runs in its own process so its peak memory is its own: no allocator cache, compiled code or
liger-kernel class patch leaks from one variant into the next, and a crash (the expected illegal memory access of
inductor_on_liger_kernel) takes down only that variant. Every variant builds the same weights (seed 0, built on the
device) and trains on the same batches (seed 1234), so their losses must agree.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field, replace

import torch

from bench.common import GiB, ensure_liger_backend

# Priority order: run.py runs them in this order, so a short time budget still yields the headline ratios
# (liger_fx against hf_liger_kernel and inductor); the expected crash goes last.
VARIANTS = ("hf_eager", "hf_liger_kernel", "liger_fx", "inductor", "hf_hook", "inductor_on_liger_kernel",
            "hf_hook_save", "inductor_ro", "liger_fx_ro", "hf_hook_ro", "hf_hook_unfused", "hf_hook_sep")
VARIANT_HELP = {
    "hf_eager": "HF model as is (SDPA attention)",
    "hf_liger_kernel": "liger-kernel's monkeypatch on the instance (liger_kernel.transformers.monkey_patch)",
    "inductor": "torch.compile(model), default mode",
    "liger_fx": 'torch.compile(model, backend="liger"); logits stay a graph output',
    "hf_hook": "liger_fx.apply(model): the HF hook path (no logits in training)",
    "inductor_on_liger_kernel": "liger-kernel monkeypatch, then torch.compile(model) (crashed on the H200 before)",
    "hf_hook_save": "liger_fx.apply(model, recompute=False): fused norm/SwiGLU outputs saved, not recomputed",
    "inductor_ro": 'torch.compile(model, mode="reduce-overhead"): CUDA graphs',
    "liger_fx_ro": 'torch.compile(model, backend="liger", options={"mode": "reduce-overhead"})',
    "hf_hook_ro": 'liger_fx.apply(model, mode="reduce-overhead")',
    "hf_hook_unfused": "liger_fx.apply(model, fuse_projections=False): q/k/v as three matmuls (the option's A/B)",
    "hf_hook_sep": "liger_fx.apply(model, fuse_swiglu_linear=False): the SwiGLU recomputed in a launch of its own",
}
# The plain-PyTorch reference decoder (liger_fx/models/reference.py), in the loop PyTorch-native trainers write:
# `pred = model(x); loss = loss_fn(pred, y)`, labels aligned by the loader, the loss outside the model. Its own
# variants (the HF ones need an HF model); "eager" is the loss reference there.
REF_VARIANTS = ("inductor", "liger_fx", "liger_fx_nolazy", "eager", "inductor_blocks", "liger_fx_blocks",
                "inductor_inloss", "liger_fx_inloss")
REF_VARIANT_HELP = {
    "eager": "the reference decoder as is, the loss outside it",
    "inductor": "torch.compile(model), the loss outside it (eager)",
    "liger_fx": 'torch.compile(model, backend="liger"), the loss outside it: lazy logits, the fused lm_head + loss',
    "liger_fx_nolazy": 'torch.compile(model, backend="liger", options={"lazy_logits": False}): plain logits, '
                       "the loss on them unfused (the loop without the fused path)",
    "inductor_blocks": "each block compiled on its own (torchtitan), Inductor; lm_head and loss eager",
    "liger_fx_blocks": 'each block compiled on its own with backend="liger"; lm_head and loss eager',
    "inductor_inloss": "torch.compile of a step function computing the loss from the model's output (one graph)",
    "liger_fx_inloss": 'the same with backend="liger": the loss inside the graph',
}
ALL_VARIANTS = VARIANTS + tuple(v for v in REF_VARIANTS if v not in VARIANTS)
LR = 1e-4


@dataclass
class Shape:
    model_type: str
    config: dict
    batch: int
    seq: int
    smoke: dict = field(default_factory=dict)  # config overrides for the CPU smoke mode (same structure, tiny)
    why: str = ""
    grad_ckpt: bool = False  # HF gradient checkpointing on (every decoder layer), as TRL's SFTConfig defaults to


_SMOKE_BODY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, max_position_embeddings=256)

SHAPES = {
    "llama-1b": Shape(
        "llama",
        dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
             num_key_value_heads=8, head_dim=64, tie_word_embeddings=True, rms_norm_eps=1e-5,
             rope_parameters=dict(rope_type="default", rope_theta=500000.0),
             max_position_embeddings=8192, hidden_act="silu"),
        batch=8, seq=2048, smoke=dict(_SMOKE_BODY, vocab_size=512),
        why="Llama-3.2-1B shape (llama3 rope scaling left out: it changes inv_freq values, not the work)",
    ),
    # The second shape: Qwen2-0.5B. Chosen over a Gemma2-like softcap model because (1) its 151936 vocabulary is 18%
    # larger than Llama-3's, and with hidden 896 the lm_head+loss is the biggest share of the step of any common
    # model, which is exactly where fused linear+CE wins; (2) Gemma2 rejects SDPA in transformers 5, so eager
    # attention would dominate its step and blur the comparison; (3) liger-kernel patches qwen2 too, so every
    # variant has a counterpart. Softcap numerics are covered by the FLCE op and pattern tests.
    # The second shape of the headline comparisons since: Qwen2-1.5B (28 layers, vocab 151936, tied embeddings).
    "qwen2-1.5b": Shape(
        "qwen2",
        dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
             num_key_value_heads=2, tie_word_embeddings=True, rms_norm_eps=1e-6,
             rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
             max_position_embeddings=8192, hidden_act="silu", use_sliding_window=False),
        batch=8, seq=2048, smoke=dict(_SMOKE_BODY, vocab_size=640),
        why="Qwen2-1.5B shape: 28 layers, vocab 151936, tied embeddings",
    ),
    # The third shape: Llama-3-8B's layer (H 4096, I 14336, GQA 32/8, untied lm_head) with 8 of its 32
    # layers, so a step fits beside the optimizer state of every variant on one H200.
    "llama-8b-8l": Shape(
        "llama",
        dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=8, num_attention_heads=32,
             num_key_value_heads=8, head_dim=128, tie_word_embeddings=False, rms_norm_eps=1e-5,
             rope_parameters=dict(rope_type="default", rope_theta=500000.0),
             max_position_embeddings=8192, hidden_act="silu"),
        batch=8, seq=2048, smoke=dict(_SMOKE_BODY, vocab_size=512),
        why="Llama-3-8B shape with 8 of its 32 layers (untied lm_head)",
    ),
    "qwen2-0.5b": Shape(
        "qwen2",
        dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
             num_key_value_heads=2, tie_word_embeddings=True, rms_norm_eps=1e-6,
             rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
             max_position_embeddings=8192, hidden_act="silu", use_sliding_window=False),
        batch=8, seq=2048, smoke=dict(_SMOKE_BODY, vocab_size=640),
        why="Qwen2-0.5B shape: vocab 151936, tied embeddings",
    ),
}


# The reference decoder at the same shapes (bench for the plain-PyTorch path; B1 T32768 with --batch 1 --seq 32768).
SHAPES["ref-llama-1b"] = Shape(
    "reference", dict(size="llama-3.2-1b"), batch=8, seq=2048, smoke=dict(size="tiny"),
    why="the plain-PyTorch reference decoder at the Llama-3.2-1B shape (nn.RMSNorm, complex RoPE, loss outside)")
SHAPES["ref-llama-8b-8l"] = Shape(
    "reference", dict(size="llama-3-8b-8l"), batch=8, seq=2048, smoke=dict(size="tiny"),
    why="the plain-PyTorch reference decoder at Llama-3-8B's layer shape, 8 layers (untied output)")


def is_reference(shape_name: str) -> bool:
    return SHAPES[shape_name].model_type == "reference"


def variants_for(shape_name: str) -> tuple[str, ...]:
    """What `--variants all` runs for a shape."""
    return REF_VARIANTS if is_reference(shape_name) else VARIANTS


def variant_help(shape_name: str, variant: str) -> str:
    table = REF_VARIANT_HELP if is_reference(shape_name) else VARIANT_HELP
    return table.get(variant, "not defined for this shape")


# The same shapes trained with HF gradient checkpointing on, for every variant: the liger-kernel user's (and TRL's)
# usual setting, where what the hook fuses inside the checkpointed layers has to show in tok/s and peak memory.
# Their rows carry the shape's own name, so reports compare them only with each other.
SHAPES["llama-1b-ckpt"] = replace(
    SHAPES["llama-1b"], grad_ckpt=True,
    why="Llama-3.2-1B shape with HF gradient checkpointing on every layer (non-reentrant: transformers' default)")


class Unavailable(Exception):
    """The variant cannot run here (a package is missing, an API has not landed): reported, not an error."""


# --------------------------------------------------------------------------------------------------------------
# One variant


def build_model(shape: Shape, smoke: bool, device, dtype):
    if shape.model_type == "reference":
        from liger_fx.models import reference

        size = {**shape.config, **(shape.smoke if smoke else {})}["size"]
        model, _, _ = reference.build(size, dtype=dtype, device=device, seed=0)
        return model.train()
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {**shape.config, **(shape.smoke if smoke else {})}
    cfg = AutoConfig.for_model(shape.model_type, **kwargs)
    cfg.use_cache = False  # training: no KV cache kept alive as an output
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    if shape.grad_ckpt:  # on before the variant is applied; compiled variants see it when their first step traces
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()  # transformers 5.25 renamed it (the old name warns); 5.17 has only the old one. Non-reentrant in both.
    return model.train()


def step_scope(variant: str, shape: Shape):
    """What a user of `variant` wraps the step in. With checkpointing, a plain torch.compile(backend="liger") user
    enters liger_fx's checkpoints_in_graph() (README; the hook variants enter it by themselves): since transformers
    5.25 each checkpointed attention writes a global, which Dynamo otherwise refuses inside a checkpoint, running
    the layer eagerly. Inductor variants get nothing: what plain Inductor does is their point."""
    import contextlib

    if shape.grad_ckpt and variant in ("liger_fx", "liger_fx_ro"):
        from liger_fx.checkpointing import checkpoints_in_graph

        return checkpoints_in_graph()
    return contextlib.nullcontext()


def _liger_kernel_patch(model):
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError as e:
        raise Unavailable(f"liger-kernel not importable ({e})") from None
    fn = MODEL_TYPE_TO_APPLY_LIGER_FN.get(model.config.model_type)
    if fn is None:
        raise Unavailable(f"liger-kernel has no patch for {model.config.model_type}")
    fn(model=model)  # its defaults: rope, rms_norm, swiglu, fused_linear_cross_entropy on


def _hf_hook(model, **flags):
    import liger_fx

    apply = getattr(liger_fx, "apply", None)
    if apply is None:
        try:
            from liger_fx.api import apply
        except ImportError:
            raise Unavailable("liger_fx.apply not found (this liger-fx predates it)") from None
    out = apply(model, **flags)
    return model if out is None else out  # in place (nn.Module.compile) or a returned wrapper


def make_reference_variant(variant: str, model, device):
    """A callable for the reference decoder: tokens -> logits, or (tokens, labels) -> loss for the `_inloss` ones."""
    from liger_fx.models import reference

    if variant not in REF_VARIANTS:
        raise Unavailable(f"{variant} is a Hugging Face variant; the reference decoder's: {', '.join(REF_VARIANTS)}")
    if "liger" in variant:
        ensure_liger_backend()
    backend = "liger" if "liger" in variant else "inductor"
    if variant == "eager":
        return model
    if variant in ("inductor", "liger_fx"):
        return torch.compile(model, backend=backend)
    if variant == "liger_fx_nolazy":
        return torch.compile(model, backend="liger", options={"lazy_logits": False})
    if variant.endswith("_blocks"):
        return reference.compile_blocks(model, backend=backend)
    return torch.compile(lambda x, y: reference.loss_fn(model(x), y), backend=backend)  # _inloss


def make_variant(variant: str, model, device):
    from liger_fx.models import reference

    if isinstance(model, reference.Transformer):
        return make_reference_variant(variant, model, device)
    if variant in REF_VARIANTS and variant not in VARIANTS:
        raise Unavailable(f"{variant} is a reference-decoder variant (shapes ref-*)")
    if variant in ("hf_liger_kernel", "inductor_on_liger_kernel") and torch.device(device).type != "cuda":
        raise Unavailable("liger-kernel needs CUDA")
    if variant == "hf_eager":
        return model
    if variant == "hf_liger_kernel":
        _liger_kernel_patch(model)
        return model
    if variant == "inductor":
        return torch.compile(model)
    if variant == "liger_fx":
        ensure_liger_backend()
        return torch.compile(model, backend="liger")
    if variant == "hf_hook":
        ensure_liger_backend()
        return _hf_hook(model)
    if variant == "inductor_on_liger_kernel":
        _liger_kernel_patch(model)
        return torch.compile(model)
    if variant == "hf_hook_save":
        ensure_liger_backend()
        return _hf_hook(model, recompute=False)
    if variant == "hf_hook_unfused":
        ensure_liger_backend()
        return _hf_hook(model, fuse_projections=False)
    if variant == "hf_hook_sep":
        ensure_liger_backend()
        return _hf_hook(model, fuse_swiglu_linear=False)
    if variant == "inductor_ro":
        return torch.compile(model, mode="reduce-overhead")
    if variant == "liger_fx_ro":
        ensure_liger_backend()
        return torch.compile(model, backend="liger", options={"mode": "reduce-overhead"})
    if variant == "hf_hook_ro":
        ensure_liger_backend()
        import liger_fx

        return liger_fx.apply(model, mode="reduce-overhead")
    raise ValueError(f"unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")


def training_step(shape_name: str, variant: str, *, smoke: bool = False, batch=None, seq=None):
    """The model and one training step (forward with labels, backward, fused AdamW, zero_grad) of `variant` on a
    fixed batch, for the tools that profile a single step (bench/profile_step.py, bench/compile_profile.py). CUDA and
    bf16; CPU and fp32 with `smoke`. The step does not synchronize."""
    shape = SHAPES[shape_name]
    device = "cpu" if smoke else "cuda"
    model = build_model(shape, smoke, device, torch.float32 if smoke else torch.bfloat16)
    fn = make_variant(variant, model, device)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, fused=not smoke)
    g = torch.Generator(device=device).manual_seed(1234)
    B, T = batch or (2 if smoke else shape.batch), seq or (32 if smoke else shape.seq)
    ids = torch.randint(0, model.config.vocab_size, (B, T), device=device, generator=g)

    def step():
        with step_scope(variant, shape):
            loss = fn(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, step


def run_one(shape_name: str, variant: str, *, smoke: bool, device, steps: int, warmup: int, batch=None, seq=None,
            phase=lambda s: None) -> dict:
    """Build, warm up, time. Returns the result row (status "ok")."""
    from torch._dynamo.utils import counters

    shape = SHAPES[shape_name]
    cuda = torch.device(device).type == "cuda"
    B = batch or (2 if smoke else shape.batch)
    T = seq or (32 if smoke else shape.seq)
    dtype = torch.bfloat16 if cuda else torch.float32  # CPU smoke: fp32 is faster there and keeps losses tight
    t0 = time.perf_counter()
    phase("build model")
    model = build_model(shape, smoke, device, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    # fused AdamW: one multi-tensor kernel per step on CUDA (fused CPU AdamW exists too, but smoke needs no speed)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, fused=cuda)
    phase("apply variant")
    fwd = make_variant(variant, model, device)
    g = torch.Generator().manual_seed(1234)
    ref = shape.model_type == "reference"
    vocab = model.cfg.vocab_size if ref else model.config.vocab_size
    # One contiguous tensor per step (not views of one block): Dynamo then sees identical inputs every step. The
    # reference decoder gets loader-aligned (tokens, labels) of a T + 1 window.
    ids = [torch.randint(0, vocab, (B, T + ref), generator=g).to(device) for _ in range(warmup + steps)]
    if ref:
        ids = [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in ids]
    setup_s = time.perf_counter() - t0

    graphs = variant.endswith("_ro")

    def step(x):
        if graphs:  # CUDA graphs: a new step; the replay's outputs are overwritten by the next one, so copy the loss
            torch.compiler.cudagraph_mark_step_begin()
        with step_scope(variant, shape):
            if ref:  # the PyTorch-native loop: the loss outside the model (or, for _inloss, in the compiled step)
                from liger_fx.models.reference import loss_fn

                x, y = x
                if variant.endswith("_inloss"):
                    loss = fwd(x, y)
                else:  # torchtitan's step: `del pred` before the backward ("to avoid peaking memory")
                    pred = fwd(x)
                    loss = loss_fn(pred, y)
                    del pred
            else:
                loss = fwd(input_ids=x, labels=x).loss  # HF shifts the labels; the outputs (logits) die here
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach().clone() if graphs else loss.detach()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    losses = []
    t0 = time.perf_counter()
    for i in range(warmup):
        phase(f"warm-up step {i + 1}/{warmup}" + (" (compiling)" if i == 0 else ""))
        losses.append(step(ids[i]))
        sync()
    warmup_s = time.perf_counter() - t0
    compile_s = _compile_times()
    if compile_s:
        phase("compile phases (s, nested): " + ", ".join(f"{k} {v}" for k, v in list(compile_s.items())[:14]))
    peak_with_warmup = torch.cuda.max_memory_allocated() / GiB if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    phase("timed steps")
    step_ms = []
    t0 = time.perf_counter()
    for i in range(steps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            losses.append(step(ids[warmup + i]))
            end.record()
            step_ms.append((start, end))
        else:
            t1 = time.perf_counter()
            losses.append(step(ids[warmup + i]))
            step_ms.append((time.perf_counter() - t1) * 1e3)
    sync()
    timed_s = time.perf_counter() - t0
    if cuda:
        step_ms = [s.elapsed_time(e) for s, e in step_ms]
    losses = [float(x) for x in losses]
    return {
        "shape": shape_name, "variant": variant, "status": "ok", "device": str(device), "dtype": str(dtype),
        "batch": B, "seq": T, "steps": steps, "warmup": warmup, "params": n_params, "grad_ckpt": shape.grad_ckpt,
        "config": dataclasses.asdict(model.cfg) if ref else {k: getattr(model.config, k, None) for k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "tie_word_embeddings", "rope_parameters", "_attn_implementation")},
        "tok_s": B * T * steps / timed_s if steps else None,
        "step_ms": statistics.median(step_ms) if step_ms else None,
        "peak_gib": torch.cuda.max_memory_allocated() / GiB if cuda else None,
        "peak_gib_with_warmup": peak_with_warmup,
        "resident_gib": torch.cuda.memory_allocated() / GiB if cuda else None,
        "warmup_s": warmup_s, "setup_s": setup_s, "compile_s": compile_s,
        "losses": losses, "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
        "replaced": dict(counters["liger_fx"]),
        "liger_fx_lines": _liger_lines(),
        "graph_breaks": sum(counters["graph_break"].values()),
    }


def _compile_times() -> dict[str, float]:
    """Seconds per `dynamo_timed` phase over this process's compiles so far (the warm-up), the largest first, those
    of 0.5 s or more: where a variant's warm-up goes (Dynamo's trace, liger_fx.rewrite_graph, AOTAutograd, Inductor's
    codegen, Triton). Phases nest, so they do not add up."""
    try:
        from torch._dynamo.utils import compile_times

        headers, values = compile_times(repr="csv", aggregate=True)
    except Exception:  # a torch without it, or a variant that compiled nothing
        return {}
    out = {}
    for key, value in zip(headers, values):
        try:
            if float(value) >= 0.5:
                out[key] = round(float(value), 1)
        except (TypeError, ValueError):
            continue
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _liger_lines() -> list[str]:
    """The INFO line of every graph the liger backend compiled in this process (what was rewritten, causal masks)."""
    import sys

    if "liger_fx" not in sys.modules:
        return []
    return [r.summary() for r in sys.modules["liger_fx"].get_records()]


# --------------------------------------------------------------------------------------------------------------
# Running variants: each in a subprocess (the real thing) or in this process (CPU smoke)


def _error_line(text: str) -> str:
    """The most telling line of a crash log: an illegal memory access beats any generic traceback line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for needle in ("illegal memory access", "CUDA error", "out of memory", "Error", "error"):
        hits = [ln for ln in lines if needle in ln]
        if hits:
            return hits[-1][:300]
    return lines[-1][:300] if lines else ""


def run_variant_subprocess(shape: str, variant: str, *, smoke: bool, device, steps: int, warmup: int,
                           timeout: float, batch=None, seq=None, smoke_inductor: bool = False,
                           module: str = "bench.e2e") -> dict:
    """`python -m <module> --shape ... --variant ... --result ...` in its own process and session; `module` is a
    runner with this CLI (bench.e2e, bench.distill)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory(prefix="liger_fx_e2e_") as td:
        result = os.path.join(td, "result.json")
        cmd = [sys.executable, "-m", module, "--shape", shape, "--variant", variant, "--steps", str(steps),
               "--warmup", str(warmup), "--device", str(device), "--result", result]
        cmd += ["--smoke"] if smoke else []
        cmd += ["--smoke-inductor"] if smoke_inductor else []
        cmd += ["--batch", str(batch)] if batch else []
        cmd += ["--seq", str(seq)] if seq else []
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # Empty compile caches of its own for each variant: its warm-up is what a new user's first run pays, and no
        # variant reuses kernels an earlier one (or the other lane, or an earlier call on the host) compiled. Until
        # 62de109 the caches were shared, so a later variant's warm-up could be shorter for the order alone.
        env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(td, "inductor_cache")
        env["TRITON_CACHE_DIR"] = os.path.join(td, "triton_cache")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        t0 = time.perf_counter()
        with open(os.path.join(td, "log.txt"), "w+") as log:
            # Own session: on timeout we kill the child's whole group (Inductor's compile workers included).
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                rc = None
            try:  # the child's session: itself on timeout, and any compile worker it left behind
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
            log.seek(0)
            text = log.read()
        res = {}
        if os.path.exists(result):
            with open(result) as f:
                res = json.load(f)
        phase = ""
        if os.path.exists(result + ".phase"):
            with open(result + ".phase") as f:
                phase = f.read().strip()
    res.setdefault("shape", shape)
    res.setdefault("variant", variant)
    res["wall_s"] = time.perf_counter() - t0
    res["log_tail"] = text.splitlines()[-40:]
    if "status" in res:  # the child's own verdict (a caught CUDA error included)
        if rc is None:
            res["error"] = (res.get("error", "") + f" (then hung on exit: killed after {timeout:.0f} s)").strip()
    elif rc is None:
        res["status"] = f"timeout after {timeout:.0f} s"
        res["error"] = f"killed in phase: {phase}"
    else:
        sig = f" (signal {-rc})" if rc < 0 else ""
        res["status"] = f"crashed (exit {rc}{sig})"
        res["error"] = f"in phase '{phase}': {_error_line(text)}"
    return res


def run_variant_inprocess(shape: str, variant: str, **kw) -> dict:
    from torch._dynamo.utils import counters

    if variant in ("hf_liger_kernel", "inductor_on_liger_kernel") and torch.device(kw["device"]).type == "cuda":
        return {"shape": shape, "variant": variant,
                "status": "unavailable: liger-kernel patches classes process-wide; run variants in subprocesses"}
    torch._dynamo.reset()
    counters.clear()
    t0 = time.perf_counter()
    res = _guarded(shape, variant, kw)
    res["wall_s"] = time.perf_counter() - t0
    torch._dynamo.reset()
    return res


def guarded(run_one, key: str, name: str, variant: str, kw: dict, phase=lambda s: None) -> dict:
    """`run_one(name, variant, phase=..., **kw)` with a failure reported as the variant's outcome (a crash, as
    liger-kernel's under compile, is a result), naming the phase it happened in; `key` names `name` in the row
    ("shape", "workload"). Shared by the worker processes of bench.e2e, bench.distill and bench.post_training."""
    state = {"phase": ""}

    def track(s):
        state["phase"] = s
        phase(s)

    try:
        return run_one(name, variant, phase=track, **kw)
    except Unavailable as e:
        return {key: name, "variant": variant, "status": f"unavailable: {e}"}
    except Exception as e:
        traceback.print_exc()
        msg = str(e).strip().splitlines()
        return {key: name, "variant": variant, "status": f"error: {type(e).__name__}",
                "error": f"in phase '{state['phase']}': {_error_line(str(e)) or (msg[0] if msg else '')}"}


def _guarded(shape: str, variant: str, kw: dict, phase=lambda s: None) -> dict:
    return guarded(run_one, "shape", shape, variant, kw, phase)


LOSS_REFERENCES = ("hf_eager", "eager")  # the eager variant of an HF shape, of a reference-decoder shape


def add_loss_diffs(rows: list[dict]) -> None:
    """max |loss_i - eager loss_i| over the steps both ran, per shape (hf_eager, or the reference decoder's eager)."""
    for r in rows:
        ref = next((x for x in rows if x["shape"] == r["shape"] and x["variant"] in LOSS_REFERENCES
                    and x.get("status") == "ok"), None)
        if ref is None or r.get("status") != "ok" or r is ref:
            r.pop("max_loss_diff", None)
            continue
        pairs = list(zip(r["losses"], ref["losses"]))
        r["max_loss_diff"] = max(abs(a - b) for a, b in pairs) if pairs else None


def worker_main(argv, *, prog: str, doc: str, shapes, variants, run_one) -> int:
    """One variant of one shape in this process, its row written to --result as JSON (the worker side of
    run_variant_subprocess; bench.distill's worker is the same with its own shapes and run_one)."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(shapes), required=True)
    p.add_argument("--variant", choices=variants, required=True)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int)
    p.add_argument("--seq", type=int)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--smoke-inductor", action="store_true", help="smoke with real Inductor codegen (slow on CPU)")
    p.add_argument("--result", required=True, help="write the result row here (JSON)")
    args = p.parse_args(argv)
    if args.smoke and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")

    def phase(s):
        with open(args.result + ".phase", "w") as f:
            f.write(s)
        print(f"[{args.shape}/{args.variant}] {s}", flush=True)

    kw = dict(smoke=args.smoke, device=args.device, steps=args.steps, warmup=args.warmup, batch=args.batch,
              seq=args.seq)
    if args.smoke and not args.smoke_inductor:
        from bench.common import smoke_codegen

        with smoke_codegen():
            res = guarded(run_one, "shape", args.shape, args.variant, kw, phase=phase)
    else:
        res = guarded(run_one, "shape", args.shape, args.variant, kw, phase=phase)
    with open(args.result, "w") as f:
        json.dump(res, f, default=str)
    print(f"[{args.shape}/{args.variant}] {res['status']}", flush=True)
    return 0 if res["status"] == "ok" or res["status"].startswith("unavailable") else 1


def main(argv=None) -> int:
    return worker_main(argv, prog="python -m bench.e2e", doc=__doc__, shapes=SHAPES, variants=ALL_VARIANTS,
                       run_one=run_one)

if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: after a CUDA error (the expected illegal memory access) it can hang or crash, and
    # the result is already written. The parent kills this process group afterwards.
    os._exit(code)
