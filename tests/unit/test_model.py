"""CapsNet shapes, parameter counts, masking, losses, gradients and mixed precision."""

import pytest
import torch

from capsdist.model import CapsLayer, CapsNet
from capsdist.model.losses import capsnet_loss, margin_loss, reconstruction_loss
from tests.conftest import TINY_NET


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_paper_parameter_counts():
    model = CapsNet()
    assert count(model) == 8_215_568
    assert count(model) - count(model.decoder) == 6_804_224
    assert model.num_primary == 1152
    assert model.caps[0].weight.shape == (1152, 10, 16, 8)  # a separate 16x8 W_ij per (i, j)


def test_multimnist_model_size():
    model = CapsNet(image_size=36)
    assert model.num_primary == 3200
    assert count(model) == 11_361_808  # the paper's 11.36M


@pytest.mark.parametrize("size,k", [(28, 1), (36, 2)])
def test_forward_shapes(size, k):
    model = CapsNet(image_size=size, **TINY_NET)
    x = torch.rand(3, 1, size, size)
    labels = torch.tensor([[1, 2], [3, 4], [5, 6]])[:, :k]
    out = model(x, labels)
    assert out.caps.shape == (3, 10, 6) and out.lengths.shape == (3, 10)
    assert out.recon.shape == (3, k, 1, size, size)
    assert model(x, k=k).recon.shape == (3, k, 1, size, size)


def test_stacked_capsule_layers():
    model = CapsNet(
        image_size=28,
        conv_channels=16,
        primary_channels=4,
        primary_dim=4,
        caps_layers=[(24, 8), (10, 12)],
        decoder_hidden=(32,),
    )
    out = model(torch.rand(2, 1, 28, 28), torch.tensor([[0], [9]]))
    assert [layer.weight.shape for layer in model.caps] == [(144, 24, 8, 4), (24, 10, 12, 8)]
    assert out.caps.shape == (2, 10, 12) and out.recon.shape == (2, 1, 1, 28, 28)


def test_bad_capsule_config_names_the_fix():
    with pytest.raises(ValueError, match="num_classes"):
        CapsNet(num_classes=10, caps_layers=[(5, 16)])
    with pytest.raises(ValueError, match="does not fit"):
        CapsNet(image_size=12)


def test_priors_equal_broadcast_matmul():
    torch.manual_seed(0)
    layer = CapsLayer(n_in=6, d_in=4, n_out=3, d_out=5)
    u = torch.randn(2, 6, 4)
    reference = (layer.weight.unsqueeze(0) @ u[:, :, None, :, None]).squeeze(-1)  # [B, i, j, d]
    assert torch.allclose(layer.priors(u), reference, atol=1e-6)


def test_decoder_masks_by_labels_in_training_and_longest_at_test():
    torch.manual_seed(0)
    model = CapsNet(**TINY_NET).eval()
    x = torch.rand(2, 1, 28, 28)
    out = model(x, k=2)
    top2 = out.lengths.topk(2, dim=1).indices
    assert torch.allclose(out.recon, model(x, top2).recon)
    # each reconstruction sees only its own capsule: it equals the decoder of that capsule alone
    caps = torch.zeros_like(out.caps)
    caps[0, top2[0, 1]] = out.caps[0, top2[0, 1]]
    alone = model.decoder.net(caps[0].flatten()).view(1, 28, 28)
    assert torch.allclose(out.recon[0, 1], alone, atol=1e-6)


def test_margin_loss_hand_values():
    lengths = torch.tensor([[0.95, 0.3, 0.05], [0.5, 0.5, 0.0]])
    labels = torch.tensor([[0], [1]])
    # row 0: pos 0 (0.95 > 0.9), neg 0.5*(0.2^2) = 0.02 for class 1, 0 for class 2 -> 0.02
    # row 1: pos (0.9-0.5)^2 = 0.16, neg 0.5*(0.4^2) = 0.08 for class 0 -> 0.24
    assert torch.isclose(margin_loss(lengths, labels), torch.tensor(0.13))


def test_margin_loss_two_labels():
    lengths = torch.tensor([[0.8, 0.7, 0.2]])
    # pos (0.1)^2 + (0.2)^2 = 0.05, neg 0.5 * 0.1^2 = 0.005
    assert torch.isclose(margin_loss(lengths, torch.tensor([[0, 1]])), torch.tensor(0.055))


def test_reconstruction_and_total_loss():
    recon = torch.full((2, 1, 1, 2, 2), 0.5)
    target = torch.zeros(2, 1, 1, 2, 2)
    assert torch.isclose(reconstruction_loss(recon, target), torch.tensor(1.0))  # 4 pixels * 0.25
    out = CapsNet(**TINY_NET)(torch.rand(2, 1, 28, 28), torch.tensor([[1], [2]]))
    total, margin, rec = capsnet_loss(out, torch.tensor([[1], [2]]), torch.rand(2, 1, 1, 28, 28))
    assert torch.isclose(total, margin + 0.0005 * rec)


def test_gradients_reach_every_part():
    model = CapsNet(**TINY_NET)
    x = torch.rand(4, 1, 28, 28)
    labels = torch.tensor([[1], [2], [3], [4]])
    total, _, _ = capsnet_loss(model(x, labels), labels, x.unsqueeze(1))
    total.backward()
    for name in ["conv1.weight", "primary.conv.weight", "caps.0.weight", "decoder.net.0.weight"]:
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_bf16_autocast_close_to_fp32():
    torch.manual_seed(0)
    model = CapsNet(**TINY_NET)
    x = torch.rand(4, 1, 28, 28)
    ref = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(x)
    assert low.lengths.dtype == torch.float32
    assert torch.allclose(low.lengths, ref.lengths, atol=2e-2)
    assert torch.allclose(low.recon.float(), ref.recon, atol=3e-2)


def test_fp16_autocast_large_inputs_stay_finite():
    torch.manual_seed(0)
    model = CapsNet(**TINY_NET)
    x = torch.rand(2, 1, 28, 28) * 1e4
    labels = torch.tensor([[3], [7]])
    with torch.autocast("cpu", dtype=torch.float16):
        out = model(x, labels)
        total, margin, rec = capsnet_loss(out, labels, torch.rand(2, 1, 1, 28, 28))
    total.backward()
    assert torch.isfinite(out.lengths).all() and torch.isfinite(total)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
