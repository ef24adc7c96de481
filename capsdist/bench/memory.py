"""`python -m capsdist.bench.memory`: measured peak memory and time of one routed layer's forward + backward,
default routing against streaming (chunked) routing, one JSON line per configuration.

Method: every configuration runs in a fresh subprocess (so no allocator cache or earlier peak leaks in). It
builds the layer and its input, runs one warm-up step, drops the gradients (as `optimizer.zero_grad()` does),
resets the kernel's peak-RSS counter (`echo 5 > /proc/self/clear_refs`), notes VmRSS as the baseline, runs
one timed forward + backward, and reports peak_bytes = VmHWM - baseline: the resident memory the step added on
top of weights and inputs (W's gradient included). That is what the OS actually had to provide (torch's CPU allocator
returns large blocks to it at once), so it is measured, not estimated; the profiler's memory tracking would
count only torch allocations. With `--device cuda` every configuration runs in this process instead, and
peak_bytes is `torch.cuda.max_memory_allocated` over the step minus what was allocated before it.
`python -m capsdist.bench.memory --help` lists the sizes.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from capsdist.model.capsnet import CapsLayer, CapsNet
from capsdist.model.losses import capsnet_loss
from capsdist.parallel import process_group
from capsdist.parallel.capsule_parallel import ShardedCapsLayer


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak() -> int:
    """Reset the process's peak RSS to the current RSS; returns that RSS in bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS") * 1024


def peak_since_reset(baseline: int) -> int:
    """Peak RSS since `reset_peak` above its baseline, in bytes."""
    return _status_kib("VmHWM") * 1024 - baseline


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _start_peak(device: torch.device) -> int:
    """Reset the peak counter of `device` (the process's RSS on CPU); returns the baseline in bytes."""
    if device.type != "cuda":
        return reset_peak()
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def _peak(device: torch.device, baseline: int) -> int:
    """Peak bytes above the baseline since `_start_peak`."""
    if device.type != "cuda":
        return peak_since_reset(baseline)
    _sync(device)
    return torch.cuda.max_memory_allocated(device) - baseline


def _layer_step(layer: torch.nn.Module, u: torch.Tensor, gout: torch.Tensor):
    """One timed forward + backward of L = sum(layer(u) * gout); gradients dropped after it (as
    `optimizer.zero_grad()` does), so each step allocates W's gradient anew."""

    def step() -> float:
        _sync(u.device)
        start = time.perf_counter()
        (layer(u) * gout).sum().backward()
        u.grad = None
        layer.zero_grad(set_to_none=True)
        _sync(u.device)
        return time.perf_counter() - start

    return step


def measure_layer(
    n_in: int,
    chunk_size: int | None,
    batch: int = 48,
    n_out: int = 32,
    d_in: int = 8,
    d_out: int = 16,
    iterations: int = 3,
    detach: bool = False,
    steps: int = 1,
    device: str = "cpu",
) -> dict[str, object]:
    """Peak memory above weights+grads+inputs and median time of `steps` forward+backward steps, in this process."""

    torch.manual_seed(0)
    dev = torch.device(device)
    layer = CapsLayer(n_in, d_in, n_out, d_out, iterations, detach, chunk_size).to(dev)
    u = torch.randn(batch, n_in, d_in, device=dev).requires_grad_()
    gout = torch.randn(batch, n_out, d_out, device=dev)

    step = _layer_step(layer, u, gout)
    step()  # warm-up (thread pools, allocator)
    baseline = _start_peak(dev)
    times = [step() for _ in range(steps)]
    peak = _peak(dev, baseline)
    return dict(
        device=dev.type,
        n_in=n_in,
        chunk_size=chunk_size,
        batch=batch,
        n_out=n_out,
        d_in=d_in,
        d_out=d_out,
        iterations=iterations,
        detach=detach,
        weight_bytes=layer.weight.numel() * 4,
        priors_bytes=batch * n_in * n_out * d_out * 4,
        peak_bytes=peak,
        seconds=sorted(times)[len(times) // 2],
        threads=torch.get_num_threads(),
    )


def measure_capsnet(batch: int, chunk_size: int | None, image_size: int = 36, **model_args: object) -> dict:
    """As `measure_layer`, for one train step (forward, margin + reconstruction loss, backward) of a whole CapsNet."""

    torch.manual_seed(0)
    model = CapsNet(image_size=image_size, routing_chunk_size=chunk_size, **model_args)
    x, labels = torch.rand(batch, 1, image_size, image_size), torch.randint(0, 10, (batch, 1))

    def step() -> float:
        start = time.perf_counter()
        capsnet_loss(model(x, labels), labels, x.unsqueeze(1))[0].backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    step()
    baseline = reset_peak()
    seconds = step()
    return dict(
        model="capsnet",
        batch=batch,
        chunk_size=chunk_size,
        params=sum(p.numel() for p in model.parameters()),
        routed_inputs=[layer.n_in for layer in model.caps],
        peak_bytes=peak_since_reset(baseline),
        seconds=seconds,
    )


def time_ratio(
    n_in: int, chunk_size: int, rounds: int = 3, batch: int = 48, device: str = "cpu", **layer: int
) -> dict[str, object]:
    """Median over `rounds` of (chunked step time / default step time), the two paths interleaved step by step
    in one process, so load from other processes on a shared machine hits both alike."""

    torch.manual_seed(0)
    n_out, d_in, d_out = layer.get("n_out", 32), layer.get("d_in", 8), layer.get("d_out", 16)
    dev = torch.device(device)
    model = CapsLayer(n_in, d_in, n_out, d_out).to(dev)
    u = torch.randn(batch, n_in, d_in, device=dev).requires_grad_()
    gout = torch.randn(batch, n_out, d_out, device=dev)

    def step(chunk: int | None) -> float:
        model.chunk_size, u.grad = chunk, None
        _sync(dev)
        start = time.perf_counter()
        (model(u) * gout).sum().backward()
        _sync(dev)
        return time.perf_counter() - start

    step(None), step(chunk_size)  # warm-up
    pairs = [(step(None), step(chunk_size)) for _ in range(rounds)]
    ratios = sorted(c / d for d, c in pairs)
    return dict(
        device=dev.type,
        n_in=n_in,
        chunk_size=chunk_size,
        batch=batch,
        default_seconds=sorted(d for d, _ in pairs)[rounds // 2],
        chunked_seconds=sorted(c for _, c in pairs)[rounds // 2],
        time_ratio=ratios[rounds // 2],
        rounds=rounds,
    )


def _sharded_rank(rank: int, world: int, store: str, config: dict, queue) -> None:  # pragma: no cover - subprocess

    torch.set_num_threads(max(1, torch.get_num_threads() // world))
    process_group.start("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    n_in, batch, chunk = config["n_in"], config.get("batch", 48), config.get("chunk_size")
    n_out, d_in, d_out = config.get("n_out", 32), config.get("d_in", 8), config.get("d_out", 16)
    torch.manual_seed(0)  # the same u on every rank; each rank initialises only its own slice of W
    layer = ShardedCapsLayer((n_in, d_in, n_out, d_out), (3, False, chunk), None)
    torch.nn.init.normal_(layer.weight, std=0.01)
    u = torch.randn(batch, n_in, d_in).requires_grad_()
    gout = torch.randn(batch, n_out, d_out)

    step = _layer_step(layer, u, gout)
    step()
    dist.barrier()
    baseline = reset_peak()
    comm = layer.comm.bytes
    seconds = step()
    peak = peak_since_reset(baseline)
    queue.put(
        dict(
            world=world,
            rank=rank,
            n_in=n_in,
            chunk_size=chunk,
            batch=batch,
            local_inputs=layer.hi - layer.lo,
            param_bytes=layer.weight.numel() * layer.weight.element_size(),
            peak_bytes=peak,
            comm_bytes_per_step=layer.comm.bytes - comm,
            seconds=seconds,
        )
    )
    process_group.end()


def measure_sharded(world: int, **config: object) -> list[dict[str, object]]:
    """Per-rank parameter bytes, measured step peak (as `measure_layer`, W's gradient slice included), payload
    bytes all-reduced per step, for a `ShardedCapsLayer` across `world` gloo processes (one fresh process each)."""

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = f"{tmp}/store"
        procs = [ctx.Process(target=_sharded_rank, args=(r, world, store, config, queue)) for r in range(world)]
        for proc in procs:
            proc.start()
        rows = [queue.get() for _ in range(world)]
        for proc in procs:
            proc.join()
    return sorted(rows, key=lambda r: r["rank"])


def measure_in_subprocess(**config: object) -> dict[str, object]:
    """`measure_layer(**config)` in a fresh process (what="ratio": `time_ratio`, "capsnet": `measure_capsnet`)."""
    out = subprocess.run(
        [sys.executable, "-m", "capsdist.bench.memory", "--one", json.dumps(config)],
        check=True,
        # a fixed mmap threshold: glibc's dynamic one would keep freed chunks of up to 32 MB in the heap, inside
        # the baseline RSS, where the timed step reuses them unseen
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"},
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _one(config: dict[str, object]) -> dict[str, object]:
    """One configuration in this process: a layer's peak and time, a time ratio, or a CapsNet's train step."""
    what = config.pop("what", "layer")
    return {"layer": measure_layer, "ratio": time_ratio, "capsnet": measure_capsnet}[what](**config)


def main(argv: list[str] | None = None) -> None:
    """Measure the configurations the flags name, one JSON line each."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--default", type=int, nargs="*", default=[1024, 4096, 16384], help="n_in, default path")
    parser.add_argument("--chunked", type=int, nargs="*", default=[1024, 4096, 16384, 65536], help="n_in, chunked")
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--steps", type=int, default=1, help="timed steps per configuration (median)")
    parser.add_argument("--ratio", type=int, nargs="*", default=[4096, 16384], help="n_in, interleaved time ratio")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per time ratio")
    parser.add_argument("--sharded", type=int, nargs="*", default=[], help="world sizes of a sharded layer")
    parser.add_argument("--sharded-n-in", type=int, default=16384)
    parser.add_argument("--sharded-chunk", type=int, nargs="*", default=[0, 64], help="0: the slice in one chunk")
    parser.add_argument("--model-config", help="a training config: measure its CapsNet's step, chunked and not")
    parser.add_argument("--model-batch", type=int, default=2, help="batch of the --model-config measurement")
    parser.add_argument("--device", default="cpu", help="cpu (peak RSS, a process per row) or cuda (allocator peak)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    measure = (lambda **c: _one(dict(c, device=args.device))) if cuda else measure_in_subprocess
    if args.one:
        print(json.dumps(_one(json.loads(args.one))), flush=True)
        return
    runs = [(n, None) for n in args.default] + [(n, args.chunk_size) for n in args.chunked]
    for n_in, chunk in sorted(runs, key=lambda r: (r[0], r[1] is not None)):
        row = measure(n_in=n_in, chunk_size=chunk, batch=args.batch, steps=args.steps)
        print(json.dumps(row), flush=True)
    for chunk in args.sharded_chunk:
        for world in args.sharded:
            config = dict(n_in=args.sharded_n_in, chunk_size=chunk or None, batch=args.batch)
            for row in measure_sharded(world, **config):
                print(json.dumps(row), flush=True)
    if args.model_config:

        model = yaml.safe_load(Path(args.model_config).read_text())["model"]
        keep = set(inspect.signature(CapsNet).parameters) - {"routing_chunk_size"}
        model_args = {k: v for k, v in model.items() if k in keep}
        for chunk in (None, model.get("routing_chunk_size") or args.chunk_size):
            row = measure_in_subprocess(what="capsnet", batch=args.model_batch, chunk_size=chunk, **model_args)
            print(json.dumps(row), flush=True)
    for n_in in args.ratio:
        config = dict(n_in=n_in, chunk_size=args.chunk_size, batch=args.batch, rounds=args.rounds)
        row = measure(what="ratio", **config)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
