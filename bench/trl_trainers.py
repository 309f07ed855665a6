"""TRL's trainers through liger-fx's Trainer hook, on CPU: two training steps of SFTTrainer, DPOTrainer and
GRPOTrainer on a tiny random Llama (2 layers, hidden 64, V 512, fp32), with the hook (`import
liger_fx.integrations.transformers` and `use_liger_kernel=True`, or `--via torch_compile_backend`), with the hook but
TRL's own LM head (flag `fused_linear_logprobs` off), and without the hook, from the same weights, data and seed.

    python -m bench.run trl                                        # all three trainers x three variants; a table last
    PYTHONPATH=. python -m bench.trl_trainers                      # the same
    PYTHONPATH=. python -m bench.trl_trainers --trainers grpo --json out.json --verbose

Needs trl (checked with 1.16), which is not a dependency of liger-fx: run it in a venv that has it (~2.5 min on the
2-core CPU machine with a warm compile cache). Per trainer and variant, over the second step (the first compiles;
a profiler around a compile would count the fake tensors' ops):
- sites fused: replaced/candidates over the graphs the backend compiled (`liger_fx.get_records()`; GRPO's include
  the generation graphs);
- lm_head fused: the calls of liger-fx's fused lm_head ops the profiler saw in the step (outermost events);
- N x V made: allocations of at least an fp32 N x V (N = MIN_ROWS, every lm_head call reads more rows; V = 512)
  during the step, from torch.profiler's memory events (a TorchDispatchMode would turn torch.compile off),
  generation left out (sampling reads the logits). Those inside a fused op are counted apart: on CPU the op runs its
  torch reference, which makes the logits (on a GPU (C, V) chunks). TRL's own head makes (min(N, 4096), 32768) tiles
  and (N, V) intermediates of them on CPU;
- graph breaks (Dynamo's counter), the losses of both steps, the first step's gradient norm. SGD, not Adam: Adam's
  first step is about lr * sign(grad), which would turn rounding-level gradient differences into lr-sized ones.
  The models load with an explicit `model_init_kwargs={"dtype": ...}`: without it (TRL's default, fp32 too) DPO's
  reference model gave other logits than the policy with equal weights (4e-3, no hook involved), not looked into.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import warnings

import torch

VOCAB = 512
MIN_ROWS = 160
TRAINERS = ("sft", "dpo", "grpo")


# ---------------------------------------------------------------------------------------------------------------
# A tokenizer (offline: a word-level vocabulary "w0" .. "w507" and four specials) and a tiny random Llama


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(VOCAB - len(specials))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def _words(g, n):
    return " ".join(f"w{int(i)}" for i in torch.randint(0, VOCAB - 4, (n,), generator=g))


def dataset(kind: str, n: int = 8, seed: int = 0):
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    # Every lm_head call reads at least MIN_ROWS rows (4 sequences of 41+ tokens), so that N x V (160 x 512) is more
    # than any weight or its gradient (V x H = 512 x 64): a tensor that large is logits-sized.
    if kind == "sft":
        rows = [{"text": _words(g, 44 + 3 * i)} for i in range(n)]
    elif kind == "dpo":
        rows = [{"prompt": _words(g, 20 + i), "chosen": _words(g, 22 + i), "rejected": _words(g, 24 - i % 3)}
                for i in range(n)]
    else:
        rows = [{"prompt": _words(g, 16)} for i in range(n)]  # one length: no recompile in the watched step
    return Dataset.from_list(rows)


def parity_reward(completions, **kwargs):
    """GRPO's reward: the share of even word ids in a completion (any reward that varies does; this one needs no
    model)."""
    return [sum(w[1:].isdigit() and int(w[1:]) % 2 == 0 for w in c.split()) / max(len(c.split()), 1)
            for c in completions]


# ---------------------------------------------------------------------------------------------------------------
# What the step makes


class Watch:
    """Every allocation of at least `nbytes` during the training step, and every call of one of liger-fx's fused
    lm_head ops, from torch.profiler's memory events (a TorchDispatchMode would turn torch.compile off). Allocations
    inside `pause` (generation) are left out; those inside a fused op are counted apart: on CPU the op runs its torch
    reference, which makes the logits (on a GPU: (C, V) chunks)."""

    FUSED = ("liger_fx::fused_linear_logprobs", "liger_fx::fused_linear_cross_entropy",
             "liger_fx::linear_cross_entropy_logits")  # and their _backward ops
    PAUSE = "liger_fx_bench.paused"

    def __init__(self, nbytes: int, device: str = "cpu"):
        self.nbytes, self.big, self.big_in_op, self.fused, self.peak = nbytes, [], [], [], 0
        self.device_type = 1 if device == "cuda" else 0  # the profiler's "Device Type" of a memory event

    def __enter__(self):
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self.prof = profile(activities=activities, profile_memory=True, record_shapes=True)
        self.prof.__enter__()
        return self

    def __exit__(self, *exc):
        self.prof.__exit__(*exc)
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            self.prof.export_chrome_trace(f.name)
            events = json.load(open(f.name))["traceEvents"]
        ops = [e for e in events if e.get("ph") == "X" and "dur" in e]
        paused = [(e["ts"], e["ts"] + e["dur"]) for e in ops if e["name"] == self.PAUSE]
        calls = sorted((e for e in ops if e["name"].startswith(self.FUSED) and
                        not any(a <= e["ts"] <= b for a, b in paused)), key=lambda e: (e["ts"], -e["dur"]))
        ends: dict = {}
        for e in calls:  # the profiler nests an op's dispatch levels: count the outermost event of each call
            if e["ts"] >= ends.get(e.get("tid"), float("-inf")):
                self.fused.append(e["name"])
                ends[e.get("tid")] = e["ts"] + e["dur"]
        for e in events:
            if e.get("name") != "[memory]":
                continue
            if e["args"].get("Device Type", 0) != self.device_type:
                continue
            t, nbytes = e["ts"], e["args"]["Bytes"]
            if any(a <= t <= b for a, b in paused):
                continue
            self.peak = max(self.peak, e["args"]["Total Allocated"])
            if nbytes < self.nbytes:
                continue
            around = sorted((o for o in ops if o["ts"] <= t <= o["ts"] + o["dur"] and o.get("tid") == e.get("tid")),
                            key=lambda o: o["dur"])
            names = [o["name"] for o in around]
            where = next((n for n in names if n.startswith(self.FUSED)), None)
            dims = around[0].get("args", {}).get("Input Dims") if around else None
            (self.big_in_op if where else self.big).append(
                f"{nbytes} B in {where or (names[0] if names else '?')}{'' if where else f' {dims}'}")
        return False


def _pause_during(obj, name):
    original = getattr(obj, name)

    def wrapped(*args, **kwargs):
        with torch.profiler.record_function(Watch.PAUSE):
            return original(*args, **kwargs)

    setattr(obj, name, wrapped)


# ---------------------------------------------------------------------------------------------------------------
# One step of one trainer


def run(kind: str, hook: bool, model: str, *, steps: int = 2, flags: dict | None = None,
        via: str = "use_liger_kernel", device: str = "cpu", dtype: str = "float32") -> dict:
    import trl

    import liger_fx
    import liger_fx.integrations.transformers as hf_hook

    if hook:
        hf_hook.install("liger_fx")
    else:
        hf_hook.uninstall()
    liger_fx.clear_records()
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    tok = tokenizer()
    # SGD: Adam's first step is about lr * sign(grad), which would turn rounding-level gradient differences into
    # lr-sized ones in the second step's loss.
    common = dict(output_dir=tempfile.mkdtemp(prefix=f"trl_{kind}_"), max_steps=steps, per_device_train_batch_size=4,
                  report_to="none", logging_steps=1, save_strategy="no", seed=0, use_cpu=device == "cpu",
                  model_init_kwargs={"dtype": dtype}, bf16=dtype == "bfloat16",
                  learning_rate=1e-2, optim="sgd", liger_kernel_config=dict(flags or {}) if hook else None,
                  dataloader_num_workers=0, disable_tqdm=True)
    if via == "torch_compile_backend":  # the other way to ask for the hook: TrainingArguments' backend name
        common.update(torch_compile_backend="liger" if hook else None)
    else:
        common.update(use_liger_kernel=hook)
    # The model as a path, as users pass it: DPO and GRPO load their frozen reference model from the same path.
    if kind == "sft":
        args = trl.SFTConfig(**common, max_length=128, pad_to_multiple_of=128)  # one length: no recompile
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=dataset("sft"), processing_class=tok)
    elif kind == "dpo":
        args = trl.DPOConfig(**common, max_length=128, beta=0.1, pad_to_multiple_of=64)
        trainer = trl.DPOTrainer(model=model, args=args, train_dataset=dataset("dpo"), processing_class=tok)
    else:
        args = trl.GRPOConfig(**common, num_generations=4, max_completion_length=32, beta=0.04,
                              generation_batch_size=4, temperature=0.9,
                              generation_kwargs={"min_new_tokens": 32})  # every completion 32 tokens
        trainer = trl.GRPOTrainer(model=model, args=args, reward_funcs=parity_reward, train_dataset=dataset("grpo"),
                                  processing_class=tok)
    watch = Watch(MIN_ROWS * VOCAB * (2 if dtype == "bfloat16" else 4), device)  # an N x V in the model's dtype
    if kind == "grpo":
        _pause_during(trainer, "_generate")  # sampling reads the logits: not part of the loss
    step = trainer.training_step

    seen = []

    def training_step(*a, **k):
        inputs = a[1] if len(a) > 1 else k.get("inputs")
        seen.append(int(inputs["input_ids"].sum()) if isinstance(inputs, dict) and "input_ids" in inputs else None)
        if len(seen) < steps:  # the first step compiles (the profiler would count fake tensors' ops too)
            return step(*a, **k)
        with watch:
            return step(*a, **k)

    trainer.training_step = training_step
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    logged = {k: v for h in trainer.state.log_history if "loss" in h for k, v in h.items()
              if k in ("grad_norm", "entropy", "mean_token_accuracy", "kl", "reward", "rewards/chosen", "logps/chosen",
                       "logits/chosen", "rewards/margins")}
    records = liger_fx.get_records() if hook else []
    fused, cands = 0, 0
    per_flag: dict[str, list[int]] = {}
    for rec in records:
        for flag, (r, c) in rec.counts().items():
            per_flag.setdefault(flag, [0, 0])
            per_flag[flag][0] += r
            per_flag[flag][1] += c
            fused += r
            cands += c
    breaks = sum(counters["graph_break"].values())
    return {
        "trainer": kind, "hook": hook, "losses": losses, "logged": logged, "batch_checksum": seen, "fused": fused,
        "candidates": cands, "per_flag": per_flag,
        "graphs": len(records), "graph_breaks": breaks, "break_reasons": sorted(counters["graph_break"])[:4],
        "fused_lm_head_calls": len(watch.fused),
        "fused_ops": {n: watch.fused.count(n) for n in sorted(set(watch.fused))},
        "big": sorted(set(watch.big)), "n_big": len(watch.big), "big_in_fused_op": len(watch.big_in_op),
        "threshold": f"{MIN_ROWS} x {VOCAB} {dtype}", "peak_bytes": watch.peak,
        "summaries": [r.summary() for r in records],
    }


VARIANTS = (("no hook", False, None), ("hook, TRL's head", True, {"fused_linear_logprobs": False}),
            ("hook", True, None))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run trl", description=__doc__.splitlines()[0])
    p.add_argument("--trainers", default=",".join(TRAINERS))
    p.add_argument("--json", default=None)
    p.add_argument("--via", default="use_liger_kernel", choices=("use_liger_kernel", "torch_compile_backend"),
                   help="how the script asks for the hook: use_liger_kernel=True or torch_compile_backend='liger'")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="cuda: TRL's compact rows and liger-fx's Triton kernels (not run by the author: no GPU)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    a = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("liger_fx").setLevel(logging.INFO if a.verbose else logging.WARNING)
    logging.basicConfig(format="%(message)s")
    model = tempfile.mkdtemp(prefix="tiny_llama_")
    tiny_llama().save_pretrained(model)
    tokenizer().save_pretrained(model)
    results = []
    for kind in a.trainers.split(","):
        runs = {}
        for name, hook, flags in VARIANTS:
            r = run(kind, hook, model, flags=flags, via=a.via, device=a.device, dtype=a.dtype)
            r["variant"] = name
            runs[name] = r
            print(json.dumps(r, default=str), flush=True)
        results.append(runs)
    print()
    print("N x V made: allocations of at least an N x V in the model's dtype (N = %d rows, V = %d) in the training "
          "step outside liger-fx's fused ops (on CPU their implementation, the torch reference, makes the logits "
          "inside: %s); generation left out." % (MIN_ROWS, VOCAB, ", ".join(
              f"{r['trainer']} {r['big_in_fused_op']}" for runs in results for r in runs.values() if r["hook"] and
              r["big_in_fused_op"])))
    print()
    print("| trainer | sites fused | lm_head fused | N x V made: hook / hook with TRL's head / no hook | graph breaks: "
          "hook / with TRL's head | loss: hook / with TRL's head / no hook | grad norm: hook / with TRL's head / no "
          "hook |")
    print("|---|---|---|---|---|---|---|")
    for runs in results:
        ours, theirs, base = runs["hook"], runs["hook, TRL's head"], runs["no hook"]
        ops = ", ".join(f"{n.split('::')[1]} x{c}" for n, c in ours["fused_ops"].items())
        print(f"| {ours['trainer']} | {ours['fused']}/{ours['candidates']} | "
              f"{'yes' if ours['fused_lm_head_calls'] else 'no'} ({ops or 'no fused op ran'}) | "
              f"{ours['n_big']} / {theirs['n_big']} / {base['n_big']} | {ours['graph_breaks']} / "
              f"{theirs['graph_breaks']} | {_num(ours['losses'])} / {_num(theirs['losses'])} / "
              f"{_num(base['losses'])} | "
              f"{' / '.join(_num([r['logged'].get('grad_norm', float('nan'))]) for r in (ours, theirs, base))} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    return 0


def _num(losses):
    return ", ".join(f"{x:.7g}" for x in losses)


if __name__ == "__main__":
    sys.exit(main())
