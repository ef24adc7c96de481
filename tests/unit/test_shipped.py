"""Shipped configs and weights by name (capsdist.core.shipped): `--config quickstart`, `--weights capsnet-mnist`,
`CapsNet.from_pretrained`; files on disk win over names, and an unknown name is an error that lists the names."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from capsdist.core import shipped
from capsdist.model import CapsNet
from capsdist.model.capsnet import load_weights
from tests.conftest import REPO


def test_config_names_resolve_to_shipped_files_and_files_win(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # outside the checkout: configs/quickstart.yaml is no file here
    argv = ["fit", "--config", "quickstart", "-c", "strategy/fsdp", "--config=configs/mnist.yaml", "--x", "quickstart"]
    assert shipped.resolve_config_args(argv) == [
        "fit", "--config", str(REPO / "configs/quickstart.yaml"), "-c", str(REPO / "configs/strategy/fsdp.yaml"),
        f"--config={REPO / 'configs/mnist.yaml'}", "--x", "quickstart",
    ]  # fmt: skip
    (tmp_path / "quickstart").write_text("trainer: {max_steps: 1}\n")
    assert shipped.config_path("quickstart") == "quickstart"  # a file of that name is read as before
    assert shipped.config_path("{trainer: {max_steps: 1}}") == "{trainer: {max_steps: 1}}"  # inline YAML
    with pytest.raises(shipped.UnknownConfigError, match="quickstart, strategy/capsule_parallel"):
        shipped.config_path("quikstart")
    assert {p.name for p in shipped.config_dir().rglob("*.yaml")} >= {"quickstart.yaml", "fsdp.yaml"}


def test_pretrained_by_name_is_the_shipped_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = REPO / "pretrained" / "capsnet-mnist.safetensors"
    assert shipped.weights_path("capsnet-mnist") == shipped.weights_path("pretrained/capsnet-mnist.safetensors") == path
    model, meta = load_weights(path)
    named = CapsNet.from_pretrained("capsnet-mnist")
    assert not named.training and meta["test_accuracy"] == pytest.approx(0.996)
    assert all(torch.equal(a, b) for a, b in zip(named.state_dict().values(), model.state_dict().values(), strict=True))


def test_fix_messages_name_the_data_tools_as_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkout's messages say `python -m data_prep.NAME`; a wheel (no data_prep beside the package) its console
    scripts."""
    assert shipped.data_tool("multimnist") == "python -m data_prep.multimnist"
    monkeypatch.setattr(shipped, "PACKAGE", tmp_path / "site-packages" / "capsdist")
    assert (shipped.data_tool("mnist"), shipped.data_tool("multimnist")) == ("capsdist-mnist", "capsdist-shards")


def test_the_multimnist_model_by_name_separates_two_digits(test_split) -> None:
    """capsnet-multimnist loads by name as a 36x36 two-digit model whose recorded scores are those of its card,
    and on two test digits overlaid it finds both among its two longest capsules."""
    model = CapsNet.from_pretrained("capsnet-multimnist")
    _, meta = load_weights(shipped.weights_path("capsnet-multimnist"))
    assert (meta["data_source"], meta["num_targets"], meta["test_samples"]) == ("multimnist_onthefly", 2, 10_000)
    assert meta["test_accuracy"] == pytest.approx(0.8047, abs=1e-4)
    images, labels = test_split
    first, second = next((i, j) for i in range(50) for j in range(i + 1, 50) if labels[i] != labels[j])
    canvas = torch.zeros(1, 1, 36, 36)
    canvas[0, 0, 2:30, 2:30] = images[first].float() / 255
    canvas[0, 0, 6:34, 6:34] = torch.maximum(canvas[0, 0, 6:34, 6:34], images[second].float() / 255)
    with torch.inference_mode():
        longest = set(model(canvas, k=2).lengths.topk(2).indices[0].tolist())
    assert longest == {int(labels[first]), int(labels[second])}
