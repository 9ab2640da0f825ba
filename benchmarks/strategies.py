"""The strategies the suite compares, and their settings (one place).

``STRATEGIES`` maps a name to the keyword arguments of
``optax_mtl.<name>(num_tasks, **kwargs)``. A name that is not in the table
and a keyword argument that the factory does not take are errors: a typo
fails loudly instead of shrinking the comparison.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import optax_mtl

# name -> keyword arguments passed to optax_mtl.<name>(num_tasks, **kwargs).
# Loss-only strategies first, then those that read the per-task gradients
# (through their Gramian, then the gradients themselves); "equal" is the
# baseline. sdmgrad and modo read three minibatches a step: the step's own
# and the next two steps'. krum and trimmed_mean, robust aggregators, run
# where T >= 3 (MIN_TASKS); constant runs with the weights 1/T (the mean of
# the losses: under Adam the same training as "equal" up to Adam's ε, a
# check of the harness rather than a method).
STRATEGIES: dict[str, dict[str, Any]] = {
    "equal": {},
    "loss_ema": {"beta": 0.2},  # The setting of the claim tested (report: claims).
    "rema": {},
    "dwema": {},
    "dwa": {},
    "lbtw": {},
    "initial_loss": {},
    "log_loss": {},
    "geometric_mean": {},
    "uncertainty": {},
    "rlw": {},
    "imtl_l": {},
    "stch": {},
    "famo": {},  # The one-pass variant (remeasured_losses=False).
    "cosmos": {},
    "pbi": {},
    "normalized_gradients": {},
    "mgda": {},
    "upgrad": {},
    "dualproj": {},
    "cagrad": {},
    "pcgrad": {},
    "gradnorm": {},
    "imtl_g": {},
    "imtl": {},
    "nash_mtl": {},
    "aligned_mtl": {},
    "fairgrad": {},
    "config": {},
    "gradvac": {},
    "pcd": {},  # Task 0 of each problem is the primary one.
    "graddrop": {},
    "moco": {},
    "db_mtl": {},
    "excess_mtl": {},
    "sdmgrad": {},
    "modo": {},
    "krum": {},
    "trimmed_mean": {},
    "constant": {"weights": lambda num_tasks: [1.0 / num_tasks] * num_tasks},
}

# The fewest tasks a strategy is defined for (others: 2). A problem or
# speed size with fewer tasks skips it and says so.
MIN_TASKS: dict[str, int] = {"krum": 3, "trimmed_mean": 3}

# The factories of optax_mtl.__all__ that the suite does not run, and why
# (tests/test_benchmarks.py checks that every strategy factory is either in
# STRATEGIES or here).
NOT_RUN: dict[str, str] = {
    "recompute_every": "a wrapper that reuses any strategy's weights for n "
                       "steps; timed in the speed benchmark (upgrad, n = 10)",
    "smooth_weights": "a wrapper that smooths any weighting's weights "
                      "(CR-MOGM); its result depends on the strategy it "
                      "wraps",
    "with_shared_parameters": "a wrapper that restricts a strategy to the "
                              "shared parameters; timed in the speed "
                              "benchmark (upgrad, shared=trunk)",
    "as_gradient_transformation": "the optax face of a strategy, not a "
                                  "method of its own",
}

BASELINE = "equal"


def resolve(names: Optional[Sequence[str]] = None) -> list[str]:
  """The names to run: the whole table by default, else ``names`` checked.

  Raises:
    ValueError: a name that is not in :data:`STRATEGIES`.
  """
  if names is None:
    return list(STRATEGIES)
  names = list(names)
  unknown = [name for name in names if name not in STRATEGIES]
  if unknown:
    raise ValueError(
        f"unknown strategies {unknown}; known: {', '.join(STRATEGIES)}.")
  return names


def make(name: str, num_tasks: int, **overrides) -> Any:
  """Builds ``optax_mtl.<name>(num_tasks, **STRATEGIES[name], **overrides)``.

  Raises:
    ValueError: ``name`` is not in :data:`STRATEGIES`.
    TypeError: a keyword argument the factory does not take.
  """
  (name,) = resolve([name])
  kwargs = {key: value(num_tasks) if callable(value) else value
            for key, value in STRATEGIES[name].items()}
  return getattr(optax_mtl, name)(num_tasks, **{**kwargs, **overrides})


def runs_at(name: str, num_tasks: int) -> bool:
  """Whether ``name`` is defined for ``num_tasks`` tasks (:data:`MIN_TASKS`)."""
  return num_tasks >= MIN_TASKS.get(name, 2)


def split_runnable(names: Sequence[str],
                   num_tasks: int) -> tuple[list[str], dict[str, str]]:
  """``(runnable, skipped)``: the names defined at ``num_tasks`` tasks, and
  ``{name: why}`` for the others."""
  runnable = [name for name in names if runs_at(name, num_tasks)]
  skipped = {name: f"needs at least {MIN_TASKS[name]} tasks"
             for name in names if not runs_at(name, num_tasks)}
  return runnable, skipped


def reads_task_gradients(strategy: Any) -> bool:
  """Whether a built strategy reads the per-task gradients (their Gramian
  or the gradients themselves): the report's "Gramian" kind, whose step is
  compared with the Jacobian-only step."""
  return optax_mtl.weighting_of(strategy).needs in (
      optax_mtl.Needs.GRAMIAN, optax_mtl.Needs.GRADIENTS)
