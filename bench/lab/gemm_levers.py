"""The training step's matmul levers, each measured alone before any is built: one layer's projections, separate against
horizontally fused (one matmul on the concatenated weights), forward + backward, on the GPU.

    python -m bench.lab.gemm_levers [--shapes llama-1b,qwen2-1.5b,llama-8b-8l] [--autotune]

Per shape (bench/e2e.py's configs, N = B*T tokens) it times, with CUDA events, the median of 20 fwd+bwd passes of
  qkv     q, k, v = x Wq^T, x Wk^T, x Wv^T                 vs  y = x cat(Wq, Wk, Wv)^T, split (grads concatenated)
  gate_up act(x Wg^T) * (x Wu^T) with liger_fx::swiglu    vs  y = x cat(Wg, Wu)^T, liger_fx::swiglu_packed(y)
  o, down the layer's other two projections (no lever; their share of the layer)
The fused forms pay the weight concatenation each pass (autograd splits its gradient back into views), as a
compiled graph would. The difference times the layer count is the step's saving to expect from fusing siblings.
--attention times causal SDPA fwd+bwd with k/v repeated to every query head (transformers' repeat_kv, which it uses
whenever it passes a mask) against `enable_gqa=True` on the unrepeated k/v, and names the kernels each ran.
--autotune also times each distinct matmul of a Llama-1B layer (forward and both backward layouts) through
torch.compile(mode="max-autotune-no-cudagraphs") against cuBLAS: what per-shape autotuning could win.
--layouts times each weight's input-gradient matmul dX = dY W (W as the linear stores it, (out, in) row-major) against
the same product with W transposed into (in, out) memory first (dY (W^T)^T: cuBLAS gets the other layout), and the
transposition itself: the profile of the step had down_proj's dX at 666 TFLOP/s where the forward's matmul of the
same size ran at 763.
"""

from __future__ import annotations

import argparse
import re
import statistics

import torch
import torch.nn.functional as F

from bench import e2e


def _time(fn, iters: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    ms = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ms.append(a.elapsed_time(b))
    return statistics.median(ms)


def _p(*shape, grad=True):
    return (torch.randn(*shape, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_(grad)


def layer_rows(name: str) -> list[tuple]:
    import liger_fx  # noqa: F401  (registers liger_fx::swiglu / swiglu_packed)

    cfg = e2e.SHAPES[name].config
    shape = e2e.SHAPES[name]
    N, H, I = shape.batch * shape.seq, cfg["hidden_size"], cfg["intermediate_size"]
    hd = cfg.get("head_dim") or H // cfg["num_attention_heads"]
    nq, nkv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    x = _p(N, H)
    Wq, Wk, Wv, Wo = _p(nq, H), _p(nkv, H), _p(nkv, H), _p(H, nq)
    Wg, Wu, Wd = _p(I, H), _p(I, H), _p(H, I)
    gq, gk, gv, gy = (torch.randn(N, n, device="cuda", dtype=torch.bfloat16) for n in (nq, nkv, nkv, I))
    go, a = torch.randn(N, H, device="cuda", dtype=torch.bfloat16), _p(N, nq)
    h = _p(N, I)
    params = (x, Wq, Wk, Wv, Wo, Wg, Wu, Wd, a, h)

    def run(f, grads):
        def once():
            torch.autograd.backward(f(), grads)
            for t in params:
                t.grad = None
        return once

    swiglu, packed = torch.ops.liger_fx.swiglu, torch.ops.liger_fx.swiglu_packed
    cases = [
        ("qkv", "separate", run(lambda: (F.linear(x, Wq), F.linear(x, Wk), F.linear(x, Wv)), (gq, gk, gv))),
        ("qkv", "fused", run(lambda: F.linear(x, torch.cat([Wq, Wk, Wv])).split([nq, nkv, nkv], -1), (gq, gk, gv))),
        ("gate_up", "separate", run(lambda: (swiglu(F.linear(x, Wg), F.linear(x, Wu), "silu"),), (gy,))),
        ("gate_up", "fused", run(lambda: (packed(F.linear(x, torch.cat([Wg, Wu])), "silu"),), (gy,))),
        ("o", "-", run(lambda: (F.linear(a, Wo),), (go,))),
        ("down", "-", run(lambda: (F.linear(h, Wd),), (go,))),
    ]
    flop = {"qkv": 6 * N * H * (nq + 2 * nkv), "gate_up": 12 * N * H * I, "o": 6 * N * H * nq, "down": 6 * N * H * I}
    rows = []
    for block, form, fn in cases:
        ms = _time(fn)
        rows.append((name, block, form, ms, flop[block] / ms / 1e9))
    return rows


def autotune_rows() -> list[tuple]:
    """Each distinct matmul of a Llama-1B layer at B8 T2048, in the three layouts a linear's fwd/bwd uses."""
    N, H, I, nkv = 16384, 2048, 8192, 512
    rows = []
    for out_f, in_f in ((H, H), (nkv, H), (I, H), (H, I)):
        x, w, dy = (torch.randn(*s, device="cuda", dtype=torch.bfloat16) for s in ((N, in_f), (out_f, in_f), (N, out_f)))
        for label, f, args in (
            ("fwd  y = x w^T", lambda x, w: x @ w.t(), (x, w)),
            ("dx   = dy w", lambda dy, w: dy @ w, (dy, w)),
            ("dw   = dy^T x", lambda dy, x: dy.t() @ x, (dy, x)),
        ):
            flop = 2 * N * out_f * in_f
            eager = _time(lambda: f(*args), iters=30)
            torch._dynamo.reset()
            tuned = torch.compile(f, mode="max-autotune-no-cudagraphs", dynamic=False)
            tuned(*args)
            auto = _time(lambda: tuned(*args), iters=30)
            rows.append((f"{out_f}x{in_f}", label, eager, auto, flop / eager / 1e9, flop / auto / 1e9))
    return rows


def layout_rows(name: str) -> list[tuple]:
    """(weight, (out, in), NN ms, pre-transposed ms, transpose ms) for each distinct weight of a layer."""
    cfg, shape = e2e.SHAPES[name].config, e2e.SHAPES[name]
    N, H, I = shape.batch * shape.seq, cfg["hidden_size"], cfg["intermediate_size"]
    hd = cfg.get("head_dim") or H // cfg["num_attention_heads"]
    nq, nkv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    rows = []
    for label, out_f, in_f in (("qkv (fused)", nq + 2 * nkv, H), ("o", H, nq), ("gate or up", I, H), ("down", H, I)):
        w = torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16)
        dy = torch.randn(N, out_f, device="cuda", dtype=torch.bfloat16)
        wt = w.t().contiguous()
        nn_ms = _time(lambda: dy @ w, iters=30)
        tn_ms = _time(lambda: dy @ wt.t(), iters=30)
        copy_ms = _time(lambda: w.t().contiguous(), iters=30)
        rows.append((label, (out_f, in_f), nn_ms, tn_ms, copy_ms, 2 * N * out_f * in_f))
    return rows


def attention_rows(name: str) -> list[tuple]:
    cfg, shape = e2e.SHAPES[name].config, e2e.SHAPES[name]
    B, T, nh, nkv = shape.batch, shape.seq, cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or cfg["hidden_size"] // nh
    leaves = _p(B, T, nh, d), _p(B, T, nkv, d), _p(B, T, nkv, d)
    q, k, v = (t.transpose(1, 2) for t in leaves)  # HF's layout: (B, H, T, d) views of (B, T, H, d) memory
    dout = torch.randn(B, nh, T, d, device="cuda", dtype=torch.bfloat16)

    def repeat(t):
        return t[:, :, None].expand(B, nkv, nh // nkv, T, d).reshape(B, nh, T, d)

    def repeated():
        return F.scaled_dot_product_attention(q, repeat(k), repeat(v), is_causal=True)

    def grouped():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    rows = []
    for label, f in (("repeat_kv", repeated), ("enable_gqa", grouped)):
        def once():
            f().backward(dout)
            for t in leaves:
                t.grad = None
        ms = _time(once)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            once()
            torch.cuda.synchronize()
        names = sorted({e.key[:48] for e in prof.key_averages() if re.search("attn|attention|sdpa|flash|fmha", e.key, re.I)})
        rows.append((name, label, ms, names))
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="llama-1b,qwen2-1.5b,llama-8b-8l")
    p.add_argument("--autotune", action="store_true")
    p.add_argument("--attention", action="store_true")
    p.add_argument("--no-layers", action="store_true", help="skip the projection rows")
    p.add_argument("--layouts", action="store_true")
    args = p.parse_args(argv)
    print(f"== gemm_levers on {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for name in args.shapes.split(",") if args.layouts else ():
        layers = e2e.SHAPES[name].config["num_hidden_layers"]
        print(f"== {name}: dX = dY W, W (out, in) as stored vs transposed to (in, out) first; ms (TFLOP/s), x {layers}")
        for label, (o, i), nn_ms, tn_ms, copy_ms, flop in layout_rows(name):
            n = 2 if label == "gate or up" else 1
            gain = n * layers * (nn_ms - tn_ms - copy_ms)
            print(f"  {label:12s} W {o:5d}x{i:5d}  as stored {nn_ms:6.3f} ({flop / nn_ms / 1e9:4.0f})  transposed "
                  f"{tn_ms:6.3f} ({flop / tn_ms / 1e9:4.0f})  + transpose {copy_ms:5.3f}  -> {gain:+6.2f} ms a step")
    for name in args.shapes.split(",") if args.attention else ():
        for _, label, ms, names in attention_rows(name):
            print(f"== {name} causal SDPA fwd+bwd, {label:10s}: {ms:7.3f} ms  kernels: {'; '.join(names)}")
    for name in args.shapes.split(",") if not args.no_layers else ():
        rows = layer_rows(name)
        layers = e2e.SHAPES[name].config["num_hidden_layers"]
        print(f"== {name}: one layer's projections, fwd+bwd, median of 20 (x {layers} layers per step)")
        print("  block    form        ms    TFLOP/s")
        for _, block, form, ms, tf in rows:
            print(f"  {block:8s} {form:9s} {ms:7.3f}  {tf:6.0f}")
        by = {(b, f): ms for _, b, f, ms, _ in rows}
        for block in ("qkv", "gate_up"):
            d = by[(block, "separate")] - by[(block, "fused")]
            print(f"  {block}: fused saves {d:.3f} ms a layer, {d * layers:.2f} ms a step")
    if args.autotune:
        print("== Llama-1B layer matmuls: cuBLAS vs torch.compile max-autotune (ms, TFLOP/s)")
        for w, label, eager, auto, tfe, tfa in autotune_rows():
            print(f"  W {w:10s} {label:16s} cuBLAS {eager:6.3f} ({tfe:4.0f})  autotune {auto:6.3f} ({tfa:4.0f})")


if __name__ == "__main__":
    main()
