"""Facts of the process a rank runs in: its rank and world, device, CPU plan, package versions."""
import logging
import os
import platform
from typing import List, Optional

import numpy as np
import torch

from speakerlab.devices import GpuMappingError, bound_per_task, choose_gpu
from speakerlab.extract.options import UsageError

log = logging.getLogger("speakerlab")


def rank_info():
    """(rank, world, local rank, local world) from torchrun's or srun's environment; (0, 1, 0, 1) alone."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", rank))
        local_world = int(env.get("LOCAL_WORLD_SIZE", world))
    elif "SLURM_PROCID" in env and ("SLURM_STEP_NUM_TASKS" in env or "SLURM_NTASKS" in env):  # srun, no torchrun
        rank = int(env["SLURM_PROCID"])
        world = int(env.get("SLURM_STEP_NUM_TASKS") or env["SLURM_NTASKS"])
        local = int(env.get("SLURM_LOCALID", 0))
        local_world = int(env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0] or 1)
    else:
        rank, world, local, local_world = 0, 1, 0, 1
    return rank, world, local, local_world


def group_env() -> bool:
    """Whether the ranks can form a process group (torchrun sets these; under srun, the user may)."""
    return "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ


def job_id() -> Optional[str]:
    """An id every rank of this job computes alike without talking to the others (srun), or None."""
    env = os.environ
    if env.get("SPEAKERLAB_RUN_ID"):
        return env["SPEAKERLAB_RUN_ID"]
    if env.get("SLURM_JOB_ID"):
        step = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID", "-"))
        return f"slurm-{env['SLURM_JOB_ID']}.{step}.{env.get('SLURM_RESTART_COUNT', '0')}"
    return None


def pick_device(use_gpu: bool, gpus: Optional[List[int]], local_rank: int, local_world: int = 1) -> torch.device:
    """This rank's device: the GPU ``devices.choose_gpu`` maps it to (one clear error when the list
    does not fit the GPUs and ranks), or the CPU without --use_gpu or without CUDA."""
    if use_gpu:
        if torch.cuda.is_available():
            try:
                index, note = choose_gpu(gpus, local_rank, local_world, torch.cuda.device_count(),
                                         bound_per_task(), os.environ.get("CUDA_VISIBLE_DEVICES", ""))
            except GpuMappingError as exc:
                raise UsageError(str(exc)) from None
            if note:
                log.info(note)
            torch.cuda.set_device(index)
            return torch.device("cuda", index)
        log.warning("--use_gpu given but CUDA is not available: running on CPU")
    return torch.device("cpu")


def cpu_plan(num_workers: int, local_world: int, device: torch.device, streams: int = -1):
    """Split this rank's share of the cores: (decode workers, model threads per stream, streams).

    GPU: the model is fast and decoding is the bottleneck, so workers get the cores.
    CPU (measured on 2 cores, bench/): the model is the bottleneck and runs fastest as several
    single-threaded streams, one batch each, rather than one batch spread over all cores: CPU
    work per batch is many small ops, and with two or more intra-op threads every op ends in a
    barrier where a thread that the OS has preempted (for a decode worker, or any other process)
    stalls the others -- on a busy 2-core machine that cost the model up to 30x. One stream per
    core (at most 16; beyond that streams get several threads), and one decode worker per 8 cores
    (decoding is ~5% of the model's work on CPU).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = max(1, cores // max(1, local_world))
    if device.type == "cuda":
        if num_workers < 0:
            num_workers = max(1, min(share - 1, 8))
        return num_workers, max(1, min(4, share - num_workers)), 1
    if num_workers < 0:
        num_workers = max(1, min(8, share // 8))
    if streams < 1:
        streams = min(share, 16)
    return num_workers, max(1, share // streams), streams


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    for name in ("soundfile", "soxr"):
        try:
            out[name] = __import__(name).__version__
        except Exception:
            pass
    return out
