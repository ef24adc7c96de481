"""The memory one training step of a CapsNet needs, estimated from its shapes alone (nothing is allocated), so that
a batch that cannot fit is refused before any work.

Per sample, two tensors dominate: the routing priors u_hat of every routed layer (inputs x outputs x dim, float32:
routing runs in float32 under mixed precision too) and Conv1's activations (channels x grid x grid, in the
activation precision). Forward keeps the priors and Conv1's output and ReLU for backward; the peak is that, or
Conv1's backward (four Conv1-sized tensors) after the priors are freed, whichever is larger. Against VmHWM measured
on one CPU step (forward, backward, fused Adam) this is 86-99% of the truth: the paper's MNIST model (1.64 MB
estimated, 1.83 MB measured per sample), its 36x36 MultiMNIST model (3.65, 4.23), priors alone (2.98, 3.22 for
1152 x 10 x 64), Conv1 alone (1.64, 1.65) and streamed routing (1.64, 1.88). Under an estimate, a refusal is
never wrong: a run refused would not have fit.
"""

from __future__ import annotations

from typing import NamedTuple

from capsdist.model.capsnet import CapsLayer, CapsNet, conv_out

PRIORS_BYTES = 4  # float32
STREAMED_INPUTS = 16  # the fewest inputs whose priors a streamed layer holds at once (streaming.auto_chunk)
PER_PARAMETER = 16  # bytes: float32 weight, gradient and Adam's two moments


class Footprint(NamedTuple):
    """A training step's memory: ``per_sample`` bytes (``priors`` of them u_hat) and ``fixed`` bytes whatever the
    batch (weights, gradients, optimizer state)."""

    per_sample: int
    priors: int
    fixed: int

    def total(self, batch: int) -> int:
        """Bytes for one step at ``batch`` samples."""
        return self.fixed + batch * self.per_sample


def _inputs_at_once(layer: CapsLayer, streamed: bool) -> int:
    """How many input capsules' priors a routed layer holds at once: all, or a streamed layer's chunk."""
    chunk = layer.chunk_size
    if chunk is None and not streamed:
        return layer.n_in
    return min(layer.n_in, chunk or STREAMED_INPUTS)


def training_footprint(net: CapsNet, activation_bytes: int = 4, streamed: bool = False) -> Footprint:
    """Estimate one training step's memory for ``net`` (module docstring). ``activation_bytes``: 2 under 16-bit
    (mixed) precision, 4 in float32; ``streamed``: every routed layer streams its routing, as ``routing_chunk_size``
    or capsule parallelism make them."""
    config = net.config
    grid = conv_out(config["image_size"], config["conv_kernel"])
    conv = net.conv1.out_channels * grid * grid * activation_bytes
    priors = sum(_inputs_at_once(layer, streamed) * layer.n_out * layer.d_out for layer in net.caps) * PRIORS_BYTES
    fixed = PER_PARAMETER * sum(p.numel() for p in net.parameters())
    return Footprint(max(priors + 2 * conv, 4 * conv), priors, fixed)
