"""Every fast path against the straightforward formulation: forward values and gradients, fp32/fp64 and bf16."""

import pytest
import torch

from capsdist.model import CapsLayer, CapsNet
from capsdist.model.conv import strided_conv2d
from capsdist.model.losses import capsnet_loss
from capsdist.model.reference import ReferenceCapsLayer, plain_routing, reference_twin
from capsdist.model.routing import dynamic_routing

TINY = dict(conv_channels=16, primary_channels=4, primary_dim=4, caps_layers=[(10, 6)], decoder_hidden=(32, 48))


def priors(batch: int, n_in: int, n_out: int, d: int, input_major: bool, dtype: torch.dtype) -> torch.Tensor:
    """Random priors [B, n_in, n_out, d], laid out input-major (as CapsLayer writes them) or contiguous."""
    if input_major:
        return torch.randn(n_in, batch, n_out, d, dtype=dtype).transpose(0, 1)
    return torch.randn(batch, n_in, n_out, d, dtype=dtype)


def value_and_grad(fn, u_hat: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fn(u_hat) and d(sum(fn(u_hat) * weights))/d u_hat."""
    u = u_hat.detach().clone().requires_grad_()
    out = fn(u)
    (out * weights).sum().backward()
    return out.detach(), u.grad


@pytest.mark.parametrize("input_major", [True, False])
@pytest.mark.parametrize("detach", [False, True])
@pytest.mark.parametrize("iterations", [1, 2, 3])
def test_fast_routing_matches_plain_values_and_grads(iterations, detach, input_major):
    torch.manual_seed(iterations)
    u_hat = priors(3, 7, 4, 5, input_major, torch.float64)
    weights = torch.randn(3, 4, 5, dtype=torch.float64)
    fast = value_and_grad(lambda u: dynamic_routing(u, iterations, detach), u_hat, weights)
    plain = value_and_grad(lambda u: plain_routing(u, iterations, detach), u_hat, weights)
    torch.testing.assert_close(fast, plain, rtol=1e-10, atol=1e-12)


def test_fast_routing_bf16_priors_match_fp32_routing_of_the_same_values():
    torch.manual_seed(0)
    u_hat = priors(4, 32, 10, 16, True, torch.float32).bfloat16()
    weights = torch.randn(4, 10, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast_v, fast_g = value_and_grad(lambda u: dynamic_routing(u, 3, True), u_hat, weights)
    plain_v, plain_g = value_and_grad(lambda u: plain_routing(u.float(), 3, True), u_hat, weights)
    assert fast_v.dtype == torch.float32 and fast_g.dtype == torch.bfloat16
    torch.testing.assert_close(fast_v, plain_v, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast_g, plain_g, rtol=2**-7, atol=1e-5)  # fp32 grads within one bf16 ulp


def test_reference_layer_equals_capsdist_layer():
    torch.manual_seed(0)
    model = CapsNet(detach_routing=True, **TINY)
    ref = ReferenceCapsLayer.from_layer(model.caps[0])
    assert ref.weight.shape == (1, 10, model.num_primary, 6, 4)
    u = torch.randn(3, model.num_primary, 4)
    torch.testing.assert_close(ref(u), model.caps[0](u), rtol=1e-5, atol=1e-6)


def step_grads(model: CapsNet, x: torch.Tensor, labels: torch.Tensor, bf16: bool) -> dict[str, torch.Tensor]:
    """Loss and parameter gradients of one train step (reference W mapped back to capsdist's layout)."""
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        total, _, _ = capsnet_loss(model(x, labels), labels, x.unsqueeze(1))
    total.backward()
    grads = {"loss": total.detach()}
    for name, p in model.named_parameters():
        grads[name] = p.grad.squeeze(0).transpose(0, 1) if p.dim() == 5 else p.grad
    return grads


@pytest.mark.parametrize("bf16,tol", [(False, 1e-4), (True, 3e-2)])
def test_capsnet_train_step_matches_reference_formulation(bf16, tol):
    torch.manual_seed(0)
    model = CapsNet(detach_routing=True, **TINY)
    x, labels = torch.rand(4, 1, 28, 28), torch.tensor([[1], [2], [3], [4]])
    fast = step_grads(model, x, labels, bf16)
    ref = step_grads(reference_twin(model), x, labels, bf16)
    assert fast.keys() == ref.keys() and len(fast) == 12
    for name in fast:
        scale = ref[name].abs().max().item()
        torch.testing.assert_close(fast[name], ref[name], rtol=0, atol=tol * scale, msg=name)


@pytest.mark.parametrize("size,kernel,stride", [(20, 9, 2), (11, 3, 3), (9, 4, 1), (12, 5, 2)])
@pytest.mark.parametrize("bf16", [False, True])
def test_strided_conv2d_matches_conv2d_values_and_grads(size, kernel, stride, bf16):
    torch.manual_seed(size)
    conv = torch.nn.Conv2d(3, 5, kernel, stride=stride)
    x = torch.randn(2, 3, size, size)

    def run(fn):
        conv.zero_grad()
        xx = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = fn(xx)
        (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        return y.detach(), xx.grad, conv.weight.grad.clone(), conv.bias.grad.clone()

    fast, plain = run(lambda xx: strided_conv2d(xx, conv)), run(conv)
    assert fast[0].dtype == plain[0].dtype and fast[2].is_contiguous()
    for got, want in zip(fast, plain, strict=True):
        scale = want.abs().max().item()
        torch.testing.assert_close(got, want, rtol=0, atol=(1e-2 if bf16 else 1e-5) * scale)


def test_channels_last_model_gives_the_same_step():
    torch.manual_seed(0)
    model = CapsNet(**TINY)
    x, labels = torch.rand(2, 1, 28, 28), torch.tensor([[1], [2]])
    plain = step_grads(model, x, labels, bf16=False)
    cl = torch.channels_last
    fast = step_grads(model.to(memory_format=cl), x.to(memory_format=cl), labels, bf16=False)
    for name in plain:
        torch.testing.assert_close(fast[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("detach", [False, True])
def test_priors_gradient_keeps_the_input_major_layout(detach):
    layer = CapsLayer(n_in=12, d_in=4, n_out=3, d_out=5, detach=detach)
    u_hat = layer.priors(torch.randn(2, 12, 4))  # an input-major view, as CapsLayer writes it
    assert u_hat.transpose(0, 1).is_contiguous()
    grads = []
    u_hat.register_hook(grads.append)  # the gradient as it arrives, before any layout fix-up
    dynamic_routing(u_hat, 3, detach).sum().backward()
    assert grads[0].transpose(0, 1).is_contiguous()  # so the prior matmul's backward reads it without a copy


def test_strided_conv2d_leaves_other_convolutions_to_torch():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 9, 9)
    for conv in (
        torch.nn.Conv2d(2, 3, 3, padding=1),
        torch.nn.Conv2d(2, 4, 3, groups=2),
        torch.nn.Conv2d(2, 3, 3, (1, 2)),
    ):
        torch.testing.assert_close(strided_conv2d(x, conv), conv(x), rtol=0, atol=0)


def test_layer_writing_the_gradient_over_its_priors_matches_autograd():
    """CapsLayer's priors are its own temporary, so full routing's backward writes d u_hat over them: W's and u's
    gradients still equal plain autograd's, and a second backward through that graph is refused by autograd's
    version check instead of reading overwritten priors."""
    torch.manual_seed(0)
    layer = CapsLayer(n_in=12, d_in=4, n_out=3, d_out=5).double()
    u, weights = torch.randn(2, 12, 4, dtype=torch.float64, requires_grad=True), torch.randn(2, 3, 5).double()
    (layer(u) * weights).sum().backward(retain_graph=True)
    fast = (layer.weight.grad.clone(), u.grad.clone())
    layer.weight.grad = u.grad = None
    plain_priors = torch.einsum("iokd,bid->biok", layer.weight, u)
    (plain_routing(plain_priors, 3, detach=False) * weights).sum().backward()
    torch.testing.assert_close(fast, (layer.weight.grad, u.grad), rtol=1e-10, atol=1e-12)
    out = layer(u)
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
