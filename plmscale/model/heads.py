"""Output heads: the MLM head of BERT and the plain LM head of GPT, both tied to the word embedding,
BERT's sentence-pair head (NSP / SOP) on the [CLS] state, SpanBERT's span-boundary head and ELECTRA's
replaced-token-detection head."""

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


def _linear(in_features: int, out_features: int, std: float) -> nn.Linear:
    layer = nn.Linear(in_features, out_features)
    nn.init.normal_(layer.weight, std=std)
    nn.init.zeros_(layer.bias)
    return layer


class SpanBoundaryHead(nn.Module):
    """SpanBERT's span-boundary objective: each token of a masked span [s, e) is predicted from the final
    states of the tokens around the span, x[s-1] and x[e], and an embedding of its offset in the span
    (`model.span_offset_size` wide, concatenated with them as in SpanBERT's code, which uses 200), through
    two GELU + LayerNorm layers and the tied output projection with its own bias.

    Called with `span_boundaries` [batch, seq, 2], the (left, right) boundary positions of each position
    predicted this way and -1 elsewhere; returns vocabulary-shard logits for those positions in row-major
    order (the order of `labels[span_boundaries[..., 0] >= 0]`). Replicated under tensor parallelism, as
    the MLM head's dense layer is: its inputs are the replicated final states.
    """

    def __init__(self, cfg: ModelConfig, spec: LayerSpec):
        super().__init__()
        h, width = cfg.hidden_size, cfg.span_offset_size or cfg.hidden_size
        self.offsets = nn.Embedding(cfg.max_position_embeddings, width)  # a span is shorter than the sequence
        nn.init.normal_(self.offsets.weight, std=cfg.init_std)
        self.act = activation(cfg.activation)
        self.dense_in = _linear(2 * h + width, h, cfg.init_std)
        self.ln_in = nn.LayerNorm(h, eps=cfg.layernorm_eps)
        self.dense_out, self.ln_out = _linear(h, h, cfg.init_std), nn.LayerNorm(h, eps=cfg.layernorm_eps)
        self.output = spec.output_projection(h, cfg.padded_vocab_size, bias=True)

    def forward(
        self, hidden: torch.Tensor, span_boundaries: torch.Tensor, embedding_weight: torch.Tensor
    ) -> torch.Tensor:
        row, position = (span_boundaries[..., 0] >= 0).nonzero(as_tuple=True)
        left, right = span_boundaries[row, position].unbind(-1)
        x = torch.cat([hidden[row, left], hidden[row, right], self.offsets(position - left - 1)], dim=-1)
        x = self.ln_in(self.act(self.dense_in(x)))
        x = self.ln_out(self.act(self.dense_out(x)))
        return self.output(x, embedding_weight)


class ReplacedTokenHead(nn.Module):
    """ELECTRA's discriminator head: dense -> activation -> one logit per position, "this token was
    replaced by the generator". Replicated under tensor parallelism, as the pair head is."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.act = activation(cfg.activation)
        self.dense = _linear(cfg.hidden_size, cfg.hidden_size, cfg.init_std)
        self.prediction = _linear(cfg.hidden_size, 1, cfg.init_std)

    def forward(self, hidden: torch.Tensor, embedding_weight: torch.Tensor | None = None) -> torch.Tensor:
        return self.prediction(self.act(self.dense(hidden))).squeeze(-1)


def build_head(cfg: ModelConfig, spec: LayerSpec) -> nn.Module:
    if cfg.generator_hidden_fraction is not None:  # ELECTRA's discriminator
        return ReplacedTokenHead(cfg)
    return MLMHead(cfg, spec) if cfg.kind == "encoder" else LMHead(cfg, spec)
