"""`python -m capsdist.evaluate --ckpt PATH [--data.* ...]`: a checkpoint's metrics on a data source, as JSON.

Data settings default to those the checkpoint was trained with (when its datamodule saved them) and take the
same `--data.*` flags as the training CLI, so a MultiMNIST model can be scored on shards or on the fly.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from jsonargparse import ArgumentParser, Namespace

from capsdist import CapsdistError, user_errors
from capsdist.checkpoint import Trained, load_trained
from capsdist.data.modules import CapsDataModule
from capsdist.metrics import CapsMetrics
from capsdist.pretrained import load_as_trained
from capsdist.scoring import eval_batch


def inference_parser(description: str) -> ArgumentParser:
    """Arguments shared by evaluate and figures: the checkpoint, the device and the datamodule's settings."""
    parser = ArgumentParser(description=description)
    parser.add_argument("--ckpt", type=str | None, default=None, help="checkpoint written by capsdist.train")
    parser.add_argument("--weights", type=str | None, default=None, help="or a .safetensors from capsdist.pretrained")
    parser.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_class_arguments(CapsDataModule, "data")
    return parser


def parse_for_inference(parser: ArgumentParser, argv: list[str] | None) -> tuple[Namespace, Trained, Any]:
    """Parse argv with the checkpoint's data settings as defaults -> (args, trained model, val dataloader)."""
    first = parser.parse_args(argv)
    if (first.ckpt is None) == (first.weights is None):
        raise CapsdistError(
            "name one model: --ckpt PATH (a training checkpoint) or --weights PATH (a .safetensors such as "
            "pretrained/capsnet-mnist.safetensors)."
        )
    trained = load_trained(first.ckpt, first.device) if first.ckpt else load_as_trained(first.weights, first.device)
    known = {k: v for k, v in trained.data.items() if k in first.data}
    parser.set_defaults({f"data.{k}": v for k, v in known.items()})
    args = parser.parse_args(argv)
    datamodule = CapsDataModule(**args.data.as_dict())
    datamodule.setup("validate")
    return args, trained, datamodule.val_dataloader()


@torch.inference_mode()
def evaluate(trained: Trained, loader: Any, device: str) -> dict[str, float]:
    """Test-time metrics over every batch of `loader`: the training module's eval step (capsdist.scoring)."""
    metrics = CapsMetrics().to(device)
    loss_sum, samples = 0.0, 0
    for batch in loader:
        batch = {k: batch[k].to(device) for k in ("image", "labels", "recon")}
        total = eval_batch(trained.model, batch, trained.recon_weight, metrics)
        loss_sum += float(total) * batch["labels"].shape[0]
        samples += batch["labels"].shape[0]
    if samples == 0:
        raise CapsdistError("the data source yielded no samples. Fix: check --data.* (val shards, val_samples).")
    values = {name: float(value) for name, value in metrics.compute().items()}
    return {**values, "loss": loss_sum / samples, "samples": samples}


def main(argv: list[str] | None = None) -> None:
    """Print {checkpoint, source, acc, error, digit_acc, loss, samples} as one JSON object."""
    parser = inference_parser("Evaluate a capsdist checkpoint; prints metrics JSON on stdout.")
    with user_errors():
        args, trained, loader = parse_for_inference(parser, argv)
        result = evaluate(trained.to(args.device), loader, args.device)
    print(json.dumps({"checkpoint": args.ckpt or args.weights, "source": args.data.source, **result}))


if __name__ == "__main__":
    main()
