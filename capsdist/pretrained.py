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
import os
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from capsdist import CapsdistError, user_errors
from capsdist.checkpoint import MODEL_ARGS, ForgedSettings, Trained, build_model, load_trained
from capsdist.model import CapsNet

CONFIG_KEY = "capsnet_config"
METADATA_TYPES = {"global_step": (int, "an integer"), "data_source": (str, "a string")}  # metadata loading uses
STORE_DTYPE = torch.float16


def _bad_file(path: Path, why: str) -> CapsdistError:
    """The one error for an unreadable weights file (one paragraph: the reason's line breaks are folded)."""
    why = " ".join(why.split())
    return CapsdistError(
        f"{path} is not a capsdist weights file ({why}). Fix: pass a .safetensors written by "
        "`python -m capsdist.pretrained export` (e.g. pretrained/capsnet-mnist.safetensors), or a training "
        "checkpoint with --ckpt instead."
    )


def model_config(hparams: dict[str, Any]) -> dict[str, Any]:
    """The `CapsNet(**kwargs)` arguments among a module's saved hyperparameters, as plain JSON values."""
    config = {k: v for k, v in hparams.items() if k in MODEL_ARGS}
    return json.loads(json.dumps(config, default=list))


def save_weights(model: CapsNet, config: dict[str, Any], path: str | Path, metadata: dict[str, Any]) -> Path:
    """Write the model's state dict in fp16 with its config and `metadata` (JSON-encoded values) to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", STORE_DTYPE).contiguous() for k, v in model.state_dict().items()}
    meta = {CONFIG_KEY: json.dumps(config), **{k: json.dumps(v) for k, v in metadata.items()}}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o666 & ~umask)  # safetensors creates 0600 files: teammates on a shared filesystem could not read them
    tmp.replace(path)
    return path


def _read_header(path: Path) -> tuple[dict[str, Any], dict[str, list[int]]]:
    """A weights file's JSON-decoded, type-checked metadata and its tensors' shapes, without reading any tensor."""
    if not path.is_file():
        raise CapsdistError(
            f"no weights file at {path}. Fix: pass the path of a .safetensors file, e.g. "
            "pretrained/capsnet-mnist.safetensors from the repository."
        )
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = handle.metadata() or {}
            shapes = {k: handle.get_slice(k).get_shape() for k in handle.keys()}  # noqa: SIM118 (not iterable)
    except (SafetensorError, OSError, ValueError) as err:
        raise _bad_file(path, f"{type(err).__name__}: {str(err)[:160]}") from err
    if CONFIG_KEY not in raw:
        raise _bad_file(path, f"no {CONFIG_KEY!r} metadata")
    meta = {}
    for key, value in raw.items():
        try:
            meta[key] = json.loads(value)
        except ValueError:
            raise _bad_file(path, f"its metadata {key!r} is not JSON: {value[:80]!r}") from None
    config = meta[CONFIG_KEY]
    if not isinstance(config, dict) or not set(config) <= set(MODEL_ARGS):
        wrong = sorted(set(config) - set(MODEL_ARGS)) if isinstance(config, dict) else f"a {type(config).__name__}"
        raise _bad_file(path, f"{CONFIG_KEY} must be an object of CapsNet arguments, it has {wrong}")
    for key, (kind, name) in METADATA_TYPES.items():
        if key in meta and type(meta[key]) is not kind:
            raise _bad_file(path, f"its metadata {key} {meta[key]!r} is not {name}")
    return meta, shapes


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A weights file's float32 tensors and its JSON-decoded metadata (with a checked `capsnet_config`)."""
    path = Path(path)
    meta, _ = _read_header(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise _bad_file(path, f"{type(err).__name__}: {str(err)[:160]}") from err
    return {k: v.float() for k, v in tensors.items()}, meta


def init_from(model: CapsNet, path: str | Path) -> None:
    """Copy a weights file into `model` (fine-tuning); a file of another shape is refused with both settings."""
    tensors, meta = read_weights(path)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as err:
        raise CapsdistError(
            f"the weights in {path} do not fit the configured model ({' '.join(str(err).split())[:240]}). "
            f"Fix: configure the model as the file was trained, --model.* = {json.dumps(meta[CONFIG_KEY])}."
        ) from err


def load_weights(path: str | Path, device: str | torch.device = "cpu") -> tuple[CapsNet, dict[str, Any]]:
    """A float32 `CapsNet` in eval mode from a weights file, and the file's metadata (JSON-decoded)."""
    meta, shapes = _read_header(Path(path))
    try:
        model = build_model(meta[CONFIG_KEY], shapes)  # checked, sized by the file: before any allocation
    except ForgedSettings as err:
        raise _bad_file(Path(path), f"it {err}") from None
    tensors, meta = read_weights(path)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as err:
        raise _bad_file(Path(path), f"weights do not fit its {CONFIG_KEY}: {str(err)[:160]}") from err
    return model.to(device).eval(), meta


def load_as_trained(path: str | Path, device: str | torch.device = "cpu") -> Trained:
    """A weights file as `evaluate`/`figures` take a checkpoint: the model, its settings and its data source."""
    model, meta = load_weights(path, device)
    data = {"source": meta["data_source"]} if meta.get("data_source") else {}
    return Trained(model, dict(meta[CONFIG_KEY]), data, int(meta.get("global_step", 0)))


@torch.inference_mode()
def mnist_hits(model: CapsNet, limit: int | None = None, batch_size: int = 500, device: str = "cpu") -> torch.Tensor:
    """Per-digit correctness (bool [N]) of the longest class capsule on the first `limit` MNIST test digits."""
    from capsdist.data import mnist  # the IDX reader alone: no training code on this path

    images, labels = mnist.load(mnist.resolve_dir(), "test")
    images, labels = torch.from_numpy(images[:limit]), torch.from_numpy(labels[:limit]).long()
    model = model.to(device).eval()
    hits = []
    for start in range(0, len(labels), batch_size):
        x = images[start : start + batch_size].to(device).unsqueeze(1).float().div_(255)
        lengths = model(x, k=1).lengths
        hits.append(lengths.argmax(dim=1).cpu() == labels[start : start + batch_size])
    return torch.cat(hits)


def export(ckpt: str | Path, out: str | Path, extra: dict[str, Any], device: str = "cpu") -> dict[str, Any]:
    """Store a checkpoint's CapsNet as safetensors with the test accuracy of exactly the stored (fp16) weights."""
    trained = load_trained(ckpt)
    config = model_config(trained.hparams)
    model = trained.model.to(STORE_DTYPE).float()  # score the values the file will hold, not the fp32 originals
    started = time.perf_counter()
    hits = mnist_hits(model, device=device)
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
        prog="python -m capsdist.pretrained", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
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
            hits = mnist_hits(model, args.limit, device=args.device)
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
