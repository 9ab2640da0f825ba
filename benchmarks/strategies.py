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
# and the next two steps'. Left out: krum and trimmed_mean, robust
# aggregators that need T >= 3 (toy2d and the speed benchmark's smallest
# run have two tasks), and constant (weights the user chooses; with equal
# ones it is "equal").
STRATEGIES: dict[str, dict[str, Any]] = {
    "equal": {},
    "ema": {},
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
  return getattr(optax_mtl, name)(num_tasks, **STRATEGIES[name], **overrides)


def reads_task_gradients(strategy: Any) -> bool:
  """Whether a built strategy reads the per-task gradients (their Gramian
  or the gradients themselves): the report's "Gramian" kind, whose step is
  compared with the Jacobian-only step."""
  return optax_mtl.weighting_of(strategy).needs in (
      optax_mtl.Needs.GRAMIAN, optax_mtl.Needs.GRADIENTS)
