"""A transformer that serves as encoder (bidirectional) or decoder (causal).

Pre-LayerNorm with a final LayerNorm (GPT-2, Megatron-BERT) by default; `model.layernorm_position: post`
with `model.embedding_layernorm` gives the original BERT's block, the same modules in another order.
ALBERT's two savings are options too: `model.embedding_size` E < H embeds in E dimensions and projects to H
(the MLM head transforms back to E, tied to the E-wide word embedding), and `model.layer_groups` G builds
G distinct layers that the num_layers layers run in turn (layer i runs group i * G // num_layers), so a
shared layer is one module, its gradient summed over every layer that runs it.

Shapes are [batch, seq, hidden]. Attention runs through `scaled_dot_product_attention`; a `Capture` passed to
`forward` records internals (hidden states, query/key/value heads) for losses that look inside the model. The fused QKV
projection is laid out per head as [heads, (q, k, v), head_dim] so that sharding its output dimension hands
each tensor-parallel rank whole heads; the number of local heads is read off the projection's output.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from plmscale.config import ModelConfig
from plmscale.model.heads import PairHead, SpanBoundaryHead, build_head
from plmscale.model.layers import LayerSpec, LocalLayers, activation


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, spec: LayerSpec):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.dropout = cfg.attention_dropout
        self.qkv = spec.column_linear(cfg.hidden_size, 3 * cfg.attention_width, cfg.init_std)
        # Scaled init of residual projections (GPT-2 / Megatron): keeps the residual stream's variance flat.
        self.proj = spec.row_linear(
            cfg.attention_width, cfg.hidden_size, cfg.init_std / (2 * cfg.num_layers) ** 0.5
        )

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, causal: bool, record: Callable | None = None
    ) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, -1, 3, self.head_dim).permute(3, 0, 2, 1, 4)
        if record is not None:
            record(q, k, v)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=causal and mask is None,
        )
        return self.proj(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, spec: LayerSpec):
        super().__init__()
        self.act = activation(cfg.activation)
        self.fc_in = spec.column_linear(cfg.hidden_size, cfg.ffn_size, cfg.init_std)
        self.fc_out = spec.row_linear(
            cfg.ffn_size, cfg.hidden_size, cfg.init_std / (2 * cfg.num_layers) ** 0.5
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.act(self.fc_in(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, spec: LayerSpec):
        super().__init__()
        self.ln_attn = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_eps)
        self.attn = Attention(cfg, spec)
        self.ln_mlp = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_eps)
        self.mlp = MLP(cfg, spec)
        self.dropout = nn.Dropout(cfg.hidden_dropout)
        self.post_ln = cfg.layernorm_position == "post"

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, causal: bool, record: Callable | None = None
    ) -> torch.Tensor:
        if self.post_ln:
            x = self.ln_attn(x + self.dropout(self.attn(x, mask, causal, record)))
            return self.ln_mlp(x + self.dropout(self.mlp(x)))
        x = x + self.dropout(self.attn(self.ln_attn(x), mask, causal, record))
        return x + self.dropout(self.mlp(self.ln_mlp(x)))


class Capture:
    """What one forward pass records of the model's internals, for losses that look inside it (distillation).

    `hidden_states`: the embeddings' output, then each layer's output ([batch, seq, hidden]; pre-LN trunks
    before the final LayerNorm), when `hidden`. `qkv[layer]`: that layer's query, key and value heads,
    [batch, heads, seq, head_dim] (this rank's heads under tensor parallelism, in order), for the layers in
    `attention_layers`. `attend`: the boolean mask (True = attend) their attention used, [batch or 1, 1, seq,
    seq], or None where every position sees every other. Attention scores are `q @ k^T / sqrt(head_dim)`
    under that mask: SDPA never materializes them, so the fast path stays unchanged and whoever needs them
    computes them from what is recorded here. Nothing is recorded unless asked for.
    """

    def __init__(self, hidden: bool = False, attention_layers: Iterable[int] = ()):
        self.hidden, self.attention_layers = hidden, frozenset(attention_layers)
        self.hidden_states: list[torch.Tensor] = []
        self.qkv: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.attend: torch.Tensor | None = None

    def _record_qkv(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.qkv[layer] = (q, k, v)  # a recomputed (activation-checkpointed) layer records the same values

    def recorder(self, layer: int) -> Callable | None:
        return partial(self._record_qkv, layer) if layer in self.attention_layers else None


@dataclass(frozen=True)
class ModelPart:
    """A contiguous slice of the network: transformer layers [first_layer, stop_layer), with the embeddings
    before them and/or the final LayerNorm and heads after them. The whole model is the part with all of it;
    pipeline stages are built as parts (plmscale.parallel.pipeline), under the whole model's parameter names.
    """

    first_layer: int
    stop_layer: int
    embeddings: bool
    head: bool

    @classmethod
    def whole(cls, cfg: ModelConfig) -> ModelPart:
        return cls(0, cfg.num_layers, embeddings=True, head=True)


def patterned_attention(pattern: torch.Tensor, keep: torch.Tensor | None, seq: int) -> torch.Tensor:
    """[b, 1, s, s] boolean mask (True = attend) from per-sample attention patterns, built where they are:
    each sample's [s, s] mask is the one tensor of that size materialized, the rest broadcasts.

    `pattern` [b, 2] holds (direction, prefix) per sample. Row i attends column j when j < prefix (a prefix
    every row sees), or by direction: 1 when j <= i (left to right), -1 when j >= i (right to left), 0
    always (bidirectional). A prefix LM (UniLM's seq2seq) is direction 1 with prefix = the source's length.
    `keep` [b, s] marks real positions; padding neither attends nor is attended, but attends itself (an
    empty row would make attention's softmax NaN).
    """
    position = torch.arange(seq, device=pattern.device)
    earlier = position[None, :] <= position[:, None]  # [s, s]: j <= i
    direction, prefix = pattern[:, 0, None, None], pattern[:, 1, None, None]
    mask = torch.where(direction > 0, earlier, earlier.T)  # [b, s, s]
    mask |= direction == 0
    mask |= position < prefix  # [b, 1, s]
    if keep is not None:
        keep = keep.bool()
        mask &= keep[:, None, :]
        mask &= keep[:, :, None]
        mask.diagonal(dim1=1, dim2=2).fill_(True)
    return mask[:, None]


@contextmanager
def _seeded(base: int, piece: int):
    """Each piece of the network is initialized from its own seed, (run seed, piece), so a model built in
    parts holds the same weights as the model built whole. An unseeded process's `torch.initial_seed()` is a
    random 64-bit number: the seed is taken modulo 2^63, which `manual_seed` accepts."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed((base * 1_000_003 + piece) % (1 << 63))
        yield


class TransformerLM(nn.Module):
    """Embeddings -> blocks -> final LayerNorm (pre-LN) -> head tied to the word embedding.

    Returns vocabulary-shard logits; the spec's `cross_entropy` / `gather_logits` consume them. With
    `target_positions` (flat positions over [batch, seq], ascending), the head runs only there and returns
    [targets, vocab]: MLM predicts ~15 % of positions, and the vocabulary projection is the costliest matmul
    of a small model. Positions, not a boolean mask: gathering them needs no device-to-host synchronization. With `classify_pair`
    (a model with `pair_head`), returns (those logits, [batch, 2] pair logits from the first position);
    `attention_pattern` gives each sample its own attention mask (UniLM's modes, `patterned_attention`);
    with `span_boundaries` (a model with `span_boundary_head`), the span-boundary logits come last.

    Built as a `part`, it holds only that slice; `embed`, `encode` and `output` run the slices in turn (a
    part with the head but not the embeddings still holds the word embedding, which the head is tied to).
    Initialization depends on the run's seed (`torch.initial_seed()`) only, not on which part is built.
    """

    def __init__(self, cfg: ModelConfig, spec: LayerSpec | None = None, part: ModelPart | None = None):
        super().__init__()
        spec = spec or LocalLayers()
        self.cfg, self.spec = cfg, spec
        self.part = part = part or ModelPart.whole(cfg)
        self.causal = cfg.kind == "decoder"
        seed = torch.initial_seed()
        words, embeddings, head = range(cfg.num_layers, cfg.num_layers + 3)  # pieces after layers 0 .. L-1
        if part.embeddings or part.head:
            with _seeded(seed, words):
                self.word_embeddings = spec.embedding(cfg.padded_vocab_size, cfg.embed_size, cfg.init_std)
        if part.embeddings:
            with _seeded(seed, embeddings):
                self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.embed_size)
                nn.init.normal_(self.position_embeddings.weight, std=cfg.init_std)
                if cfg.kind == "encoder" and cfg.type_vocab_size:
                    self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.embed_size)
                    nn.init.normal_(self.token_type_embeddings.weight, std=cfg.init_std)
                else:
                    self.token_type_embeddings = None
                self.embedding_ln = (
                    nn.LayerNorm(cfg.embed_size, eps=cfg.layernorm_eps) if cfg.embedding_layernorm else None
                )
                # Replicated under tensor parallelism, as the MLM head's dense layer: input and output are.
                self.embedding_projection = None
                if cfg.embedding_size is not None:
                    self.embedding_projection = nn.Linear(cfg.embedding_size, cfg.hidden_size)
                    nn.init.normal_(self.embedding_projection.weight, std=cfg.init_std)
                    nn.init.zeros_(self.embedding_projection.bias)
            self.embedding_dropout = nn.Dropout(cfg.hidden_dropout)
        # Keyed by distinct layer (= layer index without sharing).
        self.layers = nn.ModuleDict()
        for group in sorted({cfg.layer_group(i) for i in range(part.first_layer, part.stop_layer)}):
            with _seeded(seed, group):
                self.layers[str(group)] = Block(cfg, spec)
        if part.head:
            with _seeded(seed, head):
                # A post-LN block already ends in a LayerNorm.
                self.final_ln = (
                    nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_eps)
                    if cfg.layernorm_position == "pre"
                    else None
                )
                self.head = build_head(cfg, spec)
                self.pair_head = PairHead(cfg) if cfg.pair_head else None
                self.span_boundary_head = SpanBoundaryHead(cfg, spec) if cfg.span_boundary_head else None

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        if self.token_type_embeddings is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            x = x + self.token_type_embeddings(token_type_ids)
        if self.embedding_ln is not None:
            x = self.embedding_ln(x)
        x = self.embedding_dropout(x)
        return self.embedding_projection(x) if self.embedding_projection is not None else x

    def encode(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        capture: Capture | None = None,
        attention_pattern: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """This part's transformer layers; `attention_mask` is the [batch, seq] padding mask,
        `attention_pattern` [batch, 2] each sample's own (direction, prefix) (see `patterned_attention`)."""
        if attention_pattern is not None:
            mask = patterned_attention(attention_pattern, attention_mask, x.shape[1])
        elif attention_mask is not None:
            mask = self.attention_bias(attention_mask, x.shape[1])
        else:
            mask = None
        if capture is not None:
            capture.attend = mask
            if mask is None and self.causal:
                capture.attend = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).tril()[
                    None, None
                ]
            if capture.hidden:
                capture.hidden_states.append(x)
        for index in range(self.part.first_layer, self.part.stop_layer):
            layer = self.layers[str(self.cfg.layer_group(index))]
            if capture is None:
                x = layer(x, mask, self.causal)
                continue
            x = layer(x, mask, self.causal, capture.recorder(index))
            if capture.hidden:
                capture.hidden_states.append(x)
        return x

    def output(
        self,
        x: torch.Tensor,
        target_positions: torch.Tensor | None = None,
        classify_pair: bool = False,
        span_boundaries: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if classify_pair and self.pair_head is None:
            raise ValueError("classify_pair needs a model built with model.pair_head: true")
        if span_boundaries is not None and self.span_boundary_head is None:
            raise ValueError("span_boundaries needs a model built with model.span_boundary_head: true")
        hidden = self.final_ln(x) if self.final_ln is not None else x
        extra = [self.pair_head(hidden[:, 0])] if classify_pair else []
        if span_boundaries is not None:
            extra.append(self.span_boundary_head(hidden, span_boundaries, self.word_embeddings.weight))
        if target_positions is not None:
            hidden = hidden.flatten(0, 1).index_select(0, target_positions)
        logits = self.head(hidden, self.word_embeddings.weight)
        return (logits, *extra) if extra else logits

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        capture: Capture | None = None,
    ) -> torch.Tensor:
        """The final hidden states (after the last LayerNorm) of a whole model."""
        x = self.encode(self.embed(input_ids, token_type_ids), attention_mask, capture)
        return self.final_ln(x) if self.final_ln is not None else x

    def attention_bias(self, attention_mask: torch.Tensor, seq: int) -> torch.Tensor:
        """Boolean [b, 1, s, s] mask (True = attend) from a [b, s] padding mask, causal for decoders."""
        keep = attention_mask.bool()[:, None, None, :]
        if self.causal:
            keep = keep & torch.ones(seq, seq, dtype=torch.bool, device=keep.device).tril()
        return keep

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        target_positions: torch.Tensor | None = None,
        classify_pair: bool = False,
        span_boundaries: torch.Tensor | None = None,
        capture: Capture | None = None,
        attention_pattern: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        x = self.encode(self.embed(input_ids, token_type_ids), attention_mask, capture, attention_pattern)
        return self.output(x, target_positions, classify_pair, span_boundaries)
