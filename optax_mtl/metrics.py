"""Multi-task evaluation metrics: Δm%, negative transfer, ROC-AUC, PR-AUC.

All functions take NumPy arrays (or anything ``np.asarray`` accepts) and are
meant for evaluation outside ``jit``. Conventions:

* ``scores`` hold one value per task (or per task metric) on the last axis;
  leading axes (e.g. seeds) are kept.
* ``higher_is_better`` is a bool per task (per metric): ``True`` for
  accuracy or AUC, ``False`` for an error such as MSE.

Definitions used by the benchmark suite (Maninis et al. 2019; Vandenhende et
al. 2021):

* relative change of task ``k`` against the single-task baseline ``b``:
  ``s_k · (M_k − b_k) / |b_k|`` with ``s_k = +1`` if higher is better, else
  ``−1``; positive means the multi-task model is better;
* ``Δm% = 100 · mean_k relative_change_k``;
* task ``k`` shows *negative transfer* when the multi-task model is worse
  than the single-task model beyond seed noise: its signed mean difference
  ``s_k · (mean(M_k) − mean(b_k))`` is below ``−z · SE_k`` where
  ``SE_k = sqrt(var(M_k)/n_M + var(b_k)/n_b)`` (sample variances over seeds,
  ddof=1; a variance is taken as 0 with a single seed) and ``z = 2`` by
  default.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

__all__ = (
    "average_precision",
    "delta_m",
    "mean_and_std",
    "negative_transfer_count",
    "negative_transfer_mask",
    "relative_change",
    "roc_auc",
)


def _signs(higher_is_better, num: int) -> np.ndarray:
  signs = np.where(np.broadcast_to(np.asarray(higher_is_better, bool), (num,)),
                   1.0, -1.0)
  return signs


def relative_change(scores, baseline_scores, higher_is_better) -> np.ndarray:
  """Signed relative change against a baseline, one value per task.

  ``s_k · (scores_k − baseline_k) / |baseline_k|``, positive when ``scores``
  is better. Leading axes of ``scores`` are kept.

  Args:
    scores: ``[..., K]`` metric values of the model under test.
    baseline_scores: ``[K]`` (or broadcastable) baseline values, e.g. the
      single-task models' mean over seeds.
    higher_is_better: bool or ``[K]`` bools.

  Returns:
    ``[..., K]`` relative changes (fractions, not percent).

  Examples:
    >>> from optax_mtl import metrics
    >>> metrics.relative_change([1.5, 2.0], [1.0, 4.0], [True, False]).tolist()
    [0.5, 0.5]
  """
  scores = np.asarray(scores, np.float64)
  baseline = np.asarray(baseline_scores, np.float64)
  signs = _signs(higher_is_better, scores.shape[-1])
  return signs * (scores - baseline) / np.abs(baseline)


def delta_m(scores, baseline_scores, higher_is_better) -> np.ndarray:
  r"""Δm%: the mean relative change against a baseline, in percent.

  .. math::
    \Delta_m = \frac{100}{K} \sum_{k=1}^{K} (-1)^{l_k}
      \frac{M_{m,k} - M_{b,k}}{M_{b,k}}

  with ``l_k = 1`` when lower is better (Maninis et al., CVPR 2019). Larger
  is better; 0 means on par with the baseline.

  Args:
    scores: ``[..., K]`` metric values (e.g. ``[num_seeds, K]``).
    baseline_scores: ``[K]`` baseline values.
    higher_is_better: bool or ``[K]`` bools.

  Returns:
    ``[...]``: Δm% for each leading index (a 0-d array for ``[K]`` input).

  Examples:
    >>> from optax_mtl import metrics
    >>> float(metrics.delta_m([1.5, 2.0], [1.0, 4.0], [True, False]))
    50.0
  """
  return 100.0 * np.mean(
      relative_change(scores, baseline_scores, higher_is_better), axis=-1)


def negative_transfer_mask(
    mtl_scores,
    stl_scores,
    higher_is_better,
    num_standard_errors: float = 2.0,
) -> np.ndarray:
  """Which tasks the multi-task model is worse on, beyond seed noise.

  Task ``k`` is flagged when ``s_k · (mean(mtl_k) − mean(stl_k)) <
  −num_standard_errors · SE_k`` with ``SE_k = sqrt(var(mtl_k)/n_mtl +
  var(stl_k)/n_stl)`` (sample variances, ddof=1; 0 for a single seed, so
  that with one seed any worse score counts).

  Args:
    mtl_scores: ``[n_mtl, K]`` scores of the multi-task model, one row per
      seed (a ``[K]`` vector is one seed).
    stl_scores: ``[n_stl, K]`` scores of the single-task models.
    higher_is_better: bool or ``[K]`` bools.
    num_standard_errors: the margin ``z`` in standard errors.

  Returns:
    bool ``[K]``.
  """
  mtl = np.atleast_2d(np.asarray(mtl_scores, np.float64))
  stl = np.atleast_2d(np.asarray(stl_scores, np.float64))
  signs = _signs(higher_is_better, mtl.shape[-1])

  def var_over_n(x):
    if x.shape[0] < 2:
      return np.zeros(x.shape[-1])
    return np.var(x, axis=0, ddof=1) / x.shape[0]

  standard_error = np.sqrt(var_over_n(mtl) + var_over_n(stl))
  difference = signs * (mtl.mean(axis=0) - stl.mean(axis=0))
  return difference < -num_standard_errors * standard_error


def negative_transfer_count(
    mtl_scores,
    stl_scores,
    higher_is_better,
    num_standard_errors: float = 2.0,
) -> int:
  """The number of tasks with negative transfer (see :func:`negative_transfer_mask`).

  Examples:
    >>> from optax_mtl import metrics
    >>> mtl = [[0.70, 0.90], [0.72, 0.91]]   # two seeds, two tasks
    >>> stl = [[0.80, 0.90], [0.81, 0.89]]
    >>> metrics.negative_transfer_count(mtl, stl, higher_is_better=True)
    1
  """
  return int(np.sum(negative_transfer_mask(
      mtl_scores, stl_scores, higher_is_better, num_standard_errors)))


def mean_and_std(values, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Mean and standard deviation (ddof=1; 0 for a single value) over an axis."""
  values = np.asarray(values, np.float64)
  mean = np.mean(values, axis=axis)
  if values.shape[axis] < 2:
    return mean, np.zeros_like(mean)
  return mean, np.std(values, axis=axis, ddof=1)


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
    >>> from optax_mtl import metrics
    >>> metrics.roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
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
    >>> from optax_mtl import metrics
    >>> round(metrics.average_precision([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]), 4)
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
