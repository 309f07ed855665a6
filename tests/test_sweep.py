"""The transformers sweep: `liger-fx report --transformers-all` over every decoder family the installed transformers
registers (causal LMs, and vision-language models run on text), each built from its default config at the reduced
size and run for one training step compiled with the liger backend, its loss held to eager's.

A fallback is a bug of ours (the family trains unfused with only a warning), and so is a compiled step that raises
or whose loss differs from eager where plain torch.compile's does not: the test fails on any. A family that cannot
be run here (its default config does not build at the reduced size, its eager step fails, or plain torch.compile
fails it too) is listed as skipped with its reason, never dropped silently.

It runs with `--compiler aot_eager`: the rewrite and AOTAutograd's trace of forward and backward, where every
fallback seen so far was raised, without Inductor's C++ codegen, which took most of a cold compile's time on the
2-core CI machine; the families are split over two processes (`--shard`). The same sweep through Inductor is
`liger-fx report --transformers-all`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from liger_fx.models import decoder_types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_every_transformers_decoder_family_trains_fused_without_fallback(tmp_path):
    shards = max(1, min(2, os.cpu_count() or 1))
    procs = []
    for k in range(shards):
        log = open(tmp_path / f"{k}.log", "w")
        cmd = [sys.executable, "-m", "liger_fx.cli", "report", "--transformers-all", "--compiler", "aot_eager",
               "--shard", f"{k}/{shards}", "--json", "--out", str(tmp_path / f"{k}.json")]
        procs.append((subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log), log))
    for proc, log in procs:
        proc.wait(timeout=1800)
        log.close()
    docs = [json.loads((tmp_path / f"{k}.json").read_text()) for k in range(shards)]
    ran = [m for d in docs for m in d["models"]]
    errors = [e for d in docs for e in d["errors"]]
    skipped = [s for d in docs for s in d["skipped"]]
    tails = "\n".join((tmp_path / f"{k}.log").read_text()[-3000:] for k in range(shards))

    fell = {m["model"]: m["fallbacks"] for m in ran if m["fallbacks"]}
    assert not fell, f"fell back to plain Inductor: {fell}"
    assert not errors, f"failed where plain torch.compile does not: {errors}"
    assert [p.returncode for p, _ in procs] == [0] * shards, tails
    # every family is accounted for: run or skipped with a reason
    assert sorted([m["model"] for m in ran] + [s["model"] for s in skipped]) == decoder_types()
    assert all(s["reason"].strip() for s in skipped), skipped
    # most of them run: a reduction that broke families wholesale would show here, not as a green test
    assert len(ran) >= 0.75 * len(decoder_types()), (len(ran), [s["model"] for s in skipped])
    # and the rewrite did its job on them
    done = sum(p["replaced"] for m in ran for p in m["patterns"].values())
    total = sum(p["candidates"] for m in ran for p in m["patterns"].values())
    assert total and done >= 0.9 * total, (done, total)
