"""Exact-match and per-digit metrics against hand-computed values."""

import torch

from capsdist.model.metrics import CapsMetrics, topk_hits


def test_topk_hits_single_label_is_argmax():
    lengths = torch.tensor([[0.1, 0.9, 0.2], [0.8, 0.1, 0.3]])
    assert topk_hits(lengths, torch.tensor([[1], [2]])).tolist() == [[True], [False]]


def test_two_digit_exact_match_is_a_set_comparison():
    lengths = torch.tensor(
        [
            [0.9, 0.8, 0.1, 0.0],  # top-2 {0, 1}
            [0.9, 0.1, 0.8, 0.0],  # top-2 {0, 2}
            [0.1, 0.2, 0.9, 0.8],  # top-2 {2, 3}
        ]
    )
    labels = torch.tensor([[1, 0], [0, 1], [0, 1]])  # order of labels does not matter
    metrics = CapsMetrics()
    metrics.update(lengths, labels)
    values = metrics.compute()
    assert torch.isclose(values["acc"], torch.tensor(1 / 3))  # only the first image has both digits
    assert torch.isclose(values["error"], torch.tensor(2 / 3))
    assert torch.isclose(values["digit_acc"], torch.tensor(3 / 6))  # 2 + 1 + 0 digits found of 6


def test_metrics_accumulate_over_batches_and_reset():
    metrics = CapsMetrics()
    metrics.update(torch.tensor([[0.9, 0.1]]), torch.tensor([[0]]))
    metrics.update(torch.tensor([[0.9, 0.1], [0.2, 0.7], [0.6, 0.5]]), torch.tensor([[1], [1], [0]]))
    assert torch.isclose(metrics.compute()["acc"], torch.tensor(0.75))
    metrics.reset()
    metrics.update(torch.tensor([[0.9, 0.1]]), torch.tensor([[1]]))
    assert metrics.compute()["acc"] == 0
