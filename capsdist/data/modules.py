"""One LightningDataModule per source on a small shared base; ``CapsDataModule`` is the CLI's entry.

  - ``MnistData`` (``source: mnist``): the IDX arrays in memory, the paper's augmentation (shift of up to
    ``max_shift`` px, zero padded); recon = the shifted image. Validation and test both read the official 10k test
    split, unshifted (MNIST has no other held-out split; the paper and its official code report on it too).
  - ``OnTheFlyData`` (``source: multimnist_onthefly``): pairs drawn from the MNIST train split (validation: a fixed
    stream from the test split, which ``test`` reads too); ``generate_on_device=True`` makes workers ship only
    indices/offsets and composes on the GPU in ``on_after_batch_transfer`` (same samples, no CPU image work).
  - ``ShardData`` (``source: multimnist_shards``): WebDataset tar shards (``capsdist.data.shards``); ``test`` reads
    ``test_shards`` (default: the validation shards).

``CapsDataModule(source=..., **settings)`` keeps every documented config and flag working: it takes the union of
the settings and returns the source's module, built from those it has (``train_shards`` is ignored for MNIST).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any, ClassVar

import pytorch_lightning as pl
import torch
from torch.utils.data import IterableDataset

from capsdist.core.rules import check
from capsdist.data import mnist, recipe
from capsdist.data.batch import Batch, DataError
from capsdist.data.device import DeviceMnist, DeviceMultiMnist
from capsdist.data.loader import PlainIterable, ResumableLoader
from capsdist.data.settings import DATA_RULES, MNIST, ONTHEFLY, SETTINGS, SHARDS, SOURCE, Source, declare, names_of
from capsdist.data.shard_format import manifest_total
from capsdist.data.shard_urls import expand_shards
from capsdist.data.streams import MnistStream, OnTheFlyMultiMnist
from capsdist.data.workers import start_server


class BaseData(pl.LightningDataModule):
    """What every source shares: batch size, workers, seed, epoch lengths, rank placement, loader construction."""

    source: ClassVar[str]
    image_size: ClassVar[int] = recipe.CANVAS  # input height/width, known before setup (for link_arguments)
    num_targets: ClassVar[int] = 2  # digits per image (K)
    in_memory: ClassVar[bool] = False  # batches made from arrays in memory (no loader workers by default)

    def __init__(self, **settings: Any) -> None:
        """Keep the source's settings (``capsdist.data.settings``: the table declares them, their defaults, help and
        ranges), check them, and save them with the source (evaluate and resume read them from a checkpoint)."""
        super().__init__()
        names = names_of(self.source)
        unknown = sorted(set(settings) - set(names))
        if unknown:
            raise TypeError(f"{type(self).__name__} got settings it does not read: {', '.join(unknown)}")
        settings = {name: settings.get(name, SETTINGS[name].default) for name in names}
        self.hparams.update(settings)  # what a checkpoint saves (save_hyperparameters reads __init__'s locals)
        check("data", self.hparams, DATA_RULES)
        self.hparams["source"] = self.source
        for name, value in settings.items():
            setattr(self, name, value)
        if self.num_workers is None:  # 2, or the SLURM task's CPUs but the training one (up to 8); none in memory
            cpus = os.environ.get("SLURM_CPUS_PER_TASK", "")
            self.num_workers = 0 if self.in_memory else min(8, int(cpus) - 1) if cpus.isdigit() else 2

    def setup(self, stage: str | None = None) -> None:
        """Start the loader workers' fork server (capsdist.data.workers), so its imports overlap the rest of the
        run's setup; building a module starts no process."""
        if self.num_workers > 0:
            start_server()

    def check_inputs(self, stage: str) -> None:
        """Find (or download) and check every input `stage` (fit, validate, test, predict) reads, so a missing
        folder or shard stops a run before it writes anything (the CLI calls it before the run folder exists)."""

    def _rank(self) -> tuple[int, int]:
        """(global rank, world size) from the trainer, (0, 1) without one."""
        strategy = self.trainer.strategy if self.trainer else None
        if hasattr(strategy, "data_parallel_rank"):  # capsule parallelism: a capsule group shares its batches
            return strategy.data_parallel_rank, strategy.data_parallel_size
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)

    def _stream_args(self) -> dict[str, int]:
        """Seed and rank placement shared by every stream of this module."""
        rank, world = self._rank()
        return {"seed": self.seed, "rank": rank, "world_size": world}

    def _epoch(self) -> int:
        """The trainer's current epoch (restored on resume), 0 without a trainer."""
        return self.trainer.current_epoch if self.trainer else 0

    def _stream_batches(self, samples: int | None, default: int, rank_batches: int | None) -> int:
        """Batches per rank per epoch: explicit, else samples / (world * batch)."""
        if rank_batches:
            return rank_batches
        return (samples or default) // (self._rank()[1] * self.batch_size)

    def test_dataloader(self) -> ResumableLoader:
        """The held-out test data of this source (subclasses)."""
        raise NotImplementedError

    def predict_dataloader(self) -> Iterable[Batch]:
        """The test data, as a plain iterable: Lightning rebuilds any DataLoader given to predict with its own
        sampler (to track sample indices), which a batch stream has no place for."""
        return PlainIterable(self.test_dataloader())

    def skipped(self) -> int:
        """Corrupt samples skipped so far by this rank's streams (all loader workers together)."""
        return sum(s.skipped.count for s in getattr(self, "_streams", []) if hasattr(s, "skipped"))

    def _loader(self, dataset: IterableDataset, train: bool) -> ResumableLoader:
        """A ResumableLoader with this module's worker settings (training reads the epoch from the trainer)."""
        self._streams = [*getattr(self, "_streams", []), dataset]
        return ResumableLoader(dataset, self.num_workers, self._epoch if train else None, self.pin_memory)


class _MnistArrays(BaseData):
    """Base of the sources that read MNIST into memory."""

    in_memory = True  # a batch is a gather and a shift: 0.3 ms in this process, 1.7 ms to receive from a worker
    mnist_dir: str | None
    _train_cap: int | None = None

    def setup(self, stage: str | None = None) -> None:
        """Start the workers' server and load the splits (once)."""
        super().setup(stage)
        self.check_inputs(stage or "fit")

    def check_inputs(self, stage: str) -> None:
        """Load the train and test splits once (the train split capped to ``_train_cap`` images): every file found,
        checked and parsed."""
        if getattr(self, "_splits", None):
            return
        folder = mnist.resolve_dir(self.mnist_dir)
        self._splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for split, cap in (("train", self._train_cap), ("test", None)):
            images, labels = mnist.load(folder, split)
            self._splits[split] = (torch.from_numpy(images[:cap]), torch.from_numpy(labels[:cap]).long())

    def val_dataloader(self) -> ResumableLoader:
        """The test split's stream, val_samples long (val_batches caps it)."""
        return self._test_stream(self.val_samples, self.val_batches)

    def test_dataloader(self) -> ResumableLoader:
        """The test split's stream, 10,000 samples (the start of the validation stream when val_samples < 10k)."""
        return self._test_stream(None, None)

    def on_after_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        """With generate_on_device, compose drawn training batches on their device (validation comes composed)."""
        if "indices" in batch and getattr(self, "_composer", None) is None:  # the split copied there once
            split, device = self._splits["train"], batch["indices"].device
            composer = DeviceMnist(*split, device, self.max_shift) if self.source == "mnist" else None
            self._composer = composer or DeviceMultiMnist(*split, device, self.seed)
        return self._composer.compose(batch) if "indices" in batch else batch


class MnistData(_MnistArrays):
    """MNIST digits for CapsNet training (one target per image, 28x28)."""

    source = MNIST
    image_size = recipe.DIGIT
    num_targets = 1

    @declare("MNIST from memory.", names_of(MNIST))
    def __init__(self, **settings: Any) -> None:
        super().__init__(**settings)
        self._train_cap = self.train_samples

    def train_dataloader(self) -> ResumableLoader:
        """This rank's shifted, shuffled share of the training split (fixed length, resumable)."""
        images, labels = self._splits["train"]
        stream = MnistStream(
            images, labels, self.batch_size, True, max_shift=self.max_shift,
            num_batches=self.train_batches_per_epoch, draw_only=self.generate_on_device, **self._stream_args(),
        )  # fmt: skip
        return self._loader(stream, train=True)

    def _test_stream(self, samples: int | None, batches: int | None) -> ResumableLoader:
        """This rank's share of the first `samples` test digits (all by default), unshifted, in order."""
        images, labels = self._splits["test"]
        cap = slice(None, samples)
        args = self._stream_args()
        stream = MnistStream(images[cap], labels[cap], self.batch_size, False, num_batches=batches, **args)
        return self._loader(stream, train=False)



class OnTheFlyData(_MnistArrays):
    """MultiMNIST overlays drawn on the fly from MNIST in memory (36x36, two targets), no shards."""

    source = ONTHEFLY

    @declare("MultiMNIST on the fly.", names_of(ONTHEFLY))
    def __init__(self, **settings: Any) -> None:
        super().__init__(**settings)

    def train_dataloader(self) -> ResumableLoader:
        """This rank's training stream of fresh overlays (fixed length, resumable)."""
        images, labels = self._splits["train"]
        n = self._stream_batches(self.train_samples, len(labels), self.train_batches_per_epoch)
        stream = OnTheFlyMultiMnist(
            images, labels, self.batch_size, n, draw_only=self.generate_on_device, **self._stream_args()
        )
        return self._loader(stream, train=True)

    def _test_stream(self, samples: int | None, batches: int | None) -> ResumableLoader:
        """The fixed stream of test-split overlays (the same samples every epoch), `samples` long (default 10k)."""
        images, labels = self._splits["test"]
        n = self._stream_batches(samples, 10000, batches)
        stream = OnTheFlyMultiMnist(images, labels, self.batch_size, n, train=False, **self._stream_args())
        return self._loader(stream, train=False)



class ShardData(BaseData):
    """MultiMNIST from WebDataset shards written by ``python -m data_prep.multimnist`` (36x36, two targets)."""

    source = SHARDS
    resume_needs_same_workers = True  # as its stream's; capsdist.training.resume.check_loader reads it before a resume

    @declare("MultiMNIST shards.", names_of(SHARDS))
    def __init__(self, **settings: Any) -> None:
        super().__init__(**settings)

    def check_inputs(self, stage: str) -> None:
        """The shards `stage` reads exist: for fit the training shards (and the epoch can be sized) and the
        validation shards if set; for validate the validation shards; for test and predict the test shards."""
        if stage == "fit":
            self._training_shards()
            if self.val_shards is not None:
                expand_shards(self.val_shards, "val_shards")
        elif stage == "validate":
            expand_shards(self.val_shards, "val_shards")
        else:
            expand_shards(*self._test_setting())

    def _training_shards(self) -> tuple[list[str], int]:
        """(training shard URLs, samples per epoch: train_samples, else the manifest's count); an epoch that
        neither they nor train_batches_per_epoch size is refused."""
        urls = expand_shards(self.train_shards, "train_shards")
        total = self.train_samples or manifest_total(urls)
        if not (self.train_batches_per_epoch or total):
            raise DataError(
                "cannot size a shard epoch: no manifest.json beside the shards. "
                "Fix: set train_batches_per_epoch (or train_samples)."
            )
        return urls, total

    def _test_setting(self) -> tuple[str | list[str] | None, str]:
        """(what test reads, the setting's name): test_shards, by default the validation shards."""
        return (self.test_shards, "test_shards") if self.test_shards else (self.val_shards, "val_shards")

    def train_dataloader(self) -> ResumableLoader:
        """Resampled training shards, a fixed number of batches per rank (so DDP never hangs)."""
        from capsdist.data.shards import ShardStream  # webdataset (heavy) only on this path

        urls, total = self._training_shards()
        n = self._stream_batches(total, 0, self.train_batches_per_epoch)
        stream = ShardStream(
            urls, self.batch_size, True, shuffle_buffer=self.shuffle_buffer, num_batches=n,
            verify=self.verify_shards, deadline_s=self.shard_deadline_s, **self._stream_args(),
        )  # fmt: skip
        return self._loader(stream, train=True)

    def _one_pass(self, shards: str | list[str] | None, batches: int | None, name: str) -> ResumableLoader:
        """One exact pass over `shards` (the setting `name`), split by rank then worker."""
        from capsdist.data.shards import ShardStream  # webdataset (heavy) only on this path

        stream = ShardStream(
            expand_shards(shards, name), self.batch_size, False, num_batches=batches, verify=self.verify_shards,
            deadline_s=self.shard_deadline_s, **self._stream_args(),
        )  # fmt: skip
        return self._loader(stream, train=False)

    def val_dataloader(self) -> ResumableLoader:
        """One exact pass over the validation shards (val_batches caps it)."""
        return self._one_pass(self.val_shards, self.val_batches, "val_shards")

    def test_dataloader(self) -> ResumableLoader:
        """One exact pass over test_shards (default: the validation shards)."""
        shards, name = self._test_setting()
        return self._one_pass(shards, None, name)


SOURCES: dict[str, type[BaseData]] = {cls.source: cls for cls in (MnistData, ShardData, OnTheFlyData)}


class CapsDataModule(BaseData):
    """The CLI's data section: ``source`` picks MnistData, ShardData or OnTheFlyData; returns an instance of it."""

    @declare("Data for one run: the source's module, built from the settings it reads (the rest do not apply to it).",
             list(SETTINGS), [SOURCE])
    def __new__(cls, source: Source = MNIST, **settings: Any) -> BaseData:  # type: ignore[misc]
        if source not in SOURCES:
            raise DataError(f"unknown source {source!r}. Fix: mnist, multimnist_shards or multimnist_onthefly.")
        if settings.get("generate_on_device") and source == SHARDS:
            raise DataError("generate_on_device needs source=mnist or multimnist_onthefly (shards hold images).")
        target = SOURCES[source]
        return target(**{k: v for k, v in settings.items() if k in names_of(source)})
