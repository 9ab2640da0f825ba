"""Shared pieces of the multi-label binary problems (manytask, pcba, celeba)."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.problems import Problem
from benchmarks.problems import _auc
from benchmarks.problems import _common


def masked_bce(logits, labels, mask):
  """Per-task mean binary cross-entropy over the labelled entries."""
  per_entry = (jnp.maximum(logits, 0) - logits * labels
               + jnp.log1p(jnp.exp(-jnp.abs(logits))))
  per_entry = jnp.where(mask, per_entry, 0.0)
  count = jnp.maximum(jnp.sum(mask, axis=0), 1.0)
  return jnp.sum(per_entry, axis=0) / count


def make_binary_problem(
    name: str,
    task_names,
    train: tuple[np.ndarray, np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray, np.ndarray],
    *,
    hidden: int,
    depth: int,
    batch_size: int,
    num_steps: int,
    learning_rate: float,
    description: str,
    metric_names=("roc_auc", "pr_auc"),
    extra: Optional[dict] = None,
) -> Problem:
  """A problem of T binary tasks on features ``x`` with a label mask.

  ``train`` and ``test`` are ``(features f32[N, D], labels {0,1}[N, T],
  mask bool[N, T])``; masked-out labels are missing and do not enter the
  loss or the metrics.
  """
  num_tasks = len(task_names)
  train_x, train_y, train_mask = (jnp.asarray(train[0], jnp.float32),
                                  jnp.asarray(train[1], jnp.float32),
                                  jnp.asarray(train[2], bool))
  test_x = jnp.asarray(test[0], jnp.float32)
  test_y, test_mask = np.asarray(test[1]), np.asarray(test[2], bool)
  sizes = [train_x.shape[1]] + [hidden] * depth

  def init_params(key):
    trunk_key, head_key = jax.random.split(key)
    return {"trunk": _common.init_mlp(trunk_key, sizes),
            "heads": _common.init_heads(head_key, num_tasks, hidden, 1)}

  def forward(params, x):
    features = _common.apply_mlp(params["trunk"], x)
    return _common.apply_heads(params["heads"], features)[..., 0]  # [N, T]

  def loss_fn(params, batch):
    x, y, mask = batch
    return masked_bce(forward(params, x), y, mask)

  def predict(params, inputs):
    logits = forward(params, inputs)
    return tuple(logits[:, t] for t in range(num_tasks))

  def score_task(task, prediction):
    labels, mask = test_y[:, task], test_mask[:, task]
    out = {}
    for metric in metric_names:
      if metric == "roc_auc":
        out[metric] = _auc.roc_auc(labels, prediction, mask)
      elif metric == "pr_auc":
        out[metric] = _auc.average_precision(labels, prediction, mask)
      elif metric == "accuracy":
        out[metric] = float(np.mean(((prediction > 0) == (labels > 0))[mask]))
    return out

  return Problem(
      name=name, task_names=tuple(task_names), metric_names=tuple(metric_names),
      higher_is_better=tuple(True for _ in metric_names),
      init_params=init_params, loss_fn=loss_fn,
      train_data=(train_x, train_y, train_mask), test_inputs=test_x,
      predict=predict, score_task=score_task, num_steps=num_steps,
      learning_rate=learning_rate, batch_size=batch_size,
      description=description,
      extra=dict(extra or {}))
