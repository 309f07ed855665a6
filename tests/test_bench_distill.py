"""The distillation benchmark's CPU smoke mode (bench/distill.py through bench/run.py's CLI): tiny models, reference
ops. Checks what the GPU run relies on: the variants train the same weights on the same batches with the same
losses, liger-fx really fused the divergence, liger-kernel's variants say why they did not run, and the report has
the table, ratios and loss verdict."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bench import distill, run

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="GPU machines run the real thing")


@cpu_only
def test_smoke_cli_distillation_step(tmp_path):
    assert run.main(["--kernels", "none", "--e2e", "none", "--distill", "llama-1b-jsd", "--smoke",
                     "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    rows = {r["variant"]: r for r in res["distill"]}
    assert set(rows) == set(distill.DEFAULT_VARIANTS)
    for v in ("liger_fx", "inductor"):
        assert rows[v]["status"] == "ok", rows[v]
        assert len(rows[v]["losses"]) == 1 + 2 and all(math.isfinite(x) and x > 0 for x in rows[v]["losses"])
    # fp32 on CPU: the fused op and Inductor's step agree to rounding, every step (the weights move with AdamW)
    assert rows["liger_fx"]["loss_ref"] == "inductor" and rows["liger_fx"]["max_loss_rel_diff"] <= 1e-5
    assert rows["liger_fx"]["replaced"].get("fused_linear_distillation") == 1, rows["liger_fx"]["replaced"]
    for v in ("liger_kernel", "inductor_liger_jsd"):
        assert rows[v]["status"] == "unavailable: liger-kernel needs CUDA"
    md = (tmp_path / "results.md").read_text()
    assert "### Distillation training step" in md and "distill llama-1b-jsd: losses agree" in md
    assert "liger_fx/inductor: tok/s x" in md


def test_bad_distill_shape_is_named():
    with pytest.raises(SystemExit, match="unknown distill shape nope"):
        run.parse_args(["--distill", "nope"])
