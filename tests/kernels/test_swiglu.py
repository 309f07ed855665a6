"""liger_fx::swiglu / swiglu_packed: Triton launchers against an fp32 autograd reference, and the library ops.

On CPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1) at a handful of rows; on CUDA the
same tests run at thousands of rows. The reference is torch autograd of `act(gate) * up` in fp64, independent of the
hand-written derivatives in kernels/swiglu.py: in fp32 torch's own GELU-tanh gradient is off by 2e-6 relative where
tanh saturates (1 - tanh^2 cancels), so an fp32 reference would measure torch's error, not ours.
"""

import pytest
import torch
import torch.nn.functional as F

from liger_fx.kernels import swiglu as k
from tests.tolerance import assert_close_rule, interpreter_slack, poison_

# One device: on a CUDA machine TRITON_INTERPRET is off (tests/conftest.py), so the launchers cannot take CPU tensors
# there; the CPU implementation of the ops is the reference, which the interpreter runs cover.
DEVICES = ["cuda"] if torch.cuda.is_available() else ["cpu"]
WIDTHS = [123, 2048, 4864, 11008]  # 2048: the flat kernels without a mask (the block divides the row)
DTYPES = [torch.float32, torch.bfloat16]


def _rows(device):
    return (2, 3) if device == "cpu" else (4, 1024)  # the interpreter runs ~1k programs a second


def _eager(gate, up, act):
    a = F.silu(gate) if act == "silu" else F.gelu(gate, approximate="tanh" if act == "gelu_tanh" else "none")
    return a * up


def _eager_fwd_bwd(gate, up, dy, act, dtype):
    """Forward and both grads of eager torch, computed in `dtype` from the same values."""
    g = gate.detach().to(dtype).requires_grad_()
    u = up.detach().to(dtype).requires_grad_()
    y = _eager(g, u, act)
    dg, du = torch.autograd.grad(y, (g, u), dy.to(dtype))
    return y, dg, du


def _atol(ref, dtype):
    """Our one rounding of an fp32 result to `dtype` (half an ulp, eps/2 relative), plus fp32 noise from a different
    sigmoid/tanh/erf (~1e-6 relative, measured 4e-7); the 2x|torch - ref| term of the rule does the rest. Under the
    interpreter, which truncates to bf16, one more ulp (tests/tolerance.py)."""
    return ref.abs().float() * max(torch.finfo(dtype).eps / 2, 1e-6) + 1e-5 + interpreter_slack(ref, dtype, 1)


def _check_all(ours, dtype, gate, up, dy, act):
    ref = _eager_fwd_bwd(gate, up, dy, act, torch.float64)
    same = _eager_fwd_bwd(gate, up, dy, act, dtype)
    for name, o, r, s in zip(("out", "dgate", "dup"), ours, ref, same):
        assert o.dtype == dtype, f"{name}: dtype {o.dtype}"
        assert_close_rule(o, r, s, _atol(r, dtype), name=f"{name} ({act}, {dtype})")


def _inputs(shape, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    # gate at scale 3 reaches the saturated tails of sigmoid/tanh/erf, where a wrong derivative shows.
    gate = (3 * torch.randn(shape, generator=g)).to(dtype).to(device)
    up = torch.randn(shape, generator=g).to(dtype).to(device)
    dy = torch.randn(shape, generator=g).to(dtype).to(device)
    return gate, up, dy


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("act", k.ACTS)
def test_split_forward_and_both_grads(device, dtype, width, act):
    shape = (*_rows(device), width)
    gate, up, dy = _inputs(shape, dtype, device)
    y = k.swiglu_fwd(gate, up, act, out=poison_(torch.empty_like(gate)))
    dg, du = k.swiglu_bwd(dy, gate, up, act, out=(poison_(torch.empty_like(gate)), poison_(torch.empty_like(up))))
    _check_all((y, dg, du), dtype, gate, up, dy, act)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("width", [123, 4864])
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_packed_forward_and_grad_of_the_packed_tensor(device, dtype, width, act):
    shape = (*_rows(device), 2 * width)
    gate_up, _, _ = _inputs(shape, dtype, device, seed=1)
    dy = torch.randn(*shape[:-1], width, dtype=torch.float32).to(dtype).to(device)
    y = k.swiglu_packed_fwd(gate_up, act, out=poison_(gate_up.new_empty(dy.shape)))
    dgu = k.swiglu_packed_bwd(dy, gate_up, act, out=poison_(torch.empty_like(gate_up)))
    gate, up = gate_up.chunk(2, dim=-1)
    dg, du = dgu.chunk(2, dim=-1)
    _check_all((y, dg, du), dtype, gate, up, dy, act)


@pytest.mark.parametrize("device", DEVICES)
def test_split_reads_strided_halves_in_place(device):
    """The halves of a packed tensor, passed as views with row stride 2I, give the same result as copies."""
    gate_up, _, _ = _inputs((*_rows(device), 2 * 123), torch.bfloat16, device, seed=2)
    gate, up = gate_up.chunk(2, dim=-1)
    assert gate.stride(-2) == 2 * 123
    dy = torch.randn(gate.shape).to(gate)
    y = k.swiglu_fwd(gate, up, "silu")
    dg, du = k.swiglu_bwd(dy, gate, up, "silu")
    y_c = k.swiglu_fwd(gate.contiguous(), up.contiguous(), "silu")
    dg_c, du_c = k.swiglu_bwd(dy, gate.contiguous(), up.contiguous(), "silu")
    assert torch.equal(y, y_c) and torch.equal(dg, dg_c) and torch.equal(du, du_c)


@pytest.mark.parametrize("device", DEVICES)
def test_zero_rows(device):
    gate = torch.empty(0, 7, 64, device=device)
    assert k.swiglu_fwd(gate, gate, "silu").shape == (0, 7, 64)
    assert k.swiglu_packed_bwd(gate[..., :32], gate, "silu").shape == (0, 7, 64)


# --------------------------------------------------------------------------------------------------------------
# The library ops: autograd wiring, fake registration, no writes into saved inputs. On CPU they run the reference.


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act", k.ACTS)
def test_ops_autograd_matches_eager_and_leaves_inputs_untouched(device, act):
    gate, up, dy = _inputs((2, 5, 96), torch.float32, device, seed=3)
    gate_up = torch.cat([gate, up], dim=-1)
    saved = [t.clone() for t in (gate, up, gate_up)]

    g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
    y = k.swiglu(g, u, act)
    y.backward(dy)
    gu = gate_up.clone().requires_grad_()
    yp = k.swiglu_packed(gu, act)
    yp.backward(dy)
    for a, b in zip((g, u, gu), saved):
        assert torch.equal(a.detach(), b), "an input was written to"

    ref_y, ref_dg, ref_du = _eager_fwd_bwd(gate, up, dy, act, torch.float32)
    tol = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, ref_y, **tol)
    torch.testing.assert_close(g.grad, ref_dg, **tol)
    torch.testing.assert_close(u.grad, ref_du, **tol)
    torch.testing.assert_close(yp, ref_y, **tol)
    torch.testing.assert_close(gu.grad, torch.cat([ref_dg, ref_du], -1), **tol)


@pytest.mark.parametrize("act", ["silu", "gelu"])
def test_opcheck(act):
    gate, up, _ = _inputs((3, 4, 16), torch.float32, "cpu", seed=4)
    torch.library.opcheck(torch.ops.liger_fx.swiglu, (gate.requires_grad_(), up.requires_grad_(), act))
    gate_up = torch.randn(3, 4, 32, requires_grad=True)
    torch.library.opcheck(torch.ops.liger_fx.swiglu_packed, (gate_up, act))


def test_bad_arguments_name_the_problem():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="'relu'"):
        k.swiglu(x, x, "relu")
    with pytest.raises(ValueError, match="match in shape"):
        k.swiglu(x, x[:, :4], "silu")
    with pytest.raises(ValueError, match="even"):
        k.swiglu_packed(torch.randn(2, 7))
    with pytest.raises(ValueError, match=r"swiglu_linear: weight must be \(out, 8\)"):
        k.swiglu_linear(x, x, torch.randn(4, 6), "silu")
    with pytest.raises(ValueError, match="swiglu_linear: gate and up must match"):
        k.swiglu_linear(x, x[:, :4], torch.randn(4, 8), "silu")
    with pytest.raises(ValueError, match="swiglu_packed_linear: last dim must be even"):
        k.swiglu_packed_linear(torch.randn(2, 7), torch.randn(4, 3))


# --------------------------------------------------------------------------------------------------------------
# swiglu_linear / swiglu_packed_linear: the gated product and the down projection after it, whose backward writes
# act(gate) * up (for the weight gradient) from the SwiGLU gradient kernel, into the buffer that held d(h).


def _linear_inputs(device, dtype, width, hidden=48, seed=5):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    rows = _rows(device)
    gate = (3 * torch.randn(*rows, width, generator=gen)).to(dtype).to(device)
    up = torch.randn(*rows, width, generator=gen).to(dtype).to(device)
    w = (torch.randn(hidden, width, generator=gen) / width**0.5).to(dtype).to(device)
    dout = torch.randn(*rows, hidden, generator=gen).to(dtype).to(device)
    return gate, up, w, dout


def _linear_eager(gate, up, w, dout, act, dtype):
    """out, d gate, d up of eager torch in `dtype`."""
    g, u = gate.detach().to(dtype).requires_grad_(), up.detach().to(dtype).requires_grad_()
    out = F.linear(_eager(g, u, act), w.to(dtype))
    dg, du = torch.autograd.grad(out, (g, u), dout.to(dtype))
    return out, dg, du


def _check_linear(ours, gate, up, w, dout, act, dtype):
    """Bounds beyond the rule's torch term, each with its cause (fp64 from the data; `terms` = sum of |products|):
    - h: ours rounds act(gate) * up to `dtype` once, eager twice; where eager's roundings cancel, ours need not:
      half an ulp of each h, carried through the matmul (eps/2 * terms);
    - order: the matmul's K products summed in an order the library picks: eps32 * sqrt(K) * terms, as in
      test_fused_linear_cross_entropy; in bf16 also split-K partial sums added in bf16 (eps/2 * terms);
    - dh: d(h) = d(out) @ W is rounded to `dtype` once on either side, then multiplied by u * act'(gate) (or act(gate))
      in fp32 by ours and in `dtype` by eager: half an ulp of |d(out)| @ |W|, carried by that factor;
    - own_ulp: each output rounded once by us; where eager's error cancels, ours need not (0 in fp32);
    - interpreter: h and the gradients truncated once more (tests/tolerance.py)."""
    ref = _linear_eager(gate, up, w, dout, act, torch.float64)
    same = _linear_eager(gate, up, w, dout, act, dtype)
    eps, eps32 = torch.finfo(dtype).eps, torch.finfo(torch.float32).eps
    low = dtype != torch.float32
    g64, u64, w64, dout64 = gate.double(), up.double(), w.double(), dout.double()
    a64 = k._act_ref(g64, act)
    terms_out = (a64 * u64).abs() @ w64.abs().t()
    terms_dh = dout64.abs() @ w64.abs()
    factors = ((u64 * k._act_grad_ref(g64, act)).abs(), a64.abs())
    slack_out = (eps / 2 + eps32 * w.shape[1] ** 0.5 + (eps / 2 if low else 0)) * terms_out
    slack_out = slack_out + (eps * ref[0].abs() if low else 0) + interpreter_slack(terms_out, dtype, 1)
    assert_close_rule(ours[0], ref[0], same[0], 4 * eps32 * ref[0].abs().max().item(), "out", slack=slack_out)
    dh_err = (eps / 2 + eps32 * w.shape[0] ** 0.5 + (eps / 2 if low else 0)) * terms_dh
    dh_err = dh_err + interpreter_slack(terms_dh, dtype, 1)
    for name, o, r, s, f in zip(("dgate", "dup"), ours[1:], ref[1:], same[1:], factors):
        slack = f * dh_err + (eps * r.abs() if low else 0) + interpreter_slack(r, dtype, 1)
        assert_close_rule(o, r, s, _atol(r, dtype), f"{name} ({act}, {dtype})", slack=slack)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("width", [123, 2048])
@pytest.mark.parametrize("act", k.ACTS)
def test_linear_forward_and_grads_with_h_from_the_gradient_kernel(device, dtype, width, act):
    gate, up, w, dout = _linear_inputs(device, dtype, width)
    out = k.swiglu_linear_fwd(gate, up, w, act)
    dg, du, h = k.swiglu_linear_bwd(dout, gate, up, w, act,
                                    out=(poison_(torch.empty_like(gate)), poison_(torch.empty_like(up))))
    _check_linear((out, dg, du), gate, up, w, dout, act, dtype)
    # h is the forward's own value, bit for bit: the weight gradient sees what the forward multiplied by W
    assert torch.equal(h, k.swiglu_fwd(gate, up, act)), "h from the backward differs from the forward's"
    assert torch.equal(out, F.linear(h, w)) or device == "cuda"  # CPU: the same torch matmul of the same h

    gate_up = torch.cat([gate, up], dim=-1)
    outp = k.swiglu_packed_linear_fwd(gate_up, w, act)
    dgu, hp = k.swiglu_packed_linear_bwd(dout, gate_up, w, act, out=poison_(torch.empty_like(gate_up)))
    assert torch.equal(outp, out) and torch.equal(hp, h)
    assert torch.equal(dgu, torch.cat([dg, du], dim=-1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_linear_ops_autograd_matches_eager(device, act):
    """The library ops: forward, d gate, d up and d weight against eager fp32 autograd; a frozen weight gets no
    gradient; the saved inputs are not written."""
    gate, up, w, dout = _linear_inputs(device, torch.float32, 96, hidden=40, seed=6)
    gate_up = torch.cat([gate, up], dim=-1)
    saved = [t.clone() for t in (gate, up, gate_up, w)]
    g, u, gu = gate.clone().requires_grad_(), up.clone().requires_grad_(), gate_up.clone().requires_grad_()
    w1, w2 = w.clone().requires_grad_(), w.clone().requires_grad_()
    out = k.swiglu_linear(g, u, w1, act)
    out.backward(dout)
    outp = k.swiglu_packed_linear(gu, w2, act)
    outp.backward(dout)
    for a, b in zip((g, u, gu, w1), saved):
        assert torch.equal(a.detach(), b), "an input was written to"

    rg, ru, rw = gate.clone().requires_grad_(), up.clone().requires_grad_(), w.clone().requires_grad_()
    ref = F.linear(_eager(rg, ru, act), rw)
    ref.backward(dout)
    tol = dict(atol=1e-5, rtol=1e-5)
    for got in (out, outp):
        torch.testing.assert_close(got, ref, **tol)
    torch.testing.assert_close(g.grad, rg.grad, **tol)
    torch.testing.assert_close(u.grad, ru.grad, **tol)
    torch.testing.assert_close(gu.grad, torch.cat([rg.grad, ru.grad], -1), **tol)
    # d(weight) sums dout * h over all rows (1024s on CUDA): ours reads h from our kernel, eager its own silu(g) * u,
    # each within ~1 fp32 ulp of the other, and the two matmuls may sum in different orders: 2 eps32 * sum|terms|.
    terms = dout.reshape(-1, dout.shape[-1]).abs().t() @ _eager(gate, up, act).reshape(-1, gate.shape[-1]).abs()
    for got in (w1.grad, w2.grad):
        assert ((got - rw.grad).abs() <= 2 * torch.finfo(torch.float32).eps * terms + 1e-6).all(), \
            (got - rw.grad).abs().max()

    g.grad = None
    k.swiglu_linear(g, u, w, act).backward(dout)  # frozen weight
    torch.testing.assert_close(g.grad, rg.grad, **tol)


@pytest.mark.parametrize("act", ["silu", "gelu"])
def test_linear_opcheck(act):
    gate, up, w, _ = _linear_inputs("cpu", torch.float32, 16, hidden=8, seed=7)
    torch.library.opcheck(torch.ops.liger_fx.swiglu_linear,
                          (gate.requires_grad_(), up.requires_grad_(), w.requires_grad_(), act))
    torch.library.opcheck(torch.ops.liger_fx.swiglu_packed_linear,
                          (torch.cat([gate, up], -1).detach().requires_grad_(), w, act))
