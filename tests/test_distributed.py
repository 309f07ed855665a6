"""DDP and FSDP2 under backend="liger", on CPU with gloo.

Each torchrun case runs the documented example, `torchrun --nproc-per-node 2 examples/train_fsdp2.py`, for 5 steps and
checks: the global losses and the final parameters equal single-process eager training on the same global batch
(fp32, the tolerances of tests/helpers.py), and every rank's record shows the rewrites of a single-graph compile. Two
processes compile on 2 shared cores: each run takes 30-90 s, so there are few: the bare `torch.compile(DDP(model),
backend="liger")` at two bucket proportions, FSDP2 through torch.compile, through liger_fx.apply and block by block,
and DDP's python_reducer under compiled autograd. The in-process cases below them check the DDP cut itself (where it
falls, what the record says, who may change optimize_ddp, the DDPOptimizer hook).
"""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch._dynamo.utils import counters

import liger_fx
from liger_fx import distributed as ligerdist
from liger_fx.backend import liger_backend, rewrite_graph
from liger_fx.config import LigerConfig
from liger_fx.rewrite import GraphRecord
from tests.helpers import replaced

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "train_fsdp2.py"
TIMEOUT_S = 300  # a run took 40-90 s on 2 busy cores with a cold Inductor cache; a hang must not stall CI

# 2.0 MiB of fp32 parameters: over DDP's 1 MiB bucket (--bucket-cap-mb 1, the least DDPOptimizer accepts), so Dynamo
# splits the graph in two and the backend compiles each bucket on its own. SGD, not AdamW: Adam's first step moves a
# weight by lr * sign(grad), so a gradient of ~1e-9 rounding differently would move it by 2*lr, not by rounding.
ARGS = ["--hidden", "128", "--intermediate", "512", "--layers", "2", "--vocab", "128", "--batch", "4", "--seq", "16",
        "--steps", "5", "--optimizer", "sgd", "--lr", "0.1", "--device", "cpu"]
TOL = dict(atol=1e-5, rtol=1e-4)

# Llama-3.2-1B with every width divided by 16 (hidden 128, intermediate 512, vocab 8016, head_dim 64, tied lm_head)
# and DDP's 25 MiB bucket by 256, doubled for fp32: each weight matrix fills the share of a bucket it fills at full
# size in bf16 (an MLP projection 1.25 buckets), where Dynamo's own split cuts every SwiGLU (bench/lab/ddp_buckets.py).
LLAMA_1B_BY_16 = ["--hidden", "128", "--intermediate", "512", "--layers", "2", "--heads", "2", "--kv-heads", "1",
                  "--vocab", "8016", "--tie", "--bucket-cap-mb", str(25 / 256 * 2)]
# The example's default model (hidden 64, intermediate 96, vocab 128) fits DDP's default bucket whole, which cuts
# nothing; 0.018 MiB gives it the same proportions (an MLP projection, 24 KiB, is 1.3 buckets).
TINY_DEFAULT = ["--bucket-cap-mb", "0.018"]


def _example():
    spec = importlib.util.spec_from_file_location("train_fsdp2", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference(extra: tuple, tmp_path_factory, base=ARGS):
    """Single-process eager training on the global batch, and the rewrites of one whole-graph compile."""
    ex = _example()
    path = tmp_path_factory.mktemp("ref") / "params.pt"
    args = ex.parse_args(base + list(extra) + ["--wrap", "none", "--backend", "eager", "--save-params", str(path)])
    result = ex.train(args)

    model = ex.build_model(args, torch.device("cpu"))
    record = GraphRecord(-1)

    def rewrite_only(gm, example_inputs):
        rewrite_graph(gm, example_inputs, LigerConfig(), record)
        return gm.forward

    ids = ex.global_batch(args, 0)[:2]  # one rank's rows
    torch._dynamo.reset()
    torch.compile(model, backend=rewrite_only, fullgraph=True)(input_ids=ids, labels=ids, use_cache=False)
    torch._dynamo.reset()
    assert not record.misses and record.fallback is None, record.summary()
    counts = collections.Counter(r.flag for r in record.replaced)
    assert counts["rms_norm"] == 5, counts  # 2 layers x 2 + the final norm: the reference itself is sane
    return result["losses"], torch.load(path), counts


def _torchrun(tmp_path, *args, base=ARGS) -> tuple[dict, dict]:
    out, params = tmp_path / "result.json", tmp_path / "params.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(EXAMPLE),
           *base, *args, "--out", str(out), "--save-params", str(params)]
    # One compile thread: two ranks each with a pool of Inductor compile workers oversubscribe 2 cores.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHINDUCTOR_COMPILE_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        log, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _kill_tree(proc.pid)
        log, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in {TIMEOUT_S} s:\n{log[-4000:]}")
    assert proc.returncode == 0, log[-6000:]
    return json.loads(out.read_text()), torch.load(params)


def _kill_tree(pid: int) -> None:
    """SIGKILL pid and its descendants. torchrun starts each worker in a session of its own, so killing torchrun, or
    its process group, leaves the workers blocked in a collective forever."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    for child in children:
        _kill_tree(child)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _check_numerics(result, params, ref):
    ref_losses, ref_params, _ = ref
    assert result["world"] == 2
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(ref_losses), **TOL)
    assert ref_losses[-1] != ref_losses[0]  # the parameters did move
    assert set(params) == set(ref_params)
    for name, ref in ref_params.items():
        torch.testing.assert_close(params[name], ref, **TOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.slow  # gloo on CPU: nothing for the GPU run to learn here (bench/gpu.sh runs -m "not slow")
@pytest.mark.parametrize("model", [LLAMA_1B_BY_16, TINY_DEFAULT], ids=["llama-1b-by-16", "tiny-default"])
def test_ddp_with_default_settings_fuses_every_site_and_trains_like_eager(model, tmp_path, tmp_path_factory):
    # The example leaves optimize_ddp alone, builds DDP with its own bucket size and calls the bare
    # torch.compile(DDP(model), backend="liger"): DDPOptimizer hands the liger backend the whole graph (the hook in
    # liger_fx/distributed.py), which rewrites it and then cuts it.
    base = ARGS + model
    ref = reference((), tmp_path_factory, base)
    result, params = _torchrun(tmp_path, "--wrap", "ddp", base=base)
    _check_numerics(result, params, ref)
    expected = ref[2]
    assert expected["swiglu"] == 2 and expected["fused_linear_cross_entropy"] == 1, expected
    for rank in result["ranks"]:
        records = rank["records"]
        assert all(r["fallback"] is None and not r["misses"] for r in records), [r["summary"] for r in records]
        # Every site of the whole-graph compile is fused, in one graph that was then cut into DDP buckets (3 per
        # layer and 2 more at these proportions: each bucket all-reduces while the backward of the next one runs).
        got = collections.Counter(rank["counters"])
        assert {f: got[f] for f in expected} == dict(expected), (got, expected)
        (cut,) = [r for r in records if r["replaced"]]
        assert cut["ddp_buckets"] >= 2 * 3, [r["summary"] for r in records]
        sites = [x["where"] for x in cut["replaced"]]
        assert "model.layers.1.mlp" in sites, sites  # module paths survive the cut


@pytest.mark.slow
def test_fsdp2_tied_lm_head_is_gathered_rewritten_and_trains_like_eager(tmp_path, tmp_path_factory):
    # Tied: lm_head's weight is the embedding's, one sharded parameter used by two graphs.
    ref = reference(("--tie",), tmp_path_factory)
    result, params = _torchrun(tmp_path, "--wrap", "fsdp2", "--tie")
    _check_numerics(result, params, ref)
    expected = ref[2]
    for rank in result["ranks"]:
        records = rank["records"]
        # fully_shard's hooks break the graph at each layer: the layers share one graph (compiled once), so the
        # counters count sites per distinct graph, not per layer. Every flag of the whole-graph compile shows up,
        # and no graph has a near miss or a fallback.
        assert len(records) >= 3, [r["summary"] for r in records]
        assert all(r["fallback"] is None and not r["misses"] for r in records), [r["summary"] for r in records]
        flags = {k for k in rank["counters"] if k in LigerConfig.flag_names()}  # not the option passes' counts
        assert flags == set(expected), (rank["counters"], expected)
        # transformers' causal mask reaches the layer graph as an input: the graph that builds it checked it against
        # the triangle and marked it, and the layer's SDPA runs causal (liger_fx/causal_mask.py, MaskPlan).
        assert rank["counters"].get("causal_sdpa", 0) >= 1, rank["counters"]
        assert any("marked causal by an earlier graph" in r["summary"] for r in records), [r["summary"] for r in records]
        # What the backend received: no DTensor anywhere; lm_head's weight all-gathered, plain, full (vocab, hidden).
        inputs = rank["graph_inputs"]
        assert sum(g["dtensors"] for g in inputs) == 0, inputs
        heads = [v for g in inputs for k, v in g.items() if "lm_head" in k]
        full = f"({ARGS[ARGS.index('--vocab') + 1]}, {ARGS[ARGS.index('--hidden') + 1]})"
        assert heads and all(v.split()[0] != "DTensor" and full in v for v in heads), (full, inputs)


@pytest.mark.slow
def test_fsdp2_blocks_compiled_one_by_one_fuse_every_site_and_train_like_eager(tmp_path, tmp_path_factory):
    """`--entry blocks`: each decoder block compiled on its own with backend="liger" (block.compile, then
    fully_shard, torchtitan's order); embedding, final norm, lm_head and loss eager. Every site of the blocks fused
    (one graph shared by the layers), same losses and parameters as single-process eager."""
    ref = reference((), tmp_path_factory)
    result, params = _torchrun(tmp_path, "--wrap", "fsdp2", "--entry", "blocks")
    _check_numerics(result, params, ref)
    for rank in result["ranks"]:
        records = rank["records"]
        assert records and all(r["fallback"] is None and not r["misses"] for r in records), records
        got = {k: v for k, v in rank["counters"].items() if k in LigerConfig.flag_names()}
        assert got == {"rms_norm": 2, "rope": 2, "swiglu": 1}, rank["counters"]  # a block's sites, all of them


@pytest.mark.slow
def test_ddp_python_reducer_under_compiled_autograd_trains_like_eager(tmp_path, tmp_path_factory):
    """`--compiled-autograd` under DDP: optimize_ddp="python_reducer" and the whole step compiled, so the backward
    (with DDP's all-reduce hooks) reaches the liger backend too. It passes through to Inductor unsearched, counted as
    a backward graph, with no fallback; the forward fuses every site; losses and parameters equal eager's."""
    ref = reference((), tmp_path_factory)
    result, params = _torchrun(tmp_path, "--wrap", "ddp", "--compiled-autograd")
    _check_numerics(result, params, ref)
    for rank in result["ranks"]:
        records = rank["records"]
        forward = [r for r in records if r["kind"] == "forward"]
        backward = [r for r in records if r["kind"] == "backward"]
        assert backward and all("backward graph" in r["summary"] for r in backward), [r["summary"] for r in records]
        assert all(r["fallback"] is None and not r["misses"] and not r["replaced"] for r in backward), backward
        assert all(r["fallback"] is None and not r["misses"] for r in forward), [r["summary"] for r in forward]
        got = collections.Counter(x["flag"] for r in forward for x in r["replaced"])
        assert dict(got) == dict(ref[2]), (got, ref[2])


@pytest.mark.slow
def test_fsdp2_through_apply_trains_like_eager(tmp_path, tmp_path_factory):
    """`--entry apply`: the example trains through liger_fx.apply(model) under FSDP2 (its forward lets transformers
    skip the causal mask, which the layer graphs would otherwise receive as an input no rewrite can prove causal).
    Same losses and parameters as single-process eager, every flag fused, no fallback."""
    ref = reference((), tmp_path_factory)
    result, params = _torchrun(tmp_path, "--wrap", "fsdp2", "--entry", "apply")
    _check_numerics(result, params, ref)
    for rank in result["ranks"]:
        assert all(r["fallback"] is None and not r["misses"] for r in rank["records"]), rank["records"]
        assert set(rank["counters"]) >= set(ref[2]) - {"causal_sdpa"}, (rank["counters"], ref[2])


# --------------------------------------------------------------------------------------------------------------
# A pattern cut by a bucket boundary, in one process: DDPOptimizer itself, with a bucket cap chosen to cut a norm.


class NormBetweenProjections(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.inp = nn.Linear(d, d, bias=False)
        self.norm = Norm(d)
        self.out = nn.Linear(d, d, bias=False)

    def forward(self, x):
        return self.out(self.norm(self.inp(x)))


class Norm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


def _ddp_split_backend(cap_bytes):
    DDPOptimizer = ligerdist._TORCH_DDP_OPTIMIZER  # torch's own: the split as it is where the hook is not installed

    def backend(gm, example_inputs):
        opt = DDPOptimizer(bucket_bytes_cap=cap_bytes, backend_compile_fn=liger_backend, first_bucket_cap=cap_bytes)
        return opt.compile_fn(gm, example_inputs)

    return backend


@pytest.mark.parametrize("cap, cut", [(32 * 32 * 4 + 64, True), (10**9, False)], ids=["cut-norm", "one-bucket"])
def test_norm_cut_by_a_bucket_fuses_the_part_before_the_cut(cap, cut):
    # Buckets fill in reverse: `out` (4096 B), then the norm's weight multiply (+128 B) crosses a 4160 B cap, so the
    # boundary falls between `x * rsqrt(...)` and `weight * ...`. The piece before the cut is a whole norm without a
    # weight (torch's nn.RMSNorm(elementwise_affine=False) has that form), so it fuses as the no-weight op and the
    # weight multiply runs in Inductor in the next piece: nothing is left unfused that could have been, so no near
    # miss. (The bare-DDP hook keeps such cuts out of norms altogether; this is torch's own split.)
    torch.manual_seed(0)
    m = NormBetweenProjections()
    x = torch.randn(3, 5, 32, requires_grad=True)
    ref = m(x)
    ref_grads = torch.autograd.grad(ref.sum(), [x, *m.parameters()])
    out = torch.compile(m, backend=_ddp_split_backend(cap))(x)
    grads = torch.autograd.grad(out.sum(), [x, *m.parameters()])
    torch.testing.assert_close(out, ref, **TOL)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, **TOL)
    records = liger_fx.get_records()
    misses = [mi for r in records for mi in r.misses]
    if cut:
        assert len(records) == 2 and replaced("rms_norm") == 1 and not misses
        first, second = records
        assert [w.pattern for w in first.replaced] == ["rms_norm/noweight/float32"] and not second.replaced
    else:
        assert len(records) == 1 and replaced("rms_norm") == 1 and not misses


# --------------------------------------------------------------------------------------------------------------
# Where the cut falls. No compile: each piece is rewritten and run uncompiled (bench/lab/ddp_buckets.py).


@pytest.mark.slow  # CPU only, nothing for the GPU run to learn here (bench/gpu.sh runs -m "not slow")
def test_cut_after_the_rewrite_keeps_dynamos_buckets_and_every_site():
    from bench.lab.ddp_buckets import compare, layout, scaled

    cfg, cap = scaled(16, torch.float32, layers=2)  # LLAMA_1B_BY_16's model and bucket
    out = compare(cfg, cap, torch.float32)
    dynamo, ours = out["dynamo"], out["liger"]
    # Dynamo's split, as torch.compile(DDP(model), backend="liger") gets it: every MLP cut, and the record says why.
    assert dynamo["replaced"]["swiglu"] == 0 and dynamo["candidates"]["swiglu"] == 2, dynamo["replaced"]
    assert dynamo["misses"] and all(ligerdist.CUT_REASON in m.reason for m in dynamo["misses"]), dynamo["misses"]
    # Rewrite first: every candidate fused, and the same parameters in the same buckets, so DDP's all-reduces start
    # at the same points of the backward (the tied lm_head weight, used by the logits matmul and the fused loss, may
    # open one extra bucket holding nothing new).
    assert not ours["misses"] and ours["replaced"] == dynamo["candidates"], (ours["replaced"], dynamo["candidates"])
    assert len(dynamo["buckets"]) == 8 and layout(ours["buckets"]) == layout(dynamo["buckets"]), out


# --------------------------------------------------------------------------------------------------------------
# DDP in this process (gloo, a world of one): who enters the cut after the rewrite, and what a user's setting keeps.


class MLPBlock(nn.Module):
    """Llama's pre-norm MLP with its residual."""

    def __init__(self, d=32, i=64):
        super().__init__()
        self.norm = Norm(d)
        self.gate = nn.Linear(d, i, bias=False)
        self.up = nn.Linear(d, i, bias=False)
        self.down = nn.Linear(i, d, bias=False)

    def forward(self, x):
        h = self.norm(x)
        return x + self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))


# 0.75 of a projection (8 KiB), as DDP's 25 MiB bucket is of a Llama-3.2-1B projection in bf16 (32 MiB): each
# projection fills a bucket and the norm's weight opens a fourth; Dynamo's own cut would fall between silu(gate) and
# * up.
BLOCK_BUCKET_MB = 6 / 1024


@pytest.fixture
def gloo_world_of_one():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # gloo on CPU
@pytest.mark.parametrize("entry, optimize_ddp, buckets", [
    ("apply", True, 4),                # liger_fx.apply, then DDP (the HF Trainer's order): enters the scope itself
    ("apply-ddp", True, 4),            # liger_fx.apply(DDP(model)): the same, on the wrapped module
    ("torch.compile", True, 4),        # torch.compile(DDP(model)) with the step inside split_after_rewrite()
    ("bare", True, 4),                 # torch.compile(DDP(model), backend="liger"), nothing else: the hook
    ("apply", False, 0),               # the user's optimize_ddp=False: one graph, as before
], ids=["apply", "apply-to-ddp", "torch.compile-in-scope", "bare-torch.compile", "apply-user-optimize_ddp-False"])
def test_ddp_fuses_every_site_and_keeps_the_users_setting(gloo_world_of_one, entry, optimize_ddp, buckets):
    with torch._dynamo.config.patch(optimize_ddp=optimize_ddp):
        _train_block_like_eager(entry)
        assert torch._dynamo.config.optimize_ddp is optimize_ddp  # the scope restored what the user set
    (record,) = liger_fx.get_records()
    assert replaced("rms_norm") == 1 and replaced("swiglu") == 1 and not record.misses, record.summary()
    assert record.ddp_buckets == buckets, record.summary()


@pytest.mark.slow  # gloo on CPU
def test_ddp_rewrite_failure_compiles_dynamos_graph_cut_as_dynamo_would(gloo_world_of_one, monkeypatch):
    from liger_fx import backend

    def broken(gm, config, record):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(backend, "PASSES", [*backend.passes(), ("broken", broken)])
    _train_block_like_eager("apply")
    (record,) = liger_fx.get_records()
    assert record.fallback and not record.replaced and sum(counters["liger_fx"].values()) == 0
    assert record.ddp_buckets == 4, record  # Dynamo's own graph, the same 4 buckets


def _train_block_like_eager(entry: str) -> None:
    """One forward and backward of MLPBlock under DDP, entered as `entry` says; output and every gradient equal to
    eager's."""
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    block, ref = MLPBlock(), MLPBlock()
    ref.load_state_dict(block.state_dict())
    x = torch.randn(3, 5, 32)
    if entry == "apply":
        liger_fx.apply(block)
        step = DistributedDataParallel(block, bucket_cap_mb=BLOCK_BUCKET_MB)
    elif entry == "apply-ddp":
        step = liger_fx.apply(DistributedDataParallel(block, bucket_cap_mb=BLOCK_BUCKET_MB))
    elif entry == "bare":
        step = torch.compile(DistributedDataParallel(block, bucket_cap_mb=BLOCK_BUCKET_MB), backend="liger")
    else:
        compiled = torch.compile(DistributedDataParallel(block, bucket_cap_mb=BLOCK_BUCKET_MB), backend="liger")

        def step(inp):
            with ligerdist.split_after_rewrite():
                return compiled(inp)

    out = step(x)
    out.sum().backward()
    expected = ref(x)
    expected.sum().backward()
    torch.testing.assert_close(out, expected, **TOL)
    for name, p in ref.named_parameters():
        torch.testing.assert_close(block.get_parameter(name).grad, p.grad, **TOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("user", [True, "ddp_optimizer", False, "python_reducer"])
def test_split_after_rewrite_changes_only_the_default(user):
    with torch._dynamo.config.patch(optimize_ddp=user):
        with ligerdist.split_after_rewrite():
            inside, owned = torch._dynamo.config.optimize_ddp, ligerdist._OWN_SPLIT.get()
            with ligerdist.split_after_rewrite():  # nested (apply inside a user's scope): nothing more to do
                assert torch._dynamo.config.optimize_ddp == inside
            assert ligerdist._OWN_SPLIT.get() == owned
        assert torch._dynamo.config.optimize_ddp == user and not ligerdist._OWN_SPLIT.get()
    assert (inside, owned) == ((False, True) if user in (True, "ddp_optimizer") else (user, False))


# --------------------------------------------------------------------------------------------------------------
# The DDPOptimizer hook: what it changes, and what happens without it.


@pytest.mark.slow  # gloo on CPU
def test_bare_entry_cuts_where_dynamo_cuts(gloo_world_of_one):
    """The bare entry's buckets hold the same parameters as Dynamo's own split of the same graph (torch's own
    DDPOptimizer with a backend that only records), with one DDP module's caps."""
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    seen = {}
    original = ligerdist.compile_in_buckets

    def recording(gm, example_inputs, caps, compile_fn, record):
        seen["caps"] = caps
        optimizer = ligerdist._TORCH_DDP_OPTIMIZER(caps.bucket_bytes_cap, lambda g, x: g.forward,
                                                   caps.first_bucket_cap)
        optimizer.compile_fn(gm, example_inputs)
        seen["ours"] = [len(b.params) for b in optimizer.buckets]
        return original(gm, example_inputs, caps, compile_fn, record)

    def dynamo_split(gm, example_inputs):
        optimizer = ligerdist._TORCH_DDP_OPTIMIZER(seen["caps"].bucket_bytes_cap, lambda g, x: g.forward,
                                                   seen["caps"].first_bucket_cap)
        out = optimizer.compile_fn(gm, example_inputs)
        seen["dynamo"] = [len(b.params) for b in optimizer.buckets]
        return out

    ddp = DistributedDataParallel(MLPBlock(), bucket_cap_mb=BLOCK_BUCKET_MB)
    x = torch.randn(3, 5, 32)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ligerdist, "compile_in_buckets", recording)
        torch.compile(ddp, backend="liger")(x).sum().backward()
    (record,) = liger_fx.get_records()
    assert replaced("swiglu") == 1 and not record.misses and record.ddp_buckets == 4, record.summary()
    assert seen["caps"].bucket_bytes_cap == ddp.bucket_bytes_cap
    torch._dynamo.reset()
    with torch._dynamo.config.patch(optimize_ddp=False):  # one graph, to split by hand as Dynamo would
        torch.compile(ddp.module, backend=dynamo_split)(x)
    assert seen["ours"] == seen["dynamo"] and len(seen["dynamo"]) == 4, seen


@pytest.mark.slow  # gloo on CPU
def test_without_the_hook_dynamos_split_stands_with_a_near_miss_and_one_warning(gloo_world_of_one, caplog):
    """A torch whose DDPOptimizer call site the hook does not know: the bare entry keeps Dynamo's split, the SwiGLU
    cut between silu(gate) and * up is a near miss whose reason says so, and one warning names why."""
    import logging

    import torch._dynamo.backends.distributed as dist_backend

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dist_backend, "DDPOptimizer", ligerdist._TORCH_DDP_OPTIMIZER)
        mp.setattr(ligerdist, "_HOOK_MISSING", "torch 9.9.0: the hook was checked against torch 2.11 to 2.13 only")
        mp.setattr(ligerdist, "_warned", False)
        # torch's DDPOptimizer refuses a first bucket (DDP's 1 MiB) over the others (6 KiB here) at the first step
        mp.setattr(torch.distributed, "_DEFAULT_FIRST_BUCKET_BYTES", int(BLOCK_BUCKET_MB * 2**20))
        with caplog.at_level(logging.WARNING, logger="liger_fx"):
            _train_block_like_eager("bare")
    assert replaced("swiglu") == 0
    misses = [m for r in liger_fx.get_records() for m in r.misses]
    assert any(m.flag == "swiglu" and ligerdist.CUT_REASON in m.reason for m in misses), misses
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "torch 9.9.0" in warnings[0], warnings


def test_hook_is_installed_and_checks_the_torch_version(monkeypatch):
    import torch._dynamo.backends.distributed as dist_backend

    assert ligerdist._HOOK_MISSING is None and dist_backend.DDPOptimizer._liger_fx_hook  # torch 2.11 to 2.13
    assert issubclass(dist_backend.DDPOptimizer, ligerdist._TORCH_DDP_OPTIMIZER)
    monkeypatch.setattr(torch, "__version__", "2.14.0")
    assert "2.14.0" in ligerdist._hook_blocker()
    # Other backends get torch's DDPOptimizer behaviour, including its check of the first bucket.
    with pytest.raises(AssertionError, match="First bucket"):
        dist_backend.DDPOptimizer(bucket_bytes_cap=1024, backend_compile_fn=lambda g, x: g.forward)
    assert dist_backend.DDPOptimizer(bucket_bytes_cap=1024, backend_compile_fn=liger_backend).first_bucket_cap == 1024
