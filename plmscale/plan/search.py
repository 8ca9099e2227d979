"""The layouts of a recipe on a cluster that fit in memory, ranked by an estimated step time.

A layout is TP x PP x DP x micro-batch x activation checkpointing x ZeRO stage. Ranks are ordered as
DeepSpeed's `PipeModelDataParallelTopology` orders them (tensor-parallel fastest, then data, then pipeline),
so a group of `size` ranks `stride` apart stays inside a node when `stride * size <= gpus_per_node`.
Tensor parallelism is kept inside a node: its all-reduces sit on the critical path of every layer.

Step time = the 1F1B pipeline, (m + p - 1) micro-batch slots of the slowest stage, where a slot is its
compute at a stated fraction of peak FLOP/s (or, if longer, the host's time to launch its kernels) plus its
tensor-parallel all-reduces (4 per layer, 2 more per
recomputed layer, ring cost 2 (t-1)/t of s b h w bytes each) and its pipeline sends; plus the data-parallel
gradient traffic of ZeRO, which plmscale's configs do not overlap with compute (`overlap_comm: false`):
ZeRO-0/1 reduce once per step (2 (d-1)/d of the gradient bytes), ZeRO-2 reduce-scatters every micro-step
and all-gathers the updated weights, ZeRO-3 gathers the weights for the forward and the backward pass and
reduce-scatters every micro-step. The bubble share is (p - 1) / (m + p - 1) of the step.
"""

from __future__ import annotations

from dataclasses import dataclass

from plmscale.config import RunConfig, load_deepspeed_json
from plmscale.plan.estimate import (
    MLM_TARGET_SHARE,
    Activations,
    activation_bytes,
    block_numels,
    checkpointed_layers,
    model_flops_per_token,
    model_state_bytes,
    stage_numels,
    zero_buffer_bytes,
)

GiB = 2**30
CHECKPOINTING = (0, 1, 2, 4, 8)  # every k-th layer recomputed; 0: none
# Host-side cost of launching one transformer layer's kernels, forward and backward, in eager PyTorch (about 50
# launches of ~8 us): it bounds layouts of many tiny micro-batches, whose GEMMs cannot hide it.
LAUNCH_S_PER_LAYER = 4e-4
MAX_MICRO_BATCH = 128


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int
    gpu_memory_gib: float
    intra_bw: float = 300.0  # GB/s per GPU inside a node (all-reduce bus bandwidth, as nccl-tests report)
    inter_bw: float = 25.0  # GB/s per GPU between nodes
    peak_flops: float = 989e12  # per GPU
    efficiency: float = 0.5  # fraction of peak that the compute kernels reach
    headroom: float = 0.1  # share of GPU memory kept free (CUDA context, allocator, temporaries)

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def usable_bytes(self) -> float:
        return self.gpu_memory_gib * GiB * (1 - self.headroom)

    def bandwidth(self, stride: int, size: int) -> float:
        """Bytes/s of a group of `size` ranks `stride` apart: within a node or across nodes."""
        return 1e9 * (self.intra_bw if stride * size <= self.gpus_per_node else self.inter_bw)


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    micro: int
    checkpointing: int
    zero: int

    def overrides(self) -> list[str]:
        return [
            f"parallel.tensor_parallel={self.tp}",
            f"parallel.pipeline_parallel={self.pp}",
            f"train.micro_batch_size={self.micro}",
            f"train.activation_checkpointing={self.checkpointing}",
            f"train.deepspeed_config=ds_configs/zero{self.zero}.json",
        ]


@dataclass(frozen=True)
class Estimate:
    layout: Layout
    states: float  # bytes, on the GPU with the highest peak
    activations: float
    buffers: float
    compute_s: float  # the step's busy time of the slowest stage, without communication
    step_s: float
    bubble_s: float
    comm_s: float
    mfu: float

    @property
    def peak(self) -> float:
        return self.states + self.activations + self.buffers


@dataclass(frozen=True)
class Stage:
    first: int
    stop: int
    embeddings: bool
    head: bool


def pipeline_stages(layers: int, pp: int) -> list[Stage]:
    per = layers // pp
    return [Stage(i * per, (i + 1) * per, i == 0, i == pp - 1) for i in range(pp)]


class Planner:
    """Estimates layouts of one recipe on one cluster."""

    def __init__(self, cfg: RunConfig, cluster: Cluster):
        self.cfg, self.cluster = cfg, cluster
        self.bf16 = cfg.train.precision == "bf16"
        self.w = 2 if self.bf16 else 4
        zero = load_deepspeed_json(cfg.train.deepspeed_config).get("zero_optimization", {})
        # the sizes of shipped ds_configs/zero*.json, which the chosen overrides name
        self.reduce_bucket = int(zero.get("reduce_bucket_size", 5e7))
        self.persistence = int(zero.get("stage3_param_persistence_threshold", 1e5))
        self.padding_mask = cfg.data.instances is not None
        self._cache = {}  # stage tensors and their model-state bytes, shared by the layouts

    def layouts(self) -> list[Layout]:
        m, gpus, batch = self.cfg.model, self.cluster.gpus, self.cfg.train.global_batch_size
        found = []
        for tp in _divisors(self.cluster.gpus_per_node):
            if m.num_heads % tp or m.ffn_size % tp or m.padded_vocab_size % tp:
                continue
            for pp in _divisors(m.num_layers) if m.distinct_layers == m.num_layers else (1,):  # shared: no PP
                if gpus % (tp * pp) or batch % (gpus // (tp * pp)):
                    continue
                dp = gpus // (tp * pp)
                for micro in _divisors(batch // dp):
                    if micro > MAX_MICRO_BATCH:
                        break
                    for every in CHECKPOINTING:
                        if every > m.num_layers:
                            continue
                        for zero in (1,) if pp > 1 else (1, 2, 3):
                            found.append(Layout(tp, pp, dp, micro, every, zero))
        return found

    def _numels(self, tp: int, layers: int, embeddings: bool, head: bool) -> tuple[int, ...]:
        key = (tp, layers, embeddings, head)
        if key not in self._cache:
            self._cache[key] = tuple(stage_numels(self.cfg.model, tp, layers, embeddings, head))
        return self._cache[key]

    def stage_numels(self, layout: Layout, stage: Stage) -> list[int]:
        layers = stage.stop - stage.first if layout.pp > 1 else self.cfg.model.distinct_layers
        return list(self._numels(layout.tp, layers, stage.embeddings, stage.head))

    def _states(self, numels: tuple[int, ...], zero: int, dp: int, pipelined: bool) -> float:
        key = (numels, zero, dp, pipelined)
        if key not in self._cache:
            states = model_state_bytes(list(numels), zero, dp, self.bf16, pipelined, self.persistence)
            self._cache[key] = states.total
        return self._cache[key]

    def activations(self, layout: Layout) -> Activations:
        return activation_bytes(
            self.cfg.model, self.cfg.data.seq_length, layout.micro, layout.tp, self.bf16, self.padding_mask
        )

    def estimate(self, layout: Layout) -> Estimate:
        cfg, cl, m = self.cfg, self.cluster, self.cfg.model
        tp, pp, dp, micro = layout.tp, layout.pp, layout.dp, layout.micro
        seq, h, w = cfg.data.seq_length, m.hidden_size, self.w
        micro_batches = cfg.train.global_batch_size // (micro * dp)
        act = self.activations(layout)
        buffers = zero_buffer_bytes(layout.zero, self.bf16, self.reduce_bucket)
        if layout.zero == 3:  # gathered weights: the layer at work, the one prefetched, the embedding
            buffers += w * (2 * sum(block_numels(m, tp)) + m.padded_vocab_size * h // tp)

        layer_flops = 6 * sum(block_numels(m, 1)) + 12 * h * seq  # per token, forward + backward
        recompute_flops = 2 * sum(block_numels(m, 1)) + 4 * h * seq
        head_tokens = 1.0 if m.kind == "decoder" else MLM_TARGET_SHARE
        tp_all_reduce = 2 * (tp - 1) / tp * micro * seq * h * w / cl.bandwidth(1, tp) if tp > 1 else 0.0
        pp_send = 2 * micro * seq * h * w / cl.bandwidth(tp * dp, pp) if pp > 1 else 0.0

        slot, compute, largest, worst = 0.0, 0.0, 0, (0.0, 0.0)
        for index, stage in enumerate(pipeline_stages(m.num_layers, pp)):
            layers = stage.stop - stage.first
            recomputed = checkpointed_layers(stage.first, stage.stop, layout.checkpointing)
            flops = layers * layer_flops + recomputed * recompute_flops
            if stage.head:
                flops += head_tokens * 6 * h * m.padded_vocab_size
            stage_compute = micro * seq * flops / tp / (cl.peak_flops * cl.efficiency)
            all_reduces = 4 * layers + 2 * recomputed + (2 if stage.embeddings else 0)
            stage_compute = max(stage_compute, (layers + recomputed) * LAUNCH_S_PER_LAYER)
            stage_slot = stage_compute + all_reduces * tp_all_reduce + pp_send
            slot, compute = max(slot, stage_slot), max(compute, stage_compute)

            numels = self._numels(tp, layers, stage.embeddings, stage.head)
            largest = max(largest, sum(numels))
            states = self._states(numels, layout.zero, dp, pp > 1)
            in_flight = min(pp - index, micro_batches)
            per_micro = recomputed * act.checkpointed_layer + (layers - recomputed) * act.full_layer
            activations = in_flight * (per_micro + (act.embeddings if stage.embeddings else 0))
            activations += (act.full_layer if recomputed else 0) + (act.head if stage.head else 0)
            worst = max(worst, (states, activations), key=sum)

        pipeline_s = (micro_batches + pp - 1) * slot
        grad_bytes = largest * w
        ring = (dp - 1) / dp
        dp_bw = cl.bandwidth(tp, dp)
        rounds = {0: 2, 1: 2, 2: micro_batches + 1, 3: 3 * micro_batches}[layout.zero]
        dp_s = rounds * ring * grad_bytes / dp_bw if dp > 1 else 0.0
        tied_s = 2 * m.padded_vocab_size * h // tp * w / cl.bandwidth(tp * dp, pp) if pp > 1 else 0.0
        step = pipeline_s + dp_s + tied_s
        busy = micro_batches * compute
        tokens = cfg.train.global_batch_size * seq
        return Estimate(
            layout=layout,
            states=worst[0],
            activations=worst[1],
            buffers=buffers,
            compute_s=busy,
            step_s=step,
            bubble_s=(pp - 1) * slot,
            comm_s=step - busy - (pp - 1) * slot,
            mfu=model_flops_per_token(cfg) * tokens / (cl.gpus * cl.peak_flops * step),
        )

    def search(self) -> tuple[list[Estimate], int]:
        """The layouts that fit, fastest first, and how many were considered. Step times equal to 4 digits
        are ties, broken towards larger micro-batches (the estimate holds kernel efficiency constant, while
        real kernels run larger matrices faster), then towards less memory."""
        layouts = self.layouts()
        fitting = [e for e in map(self.estimate, layouts) if e.peak <= self.cluster.usable_bytes]
        fitting.sort(key=lambda e: (float(f"{e.step_s:.4g}"), -e.layout.micro, e.peak))
        return fitting, len(layouts)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
