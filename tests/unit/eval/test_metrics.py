"""Metric definitions on hand-made logits, checked against counts worked out by hand."""

import math

import torch

from ubt_core.eval.metrics import accuracy_by_class, attack_metrics, clean_accuracy


def _logits(preds: list[int], n_classes: int = 3) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(preds), n_classes).float()


def test_clean_accuracy_counts_top1_matches():
    m = clean_accuracy(_logits([0, 1, 2, 2]), torch.tensor([0, 1, 1, 2]))
    assert (m["ca"], m["ca_num"], m["ca_den"]) == (0.75, 3, 4)


def test_accuracy_by_class_counts_each_class_on_its_own_images():
    m = accuracy_by_class(_logits([0, 1, 2, 2, 0]), torch.tensor([0, 1, 1, 2, 0]), ["circle", "square", "star"])
    assert (m["circle"], m["square"], m["star"]) == (1.0, 0.5, 1.0)
    assert math.isnan(accuracy_by_class(_logits([0]), torch.tensor([0]), ["circle", "square", "star"])["square"])


def test_asr_ignores_images_whose_true_class_is_the_target():
    # labels 2 are the target: both predicted 2, which must NOT count as attack successes
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    preds = [2, 0, 2, 2, 2, 2]
    m = attack_metrics(_logits(preds), labels, target=2)
    assert (m["asr_num"], m["asr_den"]) == (3, 4)
    assert m["asr"] == 0.75


def test_asr_is_against_the_target_not_the_true_label():
    labels = torch.tensor([0, 1, 1])
    m = attack_metrics(_logits([0, 1, 0]), labels, target=2)
    assert m["asr"] == 0.0  # nothing went to the target, although one image is misclassified
    assert (m["ra_num"], m["ra_den"]) == (2, 3)


def test_robust_accuracy_counts_true_class_on_triggered_non_target_images():
    labels = torch.tensor([0, 1, 2, 1])
    m = attack_metrics(_logits([0, 2, 2, 0]), labels, target=2)
    assert (m["ra_num"], m["ra_den"], m["asr_num"]) == (1, 3, 1)
    assert math.isclose(m["ra"], 1 / 3)


def test_no_non_target_images_gives_nan_not_a_crash():
    m = attack_metrics(_logits([1, 1]), torch.tensor([1, 1]), target=1)
    assert m["asr_den"] == 0 and math.isnan(m["asr"])
