"""Weights files: round trip, refusal of foreign or tampered files, and the shipped pretrained model's accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
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
