"""Output heads: the MLM head of BERT and the plain LM head of GPT, both tied to the word embedding, and
BERT's sentence-pair head (NSP / SOP) on the [CLS] state."""

from __future__ import annotations

import torch
from torch import nn

from plmscale.config import ModelConfig
from plmscale.model.layers import LayerSpec, activation


class MLMHead(nn.Module):
    """dense -> GELU (model.activation) -> LayerNorm -> tied projection + bias (BERT's transform before the decoder)."""

    def __init__(self, cfg: ModelConfig, spec: LayerSpec):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.embed_size)  # ALBERT: back to the embedding's width
        nn.init.normal_(self.dense.weight, std=cfg.init_std)
        nn.init.zeros_(self.dense.bias)
        self.act = activation(cfg.activation)
        self.ln = nn.LayerNorm(cfg.embed_size, eps=cfg.layernorm_eps)
        self.output = spec.output_projection(cfg.embed_size, cfg.padded_vocab_size, bias=True)

    def forward(self, hidden: torch.Tensor, embedding_weight: torch.Tensor) -> torch.Tensor:
        return self.output(self.ln(self.act(self.dense(hidden))), embedding_weight)


class LMHead(nn.Module):
    def __init__(self, cfg: ModelConfig, spec: LayerSpec):
        super().__init__()
        self.output = spec.output_projection(cfg.hidden_size, cfg.padded_vocab_size, bias=False)

    def forward(self, hidden: torch.Tensor, embedding_weight: torch.Tensor) -> torch.Tensor:
        return self.output(hidden, embedding_weight)


class PairHead(nn.Module):
    """BERT's pooler (dense + tanh on the [CLS] state) and the 2-way classifier of NSP / SOP.

    Plain linears, replicated on every tensor-parallel rank as Megatron's BERT keeps its pooler and binary
    head: the final hidden state is replicated, so every rank computes the same logits and the same weight
    gradients, and a head of about h^2 parameters is not worth sharding.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.pooler = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.classifier = nn.Linear(cfg.hidden_size, 2)
        for layer in (self.pooler, self.classifier):
            nn.init.normal_(layer.weight, std=cfg.init_std)
            nn.init.zeros_(layer.bias)

    def forward(self, cls_hidden: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.tanh(self.pooler(cls_hidden)))


def build_head(cfg: ModelConfig, spec: LayerSpec) -> nn.Module:
    return MLMHead(cfg, spec) if cfg.kind == "encoder" else LMHead(cfg, spec)
