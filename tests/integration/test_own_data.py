"""Training on one's own labelled images (docs/own-data.md, ``--data.source image_shards``): shards written by
webdataset's own ShardWriter in the three shapes the CapsNet paper reports on besides MNIST (28x28 grey, 32x32 RGB
as SVHN and CIFAR-10, 96x96 two grey views as smallNORB) train a few steps through the CLI, the model built from the
data's shape, and are scored by evaluate; all in this process, with a tiny model on one thread."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from capsdist.tools import evaluate
from capsdist.training.cli import main as train_main
from tests.conftest import TINY, image_shards

SHAPES = {"grey-28-png": (28, 1, "png"), "rgb-32-jpg": (32, 3, "jpg"), "two-views-96-npy": (96, 2, "npy")}
MODEL = {96: ["--model.primary_stride=4"]}  # 1,600 primary capsules, not 6,400: a step in 0.1 s
# three batches of 8 an epoch: the third step ends epoch 0 and validates on the 16 validation images
FIT = [*TINY[:5], "--model.conv_channels=8", "--model.primary_channels=4", "--model.primary_dim=4",
       "--model.num_classes=4", "--model.caps_layers=[[4, 8]]", "--model.decoder_hidden=[16, 32]",
       "--model.log_images_every_n_steps=0", "--trainer.max_steps=3", "--trainer.num_sanity_val_steps=0",
       "--data.source=image_shards", "--data.batch_size=8", "--data.num_workers=0", "--data.train_samples=24",
       "--wandb_mode=disabled"]  # fmt: skip


def shards(root: Path, shape: tuple[int, int, str]) -> list[str]:
    """Training and validation shards of ``shape`` (size, channels, image key) under ``root``, as data flags."""
    train, val = (image_shards(root / split, *shape[:2], count, shape[2], seed=seed)
                  for split, count, seed in (("train", 24, 0), ("val", 16, 1)))  # fmt: skip
    return [f"--data.train_shards={train}", f"--data.val_shards={val}"]


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_shardwriter_images_train_and_evaluate(shape: tuple[int, int, str], tmp_path: Path, capsys, one_thread) -> None:
    size, channels, _ = shape
    root = tmp_path / "run"
    train_main(["fit", *FIT, *MODEL.get(size, []), *shards(tmp_path, shape), f"--trainer.default_root_dir={root}"])
    assert '"global_step": 3' in capsys.readouterr().out
    saved = torch.load(root / "checkpoints/last.ckpt", weights_only=True)
    hparams = saved["hyper_parameters"]
    assert (hparams["image_size"], hparams["in_channels"], hparams["num_targets"]) == (size, channels, 1)
    assert saved["state_dict"]["model.conv1.weight"].shape[1] == channels
    evaluate.main(["--ckpt", str(root / "checkpoints/last.ckpt"), "--device", "cpu"])
    scores = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert scores["source"] == "image_shards" and scores["samples"] == 16 and 0 <= scores["acc"] <= 1


def test_a_label_the_model_has_no_class_for_stops_the_fit(tmp_path: Path, capsys, one_thread) -> None:
    """Four classes in the data, two in the model: exit 2 naming the sample and --model.num_classes."""
    flags = [*FIT, *shards(tmp_path, SHAPES["grey-28-png"]), "--model.num_classes=2", "--model.caps_layers=[[2, 8]]"]
    with pytest.raises(SystemExit) as stop:
        train_main(["fit", *flags, f"--trainer.default_root_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "and the model has 2 classes (0 to 1). Fix: set --model.num_classes" in err
