"""The range rules of the data settings (checked when a DataModule is built, and on settings read from a
checkpoint)."""

from __future__ import annotations

from capsdist.core.rules import integer

DATA_RULES = {
    "batch_size": integer(1, 1 << 16),  # per rank; bounds what one batch (also one set by a file) allocates
    "num_workers": integer(0),
    "shuffle_buffer": integer(1),
    "train_batches_per_epoch": integer(1),
    "val_batches": integer(1),
    "train_samples": integer(1),
    "val_samples": integer(1),
    "max_shift": integer(0, 4),  # MNIST: the paper shifts by 2; more pushes strokes off the 28x28 canvas
}
