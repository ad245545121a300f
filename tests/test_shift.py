"""Tests of the pure shift-estimation core (fractal_tasks._shift)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage as ndi

from fractal_tasks._shift import (
    RegistrationMethod,
    RegistrationStatus,
    ShiftEstimate,
    Verdict,
    estimate_shift,
    judge_estimates,
    ncc,
    refine_shift,
    signal_measure,
)


def _scene(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Nuclei-like field: blurred random blobs of varying size and brightness."""
    rng = np.random.default_rng(seed)
    out = np.zeros(shape)
    sig_z = [1.2] if len(shape) == 3 else []
    for sigma, density in ((1.5, 4e-3), (2.5, 2e-3), (4.0, 6e-4)):
        seeds = (rng.random(shape) < density) * rng.uniform(0.3, 1.0, shape)
        out += ndi.gaussian_filter(seeds, sig_z + [sigma, sigma]) * sigma**2
    return out / out.max()


def _pair(
    shape: tuple[int, ...],
    shift: tuple[float, ...],
    *,
    seed: int = 0,
    noise: float = 0.01,
    extra: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Reference and moving (uint16) with reference[p] == moving[p - shift].

    The scene is larger than the FOV, so content really enters and leaves at
    the borders; the sub-pixel shift is exact (Fourier shift of the scene).
    """
    margin = [int(math.ceil(abs(s))) + 8 for s in shift]
    big = tuple(n + 2 * m for n, m in zip(shape, margin, strict=True))
    scene = _scene(big, seed)
    moved = np.fft.ifftn(
        ndi.fourier_shift(np.fft.fftn(scene), [-s for s in shift])
    ).real
    crop = tuple(slice(m, m + n) for n, m in zip(shape, margin, strict=True))
    rng = np.random.default_rng(seed + 1)
    ref = 100 + 2000 * scene[crop] + 2000 * noise * rng.standard_normal(shape)
    mov = moved[crop]
    if extra:  # a structure stained in the moving cycle only
        mov = mov + 0.5 * _scene(shape, seed + 7)
    mov = 300 + 6000 * mov + 6000 * noise * rng.standard_normal(shape)
    return (
        np.clip(ref, 0, 65535).astype(np.uint16),
        np.clip(mov, 0, 65535).astype(np.uint16),
    )


def _assert_close(est: ShiftEstimate, truth: tuple[float, ...], tol: float) -> None:
    err = np.abs(np.asarray(est.shift) - np.asarray(truth))
    assert err.max() < tol, f"estimated {est.shift}, truth {truth}"


# --------------------------------------------------------------------------
# estimate_shift: accuracy and conventions
# --------------------------------------------------------------------------
@pytest.mark.parametrize("truth", [(7.0, -12.0), (-9.0, 5.0), (0.0, 0.0), (-3.0, -4.0)])
def test_integer_shift_2d(truth: tuple[float, float]) -> None:
    ref, mov = _pair((128, 160), truth)
    est = estimate_shift(ref, mov)
    _assert_close(est, truth, 0.08)  # the moving image has extra structures
    assert est.ncc_after > 0.5
    assert est.ncc_after > est.ncc_before or truth == (0.0, 0.0)


@pytest.mark.parametrize("truth", [(3.3, -7.6), (-10.45, 2.2), (0.25, -0.35)])
def test_subpixel_shift_2d(truth: tuple[float, float]) -> None:
    ref, mov = _pair((128, 160), truth, seed=3, extra=False)
    _assert_close(estimate_shift(ref, mov), truth, 0.05)
    ref, mov = _pair((128, 160), truth, seed=3)
    _assert_close(estimate_shift(ref, mov), truth, 0.08)


def test_sign_convention_matches_np_roll() -> None:
    ref, _ = _pair((96, 96), (0.0, 0.0), extra=False)
    mov = np.roll(ref, (5, -8), axis=(0, 1))
    est = estimate_shift(ref, mov)
    assert est.shift == pytest.approx((-5.0, 8.0), abs=0.02)
    # rolling the moving image by the (rounded) estimate gives the reference back
    assert np.array_equal(
        np.roll(mov, np.rint(est.shift).astype(int), axis=(0, 1)), ref
    )


@pytest.mark.parametrize(
    "truth", [(1.0, 6.0, -9.0), (-2.0, -4.0, 3.0), (0.6, 2.3, -5.7)]
)
def test_shift_3d(truth: tuple[float, float, float]) -> None:
    ref, mov = _pair((16, 64, 80), truth, seed=5)
    est = estimate_shift(ref, mov)
    assert len(est.shift) == 3
    _assert_close(est, truth, 0.1)


def test_single_plane_axis_gets_zero() -> None:
    ref, mov = _pair((96, 112), (4.4, -6.2), seed=11)
    est = estimate_shift(ref[None], mov[None])
    assert est.shift[0] == 0.0
    _assert_close(est, (0.0, 4.4, -6.2), 0.08)
    # the same with chi2_shift, which accepts a single z plane
    est2 = estimate_shift(ref[None], mov[None], method=RegistrationMethod.CHI2_SHIFT)
    assert est2.shift[0] == 0.0
    _assert_close(est2, (0.0, 4.4, -6.2), 0.15)


@pytest.mark.parametrize(
    "truth",
    [
        (40.0, -2.0),  # 42% of the axis: the plain peak is right
        (-41.0, 3.0),
        (55.0, 1.0),  # beyond half the axis: the plain peak gives -41
        (-3.0, -70.0),
    ],
)
def test_wrap_around_near_half_fov(truth: tuple[float, float]) -> None:
    ref, mov = _pair((96, 128), truth, seed=2, extra=False)
    _assert_close(estimate_shift(ref, mov), truth, 0.1)


def test_intensity_scaling_and_dtype_do_not_matter() -> None:
    ref, mov = _pair((96, 96), (2.5, -3.25), seed=4)
    a = estimate_shift(ref, mov)
    b = estimate_shift(ref.astype(np.float64) * 0.01, mov.astype(np.float32) * 7 + 3)
    assert a.shift == pytest.approx(b.shift, abs=1e-3)
    assert a.ncc_after == pytest.approx(b.ncc_after, abs=1e-3)


def test_integer_only_when_upsample_factor_is_1() -> None:
    ref, mov = _pair((96, 96), (2.4, -3.7), seed=4)
    est = estimate_shift(ref, mov, upsample_factor=1)
    assert est.shift == (2.0, -4.0)


def test_max_shift_bounds_the_search() -> None:
    ref, mov = _pair((96, 112), (3.3, -12.2), seed=6, extra=False)
    _assert_close(estimate_shift(ref, mov, max_shift_px=(5, 15)), (3.3, -12.2), 0.08)
    # a bound that excludes the truth: the result stays within bound + 1 px
    est = estimate_shift(ref, mov, max_shift_px=6.0)
    assert max(abs(v) for v in est.shift) <= 7.0
    with pytest.raises(ValueError, match="max_shift_px"):
        estimate_shift(ref, mov, max_shift_px=-1.0)
    with pytest.raises(ValueError, match="max_shift_px"):
        estimate_shift(ref, mov, max_shift_px=(1.0, 2.0, 3.0))


def test_shape_mismatch_and_bad_arguments_raise() -> None:
    ref, mov = _pair((64, 64), (1.0, 1.0))
    with pytest.raises(ValueError, match="same shape"):
        estimate_shift(ref, mov[:-1])
    with pytest.raises(ValueError, match="2D or 3D"):
        estimate_shift(ref[0], mov[0])
    with pytest.raises(ValueError, match="quantile"):
        estimate_shift(ref, mov, lower_rescale_quantile=0.5, upper_rescale_quantile=0.4)
    with pytest.raises(ValueError, match="upsample_factor"):
        estimate_shift(ref, mov, upsample_factor=0)
    with pytest.raises(ValueError, match="NaN"):
        estimate_shift(ref.astype(float) * np.nan, mov)
    with pytest.raises(ValueError):
        estimate_shift(ref, mov, method="no_such_method")


# --------------------------------------------------------------------------
# chi2_shift
# --------------------------------------------------------------------------
@pytest.mark.parametrize("truth", [(6.0, -3.0), (-4.3, 7.6)])
def test_chi2_shift_agrees_in_sign_with_pcc(truth: tuple[float, float]) -> None:
    ref, mov = _pair((96, 112), truth, seed=8)
    chi = estimate_shift(ref, mov, method=RegistrationMethod.CHI2_SHIFT)
    pcc = estimate_shift(ref, mov, method="phase_cross_correlation")
    _assert_close(chi, truth, 0.15)
    assert np.allclose(chi.shift, pcc.shift, atol=0.15)
    assert chi.ncc_after > chi.ncc_before


def test_chi2_shift_rejects_3d() -> None:
    ref, mov = _pair((4, 32, 32), (0.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="phase_cross_correlation"):
        estimate_shift(ref, mov, method=RegistrationMethod.CHI2_SHIFT)


# --------------------------------------------------------------------------
# ncc, signal, refinement helper
# --------------------------------------------------------------------------
def test_ncc_values() -> None:
    rng = np.random.default_rng(0)
    a = rng.random((20, 30))
    assert ncc(a, a) == pytest.approx(1.0)
    assert ncc(a, 5 - 2 * a) == pytest.approx(-1.0)
    assert ncc(a.astype(np.float32), (3 * a + 1).astype(np.float32)) == pytest.approx(
        1.0
    )
    assert math.isnan(ncc(a, np.full_like(a, 3.0)))
    assert math.isnan(ncc(a[:0], a[:0]))
    with pytest.raises(ValueError):
        ncc(a, a[:-1])


def test_signal_measure_scale() -> None:
    rng = np.random.default_rng(1)
    noise = 100 + 5 * rng.standard_normal((200, 200))
    assert 0.8 < signal_measure(noise) < 1.25
    assert signal_measure(np.full((50, 50), 7, np.uint16)) == 0.0
    ref, _ = _pair((128, 128), (0.0, 0.0))
    assert signal_measure(ref) > 20


def test_refine_shift_adds_residual_to_applied_shift() -> None:
    truth = (13.3, -21.6)
    ref, mov = _pair((160, 160), truth, seed=9, extra=False)
    applied = (13, -22)
    win = (slice(40, 104), slice(48, 112))
    mwin = (slice(40 - 13, 104 - 13), slice(48 + 22, 112 + 22))
    est = refine_shift(ref[win], mov[mwin], applied)
    _assert_close(est, truth, 0.1)
    with pytest.raises(ValueError, match="applied_shift_px"):
        refine_shift(ref[win], mov[mwin], (1, 2, 3))


# --------------------------------------------------------------------------
# judging
# --------------------------------------------------------------------------
def _estimates(pairs: list[tuple[np.ndarray, np.ndarray]]) -> list[ShiftEstimate]:
    return [estimate_shift(r, m) for r, m in pairs]


def _judge(
    ests: list[ShiftEstimate], shifts: np.ndarray | None = None, **kw
) -> list[Verdict]:
    return judge_estimates(
        np.array([e.shift for e in ests]) if shifts is None else shifts,
        np.array([e.ncc_before for e in ests]),
        np.array([e.ncc_after for e in ests]),
        np.array([e.signal for e in ests]),
        **({"max_shift_px": 30.0} | kw),
    )


@pytest.fixture(scope="module")
def acquisition() -> list[ShiftEstimate]:
    """Five good FOVs of one acquisition (similar shifts), then empty, noise-only
    and saturated ones."""
    pairs = [
        _pair((96, 96), (5.0 + 0.3 * i, -7.0 + 0.2 * i), seed=20 + i) for i in range(5)
    ]
    rng = np.random.default_rng(3)
    ref_ok = pairs[0][0]
    flat = np.full((96, 96), 120, np.uint16)
    noise = (120 + 3 * rng.standard_normal((96, 96))).astype(np.uint16)
    saturated = np.full((96, 96), 65535, np.uint16)
    saturated[::7, ::5] = 60000
    pairs += [
        (ref_ok, flat),
        (noise, (150 + 3 * rng.standard_normal((96, 96)))),
        (ref_ok, saturated),
    ]
    return _estimates(pairs)


def test_good_rois_pass(acquisition: list[ShiftEstimate]) -> None:
    verdicts = _judge(acquisition)
    assert [v.good for v in verdicts[:5]] == [True] * 5
    assert all(v.reason == "" for v in verdicts[:5])
    good, reason = verdicts[0]  # unpacks like a tuple
    assert good and reason == ""


def test_empty_noise_and_saturated_fovs_flagged(
    acquisition: list[ShiftEstimate],
) -> None:
    verdicts = _judge(acquisition)
    for v, est in zip(verdicts[5:], acquisition[5:], strict=True):
        assert not v.good
        assert "signal" in v.reason
        assert est.signal < 3.0
    assert acquisition[5].signal == 0.0  # constant moving image
    assert math.isnan(acquisition[5].ncc_before)
    assert acquisition[6].signal == pytest.approx(1.0, abs=0.3)  # pure noise


def test_injected_outlier_caught(acquisition: list[ShiftEstimate]) -> None:
    shifts = np.array([e.shift for e in acquisition])
    shifts[2] += (9.0, -6.0)
    verdicts = _judge(acquisition, shifts)
    assert not verdicts[2].good
    assert verdicts[2].reason.startswith("outlier: 10.")
    assert "from the median of the good ROIs" in verdicts[2].reason
    assert [verdicts[i].good for i in (0, 1, 3, 4)] == [True] * 4


def test_no_outlier_test_with_fewer_than_3_good(
    acquisition: list[ShiftEstimate],
) -> None:
    sel = [acquisition[0], acquisition[1], acquisition[5]]
    shifts = np.array([e.shift for e in sel])
    shifts[1] += 20.0
    verdicts = _judge(sel, shifts)
    assert [v.good for v in verdicts] == [True, True, False]


def test_max_shift_and_gain_checks() -> None:
    shifts = np.array([[57.0, 1.0], [3.0, -41.0], [1.0, 1.0], [2.0, 2.0], [0.0, 0.0]])
    nb = np.array([0.1, 0.1, 0.12, 0.04, 0.95])
    na = np.array([0.8, 0.8, 0.05, 0.05, 0.95])
    sig = np.full(5, 50.0)
    v = judge_estimates(shifts, nb, na, sig, max_shift_px=np.array([40.0, 50.0]))
    assert v[0] == Verdict(False, "shift 57.0 px beyond max_shift 40.0 px (axis 0)")
    assert v[1].good
    assert v[2].reason == "no gain in correlation from the shift (0.12 -> 0.05)"
    assert v[3].reason == "weak correlation after the shift (0.05 < 0.10)"
    assert v[4].good  # a true zero shift: no gain, but high correlation
    low = judge_estimates(shifts, nb, na, np.full(5, 0.8), max_shift_px=40.0)
    assert low[0].reason == "too little signal (0.8 < 3.0)"
    with pytest.raises(ValueError):
        judge_estimates(shifts, nb[:2], na, sig, max_shift_px=40.0)


def test_status_values() -> None:
    assert RegistrationStatus("fallback") is RegistrationStatus.FALLBACK
    assert RegistrationMethod("chi2_shift") is RegistrationMethod.CHI2_SHIFT
    assert RegistrationStatus.OK == "ok"
