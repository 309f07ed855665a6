"""Distillation training step: a student trained against a frozen, wider teacher of the same vocabulary with the
generalized JSD on the completion tokens, one variant per process (as bench/e2e.py).

    python -m bench.run --kernels none --e2e none --distill llama-1b-jsd            # every default variant
    python -m bench.distill --shape llama-1b-jsd --variant liger_fx --result r.json  # one variant (what run spawns)

The step (variants differ only in how it runs): student hidden states from `student.model(ids)`, its lm_head; the
teacher's under torch.no_grad(); TRL's generalized JSD (beta 0.5, temperature 1, the log-softmaxes upcast to fp32)
summed per token, masked to the completion (labels != -100, the first quarter of each sequence is prompt) and
divided by the completion count (Liger's normalisation); backward; fused AdamW on the student.
Variants:
    liger_fx            torch.compile(step, backend="liger"): the divergence and both lm_heads as one fused op
    inductor            torch.compile(step): the same loop with plain Inductor
    liger_kernel        liger-kernel 0.8.5 as its users run it: its monkeypatch on both models (RMSNorm, RoPE,
                        SwiGLU), eager bodies, LigerFusedLinearJSDLoss(weight_hard_loss=0, weight_soft_loss=1) on
                        the hidden states (its chunks compiled, chunk_size 1024)
    inductor_liger_jsd  both bodies torch.compile'd, LigerFusedLinearJSDLoss outside the compiled code
    eager               the step as written (N x V logits and fp32 log-softmaxes of both models; needs the most memory)
Every variant builds the same weights (seed 0 student, seed 1 teacher) and trains on the same batches (seed 1234), so
their losses must agree (bench.report: within --loss-rtol of the reference variant, inductor or eager).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

from bench import e2e
from bench.common import GiB, ensure_liger_backend
from bench.e2e import Unavailable

VARIANTS = ("liger_fx", "inductor", "liger_kernel", "inductor_liger_jsd", "eager")
DEFAULT_VARIANTS = ("liger_fx", "inductor", "liger_kernel", "inductor_liger_jsd")  # eager: opt in (memory)
VARIANT_HELP = {
    "liger_fx": 'torch.compile(step, backend="liger")',
    "inductor": "torch.compile(step)",
    "liger_kernel": "liger-kernel patch on both models (eager) + LigerFusedLinearJSDLoss",
    "inductor_liger_jsd": "torch.compile(model.model) for both + LigerFusedLinearJSDLoss outside",
    "eager": "the step as written, eager",
}
LR = 1e-4
BETA = 0.5
TEMPERATURE = 1.0
PROMPT_FRACTION = 0.25  # the prompt's tokens carry label -100 (not distilled)


@dataclass
class DistillShape:
    student: str  # a bench.e2e shape (its config)
    teacher: dict  # a Llama config
    batch: int
    seq: int
    smoke_student: dict = field(default_factory=dict)
    smoke_teacher: dict = field(default_factory=dict)
    why: str = ""


_SMOKE_TEACHER = dict(vocab_size=512, hidden_size=96, intermediate_size=160, num_hidden_layers=1, num_attention_heads=6,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=256)

SHAPES = {
    "llama-1b-jsd": DistillShape(
        "llama-1b",
        dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=4,
             num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
             rms_norm_eps=1e-5, rope_parameters=dict(rope_type="default", rope_theta=500000.0),
             max_position_embeddings=8192, hidden_act="silu"),
        batch=8, seq=2048, smoke_teacher=_SMOKE_TEACHER,
        why="student Llama-3.2-1B shape; teacher Llama-3-8B's layer and untied 4096-wide lm_head with 4 of its 32 "
            "layers (the head region is the teacher's widest part; its depth only adds the same forward to every "
            "variant)",
    ),
    "llama-1b-jsd-3b": DistillShape(
        "llama-1b",
        dict(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
             num_attention_heads=24, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
             rms_norm_eps=1e-5, rope_parameters=dict(rope_type="default", rope_theta=500000.0),
             max_position_embeddings=8192, hidden_act="silu"),
        batch=8, seq=2048, smoke_teacher=_SMOKE_TEACHER,
        why="student Llama-3.2-1B shape; teacher Llama-3.2-3B shape (hidden 3072, 28 layers, tied embeddings)",
    ),
}


# --------------------------------------------------------------------------------------------------------------
# Models, batches, the loss


def build_models(shape: DistillShape, smoke: bool, device, dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    student = e2e.build_model(e2e.SHAPES[shape.student], smoke, device, dtype)
    kwargs = {**shape.teacher, **(shape.smoke_teacher if smoke else {})}
    cfg = AutoConfig.for_model("llama", **kwargs)
    cfg.use_cache = False
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(1)
    with torch.device(device):
        teacher = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    teacher.requires_grad_(False)
    if student.config.vocab_size != teacher.config.vocab_size:
        raise ValueError(f"student vocabulary {student.config.vocab_size} != teacher's {teacher.config.vocab_size}")
    return student.train(), teacher.eval()


def batches(n: int, B: int, T: int, vocab: int, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (B, T), generator=g)
        labels = ids.clone()
        labels[:, : int(T * PROMPT_FRACTION)] = -100
        out.append((ids.to(device), labels.to(device)))
    return out


def jsd_loss(s, t, labels, beta=BETA, temperature=TEMPERATURE):
    """TRL GKD's generalized JSD (log-softmaxes in fp32), summed over the vocabulary, masked to the completion and
    divided by its token count: the loss Liger's LigerFusedLinearJSDLoss computes."""
    ls = torch.log_softmax(s.float() / temperature, -1)
    lt = torch.log_softmax(t.float() / temperature, -1)
    b = torch.tensor(beta, dtype=torch.float32, device=s.device)
    lm = torch.logsumexp(torch.stack([ls + torch.log1p(-b), lt + torch.log(b)]), dim=0)
    kl_t = torch.nn.functional.kl_div(lm, lt, reduction="none", log_target=True)
    kl_s = torch.nn.functional.kl_div(lm, ls, reduction="none", log_target=True)
    mask = (labels != -100).float()
    return ((b * kl_t + (1 - b) * kl_s).sum(-1) * mask).sum() / mask.sum().clamp_min(1.0)


def make_step(student, teacher):
    def step(ids, labels):
        s = student.lm_head(student.model(input_ids=ids).last_hidden_state)
        with torch.no_grad():
            t = teacher.lm_head(teacher.model(input_ids=ids).last_hidden_state)
        return jsd_loss(s, t, labels)

    return step


def _liger_jsd(student, teacher, body_s, body_t):
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    except ImportError as e:
        raise Unavailable(f"liger-kernel not importable ({e})") from None
    loss_fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=BETA, ignore_index=-100,
                                      temperature=TEMPERATURE, compiled=True, chunk_size=1024)

    def step(ids, labels):
        h = body_s(input_ids=ids).last_hidden_state
        with torch.no_grad():
            ht = body_t(input_ids=ids).last_hidden_state
        return loss_fn(h.reshape(-1, h.shape[-1]), student.lm_head.weight, ht.reshape(-1, ht.shape[-1]),
                       teacher.lm_head.weight, labels.reshape(-1))

    return step


def make_variant(variant: str, student, teacher, device):
    if variant in ("liger_kernel", "inductor_liger_jsd") and torch.device(device).type != "cuda":
        raise Unavailable("liger-kernel needs CUDA")
    if variant == "eager":
        return make_step(student, teacher)
    if variant == "inductor":
        return torch.compile(make_step(student, teacher))
    if variant == "liger_fx":
        ensure_liger_backend()
        return torch.compile(make_step(student, teacher), backend="liger")
    if variant == "liger_kernel":
        e2e._liger_kernel_patch(student)
        e2e._liger_kernel_patch(teacher)
        return _liger_jsd(student, teacher, student.model, teacher.model)
    if variant == "inductor_liger_jsd":
        return _liger_jsd(student, teacher, torch.compile(student.model), torch.compile(teacher.model))
    raise ValueError(f"unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")


# --------------------------------------------------------------------------------------------------------------
# One variant


def run_one(shape_name: str, variant: str, *, smoke: bool, device, steps: int, warmup: int, batch=None, seq=None,
            phase=lambda s: None) -> dict:
    from torch._dynamo.utils import counters

    shape = SHAPES[shape_name]
    cuda = torch.device(device).type == "cuda"
    B = batch or (2 if smoke else shape.batch)
    T = seq or (32 if smoke else shape.seq)
    dtype = torch.bfloat16 if cuda else torch.float32
    t0 = time.perf_counter()
    phase("build models")
    student, teacher = build_models(shape, smoke, device, dtype)
    opt = torch.optim.AdamW(student.parameters(), lr=LR, fused=cuda)
    phase("apply variant")
    fn = make_variant(variant, student, teacher, device)
    data = batches(warmup + steps, B, T, student.config.vocab_size, device)
    setup_s = time.perf_counter() - t0

    def step(ids, labels):
        loss = fn(ids, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    losses = []
    t0 = time.perf_counter()
    for i in range(warmup):
        phase(f"warm-up step {i + 1}/{warmup}" + (" (compiling)" if i == 0 else ""))
        losses.append(step(*data[i]))
        sync()
    warmup_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    phase("timed steps")
    step_ms = []
    t0 = time.perf_counter()
    for i in range(steps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            losses.append(step(*data[warmup + i]))
            end.record()
            step_ms.append((start, end))
        else:
            t1 = time.perf_counter()
            losses.append(step(*data[warmup + i]))
            step_ms.append((time.perf_counter() - t1) * 1e3)
    sync()
    timed_s = time.perf_counter() - t0
    if cuda:
        step_ms = [s.elapsed_time(e) for s, e in step_ms]
    losses = [float(x) for x in losses]
    return {
        "shape": shape_name, "variant": variant, "status": "ok", "device": str(device), "dtype": str(dtype),
        "batch": B, "seq": T, "steps": steps, "warmup": warmup,
        "student_params": sum(p.numel() for p in student.parameters()),
        "teacher_params": sum(p.numel() for p in teacher.parameters()),
        "tok_s": B * T * steps / timed_s if steps else None,
        "step_ms": statistics.median(step_ms) if step_ms else None,
        "peak_gib": torch.cuda.max_memory_allocated() / GiB if cuda else None,
        "warmup_s": warmup_s, "setup_s": setup_s, "compile_s": e2e._compile_times(),
        "losses": losses, "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
        "replaced": dict(counters["liger_fx"]), "liger_fx_lines": e2e._liger_lines(),
        "graph_breaks": sum(counters["graph_break"].values()),
    }


def _guarded(shape: str, variant: str, kw: dict, phase=lambda s: None) -> dict:
    return e2e.guarded(run_one, "shape", shape, variant, kw, phase)


def run_variant_inprocess(shape: str, variant: str, **kw) -> dict:
    from torch._dynamo.utils import counters

    if variant in ("liger_kernel",) and torch.device(kw["device"]).type == "cuda":
        return {"shape": shape, "variant": variant,
                "status": "unavailable: liger-kernel patches classes process-wide; run variants in subprocesses"}
    torch._dynamo.reset()
    counters.clear()
    t0 = time.perf_counter()
    res = _guarded(shape, variant, kw)
    res["wall_s"] = time.perf_counter() - t0
    torch._dynamo.reset()
    return res


def run_variant_subprocess(shape: str, variant: str, **kw) -> dict:
    return e2e.run_variant_subprocess(shape, variant, module="bench.distill", **kw)


def add_loss_diffs(rows: list[dict]) -> None:
    """Per shape, max |loss_i - ref loss_i| / |ref loss_i| over the steps both ran, the reference being eager where it
    ran, else inductor (the same step, compiled by torch)."""
    for r in rows:
        r.pop("max_loss_rel_diff", None)
        r.pop("loss_ref", None)
    for shape in dict.fromkeys(r["shape"] for r in rows):
        ok = {r["variant"]: r for r in rows if r["shape"] == shape and r.get("status") == "ok"}
        ref = ok.get("eager") or ok.get("inductor")
        if ref is None:
            continue
        for r in ok.values():
            if r is ref:
                continue
            pairs = list(zip(r["losses"], ref["losses"]))
            r["loss_ref"] = ref["variant"]
            r["max_loss_rel_diff"] = max(abs(a - b) / max(abs(b), 1e-12) for a, b in pairs) if pairs else None


def main(argv=None) -> int:
    return e2e.worker_main(argv, prog="python -m bench.distill", doc=__doc__, shapes=SHAPES, variants=VARIANTS,
                           run_one=run_one)

if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # as bench.e2e: no interpreter teardown after a CUDA error
