"""Image-based registration of multiplexed HCS OME-Zarr plates, as Fractal tasks."""

__version__ = "0.1.0"
