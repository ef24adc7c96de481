"""Pictures sent to W&B are real 8-bit images with captions: read back from an offline run's files."""


import numpy as np
import torch
from PIL import Image

from capsdist.data import mnist
from capsdist.training.cli import main
from capsdist.training.images import reconstruction_sheet
from capsdist.training.module import CapsNetModule
from tests.conftest import SHIPPED, TINY
from tests.wandb_records import history


def test_wandb_images_are_visible_and_captioned(tmp_path):
    flags = ["--trainer.max_steps=4", "--data.train_samples=128", "--data.val_samples=64"]
    main(["fit", *TINY, *flags, f"--trainer.default_root_dir={tmp_path}", "--wandb_mode=offline",
          "--model.log_images_every_n_steps=2"])  # fmt: skip
    run = next((tmp_path / "wandb").glob("offline-run-*"))
    rows = [r for r in history(run) if any(k.endswith("reconstructions/filenames") for k in r)]
    logged = {k.split("/")[0]: (r[k][0], r[k.replace("filenames", "captions")][0]) for r in rows for k in r
              if k.endswith("/filenames")}  # fmt: skip
    assert set(logged) == {"train", "val"}  # training (steps 0, 2) and one validation
    for path, _ in logged.values():
        pixels = np.asarray(Image.open(run / "files" / path).convert("L"))
        assert pixels.max() >= 250 and len(np.unique(pixels)) > 50  # not the 0/1 of a float->uint8 cast
        assert 0.1 < (pixels < 30).mean() < 0.9  # dark digit backgrounds beside white margins and strokes

    # The validation picture: the first 8 validation digits, reconstructed from the *predicted* capsule.
    images, labels = mnist.load(SHIPPED, "test")
    x, y = torch.from_numpy(images[:8, None]).float() / 255, torch.from_numpy(labels[:8, None]).long()
    module = CapsNetModule.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu").eval()
    with torch.inference_mode():
        out = module.model(x, k=1)
    expected, texts = reconstruction_sheet(x, out.recon, y, out.lengths, scale=2)
    path, caption = logged["val"]
    got = np.asarray(Image.open(run / "files" / path).convert("L"), dtype=int)
    assert np.abs(got - np.asarray(expected, dtype=int)).max() <= 2
    assert "masked by the predicted capsule" in caption and "; ".join(texts) in caption
    assert texts[0].startswith(f"label {labels[0]}, predicted ")


def test_model_without_decoder_logs_no_pictures(tmp_path):
    main(["fit", *TINY, "--trainer.max_steps=2", "--data.train_samples=64", "--data.val_samples=32",
          f"--trainer.default_root_dir={tmp_path}", "--wandb_mode=offline", "--model.reconstruction=false",
          "--model.log_images_every_n_steps=1"])  # fmt: skip
    run = next((tmp_path / "wandb").glob("offline-run-*"))
    assert any("val/error" in row for row in history(run))  # validated, with nothing to draw
    assert not list(run.rglob("*.png"))
