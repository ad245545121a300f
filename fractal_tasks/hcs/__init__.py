"""The glue to Fractal and OME-Zarr HCS plates.

``wells`` finds a well's acquisitions and their reference; ``images`` opens
an input image with every pyramid level checked; ``roi_tables``
reads and writes ROI tables in micrometres; ``plan`` groups the images of a
plate for the init tasks; ``models`` holds the arguments an init task passes
on; ``errors`` is the error a user can fix; ``cpus`` how many threads a task
may use; ``swap`` replaces a directory so that no reader holding its lock sees
half of it, recovers an interrupted replace, and holds the plate's lock for
metadata updates.
"""
