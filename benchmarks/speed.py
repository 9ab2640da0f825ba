"""Step time and peak memory of every strategy, as ratios to baselines.

Model: a shared ReLU MLP trunk with T linear regression heads (squared
error), at T = 2, 10, 40, with a new minibatch at every step (a pool of 8,
cycled). For each strategy we time the training step
``optax_mtl.value_and_grad(loss_fn, strategy)`` (plus a plain SGD update)
and divide by a baseline timed in the same round:

* loss-only strategies: ÷ the ``equal`` step through ``optax_mtl`` and
  ÷ a plain ``jax.value_and_grad`` of the summed losses;
* Gramian strategies: ÷ the *Jacobian-only* step, which computes the full
  per-task Jacobian by ``vmap`` of the VJP over the T unit cotangents and
  sums it over tasks (a dot with a vector of ones, the fastest sum on
  XLA:CPU): what every Gramian strategy has to pay at least.

Method: every step runs inside one jitted ``lax.fori_loop`` of n steps (n is
a runtime argument, so no recompilation) that keeps the losses it saw, as a
training step that logs them does; timings start after a few warm-up steps,
from the state they reached (a step in training, not the first one, whose
solvers have no previous solution to start from). For each T, every
baseline and every strategy is compiled and warmed up, then all are timed
in turn, ``rounds`` times over (interleaved, so that a slow spell of the
shared machine hits all alike). A ratio is the fastest step of the
candidate ÷ the fastest step of the baseline: noise only ever adds time, so
the minimum over rounds is the estimate of a step's own cost.
``ratio_median`` (the median of the per-round ratios) is kept as a second
estimator, and the plain step compiled twice gives the run's noise floor
(``baselines[T]["noise"]``). Peak memory is the compiled executable's
``memory_analysis()``: temp + argument + output bytes (deterministic on
CPU), also for ``gramian_mode="low_memory"``.
"""

from __future__ import annotations

import time
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import optax_mtl

from benchmarks import strategies as strategies_lib
from benchmarks.problems import _common

DEFAULT_NUM_TASKS = (2, 10, 40)
CONFIG = dict(input_dim=64, hidden=256, depth=2, batch_size=256, num_batches=8,
              target_seconds=0.1, rounds=15, learning_rate=1e-4)


def num_units(names: Sequence[str], num_tasks: Sequence[int]) -> int:
  """Progress units of :func:`run_speed` (one per strategy and T)."""
  return len(names) * len(num_tasks)


def make_model(num_tasks: int, config: Optional[dict] = None):
  """``(params, loss_fn, batches)`` of the speed model with T heads.

  ``batches`` holds ``num_batches`` minibatches on a leading axis; the timed
  loop takes a different one at every step, as training does, so that the
  losses and the Gramian change from step to step (what a warm-started
  solver sees in practice).
  """
  cfg = dict(CONFIG, **(config or {}))
  key = jax.random.key(0)
  trunk_key, head_key, x_key, y_key = jax.random.split(key, 4)
  sizes = [cfg["input_dim"]] + [cfg["hidden"]] * cfg["depth"]
  params = {"trunk": _common.init_mlp(trunk_key, sizes),
            "heads": _common.init_heads(head_key, num_tasks, cfg["hidden"], 1)}
  inputs = jax.random.normal(
      x_key, (cfg["num_batches"], cfg["batch_size"], cfg["input_dim"]))
  targets = jax.random.normal(
      y_key, (cfg["num_batches"], cfg["batch_size"], num_tasks))

  def loss_fn(params, batch):
    x, y = batch
    out = _common.apply_heads(params["heads"],
                              _common.apply_mlp(params["trunk"], x))[..., 0]
    return jnp.mean((out - y) ** 2, axis=0) + 0.1  # stays > 0

  return params, loss_fn, (inputs, targets)


def _loop(step: Callable, learning_rate: float):
  """jit of ``n`` steps ``(params, state) -> (params, state, logged)``.

  ``step(params, state, batch) -> (task_losses, grads, state)``; step i
  takes minibatch ``i mod num_batches`` of ``batches``. The loop keeps the
  sum of the losses it saw, as a training step that logs its losses does:
  otherwise XLA drops the forward's loss reduction from the
  plain baseline (its value unused) but not from a strategy (whose weights
  read it), and the comparison would not be like for like. ``n`` is traced.
  """

  def run(params, state, batches, n):
    num_batches = jax.tree.leaves(batches)[0].shape[0]

    def body(index, carry):
      params, state, logged = carry
      batch = jax.tree.map(lambda b: b[index % num_batches], batches)
      task_losses, grads, state = step(params, state, batch)
      params = jax.tree.map(lambda p, g: p - learning_rate * g, params, grads)
      return params, state, logged + jnp.sum(task_losses)

    return jax.lax.fori_loop(0, n, body,
                             (params, state, jnp.zeros((), jnp.float32)))

  return jax.jit(run)


def memory_bytes(compiled) -> Optional[int]:
  """temp + argument + output bytes of a compiled executable (or None)."""
  try:
    analysis = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if analysis is None:
    return None
  return int(analysis.temp_size_in_bytes + analysis.argument_size_in_bytes
             + analysis.output_size_in_bytes)


def flops(compiled) -> Optional[float]:
  """XLA's count of floating-point operations of one step (or None).

  Deterministic, unlike a timing: it shows what a step computes (one
  backward pass, a Jacobian, a Gramian) without the machine's noise.
  """
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(analysis, (list, tuple)):  # Older jax: one dict per device.
    analysis = analysis[0] if analysis else None
  if not analysis or "flops" not in analysis:
    return None
  return float(analysis["flops"])


def _time_once(compiled, args, n) -> float:
  start = time.perf_counter()
  jax.block_until_ready(compiled(*args, jnp.asarray(n, jnp.int32)))
  return time.perf_counter() - start


class _Timed(NamedTuple):
  """A compiled loop, its arguments and the steps per timing."""

  compiled: Any
  args: tuple
  steps: int


_WARM_UP_STEPS = 5


def _compile(step, learning_rate, params, state, batches):
  return _loop(step, learning_rate).lower(
      params, state, batches, jnp.asarray(1, jnp.int32)).compile()


def _timed(step, learning_rate, params, state, batches, target_seconds):
  compiled = _compile(step, learning_rate, params, state, batches)
  # Warm-up, and the timings start from a state in training (a strategy's
  # first step may differ: a solver without a warm start, a first EMA).
  params, state, _ = compiled(params, state, batches,
                              jnp.asarray(_WARM_UP_STEPS, jnp.int32))
  args = (params, state, batches)
  single = min(_time_once(compiled, args, 1) for _ in range(3))
  steps = int(np.clip(target_seconds / max(single, 1e-6), 1, 2000))
  return _Timed(compiled, args, steps)


def _interleaved_step_times(timed: dict[str, _Timed],
                            rounds: int) -> dict[str, np.ndarray]:
  """Seconds per step of every loop, ``rounds`` times, taken in turn.

  Every round times every loop once, one after the other, so that a slow
  spell of a shared machine hits all of them alike.
  """
  times = {key: [] for key in timed}
  for _ in range(rounds):
    for key, entry in timed.items():
      times[key].append(
          _time_once(entry.compiled, entry.args, entry.steps) / entry.steps)
  return {key: np.asarray(value) for key, value in times.items()}


def _ratio(times, candidate: str, baseline: str) -> float:
  """Fastest step of ``candidate`` ÷ fastest step of ``baseline``.

  On a shared machine noise only ever adds time, so the fastest of many
  interleaved rounds is the best estimate of a step's own cost.
  """
  return float(np.min(times[candidate]) / np.min(times[baseline]))


def _median_ratio(times, candidate: str, baseline: str) -> float:
  """Median over rounds of the per-round ratio (the second estimator)."""
  return float(np.median(times[candidate] / times[baseline]))


def run_speed(
    names: Sequence[str],
    num_tasks: Sequence[int] = DEFAULT_NUM_TASKS,
    config: Optional[dict] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> dict[str, Any]:
  """Times every strategy against its baselines; returns a JSON-able dict.

  For each T, every baseline and every strategy is compiled first, then all
  are timed in ``rounds`` interleaved rounds (:func:`_ratio`).

  Returns:
    ``{"config", "num_tasks", "baselines": {T: {name: {"memory_bytes",
    "flops", "step_ms"}, "noise": plain_again ÷ plain}}, "strategies":
    {name: {T: {"kind", "ratio_equal", "ratio_plain", "ratio_by_hand" |
    "ratio_jacobian", "ratio_median", "flops_ratio", "step_ms",
    "memory_bytes", "memory_ratio", "memory_low_memory_bytes"}}}}``
    (T as a string key).
  """
  cfg = dict(CONFIG, **(config or {}))
  progress = progress or (lambda label: None)
  lr, rounds, target = (cfg["learning_rate"], cfg["rounds"],
                        cfg["target_seconds"])
  out: dict[str, Any] = {"config": cfg, "num_tasks": list(num_tasks),
                         "baselines": {}, "strategies": {}}
  for t in num_tasks:
    params, loss_fn, batches = make_model(t, cfg)

    def plain_step(params, state, batch):
      loss, grads = jax.value_and_grad(lambda p: jnp.sum(loss_fn(p, batch)))(
          params)
      return loss, grads, state

    def by_hand_step(params, state, batch):
      # Loss weighting written by hand (log_loss: w = 1/L, data-dependent):
      # the cost any weights computed from this step's losses carry, with
      # no optax_mtl code in the step.
      task_losses, vjp_fn = jax.vjp(lambda p: loss_fn(p, batch), params)
      grads = vjp_fn(1.0 / jax.lax.stop_gradient(task_losses))[0]
      return task_losses, grads, state

    def jacobian_step(params, state, batch):
      task_losses, vjp_fn = jax.vjp(lambda p: loss_fn(p, batch), params)
      jacobian = jax.vmap(vjp_fn)(jnp.eye(t, dtype=task_losses.dtype))[0]
      # A dot with ones, not jnp.sum(j, axis=0): on XLA:CPU the reduction
      # over the leading axis is about 2x slower than the dot (measured).
      ones = jnp.ones((t,), task_losses.dtype)
      return task_losses, jax.tree.map(
          lambda j: jnp.tensordot(ones, j, axes=1), jacobian), state

    def strategy_step(strategy, mode="jacobian"):
      value_and_grad = optax_mtl.value_and_grad(loss_fn, strategy,
                                                gramian_mode=mode)

      def step(params, state, batch):
        (task_losses, grads), state = value_and_grad(params, state, batch)
        return task_losses, grads, state

      return step

    equal = strategies_lib.make("equal", t)
    timed = {
        # plain_again is plain compiled a second time: its ratio to plain is
        # this run's noise floor.
        key: _timed(step, lr, params, state, batches, target)
        for key, step, state in (
            ("plain", plain_step, ()), ("plain_again", plain_step, ()),
            ("by_hand", by_hand_step, ()), ("jacobian", jacobian_step, ()),
            ("equal", strategy_step(equal), equal.init(params)))}
    baseline_keys = tuple(timed)
    entries: dict[str, dict[str, Any]] = {}
    for name in names:
      entry: dict[str, Any] = {}
      entries[name] = entry
      try:
        strategy = strategies_lib.make(name, t)
        state = strategy.init(params)
        gramian = strategies_lib.needs_gramian(strategy)
        entry["kind"] = "gramian" if gramian else "losses"
        timed[name] = _timed(strategy_step(strategy), lr, params, state,
                             batches, target)
        if gramian:
          low = _compile(strategy_step(strategy, "low_memory"), lr, params,
                         state, batches)
          entry["memory_low_memory_bytes"] = memory_bytes(low)
      except Exception as error:  # pylint: disable=broad-except
        entry["error"] = f"{type(error).__name__}: {error}"[:300]

    times = _interleaved_step_times(timed, rounds)
    out["baselines"][str(t)] = {
        key: {"memory_bytes": memory_bytes(timed[key].compiled),
              "flops": flops(timed[key].compiled),
              "step_ms": float(np.min(times[key])) * 1e3}
        for key in baseline_keys}
    out["baselines"][str(t)]["noise"] = _ratio(times, "plain_again", "plain")
    for name, entry in entries.items():
      if "error" not in entry:
        gramian = entry["kind"] == "gramian"
        reference = "jacobian" if gramian else "plain"
        compiled = timed[name].compiled
        entry["step_ms"] = float(np.min(times[name])) * 1e3
        entry["ratio_median"] = _median_ratio(times, name, reference)
        if gramian:
          entry["ratio_jacobian"] = _ratio(times, name, "jacobian")
        else:
          entry.update(ratio_equal=_ratio(times, name, "equal"),
                       ratio_plain=_ratio(times, name, "plain"),
                       ratio_by_hand=_ratio(times, name, "by_hand"))
        entry["memory_bytes"] = memory_bytes(compiled)
        reference_flops = out["baselines"][str(t)][reference]["flops"]
        step_flops = flops(compiled)
        if reference_flops and step_flops:
          entry["flops_ratio"] = step_flops / reference_flops
        reference_memory = out["baselines"][str(t)][reference]["memory_bytes"]
        if reference_memory and entry["memory_bytes"]:
          entry["memory_ratio"] = entry["memory_bytes"] / reference_memory
      out["strategies"].setdefault(name, {})[str(t)] = entry
      progress(f"speed T={t}/{name}")
  return out
