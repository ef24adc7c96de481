"""Pretrained CapsNet weights as safetensors: export from a training checkpoint, load, and score independently.

The file holds the plain `CapsNet` state dict (stored in fp16 to stay small; loaded back as fp32) and, in the
safetensors metadata, `capsnet_config` (the `CapsNet(**kwargs)` arguments as JSON) plus how it was trained and
what it scored. Loading builds a `CapsNet` from that JSON and never unpickles or executes anything.

    python -m capsdist.pretrained export --ckpt runs/mnist/checkpoints/last.ckpt --out capsnet-mnist.safetensors
    python -m capsdist.pretrained check --weights pretrained/capsnet-mnist.safetensors --limit 1000

`check` scores the stored weights on the MNIST test digits with nothing but `CapsNet` and the IDX reader, so
the recorded accuracy does not depend on the training code path.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from capsdist.checkpoint.weights import STORE_DTYPE
from capsdist.core.errors import prog, user_errors
from capsdist.core.progress import Progress
from capsdist.data import mnist
from capsdist.model.capsnet import CapsNet, load_weights
from capsdist.model.pretrained import model_config, save_weights
from capsdist.model.trained import load_trained


@torch.inference_mode()
def mnist_hits(
    model: CapsNet, limit: int | None = None, batch_size: int = 500, device: str = "cpu", label: str = "scoring"
) -> torch.Tensor:
    """Per-digit correctness (bool [N]) of the longest class capsule on the first `limit` MNIST test digits;
    progress lines on stderr, starting with `label`."""
    images, labels = mnist.load(mnist.resolve_dir(), "test")
    images, labels = torch.from_numpy(images[:limit]), torch.from_numpy(labels[:limit]).long()
    model = model.to(device).eval()
    hits = []
    with Progress(len(labels), unit="images", label=label, stream=sys.stderr) as progress:
        for start in range(0, len(labels), batch_size):
            x = images[start : start + batch_size].to(device).unsqueeze(1).float().div_(255)
            lengths = model(x, k=1).lengths
            hits.append(lengths.argmax(dim=1).cpu() == labels[start : start + batch_size])
            progress.update(len(x))
    return torch.cat(hits)


def export(ckpt: str | Path, out: str | Path, extra: dict[str, Any], device: str = "cpu") -> dict[str, Any]:
    """Store a checkpoint's CapsNet as safetensors with the test accuracy of exactly the stored (fp16) weights."""
    trained = load_trained(ckpt)
    config = model_config(trained.hparams)
    model = trained.model.to(STORE_DTYPE).float()  # score the values the file will hold, not the fp32 originals
    started = time.perf_counter()
    hits = mnist_hits(model, device=device, label="pretrained export")
    scores = {
        "test_digits": len(hits),
        "test_correct": int(hits.sum()),
        "test_accuracy": int(hits.sum()) / len(hits),
        "first_1000_correct": int(hits[:1000].sum()),
        "score_s": round(time.perf_counter() - started, 2),
    }
    source = {"data_source": trained.data["source"]} if trained.data.get("source") else {}
    meta = {"global_step": trained.global_step, "source_checkpoint": Path(ckpt).name, **source, **extra, **scores}
    save_weights(model, config, out, meta)
    return {**meta, "weights": str(out), "bytes": Path(out).stat().st_size}


def main(argv: list[str] | None = None) -> None:
    """`export` a checkpoint to safetensors, or `check` a weights file's MNIST test accuracy; JSON on stdout."""
    parser = argparse.ArgumentParser(
        prog=prog("capsdist.pretrained"), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="checkpoint -> safetensors, scored on all 10k test digits")
    ex.add_argument("--ckpt", required=True, help="a .ckpt written by capsdist.train")
    ex.add_argument("--out", required=True, help="the .safetensors file to write")
    ex.add_argument("--meta", default="{}", help="JSON object of extra metadata (training command, hardware...)")
    check = sub.add_parser("check", help="score a weights file on the MNIST test digits")
    check.add_argument("--weights", required=True, help="a .safetensors written by export")
    check.add_argument("--limit", type=int, default=None, help="only the first N test digits")
    for p in (ex, check):
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    with user_errors():
        if args.command == "export":
            result = export(args.ckpt, args.out, json.loads(args.meta), args.device)
        else:
            model, meta = load_weights(args.weights, args.device)
            hits = mnist_hits(model, args.limit, device=args.device, label="pretrained check")
            recorded = {k: meta.get(k) for k in ("test_accuracy", "first_1000_correct", "global_step")}
            result = {
                "weights": args.weights,
                "test_digits": len(hits),
                "test_correct": int(hits.sum()),
                "test_accuracy": int(hits.sum()) / len(hits),
                "recorded": recorded,
            }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
