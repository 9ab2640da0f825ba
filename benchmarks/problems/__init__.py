"""Benchmark problems behind one small interface (see benchmarks/README.md).

Each module ``benchmarks/problems/<name>.py`` defines ``make(suite="quick",
data_dir=None) -> Problem``. A :class:`Problem` bundles fixed data, a model
(a shared trunk + one head per task, plain JAX pytrees), a per-task loss
function and the per-task test metrics.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Optional, Sequence

import numpy as np

BUILTIN = ("scales", "digits", "manytask", "toy2d")
REAL_DATA = ("celeba", "pcba")
ALL = BUILTIN + REAL_DATA


@dataclasses.dataclass(frozen=True)
class Problem:
  """A multi-task benchmark problem.

  Attributes:
    name: the problem's name.
    task_names: one name per task; T = len(task_names).
    metric_names: the metrics reported for every task; the first one is the
      primary metric (mean score, Δm%, negative transfer and ranking use it).
    higher_is_better: one bool per metric name.
    init_params: ``init_params(key) -> params`` (a pytree; jittable).
    loss_fn: ``loss_fn(params, batch) -> f32[T]`` per-task training losses.
    train_data: a pytree of arrays with a common leading axis N, the
      training set; a batch is the same pytree indexed by a vector of row
      indices (the runner draws them: minibatches with replacement).
    test_inputs: a pytree of arrays, what the model sees of the test set.
    batch_size: training minibatch size.
    predict: ``predict(params, test_inputs) -> tuple of T arrays``, the
      test-set predictions, one entry per task (jittable, vmappable).
    score_task: ``score_task(task_index, prediction) -> {metric: float}``
      (NumPy) scores of one task's predictions of one model.
    num_steps: the training budget: the most steps (the runner's model
      selection stops earlier once the validation loss stops improving).
    learning_rate: Adam learning rate.
    single_task_baseline: whether the protocol trains single-task models.
    description: one paragraph for the report.

  The data are passed to the compiled training loop and to ``predict`` as
  arguments rather than closed over (under ``jit`` a closed-over array
  becomes a constant of the compiled program and XLA compiles slowly), and
  the random parts (initialisation, batch indices) run outside the training
  loop, so that one strategy costs one small compilation.
    extra: problem-specific things (e.g. the toy's starting points).
  """

  name: str
  task_names: tuple[str, ...]
  metric_names: tuple[str, ...]
  higher_is_better: tuple[bool, ...]
  init_params: Callable[[Any], Any]
  loss_fn: Callable[[Any, Any], Any]
  train_data: Any
  test_inputs: Any
  predict: Callable[[Any, Any], Sequence[Any]]
  score_task: Callable[[int, np.ndarray], dict[str, float]]
  num_steps: int
  learning_rate: float
  batch_size: int = 64
  single_task_baseline: bool = True
  description: str = ""
  extra: dict = dataclasses.field(default_factory=dict)

  @property
  def num_tasks(self) -> int:
    return len(self.task_names)


def suite_configs(quick: dict, paper: dict, full: Optional[dict] = None,
                  **full_changes) -> dict[str, dict]:
  """A problem's settings per suite (``CONFIGS``): ``quick``; ``full``, by
  default the quick settings with ``full_changes`` (a larger budget); and
  ``paper``, the paper's sizes."""
  return {"quick": quick,
          "full": dict(quick, **full_changes) if full is None else full,
          "paper": paper}


def make(name: str, suite: str = "quick", data_dir: Optional[str] = None,
         **overrides) -> Problem:
  """Builds the problem ``name`` (a module of this package)."""
  if name not in ALL:
    raise ValueError(f"unknown problem {name!r}; known: {', '.join(ALL)}.")
  module = importlib.import_module(f"benchmarks.problems.{name}")
  return module.make(suite=suite, data_dir=data_dir, **overrides)
