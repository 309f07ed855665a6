"""The RoPE kernel (Triton, through the interpreter on CPU) and the liger_fx::rope / rope_qk ops against the fp32
reference, with STYLE's tolerance rule: forward, and the gradients of q and of k; in HF's halves layout and with
interleaved pairs (x_pairs: x's, y_pairs: the result's and the tables')."""

import pytest
import torch

from liger_fx.kernels import rope as R
from tests.tolerance import INTERPRETED, assert_close_rule, interpreter_slack, poison_

CUDA = torch.cuda.is_available()
# The kernel runs on CUDA, or on CPU through the interpreter (conftest sets it only where there is no GPU).
DEVICES = ["cuda"] if CUDA else ["cpu"]
ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-3}  # values are O(1): fp32 rounding, and far below a bf16 ulp (8e-3)
# (B, q heads, kv heads, T, head_dim, rotary_dim, layout, cos batch)
#   bhtd: contiguous (B, H, T, D), cos.unsqueeze(1)
#   view: HF's q, a (B, H, T, D) transpose of (B, T, H, D) memory, cos.unsqueeze(1)
#   bthd: (B, T, H, D) rotated in place of layout, cos.unsqueeze(2)
CASES = {
    "round": (2, 4, 2, 16, 64, 64, "bhtd", 2),
    "T1": (2, 4, 4, 1, 64, 64, "view", 1),
    "T123_d80": (1, 3, 1, 123, 80, 80, "view", 1),
    "d128_q7_kv1": (1, 7, 1, 9, 128, 128, "bhtd", 1),
    "partial25_bthd": (2, 4, 2, 8, 64, 16, "bthd", 2),
    "partial50_d80": (1, 5, 1, 11, 80, 40, "view", 1),
    "batch_gt_heads": (5, 2, 1, 6, 32, 32, "view", 1),  # the head axis is where q and k differ, not the largest
}
GPU_CASES = {
    "llama8b_B8_T2048": (8, 32, 8, 2048, 128, 128, "view", 1),
    "neox_partial25_T1000": (4, 16, 16, 1000, 128, 32, "view", 4),
    "bthd_q7_kv1_d80": (3, 7, 1, 517, 80, 80, "bthd", 3),
}


def make(case, dtype, device, seed=0):
    B, HQ, HK, T, D, RD, layout, CB = case
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    if layout == "bthd":
        q, k, ud = rand(B, T, HQ, D), rand(B, T, HK, D), 2
    elif layout == "view":
        q, k, ud = rand(B, T, HQ, D).transpose(1, 2), rand(B, T, HK, D).transpose(1, 2), 1
    else:
        q, k, ud = rand(B, HQ, T, D), rand(B, HK, T, D), 1
    # Random tables, not unit-circle ones: the two halves of cos/sin differ, so the general formula is tested.
    cos, sin = rand(CB, T, RD).unsqueeze(ud), rand(CB, T, RD).unsqueeze(ud)
    return q, k, cos, sin


def hf_rope(x, cos, sin):
    """HF's partial-rotary apply_rotary_pos_emb for one tensor, in whatever dtype it is given."""
    rd = cos.shape[-1]
    xr = x[..., :rd]
    return torch.cat(((xr * cos) + (R.rotate_half(xr) * sin), x[..., rd:]), dim=-1)


# (x_pairs, y_pairs): GPT-J and complex RoPE read and write pairs; DeepSeek's HF code reads pairs and writes halves
LAYOUTS = {"pairs": (True, True), "pairs_to_halves": (True, False), "halves_to_pairs": (False, True)}


def layout_rope(x, cos, sin, x_pairs=False, y_pairs=False):
    """hf_rope with the interleaved pairs of the first rd channels gathered into halves before it (x_pairs; the
    tables too with y_pairs) and scattered back after it (y_pairs): channel indices, not the views rope_ref uses."""
    rd, width = cos.shape[-1], x.shape[-1]
    order = torch.tensor(list(range(0, rd, 2)) + list(range(1, rd, 2)), device=x.device)
    full = torch.cat((order, torch.arange(rd, width, device=x.device)))
    if x_pairs:
        x = x[..., full]
    if y_pairs:
        cos, sin = cos[..., order], sin[..., order]
    y = hf_rope(x, cos, sin)
    return y[..., torch.argsort(full)] if y_pairs else y


def expected(x, cos, sin, dy, x_pairs=False, y_pairs=False):
    """(fp32 forward, fp32 grad, same-dtype forward, same-dtype grad) of HF's formula."""
    out = {}
    for name, cast in (("ref", torch.float32), ("same", x.dtype)):
        xr = x.detach().to(cast).requires_grad_()
        y = layout_rope(xr, cos.to(cast), sin.to(cast), x_pairs, y_pairs)
        (dx,) = torch.autograd.grad(y, xr, dy.to(cast))
        out[name] = (y.detach(), dx)
    return out["ref"] + out["same"]


@pytest.fixture
def poisoned(monkeypatch):
    real = R._empty_like
    monkeypatch.setattr(R, "_empty_like", lambda x, dtype: poison_(real(x, dtype)))


def check_kernel(case, dtype, device, x_pairs=False, y_pairs=False):
    q, k, cos, sin = make(case, dtype, device)
    dq_out, dk_out = torch.randn_like(q), torch.randn_like(k)
    pairs = (x_pairs, y_pairs)
    yq, yk = R.rope_qk_fwd(q, k, cos, sin, None, None, *pairs)
    (y1,) = (R.rope_fwd(q, cos, sin, None, *pairs),)
    dq, dk = R.rope_qk_bwd(dq_out, dk_out, cos, sin, q.dtype, k.dtype, *pairs)
    dq1 = R.rope_bwd(dq_out, cos, sin, q.dtype, *pairs)
    for name, x, y, g, dx in (("q", q, yq, dq_out, dq), ("k", k, yk, dk_out, dk), ("q alone", q, y1, dq_out, dq1)):
        ref, dref, same, dsame = expected(x, cos, sin, g, *pairs)
        assert y.dtype == x.dtype and dx.dtype == x.dtype
        assert y.stride() == x.stride() and dx.stride() == x.stride(), f"{name}: layout differs from the input's"
        # under the interpreter, one truncation to bf16 (tests/tolerance.py); nothing on a GPU
        assert_close_rule(y, ref, same, ATOL[dtype], f"{name} forward", slack=interpreter_slack(ref, dtype))
        assert_close_rule(dx, dref, dsame, ATOL[dtype], f"{name} grad", slack=interpreter_slack(dref, dtype))
        rd = cos.shape[-1]
        assert torch.equal(y[..., rd:], x[..., rd:]), f"{name}: pass-through channels changed"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
@pytest.mark.parametrize("device", DEVICES)
def test_kernel(case, dtype, device, poisoned):
    check_kernel(CASES[case], dtype, device)


# T123_d80 left out: 9 s a layout and dtype under the interpreter, and its odd sizes are in the halves cases above.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("case", [c for c in CASES if c != "T123_d80"])
@pytest.mark.parametrize("device", DEVICES)
def test_kernel_interleaved(case, layout, dtype, device, poisoned):
    check_kernel(CASES[case], dtype, device, *LAYOUTS[layout])


def test_interleaved_reference_is_the_rotation_of_pairs():
    """rope_ref's pairs against GPT-J's formula written out: y[2i] = x[2i] c_i - x[2i+1] s_i, y[2i+1] = x[2i+1] c_i +
    x[2i] s_i with repeat-interleaved tables, and DeepSeek's cat of the rotated even and odd channels."""
    x, f = torch.randn(2, 3, 5, 12), torch.randn(1, 1, 5, 4)
    c, s = f.cos(), f.sin()
    x1, x2 = x[..., 0:8:2], x[..., 1:8:2]
    gptj = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), -1).flatten(-2)
    ci, si = c.repeat_interleave(2, -1), s.repeat_interleave(2, -1)
    torch.testing.assert_close(R.rope_ref(x, ci, si, None, True, True), torch.cat((gptj, x[..., 8:]), -1))
    deepseek = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), -1)
    ch, sh = torch.cat((c, c), -1), torch.cat((s, s), -1)
    torch.testing.assert_close(R.rope_ref(x, ch, sh, None, True, False), torch.cat((deepseek, x[..., 8:]), -1))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("layout", ["halves", *LAYOUTS])
@pytest.mark.parametrize("case", list(GPU_CASES), ids=list(GPU_CASES))
def test_kernel_large_bf16(case, layout, poisoned):
    check_kernel(GPU_CASES[case], torch.bfloat16, "cuda", *LAYOUTS.get(layout, (False, False)))


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_dtypes_round_once(device, poisoned):
    """cos/sin in fp32 with bf16 q: eager promotes to fp32; with out_dtype=bf16 (HF's `.to(q.dtype)` after the fp32
    math) the fp32 result is rounded once."""
    q, k, cos, sin = make(CASES["partial50_d80"], torch.bfloat16, device)
    cos, sin = cos.float() * 0.5, sin.float() * 0.5
    ref = R.rope_ref(q, cos, sin)
    assert ref.dtype == torch.float32
    y = R.rope_fwd(q, cos, sin)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=1e-6)
    # Rounded once: exactly the kernel's own fp32 result, rounded (FMA contraction may move that fp32 result by an
    # ulp from torch's, so the comparison is against the kernel's fp32 output, itself checked against torch above).
    assert torch.equal(R.rope_fwd(q, cos, sin, torch.bfloat16), to_bf16(y, device))
    g = torch.randn(y.shape, device=device)
    dq32 = R.rope_bwd(g, cos, sin, torch.float32)
    torch.testing.assert_close(dq32, R.rope_ref_backward(g, cos, sin, torch.float32), atol=1e-6, rtol=1e-6)
    assert torch.equal(R.rope_bwd(g, cos, sin, torch.bfloat16), to_bf16(dq32, device))


def to_bf16(t, device):
    """One rounding of fp32 to bf16, as the kernel does it: to nearest on a GPU, toward zero in Triton 3.9's
    interpreter (its fp32 -> bf16 cast passes no rounding mode)."""
    if INTERPRETED and device == "cpu":
        return (t.float().view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)
    return t.to(torch.bfloat16)


@pytest.mark.parametrize("device", DEVICES)
def test_three_dim_input(device):
    """A single-head (B, T, D) tensor with a (1, T, D) table."""
    x, cos, sin = (torch.randn(s, device=device) for s in ((3, 10, 32), (1, 10, 32), (1, 10, 32)))
    torch.testing.assert_close(R.rope_fwd(x, cos, sin), hf_rope(x, cos, sin), atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------------------------------------------
# The library ops (their CPU implementation is the reference; on CUDA, the kernel)


@pytest.mark.parametrize("layout", ["halves", *LAYOUTS])
@pytest.mark.parametrize("device", DEVICES)
def test_ops_match_eager_autograd(device, layout):
    pairs = LAYOUTS.get(layout, (False, False))
    q, k, cos, sin = make(CASES["partial25_bthd"], torch.float32, device)
    q.requires_grad_(), k.requires_grad_()
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    yq, yk = R.rope_qk(q, k, cos, sin, None, None, *pairs)
    dq, dk = torch.autograd.grad((yq, yk), (q, k), (gq, gk))
    y1 = R.rope(q, cos, sin, None, *pairs)
    (dq1,) = torch.autograd.grad(y1, q, gq)
    for x, y, g, dx in ((q, yq, gq, dq), (k, yk, gk, dk), (q, y1, gq, dq1)):
        ref, dref, _, _ = expected(x, cos, sin, g, *pairs)
        torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(dx, dref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["view", "partial", "partial_pairs_to_halves"])
def test_opcheck(case):
    """Schema, fake tensors (strides included), autograd registration and AOT dispatch of all four ops."""
    q, k, cos, sin = make(CASES["T123_d80" if case == "view" else "partial25_bthd"], torch.float32, "cpu")
    q, k = q[:, :, :7].requires_grad_(), k[:, :, :7].requires_grad_()
    cos, sin = cos[:, :, :7], sin[:, :, :7]
    dt = torch.float32
    pairs = LAYOUTS["pairs_to_halves"] if case.endswith("halves") else ()
    torch.library.opcheck(torch.ops.liger_fx.rope.default, (q, cos, sin, dt, *pairs))
    torch.library.opcheck(torch.ops.liger_fx.rope_qk.default, (q, k, cos, sin, dt, dt, *pairs))
    g = torch.randn_like(q)
    torch.library.opcheck(torch.ops.liger_fx.rope_backward.default, (g, cos, sin, dt, *pairs))
    torch.library.opcheck(torch.ops.liger_fx.rope_qk_backward.default,
                          (g, torch.randn_like(k), cos, sin, dt, dt, *pairs))


def test_table_requiring_grad_is_refused():
    q, _, cos, sin = make(CASES["round"], torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="cos and sin must not require grad"):
        R.rope(q.requires_grad_(), cos.requires_grad_(), sin)


@pytest.mark.parametrize(
    "shapes, message",
    [
        (((2, 4, 8, 16), (2, 8, 15)), "must be even"),
        (((2, 4, 8, 16), (2, 8, 32)), "at most head dim"),
        (((2, 4, 8, 16), (2, 4, 8, 16)), "every axis"),
        (((2, 4, 8, 16), (3, 1, 8, 16)), "does not broadcast"),
    ],
)
def test_bad_shapes_are_named(shapes, message):
    xs, cs = shapes
    x, c = torch.randn(xs), torch.randn(cs)
    with pytest.raises(ValueError, match=message):
        R.rope_fwd(x, c, c)


def test_q_and_k_differing_off_the_head_axis_are_refused():
    q, k, c = torch.randn(2, 4, 8, 16), torch.randn(3, 2, 8, 16), torch.randn(1, 1, 8, 16)
    with pytest.raises(ValueError, match="may differ only on one axis"):
        R.rope_qk_fwd(q, k, c, c)
