"""What `plmscale plan` prints: the model's arithmetic, the memory at the best layout, the ranked layouts."""

from __future__ import annotations

from plmscale.config import ConfigError
from plmscale.plan.estimate import (
    checkpointed_layers,
    hardware_flops_per_token,
    model_flops_per_token,
    model_state_bytes,
    parameter_count,
)
from plmscale.plan.search import Estimate, GiB, Planner, pipeline_stages


def print_plan(planner: Planner, recipe: str, top: int) -> None:
    cfg, cluster, m = planner.cfg, planner.cluster, planner.cfg.model
    seq, batch = cfg.data.seq_length, cfg.train.global_batch_size
    total = parameter_count(m)
    every_layer = cfg.model_copy(
        update={"train": cfg.train.model_copy(update={"activation_checkpointing": 1})}
    )
    print(f"plan for {recipe}")
    print(
        f"  model        {m.kind}, {m.num_layers} layers x {m.hidden_size}, {m.num_heads} heads of "
        f"{m.head_dim}, ffn {m.ffn_size}, vocabulary {m.vocab_size} ({m.padded_vocab_size} padded), seq {seq}"
    )
    print(
        f"  parameters   {total / 1e9:.3f} B ({m.non_embedding_params() / 1e9:.3f} B outside the embeddings)"
    )
    print(
        f"  FLOPs/token  {model_flops_per_token(cfg):.4g} (model: 6N + 12 L h s), "
        f"{hardware_flops_per_token(every_layer):.4g} with every layer recomputed (hardware)"
    )
    print(
        f"  batch        {batch} x {seq} = {batch * seq / 1e6:.2f} M tokens per step, {cfg.train.precision}"
    )
    print(
        f"  cluster      {cluster.nodes} node(s) x {cluster.gpus_per_node} = {cluster.gpus} GPUs of "
        f"{cluster.gpu_memory_gib:g} GiB ({cluster.usable_bytes / GiB:.1f} GiB usable), {cluster.intra_bw:g} GB/s "
        f"in a node, {cluster.inter_bw:g} GB/s across, {cluster.peak_flops / 1e12:g} TFLOP/s peak, kernels at "
        f"{cluster.efficiency:.0%} of peak"
    )
    fitting, considered = planner.search()
    if not fitting:
        smallest = min(map(planner.estimate, planner.layouts()), key=lambda e: e.peak, default=None)
        closest = f"; the smallest estimated peak is {smallest.peak / GiB:.1f} GiB" if smallest else ""
        raise ConfigError(
            f"{recipe}: none of the {considered} layouts fits {cluster.gpus} GPUs of "
            f"{cluster.gpu_memory_gib:g} GiB{closest}"
        )
    best = fitting[0]
    _print_memory(planner, best)
    print(f"\nlayouts that fit: {len(fitting)} of {considered}; the fastest {min(top, len(fitting))}:")
    print("    TP   PP    DP micro ckpt ZeRO | states  activ  peak GiB | step s  bubble   comm  MFU")
    for e in fitting[:top]:
        print("  " + _row(e))
    print("\nbest layout:")
    print("  " + " ".join(best.layout.overrides()))
    overrides = " ".join(best.layout.overrides())
    if cluster.nodes == 1:
        print(f"  NUM_PROCS={cluster.gpus_per_node} launch/train.sh {recipe} {overrides}")
    else:
        print(
            f"  on each of the {cluster.nodes} nodes (hosts: one line per node, slots={cluster.gpus_per_node}):\n"
            f"  HOSTFILE=hosts NODE_RANK=<0..{cluster.nodes - 1}> MASTER_ADDR=<node 0> "
            f"launch/train.sh {recipe} {overrides}"
        )


def _print_memory(planner: Planner, best: Estimate) -> None:
    cfg, m, layout = planner.cfg, planner.cfg.model, best.layout
    stages = pipeline_stages(m.num_layers, layout.pp)
    numels = max((planner.stage_numels(layout, s) for s in stages), key=sum)
    per_stage = "the whole model" if layout.pp == 1 else f"the largest of {layout.pp} stages"
    print(
        f"\nper GPU at the best layout's TP {layout.tp} x PP {layout.pp} x DP {layout.dp} ({per_stage}: "
        f"{sum(numels) / 1e9:.3f} B parameters on each GPU):"
    )
    cells = []
    for zero in range(4):
        states = model_state_bytes(numels, zero, layout.dp, planner.bf16, layout.pp > 1, planner.persistence)
        cells.append(f"ZeRO-{zero} {states.total / GiB:.2f}")
    print(f"  model states (GiB)   {'   '.join(cells)}   ({cfg.train.precision}, AdamW)")
    act = planner.activations(layout)
    every = checkpointed_layers(0, m.num_layers, 1) * act.checkpointed_layer + act.full_layer
    print(
        f"  activations (GiB) of one micro-batch of {layout.micro} at TP {layout.tp}, all {m.num_layers} layers: "
        f"{m.num_layers * act.full_layer / GiB:.2f} without checkpointing, {every / GiB:.2f} with every layer "
        f"recomputed (inputs + one layer at work); embeddings {act.embeddings / GiB:.2f}, head (logits, "
        f"fp32 loss copy) {act.head / GiB:.2f}"
    )


def _row(e: Estimate) -> str:
    lay, step = e.layout, e.step_s
    return (
        f"{lay.tp:4d} {lay.pp:4d} {lay.dp:5d} {lay.micro:5d} {lay.checkpointing:4d} {lay.zero:4d} | "
        f"{e.states / GiB:6.1f} {e.activations / GiB:6.1f} {e.peak / GiB:6.1f}     | {step:6.2f} "
        f"{e.bubble_s / step:6.0%} {e.comm_s / step:6.0%} {e.mfu:5.0%}"
    )
