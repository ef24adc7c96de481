"""`python -m capsdist.bench`: CapsNet train-step and routing throughput, capsdist against the ports' formulation,
the MultiMNIST data paths (shard write/read, on-device generation), the training service against a bare loop
(`--what service`, capsdist.bench.service), and a config's training FLOPs with the time a run takes (`--what flops`,
capsdist.bench.flops).

Prints one JSON line per measurement. Every capsdist setting is timed interleaved with the reference
(`capsdist.model.reference`) in one process, one step each in turn, so load from other processes on a shared machine
hits all of them alike; images_per_s is the median over the timed steps after warm-up, and
speedup_vs_reference the median of the per-round time ratios. Dated results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator

import torch

from capsdist.bench.data import SHARD_RATES, onthefly_row, shard_rows
from capsdist.bench.flops import flops_row
from capsdist.bench.models import LOW_PRECISION, MODEL_WHATS, measure
from capsdist.bench.service import service_rows
from capsdist.core.errors import prog

WHATS = (*MODEL_WHATS, *SHARD_RATES, "onthefly", "service", "flops")
# run when asked for: service (minutes of subprocess fits), flops (a config's model, by default the paper's 36x36 one)
DEFAULT_WHATS = WHATS[:-2]


def split_list(values: list[str]) -> list[str]:
    """Flatten repeatable, comma-separated flag values."""
    return [item for value in values for item in value.split(",") if item]


def build_parser() -> argparse.ArgumentParser:
    """The flags, in the training CLI's underscore style (the hyphenated spellings are kept as aliases)."""
    parser = argparse.ArgumentParser(prog=prog("capsdist.bench"), description=__doc__)
    parser.add_argument("--what", action="append", default=[], help=f"repeatable or comma list of {WHATS}")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument(
        "--precision",
        action="append",
        default=[],
        help=f"repeatable or comma list of {tuple(LOW_PRECISION)}; default 32,bf16-mixed",
    )
    parser.add_argument("--batch_size", "--batch-size", type=int, default=64)
    parser.add_argument("--image_size", "--image-size", type=int, default=28)
    parser.add_argument("--iterations", type=int, default=3, help="routing iterations")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per case (after warm-up; service: 100)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per case first (service: 50)")
    parser.add_argument(
        "--data_samples", "--data-samples", type=int, default=1000, help="MultiMNIST samples per shard benchmark run"
    )
    parser.add_argument("--repetitions", type=int, default=3, help="service: interleaved rounds")
    parser.add_argument("--config", default="multimnist", help="flops: the training config (a path or shipped name)")
    parser.add_argument("--baseline_root", help="service: another checkout measured in the same rounds")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--channels_last", "--channels-last", action="store_true", help="capsdist convs in channels_last"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the capsdist model")
    parser.add_argument(
        "--cuda_graphs", "--cuda-graphs", action="store_true", help="compile with CUDA graphs (reduce-overhead)"
    )
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags; with none, every `what` on CPU (model rows in fp32 and bf16 autocast, batch 64)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.what = split_list(args.what) or list(DEFAULT_WHATS)
    args.precision = split_list(args.precision) or ["32", "bf16-mixed"]
    for name, values, allowed in (("--what", args.what, WHATS), ("--precision", args.precision, LOW_PRECISION)):
        if bad := [v for v in values if v not in allowed]:
            parser.error(f"{name} {bad[0]!r} is not one of {tuple(allowed)}")
    if args.cuda_graphs and not args.device.startswith("cuda"):
        parser.error("--cuda_graphs needs --device cuda")
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
    if "service" in args.what:  # its own rounds of subprocess fits, timed steps warmup .. warmup + steps
        yield from service_rows(args)
    if "flops" in args.what:
        for precision in args.precision:
            yield flops_row(argparse.Namespace(**{**vars(args), "precision": precision}), device)


def main(argv: list[str] | None = None) -> None:
    """Run every (what, precision) pair and print its rows as JSON lines."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for row in all_rows(args, torch.device(args.device)):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
