"""GLUE's metrics, written out so that they need nothing beyond torch: accuracy, F1 (of the positive class
for a binary task, as MRPC and QQP report it, and macro-averaged over classes), Pearson and Spearman
correlation (STS-B). Inputs are 1-D tensors of predictions and targets.
"""

from __future__ import annotations

import torch


def accuracy(predicted: torch.Tensor, target: torch.Tensor) -> float:
    return (predicted == target).double().mean().item()


def f1(predicted: torch.Tensor, target: torch.Tensor, positive: int) -> float:
    """F1 of one class; 0 when the class is neither predicted nor present (no true positive possible)."""
    true_pos = ((predicted == positive) & (target == positive)).sum().item()
    predicted_pos = (predicted == positive).sum().item()
    actual_pos = (target == positive).sum().item()
    return 2 * true_pos / (predicted_pos + actual_pos) if predicted_pos + actual_pos else 0.0


def macro_f1(predicted: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    """The unweighted mean of the classes' F1: a majority-class guesser scores low however skewed the data."""
    return sum(f1(predicted, target, c) for c in range(num_classes)) / num_classes


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson's r; 0 when either side is constant (the correlation is undefined)."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denominator = (x.square().sum() * y.square().sum()).sqrt()
    return (x * y).sum().item() / denominator.item() if denominator > 0 else 0.0


def ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks, ties given the mean of the ranks they span (as scipy.stats.rankdata)."""
    values, inverse, counts = torch.unique(x.double(), return_inverse=True, return_counts=True)
    last = counts.cumsum(0).double()  # the highest rank of each distinct value
    return (last - (counts.double() - 1) / 2)[inverse]


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's rho: Pearson's r of the ranks."""
    return pearson(ranks(x), ranks(y))
