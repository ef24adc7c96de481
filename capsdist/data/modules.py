"""One LightningDataModule per source on a small shared base; ``CapsDataModule`` is the CLI's entry.

  - ``MnistData`` (``source: mnist``): the IDX arrays in memory, the paper's augmentation (shift of up to
    ``max_shift`` px, zero padded); recon = the shifted image. Validation and test both read the official 10k test
    split, unshifted (MNIST has no other held-out split; the paper and its official code report on it too).
  - ``OnTheFlyData`` (``source: multimnist_onthefly``): pairs drawn from the MNIST train split (validation: a fixed
    stream from the test split, which ``test`` reads too); ``generate_on_device=True`` makes workers ship only
    indices/offsets and composes on the GPU in ``on_after_batch_transfer`` (same samples, no CPU image work).
  - ``ShardData`` (``source: multimnist_shards``): WebDataset tar shards (``capsdist.data.shards``); ``test`` reads
    ``test_shards`` (default: the validation shards).
  - ``ImageShardData`` (``source: image_shards``): any labelled image dataset as WebDataset shards, one image and a
    ``cls`` per sample (``capsdist.data.image_format``), read as ShardData reads its shards; the image size and
    channels are the first sample's unless set; recon = the image.

``CapsDataModule(source=..., **settings)`` keeps every documented config and flag working: it takes the union of
the settings and returns the source's module, built from those it has (``train_shards`` is ignored for MNIST).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any, ClassVar

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.rank_zero import rank_zero_info
from torch.utils.data import IterableDataset

from capsdist.core.rules import check
from capsdist.data import mnist, recipe
from capsdist.data.batch import Batch, DataError
from capsdist.data.device import DeviceMnist, DeviceMultiMnist
from capsdist.data.image_format import ImageFormat
from capsdist.data.loader import PlainIterable, ResumableLoader
from capsdist.data.settings import (
    DATA_RULES,
    IMAGES,
    MNIST,
    ONTHEFLY,
    SETTINGS,
    SHARDS,
    SOURCE,
    Source,
    declare,
    names_of,
)
from capsdist.data.shard_format import MultiMnistFormat, manifest_total
from capsdist.data.shard_urls import expand_shards
from capsdist.data.streams import FixedMultiMnist, MnistStream, OnTheFlyMultiMnist
from capsdist.data.workers import start_server


class BaseData(pl.LightningDataModule):
    """What every source shares: batch size, workers, seed, epoch lengths, rank placement, loader construction."""

    source: ClassVar[str]
    image_size: int = recipe.CANVAS  # input height/width, known before setup (for link_arguments)
    in_channels: int = 1  # input channels, likewise
    num_targets: ClassVar[int] = 2  # digits per image (K)
    in_memory: ClassVar[bool] = False  # batches made from arrays in memory (no loader workers by default)
    # an epoch is a pass over the samples (MNIST), so train_batches_per_epoch is bounded by them; the other sources
    # draw or resample, so an epoch of any length exists
    epoch_reads_each_sample_once: ClassVar[bool] = False

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

    def train_batches(self, world_size: int) -> int:
        """Batches per rank in a training epoch, known without loading anything, so that an epoch without a full
        batch (a batch larger than a rank's share of the samples) is refused naming both before any work."""
        if self.train_batches_per_epoch and not self.epoch_reads_each_sample_once:
            return self.train_batches_per_epoch
        samples, counted_by = self._train_samples()
        full = samples // (world_size * self.batch_size)
        ranks = f" on {world_size} ranks ({samples // world_size:,} each)" if world_size > 1 else ""
        if self.train_batches_per_epoch and self.train_batches_per_epoch > full:
            raise DataError(
                f"--data.train_batches_per_epoch {self.train_batches_per_epoch} is more than the training data "
                f"holds: {samples:,} samples per epoch ({counted_by}){ranks} make {full} full batches of "
                f"{self.batch_size} per rank, and an epoch reads each sample once. Fix: "
                f"--data.train_batches_per_epoch {full} or less, or leave it out (an epoch is then every sample once)."
            )
        if full < 1:
            raise DataError(
                f"--data.batch_size {self.batch_size} is larger than the training data: {samples:,} samples per epoch "
                f"({counted_by}){ranks} make no full batch, so an epoch would hold none. Fix: --data.batch_size "
                f"{samples // world_size} or less, or more training samples (--data.train_samples)."
            )
        return self.train_batches_per_epoch or full

    def _train_samples(self) -> tuple[int, str]:
        """(Training samples per epoch, all ranks together; what sets that number), nothing loaded (subclasses)."""
        raise NotImplementedError

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
            images, labels = mnist.load(folder, split, first=cap)
            self._splits[split] = (torch.from_numpy(images), torch.from_numpy(labels).long())

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

    epoch_reads_each_sample_once = True

    @declare("MNIST from memory.", names_of(MNIST))
    def __init__(self, **settings: Any) -> None:
        super().__init__(**settings)
        self._train_cap = self.train_samples

    def _train_samples(self) -> tuple[int, str]:
        """The training images in memory: the split, or its first train_samples."""
        self.check_inputs("fit")  # the splits, loaded once
        images = len(self._splits["train"][1])
        return images, "--data.train_samples" if self.train_samples == images else "the MNIST training split"

    def train_dataloader(self) -> ResumableLoader:
        """This rank's shifted, shuffled share of the training split (fixed length, resumable)."""
        images, labels = self._splits["train"]
        stream = MnistStream(
            images, labels, self.batch_size, True, max_shift=self.max_shift,
            num_batches=self.train_batches(self._rank()[1]), draw_only=self.generate_on_device, **self._stream_args(),
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

    def _train_samples(self) -> tuple[int, str]:
        """train_samples overlays an epoch, by default as many as the MNIST training split has images."""
        if self.train_samples:
            return self.train_samples, "--data.train_samples"
        self.check_inputs("fit")  # the splits, loaded once
        return len(self._splits["train"][1]), "the MNIST training split's size"

    def train_dataloader(self) -> ResumableLoader:
        """This rank's training stream of fresh overlays (fixed length, resumable)."""
        images, labels = self._splits["train"]
        n = self.train_batches(self._rank()[1])
        stream = OnTheFlyMultiMnist(
            images, labels, self.batch_size, n, draw_only=self.generate_on_device, **self._stream_args()
        )
        return self._loader(stream, train=True)

    def _test_stream(self, samples: int | None, batches: int | None) -> ResumableLoader:
        """The fixed test-split overlays (the same for any batch size and rank count), `samples` long (default
        10k: the number the official code scores)."""
        images, labels = self._splits["test"]
        samples = samples or recipe.TEST_OVERLAYS
        stream = FixedMultiMnist(images, labels, self.batch_size, samples, num_batches=batches, **self._stream_args())
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
                expand_shards(self.val_shards, "val_shards", self._format().writer())
        elif stage == "validate":
            expand_shards(self.val_shards, "val_shards", self._format().writer())
        else:
            expand_shards(*self._test_setting(), self._format().writer())

    def _training_shards(self) -> tuple[list[str], int]:
        """(training shard URLs, samples per epoch: train_samples, else the manifest's count); an epoch that
        neither they nor train_batches_per_epoch size is refused."""
        urls = expand_shards(self.train_shards, "train_shards", self._format().writer())
        total = self.train_samples or manifest_total(urls)
        if not (self.train_batches_per_epoch or total):
            raise DataError(
                "cannot size a shard epoch: no manifest.json beside the shards (capsdist-shards writes one, "
                "webdataset's ShardWriter does not). Fix: set train_samples to the number of training samples (or "
                "train_batches_per_epoch)."
            )
        return urls, total

    def _test_setting(self) -> tuple[str | list[str] | None, str]:
        """(what test reads, the setting's name): test_shards, by default the validation shards."""
        return (self.test_shards, "test_shards") if self.test_shards else (self.val_shards, "val_shards")

    def train_dataloader(self) -> ResumableLoader:
        """Resampled training shards, a fixed number of batches per rank (so DDP never hangs)."""
        from capsdist.data.shards import ShardStream  # webdataset (heavy) only on this path

        urls, _ = self._training_shards()
        stream = ShardStream(
            urls, self.batch_size, True, shuffle_buffer=self.shuffle_buffer,
            num_batches=self.train_batches(self._rank()[1]), verify=self.verify_shards, sample_format=self._format(),
            deadline_s=self.shard_deadline_s, **self._stream_args(),
        )  # fmt: skip
        return self._loader(stream, train=True)

    def _train_samples(self) -> tuple[int, str]:
        """train_samples, else the count the manifest.json beside the (local) training shards lists."""
        total = self._training_shards()[1]  # an epoch that nothing sizes is refused there
        return total, "--data.train_samples" if self.train_samples else "the shards' manifest.json"

    def _format(self) -> MultiMnistFormat | ImageFormat:
        """What the shards hold and how they decode."""
        return MultiMnistFormat()

    def _one_pass(self, shards: str | list[str] | None, batches: int | None, name: str) -> ResumableLoader:
        """One exact pass over `shards` (the setting `name`), split by rank then worker."""
        from capsdist.data.shards import ShardStream  # webdataset (heavy) only on this path

        stream = ShardStream(
            expand_shards(shards, name, self._format().writer()), self.batch_size, False, num_batches=batches,
            verify=self.verify_shards,
            sample_format=self._format(), deadline_s=self.shard_deadline_s, **self._stream_args(),
        )  # fmt: skip
        return self._loader(stream, train=False)

    def val_dataloader(self) -> ResumableLoader:
        """One exact pass over the validation shards (val_batches caps it)."""
        return self._one_pass(self.val_shards, self.val_batches, "val_shards")

    def test_dataloader(self) -> ResumableLoader:
        """One exact pass over test_shards (default: the validation shards)."""
        shards, name = self._test_setting()
        return self._one_pass(shards, None, name)


class ImageShardData(ShardData):
    """Any labelled image dataset from WebDataset shards (``capsdist.data.image_format``: one png, jpg, jpeg or npy
    image and its ``cls`` per sample, as webdataset's ShardWriter writes them); one target per image, the image
    itself as the reconstruction target. Without ``image_size`` and ``in_channels``, building the module reads the
    first sample of the first shards set (train, else validation, else test) to learn them; every other image must
    have that shape. The model's number of classes reaches the streams at setup (``num_classes``)."""

    source = IMAGES
    num_targets = 1
    num_classes: int | None = None  # labels must be below it: set by setup from the trainer's model, or by the caller

    @declare("Labelled images from WebDataset shards.", names_of(IMAGES))
    def __init__(self, **settings: Any) -> None:
        super().__init__(**settings)
        self._origin = "--data.image_size and --data.in_channels"
        if self.image_size is None or self.in_channels is None:
            self._read_shape()

    def _read_shape(self) -> None:
        """Learn the image size and channels left unset from the first valid sample of the first shards set."""
        from capsdist.data.shards import ShardStream  # webdataset (heavy) only on this path

        name = next((n for n in ("train_shards", "val_shards", "test_shards") if getattr(self, n)), "train_shards")
        fmt = ImageFormat()
        stream = ShardStream(expand_shards(getattr(self, name), name, fmt.writer()), 1, False, verify=False,
                             sample_format=fmt)  # fmt: skip
        first = stream.first_sample()
        if first is None:
            raise DataError(
                f"no valid sample in {stream.urls[0]} (the first of {name}) to read the image size and channels "
                f"from; last reason: {stream.skipped.last or 'the shard holds no samples'}. Fix: {stream.fix()}, or "
                "point the setting at other shards."
            )
        size, _, channels = first[0].shape
        self._origin = f"the first sample of {stream.urls[0]}"
        for setting, found in (("image_size", size), ("in_channels", channels)):
            if getattr(self, setting) not in (None, found):
                raise DataError(
                    f"--data.{setting} is {getattr(self, setting)}, and {self._origin} is a {channels}-channel "
                    f"{size}x{size} image; capsdist never resizes images or changes their channels. Fix: drop "
                    f"--data.{setting} (the data sets it), or write images of that {setting.replace('_', ' ')}."
                )
        self.image_size, self.in_channels = size, channels
        rank_zero_info(f"capsdist: image_shards: {channels}-channel {size}x{size} images ({self._origin})")

    def setup(self, stage: str | None = None) -> None:
        """Take the number of classes from the trainer's model (CapsNet.num_classes) unless it is set."""
        super().setup(stage)
        model = getattr(self.trainer.lightning_module, "model", None) if self.trainer else None
        self.num_classes = self.num_classes or getattr(model, "num_classes", None)

    def _format(self) -> ImageFormat:
        """Images of the one shape, labels below the model's number of classes."""
        return ImageFormat((self.in_channels, self.image_size), self.num_classes, self._origin)


SOURCES: dict[str, type[BaseData]] = {cls.source: cls for cls in (MnistData, ShardData, OnTheFlyData, ImageShardData)}


class CapsDataModule(BaseData):
    """The CLI's data section: ``source`` picks MnistData, ShardData, OnTheFlyData or ImageShardData; returns an
    instance of it."""

    @declare("Data for one run: the source's module, built from the settings it reads (the rest do not apply to it).",
             list(SETTINGS), [SOURCE])
    def __new__(cls, source: Source = MNIST, **settings: Any) -> BaseData:  # type: ignore[misc]
        if source not in SOURCES:
            raise DataError(
                f"unknown source {source!r}. Fix: mnist, multimnist_shards, multimnist_onthefly or image_shards."
            )
        if settings.get("generate_on_device") and source in (SHARDS, IMAGES):
            raise DataError("generate_on_device needs source=mnist or multimnist_onthefly (shards hold images).")
        target = SOURCES[source]
        return target(**{k: v for k, v in settings.items() if k in names_of(source)})
