"""Exact-match and per-digit metrics and the own-capsule reconstruction error against hand-computed values."""

import pytest
import torch

from capsdist.model.capsnet import CapsNet
from capsdist.model.metrics import CapsMetrics, topk_hits
from capsdist.model.scoring import own_capsule_errors
from capsdist.model.trained import Trained


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


def _scores(lengths: list[list[float]], labels: list[list[int]]) -> tuple[list[list[bool]], dict[str, float]]:
    """(topk_hits, CapsMetrics values) of hand-made capsule lengths and labels."""
    lengths_t, labels_t = torch.tensor(lengths), torch.tensor(labels)
    metrics = CapsMetrics()
    metrics.update(lengths_t, labels_t)
    return topk_hits(lengths_t, labels_t).tolist(), {k: float(v) for k, v in metrics.compute().items()}


def test_paper_metric_on_hand_made_two_digit_cases():
    """The paper's MultiMNIST metric: right when the two longest capsules are exactly the sample's two digits."""
    both = [0.1, 0.2, 0.95, 0.1, 0.1, 0.1, 0.1, 0.9, 0.1, 0.1]  # classes 2 and 7 longest
    third = [0.1, 0.2, 0.95, 0.1, 0.1, 0.1, 0.1, 0.3, 0.9, 0.1]  # 7 pushed out by 8
    hits, values = _scores([both, both, third], [[2, 7], [7, 2], [2, 7]])
    assert hits == [[True, True], [True, True], [True, False]]  # either label order; 7 swapped for a third class
    assert values["acc"] == pytest.approx(2 / 3) and values["digit_acc"] == pytest.approx(5 / 6)


def test_a_digit_repeated_in_the_labels_is_found_once_so_the_sample_is_never_right():
    """Two distinct capsules cannot both be digit 3: the repeat is a miss even with 3 the longest capsule."""
    lengths = [0.1, 0.1, 0.1, 0.95, 0.9, 0.1, 0.1, 0.1, 0.1, 0.1]  # top-2 {3, 4}
    hits, values = _scores([lengths], [[3, 3]])
    assert hits == [[True, False]] and values["acc"] == 0 and values["digit_acc"] == 0.5


def test_a_tie_at_the_kth_place_or_a_nan_length_is_a_miss():
    """Found means strictly among the K longest, whatever order topk would break a tie in."""
    tie_at_second = [0.1, 0.9, 0.5, 0.5]  # 1 first; 2 and 3 share second place
    tie_at_top = [0.9, 0.9, 0.1, 0.1]  # both label capsules share first place: no ambiguity about the top 2
    all_equal = [0.5, 0.5, 0.5, 0.5]  # a dead model: topk would return 0, 1
    nan = [float("nan"), 0.9, 0.1, 0.1]
    hits, values = _scores([tie_at_second, tie_at_top, all_equal, nan], [[1, 2], [0, 1], [0, 1], [0, 1]])
    assert hits == [[True, False], [True, True], [False, False], [False, True]]
    assert values["acc"] == pytest.approx(1 / 4)
    single, _ = _scores([[0.7, 0.7, 0.1], [0.7, 0.6, 0.1]], [[0], [0]])  # K = 1: a tied argmax is a miss
    assert single == [[False], [True]]


def test_each_digit_is_reconstructed_from_its_own_capsule():
    """The error of each digit is that of the decoder masked by the digit's label, whatever the longest capsules."""
    caps = torch.tensor([[[1.0, 0, 0, 0], [0, 2, 0, 0], [0, 0, 3, 0]], [[0, 0, 0, 4], [5, 0, 0, 0], [0, 6, 0, 0]]])

    def decoder(caps: torch.Tensor, select: torch.Tensor) -> torch.Tensor:  # capsule j's vector as a 2x2 image
        return caps.gather(1, select.unsqueeze(2).expand(-1, -1, 4)).view(*select.shape, 1, 2, 2)

    labels = torch.tensor([[2, 0], [1, 2]])
    target = torch.zeros(2, 2, 1, 2, 2)
    target[0, 0, 0, 1, 0] = 3.0  # digit 2 drawn exactly as capsule 2 decodes: error 0
    target[1, 1, 0, 0, 0] = 1.0  # digit 2 of sample 1 against capsule 2's [0, 6, 0, 0]: 1 + 36
    errors = own_capsule_errors(decoder, caps, labels, target)
    assert errors.tolist() == [[0.0, 1.0], [25.0, 37.0]]


def test_evaluate_reports_the_mean_own_capsule_error_per_digit():
    """evaluate's digit_recon_sse is the mean over every digit of every batch (batches of unequal size)."""
    from capsdist.tools.evaluate import evaluate  # the CLI's module: jsonargparse and the data modules (slow import)

    torch.manual_seed(0)
    model = CapsNet(image_size=12, conv_channels=8, conv_kernel=3, primary_channels=4, primary_kernel=3).eval()
    batches = [
        {"image": torch.rand(n, 1, 12, 12), "labels": torch.tensor([[1, 7], [3, 2], [0, 9]][:n]),
         "recon": torch.rand(n, 2, 1, 12, 12)}
        for n in (3, 2)
    ]  # fmt: skip
    result = evaluate(Trained(model, {}, {}), torch.utils.data.DataLoader(batches, batch_size=None), "cpu")
    with torch.no_grad():
        errors = [own_capsule_errors(model.decoder, model(b["image"]).caps, b["labels"], b["recon"]) for b in batches]
    assert result["samples"] == 5 and result["digit_recon_sse"] == pytest.approx(float(torch.cat(errors).mean()))


def test_multi_digit_reconstructions_are_scored_against_their_own_digits() -> None:
    """The K longest capsules come longest first; each is scored against the target of its class, whatever the
    label order; wrong predictions take the remaining places in order."""
    from capsdist.model.scoring import pair_with_labels

    selected = torch.tensor([[7, 3], [3, 7], [3, 9], [9, 3], [1, 2]])
    labels = torch.tensor([[3, 7], [3, 7], [3, 7], [3, 7], [3, 7]])
    perm = pair_with_labels(selected, labels)
    assert perm.tolist() == [[1, 0], [0, 1], [0, 1], [1, 0], [0, 1]]
    paired = selected.gather(1, perm)
    assert paired[:2].tolist() == [[3, 7], [3, 7]] and paired[2:4, 0].tolist() == [3, 3]


def test_validation_loss_scores_each_reconstruction_against_its_own_digit() -> None:
    """A model that reconstructs each selected digit perfectly has no reconstruction loss, whichever of the two
    digits is longer: the longest-first reconstructions meet the label-ordered targets by class."""
    from capsdist.model.capsnet import CapsOutput
    from capsdist.model.metrics import CapsMetrics
    from capsdist.model.scoring import eval_batch

    digit = torch.arange(10.0).view(10, 1, 1, 1).expand(10, 1, 4, 4)  # class c's image: all pixels c

    def perfect(image: torch.Tensor, k: int) -> CapsOutput:
        lengths = torch.tensor([[0.1] * 10]).repeat(2, 1)
        lengths[0, [3, 7]] = torch.tensor([0.9, 0.8])  # 3 longer than 7
        lengths[1, [3, 7]] = torch.tensor([0.8, 0.9])  # 7 longer than 3
        return CapsOutput(torch.zeros(2, 10, 16), lengths, digit[lengths.topk(k, dim=1).indices])

    labels = torch.tensor([[3, 7], [3, 7]])
    batch = {"image": torch.zeros(2, 1, 4, 4), "labels": labels, "recon": digit[labels]}
    total, _ = eval_batch(perfect, batch, 1.0, CapsMetrics())
    margin, _ = eval_batch(perfect, batch, 0.0, CapsMetrics())
    torch.testing.assert_close(total, margin)  # the reconstruction term is 0
