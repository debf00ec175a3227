"""Helpers that make padding invisible to a model run on a padded batch.

A batch holds utterances of different lengths padded at the end of the time axis. Every model
keeps a boolean ``mask`` of valid frames (``True`` = real frame) next to its activations and

* re-zeroes the padded frames before every op that mixes neighbouring frames (convolutions), so a
  frame at the end of an utterance sees zeros beyond it, exactly what it sees at batch size 1
  (where the conv's own zero padding is the neighbour);
* shrinks the mask when a strided op shortens the time axis;
* pools statistics over valid frames only.

Pointwise ops (eval-mode BatchNorm, ReLU, 1x1 convs) need no care: padded frames may hold garbage
until the next re-zeroing because nothing reads them.
"""
from typing import Optional, Tuple

import torch


def lengths_to_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """(B,) lengths -> (B, max_len) bool mask, True on valid frames."""
    steps = torch.arange(max_len, device=lengths.device)
    return steps.unsqueeze(0) < lengths.unsqueeze(1)


def strided_lengths(lengths: torch.Tensor, kernel: int, stride: int, padding: int,
                    dilation: int = 1) -> torch.Tensor:
    """Output length of a conv/pool along time, the same formula torch uses."""
    return (lengths + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _broadcast_mask(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B, T) mask as (B, 1, ..., 1, T) in ``x``'s dtype."""
    return mask.view([mask.shape[0]] + [1] * (x.dim() - 2) + [mask.shape[1]]).to(x.dtype)


def apply_mask(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Zero padded frames. ``x`` has time last; ``mask`` is (B, T)."""
    if mask is None:
        return x
    return x * _broadcast_mask(mask, x)


def apply_mask_(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``apply_mask`` in place, for a tensor nothing else reads. On CPU only the padded tail of each
    row is written (padding is a small part of a length-sorted batch), instead of multiplying the
    whole map by the mask: for CAM++'s 2-D head that was 4% of the model's time."""
    if mask is None:
        return x
    if torch.jit.is_tracing():  # an export (backends.py): no lengths baked in, no in-place op on a view
        return x * _broadcast_mask(mask, x)
    if x.device.type != "cpu":
        return x.mul_(_broadcast_mask(mask, x))
    total = mask.shape[1]
    for row, length in enumerate(mask.sum(dim=1).tolist()):
        if length < total:
            x[row, ..., length:] = 0
    return x


def masked_mean_std(x: torch.Tensor, mask: Optional[torch.Tensor], unbiased: bool = True
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance over the last (time) axis, valid frames only.

    Returns (mean, var); the caller takes the square root its reference takes
    (some add an epsilon first). Matches ``x.mean(-1)`` / ``x.var(-1, unbiased)`` at batch size 1.
    """
    if mask is None:
        return x.mean(dim=-1), x.var(dim=-1, unbiased=unbiased)
    shape = [mask.shape[0]] + [1] * (x.dim() - 2) + [mask.shape[1]]
    m = mask.view(shape).to(x.dtype)
    count = m.sum(dim=-1)
    mean = (x * m).sum(dim=-1) / count
    centred = (x - mean.unsqueeze(-1)) * m
    denom = count - 1 if unbiased else count
    var = (centred * centred).sum(dim=-1) / denom
    return mean, var
