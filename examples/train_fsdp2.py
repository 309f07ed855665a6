"""Train a random-weight Llama with FSDP2 (or DDP) under `torch.compile(backend="liger")`.

    torchrun --nproc-per-node 2 examples/train_fsdp2.py                 # CPU: gloo, tiny model, 5 steps
    torchrun --nproc-per-node 1 examples/train_fsdp2.py --device cuda --dtype bf16 --steps 30 \
        --hidden 1024 --intermediate 2816 --layers 8 --heads 16 --kv-heads 4 --vocab 32000 --batch 8 --seq 1024

Prints the loss of every step (averaged over ranks: the loss of the global batch) and, at the end, what the backend
rewrote on each rank. `--wrap ddp` and `--wrap none` run the same loop under DistributedDataParallel or on one process;
`--backend inductor` / `eager` are the baselines. `tests/test_distributed.py` runs this file and compares its losses
with single-process eager training on the same global batch.

What torch.compile does with each wrapper (checked on torch 2.13, gloo):
- FSDP2: every `fully_shard` hook runs under `torch._dynamo.disable`, so Dynamo breaks the graph at each wrapped
  module. The backend gets one graph per decoder layer, plus the rotary embedding, the final norm, and lm_head +
  loss. Inside those graphs every parameter, lm_head's included, is the all-gathered plain tensor (a full-shape
  FakeTensor placeholder, never a DTensor): the patterns see what they see without FSDP.
- DDP: Dynamo's DDPOptimizer splits the graph at gradient-bucket boundaries, which cut every SwiGLU at Llama-3.2-1B
  proportions. The plain `torch.compile(DDP(model), backend="liger")` here needs nothing more: DDPOptimizer hands
  liger's backend the whole graph, which it rewrites and then cuts at the same buckets, so every site fuses and each
  bucket's all-reduce still overlaps the backward (liger_fx/distributed.py). `liger_fx.apply(model)` does the same.
Under FSDP2 the causal mask transformers builds under compile is an output of one graph and an input of every
layer's. The graph that builds it marks it causal (proven, or compared with the triangle as it runs) and the layer
graphs run SDPA causal on a marked mask, under a Dynamo guard (liger_fx/causal_mask.py); before, SDPA ran with the
mask there (H200, Llama-3.2-1B shape, B8 T2048: 55.0k tok/s, Inductor's 55.4k). `--entry apply` trains through
`liger_fx.apply(model)`, whose forward lets transformers skip the mask for an unpadded, unpacked step (as eager
transformers does). `--entry blocks` compiles each decoder block on its own and runs the rest eagerly, where
transformers builds no mask for such a step.
`--compiled-autograd` compiles the whole step (forward and `loss.backward()`), so that compiled autograd captures the
backward; under `--wrap ddp` with DDP's `optimize_ddp="python_reducer"`.
`use_cache=False`: with a KV cache each layer's graph uses its `layer_idx`, a constant Dynamo specializes on, so every
layer compiles its own graph and past 8 layers (Dynamo's recompile limit) the rest run uncompiled.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import triton


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--model", default="llama", help="a built-in family of liger_fx.models (default llama)")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--intermediate", type=int, default=96)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=128)
    p.add_argument("--tie", action="store_true", help="tie lm_head to the embedding")
    p.add_argument("--batch", type=int, default=4, help="GLOBAL batch, split evenly over the ranks")
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when available)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                   help="bf16: FSDP2 gathers bf16 params and reduces grads in fp32; ddp/none train in bf16")
    p.add_argument("--wrap", default="fsdp2", choices=["fsdp2", "ddp", "none"])
    p.add_argument("--backend", default="liger", choices=["liger", "inductor", "eager", "liger_kernel"],
                   help="liger_kernel: liger-kernel's monkeypatch, eager (CUDA only)")
    p.add_argument("--entry", default="compile", choices=["compile", "apply", "blocks"],
                   help="compile: torch.compile(model) (DDP's wrapper included) with the backend (default); apply: "
                        "liger_fx.apply(model), which also lets SDPA skip the causal mask (see the module docstring); "
                        "blocks: each decoder block compiled on its own (block.compile(backend=...), as "
                        "PyTorch-native trainers do under FSDP2), the rest eager")
    p.add_argument("--compiled-autograd", action="store_true",
                   help="torch._dynamo.config.compiled_autograd=True (the backward is captured and compiled by the "
                        "same backend); under --wrap ddp also optimize_ddp='python_reducer', set before DDP is built")
    p.add_argument("--options", default="{}", help='liger flags as JSON, e.g. \'{"rope": false}\'')
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"])
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--bucket-cap-mb", type=float, default=25.0, help="DDP gradient bucket size (DDP's default 25)")
    p.add_argument("--no-ddp-split", action="store_true",
                   help="torch._dynamo.config.optimize_ddp=False: one graph, no overlap of the all-reduce with the "
                        "backward (see liger_fx/distributed.py)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="rank 0 writes losses, counters and records here (JSON)")
    p.add_argument("--save-params", help="rank 0 saves the full trained parameters here (torch.save)")
    return p.parse_args(argv)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(args):
    """(rank, world, device). Without torchrun, FSDP2/DDP still run, as a world of one."""
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.wrap == "none" and "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if use_cuda else "cpu")
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local = int(os.environ["LOCAL_RANK"])
    if use_cuda:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    return dist.get_rank(), dist.get_world_size(), device


def build_model(args, device):
    from liger_fx.models import mini_model

    model = mini_model(
        args.model, seed=args.seed, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        vocab_size=args.vocab, tie_word_embeddings=args.tie, max_position_embeddings=max(args.seq, 256),
    )
    if args.dtype == "bf16" and args.wrap != "fsdp2":
        model = model.to(torch.bfloat16)
    return model.to(device)


def wrap(model, args):
    if args.wrap == "fsdp2":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if args.dtype == "bf16" else MixedPrecisionPolicy()
        for layer in model.model.layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model
    if args.wrap == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, bucket_cap_mb=args.bucket_cap_mb)
    return model


def global_batch(args, step: int):
    """The step's global batch, identical on every rank (and in a single-process run): each rank takes its rows."""
    g = torch.Generator().manual_seed(args.seed * 1000 + step + 1)
    return torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)


def full_params(model) -> dict[str, torch.Tensor]:
    """Full fp32 CPU copies of the parameters; under FSDP2 a collective (every rank must call it)."""
    module = getattr(model, "module", model)
    out = {}
    for name, p in module.named_parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name] = t.detach().float().cpu().clone()
    return out


GRAPH_INPUTS: list[dict] = []
"""Per graph the backend compiled: how many tensor inputs, how many are DTensors, and lm_head's weight if an input."""


def inspecting_liger(gm, example_inputs, **kwargs):
    """The liger backend, after noting what it receives: under FSDP2 the question is whether parameters arrive
    sharded (DTensor) or all-gathered (plain, full shape)."""
    from torch.distributed.tensor import DTensor

    from liger_fx.backend import liger_backend

    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    info = {"inputs": sum(isinstance(x, torch.Tensor) for x in example_inputs),
            "dtensors": sum(isinstance(x, DTensor) for x in example_inputs)}
    for name, x in zip(names, example_inputs):
        if "lm_head" in name or ("embed_tokens" in name and x.dim() == 2):
            info[name] = f"{type(x).__name__} {tuple(x.shape)} {str(x.dtype)[6:]}"
    GRAPH_INPUTS.append(info)
    return liger_backend(gm, example_inputs, **kwargs)


def _ensure_liger_backend() -> None:
    """`backend="liger"` resolves through the package's entry point once liger-fx is installed; from a bare source
    checkout (PYTHONPATH) there is none: register the same function under the name."""
    from torch._dynamo.backends.registry import lookup_backend, register_backend

    from liger_fx.backend import liger_backend

    try:
        lookup_backend("liger")
    except Exception:
        register_backend(liger_backend, name="liger")


def train(args) -> dict:
    """Run the loop; returns (on every rank) the global losses, timings and every rank's rewrite record."""

    import liger_fx

    from torch._dynamo.utils import counters

    rank, world, device = setup(args)
    if args.backend == "liger":
        _ensure_liger_backend()
    if args.batch % world:
        raise ValueError(f"--batch {args.batch} does not split over {world} ranks")
    if args.no_ddp_split:
        torch._dynamo.config.optimize_ddp = False
    if args.compiled_autograd:
        torch._dynamo.config.compiled_autograd = True
        if args.wrap == "ddp":  # DDP reads the mode once, in its constructor
            torch._dynamo.config.optimize_ddp = "python_reducer"
    model = build_model(args, device)
    if args.backend == "liger_kernel":
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

        MODEL_TYPE_TO_APPLY_LIGER_FN[model.config.model_type](model=model)
    if args.entry == "blocks" and args.backend in ("liger", "inductor"):
        # torchtitan's order: compile each block, then shard it. nn.Module.compile keeps the parameter names.
        kwargs = {"backend": "liger", "options": json.loads(args.options)} if args.backend == "liger" else {}
        for layer in model.model.layers:
            layer.compile(**kwargs)
    model = wrap(model, args)
    # Under FSDP2 the liger backend is wrapped to note what each graph receives; elsewhere it is "liger", as users
    # write it (DDP's DDPOptimizer recognizes the liger backend by what torch.compile resolves it to).
    compile_kwargs = {"backend": inspecting_liger if args.wrap == "fsdp2" else "liger",
                      "options": json.loads(args.options)} if args.backend == "liger" else {}
    if args.entry == "blocks" or args.backend in ("eager", "liger_kernel"):
        model_fn = model
    elif args.backend == "liger" and args.entry == "apply":
        model_fn = liger_fx.apply(model, **json.loads(args.options))
    elif args.compiled_autograd:
        model_fn = model  # the whole step is compiled below: compiled autograd captures the backward it runs
    else:
        model_fn = torch.compile(model, **compile_kwargs)

    def forward_backward(ids):
        loss = model_fn(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        return loss

    step_fn = forward_backward
    if args.compiled_autograd and args.entry == "compile" and args.backend in ("liger", "inductor"):
        step_fn = torch.compile(forward_backward, **compile_kwargs)
    opt_cls = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.SGD
    opt = opt_cls(model.parameters(), lr=args.lr)

    rows = args.batch // world
    losses, times = [], []
    for step in range(args.steps):
        ids = global_batch(args, step)[rank * rows:(rank + 1) * rows].to(device)
        t0 = time.perf_counter()
        # Every rank holds the same number of label tokens (no padding), so the mean of the ranks' mean losses is
        # the global batch's mean loss, and DDP's/FSDP2's gradient average is the gradient of that loss.
        loss = step_fn(ids)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = loss.detach().float()
        if world > 1:
            dist.all_reduce(loss)  # SUM, then divide: gloo has no AVG
            loss /= world
        losses.append(loss.item())
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        if rank == 0:
            print(f"step {step}: loss {losses[-1]:.6f}  ({times[-1]:.2f} s)", flush=True)

    mine = {
        "rank": rank,
        "counters": dict(counters["liger_fx"]),
        "graph_inputs": GRAPH_INPUTS,
        "records": [
            {"summary": r.summary(), "kind": r.kind, "fallback": r.fallback, "ddp_buckets": r.ddp_buckets,
             "causal_sdpa": len(r.causal_sdpa),
             "replaced": [vars(x) for x in r.replaced], "misses": [vars(m) for m in r.misses]}
            for r in liger_fx.get_records()
        ],
    }
    ranks = [None] * world
    if world > 1:
        dist.all_gather_object(ranks, mine)
    else:
        ranks = [mine]
    params = full_params(model) if args.save_params else None
    steady = times[len(times) // 2:]  # the second half: compiles and warm-up are over
    result = {
        "versions": {"torch": torch.__version__, "triton": triton.__version__,
                     "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        "args": vars(args),
        "world": world, "device": str(device), "losses": losses, "step_s": times, "ranks": ranks,
        "tokens_per_s": args.batch * args.seq * len(steady) / max(sum(steady), 1e-9),
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
    if rank == 0:
        for r in ranks:
            print(f"rank {r['rank']}: replaced {r['counters'] or 'nothing'}")
            for i, rec in enumerate(r["records"]):
                inputs = r["graph_inputs"][i] if i < len(r["graph_inputs"]) else {}
                print("   ", rec["summary"], "| inputs:" if inputs else "", ", ".join(f"{k} {v}" for k, v in inputs.items()))
        rate = f"{result['tokens_per_s']:.0f} tokens/s over steps {len(times) - len(steady)}-{len(times) - 1}"
        peak = f", peak {result['peak_gib']:.2f} GiB" if result["peak_gib"] is not None else ""
        print(f"{args.wrap} x{world} on {device}, backend {args.backend}: {rate}{peak}", flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
        if params is not None:
            torch.save(params, args.save_params)
    if dist.is_initialized():
        dist.barrier()  # every rank is done with the collectives before any of them leaves (see __main__)
    return result


if __name__ == "__main__":
    train(parse_args())
    if dist.is_initialized():
        # Leave without tearing down the process group. Teardown can deadlock with gloo: gloo's worker thread holds a
        # finished collective whose tensors need the GIL to free, while the main thread, holding the GIL, drops the
        # last reference to the process group (DDP's reducer holds one), whose destructor joins that thread. Seen:
        # 2 of ~10 runs (gdb); with a barrier before destroy_process_group, still 1 CI run (every step done, the
        # results written, then no exit for 300 s). All this script promises is written by now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
