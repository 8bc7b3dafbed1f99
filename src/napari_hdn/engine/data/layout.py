"""Where the channels of an image are: a channel axis ``C`` anywhere among the leading axes
(``CYX``, ``TCYX``, ``SCYX``, ``CZYX``) or last, as colour samples (``YXC``, an RGB image;
``TYXC``). Without axes, an array of shape ``(Y, X, 3)`` or ``(Y, X, 4)`` is taken as RGB(A), as
napari takes it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from .arrays import check_axes


@dataclass(frozen=True)
class Layout:
    """Where the channels of an image are: ``axes`` (with C when there is one), ``frame_axes``
    (those of one channel), ``channel_pos`` (the C axis's position, or None) and ``channels``."""

    axes: str
    frame_axes: str
    channel_pos: int | None
    channels: int

    @property
    def has_channels(self) -> bool:
        return self.channel_pos is not None

    def channel_view(self, image, c: int):
        """Channel ``c`` of ``image`` (a view of a numpy array; an index of a lazy one)."""
        if self.channel_pos is None:
            return image
        key = (slice(None),) * self.channel_pos + (int(c),)
        return image[key]

    def stack(self, per_channel: Sequence[np.ndarray], leading: int = 0) -> np.ndarray:
        """The per-channel results back in this layout (``leading`` extra axes first)."""
        if self.channel_pos is None:
            return per_channel[0]
        return np.stack(per_channel, axis=self.channel_pos + leading)


def looks_rgb(shape) -> bool:
    """(Y, X, 3 or 4) with a real image's sides: what napari opens as RGB(A)."""
    return len(shape) in (3, 4) and shape[-1] in (3, 4) and min(shape[-3:-1]) > 4


def layout_of(shape, axes: str | None = None, name: str = "image") -> Layout:
    """The :class:`Layout` of an image of ``shape`` with ``axes`` (None: guessed).

    Raises
    ------
    InputError
        When the axes do not fit the shape, hold C twice, or put C between Y and X.
    """
    shape = tuple(int(v) for v in shape)
    if axes is None and not looks_rgb(shape):
        full = check_axes(None, shape)
        return Layout(full, full, None, 1)
    ax = (("S" if len(shape) == 4 else "") + "YXC" if axes is None
          else str(axes).upper().replace(" ", ""))
    if "C" not in ax:
        full = check_axes(ax, shape)
        return Layout(full, full, None, 1)
    if ax.count("C") > 1:
        raise InputError(f"axes {axes!r} name the channel axis C more than once")
    if len(ax) != len(shape):
        raise InputError(f"axes {ax!r} have {len(ax)} letters but {name} has {len(shape)} "
                         f"dimensions {shape}")
    pos = ax.index("C")
    rest = ax.replace("C", "")
    if not rest.endswith("YX"):
        raise InputError(f"axes {ax!r} must end with 'YX' (rows, columns), or 'YXC' for colour "
                         "samples")
    if not (ax.endswith("YXC") or pos < len(ax) - 2):
        raise InputError(f"axes {ax!r}: the channel axis C goes before Y and X (CYX, TCYX) or "
                         "after them (YXC, colour samples), not between them")
    sub = shape[:pos] + shape[pos + 1:]
    frame_axes = check_axes(rest, sub)
    return Layout(ax, frame_axes, pos, shape[pos])
