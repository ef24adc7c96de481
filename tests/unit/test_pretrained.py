"""Weights files: round trip, refusal of foreign or tampered files, the shipped pretrained model's accuracy, and
`CapsNet.from_pretrained` / `save_pretrained` on training checkpoints and saved folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from capsdist.checkpoint.weights import CONFIG_KEY
from capsdist.core.errors import CapsdistError
from capsdist.model import CapsNet
from capsdist.model.capsnet import load_weights
from capsdist.model.pretrained import save_weights
from capsdist.tools.pretrained import mnist_hits

SMALL = dict(conv_channels=16, primary_channels=4, primary_dim=4, caps_layers=[[10, 6]], decoder_hidden=[32, 48])
SHIPPED = Path(__file__).resolve().parents[2] / "pretrained" / "capsnet-mnist.safetensors"


def test_round_trip_gives_the_fp16_rounded_model_and_metadata(tmp_path):
    torch.manual_seed(0)
    model = CapsNet(**SMALL)
    path = save_weights(model, SMALL, tmp_path / "w.safetensors", {"global_step": 7, "note": "x"})
    loaded, meta = load_weights(path)
    assert meta == {CONFIG_KEY: SMALL, "global_step": 7, "note": "x"}
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor.half().float()), name
    x = torch.rand(4, 1, 28, 28)
    torch.testing.assert_close(loaded(x).lengths, model.half().float().eval()(x).lengths)


def test_tampered_or_foreign_files_are_refused_with_the_fix(tmp_path):
    torch.manual_seed(0)
    model = CapsNet(**SMALL)
    tensors = {k: v.half().contiguous() for k, v in model.state_dict().items()}
    cases = {
        "not_safetensors.safetensors": None,
        "no_config.safetensors": {},
        "foreign_key.safetensors": {CONFIG_KEY: json.dumps({**SMALL, "__import__": "os"})},
        "wrong_shape.safetensors": {CONFIG_KEY: json.dumps({**SMALL, "conv_channels": 8})},
    }
    for name, meta in cases.items():
        path = tmp_path / name
        if meta is None:
            path.write_bytes(b"\x80\x04 pickle, not safetensors")
        else:
            save_file(tensors, str(path), metadata=meta)
        with pytest.raises(CapsdistError, match=r"not a capsdist weights file .*Fix: pass a \.safetensors"):
            load_weights(path)
    with pytest.raises(CapsdistError, match="no weights file"):
        load_weights(tmp_path / "missing.safetensors")


@pytest.mark.skipif(not SHIPPED.is_file(), reason="no shipped pretrained model in this checkout")
def test_shipped_model_scores_its_recorded_accuracy_on_the_first_1000_test_digits():
    model, meta = load_weights(SHIPPED)
    assert meta[CONFIG_KEY]["conv_channels"] == 256 and sum(p.numel() for p in model.parameters()) == 8_215_568
    assert meta["test_correct"] >= 9_960 and meta["test_digits"] == 10_000  # >= 99.60% on all test digits
    assert int(mnist_hits(model, limit=1000).sum()) == meta["first_1000_correct"]


def _module_checkpoint() -> tuple[dict, CapsNet]:
    """The model part of a checkpoint as a Trainer fitting a CapsNetModule writes it, and that module's CapsNet."""
    from capsdist.training.module import CapsNetModule  # Lightning: only these tests need it

    torch.manual_seed(0)
    module = CapsNetModule(**SMALL, log_images_every_n_steps=0)
    data = {"source": "mnist", "batch_size": 8}
    ckpt = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "global_step": 5}
    return {**ckpt, "datamodule_hyper_parameters": data}, module.model.eval()


def test_from_pretrained_reads_training_checkpoints_single_file_and_sharded(tmp_path):
    """`CapsNet.from_pretrained` takes one's own checkpoint as well as weights files: a plain .ckpt file and capsdist's
    sharded .ckpt directory give the module's model exactly (float32, eval mode)."""
    from capsdist.checkpoint import sharded

    ckpt, model = _module_checkpoint()
    torch.save(ckpt, tmp_path / "last.ckpt")
    sharded.save(ckpt, tmp_path / "sharded.ckpt", {})
    x = torch.rand(2, 1, 28, 28)
    for path in (tmp_path / "last.ckpt", tmp_path / "sharded.ckpt"):
        loaded = CapsNet.from_pretrained(path)
        assert not loaded.training and loaded.config == model.config
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
        assert torch.equal(loaded(x).lengths, model(x).lengths), path.name
    torch.save({"state_dict": {"net.w": torch.ones(2)}, "hyper_parameters": {}}, tmp_path / "foreign.ckpt")
    with pytest.raises(CapsdistError, match=r"not a readable capsdist checkpoint \(KeyError: .*no CapsNet weights"):
        CapsNet.from_pretrained(tmp_path / "foreign.ckpt")
    with pytest.raises(CapsdistError, match="no model at .*Fix: pass the name of shipped weights"):
        CapsNet.from_pretrained(tmp_path / "missing.ckpt")


def test_save_pretrained_writes_weights_and_a_model_card_that_from_pretrained_reads(tmp_path):
    """`save_pretrained(folder)`: model.safetensors in the shipped weights' format (fp16, the model's config) and a
    README.md with Hugging Face-style front matter; `from_pretrained(folder)` gives the fp16-rounded model back."""
    torch.manual_seed(0)
    model = CapsNet(**SMALL).eval()
    path = model.save_pretrained(tmp_path / "my-capsnet", {"test_accuracy": 0.98}, datasets=["mnist"])
    assert path == tmp_path / "my-capsnet" / "model.safetensors"
    loaded, meta = load_weights(path)
    assert meta == {CONFIG_KEY: model.config, "test_accuracy": 0.98} and model.config["caps_layers"] == [[10, 6]]
    again = CapsNet.from_pretrained(tmp_path / "my-capsnet")
    for name, tensor in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor.half().float()), name
    card = (tmp_path / "my-capsnet" / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front == {
        "library_name": "capsdist", "license": "mit", "pipeline_tag": "image-classification",
        "tags": ["capsule-network", "capsnet", "dynamic-routing", "image-classification", "pytorch"],
        "datasets": ["mnist"], "metrics": ["accuracy"],
    }  # fmt: skip
    assert 'CapsNet.from_pretrained("my-capsnet")' in card and json.dumps(model.config, indent=2) in card
    with pytest.raises(CapsdistError, match="save_pretrained writes a folder .*Fix: pass a folder"):
        model.save_pretrained(tmp_path / "w.safetensors")
