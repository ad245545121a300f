"""Plain numpy + zarr baseline: chunk-by-chunk copy plus a 2x2-mean pyramid.

This is the "speed of the disk" reference for the apply benchmark: it moves
the same bytes an apply-registration task has to move (read every level-0
chunk, write it to a new array with identical chunks and compressor, then
build every coarser level from the previous one by 2x2 mean), with no
registration logic, no ROI handling and no OME-Zarr library.  Work is
chunk-aligned, so memory is bounded by ``workers`` x a few chunks.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import zarr


def _level_paths(image_url: str) -> list[str]:
    attrs = json.loads((Path(image_url) / ".zattrs").read_text())
    if "ome" in attrs:  # NGFF 0.5
        attrs = attrs["ome"]
    return [d["path"] for d in attrs["multiscales"][0]["datasets"]]


def _chunk_slices(shape, chunks):
    ranges = [range(math.ceil(s / c)) for s, c in zip(shape, chunks, strict=True)]
    for idx in itertools.product(*ranges):
        yield tuple(
            slice(i * c, min((i + 1) * c, s))
            for i, c, s in zip(idx, chunks, shape, strict=True)
        )


def _new_like(src: zarr.Array, path: str, shape) -> zarr.Array:
    kwargs = {}
    if src.metadata.zarr_format == 2:
        kwargs["compressors"] = src.compressors or None
        kwargs["filters"] = src.filters or None
        sep = getattr(src.metadata, "dimension_separator", "/") or "/"
        kwargs["chunk_key_encoding"] = {"name": "v2", "separator": sep}
    else:
        kwargs["compressors"] = src.compressors
    return zarr.create_array(
        store=path,
        shape=shape,
        chunks=src.chunks,
        dtype=src.dtype,
        zarr_format=src.metadata.zarr_format,
        fill_value=0,
        overwrite=True,
        **kwargs,
    )


def _mean2x2(block: np.ndarray, out_shape) -> np.ndarray:
    """2x2 mean (rounded) over the last two axes of an integer block.

    Odd edges are padded by replication. Sums the four phases in uint32
    in place, so the temporary is half the size of the input block.
    """
    *lead, h, w = block.shape
    oh, ow = out_shape[-2], out_shape[-1]
    need_h, need_w = 2 * oh, 2 * ow
    if h != need_h or w != need_w:
        block = block[..., :need_h, :need_w]
        ph, pw = need_h - block.shape[-2], need_w - block.shape[-1]
        if ph or pw:
            pad = [(0, 0)] * len(lead) + [(0, ph), (0, pw)]
            block = np.pad(block, pad, mode="edge")
    if block.dtype.kind in "ui" and block.dtype.itemsize <= 2:
        acc = block[..., 0::2, 0::2].astype(
            np.uint32 if block.dtype.kind == "u" else np.int32
        )
        acc += block[..., 1::2, 0::2]
        acc += block[..., 0::2, 1::2]
        acc += block[..., 1::2, 1::2]
        acc += 2
        acc >>= 2
        return acc.astype(block.dtype)
    f = block.astype(np.float64).reshape(*lead, oh, 2, ow, 2).mean(axis=(-3, -1))
    return f.astype(block.dtype)


def copy_image(src_url: str, dst_url: str, workers: int = 2) -> dict:
    paths = _level_paths(src_url)
    src0 = zarr.open_array(str(Path(src_url) / paths[0]), mode="r")
    if os.path.exists(dst_url):
        shutil.rmtree(dst_url)
    os.makedirs(dst_url)
    shutil.copy(Path(src_url) / ".zattrs", Path(dst_url) / ".zattrs")
    shutil.copy(Path(src_url) / ".zgroup", Path(dst_url) / ".zgroup")
    dst_levels = []
    n_chunks = 0
    with ThreadPoolExecutor(max_workers=workers) as pool:
        dst0 = _new_like(src0, str(Path(dst_url) / paths[0]), src0.shape)

        def copy_chunk(sl):
            dst0[sl] = src0[sl]

        slices = list(_chunk_slices(src0.shape, src0.chunks))
        list(pool.map(copy_chunk, slices))
        n_chunks += len(slices)
        dst_levels.append(dst0)
        for p in paths[1:]:
            src_k = zarr.open_array(str(Path(src_url) / p), mode="r")
            prev = dst_levels[-1]
            dst_k = _new_like(src_k, str(Path(dst_url) / p), src_k.shape)

            def down_chunk(sl, prev=prev, dst_k=dst_k):
                # leading axes (c, z) are not downsampled; y, x by 2
                src_sl = tuple(sl[:-2]) + tuple(
                    slice(2 * s.start, min(2 * s.stop, n))
                    for s, n in zip(sl[-2:], prev.shape[-2:], strict=True)
                )
                out_shape = tuple(s.stop - s.start for s in sl)
                dst_k[sl] = _mean2x2(prev[src_sl], out_shape)

            slices = list(_chunk_slices(dst_k.shape, dst_k.chunks))
            list(pool.map(down_chunk, slices))
            n_chunks += len(slices)
            dst_levels.append(dst_k)
    return {"levels": len(paths), "chunks_written": n_chunks}


def copy_images(src_urls: list[str], dst_dir: str, workers: int = 2) -> dict:
    """Copy every image of src_urls into dst_dir/<index>."""
    os.makedirs(dst_dir, exist_ok=True)
    out = {}
    for i, url in enumerate(src_urls):
        out[url] = copy_image(url, os.path.join(dst_dir, str(i)), workers=workers)
    return out
