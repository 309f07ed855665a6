"""The benchmark suite's CPU smoke mode: tiny shapes, reference ops, so bench/ cannot rot between GPU runs.

It runs the real CLI (every kernel module, every e2e variant) and checks what the GPU run relies on: each provider's
result was checked against torch eager, each variant trained on the same weights and batches with the same losses,
liger-fx really rewrote the model, the subprocess runner reports results, crashes and timeouts, and the report's
ratios and RESULTS.md update are right.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch

from bench import e2e, report, run

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="GPU machines run the real thing (bench/gpu.sh)")


@cpu_only
def test_smoke_cli_all_kernels_and_variants(tmp_path):
    assert run.main(["--kernels", "all", "--e2e", "llama-1b", "--smoke", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["smoke"] and res["env"]["torch"] == torch.__version__ and res["env"]["commit"]

    # Kernels: every module that exists must run every provider (or say why it can't) and match torch eager.
    for key in run.KERNELS:
        rows = [r for r in res["kernels"] if r["key"] == key]
        assert rows, key
        if not os.path.exists(os.path.join(BENCH, f"kernels_{key}.py")):
            assert rows[0]["status"] == "error: module not written yet"
            continue
        for r in rows:
            assert r["status"] == "ok" or r["status"].startswith("unavailable"), (key, r["provider"], r["status"])
            if r["status"] == "ok":
                assert r["median_ms"] > 0 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"], r
                if r["provider"] != "torch":
                    assert r["rel_err"] <= run.MISMATCH_TOL, r  # the provider's result was really compared
        assert {"torch", "inductor", "liger_fx"} <= {r["provider"] for r in rows if r["status"] == "ok"}, key
    norm = {r["provider"]: r for r in res["kernels"] if r["key"] == "rms_norm"}
    assert norm["liger_fx"]["bytes"] == 5 * 64 * 256 * 2 + 3 * 256 * 2

    # End to end: every variant has a row; those that ran agree with eager (fp32 on CPU: tight).
    rows = {r["variant"]: r for r in res["e2e"]}
    assert set(rows) == set(e2e.VARIANTS)
    for v in ("hf_eager", "inductor", "liger_fx"):
        assert rows[v]["status"] == "ok", rows[v]
        assert len(rows[v]["losses"]) == 1 + 2 and all(math.isfinite(x) for x in rows[v]["losses"])
        assert rows[v]["tok_s"] > 0
    for v in ("inductor", "liger_fx"):
        assert rows[v]["max_loss_diff"] <= 1e-4 * abs(rows["hf_eager"]["final_loss"]), rows[v]
    # The backend really rewrote the tiny Llama (2 layers: 2x2 layer norms + the final one).
    assert rows["liger_fx"]["replaced"].get("rms_norm") == 5, rows["liger_fx"]["replaced"]
    for v in ("hf_liger_kernel", "inductor_on_liger_kernel"):
        assert rows[v]["status"] == "unavailable: liger-kernel needs CUDA"
    assert rows["hf_hook"]["status"] == "ok" or rows["hf_hook"]["status"].startswith("unavailable")

    md = (tmp_path / "results.md").read_text()
    assert "llama-1b: losses agree" in md and "SMOKE" in md and "extra GiB = max_memory_allocated" in md


@cpu_only
def test_subprocess_runner_result_and_timeout():
    kw = dict(smoke=True, device="cpu", steps=1, warmup=1)
    ok = e2e.run_variant_subprocess("llama-1b", "hf_eager", timeout=300, **kw)
    assert ok["status"] == "ok", ok
    ref = e2e.run_variant_inprocess("llama-1b", "hf_eager", **kw)
    assert ok["losses"] == ref["losses"]  # same seed and batches in another process: the same numbers

    killed = e2e.run_variant_subprocess("llama-1b", "hf_eager", timeout=0.5, **kw)
    assert killed["status"] == "timeout after 0 s" and killed["error"].startswith("killed in phase")


def test_a_crashing_variant_is_a_row_with_its_error(monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nCompile with TORCH_USE_CUDA_DSA")

    monkeypatch.setattr(e2e, "make_variant", crash)
    row = e2e.run_variant_inprocess("llama-1b", "inductor", smoke=True, device="cpu", steps=1, warmup=1)
    assert row["status"] == "error: RuntimeError"
    assert row["error"] == "in phase 'apply variant': CUDA error: an illegal memory access was encountered"


def test_crash_line_prefers_the_cuda_error():
    log = "Traceback (most recent call last):\n  File x\nRuntimeError: CUDA error: an illegal memory access was " \
          "encountered\nCUDA kernel errors might be asynchronously reported\nValueError: later noise\n"
    assert "illegal memory access" in e2e._error_line(log)


def _row(variant, tok, peak, losses, status="ok"):
    return {"shape": "llama-1b", "variant": variant, "status": status, "tok_s": tok, "peak_gib": peak,
            "step_ms": 100.0, "warmup_s": 1.0, "losses": losses, "first_loss": losses[0], "final_loss": losses[-1]}


def test_report_ratios_agreement_merge_and_results_md(tmp_path):
    env = {"date": "2026-01-01 00:00 UTC", "gpu": "NVIDIA H200", "torch": "2.11.0", "triton": "3.6.0",
           "transformers": "5.17.0", "liger_kernel": "0.8.5", "commit": "abc123"}
    rows = [_row("hf_eager", 50000, 60.0, [11.90, 11.80]), _row("hf_liger_kernel", 64000, 26.0, [11.90, 11.81]),
            _row("liger_fx", 72000, 20.8, [11.90, 11.805]), _row("inductor", 60000, 40.0, [11.90, 11.79])]
    first = {"env": env, "e2e": rows + [{"shape": "llama-1b", "variant": "hf_hook", "status": "skipped (time budget)"}],
             "kernels": [], "loss_atol": 0.02}
    second = {"env": env, "e2e": [_row("hf_hook", 80000, 16.0, [11.90, 11.95]),
                                  {"shape": "llama-1b", "variant": "inductor", "status": "skipped (time budget)"}]}
    res = report.merge([first, second])
    by = {r["variant"]: r for r in res["e2e"]}
    assert by["inductor"]["status"] == "ok"  # a later "skipped" does not erase a measurement
    assert by["hf_hook"]["status"] == "ok" and by["hf_hook"]["max_loss_diff"] == pytest.approx(0.15)

    ratios = report.e2e_ratios(res)
    assert "llama-1b: liger_fx/hf_liger_kernel: tok/s x1.125, peak x0.800" in ratios
    assert "llama-1b: liger_fx/inductor: tok/s x1.200, peak x0.520" in ratios
    (agree,) = report.loss_agreement(res)
    assert agree.startswith("llama-1b: losses DISAGREE (hf_hook)")
    res["e2e"] = [r for r in res["e2e"] if r["variant"] != "hf_hook"]
    assert report.loss_agreement(res)[0].startswith("llama-1b: losses agree")

    md = tmp_path / "RESULTS.md"
    shutil.copy(os.path.join(BENCH, "RESULTS.md"), md)
    report.update_results_md(res, str(md))
    report.update_results_md(res, str(md))
    text = md.read_text()
    assert text.count("liger_fx/inductor: tok/s x1.200") == 1  # the latest block is replaced, not appended
    history = [ln for ln in text.splitlines() if ln.startswith("| 2026-01-01")]
    assert len(history) == 2 and "72.0k / 20.80" in history[0] and "abc123" in history[0]


@cpu_only
def test_flce_compiled_provider_is_really_rewritten():
    """The FLCE bench's compiled provider must hit the rewrite (it is scoped to causal-LM losses): at 563f046 it
    did not, and the H200 row labelled liger_fx measured plain Inductor."""
    from torch._dynamo.utils import counters

    from bench import kernels_flce
    from bench.common import smoke_codegen

    torch._dynamo.reset()
    counters.clear()
    bench = kernels_flce.make_bench("cpu", smoke=True)
    with smoke_codegen():
        bench.providers["liger_fx"]()
    assert counters["liger_fx"]["fused_linear_cross_entropy"] == 1


def test_compile_profile_smoke(tmp_path, capsys, monkeypatch):
    """bench/compile_profile.py on CPU: the first step compiles (cProfile on) and the phase table names our rewrite."""
    from bench import compile_profile

    for var in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):  # the script's own defaults stay out of this process
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    compile_profile.main(["--smoke", "--variant", "hf_hook", "--cprofile", "--top", "3", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "first step" in out and "liger_fx rewrite_graph" in out
    assert (tmp_path / "compile-hf_hook-llama-1b.prof").stat().st_size > 0


@cpu_only
def test_smoke_reference_decoder_loss_outside_the_model(tmp_path):
    """The reference decoder's variants (shape ref-llama-1b at the tiny size): the loop with the loss outside the
    compiled model trains with eager's losses under Inductor, liger-fx with lazy logits and liger-fx without them;
    the liger-fx row's logits were lazy, and the report compares it with Inductor and with the plain-logits loop."""
    variants = "eager,inductor,liger_fx,liger_fx_nolazy"
    assert run.main(["--kernels", "none", "--e2e", "ref-llama-1b", "--variants", variants, "--smoke",
                     "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    rows = {r["variant"]: r for r in res["e2e"]}
    assert set(rows) == set(variants.split(","))
    for v, r in rows.items():
        assert r["status"] == "ok" and r["tok_s"] > 0 and len(r["losses"]) == 3, r
        if v != "eager":
            assert r["max_loss_diff"] <= 1e-4 * abs(rows["eager"]["final_loss"]), r
    assert rows["liger_fx"]["replaced"].get("lazy_logits") == 1, rows["liger_fx"]["replaced"]
    assert "lazy_logits" not in rows["liger_fx_nolazy"]["replaced"]
    assert rows["liger_fx"]["replaced"].get("rope") == 4, rows["liger_fx"]["replaced"]
    md = (tmp_path / "results.md").read_text()
    assert "ref-llama-1b: losses agree" in md and "max |loss - eager loss|" in md
    assert "ref-llama-1b: liger_fx/inductor" in md and "ref-llama-1b: liger_fx/liger_fx_nolazy" in md


def test_reference_shapes_refuse_hf_variants():
    assert e2e.variants_for("ref-llama-8b-8l") == e2e.REF_VARIANTS
    assert e2e.variants_for("llama-1b") == e2e.VARIANTS
    row = e2e.run_variant_inprocess("ref-llama-1b", "hf_hook", smoke=True, device="cpu", steps=1, warmup=1)
    assert row["status"].startswith("unavailable: hf_hook is a Hugging Face variant"), row
    row = e2e.run_variant_inprocess("llama-1b", "liger_fx_nolazy", smoke=True, device="cpu", steps=1, warmup=1)
    assert row["status"].startswith("unavailable: liger_fx_nolazy is a reference-decoder variant"), row


@cpu_only
def test_smoke_checkpointed_shape(tmp_path):
    """`--e2e llama-1b-ckpt`: the Llama-1B shape with HF gradient checkpointing on, for the GPU comparison of the
    hook path against HF + liger-kernel with checkpointing on. On CPU: the layers are really checkpointed, the hook
    path and a plain torch.compile(backend="liger") (inside checkpoints_in_graph, as the README says) fuse every
    site of the tiny model (as without checkpointing), and their losses are eager's, checkpointed too."""
    assert e2e.SHAPES["llama-1b-ckpt"].grad_ckpt and not e2e.SHAPES["llama-1b"].grad_ckpt
    model = e2e.build_model(e2e.SHAPES["llama-1b-ckpt"], True, "cpu", torch.float32)
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    assert run.main(["--kernels", "none", "--e2e", "llama-1b-ckpt", "--variants", "hf_eager,hf_hook,liger_fx",
                     "--smoke", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    rows = {r["variant"]: r for r in res["e2e"]}
    every_site = {"rms_norm": 5, "rope": 4, "swiglu": 2, "fused_linear_cross_entropy": 1}
    for v in ("hf_eager", "hf_hook", "liger_fx"):
        assert rows[v]["status"] == "ok" and rows[v]["shape"] == "llama-1b-ckpt" and rows[v]["grad_ckpt"], rows[v]
    for v in ("hf_hook", "liger_fx"):
        assert {k: rows[v]["replaced"].get(k) for k in every_site} == every_site, rows[v]["replaced"]
        assert rows[v]["max_loss_diff"] <= 1e-4 * abs(rows["hf_eager"]["final_loss"]), rows[v]
    assert "llama-1b-ckpt: losses agree" in (tmp_path / "results.md").read_text()
