"""Tests of the pure shift-estimation core (fractal_tasks.registration.shift)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage as ndi

from fractal_tasks.registration.shift import (
    RegistrationMethod,
    RegistrationStatus,
    ShiftEstimate,
    Verdict,
    estimate_shift,
    judge_estimate,
    judge_estimates,
    ncc,
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


def test_an_image_below_8_px_on_every_axis_gets_an_estimate() -> None:
    # no axis long enough for a taper or the slide's crops: it must not crash
    image = np.random.default_rng(3).random((6, 7))
    est = estimate_shift(image, image)
    assert est.shift == (0.0, 0.0)


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
# ncc
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


# --------------------------------------------------------------------------
# judging
# --------------------------------------------------------------------------
def _estimates(pairs: list[tuple[np.ndarray, np.ndarray]]) -> list[ShiftEstimate]:
    return [estimate_shift(r, m) for r, m in pairs]


def _judge(
    ests: list[ShiftEstimate], shifts: np.ndarray | None = None, **kw
) -> list[Verdict]:
    return judge_estimates(
        ests,
        np.array([e.shift for e in ests]) if shifts is None else shifts,
        **({"max_shift": 30.0, "outlier_floor": 3.0} | kw),
    )


@pytest.fixture(scope="module")
def acquisition() -> list[ShiftEstimate]:
    """Five good FOVs of one acquisition (similar shifts), then empty, noise-only,
    saturated and unrelated ones."""
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
        (ref_ok, _pair((96, 96), (0.0, 0.0), seed=99)[1]),
    ]
    return _estimates(pairs)


def test_good_rois_pass(acquisition: list[ShiftEstimate]) -> None:
    verdicts = _judge(acquisition)
    assert [v.good for v in verdicts[:5]] == [True] * 5
    assert all(v.reason == "" for v in verdicts[:5])
    assert all(e.peak_significance > 15 for e in acquisition[:5])
    assert all(e.uncertainty_px < 0.5 for e in acquisition[:5])


def test_empty_noise_saturated_and_unrelated_fovs_flagged(
    acquisition: list[ShiftEstimate],
) -> None:
    verdicts = _judge(acquisition)
    assert math.isnan(acquisition[5].ncc_before)  # constant moving image
    assert verdicts[5].reason.startswith("correlation undefined")
    for v, est in zip(verdicts[6:], acquisition[6:], strict=True):
        assert not v.good
        assert est.peak_significance < 10.0
    for i in (6, 8):
        assert verdicts[i].reason.startswith("no significant correlation peak")
    # the saturated FOV: 97% of its pixels at the maximum, named as the reason
    assert acquisition[7].saturated == pytest.approx(1 - 1 / 35, abs=0.01)
    assert verdicts[7].reason.startswith("saturated: 97% of the overlap")


def test_a_smooth_gradient_has_no_unique_answer() -> None:
    """A vignetting-like field moved by a known shift, with a camera's shot
    noise: the only match is smooth shading, which is not accepted."""
    yy, xx = np.mgrid[:160, :160]
    field = np.exp(-((yy - 60) ** 2 + (xx - 90) ** 2) / (2 * 45.0**2))
    for seed in range(3):
        rng = np.random.default_rng(seed)
        ref, mov = (
            rng.poisson(200 + 3000 * f).astype(np.uint16)
            for f in (field[20:120, 20:120], field[23:123, 16:116])
        )
        est = estimate_shift(ref, mov)
        assert not judge_estimate(est).good
        assert est.peak_significance < 10.0


def test_saturation_share_of_the_overlap() -> None:
    """Clipped pixels are counted in either image, on the overlap: most of it
    clipped is named as the reason even when a peak stands out; a clipped
    minority (bright nuclei at the camera's limit) is not."""
    ref, mov = _pair((96, 96), (4.0, -6.0), seed=5, extra=False)
    mostly = np.minimum(mov, np.quantile(mov, 0.1)).astype(np.uint16)
    est = estimate_shift(ref, mostly)
    assert est.saturated == pytest.approx(0.9, abs=0.03)
    assert judge_estimate(est).reason.startswith("saturated: 9")
    bright = np.minimum(ref, np.quantile(ref, 0.95)).astype(np.uint16)
    est = estimate_shift(bright, mov)
    assert est.saturated == pytest.approx(0.05, abs=0.01)
    assert judge_estimate(est).good
    _assert_close(est, (4.0, -6.0), 0.2)
    mask = ref > np.median(ref)
    assert estimate_shift(mask, mask).saturated == 0.0  # a mask is not clipped


def test_injected_outlier_caught(acquisition: list[ShiftEstimate]) -> None:
    shifts = np.array([e.shift for e in acquisition])
    shifts[2] += (9.0, -6.0)
    verdicts = _judge(acquisition, shifts)
    assert not verdicts[2].good
    assert verdicts[2].reason.startswith("outlier: 10.")
    assert "from the median of the good ROIs" in verdicts[2].reason
    assert [verdicts[i].good for i in (0, 1, 3, 4)] == [True] * 4


def test_independent_shifts_are_not_outliers(acquisition: list[ShiftEstimate]) -> None:
    """ROIs that moved independently spread widely: none is an outlier."""
    shifts = np.array([[5.0, -7.0], [-12.0, 9.0], [14.0, 3.0], [-3.0, -15.0], [8, 11]])
    verdicts = _judge(acquisition[:5], shifts)
    assert all(v.good for v in verdicts)


def test_no_outlier_test_with_fewer_than_3_good(
    acquisition: list[ShiftEstimate],
) -> None:
    sel = [acquisition[0], acquisition[1], acquisition[5]]
    shifts = np.array([e.shift for e in sel])
    shifts[1] += 20.0
    verdicts = _judge(sel, shifts)
    assert [v.good for v in verdicts] == [True, True, False]


def _evidence(**kw: float) -> ShiftEstimate:
    values = dict(
        ncc_before=0.1,
        ncc_after=0.8,
        peak_significance=30.0,
        peak_elongation=1.2,
    )
    return ShiftEstimate(shift=(1.0, 1.0), **(values | kw))


def test_each_check_names_its_reason() -> None:
    cases = [
        (_evidence(), ""),
        (_evidence(peak_significance=5.0), "no significant correlation peak (5.0"),
        (_evidence(peak_elongation=4.5), ""),  # a ridge alone is not a verdict
        (
            _evidence(uncertainty_px=0.8, uncertainty_direction_deg=45.0),
            "the content does not fix the shift along 45° (from x towards y): "
            "there the match slides 0.80 level-0 px",
        ),
        (_evidence(uncertainty_px=0.5), ""),
        (_evidence(ncc_before=0.12, ncc_after=0.05), "no gain in correlation"),
        (_evidence(ncc_before=0.04, ncc_after=0.05), "weak correlation after"),
        (_evidence(ncc_before=0.95, ncc_after=0.95), ""),  # true zero shift
        (_evidence(ncc_after=float("nan")), "correlation undefined"),
        (_evidence(saturated=0.6), "saturated: 60% of the overlap"),
        (_evidence(saturated=0.5), ""),
    ]
    for estimate, reason in cases:
        verdict = judge_estimate(estimate)
        assert verdict.good == (reason == "")
        assert verdict.reason.startswith(reason)


def test_max_shift_check_and_shapes(acquisition: list[ShiftEstimate]) -> None:
    ests = [_evidence()] * 2
    shifts = np.array([[57.0, 1.0], [3.0, -41.0]])
    v = judge_estimates(ests, shifts, max_shift=np.array([40.0, 50.0]), outlier_floor=3)
    assert v[0] == Verdict(False, "shift 57.0 beyond max_shift 40.0 (axis 0)")
    assert v[1].good
    with pytest.raises(ValueError):
        judge_estimates(ests, shifts[:1], max_shift=40.0, outlier_floor=3)


def test_status_values() -> None:
    assert RegistrationStatus("fallback") is RegistrationStatus.FALLBACK
    assert RegistrationMethod("chi2_shift") is RegistrationMethod.CHI2_SHIFT
    assert RegistrationStatus.OK == "ok"


@pytest.mark.parametrize("n", [20, 57, 128])
def test_taper_is_scipys_tukey_and_moves_with_its_offset(n):
    from scipy.signal.windows import tukey

    from fractal_tasks.registration.shift import _ramp, _tukey, _window_at

    ramp = _ramp(n)
    np.testing.assert_allclose(
        _tukey(n, ramp), tukey(n, 2 * ramp / (n - 1)), atol=1e-12
    )
    # moved by -2 px: the same values two samples earlier, zero past the end
    (moved,) = _window_at((n,), [2.0])
    np.testing.assert_allclose(moved[:-2], _tukey(n, ramp)[2:], atol=1e-6)
    assert not moved[-2:].any()
    # a fractional offset samples the same curve in between
    (half,) = _window_at((n,), [0.5])
    assert np.all(half[: ramp - 1] > _tukey(n, ramp)[: ramp - 1])
