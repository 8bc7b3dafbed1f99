"""Building blocks of the HDN ladder VAE: gated residual blocks, resampling blocks, merges.

Shapes keep the channel count F everywhere except where noted; spatial resampling is by a factor 2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GhostBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics are computed per chunk of ``chunk`` samples.

    The reference implementation gets per-chunk statistics by running a batch of 64 as 8 sequential
    forward/backward passes of 8. Here one pass does it: the batch is viewed as ``(chunk, n*C, H,
    W)`` so that the fused batch-norm kernel computes one mean/variance per (chunk, channel). Chunk
    ``j`` holds samples ``j, j+n, j+2n, ...``; batches are random, so which samples share a chunk
    does not matter. Running statistics are the average over chunks, as with sequential passes.
    """

    def __init__(self, num_features: int, chunk: int = 8, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.chunk = chunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = b // self.chunk if self.chunk else 0
        if not self.training or n <= 1 or b % self.chunk:
            return super().forward(x)
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
        rm = self.running_mean.repeat(n)
        rv = self.running_var.repeat(n)
        xv = x.reshape(self.chunk, n * c, h, w)  # (g, n, C) -> chunk index j = sample % n
        out = F.batch_norm(
            xv, rm, rv, self.weight.repeat(n), self.bias.repeat(n), True, self.momentum, self.eps
        )
        with torch.no_grad():
            self.running_mean.copy_(rm.view(n, c).mean(0))
            self.running_var.copy_(rv.view(n, c).mean(0))
        return out.view(b, c, h, w)


def make_norm(channels: int, use_bn: bool, chunk: int) -> nn.Module:
    return GhostBatchNorm2d(channels, chunk=chunk) if use_bn else nn.Identity()


class GatedResBlock(nn.Module):
    """Pre-activation residual block: 2 x [BN -> ELU -> conv3x3 -> Dropout2d], then a gate, + input.

    The gate is a 1x1 conv C -> 2C split into (a, b), giving ``ELU(a) * sigmoid(b)``; with
    ``gated=False`` the body's output is added directly (paper ablation).
    """

    def __init__(self, ch: int, dropout: float, batchnorm: bool, gated: bool, bn_chunk: int = 8):
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(2):
            layers += [make_norm(ch, batchnorm, bn_chunk), nn.ELU(), nn.Conv2d(ch, ch, 3, padding=1)]
            if dropout > 0:
                # channel-wise, as the reference: whole feature maps are dropped
                layers.append(nn.Dropout2d(dropout))
        self.body = nn.Sequential(*layers)
        self.gate = nn.Conv2d(ch, 2 * ch, 1) if gated else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        if self.gate is not None:
            a, b = self.gate(y).chunk(2, dim=1)
            y = F.elu(a) * torch.sigmoid(b)
        return x + y


class Merge(nn.Module):
    """Merge two feature maps: concat -> 1x1 conv (2F -> F) -> gated residual block."""

    def __init__(self, ch: int, dropout: float, batchnorm: bool, gated: bool, bn_chunk: int = 8):
        super().__init__()
        self.proj = nn.Conv2d(2 * ch, ch, 1)
        self.block = GatedResBlock(ch, dropout, batchnorm, gated, bn_chunk)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.block(self.proj(torch.cat([a, b], dim=1)))


def level_blocks(
    ch: int, n: int, resample: str, dropout: float, batchnorm: bool, gated: bool, bn_chunk: int
) -> nn.Sequential:
    """``n`` gated residual blocks; the first one is preceded by a down/up-sampling conv."""
    layers: list[nn.Module] = []
    if resample == "down":
        layers.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
    elif resample == "up":
        layers.append(nn.ConvTranspose2d(ch, ch, 3, stride=2, padding=1, output_padding=1))
    for _ in range(n):
        layers.append(GatedResBlock(ch, dropout, batchnorm, gated, bn_chunk))
    return nn.Sequential(*layers)
