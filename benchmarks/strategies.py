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
# Loss-only strategies first, then the Gramian ones; "equal" is the baseline.
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


def needs_gramian(strategy: Any) -> bool:
  """Whether a built strategy reads the Gramian of the task gradients."""
  return optax_mtl.weighting_of(strategy).needs is optax_mtl.Needs.GRAMIAN
