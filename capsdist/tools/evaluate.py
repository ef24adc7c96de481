"""`python -m capsdist.evaluate --ckpt PATH [--data.* ...]`: a checkpoint's metrics on a data source, as JSON.

Data settings default to those the checkpoint was trained with (when its datamodule saved them) and take the
same `--data.*` flags as the training CLI, so a MultiMNIST model can be scored on shards or on the fly. The whole
split is scored (MNIST's 10,000 test digits, the fixed stream of 10,000 test overlays, every validation shard),
not the subset a run validated on, unless `--data.val_samples` / `--data.val_batches` say otherwise.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import torch
from jsonargparse import ArgumentParser, Namespace

from capsdist.compat.jsonargparse import ShortUsageErrors
from capsdist.core.errors import CapsdistError, prog, user_errors
from capsdist.core.progress import Progress
from capsdist.data.batch import DataError
from capsdist.data.modules import CapsDataModule
from capsdist.data.settings import IMAGES
from capsdist.data.shard_urls import shard_urls
from capsdist.model.metrics import CapsMetrics
from capsdist.model.pretrained import load_as_trained
from capsdist.model.scoring import eval_batch, own_capsule_errors
from capsdist.model.trained import Trained, load_trained


class InferenceParser(ShortUsageErrors, ArgumentParser):
    """evaluate's and figures' parser: an unknown flag is a short usage error naming the closest valid one."""


def inference_parser(description: str) -> ArgumentParser:
    """Arguments shared by evaluate and figures: the checkpoint, the device and the datamodule's settings."""
    parser = InferenceParser(prog=prog("capsdist.evaluate"), description=description)  # figures: its own name
    parser.add_argument("--ckpt", type=str | None, default=None, help="checkpoint written by capsdist.train")
    parser.add_argument("--weights", type=str | None, default=None, help="or a .safetensors from capsdist.pretrained")
    parser.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_class_arguments(CapsDataModule, "data")
    return parser


SHARD_SETTINGS = ("train_shards", "val_shards", "test_shards")
# how much of the split a training run validated on: evaluate scores the whole split unless told otherwise
SUBSET_SETTINGS = ("val_batches", "val_samples")


def checkpoint_defaults(trained: Trained, known: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(usable, refused) data settings saved in a checkpoint, less the validation subset (SUBSET_SETTINGS): they are
    data, so a shard setting that names a ``pipe:`` command or a URL once expanded (braces, ``::``) is refused (a
    planted one would otherwise run here)."""

    saved = {k: v for k, v in trained.data.items() if k in known and k not in SUBSET_SETTINGS}
    refused = {}
    for key in set(SHARD_SETTINGS) & set(saved):
        try:
            shard_urls(saved[key], local_only=True, origin=f"the checkpoint's saved data setting {key}")
        except DataError as err:
            refused[key] = err
    return {k: v for k, v in saved.items() if k not in refused}, refused


def check_data_fits(trained: Trained, datamodule: Any, source: str) -> None:
    """Refuse data of another shape than the checkpoint's (MNIST vs MultiMNIST, grey vs colour) before any forward
    pass; labelled images are held to the model's classes."""
    size, k = int(trained.hparams.get("image_size", 28)), int(trained.hparams.get("num_targets", 1))
    channels = int(trained.hparams.get("in_channels", 1))
    data = (datamodule.image_size, datamodule.in_channels, datamodule.num_targets)
    if data != (size, channels, k):
        was = trained.data.get("source", "data")
        raise CapsdistError(
            f"the checkpoint was trained on {was} ({size}x{size} images of {channels} channel(s), {k} target(s) "
            f"each), and --data.source {source} gives {data[0]}x{data[0]} images of {data[1]} channel(s) with "
            f"{data[2]} target(s). Fix: evaluate it on data like its own (--data.source {was}: {size}x{size} "
            f"images of {channels} channel(s))."
        )
    if hasattr(datamodule, "num_classes"):
        datamodule.num_classes = trained.model.num_classes


def parse_for_inference(parser: ArgumentParser, argv: list[str] | None) -> tuple[Namespace, Trained, Any]:
    """Parse argv with the checkpoint's data settings as defaults -> (args, trained model, val dataloader)."""
    first = parser.parse_args(argv)
    if (first.ckpt is None) == (first.weights is None):
        raise CapsdistError(
            "name one model: --ckpt PATH (a training checkpoint) or --weights PATH (a .safetensors such as "
            "pretrained/capsnet-mnist.safetensors)."
        )
    trained = load_trained(first.ckpt, first.device) if first.ckpt else load_as_trained(first.weights, first.device)
    usable, refused = checkpoint_defaults(trained, first.data)
    parser.set_defaults({f"data.{k}": v for k, v in usable.items()})
    args = parser.parse_args(argv)
    for key, err in refused.items():
        if key == "val_shards" and args.data[key] is None and args.data.source == "multimnist_shards":
            raise CapsdistError(f"{err} Here: --data.{key} SHARDS, or --data.source multimnist_onthefly.")
    settings = args.data.as_dict()
    if settings["source"] == IMAGES:  # the image shape is read from the shards scored, not the training ones
        settings["train_shards"] = None
    datamodule = CapsDataModule(**settings)
    check_data_fits(trained, datamodule, args.data.source)
    datamodule.setup("validate")
    return args, trained, datamodule.val_dataloader()


@torch.inference_mode()
def evaluate(trained: Trained, loader: Any, device: str) -> dict[str, float]:
    """Test-time metrics over every batch of `loader`: the training module's eval step (capsdist.model.scoring),
    and with a decoder each digit's reconstruction error from its own capsule (``digit_recon_sse``); progress
    lines on stderr (stdout carries the result)."""
    metrics = CapsMetrics().to(device)
    loss_sum, samples, sse_sum, digits = 0.0, 0, 0.0, 0
    decoder = trained.model.decoder
    expected = getattr(loader.dataset, "samples", lambda: None)()  # None: a stream that cannot tell
    with Progress(expected, unit="images", label="evaluate", stream=sys.stderr) as progress:
        for batch in loader:
            batch = {k: batch[k].to(device) for k in ("image", "labels", "recon")}
            total, out = eval_batch(trained.model, batch, trained.recon_weight, metrics)
            loss_sum += float(total) * batch["labels"].shape[0]
            if decoder is not None:
                errors = own_capsule_errors(decoder, out.caps, batch["labels"], batch["recon"])
                sse_sum, digits = sse_sum + float(errors.sum()), digits + errors.numel()
            samples += batch["labels"].shape[0]
            progress.update(batch["labels"].shape[0])
    if samples == 0:
        raise CapsdistError("the data source yielded no samples. Fix: check --data.* (val shards, val_samples).")
    values = {name: float(value) for name, value in metrics.compute().items()}
    if decoder is not None:
        values["digit_recon_sse"] = sse_sum / digits
    return {**values, "loss": loss_sum / samples, "samples": samples}


def main(argv: list[str] | None = None) -> None:
    """Print {checkpoint, source, acc, error, digit_acc, [digit_recon_sse,] loss, samples} as one JSON object:
    acc is the paper's metric (a sample is right when its K longest capsules are exactly its K digits; error = 1 -
    acc), digit_acc the share of digits found among the K longest capsules, digit_recon_sse the mean sum of squared
    pixel errors (pixels in 0..1) of a digit reconstructed from its own capsule (models with a decoder)."""
    parser = inference_parser("Evaluate a capsdist checkpoint; prints metrics JSON on stdout.")
    with user_errors():
        args, trained, loader = parse_for_inference(parser, argv)
        result = evaluate(trained.to(args.device), loader, args.device)
    print(json.dumps({"checkpoint": args.ckpt or args.weights, "source": args.data.source, **result}))


if __name__ == "__main__":
    main()
