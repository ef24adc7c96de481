"""Per-rank compute, traffic and step time of capsule parallelism (README "Training large capsule models").

    python scripts/capsule_parallel_probe.py flops --config configs/large.yaml          # per-rank FLOPs, 1/2/4 ranks
    python scripts/capsule_parallel_probe.py time --config configs/large_cpu.yaml --batch 2 --steps 3 --repeats 3
    python scripts/capsule_parallel_probe.py save --config configs/large_cpu.yaml --batch 2 --ranks 2

`flops` builds rank 0 of each world size in one process on a fake process group (collectives do nothing, so
values are wrong but every rank's work and payload are the real ones) and counts one forward + backward at batch 1
with torch.utils.flop_counter; "before" is the scheme with PrimaryCaps replicated (every rank computes all of it)
and u's gradient all-reduced, computed from the same per-module counts. `time` runs real gloo processes, one
thread each, alternating a 1-rank and a 2-rank run of a few Adam steps, and prints median step times. `save`
measures each rank's peak RSS after two training steps and after a sharded, then a full checkpoint save.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from capsdist.checkpoint import sharded  # noqa: E402
from capsdist.model import CapsNet  # noqa: E402
from capsdist.model.capsnet import MODEL_ARGS  # noqa: E402
from capsdist.model.losses import capsnet_loss  # noqa: E402
from capsdist.parallel import process_group, sharded_state  # noqa: E402
from capsdist.parallel.capsule_parallel import full_optimizer_state, full_state_dict, shard_capsnet  # noqa: E402


def model_args(config: str) -> dict:
    """CapsNet arguments of a training config's model section, on 36x36 MultiMNIST."""
    model = yaml.safe_load(Path(config).read_text())["model"]
    return {"image_size": 36, **{k: v for k, v in model.items() if k in MODEL_ARGS}}


def step(model: CapsNet, batch: int) -> torch.Tensor:
    """One forward + backward of the training loss on random two-digit images; the loss."""
    x = torch.rand(batch, 1, 36, 36)
    labels = torch.stack([torch.randperm(10)[:2] for _ in range(batch)])
    loss = capsnet_loss(model(x, labels), labels, x.unsqueeze(1).expand(-1, 2, -1, -1, -1))[0]
    loss.backward()
    return loss.detach()


def flops(config: str) -> None:
    """JSON rows: per-rank GFLOP per image and bytes communicated per image, before and after, 1/2/4 ranks."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    args = model_args(config)
    per_module = {}
    for world in (1, 2, 4):
        dist.init_process_group("fake", rank=0, world_size=world, store=FakeStore())
        torch.manual_seed(0)
        model = CapsNet(**args)
        params = sum(p.numel() for p in model.parameters())
        if world > 1:
            shard_capsnet(model)
        counter = FlopCounterMode(display=False)
        with counter:
            step(model, 1)
        counts = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
        total, primary, first = counts["Global"], counts.get("CapsNet.primary", 0), counts.get("CapsNet.caps.0", 0)
        if world == 1:
            per_module = {"total": total, "primary": primary, "first": first}
        before = per_module["total"] - per_module["first"] + per_module["first"] / world
        after_bytes = sum(m.comm.bytes for m in model.caps) if world > 1 else 0
        # before: u's gradient [1, n_in, d] all-reduced instead of Conv1's parameter gradient
        swap = (model.num_primary * args["primary_dim"] - sum(p.numel() for p in model.conv1.parameters())) * 4
        print(json.dumps({
            "ranks": world, "params": params, "gflop_per_image_after": round(total / 1e9, 2),
            "gflop_per_image_before": round(before / 1e9, 2), "after_vs_1_rank": round(total / per_module["total"], 3),
            "before_vs_1_rank": round(before / per_module["total"], 3),
            "primary_share_1_rank": round(per_module["primary"] / per_module["total"], 3),
            "bytes_after": after_bytes, "bytes_before": after_bytes + swap if world > 1 else 0,
        }), flush=True)  # fmt: skip
        dist.destroy_process_group()


def _timed(rank: int, world: int, tmp: str, args: dict, batch: int, steps: int) -> None:
    torch.set_num_threads(1)
    process_group.start("gloo", init_method=f"file://{tmp}/store{world}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = CapsNet(**args)
    if world > 1:
        shard_capsnet(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    times = []
    for _ in range(steps + 1):  # the first step warms up
        start = time.perf_counter()
        optimizer.zero_grad()
        step(model, batch)
        optimizer.step()
        times.append(time.perf_counter() - start)
    if rank == 0:
        Path(f"{tmp}/times{world}.json").write_text(json.dumps(times[1:]))
    process_group.end()


def timing(config: str, batch: int, steps: int, repeats: int) -> None:
    """JSON rows: median step time of 1 rank and of 2 ranks (one thread each), runs alternating."""
    args = model_args(config)
    medians: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(repeats):
        for world in (1, 2):
            with tempfile.TemporaryDirectory() as tmp:
                mp.spawn(_timed, args=(world, tmp, args, batch, steps), nprocs=world, join=True)
                medians[world].append(statistics.median(json.loads(Path(f"{tmp}/times{world}.json").read_text())))
            print(json.dumps({"ranks": world, "step_s": round(medians[world][-1], 3)}), flush=True)
    one, two = statistics.median(medians[1]), statistics.median(medians[2])
    pairs = [round(a / b, 2) for a, b in zip(medians[1], medians[2], strict=True)]
    print(json.dumps({"median_1_rank_s": round(one, 3), "median_2_ranks_s": round(two, 3),
                      "speedup": round(one / two, 2), "pairs": pairs}))  # fmt: skip


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _saved(rank: int, world: int, tmp: str, args: dict, batch: int, how: str) -> None:
    torch.set_num_threads(1)
    process_group.start("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = shard_capsnet(CapsNet(**args))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(2):
        optimizer.zero_grad()
        step(model, batch)
        optimizer.step()
    trained, start = _peak_mb(), time.perf_counter()
    if how == "sharded":
        checkpoint = {"state_dict": model.state_dict(), "optimizer_states": [optimizer.state_dict()]}
        sharded.save(checkpoint, f"{tmp}/last.ckpt", sharded_state.split_keys(model, [optimizer]))
    else:  # the full checkpoint: whole weights and moments gathered on every rank, written by rank 0
        moments = full_optimizer_state(model, optimizer)
        checkpoint = {"state_dict": full_state_dict(model), "optimizer_states": [moments]}
        if rank == 0:
            torch.save(checkpoint, f"{tmp}/last.ckpt")
        dist.barrier()
    row = {"save": how, "rank": rank, "peak_training_mb": round(trained), "peak_after_save_mb": round(_peak_mb()),
           "save_s": round(time.perf_counter() - start, 2)}
    print(json.dumps({**row, "save_adds": round(row["peak_after_save_mb"] / trained - 1, 3)}), flush=True)
    process_group.end()


def saving(config: str, batch: int, world: int) -> None:
    """JSON rows per rank: peak RSS after two training steps and after a sharded, then a full, checkpoint save."""
    for how in ("sharded", "full"):
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_saved, args=(world, tmp, model_args(config), batch, how), nprocs=world, join=True)


def main() -> None:
    """flops | time | save."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["flops", "time", "save"])
    parser.add_argument("--config", default="configs/large.yaml")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ranks", type=int, default=2)
    args = parser.parse_args()
    if args.what == "flops":
        flops(args.config)
    elif args.what == "time":
        timing(args.config, args.batch, args.steps, args.repeats)
    else:
        saving(args.config, args.batch, args.ranks)


if __name__ == "__main__":
    main()
