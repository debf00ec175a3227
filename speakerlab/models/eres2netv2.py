"""ERes2NetV2 speaker-embedding model, state_dict-compatible with 3D-Speaker's checkpoints.

V2 widens the Res2Net blocks (``baseWidth``/``scale``/``expansion`` are constructor arguments) and
prunes ERes2Net's global fusion to a single step: stage 3's output is downsampled by a 3x3 stride-2
conv and AFF-fused into stage 4's output before pooling.

Released variants (3D-Speaker ``infer_sv.py``): ERes2NetV2(feat_dim=80, embedding_size=192,
baseWidth=26, scale=2, expansion=2) and the w24s4ep4 one (baseWidth=24, scale=4, expansion=4),
both with the default m_channels=64.
"""
from typing import Optional, Sequence

import torch
import torch.nn as nn

from speakerlab.models.eres2net_blocks import (AttentionalFeatureFusion, ERes2NetTrunk,
                                              Res2NetAFFBlock, Res2NetBlock)
from speakerlab.models.fusion import conv_bn
from speakerlab.models.masking import apply_mask


class ERes2NetV2(ERes2NetTrunk):
    """ERes2NetV2 with 3D-Speaker's constructor arguments and defaults.

    ``block`` / ``block_fuse`` must follow our block interface (see ``eres2net_blocks``).
    """

    def __init__(self,
                 block=Res2NetBlock,
                 block_fuse=Res2NetAFFBlock,
                 num_blocks: Sequence[int] = (3, 4, 6, 3),
                 m_channels: int = 64,
                 feat_dim: int = 80,
                 embedding_size: int = 192,
                 baseWidth: int = 26,
                 scale: int = 2,
                 expansion: int = 2,
                 pooling_func: str = 'TSTP',
                 two_emb_layer: bool = False):
        super().__init__(block, block_fuse, num_blocks, m_channels, feat_dim, embedding_size,
                         baseWidth, scale, expansion, pooling_func, two_emb_layer)

    def build_fusion_path(self) -> None:
        stage3 = self.m_channels * 4 * self.expansion
        stage4 = self.m_channels * 8 * self.expansion
        self.layer3_ds = nn.Conv2d(stage3, stage4, kernel_size=3, stride=2, padding=1, bias=False)
        self.fuse34 = AttentionalFeatureFusion(stage4, r=4)

    def forward_body(self, h: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """h: the stem's (B, m, F, T) map; lengths: (B,) valid frame counts or None."""
        m1, m2, m3, m4 = self.stage_masks(lengths, h.shape[-1], h.device)
        out = self.run_stage(self.layer1, h, m1)
        out = self.run_stage(self.layer2, out, m2)
        out3 = self.run_stage(self.layer3, out, m3)
        out4 = self.run_stage(self.layer4, out3, m4)
        # layer3_ds is 3x3 in time: zero stage 3's padded frames first.
        fused = self.fuse34(out4, conv_bn(self.layer3_ds, None, apply_mask(out3, m3)))
        return self.embed(fused, m4)
