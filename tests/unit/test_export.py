"""A CapsNet with its default settings exports and compiles (docs/api.md "Export"): `torch.export` gives the eager
outputs exactly (the routing fast path decides before it reads any storage, which an export's fake tensors do not
have), `torch.onnx.export(..., dynamo=True)` gives a model whose outputs, run by onnx's reference evaluator, equal
eager's to float32 rounding, and `torch.compile` (fullgraph: no graph break) inference equals eager."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from capsdist.model import CapsNet

SMALL = dict(conv_channels=16, primary_channels=4, primary_dim=4, caps_layers=[[10, 6]], decoder_hidden=[32, 48])
SETTINGS = pytest.mark.parametrize("extra", [{}, {"routing_chunk_size": 64}], ids=["default", "streaming"])
ONNX = ("onnx", "onnxscript")  # what torch.onnx.export(dynamo=True) needs: pip install 'capsdist[export]'


def small_model(extra: dict) -> tuple[CapsNet, torch.Tensor]:
    """A seeded small CapsNet in eval mode and a batch of 3 images for it."""
    torch.manual_seed(0)
    return CapsNet(**SMALL, **extra).eval(), torch.rand(3, 1, 28, 28)


@SETTINGS
def test_exported_capsnet_equals_eager(extra: dict) -> None:
    model, x = small_model(extra)
    exported = torch.export.export(model, (x,)).module()
    with torch.no_grad():
        eager, traced = model(x), exported(x)
    for name, a, b in zip(eager._fields, eager, traced, strict=True):
        assert torch.equal(a, b), name


@pytest.mark.skipif(
    not all(importlib.util.find_spec(name) for name in ONNX),
    reason="onnx and onnxscript are not installed: pip install 'capsdist[export]' (the test extra includes them)",
)
@SETTINGS
def test_onnx_export_runs_and_equals_eager(extra: dict, tmp_path: Path) -> None:
    from onnx.reference import ReferenceEvaluator  # an optional extra: only this test needs it

    model, x = small_model(extra)
    torch.onnx.export(model, (x,), tmp_path / "capsnet.onnx", dynamo=True)
    outputs = ReferenceEvaluator(str(tmp_path / "capsnet.onnx")).run(None, {"x": x.numpy()})
    with torch.no_grad():
        eager = model(x)
    for name, a, b in zip(eager._fields, eager, outputs, strict=True):
        torch.testing.assert_close(torch.from_numpy(b), a, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_inference_equals_eager(backend: str) -> None:
    """fullgraph: the whole forward is one graph. aot_eager (1 s) checks the tracing; inductor, torch.compile's
    default backend, generates C++ (20 s here), so it runs in the slow tier."""
    model, x = small_model({})
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    with torch.no_grad():
        eager, got = model(x), compiled(x)
    for name, a, b in zip(eager._fields, eager, got, strict=True):
        torch.testing.assert_close(b, a, msg=name)
