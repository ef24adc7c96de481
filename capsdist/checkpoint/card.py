"""The model card saved beside a CapsNet's weights (``CapsNet.save_pretrained``): a README.md with Hugging Face-style
YAML front matter, so a saved folder is a model repository as the Hub reads one (library, license, tags, data sets,
metrics), followed by how to load it and the ``CapsNet(**config)`` arguments."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from capsdist.checkpoint.weights import CONFIG_KEY, FOLDER_WEIGHTS
from capsdist.core.files import atomic_write

CARD_NAME = "README.md"
TAGS = ["capsule-network", "capsnet", "dynamic-routing", "image-classification", "pytorch"]
METRICS = {"test_accuracy": "accuracy"}  # metadata keys that name a metric the card's front matter lists


def write_card(
    folder: Path,
    config: Mapping[str, Any],
    metadata: Mapping[str, Any],
    parameters: int,
    datasets: Sequence[str] = (),
    license: str = "mit",
) -> Path:
    """Write ``folder``/README.md (atomically): the front matter, how to load ``folder``, the ``CapsNet(**config)``
    arguments and ``metadata`` as a table; returns its path."""
    front: dict[str, Any] = {"library_name": "capsdist", "license": license, "pipeline_tag": "image-classification"}
    front["tags"] = TAGS
    if datasets:
        front["datasets"] = list(datasets)
    metrics = [name for key, name in METRICS.items() if key in metadata]
    if metrics:
        front["metrics"] = metrics
    shape = f"[B, {config['in_channels']}, {config['image_size']}, {config['image_size']}]"
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {folder.name}",
        "",
        f"A CapsNet (Sabour, Frosst & Hinton 2017, *Dynamic Routing Between Capsules*) of {parameters:,} parameters, "
        f"saved by capsdist's `CapsNet.save_pretrained`: the weights in fp16 in `{FOLDER_WEIGHTS}` (loaded back as "
        f"float32), its `CapsNet(**config)` arguments in that file's metadata (`{CONFIG_KEY}`) and below.",
        "",
        "```python",
        "from capsdist import CapsNet",
        "",
        f'model = CapsNet.from_pretrained("{folder.name}")  # this folder',
        f"lengths = model(images).lengths  # images {shape} in [0, 1]; the longest capsule is the class",
        "```",
        "",
        "## Config",
        "",
        "```json",
        json.dumps(dict(config), indent=2),
        "```",
    ]
    if metadata:
        lines += ["", "## Metadata", "", "| key | value |", "|---|---|"]
        lines += [f"| {key} | `{json.dumps(value)}` |" for key, value in metadata.items()]
    text = "\n".join(lines) + "\n"
    atomic_write(folder / CARD_NAME, lambda handle: handle.write(text.encode()))
    return folder / CARD_NAME
