"""Helpers for the widget tests (napari-hdn plugin): tiny models, notification capture, waiting."""

from __future__ import annotations

import numpy as np

#: architecture and training settings small enough for a few steps per second on 2 CPU cores
TINY_ARCH = dict(levels=2, z_dim=2, filters=8, blocks=1, dropout=0.0)
TINY_TRAIN = dict(patch_size=32, batch_size=8)


def set_tiny(widget, steps: int = 4) -> None:
    """Put the training widget on the tiny architecture (as a user would in 'Advanced')."""
    widget.preset.setCurrentText("custom")
    widget.levels.setValue(TINY_ARCH["levels"])
    widget.z_dim.setValue(TINY_ARCH["z_dim"])
    widget.filters.setValue(TINY_ARCH["filters"])
    widget.blocks.setValue(TINY_ARCH["blocks"])
    widget.dropout.setValue(TINY_ARCH["dropout"])
    widget.patch.setValue(TINY_TRAIN["patch_size"])
    widget.batch.setValue(TINY_TRAIN["batch_size"])
    widget.steps.setValue(steps)
    widget.steps_per_val.setValue(2)
    widget.device.setCurrentIndex(widget.device.findData("cpu"))


def tiny_model(image: np.ndarray, steps: int = 2, sigma: float = 3.0):
    """A tiny HDN trained for a couple of steps with the engine directly (no widget)."""
    from napari_hdn.engine import GaussianNoiseModel, train

    return train(image, GaussianNoiseModel(sigma), **TINY_ARCH, **TINY_TRAIN, max_steps=steps,
                 device="cpu", steps_per_epoch=steps, seed=0)


class Notes:
    """Records napari notifications (what the user would see pop up)."""

    def __init__(self) -> None:
        from napari.utils.notifications import notification_manager

        self.manager = notification_manager
        self.items: list = []
        notification_manager.notification_ready.connect(self._add)

    def _add(self, event) -> None:
        n = getattr(event, "value", event)
        self.items.append(n)

    def close(self) -> None:
        self.manager.notification_ready.disconnect(self._add)

    def of(self, severity: str) -> list[str]:
        return [str(n.message) for n in self.items if str(n.severity).lower().endswith(severity)]

    @property
    def errors(self) -> list[str]:
        return self.of("error")

    @property
    def infos(self) -> list[str]:
        return self.of("info")

    @property
    def warnings(self) -> list[str]:
        return self.of("warning")

    def clear(self) -> None:
        self.items.clear()


PLUGIN = "napari-hdn"
WAIT = 60_000  # ms; generous upper bound, tests finish long before it


def dock(viewer, name):
    """Open one of the plugin's widgets (by its manifest name) and return it."""
    return viewer.window.add_plugin_dock_widget(PLUGIN, name)[1]
