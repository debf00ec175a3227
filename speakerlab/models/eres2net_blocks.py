"""Building blocks shared by our ERes2Net and ERes2NetV2 (3D-Speaker compatible state_dicts).

Layout of every activation in these models: (B, C, F, T) -- a 2-D "image" with frequency as height
and time as width. Convolutions are 2-D, so a 3x3 kernel mixes 3 neighbouring frames; the frequency
axis is never padded, only time is.

Padding invisibility (see ``speakerlab.models.masking``): each module that reads neighbouring frames
takes the valid-frame mask of its own time resolution and re-zeroes padded frames right before the
frame-mixing conv. In these networks the frame-mixing ops are

* the stem 3x3 conv,
* the 3x3 convs inside each Res2Net block (the per-split ``convs``),
* the 3x3 stride-2 downsampling convs feeding the bottom-up fusions.

Everything else is pointwise in time: eval BatchNorm, the (clipped) ReLUs, 1x1 convs (``conv1``,
``conv3``, ``shortcut``) and the AFF fusion, whose attention is a stack of 1x1 convs + BN + SiLU with
no global pooling. A 1x1 conv with stride 2 just picks every other frame, so its output frame ``i``
is valid iff ``2i < length``, i.e. ``i < (length - 1) // 2 + 1`` -- the same length formula as the
3x3 / stride 2 / padding 1 downsampling conv, which keeps all branches of a stage aligned.
The only reduction over time is the statistics pooling, which is masked.
"""
import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from speakerlab.models.fusion import conv_bn
from speakerlab.models.masking import apply_mask, lengths_to_mask, masked_mean_std, strided_lengths

# Time strides of the four residual stages (the first block of a stage carries the stride).
STAGE_STRIDES = (1, 2, 2, 2)


class ClippedReLU(nn.Hardtanh):
    """ReLU capped at 20 (3D-Speaker calls this ``ReLU``; it is hardtanh(0, 20)). No parameters."""

    def __init__(self, inplace: bool = False):
        super().__init__(min_val=0.0, max_val=20.0, inplace=inplace)


class AttentionalFeatureFusion(nn.Module):
    """AFF: gate two same-shaped feature maps with a learned per-position weight.

    ``g = tanh(att([x; y]))`` in (-1, 1); the output is ``(1 + g) * x + (1 - g) * y``. ``att`` is
    1x1 conv -> BN -> SiLU -> 1x1 conv -> BN, i.e. pointwise in time and frequency, so padded frames
    never leak into valid ones here. Submodule name ``local_att`` and its indices (0, 1, 3, 4) match
    3D-Speaker's checkpoints.
    """

    def __init__(self, channels: int = 64, r: int = 4):
        super().__init__()
        hidden = int(channels // r)
        self.local_att = nn.Sequential(
            nn.Conv2d(2 * channels, hidden, kernel_size=1),
            nn.BatchNorm2d(hidden),
            nn.SiLU(inplace=True),
            nn.Conv2d(hidden, channels, kernel_size=1),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        att = self.local_att
        hidden = conv_bn(att[0], att[1], torch.cat((x, y), dim=1), "silu")
        gate = conv_bn(att[3], att[4], hidden, "tanh")
        # (1 + g) x + (1 - g) y, written to need one product on the large tensors.
        return torch.addcmul(x + y, gate, x - y)


class Res2NetBlock(nn.Module):
    """Bottleneck-free Res2Net block of ERes2Net(V2).

    1x1 conv (carries the stage stride) splits into ``scale`` groups of ``width`` channels; group i
    goes through its own 3x3 conv after being combined with the previous group's output (plain sum
    here, AFF in :class:`Res2NetAFFBlock`), then a 1x1 conv back to ``planes * expansion`` channels
    plus the (projected) shortcut.

    ``forward(x, mask)``: ``mask`` is the valid-frame mask at this block's OUTPUT time resolution
    (after its stride), or None when nothing is padded.
    """

    uses_fusion = False

    def __init__(self, in_planes: int, planes: int, stride: int = 1, baseWidth: int = 26,
                 scale: int = 2, expansion: int = 2):
        super().__init__()
        width = int(math.floor(planes * (baseWidth / 64.0)))
        out_planes = planes * expansion
        self.width = width
        self.scale = scale
        self.stride = stride
        self.expansion = expansion

        self.conv1 = nn.Conv2d(in_planes, width * scale, kernel_size=1, stride=stride, bias=False)
        self.bn1 = nn.BatchNorm2d(width * scale)
        self.convs = nn.ModuleList(
            nn.Conv2d(width, width, kernel_size=3, padding=1, bias=False) for _ in range(scale))
        self.bns = nn.ModuleList(nn.BatchNorm2d(width) for _ in range(scale))
        if self.uses_fusion:
            self.fuse_models = nn.ModuleList(
                AttentionalFeatureFusion(width, r=4) for _ in range(scale - 1))
        self.relu = ClippedReLU(inplace=True)
        self.conv3 = nn.Conv2d(width * scale, out_planes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_planes))
        else:
            self.shortcut = nn.Identity()

    def _combine(self, i: int, prev: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
        return prev + group

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        # self.relu is hardtanh(0, 20): ``conv_bn``'s "hardtanh20" (see models/fusion.py).
        hidden = conv_bn(self.conv1, self.bn1, x, "hardtanh20")
        branch_outputs = []
        carry = None
        for i, group in enumerate(torch.split(hidden, self.width, dim=1)):
            carry = group if i == 0 else self._combine(i, carry, group)
            carry = apply_mask(carry, mask)  # the 3x3 conv below mixes neighbouring frames
            carry = conv_bn(self.convs[i], self.bns[i], carry, "hardtanh20")
            branch_outputs.append(carry)
        if isinstance(self.shortcut, nn.Identity):
            shortcut = x
        else:
            shortcut = conv_bn(self.shortcut[0], self.shortcut[1], x)
        return conv_bn(self.conv3, self.bn3, torch.cat(branch_outputs, dim=1), "hardtanh20",
                       residual=shortcut)


class Res2NetAFFBlock(Res2NetBlock):
    """Res2Net block whose groups are merged by AFF instead of a sum (ERes2Net's local fusion)."""

    uses_fusion = True

    def _combine(self, i: int, prev: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
        return self.fuse_models[i - 1](prev, group)


# ----------------------------------------------------------------------------------- pooling
# Pooling modules take (B, C, F, T) or (B, D, T) plus an optional (B, T) mask and return (B, n * D').
# Statistics are computed in fp32 (bf16/fp16 sums over hundreds of frames lose digits) and handed
# back in the input dtype so a half-precision model's Linear still matches.


class StatsPool(nn.Module):
    """TSTP: mean and sqrt(unbiased var + 1e-8) over valid frames. Needs >= 2 pooled frames."""

    n_stats = 2
    min_time = 2  # unbiased variance of a single frame divides by zero

    def __init__(self, **kwargs):
        super().__init__()

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        mean, var = masked_mean_std(x.float(), mask, unbiased=True)
        std = torch.sqrt(var + 1e-8)
        return torch.cat((mean.flatten(1), std.flatten(1)), dim=1).to(x.dtype)


class MeanPool(nn.Module):
    """TAP: mean over valid frames."""

    n_stats = 1
    min_time = 1

    def __init__(self, **kwargs):
        super().__init__()

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if mask is None:
            return x.float().mean(dim=-1).flatten(1).to(x.dtype)
        mean, _ = masked_mean_std(x.float(), mask, unbiased=False)
        return mean.flatten(1).to(x.dtype)


class StdPool(nn.Module):
    """TSDP: sqrt(unbiased var + 1e-8) over valid frames."""

    n_stats = 1
    min_time = 2

    def __init__(self, **kwargs):
        super().__init__()

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        _, var = masked_mean_std(x.float(), mask, unbiased=True)
        return torch.sqrt(var + 1e-8).flatten(1).to(x.dtype)


class AttentiveStatsPool(nn.Module):
    """ASTP: attention-weighted mean and std; padded frames get zero attention weight.

    Parameter names (``linear1``, ``linear2``: kernel-1 Conv1d) follow 3D-Speaker's pooling_layers.
    """

    n_stats = 2
    min_time = 1

    def __init__(self, in_dim: int, bottleneck_dim: int = 128, global_context_att: bool = False):
        super().__init__()
        self.global_context_att = global_context_att
        self.linear1 = nn.Conv1d(in_dim * (3 if global_context_att else 1), bottleneck_dim,
                                 kernel_size=1)
        self.linear2 = nn.Conv1d(bottleneck_dim, in_dim, kernel_size=1)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.dim() == 4:
            x = x.reshape(x.shape[0], x.shape[1] * x.shape[2], x.shape[3])
        x = apply_mask(x, mask)
        inputs = x
        if self.global_context_att:
            mean, var = masked_mean_std(x.float(), mask, unbiased=True)
            std = torch.sqrt(var + 1e-10)
            context = [t.to(x.dtype).unsqueeze(-1).expand_as(x) for t in (mean, std)]
            inputs = torch.cat([x] + context, dim=1)
        logits = self.linear2(torch.tanh(self.linear1(inputs))).float()
        if mask is not None:
            logits = logits.masked_fill(~mask.unsqueeze(1), float("-inf"))
        alpha = torch.softmax(logits, dim=2)
        xf = x.float()
        mean = torch.sum(alpha * xf, dim=2)
        var = torch.sum(alpha * xf * xf, dim=2) - mean * mean
        std = torch.sqrt(var.clamp(min=1e-10))
        return torch.cat([mean, std], dim=1).to(x.dtype)


POOLING_LAYERS = {"TSTP": StatsPool, "TAP": MeanPool, "TSDP": StdPool, "ASTP": AttentiveStatsPool}


# ------------------------------------------------------------------------------------- trunk


def pooled_length(num_frames: int, strides: Sequence[int] = STAGE_STRIDES) -> int:
    """Time length reaching the pooling layer for an input of ``num_frames`` frames."""
    length = num_frames
    for stride in strides:
        length = (length - 1) // stride + 1  # 1x1/stride s/pad 0 and 3x3/stride 2/pad 1 agree
    return length


def smallest_input(min_pooled: int, strides: Sequence[int] = STAGE_STRIDES) -> int:
    """Smallest input length whose pooled length is >= ``min_pooled``."""
    frames = 1
    while pooled_length(frames, strides) < min_pooled:
        frames += 1
    return frames


class ERes2NetTrunk(nn.Module):
    """What ERes2Net and ERes2NetV2 share: stem, four Res2Net stages, pooling, embedding head.

    Subclasses add their bottom-up fusion path and implement ``forward`` with the helpers below.
    Attribute and submodule names follow 3D-Speaker so that state_dict keys are identical.
    """

    def __init__(self, block, block_fuse, num_blocks, m_channels, feat_dim, embedding_size,
                 baseWidth, scale, expansion, pooling_func, two_emb_layer):
        super().__init__()
        if pooling_func not in POOLING_LAYERS:
            raise ValueError(f"unknown pooling_func {pooling_func!r}; "
                             f"expected one of {sorted(POOLING_LAYERS)}")
        self.feat_dim = feat_dim
        self.embedding_size = embedding_size
        self.m_channels = m_channels
        self.baseWidth = baseWidth
        self.scale = scale
        self.expansion = expansion
        self.two_emb_layer = two_emb_layer
        # Frequency is halved by the three strided stages (80 -> 10); channels end at 8*m*expansion.
        self.stats_dim = int(feat_dim / 8) * m_channels * 8

        self.conv1 = nn.Conv2d(1, m_channels, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(m_channels)
        in_planes = m_channels
        stage_kinds = (block, block, block_fuse, block_fuse)
        for index, (kind, count, stride) in enumerate(zip(stage_kinds, num_blocks, STAGE_STRIDES)):
            planes = m_channels * (2 ** index)
            blocks = []
            for j in range(count):
                blocks.append(kind(in_planes, planes, stride if j == 0 else 1,
                                   baseWidth=baseWidth, scale=scale, expansion=expansion))
                in_planes = planes * expansion
            # ModuleList (not Sequential) so the mask can be passed; keys are layerN.<i>.* either way.
            setattr(self, f"layer{index + 1}", nn.ModuleList(blocks))

        # Registered before the head only so state_dict() lists keys in 3D-Speaker's order.
        self.build_fusion_path()

        pool_cls = POOLING_LAYERS[pooling_func]
        self.n_stats = pool_cls.n_stats
        self.pool = pool_cls(in_dim=self.stats_dim * expansion)
        self.seg_1 = nn.Linear(self.stats_dim * expansion * self.n_stats, embedding_size)
        if two_emb_layer:
            self.seg_bn_1 = nn.BatchNorm1d(embedding_size, affine=False)
            self.seg_2 = nn.Linear(embedding_size, embedding_size)
        else:
            self.seg_bn_1 = nn.Identity()
            self.seg_2 = nn.Identity()

        # Smallest input T with a finite embedding: time is downsampled 3x by stride 2
        # (T -> (T-1)//2+1 per stage) and TSTP's unbiased variance needs >= 2 pooled frames, so
        # T=9 -> 5 -> 3 -> 2 works while T=8 -> 4 -> 2 -> 1 gives NaN. TAP/ASTP would accept 1.
        self.min_frames = smallest_input(pool_cls.min_time)

    def build_fusion_path(self) -> None:
        """Create the model-specific bottom-up fusion modules (uses self.m_channels/expansion)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, T, F) fbank; lengths: (B,) valid frame counts or None. Returns (B, embedding)."""
        return self.forward_body(self.forward_stem(x, lengths), lengths)

    def forward_stem(self, x: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, T, F) fbank -> the stem conv's map (B, m, F, T): the stem, where bf16 costs the most
        accuracy, so it stays fp32 on every engine (the OpenVINO export marks it precise,
        speakerlab/backends.py)."""
        return self.stem(x, self.stage_masks(lengths, x.shape[1], x.device)[0])

    def forward_body(self, h: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The rest of the network on ``forward_stem``'s map (the stem keeps the time length)."""
        raise NotImplementedError

    # -- helpers for forward -----------------------------------------------------------------

    @staticmethod
    def stage_masks(lengths: Optional[torch.Tensor], num_frames: int, device: torch.device):
        """Valid-frame masks at the resolution of each of the four stages (all None = fast path)."""
        if lengths is None:
            return [None] * len(STAGE_STRIDES)
        # Check on the lengths' own device (usually CPU: no GPU sync) before moving them.
        if not torch.jit.is_tracing() and bool((lengths >= num_frames).all()):
            return [None] * len(STAGE_STRIDES)
        lengths = lengths.to(device=device, dtype=torch.long, non_blocking=True).clamp(max=num_frames)
        masks = []
        total = num_frames
        for stride in STAGE_STRIDES:
            if stride != 1:
                lengths = strided_lengths(lengths, kernel=1, stride=stride, padding=0)
                total = (total - 1) // stride + 1
            masks.append(lengths_to_mask(lengths, total))
        return masks

    def stem(self, feats: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """(B, T, F) fbank -> (B, m, F, T) feature map."""
        x = feats.transpose(1, 2).unsqueeze(1)
        x = apply_mask(x, mask)  # whatever the caller padded with, the 3x3 conv must see zeros
        return conv_bn(self.conv1, self.bn1, x, "relu")

    @staticmethod
    def run_stage(stage: nn.ModuleList, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        for blk in stage:
            x = blk(x, mask)
        return x

    def embed(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Pool the last feature map over valid frames and project to the embedding."""
        emb = self.seg_1(self.pool(x, mask))
        if self.two_emb_layer:
            emb = self.seg_2(self.seg_bn_1(F.relu(emb)))
        return emb
