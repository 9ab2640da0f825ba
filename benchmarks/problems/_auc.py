"""ROC-AUC and average precision of binary tasks (NumPy, no scikit-learn).

Used by the binary-task problems (``manytask``, ``pcba``, ``celeba``) to
score each task's test predictions; missing labels are masked out.
"""

from __future__ import annotations

from typing import Optional

import numpy as np


def _average_ranks(values: np.ndarray) -> np.ndarray:
  """1-based ranks; tied values share the mean of their ranks."""
  order = np.argsort(values, kind="mergesort")
  sorted_values = values[order]
  _, group_start, group_size = np.unique(
      sorted_values, return_index=True, return_counts=True)
  group_rank = group_start + (group_size + 1) / 2.0  # mean of 1-based ranks
  ranks = np.empty(len(values), np.float64)
  ranks[order] = np.repeat(group_rank, group_size)
  return ranks


def _labelled(labels, scores, mask):
  labels = np.asarray(labels).reshape(-1)
  scores = np.asarray(scores, np.float64).reshape(-1)
  if mask is not None:
    keep = np.asarray(mask, bool).reshape(-1)
    labels, scores = labels[keep], scores[keep]
  return labels.astype(bool), scores


def roc_auc(labels, scores, mask: Optional[np.ndarray] = None) -> float:
  """Area under the ROC curve (the Mann–Whitney U statistic, ties count 1/2).

  Args:
    labels: ``[N]`` binary labels (0/1 or bools).
    scores: ``[N]`` real scores, larger means more likely positive.
    mask: optional ``[N]`` bools; only True entries are used (missing labels).

  Returns:
    The AUC, or NaN when only one class is present.

  Examples:
    >>> from benchmarks.problems import _auc
    >>> _auc.roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    0.75
  """
  labels, scores = _labelled(labels, scores, mask)
  num_pos = int(labels.sum())
  num_neg = len(labels) - num_pos
  if num_pos == 0 or num_neg == 0:
    return float("nan")
  ranks = _average_ranks(scores)
  u_statistic = ranks[labels].sum() - num_pos * (num_pos + 1) / 2.0
  return float(u_statistic / (num_pos * num_neg))


def average_precision(labels, scores,
                      mask: Optional[np.ndarray] = None) -> float:
  """Area under the precision–recall curve as average precision.

  ``AP = Σ_n (R_n − R_{n−1}) P_n`` over the distinct score thresholds in
  decreasing order (tied scores form one threshold), the step-wise
  definition without interpolation.

  Args:
    labels: ``[N]`` binary labels.
    scores: ``[N]`` real scores.
    mask: optional ``[N]`` bools selecting the labelled entries.

  Returns:
    The average precision, or NaN when there is no positive.

  Examples:
    >>> from benchmarks.problems import _auc
    >>> round(_auc.average_precision([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]), 4)
    0.8333
  """
  labels, scores = _labelled(labels, scores, mask)
  num_pos = int(labels.sum())
  if num_pos == 0:
    return float("nan")
  order = np.argsort(-scores, kind="mergesort")
  sorted_scores = scores[order]
  sorted_labels = labels[order]
  # The last index of every group of tied scores is a threshold.
  last_of_group = np.r_[np.nonzero(np.diff(sorted_scores))[0],
                        len(sorted_scores) - 1]
  true_pos = np.cumsum(sorted_labels)[last_of_group]
  predicted_pos = last_of_group + 1
  precision = true_pos / predicted_pos
  recall = true_pos / num_pos
  recall_step = np.diff(np.r_[0.0, recall])
  return float(np.sum(recall_step * precision))
