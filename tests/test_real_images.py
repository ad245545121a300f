"""Shift estimation and verdicts on small crops of real images (not ours).

The images ship inside scikit-image (a test dependency): a texture, brightfield
tissue, a quantitative phase image of a cell, coins, a deep field of sparse
stars, a retinal fundus, a horse silhouette (one edge). Each pair is a crop and the
same crop moved by a known subpixel shift (cubic spline), with fresh camera
noise each, read at "level 2" (4x4 mean), as the task reads them by default.
The full corpus (24 images from 6 packages) runs in
benchmarks/registration_corpus.py, not here.
"""

import math

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage import color, data

from fractal_tasks.registration.shift import estimate_shift, judge_estimate

FOV = 224


def _grey(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image, dtype=np.float64)
    return color.rgb2gray(image[..., :3]) if image.ndim == 3 else image


IMAGES = {
    "texture (grass)": lambda: _grey(data.grass()),
    "brightfield tissue (IHC)": lambda: _grey(data.immunohistochemistry()),
    "quantitative phase (cell)": lambda: _grey(data.cell()),
    "coins": lambda: _grey(data.coins()),
    "sparse stars (Hubble)": lambda: _grey(data.hubble_deep_field()),
    "fundus (retina)": lambda: _grey(data.retina())[300:900, 0:600],
}


def _crop(image: np.ndarray, corner: tuple[int, int], shift) -> np.ndarray:
    """The FOV at ``corner`` of a stage moved by ``shift`` (level-0 px)."""
    whole = np.floor(shift).astype(int)
    y, x = corner[0] + whole[0] - 4, corner[1] + whole[1] - 4
    region = image[y : y + FOV + 8, x : x + FOV + 8]
    moved = ndi.shift(region, -(np.asarray(shift) - whole), order=3, mode="nearest")
    return moved[4 : 4 + FOV, 4 : 4 + FOV]


def _camera(content: np.ndarray, rng: np.random.Generator, gain: float = 1.0):
    scaled = (content - content.min()) / (np.ptp(content) + 1e-12)
    counts = rng.poisson(200 + 3000 * gain * scaled).astype(np.float64)
    return np.clip(counts + rng.normal(0, 3, counts.shape), 0, 65535).astype(np.uint16)


def _level2(a: np.ndarray) -> np.ndarray:
    n = a.shape[0] // 4
    return a[: 4 * n, : 4 * n].reshape(n, 4, n, 4).mean(axis=(1, 3))


def _pair(image, shift, seed, moving_content=None):
    rng = np.random.default_rng(seed)
    corner = (image.shape[0] // 2 - FOV // 2, image.shape[1] // 2 - FOV // 2)
    reference = _camera(_crop(image, corner, (0.0, 0.0)), rng)
    moving = _crop(image, corner, shift) if moving_content is None else moving_content
    return _level2(reference), _level2(_camera(moving, rng, gain=0.8))


@pytest.mark.parametrize("kind", sorted(IMAGES))
def test_real_image_kinds_register_within_half_a_pixel(kind):
    image = IMAGES[kind]()
    for seed, shift in enumerate([(7.3, -11.6), (-13.8, 4.25)]):
        reference, moving = _pair(image, shift, seed)
        estimate = estimate_shift(reference, moving)
        found = np.asarray(estimate.shift) * 4  # level-2 px -> level-0 px
        assert np.linalg.norm(found - shift) < 0.5, (kind, found, shift)
        assert judge_estimate(estimate).good, (kind, judge_estimate(estimate))


def test_failures_are_caught():
    image = IMAGES["brightfield tissue (IHC)"]()
    shift = (6.6, -9.1)
    blank = np.zeros((FOV, FOV))
    other = _grey(data.grass())[:FOV, :FOV]  # another sample
    defocused = ndi.gaussian_filter(
        _crop(image, (image.shape[0] // 2 - FOV // 2,) * 2, shift), 16
    )
    yy, xx = np.mgrid[-1 : 1 : FOV * 1j, -1 : 1 : FOV * 1j]
    stationary_field = np.exp(-((yy - 0.3) ** 2 + (xx + 0.2) ** 2) / 1.5)
    cases = {"blank": blank, "other sample": other, "defocused": defocused}
    for name, content in cases.items():
        reference, moving = _pair(image, shift, 3, moving_content=content)
        verdict = judge_estimate(estimate_shift(reference, moving))
        assert not verdict.good, name
    # a flat field that does not move with the stage, in both cycles
    rng = np.random.default_rng(5)
    reference, moving = (_level2(_camera(stationary_field, rng)) for _ in range(2))
    assert not judge_estimate(estimate_shift(reference, moving)).good


def _edge_pair(
    direction: str, seed: int = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A crop of scikit-image's horse silhouette that holds one edge only.

    Returns reference, moving (moved by 7.3 px along or across the edge, at
    level 0, fresh noise each) and the true shift.
    """
    image = ndi.gaussian_filter((~data.horse()).astype(np.float64) * 100, 1.0)
    y, x, n = 20, 68, 96  # the horse's back: a nearly straight edge
    gy, gx = np.gradient(image[y : y + n, x : x + n])
    tensor = [[np.sum(gy * gy), np.sum(gy * gx)], [np.sum(gy * gx), np.sum(gx * gx)]]
    values, vectors = np.linalg.eigh(tensor)
    assert values[0] < 0.05 * values[1]  # one edge dominates the crop
    shift = 7.3 * vectors[:, 0 if direction == "along" else 1]
    region = image[y - 20 : y + n + 20, x - 20 : x + n + 20]
    moved = ndi.shift(region, -shift, order=3, mode="nearest")
    rng = np.random.default_rng(seed)
    noise = [rng.normal(0, 1, (n, n)) for _ in range(2)]
    reference = region[20 : 20 + n, 20 : 20 + n] + noise[0]
    return reference, moved[20 : 20 + n, 20 : 20 + n] + noise[1], shift


def test_an_edge_shifted_across_itself_is_ok_and_exact():
    reference, moving, shift = _edge_pair("across")
    estimate = estimate_shift(reference, moving)
    assert np.linalg.norm(np.asarray(estimate.shift) - shift) < 0.1
    assert judge_estimate(estimate).good
    assert estimate.uncertainty_px < 0.1


def test_an_edge_shifted_along_itself_is_not_ok():
    reference, moving, shift = _edge_pair("along")
    estimate = estimate_shift(reference, moving)
    error = np.linalg.norm(np.asarray(estimate.shift) - shift)
    assert error > 1.0  # the content cannot fix it: the frame decides
    verdict = judge_estimate(estimate)
    assert not verdict.good
    assert verdict.reason.startswith("the content does not fix the shift along")
    # the uncertainty measures the error, along the edge
    assert 0.5 * error < estimate.uncertainty_px < 2 * error
    along = math.degrees(math.atan2(shift[0], shift[1])) % 180
    turn = abs(estimate.uncertainty_direction_deg - along) % 180
    assert min(turn, 180 - turn) < 15
