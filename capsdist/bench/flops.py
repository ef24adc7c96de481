"""`python -m capsdist.bench --what flops`: the FLOPs of one training step of a config's model, counted, the rate
this device achieves on it, and what they add up to over a MultiMNIST training run (the paper's 5.2% error).

Counted: ``torch.utils.flop_counter.FlopCounterMode`` over one real training step (forward, margin +
reconstruction loss, backward, fused Adam), which counts matrix products and convolutions only (conv, mm, addmm,
bmm, forward and backward); capsdist's routing agreements and weighted sums are batched GEMVs (bmm), so it counts
them. Added from the shapes (``routing_elementwise_flops``): routing's elementwise work over prior-sized and
logit-sized tensors, which it does not count. Left out: activations (ReLU, sigmoid), squash and the other ops on
[batch, outputs, dim] tensors (a factor n_in smaller than the priors), the losses and Adam (a few FLOPs per
parameter per step, not per image). On CPU the PrimaryCaps weight gradient runs as a forward convolution
(capsdist.model.conv), so it is counted under aten.convolution, with the same FLOPs. Dated results and the H100
estimate: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from capsdist.bench.models import train_step_case
from capsdist.bench.timing import timed
from capsdist.core import shipped
from capsdist.core.errors import CapsdistError
from capsdist.core.paper import MULTIMNIST_TRAIN_IMAGES
from capsdist.data.modules import SOURCES
from capsdist.model.capsnet import MODEL_ARGS, CapsNet

H100_BF16_DENSE = 989e12  # FLOP/s, NVIDIA H100 SXM, bf16 tensor cores without sparsity (datasheet)
# Assumed model FLOPs utilisations. Anchors, from the H200 bench rows of the 28x28 MNIST model (1.20 GFLOP per
# image by this count; docs/benchmarks.md, 2026-11-27, bf16, full routing gradient): 2.1% at batch 128 eager, 5.8%
# at 512 eager, 8.4% at 512 compiled (the H200's bf16 dense peak is the H100's; its memory is faster, so the H100's
# utilisation of this memory-bound routing would not be higher). 30% is an optimistic bound no run here reached.
ASSUMED_MFU = (0.02, 0.08, 0.3)
SOFTMAX_FLOPS = 5  # per element: max, subtract, exp, sum, divide


def routing_elementwise_flops(batch: int, n_in: int, n_out: int, d_out: int, iterations: int) -> int:
    """FLOPs of one full-gradient routed layer's forward + backward that are neither matmul nor conv (what
    FlopCounterMode misses), over the prior-sized P = batch*n_in*n_out*d_out and logit-sized L = batch*n_in*n_out
    tensors of ``capsdist.model.routing`` (T = iterations):

    - priors: forward, round 1's sum over the inputs (P); backward (T > 1), d u as 2(T-1) outer products written
      into one buffer (the first a multiply, P; the others multiply-adds, 2P each) plus round 1's share (P):
      P (4(T-1) + 1) in all.
    - logits: forward, a softmax per round after the first and a running sum from the third round on; backward,
      per round after the first, the softmax's gradient (2 multiplies, a sum, a subtraction) and the running sum
      of the logits' gradient: L (2 * 5 (T-1) + max(T-2, 0)).
    """
    priors, logits, rounds = batch * n_in * n_out * d_out, batch * n_in * n_out, iterations - 1
    return priors * (4 * rounds + 1) + logits * (2 * SOFTMAX_FLOPS * rounds + max(rounds - 1, 0))


def load_model(settings: dict[str, Any], name: str) -> tuple[CapsNet, int, int]:
    """(model, image size, digits per image) of a training config's settings at its data's image size."""
    data = SOURCES[settings.get("data", {}).get("source", "mnist")]
    model_args = {k: v for k, v in settings.get("model", {}).items() if k in MODEL_ARGS}
    model = CapsNet(**{**model_args, "image_size": data.image_size})
    if any(layer.detach or layer.chunk_size is not None for layer in model.caps):
        raise CapsdistError(
            f"{name}: routing_elementwise_flops counts full-gradient, unstreamed routing, and this config sets "
            "detach_routing or routing_chunk_size. Fix: count a config without them."
        )
    return model, data.image_size, data.num_targets


def run_estimate(flops_per_image: int, images: int, images_per_s: float) -> dict[str, Any]:
    """Total FLOPs of training on ``images`` images, the hours at the measured rate and on an H100 at ASSUMED_MFU."""
    total = flops_per_image * images
    h100 = {f"mfu_{mfu}": round(total / (H100_BF16_DENSE * mfu) / 3600, 2) for mfu in ASSUMED_MFU}
    return {"images": images, "flops": total, "hours_here": round(images / images_per_s / 3600, 1), "h100_hours": h100}


def flops_row(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """One row for ``args.config`` at ``args.precision``: FLOPs per image counted on the first (warm-up) step and
    added from the shapes, the measured rate over ``args.steps`` timed steps, the estimates of two runs."""
    settings = yaml.safe_load(Path(shipped.config_path(args.config)).read_text()) or {}
    torch.manual_seed(0)
    model, image_size, targets = load_model(settings, args.config)
    step_args = argparse.Namespace(**{**vars(args), "image_size": image_size})
    step = train_step_case(model.to(device), step_args, device, {}, fast=False, targets=targets).step
    with FlopCounterMode(display=False) as counter:
        step()
    for _ in range(args.warmup - 1):
        step()
    times = [timed(step, device) for _ in range(args.steps)]
    batch = args.batch_size
    counted = counter.get_total_flops() // batch
    routing = sum(
        routing_elementwise_flops(1, layer.n_in, layer.n_out, layer.d_out, layer.iterations) for layer in model.caps
    )
    per_image, images_per_s = counted + routing, batch / statistics.median(times)
    max_steps, config_batch = settings.get("trainer", {}).get("max_steps"), settings.get("data", {}).get("batch_size")
    config_run = run_estimate(per_image, max_steps * config_batch, images_per_s) if max_steps and config_batch else None
    return {
        "what": "flops",
        "config": args.config,
        "device": device.type,
        "precision": args.precision,
        "batch_size": batch,
        "image_size": image_size,
        "num_targets": targets,
        "threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "counted_flops_per_image": counted,
        "counted_by_op": {str(op): n // batch for op, n in counter.get_flop_counts()["Global"].items()},
        "routing_elementwise_flops_per_image": routing,
        "train_flops_per_image": per_image,
        "images_per_s": round(images_per_s, 2),
        "step_s": round(statistics.median(times), 4),
        "steps": len(times),
        "achieved_flops_per_s": round(per_image * images_per_s),
        "paper_one_pass": run_estimate(per_image, MULTIMNIST_TRAIN_IMAGES, images_per_s),
        "config_max_steps": config_run,  # the config's max_steps x batch_size; None without them
    }
