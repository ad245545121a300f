"""Quality-control picture of the registration of one well.

``python -m fractal_tasks.qc WELL_URL OUTPUT.png --wavelength-id A01_C01`` (or
:func:`render_well_qc`) draws, for every field of view (FOV, one row of the ROI
table; rows of the picture) and every non-reference image of the well (columns),
the registration channel of the reference in green over that of the
acquisition in magenta:

* BEFORE: both images cut at the same FOV box, as acquired.
* AFTER: the acquisition's crop moved by the translation stored by "Calculate
  Registration (image-based)"; pixels the moved crop does not cover are 0.

Where the two images agree the overlay is grey to white; a misalignment shows
green and magenta fringes. A yellow arrow from the FOV centre shows the stored
translation, magnified (the factor is written in the legend). Below the
panels, the translation in micrometres and in pixels of the shown pyramid
level, the status (``ok``/``fallback``/``failed``, also the colour of the
frame: green/orange/red) and the normalized cross-correlation before and after
the shift, as stored by the calculation.

Only numpy and scikit-image are used: the picture is an RGB array composed
here, with text from a small built-in 5x7 bitmap font.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ngio import open_ome_zarr_container
from scipy import ndimage
from skimage.draw import line_aa

from fractal_tasks._calculate import (
    NCC_AFTER_COLUMN,
    NCC_BEFORE_COLUMN,
    STATUS_COLUMN,
    channel_index,
    channel_reader,
    level_image,
)
from fractal_tasks._errors import RegistrationInputError
from fractal_tasks._geometry import SPATIAL_AXES, crop_to_common, roi_box
from fractal_tasks._hcs import open_well, reference_path
from fractal_tasks._roi_tables import (
    by_name,
    load_rois,
    require_same_names,
    slices_um,
    spatial_geometry,
    translation_um,
)

logger = logging.getLogger(__name__)

PANEL_PIXEL_BUDGET = 2_500_000  # image pixels of all panels, before upscaling
NORMALIZE_PERCENTILES = (1.0, 99.5)
VECTOR_SCALES = (5, 4, 3, 2, 1)  # largest that keeps every arrow in its panel

STATUS_COLOURS = {
    "ok": (40, 200, 60),
    "fallback": (255, 150, 0),
    "failed": (230, 30, 30),
}
UNKNOWN_COLOUR = (140, 140, 140)
ARROW_COLOUR = (255, 235, 0)
TEXT_COLOUR = (235, 235, 235)
DIM_TEXT_COLOUR = (160, 160, 160)
BACKGROUND = (24, 24, 28)

# ---------------------------------------------------------------------------
# A 5x7 bitmap font. Lower-case letters are drawn as capitals, except the
# three unit glyphs below (private code points), used for "µm", "px" and "x5".
# ---------------------------------------------------------------------------

_M, _P, _X = "\x01", "\x02", "\x03"
UM = "µ" + _M
PX = _P + _X
TIMES = _X

_FONT_SOURCE = {
    " ": "..... ..... ..... ..... ..... ..... .....",
    "0": ".###. #...# #..## #.#.# ##..# #...# .###.",
    "1": "..#.. .##.. ..#.. ..#.. ..#.. ..#.. .###.",
    "2": ".###. #...# ....# ...#. ..#.. .#... #####",
    "3": "##### ...#. ..#.. ...#. ....# #...# .###.",
    "4": "...#. ..##. .#.#. #..#. ##### ...#. ...#.",
    "5": "##### #.... ####. ....# ....# #...# .###.",
    "6": "..##. .#... #.... ####. #...# #...# .###.",
    "7": "##### ....# ...#. ..#.. .#... .#... .#...",
    "8": ".###. #...# #...# .###. #...# #...# .###.",
    "9": ".###. #...# #...# .#### ....# ...#. .##..",
    "A": ".###. #...# #...# ##### #...# #...# #...#",
    "B": "####. #...# #...# ####. #...# #...# ####.",
    "C": ".###. #...# #.... #.... #.... #...# .###.",
    "D": "###.. #..#. #...# #...# #...# #..#. ###..",
    "E": "##### #.... #.... ####. #.... #.... #####",
    "F": "##### #.... #.... ####. #.... #.... #....",
    "G": ".###. #...# #.... #.### #...# #...# .####",
    "H": "#...# #...# #...# ##### #...# #...# #...#",
    "I": ".###. ..#.. ..#.. ..#.. ..#.. ..#.. .###.",
    "J": "..### ...#. ...#. ...#. ...#. #..#. .##..",
    "K": "#...# #..#. #.#.. ##... #.#.. #..#. #...#",
    "L": "#.... #.... #.... #.... #.... #.... #####",
    "M": "#...# ##.## #.#.# #.#.# #...# #...# #...#",
    "N": "#...# #...# ##..# #.#.# #..## #...# #...#",
    "O": ".###. #...# #...# #...# #...# #...# .###.",
    "P": "####. #...# #...# ####. #.... #.... #....",
    "Q": ".###. #...# #...# #...# #.#.# #..#. .##.#",
    "R": "####. #...# #...# ####. #.#.. #..#. #...#",
    "S": ".#### #.... #.... .###. ....# ....# ####.",
    "T": "##### ..#.. ..#.. ..#.. ..#.. ..#.. ..#..",
    "U": "#...# #...# #...# #...# #...# #...# .###.",
    "V": "#...# #...# #...# #...# #...# .#.#. ..#..",
    "W": "#...# #...# #...# #.#.# #.#.# #.#.# .#.#.",
    "X": "#...# #...# .#.#. ..#.. .#.#. #...# #...#",
    "Y": "#...# #...# .#.#. ..#.. ..#.. ..#.. ..#..",
    "Z": "##### ....# ...#. ..#.. .#... #.... #####",
    ".": "..... ..... ..... ..... ..... .##.. .##..",
    ",": "..... ..... ..... ..... .##.. ..#.. .#...",
    "-": "..... ..... ..... .###. ..... ..... .....",
    "+": "..... ..#.. ..#.. ##### ..#.. ..#.. .....",
    ">": ".#... ..#.. ...#. ....# ...#. ..#.. .#...",
    "<": "...#. ..#.. .#... #.... .#... ..#.. ...#.",
    ":": "..... .##.. .##.. ..... .##.. .##.. .....",
    "=": "..... ..... ##### ..... ##### ..... .....",
    "(": "...#. ..#.. .#... .#... .#... ..#.. ...#.",
    ")": ".#... ..#.. ...#. ...#. ...#. ..#.. .#...",
    "/": "..... ....# ...#. ..#.. .#... #.... .....",
    "_": "..... ..... ..... ..... ..... ..... #####",
    "%": "##... ##..# ...#. ..#.. .#... #..## ...##",
    "?": ".###. #...# ....# ...#. ..#.. ..... ..#..",
    "µ": "..... ..... #...# #...# #..## ###.# #....",
    _M: "..... ..... ##.#. #.#.# #.#.# #.#.# #.#.#",
    _P: "..... ..... ####. #...# ####. #.... #....",
    _X: "..... ..... #...# .#.#. ..#.. .#.#. #...#",
}
GLYPH_HEIGHT, GLYPH_WIDTH = 7, 5
_GLYPHS = {
    char: np.array([[c == "#" for c in row] for row in rows.split()], bool)
    for char, rows in _FONT_SOURCE.items()
}


def _glyph(char: str) -> np.ndarray:
    """Bitmap of one character (capitals for lower case, '?' when unknown)."""
    if char in _GLYPHS:
        return _GLYPHS[char]
    return _GLYPHS.get(char.upper(), _GLYPHS["?"])


def text_size(text: str, scale: int = 1) -> tuple[int, int]:
    """Height and width in pixels of one line of text at an integer scale."""
    return GLYPH_HEIGHT * scale, max(0, len(text) * (GLYPH_WIDTH + 1) - 1) * scale


def draw_text(
    canvas: np.ndarray,
    text: str,
    top: int,
    left: int,
    colour: tuple[int, int, int] = TEXT_COLOUR,
    scale: int = 1,
) -> int:
    """Write one line of text into an RGB canvas (clipped at its edges).

    Args:
        canvas: ``(height, width, 3)`` uint8 array, changed in place.
        text: The characters; unknown ones are drawn as ``?``.
        top: Row of the top of the glyphs.
        left: Column of the left edge of the first glyph.
        colour: RGB colour of the glyph pixels.
        scale: Integer magnification of the 5x7 glyphs.

    Returns:
        The column just right of the text (where a next piece can start).
    """
    x = left
    for char in text:
        bitmap = np.kron(_glyph(char), np.ones((scale, scale), bool))
        _paint(canvas, bitmap, top, x, colour)
        x += (GLYPH_WIDTH + 1) * scale
    return x


def _paint(canvas: np.ndarray, mask: np.ndarray, top: int, left: int, colour) -> None:
    """Set the pixels of ``mask`` placed at (top, left) to ``colour``, clipped."""
    height, width = canvas.shape[:2]
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + mask.shape[0], height), min(left + mask.shape[1], width)
    if y0 >= y1 or x0 >= x1:
        return
    part = mask[y0 - top : y1 - top, x0 - left : x1 - left]
    canvas[y0:y1, x0:x1][part] = colour


Segment = tuple[str, tuple[int, int, int]]


def _wrap(segments: list[Segment], width: int, scale: int) -> list[list[Segment]]:
    """Split coloured text into lines no wider than ``width`` (at word breaks)."""
    advance = (GLYPH_WIDTH + 1) * scale
    per_line = max(1, (width + scale) // advance)
    lines: list[list[Segment]] = [[]]
    used = 0
    for text, colour in segments:
        for word in text.split(" "):
            if not word:
                continue
            need = len(word) + (1 if used else 0)
            if used and used + need > per_line:
                lines.append([])
                used, need = 0, len(word)
            lines[-1].append(((" " if used else "") + word, colour))
            used += need
    return lines


def _draw_lines(
    canvas: np.ndarray,
    lines: list[list[Segment]],
    top: int,
    left: int,
    scale: int,
) -> int:
    """Draw wrapped lines of coloured segments; return the row below them."""
    for line in lines:
        x = left
        for text, colour in line:
            x = draw_text(canvas, text, top, x, colour, scale)
        top += _line_height(scale)
    return top


def _line_height(scale: int) -> int:
    return (GLYPH_HEIGHT + 3) * scale


# ---------------------------------------------------------------------------
# Reading the well: one panel per FOV and non-reference image.
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class QcPanel:
    """One FOV of one acquisition, ready to draw.

    The three images are 2D ``(y, x)`` float arrays in ``[0, 1]`` of equal
    shape, at the pyramid level of the :class:`WellQc` (3D images are shown as
    maximum-intensity projections along z).

    Attributes:
        fov: ROI name, e.g. ``FOV_1``.
        image_path: Path of the acquisition's image in the well, e.g. ``1``.
        reference_path: Path of the reference image it is compared with.
        acquisition: Acquisition id of the image.
        reference: Reference crop, normalized between its percentiles.
        before: Acquisition crop of the same FOV box, normalized.
        after: ``before`` moved by the stored translation; uncovered pixels 0.
        covered: Where ``after`` holds acquisition pixels.
        translation_um: Stored translation per spatial axis, in µm.
        translation_px: The same in pixels of the shown level.
        status: ``ok``, ``fallback``, ``failed`` or ``unknown``.
        ncc_before: Stored correlation before the shift (NaN when absent).
        ncc_after: Stored correlation after the shift (NaN when absent).
    """

    fov: str
    image_path: str
    reference_path: str
    acquisition: int
    reference: np.ndarray
    before: np.ndarray
    after: np.ndarray
    covered: np.ndarray
    translation_um: dict[str, float]
    translation_px: dict[str, float]
    status: str
    ncc_before: float
    ncc_after: float

    def mismatch(self, which: str) -> float:
        """Mean absolute green-magenta difference over the covered pixels.

        Args:
            which: ``"before"`` or ``"after"``.
        """
        moving = self.before if which == "before" else self.after
        if not self.covered.any():
            return float("nan")
        return float(np.abs(self.reference - moving)[self.covered].mean())


@dataclass(frozen=True)
class WellQc:
    """All panels of one well, with what the picture's header needs.

    Attributes:
        well_url: The well.
        wavelength_id: Registration channel shown.
        input_roi_table: ROI table whose rows are the FOVs.
        reference_acquisition: Acquisition id of the reference.
        level_path: Pyramid level shown.
        pixel_um: Pixel size of that level per spatial axis, in µm.
        n_z: Number of z planes of the reference (projected when above 1).
        fovs: ROI names in table order (rows of the picture).
        image_paths: Non-reference images in well order (columns).
        panels: Panel per ``(fov, image_path)``.
        skipped: Non-reference images left out (no stored translation).
    """

    well_url: str
    wavelength_id: str
    input_roi_table: str
    reference_acquisition: int
    level_path: str
    pixel_um: dict[str, float]
    n_z: int
    fovs: list[str]
    image_paths: list[str]
    panels: dict[tuple[str, str], QcPanel]
    skipped: list[str]


def _normalize(image: np.ndarray) -> tuple[float, float]:
    """Intensities at the normalizing percentiles of a crop (finite pixels)."""
    values = image[np.isfinite(image)]
    if values.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(values, NORMALIZE_PERCENTILES)
    return float(low), float(high)


def _scaled(image: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map ``[low, high]`` to ``[0, 1]`` (clipped; NaN becomes 0)."""
    if not high > low:
        out = np.zeros(image.shape, np.float32)
    else:
        out = np.clip((image - low) / (high - low), 0.0, 1.0).astype(np.float32)
    return np.nan_to_num(out, nan=0.0)


def _project(volume: np.ndarray) -> np.ndarray:
    """Maximum along z of a ``(z, y, x)`` array, ignoring NaN (all-NaN: NaN)."""
    if volume.shape[0] == 1:
        return volume[0]
    finite = np.isfinite(volume)
    projected = np.where(finite, volume, -np.inf).max(axis=0)
    return np.where(finite.any(axis=0), projected, np.nan)


def _as_zyx(pixels: np.ndarray) -> np.ndarray:
    """Pixels as float32 ``(z, y, x)`` (a 2D crop gets one plane)."""
    out = np.asarray(pixels, np.float32)
    return out[None] if out.ndim == 2 else out


def _make_panel(
    fov: str,
    image_path: str,
    ref_path: str,
    acquisition: int,
    ref_pixels: np.ndarray,
    acq_pixels: np.ndarray,
    shift_um: dict[str, float],
    pixel_um: dict[str, float],
    extra: dict,
) -> QcPanel:
    """Normalize both crops, move the acquisition's and project along z."""
    reference, moving = _as_zyx(ref_pixels), _as_zyx(acq_pixels)
    shift_px = {a: shift_um.get(a, 0.0) / pixel_um[a] for a in pixel_um}
    vector = [shift_px.get(a, 0.0) for a in SPATIAL_AXES]
    # output[q] = input[q - shift]: acquisition pixel p shows reference p + t.
    moved = ndimage.shift(moving, vector, order=1, mode="constant", cval=np.nan)
    ref_2d, before_2d, after_2d = (_project(v) for v in (reference, moving, moved))
    covered = np.isfinite(after_2d)
    low, high = _normalize(before_2d)
    return QcPanel(
        fov=fov,
        image_path=image_path,
        reference_path=ref_path,
        acquisition=acquisition,
        reference=_scaled(ref_2d, *_normalize(ref_2d)),
        before=_scaled(before_2d, low, high),
        after=_scaled(after_2d, low, high),
        covered=covered,
        translation_um={a: float(shift_um.get(a, 0.0)) for a in pixel_um},
        translation_px=shift_px,
        status=_status(extra.get(STATUS_COLUMN)),
        ncc_before=_number(extra.get(NCC_BEFORE_COLUMN)),
        ncc_after=_number(extra.get(NCC_AFTER_COLUMN)),
    )


def _status(value: object) -> str:
    text = str(value).strip().lower() if isinstance(value, str) else ""
    return text if text in STATUS_COLOURS else "unknown"


def _number(value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return float("nan")


def _choose_level(container, rois: dict, n_columns: int, url: str) -> str:
    """Finest level whose panels fit ``PANEL_PIXEL_BUDGET`` (else the coarsest)."""
    for path in container.level_paths:
        pixel_um, shape = spatial_geometry(container.get_image(path=path))
        area = 0
        for roi in rois.values():
            box = roi_box(slices_um(roi), pixel_um, shape)
            area += max(box.shape[-1], 0) * max(box.shape[-2], 0)
        if area * 2 * max(n_columns, 1) <= PANEL_PIXEL_BUDGET:
            return path
    logger.info("Even the coarsest level of %s exceeds the pixel budget.", url)
    return container.level_paths[-1]


def _stored_translations(rois: dict, url: str, table: str) -> dict | None:
    """Translation per ROI name, None if no ROI has one.

    Raises:
        RegistrationInputError: If only some ROIs have a translation.
    """
    found = {name: translation_um(roi) for name, roi in rois.items()}
    missing = sorted(name for name, value in found.items() if value is None)
    if len(missing) == len(found):
        return None
    if missing:
        raise RegistrationInputError(
            f"ROI table {table!r} of {url!r} has no translation for {missing} but "
            "has one for other ROIs. Re-run 'Calculate Registration (image-based)' "
            "on this acquisition first."
        )
    return found


def well_qc_panels(
    well_url: str,
    *,
    wavelength_id: str,
    input_roi_table: str = "FOV_ROI_table",
    reference_acquisition: int = 0,
    level_path: str | None = None,
) -> WellQc:
    """Read the crops and stored translations that the QC picture shows.

    Every image of the well whose acquisition is not ``reference_acquisition``
    and whose ``input_roi_table`` holds translations becomes a column (images
    without translations, e.g. ``1_registered`` written by Apply, are skipped
    and listed in ``skipped``). Each is paired with the reference image of the
    same suffix, as the calculation does.

    Args:
        well_url: The well, ``<plate>.zarr/<row>/<column>``.
        wavelength_id: Registration channel, by wavelength id or label.
        input_roi_table: ROI table that "Calculate Registration" wrote to.
        reference_acquisition: Acquisition id of the reference cycle.
        level_path: Pyramid level to show; when None, the finest level whose
            panels together hold at most about 2.5 million pixels.

    Returns:
        The panels and the header information.

    Raises:
        RegistrationInputError: If the well, the reference, the table, the
            channel or the level is missing, if the well has no other
            acquisition, or if no translation is stored yet.
    """
    well_url = str(well_url).rstrip("/")
    well = open_well(well_url)
    paths = list(well.paths())
    others = [
        p for p in paths if well.get_image_acquisition_id(p) != reference_acquisition
    ]
    if not others:
        raise RegistrationInputError(
            f"Well {well_url!r} has no image besides reference_acquisition="
            f"{reference_acquisition} (images: {paths}); there is nothing to "
            "compare. Check reference_acquisition."
        )
    columns: list[tuple[str, str, dict, dict, object]] = []
    skipped = []
    reference_cache: dict[str, tuple[object, dict]] = {}
    for path in others:
        ref_path = reference_path(well, well_url, path, reference_acquisition)
        if ref_path not in reference_cache:
            ref_url = f"{well_url}/{ref_path}"
            container = open_ome_zarr_container(ref_url)
            rois = by_name(load_rois(container, input_roi_table, ref_url))
            reference_cache[ref_path] = (container, rois)
        url = f"{well_url}/{path}"
        container = open_ome_zarr_container(url)
        rois = by_name(load_rois(container, input_roi_table, url))
        shifts = _stored_translations(rois, url, input_roi_table)
        if shifts is None:
            skipped.append(path)
            continue
        require_same_names(
            {
                f"{well_url}/{ref_path}": set(reference_cache[ref_path][1]),
                url: set(rois),
            },
            input_roi_table,
            f"{well_url}/{ref_path}",
        )
        columns.append((path, ref_path, rois, shifts, container))
    if not columns:
        raise RegistrationInputError(
            f"No translations are stored yet in {input_roi_table!r} of the images "
            f"{others} of well {well_url!r}: run 'Calculate Registration "
            "(image-based)' first (with this input_roi_table), then render the QC."
        )
    first_ref, first_rois = reference_cache[columns[0][1]]
    if level_path is None:
        level_path = _choose_level(first_ref, first_rois, len(columns), well_url)
    fovs = list(first_rois)
    panels: dict[tuple[str, str], QcPanel] = {}
    pixel_um: dict[str, float] = {}
    n_z = 1
    for path, ref_path, rois, shifts, container in columns:
        ref_container, ref_rois = reference_cache[ref_path]
        ref_url, url = f"{well_url}/{ref_path}", f"{well_url}/{path}"
        images = [
            level_image(c, level_path, u)
            for c, u in ((ref_container, ref_url), (container, url))
        ]
        readers = [
            channel_reader(image, channel_index(image, wavelength_id, u), u)
            for image, u in zip(images, (ref_url, url))
        ]
        geometries = [spatial_geometry(image) for image in images]
        pixel_um = geometries[0][0]
        n_z = geometries[0][1].get("z", 1)
        acquisition = well.get_image_acquisition_id(path)
        for fov in fovs:
            boxes = [
                roi_box(slices_um(r[fov]), *g)
                for r, g in zip((ref_rois, rois), geometries)
            ]
            if any(box.is_empty for box in boxes):
                raise RegistrationInputError(
                    f"ROI {fov!r} lies outside the image {ref_url!r} or {url!r} at "
                    f"level {level_path}; check the ROI table {input_roi_table!r}."
                )
            boxes = crop_to_common(*boxes)
            ref_pixels, acq_pixels = (read(b) for read, b in zip(readers, boxes))
            panels[fov, path] = _make_panel(
                fov,
                path,
                ref_path,
                acquisition,
                ref_pixels,
                acq_pixels,
                shifts[fov],
                pixel_um,
                dict(rois[fov].model_extra or {}),
            )
    return WellQc(
        well_url=well_url,
        wavelength_id=wavelength_id,
        input_roi_table=input_roi_table,
        reference_acquisition=reference_acquisition,
        level_path=level_path,
        pixel_um=pixel_um,
        n_z=n_z,
        fovs=fovs,
        image_paths=[c[0] for c in columns],
        panels=panels,
        skipped=skipped,
    )


# ---------------------------------------------------------------------------
# Composing the picture.
# ---------------------------------------------------------------------------

MARGIN = 10  # around the picture and between cells
FRAME = 4  # status frame around a cell
PAD = 4  # inside the frame
GAP = 6  # between BEFORE and AFTER
FONT_SCALE = 2
LABEL_LINES = 3
MIN_LABEL_CHARS = 26  # a cell is made at least this many characters wide
MAX_UPSCALE = 8


def overlay(reference: np.ndarray, moving: np.ndarray) -> np.ndarray:
    """Green-magenta overlay of two ``[0, 1]`` images, as uint8 RGB.

    Red and blue carry ``moving``, green carries ``reference``: equal values are
    grey (white where both are bright).
    """
    rgb = np.stack([moving, reference, moving], axis=-1)
    return np.round(np.clip(rgb, 0.0, 1.0) * 255).astype(np.uint8)


def _signed(value: float, digits: int = 2) -> str:
    return "nan" if not math.isfinite(value) else f"{value:+.{digits}f}"


def _label_lines(panel: QcPanel, axes: list[str]) -> list[list[Segment]]:
    """The three text lines under a cell."""
    colour = STATUS_COLOURS.get(panel.status, UNKNOWN_COLOUR)
    ncc = (
        f"NCC {_plain(panel.ncc_before)}>{_plain(panel.ncc_after)}"
        if math.isfinite(panel.ncc_before) or math.isfinite(panel.ncc_after)
        else "NCC -"
    )
    um = " ".join(f"{a.upper()}{_signed(panel.translation_um[a])}" for a in axes)
    px = " ".join(f"{a.upper()}{_signed(panel.translation_px[a])}" for a in axes)
    return [
        [(panel.status.upper(), colour), ("  " + ncc, TEXT_COLOUR)],
        [(f"{um} {UM}", TEXT_COLOUR)],
        [(f"{px} {PX}", TEXT_COLOUR)],
    ]


def _plain(value: float) -> str:
    return "nan" if not math.isfinite(value) else f"{value:.2f}"


def _arrow(
    canvas: np.ndarray,
    start: tuple[float, float],
    vector: tuple[float, float],
    bounds: tuple[int, int, int, int],
    colour: tuple[int, int, int] = ARROW_COLOUR,
) -> None:
    """Draw an anti-aliased arrow (2 px wide) clipped to ``bounds`` (y0, x0, y1, x1)."""
    y0, x0 = start
    y1, x1 = y0 + vector[0], x0 + vector[1]
    length = math.hypot(*vector)
    strokes = [(y0, x0, y1, x1)]
    if length >= 1.0:
        head = min(10.0, max(5.0, 0.35 * length))
        back = math.atan2(-vector[0], -vector[1])
        for turn in (-0.45, 0.45):
            strokes.append(
                (
                    y1,
                    x1,
                    y1 + head * math.sin(back + turn),
                    x1 + head * math.cos(back + turn),
                )
            )
    for a, b, c, d in strokes:
        for dy, dx in ((0, 0), (1, 0), (0, 1)):
            rr, cc, val = line_aa(
                int(round(a)) + dy, int(round(b)) + dx, int(round(c)) + dy,
                int(round(d)) + dx,
            )  # fmt: skip
            inside = (rr >= bounds[0]) & (rr < bounds[2])
            inside &= (cc >= bounds[1]) & (cc < bounds[3])
            rr, cc, val = rr[inside], cc[inside], val[inside, None]
            mixed = canvas[rr, cc] * (1 - val) + np.array(colour) * val
            canvas[rr, cc] = np.round(mixed).astype(np.uint8)
    cy, cx = int(round(y0)), int(round(x0))
    dot = np.ones((4, 4), bool)
    _paint(canvas, dot, cy - 2, cx - 2, colour)


def _frame(canvas, top, left, height, width, colour, thickness) -> None:
    """Draw a rectangle outline of the given thickness."""
    canvas[top : top + thickness, left : left + width] = colour
    canvas[top + height - thickness : top + height, left : left + width] = colour
    canvas[top : top + height, left : left + thickness] = colour
    canvas[top : top + height, left + width - thickness : left + width] = colour


def _vector_scale(qc: WellQc, upscale: int, panel_hw: dict[str, tuple]) -> int:
    """Largest of ``VECTOR_SCALES`` that keeps each arrow within 45% of its panel."""
    for scale in VECTOR_SCALES:
        fits = True
        for (fov, _), panel in qc.panels.items():
            length = math.hypot(
                panel.translation_px.get("y", 0.0), panel.translation_px.get("x", 0.0)
            )
            if length * upscale * scale > 0.45 * min(panel_hw[fov]) * upscale:
                fits = False
                break
        if fits:
            return scale
    return VECTOR_SCALES[-1]


def compose_qc_image(qc: WellQc) -> np.ndarray:
    """Lay out all panels of a well as one RGB picture.

    Rows are FOVs, columns the non-reference images; each cell holds the
    BEFORE and AFTER overlays side by side, the shift arrow on BEFORE, three
    lines of text below and a frame in the status colour.

    Returns:
        ``(height, width, 3)`` uint8 array.
    """
    fs = FONT_SCALE
    axes = [a for a in ("z", "y", "x") if a in qc.pixel_um]
    if qc.n_z <= 1:
        axes = [a for a in axes if a != "z"]
    panel_hw = {
        fov: tuple(
            max(qc.panels[fov, p].reference.shape[i] for p in qc.image_paths)
            for i in (0, 1)
        )
        for fov in qc.fovs
    }
    max_w = max(hw[1] for hw in panel_hw.values())
    area = sum(h * w for h, w in panel_hw.values()) * 2 * len(qc.image_paths)
    label_chars = max(
        MIN_LABEL_CHARS,
        *(
            sum(len(t) for t, _ in line)
            for panel in qc.panels.values()
            for line in _label_lines(panel, axes)
        ),
    )
    wanted = text_size("x" * label_chars, fs)[1] - 2 * PAD - GAP
    upscale = max(1, math.ceil(wanted / (2 * max_w)))
    budget = max(1, int(math.sqrt(2 * PANEL_PIXEL_BUDGET / max(area, 1))))
    upscale = min(upscale, budget, MAX_UPSCALE)
    scale = _vector_scale(qc, upscale, panel_hw)

    line_h = _line_height(fs)
    cell_w = 2 * FRAME + 2 * PAD + 2 * max_w * upscale + GAP
    label_h = LABEL_LINES * line_h + PAD
    row_h = {
        fov: 2 * FRAME + 2 * PAD + panel_hw[fov][0] * upscale + label_h
        for fov in qc.fovs
    }
    name_w = max(text_size(f, fs)[1] for f in qc.fovs) + 2 * MARGIN
    width = max(name_w + len(qc.image_paths) * (cell_w + MARGIN) + MARGIN, 480)
    header = _header(qc, scale)
    header_lines = _wrap(header, width - 2 * MARGIN, fs)
    header_h = MARGIN + len(header_lines) * line_h + MARGIN
    column_h = 2 * line_h + PAD
    height = header_h + column_h + sum(row_h.values()) + len(qc.fovs) * MARGIN
    canvas = np.empty((height + MARGIN, width, 3), np.uint8)
    canvas[:] = BACKGROUND
    _draw_lines(canvas, header_lines, MARGIN, MARGIN, fs)

    top = header_h
    for j, path in enumerate(qc.image_paths):
        left = name_w + j * (cell_w + MARGIN)
        some = qc.panels[qc.fovs[0], path]
        title = f"ACQ {some.acquisition}  IMAGE {path}"
        if some.reference_path != str(qc.reference_acquisition):
            title += f" VS {some.reference_path}"
        draw_text(canvas, title, top, left + FRAME, TEXT_COLOUR, fs)
        inner = left + FRAME + PAD
        draw_text(canvas, "BEFORE", top + line_h, inner, DIM_TEXT_COLOUR, fs)
        after_left = inner + max_w * upscale + GAP
        draw_text(canvas, "AFTER", top + line_h, after_left, DIM_TEXT_COLOUR, fs)
    top += column_h

    for fov in qc.fovs:
        h, w = panel_hw[fov]
        draw_text(canvas, fov, top + FRAME + PAD, MARGIN, TEXT_COLOUR, fs)
        for j, path in enumerate(qc.image_paths):
            panel = qc.panels[fov, path]
            left = name_w + j * (cell_w + MARGIN)
            colour = STATUS_COLOURS.get(panel.status, UNKNOWN_COLOUR)
            _frame(canvas, top, left, row_h[fov], cell_w, colour, FRAME)
            y = top + FRAME + PAD
            x_before = left + FRAME + PAD
            x_after = x_before + max_w * upscale + GAP
            for x, moving in ((x_before, panel.before), (x_after, panel.after)):
                rgb = overlay(panel.reference, moving)
                rgb = np.repeat(np.repeat(rgb, upscale, axis=0), upscale, axis=1)
                canvas[y : y + rgb.shape[0], x : x + rgb.shape[1]] = rgb
            ph, pw = (n * upscale for n in panel.reference.shape)
            vector = (
                panel.translation_px.get("y", 0.0) * upscale * scale,
                panel.translation_px.get("x", 0.0) * upscale * scale,
            )
            _arrow(
                canvas,
                (y + ph / 2 - 0.5, x_before + pw / 2 - 0.5),
                vector,
                (y, x_before, y + ph, x_before + pw),
            )
            text_top = y + h * upscale + PAD
            _draw_lines(canvas, _label_lines(panel, axes), text_top, x_before, fs)
        top += row_h[fov] + MARGIN
    return canvas


def _header(qc: WellQc, vector_scale: int) -> list[Segment]:
    """Title and legend of the picture, as coloured text."""
    pixel = qc.pixel_um.get("x", float("nan"))
    parts = qc.well_url.split("/")
    well = "".join(parts[-2:]) if len(parts) >= 2 else qc.well_url
    title = (
        f"REGISTRATION QC  WELL {well}  CHANNEL {qc.wavelength_id}  "
        f"TABLE {qc.input_roi_table}  LEVEL {qc.level_path} ({pixel:.3g} {UM}/{PX})  "
        f"REFERENCE ACQ {qc.reference_acquisition}"
    )
    if qc.n_z > 1:
        title += f"  MAX PROJECTION OF {qc.n_z} Z PLANES"
    if qc.skipped:
        title += f"  (NO SHIFTS IN {', '.join(qc.skipped)}: NOT SHOWN)"
    return [
        (title + ".", TEXT_COLOUR),
        ("GREEN", (60, 230, 60)),
        ("= REFERENCE,", TEXT_COLOUR),
        ("MAGENTA", (235, 60, 235)),
        (
            "= ACQUISITION, GREY/WHITE = AGREE. AFTER = ACQUISITION MOVED BY THE "
            "STORED SHIFT (BLACK WHERE UNCOVERED).",
            TEXT_COLOUR,
        ),
        ("ARROW", ARROW_COLOUR),
        (f"= SHIFT FROM FOV CENTRE, {TIMES}{vector_scale}. FRAME:", TEXT_COLOUR),
        ("OK", STATUS_COLOURS["ok"]),
        ("FALLBACK", STATUS_COLOURS["fallback"]),
        ("FAILED", STATUS_COLOURS["failed"]),
    ]


def write_png(path: str | Path, rgb: np.ndarray) -> Path:
    """Save a uint8 RGB array as PNG (parent folders are created)."""
    from skimage.io import imsave

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    imsave(str(path), rgb, check_contrast=False)
    return path


def render_well_qc(
    well_url: str,
    output_png: str,
    *,
    wavelength_id: str,
    input_roi_table: str = "FOV_ROI_table",
    reference_acquisition: int = 0,
    level_path: str | None = None,
) -> Path:
    """Render the registration QC picture of one well as a PNG.

    Rows are the FOVs of ``input_roi_table``, columns the images of the other
    acquisitions. Each cell shows, side by side, the registration channel of
    the reference (green) over that of the acquisition (magenta) BEFORE the
    shift (same FOV box) and AFTER moving the acquisition by its stored
    translation (uncovered pixels black); grey/white means agreement, colour
    fringes a misalignment. Each crop is normalized between its 1st and 99.5th
    percentiles. A yellow arrow from the FOV centre of BEFORE shows the
    translation, magnified (factor in the legend). Below: status and stored
    NCC before>after, and the translation in µm and in pixels of the shown
    level; the frame is green (ok), orange (fallback), red (failed) or grey
    (no status stored).

    Args:
        well_url: The well, ``<plate>.zarr/<row>/<column>``.
        output_png: Where to write the PNG.
        wavelength_id: Registration channel, by wavelength id or label.
        input_roi_table: ROI table that "Calculate Registration" wrote to.
        reference_acquisition: Acquisition id of the reference cycle.
        level_path: Pyramid level to show; when None, the finest level whose
            panels hold at most about 2.5 million pixels (picture ~1-3 MP).

    Returns:
        The path of the written PNG.

    Raises:
        RegistrationInputError: If the well, table, channel or level is
            missing, or no translations are stored yet.
    """
    qc = well_qc_panels(
        well_url,
        wavelength_id=wavelength_id,
        input_roi_table=input_roi_table,
        reference_acquisition=reference_acquisition,
        level_path=level_path,
    )
    return write_png(output_png, compose_qc_image(qc))


def main(argv: list[str] | None = None) -> int:
    """Command line: render the QC picture of one well."""
    parser = argparse.ArgumentParser(
        prog="python -m fractal_tasks.qc",
        description="Render a registration QC picture (PNG) of one well: "
        "reference (green) vs each acquisition (magenta), before and after the "
        "stored shift, per FOV.",
    )
    parser.add_argument("well_url", help="the well, <plate>.zarr/<row>/<column>")
    parser.add_argument("output_png", help="PNG file to write")
    parser.add_argument(
        "--wavelength-id", required=True, help="registration channel (id or label)"
    )
    parser.add_argument("--input-roi-table", default="FOV_ROI_table")
    parser.add_argument("--reference-acquisition", type=int, default=0)
    parser.add_argument(
        "--level-path", default=None, help="pyramid level (default: automatic)"
    )
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    for handler in logging.getLogger().handlers:  # ngio notes on table columns
        handler.addFilter(lambda record: not record.name.startswith("ngio"))
    try:
        path = render_well_qc(
            args.well_url,
            args.output_png,
            wavelength_id=args.wavelength_id,
            input_roi_table=args.input_roi_table,
            reference_acquisition=args.reference_acquisition,
            level_path=args.level_path,
        )
    except RegistrationInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"Wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
