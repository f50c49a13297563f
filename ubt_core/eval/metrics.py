"""Zero-shot metric definitions on logits: clean accuracy (overall and per class), attack success rate,
robust accuracy.

ASR and RA count only triggered images whose true class is not the target: an image of the target
class that is classified as the target is a success of the classifier, not of the attack.
"""

from __future__ import annotations

import torch


def _rate(num: int, den: int) -> float:
    return num / den if den else float("nan")


def clean_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Top-1 accuracy of (N, C) logits against (N,) labels, with numerator and denominator."""
    num = int((logits.argmax(dim=1) == labels).sum())
    return {"ca": _rate(num, len(labels)), "ca_num": num, "ca_den": len(labels)}


def accuracy_by_class(logits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict[str, float]:
    """Top-1 accuracy of each class's images, by class name (nan for a class with no images): where an
    unlearning costs CA, the target class is the one to look at."""
    correct = logits.argmax(dim=1) == labels
    return {name: _rate(int(correct[labels == i].sum()), int((labels == i).sum())) for i, name in enumerate(classes)}


def attack_metrics(triggered_logits: torch.Tensor, labels: torch.Tensor, target: int) -> dict[str, float]:
    """ASR and RA of (N, C) logits on triggered images with true (N,) labels, for class index `target`.

    ASR: share of non-target images predicted as `target`. RA: share of them still predicted correctly.
    """
    keep = labels != target
    pred = triggered_logits.argmax(dim=1)[keep]
    den = int(keep.sum())
    asr_num = int((pred == target).sum())
    ra_num = int((pred == labels[keep]).sum())
    return {"asr": _rate(asr_num, den), "asr_num": asr_num, "asr_den": den,
            "ra": _rate(ra_num, den), "ra_num": ra_num, "ra_den": den}
