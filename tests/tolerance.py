"""The tolerance rule of STYLE.md: ours passes iff |ours - ref_fp32| <= 2 * |torch_same_dtype - ref_fp32| + atol.

`ref_fp32` is the reference computed in fp32 from the same inputs; `torch_same_dtype` is the same reference
computed in the inputs' dtype (what eager torch would give the user). In fp32 the second term is ~0 and atol
carries the check, so keep atol near fp32 rounding there.

One documented exception, `interpreter_slack`: Triton's CPU interpreter TRUNCATES fp32 -> bf16/fp16 instead of
rounding to nearest, even with fp_downcast_rounding="rtne" (measured on triton 3.9: 1.4453 -> 1.4375 where torch
gives 1.4453). That is up to one ulp per rounding and biased toward zero, so under the interpreter a low-precision
result gets `roundings * eps(dtype) * |value|` more. On CUDA the slack is 0 and the plain rule applies.
"""

import os

import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def interpreter_slack(magnitude, dtype, roundings=1):
    """Extra bound for values rounded `roundings` times to `dtype` by the interpreter; `magnitude` is |value| (or
    the sum of |terms| for a reduction over rounded terms)."""
    if not INTERPRETED or dtype == torch.float32:
        return 0.0
    return roundings * torch.finfo(dtype).eps * magnitude.float().abs()


def assert_close_rule(ours, ref_fp32, torch_same, atol, name="", slack=0.0):
    ours, ref, same = ours.float(), ref_fp32.float(), torch_same.float()
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    assert torch.isfinite(ours).all() or not torch.isfinite(ref).all(), f"{name}: non-finite values"
    bound = 2 * (same - ref).abs() + atol + slack
    err = (ours - ref).abs()
    bad = ~(err <= bound)
    if bad.any():
        i = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {ours.numel()} elements out of tolerance; first at {list(i)}: "
            f"ours {ours[i].item():.6g} ref {ref[i].item():.6g} torch {same[i].item():.6g} "
            f"(max err {err.max().item():.3g})"
        )


def rounding_flips(exact, rel, dtype):
    """One ulp of `dtype` where two computations of `exact`, each within rel * |exact| of it (in fp32), may round to
    `dtype` differently: only where a rounding midpoint lies within that distance (they are one ulp apart then).
    Needed where a rounded value feeds further arithmetic (a sum, a product that rounds again): the rule's torch
    term sees torch's final error, which can be small although its intermediate rounded the other way. 0 in fp32."""
    if dtype == torch.float32:
        return torch.zeros_like(exact)
    _, exp = torch.frexp(exact)  # |exact| in [2^(exp-1), 2^exp): ulp = eps * 2^(exp-1)
    ulp = torch.finfo(dtype).eps * torch.exp2((exp - 1).double())
    to_midpoint = (ulp / 2 - (exact - exact.to(dtype).double()).abs()).abs()
    return ulp * (to_midpoint <= 2 * rel * exact.abs())


def poison_(t):
    """Fill with NaN (floats) so an element the kernel forgets to write fails every comparison."""
    return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-(2**30))


def dlogits_rel_error(lse, x=None, softcap=0.0, scale=1.0):
    """Per-element bound (relative to |dlogits|) on how far an fp32 gradient of cross-entropy may sit from the exact
    one, ours or torch's, with its cause:
    - eps/2 * |lse|: the kernels save one fp32 LSE per row (4 bytes) and form p = exp(z - lse) from it. Rounding lse
      costs up to half an ulp of |lse| absolute, i.e. that much relative error in every p of the row (1.2e-6 at
      lse = 20: std-4 logits over V=32k..128k). torch subtracts the row max first and keeps ~1 ulp; at the CUDA
      shapes this was the failing term (fp32-mean, 4133x32011 and 1024x128256).
    - eps * |z - lse|: exp's argument is itself rounded (the subtraction, and Triton's exp = ex2(a * log2 e)), each
      half an ulp of |a|, which exp turns into that much relative error of p; torch's z - max has the like. Small
      for the large p, 30+ eps for the tiny ones far below the LSE (needs `x`; omitted without it).
    - 4 eps: exp (ex2.approx on CUDA, ~2 ulp), the product with grad_scale and dz, on either side.
    - softcap: dz = 1 - tanh^2 loses relative precision as tanh saturates: ~2 eps / (1 - tanh^2) on either side.
    `lse` is (N,), `x` the (N, V) logits, `softcap` and `scale` the transform that makes z of them."""
    eps = torch.finfo(torch.float32).eps
    rel = (eps * (lse.double().abs() / 2 + 4))[:, None]
    if x is not None:
        z = x.double()
        if softcap:
            z = torch.tanh(z / softcap) * softcap
        rel = rel + eps * (z * scale - lse.double()[:, None]).abs()
    if softcap:
        rel = rel + 4 * eps / (1 - torch.tanh(x.double() / softcap) ** 2).clamp_min(1e-30)
    return rel


def assert_max_error_rule(ours, ref_fp32, torch_same, name="", atol=None):
    """STYLE's rule in flash-attn's own form: per tensor, max |ours - ref_fp32| <= 2 * max |torch_same - ref_fp32|
    + atol. For whole-model gradients, where every op between the loss and the parameter rounds in both
    computations: elementwise, two half-precision computations that round differently agree with the reference by
    chance, element by element (fp16 tiny Llama, 1 layer: 383 of 4096 q_proj grad elements outside 2 * |eager's
    error| + 1 ulp, while our max error, 9.7e-7, was below eager's, 1.3e-6). atol defaults to the fp32 rounding of
    the reference's largest element: the reference is exact only to that."""
    ours, ref, same = ours.float(), ref_fp32.float(), torch_same.float()
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    assert torch.isfinite(ours).all() or not torch.isfinite(ref).all(), f"{name}: non-finite values"
    if atol is None:
        atol = torch.finfo(torch.float32).eps * ref.abs().max().item()
    err, torch_err = (ours - ref).abs().max().item(), (same - ref).abs().max().item()
    assert err <= 2 * torch_err + atol, f"{name}: max error {err:.3g} > 2 * torch's {torch_err:.3g} + {atol:.3g}"
