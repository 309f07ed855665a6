"""Convergence: does every seed family train like eager over 50 steps, with liger-fx as with Inductor?

    python -m bench.run convergence --out DIR              # H200: 9 families, 50 steps each, one device call
    (python -m bench.run convergence ... is python -m bench.convergence ...)
    python -m bench.convergence --smoke --families llama   # CPU: tiny configs, 3 steps, aot_eager codegen
    python -m bench.convergence --from-json DIR/convergence.json --plot bench/convergence.png --update bench/RESULTS.md

On the H200, one device call (torch, triton and transformers are on the machine; no network): bench/gpu.sh installs
the checkout, then runs this with --out $OUT/conv:

    LIGER_FX_COMMIT=<sha> bash bench/gpu.sh "conv: convergence"

Per family (hidden 1024, 4 layers, vocab 32000, bf16, each family's own structure; see FAMILIES) one model is built
with seed 0 and every variant trains a deep copy of it: identical weights, identical batches, 50 steps of AdamW.

    hf_eager         the HF model as is: the reference
    hf_eager_rerun   the same again, same seeds: run-to-run noise of eager itself (atomics in backward kernels)
    inductor         torch.compile(model)
    liger_fx         torch.compile(model, backend="liger")
    hf_hook          liger_fx.apply(model) (no logits in training)

Recorded per variant: the loss curve, max |loss - hf_eager's loss| over the steps, and the final-parameter distance
||p - p_eager|| / ||p_eager|| over all parameters (one L2 norm over every element). RULE below says what passes.

Families run in parallel subprocesses (they are small; compilation, not the GPU, is the cost), each with a timeout,
all within --budget-s: a family or variant that does not finish is reported as "skipped (time budget)" with where it
was, never dropped. Written to --out: convergence.json (everything), convergence.md, convergence.png, logs/<family>.log;
the short table is printed last (the device tool returns only the output's tail).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import traceback

import torch

from bench import common, e2e

VARIANTS = ("hf_eager", "hf_eager_rerun", "inductor", "liger_fx", "hf_hook")
REFERENCE, RERUN, BASELINE, OURS = "hf_eager", "hf_eager_rerun", "inductor", ("liger_fx", "hf_hook")
METRICS = ("max_dloss", "param_dist")
GRAD_RULE = (
    "grad check (first step, before any update, so no chaos yet): ||g - g_fp32|| / ||g_fp32|| over all gradients, "
    "for liger_fx and hf_hook, <= 2 x hf_eager's own + bf16 eps (tests/tolerance.py's rule, on the whole model)."
)
GRAD_EPS = 2.0 ** -8  # bf16 eps: the floor of any bf16 result's relative error

RULE = (
    "PASS iff for liger_fx and hf_hook, for both metrics (max |dloss| over all steps, final-parameter distance), "
    "deviation from hf_eager <= inductor's deviation from hf_eager + margin, where margin = max(eager-vs-eager "
    "noise, inductor's deviation)."
)
# Why this margin. In bf16, two correct implementations of the same step round differently; AdamW then turns the
# differences chaotic: early on its update is about lr * sign(grad), so an element whose gradient is near 0 gets its
# update flipped by a last-bit change, and 50 steps amplify that. Inductor's deviation from eager is therefore ONE
# sample of how far a correct, differently-rounded implementation lands, and liger-fx's is another sample of the same
# kind: demanding liger <= inductor exactly would fail about half the time with nothing wrong. The eager-vs-eager run
# measures the floor of that chaos (the same code, only the order of atomic adds differs): when it is as large as
# Inductor's deviation, it is the margin; when eager is deterministic (0, e.g. a family without atomics in its
# backward) or its noise is smaller, Inductor's deviation is the size of one sample, and the margin allows liger-fx up
# to twice Inductor's deviation. A real bug (a wrong eps, cast, scale or gradient) moves the loss by orders of
# magnitude more than rounding: at this size a wrong loss scale or softcap shows in the first step's loss.

# CPU smoke only: fp32, and aot_eager runs eager's own ATen ops, so the noise and "Inductor's" deviation are exactly 0
# and the rule would demand bit-equality from liger-fx's reference ops, which round differently in the last fp32 bits
# (3 steps, measured: loss 4.8e-7, parameter distance 1.4e-7 on Gemma2, 3.2e-8 on Llama). The smoke margin is at least
# 1e-5: 20x that, and far below what a wrong eps, cast or scale does. The GPU run has no floor.
SMOKE_FLOOR = {"max_dloss": 1e-5, "param_dist": 1e-5}

# --------------------------------------------------------------------------------------------------------------
# The families: sizes like Liger's mini-model convergence tests, ratios from each family's own released configs.

COMMON = dict(vocab_size=32000, hidden_size=1024, num_hidden_layers=4, max_position_embeddings=4096)
# Gemma2 and Mistral have sliding-window layers; at T=512 their real windows (4096) would never cut, so the window is
# 256 here: the sliding layers really mask, beside Gemma2's full layers.
WINDOW = 256
FAMILIES: dict[str, tuple[dict, str]] = {
    # expensive families first: the scheduler starts them in this order
    "mixtral": (dict(num_attention_heads=16, num_key_value_heads=4, head_dim=64, intermediate_size=3584,
                     num_local_experts=8, num_experts_per_tok=2, sliding_window=None),
                "Mixtral-8x7B ratios: 8 experts top-2, expert intermediate 3.5x, 4 query heads per KV head"),
    "gemma2": (dict(num_attention_heads=4, num_key_value_heads=2, head_dim=256, intermediate_size=4096,
                    query_pre_attn_scalar=256, sliding_window=WINDOW, attn_logit_softcapping=50.0,
                    final_logit_softcapping=30.0),
               "Gemma2-2B ratios: head_dim 256, GeGLU 4x, softcaps 50/30, sliding/full layers alternating, "
               "eager attention (transformers rejects SDPA for it)"),
    "gemma": (dict(num_attention_heads=4, num_key_value_heads=1, head_dim=256, intermediate_size=8192),
              "Gemma-2B ratios: multi-query (1 KV head), head_dim 256, GeGLU 8x, tied, (1 + w) RMSNorm"),
    "llama": (dict(num_attention_heads=16, num_key_value_heads=4, head_dim=64, intermediate_size=4096,
                   tie_word_embeddings=True, rope_parameters=dict(rope_type="default", rope_theta=500000.0)),
              "Llama-3.2-1B ratios: SwiGLU 4x, 4 query heads per KV head, head_dim 64, tied, theta 5e5"),
    "mistral": (dict(num_attention_heads=16, num_key_value_heads=4, head_dim=64, intermediate_size=3584,
                     sliding_window=WINDOW),
                "Mistral-7B ratios: SwiGLU 3.5x, 4 query heads per KV head, sliding window"),
    "qwen2": (dict(num_attention_heads=16, num_key_value_heads=2, head_dim=64, intermediate_size=5504,
                   tie_word_embeddings=True, rope_parameters=dict(rope_type="default", rope_theta=1000000.0)),
              "Qwen2-0.5B ratios: SwiGLU 5.4x, 8 query heads per KV head, q/k/v bias, tied, theta 1e6"),
    "qwen3": (dict(num_attention_heads=16, num_key_value_heads=8, head_dim=128, intermediate_size=3072,
                   tie_word_embeddings=True, rope_parameters=dict(rope_type="default", rope_theta=1000000.0)),
              "Qwen3-0.6B itself at 4 layers (hidden 1024, 16/8 heads, head_dim 128, q/k RMSNorm, tied)"),
    "phi3": (dict(num_attention_heads=16, num_key_value_heads=16, head_dim=64, intermediate_size=2816),
             "Phi-3-mini ratios: multi-head (no GQA), packed qkv and gate_up projections, SwiGLU 8/3x"),
    "gpt_neox": (dict(num_attention_heads=16, intermediate_size=4096, rotary_pct=0.25),
                 "Pythia-410M at 4 layers: LayerNorm, GELU MLP, parallel residual, partial rotary 25%, untied"),
}


class Setup:
    """Training setup; `smoke` shrinks it to something 2 CPU cores run in seconds."""

    def __init__(self, smoke: bool, steps=None, batch=None, seq=None, corpus=None, lr=None, data_seed=None):
        self.smoke = smoke
        self.steps = steps or (3 if smoke else 50)
        self.batch = batch or (2 if smoke else 8)
        self.seq = seq or (32 if smoke else 512)
        # Random tokens are learnable by memorization only: the loss falls from ln(32000) = 10.37 as the corpus is
        # memorized. Measured on CPU (fp32, hidden 1024, 2 layers, T64, 16 sequences, batch 8, so each sequence is
        # seen every 2 steps): 10.56 -> 0.84 at step 12 and 0.07 at step 15, at lr 1e-3 and 3e-4 alike (AdamW's
        # first updates are about lr * sign(grad)): memorized after ~7 sightings. 32 sequences at batch 8 are seen
        # 12.5 times in 50 steps: the curve falls through most of the run instead of sitting at 0 for its second half.
        self.corpus = corpus or (4 if smoke else 32)
        # 1e-3, not lower: in pure bf16 an update smaller than half a weight's ulp is rounded away; at 1e-3 every
        # weight below 0.5 in magnitude moves (init std 0.02). Weights at 1.0 (RMSNorm scales, except Gemma's 1 + w)
        # do not move at any sane lr: their gradients are checked by the op tests, not here.
        self.lr = lr or 1e-3
        self.seed_weights, self.seed_data = 0, 1234 if data_seed is None else data_seed

    def to_dict(self) -> dict:
        return dict(smoke=self.smoke, steps=self.steps, batch=self.batch, seq=self.seq, corpus=self.corpus,
                    lr=self.lr, seed_weights=self.seed_weights, seed_data=self.seed_data)

    def describe(self) -> str:
        return (f"{self.steps} steps of AdamW(lr={self.lr}, weight decay 0.01, fused on CUDA), batch {self.batch} x "
                f"seq {self.seq}, drawn in a fixed order from a corpus of {self.corpus} random sequences (seed "
                f"{self.seed_data}); weights seed {self.seed_weights}, one deep copy per variant")


def family_config(family: str, smoke: bool):
    """The family's config: FAMILIES' sizes, or for --smoke the built-in mini config (hidden 64, 2 layers)."""
    from liger_fx.models import mini_config

    if smoke:
        return mini_config(family)
    return mini_config(family, **COMMON, **FAMILIES[family][0])


# --------------------------------------------------------------------------------------------------------------
# The worker: one family, every variant, in this process (the orchestrator runs one per family)


def corpus_batches(vocab: int, setup: Setup, device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(setup.seed_data)
    corpus = torch.randint(0, vocab, (setup.corpus, setup.seq), generator=g)
    order = [torch.arange(i * setup.batch, (i + 1) * setup.batch) % setup.corpus for i in range(setup.steps)]
    # One contiguous tensor per step, as bench.e2e does: Dynamo sees identical inputs every step.
    return [corpus[idx].contiguous().to(device) for idx in order]


def _param_dist(params, ref) -> float:
    num = sum(float((p.detach().float() - r.float()).pow(2).sum()) for p, r in zip(params, ref))
    den = sum(float(r.float().pow(2).sum()) for r in ref)
    return math.sqrt(num) / math.sqrt(den) if den else float("nan")


def _grad_err(model, grads32) -> float:
    """||g - g_fp32|| / ||g_fp32|| over every gradient of the model (one L2 norm over all elements)."""
    num = den = 0.0
    for p, r in zip(model.parameters(), grads32):
        g = p.grad.float() if p.grad is not None else torch.zeros_like(r)
        num += float((g - r).pow(2).sum())
        den += float(r.pow(2).sum())
    return math.sqrt(num) / math.sqrt(den) if den else float("nan")


def fp32_grads(pristine, batch) -> list[torch.Tensor]:
    """The first step's gradients of an fp32 copy of the model, eager: the reference GRAD_RULE measures against."""
    model = copy.deepcopy(pristine).float().train()
    model(input_ids=batch, labels=batch).loss.backward()
    grads = [p.grad.detach() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    del model
    return grads


def train_variant(variant: str, pristine, batches, setup: Setup, device, ref: dict | None, phase,
                  grads32=None) -> dict:
    """Train a deep copy of `pristine` with `variant`; the row, plus the final parameters under "_params"."""
    from torch._dynamo.utils import counters

    cuda = torch.device(device).type == "cuda"
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)  # nothing here draws random numbers (dropout is 0); if anything did, it draws the same
    model = copy.deepcopy(pristine).train()
    opt = torch.optim.AdamW(model.parameters(), lr=setup.lr, fused=cuda)
    fwd = e2e.make_variant("hf_eager" if variant == RERUN else variant, model, device)
    losses, t0, first_s = [], time.perf_counter(), None
    for i, x in enumerate(batches):
        if i == 0:
            phase(f"{variant}: step 1" + ("" if variant in (REFERENCE, RERUN) else " (compiling)"))
        loss = fwd(input_ids=x, labels=x).loss  # HF shifts the labels
        loss.backward()
        if i == 0 and grads32 is not None:
            grad_err = _grad_err(model, grads32)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        if i == 0:
            common.sync(device)
            first_s = time.perf_counter() - t0
            phase(f"{variant}: steps 2-{len(batches)}")
    common.sync(device)
    losses = [float(x) for x in losses]
    row = {"variant": variant, "status": "ok" if all(map(math.isfinite, losses)) else "non-finite loss",
           "losses": losses, "first_loss": losses[0], "final_loss": losses[-1], "first_step_s": first_s,
           "wall_s": time.perf_counter() - t0, "replaced": dict(counters["liger_fx"]),
           "graph_breaks": sum(counters["graph_break"].values())}
    if grads32 is not None:
        row["grad_err"] = grad_err
    params = [p.detach().clone() for p in model.parameters()]
    if ref is not None:
        row["max_dloss"] = max(abs(a - b) for a, b in zip(losses, ref["losses"]))
        row["first_dloss"] = abs(losses[0] - ref["losses"][0])
        row["param_dist"] = _param_dist(params, ref["_params"])
    del fwd, opt, model
    torch._dynamo.reset()
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    row["_params"] = params
    return row


def run_family(family: str, setup: Setup, device, variants=VARIANTS, phase=lambda s: None,
               save=lambda res: None) -> dict:
    """Every variant of one family, in order, each guarded; `save` gets the result after each variant."""
    cuda = torch.device(device).type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32  # CPU smoke: fp32 (fast there, and tight losses)
    phase("build model")
    config = family_config(family, setup.smoke)
    config.use_cache = False  # training: no KV cache kept alive as an output
    from transformers import AutoModelForCausalLM

    torch.manual_seed(setup.seed_weights)
    with torch.device(device):
        pristine = AutoModelForCausalLM.from_config(config, dtype=dtype)
    res = {"family": family, "structure": "mini config" if setup.smoke else FAMILIES[family][1], "dtype": str(dtype),
           "params": sum(p.numel() for p in pristine.parameters()),
           "config": {k: v for k, v in config.to_dict().items() if k in _CONFIG_KEYS},
           "variants": {}}
    batches = corpus_batches(config.vocab_size, setup, device)
    phase("fp32 reference gradients")
    grads32 = fp32_grads(pristine, batches[0])
    ref = None
    for variant in variants:
        try:
            row = train_variant(variant, pristine, batches, setup, device, ref, phase, grads32)
            params = row.pop("_params")
            if variant == REFERENCE and row["status"] == "ok":
                ref = {"losses": row["losses"], "_params": params}
            del params
        except Exception as e:  # the variant's outcome; the family goes on with the next one
            traceback.print_exc()
            row = {"variant": variant, "status": f"error: {type(e).__name__}",
                   "error": e2e._error_line(str(e)) or str(e)[:300]}
            torch._dynamo.reset()
        res["variants"][variant] = row
        print(f"[{family}] {variant}: {row['status']}  final loss {row.get('final_loss')}  max dloss "
              f"{row.get('max_dloss')}  param dist {row.get('param_dist')}", flush=True)
        save(res)
    return res


_CONFIG_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "tie_word_embeddings", "rope_parameters", "sliding_window",
                "layer_types", "num_local_experts", "num_experts_per_tok", "attn_logit_softcapping",
                "final_logit_softcapping", "rotary_pct", "hidden_act", "hidden_activation", "_attn_implementation")


def worker_main(args) -> int:
    setup = Setup(args.smoke, args.steps, args.batch, args.seq, args.corpus, args.lr, args.data_seed)

    def phase(s):
        with open(args.result + ".phase", "w") as f:
            f.write(s)
        print(f"[{args.worker}] {s}", flush=True)

    def save(res):
        tmp = args.result + ".tmp"
        with open(tmp, "w") as f:
            json.dump(res, f, default=str)
        os.replace(tmp, args.result)  # atomic: a kill mid-write leaves the previous variant's file

    from torch._inductor import config as inductor_config

    # Several families compile at once on one machine: each worker gets its share of the cores for Inductor's
    # compile pool, not a pool as large as the machine (16 cores, 5 workers: 3 each, instead of 80 processes).
    with inductor_config.patch(compile_threads=args.compile_threads):
        if args.smoke and not args.smoke_inductor:
            with common.smoke_codegen():
                run_family(args.worker, setup, args.device, phase=phase, save=save)
        else:
            run_family(args.worker, setup, args.device, phase=phase, save=save)
    return 0


# --------------------------------------------------------------------------------------------------------------
# The verdict


def verdict(fam: dict, floor: dict | None = None) -> dict:
    """PASS / FAIL / INCOMPLETE for one family, with the margins and the comparisons behind it (RULE); `floor` is
    the smoke mode's least margin per metric (SMOKE_FLOOR)."""
    floor = floor or {}
    vs = fam.get("variants", {})
    not_ok = {v: vs.get(v, {}).get("status", "not run") for v in VARIANTS if vs.get(v, {}).get("status") != "ok"}
    broken = {v: s for v, s in not_ok.items() if v in OURS and s.startswith(("error", "crashed", "non-finite"))}
    if broken:  # liger-fx crashed or diverged: a failure whatever the others did
        return {"verdict": "FAIL", "why": "; ".join(f"{v} {s}" for v, s in broken.items())}
    if not_ok:
        return {"verdict": "INCOMPLETE", "why": "; ".join(f"{v} {s}" for v, s in not_ok.items())}
    out = {"verdict": "PASS", "margin": {}, "bound": {}, "checks": []}
    for m in METRICS:
        noise, base = vs[RERUN][m], vs[BASELINE][m]
        out["margin"][m] = max(noise, base, floor.get(m, 0.0))
        out["bound"][m] = base + out["margin"][m]
        for v in OURS:
            ok = vs[v][m] <= out["bound"][m]
            out["checks"].append({"variant": v, "metric": m, "value": vs[v][m], "bound": out["bound"][m], "ok": ok})
            if not ok:
                out["verdict"] = "FAIL"
    bad = [c for c in out["checks"] if not c["ok"]]
    out["why"] = "; ".join(f"{c['variant']} {c['metric']} {c['value']:.3g} > bound {c['bound']:.3g}" for c in bad)
    if all("grad_err" in vs[v] for v in (REFERENCE,) + OURS):
        bound = 2 * vs[REFERENCE]["grad_err"] + GRAD_EPS
        out["grad_bound"] = bound
        out["grad_check"] = "PASS" if all(vs[v]["grad_err"] <= bound for v in OURS) else "FAIL"
    return out


# --------------------------------------------------------------------------------------------------------------
# The orchestrator: families in parallel subprocesses, within the budget


class _Job:
    def __init__(self, family, proc, deadline, limit, result, log, started):
        self.family, self.proc, self.deadline, self.limit = family, proc, deadline, limit
        self.result, self.log, self.started = result, log, started


def _start(family: str, args, logdir: str, left: float) -> _Job:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = os.path.join(logdir, f"{family}.json")
    for stale in (result, result + ".phase"):
        if os.path.exists(stale):
            os.remove(stale)
    cmd = [sys.executable, "-m", "bench.convergence", "--worker", family, "--result", result,
           "--device", args.device, "--compile-threads", str(args.compile_threads)]
    for flag in ("steps", "batch", "seq", "corpus", "lr", "data_seed"):
        if getattr(args, flag) is not None:
            cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    cmd += ["--smoke"] if args.smoke else []
    cmd += ["--smoke-inductor"] if args.smoke_inductor else []
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    log = open(os.path.join(logdir, f"{family}.log"), "w")
    # Own session: on timeout the whole group goes (Inductor's compile workers included).
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True)
    limit = min(args.family_timeout, left)
    now = time.perf_counter()
    return _Job(family, proc, now + limit, limit, result, log, now)


def _finish(job: _Job, killed_by: str | None, floor: dict | None) -> dict:
    """Read what the worker wrote; every variant it did not finish becomes a row saying why."""
    try:
        os.killpg(job.proc.pid, signal.SIGKILL)  # the worker itself on timeout, and any compile worker left
    except (ProcessLookupError, PermissionError):
        pass
    job.proc.wait()
    job.log.close()
    fam = {"family": job.family, "variants": {}}
    if os.path.exists(job.result):
        with open(job.result) as f:
            fam = json.load(f)
    phase = ""
    if os.path.exists(job.result + ".phase"):
        with open(job.result + ".phase") as f:
            phase = f.read().strip()
    fam["wall_s"] = time.perf_counter() - job.started
    fam["log"] = os.path.basename(job.log.name)
    rc = job.proc.returncode
    for v in VARIANTS:
        if v in fam["variants"]:
            continue
        here = phase.startswith(v + ":") or (phase == "build model" and v == VARIANTS[0])
        if killed_by:
            row = {"status": "skipped (time budget)",
                   "detail": f"{killed_by}; " + (f"killed in phase '{phase}'" if here else "not started")}
        else:
            with open(job.log.name) as f:
                text = f.read()
            row = {"status": f"crashed (exit {rc})" if here or not phase else "not run (the family's process "
                   "crashed)", "detail": f"in phase '{phase}': {e2e._error_line(text)}"}
        fam["variants"][v] = {"variant": v, **row}
    fam["variants"] = {v: fam["variants"][v] for v in VARIANTS}
    fam.update(verdict(fam, floor))
    return fam


def run_all(args) -> dict:
    start = time.perf_counter()

    def left() -> float:
        return args.budget_s - (time.perf_counter() - start)

    setup = Setup(args.smoke, args.steps, args.batch, args.seq, args.corpus, args.lr, args.data_seed)
    results = {"env": common.env_info(), "device": args.device, "setup": setup.to_dict(),
               "setup_text": setup.describe(), "budget_s": args.budget_s,
               "rule": RULE + (f" Smoke: margin at least {SMOKE_FLOOR} (see SMOKE_FLOOR)." if args.smoke else ""),
               "floor": SMOKE_FLOOR if args.smoke else {},
               "parallel": args.parallel, "family_timeout_s": args.family_timeout, "families": {}}
    print("== " + _env_line(results), flush=True)
    print(f"== {len(args.family_list)} families, {args.parallel} at a time, {args.compile_threads} compile threads "
          f"each; family timeout {args.family_timeout:.0f} s, budget {args.budget_s:.0f} s; {setup.describe()}",
          flush=True)
    logdir = os.path.join(args.out, "logs")
    os.makedirs(logdir, exist_ok=True)
    queue, running = list(args.family_list), []
    while queue or running:
        while queue and len(running) < args.parallel:
            if left() < args.min_start_s:  # too little left for even the eager variants: say so, don't start
                for fam in queue:
                    results["families"][fam] = {
                        "family": fam, "verdict": "INCOMPLETE", "why": "skipped (time budget): not started",
                        "variants": {v: {"variant": v, "status": "skipped (time budget)", "detail": "not started: "
                                         f"{max(left(), 0):.0f} s left of the budget"} for v in VARIANTS}}
                queue = []
                break
            fam = queue.pop(0)
            running.append(_start(fam, args, logdir, left()))
            print(f"   {time.perf_counter() - start:6.1f} s  start {fam}", flush=True)
        for job in list(running):
            now = time.perf_counter()
            if job.proc.poll() is None and now < job.deadline:
                continue
            killed_by = None
            if job.proc.poll() is None:
                killed_by = ("the global budget (--budget-s)" if job.limit < args.family_timeout
                             else f"family timeout {args.family_timeout:.0f} s")
            fam = _finish(job, killed_by, results["floor"])
            results["families"][job.family] = fam
            running.remove(job)
            print(f"   {time.perf_counter() - start:6.1f} s  done  {job.family}: {fam['verdict']} "
                  f"({fam['wall_s']:.0f} s){': ' + fam['why'] if fam.get('why') else ''}", flush=True)
            save(results, args.out)
        time.sleep(0.2)
    results["families"] = {f: results["families"][f] for f in args.family_list}
    results["total_s"] = time.perf_counter() - start
    return results


# --------------------------------------------------------------------------------------------------------------
# Output: JSON, markdown, plot, RESULTS.md, the short table


def _f(x, spec=".2e"):
    return "-" if x is None else format(x, spec)


def _env_line(results: dict) -> str:
    from bench.report import env_line

    return env_line(results.get("env", {})) + (" · SMOKE (CPU, tiny configs)" if results["setup"]["smoke"] else "")


def summary_table(results: dict) -> str:
    """One row per family: eager's learning, the noise, each variant's two deviations, the margin, the verdict."""
    head = ["family", "verdict", "eager loss first -> last"] + [
        f"{v} dloss / dist" for v in (RERUN, BASELINE) + OURS] + [
        "margin dloss / dist", "grad check: eager / inductor / liger_fx / hf_hook grad err vs fp32"]
    rows = []
    for name, fam in results["families"].items():
        vs = fam.get("variants", {})

        def dev(v):
            r = vs.get(v, {})
            if r.get("status") != "ok":
                return str(r.get("status", "-")).split(" (")[0]
            return f"{_f(r.get('max_dloss'), '.4f')} / {_f(r.get('param_dist'))}"

        ref = vs.get(REFERENCE, {})
        learn = (f"{ref['first_loss']:.2f} -> {ref['final_loss']:.3f}" if ref.get("status") == "ok" else "-")
        margin = fam.get("margin") or {}
        grads = " / ".join(_f(vs.get(v, {}).get("grad_err")) for v in (REFERENCE, BASELINE) + OURS)
        rows.append([name, fam.get("verdict", "-"), learn] + [dev(v) for v in (RERUN, BASELINE) + OURS] +
                    [f"{_f(margin.get('max_dloss'), '.4f')} / {_f(margin.get('param_dist'))}" if margin else "-",
                     f"{fam.get('grad_check', '-')}: {grads}"])
    from bench.report import _table

    return _table(head, rows)


def detail_table(results: dict) -> str:
    from bench.report import _table

    rows = []
    for name, fam in results["families"].items():
        for v, r in fam.get("variants", {}).items():
            rep = ", ".join(f"{k} {n}" for k, n in sorted(r.get("replaced", {}).items())) or "-"
            rows.append([name, v, r.get("status", "-"), _f(r.get("first_loss"), ".4f"), _f(r.get("final_loss"), ".4f"),
                         _f(r.get("first_dloss"), ".1e"), _f(r.get("max_dloss"), ".4f"), _f(r.get("param_dist")),
                         _f(r.get("grad_err")), _f(r.get("first_step_s"), ".1f"), r.get("graph_breaks", "-"), rep])
    head = ["family", "variant", "status", "loss[0]", "final loss", "dloss step 1", "max dloss", "param dist",
            "grad err vs fp32 (step 1)", "step 1 s (compile)", "graph breaks", "rewrites"]
    return _table(head, rows)


def render_markdown(results: dict) -> str:
    parts = [f"Run: {_env_line(results)}", f"Setup: {results['setup_text']}. Rule: {results['rule']} "
             f"Beside it, the {GRAD_RULE}",
             summary_table(results),
             "dloss = max over the steps of |loss - hf_eager's loss|; dist = ||p - p_eager|| / ||p_eager|| over all "
             "final parameters; hf_eager_rerun is hf_eager again with the same seeds (run-to-run noise).",
             "<details><summary>every variant</summary>\n\n" + detail_table(results) + "\n\n</details>"]
    notes = []
    for name, fam in results["families"].items():
        if fam.get("why"):
            notes.append(f"{name}: {fam['verdict']}: {fam['why']}")
        for v, r in fam.get("variants", {}).items():
            if r.get("detail") or r.get("error"):
                notes.append(f"{name}/{v}: {r['status']}: {r.get('detail') or r.get('error')}")
    configs = [f"{n}: {FAMILIES[n][1]} ({_f(f.get('params'), ',')} params)" for n, f in results["families"].items()
               if n in FAMILIES and not results["setup"]["smoke"]]
    if notes:
        parts.append("Notes:\n" + "\n".join(f"- {n}" for n in notes))
    if configs:
        parts.append("Families (hidden 1024, 4 layers, vocab 32000):\n" + "\n".join(f"- {c}" for c in configs))
    parts.append(f"Total {results.get('total_s', 0):.0f} s, {results['parallel']} families at a time.")
    return "\n\n".join(parts) + "\n"


def short_summary(results: dict) -> str:
    lines = ["== convergence: " + _env_line(results)]
    for name, fam in results["families"].items():
        vs = fam.get("variants", {})
        cells = []
        for v in (RERUN, BASELINE) + OURS:
            r = vs.get(v, {})
            cells.append(f"{v} {_f(r.get('max_dloss'), '.4f')}/{_f(r.get('param_dist'), '.1e')}"
                         if r.get("status") == "ok" else f"{v} {str(r.get('status', '-')).split(' (')[0]}")
        ref = vs.get(REFERENCE, {})
        learn = f"{ref['final_loss']:.3f}" if ref.get("status") == "ok" else "-"
        grads = "/".join(_f(vs.get(v, {}).get("grad_err"), ".1e") for v in (REFERENCE, BASELINE) + OURS)
        lines.append(f"{name:9s} {fam.get('verdict', '-'):10s} eager final {learn:6s} " + "  ".join(cells)
                     + f"  grad {fam.get('grad_check', '-')} {grads}"
                     + (f"  | {fam['why']}" if fam.get("why") else ""))
    counts = {k: sum(1 for f in results["families"].values() if f.get("verdict") == k)
              for k in ("PASS", "FAIL", "INCOMPLETE")}
    lines.append(f"== {counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['INCOMPLETE']} INCOMPLETE "
                 f"(cells: max |dloss| / param distance vs hf_eager) in {results.get('total_s', 0):.0f} s")
    return "\n".join(lines)


_STYLE = {"hf_eager": ("black", "-", 2.2), "hf_eager_rerun": ("#888", ":", 1.2), "inductor": ("#1f77b4", "--", 1.2),
          "liger_fx": ("#d62728", "-", 1.0), "hf_hook": ("#ff7f0e", "-.", 1.0)}


def plot(results: dict, path: str) -> str | None:
    """Loss curves, one subplot per family. Returns None, or why there is no plot."""
    fams = {n: f for n, f in results["families"].items()
            if any(r.get("losses") for r in f.get("variants", {}).values())}
    if not fams:
        return "no family produced a loss curve"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # bench-only extra: pip install liger-fx[bench]
        return f"matplotlib not available ({e})"
    cols = min(3, len(fams))
    rows_n = math.ceil(len(fams) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.6 * cols, 3.4 * rows_n), squeeze=False)
    for ax, (name, fam) in zip(axes.flat, fams.items()):
        # The curves overlap at this scale; |loss - eager's| per step goes on a log axis on the right (thin lines).
        diff_ax = ax.twinx()
        ref = fam["variants"].get(REFERENCE, {}).get("losses")
        for v, r in fam["variants"].items():
            if not r.get("losses"):
                continue
            color, ls, lw = _STYLE.get(v, ("#555", "-", 1.0))
            label = v if v == REFERENCE else f"{v} (max |d| {_f(r.get('max_dloss'), '.2g')})"
            steps = range(1, len(r["losses"]) + 1)
            ax.plot(steps, r["losses"], color=color, ls=ls, lw=lw, label=label)
            if ref and v != REFERENCE:
                d = [abs(a - b) or float("nan") for a, b in zip(r["losses"], ref)]  # 0 has no log
                diff_ax.plot(steps, d, color=color, ls=ls, lw=0.6, alpha=0.6)
        if any(ln.get_ydata().size and (ln.get_ydata() == ln.get_ydata()).any() for ln in diff_ax.lines):
            diff_ax.set_yscale("log")
        diff_ax.set_ylabel("|loss - hf_eager loss| (thin)", fontsize=7)
        diff_ax.tick_params(labelsize=6)
        ax.set_title(f"{name}: {fam.get('verdict', '-')}", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("loss", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(fams):]:
        ax.axis("off")
    import textwrap

    title = [_env_line(results), results["setup_text"]]
    fig.suptitle("\n".join(line for t in title for line in textwrap.wrap(t, 150)), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def save(results: dict, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "convergence.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    with open(os.path.join(out, "convergence.md"), "w") as f:
        f.write(render_markdown(results))


def update_results_md(results: dict, path: str) -> None:
    """Replace the block between the convergence markers of RESULTS.md with this run's tables."""
    text = open(path).read()
    pattern = r"(<!-- convergence:begin -->\n).*?(<!-- convergence:end -->)"
    if not re.search(pattern, text, flags=re.S):
        raise SystemExit(f"{path}: no <!-- convergence:begin --> / <!-- convergence:end --> markers")
    text = re.sub(pattern, lambda m: m.group(1) + render_markdown(results) + m.group(2), text, flags=re.S)
    with open(path, "w") as f:
        f.write(text)


# --------------------------------------------------------------------------------------------------------------
# CLI


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.convergence", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default="all", help=f"all, or a comma list of {', '.join(FAMILIES)}")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny configs, few steps, aot_eager codegen")
    p.add_argument("--smoke-inductor", action="store_true", help="smoke with real Inductor codegen (slow on CPU)")
    p.add_argument("--device", default=None, help="default: cuda if available (cpu with --smoke)")
    p.add_argument("--out", default=os.environ.get("OUT") or ".out", help="convergence.json/.md/.png, logs/ here")
    p.add_argument("--plot", default=None, help="the plot's path (default OUT/convergence.png)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 50; smoke 3)")
    p.add_argument("--batch", type=int, default=None, help="default 8; smoke 2")
    p.add_argument("--seq", type=int, default=None, help="default 512; smoke 32")
    p.add_argument("--corpus", type=int, default=None, help="random sequences in the corpus (default 32; smoke 4)")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default 1e-3)")
    p.add_argument("--data-seed", type=int, default=None,
                   help="seed of the random corpus (default 1234): another sample of the same chaos")
    # 5 at a time: 9 families then take two rounds; each worker's Python (Dynamo, AOTAutograd, lowering) is
    # single-threaded, so 5 workers use 5 of the 16 cores for that, and 3 compile threads each for Triton.
    p.add_argument("--parallel", type=int, default=5, help="families at a time (default 5)")
    p.add_argument("--compile-threads", type=int, default=None,
                   help="Inductor compile_threads per family (default: cores // parallel)")
    p.add_argument("--family-timeout", type=float, default=360.0, help="seconds per family (default 360)")
    p.add_argument("--budget-s", type=float, default=540.0,
                   help="everything ends by then (default 540: a 600 s device call minus ~30 s setup, ~30 s slack)")
    p.add_argument("--min-start-s", type=float, default=60.0,
                   help="start no family with less than this left (default 60: process start, build, eager runs)")
    p.add_argument("--from-json", metavar="JSON", help="render a finished run's convergence.json, run nothing")
    p.add_argument("--update", metavar="RESULTS_MD", help="write the tables into RESULTS.md's convergence block")
    p.add_argument("--worker", metavar="FAMILY", help=argparse.SUPPRESS)  # internal: one family in this process
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.families == "all":
        args.family_list = list(FAMILIES)
    else:
        args.family_list = [f.strip() for f in args.families.split(",") if f.strip()]
        bad = [f for f in args.family_list if f not in FAMILIES]
        if bad:
            p.error(f"unknown family {', '.join(bad)}; valid: all, {', '.join(FAMILIES)}")
    args.device = args.device or ("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    args.compile_threads = args.compile_threads or max(1, (os.cpu_count() or 1) // max(1, args.parallel))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if torch.device(args.device).type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported
    if args.worker:
        return worker_main(args)
    if args.from_json:
        with open(args.from_json) as f:
            results = json.load(f)
    else:
        results = run_all(args)
        save(results, args.out)
    plot_path = args.plot or (None if args.from_json else os.path.join(args.out, "convergence.png"))
    if plot_path:
        why = plot(results, plot_path)
        print(f"plot: {why or plot_path}", flush=True)
    if args.update:
        update_results_md(results, args.update)
        print(f"updated {args.update}")
    print("\n" + render_markdown(results))
    print(short_summary(results))
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # A worker skips interpreter teardown, as bench.e2e does: after a CUDA error it can hang, and its result is saved.
    if "--worker" in sys.argv:
        os._exit(code)
    sys.exit(code)
