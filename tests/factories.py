"""Factories for `liger-fx report tests.factories:<name>`: a user's own model code as the CLI takes it.

`decoder` is a small decoder written in plain PyTorch (no transformers): a hand-written RMSNorm, a SwiGLU MLP, an
lm_head and a label-smoothed cross-entropy in its forward, which the fused loss cannot take (a near miss with its
reason). The others return each accepted form, or each wrong one."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB, DIM = 64, 32


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        h = x.float()
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = RMSNorm(DIM)
        self.w1, self.w3 = nn.Linear(DIM, 48, bias=False), nn.Linear(DIM, 48, bias=False)
        self.w2 = nn.Linear(48, DIM, bias=False)

    def forward(self, x):
        h = self.norm(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class Decoder(nn.Module):
    def __init__(self, label_smoothing: float = 0.1):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList([Block(), Block()])
        self.norm = RMSNorm(DIM)
        self.output = nn.Linear(DIM, VOCAB, bias=False)
        self.label_smoothing = label_smoothing

    def forward(self, tokens, labels):
        h = self.embed(tokens)
        for layer in self.layers:
            h = layer(h)
        logits = self.output(self.norm(h))
        return F.cross_entropy(logits.view(-1, VOCAB).float(), labels.view(-1), label_smoothing=self.label_smoothing)


def _tokens():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, VOCAB, (2, 12), generator=g), torch.randint(0, VOCAB, (2, 12), generator=g)


def decoder():
    """(module, kwargs): the form a user with a loss inside the model writes."""
    torch.manual_seed(0)
    tokens, labels = _tokens()
    return Decoder(), {"tokens": tokens, "labels": labels}


def decoder_args():
    """(module, positional arguments)."""
    torch.manual_seed(0)
    return Decoder(), _tokens()


def decoder_args_kwargs():
    """(module, args, kwargs)."""
    torch.manual_seed(0)
    tokens, labels = _tokens()
    return Decoder(), (tokens,), {"labels": labels}


def mlp_tensor():
    """(module, one tensor)."""
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU()), torch.randn(4, 8)


def hf_llama():
    """A transformers model alone: the report makes token ids and labels for it."""
    from liger_fx.models import mini_model

    return mini_model("llama")


def plain_module_only():
    return Decoder()


def wrong_type():
    return {"model": Decoder()}


def wrong_inputs():
    return Decoder(), 3


def raises():
    raise RuntimeError("no weights here")


NOT_A_FUNCTION = 3
