"""The `model` section: the transformer trunk's shape and variants (BERT, GPT-2, ALBERT, SpanBERT, ELECTRA,
head-pruned), with the sizes derived from it. The one section the model code (plmscale/model/) reads."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from plmscale.config.base import StrictModel


class ModelConfig(StrictModel):
    """The transformer trunk. `kind` picks the attention mask and the head: encoder = bidirectional + MLM
    head (exported as Megatron-BERT), decoder = causal + LM head (exported as GPT-2). An encoder with
    `pair_head` also has BERT's pooler and 2-way classifier on [CLS] (objectives mlm_nsp, mlm_sop).
    `layernorm_position: post` with `embedding_layernorm` is the original BERT's block (exported as BERT),
    so public BERT checkpoints import exactly; the defaults are the pre-LN trunk."""

    kind: Literal["encoder", "decoder"]
    vocab_size: int = Field(gt=4, description="tokenizer vocabulary; padded up for tensor parallelism")
    pad_vocab_to_multiple_of: int = Field(128, gt=0)
    hidden_size: int = Field(gt=0)
    num_layers: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    ffn_hidden_size: int | None = Field(None, gt=0, description="defaults to 4 * hidden_size")
    max_position_embeddings: int = Field(gt=0)
    type_vocab_size: int = Field(2, ge=0, description="segment embeddings (encoder pair objectives)")
    # Left out of dumps while false, so that configs and checkpoints written before it existed still match.
    pair_head: bool = Field(
        False, exclude_if=lambda value: not value, description="pooler + NSP/SOP classifier (encoder)"
    )
    # The variants below are left out of dumps at their defaults, as pair_head is.
    layernorm_position: Literal["pre", "post"] = Field(
        "pre",
        exclude_if=lambda value: value == "pre",
        description="pre: LayerNorm before attention / MLP and a final LayerNorm (GPT-2, Megatron-BERT); "
        "post: after each residual add, no final LayerNorm (BERT)",
    )
    embedding_layernorm: bool = Field(
        False, exclude_if=lambda value: not value, description="LayerNorm on the summed embeddings (BERT)"
    )
    activation: Literal["gelu", "gelu_tanh"] = Field(
        "gelu",
        exclude_if=lambda value: value == "gelu",
        description="MLP (and MLM head) activation: exact GELU, or its tanh approximation (GPT-2's gelu_new)",
    )
    embedding_size: int | None = Field(
        None,
        gt=0,
        exclude_if=lambda value: value is None,
        description="ALBERT's factorized embedding: word, position and segment embeddings of this size "
        "(at most hidden_size), projected to hidden_size; the MLM head projects back to it",
    )
    layer_groups: int | None = Field(
        None,
        gt=0,
        exclude_if=lambda value: value is None,
        description="ALBERT's cross-layer sharing: this many distinct layers (dividing num_layers), layer i "
        "running those of group i * layer_groups // num_layers (1: all layers share one)",
    )
    span_boundary_head: bool = Field(
        False,
        exclude_if=lambda value: not value,
        description="SpanBERT's span-boundary head (objective mlm_sbo)",
    )
    span_offset_size: int | None = Field(
        None,
        gt=0,
        exclude_if=lambda value: value is None,
        description="width of the span-boundary head's offset embedding, concatenated with the two boundary "
        "states (SpanBERT's code: 200); default hidden_size",
    )
    generator_hidden_fraction: float | None = Field(
        None,
        gt=0,
        le=1,
        exclude_if=lambda value: value is None,
        description="ELECTRA (objective electra): this model is the discriminator, and a generator of this "
        "fraction of its width (hidden size, heads, FFN; 1/4 to 1/3 in the paper) shares its embeddings",
    )
    attention_head_dim: int | None = Field(
        None,
        gt=0,
        exclude_if=lambda value: value is None,
        description="width of each attention head, when not hidden_size / num_heads: a head-pruned model "
        "(`plmscale prune`) keeps its heads' width with fewer heads",
    )
    layernorm_eps: float = Field(1e-5, gt=0)
    hidden_dropout: float = Field(0.1, ge=0, lt=1)
    attention_dropout: float = Field(0.1, ge=0, lt=1)
    init_std: float = Field(0.02, gt=0)

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> ModelConfig:
        if self.attention_head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.num_heads={self.num_heads} must divide model.hidden_size={self.hidden_size} "
                "(or set model.attention_head_dim)"
            )
        if self.pair_head and self.kind != "encoder":
            raise ValueError("model.pair_head needs model.kind: encoder")
        self._check_albert()
        if self.span_boundary_head and self.kind != "encoder":
            raise ValueError("model.span_boundary_head needs model.kind: encoder")
        if self.span_offset_size is not None and not self.span_boundary_head:
            raise ValueError(
                "model.span_offset_size sizes the span-boundary head: set model.span_boundary_head"
            )
        if self.generator_hidden_fraction is not None:
            self._check_generator()
        return self

    def _check_generator(self) -> None:
        """ELECTRA is BERT's post-LN encoder (so it exports as transformers' ElectraFor* classes), without
        a pair or span-boundary head; the generator's heads must divide its width."""
        key = f"model.generator_hidden_fraction={self.generator_hidden_fraction}"
        if self.kind != "encoder" or self.layernorm_position != "post" or not self.embedding_layernorm:
            raise ValueError(
                f"{key} (ELECTRA) builds BERT's encoder: set model.kind: encoder, "
                "model.layernorm_position: post and model.embedding_layernorm: true"
            )
        if self.pair_head or self.span_boundary_head:
            raise ValueError(f"{key} (ELECTRA) takes neither model.pair_head nor model.span_boundary_head")
        gen = self.generator_config()
        if gen.hidden_size % gen.num_heads:
            raise ValueError(
                f"{key}: the generator's {gen.num_heads} heads do not divide its hidden size {gen.hidden_size}"
            )

    def generator_config(self) -> ModelConfig:
        """ELECTRA's generator: the discriminator's depth, `generator_hidden_fraction` of its hidden size,
        heads and FFN width (as ELECTRA's `get_generator_config`), at least one head."""
        fraction = self.generator_hidden_fraction
        return self.model_copy(
            update={
                "hidden_size": max(1, round(self.hidden_size * fraction)),
                "num_heads": max(1, round(self.num_heads * fraction)),
                "ffn_hidden_size": max(1, round(self.ffn_size * fraction)),
                "generator_hidden_fraction": None,
            }
        )

    def _check_albert(self) -> None:
        if self.embedding_size is not None:
            if self.kind != "encoder":
                raise ValueError("model.embedding_size (factorized embedding) needs model.kind: encoder")
            if self.embedding_size > self.hidden_size:
                raise ValueError(
                    f"model.embedding_size={self.embedding_size} exceeds model.hidden_size={self.hidden_size} "
                    "(a factorized embedding is the smaller one)"
                )
        if self.layer_groups is not None and self.num_layers % self.layer_groups:
            raise ValueError(
                f"model.layer_groups={self.layer_groups} must divide model.num_layers={self.num_layers}"
            )

    @property
    def embed_size(self) -> int:
        """Width of the embeddings (and of the MLM head's output transform)."""
        return self.embedding_size or self.hidden_size

    @property
    def distinct_layers(self) -> int:
        return self.layer_groups or self.num_layers

    def layer_group(self, layer: int) -> int:
        """Which distinct layer's weights layer `layer` runs (itself, without sharing)."""
        return layer * self.distinct_layers // self.num_layers

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.attention_head_dim or self.hidden_size // self.num_heads

    @property
    def attention_width(self) -> int:
        """Width of the concatenated heads: the QKV projection's output per q, k, v; the hidden size unless
        `attention_head_dim` says otherwise."""
        return self.num_heads * self.head_dim

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / self.pad_vocab_to_multiple_of) * self.pad_vocab_to_multiple_of

    def non_embedding_params(self) -> int:
        """Weights applied per token (a shared layer counts each time it runs): the 6N of model FLOPs."""
        h, a, f = self.hidden_size, self.attention_width, self.ffn_size
        per_layer = 4 * h * a + 3 * a + h + 2 * h * f + f + h + 4 * h  # attention, MLP, two LayerNorms
        return self.num_layers * per_layer
