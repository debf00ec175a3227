"""Which GPU a rank uses, and what fp32 and the dtype default mean on it.

Kept apart from the worker so the rules are plain functions, testable with a mocked device count:

* ``choose_gpu``: rank -> visible CUDA device, or one clear error. No rank ends up on another
  rank's GPU unless the user asked for it (a repeated id in ``--gpu``), and no listed GPU is
  silently left idle.
* ``exact_fp32``: cuDNN runs fp32 convolutions in TF32 by default (10-bit mantissa), so "fp32"
  would not be fp32 on Ampere and later; inside this context it is.
* ``cuda_bf16_is_fast``: ``torch.cuda.is_bf16_supported()`` is also true on V100/T4, which emulate
  bf16 (slowly); bf16 runs on tensor cores from compute capability 8.0 (Ampere) on.
"""
import os
from contextlib import contextmanager, nullcontext
from typing import List, Optional, Sequence, Tuple

import torch


def autocast_enabled(device_type: str) -> bool:
    """``torch.is_autocast_enabled`` that answers False for device types autocast does not know."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def autocast_off(device_type: str):
    """A region where autocast is off (a no-op context for device types it does not know, e.g. the
    meta device the tests use to prove the loop never reads device values back)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return nullcontext()


class GpuMappingError(ValueError):
    """A --gpu list (or rank count) that does not fit the GPUs this process sees."""


def bound_per_task(env=os.environ) -> bool:
    """srun without torchrun that bound GPUs to tasks (``--gpus-per-task``, ``--gpu-bind``): each task
    then sees only its own GPU(s), numbered from 0, whatever ids the node has."""
    under_srun = "SLURM_LOCALID" in env and "LOCAL_RANK" not in env
    return under_srun and bool(env.get("CUDA_VISIBLE_DEVICES"))


def choose_gpu(requested: Optional[Sequence[int]], local_rank: int, local_world: int, visible: int,
               per_task: bool = False, visible_names: str = "") -> Tuple[int, Optional[str]]:
    """(CUDA device index for this rank, a note to log or None); GpuMappingError when it cannot work.

    ``requested`` is ``--gpu`` (None: not given), ``visible`` is ``torch.cuda.device_count()``.

    * Not given: local rank k takes visible device k; more ranks on a node than GPUs is an error
      (it would put two ranks on one GPU, which nobody asked for).
    * Given: one id per local rank, ``--gpu ids[LOCAL_RANK]``; a repeated id shares that GPU
      deliberately (``--gpu 0 0``: two ranks on GPU 0). Too few ids for the ranks, or an id this
      process cannot see, is an error; ids beyond the local rank count are left unused with a note.
    * ``per_task`` (srun bound one GPU per task: every task sees its own as device 0): the task uses
      the GPU it was given; a ``--gpu`` list written for the whole node is ignored with a note.
    """
    names = f" (CUDA_VISIBLE_DEVICES={visible_names})" if visible_names else ""
    if visible < 1:
        raise GpuMappingError(f"no CUDA device visible{names}")
    if per_task and visible == 1:
        note = None
        if requested is not None and list(requested) != [0] * len(requested):
            note = (f"this task sees one GPU{names}, bound to it by srun: using it (--gpu "
                    f"{' '.join(map(str, requested))} names the node's GPUs and is not needed here)")
        return 0, note
    if requested is None:
        if local_world > visible:
            raise GpuMappingError(
                f"{local_world} ranks on this node but {visible} GPU(s) visible{names}: start at most {visible} "
                f"rank(s) per node, or share GPUs deliberately with one --gpu id per rank (e.g. --gpu "
                f"{' '.join(str(i % visible) for i in range(local_world))})")
        return local_rank, None
    ids: List[int] = list(requested)
    bad = [i for i in ids if not 0 <= i < visible]
    if bad:
        raise GpuMappingError(f"--gpu {' '.join(map(str, bad))}: only {visible} GPU(s) visible{names} "
                              f"(ids 0-{visible - 1})")
    if len(ids) < local_world:
        raise GpuMappingError(
            f"--gpu lists {len(ids)} id(s) for {local_world} ranks on this node: give one id per local rank "
            f"(repeat an id to share a GPU deliberately, e.g. --gpu {' '.join(str(ids[i % len(ids)]) for i in range(local_world))})")
    note = None
    if local_rank == 0 and len(ids) > local_world:
        note = (f"--gpu {' '.join(map(str, ids[local_world:]))} left unused: {local_world} rank(s) on this node "
                f"take the first {local_world} id(s)")
    return ids[local_rank], note


def cuda_bf16_is_fast(device: torch.device) -> bool:
    """bf16 on tensor cores: compute capability 8.0 (Ampere) and later."""
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8


def _fp32_flags():
    """[(object, attribute, exact value)] for cuDNN convolutions and cuBLAS matmuls in fp32."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    conv = getattr(cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision") and hasattr(matmul, "fp32_precision"):
        # torch >= 2.9: the new switches (reading the legacy ones after setting these is an error)
        return [(conv, "fp32_precision", "ieee"), (matmul, "fp32_precision", "ieee")]
    return [(cudnn, "allow_tf32", False), (matmul, "allow_tf32", False)]


@contextmanager
def exact_fp32(enabled: bool = True):
    """fp32 convolutions and matmuls in full fp32 (no TF32) inside; the previous settings after.

    On CUDA the fbank, the convolution that reads it and the statistics run in fp32 whatever the
    dtype, and ``--dtype fp32`` means all of the model: TF32 would round their inputs to 10 bits.
    bf16/fp16 ops are unaffected. The switches are process-wide, so they are restored on exit (a
    notebook's own training code keeps its settings).
    """
    if not enabled:
        yield
        return
    flags = _fp32_flags()
    saved = [getattr(obj, name) for obj, name, _ in flags]
    try:
        for obj, name, value in flags:
            setattr(obj, name, value)
        yield
    finally:
        for (obj, name, _), value in zip(flags, saved):
            setattr(obj, name, value)
