"""The strategy author's kit: the two rule types, the checks, the state fields.

Every strategy of optax_mtl is one pure rule of one of two types:

* a :class:`Weighting` turns the per-task losses (and, for
  gradient-balancing strategies, the T×T Gramian ``G = J Jᵀ`` of the
  per-task gradients) into task weights ``w``;
* a :class:`GradientRule` turns the per-task gradients themselves into the
  update (GradDrop, MoCo, ...).

Either becomes an optax transformation with
:func:`optax_mtl.as_gradient_transformation`; both faces of the library
(the optax face and :func:`optax_mtl.value_and_grad`) then run the same
guarded step on it (``optax_mtl._src.step``).

State conventions (checked by the contract test over every strategy):

* a state is a NamedTuple of arrays with fixed shapes and dtypes;
* it has a field ``weights`` (float32[T]) holding the weights applied last;
* it has a field ``num_skipped`` (int32[]) counting the steps whose input was
  rejected as a whole (a non-finite loss, a non-positive loss where the rule
  divides by it, a non-finite Gramian, non-finite weights, or a rule that
  returned ``accepted`` false: see :class:`Weighting`). On such a step
  the previous weights are applied again and every other statistic is kept;
* a *per-task* weighting (``Weighting.per_task``) also has a field
  ``num_rejected_losses`` (int32[T]): a bad loss of one task (non-finite, or
  not positive where the rule needs it positive) excludes that task only. It
  keeps its statistics and its previous weight, its count is incremented,
  and the step goes on for the other tasks. Only a step with no valid loss
  (or a non-finite Gramian, gradient, weight or state) is rejected as a
  whole and counted in ``num_skipped``;
* a strategy that reads the per-task gradients (:attr:`Needs.GRAMIAN`, or
  a :class:`GradientRule`) also has a field ``num_rejected_gradients``
  (int32[T]): a task whose gradient is not finite (a NaN or inf in any
  coordinate) is excluded from that step (weight 0, its previous weight
  kept) and counted there; the step goes on for the other tasks;
* a strategy that reads the Gramian also has a field ``gradient_cosines``
  (float32[T, T]), the pairwise cosines of the task gradients it saw last;
* a strategy with an iterative solver also has ``solver_iterations``
  (int32[]), ``solver_gap`` (float32[]), ``solver_converged`` (bool[]) and
  ``solver_outcome`` (int32[], an :class:`optax_mtl.Outcome` code).

The guard fills ``weights`` and ``gradient_cosines``; rules only update their
own statistics. :func:`common_state_fields` gives the initial values of these
fields to every strategy's ``init``.
"""

from __future__ import annotations

import enum
import math
from typing import Any, Callable, NamedTuple, Optional, Union

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax


class Needs(enum.Enum):
  """What a strategy reads, so that the engine computes only that."""

  LOSSES = "losses"  # One forward and one backward pass.
  GRAMIAN = "gramian"  # The Gramian of the per-task gradients.
  # The per-task gradients themselves (the Jacobian, a leading task axis on
  # every leaf): what a GradientRule reads. A Weighting that declares it is
  # deprecated (turned into a GradientRule with a DeprecationWarning).
  GRADIENTS = "gradients"


# A weight rule: (task_losses f32[T], state, gramian [T,T] | None)
#   -> (weights [T], new_state) or (weights, new_state, accepted bool[]).
#   A per-task rule is also given valid=bool[T]. It never sees invalid input:
#   the guard replaces rejected losses (by 1.0) and Gramians by harmless
#   values and throws the result (or, per task, the excluded tasks' weights)
#   away.
WeightRule = Callable[..., tuple]
# A gradient rule: (task_losses f32[T], state, task_grads) -> (update,
#   new_state) or (update, new_state, accepted bool[]).
UpdateRule = Callable[..., tuple]


class Weighting(NamedTuple):
  """A strategy's weight rule: the losses (and the Gramian) → task weights.

  Build one to write your own strategy, then turn it into an optax
  transformation with :func:`optax_mtl.as_gradient_transformation`. A rule
  over the per-task gradients themselves, which returns the update, is a
  :class:`GradientRule` instead.

  **Rejecting a step.** A rule that finds it cannot give weights for this
  step (its inner optimizer overflowed, a bound on the losses is violated)
  returns a third value, ``(weights, new_state, accepted)`` with
  ``accepted`` a bool[] (traced) array: where it is false the guard keeps
  the previous state, applies the previous weights and counts the step in
  ``num_skipped``, exactly as for a non-finite loss. (A non-finite weight
  or state is rejected the same way, but ``accepted`` says so on purpose.)

  Attributes:
    num_tasks: the number of tasks T.
    needs: :attr:`Needs.LOSSES` (the rule reads only the losses, a step costs
      one backward pass) or :attr:`Needs.GRAMIAN` (the rule also reads the
      T×T Gramian of the per-task gradients). :attr:`Needs.GRADIENTS` is
      deprecated here: such a weighting is turned into a
      :class:`GradientRule` (``init(params)``, ``rule`` returns the update)
      with a ``DeprecationWarning``.
    init: ``init() -> state``, a NamedTuple with at least the fields of
      :func:`common_state_fields`.
    rule: ``rule(task_losses, state, gramian) -> (weights, new_state)`` or
      ``(weights, new_state, accepted)``; ``gramian`` is None for
      :attr:`Needs.LOSSES`.
    requires_positive_losses: whether the rule divides by, or takes the log
      of, the losses: a zero or negative loss is then rejected like a
      non-finite one.
    num_samples: 1 (a deprecated :attr:`Needs.GRADIENTS` weighting may give
      more: see :attr:`GradientRule.num_samples`).
    per_task: whether a bad loss excludes only its own task (False: it
      rejects the whole step). A per-task rule is called as
      ``rule(task_losses, state, gramian, valid=valid)`` with ``valid``
      (bool[T]) the tasks whose loss is usable (finite, and positive where
      ``requires_positive_losses``); the loss of an excluded task is
      replaced by 1.0. The rule must update only the valid tasks'
      statistics; the guard applies an excluded task's previous weight and
      counts it in the state's ``num_rejected_losses`` (int32[T], from
      ``common_state_fields(..., per_task=True)``). Only
      :attr:`Needs.LOSSES` and :attr:`Needs.GRAMIAN` weightings may declare
      it.
    gramian_degree: for :attr:`Needs.GRAMIAN`, the degree ``p`` such that
      the rule's weights for ``c G`` are ``c^p`` times its weights for ``G``
      and its new state is the same, for every ``c > 0`` (0: scale-free
      weights, as MGDA's or PCGrad's; -½: weights like ``1/‖g_k‖``); the
      rule must not read ``state.weights`` unless ``p`` is 0. When given,
      the rule is handed ``G / 4^e``, the Gramian of the gradients divided
      by a power of two ``2^e`` (their largest entry in ``[½, 1)``, an
      exact rescaling), and its weights are multiplied by ``2^{2ep}``
      (exactly when ``2p`` is an integer): gradients far outside the range
      of float32's products (1e-20, whose Gramian 1e-40 would be flushed to
      zero; 1e20) give the same direction. None: the rule sees ``G``
      itself. (Gramians of the low-memory, per-layer and representation
      modes are not rescaled: ``e = 0`` there.)
  """

  num_tasks: int
  needs: Needs
  init: Callable[[], Any]
  rule: WeightRule
  requires_positive_losses: bool
  num_samples: int = 1
  per_task: bool = False
  gramian_degree: Optional[float] = None


class GradientRule(NamedTuple):
  """A strategy's rule over the per-task gradients: they → the update.

  For the methods that act on the gradients themselves (GradDrop, MoCo,
  trimmed mean, ...) rather than on task weights. Turn one into an optax
  transformation with :func:`optax_mtl.as_gradient_transformation`; both
  faces hand the rule the per-task gradients (a pytree like the params with
  a leading task axis; with shared parameters declared, the shared
  parameters' only) and apply the update it returns. The guard around it is
  the weightings' one: a non-finite loss (or a non-positive one where
  ``requires_positive_losses``), gradient, update or state, or
  ``accepted`` false, keeps the previous state, gives a zero update and
  counts the step in ``num_skipped``; a task whose gradient is not finite
  is excluded (a zero gradient for the rule) and counted in
  ``num_rejected_gradients`` where the state has that field.

  Attributes:
    num_tasks: the number of tasks T.
    init: ``init(params) -> state``, a NamedTuple with at least the fields
      of :func:`common_state_fields`; it may hold per-task statistics shaped
      like ``params`` (then declare ``state_like_params``).
    rule: ``rule(task_losses, state, task_grads) -> (update, new_state)`` or
      ``(update, new_state, accepted)`` (``accepted`` bool[], as for a
      :class:`Weighting`).
    requires_positive_losses: as for a :class:`Weighting`.
    num_samples: the number of independent minibatches the rule reads per
      step (double sampling: MoDo, SDMGrad). Above 1 the rule receives the
      per-task gradients of each minibatch, leaves ``[num_samples, T,
      ...]``, and the mean of their losses; the training-step face then
      reads the parameters' gradients only (no ``encoder_fn``).
    state_like_params: whether the state holds statistics shaped like the
      params (MoCo's tracked gradients): the state then fits only the
      gradients of those params, so ``init`` needs them (not None) and the
      training-step face refuses ``encoder_fn`` (the representation's
      gradients have another shape) when the step is built.
    name: the strategy's name, for the messages that refuse an option.

  Examples:
    >>> from typing import NamedTuple
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax_mtl
    >>> class MaxState(NamedTuple):
    ...   weights: jnp.ndarray  # f32[T], unused here.
    ...   num_skipped: jnp.ndarray  # i32[], rejected steps.
    >>> def init(params):
    ...   return MaxState(**optax_mtl.common_state_fields(2))
    >>> def rule(task_losses, state, task_grads):  # The coordinate-wise max.
    ...   return jax.tree.map(lambda g: jnp.max(g, axis=0), task_grads), state
    >>> strategy = optax_mtl.as_gradient_transformation(
    ...     optax_mtl.GradientRule(num_tasks=2, init=init, rule=rule))
    >>> update, _ = strategy.update(jnp.array([[1.0, -2.0], [0.0, 3.0]]),
    ...                             strategy.init(None))
    >>> update.tolist()
    [1.0, 3.0]
  """

  num_tasks: int
  init: Callable[[Any], Any]
  rule: UpdateRule
  requires_positive_losses: bool = False
  num_samples: int = 1
  state_like_params: bool = False
  name: Optional[str] = None

  @property
  def needs(self) -> Needs:
    """What the rule reads: always :attr:`Needs.GRADIENTS`."""
    return Needs.GRADIENTS

  @property
  def per_task(self) -> bool:
    """False: a bad loss rejects the whole step."""
    return False

  @property
  def title(self) -> str:
    """The strategy's name for a message (``name``, or a description)."""
    return self.name or "this strategy (a GradientRule)"


class MultiTaskStrategy(optax.GradientTransformationExtraArgs):
  """An ``optax.GradientTransformationExtraArgs`` built from a weighting.

  ``init(params)`` and ``update(task_grads, state, params=None, *,
  task_losses, **extra_args)`` form the optax face. The ``update`` callable
  carries the weighting and the options that
  :func:`optax_mtl.value_and_grad` reads to run the training-step face, so
  the strategy survives ``_replace(init=...)``, pytree round trips and use as
  a static argument of ``jax.jit``.
  """


# --------------------------------------------------------------------------
# Validation helpers, used by every factory.
# --------------------------------------------------------------------------


def check_num_tasks(num_tasks: Any) -> int:
  return check_positive_int("num_tasks", num_tasks)


def _is_python_number(value: Any) -> bool:
  return (isinstance(value, (int, float, np.integer, np.floating))
          and not isinstance(value, (bool, np.bool_)))


def check_in_range(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> Any:
  """Checks a real hyperparameter: finite and in an interval; returns it.

  Python and NumPy numbers are checked and returned as Python floats. A
  scalar JAX or NumPy array (``optax.inject_hyperparams``, a schedule) is
  returned unchanged: it is checked when its value is known (outside
  ``jit``) and passes through when it is traced.
  """
  if _is_python_number(value):
    number = float(value)
  elif isinstance(value, jax.core.Tracer):
    _check_real_scalar_array(name, value)
    return value
  elif isinstance(value, (jax.Array, np.ndarray)):
    _check_real_scalar_array(name, value)
    number = float(value)
  else:
    raise ValueError(f"{name} must be a real number, got {value!r}.")
  if math.isinf(number):
    raise ValueError(f"{name} must be finite, got {number!r}.")
  bad = math.isnan(number)
  if low is not None:
    bad |= number < low if low_inclusive else number <= low
  if high is not None:
    bad |= number > high if high_inclusive else number >= high
  if bad:
    interval = _interval_text(low, high, low_inclusive, high_inclusive)
    raise ValueError(f"{name} must lie in {interval}, got {number!r}.")
  return number if _is_python_number(value) else value


def _interval_text(low, high, low_inclusive, high_inclusive) -> str:
  left = "[" if low_inclusive and low is not None else "("
  right = "]" if high_inclusive and high is not None else ")"
  return (f"{left}{'-inf' if low is None else low}, "
          f"{'inf' if high is None else high}{right}")


def _holds_tracer(value: Any) -> bool:
  if isinstance(value, jax.core.Tracer):
    return True
  return isinstance(value, (list, tuple)) and any(
      _holds_tracer(item) for item in value)


def check_task_vector(
    name: str,
    value: Any,
    num_tasks: int,
    low: float | None = None,
    high: float | None = None,
    *,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    allow_scalar: bool = True,
) -> Any:
  """Checks a hyperparameter given as a number or T numbers; returns [T].

  The one check of every option that takes "a number or one number per
  task" (``leak``, ``weights``, ``preference``, ``min_losses``, ...). A
  number is broadcast to the T tasks. Python and NumPy numbers, sequences
  and arrays are checked (real, finite in float32, in the interval) and
  returned as a float32 NumPy array. A traced value
  (``optax.inject_hyperparams`` under ``jit``) is checked for its shape and
  dtype only and returned as a float32 JAX array. Strings, bytes, bools and
  None are rejected, also inside a sequence.

  Args:
    name: the argument's name, for the error message.
    value: the value received.
    num_tasks: T.
    low: the lower bound, or None.
    high: the upper bound, or None.
    low_inclusive: whether ``low`` itself is allowed.
    high_inclusive: whether ``high`` itself is allowed.
    allow_scalar: whether one number for every task is accepted.

  Returns:
    f32[T], a NumPy array (or a JAX array for a traced value).

  Raises:
    ValueError: naming ``name`` and the value received.

  Examples:
    >>> from optax_mtl._src import base
    >>> base.check_task_vector("leak", 0.5, 3, 0.0, 1.0).tolist()
    [0.5, 0.5, 0.5]
  """
  what = (f"a number or {num_tasks} numbers" if allow_scalar
          else f"{num_tasks} numbers")
  if low is not None or high is not None:
    what += " in " + _interval_text(low, high, low_inclusive, high_inclusive)

  def fail(detail=""):
    raise ValueError(f"{name} must be {what}, got {detail}{value!r}.")

  if value is None or isinstance(value, (str, bytes, bool, np.bool_)):
    fail()
  if _holds_tracer(value):
    array = jnp.asarray(value)
    if not (jnp.issubdtype(array.dtype, jnp.floating)
            or jnp.issubdtype(array.dtype, jnp.integer)):
      fail(f"dtype {array.dtype}: ")
    if array.shape == () and allow_scalar:
      array = jnp.broadcast_to(array, (num_tasks,))
    if array.shape != (num_tasks,):
      fail(f"shape {array.shape}: ")
    return array.astype(jnp.float32)
  try:
    array = np.asarray(value)
  except (TypeError, ValueError):
    fail()
  if array.dtype.kind not in "iuf":
    fail(f"dtype {array.dtype}: ")
  if array.shape == () and allow_scalar:
    array = np.full((num_tasks,), array)
  if array.shape != (num_tasks,):
    fail(f"shape {array.shape}: ")
  with np.errstate(over="ignore", invalid="ignore"):
    values = array.astype(np.float64)
    values32 = values.astype(np.float32)
  if not np.all(np.isfinite(values32)):
    raise ValueError(f"{name} must be finite (in float32), got {value!r}.")
  bad = np.zeros(values.shape, bool)
  if low is not None:
    bad |= values < low if low_inclusive else values <= low
  if high is not None:
    bad |= values > high if high_inclusive else values >= high
  if np.any(bad):
    fail()
  return values32


def _check_real_scalar_array(name: str, value: Any) -> None:
  if jnp.shape(value) != () or not (
      jnp.issubdtype(value.dtype, jnp.floating)
      or jnp.issubdtype(value.dtype, jnp.integer)):
    raise ValueError(
        f"{name} must be a real number or a real scalar array, got "
        f"{value!r}.")


def check_positive_int(name: str, value: Any, *, allow_none: bool = False):
  """Checks an integer >= 1 (Python or NumPy); returns it as a Python int.

  A concrete integer scalar array is read as its value: that is how
  ``optax.inject_hyperparams`` passes every number it was given (e.g.
  ``inject_hyperparams(optax_mtl.loss_ema)(num_tasks=3, beta=0.1)``). Inside
  ``jit`` that array is traced and has no value: the error says to declare
  the argument static.
  """
  if value is None and allow_none:
    return None
  if isinstance(value, jax.core.Tracer):
    raise ValueError(
        f"{name} must be a concrete integer, got a traced array {value!r}: "
        "optax.inject_hyperparams turns every number into a hyperparameter "
        "that is traced inside jit; pass "
        f"optax.inject_hyperparams(factory, static_args=({name!r},)).")
  if (isinstance(value, (jax.Array, np.ndarray)) and value.ndim == 0
      and jnp.issubdtype(value.dtype, jnp.integer)):
    value = int(value)
  if (isinstance(value, (bool, np.bool_))
      or not isinstance(value, (int, np.integer)) or value < 1):
    raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
  return int(value)


def check_bool(name: str, value: Any) -> bool:
  """Checks a flag: a Python or NumPy bool (not a string, not a number)."""
  if not isinstance(value, (bool, np.bool_)):
    raise ValueError(f"{name} must be True or False, got {value!r}.")
  return bool(value)


def check_seed(name: str, value: Any) -> int:
  """Checks a seed: an integer in [-2**63, 2**64)."""
  if (isinstance(value, (bool, np.bool_))
      or not isinstance(value, (int, np.integer))
      or not -2**63 <= int(value) < 2**64):
    raise ValueError(
        f"{name} must be an integer in [-2**63, 2**64), got {value!r}.")
  return int(value)


# The generator of every strategy that draws random numbers: jax.random's
# Threefry, named so that a stream does not depend on the
# jax_default_prng_impl setting. Its key is kept in the state as raw
# uint32[2] data (plain arrays: checkpoints and np.asarray handle them).
PRNG_IMPL = "threefry2x32"


def key_data_from_seed(name: str, seed: Any) -> np.ndarray:
  """The raw data (uint32[2]) of the Threefry key of a 64-bit seed.

  Checks ``seed`` (an integer in [-2**63, 2**64), Python or NumPy) and
  returns the data of the key ``jax.random.key(seed)`` gives with 64-bit
  integers enabled, whether or not they are enabled (with them off,
  ``jax.random.key`` keeps only the low 32 bits of a seed).
  """
  seed = check_seed(name, seed) % 2**64
  return np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32)


def split_key(key_data: chex.Array) -> tuple[chex.Array, chex.Array]:
  """``(next key data, a typed key to draw from)``: one ``jax.random.split``."""
  key, draw_key = jax.random.split(
      jax.random.wrap_key_data(key_data, impl=PRNG_IMPL))
  return jax.random.key_data(key), draw_key


def check_solver_options(max_iters: Any, tol: Any) -> tuple[int, float | None]:
  """Checks a solver's ``max_iters`` (>= 1) and ``tol`` (>= 0 or None)."""
  max_iters = check_positive_int("max_iters", max_iters)
  if tol is not None:
    tol = check_in_range("tol", tol, 0.0)
  return max_iters, tol


def check_task_losses(task_losses: Any, num_tasks: int) -> jax.Array:
  """Returns the losses as an array of shape (T,); raises on a bad shape."""
  if isinstance(task_losses, dict):
    raise ValueError(
        f"task_losses must be an array of shape ({num_tasks},) (one loss per "
        f"task), got a dict with keys {sorted(map(str, task_losses))}: stack "
        "the losses in a fixed order, e.g. "
        "jnp.stack([losses[name] for name in TASK_NAMES]).")
  if isinstance(task_losses, (list, tuple)):
    task_losses = jnp.stack([jnp.asarray(loss) for loss in task_losses])
  shape = jnp.shape(task_losses)
  if shape != (num_tasks,):
    raise ValueError(
        f"task_losses must have shape ({num_tasks},) (one loss per task), "
        f"got shape {shape}.")
  return jnp.asarray(task_losses)


# --------------------------------------------------------------------------
# The conventional state fields, shared by every strategy's init.
# --------------------------------------------------------------------------


def common_state_fields(
    num_tasks: int,
    initial_weights: Union[float, chex.Array] = 1.0,
    *,
    gramian: bool = False,
    solver: bool = False,
    per_task: bool = False,
    gradients: bool = False,
) -> dict[str, jax.Array]:
  """The initial values of the conventional state fields, as a dict.

  Used as ``SomeState(**common_state_fields(num_tasks, ...), own_field=...)``.

  Args:
    num_tasks: T.
    initial_weights: a scalar or a float32[T] array, the initial ``weights``.
    gramian: also return ``gradient_cosines`` (the identity), for strategies
      that read the Gramian.
    solver: also return ``solver_iterations`` (0), ``solver_gap`` (0.0),
      ``solver_converged`` (True) and ``solver_outcome`` (0,
      ``Outcome.SUCCESS``), for strategies with an iterative solver.
    per_task: also return ``num_rejected_losses`` (int32[T], zeros), for
      weightings that exclude a bad loss per task (``Weighting.per_task``).
    gradients: also return ``num_rejected_gradients`` (int32[T], zeros), for
      strategies that read the per-task gradients (:attr:`Needs.GRAMIAN`,
      a :class:`GradientRule`): the guard counts there each task excluded
      for a non-finite gradient.

  Returns:
    ``weights`` f32[T] and ``num_skipped`` i32[] (0), plus the optional fields.

  Examples:
    >>> import optax_mtl
    >>> sorted(optax_mtl.common_state_fields(2, gramian=True))
    ['gradient_cosines', 'num_skipped', 'weights']
  """
  fields = dict(
      weights=jnp.full((num_tasks,), initial_weights, jnp.float32),
      num_skipped=jnp.zeros([], jnp.int32))
  if gramian:
    fields.update(gradient_cosines=jnp.eye(num_tasks, dtype=jnp.float32))
  if solver:
    fields.update(
        solver_iterations=jnp.zeros([], jnp.int32),
        solver_gap=jnp.zeros([], jnp.float32),
        solver_converged=jnp.asarray(True),
        solver_outcome=jnp.zeros([], jnp.int32))
  if per_task:
    fields.update(num_rejected_losses=jnp.zeros((num_tasks,), jnp.int32))
  if gradients:
    fields.update(
        num_rejected_gradients=jnp.zeros((num_tasks,), jnp.int32))
  return fields
