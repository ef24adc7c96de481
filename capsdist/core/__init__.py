"""Bottom layer: the error type, the one atomic writer, shipped files by name, range-rule helpers."""
