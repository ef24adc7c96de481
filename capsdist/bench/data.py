"""Data-path benchmarks: MultiMNIST shard generation and decode rates, and overlays composed on a device."""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from capsdist.bench.timing import timed
from capsdist.data import mnist
from capsdist.data.batch import to_batch
from capsdist.data.device import DeviceMultiMnist
from capsdist.data.loader import ResumableLoader
from capsdist.data.shard_format import tar_bytes
from capsdist.data.shard_plan import Plan, make_shard

SHARD_RATES = {
    "shard_write": "generate_samples_per_s_per_core",
    "shard_read": "decode_samples_per_s_per_worker",
    "shard_read_webdataset": "webdataset_decode_samples_per_s_per_worker",  # the same shards, plain webdataset
}


def decode_rate(urls: Sequence[str], num_workers: int = 1, batch_size: int = 128) -> float:
    """Samples/s of one pass over shards through the validation pipeline (PNG decode + batching), after warm-up."""
    from capsdist.data.shards import ShardStream, expand_shards  # webdataset, only for the shard benches

    batches = iter(ResumableLoader(ShardStream(expand_shards(urls), batch_size, train=False), num_workers=num_workers))
    next(batches)  # worker start-up is not decoding
    t0 = time.perf_counter()
    count = sum(len(b["labels"]) for b in batches)
    return count / (time.perf_counter() - t0)


def webdataset_rate(urls: Sequence[str], num_workers: int = 1, batch_size: int = 128) -> float:
    """Samples/s of the same pass with plain webdataset (tarfile, PIL decode, its collation) into contract batches:
    the baseline the lean reader has to beat to be worth its code."""
    import webdataset as wds  # the baseline reader, only for this bench

    def contract(batch: tuple) -> dict:
        x, d0, d1, meta = batch
        recon = torch.from_numpy(np.stack([d0, d1], 1))
        return to_batch(torch.from_numpy(x), torch.tensor([m["labels"] for m in meta]), recon)

    keys = ("input.png", "digit0.png", "digit1.png", "meta.json")
    dataset = wds.WebDataset(list(urls), shardshuffle=False).decode("l8").to_tuple(*keys).batched(batch_size)
    batches = iter(wds.WebLoader(dataset.map(contract), batch_size=None, num_workers=num_workers))
    next(batches)
    t0 = time.perf_counter()
    count = sum(len(b["labels"]) for b in batches)
    return count / (time.perf_counter() - t0)


def shard_benchmark(
    mnist_dir: str | os.PathLike | None = None, num_samples: int = 4000, workers: int = 1
) -> dict[str, float]:
    """Measure generation samples/s per core (compose + PNG + tar) and shard decode samples/s per loader worker."""
    torch.set_num_threads(1)
    images, labels = mnist.load(mnist.resolve_dir(mnist_dir), "train")
    plan = Plan("train", len(labels), None, num_samples, 1000, 0)
    images_t, labels_t = torch.from_numpy(images), torch.from_numpy(labels).long()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        for s in range(plan.num_shards):
            (Path(tmp) / plan.shard_name(s)).write_bytes(tar_bytes(make_shard(images_t, labels_t, plan, s)))
        gen_rate = plan.total / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for s in range(plan.num_shards):
            make_shard(images_t, labels_t, plan, s)
        compose_rate = plan.total / (time.perf_counter() - t0)
        urls = sorted(str(p) for p in Path(tmp).glob("*.tar"))
        dec, plain = decode_rate(urls, num_workers=workers), webdataset_rate(urls, num_workers=workers)
    return {
        "generate_samples_per_s_per_core": gen_rate,
        "compose_only_samples_per_s_per_core": compose_rate,
        "decode_samples_per_s_per_worker": dec / max(1, workers),
        "webdataset_decode_samples_per_s_per_worker": plain / max(1, workers),
    }


def data_row(what: str, device: torch.device, batch_size: int | None, rates: list[float], peak: int | None) -> dict:
    """A data-pipeline row: samples/s as images_per_s (median), no precision or routing."""
    return {
        "what": what,
        "impl": "webdataset" if what.endswith("_webdataset") else "capsdist",
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
    """MultiMNIST shard generation (per core) and decode (per loader worker) rates (shard_benchmark)."""
    threads = torch.get_num_threads()  # the data benchmark pins one thread per core
    try:
        runs = [shard_benchmark(num_samples=args.data_samples) for _ in range(args.steps)]
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

