"""CUDA against CPU: routing, the model, the fast paths, the on-device MultiMNIST generator, compile and graphs.

Marked `gpu`: skipped without CUDA. `scripts/device_check.sh` runs them on a lent GPU; its CPU smoke mode sets
CAPSDIST_GPU_TESTS_ON_CPU=1 so the same code runs (CPU against CPU) and cannot rot between GPU sessions.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from capsdist.data import recipe
from capsdist.data.batch import multimnist_from_draw
from capsdist.data.device import DeviceMultiMnist
from capsdist.model import CapsNet
from capsdist.model.losses import capsnet_loss
from capsdist.model.reference import reference_twin
from capsdist.model.routing import dynamic_routing
from tests.conftest import u8

pytestmark = pytest.mark.gpu

SMALL = dict(conv_channels=32, primary_channels=8, caps_layers=[(10, 16)], decoder_hidden=(64, 128))


@pytest.fixture(scope="module")
def device() -> Iterator[torch.device]:
    """The CUDA device, with TF32 off so fp32 results are comparable to the CPU's."""
    if not torch.cuda.is_available():  # conftest runs gpu tests without CUDA only for the smoke run
        yield torch.device("cpu")
        return
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b| over the whole tensor, in float64 on the CPU."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def step(model: CapsNet, x: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Forward (under autocast when dtype is given), loss, backward -> lengths, recon, loss and every gradient."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        out = model(x, labels)
        total, _, _ = capsnet_loss(out, labels, x.unsqueeze(1))
    total.backward()
    base = getattr(model, "_orig_mod", model)  # a torch.compile wrapper prefixes the parameter names
    grads = {f"grad/{n}": p.grad for n, p in base.named_parameters()}
    return {"lengths": out.lengths, "recon": out.recon, "loss": total, **grads}


def batch(n: int = 16, size: int = 28, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random batch of images and single labels on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, size, size, generator=gen), torch.randint(0, 10, (n, 1), generator=gen)


@pytest.mark.parametrize("detach", [False, True])
def test_paper_model_fp32_on_device_equals_cpu(device, detach):
    torch.manual_seed(0)
    cpu_model = CapsNet(detach_routing=detach)
    dev_model = CapsNet(detach_routing=detach).to(device)
    dev_model.load_state_dict(cpu_model.state_dict())
    x, labels = batch(8)
    want = step(cpu_model, x, labels, None)
    got = step(dev_model, x.to(device), labels.to(device), None)
    for key, value in want.items():
        assert rel_err(got[key], value) < 1e-4, key


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_on_device_is_finite_and_close_to_fp32(device, dtype):
    if device.type == "cpu" and dtype == torch.float16:
        pytest.skip("fp16 autocast is a GPU mode")
    torch.manual_seed(0)
    model = CapsNet(**SMALL).to(device)
    x, labels = batch(32)
    x, labels = x.to(device), labels.to(device)
    exact = step(model, x, labels, None)
    low = step(model, x, labels, dtype)
    for key, value in low.items():
        assert torch.isfinite(value).all(), key
    assert rel_err(low["lengths"], exact["lengths"]) < 3e-2
    assert rel_err(low["grad/caps.0.weight"], exact["grad/caps.0.weight"]) < 1e-1


def test_routing_stays_finite_for_fp16_range_priors_on_device(device):
    u_hat = (torch.randn(4, 1152, 10, 16, device=device) * 3e4).clamp(-6e4, 6e4).half()  # near fp16's max
    u_hat.requires_grad_()
    with torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16):
        v = dynamic_routing(u_hat, 3)
    v.sum().backward()
    assert torch.isfinite(v).all() and torch.isfinite(u_hat.grad).all()


def test_fast_paths_equal_reference_formulation_on_device(device):
    torch.manual_seed(0)
    model = CapsNet(**SMALL, detach_routing=True).to(device)
    twin = reference_twin(model)
    x, labels = batch(16)
    x, labels = x.to(device), labels.to(device)
    fast, ref = step(model, x, labels, None), step(twin, x, labels, None)
    for key in ("lengths", "recon", "loss", "grad/conv1.weight", "grad/primary.conv.weight"):
        assert rel_err(fast[key], ref[key]) < 1e-4, key
    ref_w = ref["grad/caps.0.weight"].squeeze(0).permute(1, 0, 2, 3)  # back to capsdist's [n_in, n_out, d, d]
    assert rel_err(fast["grad/caps.0.weight"], ref_w) < 1e-4


def test_device_multimnist_composes_exactly_like_the_cpu(device):
    gen = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (50, 28, 28), dtype=torch.uint8, generator=gen)
    labels = torch.arange(50) % 10
    first = torch.randint(50, (64,), generator=gen)
    indices, offsets = recipe.draw(labels, first, gen)
    want = multimnist_from_draw(images, labels, indices, offsets)
    source = DeviceMultiMnist(images, labels, device)
    got = source.compose({"indices": indices.to(device), "offsets": offsets.to(device)})
    assert torch.equal(got["labels"].cpu(), want["labels"])
    for key in ("image", "recon"):  # the composition is exact in uint8; CUDA's /255 may differ from the CPU's by 1 ulp
        assert torch.equal(u8(got[key].cpu()), u8(want[key])), key
        torch.testing.assert_close(got[key].cpu(), want[key], rtol=1e-6, atol=0)
    drawn = source.batch(256, epoch=1, step=2)
    again = source.batch(256, epoch=1, step=2)
    assert all(torch.equal(drawn[k], again[k]) for k in drawn)  # a pure function of (seed, epoch, rank, step)
    assert (drawn["labels"][:, 0] != drawn["labels"][:, 1]).all()
    assert drawn["image"].shape == (256, 1, 36, 36) and drawn["image"].device.type == device.type


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_compiled_model_matches_eager(device, mode):
    if mode == "reduce-overhead" and device.type != "cuda":
        pytest.skip("CUDA graphs need CUDA")
    torch.manual_seed(0)
    model = CapsNet(**SMALL).to(device)
    # On the CPU smoke run, dynamo's trace and AOT autograd's graphs without inductor's C++ build: that build takes
    # 30 s on a 2-core host with a cold cache (tests/unit/test_export.py compiles with inductor on the CPU)
    compiled = torch.compile(model, mode=mode, backend="inductor" if device.type == "cuda" else "aot_eager")
    x, labels = batch(16)
    x, labels = x.to(device), labels.to(device)
    eager = step(model, x, labels, None)
    for _ in range(3):  # graphs are recorded on the first calls and replayed after
        if mode:
            torch.compiler.cudagraph_mark_step_begin()
        got = step(compiled, x, labels, None)
    for key in ("lengths", "recon", "loss", "grad/caps.0.weight", "grad/conv1.weight"):
        assert rel_err(got[key], eager[key]) < 1e-3, key
