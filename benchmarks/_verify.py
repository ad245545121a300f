"""Sanity checks on benchmark outputs (parent process, project venv)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import zarr


# ngio logs a warning per non-standard ROI-table column on every read (from a
# logger named "ngio:ngio.tables..."); silence warnings while these checks read.
class _quiet:
    def __enter__(self):
        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)

    def __exit__(self, *exc):
        logging.disable(logging.NOTSET)
        self._w.__exit__(*exc)


def _level0(url: str) -> zarr.Array:
    return zarr.open_array(str(Path(url) / "0"), mode="r")


def compare_level0(url_a: str, url_b: str, channel: int = 0) -> dict:
    """Compare one full level-0 plane (given channel, middle z) of two images."""
    a, b = _level0(url_a), _level0(url_b)
    if a.shape != b.shape:
        return {"same_shape": False, "shape_a": a.shape, "shape_b": b.shape}
    z = a.shape[1] // 2 if a.ndim == 4 else None
    sel = (channel, z) if z is not None else (channel,)
    pa = a[sel].astype(np.int32)
    pb = b[sel].astype(np.int32)
    diff = np.abs(pa - pb)
    return {
        "same_shape": True,
        "max_abs_diff": int(diff.max()),
        "frac_equal": float((diff == 0).mean()),
        "frac_zero_a": float((pa == 0).mean()),
        "frac_zero_b": float((pb == 0).mean()),
    }


def residual_shifts(
    urls: list[str],
    rois_url: str,
    level: str = "2",
    table: str = "FOV_ROI_table",
    channel: int = 0,
) -> dict:
    """Phase correlation between the reference and each registered image.

    Returns the largest residual |shift| per acquisition, in level-0 pixels,
    measured per ROI (middle z plane) at the given pyramid level. The ROIs
    are read from `table` of `rois_url` (the untouched source reference, so
    the check does not depend on the tables the apply task wrote). A correct
    apply leaves residuals well under one level-`level` pixel.
    """
    from ngio import open_ome_zarr_container
    from skimage.registration import phase_cross_correlation

    with _quiet():
        rois = open_ome_zarr_container(rois_url).get_roi_table(table).rois()
        name = f"{table} of the source reference"
        ref = open_ome_zarr_container(urls[0])
        ref_img = ref.get_image(path=level)
        factor = ref_img.pixel_size.x / ref.get_image(path="0").pixel_size.x
        out = {"table": name}
        for url in urls[1:]:
            img = open_ome_zarr_container(url).get_image(path=level)
            worst = 0.0
            for roi in rois:
                pa = ref_img.get_roi(roi, channel_selection=channel)
                pb = img.get_roi(roi, channel_selection=channel)
                pa = pa[pa.shape[0] // 2].astype(np.float32)
                pb = pb[pb.shape[0] // 2].astype(np.float32)
                if pa.shape != pb.shape or min(pa.shape) < 8:
                    continue
                shift = phase_cross_correlation(
                    pa, pb, upsample_factor=4, normalization=None
                )[0]
                worst = max(worst, float(np.abs(shift).max()) * factor)
            out[url] = round(worst, 2)
    return out


def stored_translations(url: str, table: str = "FOV_ROI_table") -> dict:
    """{roi_name: (tz, ty, tx)} in level-0 pixels from translation_* columns.

    A ROI without the columns (or with NaN, e.g. the reference) maps to None.
    """
    from ngio import open_ome_zarr_container

    with _quiet():
        c = open_ome_zarr_container(url)
        ps = c.get_image(path="0").pixel_size
        out = {}
        for roi in c.get_roi_table(table).rois():
            extra = roi.model_extra or {}
            vals = [extra.get(f"translation_{a}") for a in "zyx"]
            if any(v is None for v in vals[1:]) or any(
                v != v for v in vals[1:] if v is not None
            ):
                out[roi.name] = None
                continue
            tz = vals[0] if vals[0] is not None and vals[0] == vals[0] else 0.0
            out[roi.name] = (
                float(tz) / ps.z,
                float(vals[1]) / ps.y,
                float(vals[2]) / ps.x,
            )
    return out


def translation_errors(urls: list[str], truth_px: dict, table: str = "FOV_ROI_table"):
    """Errors (level-0 px) of the stored translations against the truth.

    Returns a dict with per-ROI rows (url, roi, truth, estimate, |err| y/x) and
    summary numbers over all non-reference ROIs: max and mean of the absolute
    y/x error, and how many ROIs had no stored translation.
    """
    rows, missing = [], 0
    for url in urls[1:]:
        est = stored_translations(url, table)
        for name, t in truth_px[url].items():
            e = est.get(name)
            if e is None:
                missing += 1
                rows.append({"url": url, "roi": name, "truth": t, "estimate": None})
                continue
            err = [abs(e[1] - t[1]), abs(e[2] - t[2])]
            rows.append(
                {
                    "url": url,
                    "roi": name,
                    "truth": t,
                    "estimate": [round(v, 3) for v in e],
                    "abs_err_yx": [round(v, 3) for v in err],
                }
            )
    errs = np.array([r["abs_err_yx"] for r in rows if r.get("estimate")])
    summary = {
        "n": int(len(errs)),
        "missing": missing,
        "max_abs_err_px": float(errs.max()) if len(errs) else None,
        "mean_abs_err_px": float(errs.mean()) if len(errs) else None,
    }
    return summary, rows


def listed_tables(url: str) -> list[str] | str:
    """Tables ngio lists for an image (or the error text)."""
    from ngio import open_ome_zarr_container

    try:
        with _quiet():
            return open_ome_zarr_container(url).list_tables()
    except Exception as e:  # noqa: BLE001
        return f"error: {e!r}"
