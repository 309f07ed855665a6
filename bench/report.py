"""Turn a results dict (bench.run's JSON) into markdown tables, ratios, a bar plot, and bench/RESULTS.md updates.

    python -m bench.report results.json                                   # print the tables
    python -m bench.report results.json --update bench/RESULTS.md --plot bench/e2e.png
    python -m bench.report results.json --brief                           # the few lines bench/gpu.sh prints last
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys

from bench.common import EXTRA_PEAK_DEFINITION

# Measured on an H200 when the targets were set (torch 2.11, transformers 5.17, liger-kernel 0.8.5): shown beside
# ours.
KERNEL_ANCHORS = {  # key -> provider -> (ms, extra GiB or None)
    "rms_norm": {"torch": (2.70, None), "inductor": (0.687, None), "liger_kernel": (0.546, None)},
    "rope": {"torch": (2.04, None), "inductor": (0.605, None), "liger_kernel": (0.852, None)},
    "swiglu": {"torch": (1.535, None), "inductor": (0.871, 1.56), "liger_kernel": (0.888, 0.69)},
    "flce": {"torch": (97.9, 23.8), "inductor": (80.3, 5.27), "liger_kernel": (89.3, 1.48)},
}
KERNEL_TARGETS = {"rms_norm": "<= 0.25 ms", "rope": "<= 0.30 ms", "swiglu": "<= 0.90 ms, extra < Inductor's",
                  "flce": "<= 75 ms, <= 1.0 GiB extra"}
E2E_ANCHORS = {  # shape -> variant -> (tok/s text, peak GiB)
    "llama-1b": {"hf_eager": ("51.5k", 61.15), "hf_liger_kernel": ("67.1-67.8k", 26.34),
                 "inductor": ("59.9k", 39.29), "inductor_on_liger_kernel": ("illegal memory access", None)},
}

E2E_DEFINITIONS = (
    "tok/s = B*T*timed steps / wall time of the timed steps (CUDA-synchronized); step ms = median of per-step CUDA "
    "event times; peak GiB = torch.cuda.max_memory_allocated over the timed steps (stats reset after warm-up; the "
    "model, grads and AdamW state are included); warm-up s = wall time of the warm-up steps (compilation included, from empty Inductor and Triton caches of the variant's own since 2026-11-30); "
    "losses: same seed, same weights, same batches in every variant."
)


def _f(x, spec=".3f", none="-"):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return none if x is None else "nan"
    return format(x, spec)


def _table(header, rows) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def env_line(env: dict) -> str:
    if not env:
        return ""
    return (f"{env.get('date')} · {env.get('gpu')} · torch {env.get('torch')} · triton {env.get('triton')} · "
            f"transformers {env.get('transformers')} · liger-kernel {env.get('liger_kernel') or 'absent'} · "
            f"commit {env.get('commit')}")


def kernel_table(results: dict) -> str:
    rows = []
    names_per_key: dict = {}
    for r in results.get("kernels", []):
        names_per_key.setdefault(r.get("key"), set()).add(r.get("name"))
    for r in results.get("kernels", []):
        # The anchors belong to one shape per key: the bench named like its key, or a module's only bench.
        own = r.get("name") == r.get("key") or len(names_per_key[r.get("key")]) == 1
        anchor = KERNEL_ANCHORS.get(r.get("key"), {}).get(r.get("provider")) if own else None
        if r.get("gbs") is not None:
            rate = f"{r['gbs']:.0f} GB/s"
        elif r.get("tflops") is not None:
            rate = f"{r['tflops']:.0f} TFLOP/s"
        else:
            rate = "-"
        spread = (f"{_f(r.get('median_ms'))} ({_f(r.get('p20_ms'))}-{_f(r.get('p80_ms'))})"
                  if r.get("median_ms") is not None else "-")
        rows.append([
            r.get("name") or r.get("key"), r.get("shape", "-"), r.get("provider"), spread, rate,
            _f(r.get("pct_of_ceiling"), ".0f") + ("%" if r.get("pct_of_ceiling") is not None else ""),
            _f(r.get("floor_ms")), _f(r.get("extra_gib"), ".2f"), _f(r.get("net_gib"), ".2f"),
            _f(r.get("rel_err"), ".1e"),
            (f"{anchor[0]}" + (f" / {anchor[1]} GiB" if anchor[1] is not None else "")) if anchor else "-",
            r.get("status", "-"),
        ])
    if not rows:
        return "(no kernel benchmarks run)"
    header = ["kernel", "shape", "provider", "median ms (p20-p80)", "rate", "% ceiling", "floor ms", "extra GiB",
              "net GiB", "err vs torch", "anchor ms / GiB", "status"]
    c = results.get("ceilings", {})
    notes = [
        f"Ceilings measured in this run: copy {_f(c.get('copy_gbs'), '.0f')} GB/s (read+write), bf16 matmul "
        f"{_f(c.get('matmul_tflops'), '.0f')} TFLOP/s. floor ms = bytes/copy rate (GB/s rows) or FLOPs/matmul rate "
        "(TFLOP/s rows); % ceiling = floor / median.",
        "Targets (set for each op before its kernel was written): "
        + "; ".join(f"{k} {v}" for k, v in KERNEL_TARGETS.items()) + ".",
        EXTRA_PEAK_DEFINITION,
        "err vs torch = max over (output, input grads) of ||provider - torch eager|| / ||torch eager||, all bf16.",
    ]
    return _table(header, rows) + "\n\n" + "\n".join(f"- {n}" for n in notes)


def _ratio(a, b):
    return a / b if a and b else None


def e2e_ratios(results: dict) -> list[str]:
    lines = []
    by_shape: dict[str, dict] = {}
    for r in results.get("e2e", []):
        by_shape.setdefault(r["shape"], {})[r["variant"]] = r
    for shape, vs in by_shape.items():
        reference = any(v in vs for v in ("eager", "liger_fx_nolazy", "liger_fx_blocks", "liger_fx_inloss"))
        # The reference decoder (shapes ref-*): ours against Inductor on the same loop, and the loss-outside loop
        # with against without the fused path (lazy logits against plain ones).
        pairs = ((("liger_fx", ("inductor", "liger_fx_nolazy")), ("liger_fx_nolazy", ("inductor",)),
                  ("liger_fx_blocks", ("inductor_blocks",)), ("liger_fx_inloss", ("inductor_inloss", "inductor"))))\
            if reference else (("liger_fx", ("hf_liger_kernel", "inductor")), ("hf_hook", ("hf_liger_kernel",
                                                                                           "inductor")))
        for ours, bases in pairs:
            o = vs.get(ours)
            if not o or o.get("status") != "ok":
                continue
            for base in bases:
                b = vs.get(base)
                if not b or b.get("status") != "ok":
                    lines.append(f"{shape}: {ours}/{base}: n/a ({base} {b.get('status') if b else 'not run'})")
                    continue
                lines.append(f"{shape}: {ours}/{base}: tok/s x{_f(_ratio(o['tok_s'], b['tok_s']), '.3f')}, "
                             f"peak x{_f(_ratio(o['peak_gib'], b['peak_gib']), '.3f')}")
    return lines


def loss_agreement(results: dict) -> list[str]:
    """One line per shape: do all variants that ran have the losses of hf_eager within the run's tolerance?"""
    atol = results.get("loss_atol", 0.02)
    lines = []
    shapes = dict.fromkeys(r["shape"] for r in results.get("e2e", []))
    for shape in shapes:
        rows = [r for r in results["e2e"] if r["shape"] == shape and r.get("status") == "ok"]
        ref = next((r for r in rows if r["variant"] in ("hf_eager", "eager")), None)
        if ref is None:
            lines.append(f"{shape}: losses NOT CHECKED (hf_eager / eager did not run)")
            continue
        bad = [r for r in rows if r is not ref and not (r.get("max_loss_diff") is not None and
                                                         r["max_loss_diff"] <= atol)]
        diffs = ", ".join(f"{r['variant']} {_f(r.get('max_loss_diff'), '.4f')}" for r in rows if r is not ref)
        verdict = "agree" if not bad else "DISAGREE (" + ", ".join(r["variant"] for r in bad) + ")"
        lines.append(f"{shape}: losses {verdict}: max |loss - {ref['variant']} loss| over all steps, tolerance {atol}: "
                     f"{diffs or 'no other variant ran'}")
    return lines


def e2e_table(results: dict) -> str:
    rows = []
    for r in results.get("e2e", []):
        anchor = E2E_ANCHORS.get(r["shape"], {}).get(r["variant"])
        rows.append([
            r["shape"], r["variant"], r.get("status", "-"), _f(r.get("tok_s"), ",.0f"), _f(r.get("step_ms"), ".1f"),
            _f(r.get("peak_gib"), ".2f"), _f(r.get("warmup_s"), ".1f"), _f(r.get("first_loss"), ".4f"),
            _f(r.get("final_loss"), ".4f"), _f(r.get("max_loss_diff"), ".4f"),
            (f"{anchor[0]}" + (f" / {anchor[1]} GiB" if anchor[1] is not None else "")) if anchor else "-",
        ])
    if not rows:
        return "(no end-to-end runs)"
    header = ["shape", "variant", "status", "tok/s", "step ms", "peak GiB", "warm-up s", "loss[0]", "final loss",
              "max dloss vs eager", "anchor tok/s / peak"]
    extra = [f"- {line}" for line in e2e_ratios(results) + loss_agreement(results)]
    for r in results.get("e2e", []):
        if r.get("status") not in ("ok", None) and r.get("error"):
            extra.append(f"- {r['shape']}/{r['variant']}: {r['status']}: {r['error']}")
        if r.get("replaced"):
            extra.append(f"- {r['shape']}/{r['variant']} rewrites: " +
                         ", ".join(f"{k}={v}" for k, v in sorted(r["replaced"].items())) +
                         f"; graph breaks {r.get('graph_breaks', '-')}")
    setup = results.get("e2e_setup")
    if setup:
        extra.append(f"- setup: {setup}")
    extra.append(f"- {E2E_DEFINITIONS}")
    return _table(header, rows) + "\n\n" + "\n".join(extra)


def distill_ratios(results: dict) -> list[str]:
    """liger_fx against inductor and liger-kernel's fused linear JSD, per distillation shape."""
    lines = []
    by_shape: dict[str, dict] = {}
    for r in results.get("distill", []):
        by_shape.setdefault(r["shape"], {})[r["variant"]] = r
    for shape, vs in by_shape.items():
        o = vs.get("liger_fx")
        if not o or o.get("status") != "ok":
            continue
        for base in ("inductor", "liger_kernel", "inductor_liger_jsd"):
            b = vs.get(base)
            if not b or b.get("status") != "ok":
                lines.append(f"distill {shape}: liger_fx/{base}: n/a ({b.get('status') if b else 'not run'})")
                continue
            lines.append(f"distill {shape}: liger_fx/{base}: tok/s x{_f(_ratio(o['tok_s'], b['tok_s']), '.3f')}, "
                         f"peak x{_f(_ratio(o['peak_gib'], b['peak_gib']), '.3f')}")
    return lines


def distill_loss_agreement(results: dict) -> list[str]:
    rtol = results.get("loss_rtol", 0.01)
    lines = []
    for shape in dict.fromkeys(r["shape"] for r in results.get("distill", [])):
        rows = [r for r in results["distill"] if r["shape"] == shape and r.get("status") == "ok"]
        compared = [r for r in rows if r.get("loss_ref")]
        if not compared:
            lines.append(f"distill {shape}: losses NOT CHECKED (no reference variant, eager or inductor, ran)")
            continue
        ref = compared[0]["loss_ref"]
        bad = [r for r in compared if not r["max_loss_rel_diff"] <= rtol]
        verdict = "agree" if not bad else "DISAGREE (" + ", ".join(r["variant"] for r in bad) + ")"
        diffs = ", ".join(f"{r['variant']} {_f(r['max_loss_rel_diff'], '.1e')}" for r in compared)
        lines.append(f"distill {shape}: losses {verdict}: max |loss - {ref} loss| / |{ref} loss| over all steps, "
                     f"tolerance {rtol}: {diffs}")
    return lines


def distill_table(results: dict) -> str:
    rows = []
    for r in results.get("distill", []):
        rows.append([r["shape"], r["variant"], r.get("status", "-"), _f(r.get("tok_s"), ",.0f"),
                     _f(r.get("step_ms"), ".1f"), _f(r.get("peak_gib"), ".2f"), _f(r.get("warmup_s"), ".1f"),
                     _f(r.get("first_loss"), ".5f"), _f(r.get("final_loss"), ".5f"),
                     _f(r.get("max_loss_rel_diff"), ".1e")])
    if not rows:
        return "(no distillation runs)"
    header = ["shape", "variant", "status", "tok/s", "step ms", "peak GiB", "warm-up s", "loss[0]", "final loss",
              "max rel dloss vs ref"]
    extra = [f"- {line}" for line in distill_ratios(results) + distill_loss_agreement(results)]
    for r in results.get("distill", []):
        if r.get("status") not in ("ok", None) and r.get("error"):
            extra.append(f"- {r['shape']}/{r['variant']}: {r['status']}: {r['error']}")
        if r.get("replaced"):
            extra.append(f"- {r['shape']}/{r['variant']} rewrites: " +
                         ", ".join(f"{k}={v}" for k, v in sorted(r["replaced"].items())) +
                         f"; graph breaks {r.get('graph_breaks', '-')}")
    if results.get("distill_setup"):
        extra.append(f"- setup: {results['distill_setup']}")
    extra.append("- tok/s counts the student's tokens (B*T per step); peak GiB = max_memory_allocated over the timed "
                 "steps (both models, the student's grads and AdamW state included); the loss is the generalized JSD "
                 "(beta 0.5) over completion tokens, reference: eager if it ran, else inductor.")
    return _table(header, rows) + "\n\n" + "\n".join(extra)


def render_markdown(results: dict) -> str:
    parts = [f"Run: {env_line(results.get('env', {}))}" + (" · SMOKE (CPU, tiny shapes)" if results.get("smoke")
                                                              else "")]
    if results.get("kernels"):
        parts += ["### Kernels (forward+backward)", kernel_table(results)]
    if results.get("e2e"):
        parts += ["### End-to-end training step", e2e_table(results)]
    if results.get("distill"):
        parts += ["### Distillation training step", distill_table(results)]
    if results.get("notes"):
        parts += ["Notes:\n" + "\n".join(f"- {n}" for n in results["notes"])]
    return "\n\n".join(parts) + "\n"


def short_summary(results: dict) -> str:
    """The few lines printed last on the device (the tool returns only the output's tail)."""
    lines = ["== summary: " + env_line(results.get("env", {}))]
    for r in results.get("kernels", []):
        name, key = r.get("name") or "", r.get("key") or ""
        label = name if name != key and name.startswith(key) else key  # swiglu_packed, but flce for its long name
        lines.append(f"kernel {label:13s} {r.get('provider'):16s} "
                     f"{_f(r.get('median_ms'), '9.3f', '        -')} ms  extra {_f(r.get('extra_gib'), '.2f')} GiB"
                     f"  err {_f(r.get('rel_err'), '.1e')}  {r.get('status')}")
    for r in results.get("e2e", []):
        lines.append(f"e2e {r['shape']:11s} {r['variant']:25s} {_f(r.get('tok_s'), '8,.0f', '       -')} tok/s  "
                     f"peak {_f(r.get('peak_gib'), '6.2f')} GiB  warm-up {_f(r.get('warmup_s'), '.0f')} s  "
                     f"loss {_f(r.get('final_loss'), '.4f')}  {r.get('status')}")
    for r in results.get("distill", []):
        lines.append(f"distill {r['shape']:15s} {r['variant']:19s} {_f(r.get('tok_s'), '8,.0f', '       -')} tok/s  "
                     f"peak {_f(r.get('peak_gib'), '6.2f')} GiB  warm-up {_f(r.get('warmup_s'), '.0f')} s  "
                     f"loss {_f(r.get('final_loss'), '.5f')}  {r.get('status')}")
    lines += e2e_ratios(results) + loss_agreement(results) + distill_ratios(results) + distill_loss_agreement(results)
    return "\n".join(lines)


def brief(results: dict) -> str:
    """short_summary, the post-training rows, and what the backend rewrote in each row: what bench/gpu.sh prints of
    each job last."""
    lines = [short_summary(results)]
    for r in results.get("post_training", []):
        loss = (r.get("losses") or [None])[-1]
        lines.append(f"post {r['workload']:17s} {r['variant']:15s} {_f(r.get('tok_s'), '8,.0f', '       -')} tok/s  "
                     f"peak {_f(r.get('peak_gib'), '6.2f')} GiB  x inductor tok/s {_f(r.get('tok_s_vs_inductor'))} "
                     f"peak {_f(r.get('peak_vs_inductor'))}  loss {_f(loss, '.5f')}  {r.get('status')}")
    for kind, ident in (("e2e", "shape"), ("post_training", "workload"), ("distill", "shape")):
        for r in results.get(kind, []):
            rewrites = {k: v for k, v in sorted((r.get("replaced") or {}).items()) if v}
            if rewrites:
                lines.append(f"  rewrites {r.get(ident)}/{r['variant']}: "
                             + ", ".join(f"{k} {v}" for k, v in rewrites.items()))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# Plot and RESULTS.md


def plot_e2e(results: dict, path: str) -> str | None:
    """Bar plot of tok/s and peak GiB per variant, one column per shape. Returns None, or why no plot was made."""
    # Variants that ran and failed keep their place, labelled, so a crash is as visible as a number.
    rows = [r for r in results.get("e2e", [])
            if r.get("status") == "ok" or str(r.get("status", "")).startswith(("crashed", "error", "timeout"))]
    if not any(r.get("status") == "ok" for r in rows):
        return "no successful end-to-end run to plot"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # bench-only extra: `pip install liger-fx[bench]`
        return f"matplotlib not available ({e})"
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(2, len(shapes), figsize=(max(7.0, 5.5 * len(shapes)), 7.5), squeeze=False)
    for j, shape in enumerate(shapes):
        rs = [r for r in rows if r["shape"] == shape]
        names = [r["variant"].replace("_", "\n", 1) for r in rs]
        for i, (key, label, spec) in enumerate([("tok_s", "tokens/s", ",.0f"), ("peak_gib", "peak GiB", ".1f")]):
            ax = axes[i][j]
            vals = [r.get(key) or 0 for r in rs]
            bars = ax.bar(range(len(rs)), vals, color=["#c44" if "liger_fx" in r["variant"] or r["variant"] ==
                                                       "hf_hook" else "#888" for r in rs])
            ax.set_xticks(range(len(rs)), names, fontsize=7)
            ax.set_ylabel(label)
            ax.set_title(f"{shape}: {label}", fontsize=9)
            for b, v, r in zip(bars, vals, rs):
                text = format(v, spec) if r.get("status") == "ok" else r["status"].split(" ")[0]
                ax.annotate(text, (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=7)
    fig.suptitle(env_line(results.get("env", {})).replace(" · transformers", "\ntransformers"), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def history_rows(results: dict) -> list[str]:
    env = results.get("env", {})
    out = []
    by_shape: dict[str, dict] = {}
    for r in results.get("e2e", []):
        by_shape.setdefault(r["shape"], {})[r["variant"]] = r

    def cell(r):
        if not r:
            return "-"
        if r.get("status") != "ok":
            return r.get("status", "-")
        return f"{r['tok_s'] / 1e3:.1f}k / {r['peak_gib']:.2f}"

    variants = ("hf_eager", "hf_liger_kernel", "inductor", "liger_fx", "hf_hook")
    for shape, vs in by_shape.items():
        # A merged result mixes runs: stamp the row with its own cells' runs (dates and commits), not the first run's.
        stamps = [vs[v]["env"] for v in variants if vs.get(v) and vs[v].get("env")] or [env]
        dates = sorted({e.get("date", "-") for e in stamps})
        commits = list(dict.fromkeys(str(e.get("commit")) for e in stamps))
        e = stamps[-1]
        out.append("| " + " | ".join([
            dates[0] if len(dates) == 1 else f"{dates[0]} - {dates[-1][-9:]}", e.get("gpu", "-"),
            f"{e.get('torch')} / {e.get('triton')} / {e.get('transformers')} / {e.get('liger_kernel') or '-'}",
            ", ".join(commits), shape, *(cell(vs.get(v)) for v in variants),
        ]) + " |")
    return out


def update_results_md(results: dict, path: str) -> None:
    """Replace the block between the `latest` markers and append this run's headline rows to the history table."""
    text = open(path).read()
    latest = render_markdown(results)
    text = re.sub(r"(<!-- latest:begin -->\n).*?(<!-- latest:end -->)", lambda m: m.group(1) + latest + m.group(2),
                  text, flags=re.S)
    if not results.get("smoke"):
        rows = "\n".join(history_rows(results))
        if rows:
            text = text.replace("<!-- history:end -->", rows + "\n<!-- history:end -->")
    with open(path, "w") as f:
        f.write(text)


def merge(runs: list[dict]) -> dict:
    """Several runs (e.g. two device calls) as one: a later row replaces an earlier one of the same kernel/provider or
    shape/variant unless the later one was only skipped for time. Each row keeps its own env stamp."""
    from bench.e2e import add_loss_diffs

    out = dict(runs[0])
    out["env"] = runs[-1].get("env", out.get("env"))  # the header names the latest run; notes list them all
    for kind, ident in (("kernels", ("key", "name", "provider")), ("e2e", ("shape", "variant"))):
        rows: dict = {}
        for run in runs:
            for r in run.get(kind, []):
                k = tuple(r.get(f) for f in ident)
                if k in rows and str(r.get("status", "")).startswith("skipped"):
                    continue
                rows[k] = r
        out[kind] = list(rows.values())
    out["ceilings"] = next((r["ceilings"] for r in reversed(runs) if r.get("ceilings")), {})
    out["notes"] = list(dict.fromkeys(n for r in runs for n in r.get("notes", [])))
    if len(runs) > 1:
        out["notes"].append(f"merged from {len(runs)} runs: " + "; ".join(env_line(r.get("env", {})) for r in runs))
    add_loss_diffs(out["e2e"])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", nargs="+", help="results.json written by python -m bench.run (several are merged)")
    p.add_argument("--update", metavar="RESULTS_MD", help="update this RESULTS.md (latest block + history rows)")
    p.add_argument("--plot", metavar="PNG", help="write the tok/s and peak bar plot here")
    p.add_argument("--brief", action="store_true", help="print one line per row (and the ratios), not the tables")
    args = p.parse_args(argv)
    runs = []
    for path in args.json:
        with open(path) as f:
            runs.append(json.load(f))
    results = merge(runs)
    if args.brief:
        print(brief(results))
        return 0
    print(render_markdown(results))
    if args.plot:
        why = plot_e2e(results, args.plot)
        print(f"plot: {why or args.plot}")
    if args.update:
        update_results_md(results, args.update)
        print(f"updated {args.update}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
