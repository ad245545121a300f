"""Image-based registration of multiplexed HCS OME-Zarr plates, as Fractal tasks."""

from functools import cache


@cache
def _version() -> str:
    # read on first use: scanning the installed distributions costs ~50 ms,
    # which every task process would otherwise pay at import
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fractal-tasks")
    except PackageNotFoundError:  # a source tree that is not installed
        return "0+unknown"


def __getattr__(name: str) -> str:
    if name == "__version__":
        return _version()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
