"""Exact ROI geometry in integer pixels.

ROI tables store micrometres; arrays are indexed in pixels. Converting each
acquisition's window separately can round two windows to different shapes, so
every window here is an integer box, computed once and converted back to
micrometres as exact multiples of the pixel size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

SPATIAL_AXES = ("z", "y", "x")
_SNAP = 1e-2  # a micrometre value this close to a pixel edge is that edge
METADATA_REL_TOL = 1e-6
"""Two floats from metadata (pixel sizes, their ratios) that agree to this
relative tolerance are equal: converters' arithmetic leaves the last digits
off (0.65 vs 0.6500000000000001), and no microscope is calibrated to 1e-6."""


def same_value(a: float, b: float) -> bool:
    """True when two metadata floats agree to ``METADATA_REL_TOL``."""
    return math.isclose(a, b, rel_tol=METADATA_REL_TOL)


def at_most(value: float, limit: float) -> bool:
    """``value <= limit``, a value equal to it up to ``METADATA_REL_TOL`` included."""
    return value <= limit or same_value(value, limit)


def same_pixel_size(a: Mapping[str, float], b: Mapping[str, float]) -> bool:
    """True when both have the same axes and agree on every pixel size."""
    return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)


class ImageGeometry(NamedTuple):
    """Where an array's pixels lie: per spatial axis, in ``z, y, x`` order."""

    pixel_um: dict[str, float]
    """Pixel size in micrometres."""
    shape: dict[str, int]
    """Size in pixels."""

    def same_grid(self, other: ImageGeometry) -> bool:
        """True for the same shape and pixel sizes (see :func:`same_pixel_size`)."""
        return self.shape == other.shape and same_pixel_size(
            self.pixel_um, other.pixel_um
        )


@dataclass(frozen=True)
class Box:
    """Half-open integer box ``[start, stop)`` over named spatial axes."""

    axes: tuple[str, ...]
    start: tuple[int, ...]
    stop: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        """Size along each axis (negative when the box is inverted)."""
        return tuple(b - a for a, b in zip(self.start, self.stop))

    @property
    def is_empty(self) -> bool:
        """True when any axis has no pixel."""
        return any(n <= 0 for n in self.shape)

    def shifted(self, offset: Mapping[str, int]) -> Box:
        """The same box moved by ``offset`` pixels (missing axes: 0)."""
        delta = [offset.get(axis, 0) for axis in self.axes]
        return Box(
            self.axes,
            tuple(a + d for a, d in zip(self.start, delta)),
            tuple(b + d for b, d in zip(self.stop, delta)),
        )

    def intersect(self, other: Box) -> Box:
        """The common part of two boxes over the same axes (may be empty)."""
        if other.axes != self.axes:
            raise ValueError(f"Axes differ: {self.axes} vs {other.axes}.")
        return Box(
            self.axes,
            tuple(max(a, b) for a, b in zip(self.start, other.start)),
            tuple(min(a, b) for a, b in zip(self.stop, other.stop)),
        )

    def slices(self) -> dict[str, slice]:
        """Index slices per axis."""
        return {
            axis: slice(a, b) for axis, a, b in zip(self.axes, self.start, self.stop)
        }


def crop_to_common(first: Box, second: Box) -> tuple[Box, Box]:
    """Both boxes cut to their common size, keeping their starts.

    Used to compare a ROI whose pixel shape differs between two acquisitions
    (e.g. by a few pixels) on the part both have.
    """
    size = [min(a, b) for a, b in zip(first.shape, second.shape)]

    def cut(box: Box) -> Box:
        return Box(box.axes, box.start, tuple(a + n for a, n in zip(box.start, size)))

    return cut(first), cut(second)


def to_pixel_edge(value_um: float, pixel_um: float, *, upper: bool) -> int:
    """Convert a micrometre coordinate to a pixel edge.

    A value within 1/100 pixel of an edge snaps to it; otherwise a start rounds
    down and a stop rounds up, so that the box covers the whole region.
    """
    pixels = value_um / pixel_um
    nearest = round(pixels)
    if abs(pixels - nearest) < _SNAP:
        return int(nearest)
    return math.ceil(pixels) if upper else math.floor(pixels)


def to_pixels(value_um: float, pixel_um: float) -> int:
    """Convert a micrometre length or translation to whole pixels (nearest)."""
    return int(round(value_um / pixel_um))


def roi_box(
    slices_um: Mapping[str, tuple[float, float]],
    pixel_um: Mapping[str, float],
    shape: Mapping[str, int],
    *,
    clip: bool = True,
) -> Box:
    """Integer box of a ROI in one array's pixels, clipped to the array.

    Args:
        slices_um: ``axis -> (start, length)`` in micrometres; an axis missing
            here covers the whole array.
        pixel_um: ``axis -> pixel size`` in micrometres, for every spatial axis
            of the array.
        shape: ``axis -> size`` in pixels, for every spatial axis of the array.
        clip: Clip the box to the array (else it may reach outside).

    Returns:
        The box over the array's spatial axes (in ``z, y, x`` order); it is
        empty if the ROI lies outside the array.
    """
    axes = tuple(a for a in SPATIAL_AXES if a in shape)
    start, stop = [], []
    for axis in axes:
        if axis in slices_um:
            begin, length = slices_um[axis]
            a = to_pixel_edge(begin, pixel_um[axis], upper=False)
            b = to_pixel_edge(begin + length, pixel_um[axis], upper=True)
        else:
            a, b = 0, shape[axis]
        start.append(max(a, 0) if clip else a)
        stop.append(min(b, shape[axis]) if clip else b)
    return Box(axes, tuple(start), tuple(stop))


def box_slices_um(
    box: Box, pixel_um: Mapping[str, float]
) -> dict[str, tuple[float, float]]:
    """``axis -> (start, length)`` in micrometres of an integer box."""
    return {
        axis: (a * pixel_um[axis], (b - a) * pixel_um[axis])
        for axis, a, b in zip(box.axes, box.start, box.stop)
    }


def consensus_windows(
    boxes: Mapping[str, Box], translations: Mapping[str, Mapping[str, int]]
) -> dict[str, Box]:
    """Per acquisition, the window of one ROI that every acquisition shows.

    Args:
        boxes: ``acquisition -> box`` of the ROI in that acquisition's own
            pixels.
        translations: ``acquisition -> {axis: pixels}``, the shift that moves
            that acquisition onto the reference (zero for the reference).

    Returns:
        ``acquisition -> window`` in its own pixels. All windows have the same
        shape, and window ``a`` shifted by ``translations[a]`` is the same box
        for every ``a`` (the window's place in the reference). The result is
        empty when the shifted boxes do not overlap; the caller must check.
    """
    names = list(boxes)
    common = boxes[names[0]].shifted(translations[names[0]])
    for name in names[1:]:
        common = common.intersect(boxes[name].shifted(translations[name]))
    return {name: _unshift(common, translations[name]) for name in names}


def _unshift(box: Box, offset: Mapping[str, int]) -> Box:
    return box.shifted({axis: -value for axis, value in offset.items()})


def window_pair(
    source_um: Mapping[str, tuple[float, float]],
    target_um: Mapping[str, tuple[float, float]],
    pixel_um: Mapping[str, float],
    shape: Mapping[str, int],
) -> tuple[Box, Box]:
    """Source and target windows of one registered ROI, in one array's pixels.

    The target is the reference's window, the source the acquisition's. Both get
    the target's size, so they pair pixel for pixel even when the array is
    coarser than the grid the ROIs were computed on (e.g. a label image stored
    at half resolution).

    Raises:
        ValueError: If either window reaches outside the array.
    """
    target = roi_box(target_um, pixel_um, shape, clip=False)
    start = roi_box(source_um, pixel_um, shape, clip=False).start
    source = Box(target.axes, start, tuple(a + n for a, n in zip(start, target.shape)))
    for box in (source, target):
        outside = [
            axis
            for axis, a, b in zip(box.axes, box.start, box.stop)
            if a < 0 or b > shape[axis]
        ]
        if outside or box.is_empty:
            raise ValueError(
                f"window {dict(zip(box.axes, zip(box.start, box.stop)))} px is "
                f"empty or outside the array of shape {dict(shape)}"
            )
    return source, target
