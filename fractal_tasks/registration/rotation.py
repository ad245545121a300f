"""The in-plane rotation between a reference and an acquisition, per ROI.

Given the translation of :func:`~fractal_tasks.registration.shift.estimate_shift`,
the acquisition is moved onto the reference by the current rigid estimate, and
blocks on a grid across the ROI are matched by phase correlation. What is left
of a rotation shows as block displacements that grow with the distance from the
centre, perpendicular to it; a least-squares fit of a small rotation plus a
translation to them corrects the estimate, until the correction vanishes. The
blocks also give the angle's uncertainty, from the scatter of their fit. A
last look turns the moving image further by a known angle: content that fixes
the rotation sees that turn; blocks on a rim or a ring about the centre, whose
matches stay with their windows, do not (nor, by much, very smooth content),
and their angle is left unmeasured.

A 3D ROI is measured on its z-mean projection (the rotation is about z).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import scipy.fft
import scipy.ndimage

from fractal_tasks.geometry import RigidTransform, chord
from fractal_tasks.registration.shift import (
    _WHITENING,
    Rule,
    _gauss_lowpass,
    _prepare,
    _ramp,
    _tukey,
    _window,
)

# Chosen on the skimage sample images of tests/test_rotation.py and on the
# synthetic plates; neither set of the corpus set any of them.
_BLOCK_SIZES = (64, 32)  # px: the largest that fits 4 times along both axes
_BLOCK_SIGNIFICANCE = 8.0  # robust SD: a block's peak must stand out this much
_BLOCK_SEARCH = 0.25  # a block's residual is looked for within this share of it
_BIN_TO = 320  # px: a ROI's shorter side is binned down to at most this
# a first look that sees no rotation, and whose uncertainty moves the ROI's
# corners by at most this (px of the pixels measured), ends the search
_SPARSE_ENOUGH_PX = 0.05
_MIN_BLOCKS = 4  # fewer good blocks leave the angle unmeasured
_OUTLIER_PX = 0.5  # a block this far from the fit (and 3 SD) is left out
_ITERATIONS = 5
_CONVERGED_DEG = 1e-3  # degrees: a smaller correction ends the iterations
_WINDOW_STEPS = 3  # sub-pixel estimates, each with the window moved along
_PHASE_BAND = 0.125  # cycles/px: the phase fit's frequencies
# a known turn (px at the corners, of the pixels measured) that the blocks
# must see at least this share of; the first values tried, not tuned
_TURN_AWAY_PX = 2.0
_MIN_TURN_SEEN = 0.5

MAX_ROTATION_DEG = 5.0
"""Largest rotation (degrees) measured reliably: blocks of a ROI turned
further are distorted across their own width; beyond it a ROI is not ``ok``."""

ROTATION_RESIDUAL = Rule(
    "residual_px",
    1.0,
    False,
    "the ROI is rotated (`rotation_deg`) and the model chosen leaves points "
    "this far (level-0 px) from where they belong at its corners: register it "
    'with `transform="rigid"`',
    "1 px, the accuracy users expect of a registration; the rule only "
    "applies when the angle is at least 3 times its uncertainty (the well's "
    "one angle where the ROIs' reliable angles agree, else the ROI's own)",
)


@dataclass(frozen=True)
class RotationEstimate:
    """The rotation of one ROI and the translation that goes with it.

    Attributes:
        angle_deg: Rotation in degrees (sign as in
            :class:`~fractal_tasks.geometry.RigidTransform`), NaN when fewer
            than ``_MIN_BLOCKS`` blocks had structure to match.
        uncertainty_deg: One standard deviation of the angle, from the
            scatter of the blocks about the fit (NaN with the angle).
        shift: The displacement of the ROI's centre with that rotation, in
            pixels of the inputs, per axis of the input (z from the input
            shift, unchanged); as precise as the binning of a large ROI
            allows.
        blocks: Blocks the angle rests on.
    """

    angle_deg: float
    uncertainty_deg: float
    shift: tuple[float, ...]
    blocks: int

    @property
    def measured(self) -> bool:
        """True when the angle could be measured."""
        return math.isfinite(self.angle_deg)

    @property
    def significant(self) -> bool:
        """True when the angle is at least 3 times its uncertainty."""
        return self.measured and abs(self.angle_deg) >= 3 * self.uncertainty_deg


def warp(
    moving: np.ndarray,
    angle_deg: float,
    shift: Sequence[float] | np.ndarray,
    *,
    order: int = 1,
) -> np.ndarray:
    """``moving`` (2D) brought onto the reference by a rotation and a shift.

    The rotation is about the array's centre: output pixel ``q`` shows the
    moving image at ``c + R^-1 (q - c - shift)``. Outside: 0.
    """
    centre = (np.asarray(moving.shape, float) - 1) / 2
    inverse = RigidTransform(angle_deg).matrix().T
    offset = centre - inverse @ (centre + np.asarray(shift, float))
    return scipy.ndimage.affine_transform(
        moving, inverse, offset=offset, order=order, mode="constant", cval=0.0
    )


def derotate(moving: np.ndarray, angle_deg: float) -> np.ndarray:
    """``moving`` (2D, or 3D per z plane) with its rotation undone, not its shift.

    What is left between the result and the reference is the translation of
    the centre (cubic interpolation).
    """
    if moving.ndim == 2:
        return warp(moving.astype(np.float32), angle_deg, np.zeros(2), order=3)
    return np.stack([derotate(plane, angle_deg) for plane in moving])


def _reads_inside(
    shape: tuple[int, ...], angle_deg: float, shift: np.ndarray
) -> Callable[[int, int, int], bool]:
    """Whether a block of :func:`warp`'s output reads only inside the input."""
    centre = (np.asarray(shape, float) - 1) / 2
    inverse = RigidTransform(angle_deg).matrix().T
    last = np.subtract(shape, 2)

    def inside(y: int, x: int, n: int) -> bool:
        corners = np.array([(y, x), (y, x + n), (y + n, x), (y + n, x + n)], float)
        back = (corners - centre - shift) @ inverse.T + centre
        return bool(np.all(back >= 1) and np.all(back <= last))

    return inside


def _blocks(
    shape: tuple[int, ...],
    size: int,
    inside: Callable[[int, int, int], bool],
    overlap: int,
) -> list[tuple[int, int]]:
    """Top-left corners of blocks on a grid, ``overlap`` per block width."""
    step = size // overlap
    corners = []
    for y in range(0, shape[0] - size + 1, step):
        for x in range(0, shape[1] - size + 1, step):
            if inside(y, x, size):
                corners.append((y, x))
    return corners


def _cross_spectra(
    ref: np.ndarray,
    mov: np.ndarray,
    corners: np.ndarray,
    moved: np.ndarray,
    size: int,
    rest: np.ndarray | None = None,
) -> np.ndarray:
    """Whitened, low-passed cross-power spectra of blocks, in one batch.

    Block ``i`` of the reference is cut at ``corners[i]``, that of the moving
    image at ``corners[i] - moved[i]`` (whole pixels) with its window moved
    by ``rest[i]`` (sub-pixel): a window that follows the content does not
    pull the peak towards zero, as a fixed one does.
    """
    shape = (size, size)
    a = np.stack([ref[y : y + size, x : x + size] for y, x in corners])
    b = np.stack([mov[y : y + size, x : x + size] for y, x in corners - moved])
    a = (a - a.mean(axis=(1, 2), keepdims=True)) * _window(shape)
    if rest is None:
        b = (b - b.mean(axis=(1, 2), keepdims=True)) * _window(shape)
    else:
        ramp = _ramp(size)
        w_y = _tukey(size, ramp, rest[:, :1]).astype(np.float32)
        w_x = _tukey(size, ramp, rest[:, 1:]).astype(np.float32)
        b = (b - b.mean(axis=(1, 2), keepdims=True)) * w_y[:, :, None] * w_x[:, None]
    spec = scipy.fft.rfft2(a) * np.conjugate(scipy.fft.rfft2(b))
    weight = np.abs(spec) + 1e-6 * np.abs(spec).max(axis=(1, 2), keepdims=True)
    weight += np.finfo(weight.dtype).tiny  # an empty block has no power at all
    spec *= weight ** (-_WHITENING) * _gauss_lowpass(shape)
    return spec


def _integer_peaks(spec: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per block, the signed whole-pixel peak near zero, and if it stands out."""
    corr = scipy.fft.irfft2(spec, s=(size, size))
    reach = int(_BLOCK_SEARCH * size)
    near = np.r_[0 : reach + 1, size - reach : size]
    sub = corr[:, near][:, :, near].reshape(len(corr), -1)
    at = np.unravel_index(np.argmax(sub, axis=1), (near.size, near.size))
    peak = np.stack([near[at[0]], near[at[1]]], axis=1)
    height = corr[np.arange(len(corr)), peak[:, 0], peak[:, 1]]
    sample = corr[:, ::2, ::2].reshape(len(corr), -1)
    median = np.median(sample, axis=1)
    spread = 1.4826 * np.median(np.abs(sample - median[:, None]), axis=1)
    significant = (spread > 0) & (height - median >= _BLOCK_SIGNIFICANCE * spread)
    return np.where(peak > size // 2, peak - size, peak), significant


def _block_shifts(
    ref: np.ndarray,
    mov: np.ndarray,
    corners: list[tuple[int, int]],
    size: int,
    *,
    steps: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Per block, the residual shift (y, x) and whether it is trustworthy.

    The whole-pixel peak first (searched within a quarter block of zero: the
    blocks are nearly aligned already); then, with the moving block cut where
    that peak puts it, the sub-pixel rest from the spectrum's phase, its
    window moved along with each new estimate (``steps`` estimates; with 1,
    one spectrum serves for both).
    """
    at = np.asarray(corners, dtype=int)
    spec = _cross_spectra(ref, mov, at, np.zeros_like(at), size)
    whole, significant = _integer_peaks(spec, size)
    inside = np.all((at - whole >= 0) & (at - whole + size <= mov.shape), axis=1)
    moved = np.where(inside[:, None], whole, 0)
    rest = np.zeros(at.shape)
    for step in range(steps):
        if step or np.any(moved):
            spec = _cross_spectra(ref, mov, at, moved, size, rest)
        rest = np.clip(_phase_slope(spec, np.zeros_like(rest), size), -1.0, 1.0)
    shifts = moved + rest
    reach = int(_BLOCK_SEARCH * size)
    return shifts, significant & inside & np.all(np.abs(shifts) < reach, axis=1)


def _phase_slope(spec: np.ndarray, whole: np.ndarray, size: int) -> np.ndarray:
    """Sub-pixel rest of each block's shift, from the phase of its spectrum.

    With the whole-pixel shift taken out, the cross-power phase at low
    frequencies is ``-2 pi k . rest / size``; a weighted least-squares plane
    through it is unbiased near zero shift, where the iterations end.
    """
    ky = scipy.fft.fftfreq(size, 1.0 / size)[:, None]
    kx = scipy.fft.rfftfreq(size, 1.0 / size)[None, :]
    low = (np.abs(ky) <= size * _PHASE_BAND) & (kx <= size * _PHASE_BAND)
    ky, kx = np.broadcast_to(ky, low.shape)[low], np.broadcast_to(kx, low.shape)[low]
    turn = np.exp(2j * np.pi * (whole[:, :1] * ky + whole[:, 1:] * kx) / size)
    rest = spec[:, low] * turn
    phase, weight = np.angle(rest), np.abs(rest)
    gram = np.stack(
        [
            np.stack([(weight * ky * ky).sum(1), (weight * ky * kx).sum(1)], -1),
            np.stack([(weight * ky * kx).sum(1), (weight * kx * kx).sum(1)], -1),
        ],
        -2,
    )
    moment = np.stack([(weight * ky * phase).sum(1), (weight * kx * phase).sum(1)], -1)
    solved = np.linalg.solve(gram + 1e-12 * np.eye(2), moment[..., None])[..., 0]
    return -solved * size / (2 * np.pi)


def _fit(
    centres: np.ndarray, shifts: np.ndarray, shared: float = 1.0
) -> tuple[np.ndarray, float, np.ndarray]:
    """Least-squares small rotation (rad) and translation of block shifts.

    A rotation by ``a`` about the origin moves ``(y, x)`` by about
    ``a * (x, -y)``. Returns ``(dy, dx, a)``, the standard deviation of
    ``a`` and the residual length per block.
    """
    n = len(centres)
    design = np.zeros((2 * n, 3))
    design[0::2, 0] = 1.0
    design[1::2, 1] = 1.0
    design[0::2, 2] = centres[:, 1]
    design[1::2, 2] = -centres[:, 0]
    target = shifts.reshape(-1)
    params, *_ = np.linalg.lstsq(design, target, rcond=None)
    residual = (target - design @ params).reshape(n, 2)
    dof = max(1, 2 * n - 3)
    # overlapping blocks share pixels: ``shared`` blocks per independent one
    variance = shared * float(np.sum(residual**2)) / dof
    covariance = variance * np.linalg.pinv(design.T @ design)
    return params, math.sqrt(max(covariance[2, 2], 0.0)), np.hypot(*residual.T)


def estimate_rotation(
    reference: np.ndarray,
    moving: np.ndarray,
    shift: tuple[float, ...],
    *,
    lower_rescale_quantile: float = 0.0,
    upper_rescale_quantile: float = 0.99,
) -> RotationEstimate:
    """The rotation about the ROI's centre that, with a shift, aligns the pair.

    Args:
        reference: 2D ``(y, x)`` or 3D ``(z, y, x)`` pixels of the ROI.
        moving: The acquisition's pixels, same shape.
        shift: The translation estimate (``reference[p] ~ moving[p - shift]``),
            in pixels, per axis.
        lower_rescale_quantile: As for ``estimate_shift``.
        upper_rescale_quantile: As for ``estimate_shift``.

    Returns:
        The angle, its uncertainty and the centre's shift with it; the angle
        is NaN for a ROI too small for 4x4 blocks of 32 px, without
        enough structure, or whose content does not fix a rotation (its
        blocks do not see a known turn: a rim or a ring about the centre).
    """
    shift = tuple(float(s) for s in shift)
    ref, mov = np.asarray(reference), np.asarray(moving)
    if ref.ndim == 3:
        dz = int(round(shift[0]))
        keep = slice(max(0, dz), ref.shape[0] + min(0, dz))
        from_mov = slice(max(0, -dz), mov.shape[0] + min(0, -dz))
        ref = ref[keep].mean(axis=0) if ref[keep].size else ref.mean(axis=0)
        mov = mov[from_mov].mean(axis=0) if mov[from_mov].size else mov.mean(axis=0)
    quantiles = (lower_rescale_quantile, upper_rescale_quantile)
    unmeasured = RotationEstimate(math.nan, math.nan, shift, 0)
    # a large ROI is binned: the angle does not depend on the scale, and the
    # blocks must reach as far as the rotation moves them
    factor = max(1, math.ceil(min(ref.shape) / _BIN_TO))
    ref, mov = _binned(ref, factor), _binned(mov, factor)
    size = next((s for s in _BLOCK_SIZES if min(ref.shape) >= 4 * s), None)
    if size is None:
        return unmeasured
    ref = _prepare(ref, *quantiles).astype(np.float32)
    mov = _prepare(mov, *quantiles).astype(np.float32)
    start = (*shift[:-2], *(v / factor for v in shift[-2:]))
    # a first look on blocks side by side; where it sees a rotation, or is
    # unsure, the full search on half-overlapping blocks
    overlap = 1
    found = _iterate(ref, mov, start, size, overlap=overlap, iterations=1)
    radius = math.hypot(*(n / 2 for n in ref.shape))
    if (
        found is None
        or found.significant
        or chord(radius, found.uncertainty_deg) > _SPARSE_ENOUGH_PX
    ):
        overlap = 2
        found = _iterate(ref, mov, start, size, overlap=overlap, iterations=_ITERATIONS)
    if found is None:
        return unmeasured
    if not _sees_a_turn(ref, mov, found, size, overlap, radius):
        return unmeasured
    moved = (*shift[:-2], *(v * factor for v in found.shift[-2:]))
    return replace(found, shift=moved)


def _sees_a_turn(
    ref: np.ndarray,
    mov: np.ndarray,
    found: RotationEstimate,
    size: int,
    overlap: int,
    radius: float,
) -> bool:
    """Whether the blocks see a known turn away from ``found``'s angle.

    The moving image is turned further by as much as moves the ROI's
    corners ``_TURN_AWAY_PX``, and the blocks are matched once more: where
    their content fixes the rotation, they see that turn. Blocks on an edge
    that runs around the centre (a rim, a ring) fix the shift only across
    it, so their matches stay with their windows: they see little of any
    turn, and their angle (and its scatter) says nothing about the sample.
    Smooth content whose fine frequencies are mostly noise (blobs of 20 px
    at the level read) sees a fraction of a turn per look, so that the
    iterations stop short of its angle; it is caught the same way.
    False when they see less than ``_MIN_TURN_SEEN`` of it, or are too few.
    """
    turn = math.copysign(math.degrees(_TURN_AWAY_PX / radius), found.angle_deg)
    away = found.angle_deg + turn
    yx = np.array(found.shift[-2:])
    seen = _from_blocks(ref, warp(mov, away, yx), size, away, yx, 2, overlap)
    return seen is not None and (away - seen[0]) / turn >= _MIN_TURN_SEEN


def _binned(image: np.ndarray, factor: int) -> np.ndarray:
    """Means of ``factor`` x ``factor`` pixels (the few left over dropped)."""
    if factor == 1:
        return image
    h, w = (n // factor for n in image.shape)
    top, left = ((n - m * factor) // 2 for n, m in zip(image.shape, (h, w)))
    cut = image[top : top + h * factor, left : left + w * factor].astype(np.float32)
    return cut.reshape(h, factor, w, factor).mean(axis=(1, 3))


def _iterate(
    ref: np.ndarray,
    mov: np.ndarray,
    shift: tuple[float, ...],
    size: int,
    *,
    overlap: int,
    iterations: int,
) -> RotationEstimate | None:
    """Warp, match the blocks, correct the motion; until the correction vanishes."""
    angle, yx = 0.0, np.array(shift[-2:], float)
    for iteration in range(iterations):
        # after the first, the blocks are aligned to a fraction of a pixel:
        # the window's pull is small, two estimates per block are enough
        steps = _WINDOW_STEPS if iteration == 0 else 2
        warped = warp(mov, angle, yx)
        found = _from_blocks(ref, warped, size, angle, yx, steps, overlap)
        if found is None:
            return None
        step = found[0] - angle
        angle, yx, sigma, blocks = found
        if abs(step) < _CONVERGED_DEG or abs(angle) < 3 * sigma:
            break  # converged, or no rotation to refine
    return RotationEstimate(angle, sigma, (*shift[:-2], *map(float, yx)), blocks)


def _from_blocks(
    ref: np.ndarray,
    warped: np.ndarray,
    size: int,
    angle: float,
    yx: np.ndarray,
    steps: int,
    overlap: int,
) -> tuple[float, np.ndarray, float, int] | None:
    """The rigid motion the blocks of a warped pair show, composed onto the warp's.

    Returns ``(angle_deg, shift, uncertainty_deg, blocks)``, None with fewer
    than ``_MIN_BLOCKS`` good blocks.
    """
    corners = _blocks(ref.shape, size, _reads_inside(ref.shape, angle, yx), overlap)
    if len(corners) < _MIN_BLOCKS:
        return None
    shifts, good = _block_shifts(ref, warped, corners, size, steps=steps)
    centre = (np.asarray(ref.shape, float) - 1) / 2
    centres = np.asarray(corners, float)[good] + (size - 1) / 2 - centre
    shifts = shifts[good]
    if len(centres) < _MIN_BLOCKS:
        return None
    shared = float(overlap**2)
    params, sigma, residual = _fit(centres, shifts, shared)
    spread = 1.4826 * float(np.median(residual))
    kept = residual <= max(_OUTLIER_PX, 3 * spread)
    if kept.sum() < _MIN_BLOCKS:
        return None
    if not kept.all():
        params, sigma, residual = _fit(centres[kept], shifts[kept], shared)
    step = math.degrees(float(params[2]))
    # the blocks show a further rigid move D after the warp: the angles add
    # up, the centre's shift goes through D
    moved = RigidTransform(step).matrix() @ yx + params[:2]
    return angle + step, moved, math.degrees(sigma), int(kept.sum())
