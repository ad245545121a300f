"""Writing a registered image without ever losing the input.

``apply`` plans one image (windows, labels, tables) and commits the result;
``pyramid`` streams the windows into a new multiscale image chunk by chunk;
``chunk_io`` reads and writes whole chunks; ``buffers`` and ``memory`` keep the
writer's memory flat; ``swap`` replaces a directory so that no reader holding
its lock sees half of it, and recovers an interrupted replace.
"""
