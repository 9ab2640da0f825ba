"""Every strategy of optax_mtl, discovered at run time (a shared test helper).

Tests that must cover every strategy import this module (``from tests import
strategy_cases``) instead of keeping their own list, so a strategy added to
``optax_mtl.__all__`` is tested everywhere the day it lands:

  >>> from tests import strategy_cases
  >>> names = [name for name, _ in strategy_cases.strategy_cases()]
  >>> "equal" in names and "normalized_gradients" in names
  True

A strategy is a public function that takes ``num_tasks`` and returns an
:class:`optax_mtl.MultiTaskStrategy`. Factories with a further *required*
argument get it from :data:`REQUIRED_KWARGS` (by parameter name) or
:data:`STRATEGY_KWARGS` (by strategy name); a factory annotated to return a
strategy whose required argument is found in neither makes discovery fail
loudly instead of silently dropping the strategy from every test.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp

import optax_mtl

NUM_TASKS = 3

# Values for required factory arguments, by parameter name (any strategy).
REQUIRED_KWARGS: dict[str, Any] = {
    "seed": 0,
    "key": jax.random.key(0),
    "rng": jax.random.key(0),
    "learning_rate": 1e-2,
}

# Extra keyword arguments for one strategy, by public name.
STRATEGY_KWARGS: dict[str, dict[str, Any]] = {}

Factory = Callable[..., optax_mtl.MultiTaskStrategy]


def _is_strategy_factory(obj: Any) -> bool:
  if not inspect.isfunction(obj):
    return False
  try:
    signature = inspect.signature(obj)
  except (TypeError, ValueError):
    return False
  return "num_tasks" in signature.parameters


def _kwargs_for(name: str, function: Callable[..., Any]) -> dict[str, Any] | None:
  """The keyword arguments that complete a call with num_tasks, or None."""
  kwargs = dict(STRATEGY_KWARGS.get(name, {}))
  signature = inspect.signature(function)
  for parameter in signature.parameters.values():
    if parameter.name == "num_tasks" or parameter.name in kwargs:
      continue
    if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
      continue
    if parameter.default is parameter.empty:
      if parameter.name in REQUIRED_KWARGS:
        kwargs[parameter.name] = REQUIRED_KWARGS[parameter.name]
      elif "MultiTaskStrategy" in str(signature.return_annotation):
        raise ValueError(
            f"optax_mtl.{name} needs the argument {parameter.name!r}: add a "
            "value to STRATEGY_KWARGS or REQUIRED_KWARGS in "
            "tests/strategy_cases.py.")
      else:
        return None  # Not a strategy factory (e.g. a metric).
  return kwargs


def strategy_cases(num_tasks: int = NUM_TASKS) -> Iterator[tuple[str, Factory]]:
  """Yields ``(name, factory)`` for every public strategy of optax_mtl.

  ``factory(num_tasks=num_tasks, **overrides)`` builds the strategy with the
  arguments discovery needed (``overrides`` win).

  Args:
    num_tasks: the number of tasks used to probe each candidate factory.
  """
  for name in sorted(optax_mtl.__all__):
    function = getattr(optax_mtl, name, None)
    if not _is_strategy_factory(function):
      continue
    kwargs = _kwargs_for(name, function)
    if kwargs is None:
      continue
    strategy = function(num_tasks=num_tasks, **kwargs)
    if not isinstance(strategy, optax_mtl.MultiTaskStrategy):
      continue

    def factory(num_tasks=num_tasks, *, _function=function, _kwargs=kwargs,
                **overrides):
      return _function(num_tasks=num_tasks, **{**_kwargs, **overrides})

    yield name, factory


@functools.lru_cache(maxsize=None)
def names(num_tasks: int = NUM_TASKS) -> tuple[str, ...]:
  """The names of every strategy (cached: discovery builds each once)."""
  return tuple(name for name, _ in strategy_cases(num_tasks))


def factory_of(name: str, num_tasks: int = NUM_TASKS) -> Factory:
  """The factory discovered for one strategy name."""
  return dict(strategy_cases(num_tasks))[name]


def needs_gramian(strategy: optax_mtl.MultiTaskStrategy) -> bool:
  return optax_mtl.weighting_of(strategy).needs is optax_mtl.Needs.GRAMIAN


def state_dtypes(state: Any) -> Any:
  """The (shape, dtype) of every leaf: must never change between steps."""
  return jax.tree.map(lambda leaf: (jnp.shape(leaf), jnp.asarray(leaf).dtype),
                      state)
