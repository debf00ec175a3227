"""Grouping utterances into batches whose padded size is bounded by a frame budget."""
from typing import List, Optional, Sequence

import numpy as np
import torch


# Padded lengths are rounded up to one of 16 steps per octave (at most 6.25% more frames): the
# batch shapes then repeat, and oneDNN (CPU) reuses the kernels it built for a shape instead of
# building new ones for every batch -- measured on CAM++ (bench corpus, one stream): 13% faster
# with every shape seen before; speakerlab/__init__.py raises the kernel cache this needs.
GRID_STEPS_PER_OCTAVE = 16


def grid_frames(frames: int, steps: int = GRID_STEPS_PER_OCTAVE) -> int:
    """Smallest length >= ``frames`` of the form m * 2^k with steps <= m < 2 * steps (exact below)."""
    if frames <= steps:
        return max(1, frames)
    shift = frames.bit_length() - steps.bit_length()
    mantissa = -(-frames // (1 << shift))  # ceil
    return mantissa << shift


def plan_batches(num_samples: Sequence[int], frames_per_batch: int, max_batch_size: Optional[int],
                 frame_shift: int = 160, grid: bool = False,
                 grid_steps: int = GRID_STEPS_PER_OCTAVE) -> List[List[int]]:
    """Sort by length and cut into batches with (count x longest frames) <= frames_per_batch.

    Similar lengths share a batch, so padding stays small; an utterance longer than the budget
    gets a batch of its own. With ``grid``, lengths count as their ``grid_frames(.., grid_steps)``
    (what the batch is padded to: ``Embedder.grid_steps``). ``max_batch_size`` None: no count cap.
    Returns index lists, shortest batches first.
    """
    lengths = np.asarray(num_samples, dtype=np.int64).reshape(-1)
    # by length, then index (a stable sort): an index array, not a list of (length, index) tuples,
    # since a rank plans its whole shard at once (millions of files)
    order = np.argsort(lengths, kind="stable")
    frames = np.maximum(1, lengths[order] // frame_shift)
    if grid:
        frames = np.array([grid_frames(int(f), grid_steps) for f in frames], dtype=np.int64)
    cuts: List[int] = []
    start = 0
    for position, length in enumerate(frames.tolist()):
        count = position - start
        full = max_batch_size is not None and count >= max_batch_size
        if count and ((count + 1) * length > frames_per_batch or full):
            cuts.append(position)
            start = position
    bounds = [0] + cuts + [len(order)] if len(order) else []
    return [order[a:b].tolist() for a, b in zip(bounds, bounds[1:])]


def split_tail(batches: List[List[int]], count: int) -> List[List[int]]:
    """The last ``count`` batches cut in two (by rows; a batch of one stays whole): concurrent model
    streams then end on half-size batches, and the one that finishes first idles for half as long
    while the other runs its last batch."""
    if count <= 0:
        return list(batches)
    head, tail = list(batches[:-count]), batches[-count:]
    for batch in tail:
        half = (len(batch) + 1) // 2
        head.extend([batch[:half], batch[half:]] if len(batch) > 1 else [batch])
    return head


def pad_waves(waves: Sequence[np.ndarray]):
    """Right-pad 1-D float32 arrays into a (B, N) tensor plus their lengths."""
    lengths = torch.tensor([len(w) for w in waves], dtype=torch.long)
    batch = torch.zeros(len(waves), int(lengths.max()) if len(waves) else 0, dtype=torch.float32)
    for row, wave in enumerate(waves):
        batch[row, :len(wave)] = torch.from_numpy(wave)
    return batch, lengths
