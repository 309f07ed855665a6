"""A plain-PyTorch reference decoder, written as PyTorch-native trainers (torchtitan, gpt-fast, lit-gpt) write one.

    from liger_fx.models import reference
    model, (x,), y = reference.build("tiny")                       # random weights, loader-shifted labels
    model = torch.compile(model, backend="liger")                   # or reference.compile_blocks(model, "liger")
    pred = model(x)                                                 # the loss is OUTSIDE the model
    loss = reference.loss_fn(pred, y)                               # CE(pred.flatten(0, 1).float(), ...) sum / n

No transformers, no per-model code: `torch.nn.RMSNorm`, rotary embedding as complex `freqs_cis` multiplied into
`view_as_complex` pairs, grouped-query attention through `repeat_kv` and causal SDPA, a SwiGLU MLP (`w2(silu(w1 x) *
w3 x)`), an untied or tied `output` linear, labels aligned by the data loader (tokens[:, 1:], no shift in the model),
and the loss `F.cross_entropy(pred.flatten(0, 1).float(), labels.flatten(0, 1), reduction="sum") / n_tokens` computed
by the training loop from the returned logits. `compile_blocks` compiles each block on its own, as torchtitan does
(the embedding, final norm and output linear then run eagerly).

Sizes (`SIZES`): "tiny" for CPU tests; "llama-3.2-1b" and "llama-3-8b-8l" (Llama-3-8B's layer shape, 8 of its 32
layers) for benchmarks. `norm="manual"` spells the norm by hand instead (`x * rsqrt(mean(x^2) + eps) * w` in fp32,
Meta's reference code): the same math, for comparing the two spellings.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -100


@dataclass(frozen=True)
class ReferenceConfig:
    vocab_size: int = 512
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_dim: int = 128
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    max_seq_len: int = 256
    tie_embeddings: bool = False
    norm: str = "torch"
    """"torch": `nn.RMSNorm` (the PyTorch-native spelling); "manual": the body written out in fp32."""

    def __post_init__(self):
        if self.norm not in ("torch", "manual"):
            raise ValueError(f"norm must be 'torch' or 'manual', got {self.norm!r}")
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"dim {self.dim}, n_heads {self.n_heads}, n_kv_heads {self.n_kv_heads} do not divide")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


SIZES: dict[str, ReferenceConfig] = {
    "tiny": ReferenceConfig(),
    # Llama-3.2-1B: 16 layers, hidden 2048, GQA 32/8, MLP 8192, vocabulary 128256, tied embeddings.
    "llama-3.2-1b": ReferenceConfig(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192,
                                    rope_theta=500000.0, max_seq_len=32768, tie_embeddings=True),
    # Llama-3-8B's layer (hidden 4096, GQA 32/8, MLP 14336, untied output) with 8 of its 32 layers.
    "llama-3-8b-8l": ReferenceConfig(vocab_size=128256, dim=4096, n_layers=8, n_heads=32, n_kv_heads=8,
                                     ffn_dim=14336, rope_theta=500000.0, max_seq_len=32768),
}


# --------------------------------------------------------------------------------------------------------------
# Rotary embedding as complex numbers


def precompute_freqs_cis(head_dim: int, max_seq_len: int, theta: float) -> torch.Tensor:
    """(max_seq_len, head_dim // 2) complex64: e^(i * t * theta^(-2j / head_dim))."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rotary_emb(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor):
    """Rotate q and k (B, T, heads, head_dim): consecutive pairs as complex numbers times freqs_cis (T, head_dim/2)."""
    q = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    k = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    freqs = freqs_cis.view(1, q.shape[1], 1, q.shape[-1])
    q_out = torch.view_as_real(q * freqs).flatten(3)
    k_out = torch.view_as_real(k * freqs).flatten(3)
    return q_out.type_as(xq), k_out.type_as(xk)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, T, kv_heads, D) -> (B, T, kv_heads * n_rep, D), each kv head repeated for its query heads."""
    if n_rep == 1:
        return x
    b, t, kv, d = x.shape
    return x[:, :, :, None, :].expand(b, t, kv, n_rep, d).reshape(b, t, kv * n_rep, d)


# --------------------------------------------------------------------------------------------------------------
# Modules


class ManualRMSNorm(nn.Module):
    """RMSNorm written out: normalize in fp32, cast back, times the weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight


def _norm(cfg: ReferenceConfig) -> nn.Module:
    return nn.RMSNorm(cfg.dim, eps=cfg.norm_eps) if cfg.norm == "torch" else ManualRMSNorm(cfg.dim, cfg.norm_eps)


class Attention(nn.Module):
    def __init__(self, cfg: ReferenceConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        bs, seqlen, _ = x.shape
        xq = self.wq(x).view(bs, seqlen, self.n_heads, self.head_dim)
        xk = self.wk(x).view(bs, seqlen, self.n_kv_heads, self.head_dim)
        xv = self.wv(x).view(bs, seqlen, self.n_kv_heads, self.head_dim)
        xq, xk = apply_rotary_emb(xq, xk, freqs_cis)
        n_rep = self.n_heads // self.n_kv_heads
        keys, values = repeat_kv(xk, n_rep), repeat_kv(xv, n_rep)
        out = F.scaled_dot_product_attention(xq.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                             is_causal=True)
        return self.wo(out.transpose(1, 2).contiguous().view(bs, seqlen, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: ReferenceConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ReferenceConfig):
        super().__init__()
        self.attention_norm, self.ffn_norm = _norm(cfg), _norm(cfg)
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, freqs_cis):
        h = x + self.attention(self.attention_norm(x), freqs_cis)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, cfg: ReferenceConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = _norm(cfg)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("freqs_cis", self._freqs_cis(), persistent=False)

    def _freqs_cis(self, device=None):
        return precompute_freqs_cis(self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta).to(device)

    def _apply(self, fn, recurse=True):
        # `model.to(torch.bfloat16)` casts complex buffers too, dropping the imaginary part (with a warning): only
        # move freqs_cis, complex64, to where the weights went.
        freqs = self._buffers.pop("freqs_cis")
        try:
            out = super()._apply(fn, recurse)
        finally:
            self._buffers["freqs_cis"] = freqs
        self._buffers["freqs_cis"] = freqs.to(self.tok_embeddings.weight.device)
        return out

    def init_weights(self, std: float = 0.02) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
            elif isinstance(m, (nn.RMSNorm, ManualRMSNorm)):
                nn.init.ones_(m.weight)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(tokens)
        freqs_cis = self.freqs_cis[: tokens.shape[1]]
        for layer in self.layers:
            h = layer(h, freqs_cis)
        return self.output(self.norm(h))


# --------------------------------------------------------------------------------------------------------------
# Data, loss, compile options


def loss_fn(pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of token losses over the non-ignored labels, divided by their count (torchtitan's global token count for
    one rank and one micro-batch)."""
    n_tokens = (labels != IGNORE_INDEX).sum()
    return F.cross_entropy(pred.flatten(0, 1).float(), labels.flatten(0, 1), reduction="sum",
                           ignore_index=IGNORE_INDEX) / n_tokens


def batch(vocab_size: int, batch: int, seq: int, *, seed: int = 1, device="cpu", ignore: int = 0):
    """(inputs, labels), each (batch, seq), aligned by the loader: labels = tokens[:, 1:] of a seq + 1 window. The
    first `ignore` labels of each row are IGNORE_INDEX (a prompt not trained on)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (batch, seq + 1), generator=g)
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].clone()
    if ignore:
        y[:, :ignore] = IGNORE_INDEX
    return x.to(device), y.to(device)


def build(size: str | ReferenceConfig = "tiny", *, dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0,
          batch_size: int = 2, seq: int = 16, **overrides):
    """(model, (inputs,), labels): a random-init reference decoder in train mode, and one loader-aligned batch.

    `size` is a key of SIZES or a ReferenceConfig; `overrides` replace its fields (e.g. n_layers=1, norm="manual")."""
    if isinstance(size, str) and size not in SIZES:
        raise ValueError(f"unknown size {size!r}; valid: {', '.join(SIZES)}")
    cfg = SIZES[size] if isinstance(size, str) else size
    cfg = dataclasses.replace(cfg, **overrides)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Transformer(cfg)
    model.init_weights()
    model = model.to(dtype).train()
    x, y = batch(cfg.vocab_size, batch_size, seq, device=device)
    return model, (x,), y


class TrainingStep(nn.Module):
    """The model and its loss as one module: what a trainer that compiles its whole step hands torch.compile (and
    what `liger-fx report liger_fx.models.reference:training_step` reports on)."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return loss_fn(self.model(tokens), labels)


def training_step(size: str = "tiny"):
    """`liger-fx report liger_fx.models.reference:training_step`: (TrainingStep, (inputs, labels)) for the report's
    user-factory form, the reference decoder's every site in one graph."""
    model, (x,), y = build(size)
    return TrainingStep(model), (x, y)


def compile_blocks(model: Transformer, backend="inductor", **compile_kwargs) -> Transformer:
    """Compile each TransformerBlock on its own, in place (torchtitan's per-block compile); the embedding, final norm
    and output linear stay eager, so the lm_head's logits are made eagerly and nothing fuses them with the loss."""
    for block in model.layers:
        block.compile(backend=backend, **compile_kwargs)
    return model
