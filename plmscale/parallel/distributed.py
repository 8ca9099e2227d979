"""Process groups: DeepSpeed's communication backend plus megatron-core's tensor/pipeline/data-parallel groups.

megatron-core orders ranks tensor-parallel fastest, then data-parallel, then pipeline stage, which is the
order of DeepSpeed's `PipeModelDataParallelTopology(num_pp, num_mp, num_dp)` too, so the two agree on every
rank's coordinates.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from megatron.core import parallel_state


@dataclass(frozen=True)
class Topology:
    rank: int
    world_size: int
    tp_rank: int
    tp_size: int
    dp_rank: int
    dp_size: int
    pp_rank: int = 0
    pp_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(tensor_parallel: int, pipeline_parallel: int = 1) -> Topology:
    """Initializes torch.distributed through DeepSpeed (gloo on CPU, NCCL on CUDA) and the TP x PP x DP grid."""
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        accelerator.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = "gloo" if accelerator.device_name() == "cpu" else accelerator.communication_backend_name()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    deepspeed.init_distributed(dist_backend=backend)
    if accelerator.device_name() == "cpu":
        unlink_shared_memory()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_parallel,
            pipeline_model_parallel_size=pipeline_parallel,
            create_gloo_process_groups=False,
        )
    return Topology(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        tp_size=parallel_state.get_tensor_model_parallel_world_size(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        pp_size=parallel_state.get_pipeline_model_parallel_world_size(),
    )


def unlink_shared_memory() -> None:
    """DeepSpeed's CPU all-reduce (ranks all on one machine) maps a 66 MB /dev/shm segment per rank and never
    unlinks it: every run would leave world size x 66 MB of memory behind until reboot. Past a barrier, every
    rank has mapped its peers' segments, so each unlinks its own; the mappings stay valid until exit."""
    dist.barrier()
    address, port = os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]
    segment = f"deepspeed_allreduce_buffer_{os.getuid()}_{address}_{port}_{dist.get_rank()}"
    Path("/dev/shm", segment).unlink(missing_ok=True)


def device() -> torch.device:
    return torch.device(get_accelerator().current_device_name())


def all_reduce_sum(values: list[float], contribute: bool) -> list[float]:
    """Sums scalars over all ranks, counting only those where `contribute` is true (the ranks that hold
    one copy of each value: tensor-parallel replicas agree, and only the last pipeline stage has losses)."""
    tensor = torch.tensor(values if contribute else [0.0] * len(values), dtype=torch.float64, device=device())
    dist.all_reduce(tensor)
    return tensor.tolist()


class DeepSpeedMPU:
    """The model-parallel unit DeepSpeed asks for (`mpu=`) without pipeline parallelism, answered from
    megatron-core's groups. A pipelined model brings its own (the `PipelineModule`'s grid), whose ranks and
    groups are the same ones laid out in DeepSpeed's terms."""

    get_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    get_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_model_parallel_world_size = staticmethod(parallel_state.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_group = staticmethod(parallel_state.get_tensor_model_parallel_group)
    get_tensor_model_parallel_rank = staticmethod(parallel_state.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(parallel_state.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_src_rank = staticmethod(parallel_state.get_tensor_model_parallel_src_rank)
    get_data_parallel_group = staticmethod(parallel_state.get_data_parallel_group)
    get_data_parallel_rank = staticmethod(parallel_state.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(parallel_state.get_data_parallel_world_size)
    get_pipeline_model_parallel_rank = staticmethod(parallel_state.get_pipeline_model_parallel_rank)
    get_pipeline_model_parallel_world_size = staticmethod(
        parallel_state.get_pipeline_model_parallel_world_size
    )
