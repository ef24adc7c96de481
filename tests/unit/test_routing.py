"""Squash and dynamic routing against hand-computed values and the plain reference (capsdist.model.reference)."""

import pytest
import torch

from capsdist.model.reference import plain_routing
from capsdist.model.routing import dynamic_routing, squash


def test_squash_hand_values():
    v = squash(torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]], dtype=torch.float64))
    assert torch.allclose(v[0], torch.tensor([25 / 26 * 0.6, 25 / 26 * 0.8], dtype=torch.float64))
    assert torch.equal(v[1], torch.zeros(2, dtype=torch.float64))
    assert torch.allclose(v[2], torch.tensor([0.5, 0.0], dtype=torch.float64))


def test_squash_keeps_direction_and_shrinks_below_one():
    s = torch.randn(1000, 16) * torch.logspace(-3, 2, 1000).unsqueeze(1)
    v = squash(s)
    norms = v.norm(dim=-1)
    assert (norms < 1).all() and (norms > 0).all()
    cos = torch.nn.functional.cosine_similarity(v, s, dim=-1)
    assert torch.allclose(cos, torch.ones_like(cos), atol=1e-5)


def test_squash_is_finite_with_gradient_at_zero():
    s = torch.zeros(3, 8, requires_grad=True)
    squash(s).sum().backward()
    assert torch.isfinite(s.grad).all()


def test_squash_along_other_dim():
    s = torch.randn(4, 8, 5)
    assert torch.allclose(squash(s, dim=1), squash(s.transpose(1, 2)).transpose(1, 2), atol=1e-6)


@pytest.mark.parametrize("iterations", [1, 2, 3])
def test_routing_matches_plain_reference(iterations):
    torch.manual_seed(0)
    u_hat = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    expected = plain_routing(u_hat, iterations)
    assert torch.allclose(dynamic_routing(u_hat, iterations), expected, atol=1e-10)


def test_one_iteration_is_uniform_coupling_by_hand():
    # two inputs, two outputs, 2-D: s_j = (u_0j + u_1j) / 2
    u_hat = torch.tensor([[[[1.0, 0.0], [0.0, 2.0]], [[3.0, 0.0], [0.0, 2.0]]]], dtype=torch.float64)
    v = dynamic_routing(u_hat, iterations=1)
    # s_0 = [2, 0] -> |s|^2 = 4 -> v = 4/5 * [1, 0]; s_1 = [0, 2] -> v = [0, 0.8]
    assert torch.allclose(v, torch.tensor([[[0.8, 0.0], [0.0, 0.8]]], dtype=torch.float64))


def test_routing_softmax_is_over_output_capsules():
    # input 0 agrees strongly with output 0; after routing its coupling moves to output 0, lengthening v_0
    u_hat = torch.zeros(1, 2, 2, 2, dtype=torch.float64)
    u_hat[0, 0, 0] = torch.tensor([2.0, 0.0])
    u_hat[0, 0, 1] = torch.tensor([0.1, 0.0])
    u_hat[0, 1, 0] = torch.tensor([0.0, 1.0])
    u_hat[0, 1, 1] = torch.tensor([0.0, 1.0])
    one, three = dynamic_routing(u_hat, 1), dynamic_routing(u_hat, 3)
    assert torch.allclose(three, plain_routing(u_hat, 3))
    assert three[0, 0, 0] > one[0, 0, 0]


def test_detach_keeps_forward_values():
    torch.manual_seed(1)
    u_hat = torch.randn(3, 7, 4, 5)
    assert torch.allclose(dynamic_routing(u_hat, 3, detach=True), dynamic_routing(u_hat, 3), atol=0)


def test_zero_iterations_is_an_error():
    with pytest.raises(ValueError, match="at least 1 iteration"):
        dynamic_routing(torch.zeros(1, 2, 2, 2), 0)


def test_fp16_large_priors_stay_finite():
    u_hat = torch.full((2, 1152, 10, 16), 6.0e4, dtype=torch.float16)
    v = dynamic_routing(u_hat, 3)
    assert v.dtype == torch.float32 and torch.isfinite(v).all()
    assert torch.allclose(v.norm(dim=-1), torch.ones(2, 10), atol=1e-4)
