"""The plain-PyTorch reference decoder (liger_fx/models/reference.py): its shapes, its data, and which of its sites
the liger backend fuses in the loop PyTorch-native trainers write (the loss outside the compiled model).
Every site fuses in its default, PyTorch-native spelling (`nn.RMSNorm`, complex RoPE, the loss outside the model
on `flatten(0, 1)` logits, which LazyLogits take as a view of h)."""

import copy
import json
import subprocess
import sys
import warnings

import pytest
import torch

import liger_fx
from liger_fx.lazy_logits import is_lazy
from liger_fx.models import reference

L = 2  # layers of the "tiny" size


def test_sizes_have_the_llama_shapes():
    """Parameter counts of the bench sizes, built on the meta device (no memory): Llama-3.2-1B has 1.236B
    parameters (tied embeddings), Llama-3-8B's 8 layers with its untied 128256 x 4096 embedding and head 2.80B."""
    counts = {}
    for size in ("llama-3.2-1b", "llama-3-8b-8l"):
        with torch.device("meta"):
            model = reference.Transformer(reference.SIZES[size])
        counts[size] = sum(p.numel() for p in model.parameters())
    assert counts["llama-3.2-1b"] == 1_235_814_400, counts
    assert counts["llama-3-8b-8l"] == 8 * 218_112_000 + 2 * 128256 * 4096 + 4096, counts


def test_batch_labels_are_aligned_by_the_loader():
    x, y = reference.batch(100, 3, 11, seed=4, ignore=2)
    assert x.shape == y.shape == (3, 11)
    assert torch.equal(y[:, 2:-1], x[:, 3:]) and (y[:, :2] == reference.IGNORE_INDEX).all()


def test_bf16_keeps_complex_rope_tables():
    """`model.to(torch.bfloat16)` casts complex buffers too (dropping the imaginary part, with a warning): the
    reference keeps freqs_cis complex64, and the bf16 model's logits track the fp32 model's."""
    model, (x,), _ = reference.build("tiny", n_layers=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m16 = copy.deepcopy(model).to(torch.bfloat16)
    assert m16.freqs_cis.dtype == torch.complex64 and m16.output.weight.dtype == torch.bfloat16
    torch.testing.assert_close(m16(x).float(), model(x), atol=0.1, rtol=0.05)


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match="norm must be"):
        reference.build("tiny", norm="layernorm")
    with pytest.raises(ValueError, match="unknown size"):
        reference.build("llama-70b")


@pytest.fixture(scope="module")
def default_step():
    """One compiled training step of the default (PyTorch-native) spelling, the loss outside the model: the
    records, whether the returned logits stayed lazy through the loss, and the loss against eager's."""
    torch._dynamo.reset()
    liger_fx.clear_records()
    model, (x,), y = reference.build("tiny")
    ref = reference.loss_fn(model(x), y)
    pred = torch.compile(copy.deepcopy(model), backend="liger")(x)
    loss = reference.loss_fn(pred, y)
    return {"records": liger_fx.get_records(), "lazy": is_lazy(pred), "loss": loss.detach(), "ref": ref.detach()}


def _count(step, flag):
    replaced = sum(rec.counts().get(flag, (0, 0))[0] for rec in step["records"])
    return replaced


def test_default_spelling_trains_as_eager_with_no_fallback(default_step):
    torch.testing.assert_close(default_step["loss"], default_step["ref"], atol=1e-5, rtol=1e-4)
    assert all(rec.fallback is None for rec in default_step["records"])


@pytest.mark.parametrize("flag,sites", [
    ("rope", 2 * L),
    ("swiglu", L),
    ("rms_norm", 2 * L + 1),
])
def test_default_spelling_site_fuses(default_step, flag, sites):
    assert _count(default_step, flag) == sites, [r.summary() for r in default_step["records"]]


def test_default_spelling_lm_head_and_loss_fuse_outside_the_model(default_step):
    """The lm_head's logits leave the graph lazy, and the loop's `flatten(0, 1).float()` cross-entropy takes them
    fused: the logits are never made."""
    assert sum(rec.lazy_logits for rec in default_step["records"]) == 1
    assert default_step["lazy"]


def test_default_spelling_has_no_unexplained_site(default_step):
    """Every near miss names its cause (no reason-less candidates)."""
    for rec in default_step["records"]:
        for miss in rec.misses:
            assert miss.reason and "unsupported form" not in miss.reason, (miss.where, miss.reason)


def test_manual_norm_spelling_fuses_every_site():
    """The same decoder with its norm written out (Meta's spelling): every site fuses today, the loss outside the
    model included."""
    model, (x,), y = reference.build("tiny", norm="manual")
    ref = reference.loss_fn(model(x), y)
    pred = torch.compile(copy.deepcopy(model), backend="liger")(x)
    loss = reference.loss_fn(pred, y)
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-4)
    (rec,) = liger_fx.get_records()
    assert rec.counts() == {"rms_norm": (2 * L + 1, 2 * L + 1), "rope": (2 * L, 2 * L), "swiglu": (L, L)}, \
        rec.summary()
    assert rec.lazy_logits == 1 and is_lazy(pred) and not rec.misses


def test_loss_inside_the_compiled_step_fuses_the_lm_head():
    model, (x,), y = reference.build("tiny", norm="manual")

    def step(x, y):
        return reference.loss_fn(model(x), y)

    loss = torch.compile(step, backend="liger")(x, y)
    torch.testing.assert_close(loss, step(x, y), atol=1e-5, rtol=1e-4)
    (rec,) = liger_fx.get_records()
    assert rec.counts().get("fused_linear_cross_entropy") == (1, 1), rec.summary()


def test_report_on_the_user_factory_finds_every_site_fused():
    """`liger-fx report liger_fx.models.reference:training_step`, as a user runs it on their own code: every site of
    the reference decoder (5 norms, 4 rotations, 2 MLPs, the lm_head + loss) replaced, no near miss."""
    out = subprocess.run([sys.executable, "-m", "liger_fx.cli", "report", "liger_fx.models.reference:training_step",
                          "--json"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    (entry,) = json.loads(out.stdout)["models"]
    got = {flag: (p["replaced"], p["candidates"]) for flag, p in entry["patterns"].items() if p["candidates"]}
    assert got == {"rms_norm": (5, 5), "rope": (4, 4), "swiglu": (2, 2), "fused_linear_cross_entropy": (1, 1)}, got
    assert all(not p["misses"] for p in entry["patterns"].values()) and not entry["fallbacks"], entry
