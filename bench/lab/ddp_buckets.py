"""Where DDP's gradient buckets cut a Llama-3.2-1B-shaped training graph, with and without rewriting first (CPU).

    python -m bench.lab.ddp_buckets                  # the real shape: bf16, 16 layers, DDP's 25 MiB buckets (~2 min, 6 GiB)
    python -m bench.lab.ddp_buckets --scale 16       # widths / 16, bucket / 256 (x2 in fp32): tests/test_distributed.py's

Compiles one training forward (`model(input_ids, labels=..., use_cache=False)`, logits returned as with a plain
`torch.compile`; `--loss-only` returns the loss alone, as `liger_fx.apply` does) with a backend that splits as each
pipeline would, rewrites, and runs the pieces uncompiled (no Inductor: the cut and the rewrites are the question):
- "dynamo": Dynamo's DDPOptimizer cuts Dynamo's graph, the backend rewrites each bucket on its own (what
  `torch.compile(DDP(model), backend="liger")` does with default settings);
- "liger": the backend rewrites the whole graph, then the same DDPOptimizer cuts the rewritten one
  (`liger_fx.distributed.split_after_rewrite`).
Prints, per pipeline, the buckets (how many parameters each) and replaced/candidates per pattern, then whether both
put the same parameters in the same buckets.
"""

from __future__ import annotations

import argparse
import collections
import os

import torch

LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True)
DDP_BUCKET = 25 * 2**20  # DDP's default bucket_cap_mb=25


def scaled(scale: int, dtype: torch.dtype, layers: int | None = None) -> tuple[dict, int]:
    """Llama-3.2-1B's config with every width divided by `scale` (head_dim kept at 64) and DDP's bucket divided by
    scale**2, doubled in fp32, so each weight matrix fills the same fraction of a bucket as in bf16 at full size."""
    cfg = {k: v // scale if k in ("vocab_size", "hidden_size", "intermediate_size") else v for k, v in LLAMA_1B.items()}
    cfg["num_attention_heads"] = cfg["hidden_size"] // 64
    cfg["num_key_value_heads"] = max(cfg["num_attention_heads"] // 4, 1)
    if layers is not None:
        cfg["num_hidden_layers"] = layers
    cap = DDP_BUCKET // scale**2 * (2 if dtype == torch.float32 else 1)
    return cfg, cap


def compare(cfg: dict, cap: int, dtype: torch.dtype, loss_only: bool = False, seq: int = 16) -> dict:
    """{"dynamo": result, "liger": result}, each {"buckets": [tuple of parameter names], "replaced": Counter,
    "candidates": Counter, "misses": [Miss]}; parameter names are Dynamo's placeholder names in both."""
    from torch._dynamo.backends.distributed import DDPOptimizer

    from liger_fx import distributed
    from liger_fx.backend import rewrite_graph
    from liger_fx.config import LigerConfig
    from liger_fx.models import mini_model
    from liger_fx.rewrite import GraphRecord

    model = mini_model("llama", seed=0, max_position_embeddings=max(seq, 256), **cfg).to(dtype)
    ids = torch.randint(0, cfg["vocab_size"], (2, seq), generator=torch.Generator().manual_seed(0))
    first = min(torch.distributed._DEFAULT_FIRST_BUCKET_BYTES, cap)  # as distributed.compile_in_buckets
    out = {}

    def run(pipeline):
        records = []

        def rewrite_piece(gm, inputs):
            records.append(GraphRecord(len(records)))
            traced = rewrite_graph(gm, inputs, LigerConfig(), records[-1])
            distributed.note_bucket_cuts(gm, traced, records[-1])
            return gm.forward

        def backend(gm, inputs):
            names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
            if pipeline == "dynamo":
                optimizer = DDPOptimizer(bucket_bytes_cap=cap, backend_compile_fn=rewrite_piece, first_bucket_cap=first)
                fn = optimizer.compile_fn(gm, inputs)
                rename = {}
            else:
                records.append(GraphRecord(0))
                traced = rewrite_graph(gm, inputs, distributed.ddp_config(LigerConfig()), records[-1])
                distributed.carry_dynamo_meta(gm, traced)
                optimizer = DDPOptimizer(bucket_bytes_cap=cap, backend_compile_fn=lambda g, x: g.forward,
                                         first_bucket_cap=first)
                fn = optimizer.compile_fn(traced, inputs)
                rename = dict(zip([n.target for n in traced.graph.nodes if n.op == "placeholder"], names))
            out[pipeline] = {"buckets": [tuple(rename.get(p, p) for p in b.params) for b in optimizer.buckets]}
            return fn

        torch._dynamo.reset()
        compiled = torch.compile(model, backend=backend, fullgraph=True)
        assert compiled(input_ids=ids, labels=ids, use_cache=False).loss is not None
        torch._dynamo.reset()
        out[pipeline]["replaced"] = collections.Counter(r.flag for rec in records for r in rec.replaced)
        out[pipeline]["misses"] = [m for rec in records for m in rec.misses]
        out[pipeline]["candidates"] = out[pipeline]["replaced"] + collections.Counter(
            m.flag for m in out[pipeline]["misses"])

    if loss_only:  # the graph liger_fx.apply compiles in a training step: the loss, no logits output
        inner = model.forward

        def loss_only_forward(*args, **kwargs):
            result = inner(*args, **kwargs)
            return type(result)(loss=result.loss)

        model.forward = loss_only_forward
    for pipeline in ("dynamo", "liger"):
        run(pipeline)
    return out


def layout(buckets: list[tuple]) -> list[tuple]:
    """Buckets with consecutive repeats collapsed: DDPOptimizer counts a parameter at each use, so a tied weight used
    by two nodes can open a bucket that holds nothing new (see liger_fx/distributed.py)."""
    return [b for i, b in enumerate(buckets) if i == 0 or b != buckets[i - 1]]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=int, default=1, help="divide every width by this (bucket by its square)")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp32"], help="default: bf16 at scale 1, else fp32")
    p.add_argument("--layers", type=int, default=None, help="default 16 (Llama-3.2-1B's)")
    p.add_argument("--loss-only", action="store_true", help="return the loss alone (liger_fx.apply's graph)")
    args = p.parse_args(argv)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if args.scale == 1 else "fp32")]
    cfg, cap = scaled(args.scale, dtype, args.layers)
    print(f"llama {cfg} {str(dtype)[6:]}, bucket cap {cap} B ({cap / 2**20:.3f} MiB)")
    out = compare(cfg, cap, dtype, args.loss_only)
    for name, r in out.items():
        print(f"{name}: {len(r['buckets'])} buckets, parameters per bucket {[len(b) for b in r['buckets']]}")
        print("    " + ", ".join(f"{f} {r['replaced'][f]}/{r['candidates'][f]}" for f in sorted(r["candidates"])))
        for m in r["misses"][:3]:
            print(f"    near miss {m.flag} at {m.where}: {m.reason[:100]}...")
    same = layout(out["dynamo"]["buckets"]) == layout(out["liger"]["buckets"])
    print("same parameters in the same buckets (consecutive repeats collapsed):", same)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
