"""Exact ROI geometry in integer pixels.

ROI tables store micrometres; arrays are indexed in pixels. Converting each
acquisition's window separately can round two windows to different shapes, so
every window here is an integer box, computed once and converted back to
micrometres as exact multiples of the pixel size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

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


MOVES_NO_PIXEL = 0.5
"""A rotation that moves no point of a ROI by this much (level-0 px) is left
out: the ROI is shifted by whole pixels, copied without interpolation."""


@dataclass(frozen=True)
class RigidTransform:
    """Where an acquisition's points lie in the reference: rotation, then shift.

    The rotation is in the (y, x) plane about ``center``. A point ``p`` of
    the acquisition lands at ``center + R (p - center) + translation`` in the
    reference (z only moves by its translation), so ``translation`` is the
    displacement of ``center``: the columns ``translation_z/y/x`` of
    fractal-tasks-core. Coordinates are continuous: pixel ``i`` covers
    ``[i, i + 1)``. The unit (µm or pixels) is that of ``center`` and
    ``translation``; :meth:`in_pixels` converts.

    A positive ``rotation_deg`` turns the x axis towards the y axis: clockwise
    on screen, where y points down.
    """

    rotation_deg: float = 0.0
    center: Mapping[str, float] = field(default_factory=dict)  # y, x
    translation: Mapping[str, float] = field(default_factory=dict)  # z, y, x

    @property
    def is_translation(self) -> bool:
        """True when the transform only translates."""
        return self.rotation_deg == 0.0

    def matrix(self) -> np.ndarray:
        """The rotation acting on ``(y, x)`` column vectors."""
        t = math.radians(self.rotation_deg)
        c, s = math.cos(t), math.sin(t)
        return np.array([[c, s], [-s, c]])

    def _yx(self, mapping: Mapping[str, float]) -> np.ndarray:
        return np.array([mapping.get("y", 0.0), mapping.get("x", 0.0)])

    def apply_yx(self, points: np.ndarray) -> np.ndarray:
        """Map ``(..., 2)`` acquisition points ``(y, x)`` into the reference."""
        c = self._yx(self.center)
        return (
            (np.asarray(points) - c) @ self.matrix().T + c + self._yx(self.translation)
        )

    def inverse_yx(self, points: np.ndarray) -> np.ndarray:
        """Map ``(..., 2)`` reference points ``(y, x)`` into the acquisition."""
        c = self._yx(self.center)
        moved = np.asarray(points) - c - self._yx(self.translation)
        return moved @ self.matrix() + c

    def rotation_displacement(self, box: Box) -> float:
        """Largest distance the rotation moves a point of ``box`` (box units).

        That is beyond the translation, at the corner farthest from the centre.
        """
        if self.is_translation:
            return 0.0
        corners = _corners_yx(box)
        radius = float(np.max(np.hypot(*(corners - self._yx(self.center)).T)))
        return chord(radius, self.rotation_deg)

    def about(self, center: Mapping[str, float]) -> RigidTransform:
        """The same motion, its rotation taken about ``center`` instead."""
        offset = self._yx(center) - self._yx(self.center)
        moved = self.matrix() @ offset - offset + self._yx(self.translation)
        translation = dict(self.translation)
        translation.update(y=float(moved[0]), x=float(moved[1]))
        return RigidTransform(self.rotation_deg, dict(center), translation)

    def in_pixels(self, pixel_um: Mapping[str, float]) -> RigidTransform:
        """The same transform in the pixels of a grid (given one in µm).

        Raises:
            ValueError: For a rotation on pixels that are not square in
                (y, x): a rotation there is not rigid.
        """
        if not self.is_translation and not same_value(
            pixel_um.get("y", 1.0), pixel_um.get("x", 1.0)
        ):
            raise ValueError(
                f"a rotation needs square pixels in y and x, not {dict(pixel_um)} µm"
            )
        return RigidTransform(
            self.rotation_deg,
            {a: v / pixel_um[a] for a, v in self.center.items()},
            {a: v / pixel_um[a] for a, v in self.translation.items() if a in pixel_um},
        )

    def snapped(self) -> RigidTransform:
        """The transform Apply executes (a transform in pixels).

        A rotation that moves no point by ``MOVES_NO_PIXEL`` is already 0
        (Calculate leaves it out); a pure translation is rounded to whole
        pixels.
        """
        if not self.is_translation:
            return self
        whole = self.whole_pixel_shift(list(self.translation))
        return RigidTransform(0.0, self.center, whole)

    def whole_pixel_shift(self, axes: Sequence[str]) -> dict[str, int]:
        """The translation rounded to whole pixels (a transform in pixels)."""
        return {a: int(round(self.translation.get(a, 0.0))) for a in axes}


def chord(radius: float, angle_deg: float) -> float:
    """How far a rotation by ``angle_deg`` moves a point at ``radius``."""
    return 2.0 * radius * abs(math.sin(math.radians(angle_deg) / 2))


def corner_displacement(
    angle_deg: float, size_um: Mapping[str, float], pixel_um: Mapping[str, float]
) -> float:
    """Pixels a rotation about a ROI's centre moves the ROI's corners by.

    Args:
        angle_deg: The rotation.
        size_um: The ROI's extent per axis (y and x used), in µm.
        pixel_um: The pixel size the answer is in, per axis.
    """
    radius = math.hypot(
        size_um["y"] / 2 / pixel_um["y"], size_um["x"] / 2 / pixel_um["x"]
    )
    return chord(radius, angle_deg)


def _corners_yx(box: Box) -> np.ndarray:
    """The four (y, x) corners of a box's continuous extent."""
    i, j = box.axes.index("y"), box.axes.index("x")
    ys = (box.start[i], box.stop[i])
    xs = (box.start[j], box.stop[j])
    return np.array([(y, x) for y in ys for x in xs], dtype=float)


def _half_planes(corners: np.ndarray) -> np.ndarray:
    """Rows ``(a_y, a_x, b)`` with ``a . p <= b`` inside a convex quadrilateral.

    ``corners`` are those of :func:`_corners_yx` mapped by a rigid transform
    (order: (y0, x0), (y0, x1), (y1, x0), (y1, x1)).
    """
    ring = corners[[0, 1, 3, 2]]
    inside = ring.mean(axis=0)
    rows = []
    for p, q in zip(ring, np.roll(ring, -1, axis=0)):
        normal = np.array([q[1] - p[1], p[0] - q[0]])
        if normal @ (inside - p) > 0:
            normal = -normal
        rows.append((*normal, normal @ p))
    return np.array(rows)


def largest_window(boxes: Sequence[Box], transforms: Sequence[RigidTransform]) -> Box:
    """The largest axis-aligned integer box inside every mapped box.

    Args:
        boxes: Per acquisition, its ROI's box in its own pixels.
        transforms: Per acquisition, its transform onto the reference, in the
            same pixels.

    Returns:
        The window in the reference's pixels; empty when the mapped boxes
        leave no pixel in common. For translations it is the intersection of
        the boxes shifted by whole pixels; z (and any axis but y and x)
        always is.
    """
    axes = boxes[0].axes
    transforms = [t.snapped() for t in transforms]
    common = boxes[0].shifted(transforms[0].whole_pixel_shift(axes))
    for box, t in zip(boxes[1:], transforms[1:]):
        common = common.intersect(box.shifted(t.whole_pixel_shift(axes)))
    if all(t.is_translation for t in transforms) or common.is_empty:
        return common
    corners = [t.apply_yx(_corners_yx(b)) for b, t in zip(boxes, transforms)]
    planes = np.concatenate([_half_planes(c) for c in corners])
    ys = np.concatenate(corners)[:, 0]
    y0, y1, x0, x1 = _largest_rectangle(
        planes, math.floor(ys.min()), math.ceil(ys.max())
    )
    i, j = axes.index("y"), axes.index("x")
    start, stop = list(common.start), list(common.stop)
    start[i], stop[i], start[j], stop[j] = y0, max(y0, y1), x0, max(x0, x1)
    return Box(axes, tuple(start), tuple(stop))


_EDGE_TOL = 1e-9  # px: a point this close outside an edge is on it
_ROWS = 1024  # rows tried pairwise at once; taller regions: coarse, then fine


def _row_bounds(planes: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per row edge ``y``: the whole-pixel x range inside every plane.

    Returns ``(left, right)``; a row that a plane without x term excludes gets
    an empty range.
    """
    a_y, a_x, b = planes[:, 0:1], planes[:, 1:2], planes[:, 2:3]
    room = b - a_y * ys + _EDGE_TOL  # a_x * x <= room, per plane and row
    flat = np.abs(a_x) < 1e-12
    with np.errstate(divide="ignore", invalid="ignore"):
        bound = np.where(flat, 0.0, room / np.where(flat, 1.0, a_x))
    left = np.where((a_x < 0) & ~flat, bound, -np.inf).max(axis=0)
    right = np.where((a_x > 0) & ~flat, bound, np.inf).min(axis=0)
    open_row = ~np.any(flat & (room < 0), axis=0)
    left = np.where(open_row, np.ceil(left - _EDGE_TOL), np.inf)
    right = np.where(open_row, np.floor(right + _EDGE_TOL), -np.inf)
    return left, right


def _best_pair(
    planes: np.ndarray, tops: np.ndarray, bottoms: np.ndarray
) -> tuple[float, int, int, float, float]:
    """The row edges framing the largest rectangle: ``(area, y0, y1, x0, x1)``.

    ``y0`` is one of ``tops``, ``y1`` one of ``bottoms`` below it. The region
    is convex, so a rectangle is inside when its corners are: the x range
    open at rows ``y0`` and ``y1`` holds for every row between them (the left
    bound is a maximum of linear functions of y, the right one a minimum).
    """
    left_t, right_t = _row_bounds(planes, tops.astype(float))
    left_b, right_b = _row_bounds(planes, bottoms.astype(float))
    x0 = np.maximum(left_t[:, None], left_b[None, :])
    x1 = np.minimum(right_t[:, None], right_b[None, :])
    height = np.broadcast_to(bottoms[None, :] - tops[:, None], x0.shape)
    inside = (height > 0) & (x1 > x0)
    area = np.zeros(inside.shape)
    area[inside] = height[inside] * (x1 - x0)[inside]
    t, u = np.unravel_index(int(np.argmax(area)), area.shape)
    return float(area[t, u]), int(tops[t]), int(bottoms[u]), x0[t, u], x1[t, u]


def _largest_rectangle(
    planes: np.ndarray, low: int, high: int
) -> tuple[int, int, int, int]:
    """``(y0, y1, x0, x1)`` of the largest integer rectangle inside all planes.

    It lies between rows ``low`` and ``high`` (empty: ``y1 <= y0``). Up to
    ``_ROWS`` rows every pair is tried; above, pairs on a coarse grid of rows,
    then every pair within one grid step of the best.
    """
    step = max(1, math.ceil((high - low + 1) / _ROWS))
    rows = np.arange(low, high + 1, step)
    area, y0, y1, x0, x1 = _best_pair(planes, rows, rows)
    if step > 1 and area > 0:
        near = np.arange(-step, step + 1)
        area, y0, y1, x0, x1 = _best_pair(
            planes,
            np.unique(np.clip(y0 + near, low, high)),
            np.unique(np.clip(y1 + near, low, high)),
        )
    if area <= 0:
        return low, low, 0, 0
    return y0, y1, int(x0), int(x1)


def consensus_windows(
    boxes: Mapping[str, Box], transforms: Mapping[str, RigidTransform]
) -> dict[str, Box]:
    """Per acquisition, the window of one ROI that every acquisition shows.

    Args:
        boxes: ``acquisition -> box`` of the ROI in that acquisition's own
            pixels.
        transforms: ``acquisition -> transform`` onto the reference, in the
            same pixels (identity for the reference).

    Returns:
        ``acquisition -> window`` in its own pixels, all of the same shape.
        The reference's window is the largest box inside every acquisition's
        mapped ROI; acquisition ``a``'s is that window moved by the whole
        pixels that bring its centre back into ``a`` (for a translation,
        window ``a`` shifted by the rounded translation is the reference's).
        The result is empty when the mapped boxes do not overlap; the caller
        must check.
    """
    names = list(boxes)
    window = largest_window([boxes[n] for n in names], [transforms[n] for n in names])
    out = {}
    for name in names:
        move = transforms[name].whole_pixel_shift(window.axes)
        if not transforms[name].is_translation:
            centre = np.array(_corners_yx(window).mean(axis=0))
            back = transforms[name].inverse_yx(centre) - centre
            move.update(y=-int(round(back[0])), x=-int(round(back[1])))
        out[name] = window.shifted({axis: -value for axis, value in move.items()})
    return out


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
