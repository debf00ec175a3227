"""CAM++ speaker-embedding network (3D-Speaker's ``CAMPPlus``), written for batched inference.

The module tree reproduces the parameter/buffer names of 3D-Speaker's released checkpoints, so
their state dicts load with ``strict=True``.  The computation follows the published model:

    fbank (B, T, F)
      -> FCM head: 2-D residual convs over (freq, time); strides act on frequency only,
         so the time axis keeps its length T
      -> flatten (channels x reduced freq) into a 1-D feature axis
      -> TDNN, kernel 5, stride 2 (time T -> ceil(T / 2))
      -> 3 densely connected blocks of CAM layers (12 / 24 / 16 layers, dilation 1 / 2 / 2),
         each followed by a 1x1 transition that halves the channels
      -> BN-ReLU, statistics pooling (mean + unbiased std over time)
      -> 1x1 projection + non-affine BN = embedding

Batched inference over padded utterances
---------------------------------------
``forward(x, lengths)`` accepts utterances padded at the end of T.  Padding is made invisible
(see ``speakerlab/models/masking.py``): padded frames are re-zeroed before every op that mixes
frames (time kernels > 1), the mask is shrunk through the stride-2 TDNN, and every time average
(global mean, 100-frame segment means of the CAM layers, statistics pooling) is taken over valid
frames only.  When no padding is present all of this is skipped.

The CAM gate is computed at segment resolution: the context vector (global mean + segment mean)
is constant within a 100-frame segment and the gate MLP is pointwise in time, so we run the MLP
once per segment and broadcast the gate back to frames instead of running it on every frame.
This is the same arithmetic as the reference, just without the redundant work.
"""
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from speakerlab.models.fusion import batch_norm, conv_bn, is_fused
from speakerlab.models.masking import (apply_mask, apply_mask_, lengths_to_mask, masked_mean_std,
                                       strided_lengths)

# Width of the CAM layers' segment pooling (frames after the stride-2 TDNN).
SEGMENT_FRAMES = 100


def _norm_act(config_str: str, channels: int) -> nn.Sequential:
    """Pointwise normalisation/activation stack from a spec like ``'batchnorm-relu'``.

    Submodule names ('batchnorm', 'relu', 'prelu') are the ones in the released checkpoints.
    ``batchnorm_`` is a BatchNorm without affine parameters.
    """
    stack = nn.Sequential()
    for item in config_str.split('-'):
        if item == 'batchnorm':
            stack.add_module('batchnorm', nn.BatchNorm1d(channels))
        elif item == 'batchnorm_':
            stack.add_module('batchnorm', nn.BatchNorm1d(channels, affine=False))
        elif item == 'relu':
            stack.add_module('relu', nn.ReLU(inplace=True))
        elif item == 'prelu':
            stack.add_module('prelu', nn.PReLU(channels))
        else:
            raise ValueError(f'unknown entry {item!r} in config_str {config_str!r}')
    return stack


def _conv_norm_act(conv: nn.Module, stack: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``stack(conv(x))``; through ``conv_bn`` (fusable) when the stack is BN or BN-ReLU."""
    names = [name for name, _ in stack.named_children()]
    if names == ['batchnorm']:
        return conv_bn(conv, stack.batchnorm, x)
    if names == ['batchnorm', 'relu']:
        return conv_bn(conv, stack.batchnorm, x, 'relu')
    return stack(conv(x))


def _is_bn_relu(stack: nn.Sequential) -> bool:
    return [name for name, _ in stack.named_children()] == ['batchnorm', 'relu']


class _Padding(NamedTuple):
    """Where the valid frames are, at the time resolution of the 1-D trunk (after the TDNN)."""
    mask: torch.Tensor         # (B, T) bool, True on valid frames
    frames: torch.Tensor       # (B, 1, 1) float32, number of valid frames
    seg_frames: torch.Tensor   # (B, 1, S) float32, valid frames per segment (min 1)


# --------------------------------------------------------------------------------------------
# FCM head (2-D, time length preserved)
# --------------------------------------------------------------------------------------------

class _ResUnit2d(nn.Module):
    """Basic 3x3 residual unit; ``stride`` subsamples the frequency axis only."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=(stride, 1), padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=(stride, 1), bias=False),
                nn.BatchNorm2d(out_ch))
        else:
            self.shortcut = nn.Sequential()  # identity (empty container, as in the checkpoints)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        x = apply_mask_(x, mask)                       # conv1 looks at neighbouring frames
        h = conv_bn(self.conv1, self.bn1, x, "relu")
        # shortcut is 1x1: pointwise in time
        shortcut = conv_bn(self.shortcut[0], self.shortcut[1], x) if len(self.shortcut) else x
        # relu(bn2(conv2(h)) + shortcut); conv2 also looks at neighbouring frames
        return conv_bn(self.conv2, self.bn2, apply_mask_(h, mask), "relu", residual=shortcut)


class _FreqConvHead(nn.Module):
    """Front-end 2-D conv module ("FCM"). (B, F, T) -> (B, m_channels, F // 8, T)."""

    def __init__(self, feat_dim: int = 80, m_channels: int = 32, units=(2, 2)):
        super().__init__()
        self.conv1 = nn.Conv2d(1, m_channels, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(m_channels)
        self.layer1 = self._stage(m_channels, m_channels, units[0], stride=2)
        self.layer2 = self._stage(m_channels, m_channels, units[1], stride=2)
        self.conv2 = nn.Conv2d(m_channels, m_channels, 3, stride=(2, 1), padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(m_channels)
        self.out_channels = m_channels * (feat_dim // 8)

    @staticmethod
    def _stage(in_ch: int, out_ch: int, n: int, stride: int) -> nn.Sequential:
        # nn.Sequential only as a numbered container ('layer1.0', 'layer1.1', ...).
        units = [_ResUnit2d(in_ch if i == 0 else out_ch, out_ch, stride if i == 0 else 1)
                 for i in range(n)]
        return nn.Sequential(*units)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        return self.body(self.stem(x, mask), mask)

    def stem(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """The conv that reads the fbank itself: (B, F, T) -> (B, m_channels, F, T)."""
        h = apply_mask(x.unsqueeze(1), mask)  # caller's padding values are arbitrary
        return conv_bn(self.conv1, self.bn1, h, "relu")

    def body(self, h: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        for unit in self.layer1:
            h = unit(h, mask)
        for unit in self.layer2:
            h = unit(h, mask)
        return conv_bn(self.conv2, self.bn2, apply_mask_(h, mask), "relu")  # (B, C, F', T)


# --------------------------------------------------------------------------------------------
# 1-D trunk
# --------------------------------------------------------------------------------------------

class _TDNN(nn.Module):
    """Conv1d ('linear') + norm/activation ('nonlinear'), 'same'-style padding."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1,
                 dilation: int = 1, config_str: str = 'batchnorm-relu'):
        super().__init__()
        if kernel % 2 != 1:
            raise ValueError('TDNN kernel must be odd')
        self.kernel, self.stride, self.dilation = kernel, stride, dilation
        self.padding = (kernel - 1) // 2 * dilation
        self.linear = nn.Conv1d(in_ch, out_ch, kernel, stride=stride, padding=self.padding,
                                dilation=dilation, bias=False)
        self.nonlinear = _norm_act(config_str, out_ch)

    def out_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return strided_lengths(lengths, self.kernel, self.stride, self.padding, self.dilation)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        return _conv_norm_act(self.linear, self.nonlinear, apply_mask_(x, mask))


class _ContextGate(nn.Module):
    """CAM: a local dilated conv, gated per channel by an MLP on global + segment context."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, dilation: int, reduction: int = 2):
        super().__init__()
        padding = (kernel - 1) // 2 * dilation
        self.linear_local = nn.Conv1d(in_ch, out_ch, kernel, padding=padding,
                                      dilation=dilation, bias=False)
        self.linear1 = nn.Conv1d(in_ch, in_ch // reduction, 1)
        self.linear2 = nn.Conv1d(in_ch // reduction, out_ch, 1)

    @staticmethod
    def _segment_context(x: torch.Tensor, pad: Optional[_Padding]) -> torch.Tensor:
        """Utterance mean + mean of the 100-frame segment, one column per segment: (B, C, S).

        At batch size 1 the reference uses avg_pool1d(ceil_mode=True): the last, partial
        segment is averaged over the frames it actually has.  With padding we reproduce that by
        summing each segment (padded frames are zero) and dividing by its valid-frame count.
        """
        if x.dim() == 4:
            return _ContextGate._segment_context_time_major(x, pad)
        if pad is None:
            return x.mean(-1, keepdim=True) + F.avg_pool1d(
                x, SEGMENT_FRAMES, SEGMENT_FRAMES, ceil_mode=True)
        if torch.jit.is_tracing():
            return _ContextGate._segment_context_traced(x, pad)
        b, t = x.shape[0], x.shape[-1]
        full = t // SEGMENT_FRAMES  # whole segments, summed through a view (no padded copy of x)
        sums = x[..., :full * SEGMENT_FRAMES].unflatten(-1, (full, SEGMENT_FRAMES)).sum(-1, dtype=torch.float32)
        if t > full * SEGMENT_FRAMES:
            tail = x[..., full * SEGMENT_FRAMES:].sum(-1, keepdim=True, dtype=torch.float32)
            sums = torch.cat([sums, tail], dim=-1)
        lead = [b] + [1] * (x.dim() - 2)
        seg_mean = sums / pad.seg_frames.view(*lead, -1)
        utt_mean = x.sum(-1, keepdim=True, dtype=torch.float32) / pad.frames.view(*lead, 1)
        return (utt_mean + seg_mean).to(x.dtype)

    @staticmethod
    def _segment_context_traced(x: torch.Tensor, pad: _Padding) -> torch.Tensor:
        """The same without Python branches on the length, for a traced export (backends.py) that
        must serve every length: zero-pad time to whole segments, then one reshape and sum."""
        n_seg = pad.seg_frames.shape[-1]
        sums = F.pad(x, (0, n_seg * SEGMENT_FRAMES - x.shape[-1])).unflatten(-1, (n_seg, SEGMENT_FRAMES)).sum(-1)
        return sums / pad.seg_frames + x.sum(-1, keepdim=True) / pad.frames

    @staticmethod
    def _segment_context_time_major(x: torch.Tensor, pad: Optional[_Padding]) -> torch.Tensor:
        """The same for a (B, C, 1, T) map in channels-last memory, i.e. (B, T, C): segment sums
        reduce over rows of contiguous channels, and the utterance sum is the sum of the segment
        sums, so x is read once."""
        b, c, _, t = x.shape
        rows = x.permute(0, 2, 3, 1)  # (B, 1, T, C), a view
        full = t // SEGMENT_FRAMES
        sums = rows[:, :, :full * SEGMENT_FRAMES].unflatten(2, (full, SEGMENT_FRAMES)).sum(3, dtype=torch.float32)
        if t > full * SEGMENT_FRAMES:
            tail = rows[:, :, full * SEGMENT_FRAMES:].sum(2, keepdim=True, dtype=torch.float32)
            sums = torch.cat([sums, tail], dim=2)  # (B, 1, S, C)
        if pad is None:  # avg_pool's ceil_mode: the last segment averages the frames it has
            counts = torch.full((sums.shape[2],), float(SEGMENT_FRAMES), device=x.device)
            counts[-1] = t - (sums.shape[2] - 1) * SEGMENT_FRAMES
            seg_frames, frames = counts.view(1, 1, -1, 1), float(t)
        else:
            seg_frames, frames = pad.seg_frames.view(b, 1, -1, 1), pad.frames.view(b, 1, 1, 1)
        context = sums / seg_frames + sums.sum(2, keepdim=True) / frames
        return context.to(x.dtype).permute(0, 3, 1, 2)  # (B, C, 1, S)

    def forward(self, x: torch.Tensor, pad: Optional[_Padding]) -> torch.Tensor:
        if pad is not None:
            x = apply_mask_(x, pad.mask)  # before the kernel-3 conv and the time averages
        local = conv_bn(self.linear_local, None, x)
        ctx = self._segment_context(x, pad)
        gate = conv_bn(self.linear2, None, conv_bn(self.linear1, None, ctx, 'relu'), 'sigmoid')  # (B, out, [1,] S)
        if torch.jit.is_tracing():  # an export: one gather serves every length
            segment = torch.arange(local.shape[-1], device=local.device) // SEGMENT_FRAMES
            return local * gate.index_select(-1, segment)
        if gate.shape[-1] > 1:  # one gate per segment -> one per frame
            if local.dim() == 4:  # expand in local's channels-last order, so the product streams
                gate = gate.permute(0, 2, 3, 1).unsqueeze(3).expand(-1, -1, -1, SEGMENT_FRAMES, -1)
                gate = gate.flatten(2, 3)[:, :, :local.shape[-1]].permute(0, 3, 1, 2)
            else:
                gate = gate.unsqueeze(-1).expand(*gate.shape, SEGMENT_FRAMES).flatten(-2)[..., :local.shape[-1]]
        return local.mul_(gate)  # local is this layer's own fresh output


class _DenseUnit(nn.Module):
    """Bottleneck (norm-act, 1x1 conv, norm-act) followed by a CAM layer. Emits growth channels."""

    def __init__(self, in_ch: int, growth: int, bottleneck: int, kernel: int, dilation: int,
                 config_str: str):
        super().__init__()
        self.nonlinear1 = _norm_act(config_str, in_ch)
        self.linear1 = nn.Conv1d(in_ch, bottleneck, 1, bias=False)
        self.nonlinear2 = _norm_act(config_str, bottleneck)
        self.cam_layer = _ContextGate(bottleneck, growth, kernel, dilation)

    def forward(self, x: torch.Tensor, pad: Optional[_Padding]) -> torch.Tensor:
        if _is_bn_relu(self.nonlinear1):  # also on (B, C, 1, T) maps (see _Trunk.runs_2d)
            h = F.relu(batch_norm(self.nonlinear1.batchnorm, x), inplace=True)
        else:
            h = self.nonlinear1(x)
        return self.cam_layer(_conv_norm_act(self.linear1, self.nonlinear2, h), pad)


class _DenseStack(nn.Module):
    """Densely connected CAM units ('tdnnd1' ... 'tdnndN'): each sees all earlier outputs."""

    def __init__(self, n_units: int, in_ch: int, growth: int, bottleneck: int, kernel: int,
                 dilation: int, config_str: str):
        super().__init__()
        for i in range(n_units):
            self.add_module(f'tdnnd{i + 1}', _DenseUnit(in_ch + i * growth, growth, bottleneck,
                                                         kernel, dilation, config_str))

    def forward(self, x: torch.Tensor, pad: Optional[_Padding]) -> torch.Tensor:
        for unit in self.children():
            x = torch.cat([x, unit(x, pad)], dim=1)
        return x


class _Transition(nn.Module):
    """norm-act then 1x1 conv (pointwise: no masking needed)."""

    def __init__(self, in_ch: int, out_ch: int, config_str: str):
        super().__init__()
        self.nonlinear = _norm_act(config_str, in_ch)
        self.linear = nn.Conv1d(in_ch, out_ch, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _is_bn_relu(self.nonlinear):  # also on (B, C, 1, T) maps
            return conv_bn(self.linear, None, F.relu(batch_norm(self.nonlinear.batchnorm, x), inplace=True))
        return conv_bn(self.linear, None, self.nonlinear(x))


class _Projection(nn.Module):
    """Pooled statistics (B, C) -> embedding (B, E): 1x1 conv then non-affine BN."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.linear = nn.Conv1d(in_ch, out_ch, 1, bias=False)
        self.nonlinear = _norm_act('batchnorm_', out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _conv_norm_act(self.linear, self.nonlinear, x.unsqueeze(-1)).squeeze(-1)


class _Trunk(nn.Module):
    """The 1-D part ('xvector' in the checkpoints): TDNN, dense CAM blocks, pooling, projection."""

    def __init__(self, in_ch: int, embedding_size: int, growth_rate: int, bn_size: int,
                 init_channels: int, config_str: str):
        super().__init__()
        self.config_str = config_str
        self.tdnn = _TDNN(in_ch, init_channels, 5, stride=2, config_str=config_str)
        ch = init_channels
        for i, (n_units, dilation) in enumerate(zip((12, 24, 16), (1, 2, 2)), start=1):
            self.add_module(f'block{i}', _DenseStack(n_units, ch, growth_rate,
                                                     bn_size * growth_rate, 3, dilation,
                                                     config_str))
            ch += n_units * growth_rate
            self.add_module(f'transit{i}', _Transition(ch, ch // 2, config_str))
            ch //= 2
        self.out_nonlinear = _norm_act(config_str, ch)
        self.dense = _Projection(ch * 2, embedding_size)

    def runs_2d(self) -> bool:
        """Fused inference runs the 1-D trunk on (B, C, 1, T) maps in channels-last memory, i.e.
        time-major (B, T, C): oneDNN's preferred layout, where its 1x1 and dilated convs ran 2.5-3.5x
        faster than on (B, C, T), which it converts to and from at every conv."""
        return is_fused(self.tdnn.linear) and self.config_str == 'batchnorm-relu'

    def forward(self, x: torch.Tensor, lengths: Optional[torch.Tensor]) -> torch.Tensor:
        # ``x``: the head's (B, C, F', T) map. ``lengths`` is None on the fast path, else valid
        # frames at the head's resolution (= T).
        b, c, f, t = x.shape
        if self.runs_2d():  # (B, C*F', 1, T), channels-last: one copy, as the reshape below
            x = x.permute(0, 3, 1, 2).reshape(b, t, c * f).transpose(1, 2).unsqueeze(2)
        else:
            x = x.reshape(b, c * f, t)
        mask = None if lengths is None else lengths_to_mask(lengths, x.shape[-1])
        x = self.tdnn(x, mask)
        pad = None
        if lengths is not None:
            pad = self._padding(self.tdnn.out_lengths(lengths), x.shape[-1])
        for i in (1, 2, 3):
            x = getattr(self, f'block{i}')(x, pad)
            x = getattr(self, f'transit{i}')(x)
        if x.dim() == 4:
            x = x.squeeze(2)
        x = self.out_nonlinear(x)
        # Statistics in fp32 (long utterances under bf16/fp16 autocast), then back.
        mean, var = masked_mean_std(x.float(), None if pad is None else pad.mask, unbiased=True)
        stats = torch.cat([mean, var.sqrt()], dim=-1).to(x.dtype)
        return self.dense(stats)

    @staticmethod
    def _padding(lengths: torch.Tensor, t: int) -> _Padding:
        n_seg = (t + SEGMENT_FRAMES - 1) // SEGMENT_FRAMES  # no floor division of negatives: exporters truncate
        starts = torch.arange(n_seg, device=lengths.device) * SEGMENT_FRAMES
        per_seg = (lengths.unsqueeze(1) - starts).clamp(0, SEGMENT_FRAMES)
        # Segments entirely in the padding hold only zeros: divide by 1 rather than 0.
        per_seg = per_seg.clamp_min(1).to(torch.float32).unsqueeze(1)
        frames = lengths.to(torch.float32).view(-1, 1, 1)
        return _Padding(lengths_to_mask(lengths, t), frames, per_seg)


class CAMPPlus(nn.Module):
    """CAM++ speaker embedding extractor (state-dict compatible with 3D-Speaker's CAMPPlus).

    forward(x, lengths=None): ``x`` is mean-normalised fbank (B, T, feat_dim); ``lengths`` is
    None (every frame valid) or a (B,) integer tensor of valid frames, padding at the end of T.
    Returns (B, embedding_size).  Each row equals what the utterance gives alone.
    """

    def __init__(self, feat_dim: int = 80, embedding_size: int = 512, growth_rate: int = 32,
                 bn_size: int = 4, init_channels: int = 128, config_str: str = 'batchnorm-relu',
                 memory_efficient: bool = True):
        super().__init__()
        self.feat_dim = feat_dim
        self.embedding_size = embedding_size
        # Accepted for signature compatibility; the reference uses it only to enable gradient
        # checkpointing during training, which has no effect on results.
        self.memory_efficient = memory_efficient
        # The head keeps T; the stride-2 TDNN yields ceil(T / 2) frames; statistics pooling takes
        # the unbiased std, which needs at least 2 frames there, i.e. T >= 3.  T = 1 or 2 leaves
        # one frame and the std (hence the embedding) is NaN, exactly as in the reference.
        self.min_frames = 3

        self.head = _FreqConvHead(feat_dim=feat_dim)
        self.xvector = _Trunk(self.head.out_channels, embedding_size, growth_rate, bn_size,
                              init_channels, config_str)

        # Same initialisation as the reference (matters only when training from scratch).
        for m in self.modules():
            if isinstance(m, (nn.Conv1d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.forward_body(self.forward_stem(x, lengths), lengths)

    @staticmethod
    def _padded(lengths: Optional[torch.Tensor], t: int, device) -> Optional[torch.Tensor]:
        """``lengths`` as long on ``device``, or None when nothing is padded (skips all mask work)."""
        if lengths is None:
            return None
        # Checked where the lengths are (the host, from the pipeline), before they move: on a
        # GPU, reading a device tensor back would stall the queue of work at every batch.
        if not torch.jit.is_tracing() and bool((lengths == t).all()):
            return None
        return lengths.to(device=device, dtype=torch.long, non_blocking=True)

    def forward_stem(self, x: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, T, F) fbank -> the first conv's map (B, C, F, T): the stem, where bf16 costs the most
        accuracy, so it stays fp32 on every engine (the OpenVINO export marks it precise,
        speakerlab/backends.py)."""
        lengths = self._padded(lengths, x.shape[1], x.device)
        mask = None if lengths is None else lengths_to_mask(lengths, x.shape[1])
        return self.head.stem(x.transpose(1, 2), mask)  # (B, T, F) -> (B, F, T) -> (B, C, F, T)

    def forward_body(self, h: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The rest of the network, on ``forward_stem``'s map."""
        t = h.shape[-1]
        lengths = self._padded(lengths, t, h.device)
        mask = None if lengths is None else lengths_to_mask(lengths, t)
        return self.xvector(self.head.body(h, mask), lengths)
