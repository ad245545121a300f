"""Synthetic multiplexed HCS plates with known per-FOV shifts, for benchmarks.

The well is one continuous "sample" made of nucleus-like objects.  Every
acquisition (cycle) images each field of view (FOV) with a small stage offset,
so the pixel data of acquisition ``a`` in FOV ``f`` is

    acq[p] = sample(origin_f + t[a, f] + p)

where ``t`` is the true translation in level-0 pixels ((z, y, x), z is always
0 here).  With the reference (acquisition 0) at ``t = 0`` this means
``acq[p] == ref[p + t]``: acquisition pixel ``p`` shows what reference pixel
``p + t`` shows.  That is exactly the vector that
``skimage.registration.phase_cross_correlation(ref, acq)`` returns, and what
fractal-tasks-core stores (times the pixel size) in ``translation_y/x``.

Content is stamped from a small set of pre-rendered templates, so a full
2x2-FOV 2160x2560 plate takes seconds, not minutes.  Nothing is held for the
whole well at once: every FOV is rendered, written and dropped.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from scipy import ndimage

ROW, COLUMN = "B", "03"
COMPLETE_MARKER = "synth_plate.json"


@dataclass
class SynthSpec:
    """Everything that determines a synthetic plate (and its cache key)."""

    fovs: tuple[int, int] = (2, 2)
    fov_shape: tuple[int, int] = (2160, 2560)
    n_z: int = 1
    n_channels: int = 3
    n_acquisitions: int = 3
    levels: int = 5
    pixel_size: float = 0.325
    z_spacing: float = 1.0
    # "fov" -> (1, 1, fov_y, fov_x) like the Fractal converters; "auto" ->
    # ngio/zarr heuristic; or an explicit "c,z,y,x" string.
    chunks: str = "fov"
    # Largest |shift| per axis in level-0 pixels, as a fraction of the FOV
    # (max_shift_fraction) or absolute (max_shift_px); the larger one wins.
    max_shift_px: float = 6.0
    max_shift_fraction: float = 0.0
    subpixel: bool = False
    nucleus_radius: tuple[float, float] = (9.0, 17.0)
    area_per_nucleus: float = 2200.0
    background: float = 100.0
    read_noise: float = 10.0
    # "shot": fresh Gaussian read + shot noise per pixel (realistic, for the
    # calculate benchmark); "fast": additive noise drawn from a pre-generated
    # bank at random offsets (same compressibility, ~4x faster to render).
    noise: str = "shot"
    seed: int = 0
    version: int = 2  # bump to invalidate cached plates after content changes
    # {"shift": "per_well"}: every FOV of an acquisition gets the same shift
    # (for registering well_ROI_table); otherwise each FOV adds its own jitter.
    # {"wells": ["B03", "B05", ...]}: several wells (default: one well, B03),
    # each its own sample with its own shifts.
    # {"labels": "nuclei"}: a label image of that name in every image (the
    # nuclei of channel 0, at the acquisition's own place).
    # {"ngff": "0.5"}: NGFF 0.5 (zarr v3) instead of 0.4 (zarr v2).
    extra: dict = field(default_factory=dict)

    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha1(blob).hexdigest()[:10]

    @property
    def well_shape(self) -> tuple[int, int]:
        return (self.fovs[0] * self.fov_shape[0], self.fovs[1] * self.fov_shape[1])

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.n_channels, self.n_z, *self.well_shape)

    @property
    def max_shift(self) -> tuple[float, float]:
        return tuple(
            max(self.max_shift_px, self.max_shift_fraction * n) for n in self.fov_shape
        )

    @property
    def wells(self) -> list[tuple[str, str]]:
        """(row, column) of every well, e.g. ``[("B", "03")]``."""
        names = self.extra.get("wells") or [ROW + COLUMN]
        return [(w[:1], w[1:]) for w in names]

    def describe(self) -> str:
        text = (
            f"{self.n_acquisitions} acquisitions x {self.fovs[0]}x{self.fovs[1]} "
            f"FOVs of {self.fov_shape[0]}x{self.fov_shape[1]} px, {self.n_z} z, "
            f"{self.n_channels} ch"
        )
        if len(self.wells) > 1:
            text = f"{len(self.wells)} wells x {text}"
        if self.extra.get("labels"):
            text += f", labels {self.extra['labels']!r}"
        if self.extra.get("ngff"):
            text += f", NGFF {self.extra['ngff']}"
        return text

    def level0_bytes_per_image(self) -> int:
        return int(np.prod(self.shape)) * 2

    def chunk_tuple(self):
        if self.chunks == "fov":
            return (1, 1, *self.fov_shape)
        if self.chunks == "auto":
            return "auto"
        return tuple(int(v) for v in self.chunks.split(","))


def wavelength_ids(n_channels: int) -> list[str]:
    return [f"A01_C{c + 1:02d}" for c in range(n_channels)]


def fov_names(spec: SynthSpec) -> list[str]:
    return [f"FOV_{i + 1}" for i in range(spec.fovs[0] * spec.fovs[1])]


def fov_origin(spec: SynthSpec, index: int) -> tuple[int, int]:
    iy, ix = divmod(index, spec.fovs[1])
    return iy * spec.fov_shape[0], ix * spec.fov_shape[1]


# --------------------------------------------------------------------------
# Content
# --------------------------------------------------------------------------


def _soft_ellipse(size, ry, rx, angle, steep):
    c = (size - 1) / 2.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) - c
    ca, sa = math.cos(angle), math.sin(angle)
    u = (ca * xx + sa * yy) / rx
    v = (-sa * xx + ca * yy) / ry
    r = np.sqrt(u * u + v * v)
    return 1.0 / (1.0 + np.exp((r - 1.0) * steep))


def _make_templates(rng, spec: SynthSpec, kind: int, count: int = 16):
    """Pre-rendered, PSF-blurred objects; kind 0 nuclei, 1 cytoplasm, 2 spots."""
    out = []
    rmin, rmax = spec.nucleus_radius
    for _ in range(count):
        ra = rng.uniform(rmin, rmax)
        rb = ra * rng.uniform(0.65, 1.0)
        ang = rng.uniform(0, math.pi)
        if kind == 1:
            ra, rb = ra * 1.9, rb * 1.9
        size = int(2 * math.ceil(ra * (1.7 if kind == 1 else 1.0)) + 9)
        body = _soft_ellipse(size, rb, ra, ang, 10.0 if kind != 1 else 5.0)
        tex = ndimage.gaussian_filter(
            rng.standard_normal((size, size)).astype(np.float32), 1.5
        )
        if kind == 0:
            body = body * (0.8 + 0.6 * tex)
        elif kind == 1:
            body = 0.35 * body * (0.7 + 0.8 * tex)
        else:
            spots = (rng.random((size, size)) < 0.02).astype(np.float32) * 4.0
            body = body * (0.15 + ndimage.gaussian_filter(spots, 1.2) * 6.0)
        body = ndimage.gaussian_filter(np.clip(body, 0, None), 1.1)
        out.append(body.astype(np.float32))
    return out


class SynthSample:
    """The continuous well sample plus per-acquisition imaging parameters."""

    def __init__(self, spec: SynthSpec):
        self.spec = spec
        rng = np.random.default_rng(spec.seed)
        self.templates = [
            _make_templates(rng, spec, kind=c % 3) for c in range(spec.n_channels)
        ]
        tmax = max(t.shape[0] for ts in self.templates for t in ts)
        msy, msx = spec.max_shift
        margin_y = int(math.ceil(msy)) + tmax + 8
        margin_x = int(math.ceil(msx)) + tmax + 8
        wy, wx = spec.well_shape
        area = (wy + 2 * margin_y) * (wx + 2 * margin_x)
        n = int(area / spec.area_per_nucleus)
        self.n = n
        self.cy = rng.integers(-margin_y, wy + margin_y, n)
        self.cx = rng.integers(-margin_x, wx + margin_x, n)
        self.kind = rng.integers(0, 16, n)
        self.amp = rng.lognormal(np.log(900.0), 0.45, (spec.n_channels, n))
        if spec.n_z > 1:
            self.zc = rng.uniform(-1, spec.n_z, n)
            self.rz = rng.uniform(0.18, 0.35, n) * spec.n_z + 1.0
        else:
            self.zc = np.zeros(n)
            self.rz = np.full(n, np.inf)
        # Per acquisition: background, per-channel gain, per-nucleus stain
        # variation (small for the registration channel 0, large otherwise).
        na = spec.n_acquisitions
        self.bg = rng.uniform(0.8, 1.2, na) * spec.background
        self.gain = rng.uniform(0.6, 1.6, (na, spec.n_channels))
        self.stain = np.empty((na, spec.n_channels, n))
        for a in range(na):
            for c in range(spec.n_channels):
                sigma = 0.12 if c == 0 else 0.6
                self.stain[a, c] = rng.lognormal(0.0, sigma, n)
        self.truth = self._draw_shifts(rng)
        self._rng_noise = np.random.default_rng(spec.seed + 1000)
        self._bank = None
        if spec.noise == "fast":
            size = max(1 << 23, 2 * spec.fov_shape[0] * spec.fov_shape[1])
            sd = math.sqrt(spec.read_noise**2 + 200.0)
            self._bank = (
                self._rng_noise.standard_normal(size, np.float32) * sd
            ).astype(np.int16)

    def _draw_shifts(self, rng):
        spec = self.spec
        msy, msx = spec.max_shift
        out = {}
        for a in range(spec.n_acquisitions):
            base = rng.uniform(-0.75, 0.75, 2) * (msy, msx)
            for name in fov_names(spec):
                if a == 0:
                    t = (0.0, 0.0)
                else:
                    jit = rng.uniform(-0.25, 0.25, 2) * (msy, msx)
                    if spec.extra.get("shift") == "per_well":
                        jit *= 0  # the whole well moved as one piece
                    t = base + jit
                    if spec.subpixel:
                        # keep at least a clear fractional part
                        t = np.round(t * 8) / 8.0
                    else:
                        t = np.round(t)
                out[(a, name)] = (0.0, float(t[0]), float(t[1]))
        return out

    def render_signal(self, c, z, a, y0, x0, h, w):
        """Noise-free signal of channel c, plane z, acq a on a window."""
        out = np.zeros((h, w), np.float32)
        tmpl = self.templates[c]
        sel = self._overlapping(tmpl, y0, x0, h, w)
        if self.spec.n_z > 1:
            dz = (z - self.zc) / self.rz
            wz = np.sqrt(np.clip(1.0 - dz * dz, 0.0, None))
            sel &= wz > 0
        else:
            wz = np.ones(self.n)
        idx = np.nonzero(sel)[0]
        amps = self.amp[c, idx] * self.stain[a, c, idx] * wz[idx]
        for i, amp in zip(idx, amps, strict=True):
            t = tmpl[self.kind[i]]
            where = self._stamp(i, t.shape[0], y0, x0, h, w)
            if where is not None:
                out[where[0]] += t[where[1]] * amp
        return out

    def _overlapping(self, templates, y0, x0, h, w):
        """Which objects (their templates) reach into the window."""
        half = np.array([t.shape[0] // 2 for t in templates])[self.kind]
        return (
            (self.cy + half >= y0)
            & (self.cy - half < y0 + h)
            & (self.cx + half >= x0)
            & (self.cx - half < x0 + w)
        )

    def _stamp(self, i, size, y0, x0, h, w):
        """(window slices, template slices) where object i's template of
        ``size`` overlaps the window at (y0, x0) of h x w; None if it does not."""
        ty0 = self.cy[i] - size // 2 - y0
        tx0 = self.cx[i] - size // 2 - x0
        oy0, ox0 = max(ty0, 0), max(tx0, 0)
        oy1, ox1 = min(ty0 + size, h), min(tx0 + size, w)
        if oy1 <= oy0 or ox1 <= ox0:
            return None
        inside = (slice(oy0, oy1), slice(ox0, ox1))
        return inside, (slice(oy0 - ty0, oy1 - ty0), slice(ox0 - tx0, ox1 - tx0))

    def render_fov(self, a, fov_index, name):
        """uint16 (C, Z, Y, X) block of acquisition a for one FOV."""
        spec = self.spec
        fy, fx = spec.fov_shape
        oy, ox = fov_origin(spec, fov_index)
        _, ty, tx = self.truth[(a, name)]
        iy, ix = math.floor(ty), math.floor(tx)
        fr_y, fr_x = ty - iy, tx - ix
        pad = 4 if (fr_y or fr_x) else 0
        block = np.empty((spec.n_channels, spec.n_z, fy, fx), np.uint16)
        for c in range(spec.n_channels):
            for z in range(spec.n_z):
                sig = self.render_signal(
                    c, z, a, oy + iy - pad, ox + ix - pad, fy + 2 * pad, fx + 2 * pad
                )
                if pad:
                    sig = ndimage.shift(sig, (-fr_y, -fr_x), order=3, mode="nearest")
                    sig = sig[pad : pad + fy, pad : pad + fx]
                sig *= self.gain[a, c]
                if self._bank is not None:
                    o = int(self._rng_noise.integers(0, self._bank.size - fy * fx))
                    sig += self._bank[o : o + fy * fx].reshape(fy, fx)
                else:
                    noise = self._rng_noise.standard_normal((fy, fx), dtype=np.float32)
                    # read noise + approximate shot noise
                    noise *= np.sqrt(spec.read_noise**2 + 0.5 * sig)
                    sig += noise
                sig += self.bg[a]
                np.clip(sig, 0, 65535, out=sig)
                block[c, z] = sig
        return block

    def render_labels(self, a, fov_index, name):
        """uint32 (Z, Y, X) nuclei labels of acquisition a for one FOV.

        Object i of channel 0 gets label i + 1 where its template exceeds a
        quarter of its maximum; it sits where the acquisition sees it
        (integer part of the shift), so labels move with the intensities.
        """
        spec = self.spec
        fy, fx = spec.fov_shape
        oy, ox = fov_origin(spec, fov_index)
        _, ty, tx = self.truth[(a, name)]
        y0, x0 = oy + int(round(ty)), ox + int(round(tx))
        tmpl = self.templates[0]
        masks = [t > 0.25 * t.max() for t in tmpl]
        sel = self._overlapping(tmpl, y0, x0, fy, fx)
        out = np.zeros((spec.n_z, fy, fx), np.uint32)
        for i in np.nonzero(sel)[0]:
            m = masks[self.kind[i]]
            where = self._stamp(i, m.shape[0], y0, x0, fy, fx)
            if where is None:
                continue
            inside, sub = where[0], m[where[1]]
            if spec.n_z > 1:
                dz = (np.arange(spec.n_z) - self.zc[i]) / self.rz[i]
                planes = np.nonzero(np.abs(dz) < 1.0)[0]
            else:
                planes = [0]
            for z in planes:
                out[z][inside][sub] = i + 1
        return out


# --------------------------------------------------------------------------
# Plate writing (ngio 1.1)
# --------------------------------------------------------------------------


def zarr_urls(plate_dir: Path, spec: SynthSpec) -> list[str]:
    """Image URLs, well by well, acquisition 0 first within each well."""
    out = []
    for row, column in spec.wells:
        well = Path(plate_dir) / "plate.zarr" / row / column
        out += [str(well / str(a)) for a in range(spec.n_acquisitions)]
    return out


def _well_spec(spec: SynthSpec, index: int) -> SynthSpec:
    """The spec of the index-th well: the first keeps the seed (and so the
    content of single-well plates); the others get seeds of their own."""
    if index == 0:
        return spec
    return replace(spec, seed=spec.seed + 7919 * index)


def _write_tables(container, spec: SynthSpec):
    from ngio import Roi, RoiTable

    ps, zs = spec.pixel_size, spec.z_spacing
    fy, fx = spec.fov_shape
    zlen = spec.n_z * zs
    rois = []
    for i, name in enumerate(fov_names(spec)):
        oy, ox = fov_origin(spec, i)
        rois.append(
            Roi.from_values(
                name=name,
                slices={
                    "z": (0.0, zlen),
                    "y": (oy * ps, fy * ps),
                    "x": (ox * ps, fx * ps),
                },
            )
        )
    wy, wx = spec.well_shape
    well = Roi.from_values(
        name="well_1",
        slices={"z": (0.0, zlen), "y": (0.0, wy * ps), "x": (0.0, wx * ps)},
    )
    container.add_table(
        "FOV_ROI_table", RoiTable(rois=rois), backend="anndata", overwrite=True
    )
    container.add_table(
        "well_ROI_table", RoiTable(rois=[well]), backend="anndata", overwrite=True
    )


def build_plate(plate_dir, spec: SynthSpec, log=print) -> dict:
    """Write the plate into plate_dir/plate.zarr; return the truth manifest."""
    from ngio import Channel, ImageInWellPath, create_empty_plate

    plate_dir = Path(plate_dir)
    if plate_dir.exists():
        shutil.rmtree(plate_dir)
    plate_dir.mkdir(parents=True)
    t0 = time.perf_counter()
    plate_url = str(plate_dir / "plate.zarr")
    label_name = spec.extra.get("labels")
    truth = {}
    n_nuclei = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        create_empty_plate(
            store=plate_url,
            name="synthetic",
            images=[
                ImageInWellPath(row=row, column=col, path=str(a), acquisition_id=a)
                for row, col in spec.wells
                for a in range(spec.n_acquisitions)
            ],
            overwrite=True,
        )
        chans = [
            Channel.default_init(label=f"ch{c}", wavelength_id=w)
            for c, w in enumerate(wavelength_ids(spec.n_channels))
        ]
        all_urls = zarr_urls(plate_dir, spec)
        t_render = t_write = t_pyr = 0.0
        n_acq = spec.n_acquisitions
        for w in range(len(spec.wells)):
            sample = SynthSample(_well_spec(spec, w))
            n_nuclei += sample.n
            urls = all_urls[w * n_acq : (w + 1) * n_acq]
            t_render, t_write, t_pyr = _write_well(
                spec, sample, urls, chans, label_name, (t_render, t_write, t_pyr)
            )
            truth.update(
                {
                    url: {
                        name: list(sample.truth[(a, name)]) for name in fov_names(spec)
                    }
                    for a, url in enumerate(urls)
                }
            )
    manifest = {
        "spec": asdict(spec),
        "key": spec.key(),
        "zarr_urls": all_urls,
        "wavelength_ids": wavelength_ids(spec.n_channels),
        "truth_px": truth,
        "n_nuclei": n_nuclei,
        "build_seconds": {
            "render": round(t_render, 2),
            "write_level0": round(t_write, 2),
            "pyramid": round(t_pyr, 2),
            "total": round(time.perf_counter() - t0, 2),
        },
    }
    (plate_dir / COMPLETE_MARKER).write_text(json.dumps(manifest, indent=1))
    log(
        f"  built {plate_dir} in {manifest['build_seconds']['total']:.1f}s "
        f"(render {t_render:.1f}s, level-0 write {t_write:.1f}s, "
        f"pyramid {t_pyr:.1f}s)"
    )
    return manifest


def _write_well(spec, sample, urls, chans, label_name, times):
    """Write the images (and labels) of one well; return the updated timers."""
    from ngio import create_empty_ome_zarr

    for a, url in enumerate(urls):
        oz = create_empty_ome_zarr(
            url,
            shape=spec.shape,
            pixelsize=spec.pixel_size,
            z_spacing=spec.z_spacing,
            axes_names="czyx",
            levels=spec.levels,
            channels_meta=chans,
            dtype="uint16",
            chunks=spec.chunk_tuple(),
            ngff_version=spec.extra.get("ngff", "0.4"),
            overwrite=True,
        )
        spent = _fill(spec, oz.get_image(), sample.render_fov, a, order="linear")
        if label_name:
            lab = oz.derive_label(label_name, overwrite=True)
            labels = _fill(spec, lab, sample.render_labels, a)
            spent = [x + y for x, y in zip(spent, labels, strict=True)]
        times = tuple(t + x for t, x in zip(times, spent, strict=True))
        _write_tables(oz, spec)
    return times


def _fill(spec, image, render, a, **consolidate) -> list[float]:
    """Render and write every FOV of acquisition ``a`` into ``image`` (an ngio
    image or label), then build its pyramid; seconds (render, write, pyramid)."""
    array = image.zarr_array
    fy, fx = spec.fov_shape
    spent = [0.0, 0.0, 0.0]
    for i, name in enumerate(fov_names(spec)):
        ta = time.perf_counter()
        block = render(a, i, name)
        tb = time.perf_counter()
        oy, ox = fov_origin(spec, i)
        array[..., oy : oy + fy, ox : ox + fx] = block
        spent[0] += tb - ta
        spent[1] += time.perf_counter() - tb
    tc = time.perf_counter()
    image.consolidate(mode="auto", **consolidate)
    spent[2] += time.perf_counter() - tc
    return spent


def relocate_manifest(manifest: dict, old_dir, new_dir) -> dict:
    """Same manifest with zarr_urls/truth keys moved from old_dir to new_dir."""
    old, new = str(Path(old_dir)), str(Path(new_dir))

    def mv(u):
        return new + u[len(old) :] if u.startswith(old) else u

    out = dict(manifest)
    out["zarr_urls"] = [mv(u) for u in manifest["zarr_urls"]]
    out["truth_px"] = {mv(u): v for u, v in manifest["truth_px"].items()}
    return out


def get_plate(cache_root, name: str, spec: SynthSpec, rebuild=False, log=print):
    """Build (or reuse a cached, complete) plate; return (plate_dir, manifest)."""
    plate_dir = Path(cache_root) / f"{name}-{spec.key()}"
    marker = plate_dir / COMPLETE_MARKER
    if marker.exists() and not rebuild:
        manifest = json.loads(marker.read_text())
        log(f"  reusing cached plate {plate_dir}")
        return plate_dir, manifest
    return plate_dir, build_plate(plate_dir, spec, log=log)


def copy_plate(src_dir, dst_dir) -> None:
    """Copy the plate directory (outside any timing) and flush it to disk."""
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    if dst_dir.exists():
        shutil.rmtree(dst_dir)
    shutil.copytree(src_dir, dst_dir)
    os.sync()


def dir_bytes(path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total
