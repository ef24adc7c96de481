"""Streaming (chunked) routing against the default path: values, gradients, precision, and what it holds."""

import pytest
import torch

import capsdist.model.streaming as streaming
from capsdist.model import CapsLayer, CapsNet
from capsdist.model.losses import capsnet_loss
from capsdist.model.reference import plain_routing
from capsdist.model.streaming import streaming_routing

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = dict(conv_channels=16, primary_channels=4, primary_dim=4, decoder_hidden=(32, 48))


def layer_value_and_grads(layer: CapsLayer, u: torch.Tensor, weights: torch.Tensor, chunk: int | None):
    """v, dL/du and dL/dW of L = sum(v * weights), routed by the default path (chunk None) or streamed."""
    layer.zero_grad()
    layer.chunk_size = chunk
    x = u.detach().clone().requires_grad_()
    v = layer(x)
    (v * weights).sum().backward()
    return v.detach(), x.grad, layer.weight.grad.clone()


@pytest.mark.parametrize("iterations", [1, 2, 3])
def test_gradcheck_float64(iterations):
    torch.manual_seed(iterations)
    u = torch.randn(2, 5, 2, dtype=torch.float64, requires_grad=True)
    w = (torch.randn(5, 3, 4, 2, dtype=torch.float64) * 0.7).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: streaming_routing(a, b, iterations, False, 2), (u, w))


@pytest.mark.parametrize("chunk", [1, 4, 11, 64])
@pytest.mark.parametrize("detach", [False, True])
@pytest.mark.parametrize("iterations", [1, 2, 3])
def test_streaming_equals_default_float64(iterations, detach, chunk):
    torch.manual_seed(iterations + 10 * chunk)
    layer = CapsLayer(11, 3, 4, 5, iterations, detach).double()
    layer.weight.data.normal_(0, 0.5)
    u, weights = torch.randn(2, 11, 3, dtype=torch.float64), torch.randn(2, 4, 5, dtype=torch.float64)
    want = layer_value_and_grads(layer, u, weights, None)
    got = layer_value_and_grads(layer, u, weights, chunk)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # and the plain reference formulation agrees on the values
    torch.testing.assert_close(got[0], plain_routing(layer.priors(u), iterations, detach), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("detach", [False, True])
def test_streaming_equals_default_float32_relative(detach):
    torch.manual_seed(0)
    layer = CapsLayer(300, 8, 10, 16, 3, detach)
    layer.weight.data.normal_(0, 0.1)
    u, weights = torch.randn(6, 300, 8), torch.randn(6, 10, 16)
    want = layer_value_and_grads(layer, u, weights, None)
    got = layer_value_and_grads(layer, u, weights, 64)
    for g, w in zip(got, want, strict=True):
        assert ((g - w).norm() / w.norm()).item() <= 1e-5


def step(model: CapsNet, x: torch.Tensor, labels: torch.Tensor, bf16: bool) -> dict[str, torch.Tensor]:
    """Loss and parameter gradients of one train step."""
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        total, _, _ = capsnet_loss(model(x, labels), labels, x.unsqueeze(1))
    total.backward()
    return {"loss": total.detach(), **{n: p.grad.clone() for n, p in model.named_parameters()}}


@pytest.mark.parametrize("bf16,tol", [(False, 1e-5), (True, 3e-2)])
@pytest.mark.parametrize("detach", [False, True])
def test_stacked_capsnet_step_matches_default(detach, bf16, tol):
    torch.manual_seed(0)
    model = CapsNet(caps_layers=[(24, 8), (10, 12)], detach_routing=detach, **TINY)
    x, labels = torch.rand(3, 1, 28, 28), torch.tensor([[1], [2], [3]])
    want = step(model, x, labels, bf16)
    for layer in model.caps:
        layer.chunk_size = 50  # 144 primaries: three uneven chunks; 24 capsules: one chunk
    got = step(model, x, labels, bf16)
    for name in want:
        scale = want[name].abs().max().item()
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=tol * scale, msg=name)


def test_capsnet_passes_the_chunk_size_to_every_routed_layer():
    model = CapsNet(caps_layers=[(24, 8), (10, 12)], routing_chunk_size=32, **TINY)
    assert [layer.chunk_size for layer in model.caps] == [32, 32]


def test_fp16_autocast_large_inputs_stay_finite():
    layer = CapsLayer(256, 8, 10, 16, 3, chunk_size=100)
    layer.weight.data.fill_(1.0)
    u = torch.full((2, 256, 8), 300.0, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.float16):
        v = layer(u)
    v.sum().backward()
    assert v.dtype == torch.float32 and torch.isfinite(v).all() and torch.isfinite(u.grad).all()
    assert torch.allclose(v.norm(dim=-1), torch.ones(2, 10), atol=1e-4)


@pytest.mark.parametrize("detach", [False, True])
def test_never_holds_priors_of_more_than_chunk_inputs(monkeypatch, detach):
    """Every prior tensor streaming routing makes covers at most C inputs, and what autograd saves is u, W and
    the small per-round tensors."""
    shapes = []
    priors = streaming._priors

    def spy(*args):
        out = priors(*args)
        shapes.append(out.shape)
        return out

    monkeypatch.setattr(streaming, "_priors", spy)
    saved = []
    layer = CapsLayer(100, 4, 6, 8, 3, detach, chunk_size=16)
    u = torch.randn(5, 100, 4, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        v = layer(u)
    v.sum().backward()
    assert shapes and max(s[1] for s in shapes) == 16  # [B*n_out, C, d]
    assert set(saved) == {u.shape, layer.weight.shape, torch.Size([30, 8])}  # the rest are [B*n_out, d]
