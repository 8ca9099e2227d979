"""What a layout costs one GPU: parameters, FLOPs per token, model-state and activation bytes.

Model states follow what DeepSpeed (0.19) actually allocates for plmscale's settings (torch AdamW, gradients
accumulated in the model's dtype, no `data_types.grad_accum_dtype`), per rank after a backward pass:

    ZeRO   precision  optimizer wrapper       weights       gradients   fp32 master   Adam m, v
    0      fp32       (none)                  4 N           4 N         -             8 N
    0      bf16       FP16_UnfusedOptimizer   2 N           2 N         4 N           8 N
    0      bf16, PP   BF16_Optimizer          2 N           2 N         4 N / d       8 N / d
    1      w bytes    DeepSpeedZeroOptimizer  w N           w N         4 N / d       8 N / d
    2      w bytes    DeepSpeedZeroOptimizer  w N           w N / d     4 N / d       8 N / d
    3      w bytes    ZeRO stage 3            w (N/d + Np)  w N / d     4 N / d       8 N / d

with N the parameters of this rank's tensor-parallel shard of its pipeline stage, d the data-parallel size,
w = 4 (fp32) or 2 (bf16), and Np the elements of the tensors small enough for ZeRO-3 to keep whole on every
rank (`stage3_param_persistence_threshold`; none at d = 1, where the gathered view is the partition). The
fp32 master copy exists under ZeRO 1-3 even in fp32 runs: DeepSpeed clones the partition it updates. ZeRO-1
keeps whole gradients between micro-steps (it reduces at the accumulation boundary), ZeRO-2/3 reduce every
micro-step into their partition. `tests/test_plan.py` checks this table against the tensors of real runs.

Activations follow Korthikanti et al. (2022), per transformer layer without sequence parallelism: 34 s b h
bytes in 16-bit (10 replicated + 24 / t sharded over tensor parallelism) plus 5 a s^2 b for the attention
scores. plmscale runs `scaled_dot_product_attention`, which on CUDA picks the flash or memory-efficient
kernel: they keep Q, K, V, the output and a log-sum-exp per row and regenerate the dropout mask, so no
s x s tensor is stored; the estimate assumes those kernels (the CPU's math fallback stores the scores).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from plmscale.config import ModelConfig, RunConfig

MLM_TARGET_SHARE = 0.15  # BERT's share of masked positions: the MLM head runs on those only


def block_numels(m: ModelConfig, tp: int) -> list[int]:
    """The parameter tensors of one transformer block as one tensor-parallel rank holds them: the QKV and
    MLP-in projections are split by output (weights and biases), the attention-out and MLP-out projections by
    input (weights only; their biases and the LayerNorms are replicated)."""
    h, f = m.hidden_size, m.ffn_size
    layer_norm = [h, h]
    attention = [3 * h * h // tp, 3 * h // tp, h * h // tp, h]
    mlp = [f * h // tp, f // tp, h * f // tp, h]
    return layer_norm + attention + layer_norm + mlp


def stage_numels(m: ModelConfig, tp: int, layers: int, embeddings: bool, head: bool) -> list[int]:
    """The parameter tensors of one pipeline stage (or of the whole model) on one tensor-parallel rank.

    A stage with the head but not the embeddings keeps its own copy of the tied word embedding, as
    plmscale.parallel.pipeline's TiedLayerSpec does."""
    h, e, vocab_shard = m.hidden_size, m.embed_size, m.padded_vocab_size // tp
    numels = [n for _ in range(layers) for n in block_numels(m, tp)]
    if embeddings or head:
        numels.append(vocab_shard * e)
    if embeddings:
        numels.append(m.max_position_embeddings * e)
        if m.kind == "encoder" and m.type_vocab_size:
            numels.append(m.type_vocab_size * e)
        if m.embedding_layernorm:
            numels += [e, e]
        if m.embedding_size is not None:
            numels += [e * h, h]  # ALBERT's projection to the hidden size
    if head:
        if m.layernorm_position == "pre":
            numels += [h, h]  # final LayerNorm
        if m.kind == "encoder":
            numels += [h * e, e, e, e, vocab_shard]  # MLM transform dense, its LayerNorm, output bias
        if m.pair_head:
            numels += [h * h, h, 2 * h, 2]  # pooler, classifier
    return numels


def parameter_count(m: ModelConfig) -> int:
    return sum(stage_numels(m, 1, m.distinct_layers, embeddings=True, head=True))


# --------------------------------------------------------------------------------------------- FLOPs


def checkpointed_layers(first: int, stop: int, every: int) -> int:
    """Layers in [first, stop) that `train.activation_checkpointing=every` recomputes: those whose global
    index is a multiple of `every` (plmscale.parallel.checkpointing)."""
    return sum(1 for index in range(first, stop) if every and index % every == 0)


def model_flops_per_token(cfg: RunConfig) -> float:
    """Forward + backward FLOPs per token (PaLM, appendix B): 6 N + 12 L h s, N the non-embedding parameters
    plus the output projection onto the vocabulary; what MFU counts."""
    m = cfg.model
    weights = m.non_embedding_params() + m.hidden_size * m.padded_vocab_size
    return 6 * weights + 12 * m.num_layers * m.hidden_size * cfg.data.seq_length


def hardware_flops_per_token(cfg: RunConfig) -> float:
    """Model FLOPs plus the forward pass that activation checkpointing repeats: a checkpointed layer costs
    8 instead of 6 FLOPs per weight and 16 instead of 12 per attention score; what HFU counts."""
    m = cfg.model
    recomputed = checkpointed_layers(0, m.num_layers, cfg.train.activation_checkpointing) / m.num_layers
    forward = 2 * m.non_embedding_params() + 4 * m.num_layers * m.hidden_size * cfg.data.seq_length
    return model_flops_per_token(cfg) + recomputed * forward


# --------------------------------------------------------------------------------------------- memory


@dataclass(frozen=True)
class ModelStates:
    """Bytes one GPU holds for its parameters, gradients and optimizer (ZeRO's "model states")."""

    weights: float
    gradients: float
    master: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.master + self.optimizer


def model_state_bytes(
    numels: list[int],
    zero: int,
    dp: int,
    bf16: bool,
    pipelined: bool = False,
    persistence_threshold: int = 100_000,
) -> ModelStates:
    """The module docstring's table for the given tensors (one rank's shard of its stage)."""
    n = sum(numels)
    shard = n / dp
    if zero == 0 and not bf16:
        return ModelStates(4 * n, 4 * n, 0, 8 * n)  # torch's AdamW on the parameters themselves
    if zero == 0:
        master = shard if pipelined else n  # BF16_Optimizer partitions; FP16_UnfusedOptimizer does not
        return ModelStates(2 * n, 2 * n, 4 * master, 8 * master)
    w = 2 if bf16 else 4
    if zero == 3:
        persistent = sum(x for x in numels if x <= persistence_threshold) if dp > 1 else 0
        weights = w * (shard + persistent)
    else:
        weights = w * n
    gradients = w * n if zero == 1 else w * shard
    return ModelStates(weights, gradients, 4 * shard, 8 * shard)


def zero_buffer_bytes(zero: int, bf16: bool, reduce_bucket_size: int) -> float:
    """DeepSpeed's gradient-reduction bucket (`reduce_bucket_size` elements), alive during the backward pass
    under ZeRO 1-2 and for the whole run under ZeRO-3."""
    return (2 if bf16 else 4) * reduce_bucket_size if zero else 0


@dataclass(frozen=True)
class Activations:
    """Activation bytes of one micro-batch on one GPU, for the layers of one pipeline stage."""

    full_layer: float  # one layer that keeps everything for its backward pass
    checkpointed_layer: float  # one recomputed layer: its input only
    embeddings: float  # on the first stage
    head: float  # on the last stage: final LayerNorm input, logits, their fp32 loss copy and gradient


def activation_bytes(
    m: ModelConfig, seq: int, micro: int, tp: int, bf16: bool, padding_mask: bool = False
) -> Activations:
    """Korthikanti et al. (2022) per layer, dtype-aware, with flash attention (see the module docstring).

    With a padding mask (pre-built instances), attention takes the memory-efficient kernel with the boolean
    [b, 1, s, s] mask turned into an additive bias of the model's dtype, which each layer keeps."""
    w = 2 if bf16 else 4
    sbh = seq * micro * m.hidden_size
    masks = 2 * sbh if m.hidden_dropout else 0  # bool masks of the two residual dropouts
    replicated = 4 * sbh * w  # inputs of both LayerNorms, of QKV and of MLP-in
    # Q, K, V, attention output, MLP-in output (GeLU input) and GeLU output
    sharded = (4 * sbh + 2 * seq * micro * m.ffn_size) * w / tp
    log_sum_exp = 4 * micro * m.num_heads * seq / tp
    bias = micro * seq * seq * w if padding_mask else 0
    full = replicated + sharded + masks + log_sum_exp + bias
    embeddings = (sbh if m.hidden_dropout else 0) + (micro * seq * seq if padding_mask else 0)
    positions = seq * micro if m.kind == "decoder" else math.ceil(MLM_TARGET_SHARE * seq * micro)
    # the logits, their fp32 copy that the loss keeps (softmax) and, when backward starts, their gradient
    logits = positions * m.padded_vocab_size / tp * (2 * w + 4)
    head = sbh * w + logits
    if m.kind == "encoder":
        head += 3 * positions * m.hidden_size * w  # MLM transform: dense, GeLU and LayerNorm inputs
    return Activations(full, sbh * w, embeddings, head)
