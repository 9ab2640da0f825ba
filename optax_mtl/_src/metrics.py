"""Multi-task evaluation metrics: Δm% and negative transfer.

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

import numpy as np


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
