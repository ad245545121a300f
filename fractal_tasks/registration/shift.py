"""Translation (shift) between two images, and the evidence that it is right.

Nothing here knows about Fractal, OME-Zarr or ngio: numpy arrays in, frozen
dataclasses out.

Conventions:

* Arrays are 2D ``(y, x)`` or 3D ``(z, y, x)``; a shift has one entry per
  axis, in pixels of the arrays passed in (an estimate made on a pyramid level
  4x downsampled in y and x is multiplied by ``(1, 4, 4)`` for level-0 pixels).
* Sign: ``shift`` moves ``moving`` onto ``reference``:
  ``reference[p] ~= moving[p - shift]``. If ``moving = np.roll(reference, d)``
  then ``shift == -d``; the sign of
  ``skimage.registration.phase_cross_correlation(reference, moving)[0]``.

How :func:`estimate_shift` works:

1. Preparation. Each image is rescaled between intensity quantiles (values
   above the upper one compressed logarithmically, so bright debris does not
   dominate yet bright nuclei keep their profile), and its smooth background
   (a wide box-filter mean) is subtracted. What is left is the structure that
   can be registered; a smooth gradient or vignetting, which has no unique
   alignment, is gone.
2. Phase correlation: Tukey-windowed real FFTs, the cross-power spectrum
   whitened and weighted by a Gaussian low-pass (downsampled pyramid levels
   alias their highest frequencies; the low-pass also makes the peak Gaussian,
   so a fit on few points is exact). A large shift is checked against its
   periodic alias by the correlation of the overlapping parts.
3. Sub-pixel peak: a second correlation of the overlapping parts aligned to
   the nearest pixel, the moving part windowed by the window moved by the
   sub-pixel rest of the estimate, repeated until the estimate stops moving.
   A window fixed to the frame pulls the peak towards zero shift (by up to
   half a pixel when the content lies on its ramps: a lone cell in a corner,
   the rim of a field); one that moves with the content does not. The
   correlation is re-evaluated by matrix-multiply DFT on small grids around
   the peak, each time moving to the vertex of a quadratic fitted to the log.

The evidence, from the registration itself:

* ``peak_significance``: the height of the correlation peak in robust standard
  deviations of the rest of the surface, on its fine band (periods below about
  8 px). Unrelated or featureless images give a surface of noise whose
  largest value is about 3-6; a real match 15-100; smooth shading alone
  (illumination, a defocused cycle) too little.
* ``uncertainty_px``: how far the match slides, in level-0 px, along the
  direction the content fixes least (where the correlation peak is widest)
  when the moving image's frame moves that way by a few pixels. An edge, the
  rim of a dish, a gradient fix the shift across them, not along them: there
  the match goes with the frame. (``peak_elongation``, the ratio of the
  peak's widths, is recorded too; an elongated peak at a coarse level makes
  the calculate task confirm the estimate at finer ones.)
* ``ncc_before`` / ``ncc_after``: normalized cross-correlation of the prepared
  (background-free) images without and with the shift: does the shift make
  the images agree?

One fact about the data, not the registration, is recorded too:
``saturated``, the share of the overlap where either image is at its
maximum value. Clipped pixels carry no structure; when they are most of the
overlap the shift rests on the few that are left, and their shapes are
changed by the clipping, so a peak can stand out and still be wrong.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import scipy.fft
from scipy import ndimage

__all__ = [
    "RegistrationMethod",
    "RegistrationStatus",
    "ShiftEstimate",
    "Verdict",
    "estimate_shift",
    "judge_estimates",
    "ncc",
]


class RegistrationMethod(StrEnum):
    """Algorithm used to estimate the shift between two images.

    Attributes:
        PHASE_CROSS_CORRELATION: Windowed phase correlation with a Gaussian
            spectral low-pass, a second pass on the aligned overlap and a
            sub-pixel peak. 2D and 3D. Recommended.
        CHI2_SHIFT: ``image_registration.chi2_shift`` (DFT upsampling with a
            chi-square error model) on the same prepared images, also in two
            passes. 2D only, much slower, quantised to 0.1 px.
    """

    PHASE_CROSS_CORRELATION = "phase_cross_correlation"
    CHI2_SHIFT = "chi2_shift"


class RegistrationStatus(StrEnum):
    """Outcome of the registration of one ROI, as recorded by the tasks.

    Attributes:
        OK: The estimated shift passed all checks and is used as is.
        FALLBACK: The estimate was rejected (see :func:`judge_estimates`) and
            replaced by the median shift of the good ROIs of the same
            acquisition.
        FAILED: The estimate was rejected and no fallback was available.
        ROTATED: The translation is kept, but the ROI is rotated and the
            translation model leaves its corners more than
            ``ROTATION_RESIDUAL`` away (register with ``transform="rigid"``).
    """

    OK = "ok"
    FALLBACK = "fallback"
    FAILED = "failed"
    ROTATED = "rotated"


@dataclass(frozen=True)
class ShiftEstimate:
    """Result of :func:`estimate_shift` for one pair of images.

    Attributes:
        shift: One value per axis, in pixels of the inputs, with
            ``reference[p] ~= moving[p - shift]``. Axes of length 1 get 0.0.
        ncc_before: Normalized cross-correlation (-1..1) of the prepared
            images (quantile-rescaled, smooth background removed) without
            shift. NaN if either is constant.
        ncc_after: The same over the overlapping parts after the shift,
            rounded to whole pixels. NaN if either part is constant or the
            overlap is empty.
        peak_significance: Height of the correlation peak in robust standard
            deviations (1.4826 MAD) of the correlation surface: low for
            images that have nothing in common (see ``PEAK_SIGNIFICANCE``),
            15 and more for a clear match.
            0 for a constant image. Measured on the fine band of the surface
            (periods below about 8 px), so that a match resting on smooth
            shading alone (illumination, a defocused cycle) does not count.
        peak_elongation: Ratio of the peak's widths along its principal
            directions in y/x: about 1 for a round peak, large for a ridge
            (an edge fixes the shift across it, not along it).
        saturated: Share (0..1) of the pixels of the overlap (at the shift
            rounded to whole pixels) where the reference or the moving image
            is at its own maximum value: clipped, no structure. 0 for bool
            images (a mask's maximum is not a clipping).
        uncertainty_px: How far (level-0 px) the match slides along the
            direction the content fixes least, when the moving image's frame
            is moved along it by a few pixels (see ``UNCERTAINTY``): about 0
            when the content fixes the shift in every direction; up to the
            frame's move when an edge, a rim or a gradient runs that way and
            fixes the shift only across it.
        uncertainty_direction_deg: That direction, in degrees from the x axis
            towards y (0..180; 0 = along x, 90 = along y).
    """

    shift: tuple[float, ...]
    ncc_before: float
    ncc_after: float
    peak_significance: float
    peak_elongation: float
    saturated: float = 0.0
    uncertainty_px: float = 0.0
    uncertainty_direction_deg: float = 0.0


@dataclass(frozen=True)
class Verdict:
    """Quality judgement of one shift estimate, see :func:`judge_estimates`.

    Attributes:
        good: True if the estimate passed every check.
        reason: Empty if ``good``; otherwise why not, e.g.
            ``"no significant correlation peak (4.1 < 10.0 robust SD)"``.
    """

    good: bool
    reason: str = ""


# --------------------------------------------------------------------------
# tuning, fixed: each value was chosen on the real-image corpus of
# benchmarks/registration_corpus.py
# --------------------------------------------------------------------------
_SOFT_CLIP_SCALE = 2.0  # log compression scale above the upper quantile
_BACKGROUND_FRACTION = 0.25  # box size of the background, fraction of an axis
_WINDOW_ALPHA = 0.2  # Tukey taper, fraction of each axis
_MIN_RAMP_PX = 6.0  # short axes get cosine ramps of at least this length
_SHORT_AXIS = 8  # shorter axes (thin z stacks) get no taper and no low-pass
_WHITENING = 0.7  # exponent of |cross power| divided out (1 = phase only)
_FINE_BAND = 0.1  # cycles/px: the high-pass of the significance surface
_LOWPASS = 0.35  # Gaussian spectral weight, sigma as a fraction of Nyquist
_WRAP_CHECK = 0.25  # test the periodic alias of shifts beyond this fraction
_UPSAMPLE = 10  # last sub-pixel grid step is 1 / _UPSAMPLE px
_REFINE_STEPS = 4  # at most this many refinements with a window moved along
_REFINE_TOL = 0.01  # px: stop refining when the estimate moves less
_MAX_SAMPLES = 1 << 16  # quantiles and medians on at most ~65k values
_SLAB_BYTES = 1 << 16  # temporaries of at most this size (see _slabs)
# the frame's move of the slide check: 1/16 of the ROI, at most 4 px (a larger
# move pushed the corner of a rim out of the crops at level 0: false alarms
# on the calibration set's retina corner, and on the held-out rims alike)
_SLIDE_DIVISOR = 16
_SLIDE_MAX_PX = 4


# --------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------
def _subsample(x: np.ndarray) -> np.ndarray:
    """A flat, regularly strided subset of at most ~65k values of ``x``."""
    flat = x.reshape(-1)
    step = max(1, flat.size // _MAX_SAMPLES)
    # an odd stride avoids aliasing with even image widths
    return flat if step == 1 else flat[:: step | 1]


def ncc(a: np.ndarray, b: np.ndarray) -> float:
    """Normalized cross-correlation (Pearson coefficient) of two arrays.

    Args:
        a: Array of any shape and real dtype.
        b: Array of the same number of elements as ``a``.

    Returns:
        The coefficient in [-1, 1]; NaN if either array is constant or empty.

    Raises:
        ValueError: If the arrays do not have the same number of elements.
    """
    a = np.asarray(a)
    b = np.asarray(b)
    if a.size != b.size:
        raise ValueError(f"ncc needs arrays of equal size, got {a.shape} and {b.shape}")
    if a.size == 0:
        return float("nan")
    if a.shape != b.shape:
        a, b = a.reshape(-1), b.reshape(-1)
    # float32 inputs stay float32 (ample for a coefficient, half the memory)
    both32 = a.dtype == np.float32 and b.dtype == np.float32
    dt = np.dtype(np.float32 if both32 else np.float64)
    mean_a = a.mean(dtype=np.float64).astype(dt)
    mean_b = b.mean(dtype=np.float64).astype(dt)
    saa = sbb = sab = 0.0
    for block in _slabs(a.shape, dt.itemsize):
        av = np.subtract(a[block], mean_a, dtype=dt).reshape(-1)
        bv = np.subtract(b[block], mean_b, dtype=dt).reshape(-1)
        # einsum rather than np.dot: BLAS threads would spin on a busy machine
        saa += float(np.einsum("i,i->", av, av))
        sbb += float(np.einsum("i,i->", bv, bv))
        sab += float(np.einsum("i,i->", av, bv))
    if not (saa > 0.0 and sbb > 0.0):
        return float("nan")
    return max(-1.0, min(1.0, sab / math.sqrt(saa * sbb)))


def _slabs(shape: tuple[int, ...], itemsize: int) -> list[tuple[slice, ...]]:
    """Blocks of an array of ``shape`` that tile it, each of at most 64 KiB.

    A full-size temporary (1.4 MB for 540x640 float32) is mapped fresh from
    the operating system and handed back when freed: a page fault for every
    4 KiB, which can cost more than the arithmetic on it. Temporaries of a
    block this small come from the allocator's heap instead. The blocks
    split the first axis whose trailing axes fit the limit, and iterate over
    the axes before it.
    """
    split = next(
        ax
        for ax in range(len(shape) + 1)
        if itemsize * math.prod(shape[ax + 1 :]) <= _SLAB_BYTES
    )
    if split == len(shape):
        return [tuple(slice(None) for _ in shape)]
    step = max(1, _SLAB_BYTES // (itemsize * math.prod(shape[split + 1 :])))
    outer = itertools.product(*(range(n) for n in shape[:split]))
    return [
        tuple(slice(i, i + 1) for i in index)
        + (slice(start, start + step),)
        + (slice(None),) * (len(shape) - split - 1)
        for index in outer
        for start in range(0, shape[split], step)
    ]


def _overlap(
    shape: tuple[int, ...], shift: Sequence[int]
) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """Slices of reference and moving that overlap for an integer shift.

    With ``reference[p] ~ moving[p - s]`` the valid ``p`` satisfy
    ``0 <= p < n`` and ``0 <= p - s < n``.
    """
    sr, sm = [], []
    for n, s in zip(shape, shift, strict=True):
        s = int(s)
        lo, hi = max(0, s), min(n, n + s)
        if hi <= lo:
            lo = hi = s = 0
        sr.append(slice(lo, hi))
        sm.append(slice(lo - s, hi - s))
    return tuple(sr), tuple(sm)


def _overlap_usable(overlap: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    """At least 8 px of overlap on each axis (the whole axis if shorter)."""
    return all(o >= min(8, n) for o, n in zip(overlap, shape, strict=True))


def _ncc_shifted(ref: np.ndarray, mov: np.ndarray, shift: Sequence[int]) -> float:
    sr, sm = _overlap(ref.shape, shift)
    return ncc(ref[sr], mov[sm])


# --------------------------------------------------------------------------
# preparation
# --------------------------------------------------------------------------
def _rescale(x: np.ndarray, lower_q: float, upper_q: float) -> np.ndarray:
    """Float32 copy of x with its [lower_q, upper_q] quantiles mapped to 0..1.

    Below the lower quantile values are clipped; above the upper one ``hi``
    they are compressed, ``hi + h * log(1 + (x - hi) / h)`` with
    ``h = 2 * (hi - lo)``. If the quantiles coincide the full range is used.
    """
    out = np.array(x, dtype=np.float32, copy=True)
    lo, hi = (float(q) for q in np.quantile(_subsample(out), [lower_q, upper_q]))
    if hi <= lo:  # e.g. more than 99% of the pixels share one value
        lo, hi = float(out.min()), float(out.max())
    if hi <= lo:  # constant image
        out[...] = 0.0
        return out
    np.maximum(out, np.float32(lo), out=out)
    above = out > hi
    if above.any():
        h = _SOFT_CLIP_SCALE * (hi - lo)
        out[above] = hi + h * np.log1p((out[above] - hi) / h)
    out -= np.float32(lo)
    out *= np.float32(1.0 / (hi - lo))
    return out


def _remove_background(x: np.ndarray) -> np.ndarray:
    """Subtract a smooth background: a box mean a quarter of each axis wide.

    The background is smooth, so it is computed on a copy binned to about
    32 px per axis (two box passes: a triangular kernel) and interpolated
    back linearly between the bin centres (constant beyond the outer ones).
    Axes shorter than 8 px are not filtered.
    """
    step = [max(1, n // 32) if n >= _SHORT_AXIS else 1 for n in x.shape]
    coarse = x[tuple(slice(0, n - n % k) for n, k in zip(x.shape, step, strict=True))]
    for ax, k in enumerate(step):  # one axis at a time: sums of contiguous runs
        if k > 1:
            shape = coarse.shape
            coarse = coarse.reshape(shape[:ax] + (shape[ax] // k, k) + shape[ax + 1 :])
            coarse = coarse.sum(axis=ax + 1, dtype=np.float32)
    coarse = coarse * np.float32(1.0 / math.prod(step))  # a copy, also if unbinned
    size = [
        max(3, int(m * _BACKGROUND_FRACTION)) | 1 if n >= _SHORT_AXIS else 1
        for m, n in zip(coarse.shape, x.shape, strict=True)
    ]
    ndimage.uniform_filter(coarse, size, output=coarse, mode="reflect")
    ndimage.uniform_filter(coarse, size, output=coarse, mode="reflect")
    # back to full size, the last axis first (while the array is small); the
    # first binned axis is interpolated block by block into the subtraction
    binned = [ax for ax in range(x.ndim) if step[ax] > 1]
    background = coarse
    for ax in reversed(binned[1:]):
        background = _interpolate_axis(background, ax, x.shape[ax], step[ax])
    if not binned:
        x -= background
        return x
    first = binned[0]
    for block in _slabs(x.shape, x.itemsize):
        rest = block[:first] + (slice(None),) + block[first + 1 :]
        x[block] -= _interpolate_axis(
            background[rest], first, x.shape[first], step[first], block[first]
        )
    return x


def _interpolate_axis(
    c: np.ndarray, axis: int, n: int, k: int, part: slice = slice(None)
) -> np.ndarray:
    """Linear interpolation along ``axis`` of bins of ``k`` px to ``n`` px.

    ``part``: only these of the ``n`` output positions.
    """
    m = c.shape[axis]
    u = np.clip((np.arange(n)[part] + 0.5) / k - 0.5, 0.0, m - 1.0)
    i0 = np.minimum(u.astype(np.intp), max(m - 2, 0))
    w = (u - i0).astype(np.float32)
    w = w.reshape([w.size if a == axis else 1 for a in range(c.ndim)])
    # the steps between neighbouring bins, taken on the small binned array
    step = np.take(c, np.minimum(np.arange(m) + 1, m - 1), axis=axis) - c
    out = np.take(c, i0, axis=axis)
    out += np.take(step, i0, axis=axis) * w
    return out


def _prepare(x: np.ndarray, lower_q: float, upper_q: float) -> np.ndarray:
    return _remove_background(_rescale(x, lower_q, upper_q))


def _check_pair(reference: np.ndarray, moving: np.ndarray) -> None:
    """Raise ValueError unless the pair is fit for :func:`estimate_shift`."""
    if reference.shape != moving.shape:
        raise ValueError(
            "reference and moving must have the same shape, got "
            f"{reference.shape} and {moving.shape}; crop both to their common "
            "part before estimating the shift"
        )
    if reference.ndim not in (2, 3):
        raise ValueError(f"expected 2D or 3D arrays, got {reference.ndim}D")
    if reference.size == 0:
        raise ValueError(f"empty arrays of shape {reference.shape}")
    for name, a in (("reference", reference), ("moving", moving)):
        if not (
            np.issubdtype(a.dtype, np.integer)
            or np.issubdtype(a.dtype, np.floating)
            or a.dtype == np.bool_
        ):
            raise ValueError(f"{name} has unsupported dtype {a.dtype}")
        if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
            raise ValueError(f"{name} contains NaN or infinite values")


# --------------------------------------------------------------------------
# phase correlation
# --------------------------------------------------------------------------
def _tukey(n: int, ramp: int, offset: float | np.ndarray = 0.0) -> np.ndarray:
    """Tukey window: flat, with the halves of a Hann window as its two ramps.

    Sampled at ``arange(n) + offset`` and zero outside ``[0, n - 1]``. With
    ``offset == 0`` these are the values of ``scipy.signal.windows.tukey``
    (importing ``scipy.signal`` costs the task process about a second); a
    fractional ``offset`` gives the same window moved by ``-offset`` px; a
    column of offsets, one such window per row.
    """
    t = np.arange(n, dtype=np.float64) + offset
    w = np.ones(t.shape)
    if ramp > 0:
        edge = np.minimum(t, n - 1 - t)  # distance from the nearer end
        on_ramp = edge < ramp
        w[on_ramp] = 0.5 - 0.5 * np.cos(np.pi * np.maximum(edge[on_ramp], 0.0) / ramp)
    return w


def _ramp(n: int) -> int:
    """Length of each Tukey ramp on an axis of ``n`` px; 0 on a short axis.

    An axis shorter than 8 px (a thin z stack) is not tapered: a taper there
    would leave one or two planes.
    """
    if n < _SHORT_AXIS:
        return 0
    ramp = int(max(_WINDOW_ALPHA * (n - 1) / 2, _MIN_RAMP_PX))
    return min(ramp, (n - 1) // 2)


def _window_at(shape: tuple[int, ...], offset: Sequence[float]) -> list[np.ndarray]:
    """The window of :func:`_window` moved by ``-offset`` px, as one profile per axis.

    Each profile is shaped to broadcast along its axis; their product is the
    window. If ``ref[p] == mov[p - offset]``, then ``ref * _window(shape)``
    and ``mov`` times these profiles are the same windowed content, moved by
    ``offset``: a window that moves with the content pulls the correlation
    peak nowhere, whereas a fixed one pulls it towards zero shift (by up to
    half the shift when the content lies on the ramps).
    """
    return [
        _tukey(n, _ramp(n), float(o))
        .astype(np.float32)
        .reshape([n if a == ax else 1 for a in range(len(shape))])
        for ax, (n, o) in enumerate(zip(shape, offset, strict=True))
    ]


@functools.lru_cache(maxsize=8)
def _window(shape: tuple[int, ...]) -> np.ndarray:
    """Separable Tukey window; ramps of at least 6 px, none on short axes."""
    w = np.ones(shape, dtype=np.float32)
    for profile in _window_at(shape, [0.0] * len(shape)):
        w *= profile
    w.setflags(write=False)
    return w


@functools.lru_cache(maxsize=8)
def _gauss_lowpass(shape: tuple[int, ...]) -> np.ndarray:
    """Gaussian weight on the rfft grid, sigma a fraction of Nyquist.

    Short axes (a thin z stack, not downsampled) are not weighted.
    """
    w = np.ones([1] * len(shape), np.float32)
    for ax, n in enumerate(shape):
        last = ax == len(shape) - 1
        f = (scipy.fft.rfftfreq(n) if last else scipy.fft.fftfreq(n)) * 2
        g = np.exp(-0.5 * (f / _LOWPASS) ** 2).astype(np.float32)
        if n < _SHORT_AXIS:
            g[:] = 1.0
        w = w * g.reshape([g.size if a == ax else 1 for a in range(len(shape))])
    w.setflags(write=False)
    return w


@functools.lru_cache(maxsize=256)
def _prev_fast_len(n: int) -> int:
    """Largest length <= n that scipy.fft transforms quickly (no large primes)."""
    m = n
    while m > 1 and scipy.fft.next_fast_len(m, real=True) != m:
        m -= 1
    return max(m, 1)


def _fast_crop(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """Centrally crop equally shaped arrays to FFT-friendly lengths.

    A prime length (e.g. 601) makes the FFT several times slower; the few
    pixels dropped lie in the tapered border anyway.
    """
    sl = []
    for n in arrays[0].shape:
        m = _prev_fast_len(n)
        sl.append(slice((n - m) // 2, (n - m) // 2 + m))
    return tuple(a[tuple(sl)] for a in arrays)


def _spectrum(x: np.ndarray, window: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """Half spectrum of ``x`` minus its mean, times ``window`` (or its profiles).

    One full-size temporary, tapered in place (see :func:`_slabs` for why).
    """
    tapered = x - x.mean()
    for w in [window] if isinstance(window, np.ndarray) else window:
        tapered *= w
    return scipy.fft.rfftn(tapered)


def _cross_power(
    ref: np.ndarray,
    mov: np.ndarray,
    *,
    ref_spectrum: np.ndarray | None = None,
    offset: Sequence[float] | None = None,
) -> np.ndarray:
    """Whitened, low-passed cross-power half spectrum of two windowed images.

    ``ref_spectrum``: ``_spectrum(ref, _window(ref.shape))`` if already
    computed. ``offset``: window ``mov`` with the window moved by this
    sub-pixel shift (see :func:`_window_at`) rather than the fixed one.
    """
    shape = ref.shape
    fr = ref_spectrum if ref_spectrum is not None else _spectrum(ref, _window(shape))
    window = _window(shape) if offset is None else _window_at(shape, offset)
    spec = _spectrum(mov, window)
    np.conjugate(spec, out=spec)
    spec *= fr
    weight = np.abs(spec)
    weight += np.float32(1e-6 * float(weight.max()) + np.finfo(np.float32).tiny)
    weight **= np.float32(-_WHITENING)
    weight *= _gauss_lowpass(shape)
    spec *= weight  # a real factor: much faster than dividing a complex array
    return spec


def _signed(peak: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    n = np.asarray(shape)
    return np.where(peak > n // 2, peak - n, peak)


def _search_region(shape: tuple[int, ...], bound: np.ndarray) -> tuple[np.ndarray, ...]:
    """Indices, per axis, of the shifts ``|k| <= bound`` on a periodic surface."""
    idx = []
    for n, b in zip(shape, bound, strict=True):
        b = int(min(b, n // 2))
        idx.append(np.arange(-b, b + 1) % n if b < n // 2 else np.arange(n))
    return tuple(idx)


@functools.lru_cache(maxsize=8)
def _fine_band(shape: tuple[int, ...]) -> np.ndarray:
    """Spectral weight keeping periods shorter than about 8 px (not on short axes)."""
    f2 = np.zeros([1] * len(shape), np.float32)
    for ax, n in enumerate(shape):
        last = ax == len(shape) - 1
        f = scipy.fft.rfftfreq(n) if last else scipy.fft.fftfreq(n)
        if n < _SHORT_AXIS:
            f = np.zeros_like(f)
        f2 = f2 + (f**2).astype(np.float32).reshape(
            [f.size if a == ax else 1 for a in range(len(shape))]
        )
    w = (1.0 - np.exp(-0.5 * f2 / _FINE_BAND**2)).astype(np.float32)
    w.setflags(write=False)
    return w


def _peak_significance(corr: np.ndarray, peak: np.ndarray) -> float:
    """Height of the surface at ``peak`` in robust standard deviations."""
    sample = _subsample(corr)
    median = float(np.median(sample))
    spread = 1.4826 * float(np.median(np.abs(sample - median)))
    return (float(corr[tuple(peak)]) - median) / spread if spread > 0 else 0.0


def _peak_shape(corr: np.ndarray, peak: np.ndarray) -> tuple[float, np.ndarray]:
    """The peak's elongation in the yx plane, and its weakest direction there.

    From a quadratic fitted to the log of the 3x3 values around ``peak`` in
    the yx plane. The elongation is the ratio of the peak's widths along its
    principal directions: about 1 for a round peak, large for a ridge
    (content that fixes the shift across an edge but not along it); inf if
    the values do not form a maximum there. The direction ``(y, x)`` is the
    unit vector along which the peak is widest (where the surface curves
    least): the one the content fixes least.
    """
    yx = (corr.ndim - 2, corr.ndim - 1)
    index = [int(p) for p in peak]
    window = tuple(
        (np.arange(-1, 2) + index[ax]) % corr.shape[ax] if ax in yx else index[ax]
        for ax in range(corr.ndim)
    )
    values = corr[np.ix_(*[np.atleast_1d(w) for w in window])].reshape(3, 3)
    fitted = np.log(values.astype(np.float64)) if np.all(values > 0) else values
    _, hess = _fit_quadratic(fitted)
    curvature, directions = np.linalg.eigh(-hess)
    weakest = directions[:, 0]
    if not np.all(values > 0) or curvature[0] <= 0:
        return math.inf, weakest
    return float(math.sqrt(curvature[1] / curvature[0])), weakest


def _integer_peak(
    ref: np.ndarray, mov: np.ndarray, corr: np.ndarray, bound: np.ndarray
) -> np.ndarray:
    """Surface index of the correlation peak, its periodic alias resolved."""
    region = _search_region(corr.shape, bound)
    whole = all(ix.size == n for ix, n in zip(region, corr.shape, strict=True))
    sub = corr if whole else corr[np.ix_(*region)]  # fancy indexing copies
    at = np.unravel_index(int(np.argmax(sub)), sub.shape)
    peak = np.array([ix[i] for ix, i in zip(region, at, strict=True)])
    k = _signed(peak, corr.shape)
    # a peak at k may stand for k or k - n (k + n): keep the better overlap
    options = []
    for ka, n, b in zip(k, corr.shape, bound, strict=True):
        alias = int(ka - n) if ka > 0 else int(ka + n)
        wraps = n >= 4 and abs(ka) > _WRAP_CHECK * n and abs(alias) <= b
        options.append([int(ka), alias] if wraps else [int(ka)])
    if any(len(o) > 1 for o in options):
        scores = {c: _ncc_shifted(ref, mov, c) for c in itertools.product(*options)}
        finite = {c: s for c, s in scores.items() if np.isfinite(s)}
        if finite:
            return np.array(max(finite, key=finite.__getitem__))
    return k


def _pcc(
    ref: np.ndarray, mov: np.ndarray, bound: np.ndarray, *, evidence: bool = True
) -> tuple[np.ndarray, float, float, np.ndarray]:
    """Sub-pixel shift of prepared images, and the evidence of its peak.

    Returns the shift, the peak's significance, its elongation and its
    weakest direction (see :func:`_peak_shape`; x for a 1D input); without
    ``evidence``, the shift only (the rest NaN).
    """
    ref, mov = _fast_crop(ref, mov)
    spec = _cross_power(ref, mov)
    corr = scipy.fft.irfftn(spec, s=ref.shape)
    shift = _integer_peak(ref, mov, corr, bound)
    base = np.mod(shift, ref.shape)
    first = shift + _gauss_fit_offsets(corr, base)
    # significance on the fine band only: a match that rests on smooth
    # shading alone (illumination, a defocused cycle) is neither precise nor
    # necessarily a match of the sample
    significance, elongation, weakest = math.nan, math.nan, np.full(1, math.nan)
    if evidence:
        fine = scipy.fft.irfftn(spec * _fine_band(ref.shape), s=ref.shape)
        significance = _peak_significance(fine, base)
        del fine
        elongation, weakest = (
            _peak_shape(corr, base) if corr.ndim >= 2 else (1.0, np.ones(1))
        )
    # Refinement on the parts that overlap at the nearest whole-pixel shift,
    # with the moving part's window moved by the sub-pixel rest of the current
    # estimate: a window fixed to the frame pulls the peak towards zero (by
    # up to half the rest when the content lies on the ramps: a lone cell
    # in a corner, a rim), one that moves with the content does not. Each
    # step removes most of what is left of that pull.
    x = first
    fr, at = None, None
    refined = False
    for _ in range(_REFINE_STEPS):
        a = np.rint(x).astype(int)
        sr, sm = _overlap(ref.shape, a)
        if not _overlap_usable(ref[sr].shape, ref.shape):
            break
        r2, m2 = _fast_crop(ref[sr], mov[sm])
        if at is None or np.any(a != at):
            fr, at = _spectrum(r2, _window(r2.shape)), a
        rest = x - a
        spec2 = _cross_power(r2, m2, ref_spectrum=fr, offset=rest)
        found = _polish(spec2, r2.shape, rest, near=refined)
        if np.any(np.abs(found) >= 1.5):
            break  # no peak near the estimate: keep the estimate
        x, refined = a + found, True
        if np.all(np.abs(found - rest) < _REFINE_TOL):
            break
    if not refined:  # overlap too small: polish the first spectrum's peak
        wrap = shift - base
        x = _polish(spec, ref.shape, first - wrap) + wrap
    return x, significance, elongation, weakest


def _slide_step(shape: tuple[int, ...]) -> int:
    """The frame's move of :func:`_slide`: 1/16 of the shorter of y and x, 1-4 px."""
    return min(max(1, min(shape[-2:]) // _SLIDE_DIVISOR), _SLIDE_MAX_PX)


def _slide(
    ref: np.ndarray,
    mov: np.ndarray,
    shift: np.ndarray,
    weakest: np.ndarray,
    clear: float,
) -> float:
    """How far the match slides along ``weakest`` when the frame moves along it.

    The moving image is cropped ``d`` (see :func:`_slide_step`) further along
    the peak's weakest direction than the reference (:func:`_offset_crops`).
    Content that fixes the shift along that direction puts the match at
    ``shift + d``; an edge, a rim or a gradient running that way leaves it
    with the frame, up to ``|d|`` away, and so does a match tied to the frame
    in every direction (the window's imprint on vignetting or a smooth
    gradient, a fixed pattern), which stays at ``shift``. Returns the
    distance (px of the inputs, along ``weakest``) of the crops' estimate
    from ``shift + d``, the smaller over the two senses of ``d``: a step
    one way may push content at a border (a corner of a rim) out of the
    crops, the other keeps it. The second sense is tried only when the first
    slid more than ``clear``.
    """
    step = _slide_step(ref.shape)
    best = math.inf
    for sense in (1, -1):
        d = np.zeros(ref.ndim, dtype=int)
        d[-2:] = np.rint(sense * step * weakest)
        r, m = _offset_crops(ref, mov, d)
        if not _overlap_usable(r.shape, ref.shape):
            continue
        found = _pcc(r, m, np.abs(shift + d) + step + 1, evidence=False)[0]
        best = min(best, abs(float(np.dot(found[-2:] - (shift + d)[-2:], weakest))))
        if best <= clear:
            break
    return best


def _offset_crops(
    ref: np.ndarray, mov: np.ndarray, d: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Equal crops of the pair, the moving one ``d`` px further along each axis.

    If ``ref[p] ~ mov[p - s]``, the crops match at ``s + d``.
    """
    length = np.array(ref.shape) - np.abs(d)
    start = np.maximum(0, -d)
    r = ref[tuple(slice(s, s + n) for s, n in zip(start, length, strict=True))]
    m = mov[
        tuple(slice(s + o, s + o + n) for s, o, n in zip(start, d, length, strict=True))
    ]
    return r, m


def _saturated_share(
    reference: np.ndarray, moving: np.ndarray, shift: Sequence[int]
) -> float:
    """Share of the overlap at ``shift`` where either raw image is at its maximum."""
    if reference.dtype == np.bool_:
        return 0.0
    sr, sm = _overlap(reference.shape, shift)
    r, m = reference[sr], moving[sm]
    if r.size == 0:
        return 0.0
    clipped = r == reference.max()
    clipped |= m == moving.max()
    return float(np.count_nonzero(clipped)) / clipped.size


CHI2_EXTRA = "chi2"
"""The package extra that installs ``image_registration`` for ``chi2_shift``."""


def load_chi2_shift():
    """``image_registration.chi2_shift``, imported on first use.

    The package is an optional extra: it is slow to import and brings astropy
    and matplotlib into every environment, for a method few choose.

    Raises:
        ModuleNotFoundError: If ``image_registration`` is not installed, with
            the command that installs it (a dependency missing inside it
            passes through as it is).
    """
    try:
        from image_registration import chi2_shift
    except ModuleNotFoundError as error:
        if error.name != "image_registration":
            raise
        raise ModuleNotFoundError(
            "method='chi2_shift' needs the package image_registration, which is "
            f'not installed. Install it with: pip install "fractal-tasks[{CHI2_EXTRA}]"'
            f" (in Fractal: collect the task package with pip_extras='{CHI2_EXTRA}'),"
            " or use method='phase_cross_correlation'.",
            name=error.name,
        ) from error
    return chi2_shift


def _chi2(ref: np.ndarray, mov: np.ndarray) -> np.ndarray:
    """image_registration.chi2_shift on prepared 2D images, in our convention.

    chi2_shift returns ``(dx, dy)``, the offset of the moving image, hence
    ``(-dy, -dx)``; it is re-run on the aligned overlap as :func:`_pcc` does.
    """
    chi2_shift = load_chi2_shift()

    def run(r: np.ndarray, m: np.ndarray) -> np.ndarray:
        r, m = _fast_crop(r, m)
        window = _window(r.shape)
        dx, dy = chi2_shift(
            (r - r.mean()) * window,
            (m - m.mean()) * window,
            upsample_factor=_UPSAMPLE,
            zeromean=True,
            return_error=False,
        )
        return np.array([-float(dy), -float(dx)])

    shift = run(ref, mov)
    a = np.rint(shift).astype(int)
    sr, sm = _overlap(ref.shape, a)
    if _overlap_usable(ref[sr].shape, ref.shape):
        residual = run(ref[sr], mov[sm])
        if np.all(np.abs(residual) <= 1.0):
            return a + residual
    return shift


# --------------------------------------------------------------------------
# sub-pixel peak: 3-point Gaussian fit, then DFT evaluation + quadratic fits
# --------------------------------------------------------------------------
def _dft_eval(
    spec: np.ndarray, shape: tuple[int, ...], coords: Sequence[np.ndarray]
) -> np.ndarray:
    """Band-limited interpolation of ``irfftn(spec, s=shape)`` on a small grid.

    One small matrix product per axis (the "matrix-multiply DFT"); einsum
    rather than BLAS, whose thread pools cost more than the arithmetic here.
    """
    nd = len(shape)
    n = shape[-1]
    k = np.arange(spec.shape[-1], dtype=np.float64)
    # on the half axis the frequencies 1..n/2-1 stand for a +-k pair
    weight = np.full(k.size, 2.0)
    weight[0] = 1.0
    if n % 2 == 0:
        weight[-1] = 1.0
    kernel = weight[None, :] * np.exp(2j * np.pi * np.outer(coords[-1], k) / n)
    out = np.einsum("...k,jk->...j", spec, kernel.astype(np.complex64))
    for ax in range(nd - 2, -1, -1):
        n = shape[ax]
        f = scipy.fft.fftfreq(n, 1.0 / n)
        kernel = np.exp(2j * np.pi * np.outer(coords[ax], f) / n).astype(np.complex64)
        idx = list(range(nd))
        out = np.einsum(kernel, [nd, ax], out, idx, idx[:ax] + [nd] + idx[ax + 1 :])
    return out.real.astype(np.float64) / float(np.prod(shape))


def _fit3(vm: float, v0: float, vp: float) -> float:
    """Vertex offset (-0.5..0.5 steps) of a parabola through 3 samples.

    Fitted to the logarithms when all three are positive, which is exact for
    a Gaussian peak.
    """
    if vm > 0 and v0 > 0 and vp > 0:
        vm, v0, vp = math.log(vm), math.log(v0), math.log(vp)
    den = vm - 2.0 * v0 + vp
    if not den < 0:
        return 0.0
    return min(0.5, max(-0.5, 0.5 * (vm - vp) / den))


@functools.lru_cache(maxsize=4)
def _quadratic_design(nd: int) -> tuple[np.ndarray, tuple[tuple[int, int], ...]]:
    """Pseudo-inverse of the full quadratic model on the 3**nd grid {-1,0,1}."""
    grids = np.meshgrid(*([np.array([-1.0, 0.0, 1.0])] * nd), indexing="ij")
    pairs = tuple(itertools.combinations_with_replacement(range(nd), 2))
    cols = [np.ones(3**nd)] + [g.ravel() for g in grids]
    cols += [grids[i].ravel() * grids[j].ravel() for i, j in pairs]
    pinv = np.linalg.pinv(np.stack(cols, axis=1))
    pinv.setflags(write=False)
    return pinv, pairs


def _fit_quadratic(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gradient and Hessian at the centre of a quadratic fitted to 3**nd values."""
    nd = values.ndim
    pinv, pairs = _quadratic_design(nd)
    coef = np.einsum("ij,j->i", pinv, values.ravel())
    hess = np.zeros((nd, nd))
    for (i, j), c in zip(pairs, coef[1 + nd :], strict=True):
        hess[i, j] = hess[j, i] = 2.0 * c if i == j else c
    return coef[1 : 1 + nd], hess


def _quadratic_peak(vals: np.ndarray) -> np.ndarray:
    """Vertex (grid steps, clipped to +-1) of a quadratic fitted to 3**nd values."""
    nd = vals.ndim
    grad, hess = _fit_quadratic(np.log(vals) if np.all(vals > 0) else vals)
    if np.all(np.linalg.eigvalsh(hess) < 0):
        off = np.linalg.solve(hess, -grad)
    else:  # not a maximum: independent 3-point fits
        mid = (1,) * nd
        off = np.zeros(nd)
        for ax in range(nd):
            lo, hi = list(mid), list(mid)
            lo[ax], hi[ax] = 0, 2
            off[ax] = _fit3(vals[tuple(lo)], vals[mid], vals[tuple(hi)])
    return np.clip(off, -1.0, 1.0)


def _gauss_fit_offsets(corr: np.ndarray, peak: np.ndarray) -> np.ndarray:
    """Per-axis 3-point Gaussian fits around the integer maximum ``peak``."""
    shape = corr.shape
    p = tuple(int(i) for i in peak)
    out = np.zeros(len(shape))
    for ax in range(len(shape)):
        lo, hi = list(p), list(p)
        lo[ax] = (p[ax] - 1) % shape[ax]
        hi[ax] = (p[ax] + 1) % shape[ax]
        out[ax] = _fit3(float(corr[tuple(lo)]), float(corr[p]), float(corr[tuple(hi)]))
    return out


def _polish(
    spec: np.ndarray, shape: tuple[int, ...], x: np.ndarray, *, near: bool = False
) -> np.ndarray:
    """Refine a sub-pixel peak ``x`` by DFT evaluation and quadratic fits.

    The correlation is evaluated on the 3**nd grid of spacing ``h`` around
    ``x``, which moves to the vertex of a quadratic fitted to the log of the
    values (again while it lands on the grid's edge, up to 4 times), with
    ``h = 0.25`` px and then ``h = 0.1`` px; ``near``: ``x`` is within about
    0.1 px of the peak, only ``h = 0.1`` px.
    """
    for step in (1.0 / _UPSAMPLE,) if near else (0.25, 1.0 / _UPSAMPLE):
        offsets = np.array([-step, 0.0, step])
        for _ in range(4):
            vals = _dft_eval(spec, shape, [c + offsets for c in x])
            off = _quadratic_peak(vals)
            x = x + off * step
            if np.all(np.abs(off) < 1.0):
                break
    return x


# --------------------------------------------------------------------------
# main entry point
# --------------------------------------------------------------------------
def estimate_shift(
    reference: np.ndarray,
    moving: np.ndarray,
    *,
    method: RegistrationMethod = RegistrationMethod.PHASE_CROSS_CORRELATION,
    lower_rescale_quantile: float = 0.0,
    upper_rescale_quantile: float = 0.99,
    max_shift_px: float | Sequence[float] | None = None,
    level0_px: float = 1.0,
) -> ShiftEstimate:
    """Estimate the translation that aligns ``moving`` to ``reference``.

    Args:
        reference: 2D ``(y, x)`` or 3D ``(z, y, x)`` array of any integer,
            float or bool dtype (typically one channel of one ROI at a coarse
            pyramid level). Axes of length 1 are allowed and get shift 0.
        moving: Array of exactly the same shape as ``reference`` (crop both
            to their common part first).
        method: See :class:`RegistrationMethod`. ``CHI2_SHIFT`` is 2D only (a
            3D array with a single z plane is accepted). The evidence
            (``peak_*``) comes from phase correlation for both methods.
        lower_rescale_quantile: Quantile (0..1) of each image's intensities
            below which values are clipped. 0 = the minimum.
        upper_rescale_quantile: Quantile (0..1) above which values are
            compressed logarithmically, so that a few very bright objects do
            not dominate. Quantiles are taken on a regular subsample of at
            most ~65k pixels.
        max_shift_px: Optional bound on the shift searched for, per axis
            (scalar or one value per axis), in pixels of the inputs. None =
            up to half an axis, or beyond it where the overlap decides
            between a shift and its periodic alias (up to 3/4 of the axis).
        level0_px: The size of one input pixel in y and x, in level-0
            pixels (4 at a pyramid level 4x downsampled; the larger of the
            two if they differ): the unit of ``uncertainty_px``.

    Returns:
        A :class:`ShiftEstimate`. The shift is always finite, but meaningless
        for empty, saturated or unrelated images: its evidence then says so,
        see :func:`judge_estimates`. Below about 16 px of structure along an
        axis (see ``MIN_ROI_PX`` in the calculate task) the estimate is
        unreliable.

    Raises:
        ValueError: If the shapes differ, the arrays are not 2D/3D, are
            empty, have a non-numeric dtype or contain NaN/inf, the quantiles
            are not ``0 <= lower < upper <= 1``, ``max_shift_px`` is negative
            or has the wrong length, or ``method`` is ``CHI2_SHIFT`` and the
            input has more than one z plane, or ``level0_px`` is not positive.
    """
    reference = np.asarray(reference)
    moving = np.asarray(moving)
    _check_pair(reference, moving)
    method = RegistrationMethod(method)
    if not level0_px > 0:
        raise ValueError(f"level0_px must be > 0, got {level0_px}")
    if not 0.0 <= lower_rescale_quantile < upper_rescale_quantile <= 1.0:
        raise ValueError(
            "need 0 <= lower_rescale_quantile < upper_rescale_quantile <= 1, got "
            f"{lower_rescale_quantile} and {upper_rescale_quantile}"
        )
    full_shape = reference.shape
    active = [ax for ax, n in enumerate(full_shape) if n > 1]
    if method is RegistrationMethod.CHI2_SHIFT and len(active) > 2:
        raise ValueError(
            f"chi2_shift supports 2D images only, got shape {full_shape}; use "
            "method='phase_cross_correlation' for 3D data (or one z plane)"
        )
    bound = np.full(len(full_shape), np.inf)
    if max_shift_px is not None:
        b = np.asarray(max_shift_px, dtype=np.float64).reshape(-1)
        if b.size not in (1, len(full_shape)) or not np.all(b >= 0):
            raise ValueError(
                f"max_shift_px must be >= 0, a scalar or one value per axis, got "
                f"{max_shift_px} for shape {full_shape}"
            )
        bound[:] = b

    squeezed = tuple(full_shape[ax] for ax in active)
    quantiles = (lower_rescale_quantile, upper_rescale_quantile)
    ref = _prepare(reference.reshape(squeezed), *quantiles)
    mov = _prepare(moving.reshape(squeezed), *quantiles)
    ncc_before = ncc(ref, mov)
    if not squeezed:  # a single pixel
        zero = (0.0,) * len(full_shape)
        return ShiftEstimate(zero, ncc_before, ncc_before, 0.0, 1.0)
    sub, significance, elongation, weakest = _pcc(ref, mov, bound[active])
    if method is RegistrationMethod.CHI2_SHIFT:
        sub = _chi2(ref, mov)
    sub = np.clip(sub, -bound[active], bound[active])  # never beyond the bound
    # a slide far below the limit needs no second look
    clear = 0.25 * UNCERTAINTY.limit / level0_px
    slide = _slide(ref, mov, sub, weakest, clear) * level0_px
    direction = math.degrees(math.atan2(weakest[0], weakest[-1])) % 180.0
    whole = np.rint(sub).astype(int)
    ncc_after = _ncc_shifted(ref, mov, whole)
    saturated = _saturated_share(
        reference.reshape(squeezed), moving.reshape(squeezed), whole
    )
    shift = [0.0] * len(full_shape)
    for ax, v in zip(active, sub, strict=True):
        shift[ax] = float(v) + 0.0  # + 0.0 turns -0.0 into 0.0
    return ShiftEstimate(
        shift=tuple(shift),
        ncc_before=ncc_before,
        ncc_after=ncc_after,
        peak_significance=float(significance),
        peak_elongation=elongation,
        saturated=saturated,
        uncertainty_px=slide,
        uncertainty_direction_deg=direction + 0.0,
    )


# --------------------------------------------------------------------------
# verdicts
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """One check of :func:`judge_estimate`: a value of the estimate and its limit.

    Attributes:
        column: The quality-table column the rule reads (or, for a rule on
            two columns, how they combine).
        limit: The limit, in the unit of the column.
        at_least: True when the value must be at least ``limit``; False when
            at most. NaN never passes.
        means: What failing the rule says about the images, for the docs.
        chosen: How the limit was chosen, and on which images.
    """

    column: str
    limit: float
    at_least: bool
    means: str
    chosen: str

    def holds(self, value: float) -> bool:
        """Whether ``value`` passes (False for NaN)."""
        return value >= self.limit if self.at_least else value <= self.limit

    @property
    def needed(self) -> str:
        """The limit in words, e.g. ``"at least 10"``."""
        return f"{'at least' if self.at_least else 'at most'} {self.limit:g}"


_CALIBRATION = "of the calibration set of benchmarks/corpus.py"
_IN_SAMPLE = (
    "on the calibration set of benchmarks/corpus.py (figures there are "
    "in-sample; the held-out set never set a limit)"
)
SATURATED = Rule(
    "saturated",
    0.5,
    False,
    "most of the overlap is clipped in one of the images: the shift rests on "
    "the few pixels left, whose shapes the clipping changed",
    f"half of the overlap, a round limit; the saturated failure cases {_IN_SAMPLE}",
)
PEAK_SIGNIFICANCE = Rule(
    "peak_significance",
    10.0,
    True,
    "no match stands out of the fine band of the correlation surface (empty, "
    "saturated, defocused or unrelated images, smooth shading only)",
    f"above the 3-6 that unrelated images score, {_IN_SAMPLE}",
)
UNCERTAINTY = Rule(
    "uncertainty_px",
    0.5,
    False,
    "the content does not fix the shift along one direction "
    "(`uncertainty_direction_deg`): moved along it by a few pixels, one "
    "image's frame takes the match with it. An edge, a rim or a gradient fixes "
    "the shift across it, not along it",
    "half a level-0 pixel, the accuracy an `ok` promises; the good FOVs "
    f"{_CALIBRATION} reach at most 0.34 (99% at most 0.07). The frame's move "
    "(1/16 of the ROI's side, at most 4 px) was capped after a larger one gave "
    "false alarms on corner FOVs read at level 0, of the calibration set's "
    "retina corner and of the held-out rims alike",
)
NCC_GAIN = Rule(
    "ncc_after - ncc_before",
    -0.02,
    True,
    "the shift makes the images agree less than no shift at all",
    "a true shift below half a pixel rounds to 0 and gains nothing; -0.02 "
    f"allows for that, {_IN_SAMPLE}",
)
NCC_AFTER = Rule(
    "ncc_after",
    0.1,
    True,
    "the images have too little in common",
    _IN_SAMPLE,
)
CONFIRM_FINER = Rule(
    "peak_elongation",
    1.5,
    False,
    "at a downsampled level, an edge or rim may hold the peak across it and "
    "not along it: the ROI is read again at each finer level in turn, the "
    "finest estimate that passes is kept and a round peak ends the search",
    "by cost, on the calibration set: 2.4% of its good 2D FOVs at level 2 "
    "exceed it and are read again; added after the held-out rims showed "
    "estimates 1.3-20 px wrong with elongations of 1.9-2.5",
)
"""Not a verdict: when an estimate that passes :data:`RULES` is confirmed finer."""

_Check = tuple[Rule, Callable[[ShiftEstimate], float], Callable[[ShiftEstimate], str]]
_CHECKS: tuple[_Check, ...] = (
    (
        SATURATED,
        lambda e: e.saturated,
        lambda e: (
            f"saturated: {100 * e.saturated:.0f}% of the overlap is at the "
            f"image's maximum value (> {100 * SATURATED.limit:.0f}%), the shift rests "
            "on the few unclipped pixels"
        ),
    ),
    (
        PEAK_SIGNIFICANCE,
        lambda e: e.peak_significance,
        lambda e: (
            f"no significant correlation peak ({e.peak_significance:.1f} < "
            f"{PEAK_SIGNIFICANCE.limit:.1f} robust SD)"
        ),
    ),
    (
        UNCERTAINTY,
        lambda e: e.uncertainty_px,
        lambda e: (
            "the content does not fix the shift along "
            f"{e.uncertainty_direction_deg:.0f}° (from x towards y): there the "
            f"match slides {e.uncertainty_px:.2f} level-0 px with the image "
            f"frame (> {UNCERTAINTY.limit:g}), as along an edge or a rim"
        ),
    ),
    (
        NCC_GAIN,
        lambda e: e.ncc_after - e.ncc_before,
        lambda e: (
            f"no gain in correlation from the shift ({e.ncc_before:.2f} -> "
            f"{e.ncc_after:.2f})"
        ),
    ),
    (
        NCC_AFTER,
        lambda e: e.ncc_after,
        lambda e: (
            f"weak correlation after the shift ({e.ncc_after:.2f} < "
            f"{NCC_AFTER.limit:.2f})"
        ),
    ),
)
"""Each rule with the value it reads and the note it gives when it fails."""

RULES = tuple(rule for rule, _, _ in _CHECKS)
"""The checks of :func:`judge_estimate`, in the order they are applied."""


def judge_estimate(estimate: ShiftEstimate) -> Verdict:
    """Judge one estimate by the evidence of its own registration.

    First both NCC values must be defined (else a constant image or no
    overlap); then each of :data:`RULES` in order, the first failure giving
    the reason.
    """
    e = estimate
    if not (math.isfinite(e.ncc_before) and math.isfinite(e.ncc_after)):
        return Verdict(False, "correlation undefined (constant image or empty overlap)")
    for rule, value, reason in _CHECKS:
        if not rule.holds(value(e)):
            return Verdict(False, reason(e))
    return Verdict(True)


def judge_estimates(
    estimates: Sequence[ShiftEstimate],
    shifts: np.ndarray,
    *,
    max_shift: np.ndarray | float,
    outlier_floor: float,
    outlier_mads: float = 5.0,
) -> list[Verdict]:
    """Judge the estimates of all ROIs of ONE acquisition.

    Each ROI first gets :func:`judge_estimate`; then, in order:

    * ``|shift| <= max_shift`` on every axis, else "shift beyond max_shift".
    * If at least 3 ROIs are still good: the distance of each good shift from
      the component-wise median of the good shifts must not exceed
      ``max(outlier_floor, outlier_mads * 1.4826 * MAD)`` (MAD: the median of
      those distances), else "outlier". When the ROIs moved as one piece they
      agree closely and a far one is wrong; when they moved independently
      their spread is large and so is the limit.

    Args:
        estimates: One :class:`ShiftEstimate` per ROI.
        shifts: ``(n_roi, ndim)`` the same shifts in one unit for all ROIs
            (e.g. pixels of one pyramid level, or µm).
        max_shift: Largest plausible absolute shift, in the unit of
            ``shifts``: a scalar, one value per axis or per ROI and axis.
        outlier_floor: Smallest distance, in the unit of ``shifts``, that
            makes an outlier; genuine differences between the ROIs of one
            acquisition (stage repeatability) must stay below it.
        outlier_mads: Outlier limit in robust standard deviations.

    Returns:
        One :class:`Verdict` per ROI, in input order.

    Raises:
        ValueError: If the shapes do not fit together.
    """
    shifts = np.asarray(shifts, dtype=np.float64)
    if shifts.ndim != 2 or shifts.shape[0] != len(estimates):
        raise ValueError(
            f"shifts must be ({len(estimates)}, ndim), got shape {shifts.shape}"
        )
    try:
        limit = np.broadcast_to(np.asarray(max_shift, np.float64), shifts.shape)
    except ValueError as err:
        raise ValueError(
            f"max_shift of shape {np.shape(max_shift)} does not fit shifts of "
            f"shape {shifts.shape}"
        ) from err
    verdicts = [judge_estimate(e) for e in estimates]
    for i, verdict in enumerate(verdicts):
        excess = np.abs(shifts[i]) - limit[i]
        if verdict.good and np.any(excess > 0):
            ax = int(np.argmax(excess))
            verdicts[i] = Verdict(
                False,
                f"shift {abs(shifts[i, ax]):.1f} beyond max_shift {limit[i, ax]:.1f} "
                f"(axis {ax})",
            )
    good = np.array([v.good for v in verdicts], dtype=bool)
    if good.sum() >= 3:
        median = np.median(shifts[good], axis=0)
        distance = np.linalg.norm(shifts - median, axis=1)
        mad = float(np.median(distance[good]))
        threshold = max(outlier_floor, outlier_mads * 1.4826 * mad)
        for i in map(int, np.flatnonzero(good & (distance > threshold))):
            verdicts[i] = Verdict(
                False,
                f"outlier: {distance[i]:.1f} from the median of the good ROIs "
                f"(limit {threshold:.1f})",
            )
    return verdicts
