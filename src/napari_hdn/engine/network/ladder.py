"""The HDN ladder VAE: bottom-up path, latent levels with prior/posterior heads, top-down path.

Levels are numbered as in the paper: 1 is the bottom (finest, half the input resolution), L the top
(1/2**L of the input). Everything here works on normalised, padded tensors of shape (B, 1, H, W)
with H and W multiples of 2**L; :func:`pad_to_multiple` and the prediction module take care of that.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .blocks import GatedResBlock, Merge, level_blocks

# eps provider: (level, shape) -> standard normal tensor of that shape, or None for torch.randn
NoiseFn = Callable[[int, tuple[int, ...]], torch.Tensor]

_LOGVAR_MIN, _LOGVAR_MAX = -20.0, 10.0


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad the last two dims at the bottom/right up to a multiple of ``multiple``.

    Reflection padding where the image is large enough, replication otherwise. Padding only at the
    end keeps the latent grid anchored at the image origin, which tiling relies on.
    """
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        mode = "reflect" if ph < h and pw < w else "replicate"
        x = F.pad(x, (0, pw, 0, ph), mode=mode)
    return x, (h, w)


def gaussian_kl(mu_q, logvar_q, mu_p, logvar_p) -> torch.Tensor:
    """Analytic KL(q || p) of diagonal Gaussians, element-wise."""
    return 0.5 * (
        logvar_p - logvar_q + (torch.exp(logvar_q) + (mu_q - mu_p) ** 2) * torch.exp(-logvar_p) - 1.0
    )


def free_bits_kl(kl_per_level: torch.Tensor, free_bits: float) -> torch.Tensor:
    """Sum over levels of max(KL_l, free_bits), per sample.

    ``kl_per_level`` has shape (levels, batch) holding each level's KL summed over (C, H, W).
    """
    return torch.clamp(kl_per_level, min=free_bits).sum(0)


class LatentLevel(nn.Module):
    """Level ``index`` of the top-down path.

    Owns the prior head p(z_i | z_>i), the posterior head q(z_i | z_>i, x), the projection of z_i to
    features, the generative skip merge, and the level's upsampling blocks. ``forward`` takes a
    per-level ``mode`` deciding where z_i comes from (spec section 3).
    """

    def __init__(self, index: int, cfg: ModelConfig, bn_chunk: int = 8):
        super().__init__()
        self.index = index
        self.is_top = index == cfg.levels
        f, z = cfg.filters, cfg.z_dim
        args = (cfg.dropout, cfg.batchnorm, cfg.gated, bn_chunk)
        if self.is_top:
            # Stationary top prior (one mean/logvar per channel), so any image size works.
            init = torch.zeros(1, 2 * z, 1, 1)
            if cfg.learned_top_prior:
                self.top_prior = nn.Parameter(init)
            else:
                self.register_buffer("top_prior", init)
            self.prior_head = None
            self.posterior_merge = None
        else:
            self.prior_head = nn.Conv2d(f, 2 * z, 3, padding=1)
            self.posterior_merge = Merge(f, *args)
        self.posterior_head = nn.Conv2d(f, 2 * z, 3, padding=1)
        self.z_to_features = nn.Conv2d(z, f, 3, padding=1)
        self.skip_merge = Merge(f, *args) if (cfg.generative_skip and not self.is_top) else None
        self.blocks = level_blocks(f, cfg.blocks, "up", *args)

    def prior(self, h: torch.Tensor | None, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.is_top:
            p = self.top_prior.expand(like.shape[0], -1, like.shape[2], like.shape[3])
        else:
            p = self.prior_head(h)
        mu, logvar = p.chunk(2, dim=1)
        return mu, logvar.clamp(_LOGVAR_MIN, _LOGVAR_MAX)

    def posterior(self, h: torch.Tensor | None, bu: torch.Tensor):
        feats = bu if self.is_top else self.posterior_merge(bu, h)
        mu, logvar = self.posterior_head(feats).chunk(2, dim=1)
        return mu, logvar.clamp(_LOGVAR_MIN, _LOGVAR_MAX)

    def forward(
        self,
        h: torch.Tensor | None,
        bu: torch.Tensor,
        mode: str = "posterior",
        eps: torch.Tensor | None = None,
        compute_kl: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return (features for the level below, KL per sample or None)."""
        kl = None
        need_prior = mode in ("prior-mean", "prior-sample") or (mode == "posterior" and compute_kl)
        if need_prior:
            mu_p, logvar_p = self.prior(h, bu)
        if mode == "posterior":
            mu_q, logvar_q = self.posterior(h, bu)
            if eps is None:
                eps = torch.randn_like(mu_q)
            z = mu_q + torch.exp(0.5 * logvar_q) * eps
            if compute_kl:
                kl = gaussian_kl(mu_q, logvar_q, mu_p, logvar_p).sum(dim=(1, 2, 3))
        elif mode == "prior-mean":
            z = mu_p
        elif mode == "prior-sample":
            # the image does not reach this level; z is drawn from p(z_i | z_>i), so the level stays
            # in the distribution the decoder was trained on (the mean alone is atypically smooth)
            if eps is None:
                eps = torch.randn_like(mu_p)
            z = mu_p + torch.exp(0.5 * logvar_p) * eps
        elif mode == "zero":
            shape = (bu.shape[0], self.posterior_head.out_channels // 2, *bu.shape[2:])
            z = torch.zeros(shape, dtype=bu.dtype, device=bu.device)
        else:
            raise ValueError(f"unknown latent mode {mode!r}")
        out = self.z_to_features(z)
        if self.skip_merge is not None:
            out = self.skip_merge(out, h)
        return self.blocks(out), kl


class LadderVAE(nn.Module):
    """The hierarchical VAE of HDN (bottom-up encoder, top-down generative path)."""

    def __init__(self, cfg: ModelConfig, bn_chunk: int = 8):
        super().__init__()
        self.cfg = cfg
        f = cfg.filters
        args = (cfg.dropout, cfg.batchnorm, cfg.gated, bn_chunk)
        self.stem = nn.Sequential(
            nn.Conv2d(1, f, 5, padding=2), nn.ELU(), GatedResBlock(f, *args)
        )
        self.bottom_up_levels = nn.ModuleList(
            [level_blocks(f, cfg.blocks, "down", *args) for _ in range(cfg.levels)]
        )
        # index 0 = level 1 (bottom)
        self.levels = nn.ModuleList([LatentLevel(i + 1, cfg, bn_chunk) for i in range(cfg.levels)])
        final = [GatedResBlock(f, *args) for _ in range(cfg.blocks)]
        self.final = nn.Sequential(*final, nn.Conv2d(f, 1, 3, padding=1))

    @property
    def n_levels(self) -> int:
        return self.cfg.levels

    def set_bn_chunk(self, chunk: int) -> None:
        for m in self.modules():
            if hasattr(m, "chunk") and isinstance(m, nn.BatchNorm2d):
                m.chunk = chunk

    def bottom_up(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Deterministic encoder: the features bu_1..bu_L (index 0 = level 1)."""
        h = self.stem(x)
        out = []
        for level in self.bottom_up_levels:
            h = level(h)
            out.append(h)
        return out

    def top_down(
        self,
        bu: Sequence[torch.Tensor],
        modes: Sequence[str] | None = None,
        noise: NoiseFn | None = None,
        compute_kl: bool = True,
        start: tuple[int, torch.Tensor] | None = None,
        keep: Callable[[int, torch.Tensor], None] | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """Generative path from level L down to 1, then the output head.

        Parameters
        ----------
        bu : list of bottom-up features (index 0 = level 1), batch already matching the samples.
        modes : one of "posterior", "prior-sample", "prior-mean", "zero" per level (index 0 =
            level 1).
        noise : optional provider of the standard-normal eps per level (used for position-keyed,
            reproducible sampling in prediction); torch's RNG when None.
        start : optional ``(level, h)``: ``h`` is the output of ``level`` (1..L) from an earlier pass
            with the same features, modes and latent noise at that level and above; the pass
            resumes below it (those levels are not recomputed and get no KL).
        keep : optional ``keep(level, h)``, called with the output of each level computed here.

        Returns
        -------
        s : (B, 1, H, W) restored signal in normalised space.
        kls : per level (index 0 = level 1) the KL per sample, or None where not computed.
        """
        L = self.n_levels
        modes = list(modes) if modes is not None else ["posterior"] * L
        h = None
        top = L
        if start is not None:
            top, h = start[0] - 1, start[1]
        kls: list[torch.Tensor | None] = [None] * L
        for i in reversed(range(top)):
            level = self.levels[i]
            eps = None
            if modes[i] in ("posterior", "prior-sample") and noise is not None:
                shape = (bu[i].shape[0], self.cfg.z_dim, *bu[i].shape[2:])
                eps = noise(i + 1, shape)
            h, kls[i] = level(h, bu[i], modes[i], eps, compute_kl)
            if keep is not None:
                keep(i + 1, h)
        return self.final(h), kls

    def forward(self, x: torch.Tensor, modes: Sequence[str] | None = None):
        """Pad, encode, decode one sample per input, crop: returns (s, kls)."""
        xp, (h, w) = pad_to_multiple(x, self.cfg.downscale)
        s, kls = self.top_down(self.bottom_up(xp), modes)
        return s[..., :h, :w], kls
