"""Small built-in model configs: random weights, CPU, no downloads. Used by `liger-fx report` and by the tests.

Each family keeps its real structure (GQA, tied embeddings, partial rotary, MoE, softcaps, q/k norms) at hidden 64
and 2 layers, so one compiled training step takes seconds on 2 CPU cores.
"""

from __future__ import annotations

import torch

# model_type -> overrides of the transformers config defaults
MINI_CONFIGS: dict[str, dict] = {
    "llama": dict(num_attention_heads=4, num_key_value_heads=2),
    "mistral": dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=None),
    "mixtral": dict(num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
    "gemma": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=16),
    "gemma2": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, final_logit_softcapping=30.0,
                   attn_logit_softcapping=50.0, sliding_window=32),
    "qwen2": dict(num_attention_heads=4, num_key_value_heads=2),
    "qwen3": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    "phi3": dict(num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "gpt_neox": dict(num_attention_heads=4, rotary_pct=0.25),
    # dropout off so a compiled step can be compared with eager exactly
    "bert": dict(num_attention_heads=4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    "roberta": dict(num_attention_heads=4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
}

_COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=256)

ENCODERS = {"bert", "roberta"}  # built with their masked-LM head

# Families whose attention must be eager (transformers rejects SDPA for them, e.g. Gemma2's softcapped scores).
_EAGER_ATTENTION = {"gemma2"}


def mini_config(model_type: str, **overrides):
    from transformers import AutoConfig

    if model_type not in MINI_CONFIGS:
        raise ValueError(f"unknown built-in model {model_type!r}; built-in: {', '.join(sorted(MINI_CONFIGS))}")
    kwargs = {**_COMMON, **MINI_CONFIGS[model_type], **overrides}
    cfg = AutoConfig.for_model(model_type, **kwargs)
    cfg._attn_implementation = "eager" if model_type in _EAGER_ATTENTION else "sdpa"
    return cfg


def build(config, seed: int = 0):
    """A random-weight model for `config`: the masked-LM head for encoders, else the causal-LM head."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    torch.manual_seed(seed)
    auto = AutoModelForMaskedLM if config.model_type in ENCODERS else AutoModelForCausalLM
    return auto.from_config(config).float()


def mini_model(model_type: str, seed: int = 0, **overrides):
    return build(mini_config(model_type, **overrides), seed=seed)
