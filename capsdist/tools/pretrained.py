"""Pretrained CapsNet weights as safetensors: export from a training checkpoint, load, and score independently.

The file holds the plain `CapsNet` state dict (stored in fp16 to stay small; loaded back as fp32) and, in the
safetensors metadata, `capsnet_config` (the `CapsNet(**kwargs)` arguments as JSON) plus how it was trained and
what it scored. Loading builds a `CapsNet` from that JSON and never unpickles or executes anything.

    python -m capsdist.pretrained export --ckpt runs/mnist/checkpoints/last.ckpt --out capsnet-mnist.safetensors
    python -m capsdist.pretrained check --weights pretrained/capsnet-mnist.safetensors --limit 1000

An MNIST model is scored on the 10,000 MNIST test digits with nothing but `CapsNet` and the IDX reader, so the
recorded accuracy does not depend on the training code path; a model of another source (MultiMNIST) on that
source's whole test split through `capsdist.evaluate` (the paper's metric, both digits right), export and `check`
alike.
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
from capsdist.data.settings import MNIST
from capsdist.model.capsnet import CapsNet, load_weights
from capsdist.model.pretrained import model_config, save_weights
from capsdist.model.trained import load_trained
from capsdist.tools.evaluate import evaluate, inference_parser, parse_for_inference


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


def mnist_scores(model: CapsNet, device: str, limit: int | None = None, label: str = "scoring") -> dict[str, Any]:
    """A one-digit model's scores on the first ``limit`` (default all 10,000) MNIST test digits (plain CapsNet + the
    IDX reader); progress lines on stderr start with ``label``."""
    hits = mnist_hits(model, limit, device=device, label=label)
    return {
        "test_digits": len(hits),
        "test_correct": int(hits.sum()),
        "test_accuracy": int(hits.sum()) / len(hits),
        "first_1000_correct": int(hits[:1000].sum()),
    }


def stream_scores(
    flag: str, path: str | Path, model: CapsNet, device: str, limit: int | None = None
) -> dict[str, Any]:
    """Another source's scores (MultiMNIST: the paper's metric on the fixed stream of 10,000 test overlays, or its
    first ``limit``) for ``model``, on the data the checkpoint or weights file at ``path`` (``flag``: --ckpt or
    --weights) names."""
    argv = [flag, str(path), "--device", device, *(["--data.val_samples", str(limit)] if limit else [])]
    _, trained, loader = parse_for_inference(inference_parser("export"), argv)
    trained.model = model.to(device)
    scores = evaluate(trained, loader, device)
    named = {"acc": "test_accuracy", "digit_acc": "test_digit_accuracy", "digit_recon_sse": "test_digit_recon_sse"}
    return {"test_samples": scores["samples"], **{new: scores[old] for old, new in named.items() if old in scores}}


def export(ckpt: str | Path, out: str | Path, extra: dict[str, Any], device: str = "cpu") -> dict[str, Any]:
    """Store a checkpoint's CapsNet as safetensors with the test scores of exactly the stored (fp16) weights: on
    MNIST's test digits for an MNIST model, else on its data source's whole test split (``stream_scores``)."""
    trained = load_trained(ckpt)
    config = model_config(trained.hparams)
    model = trained.model.to(STORE_DTYPE).float()  # score the values the file will hold, not the fp32 originals
    started = time.perf_counter()
    source = trained.data.get("source")
    mnist_model = source in (None, MNIST)
    if mnist_model:
        scores = mnist_scores(model, device, label="pretrained export")
    else:
        scores = stream_scores("--ckpt", ckpt, model, device)
    scores["score_s"] = round(time.perf_counter() - started, 2)
    meta = {"global_step": trained.global_step, "source_checkpoint": Path(ckpt).name, **extra, **scores}
    meta["num_targets"] = int(trained.hparams.get("num_targets", 1))
    if source:
        meta["data_source"] = source
    save_weights(model, config, out, meta)
    return {**meta, "weights": str(out), "bytes": Path(out).stat().st_size}


def check(weights: str, limit: int | None, device: str) -> dict[str, Any]:
    """Score a weights file again, as export did (MNIST digits, or its data source's test split), beside what it
    recorded."""
    model, meta = load_weights(weights, device)
    if meta.get("data_source", MNIST) != MNIST:
        scores = stream_scores("--weights", weights, model, device, limit)
        recorded = {k: meta.get(k) for k in ("test_accuracy", "test_digit_accuracy", "global_step")}
        return {"weights": weights, **scores, "recorded": recorded}
    recorded = {k: meta.get(k) for k in ("test_accuracy", "first_1000_correct", "global_step")}
    return {"weights": weights, **mnist_scores(model, device, limit, "pretrained check"), "recorded": recorded}


def main(argv: list[str] | None = None) -> None:
    """`export` a checkpoint to safetensors, or `check` a weights file's MNIST test accuracy; JSON on stdout."""
    parser = argparse.ArgumentParser(
        prog=prog("capsdist.pretrained"), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="checkpoint -> safetensors, scored on its whole test split")
    ex.add_argument("--ckpt", required=True, help="a .ckpt written by capsdist.train")
    ex.add_argument("--out", required=True, help="the .safetensors file to write")
    ex.add_argument("--meta", default="{}", help="JSON object of extra metadata (training command, hardware...)")
    score = sub.add_parser("check", help="score a weights file again (MNIST digits, or its source's test split)")
    score.add_argument("--weights", required=True, help="a .safetensors written by export")
    score.add_argument("--limit", type=int, default=None, help="only the first N test images")
    for p in (ex, score):
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    with user_errors():
        if args.command == "export":
            result = export(args.ckpt, args.out, json.loads(args.meta), args.device)
        else:
            result = check(args.weights, args.limit, args.device)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
