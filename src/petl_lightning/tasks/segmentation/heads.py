"""Decode heads of a segmenter: per-pixel class logits from a ViT's patch-token maps.

- :class:`UperNetHead`: UperNet (Xiao et al., 2018) as BEiT and ViT-Adapter put it on a plain ViT:
  the maps of four blocks, all at the patch stride, become a pyramid at 1/4, 1/2, 1 and 2 times the
  patch stride (two 2x2 deconvolutions / one / identity / 2x2 max-pool), then a pyramid pooling module
  on the coarsest level, a top-down FPN, and a fused 3x3 convolution before the classifier.
- :class:`LinearHead`: DINOv2's linear protocol: BatchNorm and one 1x1 convolution on the last
  block's patch-token map.

Each head takes the list of maps ``(B, D, h, w)`` (one per block it reads) and returns logits
``(B, K, H', W')`` at its own resolution (the segmenter resizes them to the image). ``flops(grid)``
is the multiply-adds of its convolutions for a patch grid ``(h, w)`` (norms, activations, pooling and
resizing are not counted: what ``torch.utils.flop_counter`` counts, halved).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def conv_bn_relu(c_in: int, c_out: int, kernel: int) -> nn.Sequential:
    """Convolution (no bias), BatchNorm, ReLU: mmseg's ``ConvModule`` as UperNet uses it."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)
    )


def resize(x: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear resize of ``x`` to ``size`` (align_corners off, as mmseg)."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class PyramidNeck(nn.Module):
    """Four maps at the patch stride to four at 1/4, 1/2, 1 and 2 times it (BEiT's ``fpn1..fpn4``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.up4 = nn.Sequential(
            nn.ConvTranspose2d(dim, dim, 2, stride=2),
            nn.BatchNorm2d(dim),
            nn.GELU(),
            nn.ConvTranspose2d(dim, dim, 2, stride=2),
        )
        self.up2 = nn.ConvTranspose2d(dim, dim, 2, stride=2)
        self.down2 = nn.MaxPool2d(2)
        self.dim = dim

    def forward(self, maps: Sequence[Tensor]) -> list[Tensor]:
        return [self.up4(maps[0]), self.up2(maps[1]), maps[2], self.down2(maps[3])]

    @staticmethod
    def sizes(grid: tuple[int, int]) -> list[tuple[int, int]]:
        """The four levels' sizes for a patch grid ``(h, w)``."""
        h, w = grid
        return [(4 * h, 4 * w), (2 * h, 2 * w), (h, w), (h // 2, w // 2)]

    def flops(self, grid: tuple[int, int]) -> int:
        h, w = grid
        d2 = self.dim * self.dim * 4  # a 2x2 deconvolution: every input pixel meets 4 kernel taps
        return h * w * d2 + (2 * h) * (2 * w) * d2 + h * w * d2


class UperNetHead(nn.Module):
    """UperNet over a plain ViT (see the module docstring).

    Args:
        dim: the ViT's width.
        num_classes: classes.
        channels: the head's width (mmseg's UperNet on ViT: 512; BEiT: 768).
        pool_scales: the pyramid pooling module's output sizes.
        dropout: dropout before the classifier (mmseg: 0.1).
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.neck = PyramidNeck(dim)
        self.pool_scales = tuple(pool_scales)
        self.ppm = nn.ModuleList(conv_bn_relu(dim, channels, 1) for _ in self.pool_scales)
        self.ppm_bottleneck = conv_bn_relu(dim + len(self.pool_scales) * channels, channels, 3)
        self.laterals = nn.ModuleList(conv_bn_relu(dim, channels, 1) for _ in range(3))
        self.fpn_convs = nn.ModuleList(conv_bn_relu(channels, channels, 3) for _ in range(3))
        self.fpn_bottleneck = conv_bn_relu(4 * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        self.dim, self.channels, self.num_classes = dim, channels, num_classes

    def forward(self, maps: Sequence[Tensor]) -> Tensor:
        levels = self.neck(maps)
        top = levels[3]
        pooled = [
            resize(conv(F.adaptive_avg_pool2d(top, s)), top.shape[-2:]) for s, conv in zip(self.pool_scales, self.ppm)
        ]
        laterals = [conv(x) for conv, x in zip(self.laterals, levels[:3])]
        laterals.append(self.ppm_bottleneck(torch.cat([top, *pooled], dim=1)))
        for i in range(3, 0, -1):  # top-down: each level gets the coarser one, upsampled
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:3])] + [laterals[3]]
        size = outs[0].shape[-2:]
        fused = self.fpn_bottleneck(torch.cat([outs[0], *(resize(x, size) for x in outs[1:])], dim=1))
        return self.classifier(self.dropout(fused))

    def flops(self, grid: tuple[int, int]) -> int:
        d, c, k = self.dim, self.channels, self.num_classes
        sizes = [h * w for h, w in PyramidNeck.sizes(grid)]
        f = self.neck.flops(grid)
        f += sum(s * s * d * c for s in self.pool_scales)  # 1x1 convolutions on the pooled maps
        f += sizes[3] * (d + len(self.pool_scales) * c) * c * 9
        f += sum(n * d * c for n in sizes[:3]) + sum(n * c * c * 9 for n in sizes[:3])
        return f + sizes[0] * 4 * c * c * 9 + sizes[0] * c * k


class LinearHead(nn.Module):
    """DINOv2's linear segmentation protocol: BatchNorm and a 1x1 convolution on the last map."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(dim)
        self.classifier = nn.Conv2d(dim, num_classes, 1)
        self.dim, self.num_classes = dim, num_classes

    def forward(self, maps: Sequence[Tensor]) -> Tensor:
        return self.classifier(self.norm(maps[-1]))

    def flops(self, grid: tuple[int, int]) -> int:
        return grid[0] * grid[1] * self.dim * self.num_classes


__all__ = ["LinearHead", "PyramidNeck", "UperNetHead"]
