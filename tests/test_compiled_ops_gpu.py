"""On a GPU: the fused ops inside compiled graphs are launched by Inductor, and `mode="reduce-overhead"`
captures a whole training step with every fused op in CUDA graphs, with no cudagraph skip and no recompile.

CPU machines skip this file: Triton's interpreter cannot run under torch.compile (pytorch #152868). bench/gpu.sh
runs it on a lent GPU (PYTEST=...)."""

import logging

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import liger_fx
from liger_fx.kernels._library import OPAQUE
from liger_fx.models import mini_model
from tests.helpers import batch
from tests.tolerance import assert_close_rule

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

FLAGS = ("rms_norm", "rope", "swiglu", "fused_linear_cross_entropy")


@pytest.fixture(autouse=True)
def _check_the_analysis_cache(monkeypatch):
    """Every compile here also checks each hit of kernels/_library.py's store-analysis cache against torch's own
    analysis of that launch (the same as LIGER_FX_ANALYSIS_CACHE=check)."""
    import liger_fx.kernels._library as library

    monkeypatch.setattr(library, "CHECK", True)


def _norm(x, w):
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)


@pytest.mark.skipif(OPAQUE, reason="LIGER_FX_OPAQUE_OPS=1 registers opaque ops on purpose")
def test_inductor_launches_the_kernels_itself():
    """The generated code launches our Triton kernels and never calls the op through the dispatcher."""
    from torch._inductor.utils import run_and_get_code

    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(64, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    u = torch.randn(64, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def fn(x, w, g, u):
        return _norm(x, w).float().sum() + (F.silu(g) * u).float().sum()

    def step():
        out = torch.compile(fn, backend="liger")(x, w, g, u)
        out.backward()
        return out

    _, codes = run_and_get_code(step)
    code = "\n".join(codes)
    assert counters["liger_fx"]["rms_norm"] == 1 and counters["liger_fx"]["swiglu"] == 1
    # contiguous gate and up: the flat SwiGLU kernels (kernels/swiglu.py `_flat`)
    for kernel in ("_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel", "_swiglu_fwd_flat_kernel", "_swiglu_bwd_flat_kernel"):
        assert kernel in code, kernel
    assert "torch.ops.liger_fx.rms_norm" not in code and "torch.ops.liger_fx.swiglu" not in code


@pytest.mark.parametrize("path", ["plain", "apply"])
def test_reduce_overhead_captures_every_fused_op(path, caplog):
    """A bf16 Llama training step under CUDA graphs: every fused op rewritten, no `skipping cudagraphs` reason in the
    cudagraphs log, no skip counted, one compile for three steps, and the loss within the tolerance rule of the fp32
    model's (tests/tolerance.py; atol one bf16 ulp of the loss: the graph replays compute it from bf16 activations)."""
    torch.manual_seed(0)
    model = mini_model("llama", num_hidden_layers=2).to("cuda", torch.bfloat16)
    ref32 = mini_model("llama", num_hidden_layers=2).to("cuda")
    ref32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    eager = mini_model("llama", num_hidden_layers=2).to("cuda", torch.bfloat16)
    eager.load_state_dict(model.state_dict())
    ids, labels = batch(model.config.vocab_size, b=2, t=32)
    ids, labels = ids.cuda(), labels.cuda()
    if path == "plain":
        fn = torch.compile(model, backend="liger", options={"mode": "reduce-overhead"})
    else:
        fn = liger_fx.apply(model, mode="reduce-overhead")
    torch._logging.set_logs(cudagraphs=True)
    try:
        with caplog.at_level(logging.DEBUG):
            losses = []
            for _ in range(3):
                # Grads set to None each step, as a training loop's zero_grad does: accumulating into the previous
                # replay's gradient outputs reads memory the next replay overwrote (seen on the H200: "accessing
                # tensor output of CUDAGraphs that has been overwritten by a subsequent run").
                model.zero_grad(set_to_none=True)
                torch.compiler.cudagraph_mark_step_begin()
                loss = fn(input_ids=ids, labels=labels).loss
                loss.backward()
                losses.append(loss.detach().clone())
    finally:
        torch._logging.set_logs()
    skips = [r.getMessage() for r in caplog.records if "skipping cudagraphs" in r.getMessage()]
    assert not skips, skips
    assert counters["inductor"]["cudagraph_skips"] == 0
    assert all(counters["liger_fx"][f] >= 1 for f in FLAGS), dict(counters["liger_fx"])
    assert len(liger_fx.get_records()) == 1, [r.summary() for r in liger_fx.get_records()]
    with torch.no_grad():
        ref, same = ref32(input_ids=ids, labels=labels).loss, eager(input_ids=ids, labels=labels).loss
    for loss in losses:  # no optimizer step: the same loss each replay
        assert_close_rule(loss, ref, same, atol=torch.finfo(torch.bfloat16).eps * ref.abs().item(), name=path)


def _grads(model):
    return {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("model_type", ["qwen3", "gemma"])
def test_dynamic_true_fuses_every_site_with_inductor_launching_the_kernels(model_type):
    """`dynamic=True`: every norm's eps is a float input of Dynamo's graph there, pinned as a constant by
    the rewrite (rewrite.specialize), and the launchers run on symbolic row counts. Every site fuses as in a static
    compile, the generated code launches our kernels, a second length reuses the graph, and the loss and every
    gradient are within the tolerance rule of the fp32 model's (gradients compared by norm: a per-element rule over
    a whole bf16 model step would test the noise of single elements). qwen3: Llama casting and q/k norms; gemma:
    Gemma casting and GeGLU. CPU runs of the same check: tests/patterns/test_dynamic.py."""
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    model = mini_model(model_type).to("cuda", torch.bfloat16)
    state = model.state_dict()
    ref32 = mini_model(model_type).to("cuda")
    ref32.load_state_dict({k: v.float() for k, v in state.items()})
    eager = mini_model(model_type).to("cuda", torch.bfloat16)
    eager.load_state_dict(state)
    static = mini_model(model_type).to("cuda", torch.bfloat16)
    static.load_state_dict(state)
    ids, labels = batch(model.config.vocab_size, b=2, t=32)
    ids, labels = ids.cuda(), labels.cuda()

    torch.compile(static, backend="liger")(input_ids=ids, labels=labels).loss.backward()
    (static_record,) = liger_fx.get_records()
    liger_fx.clear_records()
    counters.clear()

    fn = torch.compile(model, backend="liger", dynamic=True)
    loss, codes = run_and_get_code(lambda: fn(input_ids=ids, labels=labels).loss)
    (record,) = liger_fx.get_records()  # the attempt Dynamo restarts to specialize the eps is not recorded
    assert record.counts() == static_record.counts() and not record.misses, record.summary()
    assert all(counters["liger_fx"][f] >= 1 for f in ("rms_norm", "rope", "fused_linear_cross_entropy"))
    code = "\n".join(codes)
    if not OPAQUE:
        assert "_rms_norm_fwd_kernel" in code and "torch.ops.liger_fx.rms_norm" not in code
    loss.backward()
    for m in (ref32, eager):
        m(input_ids=ids, labels=labels).loss.backward()
    ref = ref32(input_ids=ids, labels=labels).loss.detach()
    same = eager(input_ids=ids, labels=labels).loss.detach()
    assert_close_rule(loss.detach(), ref, same, atol=torch.finfo(torch.bfloat16).eps * ref.abs().item(), name="loss")
    ours, refs, sames = _grads(model), _grads(ref32), _grads(eager)
    assert set(ours) == set(refs)
    for name in refs:
        err, torch_err = (ours[name] - refs[name]).norm(), (sames[name] - refs[name]).norm()
        bound = 2 * torch_err + torch.finfo(torch.bfloat16).eps * refs[name].norm()
        assert err <= bound, f"{name}: |ours - fp32| {err:.3g} > {bound:.3g} (torch bf16: {torch_err:.3g})"

    ids2, labels2 = batch(model.config.vocab_size, b=2, t=48, seed=2)
    with torch.no_grad():
        ref2 = ref32(input_ids=ids2.cuda(), labels=labels2.cuda()).loss
        same2 = eager(input_ids=ids2.cuda(), labels=labels2.cuda()).loss
    loss2 = fn(input_ids=ids2.cuda(), labels=labels2.cuda()).loss.detach()
    assert len(liger_fx.get_records()) == 1, [r.summary() for r in liger_fx.get_records()]
    assert_close_rule(loss2, ref2, same2, atol=torch.finfo(torch.bfloat16).eps * ref2.abs().item(), name="loss t=48")


@pytest.mark.skipif(OPAQUE, reason="LIGER_FX_OPAQUE_OPS=1 registers opaque ops on purpose")
def test_swiglu_linear_writes_h_into_the_gradient_buffer():
    """The down projection fused with its SwiGLU (option fuse_swiglu_linear): the backward launches the gradient
    kernel with d(h)'s buffer as both its input and its h output (Inductor re-inplaced the op body's write; a clone
    would cost one more B*T*I copy), never the forward kernel again, and the loss and every gradient are within the
    tolerance rule of the fp32 module's (by norm, as above)."""
    import re

    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)

    class MLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate, self.up = torch.nn.Linear(256, 1024, bias=False), torch.nn.Linear(256, 1024, bias=False)
            self.down = torch.nn.Linear(1024, 256, bias=False)

        def forward(self, x):
            return self.down(F.silu(self.gate(x)) * self.up(x))

    ref32 = MLP().cuda()
    model, eager = MLP().cuda().bfloat16(), MLP().cuda().bfloat16()
    model.load_state_dict(ref32.state_dict())
    eager.load_state_dict(ref32.state_dict())
    x = torch.randn(4, 512, 256, device="cuda")
    dy = torch.randn(4, 512, 256, device="cuda")
    fn = torch.compile(model, backend="liger")

    def step():
        out = fn(x.bfloat16())
        out.backward(dy.bfloat16())
        return out

    out, codes = run_and_get_code(step)
    assert counters["liger_fx"]["swiglu_linear"] == 1, dict(counters["liger_fx"])
    bwd = [c for c in codes if "_swiglu_bwd_flat_kernel" in c]
    assert len(bwd) == 1, "no backward code launching the gradient kernel"
    assert "_swiglu_fwd_flat_kernel" not in bwd[0].split("def call(")[-1], "the backward recomputes h in its own launch"
    calls = re.findall(r"_swiglu_bwd_flat_kernel\w*\.run\(([^)]*)\)", bwd[0])
    assert len(calls) == 1, bwd[0].split("def call(")[-1][:3000]
    args = [a.strip() for a in calls[0].split(",")]
    assert args[0] == args[5], f"d(h) and h are different buffers (a copy): {calls[0]}"

    ref = ref32(x)
    ref.backward(dy)
    same = eager(x.bfloat16())
    same.backward(dy.bfloat16())
    eps = torch.finfo(torch.bfloat16).eps
    err, torch_err = (out.float() - ref).norm(), (same.float() - ref).norm()
    assert err <= 2 * torch_err + eps * ref.norm(), (err, torch_err)
    for (name, p), p32, pe in zip(model.named_parameters(), ref32.parameters(), eager.parameters()):
        err, torch_err = (p.grad.float() - p32.grad).norm(), (pe.grad.float() - p32.grad).norm()
        assert err <= 2 * torch_err + eps * p32.grad.norm(), f"{name}: {err:.3g} vs torch {torch_err:.3g}"


@pytest.mark.parametrize("form", ["nn", "nn_noaffine", "functional", "llama4", "dsv4", "autocast_off", "qk_heads"])
def test_native_rms_norm_forms_launch_the_kernels(form):
    """torch's own nn.RMSNorm / F.rms_norm (on CUDA its composite dispatches to `aten._fused_rms_norm`; pre-dispatch
    tracing keeps `aten.rms_norm`), and the norms without a weight (the kernels' HAS_WEIGHT=False path, whose
    backward is `rms_norm_backward_dx`): every norm fused, Inductor launching both kernels itself, the loss within
    the tolerance rule of the fp32 module's and the input's and every parameter's gradient too, by norm (as
    test_dynamic_true_fuses_every_site...: per element, a bf16 step's gradients test the noise of single elements)."""
    import copy

    from torch._inductor.utils import run_and_get_code

    from tests.patterns.test_rms_norm import NORM_FORMS, NormFront

    torch.manual_seed(0)
    ref32 = NormFront(form, hidden=512, heads=8).cuda()
    model, eager = copy.deepcopy(ref32).bfloat16(), copy.deepcopy(ref32).bfloat16()
    x = torch.randn(4, 256, 512, device="cuda").bfloat16()
    fn = torch.compile(model, backend="liger")
    results = []
    for m, compiled in ((ref32, False), (eager, False), (fn, True)):
        xi = (x.float() if m is ref32 else x).clone().requires_grad_()

        def step(m=m, xi=xi):
            loss = m(xi)
            loss.backward()
            return loss

        if compiled:
            loss, codes = run_and_get_code(step)
        else:
            loss = step()
        params = list((model if compiled else m).parameters())
        results.append([loss.detach(), xi.grad] + [p.grad for p in params])
    assert counters["liger_fx"]["rms_norm"] == NORM_FORMS[form], dict(counters["liger_fx"])
    code = "\n".join(codes)
    if not OPAQUE:
        assert "_rms_norm_fwd_kernel" in code and "_rms_norm_bwd_kernel" in code, form
        assert "torch.ops.liger_fx.rms_norm" not in code
    (ref, *ref_grads), (same, *same_grads), (loss, *grads) = results
    assert_close_rule(loss, ref, same, atol=torch.finfo(torch.bfloat16).eps * ref.abs().item(), name=f"{form} loss")
    for i, (r, t, o) in enumerate(zip(ref_grads, same_grads, grads)):
        err, torch_err = (o.float() - r).norm(), (t.float() - r).norm()
        bound = 2 * torch_err + torch.finfo(torch.bfloat16).eps * r.norm()
        assert err <= bound, f"{form} grad {i}: |ours - fp32| {err:.3g} > {bound:.3g} (torch bf16: {torch_err:.3g})"
