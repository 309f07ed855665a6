"""Small built-in model configs: random weights, CPU, no downloads. Used by `liger-fx report` and by the tests.

Each family keeps its real structure (GQA, tied embeddings, partial rotary, MoE, softcaps, q/k norms) at hidden 64
and 2 layers, so one compiled training step takes seconds on 2 CPU cores. `resolve` also accepts a `config.json` or a
pretrained directory (only its config is read) and shrinks it the same way with `reduce_config`.
"""

from __future__ import annotations

import json
import os

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


def is_encoder(config) -> bool:
    """Encoders (BERT-like) are trained with a masked-LM head. They also register a causal-LM head in transformers,
    so the test is: has a masked-LM head and is not an encoder-decoder (BART has both heads but is seq2seq)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    if config.model_type in ENCODERS:
        return True
    return config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_encoder_decoder", False)


def build(config, seed: int = 0):
    """A random-weight model for `config`: the masked-LM head for encoders, else the causal-LM head."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    torch.manual_seed(seed)
    auto = AutoModelForMaskedLM if is_encoder(config) else AutoModelForCausalLM
    return auto.from_config(config).float()


def mini_model(model_type: str, seed: int = 0, **overrides):
    return build(mini_config(model_type, **overrides), seed=seed)


# --------------------------------------------------------------------------------------------------------------
# Any config at reduced size: same structure, small widths.

_SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, vocab_size=128, num_attention_heads=4,
              head_dim=16, moe_intermediate_size=32, shared_expert_intermediate_size=32)
_EXPERT_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts")  # 4 experts keep routing real
_DROP = ("quantization_config", "auto_map", "dtype", "torch_dtype", "_name_or_path", "transformers_version",
         "architectures")


def _keep_layers(layer_types: list, n: int) -> list[int]:
    """Indices of `n` layers that keep one of each distinct layer type (Gemma2 alternates sliding and full
    attention; Gemma3 has 5 sliding to 1 full, which plain truncation to 2 layers would lose)."""
    first = {}
    for i, t in enumerate(layer_types):
        first.setdefault(str(t), i)
    keep = sorted(first.values())[:n]
    keep += [i for i in range(len(layer_types)) if i not in keep][: n - len(keep)]
    return sorted(keep)


def reduce_config(config):
    """The same model type and structure at hidden 64, 2 layers, 4 heads (GQA ratio kept), vocab 128, 4 experts."""
    from transformers import AutoConfig

    d = config.to_dict()
    amap = getattr(config, "attribute_map", {}) or {}
    key = lambda k: amap.get(k, k)  # noqa: E731  (GPT-2 spells hidden_size n_embd)
    layers = d.get(key("num_hidden_layers"))
    heads, kv = d.get(key("num_attention_heads")), d.get("num_key_value_heads")
    for k in _DROP:
        d.pop(k, None)
    for k, v in _SMALL.items():
        if key(k) in d and d[key(k)] is not None:
            d[key(k)] = v
    if isinstance(heads, int) and isinstance(kv, int) and 0 < kv <= heads:
        d["num_key_value_heads"] = max(1, 4 // (heads // kv))  # in {4, 2, 1}: always divides the 4 heads
    for k in _EXPERT_COUNTS:
        if isinstance(d.get(k), int) and d[k] > 0:
            d[k] = 4
    if isinstance(d.get("num_experts_per_tok"), int):
        d["num_experts_per_tok"] = min(d["num_experts_per_tok"], 2)
    if "qk_rope_head_dim" in d:  # multi-head latent attention (DeepSeek): its own head dims and low ranks
        d.update(qk_rope_head_dim=8, qk_nope_head_dim=8, qk_head_dim=16, v_head_dim=16, head_dim=8,
                 kv_lora_rank=32, q_lora_rank=32 if d.get("q_lora_rank") else d.get("q_lora_rank"))
    for k in ("n_group", "topk_group"):  # grouped routing over the 4 experts: one group
        if isinstance(d.get(k), int):
            d[k] = 1
    if isinstance(d.get("first_k_dense_replace"), int):  # DeepSeek: dense first layers, then MoE; keep one of each
        d["first_k_dense_replace"] = min(d["first_k_dense_replace"], 1)
    if isinstance(layers, int) and layers > 2:
        per_layer = [k for k, v in d.items() if isinstance(v, list) and len(v) == layers]
        keep = _keep_layers(d.get("layer_types") or [0] * layers, 2)
        for k in per_layer:  # layer_types and any other one-entry-per-layer list
            d[k] = [d[k][i] for i in keep]
    vocab = d.get(key("vocab_size"))
    for k in [k for k in d if k.endswith("token_id")]:
        # a pad id past the small vocab would be an out-of-range padding_idx; bos/eos only matter for generation
        ids = d[k]
        if isinstance(ids, int) and isinstance(vocab, int) and ids >= vocab:
            d[k] = vocab - 1
        elif isinstance(ids, list) and isinstance(vocab, int):
            d[k] = [min(i, vocab - 1) for i in ids]
    model_type = d.pop("model_type", config.model_type)
    return AutoConfig.for_model(model_type, **d)


def load_config(path: str):
    """The config of a `config.json` file or a pretrained directory (nothing but the config is read), reduced."""
    from transformers import AutoConfig

    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise ValueError(f"no config.json in {path!r}" if os.path.isdir(path) else f"no such file: {path!r}")
    try:
        with open(file) as f:
            d = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: not a readable JSON config ({str(e).splitlines()[0]})") from None
    if not isinstance(d, dict) or "model_type" not in d:
        raise ValueError(f"{file}: no 'model_type' key; is it a transformers config.json?")
    model_type = d.pop("model_type")
    try:
        config = AutoConfig.for_model(model_type, **{k: v for k, v in d.items() if k not in _DROP})
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{file}: model_type {model_type!r} cannot be built by transformers "
                         f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return reduce_config(config)


def resolve(spec: str):
    """`(model_type, config)` for a built-in model type, a config.json path or a pretrained directory.
    Raises ValueError with a one-line message for anything else."""
    if spec in MINI_CONFIGS:
        return spec, mini_config(spec)
    if os.path.exists(spec):
        config = load_config(spec)
        return config.model_type, config
    raise ValueError(
        f"unknown model {spec!r}: not a built-in model type ({', '.join(sorted(MINI_CONFIGS))}) "
        "nor an existing config.json or directory"
    )
