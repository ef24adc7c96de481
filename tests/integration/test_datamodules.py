"""The DataModules: each source through the legacy CapsDataModule entry and directly, and Lightning resume."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from capsdist import data
from tests.conftest import SHIPPED, TINY, check_format, subprocess_env


@pytest.mark.parametrize(
    ("source", "size", "k"), [("mnist", 28, 1), ("multimnist_onthefly", 36, 2), ("multimnist_shards", 36, 2)]
)
def test_datamodule_sources(source: str, size: int, k: int, shards: Path) -> None:
    """Each source: image_size/num_targets known before setup, contract batches, fixed epoch lengths."""
    dm = data.CapsDataModule(
        source=source,
        mnist_dir=str(SHIPPED),
        train_shards=str(shards),
        val_shards=str(shards),
        batch_size=16,
        num_workers=0,
        shuffle_buffer=20,
        train_samples=96,
        val_samples=64,
        seed=1,
    )
    assert (dm.image_size, dm.num_targets) == (size, k)
    dm.setup("fit")
    train = dm.train_dataloader()
    assert len(train) == 6
    check_format(next(iter(train)), 16, k, size)
    check_format(next(iter(dm.val_dataloader())), 16, k, size)


@pytest.mark.parametrize("source", ["multimnist_onthefly", "mnist"])
def test_datamodule_generate_on_device(source: str) -> None:
    """generate_on_device: workers ship draws, on_after_batch_transfer composes (here on CPU) the same batch."""
    kw = {"source": source, "mnist_dir": str(SHIPPED), "batch_size": 8, "num_workers": 0}
    dev, cpu = data.CapsDataModule(generate_on_device=True, **kw), data.CapsDataModule(**kw)
    dev.setup("fit")
    cpu.setup("fit")
    draws = next(iter(dev.train_dataloader()))
    assert set(draws) == {"indices", "offsets"}
    composed = dev.on_after_batch_transfer(draws, 0)
    assert all(torch.equal(v, next(iter(cpu.train_dataloader()))[k]) for k, v in composed.items())


def test_datamodule_bad_config() -> None:
    """Unknown sources and shard epochs that cannot be sized fail with the fix named."""
    with pytest.raises(data.DataError, match="unknown source"):
        data.CapsDataModule(source="cifar")  # type: ignore[arg-type]
    with pytest.raises(data.DataError, match="Fix: set train_batches_per_epoch"):
        data.ShardStream(["x.tar"], 8, train=True)


class _Linear(pl.LightningModule):
    """A linear classifier: the smallest model whose weights record every batch it saw, in order."""

    def __init__(self, pixels: int) -> None:
        """One linear layer."""
        super().__init__()
        self.net = torch.nn.Linear(pixels, 10)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Cross-entropy on the first label."""
        return torch.nn.functional.cross_entropy(self.net(batch["image"].flatten(1)), batch["labels"][:, 0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Plain SGD."""
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize(("source", "workers"), [("multimnist_onthefly", 0), ("multimnist_shards", 2)])
def test_trainer_resume_mid_epoch_exact(source: str, workers: int, shards: Path, tmp_path: Path) -> None:
    """Through Lightning: stop at step 8 (epoch 1, batch 2 of 6), resume, end with the uninterrupted weights."""

    def run(root: str, ckpt: str | None = None, **kw: object) -> torch.Tensor:
        pl.seed_everything(0)
        model = _Linear(36 * 36)
        dm = data.CapsDataModule(
            source=source,
            mnist_dir=str(SHIPPED),
            train_shards=str(shards),
            batch_size=16,
            num_workers=workers,
            shuffle_buffer=20,
            train_samples=96,
            seed=3,
        )
        trainer = pl.Trainer(
            default_root_dir=str(tmp_path / root),
            max_epochs=2,
            deterministic=True,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            **kw,
        )
        trainer.fit(model, dm, ckpt_path=ckpt)
        return model.net.weight.detach().clone()

    full = run("full")
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=8, filename="s")
    run("cut", callbacks=[ckpt], max_steps=8)
    state = torch.load(tmp_path / "ck" / "s.ckpt", weights_only=True)["loops"]["fit_loop"]["state_dict"]
    assert [{k: v for k, v in s.items() if k in ("epoch", "batches")} for s in state["combined_loader"]] == [
        {"epoch": 1, "batches": 2}
    ]
    assert state["combined_loader"][0]["num_workers"] == workers
    assert torch.equal(run("resumed", str(tmp_path / "ck" / "s.ckpt")), full)


def test_one_module_per_source_with_only_its_settings(shards: Path) -> None:
    """The legacy entry returns the source's own module; each takes only the settings meaningful for its source."""
    from capsdist.data.modules import SOURCES

    assert {name: cls.__name__ for name, cls in SOURCES.items()} == {
        "mnist": "MnistData",
        "multimnist_shards": "ShardData",
        "multimnist_onthefly": "OnTheFlyData",
        "image_shards": "ImageShardData",
    }
    params = {name: set(inspect.signature(cls).parameters) for name, cls in SOURCES.items()}
    assert "train_shards" not in params["mnist"] and "max_shift" not in params["multimnist_shards"]
    assert "generate_on_device" in params["multimnist_onthefly"] and "mnist_dir" not in params["multimnist_shards"]
    dm = data.CapsDataModule(source="mnist", batch_size=8, train_shards="ignored/for/mnist", shuffle_buffer=5)
    assert type(dm) is data.MnistData and dm.batch_size == 8
    assert dict(dm.hparams)["source"] == "mnist" and "train_shards" not in dm.hparams  # evaluate rebuilds from these
    direct = data.ShardData(train_shards=str(shards), val_shards=str(shards), batch_size=10, num_workers=0)
    assert (direct.image_size, direct.num_targets, direct.hparams["source"]) == (36, 2, "multimnist_shards")
    check_format(next(iter(direct.val_dataloader())), 10, 2, 36)


def test_mnist_training_runs_without_wandb_or_webdataset(tmp_path: Path) -> None:
    """`--wandb_mode disabled` on MNIST trains where neither wandb nor webdataset can be imported (a bare GPU box),
    and never tries to import wandb (it costs a second at each validation where it is installed)."""
    args = [*TINY, "--data.train_samples=64", "--data.val_samples=32", "--trainer.max_steps=2"]
    args += ["--wandb_mode=disabled", f"--trainer.default_root_dir={tmp_path}"]
    code = (
        "import sys; sys.modules['webdataset'] = None  # any import of it fails\n"
        "class NoWandb:  # any import of wandb fails, and is recorded\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.partition('.')[0] == 'wandb':\n"
        "            print('imported', name, file=sys.stderr); raise ImportError(name)\n"
        "sys.meta_path.insert(0, NoWandb())\n"
        f"from capsdist.train import main; main(['fit', *{args!r}])"
    )
    cmd = [sys.executable, "-c", code]
    out = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert '"global_step": 2' in out.stdout and "imported wandb" not in out.stderr, out.stderr[-2000:]


def test_building_a_data_module_starts_no_process() -> None:
    """The workers' fork server and resource tracker start at setup (the loaders come next), not at construction:
    checked in a fresh interpreter, where no earlier loader started them."""
    code = (
        "import os; from capsdist.data.modules import CapsDataModule\n"
        "m = CapsDataModule(source='multimnist_shards', train_shards='unused', num_workers=2)\n"
        "print(open(f'/proc/{os.getpid()}/task/{os.getpid()}/children').read().split())\n"
        "m.setup('fit')\n"
        "print(open(f'/proc/{os.getpid()}/task/{os.getpid()}/children').read().split())"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=subprocess_env())  # fmt: skip
    built, set_up = done.stdout.splitlines()
    assert built == "[]" and set_up != "[]", done.stderr
