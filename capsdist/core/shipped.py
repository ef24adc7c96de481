"""What capsdist ships beside its code: the YAML configs and the pretrained weights, by name.

A wheel holds them inside the package (``capsdist/configs/``, ``capsdist/weights/``, mapped from the checkout's
``configs/`` and ``pretrained/`` by pyproject.toml); a checkout or an editable install reads the repository's
folders. So ``--config quickstart`` and ``--weights capsnet-mnist`` work wherever capsdist is installed, and files
on disk keep working as before.
"""

from __future__ import annotations

from pathlib import Path

from capsdist.core.errors import CapsdistError

PACKAGE = Path(__file__).resolve().parents[1]  # the capsdist package (this file is in capsdist/core)
# name -> file; model cards: pretrained/README.md (capsnet-mnist), pretrained/capsnet-multimnist.md
WEIGHTS = {"capsnet-mnist": "capsnet-mnist.safetensors", "capsnet-multimnist": "capsnet-multimnist.safetensors"}


class UnknownConfigError(CapsdistError):
    """`--config NAME` names neither a file nor a shipped config."""


def _folder(installed: str, checkout: str) -> Path:
    """The installed package's folder of shipped files, else the repository's (checkout, editable install)."""
    inside = PACKAGE / installed
    return inside if inside.is_dir() else PACKAGE.parent / checkout


def config_dir() -> Path:
    """The folder of the shipped YAML configs."""
    return _folder("configs", "configs")


def weights_dir() -> Path:
    """The folder of the shipped pretrained weights."""
    return _folder("weights", "pretrained")


def config_names() -> list[str]:
    """Shipped config names, as `--config` takes them: "quickstart", "strategy/fsdp", ..."""
    root = config_dir()
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def _shipped_name(value: str) -> str:
    """A --config value as a shipped name: "configs/quickstart.yaml", "quickstart.yaml" -> "quickstart"."""
    name = value.removeprefix("./").removeprefix("configs/")
    return name.removesuffix(".yaml").removesuffix(".yml")


def config_path(value: str) -> str:
    """A --config value: an existing file (or inline YAML) as it is, else the shipped config it names."""
    if Path(value).expanduser().exists() or any(c in value for c in ":{}\n"):
        return value
    name = _shipped_name(value)
    if name in config_names():
        return str(config_dir() / f"{name}.yaml")
    raise UnknownConfigError(
        f"--config {value}: no such file, and capsdist ships no config of that name. Fix: give a YAML file's path "
        f"or one of the shipped names ({', '.join(config_names())}; `capsdist-train configs` lists them)."
    )


def resolve_config_args(argv: list[str]) -> list[str]:
    """argv with each `--config`/`-c` value that is a shipped config's name replaced by that file's path."""
    out, expect = [], False
    for arg in argv:
        if expect:
            arg, expect = config_path(arg), False
        elif arg in ("--config", "-c"):
            expect = True
        elif arg.startswith("--config="):
            arg = "--config=" + config_path(arg.split("=", 1)[1])
        out.append(arg)
    return out


def config_listing() -> str:
    """`capsdist-train configs`: each shipped config's name, file and first comment line."""
    lines = []
    for name in config_names():
        path = config_dir() / f"{name}.yaml"
        first = next((line for line in path.read_text().splitlines() if line.startswith("#")), "#")
        lines.append(f"{name:<28} {first.lstrip('# ')}")
    return "\n".join([*lines, f"(files in {config_dir()}; use as --config NAME)"])


def weights_path(value: str | Path) -> Path:
    """A --weights value: an existing file as it is, else the shipped weights it names ("capsnet-mnist")."""
    path = Path(value).expanduser()
    name = str(value).removeprefix("pretrained/").removesuffix(".safetensors")  # README's path, outside a checkout
    if not path.exists() and name in WEIGHTS:
        return weights_dir() / WEIGHTS[name]
    return path


DATA_TOOLS = {"mnist": "capsdist-mnist", "multimnist": "capsdist-shards"}  # data_prep module -> console script


def data_tool(name: str) -> str:
    """How a fix message names a data tool: ``python -m data_prep.NAME`` in a checkout (its data_prep/ aliases),
    the console script (``capsdist-mnist``, ``capsdist-shards``) in an installed wheel, which has no data_prep."""
    return f"python -m data_prep.{name}" if (PACKAGE.parent / "data_prep").is_dir() else DATA_TOOLS[name]
