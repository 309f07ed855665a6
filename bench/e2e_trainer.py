"""End-to-end through the HF Trainer: the same `Trainer.train()` three ways, one variant per process.

    python -m bench.run trainer --variant liger_fx_hook      # use_liger_kernel=True routed to backend="liger"
    (python -m bench.run trainer ... is python -m bench.e2e_trainer ...)
    python -m bench.e2e_trainer --variant liger_kernel       # use_liger_kernel=True with the real liger-kernel
    python -m bench.e2e_trainer --variant torch_compile      # torch_compile=True (Inductor), no Liger
    python -m bench.e2e_trainer --variant all                # the three above (and hf_eager), each in a subprocess
    python -m bench.e2e_trainer --variant liger_fx_hook --smoke   # CPU: tiny shape, aot_eager codegen, seconds

Each run prints ONE JSON line (`--variant all`: one per variant): tok_s over the timed steps, median step_ms,
peak_gib (max allocated during the timed steps, after warm-up and compilation), peak_gib_with_warmup, the per-step
losses, the liger_fx rewrite counters, and the GPU, versions and commit.

Setup: Llama-3.2-1B shape (bench.e2e.SHAPES["llama-1b"]), random weights (seed 0), pure bf16 weights (no
autocast: the same dtype for every variant, as bench.e2e), fused AdamW lr 1e-4, B8 T2048, 3 warm-up + 20 timed
optimizer steps, random token batches (seed 1234) with labels = input_ids, logging every step (one .item() sync per
step, the same for every variant). Each variant runs in its own process so its peak memory is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

VARIANTS = ("liger_fx_hook", "liger_kernel", "torch_compile", "hf_eager")
VARIANT_HELP = {
    "liger_fx_hook": "import liger_fx.integrations.transformers; TrainingArguments(use_liger_kernel=True)",
    "liger_kernel": "TrainingArguments(use_liger_kernel=True) with liger-kernel installed (transformers' own hook)",
    "torch_compile": "TrainingArguments(torch_compile=True): Inductor, no Liger",
    "hf_eager": "TrainingArguments() as is",
}
LR = 1e-4


def _timing_callback(warmup: int, cuda: bool):
    from transformers import TrainerCallback

    class Timing(TrainerCallback):
        """Wall time between consecutive optimizer-step ends (CUDA synchronized), timed steps only; resets the peak
        memory counter when warm-up (compilation included) is over."""

        def __init__(self):
            self.ends: list[float] = []
            self.peak_with_warmup = None

        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())
            if state.global_step == warmup and cuda:
                self.peak_with_warmup = torch.cuda.max_memory_allocated() / 2**30
                torch.cuda.reset_peak_memory_stats()

    return Timing()


def run_variant(variant: str, *, shape_name: str, steps: int, warmup: int, batch: int | None, seq: int | None,
                smoke: bool, grad_ckpt: bool, out_dir: str) -> dict:
    from torch._dynamo.utils import counters

    from bench.e2e import SHAPES, build_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = device == "cuda"
    shape = SHAPES[shape_name]
    B = batch or (2 if smoke else shape.batch)
    T = seq or (32 if smoke else shape.seq)
    dtype = torch.bfloat16 if cuda else torch.float32

    extra: dict = {}
    if variant == "liger_fx_hook":
        import liger_fx.integrations.transformers as hook

        hook.install("liger_fx")  # explicit, whatever $LIGER_FX_TRAINER says: this variant is liger-fx by definition
        extra["use_liger_kernel"] = True
    elif variant == "liger_kernel":
        from transformers.utils import is_liger_kernel_available

        if not cuda:
            return {"variant": variant, "status": "unavailable: liger-kernel needs CUDA"}
        if not is_liger_kernel_available():
            return {"variant": variant, "status": "unavailable: liger-kernel is not installed"}
        extra["use_liger_kernel"] = True
    elif variant == "torch_compile":
        extra["torch_compile"] = True
    elif variant != "hf_eager":
        raise ValueError(f"unknown variant {variant!r}; valid: {', '.join(VARIANTS)}")

    from transformers import PrinterCallback, ProgressCallback, Trainer, TrainingArguments

    t0 = time.perf_counter()
    model = build_model(shape, smoke, device, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, model.config.vocab_size, ((warmup + steps) * B, T), generator=g)
    data = [{"input_ids": x, "labels": x} for x in ids]
    args = TrainingArguments(
        output_dir=out_dir, max_steps=warmup + steps, per_device_train_batch_size=B, learning_rate=LR,
        optim="adamw_torch_fused" if cuda else "adamw_torch", lr_scheduler_type="constant", weight_decay=0.0,
        logging_steps=1, report_to=[], save_strategy="no", seed=0, disable_tqdm=True, dataloader_num_workers=0,
        use_cpu=not cuda, **({"gradient_checkpointing": True} if grad_ckpt else {}), **extra,
    )
    timing = _timing_callback(warmup, cuda)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[timing])
    for cb in (PrinterCallback, ProgressCallback):  # stdout carries only the JSON line
        trainer.remove_callback(cb)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    setup_s = time.perf_counter() - t0
    t_train = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t_train

    ends = timing.ends
    step_s = [b - a for a, b in zip(ends[warmup - 1:], ends[warmup:])] if warmup >= 1 else []
    timed_s = ends[-1] - ends[warmup - 1] if warmup >= 1 and len(ends) > warmup else None
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    from bench.common import env_info

    return {
        "bench": "e2e_trainer", "shape": shape_name, "variant": variant, "status": "ok", "device": device,
        "dtype": str(dtype), "batch": B, "seq": T, "steps": steps, "warmup": warmup, "params": n_params,
        "gradient_checkpointing": grad_ckpt,
        "tok_s": B * T * steps / timed_s if timed_s else None,
        "step_ms": statistics.median(step_s) * 1e3 if step_s else None,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "peak_gib_with_warmup": timing.peak_with_warmup,
        "warmup_s": ends[warmup - 1] - t_train if warmup >= 1 and ends else None,
        "train_s": train_s, "setup_s": setup_s,
        "losses": losses, "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
        "replaced": dict(counters["liger_fx"]),
        "graph_breaks": sum(counters["graph_break"].values()),
        **env_info(),
    }


def _spawn(variant: str, argv: list[str], timeout: float) -> dict:
    """One variant in its own process; its last stdout line is its JSON row."""
    cmd = [sys.executable, "-m", "bench.e2e_trainer", "--variant", variant, *argv]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"variant": variant, "status": f"error: timed out after {timeout:.0f} s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if lines:
        return json.loads(lines[-1])
    tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"variant": variant, "status": f"error: exit {p.returncode}: {tail[0][:300]}"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.e2e_trainer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", choices=(*VARIANTS, "all"), required=True)
    p.add_argument("--shape", default="llama-1b")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens in the first)")
    p.add_argument("--batch", type=int)
    p.add_argument("--seq", type=int)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--smoke", action="store_true", help="CPU: the shape's tiny config, aot_eager codegen")
    p.add_argument("--out", help="also append the JSON line(s) to this file")
    p.add_argument("--variant-timeout", type=float, default=400, help="seconds per variant with --variant all")
    args = p.parse_args(argv)

    if args.variant == "all":
        passthrough = ["--shape", args.shape, "--steps", str(args.steps), "--warmup", str(args.warmup)]
        passthrough += ["--batch", str(args.batch)] if args.batch else []
        passthrough += ["--seq", str(args.seq)] if args.seq else []
        passthrough += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
        passthrough += ["--smoke"] if args.smoke else []
        rows = [_spawn(v, passthrough, args.variant_timeout) for v in VARIANTS]
    else:
        if args.smoke and not torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")
        import tempfile

        kw = dict(shape_name=args.shape, steps=args.steps, warmup=max(args.warmup, 1), batch=args.batch,
                  seq=args.seq, smoke=args.smoke, grad_ckpt=args.gradient_checkpointing)
        with tempfile.TemporaryDirectory() as out_dir:
            try:
                if args.smoke:
                    from bench.common import smoke_codegen

                    with smoke_codegen():
                        row = run_variant(args.variant, out_dir=out_dir, **kw)
                else:
                    row = run_variant(args.variant, out_dir=out_dir, **kw)
            except Exception as e:  # reported as this variant's outcome, one line
                row = {"variant": args.variant, "status": f"error: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
        rows = [row]
    for row in rows:
        line = json.dumps(row, default=str)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")
    return 0 if all(r["status"] == "ok" or r["status"].startswith("unavailable") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
