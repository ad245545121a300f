"""Image-based registration of multiplexed HCS OME-Zarr plates, as Fractal tasks."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fractal-tasks")
except PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0+unknown"
