"""bench/convergence.py on CPU (--smoke: tiny configs, 3 steps, aot_eager codegen), so the H200 script cannot rot:
the subprocess per family, identical weights and batches in every variant, the rewrites really happening, the
verdict rule, time limits reported as skipped (never dropped), the outputs and the RESULTS.md block."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from bench import convergence as conv

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="GPU machines run the real thing")


@cpu_only
def test_smoke_family_in_a_subprocess(tmp_path, capsys):
    """Gemma2 alone (one family keeps this under a minute on 2 cores): Gemma-cast RMSNorm, GeGLU, RoPE, the
    softcapped fused loss, eager attention with sliding and full layers."""
    assert conv.main(["--smoke", "--families", "gemma2", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "convergence.json").read_text())
    assert list(res["families"]) == ["gemma2"] and res["setup"]["steps"] == 3
    for name, fam in res["families"].items():
        vs = fam["variants"]
        assert list(vs) == list(conv.VARIANTS)
        assert all(r["status"] == "ok" and len(r["losses"]) == 3 for r in vs.values()), (name, vs)
        # Same weights, same batches: fp32 eager on CPU is deterministic, and every variant's first loss agrees.
        assert vs["hf_eager_rerun"]["max_dloss"] == 0 and vs["hf_eager_rerun"]["param_dist"] == 0
        for v in ("inductor", "liger_fx", "hf_hook"):
            assert vs[v]["first_dloss"] <= 1e-5 and vs[v]["param_dist"] <= 1e-5, (name, v, vs[v])
        for v in conv.OURS:  # liger-fx really rewrote the model, in both variants
            assert vs[v]["replaced"]["fused_linear_cross_entropy"] == 1 and vs[v]["replaced"]["rope"] == 4, vs[v]
        assert "replaced" not in vs["inductor"] or not vs["inductor"]["replaced"]
        assert fam["verdict"] == "PASS", fam
        assert fam["margin"]["param_dist"] >= conv.SMOKE_FLOOR["param_dist"]
        assert (tmp_path / "logs" / f"{name}.log").exists()
    assert res["families"]["gemma2"]["variants"]["liger_fx"]["replaced"]["geglu"] == 2
    out = capsys.readouterr().out
    assert out.rstrip().splitlines()[-1].startswith("== 1 PASS, 0 FAIL, 0 INCOMPLETE")
    md = (tmp_path / "convergence.md").read_text()
    assert "| gemma2 | PASS |" in md and "SMOKE" in md

    # The fold-in path: re-render the JSON into a copy of RESULTS.md's block, twice (replaced, not appended).
    results_md = tmp_path / "RESULTS.md"
    shutil.copy(os.path.join(BENCH, "RESULTS.md"), results_md)
    for _ in range(2):
        assert conv.main(["--from-json", str(tmp_path / "convergence.json"), "--update", str(results_md),
                          "--plot", str(tmp_path / "again.png")]) == 0
    text = results_md.read_text()
    assert text.count("| gemma2 | PASS |") == 1 and "Not run on the H200 yet." not in text
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # an optional extra: the run degrades to a note
        return
    assert (tmp_path / "convergence.png").stat().st_size > 0 and (tmp_path / "again.png").stat().st_size > 0


@cpu_only
def test_time_limits_are_reported_as_skipped(tmp_path):
    """llama is killed by its family timeout (2 s: still importing); qwen3 then has less than --min-start-s left of the
    budget and is never started. Both show every variant, with why."""
    args = ["--smoke", "--families", "llama,qwen3", "--parallel", "1", "--family-timeout", "2", "--budget-s", "3",
            "--min-start-s", "1.5", "--out", str(tmp_path)]
    assert conv.main(args) == 0
    fams = json.loads((tmp_path / "convergence.json").read_text())["families"]
    for name in ("llama", "qwen3"):
        assert fams[name]["verdict"] == "INCOMPLETE"
        assert [r["status"] for r in fams[name]["variants"].values()] == ["skipped (time budget)"] * 5
    assert fams["llama"]["variants"]["hf_eager"]["detail"].startswith("family timeout 2 s")
    assert fams["qwen3"]["variants"]["hf_eager"]["detail"].startswith("not started")


def _fam(**devs):
    """A family whose variants have the given (max_dloss, param_dist); hf_eager is the reference."""
    vs = {"hf_eager": {"status": "ok"}}
    for v, d in devs.items():
        vs[v] = {"status": "ok", "max_dloss": d[0], "param_dist": d[1]} if isinstance(d, tuple) else {"status": d}
    return {"variants": vs}


def test_verdict_rule():
    # eager deterministic: the margin is Inductor's deviation, so liger-fx may deviate up to twice Inductor's
    ok = conv.verdict(_fam(hf_eager_rerun=(0, 0), inductor=(0.01, 1e-3), liger_fx=(0.02, 2e-3), hf_hook=(0, 0)))
    assert ok["verdict"] == "PASS" and ok["margin"] == {"max_dloss": 0.01, "param_dist": 1e-3}
    bad = conv.verdict(_fam(hf_eager_rerun=(0, 0), inductor=(0.01, 1e-3), liger_fx=(0.01, 2.1e-3), hf_hook=(0, 0)))
    assert bad["verdict"] == "FAIL" and bad["why"] == "liger_fx param_dist 0.0021 > bound 0.002"
    # eager's own run-to-run noise, when larger, is the margin
    noisy = conv.verdict(_fam(hf_eager_rerun=(0.05, 0), inductor=(0.01, 1e-3), liger_fx=(0.06, 0), hf_hook=(0, 0)))
    assert noisy["verdict"] == "PASS" and noisy["bound"]["max_dloss"] == pytest.approx(0.06)
    # a floor (the smoke mode's) raises a zero margin
    assert conv.verdict(_fam(hf_eager_rerun=(0, 0), inductor=(0, 0), liger_fx=(1e-6, 1e-6), hf_hook=(0, 0)),
                        floor=conv.SMOKE_FLOOR)["verdict"] == "PASS"
    # liger-fx broken: FAIL whatever else happened; a baseline missing: INCOMPLETE, never PASS
    crashed = conv.verdict(_fam(hf_eager_rerun=(0, 0), inductor="skipped (time budget)", liger_fx="error: RuntimeError",
                                hf_hook=(0, 0)))
    assert crashed["verdict"] == "FAIL" and crashed["why"] == "liger_fx error: RuntimeError"
    missing = conv.verdict(_fam(hf_eager_rerun=(0, 0), inductor="skipped (time budget)", liger_fx=(0, 0),
                                hf_hook="skipped (time budget)"))
    assert missing["verdict"] == "INCOMPLETE" and "inductor skipped (time budget)" in missing["why"]


def test_identical_batches_from_a_fixed_corpus():
    setup = conv.Setup(smoke=True)
    a, b = conv.corpus_batches(128, setup, "cpu"), conv.corpus_batches(128, setup, "cpu")
    assert len(a) == setup.steps and all(torch.equal(x, y) for x, y in zip(a, b))
    assert a[0].shape == (setup.batch, setup.seq)
    # the corpus repeats: step 0 and step corpus/batch see the same sequences
    full = conv.Setup(smoke=False, steps=4, seq=8, batch=8, corpus=16)
    batches = conv.corpus_batches(32000, full, "cpu")
    assert torch.equal(batches[0], batches[2]) and not torch.equal(batches[0], batches[1])


def test_full_configs_keep_each_family_structure():
    """The H200 configs build (meta device: no memory) with the issue's sizes and each family's own features."""
    for name in conv.FAMILIES:
        cfg = conv.family_config(name, smoke=False)
        assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == (1024, 4, 32000), name
        assert cfg.max_position_embeddings >= conv.Setup(False).seq
    g2 = conv.family_config("gemma2", smoke=False)
    assert g2.layer_types == ["sliding_attention", "full_attention"] * 2 and g2.sliding_window < conv.Setup(False).seq
    assert g2.attn_logit_softcapping == 50.0 and g2._attn_implementation == "eager"
    assert conv.family_config("mixtral", smoke=False).num_local_experts == 8
    assert conv.family_config("gpt_neox", smoke=False).rope_parameters["partial_rotary_factor"] == 0.25
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        n = sum(p.numel() for p in AutoModelForCausalLM.from_config(conv.family_config("qwen3", False)).parameters())
    assert 90e6 < n < 120e6  # Qwen3-0.6B's body at 4 layers, tied 32000-word embedding
