"""ELECTRA: a small generator fills the masked positions, the discriminator finds the replaced tokens.

Both are the plmscale trunk: the discriminator is a `TransformerLM` whose head is the replaced-token head,
the generator the transformer layers of a `TransformerLM` built at `model.generator_hidden_fraction` of the
width (`ModelConfig.generator_config`). They share the token, position and segment embeddings and the
embedding LayerNorm (ELECTRA's tied embeddings): the generator reads the discriminator's embedding output,
projected to its width when it is narrower (`embeddings_project`), and its MLM head projects back onto the
shared word embedding. One module, so one launch trains both, sharded by the same layer spec.

The generator's samples carry no gradient: the discriminator is trained on them, the generator only by its
MLM loss (the paper's "maximum likelihood" generator).
"""

from __future__ import annotations

import torch
from torch import nn

from plmscale.config import ModelConfig
from plmscale.model.layers import LayerSpec, LocalLayers
from plmscale.model.transformer import ModelPart, TransformerLM, _seeded


class GeneratorHead(nn.Module):
    """dense (generator width -> embedding width) -> exact GELU -> LayerNorm -> tied projection + bias, as
    transformers' `ElectraGeneratorPredictions` and `generator_lm_head`."""

    def __init__(self, cfg: ModelConfig, width: int, spec: LayerSpec):
        super().__init__()
        self.dense = nn.Linear(width, cfg.hidden_size)
        nn.init.normal_(self.dense.weight, std=cfg.init_std)
        nn.init.zeros_(self.dense.bias)
        self.act = nn.GELU()
        self.ln = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_eps)
        self.output = spec.output_projection(cfg.hidden_size, cfg.padded_vocab_size, bias=True)

    def forward(self, hidden: torch.Tensor, embedding_weight: torch.Tensor) -> torch.Tensor:
        return self.output(self.ln(self.act(self.dense(hidden))), embedding_weight)


class Generator(nn.Module):
    """The generator's projection, transformer layers (a layers-only part of the trunk) and MLM head."""

    def __init__(self, cfg: ModelConfig, spec: LayerSpec):
        super().__init__()
        gen = cfg.generator_config()
        self.project = None
        if gen.hidden_size != cfg.hidden_size:
            self.project = nn.Linear(cfg.hidden_size, gen.hidden_size)
            nn.init.normal_(self.project.weight, std=cfg.init_std)
            nn.init.zeros_(self.project.bias)
        self.trunk = TransformerLM(gen, spec, ModelPart(0, gen.num_layers, embeddings=False, head=False))
        self.head = GeneratorHead(cfg, gen.hidden_size, spec)

    def forward(
        self,
        embedded: torch.Tensor,
        attention_mask: torch.Tensor | None,
        target_positions: torch.Tensor,
        embedding_weight: torch.Tensor,
    ) -> torch.Tensor:
        x = self.project(embedded) if self.project is not None else embedded
        hidden = self.trunk.encode(x, attention_mask).flatten(0, 1).index_select(0, target_positions)
        return self.head(hidden, embedding_weight)


class Electra(nn.Module):
    """Discriminator and generator. `forward` takes the masked input ids, the positions to fill
    (`target_positions`, flat over [batch, seq], ascending) and a seed for the samples, and returns
    (generator logits at those positions, as vocabulary shards; discriminator logits [batch, seq]; the input
    ids the discriminator saw)."""

    def __init__(self, cfg: ModelConfig, spec: LayerSpec | None = None):
        super().__init__()
        spec = spec or LocalLayers()
        self.cfg, self.spec = cfg, spec
        self.discriminator = TransformerLM(cfg, spec)
        # the generator's pieces get seeds of their own, after the discriminator's (see `_seeded`)
        with _seeded(torch.initial_seed(), cfg.num_layers + 3):
            self.generator = Generator(cfg, spec)

    @property
    def deployed(self) -> TransformerLM:
        """The network that fine-tuning keeps (and inference times): the discriminator."""
        return self.discriminator

    def forward(
        self,
        input_ids: torch.Tensor,
        target_positions: torch.Tensor,
        sample_seed: int,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        disc = self.discriminator
        embedded = disc.embed(input_ids, token_type_ids)
        # the tied weight is read after the embedding ran, as `TransformerLM.output` reads it: ZeRO-3 then
        # gathers it for this module instead of releasing it with the embedding
        generator_logits = self.generator(
            embedded, attention_mask, target_positions, disc.word_embeddings.weight
        )
        samples = self.sample(generator_logits, sample_seed)
        corrupted = input_ids.flatten().index_copy(0, target_positions, samples).view_as(input_ids)
        return generator_logits, disc(corrupted, attention_mask, token_type_ids), corrupted

    @torch.no_grad()
    def sample(self, logits: torch.Tensor, seed: int) -> torch.Tensor:
        """One token per row from the generator's softmax over the real vocabulary (Gumbel-max: argmax of
        logits + Gumbel noise), the noise drawn over the full vocabulary from `seed`, so every
        tensor-parallel rank, and every tensor-parallel size, draws the same tokens."""
        # the real vocabulary: the padding rows of the embedding are no tokens (a view: `logits` stay as they are)
        real = self.spec.gather_logits(logits.detach())[:, : self.cfg.vocab_size].float()
        generator = torch.Generator(device=real.device).manual_seed(seed)
        uniform = torch.rand(real.shape, generator=generator, device=real.device)
        return (real - torch.log(-torch.log(uniform))).argmax(-1)


class GeneratorMaskedLM(nn.Module):
    """ELECTRA's generator alone, as a masked LM over the shared embeddings: vocabulary-shard logits
    [batch, seq, vocab] at every position (what transformers' `ElectraForMaskedLM` computes), or
    [targets, vocab] at the `target_positions`, as `TransformerLM` gives them (fill-mask)."""

    def __init__(self, electra: Electra):
        super().__init__()
        self.electra, self.cfg = electra, electra.cfg

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        target_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        disc = self.electra.discriminator
        where = target_positions
        if target_positions is None:  # every position
            where = torch.arange(input_ids.numel(), device=input_ids.device)
        embedded = disc.embed(input_ids, token_type_ids)
        logits = self.electra.generator(embedded, attention_mask, where, disc.word_embeddings.weight)
        return logits.view(*input_ids.shape, -1) if target_positions is None else logits


def build_model(cfg: ModelConfig, spec: LayerSpec | None = None) -> TransformerLM | Electra:
    """The network a model config describes: ELECTRA's pair of models, or one trunk."""
    return Electra(cfg, spec) if cfg.generator_hidden_fraction is not None else TransformerLM(cfg, spec)
