"""The training CLI's own config rules: trainer-level settings, ``--ckpt_path``, flags the data sets, bounded
YAML loading (a config file's size and its alias expansion), and the code a config may name (jsonargparse imports
every ``class_path`` and import path it reads, and importing a module runs it)."""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import set_loader

from capsdist.checkpoint.sharded import read_meta
from capsdist.checkpoint.single import read_weights_only
from capsdist.compat.jsonargparse import get_yaml_default_loader, yaml_load
from capsdist.core.rules import ConfigError, check, integer

_LIMIT = (lambda v: type(v) is int and v >= -1, "-1 (no limit) or an integer >= 0")
TRAINER_RULES = {"max_steps": _LIMIT, "max_epochs": _LIMIT}
RUN_RULES = {"checkpoint_every_n_steps": integer(0)}


def check_run(config: Mapping[str, Any]) -> None:
    """Trainer-level settings of a `fit`/`validate`/`test` config: precision on the device, ``ckpt_path``."""
    trainer = config.get("trainer") or {}
    precision, accelerator = str(trainer.get("precision")), trainer.get("accelerator") or "auto"
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if on_cpu and precision.startswith("16"):
        raise ConfigError(
            f"--trainer.precision {precision} needs a GPU, and this run is on the CPU. "
            "Fix: use --trainer.precision bf16-mixed or 32 on the CPU."
        )
    check("trainer", trainer, TRAINER_RULES)
    check("", {"checkpoint_every_n_steps": config.get("checkpoint_every_n_steps")}, RUN_RULES)
    ckpt = config.get("ckpt_path")
    special = ckpt in (None, "last", "best", "auto", "hpc") or str(ckpt).startswith("registry") or "://" in str(ckpt)
    if not special and not Path(ckpt).exists():  # a directory: a sharded checkpoint (capsdist.checkpoint.sharded)
        raise ConfigError(
            f"--ckpt_path {ckpt}: no such file. Fix: pass a .ckpt that training wrote "
            "(runs/NAME/checkpoints/), `last` or `best`, or leave it out to start a fresh run."
        )
    if not special and Path(ckpt).is_dir():
        read_meta(ckpt)  # a sharded checkpoint: the whole directory checked before anything is written
    elif not special and Path(ckpt).is_file():
        missing = [k for k in ("state_dict", "pytorch-lightning_version") if k not in read_weights_only(ckpt)]
        if missing:
            raise ConfigError(
                f"--ckpt_path {ckpt} is not a checkpoint written by `python -m capsdist.train fit` (it lacks "
                f"{', '.join(missing)}). Fix: pass a .ckpt from a run's checkpoints/ folder; weights exported as "
                ".safetensors start a run with --model.init_weights."
            )


LINKED = {
    "model.image_size": "image size",
    "model.in_channels": "number of image channels",
    "model.num_targets": "number of digits per image",
}


def check_argv(argv: list[str]) -> None:
    """Refuse flags the data module sets (jsonargparse's own message names a `--data.*` flag that does not exist)
    and a ``--config`` file too large to be a config (read whole, it would parse for minutes)."""
    for arg, value in zip(argv, [*argv[1:], ""][: len(argv)], strict=True):  # each flag with the word after it
        key = arg.removeprefix("--").split("=", 1)[0]
        path = Path(arg.split("=", 1)[1] if "=" in arg else value)
        if key == "config" and path.is_file() and path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(_too_large(f"--config {path}", path.stat().st_size))
        if key in LINKED:
            raise ConfigError(
                f"--{key} is not a setting: the {LINKED[key]} comes from the data (MNIST: 28x28 grey, one digit; "
                "MultiMNIST: 36x36 grey, two digits; image_shards: the images' own, one label). Fix: drop the flag "
                "and choose the data with --data.source (image_shards: --data.image_size and --data.in_channels "
                "state the images' shape)."
            )


MAX_CONFIG_BYTES = 1 << 20  # a capsdist config is a few KB
MAX_CONFIG_NODES = 100_000  # YAML values once aliases are expanded (a 494-byte alias bomb reached 4.6 GB)


def _too_large(what: str, size: int) -> str:
    """The message for a config over MAX_CONFIG_BYTES."""
    return (
        f"{what} is {size:,} bytes; a config is refused above {MAX_CONFIG_BYTES:,} bytes (capsdist's are a few KB). "
        "Fix: pass the config you meant (configs/*.yaml are examples), or split it into several --config files."
    )


def _expanded_nodes(node: Any, memo: dict[int, int], open_: set[int]) -> int:
    """YAML values under ``node`` with every alias expanded, counted once per distinct node (no expansion)."""
    if id(node) in memo:
        return memo[id(node)]
    if id(node) in open_:
        raise ConfigError("a YAML config refers to itself through an alias (&name ... *name inside it). Fix: drop it.")
    open_.add(id(node))
    children = node.value if isinstance(node.value, list) else []
    flat = [c for child in children for c in (child if isinstance(child, tuple) else (child,))]
    memo[id(node)] = 1 + sum(_expanded_nodes(c, memo, open_) for c in flat)
    return memo[id(node)]


def bounded_yaml_load(stream: str) -> Any:
    """jsonargparse's YAML loader behind two bounds: size, and values once aliases are expanded ("billion laughs":
    PyYAML's safe loader shares alias nodes, and whatever copies or dumps the result expands them)."""
    if len(stream) > MAX_CONFIG_BYTES:
        raise ConfigError(_too_large("a YAML config", len(stream)))
    try:
        root = yaml.compose(stream, Loader=get_yaml_default_loader())
        nodes = 0 if root is None else _expanded_nodes(root, {}, set())
    except RecursionError:
        raise ConfigError("a YAML config is nested too deeply to be one. Fix: pass the config you meant.") from None
    if nodes > MAX_CONFIG_NODES:
        raise ConfigError(
            f"a YAML config expands to more than {MAX_CONFIG_NODES:,} values through its aliases (*name), like a "
            '"billion laughs" bomb that would take all memory. Fix: pass the config you meant, without nested aliases.'
        )
    return yaml_load(stream)


# the packages whose code a config may name: all that a config.yaml written by capsdist names
CODE_PACKAGES = ("capsdist", "pytorch_lightning", "lightning", "lightning_fabric", "torch")
CODE_PACKAGES_ENV = "CAPSDIST_CONFIG_MODULES"  # more, comma-separated: the user's own callbacks, deliberately
IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")  # what jsonargparse imports where a class is expected


def check_config_code(node: Any, where: str = "") -> None:
    """Refuse, before jsonargparse imports it, a config value that names code outside CODE_PACKAGES (and the
    packages in $CAPSDIST_CONFIG_MODULES): any ``class_path``, at any depth, and any string that is the import
    path of a module present (the short form of a class_path)."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            here = f"{where}.{key}" if where else str(key)
            if key == "class_path":
                _check_code(str(value), here, named=True)
            else:
                check_config_code(value, here)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            check_config_code(value, f"{where}[{i}]")
    elif isinstance(node, str) and IMPORT_PATH.fullmatch(node):
        _check_code(node, where, named=False)


def _check_code(name: str, where: str, named: bool) -> None:
    """Raise ConfigError if ``name`` (at ``where``) would import a module outside the allowed packages; an import
    path whose top module does not exist runs nothing (a file name such as last.ckpt), unless a class_path."""
    top = name.split(".")[0]
    trusted = {*CODE_PACKAGES, *(p.strip() for p in os.environ.get(CODE_PACKAGES_ENV, "").split(",") if p.strip())}
    if top in trusted:
        return
    try:
        present = named or importlib.util.find_spec(top) is not None  # a top-level search runs no code
    except (ImportError, ValueError):
        present = True
    if present:
        raise ConfigError(
            f"the config names the code {name!r} ({where}); reading a config imports what it names, and importing a "
            "module runs it, so a config copied from a shared or planted run folder could run anything as you. "
            f"capsdist-train imports code from a config only from {', '.join(CODE_PACKAGES)} (all that a "
            "config.yaml written by a run names); nothing was imported. Fix: remove it from the config (a file "
            f"name that looks like a module path: write it as ./{name}); if it is your own code and you trust the "
            f"config, allow its package: export {CODE_PACKAGES_ENV}={top} (comma-separated for several)."
        )


def checked_yaml_load(stream: str) -> Any:
    """:func:`bounded_yaml_load`, and a mapping (a config file, a nested one, a mapping given as a flag) refused if
    it names code outside the allowed packages (:func:`check_config_code`)."""
    value = bounded_yaml_load(stream)
    if isinstance(value, Mapping):
        check_config_code(value)
    return value


def bound_config_loading() -> None:
    """Make every YAML value and config file jsonargparse reads (``--config``, ``--model cfg.yaml``) bounded, and
    the config files checked for code they would import."""
    set_loader("yaml", checked_yaml_load, (yaml.YAMLError,))
