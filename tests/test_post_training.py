"""Post-training loss functions as trainers write them (TRL's GRPO and DPO), on tiny random HF models, compiled whole
with `torch.compile(loss_fn, backend="liger")`: the model call and the log-prob work in one graph. Every lm_head's
log-prob (and entropy) work is one fused op, the loss and every gradient equal eager, and no B x T x V tensor is
left in the compiled forward or backward graph."""

import copy

import torch
import torch.nn.functional as F

import liger_fx
from liger_fx.models import mini_model
from tests.helpers import capture_aot_graphs, replaced
from tests.patterns.test_linear_logprobs import entropy_from_logits, selective_log_softmax

FLAG = "fused_linear_logprobs"
V = 512  # 96 completion rows x 512 exceed every weight of the model (embedding 512 x 64)


def _patterns():
    return sorted(r.pattern for rec in liger_fx.get_records() for r in rec.replaced if r.flag == FLAG)


def _grads(model):
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def _compare(loss_fn, model, *args):
    model.zero_grad(set_to_none=True)
    ref = loss_fn(*args)
    ref.backward()
    ref_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    with capture_aot_graphs() as graphs:
        out = torch.compile(loss_fn, backend="liger")(*args)
        out.backward()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    grads = _grads(model)
    assert set(grads) == set(ref_grads)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], atol=1e-5, rtol=1e-4, msg=lambda m: f"{k}: {m}")
    return graphs


# ---------------------------------------------------------------------------------------------------------------
# GRPO (TRL's GRPOTrainer._compute_loss, loss_type "grpo", beta > 0, entropies computed for logging)


def test_grpo_step_policy_with_grad_reference_and_entropy_without():
    policy = mini_model("qwen2", num_hidden_layers=1, vocab_size=V)
    reference = copy.deepcopy(policy).requires_grad_(False).eval()
    g = torch.Generator().manual_seed(0)
    B, P, K = 6, 8, 16  # completions, prompt and completion lengths
    input_ids = torch.randint(0, V, (B, P + K), generator=g)
    attention_mask = torch.ones(B, P + K, dtype=torch.long)
    attention_mask[:2, :3] = 0  # left-padded prompts
    completion_mask = (torch.rand(B, K, generator=g) > 0.2).float()
    advantages = torch.randn(B, generator=g)
    temperature, beta, eps = 0.9, 0.04, 0.2

    def per_token_logps_and_entropies(model):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=K + 1).logits
        logits = logits[:, :-1, :]
        logits = logits[:, -K:, :]
        logits.div_(temperature)
        logps = selective_log_softmax(logits, input_ids[:, -K:])
        with torch.no_grad():
            entropies = entropy_from_logits(logits)
        return logps, entropies

    def grpo_loss(input_ids, attention_mask, completion_mask, advantages):
        per_token_logps, entropies = per_token_logps_and_entropies(policy)
        with torch.no_grad():
            ref_per_token_logps, _ = per_token_logps_and_entropies(reference)
        old_per_token_logps = per_token_logps.detach()
        coef_1 = torch.exp(per_token_logps - old_per_token_logps)
        coef_2 = torch.clamp(coef_1, 1 - eps, 1 + eps)
        per_token_kl = torch.exp(ref_per_token_logps - per_token_logps) - (ref_per_token_logps - per_token_logps) - 1
        per_token_loss = -torch.min(coef_1 * advantages[:, None], coef_2 * advantages[:, None]) + beta * per_token_kl
        loss = ((per_token_loss * completion_mask).sum(-1) / completion_mask.sum(-1).clamp(min=1.0)).mean()
        mean_entropy = (entropies * completion_mask).sum() / completion_mask.sum()
        return loss + 0 * mean_entropy  # the entropy is logged, not differentiated

    graphs = _compare(grpo_loss, policy, input_ids, attention_mask, completion_mask, advantages)
    # policy log-probs (grad), its entropy (no_grad), the reference's log-probs and entropy (no_grad; the entropy of
    # the reference is dead code in the trainer and here: no op for it)
    assert _patterns() == [f"{FLAG}/entropy/scale/no-grad", f"{FLAG}/logprob/scale", f"{FLAG}/logprob/scale/no-grad"]
    assert replaced("rms_norm") >= 1 and not [m for r in liger_fx.get_records() for m in r.misses if m.flag == FLAG]
    graphs.assert_none_of(B * K * V)


# ---------------------------------------------------------------------------------------------------------------
# DPO (TRL's DPOTrainer._compute_loss: chosen and rejected concatenated, masked sums, a frozen reference model)


def test_dpo_step_with_frozen_reference_model():
    policy = mini_model("llama", num_hidden_layers=1, vocab_size=V)
    reference = copy.deepcopy(policy).requires_grad_(False).eval()
    g = torch.Generator().manual_seed(1)
    B, T = 4, 25  # 2 chosen + 2 rejected
    input_ids = torch.randint(0, V, (B, T), generator=g)
    completion_mask = torch.zeros(B, T)
    completion_mask[:, 9:] = 1
    completion_mask[1, 20:] = 0  # a shorter completion
    beta = 0.1

    def logps_of(model, input_ids, completion_mask):
        logits = model(input_ids=input_ids).logits
        shift_logits = logits[..., :-1, :]
        shift_labels = input_ids[..., 1:]
        shift_completion_mask = completion_mask[..., 1:]
        per_token_logps = selective_log_softmax(shift_logits, shift_labels)
        per_token_logps[shift_completion_mask == 0] = 0.0
        return per_token_logps.sum(dim=1)

    def dpo_loss(input_ids, completion_mask):
        chosen_logps, rejected_logps = logps_of(policy, input_ids, completion_mask).chunk(2, dim=0)
        with torch.no_grad():
            ref_chosen, ref_rejected = logps_of(reference, input_ids, completion_mask).chunk(2, dim=0)
        logits = (chosen_logps - ref_chosen) - (rejected_logps - ref_rejected)
        return -F.logsigmoid(beta * logits).mean()

    graphs = _compare(dpo_loss, policy, input_ids, completion_mask)
    assert _patterns() == [f"{FLAG}/logprob", f"{FLAG}/logprob/no-grad"]
    graphs.assert_none_of(B * (T - 1) * V)


def test_report_json_info_line_and_counters_carry_the_flag(caplog):
    """`liger_fx.report` on a log-prob loss: the flag in the JSON with replaced/candidates, the counter, the INFO line;
    with the flag off, a near miss that says so."""
    import logging

    policy = mini_model("llama", num_hidden_layers=1, vocab_size=V)

    class LogProbLoss(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = policy

        def forward(self, input_ids):
            logits = self.model(input_ids=input_ids).logits
            return selective_log_softmax(logits[:, :-1], input_ids[:, 1:]).mean()

    ids = torch.randint(0, V, (2, 9))
    with caplog.at_level(logging.INFO, logger="liger_fx"):
        doc = liger_fx.report(LogProbLoss(), ids, mode="train")
    assert doc["patterns"][FLAG] == {"replaced": 1, "candidates": 1, "misses": []}
    assert replaced(FLAG) == 1
    assert any(f"{FLAG} 1/1" in r.getMessage() for r in caplog.records)
    off = liger_fx.report(LogProbLoss(), ids, mode="train", options={FLAG: False})
    (miss,) = off["patterns"][FLAG]["misses"]
    assert off["patterns"][FLAG]["replaced"] == 0 and f"flag '{FLAG}' is off" in miss["reason"]
