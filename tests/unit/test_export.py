"""`torch.export` of a CapsNet with its default settings: the graph runs and gives the eager outputs exactly (the
routing fast path decides before it reads any storage, which an export's fake tensors do not have)."""

from __future__ import annotations

import pytest
import torch

from capsdist.model import CapsNet

SMALL = dict(conv_channels=16, primary_channels=4, primary_dim=4, caps_layers=[[10, 6]], decoder_hidden=[32, 48])


@pytest.mark.parametrize("extra", [{}, {"routing_chunk_size": 64}], ids=["default", "streaming"])
def test_exported_capsnet_equals_eager(extra: dict) -> None:
    torch.manual_seed(0)
    model = CapsNet(**SMALL, **extra).eval()
    x = torch.rand(3, 1, 28, 28)
    exported = torch.export.export(model, (x,)).module()
    with torch.no_grad():
        eager, traced = model(x), exported(x)
    for name, a, b in zip(eager._fields, eager, traced, strict=True):
        assert torch.equal(a, b), name
