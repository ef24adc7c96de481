"""model.weight_init: the paper's N(0, 0.01^2) stays bit-exact by default; "scaled" makes a stack of routed layers
behind many primaries start where squash passes gradient, and train, where the paper's init leaves it frozen."""

import pytest
import torch

from capsdist.data import mnist
from capsdist.model import CapsNet
from capsdist.model.losses import margin_loss
from tests.conftest import REPO

# 1,152 primaries (28x28 input, 32 maps of 8-D) routed into 32 x 16-D, then 10 x 16-D: large_cpu's depth, small.
DEEP = dict(conv_channels=16, primary_channels=32, caps_layers=[(32, 16), (10, 16)], reconstruction=False)


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """16 MNIST test digits in [0, 1] and their labels [16, 1]."""
    images, labels = mnist.load(REPO / "data" / "mnist", "test")
    return torch.from_numpy(images[:16]).float().div(255).unsqueeze(1), torch.from_numpy(labels[:16]).long().view(-1, 1)


def deep_net(weight_init: str) -> CapsNet:
    torch.manual_seed(0)
    return CapsNet(weight_init=weight_init, **DEEP)


def test_paper_init_is_the_default_and_unchanged():
    torch.manual_seed(0)
    default = CapsNet()
    torch.manual_seed(0)
    paper = CapsNet(weight_init="paper")
    pairs = zip(default.state_dict().values(), paper.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    w = default.caps[0].weight  # the values main wrote before weight_init existed (seed 0)
    assert w[0, 0, 0, :3].tolist() == pytest.approx([-0.001385931042023003, 0.007010106462985277, 0.006937734317034483])
    assert w[-1, -1, -1, -2:].tolist() == pytest.approx([0.0073675853200256824, 0.003354495158419013])
    assert w.double().sum().item() == pytest.approx(4.226172321409258, rel=1e-9)


@pytest.mark.parametrize("weight_init", ["paper", "scaled"])
def test_start_lengths_and_gradient_reaching_the_first_routed_layer(digits, weight_init):
    images, labels = digits
    model = deep_net(weight_init)
    out = model(images)
    margin_loss(out.lengths, labels).backward()
    grad = model.caps[0].weight.grad.pow(2).mean().sqrt().item()
    if weight_init == "paper":  # two squashes of |s| ~ 0.01: lengths ~1e-9, gradient far below Adam's eps (1e-8)
        assert out.lengths.mean() < 1e-4 and grad < 1e-12
    else:
        assert 0.05 < out.lengths.mean() < 0.9 and grad > 1e-7


def test_scaled_init_trains_a_deep_stack_the_paper_init_leaves_frozen(digits):
    images, labels = digits
    margins = {}
    for weight_init in ("paper", "scaled"):
        model = deep_net(weight_init)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        history = []
        for _ in range(10):  # scaled: 0.68 -> 0.01 in 10 steps (30 reach ~0); paper: 0.81 throughout
            loss = margin_loss(model(images).lengths, labels)
            history.append(loss.item())
            opt.zero_grad()
            loss.backward()
            opt.step()
        margins[weight_init] = history
    paper, scaled = margins["paper"], margins["scaled"]
    assert abs(paper[-1] - paper[0]) < 1e-3  # frozen at 0.81 (every length ~0)
    assert scaled[-1] < 0.5 * scaled[0]


def test_unknown_weight_init_is_refused():
    with pytest.raises(ValueError, match="weight_init"):
        CapsNet(weight_init="xavier")
