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
    """A random-weight model for `config`: the masked-LM head for encoders, the causal-LM head for decoders, and
    the image-text-to-text model for a vision-language family with no causal-LM class (Qwen2-VL, LLaVA)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoModelForMaskedLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    torch.manual_seed(seed)
    if is_encoder(config):
        auto = AutoModelForMaskedLM
    elif config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and _is_vlm_type(config.model_type):
        auto = AutoModelForImageTextToText
    else:
        auto = AutoModelForCausalLM
    return auto.from_config(config).float()


def _is_vlm_type(model_type: str) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


def mini_model(model_type: str, seed: int = 0, **overrides):
    return build(mini_config(model_type, **overrides), seed=seed)


# --------------------------------------------------------------------------------------------------------------
# Any config at reduced size: same structure, small widths.

_SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, vocab_size=128, num_attention_heads=4,
              head_dim=16, moe_intermediate_size=32, shared_expert_intermediate_size=32,
              vocab_size_per_layer_input=128, hidden_size_per_layer_input=16,  # Gemma-3n/4's per-layer embeddings
              # encoder-decoder families (BART, Marian, Whisper, ...), whose causal LM is the decoder alone
              encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
              encoder_ffn_dim=96, decoder_ffn_dim=96, num_encoder_layers=2, num_decoder_layers=2,  # ProphetNet
              num_encoder_attention_heads=4, num_decoder_attention_heads=4,
              num_layers=2,  # LongCat-Flash (two sub-layers per layer: 28 became 56 blocks)
              decoder_vocab_size=128,  # Marian: a target vocabulary of its own
              d_head=16, embedding_dim=64,  # XLNet's head size, xLSTM's width
              depth=2, embed_dim=64, num_heads=4,  # vision towers (Qwen2-VL's: 32 blocks of 1280)
              out_hidden_size=64, text_hidden_size=64)  # a tower's output, scattered onto the text embeddings
_EXPERT_COUNTS = ("num_local_experts", "num_experts", "n_routed_experts")  # 4 experts keep routing real
_DROP = ("quantization_config", "auto_map", "dtype", "torch_dtype", "_name_or_path", "transformers_version",
         "architectures")


# Per-layer lists that say what kind of block each layer is: the kept layers take one of each kind.
_LAYER_KINDS = ("layer_types", "layers_block_type", "block_types")


def _reduce_layer_pattern(d: dict) -> None:
    """Hybrid families that place their attention (or MoE) layers by period and offset, or by a repeating pattern
    shorter than the stack, keep one layer of each kind in the 2 kept: Jamba's attention every 8th layer from the
    4th, RecurrentGemma's (recurrent, recurrent, attention) cycle. Otherwise both kept layers are of the first kind
    and the model has no attention at all (its cache then refused the mask)."""
    for prefix in ("attn_layer", "expert_layer"):
        if isinstance(d.get(f"{prefix}_period"), int) and isinstance(d.get(f"{prefix}_offset"), int):
            d[f"{prefix}_period"], d[f"{prefix}_offset"] = 2, 1
    cycle = d.get("block_types")
    if isinstance(cycle, list) and 2 < len(cycle) and len(set(map(str, cycle))) > 1:
        d["block_types"] = [cycle[i] for i in _keep_layers(cycle, 2)]
    if isinstance(d.get("num_kv_shared_layers"), int) and d["num_kv_shared_layers"] > 0:
        # Gemma-3n: the last layers reuse the KV cache of an earlier layer of their type; 2 layers, one of each
        # type, leave no earlier layer to share with.
        d["num_kv_shared_layers"] = 0


def _reduce_head_split(d: dict, full: dict, key) -> None:
    """Sizes that must stay consistent with the reduced head size: a partial rotary width (GPT-J's and CodeGen's
    rotary_dim 64 of 256, scaled to 4 of 16 rather than past the head), XLNet's d_head, and Mamba-2's heads, whose
    count times head size must equal expand x hidden (Mamba-2, Bamba, Granite-4's hybrid, Falcon-H1)."""
    heads = full.get(key("num_attention_heads"))
    hidden = full.get(key("hidden_size"))
    new_head = d.get("head_dim") or 16
    rd = d.get("rotary_dim")
    if isinstance(rd, int) and rd > new_head and isinstance(heads, int) and isinstance(hidden, int) and heads:
        d["rotary_dim"] = max(2, rd * new_head // (hidden // heads) // 2 * 2)
    small_hidden = d.get(key("hidden_size"))
    if not isinstance(small_hidden, int):
        return
    if isinstance(d.get("mamba_n_heads"), int) and isinstance(d.get("mamba_d_head"), int):
        d["mamba_d_head"] = 16
        d["mamba_n_heads"] = d.get("mamba_expand", 2) * small_hidden // 16
        if isinstance(d.get("mamba_d_ssm"), int):  # Falcon-H1 states the product too
            d["mamba_d_ssm"] = d["mamba_n_heads"] * 16
    if isinstance(d.get("num_heads"), int) and isinstance(d.get("head_dim"), int) and isinstance(d.get("expand"), int):
        d["num_heads"] = d["expand"] * small_hidden // d["head_dim"]


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
    """The same model type and structure at hidden 64, 2 layers, 4 heads (GQA ratio kept), vocab 128, 4 experts;
    sub-configs (a vision-language model's text and vision towers, an audio encoder) the same way."""
    from transformers import AutoConfig

    d = _reduced(config)
    model_type = d.pop("model_type", config.model_type)
    return AutoConfig.for_model(model_type, **d)


def _reduced(config) -> dict:
    """`config.to_dict()` at reduced size, sub-configs reduced in place."""
    from transformers import PretrainedConfig

    d = config.to_dict()
    full = dict(d)
    amap = getattr(config, "attribute_map", {}) or {}
    key = lambda k: amap.get(k, k)  # noqa: E731  (GPT-2 spells hidden_size n_embd)
    layers = d.get(key("num_hidden_layers"))
    heads, kv = d.get(key("num_attention_heads")), d.get("num_key_value_heads")
    for k in _DROP:
        d.pop(k, None)
    for k, v in _SMALL.items():
        old = d.get(key(k))
        if isinstance(old, int) and not isinstance(old, bool):
            d[key(k)] = v
        elif isinstance(old, list) and old and all(isinstance(x, int) for x in old):
            d[key(k)] = [v] * len(old)  # one per layer or stage (ERNIE-4.5-VL's moe_intermediate_size)
    if isinstance(heads, int) and isinstance(kv, int) and 0 < kv <= heads:
        d["num_key_value_heads"] = max(1, 4 // (heads // kv))  # in {4, 2, 1}: always divides the 4 heads
    # Left unset by a family's default config, where its code reads it (Hunyuan's and Ministral's head_dim,
    # Nemotron's num_key_value_heads): the reduced model's value, as a checkpoint's config would give it.
    if "head_dim" in d and d["head_dim"] is None and d.get(key("num_attention_heads")) == 4:
        d["head_dim"] = 16
    if "num_key_value_heads" in d and kv is None and d.get(key("num_attention_heads")) == 4:
        d["num_key_value_heads"] = 4
    _reduce_head_split(d, full, key)
    experts = False
    for k in _EXPERT_COUNTS:
        if isinstance(d.get(k), int) and d[k] > 0:
            d[k], experts = 4, True
    for k in ("num_experts_per_tok", "num_experts_per_token"):  # DeepSeek-V2's default leaves it None
        if isinstance(d.get(k), int) or (k in d and d[k] is None and experts):
            d[k] = min(d[k] or 2, 2)
    if "qk_rope_head_dim" in d:  # multi-head latent attention (DeepSeek): its own head dims and low ranks
        d.update(qk_rope_head_dim=8 if d["qk_rope_head_dim"] else 0,  # 0: no RoPE at all (GLM-5's DSA layers)
                 qk_nope_head_dim=8, qk_head_dim=16, v_head_dim=16, head_dim=8,
                 kv_lora_rank=32, q_lora_rank=32 if d.get("q_lora_rank") else d.get("q_lora_rank"))
    for k in ("n_group", "topk_group"):  # grouped routing over the 4 experts: one group
        if isinstance(d.get(k), int):
            d[k] = 1
    if isinstance(d.get("first_k_dense_replace"), int):  # DeepSeek: dense first layers, then MoE; keep one of each
        d["first_k_dense_replace"] = min(d["first_k_dense_replace"], 1)
    if isinstance(layers, int) and layers > 2:
        per_layer = [k for k, v in d.items() if isinstance(v, list) and len(v) == layers]
        kinds = next((d[k] for k in _LAYER_KINDS if isinstance(d.get(k), list) and len(d[k]) == layers), None)
        keep = _keep_layers(kinds or [0] * layers, 2)
        for k in per_layer:  # layer_types and any other one-entry-per-layer list
            d[k] = [d[k][i] for i in keep]
        _reduce_layer_pattern(d)
        overrides = d.get("per_layer_config")
        if isinstance(overrides, dict):  # sparse overrides keyed by layer index ("05": {...}): renumber the kept
            by_index = {int(i): v for i, v in overrides.items()}
            d["per_layer_config"] = {new: _shrunk(by_index[old], full) for new, old in enumerate(keep)
                                     if old in by_index}
    vocab = d.get(key("vocab_size"))
    for k in [k for k in d if k.endswith("token_id")]:
        # a pad id past the small vocab would be an out-of-range padding_idx; bos/eos only matter for generation
        ids = d[k]
        if isinstance(ids, int) and isinstance(vocab, int) and ids >= vocab:
            d[k] = vocab - 1
        elif isinstance(ids, list) and isinstance(vocab, int):
            d[k] = [min(i, vocab - 1) for i in ids]
    _reduce_mrope(config, d, key)
    for k in [k for k, v in d.items() if isinstance(v, dict)]:  # a multimodal model's text, vision, audio configs
        sub = getattr(config, k, None)  # only dict-valued keys: reading a per-layer attribute (head_dim) raises
        if isinstance(sub, PretrainedConfig):
            d[k] = _reduced(sub)
    return d


def _reduce_mrope(config, d: dict, key) -> None:
    """Multimodal RoPE (Qwen2-VL and its kin) splits the rotary half of each head into (time, height, width)
    sections, `rope_parameters["mrope_section"]`, whose sum must be the reduced rotary half (8 at head_dim 16). When
    the config leaves it out the model code falls back to a default for the full size ([16, 24, 24]) that no longer
    fits; configs of such models say so by exempting the key from rope validation. Given sections are scaled to the
    new sum; absent ones become (1/4, 3/8, 3/8) of it, the shape of Qwen2-VL's default."""
    rope = d.get("rope_parameters")
    if not isinstance(rope, dict) or "rope_type" not in rope or not _uses_mrope(config):  # (not one per layer type)
        return
    heads = d.get(key("num_attention_heads"))
    head_dim = d.get("head_dim") or (d.get(key("hidden_size")) // heads if heads else None)
    if not isinstance(head_dim, int):
        return
    half = int(head_dim * rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))) // 2
    weights = rope.get("mrope_section") or [2, 3, 3]
    n, total = len(weights), sum(weights)
    if half < n or total <= 0:
        return
    spare = half - n  # one for each section first: an empty section is no longer the same structure
    sections = [1 + w * spare // total for w in weights]
    for i in sorted(range(n), key=lambda i: -(weights[i] * spare % total))[: half - sum(sections)]:
        sections[i] += 1  # largest remainders first, so the sections add up to `half` exactly
    d["rope_parameters"] = {**rope, "mrope_section": sections}


def _uses_mrope(config) -> bool:
    """Whether the config's model reads `mrope_section`: its config exempts the key from rope validation, or (where
    it does not, PaddleOCR-VL) its modeling code names it."""
    import importlib.util

    if "mrope_section" in getattr(config, "ignore_keys_at_rope_validation", ()):
        return True
    module = type(config).__module__
    if ".configuration_" not in module:
        return False
    spec = importlib.util.find_spec(module.replace(".configuration_", ".modeling_"))
    if spec is None or not spec.origin:
        return False
    with open(spec.origin, encoding="utf-8") as f:
        return "mrope_section" in f.read()


def _shrunk(overrides: dict, full: dict) -> dict:
    """One layer's sparse config overrides at reduced size, in the same ratio to the reduced global value (Gemma-4's
    full-attention layers: head_dim 512 against 256 becomes 32 against 16)."""
    out = dict(overrides)
    for k, v in overrides.items():
        base = full.get(k)
        if k in _SMALL and isinstance(v, int) and isinstance(base, int) and base > 0 and v % base == 0:
            out[k] = _SMALL[k] * (v // base)
        elif k in _SMALL and isinstance(v, int):
            out[k] = _SMALL[k]
    return out


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


def decoder_types() -> list[str]:
    """What `liger-fx report --transformers-all` sweeps: every model type the installed transformers registers a
    causal-LM class for (`AutoModelForCausalLM`), less the encoders (BERT-likes, built with their masked-LM head),
    and every vision-language type with an image-text-to-text class and no causal-LM one (Qwen2-VL, LLaVA): their
    language model is a decoder too. All run on text (token ids and labels)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    types = {t for t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if t not in ENCODERS and not _is_encoder_type(t)}
    return sorted(types | set(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES))


def _is_encoder_type(model_type: str) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    if model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return False
    from transformers import AutoConfig

    try:
        return is_encoder(AutoConfig.for_model(model_type))
    except Exception:  # a config that cannot be made is the sweep's to report, not ours to guess
        return False


def default_config(model_type: str):
    """transformers' default config for `model_type` at reduced size (`reduce_config`)."""
    from transformers import AutoConfig

    return reduce_config(AutoConfig.for_model(model_type))


def resolve(spec: str):
    """`(model_type, config)` for a built-in model type, a config.json path, a pretrained directory, or any other
    model type the installed transformers knows (its default config, reduced). Raises ValueError with a one-line
    message for anything else."""
    from transformers import CONFIG_MAPPING

    if spec in MINI_CONFIGS:
        return spec, mini_config(spec)
    if os.path.exists(spec):
        config = load_config(spec)
        return config.model_type, config
    if spec in CONFIG_MAPPING:
        return spec, default_config(spec)
    raise ValueError(
        f"unknown model {spec!r}: not a built-in model type ({', '.join(sorted(MINI_CONFIGS))}), a model type of "
        "transformers, an existing config.json or directory, nor a factory (package.module:function)"
    )
