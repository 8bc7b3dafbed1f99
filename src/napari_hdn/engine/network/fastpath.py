"""Inference-only rewrite of a trained ladder: the same numbers with less work per sample.

:func:`fuse_for_inference` turns an eval-mode :class:`~.ladder.LadderVAE` into one whose gated
residual blocks are replaced by :class:`FusedGatedResBlock`:

- the block's second BatchNorm sits right after its first convolution (dropout is the identity in
  eval mode), so it is folded into that convolution's weights and bias;
- the first BatchNorm (it normalises the block's input, which the residual also needs) becomes one
  precomputed per-channel scale and shift, applied together with the ELU;
- the gate ``ELU(a) * sigmoid(b)`` and the residual sum run in place on the gate convolution's
  output, so a block allocates three feature maps instead of nine;
- large feature maps go through a block in stripes of rows that fit the caches (the elementwise
  work is memory-bound otherwise: 1.6-1.8x faster blocks at 256x256 and 512x512 on a CPU).

Everything else (levels, heads, merges, the top-down control flow with its latent modes and noise
provider) is the ladder's own code: only modules inside it are swapped, so whatever modes
:meth:`~.ladder.LatentLevel.forward` knows keep working. Results equal the unfused network's up to
float32 rounding (tests/test_prediction.py checks it).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import GatedResBlock

_HALO = 2  # rows of context two 3x3 convolutions need
#: feature maps above this size are processed in stripes of rows of about this size (None: never).
#: Measured on 2 CPU cores (L2 1 MiB per core, L3 32 MiB), F=32, channels-last, ms per sample for
#: one block: 256x256 43.9 whole, 27.4 in 2 MiB stripes; 512x512 222 whole, 125 in 4 MiB stripes;
#: 128x128 (maps in the cache) 8.8 either way.
STRIPE_BYTES: int | None = 4 << 20


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and shift of an eval-mode BatchNorm: y = x * scale + shift."""
    inv = torch.rsqrt(bn.running_var + bn.eps)
    w = bn.weight if bn.weight is not None else torch.ones_like(inv)
    b = bn.bias if bn.bias is not None else torch.zeros_like(inv)
    scale = w * inv
    return scale, b - bn.running_mean * scale


def _fold_after(conv: nn.Conv2d, scale: torch.Tensor, shift: torch.Tensor) -> nn.Conv2d:
    """A copy of ``conv`` followed by a per-output-channel affine, as one convolution."""
    out = copy.deepcopy(conv)
    with torch.no_grad():
        out.weight.mul_(scale.view(-1, 1, 1, 1))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(scale)
        out.bias = nn.Parameter(bias * scale + shift)
    return out


class FusedGatedResBlock(nn.Module):
    """An eval-mode :class:`~.blocks.GatedResBlock` with its BatchNorms folded (inference only)."""

    def __init__(self, block: GatedResBlock):
        super().__init__()
        convs = [m for m in block.body if isinstance(m, nn.Conv2d)]
        norms = [m for m in block.body if isinstance(m, nn.BatchNorm2d)]
        if len(convs) != 2 or len(norms) not in (0, 2):
            raise ValueError("unexpected gated residual block layout")
        c1, c2 = convs
        if norms:
            s1, t1 = _bn_affine(norms[0])
            self.register_buffer("scale", s1.detach().clone().view(1, -1, 1, 1))
            self.register_buffer("shift", t1.detach().clone().view(1, -1, 1, 1))
            c1 = _fold_after(c1, *_bn_affine(norms[1]))
        else:
            self.scale = self.shift = None
        self.conv1, self.conv2 = c1, copy.deepcopy(c2)
        self.gate = copy.deepcopy(block.gate)

    #: feature maps larger than this (bytes) are processed in stripes of rows (see ``forward``)
    stripe_bytes: int | None = STRIPE_BYTES

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        limit = self.stripe_bytes
        if (limit is None or x.device.type != "cpu" or x.numel() * x.element_size() <= limit
                or h < 4 * _HALO):  # stripes are for CPU caches
            return self._forward(x)
        # The block's elementwise work (ELU, gate, residual) streams whole feature maps through
        # memory; maps larger than the caches make it memory-bound. Stripes of rows, with the
        # 2-row halo two 3x3 convolutions need, keep each stripe's maps in the cache. At the
        # image's own top and bottom the zero padding is the convolution's, so stripes give the
        # same numbers.
        rows = max(_HALO * 2, limit // max(1, n * c * w * x.element_size()))
        out = torch.empty_like(x)
        for r0 in range(0, h, rows):
            r1 = min(h, r0 + rows)
            a, b = max(0, r0 - _HALO), min(h, r1 + _HALO)
            out[:, :, r0:r1] = self._forward(x[:, :, a:b])[:, :, r0 - a : r1 - a]
        return out

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.addcmul(self.shift, x, self.scale) if self.scale is not None else x
        y = F.elu(y, inplace=self.scale is not None)
        y = F.elu(self.conv1(y), inplace=True)
        y = self.conv2(y)
        if self.gate is None:
            return y.add_(x)
        a, b = self.gate(y).chunk(2, dim=1)
        return torch.addcmul(x, F.elu(a, inplace=True), b.sigmoid_())


def fuse_for_inference(ladder: nn.Module) -> nn.Module:
    """An eval-mode copy of ``ladder`` with every gated residual block fused (see module doc)."""
    net = copy.deepcopy(ladder).eval()  # BatchNorm uses its running statistics

    def swap(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if isinstance(child, GatedResBlock):
                setattr(parent, name, FusedGatedResBlock(child))
            else:
                swap(child)

    swap(net)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    net.fused_for_inference = True
    return net
