"""`python -m capsdist.bench`: CapsNet train-step and routing throughput, capsdist against the ports' formulation.

Prints one JSON line per measurement. Every capsdist setting is timed interleaved with the reference
(`capsdist.reference`) in one process, one step each in turn, so load from other processes on a shared machine
hits all of them alike; images_per_s is the median over the timed steps after warm-up, and
speedup_vs_reference the median of the per-round time ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from capsdist.data import DeviceMultiMnist
from capsdist.losses import capsnet_loss
from capsdist.model import CapsLayer, CapsNet
from capsdist.reference import ReferenceCapsLayer, reference_twin
from data_prep import mnist, multimnist

MODEL_WHATS = ("train_step", "routing")
SHARD_RATES = {"shard_write": "generate_samples_per_s_per_core", "shard_read": "decode_samples_per_s_per_worker"}
WHATS = (*MODEL_WHATS, *SHARD_RATES, "onthefly")
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


def synchronize(device: torch.device) -> None:
    """Wait for queued device work so wall-clock timings cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    model: CapsNet, args: argparse.Namespace, device: torch.device, fields: dict[str, object], fast: bool
) -> Case:
    """A full train step (forward, margin + reconstruction loss, backward, Adam) on a fixed random batch."""
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(args.batch_size, 1, args.image_size, args.image_size, generator=gen).to(device)
    labels = torch.randint(0, 10, (args.batch_size, 1), generator=gen).to(device)
    if fast and args.channels_last:  # the convs only: the capsule weights keep their own layout
        for conv in (model.conv1, model.primary.conv):
            conv.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
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
            total, _, _ = capsnet_loss(forward(x, labels), labels, x.unsqueeze(1))
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


def timed(step: Callable[[], object], device: torch.device) -> float:
    """Wall-clock seconds of one call of `step`, queued device work included."""
    synchronize(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    return time.perf_counter() - start


def data_row(what: str, device: torch.device, batch_size: int | None, rates: list[float], peak: int | None) -> dict:
    """A data-pipeline row: samples/s as images_per_s (median), no precision or routing."""
    return {
        "what": what,
        "impl": "capsdist",
        "device": device.type,
        "precision": None,
        "batch_size": batch_size,
        "image_size": 36,
        "iterations": None,
        "images_per_s": round(statistics.median(rates), 1),
        "steps": len(rates),
        "peak_memory_bytes": peak,
    }


def shard_rows(whats: list[str], args: argparse.Namespace) -> list[dict[str, object]]:
    """MultiMNIST shard generation (per core) and decode (per loader worker) rates from data_prep's benchmark."""
    threads = torch.get_num_threads()  # the data benchmark pins one thread per core
    try:
        runs = [multimnist.benchmark(num_samples=args.data_samples) for _ in range(args.steps)]
    finally:
        torch.set_num_threads(threads)
    cpu = torch.device("cpu")
    return [data_row(w, cpu, None, [run[SHARD_RATES[w]] for run in runs], None) for w in whats]


def onthefly_row(args: argparse.Namespace, device: torch.device) -> dict[str, object]:
    """MultiMNIST batches composed on `device` from MNIST held there (DeviceMultiMnist), samples/s."""
    images, labels = mnist.load(mnist.resolve_dir(), "train")
    source = DeviceMultiMnist(torch.from_numpy(images), torch.from_numpy(labels), device)
    times = [timed(lambda i=i: source.batch(args.batch_size, step=i), device) for i in range(args.warmup + args.steps)]
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return data_row("onthefly", device, args.batch_size, [args.batch_size / t for t in times[args.warmup :]], peak)


def split_list(values: list[str]) -> list[str]:
    """Flatten repeatable, comma-separated flag values."""
    return [item for value in values for item in value.split(",") if item]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags; with none, every `what` on CPU (model rows in fp32 and bf16 autocast, batch 64)."""
    parser = argparse.ArgumentParser(prog="python -m capsdist.bench", description=__doc__)
    parser.add_argument("--what", action="append", default=[], help=f"repeatable or comma list of {WHATS}")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument(
        "--precision",
        action="append",
        default=[],
        help=f"repeatable or comma list of {tuple(LOW_PRECISION)}; default 32,bf16-mixed",
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--iterations", type=int, default=3, help="routing iterations")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per case (after warm-up)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per case first")
    parser.add_argument("--data-samples", type=int, default=1000, help="MultiMNIST samples per shard benchmark run")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--channels-last", action="store_true", help="capsdist convs in channels_last")
    parser.add_argument("--compile", action="store_true", help="torch.compile the capsdist model")
    parser.add_argument("--cuda-graphs", action="store_true", help="compile with CUDA graphs (reduce-overhead)")
    args = parser.parse_args(argv)
    args.what = split_list(args.what) or list(WHATS)
    args.precision = split_list(args.precision) or ["32", "bf16-mixed"]
    for name, values, allowed in (("--what", args.what, WHATS), ("--precision", args.precision, LOW_PRECISION)):
        if bad := [v for v in values if v not in allowed]:
            parser.error(f"{name} {bad[0]!r} is not one of {tuple(allowed)}")
    if args.cuda_graphs and not args.device.startswith("cuda"):
        parser.error("--cuda-graphs needs --device cuda")
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    return args


def all_rows(args: argparse.Namespace, device: torch.device) -> Iterator[dict[str, object]]:
    """Every requested measurement, model rows per precision first, each yielded as soon as it is measured."""
    for what in (w for w in MODEL_WHATS if w in args.what):
        for precision in args.precision:
            yield from measure(what, argparse.Namespace(**{**vars(args), "precision": precision}), device)
    if shard_whats := [w for w in SHARD_RATES if w in args.what]:
        yield from shard_rows(shard_whats, args)
    if "onthefly" in args.what:
        yield onthefly_row(args, device)


def main(argv: list[str] | None = None) -> None:
    """Run every (what, precision) pair and print its rows as JSON lines."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for row in all_rows(args, torch.device(args.device)):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
