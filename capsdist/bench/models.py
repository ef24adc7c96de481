"""Model benchmarks: the train step and the routed layer, capsdist against the reference formulation."""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from capsdist.bench.timing import synchronize, timed
from capsdist.model.capsnet import CapsLayer, CapsNet
from capsdist.model.losses import capsnet_loss
from capsdist.model.reference import ReferenceCapsLayer, reference_twin

MODEL_WHATS = ("train_step", "routing")
LOW_PRECISION = {"32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


@dataclass
class Case:
    """One implementation under test: a step to time and the row fields that describe it."""

    fields: dict[str, object]
    step: Callable[[], None]
    memory: Callable[[], int]


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """Autocast for a Lightning-style precision name ("32" disables it)."""
    dtype = LOW_PRECISION[precision]
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


@contextmanager
def saved_activation_bytes(exclude: list[torch.Tensor]) -> Iterator[list[int]]:
    """Count the bytes of the distinct storages autograd saves inside the block, parameters excluded."""
    skip = {p.untyped_storage().data_ptr() for p in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    total = [0]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield total
    total[0] = sum(seen.values())


def peak_memory(device: torch.device, step: Callable[[], None], routed: Callable[[], int]) -> int:
    """CUDA max allocated over one step on GPU; elsewhere the routed layers' saved activation bytes."""
    if device.type != "cuda":
        return routed()
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def routed_bytes(layers: nn.ModuleList, u: torch.Tensor, device: torch.device, precision: str) -> int:
    """Saved activation bytes of the prior + routing part for input capsules u."""
    u = u.detach().requires_grad_()
    with saved_activation_bytes(list(layers.parameters())) as total, autocast(device, precision):
        for layer in layers:
            u = layer(u)
    return total[0]


def make_model(args: argparse.Namespace, detach: bool, device: torch.device) -> CapsNet:
    """The paper's CapsNet at the benchmark's image size and routing iterations, seeded."""
    torch.manual_seed(0)
    return CapsNet(image_size=args.image_size, routing_iterations=args.iterations, detach_routing=detach).to(device)


def train_step_case(
    model: CapsNet,
    args: argparse.Namespace,
    device: torch.device,
    fields: dict[str, object],
    fast: bool,
    targets: int = 1,
) -> Case:
    """A full train step (forward, margin + reconstruction loss, backward, Adam) on a fixed random batch of
    ``targets`` different digits per image (2: MultiMNIST, each reconstructed on its own)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(args.batch_size, 1, args.image_size, args.image_size, generator=gen).to(device)
    labels = ((torch.randint(0, 10, (args.batch_size, 1), generator=gen) + torch.arange(targets)) % 10).to(device)
    if fast and args.channels_last:  # the convs only: the capsule weights keep their own layout
        for conv in (model.conv1, model.primary.conv):
            conv.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    recon = x.unsqueeze(1).expand(-1, targets, -1, -1, -1)
    forward: Callable[..., object] = model
    if fast and (args.compile or args.cuda_graphs):
        forward = torch.compile(model, mode="reduce-overhead" if args.cuda_graphs else None)
    # the same for both impls: fused Adam (one kernel per step; 3.7x faster than the default Adam on this CPU)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "16-mixed")

    def step() -> None:
        """One optimisation step."""
        if fast and args.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with autocast(device, args.precision):
            total, _, _ = capsnet_loss(forward(x, labels), labels, recon)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        scaler.step(optimizer)
        scaler.update()

    def routed() -> int:
        """Saved bytes of the routed layers on this batch's primary capsules."""
        with torch.no_grad(), autocast(device, args.precision):
            u = model.primary(torch.relu(model.conv1(x)))
        return routed_bytes(model.caps, u, device, args.precision)

    return Case(fields, step, lambda: peak_memory(device, step, routed))


def routing_case(
    layer: CapsLayer | ReferenceCapsLayer,
    n_in: int,
    args: argparse.Namespace,
    device: torch.device,
    fields: dict[str, object],
) -> Case:
    """Priors + routing forward and backward for one routed layer on fixed random primary capsules."""
    gen = torch.Generator().manual_seed(1)
    u = torch.randn(args.batch_size, n_in, 8, generator=gen).to(device).requires_grad_()
    weights = torch.randn(args.batch_size, 10, 16, generator=gen).to(device)
    layers = nn.ModuleList([layer])

    def step() -> None:
        """One forward + backward through the routed layer."""
        with autocast(device, args.precision):
            v = layer(u)
        (v.float() * weights).sum().backward()

    return Case(
        fields, step, lambda: peak_memory(device, step, lambda: routed_bytes(layers, u, device, args.precision))
    )


def cases(what: str, args: argparse.Namespace, device: torch.device) -> list[Case]:
    """The reference first, then capsdist with detached inner rounds (same maths) and with full gradients."""
    common = {
        "what": what,
        "device": device.type,
        "precision": args.precision,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "iterations": args.iterations,
    }
    fast_flags = {"compile": args.compile, "cuda_graphs": args.cuda_graphs, "channels_last": args.channels_last}
    out = []
    for detach in (True, False):
        model = make_model(args, detach, device)
        fields = {**common, "impl": "capsdist", "detach": detach, **fast_flags}
        if what == "train_step":
            if detach:
                ref_fields = {**common, "impl": "reference", "detach": True}
                out.append(train_step_case(reference_twin(model), args, device, ref_fields, fast=False))
            out.append(train_step_case(model, args, device, fields, fast=True))
        else:
            if detach:
                ref_layer = ReferenceCapsLayer.from_layer(model.caps[0])
                ref_fields = {**common, "impl": "reference", "detach": True}
                out.append(routing_case(ref_layer, model.num_primary, args, device, ref_fields))
            out.append(routing_case(model.caps[0], model.num_primary, args, device, fields))
    return out


def measure(what: str, args: argparse.Namespace, device: torch.device) -> list[dict[str, object]]:
    """Time all cases interleaved and return one row per case, capsdist rows with ratios to the reference."""
    todo = cases(what, args, device)
    times: list[list[float]] = [[] for _ in todo]
    for round_ in range(args.warmup + args.steps):
        for case, record in zip(todo, times, strict=True):
            elapsed = timed(case.step, device)
            if round_ >= args.warmup:
                record.append(elapsed)
    rows = []
    for case, record in zip(todo, times, strict=True):
        median = statistics.median(record)
        q1, _, q3 = statistics.quantiles(record, n=4) if len(record) > 1 else (median, median, median)
        row = {
            **case.fields,
            "images_per_s": round(args.batch_size / median, 1),
            "step_s": round(median, 4),
            "step_s_iqr": round(q3 - q1, 4),
            "steps": len(record),
            "peak_memory_bytes": case.memory(),
        }
        rows.append(row)
    ref_times, ref_row = times[0], rows[0]
    for row, record in zip(rows[1:], times[1:], strict=True):
        row["speedup_vs_reference"] = round(statistics.median(r / c for r, c in zip(ref_times, record, strict=True)), 3)
        row["memory_vs_reference"] = round(row["peak_memory_bytes"] / ref_row["peak_memory_bytes"], 4)
    return rows
