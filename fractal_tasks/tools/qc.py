"""Quality-control picture of the registration of one well.

``python -m fractal_tasks.tools.qc WELL_URL OUTPUT.png --wavelength-id A01_C01`` (or
:func:`render_well_qc`) draws, for every field of view (FOV, one row of the ROI
table; rows of the picture) and every non-reference image of the well (columns),
the registration channel of the reference in green over that of the
acquisition in magenta:

* before: both images cut at the same FOV box, as acquired.
* after: the acquisition's crop moved by the translation stored by "Calculate
  Registration (image-based)"; pixels the moved crop does not cover are 0.

Where the two images agree the overlay is grey to white; a misalignment shows
green and magenta fringes. A yellow arrow from the FOV centre shows the stored
translation, magnified (the factor is written in the legend). Below the
panels, the translation in micrometres and in pixels of the shown pyramid
level, the status (``ok``/``fallback``/``failed``, also the colour of the
frame: green/orange/red) and the normalized cross-correlation before and after
the shift, as stored by the calculation.

The overlays are composed with numpy; frames, arrows and text are drawn with
Pillow, in DejaVu Sans when the system has it (most Linux distributions ship
it) and else in Pillow's built-in font.
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ngio import OmeZarrContainer, open_ome_zarr_container
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from fractal_tasks.geometry import SPATIAL_AXES, RigidTransform, roi_box
from fractal_tasks.hcs.errors import RegistrationInputError
from fractal_tasks.hcs.roi_tables import (
    ROTATION_COLUMN,
    by_name,
    load_rois,
    require_same_names,
    slices_um,
    spatial_geometry,
    stored_translations,
)
from fractal_tasks.hcs.wells import acquisition_of, open_well, reference_path
from fractal_tasks.registration.calculate import load_quality, open_level_pair
from fractal_tasks.registration.rotation import warp

logger = logging.getLogger(__name__)

PANEL_PIXEL_BUDGET = 2_500_000  # image pixels of all panels, before upscaling
NORMALIZE_PERCENTILES = (1.0, 99.5)
VECTOR_SCALES = (5, 4, 3, 2, 1)  # largest that keeps every arrow in its panel

Colour = tuple[int, int, int]
STATUS_COLOURS: dict[str, Colour] = {
    "ok": (40, 200, 60),
    "fallback": (255, 150, 0),
    "failed": (230, 30, 30),
    "rotated": (200, 90, 255),
}
UNKNOWN_COLOUR = (140, 140, 140)
ARROW_COLOUR = (255, 235, 0)
CORNER_COLOUR = (0, 220, 255)
CORNER_REACH = 0.8  # corner arrows start this far from the centre to the corner
TEXT_COLOUR = (235, 235, 235)
DIM_TEXT_COLOUR = (160, 160, 160)
BACKGROUND = (24, 24, 28)

# ---------------------------------------------------------------------------
# Text.
# ---------------------------------------------------------------------------

FONT_SIZE = 15  # pixels
FONT_FILES = ("DejaVuSans.ttf",)  # looked up in the system's font folders
# What to write instead of a character that the font has no glyph for.
_PLAIN_SUBSTITUTES = {"µ": "u", "×": "x", "→": ">", "·": ","}

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont
Segment = tuple[str, Colour]


@functools.cache
def qc_font(size: int = FONT_SIZE) -> Font:
    """The font of the picture: DejaVu Sans if installed, else Pillow's own.

    Pillow's built-in font (Aileron) has no "µ", "×" or "→"; with it those are
    written "u", "x" and ">".
    """
    for name in FONT_FILES:
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    logger.info("No %s found; the QC picture uses Pillow's built-in font.", FONT_FILES)
    return ImageFont.load_default(size=size)


@functools.cache
def has_glyph(font: Font, char: str) -> bool:
    """Whether ``font`` draws ``char`` with a glyph of its own (not a blank box)."""
    missing = font.getmask("\uffff")  # a non-character: always the missing glyph
    drawn = font.getmask(char)
    return drawn.size != missing.size or bytes(drawn) != bytes(missing)


def printable(text: str, font: Font) -> str:
    """``text`` with the characters that ``font`` lacks replaced by plain ones."""
    for char, plain in _PLAIN_SUBSTITUTES.items():
        if char in text and not has_glyph(font, char):
            text = text.replace(char, plain)
    return text


def line_height(font: Font) -> int:
    """Distance in pixels between the tops of two lines of text."""
    left, top, right, bottom = font.getbbox("Ayµ|")
    return int(bottom) + 4


def text_size(text: str, font: Font | None = None) -> tuple[int, int]:
    """Height (a line's) and width in pixels of one line of text."""
    font = font or qc_font()
    return line_height(font), math.ceil(font.getlength(printable(text, font)))


def draw_text(
    draw: ImageDraw.ImageDraw,
    text: str,
    top: int,
    left: int,
    colour: Colour = TEXT_COLOUR,
    font: Font | None = None,
) -> int:
    """Write one line of text (clipped at the edges of the picture).

    Args:
        draw: Drawing context of the picture.
        text: The characters.
        top: Row of the top of the line.
        left: Column where the text starts.
        colour: RGB colour of the text.
        font: Font to use; :func:`qc_font` when None.

    Returns:
        The column just right of the text (where a next piece can start).
    """
    font = font or qc_font()
    text = printable(text, font)
    draw.text((left, top), text, fill=colour, font=font)
    return left + math.ceil(font.getlength(text))


def _wrap(segments: list[Segment], width: int, font: Font) -> list[list[Segment]]:
    """Split coloured text into lines no wider than ``width`` (at word breaks)."""
    space = font.getlength(" ")
    lines: list[list[Segment]] = [[]]
    used = 0.0
    for text, colour in segments:
        for word in text.split(" "):
            if not word:
                continue
            size = font.getlength(printable(word, font))
            need = size + (space if used else 0.0)
            if used and used + need > width:
                lines.append([])
                used, need = 0.0, size
            lines[-1].append(((" " if used else "") + word, colour))
            used += need
    return lines


def _draw_lines(
    draw: ImageDraw.ImageDraw,
    lines: list[list[Segment]],
    top: int,
    left: int,
    font: Font,
) -> int:
    """Draw lines of coloured segments; return the row below them."""
    for line in lines:
        x = left
        for text, colour in line:
            x = draw_text(draw, text, top, x, colour, font)
        top += line_height(font)
    return top


def _lines_width(lines: list[list[Segment]], font: Font) -> int:
    """Width in pixels of the widest of some lines of coloured segments."""
    return max(
        (text_size("".join(text for text, _ in line), font)[1] for line in lines),
        default=0,
    )


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
        status: ``ok``, ``rotated``, ``fallback``, ``failed`` or ``unknown``.
        ncc_before: Stored correlation before the shift (NaN when absent).
        ncc_after: Stored correlation after the shift (NaN when absent).
        rotation_deg: The stored transform's rotation (0 when absent).
        measured_rotation_deg: The rotation measured (NaN when absent).
        residual_px: What the stored transform leaves at the corners, in
            level-0 px (NaN when absent).
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
    rotation_deg: float = 0.0
    measured_rotation_deg: float = math.nan
    residual_px: float = math.nan

    def corner_moves(
        self, angle_deg: float, reach: float = 1.0
    ) -> list[tuple[tuple[float, float], ...]]:
        """Per corner of the panel, ``((y, x), (dy, dx))``: where, and how far.

        How far (shown-level px) a rotation about the centre moves the point
        ``reach`` of the way from the centre to the corner.
        """
        h, w = self.reference.shape
        centre = {"y": h / 2, "x": w / 2}
        motion = RigidTransform(angle_deg, centre, {})
        corners = np.array(
            [
                (h / 2 + reach * (y - h / 2), w / 2 + reach * (x - w / 2))
                for y in (0.0, h)
                for x in (0.0, w)
            ]
        )
        moved = motion.apply_yx(corners) - corners
        return [(tuple(c), tuple(m)) for c, m in zip(corners, moved)]

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
    quality: dict,
) -> QcPanel:
    """Normalize both crops, move the acquisition's and project along z."""
    reference, moving = _as_zyx(ref_pixels), _as_zyx(acq_pixels)
    shift_px = {a: shift_um.get(a, 0.0) / pixel_um[a] for a in pixel_um}
    vector = [shift_px.get(a, 0.0) for a in SPATIAL_AXES]
    angle = _number(quality.get(ROTATION_COLUMN))
    angle = angle if math.isfinite(angle) else 0.0
    # output[q] = input[q - shift]: acquisition pixel p shows reference p + t.
    if angle:  # the stored rotation about the FOV's centre, then the shift
        whole = np.ones(moving.shape[1:], np.float32)
        covered = warp(whole, angle, vector[1:]) > 1 - 1e-3
        planes = [warp(p, angle, vector[1:]) for p in moving.astype(np.float32)]
        moved = np.where(covered, np.stack(planes), np.nan)
        moved = ndimage.shift(
            moved, (vector[0], 0, 0), order=0, mode="constant", cval=np.nan
        )
    else:
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
        status=_status(quality.get("registration_status")),
        ncc_before=_number(quality.get("ncc_before")),
        ncc_after=_number(quality.get("ncc_after")),
        rotation_deg=angle,
        measured_rotation_deg=_number(quality.get("measured_rotation_deg")),
        residual_px=_number(quality.get("residual_px")),
    )


def _status(value: object) -> str:
    text = str(value).strip().lower() if isinstance(value, str) else ""
    return text if text in STATUS_COLOURS else "unknown"


def _number(value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return float("nan")


def _quality_rows(container: OmeZarrContainer, table: str) -> dict[str, dict]:
    """Per ROI name, its row of the verdicts Calculate stored (empty if none)."""
    frame = load_quality(container, table)
    return {str(name): row.to_dict() for name, row in frame.iterrows()}


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
    columns: list[tuple[str, str, dict, dict, OmeZarrContainer]] = []
    skipped = []
    reference_cache: dict[str, tuple[OmeZarrContainer, dict]] = {}
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
        shifts = stored_translations(rois, url, input_roi_table)
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
        level = open_level_pair(
            (ref_container, container),
            (wavelength_id, wavelength_id),
            (ref_url, url),
            level_path,
        )
        quality = _quality_rows(container, input_roi_table)
        pixel_um = level.geometries[0].pixel_um
        n_z = level.geometries[0].shape.get("z", 1)
        acquisition = acquisition_of(well, well_url, path)
        for fov in fovs:
            pair = (ref_rois[fov], rois[fov])
            if any(box.is_empty for box in level.boxes(pair)):
                raise RegistrationInputError(
                    f"ROI {fov!r} lies outside the image {ref_url!r} or {url!r} at "
                    f"level {level_path}; check the ROI table {input_roi_table!r}."
                )
            ref_pixels, acq_pixels = level.read(pair)
            panels[fov, path] = _make_panel(
                fov,
                path,
                ref_path,
                acquisition,
                ref_pixels,
                acq_pixels,
                shifts[fov],
                pixel_um,
                quality.get(fov, {}),
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
GAP = 6  # between before and after
MIN_LABEL_WIDTH = 300  # pixels; panels are magnified to about this width
MAX_UPSCALE = 8
ARROW_WIDTH = 2  # pixels
_SUPERSAMPLE = 4  # arrows are drawn this much finer, then reduced (anti-aliasing)


def overlay(reference: np.ndarray, moving: np.ndarray) -> np.ndarray:
    """Green-magenta overlay of two ``[0, 1]`` images, as uint8 RGB.

    Red and blue carry ``moving``, green carries ``reference``: equal values are
    grey (white where both are bright).
    """
    rgb = np.stack([moving, reference, moving], axis=-1)
    return np.round(np.clip(rgb, 0.0, 1.0) * 255).astype(np.uint8)


def _signed(value: float, digits: int = 2) -> str:
    return "nan" if not math.isfinite(value) else f"{value:+.{digits}f}"


def _plain(value: float) -> str:
    return "nan" if not math.isfinite(value) else f"{value:.2f}"


def _label_lines(panel: QcPanel, axes: Sequence[str]) -> list[list[Segment]]:
    """The three text lines under a cell."""
    colour = STATUS_COLOURS.get(panel.status, UNKNOWN_COLOUR)
    ncc = (
        f"NCC {_plain(panel.ncc_before)} → {_plain(panel.ncc_after)}"
        if math.isfinite(panel.ncc_before) or math.isfinite(panel.ncc_after)
        else "NCC -"
    )
    um = "  ".join(f"{a} {_signed(panel.translation_um[a])}" for a in axes)
    px = "  ".join(f"{a} {_signed(panel.translation_px[a])}" for a in axes)
    turn = (
        f"rotation {panel.rotation_deg:.3f}° (measured "
        f"{_plain_angle(panel.measured_rotation_deg)}), corners "
        f"{_plain(panel.residual_px)} px off"
    )
    return [
        [(panel.status, colour), ("   " + ncc, TEXT_COLOUR)],
        [(f"{um} µm", TEXT_COLOUR)],
        [(f"{px} px", TEXT_COLOUR)],
        [(turn, TEXT_COLOUR)],
    ]


def _plain_angle(value: float) -> str:
    return "-" if not math.isfinite(value) else f"{value:.3f}°"


def draw_arrow(
    picture: Image.Image,
    start: tuple[float, float],
    vector: tuple[float, float],
    bounds: tuple[int, int, int, int],
    colour: Colour = ARROW_COLOUR,
) -> None:
    """Draw an anti-aliased arrow, clipped to ``bounds``.

    Args:
        picture: RGB picture, changed in place.
        start: ``(y, x)`` of the tail, in pixels of the picture.
        vector: ``(dy, dx)`` from the tail to the tip, in pixels.
        bounds: ``(top, left, bottom, right)`` (bottom and right exclusive) that
            the arrow must not leave, e.g. its panel.
        colour: RGB colour of the arrow.
    """
    y0, x0 = start
    y1, x1 = y0 + vector[0], x0 + vector[1]
    length = math.hypot(*vector)
    strokes = [((x0, y0), (x1, y1))]
    if length >= 1.0:
        head = min(10.0, max(5.0, 0.35 * length))
        back = math.atan2(-vector[0], -vector[1])
        for turn in (-0.45, 0.45):
            tip = (x1 + head * math.cos(back + turn), y1 + head * math.sin(back + turn))
            strokes.append(((x1, y1), tip))
    top, left, bottom, right = bounds
    if bottom <= top or right <= left:
        return
    # Drawn as a coverage mask of the bounds, finer by _SUPERSAMPLE, then reduced.
    s = _SUPERSAMPLE
    mask = Image.new("L", ((right - left) * s, (bottom - top) * s), 0)
    pen = ImageDraw.Draw(mask)

    def fine(point: tuple[float, float]) -> tuple[float, float]:
        return ((point[0] - left + 0.5) * s, (point[1] - top + 0.5) * s)

    for a, b in strokes:
        pen.line([fine(a), fine(b)], fill=255, width=ARROW_WIDTH * s)
        for end in (a, b):  # round the ends and the joints
            cx, cy = fine(end)
            r = ARROW_WIDTH * s / 2
            pen.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    cx, cy = fine((x0, y0))
    r = 2 * s  # a dot at the tail: the FOV centre
    pen.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    coverage = mask.resize((right - left, bottom - top), Image.Resampling.BOX)
    picture.paste(colour, (left, top, right, bottom), coverage)


def _corner_arrows(
    picture: Image.Image,
    panel: QcPanel,
    origin: tuple[int, int],
    upscale: int,
    magnify: int,
    *,
    after: bool,
) -> None:
    """Arrows near the panel's corners, ``magnify`` times their length.

    Before: how far the measured rotation moves each corner; after: how far
    the stored transform leaves it (the rotation it does not undo).
    """
    measured = panel.measured_rotation_deg
    if not math.isfinite(measured):
        return
    angle = measured - panel.rotation_deg if after else measured
    h, w = panel.reference.shape
    y0, x0 = origin
    bounds = (y0, x0, y0 + h * upscale, x0 + w * upscale)
    for (cy, cx), (dy, dx) in panel.corner_moves(angle, CORNER_REACH):
        start = (y0 + cy * upscale, x0 + cx * upscale)
        vector = (dy * upscale * magnify, dx * upscale * magnify)
        draw_arrow(picture, start, vector, bounds, CORNER_COLOUR)


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


def compose_qc_image(qc: WellQc, font: Font | None = None) -> np.ndarray:
    """Lay out all panels of a well as one RGB picture.

    Rows are FOVs, columns the non-reference images; each cell holds the
    before and after overlays side by side, the shift arrow on before, three
    lines of text below and a frame in the status colour.

    Args:
        qc: The panels, from :func:`well_qc_panels`.
        font: Font of the text; :func:`qc_font` when None.

    Returns:
        ``(height, width, 3)`` uint8 array.
    """
    font = font or qc_font()
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
    labels = {key: _label_lines(panel, axes) for key, panel in qc.panels.items()}
    label_w = max(
        MIN_LABEL_WIDTH, *(_lines_width(lines, font) for lines in labels.values())
    )
    upscale = max(1, math.ceil((label_w - GAP) / (2 * max_w)))
    budget = max(1, int(math.sqrt(2 * PANEL_PIXEL_BUDGET / max(area, 1))))
    upscale = min(upscale, budget, MAX_UPSCALE)
    scale = _vector_scale(qc, upscale, panel_hw)

    line_h = line_height(font)
    inner_w = max(2 * max_w * upscale + GAP, label_w)
    cell_w = 2 * FRAME + 2 * PAD + inner_w
    label_h = max(len(lines) for lines in labels.values()) * line_h + PAD
    row_h = {
        fov: 2 * FRAME + 2 * PAD + panel_hw[fov][0] * upscale + label_h
        for fov in qc.fovs
    }
    name_w = max(text_size(f, font)[1] for f in qc.fovs) + 2 * MARGIN
    width = max(name_w + len(qc.image_paths) * (cell_w + MARGIN) + MARGIN, 480)
    header_lines = _wrap(_header(qc, scale), width - 2 * MARGIN, font)
    header_h = MARGIN + len(header_lines) * line_h + MARGIN
    column_h = 2 * line_h + PAD
    height = header_h + column_h + sum(row_h.values()) + len(qc.fovs) * MARGIN
    picture = Image.new("RGB", (width, height + MARGIN), BACKGROUND)
    draw = ImageDraw.Draw(picture)
    _draw_lines(draw, header_lines, MARGIN, MARGIN, font)

    top = header_h
    for j, path in enumerate(qc.image_paths):
        left = name_w + j * (cell_w + MARGIN)
        some = qc.panels[qc.fovs[0], path]
        title = f"acquisition {some.acquisition}, image {path}"
        if some.reference_path != str(qc.reference_acquisition):
            title += f" vs {some.reference_path}"
        draw_text(draw, title, top, left + FRAME, TEXT_COLOUR, font)
        inner = left + FRAME + PAD
        draw_text(draw, "before", top + line_h, inner, DIM_TEXT_COLOUR, font)
        after_left = inner + max_w * upscale + GAP
        draw_text(draw, "after", top + line_h, after_left, DIM_TEXT_COLOUR, font)
    top += column_h

    for fov in qc.fovs:
        h, _ = panel_hw[fov]
        draw_text(draw, fov, top + FRAME + PAD, MARGIN, TEXT_COLOUR, font)
        for j, path in enumerate(qc.image_paths):
            panel = qc.panels[fov, path]
            left = name_w + j * (cell_w + MARGIN)
            colour = STATUS_COLOURS.get(panel.status, UNKNOWN_COLOUR)
            draw.rectangle(
                (left, top, left + cell_w - 1, top + row_h[fov] - 1),
                outline=colour,
                width=FRAME,
            )
            y = top + FRAME + PAD
            x_before = left + FRAME + PAD
            x_after = x_before + max_w * upscale + GAP
            ph, pw = (n * upscale for n in panel.reference.shape)
            for x, moving in ((x_before, panel.before), (x_after, panel.after)):
                rgb = Image.fromarray(overlay(panel.reference, moving))
                picture.paste(rgb.resize((pw, ph), Image.Resampling.NEAREST), (x, y))
            vector = (
                panel.translation_px.get("y", 0.0) * upscale * scale,
                panel.translation_px.get("x", 0.0) * upscale * scale,
            )
            draw_arrow(
                picture,
                (y + ph / 2 - 0.5, x_before + pw / 2 - 0.5),
                vector,
                (y, x_before, y + ph, x_before + pw),
            )
            for x, after in ((x_before, False), (x_after, True)):
                _corner_arrows(picture, panel, (y, x), upscale, scale, after=after)
            text_top = y + h * upscale + PAD
            _draw_lines(draw, labels[fov, path], text_top, x_before, font)
        top += row_h[fov] + MARGIN
    return np.asarray(picture).copy()


def _header(qc: WellQc, vector_scale: int) -> list[Segment]:
    """Title and legend of the picture, as coloured text."""
    pixel = qc.pixel_um.get("x", float("nan"))
    parts = qc.well_url.split("/")
    well = "".join(parts[-2:]) if len(parts) >= 2 else qc.well_url
    title = (
        f"Registration QC of well {well}: channel {qc.wavelength_id}, table "
        f"{qc.input_roi_table}, level {qc.level_path} ({pixel:.3g} µm/px), "
        f"reference acquisition {qc.reference_acquisition}"
    )
    if qc.n_z > 1:
        title += f", maximum projection of {qc.n_z} z planes"
    if qc.skipped:
        title += f" (no shifts in {', '.join(qc.skipped)}: not shown)"
    return [
        (title + ".", TEXT_COLOUR),
        ("Green", (60, 230, 60)),
        ("= reference,", TEXT_COLOUR),
        ("magenta", (235, 60, 235)),
        (
            "= acquisition, grey/white = agree; after = acquisition moved by the "
            "stored shift (black where uncovered).",
            TEXT_COLOUR,
        ),
        ("Arrow", ARROW_COLOUR),
        (f"= shift from the FOV centre, ×{vector_scale};", TEXT_COLOUR),
        ("corner arrows", CORNER_COLOUR),
        (
            f"= what the measured rotation moves points near the corners by "
            f"(before, {CORNER_REACH:.0%} of the way out) and what the stored "
            f"transform leaves of it (after), ×{vector_scale}. Frame:",
            TEXT_COLOUR,
        ),
        ("ok", STATUS_COLOURS["ok"]),
        ("rotated", STATUS_COLOURS["rotated"]),
        ("fallback", STATUS_COLOURS["fallback"]),
        ("failed", STATUS_COLOURS["failed"]),
    ]


def write_png(path: str | Path, rgb: np.ndarray) -> Path:
    """Save a uint8 RGB array as PNG (parent folders are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(rgb, np.uint8)).save(path, format="PNG")
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
    the reference (green) over that of the acquisition (magenta) "before" the
    shift (same FOV box) and "after" moving the acquisition by its stored
    translation (uncovered pixels black); grey/white means agreement, colour
    fringes a misalignment. Each crop is normalized between its 1st and 99.5th
    percentiles. A yellow arrow from the FOV centre of "before" shows the
    translation, magnified (factor in the legend). Below: status and stored
    NCC before → after, and the translation in µm and in pixels of the shown
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
        prog="python -m fractal_tasks.tools.qc",
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
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    sys.exit(main())
