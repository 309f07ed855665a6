"""Post-training steps whose vocabulary-sized work is token log-probs: a GRPO step and a DPO step, as TRL computes
them, each against torch.compile (Inductor) on the same loop and against liger-kernel's own fused loss module.

    python -m bench.run --kernels none --e2e none --post all            # both workloads, every variant (GPU)
    python -m bench.post_training --workload grpo-qwen2-1.5b --variant liger_fx --result r.json   # one (a process)

Workloads (bf16, AdamW on the policy, one optimizer step per step):
- grpo-qwen2-1.5b: Qwen2-1.5B shape, 8 completions x 4096 tokens (a 256-token prompt, 3840 completion tokens whose
  log-probs are taken), temperature 0.9; policy log-probs with grad, a frozen reference model's under no_grad,
  TRL's loss_type "grpo" (clipped ratio, k3 KL with beta 0.04, per-sequence mean). Targets: peak <= 0.5x Inductor's,
  tok/s >= Inductor's.
- dpo-llama-1b: Llama-3.2-1B shape, B4 (2 chosen + 2 rejected) x 2048, a frozen reference model, sigmoid loss with
  beta 0.1 on masked sums of token log-probs (the completion is the last 1536 tokens). Same targets.
Variants, each in its own process (its peak is its own), same weights (seed 0) and batches (seed 1234):
- inductor: `torch.compile(loss_fn)`: the trainer's loop, models and log-prob work in one graph;
- liger_fx: `torch.compile(loss_fn, backend="liger")`: the same loop;
- liger_kernel: the model bodies under torch.compile, then liger-kernel's LigerFusedLinearGRPOLoss /
  LigerFusedLinearDPOLoss (liger_kernel.chunked_loss, 0.8.5) on the hidden states and lm_head weights;
- eager: the loop uncompiled (the B x T x V logits of both models, and their fp32 log-softmax).
The losses of every variant agree (max_loss_diff against inductor's, per step). tok/s counts every input token of
the policy's forward (B x T).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.common import GiB, ensure_liger_backend
from bench.e2e import SHAPES, Unavailable, _compile_times, _error_line, build_model
from bench.e2e import guarded as e2e_guarded

VARIANTS = ("inductor", "liger_fx", "liger_kernel", "eager")
LR = 1e-6


@dataclass
class Workload:
    kind: str  # "grpo" | "dpo"
    shape: str  # bench.e2e.SHAPES key
    batch: int
    seq: int
    prompt: int  # tokens before the completion
    why: str


WORKLOADS = {
    "grpo-qwen2-1.5b": Workload("grpo", "qwen2-1.5b", 8, 4096, 256,
                                "GRPO, Qwen2-1.5B shape, 8 completions x 4096 tokens, reference under no_grad"),
    "dpo-llama-1b": Workload("dpo", "llama-1b", 4, 2048, 512,
                             "DPO, Llama-3.2-1B shape, 2 chosen + 2 rejected x 2048 tokens, frozen reference"),
}
SMOKE = dict(batch=4, seq=24, prompt=8)
TEMPERATURE, GRPO_BETA, EPS, DPO_BETA = 0.9, 0.04, 0.2, 0.1


# --------------------------------------------------------------------------------------------------------------
# The trainer's loss functions (TRL 1.x, written out: trl need not be installed)


def selective_log_softmax(logits, index):
    """TRL's: gather minus a per-row logsumexp loop in fp32, a per-row log_softmax loop otherwise."""
    if logits.dtype in (torch.float32, torch.float64):
        selected = torch.gather(logits, dim=-1, index=index.unsqueeze(-1)).squeeze(-1)
        return selected - torch.stack([torch.logsumexp(lg, dim=-1) for lg in logits])
    rows = [F.log_softmax(lg, dim=-1).gather(-1, ix.unsqueeze(-1)).squeeze(-1) for lg, ix in zip(logits, index)]
    return torch.stack(rows)


def grpo_loss_fn(policy, reference, K):
    def logps(model, input_ids, attention_mask):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=K + 1).logits
        logits = logits[:, :-1, :][:, -K:, :]
        logits.div_(TEMPERATURE)
        return selective_log_softmax(logits, input_ids[:, -K:])

    def loss_fn(input_ids, attention_mask, completion_mask, advantages):
        per_token_logps = logps(policy, input_ids, attention_mask)
        with torch.no_grad():
            ref_per_token_logps = logps(reference, input_ids, attention_mask)
        coef_1 = torch.exp(per_token_logps - per_token_logps.detach())
        coef_2 = torch.clamp(coef_1, 1 - EPS, 1 + EPS)
        per_token_kl = torch.exp(ref_per_token_logps - per_token_logps) - (ref_per_token_logps - per_token_logps) - 1
        per_token_loss = -torch.min(coef_1 * advantages[:, None], coef_2 * advantages[:, None])
        per_token_loss = per_token_loss + GRPO_BETA * per_token_kl
        return ((per_token_loss * completion_mask).sum(-1) / completion_mask.sum(-1).clamp(min=1.0)).mean()

    return loss_fn


def dpo_loss_fn(policy, reference):
    def logps(model, input_ids, completion_mask):
        logits = model(input_ids=input_ids).logits
        per_token_logps = selective_log_softmax(logits[..., :-1, :], input_ids[..., 1:])
        per_token_logps[completion_mask[..., 1:] == 0] = 0.0
        return per_token_logps.sum(dim=1)

    def loss_fn(input_ids, completion_mask):
        chosen, rejected = logps(policy, input_ids, completion_mask).chunk(2, dim=0)
        with torch.no_grad():
            ref_chosen, ref_rejected = logps(reference, input_ids, completion_mask).chunk(2, dim=0)
        return -F.logsigmoid(DPO_BETA * ((chosen - ref_chosen) - (rejected - ref_rejected))).mean()

    return loss_fn


def liger_kernel_loss_fn(w: Workload, policy, reference, K):
    """liger-kernel's fused module on hidden states from the (Inductor-compiled) model bodies."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss, LigerFusedLinearGRPOLoss
    except ImportError as e:
        raise Unavailable(f"liger-kernel's chunked_loss not importable ({e})") from None
    body, ref_body = torch.compile(policy.model), torch.compile(reference.model)
    head, ref_head = policy.lm_head, reference.lm_head
    if w.kind == "grpo":
        fused = LigerFusedLinearGRPOLoss(beta=GRPO_BETA, epsilon_low=EPS, epsilon_high=EPS, loss_type="grpo",
                                         temperature=TEMPERATURE, use_ref_model=True)

        def loss_fn(input_ids, attention_mask, completion_mask, advantages):
            def hidden(b):  # the K positions whose logits predict the completion
                return b(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, -K - 1:-1, :]

            h = hidden(body)
            with torch.no_grad():
                ref_h = hidden(ref_body)
            loss, _ = fused(h, head.weight, input_ids[:, -K:], completion_mask, advantages,
                            ref_input=ref_h, ref_weight=ref_head.weight)
            return loss

        return loss_fn
    fused = LigerFusedLinearDPOLoss(beta=DPO_BETA, use_ref_model=True)

    def loss_fn(input_ids, completion_mask):
        target = input_ids[:, 1:].masked_fill(completion_mask[:, 1:] == 0, -100)
        h = body(input_ids=input_ids).last_hidden_state[:, :-1, :]
        with torch.no_grad():
            ref_h = ref_body(input_ids=input_ids).last_hidden_state[:, :-1, :]
        out = fused(head.weight, h, target, ref_input=ref_h, ref_weight=ref_head.weight)
        return out[0] if isinstance(out, tuple) else out

    return loss_fn


# --------------------------------------------------------------------------------------------------------------
# One variant


def _batches(w: Workload, B, T, P, V, device, n):
    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(n):
        ids = torch.randint(0, V, (B, T), generator=g)
        if w.kind == "grpo":
            attention_mask = torch.ones(B, T, dtype=torch.long)
            attention_mask[: B // 2, : P // 4] = 0  # left-padded prompts
            completion_mask = (torch.rand(B, T - P, generator=g) > 0.1).float()
            advantages = torch.randn(B, generator=g)
            out.append(tuple(t.to(device) for t in (ids, attention_mask, completion_mask, advantages)))
        else:
            completion_mask = torch.zeros(B, T)
            completion_mask[:, P:] = 1
            out.append(tuple(t.to(device) for t in (ids, completion_mask)))
    return out


def run_one(workload: str, variant: str, *, smoke: bool, device, steps: int, warmup: int,
            phase=lambda s: None) -> dict:
    from torch._dynamo.utils import counters

    w = WORKLOADS[workload]
    cuda = torch.device(device).type == "cuda"
    B, T, P = (SMOKE["batch"], SMOKE["seq"], SMOKE["prompt"]) if smoke else (w.batch, w.seq, w.prompt)
    K = T - P
    dtype = torch.bfloat16 if cuda else torch.float32
    if variant == "liger_kernel" and not cuda:
        raise Unavailable("liger-kernel needs CUDA")
    phase("build models")
    policy = build_model(SHAPES[w.shape], smoke, device, dtype)
    reference = build_model(SHAPES[w.shape], smoke, device, dtype).requires_grad_(False).eval()
    reference.load_state_dict(policy.state_dict())
    opt = torch.optim.AdamW(policy.parameters(), lr=LR, fused=cuda)
    if variant == "liger_kernel":
        loss_fn = liger_kernel_loss_fn(w, policy, reference, K)
    else:
        loss_fn = grpo_loss_fn(policy, reference, K) if w.kind == "grpo" else dpo_loss_fn(policy, reference)
        if variant == "inductor":
            loss_fn = torch.compile(loss_fn)
        elif variant == "liger_fx":
            ensure_liger_backend()
            loss_fn = torch.compile(loss_fn, backend="liger")
        elif variant != "eager":
            raise ValueError(f"unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")
    batches = _batches(w, B, T, P, policy.config.vocab_size, device, warmup + steps)

    def step(batch):
        loss = loss_fn(*batch)
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
        losses.append(step(batches[i]))
        sync()
    warmup_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    phase("timed steps")
    step_ms = []
    t0 = time.perf_counter()
    for i in range(steps):
        t1 = time.perf_counter()
        losses.append(step(batches[warmup + i]))
        sync()
        step_ms.append((time.perf_counter() - t1) * 1e3)
    timed_s = time.perf_counter() - t0
    import liger_fx

    return {
        "workload": workload, "variant": variant, "status": "ok", "device": str(device), "dtype": str(dtype),
        "batch": B, "seq": T, "completion": K, "steps": steps, "warmup": warmup,
        "tok_s": B * T * steps / timed_s if steps else None,
        "step_ms": statistics.median(step_ms) if step_ms else None,
        "peak_gib": torch.cuda.max_memory_allocated() / GiB if cuda else None,
        "warmup_s": warmup_s, "compile_s": _compile_times(),
        "losses": [float(x) for x in losses],
        "replaced": dict(counters["liger_fx"]),
        "liger_fx_lines": [r.summary() for r in liger_fx.get_records()],
        "graph_breaks": sum(counters["graph_break"].values()),
    }


def guarded(workload: str, variant: str, kw: dict, phase=lambda s: None) -> dict:
    return e2e_guarded(run_one, "workload", workload, variant, kw, phase)


def run_inprocess(workload: str, variant: str, **kw) -> dict:
    from torch._dynamo.utils import counters

    import liger_fx

    torch._dynamo.reset()
    counters.clear()
    liger_fx.clear_records()
    res = guarded(workload, variant, kw)
    torch._dynamo.reset()
    return res


def run_subprocess(workload: str, variant: str, *, smoke: bool, device, steps: int, warmup: int,
                   timeout: float) -> dict:
    """One variant in its own process and session (killed whole at the timeout), with its own compile caches."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory(prefix="liger_fx_post_") as td:
        result = os.path.join(td, "result.json")
        cmd = [sys.executable, "-m", "bench.post_training", "--workload", workload, "--variant", variant,
               "--steps", str(steps), "--warmup", str(warmup), "--device", str(device), "--result", result]
        cmd += ["--smoke"] if smoke else []
        env = dict(os.environ, PYTHONUNBUFFERED="1", TORCHINDUCTOR_CACHE_DIR=os.path.join(td, "inductor"),
                   TRITON_CACHE_DIR=os.path.join(td, "triton"))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        with open(os.path.join(td, "log.txt"), "w+") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                rc = None
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
            log.seek(0)
            text = log.read()
        res = json.load(open(result)) if os.path.exists(result) else {}
        phase = open(result + ".phase").read().strip() if os.path.exists(result + ".phase") else ""
    res.setdefault("workload", workload)
    res.setdefault("variant", variant)
    res["log_tail"] = text.splitlines()[-30:]
    if "status" not in res:
        res["status"] = f"timeout after {timeout:.0f} s" if rc is None else f"crashed (exit {rc})"
        res["error"] = f"in phase '{phase}': {_error_line(text)}"
    return res


def add_loss_diffs(rows: list[dict]) -> None:
    """max |loss_i - inductor's loss_i| over the steps both ran, per workload; and peak / tok/s against inductor's."""
    for r in rows:
        ref = next((x for x in rows if x["workload"] == r["workload"] and x["variant"] == "inductor"
                    and x.get("status") == "ok"), None)
        if ref is None or r is ref or r.get("status") != "ok":
            continue
        pairs = list(zip(r["losses"], ref["losses"]))
        r["max_loss_diff"] = max(abs(a - b) for a, b in pairs) if pairs else None
        if r.get("peak_gib") and ref.get("peak_gib"):
            r["peak_vs_inductor"] = r["peak_gib"] / ref["peak_gib"]
        if r.get("tok_s") and ref.get("tok_s"):
            r["tok_s_vs_inductor"] = r["tok_s"] / ref["tok_s"]


def table(rows: list[dict]) -> str:
    lines = ["| workload | variant | status | tok/s | peak GiB | x Inductor tok/s | x Inductor peak | "
             "max loss diff | fused |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def f(k, fmt):
            return format(r[k], fmt) if isinstance(r.get(k), (int, float)) else "-"
        fused = ", ".join(f"{k} {v}" for k, v in sorted(r.get("replaced", {}).items())) or "-"
        lines.append(f"| {r['workload']} | {r['variant']} | {r['status']} | {f('tok_s', '.0f')} | "
                     f"{f('peak_gib', '.2f')} | {f('tok_s_vs_inductor', '.3f')} | {f('peak_vs_inductor', '.3f')} | "
                     f"{f('max_loss_diff', '.2e')} | {fused} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.post_training", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", choices=sorted(WORKLOADS), required=True)
    p.add_argument("--variant", choices=VARIANTS, required=True)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--result", required=True)
    args = p.parse_args(argv)

    def phase(s):
        with open(args.result + ".phase", "w") as fh:
            fh.write(s)
        print(f"[{args.workload}/{args.variant}] {s}", flush=True)

    kw = dict(smoke=args.smoke, device=args.device, steps=args.steps, warmup=args.warmup)
    if args.smoke:
        from bench.common import smoke_codegen

        with smoke_codegen():
            res = guarded(args.workload, args.variant, kw, phase)
    else:
        res = guarded(args.workload, args.variant, kw, phase)
    with open(args.result, "w") as fh:
        json.dump(res, fh, default=str)
    print(f"[{args.workload}/{args.variant}] {res['status']}", flush=True)
    return 0 if res["status"] == "ok" or res["status"].startswith("unavailable") else 1


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)
