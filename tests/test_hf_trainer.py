"""The HF Trainer hook: `TrainingArguments(use_liger_kernel=True)` trains through backend="liger".

Each case runs a real `Trainer.train()` for 3 optimizer steps on CPU (tiny random Llama, fp32, 8 in-memory samples with
a different number of -100 labels each, so `num_items_in_batch` differs between micro-batches), once with the hook
and once with `use_liger_kernel=False`, and checks: every micro-batch loss and every final weight equal; every
pattern family the rewrite driver has (that a Llama exercises) replaced everything it found; no fallback.
liger-kernel is not installed on the CPU machine, so these also show the hook works without it.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from torch._dynamo.utils import counters

import liger_fx
import liger_fx.integrations.transformers as hook  # installs the hook; the fixture below scopes it to this file
from liger_fx import api, rewrite
from liger_fx.models import mini_model

pytestmark = pytest.mark.slow

VOCAB, T, N = 128, 16, 8
# fp32 on both sides; Inductor reorders reductions and the fused loss sums in chunks: per-element differences of
# ~1e-7 relative, which three AdamW steps (lr 1e-3) carry into the weights at ~1e-6. A wrong eps, cast, shift or
# normalizer moves the loss by 1e-3 or more.
RTOL, ATOL = 1e-5, 1e-5

# pattern module -> the flag it must have replaced on a Llama (families added later without a Llama use only have to
# replace whatever candidates they find)
LLAMA_FAMILIES = {"rms_norm": "rms_norm", "rope": "rope", "swiglu": "swiglu",
                  "linear_cross_entropy": "fused_linear_cross_entropy"}


@pytest.fixture(autouse=True, scope="module")
def installed_hook():
    hook.install("liger_fx")
    yield
    hook.uninstall()


def dataset(seed: int = 0, n: int = N):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        ids = torch.randint(0, VOCAB, (T,), generator=g)
        labels = ids.clone()
        labels[: i % 5] = -100  # 0..4 ignored positions: micro-batches carry different token counts
        rows.append({"input_ids": ids, "labels": labels})
    return rows


class RecordingTrainer(transformers.Trainer):
    """Keeps every micro-batch loss the Trainer computes, unrounded (the logged ones are averaged and rounded)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.losses = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = out[0] if return_outputs else out
        if model.training:
            self.losses.append(loss.detach().clone())
        return out


def make_args(tmp_path, liger: bool, **kw):
    base = dict(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, per_device_eval_batch_size=2,
                learning_rate=1e-3, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", seed=0,
                disable_tqdm=True, dataloader_num_workers=0, use_liger_kernel=liger)
    base.update(kw)
    return transformers.TrainingArguments(**base)


def run(tmp_path, liger: bool, model=None, model_init=None, eval_dataset=None, **kw):
    trainer = RecordingTrainer(model=model, model_init=model_init, args=make_args(tmp_path, liger, **kw),
                               train_dataset=dataset(), eval_dataset=eval_dataset)
    trainer.train()
    return trainer


def weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same_training(ours, ref):
    assert len(ours.losses) == len(ref.losses) > 0
    torch.testing.assert_close(torch.stack(ours.losses), torch.stack(ref.losses), rtol=RTOL, atol=ATOL)
    w, w_ref = weights(ours.model), weights(ref.model)
    assert w.keys() == w_ref.keys()
    for name in w:
        torch.testing.assert_close(w[name], w_ref[name], rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")


def assert_every_family_replaced():
    records = liger_fx.get_records()
    assert records, "the model was never compiled with backend='liger'"
    totals: dict[str, int] = {}
    for rec in records:
        assert rec.fallback is None, rec.summary()
        assert not rec.misses, rec.summary()  # every candidate of every family became a fused op
        for flag, (n, _) in rec.counts().items():
            totals[flag] = totals.get(flag, 0) + n
        # the option passes: a materialized causal mask (transformers 5.17 builds one under compile; newer skip it),
        # SDPA on repeated k/v, GQA's q/k/v as one matmul
        for option in ("causal_sdpa", "grouped_sdpa", "fused_projections", "swiglu_linear"):
            if getattr(rec, option):
                totals[option] = totals.get(option, 0) + len(getattr(rec, option))
    present = [f.__name__.rsplit(".", 1)[-1] for f in rewrite.families()]
    for name in present:
        if name in LLAMA_FAMILIES:
            assert totals.get(LLAMA_FAMILIES[name], 0) >= 1, f"family {name} replaced nothing: {totals}"
    assert dict(counters["liger_fx"]) == totals


def llama(seed: int = 0):
    return mini_model("llama", seed=seed)


# ----------------------------------------------------------------------------------------------------------------


def test_trainer_matches_eager_and_skips_logits(tmp_path):
    evalset = dataset(seed=1, n=4)
    ref = run(tmp_path, False, model=llama(), eval_dataset=evalset)
    ours = run(tmp_path, True, model=llama(), eval_dataset=evalset)
    assert api.is_applied(ours.model) and not api.is_applied(ref.model)
    assert_same_training(ours, ref)

    # loss-only evaluation: the Trainer passes skip_logits=True, which the compiled forward honours
    m_ref, m = ref.evaluate(), ours.evaluate()
    torch.testing.assert_close(m["eval_loss"], m_ref["eval_loss"], rtol=RTOL, atol=ATOL)

    # a training step with labels returns the loss only; inference keeps its logits
    batch = dataset(seed=2, n=2)
    ids = torch.stack([r["input_ids"] for r in batch])
    labels = torch.stack([r["labels"] for r in batch])
    ours.model.train()
    out = ours.model(input_ids=ids, labels=labels)
    assert out.logits is None and "logits" not in out and out.loss is not None
    ours.model.eval()
    ref.model.eval()
    with torch.no_grad():
        logits, logits_ref = ours.model(input_ids=ids).logits, ref.model(input_ids=ids).logits
    torch.testing.assert_close(logits, logits_ref, rtol=RTOL, atol=ATOL)
    with pytest.raises(ValueError, match="skip_logits=True needs labels"):
        ours.model(input_ids=ids, skip_logits=True)
    assert_every_family_replaced()


def test_grad_accumulation_and_model_init(tmp_path):
    """Two micro-batches of one sample per step with different label counts: the loss is the token sum over both
    divided by the Trainer's `num_items_in_batch`, which must reach the fused loss. `model_init`: train() builds
    a fresh model and the hook compiles that one."""
    kw = dict(per_device_train_batch_size=1, gradient_accumulation_steps=2)
    ref = run(tmp_path, False, model_init=lambda: llama(), **kw)
    ours = run(tmp_path, True, model_init=lambda: llama(), **kw)
    assert len(ours.losses) == 6
    assert api.is_applied(ours.model)
    assert_same_training(ours, ref)
    assert_every_family_replaced()


def test_peft_lora_with_checkpointing(tmp_path):
    peft = pytest.importorskip("peft")

    def lora():
        torch.manual_seed(0)
        cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"],
                              task_type="CAUSAL_LM")
        return peft.get_peft_model(llama(), cfg)

    # with checkpointing on, as LoRA runs usually are: train() then also hooks the embeddings' output to require
    # grad (enable_input_require_grads), inside the compiled forward
    ref = run(tmp_path, False, model=lora(), gradient_checkpointing=True)
    ours = run(tmp_path, True, model=lora(), gradient_checkpointing=True)
    assert api.is_applied(ours.model)  # through its base model; the PEFT wrapper stays eager
    assert "_liger_fx" in ours.model.get_base_model().__dict__
    assert_same_training(ours, ref)
    assert_every_family_replaced()
    assert sum(counters["graph_break"].values()) == 0


# Every site of the 2-layer mini Llama's training step: 2 norms a layer and the final one, q and k rotated a layer,
# one MLP a layer, one loss.
LLAMA_SITES = {"rms_norm": (5, 5), "rope": (4, 4), "swiglu": (2, 2), "fused_linear_cross_entropy": (1, 1)}


def test_gradient_checkpointing(tmp_path):
    """train() turns checkpointing on after the hook (TRL's SFTConfig does by default); the non-reentrant checkpoint
    is what Dynamo captures, and its layers are inlined with recompute tags, so they are rewritten too: every site
    of every compiled step graph, as without checkpointing. On transformers 5.25 each checkpointed attention writes
    a global (the hub-kernels wrapper), which needs the hook's checkpoints_in_graph() scope: without it the step
    fused the final norm and the loss only."""
    ref = run(tmp_path, False, model=llama(), gradient_checkpointing=True)
    ours = run(tmp_path, True, model=llama(), gradient_checkpointing=True)
    layers = ours.model.model.layers
    assert all(layer.gradient_checkpointing for layer in layers)
    assert_same_training(ours, ref)
    assert_every_family_replaced()
    assert sum(counters["graph_break"].values()) == 0
    records = liger_fx.get_records()
    for rec in records:
        assert {k: v for k, v in rec.counts().items() if k in LLAMA_SITES} == LLAMA_SITES, rec.summary()


def test_bad_key_fails_at_start(tmp_path):
    trainer = RecordingTrainer(model=llama(), train_dataset=dataset(),
                               args=make_args(tmp_path, True, liger_kernel_config={"rms_nrom": True}))
    with pytest.raises(ValueError, match="'rms_nrom'"):
        trainer.train()
    assert trainer.state.global_step == 0 and not trainer.losses and not liger_fx.get_records()
    assert not api.is_applied(trainer.model)


def test_flags_reach_the_backend(tmp_path):
    """Config keys are Liger's flags; a flag turned off leaves its family's candidates as near misses. The model
    keeps its class and parameter names (saves as before), and `remove` gives it its own forward back."""
    model = llama()
    hook.apply_liger_kernel(model, {"rope": False})
    assert model._liger_fx.flags == {"rope": False}
    ids = torch.stack([r["input_ids"] for r in dataset(n=2)])
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    rec = liger_fx.get_records()[-1]
    assert counters["liger_fx"]["rope"] == 0 and counters["liger_fx"]["rms_norm"] >= 1
    assert any(m.flag == "rope" and "off" in m.reason for m in rec.misses)
    model.save_pretrained(tmp_path)
    saved = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(saved) is type(model) and saved.state_dict().keys() == model.state_dict().keys()
    api.remove(model)
    assert not api.is_applied(model) and "forward" not in model.__dict__


def test_choice_between_liger_fx_and_liger_kernel(monkeypatch):
    import transformers.integrations.liger as hf_liger
    import transformers.trainer as hf_trainer

    assert hook.installed() and hf_liger.apply_liger_kernel is hook.apply_liger_kernel
    monkeypatch.setenv(hook.ENV, "liger_kernel")
    assert hook.install() == "liger_kernel"
    assert not hook.installed() and hf_trainer.apply_liger_kernel.__module__ == "transformers.integrations.liger"
    monkeypatch.delenv(hook.ENV)
    assert hook.install() == hook.DEFAULT == "liger_fx" and hook.installed()
    with pytest.raises(ValueError, match="liger_kernels"):
        hook.install("liger_kernels")
    # availability still tells the truth: nothing pretends liger-kernel is installed
    from transformers.utils import import_utils

    assert hf_liger.is_liger_kernel_available is import_utils.is_liger_kernel_available


# ----------------------------------------------------------------------------------------------------------------
# torch_compile_backend="liger": the HF way to name a backend. accelerate knows only its own enum of backends.


def test_torch_compile_backend_liger_compiles_once_with_the_hook(tmp_path):
    """With the hook imported, `torch_compile_backend="liger"` trains through the hook (as use_liger_kernel=True)
    and accelerate compiles nothing: the model is no torch.compile wrapper, every family is replaced, the training
    equals eager's. Alone and beside use_liger_kernel=True (before: ValueError "'LIGER' is not a valid
    DynamoBackend" at Trainer init)."""
    from accelerate.utils import is_compiled_module

    ref = run(tmp_path, False, model=llama())
    for use_liger_kernel in (False, True):
        torch._dynamo.reset()  # else the second run reuses the first one's compiled code: nothing to record
        liger_fx.clear_records()
        counters.clear()
        ours = run(tmp_path, use_liger_kernel, model=llama(), torch_compile_backend="liger")
        assert ours.args.torch_compile_backend == "liger" and ours.args.use_liger_kernel
        assert api.is_applied(ours.model)
        assert not is_compiled_module(ours.model_wrapped) and not is_compiled_module(ours.model)
        assert_same_training(ours, ref)
        assert_every_family_replaced()
        records = liger_fx.get_records()
        assert all({k: v for k, v in r.counts().items() if k in LLAMA_SITES} == LLAMA_SITES for r in records)


def test_torch_compile_backend_liger_carries_the_mode(tmp_path):
    trainer = RecordingTrainer(model=llama(), train_dataset=dataset(), args=make_args(
        tmp_path, False, torch_compile_backend="liger", torch_compile_mode="max-autotune",
        liger_kernel_config={"rope": False}))
    assert trainer.args.use_liger_kernel and trainer.args.liger_kernel_config == {"rope": False, "mode": "max-autotune"}
    assert trainer.accelerator.state.dynamo_plugin.backend.value == "NO"
    model = llama()
    hook.apply_liger_kernel(model, trainer.args.liger_kernel_config)
    assert model._liger_fx.compile_kwargs["mode"] == "max-autotune" and model._liger_fx.flags == {"rope": False}


def test_torch_compile_backend_liger_without_liger_fx_says_what_to_write(tmp_path, monkeypatch):
    """LIGER_FX_TRAINER=liger_kernel routes use_liger_kernel=True to liger-kernel: a backend named liger is then
    refused at Trainer init, with what to write instead."""
    monkeypatch.setenv(hook.ENV, "liger_kernel")
    hook.install()
    try:
        with pytest.raises(ValueError, match=f"Unset {hook.ENV}.*use_liger_kernel=True without torch_compile_backend"):
            RecordingTrainer(model=llama(), train_dataset=dataset(),
                             args=make_args(tmp_path, False, torch_compile_backend="liger"))
    finally:
        monkeypatch.delenv(hook.ENV)
        hook.install()


def test_torch_compile_beside_use_liger_kernel_warns(tmp_path, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="liger_fx"):
        RecordingTrainer(model=llama(), train_dataset=dataset(),
                         args=make_args(tmp_path, True, torch_compile=True))
    assert any("torch_compile_backend='liger'" in r.getMessage() for r in caplog.records)
