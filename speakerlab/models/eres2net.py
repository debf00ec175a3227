"""ERes2Net speaker-embedding model, state_dict-compatible with 3D-Speaker's checkpoints.

ERes2Net = Res2Net trunk (stages 3 and 4 merge their Res2Net groups with AFF: "local feature
fusion") plus a bottom-up "global feature fusion" path: the output of stage k is downsampled in time
and frequency by a 3x3 stride-2 conv and AFF-fused into the output of stage k+1, cumulatively, so the
pooled map carries information from all four stages.

Released variants (3D-Speaker ``infer_sv.py``):
  * base/VoxCeleb: ERes2Net(feat_dim=80, embedding_size=192 or 512, m_channels=32)
  * large:         ERes2Net(feat_dim=80, embedding_size=512, m_channels=64)
  * "huge" (3D-Speaker's ``ERes2Net_huge.ERes2Net``, used by speech_eres2net_sv_zh-cn_16k-common):
    same graph with baseWidth=24, scale=3, expansion=4, m_channels=64 -> :class:`ERes2NetHuge`.

Batched inference: ``forward(x, lengths)`` with padded frames at the end gives, per row, the same
embedding as running that utterance alone (see ``eres2net_blocks`` for where masking happens).
"""
from typing import Optional, Sequence

import torch
import torch.nn as nn

from speakerlab.models.eres2net_blocks import (AttentionalFeatureFusion, ERes2NetTrunk,
                                              Res2NetAFFBlock, Res2NetBlock)
from speakerlab.models.fusion import conv_bn
from speakerlab.models.masking import apply_mask


class ERes2Net(ERes2NetTrunk):
    """ERes2Net with 3D-Speaker's constructor arguments and defaults.

    ``baseWidth``, ``scale`` and ``expansion`` are extra (3D-Speaker hard-codes 32 / 2 / 2 in its
    block classes for this model); their defaults reproduce the reference exactly. ``block`` and
    ``block_fuse`` must follow our block interface ``(in_planes, planes, stride, baseWidth=, scale=,
    expansion=)`` with ``forward(x, mask)``.
    """

    def __init__(self,
                 block=Res2NetBlock,
                 block_fuse=Res2NetAFFBlock,
                 num_blocks: Sequence[int] = (3, 4, 6, 3),
                 m_channels: int = 32,
                 feat_dim: int = 80,
                 embedding_size: int = 192,
                 pooling_func: str = 'TSTP',
                 two_emb_layer: bool = False,
                 baseWidth: int = 32,
                 scale: int = 2,
                 expansion: int = 2):
        super().__init__(block, block_fuse, num_blocks, m_channels, feat_dim, embedding_size,
                         baseWidth, scale, expansion, pooling_func, two_emb_layer)

    def build_fusion_path(self) -> None:
        # Stage k output has m * 2^(k-1) * expansion channels; the running fusion is moved one stage
        # down (x2 channels, /2 time and frequency) before being merged with the next stage output.
        widths = [self.m_channels * (2 ** k) * self.expansion for k in range(4)]
        for k in range(3):
            setattr(self, f"layer{k + 1}_downsample",
                    nn.Conv2d(widths[k], widths[k + 1], kernel_size=3, stride=2, padding=1,
                              bias=False))
        self.fuse_mode12 = AttentionalFeatureFusion(widths[1])
        self.fuse_mode123 = AttentionalFeatureFusion(widths[2])
        self.fuse_mode1234 = AttentionalFeatureFusion(widths[3])

    def forward_body(self, h: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """h: the stem's (B, m, F, T) map; lengths: (B,) valid frame counts or None."""
        m1, m2, m3, m4 = self.stage_masks(lengths, h.shape[-1], h.device)
        out1 = self.run_stage(self.layer1, h, m1)
        out2 = self.run_stage(self.layer2, out1, m2)
        # The downsampling convs are 3x3 in time: zero the padding of their input first.
        fused = self.fuse_mode12(out2, conv_bn(self.layer1_downsample, None, apply_mask(out1, m1)))
        del out1
        out3 = self.run_stage(self.layer3, out2, m3)
        del out2
        fused = self.fuse_mode123(out3, conv_bn(self.layer2_downsample, None, apply_mask(fused, m2)))
        out4 = self.run_stage(self.layer4, out3, m4)
        del out3
        fused = self.fuse_mode1234(out4, conv_bn(self.layer3_downsample, None, apply_mask(fused, m3)))
        return self.embed(fused, m4)


class ERes2NetHuge(ERes2Net):
    """3D-Speaker's ``ERes2Net_huge.ERes2Net``: same graph, bigger blocks, m_channels 64 default."""

    def __init__(self,
                 block=Res2NetBlock,
                 block_fuse=Res2NetAFFBlock,
                 num_blocks: Sequence[int] = (3, 4, 6, 3),
                 m_channels: int = 64,
                 feat_dim: int = 80,
                 embedding_size: int = 192,
                 pooling_func: str = 'TSTP',
                 two_emb_layer: bool = False,
                 baseWidth: int = 24,
                 scale: int = 3,
                 expansion: int = 4):
        super().__init__(block, block_fuse, num_blocks, m_channels, feat_dim, embedding_size,
                         pooling_func, two_emb_layer, baseWidth, scale, expansion)
