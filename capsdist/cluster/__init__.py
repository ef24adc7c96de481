"""The job around a run: stop signals, the run-folder lock, the W&B service guard, the allocator setting."""
