"""bench/post_training.py's CPU smoke path: every workload and variant through the real CLI (`bench.run --post`), the
same losses across variants, liger-fx's rewrite really fused every lm_head's log-probs, and the table renders."""

from __future__ import annotations

import json

import pytest
import torch

from bench import post_training, run

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="GPU machines run the real thing")


@cpu_only
def test_smoke_post_training_every_workload_and_variant(tmp_path):
    assert run.main(["--kernels", "none", "--e2e", "none", "--post", "all", "--smoke", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    rows = res["post_training"]
    assert {(r["workload"], r["variant"]) for r in rows} == {
        (w, v) for w in post_training.WORKLOADS for v in post_training.VARIANTS}
    for r in rows:
        if r["variant"] == "liger_kernel":  # needs CUDA: said, not dropped
            assert r["status"] == "unavailable: liger-kernel needs CUDA", r
            continue
        assert r["status"] == "ok", r
        assert len(r["losses"]) == 3 and all(x == x for x in r["losses"])
        if r["variant"] != "inductor":  # the same weights and batches: the same losses (fp32 on CPU)
            assert r["max_loss_diff"] < 1e-4, (r["workload"], r["variant"], r["max_loss_diff"])
    fused = {r["workload"]: r["replaced"] for r in rows if r["variant"] == "liger_fx"}
    # GRPO and DPO: the policy's log-probs (with grad) and the reference's (no_grad): two ops each
    assert all(f.get("fused_linear_logprobs") == 2 for f in fused.values()), fused
    md = (tmp_path / "results.md").read_text()
    assert "## Post-training steps" in md and "| grpo-qwen2-1.5b | liger_fx | ok |" in md
