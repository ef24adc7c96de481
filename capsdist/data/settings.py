"""Every data setting, declared once: its type, default, help, range rule, which sources read it, and whether a
resume may change it. The DataModules' signatures and docstrings (so ``--help`` and jsonargparse's parsing), the
range checks (``DATA_RULES``) and the resume identity check (``FREE_ON_RESUME``) are all made from this table."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from capsdist.core.rules import Rule, integer, real

MNIST, SHARDS, ONTHEFLY, IMAGES = "mnist", "multimnist_shards", "multimnist_onthefly", "image_shards"
ALL = frozenset({MNIST, SHARDS, ONTHEFLY, IMAGES})
IN_MEMORY = frozenset({MNIST, ONTHEFLY})
SHARD_SOURCES = frozenset({SHARDS, IMAGES})
Source = Literal["mnist", "multimnist_shards", "multimnist_onthefly", "image_shards"]
MAX_IMAGE_SIDE = 1024  # pixels a side of an image-shard image (a CapsNet on larger ones would not fit in memory)
MAX_CHANNELS = 4  # grey, grey + alpha or two views, RGB, RGBA
Shards = str | list[str] | None


@dataclass(frozen=True)
class Setting:
    """One data setting: ``kind`` (its type), ``default``, ``help`` (``--help`` and the docstrings), ``rule`` (its
    range, checked at config time), ``sources`` (the sources that read it), ``free`` (a resume may change it:
    it does not change the training stream)."""

    kind: Any
    default: Any
    help: str
    rule: Rule | None = None
    sources: frozenset[str] = ALL
    free: bool = False


SETTINGS: dict[str, Setting] = {
    "mnist_dir": Setting(str | None, None, "MNIST folder (default: $CAPSDIST_MNIST_DIR, the repo's data/mnist, then a "
                         "download).", sources=IN_MEMORY, free=True),
    "train_shards": Setting(Shards, None, "training shards (paths, directories, brace patterns, URLs, pipe:).",
                            sources=SHARD_SOURCES),
    "val_shards": Setting(Shards, None, "validation shards, read once per validation.", sources=SHARD_SOURCES,
                          free=True),
    "test_shards": Setting(Shards, None, "shards that `test` and `predict` read once (default: val_shards).",
                           sources=SHARD_SOURCES, free=True),
    "image_size": Setting(int | None, None, "image_shards: height and width of every image (default: the first "
                          "sample's; images of another size are refused, never resized).", integer(1, MAX_IMAGE_SIDE),
                          sources=frozenset({IMAGES}), free=True),  # the model's (checked on resume) is the data's
    "in_channels": Setting(int | None, None, "image_shards: channels of every image: 1 grey, 2 (two views, or grey "
                           "+ alpha), 3 RGB, 4 RGBA (default: the first sample's).", integer(1, MAX_CHANNELS),
                           sources=frozenset({IMAGES}), free=True),
    "batch_size": Setting(int, 128, "samples per batch per rank.", integer(1, 1 << 16)),  # bounds one batch's memory
    "num_workers": Setting(int | None, None, "DataLoader worker processes per rank (default: 0 for the in-memory "
                           "sources; shards: 2, under SLURM the task's CPUs - 1, at most 8; a shard resume needs the "
                           "same number).", integer(0), free=True),
    "shuffle_buffer": Setting(int, 2000, "samples in each shard worker's shuffle buffer.", integer(1),
                              sources=SHARD_SOURCES),
    "train_batches_per_epoch": Setting(int | None, None, "batches per rank per epoch (default: derived from the data "
                                       "size: the split, train_samples or manifest.json).", integer(1)),
    "val_batches": Setting(int | None, None, "cap on validation batches per rank.", integer(1), free=True),
    "train_samples": Setting(int | None, None, "mnist: use only the first N training images; streams: N samples per "
                             "epoch, all ranks together (default: the split's size, or the shards' manifest).",
                             integer(1)),
    "val_samples": Setting(int | None, None, "mnist: use only the first N test images; on-the-fly: N validation "
                           "samples, all ranks together (default 10000).", integer(1), sources=IN_MEMORY, free=True),
    "max_shift": Setting(int, 2, "random shift of up to this many pixels (paper: 2; 0 disables).", integer(0, 4),
                         sources=frozenset({MNIST})),  # more pushes strokes off the 28x28 canvas
    "seed": Setting(int, 0, "base seed of every random stream (combined with epoch, rank and batch or worker)."),
    "generate_on_device": Setting(bool, False, "the loader ships indices and offsets; the images are composed on "
                                  "the batch's device (GPU).", sources=IN_MEMORY, free=True),
    "pin_memory": Setting(bool, False, "pin batches in page-locked memory for faster host-to-GPU copies.", free=True),
    "verify_shards": Setting(bool, True, "check each local shard's sha256 against its manifest.json as it is read.",
                             sources=SHARD_SOURCES, free=True),
    "shard_deadline_s": Setting(float, 120.0, "seconds a shard may go without delivering a complete sample (a "
                                "stalled read) before it is given up, its samples counted as skipped; 3 deadlines "
                                "without any valid sample stop the run.", real(lambda v: 0 < v <= 86400, "a number of "
                                "seconds in (0, 86400]"), sources=SHARD_SOURCES, free=True),
}  # fmt: skip
DATA_RULES: dict[str, Rule] = {name: s.rule for name, s in SETTINGS.items() if s.rule is not None}
FREE_ON_RESUME = frozenset(name for name, s in SETTINGS.items() if s.free)


def names_of(source: str) -> list[str]:
    """The settings ``source`` reads, in table order."""
    return [name for name, s in SETTINGS.items() if source in s.sources]


def declare(
    summary: str, names: list[str], leading: Sequence[inspect.Parameter] = ()
) -> Callable[[Callable], Callable]:
    """Give a ``(self, **settings)`` method the signature, annotations and Google-style docstring of ``names`` (after
    ``leading`` parameters), so jsonargparse, ``inspect.signature`` and ``help()`` read the table."""

    def apply(method: Callable) -> Callable:
        params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD), *leading]
        params += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=SETTINGS[n].default,
                                     annotation=SETTINGS[n].kind) for n in names]  # fmt: skip
        method.__signature__ = inspect.Signature(params)
        method.__annotations__ = {p.name: p.annotation for p in params[1:]}
        lines = [f"    {p.name}: {SOURCE_HELP if p.name == 'source' else SETTINGS[p.name].help}" for p in params[1:]]
        method.__doc__ = f"{summary}\n\nArgs:\n" + "\n".join(lines) + "\n"
        return method

    return apply


SOURCE_HELP = (
    '"mnist" (MnistData), "multimnist_shards" (ShardData), "multimnist_onthefly" (OnTheFlyData) or "image_shards" '
    "(ImageShardData: any labelled images, one png/jpg/npy and a cls per sample)."
)
SOURCE = inspect.Parameter("source", inspect.Parameter.KEYWORD_ONLY, default=MNIST, annotation=Source)
