"""Step time and peak memory of every strategy, as ratios to baselines.

Model: a shared ReLU MLP trunk with T linear regression heads (squared
error), at T = 2, 10, 40. For each strategy we time the training step
``optax_mtl.value_and_grad(loss_fn, strategy)`` (plus a plain SGD update)
and divide by a baseline timed in the same round:

* loss-only strategies: ÷ the ``equal`` step through ``optax_mtl`` and
  ÷ a plain ``jax.value_and_grad`` of the summed losses;
* Gramian strategies: ÷ the *Jacobian-only* step, which computes the full
  per-task Jacobian by ``vmap`` of the VJP over the T unit cotangents and
  sums it over tasks (a dot with a vector of ones, the fastest sum on
  XLA:CPU): what every Gramian strategy has to pay at least.

Method: every step runs inside one jitted ``lax.fori_loop`` of n steps (n is
a runtime argument, so no recompilation), after a warm-up call; each round
times the baseline and the strategy back to back, and the reported ratio is
the median over rounds of the per-round ratios, so that slow drifts of a
shared machine cancel. Peak memory is the compiled executable's
``memory_analysis()``: temp + argument + output bytes (deterministic on
CPU), also for ``gramian_mode="low_memory"``.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import optax_mtl

from benchmarks import strategies as strategies_lib
from benchmarks.problems import _common

DEFAULT_NUM_TASKS = (2, 10, 40)
CONFIG = dict(input_dim=64, hidden=256, depth=2, batch_size=256,
              target_seconds=0.05, rounds=9, learning_rate=1e-4)


def num_units(names: Sequence[str], num_tasks: Sequence[int]) -> int:
  """Progress units of :func:`run_speed` (one per strategy and T)."""
  return len(names) * len(num_tasks)


def make_model(num_tasks: int, config: Optional[dict] = None):
  """``(params, loss_fn, batch)`` of the speed model with T heads."""
  cfg = dict(CONFIG, **(config or {}))
  key = jax.random.key(0)
  trunk_key, head_key, x_key, y_key = jax.random.split(key, 4)
  sizes = [cfg["input_dim"]] + [cfg["hidden"]] * cfg["depth"]
  params = {"trunk": _common.init_mlp(trunk_key, sizes),
            "heads": _common.init_heads(head_key, num_tasks, cfg["hidden"], 1)}
  inputs = jax.random.normal(x_key, (cfg["batch_size"], cfg["input_dim"]))
  targets = jax.random.normal(y_key, (cfg["batch_size"], num_tasks))

  def loss_fn(params, batch):
    x, y = batch
    out = _common.apply_heads(params["heads"],
                              _common.apply_mlp(params["trunk"], x))[..., 0]
    return jnp.mean((out - y) ** 2, axis=0) + 0.1  # stays > 0

  return params, loss_fn, (inputs, targets)


def _loop(step: Callable, learning_rate: float):
  """jit of ``n`` steps ``(params, state) -> (params, state)``; n traced."""

  def run(params, state, batch, n):
    def body(_, carry):
      params, state = carry
      grads, state = step(params, state, batch)
      params = jax.tree.map(lambda p, g: p - learning_rate * g, params, grads)
      return params, state

    return jax.lax.fori_loop(0, n, body, (params, state))

  return jax.jit(run)


def _compiled(step, learning_rate, params, state, batch):
  compiled = _loop(step, learning_rate).lower(
      params, state, batch, jnp.asarray(1, jnp.int32)).compile()
  return compiled


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


def _paired_ratio(baseline, candidate, n_base, n_cand, rounds):
  """Median over rounds of (candidate step time / baseline step time)."""
  ratios, base_times, cand_times = [], [], []
  for _ in range(rounds):
    t_base = _time_once(*baseline, n_base) / n_base
    t_cand = _time_once(*candidate, n_cand) / n_cand
    ratios.append(t_cand / t_base)
    base_times.append(t_base)
    cand_times.append(t_cand)
  return (float(np.median(ratios)), float(np.median(base_times)),
          float(np.median(cand_times)))


def _steps_for(compiled, args, target_seconds) -> int:
  _time_once(compiled, args, 1)  # warm-up
  single = _time_once(compiled, args, 1)
  return int(np.clip(target_seconds / max(single, 1e-6), 1, 2000))


def run_speed(
    names: Sequence[str],
    num_tasks: Sequence[int] = DEFAULT_NUM_TASKS,
    config: Optional[dict] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> dict[str, Any]:
  """Times every strategy against its baseline; returns a JSON-able dict.

  Returns:
    ``{"config", "num_tasks", "baselines": {T: {...}}, "strategies":
    {name: {T: {"kind", "ratio_equal", "ratio_plain" | "ratio_jacobian",
    "step_ms", "memory_bytes", "memory_ratio", "memory_low_memory_bytes"}}}}``
    (T as a string key).
  """
  cfg = dict(CONFIG, **(config or {}))
  progress = progress or (lambda label: None)
  lr, rounds = cfg["learning_rate"], cfg["rounds"]
  out: dict[str, Any] = {"config": cfg, "num_tasks": list(num_tasks),
                         "baselines": {}, "strategies": {}}
  for t in num_tasks:
    params, loss_fn, batch = make_model(t, cfg)

    def plain_step(params, state, batch):
      _, grads = jax.value_and_grad(lambda p: jnp.sum(loss_fn(p, batch)))(
          params)
      return grads, state

    def by_hand_step(params, state, batch):
      # Loss weighting written by hand (log_loss: w = 1/L, data-dependent):
      # the cost any weights computed from this step's losses carry, with
      # no optax_mtl code in the step.
      task_losses, vjp_fn = jax.vjp(lambda p: loss_fn(p, batch), params)
      return vjp_fn(1.0 / jax.lax.stop_gradient(task_losses))[0], state

    def jacobian_step(params, state, batch):
      task_losses, vjp_fn = jax.vjp(lambda p: loss_fn(p, batch), params)
      jacobian = jax.vmap(vjp_fn)(jnp.eye(t, dtype=task_losses.dtype))[0]
      # A dot with ones, not jnp.sum(j, axis=0): on XLA:CPU the reduction
      # over the leading axis is about 2x slower than the dot (measured).
      ones = jnp.ones((t,), task_losses.dtype)
      return jax.tree.map(lambda j: jnp.tensordot(ones, j, axes=1),
                          jacobian), state

    def strategy_step(strategy, mode="jacobian"):
      value_and_grad = optax_mtl.value_and_grad(loss_fn, strategy,
                                                gramian_mode=mode)

      def step(params, state, batch):
        (_, grads), state = value_and_grad(params, state, batch)
        return grads, state

      return step

    baselines = {}
    equal = strategies_lib.make("equal", t)
    for key, step, state in (
        ("plain", plain_step, ()),
        ("by_hand", by_hand_step, ()),
        ("jacobian", jacobian_step, ()),
        ("equal", strategy_step(equal), equal.init(params))):
      compiled = _compiled(step, lr, params, state, batch)
      args = (compiled, (params, state, batch))
      baselines[key] = {"args": args,
                        "n": _steps_for(*args, cfg["target_seconds"]),
                        "memory": memory_bytes(compiled),
                        "flops": flops(compiled)}
    out["baselines"][str(t)] = {
        key: {"memory_bytes": b["memory"], "flops": b["flops"]}
        for key, b in baselines.items()}

    for name in names:
      entry: dict[str, Any] = {}
      try:
        strategy = strategies_lib.make(name, t)
        state = strategy.init(params)
        gramian = strategies_lib.needs_gramian(strategy)
        compiled = _compiled(strategy_step(strategy), lr, params, state, batch)
        args = (compiled, (params, state, batch))
        n = _steps_for(*args, cfg["target_seconds"])
        entry["kind"] = "gramian" if gramian else "losses"
        entry["memory_bytes"] = memory_bytes(compiled)
        if gramian:
          base = baselines["jacobian"]
          ratio, base_s, step_s = _paired_ratio(
              (base["args"][0], base["args"][1]), args, base["n"], n, rounds)
          entry.update(ratio_jacobian=ratio, baseline_ms=base_s * 1e3,
                       step_ms=step_s * 1e3)
          low = _compiled(strategy_step(strategy, "low_memory"), lr, params,
                          state, batch)
          entry["memory_low_memory_bytes"] = memory_bytes(low)
        else:
          base = baselines["equal"]
          ratio, base_s, step_s = _paired_ratio(
              base["args"], args, base["n"], n, rounds)
          plain = baselines["plain"]
          ratio_plain, plain_s, _ = _paired_ratio(
              plain["args"], args, plain["n"], n, rounds)
          by_hand = baselines["by_hand"]
          ratio_by_hand, _, _ = _paired_ratio(
              by_hand["args"], args, by_hand["n"], n, rounds)
          entry.update(ratio_equal=ratio, ratio_plain=ratio_plain,
                       ratio_by_hand=ratio_by_hand,
                       baseline_ms=base_s * 1e3, plain_ms=plain_s * 1e3,
                       step_ms=step_s * 1e3)
        reference_flops = baselines["jacobian" if gramian else "plain"][
            "flops"]
        step_flops = flops(compiled)
        if reference_flops and step_flops:
          entry["flops_ratio"] = step_flops / reference_flops
        reference = baselines["jacobian" if gramian else "plain"]["memory"]
        if reference and entry["memory_bytes"]:
          entry["memory_ratio"] = entry["memory_bytes"] / reference
      except Exception as error:  # pylint: disable=broad-except
        entry["error"] = f"{type(error).__name__}: {error}"[:300]
      out["strategies"].setdefault(name, {})[str(t)] = entry
      progress(f"speed T={t}/{name}")
  return out
