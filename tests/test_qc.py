import shutil

import numpy as np
import pytest
from _workflow import calculate
from PIL import Image, ImageDraw
from skimage.io import imread

from fractal_tasks.hcs.errors import RegistrationInputError
from fractal_tasks.tools.qc import (
    STATUS_COLOURS,
    draw_text,
    has_glyph,
    main,
    qc_font,
    render_well_qc,
    text_size,
    well_qc_panels,
)
from fractal_tasks.tools.synthetic import build_synthetic_plate


@pytest.fixture(scope="module")
def plates(tmp_path_factory):
    """A registered plate, and an untouched copy of it (no translations)."""
    root = tmp_path_factory.mktemp("qc")
    plate = build_synthetic_plate(
        root / "p.zarr",
        wells=("B03",),
        n_acquisitions=3,
        fovs=(2, 2),
        fov_shape=(64, 80),
        seed=1,
    )
    shutil.copytree(plate.plate_url, root / "raw.zarr")
    calculate(plate, level_path="0")
    return plate, f"{plate.plate_url}/B/03", str(root / "raw.zarr/B/03")


def test_png_is_a_legible_picture(plates, tmp_path):
    _, well, _ = plates
    out = render_well_qc(
        well, str(tmp_path / "sub" / "qc.png"), wavelength_id="A01_C01"
    )
    assert out.exists()
    image = imread(out)
    assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8
    height, width = image.shape[:2]
    assert 400 < height < 4000 and 400 < width < 4000
    assert image.std() > 20
    colours = np.unique(image.reshape(-1, 3), axis=0)
    assert len(colours) > 500
    # status frames drawn (synthetic shifts are all found: green frames)
    frame = np.all(image == STATUS_COLOURS["ok"], axis=-1)
    assert frame.sum() > 8 * 4 * 100


def test_after_overlays_agree_better_than_before(plates):
    plate, well, _ = plates
    qc = well_qc_panels(well, wavelength_id="A01_C01", level_path="0")
    assert qc.fovs == plate.fov_names and qc.image_paths == ["1", "2"]
    assert qc.pixel_um["x"] == pytest.approx(plate.pixel_size)
    ratios = []
    for (fov, path), panel in qc.panels.items():
        url = f"{well}/{path}"
        true = np.array(plate.true_translation_px(url, fov)[1:])
        shown = np.array([panel.translation_px["y"], panel.translation_px["x"]])
        np.testing.assert_allclose(shown, true, atol=0.3)
        assert panel.status == "ok"
        assert panel.ncc_after > panel.ncc_before or not true.any()
        assert panel.reference.shape == panel.before.shape == panel.after.shape
        assert panel.reference.shape == (64, 80)
        assert 0 <= panel.after.min() and panel.after.max() <= 1
        # the uncovered strip has the width of the shift
        assert (~panel.covered).sum() >= 0.9 * (
            np.abs(true[0]) * 80 + np.abs(true[1]) * 64 - np.abs(true).prod()
        )
        # shifts here are 1-2 px and the cycles differ in gain and noise, so
        # the overlays improve clearly but are never identical
        ratio = panel.mismatch("after") / panel.mismatch("before")
        if np.abs(true).max() >= 1:
            assert ratio < 0.92
            ratios.append(ratio)
        else:
            assert ratio < 1.05
    assert len(ratios) >= 4 and np.mean(ratios) < 0.85


def test_level_is_chosen_or_taken(plates):
    _, well, _ = plates
    assert well_qc_panels(well, wavelength_id="A01_C01").level_path == "0"
    coarse = well_qc_panels(well, wavelength_id="DAPI", level_path="1")
    panel = coarse.panels["FOV_1", "1"]
    assert panel.reference.shape == (32, 40)
    assert panel.translation_px["x"] * 2 == pytest.approx(
        well_qc_panels(well, wavelength_id="DAPI")
        .panels["FOV_1", "1"]
        .translation_px["x"]
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"input_roi_table": "nope"}, "ROI table 'nope' not found"),
        ({"wavelength_id": "NOPE"}, "No channel with wavelength id or label 'NOPE'"),
        ({"level_path": "9"}, "level_path='9' does not exist"),
        ({"reference_acquisition": 7}, "no image of reference_acquisition=7"),
    ],
)
def test_bad_input(plates, tmp_path, kwargs, match):
    _, well, _ = plates
    args = {"wavelength_id": "A01_C01", **kwargs}
    with pytest.raises(RegistrationInputError, match=match):
        render_well_qc(well, str(tmp_path / "x.png"), **args)
    assert not (tmp_path / "x.png").exists()


def test_no_translations_yet(plates, tmp_path):
    _, _, raw = plates
    with pytest.raises(RegistrationInputError, match="run 'Calculate Registration"):
        render_well_qc(raw, str(tmp_path / "x.png"), wavelength_id="A01_C01")


def test_missing_well(tmp_path):
    with pytest.raises(RegistrationInputError, match="does not exist"):
        render_well_qc(str(tmp_path / "no.zarr/B/03"), "x.png", wavelength_id="A")


def test_command_line(plates, tmp_path, capsys):
    _, well, raw = plates
    out = tmp_path / "cli.png"
    assert (
        main([well, str(out), "--wavelength-id", "A01_C01", "--level-path", "1"]) == 0
    )
    assert imread(out).shape[2] == 3
    assert main([raw, str(tmp_path / "y.png"), "--wavelength-id", "A01_C01"]) == 2
    assert "Calculate Registration" in capsys.readouterr().err


def test_text_is_drawn_where_measured():
    font = qc_font()
    picture = Image.new("RGB", (300, 30))
    text = "NCC 0.52 → 1.00, x +3.30 µm"
    end = draw_text(ImageDraw.Draw(picture), text, 2, 3, (255, 255, 255), font)
    height, width = text_size(text, font)
    assert end == 3 + width and 10 < height < 30
    canvas = np.asarray(picture)
    assert canvas.any() and not canvas[:, end + 1 :].any()


def test_micro_sign_is_a_glyph_of_the_font():
    font = qc_font()
    if not has_glyph(font, "µ"):
        pytest.skip(f"{font.getname()} has no µ (DejaVu Sans is not installed)")
    # drawn as itself, not as the missing-glyph box nor as a plain "u"
    assert not has_glyph(font, "\uffff")
    assert bytes(font.getmask("µ")) != bytes(font.getmask("u"))


@pytest.mark.parametrize("model", ["translation", "rigid"])
def test_rotated_cycles_show_their_angle_and_corners(make_plate, tmp_path, model):
    plate = make_plate(
        n_acquisitions=2,
        fov_shape=(128, 160),
        levels=2,
        rotation_deg=(0.0, 0.8),
        subpixel=True,
    )
    calculate(plate, level_path="0", transform=model)
    well = f"{plate.plate_url}/B/03"
    qc = well_qc_panels(well, wavelength_id="A01_C01", level_path="0")
    for panel in qc.panels.values():
        assert panel.measured_rotation_deg == pytest.approx(0.8, abs=0.08)
        # the corners move by the rotation before; after, by what is left of it
        moves = [np.hypot(*m) for _, m in panel.corner_moves(0.8)]
        radius = np.hypot(64, 80)
        assert min(moves) == pytest.approx(2 * radius * np.sin(np.radians(0.4)), 0.01)
        if model == "rigid":
            assert panel.status == "ok"
            assert panel.rotation_deg == pytest.approx(0.8, abs=0.08)
            assert panel.residual_px < 0.5
            # the stored rotation is undone in the after overlay
            assert panel.mismatch("after") < 0.8 * panel.mismatch("before")
        else:
            assert panel.status == "rotated" and panel.rotation_deg == 0.0
            assert panel.residual_px > 1.0
    out = render_well_qc(well, str(tmp_path / "qc.png"), wavelength_id="A01_C01")
    image = imread(out)
    colour = STATUS_COLOURS["ok" if model == "rigid" else "rotated"]
    assert np.all(image == colour, axis=-1).sum() > 4 * 4 * 100
