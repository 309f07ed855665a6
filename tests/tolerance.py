"""The tolerance rule of STYLE.md: ours passes iff |ours - ref_fp32| <= 2 * |torch_same_dtype - ref_fp32| + atol.

`ref_fp32` is the reference computed in fp32 from the same inputs; `torch_same_dtype` is the same reference
computed in the inputs' dtype (what eager torch would give the user). In fp32 the second term is ~0 and atol
carries the check, so keep atol near fp32 rounding there (1e-5 relative to the data's scale).
"""

import torch


def assert_close_rule(ours, ref_fp32, torch_same, atol, name=""):
    ours, ref, same = ours.float(), ref_fp32.float(), torch_same.float()
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} vs {tuple(ref.shape)}"
    assert torch.isfinite(ours).all() or not torch.isfinite(ref).all(), f"{name}: non-finite values"
    bound = 2 * (same - ref).abs() + atol
    err = (ours - ref).abs()
    bad = ~(err <= bound)
    if bad.any():
        i = bad.nonzero()[0].tolist()
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {ours.numel()} elements out of tolerance; first at {i}: "
            f"ours {ours[tuple(i)].item():.6g} ref {ref[tuple(i)].item():.6g} torch {same[tuple(i)].item():.6g} "
            f"(max err {err.max().item():.3g})"
        )


def poison_(t):
    """Fill with NaN (floats) so an element the kernel forgets to write fails every comparison."""
    return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-(2**30))
