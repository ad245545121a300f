"""Writing a registered image without ever losing the input.

``apply`` plans one image (windows, labels, tables) and commits the result;
``pyramid`` streams the windows into a new multiscale image chunk by chunk;
``chunk_io`` reads and writes whole chunks; ``buffers`` and ``memory`` keep the
writer's memory flat. The replace itself and its locks are ``hcs.swap``.
"""
