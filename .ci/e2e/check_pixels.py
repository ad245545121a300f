"""Pixel checks on the registered images written by the e2e workflow.

Usage: python check_pixels.py <plate.json> <images.json>
           [--wavelength-id A01_C01] [--roi-table FOV_ROI_table_registered]
Runs in the package's python (needs ngio). Exit 1 if any check fails.

Per well, with R = the registered reference image (origin = acquisition 0):
- every registered image has the same ROI table as R and the input's shape;
- R equals the reference input inside each window;
- inside each window, the registration channel of every registered acquisition
  correlates with R's window (Pearson r > MIN_R), while the unregistered input
  of an acquisition with a non-zero true shift correlates clearly worse with
  the reference input's window (r below the registered r by MIN_GAIN);
- outside the union of the windows, every channel of every registered image is 0.
"""

import argparse
import json
import sys
import warnings
from collections import defaultdict

import numpy as np

warnings.filterwarnings("ignore")

from ngio import open_ome_zarr_container  # noqa: E402

MIN_R = 0.9
MIN_GAIN = 0.05
VERBOSE = False

failures: list[str] = []


n_checks = 0


def check(cond: bool, what: str) -> bool:
    """Count a check; print only failures (and everything with -v)."""
    global n_checks
    n_checks += 1
    if not cond or VERBOSE:
        print(f"[check_pixels] {'ok  ' if cond else 'FAIL'} {what}", flush=True)
    if not cond:
        failures.append(what)
    return cond


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two same-shaped arrays (nan if one is flat)."""
    a = a.astype(np.float64).ravel()
    b = b.astype(np.float64).ravel()
    a -= a.mean()
    b -= b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else float("nan")


def load(url: str):
    """Level-0 array as (c, z, y, x) and the container."""
    container = open_ome_zarr_container(url, mode="r")  # never modify the data
    image = container.get_image()
    return (
        container,
        image,
        np.asarray(image.get_as_numpy(axes_order=["c", "z", "y", "x"])),
    )


def windows_of(container, image, table: str) -> dict[str, tuple[slice, ...]]:
    """ROI name -> (z, y, x) level-0 pixel slices."""
    out = {}
    for roi in container.get_roi_table(table).rois():
        px = roi.to_pixel(image.pixel_size)
        sl = px.to_slicing_dict(image.pixel_size)
        out[roi.name] = tuple(
            slice(int(round(sl[ax].start)), int(round(sl[ax].stop)))
            for ax in ("z", "y", "x")
        )
    return out


def main() -> None:
    """Run every check; exit 1 if any failed."""
    parser = argparse.ArgumentParser()
    parser.add_argument("plate_json")
    parser.add_argument("images_json")
    parser.add_argument("--wavelength-id", default="A01_C01")
    parser.add_argument("--roi-table", default="FOV_ROI_table_registered")
    parser.add_argument("-v", "--verbose", action="store_true")
    ns = parser.parse_args()
    global VERBOSE
    VERBOSE = ns.verbose
    plate = json.load(open(ns.plate_json))
    server_images = json.load(open(ns.images_json))
    registered_of = {
        im["origin"]: im["zarr_url"] for im in server_images if im.get("origin")
    }
    truth = plate["translations_px"]
    wells = defaultdict(list)
    for im in plate["images"]:
        wells[im["well"]].append(im)

    rows = []
    for well, ims in sorted(wells.items()):
        ims.sort(key=lambda i: i["acquisition"])
        ref_url = ims[0]["zarr_url"]
        if not check(
            ref_url in registered_of, f"{well}: reference has a registered image"
        ):
            continue
        ref_reg_c, ref_reg_img, ref_reg = load(registered_of[ref_url])
        ref_in_c, ref_in_img, ref_in = load(ref_url)
        c_ref = ref_in_c.get_channel_idx(wavelength_id=ns.wavelength_id)
        windows = windows_of(ref_reg_c, ref_reg_img, ns.roi_table)
        check(
            len(windows) > 0,
            f"{well}: {ns.roi_table} of the registered reference has ROIs",
        )
        print(
            f"[check_pixels] {well} windows (z, y, x): "
            + ", ".join(
                f"{n}=[{s[1].start}:{s[1].stop}, {s[2].start}:{s[2].stop}]"
                for n, s in sorted(windows.items())
            )
        )
        for name, w in windows.items():
            check(
                np.array_equal(ref_reg[(slice(None),) + w], ref_in[(slice(None),) + w]),
                f"{well} {name}: registered reference == reference input in window",
            )
        for im in ims:
            url = im["zarr_url"]
            label = f"{well} acq {im['acquisition']}"
            if not check(url in registered_of, f"{label}: has a registered image"):
                continue
            reg_c, reg_img, reg = load(registered_of[url])
            in_c, _, inp = load(url)
            check(
                reg.shape == inp.shape,
                f"{label}: registered shape {reg.shape} == input shape",
            )
            c_reg = reg_c.get_channel_idx(wavelength_id=ns.wavelength_id)
            c_in = in_c.get_channel_idx(wavelength_id=ns.wavelength_id)
            check(
                windows_of(reg_c, reg_img, ns.roi_table) == windows,
                f"{label}: {ns.roi_table} equals the reference's",
            )
            outside = np.ones(reg.shape[1:], bool)
            for w in windows.values():
                outside[w] = False
            n_nonzero = int(np.count_nonzero(reg[:, outside]))
            check(
                n_nonzero == 0,
                f"{label}: all {int(outside.sum())} px/channel outside the windows "
                f"are 0 (non-zero: {n_nonzero})",
            )
            for name, w in sorted(windows.items()):
                r_reg = pearson(reg[c_reg][w], ref_reg[c_ref][w])
                r_unreg = pearson(inp[c_in][w], ref_in[c_ref][w])
                shift = truth[url][name]
                moved = any(abs(s) > 0 for s in shift)
                rows.append((well, im["acquisition"], name, shift, r_unreg, r_reg))
                check(
                    r_reg > MIN_R, f"{label} {name}: registered r={r_reg:.3f} > {MIN_R}"
                )
                if moved:
                    check(
                        r_unreg < r_reg - MIN_GAIN,
                        f"{label} {name}: unregistered r={r_unreg:.3f} < registered "
                        f"r={r_reg:.3f} - {MIN_GAIN} (true shift {shift} px)",
                    )
    head = "well acq roi   true shift (z,y,x) px   r unregistered  r registered"
    print(f"[check_pixels] {head}")
    for well, acq, name, shift, r_u, r_r in rows:
        shift_txt = str(tuple(shift))
        print(
            f"[check_pixels] {well}  {acq}   {name}  {shift_txt:22s}  "
            f"{r_u:14.3f}  {r_r:12.3f}"
        )
    if failures:
        print(f"[check_pixels] {len(failures)} of {n_checks} pixel check(s) failed")
        sys.exit(1)
    print(f"[check_pixels] all {n_checks} pixel checks passed ({len(rows)} windows)")


if __name__ == "__main__":
    main()
