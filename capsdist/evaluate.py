"""`python -m capsdist.evaluate --ckpt PATH [--data.* ...]`: a checkpoint's metrics on a data source, as JSON.

Data settings default to those the checkpoint was trained with (when its datamodule saved them) and take the
same `--data.*` flags as the training CLI, so a MultiMNIST model can be scored on shards or on the fly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ArgumentParser, Namespace

from capsdist import CapsdistError, user_errors
from capsdist.data import CapsDataModule
from capsdist.losses import capsnet_loss
from capsdist.metrics import CapsMetrics
from capsdist.train import CapsNetModule


def load_module(path: str | Path, device: str = "cpu") -> tuple[CapsNetModule, dict[str, Any]]:
    """Load a capsdist checkpoint safely (weights_only) -> (module in eval mode, saved datamodule settings)."""
    path = Path(path)
    if not path.is_file():
        raise CapsdistError(f"no checkpoint at {path}. Fix: pass a .ckpt that training wrote (runs/NAME/checkpoints/).")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        module = CapsNetModule.load_from_checkpoint(path, map_location=device, weights_only=True)
    except (RuntimeError, KeyError, TypeError, EOFError) as err:
        raise CapsdistError(
            f"{path} is not a readable capsdist checkpoint ({type(err).__name__}: {str(err)[:200]}). "
            "Fix: pass a checkpoint written by `python -m capsdist.train fit`; a truncated file must be rewritten."
        ) from err
    return module.eval(), dict(checkpoint.get("datamodule_hyper_parameters", {}))


def inference_parser(description: str) -> ArgumentParser:
    """Arguments shared by evaluate and figures: the checkpoint, the device and the datamodule's settings."""
    parser = ArgumentParser(description=description)
    parser.add_argument("--ckpt", type=str, required=True, help="checkpoint written by capsdist.train")
    parser.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_class_arguments(CapsDataModule, "data")
    return parser


def parse_for_inference(parser: ArgumentParser, argv: list[str] | None) -> tuple[Namespace, CapsNetModule, Any]:
    """Parse argv with the checkpoint's data settings as defaults -> (args, module, val dataloader)."""
    first = parser.parse_args(argv)
    module, saved = load_module(first.ckpt, first.device)
    known = {k: v for k, v in saved.items() if k in first.data}
    parser.set_defaults({f"data.{k}": v for k, v in known.items()})
    args = parser.parse_args(argv)
    datamodule = CapsDataModule(**args.data.as_dict())
    datamodule.setup("validate")
    return args, module, datamodule.val_dataloader()


@torch.inference_mode()
def evaluate(module: CapsNetModule, loader: Any, device: str) -> dict[str, float]:
    """Test-time metrics (decoder masked by the longest capsules) over every batch of `loader`."""
    metrics = CapsMetrics().to(device)
    loss_sum, samples = 0.0, 0
    for batch in loader:
        images, labels, target = (batch[k].to(device) for k in ("image", "labels", "recon"))
        out = module.model(images, k=labels.shape[1])
        total, _, _ = capsnet_loss(out, labels, target, module.hparams.recon_weight)
        metrics.update(out.lengths, labels)
        loss_sum += float(total) * labels.shape[0]
        samples += labels.shape[0]
    if samples == 0:
        raise CapsdistError("the data source yielded no samples. Fix: check --data.* (val shards, val_samples).")
    values = {name: float(value) for name, value in metrics.compute().items()}
    return {**values, "loss": loss_sum / samples, "samples": samples}


def main(argv: list[str] | None = None) -> None:
    """Print {checkpoint, source, acc, error, digit_acc, loss, samples} as one JSON object."""
    parser = inference_parser("Evaluate a capsdist checkpoint; prints metrics JSON on stdout.")
    with user_errors():
        args, module, loader = parse_for_inference(parser, argv)
        result = evaluate(module.to(args.device), loader, args.device)
    print(json.dumps({"checkpoint": args.ckpt, "source": args.data.source, **result}))


if __name__ == "__main__":
    main()
