"""The range rules of a CapsNet's settings and of its training module's (checked at config time and on every
model read from a file, before anything is allocated)."""

from __future__ import annotations

from capsdist.core.rules import counts, integer, real

MAX_ROUTING_ITERATIONS = 20  # the paper uses 1-3; at 1000 a step never finished
MODEL_RULES = {
    "num_targets": integer(1),
    "recon_weight": real(lambda v: v >= 0, "a number >= 0 (paper: 0.0005; 0 turns the term off)"),
    "lr": real(lambda v: v > 0, "a number > 0 (paper: 0.001)"),
    "lr_decay": real(lambda v: 0 < v <= 1, "a number in (0, 1] (paper: 0.96; 1 keeps lr constant)"),
    "lr_decay_steps": integer(1),
    "min_lr": real(lambda v: v >= 0, "a number >= 0"),
    "log_images_every_n_steps": integer(0),
    "routing_iterations": integer(1, MAX_ROUTING_ITERATIONS),
    "image_size": integer(1),
    "num_classes": integer(2),
    "in_channels": integer(1),
    "conv_channels": integer(1),
    "conv_kernel": integer(1),
    "primary_channels": integer(1),
    "primary_dim": integer(1),
    "primary_kernel": integer(1),
    "primary_stride": integer(1),
    "routing_chunk_size": integer(1),
    "decoder_hidden": (counts, "a list of integers >= 1 (paper: [512, 1024])"),
    "caps_layers": (
        lambda v: isinstance(v, list | tuple) and len(v) > 0 and all(counts(p) and len(p) == 2 for p in v),
        "a list of [count, dim] pairs of integers >= 1, the last count = num_classes (default: [[10, 16]])",
    ),
    "detach_routing": (lambda v: type(v) is bool, "true or false"),
    "reconstruction": (lambda v: type(v) is bool, "true or false"),
    "weight_init": (lambda v: v in ("paper", "scaled"), '"paper" (default) or "scaled" (stacks of routed layers)'),
}
