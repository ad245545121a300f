"""The codec floor of apply: decode and encode every chunk it writes, nothing else.

Apply reads every level-0 chunk of an image and of each of its labels, and
writes every chunk of every level. The least any apply can do is decode
and encode those chunks with the array's own codec. Here the chunk files
are first read into memory (not timed); then each is decoded into a buffer
and encoded again on ``workers`` threads, every level of the image and of its
labels, as apply would: the time of that is the floor apply is compared with.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import zarr

from fractal_tasks.writer.chunk_io import chunk_file, direct_codec


def _multiscale_paths(group: Path) -> list[Path]:
    attrs = json.loads((group / ".zattrs").read_text())
    attrs = attrs.get("ome", attrs)  # NGFF 0.5 keeps them under "ome"
    return [group / d["path"] for d in attrs["multiscales"][0]["datasets"]]


def _arrays(image_url: str) -> list[Path]:
    """Every level of the image and of each label it lists."""
    image = Path(image_url)
    arrays = _multiscale_paths(image)
    labels = image / "labels" / ".zattrs"
    if labels.exists():
        for name in json.loads(labels.read_text()).get("labels", []):
            arrays += _multiscale_paths(image / "labels" / name)
    return arrays


def _chunks_in_memory(path: Path):
    """The array's codec, chunk shape and dtype, and the bytes of its chunk files."""
    array = zarr.open_array(str(path), mode="r")
    direct, codec = direct_codec(array)
    if not direct:
        raise ValueError(f"{path}: not a layout whose chunk files apply writes")
    grid = [range(math.ceil(n / c)) for n, c in zip(array.shape, array.chunks)]
    files = (chunk_file(array, index) for index in itertools.product(*grid))
    blobs = [Path(f).read_bytes() for f in files if os.path.exists(f)]
    return codec, array.chunks, array.dtype, blobs


def codec_floor(src_urls: list[str], workers: int) -> dict:
    """Seconds to decode and encode every chunk of ``src_urls``' arrays.

    Returns ``{"seconds", "chunks", "raw_mb"}``; ``seconds`` is the timed
    part only.
    """
    jobs = []
    for url in src_urls:
        for path in _arrays(url):
            codec, chunks, dtype, blobs = _chunks_in_memory(path)
            jobs += [(codec, chunks, dtype, blob) for blob in blobs]

    def one(job) -> None:
        codec, chunks, dtype, blob = job
        if codec is None:  # raw chunks: a copy each way
            np.frombuffer(blob, dtype).reshape(chunks).tobytes()
            return
        codec.encode(codec.decode(blob, out=np.empty(chunks, dtype)))

    started = time.perf_counter()
    with ThreadPoolExecutor(max(1, workers)) as pool:
        list(pool.map(one, jobs))
    seconds = time.perf_counter() - started
    raw = sum(math.prod(c) * np.dtype(d).itemsize for _, c, d, _ in jobs)
    return {"seconds": seconds, "chunks": len(jobs), "raw_mb": raw / 1e6}
