"""Checkpoint formats, read and written safely: single files, sharded DCP directories, safetensors weights."""
