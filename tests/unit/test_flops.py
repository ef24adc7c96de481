"""The FLOP count behind `python -m capsdist.bench --what flops`: routing's elementwise FLOPs from the shapes, by
hand and against the ops routing actually runs, and the row's fields on a tiny config."""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils._python_dispatch import TorchDispatchMode

from capsdist.bench.flops import flops_row, routing_elementwise_flops
from capsdist.model.capsnet import CapsLayer

MATMUL = {"aten.bmm.default", "aten.mm.default", "aten.addmm.default"}  # what FlopCounterMode counts
FREE = {  # layout, allocation and copies: no arithmetic
    "aten.view.default", "aten.transpose.int", "aten.t.default", "aten.unsqueeze.default", "aten.squeeze.dim",
    "aten.expand.default", "aten.clone.default", "aten.copy_.default", "aten.zeros.default", "aten.detach.default",
    "aten.new_empty_strided.default", "aten.empty_like.default", "aten.ones_like.default", "aten._unsafe_view.default",
}  # fmt: skip
PER_ELEMENT = {"aten._softmax.default": 5, "aten.addcmul_.default": 2}  # the rest: 1 per output element


class ElementwiseFlops(TorchDispatchMode):
    """FLOPs of every op that is neither a matmul nor free, on tensors of at least ``floor`` elements: 1 per output
    element (softmax 5, addcmul 2), a reduction 1 per input element; an op it does not know fails the count."""

    def __init__(self, floor: int) -> None:
        super().__init__()
        self.floor, self.flops = floor, Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # torch's protocol
        out = func(*args, **(kwargs or {}))
        name = str(func)
        sizes = [t.numel() for t in (*args, out) if isinstance(t, torch.Tensor)]
        if name in MATMUL | FREE or max(sizes, default=0) < self.floor:
            return out
        assert name.startswith(("aten.mul", "aten.add", "aten.sub", "aten.div", "aten.sum", "aten._softmax")), name
        elements = args[0].numel() if name.startswith("aten.sum") else out.numel()
        self.flops[name] += elements * PER_ELEMENT.get(name, 1)
        return out


def test_routing_flops_by_hand():
    """batch 1, 2 inputs, 2 outputs of dim 2: P = 8 prior and L = 4 logit elements."""
    # 3 rounds: P (4*2 + 1) = 72 for the priors; L (2*5*2 + 1) = 84 for the logits (2 softmaxes forward and their 2
    # gradients of 5 per element, one running sum in round 3)
    assert routing_elementwise_flops(1, 2, 2, 2, 3) == 72 + 84
    assert routing_elementwise_flops(1, 2, 2, 2, 1) == 8  # one round: the mean over the inputs alone
    assert routing_elementwise_flops(3, 2, 2, 2, 2) == 3 * (8 * 5 + 4 * 10)  # linear in the batch


@pytest.mark.parametrize("iterations", [1, 2, 3, 4])
def test_routing_flops_match_the_ops_routing_runs(iterations: int) -> None:
    """Forward + backward of a routed layer: the elementwise FLOPs counted op by op on prior- and logit-sized
    tensors (more inputs than output dims, so squash's [batch, outputs, dim] tensors stay below) equal the formula."""
    batch, n_in, n_out, d_out = 3, 7, 5, 4
    layer = CapsLayer(n_in, 2, n_out, d_out, iterations)
    u = torch.randn(batch, n_in, 2, requires_grad=True)
    with ElementwiseFlops(floor=batch * n_in * n_out) as mode:
        layer(u).pow(2).sum().backward()
    assert sum(mode.flops.values()) == routing_elementwise_flops(batch, n_in, n_out, d_out, iterations), mode.flops


def test_flops_row_of_a_tiny_config(tmp_path: Path) -> None:
    """The row holds the counted FLOPs by op, routing's added ones and the run estimates, consistently."""
    config = tmp_path / "tiny.yaml"
    model = {"conv_channels": 4, "primary_channels": 2, "decoder_hidden": [8]}
    config.write_text(yaml.safe_dump({"trainer": {"max_steps": 10}, "model": model, "data": {
        "source": "multimnist_onthefly", "batch_size": 4}}))  # fmt: skip
    flags = {"config": str(config), "precision": "32", "batch_size": 2, "steps": 1, "warmup": 1}
    fast = {"channels_last": False, "compile": False, "cuda_graphs": False}  # the train step's, all off
    row = flops_row(argparse.Namespace(**flags, **fast), torch.device("cpu"))
    assert row["image_size"] == 36 and row["num_targets"] == 2
    assert sum(row["counted_by_op"].values()) == row["counted_flops_per_image"] > 0
    primaries = 2 * 10 * 10  # 36 -> 28 after Conv1 -> 10 after PrimaryCaps
    assert row["routing_elementwise_flops_per_image"] == routing_elementwise_flops(1, primaries, 10, 16, 3)
    per_image = row["counted_flops_per_image"] + row["routing_elementwise_flops_per_image"]
    assert row["train_flops_per_image"] == per_image
    assert row["achieved_flops_per_s"] == pytest.approx(per_image * row["images_per_s"], rel=0.01)
    assert row["paper_one_pass"]["flops"] == per_image * 60_000_000
    assert row["config_max_steps"]["images"] == 10 * 4  # max_steps x the config's batch
    assert set(row["paper_one_pass"]["h100_hours"]) == {"mfu_0.02", "mfu_0.08", "mfu_0.3"}
