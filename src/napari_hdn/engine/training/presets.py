"""Named model + training presets shared by the GUI, the command line, the demo and the benchmarks.

A preset is an architecture (:class:`ModelConfig` fields) with the training settings that go with
it. Front-ends read them from here; nothing else defines a preset.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import ModelConfig, TrainingConfig


@dataclass(frozen=True)
class Preset:
    """An architecture and the training settings chosen for it."""

    name: str
    description: str
    model: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)

    def model_config(self, **overrides) -> ModelConfig:
        return ModelConfig(**{**self.model, **overrides})

    def training_config(self, **overrides) -> TrainingConfig:
        return TrainingConfig(**{**self.training, **overrides})


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "fast CPU",
            "small model that restores well within minutes on a laptop CPU",
            # the best MMSE PSNR per CPU minute of the recipes tried (docs/engine.md, "Choosing the
            # training recipe"); the weight average keeps the good weights of a high, held rate
            model=dict(levels=4, z_dim=32, filters=32, blocks=1, dropout=0.1),
            # starts from the bundled prior (engine/priors.py): more PSNR for the same steps
            training=dict(patch_size=64, batch_size=16, lr=5e-3, warmup_steps=100, max_steps=2000,
                          ema_decay=0.995, init="prior"),
        ),
        Preset(
            "balanced",
            "a middle size for a workstation or a small GPU",
            model=dict(levels=5, z_dim=32, filters=48, blocks=3, dropout=0.2),
            training=dict(patch_size=64, batch_size=32, lr=5e-4, max_steps=10000),
        ),
        Preset(
            "paper",
            "the published architecture (L=6, z=32, F=64, B=5); hours on a GPU",
            model=dict(levels=6, z_dim=32, filters=64, blocks=5, dropout=0.2),
            training=dict(patch_size=64, batch_size=64, lr=3e-4, max_steps=20000),
        ),
    )
}

DEFAULT_PRESET = "fast CPU"


def get_preset(name: str) -> Preset:
    """The preset called ``name``; a clear error listing the known ones otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        from ..errors import InputError

        raise InputError(f"unknown preset {name!r}: use one of {', '.join(PRESETS)}") from None
