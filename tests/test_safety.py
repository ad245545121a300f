"""Concurrency and crashes, with real processes (forkserver children).

Every image of a well is applied at once, the reference included, as a Fractal
job does; apply processes are killed with SIGKILL at random moments. The plate
must always hold complete images, and a re-run must finish the job. No apply
may log a warning or raise a Python warning (Fractal flags such images).

By default each test runs a few rounds; with ``FRACTAL_TASKS_LONG_TESTS=1`` in
the environment (as CI's ``.ci/run`` sets it) the full counts: 20 whole-well
rounds, 32 concurrent additions, 12 kills. ``FRACTAL_TASKS_WELL_ROUNDS=<n>``
sets the number of whole-well rounds (to measure a failure rate).
"""

import contextlib
import logging
import multiprocessing
import os
import random
import shutil
import signal
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from _workflow import calculate, consensus, urls_of
from ngio import open_ome_zarr_container, open_ome_zarr_well

from fractal_tasks.apply_registration_to_image import apply_registration_to_image
from fractal_tasks.hcs import swap
from fractal_tasks.hcs.swap import exchange, reading, replace_directory
from fractal_tasks.hcs.wells import add_image_to_well

TABLE = "FOV_ROI_table_registered"
CTX = multiprocessing.get_context("forkserver")
# The forkserver imports these once and every child starts with them imported,
# in milliseconds instead of seconds. Python 3.11's forkserver does not see the
# tests folder (it ignores the parent's sys.path), so "test_safety" alone would
# be skipped there: the package modules it needs are listed too.
CTX.set_forkserver_preload(
    [
        "test_safety",
        "pytest",
        "fractal_tasks.hcs.wells",
        "fractal_tasks.apply_registration_to_image",
        "fractal_tasks.calculate_registration",
        "fractal_tasks.find_consensus",
        "fractal_tasks.init_calculate_registration",
        "fractal_tasks.init_find_consensus",
    ]
)
LONG = os.environ.get("FRACTAL_TASKS_LONG_TESTS", "") not in ("", "0")
WELL_ROUNDS = int(os.environ.get("FRACTAL_TASKS_WELL_ROUNDS", 20 if LONG else 2))
ADDITIONS = 32 if LONG else 8
KILLS = 12 if LONG else 3
REPLACES = 1000 if LONG else 200
# set by .ci/fuse_safety.sh: the bindfs mount the tests' tmp_path must be on
FUSE_MOUNT = os.environ.get("FRACTAL_TASKS_FUSE_MOUNT")


class _Collect(logging.Handler):
    """Every record at WARNING or above, from any logger."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.said: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.said.append(f"{record.levelname} {record.getMessage()}")


def _apply(url, overwrite, barrier=None):
    """Apply one image; fail if it warns (Fractal flags the image's log)."""
    if barrier is not None:
        barrier.wait()
    collect = _Collect()
    logging.getLogger().addHandler(collect)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            apply_registration_to_image(
                zarr_url=url, registered_roi_table=TABLE, overwrite_input=overwrite
            )
    finally:
        logging.getLogger().removeHandler(collect)
    said = collect.said + [f"{w.category.__name__} {w.message}" for w in caught]
    assert said == [], f"{url}: {said}"


def _add(well_url, path, barrier):
    barrier.wait()
    add_image_to_well(well_url, path, 0)


def _arrays(url):
    with reading(Path(url)):  # as Apply reads a reference
        c = open_ome_zarr_container(url)
        return c.get_image().get_array(), c.get_label("nuclei").get_array()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A plate with consensus tables, and the expected output of every image."""
    from fractal_tasks.tools.synthetic import build_synthetic_plate

    root = tmp_path_factory.mktemp("safety")
    plate = build_synthetic_plate(
        root / "plate.zarr",
        wells=("B03",),
        n_acquisitions=4,
        fovs=(2, 2),
        fov_shape=(128, 160),
        levels=3,
        chunks=(1, 1, 64, 80),
        seed=5,
    )
    calculate(plate)
    consensus(plate)
    pristine = root / "pristine.zarr"
    shutil.copytree(plate.plate_url, pristine)
    for url in urls_of(plate):
        _apply(url, False)
    expected = {u: _arrays(f"{u}_registered") for u in urls_of(plate)}
    original = {u: _arrays(u) for u in urls_of(plate)}
    return plate, pristine, expected, original


def _reset(plate, pristine):
    shutil.rmtree(plate.plate_url)
    shutil.copytree(pristine, plate.plate_url)


def _leftovers(plate):
    well = Path(plate.plate_url, "B", "03")
    names = [p.name for p in well.iterdir()]
    names += [p.name for p in well.glob("*/tables/*")]
    scratch = [p.name for p in well.glob(".registering/*")]
    return scratch + [n for n in names if n.endswith((".writing", ".replaced"))]


def _same(got, want):
    return all(np.array_equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("overwrite", [True, False])
def test_whole_well_applied_at_once_many_times(prepared, overwrite):
    plate, pristine, expected, _ = prepared
    urls = urls_of(plate)
    failed = 0
    for _ in range(WELL_ROUNDS):
        _reset(plate, pristine)
        barrier = CTX.Barrier(len(urls))
        procs = [CTX.Process(target=_apply, args=(u, overwrite, barrier)) for u in urls]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
        # every round runs, so that a failure comes with its rate
        failed += sum(p.exitcode != 0 for p in procs)
        if any(p.exitcode != 0 for p in procs):
            continue
        for url in urls:
            out = url if overwrite else f"{url}_registered"
            assert _same(_arrays(out), expected[url])
        paths = open_ome_zarr_well(plate.plate_url + "/B/03").paths()
        names = [u.rsplit("/", 1)[1] for u in urls]
        if not overwrite:
            names += [f"{n}_registered" for n in names]
        assert sorted(paths) == sorted(names)
        assert _leftovers(plate) == []
    assert failed == 0, f"{failed} of {WELL_ROUNDS * len(urls)} applies failed"


def test_concurrent_well_additions_are_all_recorded(prepared, tmp_path):
    plate, pristine, _, _ = prepared
    _reset(plate, pristine)
    well_url = plate.plate_url + "/B/03"
    barrier = CTX.Barrier(ADDITIONS)
    procs = [
        CTX.Process(target=_add, args=(well_url, f"extra{i}", barrier))
        for i in range(ADDITIONS)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * ADDITIONS
    paths = open_ome_zarr_well(well_url).paths()
    assert sorted(p for p in paths if p.startswith("extra")) == sorted(
        f"extra{i}" for i in range(ADDITIONS)
    )


@pytest.mark.parametrize("overwrite", [True, False])
def test_sigkill_at_random_moments_never_loses_the_image(prepared, overwrite):
    plate, pristine, expected, original = prepared
    url = urls_of(plate)[2]
    out = url if overwrite else f"{url}_registered"
    _reset(plate, pristine)
    started = time.perf_counter()
    run = CTX.Process(target=_apply, args=(url, overwrite))
    run.start()
    run.join()
    duration = time.perf_counter() - started
    rng = random.Random(0)
    states = []
    for _ in range(KILLS):
        _reset(plate, pristine)
        proc = CTX.Process(target=_apply, args=(url, overwrite))
        proc.start()
        time.sleep(rng.uniform(0.0, duration * 1.1))
        with contextlib.suppress(ProcessLookupError):  # it may have finished
            os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        # the input is intact, or the output complete
        if overwrite:
            now = _arrays(url)
            assert _same(now, original[url]) or _same(now, expected[url])
            states.append("new" if _same(now, expected[url]) else "old")
        else:
            assert _same(_arrays(url), original[url])
            done = Path(out).exists() and (Path(out) / ".zattrs").exists()
            if done:
                assert _same(_arrays(out), expected[url])
            states.append("new" if done else "old")
        well = open_ome_zarr_well(plate.plate_url + "/B/03")
        for path in well.paths():
            with reading(Path(plate.plate_url, "B", "03", path)):
                open_ome_zarr_container(f"{plate.plate_url}/B/03/{path}")
        # a re-run finishes the job and cleans up
        _apply(url, overwrite)
        assert _same(_arrays(out), expected[url])
        assert _leftovers(plate) == []
        listed = open_ome_zarr_well(plate.plate_url + "/B/03").paths()
        assert listed.count(Path(out).name) == 1
    assert "old" in states, states


@pytest.mark.skipif(FUSE_MOUNT is None, reason="only in .ci/fuse_safety.sh")
def test_runs_on_a_mount_without_exchange(tmp_path):
    # else the CI step on the FUSE mount would quietly test the fast path
    assert tmp_path.resolve().is_relative_to(Path(FUSE_MOUNT).resolve())
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    assert exchange(tmp_path / "a", tmp_path / "b") is False
    with reading(tmp_path / "a"):  # fcntl locks work there
        assert (tmp_path / ".a.lock").is_file()


def _replace_many(image, times, started):
    # the fallback everywhere, also where the file system could exchange
    swap.exchange = lambda first, second: False
    started.set()
    for i in range(1, times + 1):
        new = image.with_name(image.name + ".registering")
        new.mkdir()
        for name in ("a", "b"):
            (new / name).write_text(str(i))
        replace_directory(new, image)


def _read_until(image, done, seen):
    """Read both files of ``image`` under the lock until ``done``; count reads."""
    reads = 0
    while not done.is_set():
        with reading(image):
            # a missing file or two versions would raise or differ
            assert (image / "a").read_text() == (image / "b").read_text()
        reads += 1
    seen.put(reads)


def test_readers_never_see_a_replace_midway(tmp_path):
    image = tmp_path / "img"
    image.mkdir()
    for name in ("a", "b"):
        (image / name).write_text("0")
    started, done, seen = CTX.Event(), CTX.Event(), CTX.Queue()
    readers = [CTX.Process(target=_read_until, args=(image, done, seen)) for _ in "12"]
    writer = CTX.Process(target=_replace_many, args=(image, REPLACES, started))
    for p in readers:
        p.start()
    writer.start()
    writer.join(300)
    done.set()
    for p in readers:
        p.join(60)
    assert started.is_set() and writer.exitcode == 0
    assert [p.exitcode for p in readers] == [0, 0]
    assert min(seen.get(timeout=5) for _ in readers) > 0
    assert (image / "a").read_text() == str(REPLACES)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".img.lock", "img"]
