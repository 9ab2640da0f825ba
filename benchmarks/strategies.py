"""The strategies the suite compares, and their default settings (one place).

A strategy is looked up by name in ``optax_mtl``; a name that the installed
``optax_mtl`` does not (yet) provide is skipped with a printed notice. Keyword
arguments that a factory does not accept are dropped with a notice too, so
that this table can run ahead of the library.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional, Sequence

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
    "normalized_gradients": {},
    "mgda": {},
    "upgrad": {},
    "dualproj": {},
    "cagrad": {},
    "pcgrad": {},
    "gradnorm": {},
    "imtl_g": {},
    "nash_mtl": {},
    "aligned_mtl": {},
}

BASELINE = "equal"

_NOTICES: set[str] = set()


def _notice(message: str) -> None:
  if message not in _NOTICES:
    _NOTICES.add(message)
    print(f"[benchmarks] {message}", flush=True)


def available(names: Optional[Sequence[str]] = None) -> list[str]:
  """The names (in table order, or in the given order) optax_mtl provides."""
  names = list(STRATEGIES) if names is None else list(names)
  found = []
  for name in names:
    if callable(getattr(optax_mtl, name, None)):
      found.append(name)
    else:
      _notice(f"strategy {name!r} is not in optax_mtl (yet); skipped.")
  return found


def make(name: str, num_tasks: int, **overrides) -> Any:
  """Builds ``optax_mtl.<name>(num_tasks, **defaults, **overrides)``."""
  factory: Callable[..., Any] = getattr(optax_mtl, name)
  kwargs = dict(STRATEGIES.get(name, {}))
  kwargs.update(overrides)
  try:
    parameters = inspect.signature(factory).parameters
  except (TypeError, ValueError):
    parameters = {}
  takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD
                  for p in parameters.values())
  if parameters and not takes_any:
    for key in list(kwargs):
      if key not in parameters:
        _notice(f"optax_mtl.{name} takes no argument {key!r}; dropped.")
        del kwargs[key]
  return factory(num_tasks, **kwargs)


def needs_gramian(strategy: Any) -> bool:
  """Whether a built strategy reads the Gramian (engine computes J for it)."""
  return strategy.weighting.needs is optax_mtl.Needs.GRAMIAN
