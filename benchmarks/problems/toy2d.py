"""``toy2d``: the two-objective 2-D toy of CAGrad and Nash-MTL.

Liu et al. (NeurIPS 2021, CAGrad) define, for ``x = (x1, x2)``,

    f1 = c1(x2)·g1(x) + c2(x2)·h1(x),   f2 = c1(x2)·g2(x) + c2(x2)·h2(x),
    g1 = log(max(|0.5(−x1 − 7) − tanh(−x2)|, 5e−6)) + 6,
    g2 = log(max(|0.5(−x1 + 3) + tanh(−x2) + 2|, 5e−6)) + 6,
    h1 = ((−x1 + 7)² + 0.1(−x2 − 8)²)/10 − 20,
    h2 = ((−x1 − 7)² + 0.1(−x2 − 8)²)/10 − 20,
    c1 = max(tanh(x2/2), 0),   c2 = max(tanh(−x2/2), 0).

Navon et al. (ICML 2022, Nash-MTL) scale the first objective by 0.1 to make
the losses imbalanced and start from (−8.5, 7.5), (0, 0), (9, 9),
(−7.5, −0.5), (9, −1) with Adam (learning rate 1e-3); that is the default
here. The Pareto set is close to the segment x2 ≈ −8.36, x1 ∈ [−7, 7].

Protocol: the "model" is the point x itself; every strategy runs from every
starting point (vmap over starts); a run *reaches the Pareto set* when its
final point is not ε-dominated by any point of a dense grid over
[−10, 10]²: no grid point improves both objectives by more than ε_i = 1 %
of the range of f_i over the grid's Pareto set. The report draws each
strategy's trajectories over the contours of f1 + f2. There are no
single-task models.

The objectives are negative in part of the plane, and a strategy that divides
by the losses (the EMA family, DWA, LBTW, the normalisations, uncertainty,
GradNorm) rejects non-positive losses. The training losses are therefore
shifted up: ``f1 + 21·scale`` and ``f2 + 21`` (each unscaled objective is
at least −20: ``c1`` and ``c2`` are never both positive, ``h ≥ −20`` and
``g ≥ log 5e−6 + 6 ≈ −6.2``). A shift leaves the gradients, the trajectories
of gradient-based strategies and the Pareto set unchanged; it is what makes
the loss-based strategies meaningful here, and it is an assumption of this
benchmark (the papers run gradient-balancing methods only).
"""

from __future__ import annotations

import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_mtl

from benchmarks import strategies as strategies_lib
from benchmarks.problems import Problem
from benchmarks.problems import suite_configs

LOWER = 5e-6
STARTS = ((-8.5, 7.5), (0.0, 0.0), (9.0, 9.0), (-7.5, -0.5), (9.0, -1.0))
_QUICK = dict(num_steps=20000, learning_rate=1e-3, scale=0.1,
              grid_size=301)
CONFIGS = suite_configs(
    _QUICK, num_steps=40000, grid_size=401,
    paper=dict(num_steps=100000, learning_rate=1e-3, scale=0.1,
               grid_size=801))
MAX_TRAJECTORY_POINTS = 400
# The training losses are the objectives shifted by this (× scale for f1),
# so that they are positive on the whole plane (see the module docstring).
LOSS_OFFSET = 21.0


def objectives(x, scale: float = 0.1):
  """``[f1, f2]`` at ``x = (x1, x2)`` (leading axes allowed: ``x[..., 2]``)."""
  x1, x2 = x[..., 0], x[..., 1]
  g1 = jnp.log(jnp.maximum(jnp.abs(0.5 * (-x1 - 7) - jnp.tanh(-x2)),
                           LOWER)) + 6
  g2 = jnp.log(jnp.maximum(jnp.abs(0.5 * (-x1 + 3) + jnp.tanh(-x2) + 2),
                           LOWER)) + 6
  h1 = ((-x1 + 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
  h2 = ((-x1 - 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
  c1 = jnp.maximum(jnp.tanh(x2 * 0.5), 0)
  c2 = jnp.maximum(jnp.tanh(-x2 * 0.5), 0)
  f1 = (g1 * c1 + h1 * c2) * scale
  f2 = g2 * c1 + h2 * c2
  return jnp.stack([f1, f2], axis=-1)


def training_losses(x, scale: float = 0.1):
  """The objectives shifted to be positive everywhere (same gradients)."""
  return objectives(x, scale) + LOSS_OFFSET * jnp.array([scale, 1.0])


def pareto_reference(scale: float, grid_size: int):
  """The grid's nondominated points (x and f) and the tolerances ε."""
  axis = np.linspace(-10.0, 10.0, grid_size)
  grid = np.stack(np.meshgrid(axis, axis, indexing="xy"), -1).reshape(-1, 2)
  values = np.asarray(objectives(jnp.asarray(grid), scale), np.float64)
  order = np.lexsort((values[:, 1], values[:, 0]))  # by f1, then f2
  best_f2 = np.minimum.accumulate(values[order, 1])
  keep = np.r_[True, values[order[1:], 1] < best_f2[:-1]]
  front = order[keep]
  front_values = values[front]
  tolerance = 0.01 * (front_values.max(0) - front_values.min(0))
  return grid[front], front_values, tolerance


def reaches_pareto(final_values, front_values, tolerance) -> np.ndarray:
  """bool per point: not ε-dominated by any point of the reference front."""
  final_values = np.atleast_2d(final_values)
  dominated = np.all(front_values[None, :, :]
                     < final_values[:, None, :] - tolerance, axis=-1)
  return ~np.any(dominated, axis=1)


def _toy_program(strategies, steps, stride, scale, learning_rate):
  """One compiled program for strategies that read as many minibatches:
  ``run(starts[S, 2], index) -> (final, paths, weights, num_skipped)``."""
  # pylint: disable=import-outside-toplevel
  from benchmarks import runner
  loss_fn = lambda x, batch: training_losses(x, scale)
  optimizer = optax.adam(learning_rate)
  step_fn, init_fn, skipped_fn = runner.switch_step(loss_fn, strategies)
  # No data: a strategy that samples several minibatches (MoDo, SDMGrad)
  # gets as many empty ones, and its estimates coincide.
  samples = optax_mtl.weighting_of(strategies[0]).num_samples
  batch = None if samples == 1 else jnp.zeros((samples, 0))

  def run(x0, index):
    states, opt_state = init_fn(x0, index), optimizer.init(x0)

    def body(carry, _):
      x, states, opt_state = carry
      (_, grads), states, weights = step_fn(x, states, batch, index)
      updates, opt_state = optimizer.update(grads, opt_state, x)
      return (optax.apply_updates(x, updates), states, opt_state), (
          x, weights)

    (x, states, _), (path, weights) = jax.lax.scan(
        body, (x0, states, opt_state), None, length=steps)
    return x, path[::stride], weights[::stride], skipped_fn(states, index)

  return jax.jit(jax.vmap(run, in_axes=(0, None)))


def _toy_entry(outputs, scale, front_x, front_values, tolerance, steps,
               stride):
  """The result entry of one strategy's runs from every start."""
  final, paths, weights, skipped = outputs
  final = np.asarray(final, np.float64)
  final_values = np.asarray(objectives(jnp.asarray(final), scale))
  reached = reaches_pareto(final_values, front_values, tolerance)
  distance = np.min(np.linalg.norm(
      final[:, None, :] - front_x[None], axis=-1), axis=1)
  return {
      "reached": reached.tolist(),
      "mean_score": {"mean": float(np.mean(reached)), "std": 0.0},
      "final_points": final.tolist(),
      "final_losses": final_values.tolist(),
      "distance_to_pareto_set": distance.tolist(),
      "skipped_steps": np.asarray(skipped).tolist(),
      "trajectories": np.asarray(paths).tolist(),
      "weights": np.mean(np.asarray(weights), 0).tolist(),
      "curve_steps": list(range(0, steps, stride)),
  }


def _run(problem, names, seeds, num_steps, progress, into=None):
  """Every strategy from every start; the strategies of one kind share one
  compiled program (``benchmarks.runner.plan_groups``)."""
  # pylint: disable=import-outside-toplevel
  from benchmarks import runner
  del seeds  # The starting points play the role of the seeds.
  cfg = problem.extra["config"]
  steps = num_steps or problem.num_steps
  scale = cfg["scale"]
  front_x, front_values, tolerance = pareto_reference(scale, cfg["grid_size"])
  starts = jnp.asarray(STARTS, jnp.float32)
  stride = max(1, steps // MAX_TRAJECTORY_POINTS)
  result = {} if into is None else into
  result.update({
      "problem": problem.name, "description": problem.description,
      "tasks": list(problem.task_names), "metrics": ["pareto_reached"],
      "higher_is_better": [True], "seeds": [], "num_steps": steps,
      "starts": [list(s) for s in STARTS],
      "pareto_set": front_x.tolist(), "pareto_front": front_values.tolist(),
      "tolerance": tolerance.tolist(), "scale": scale, "strategies": {},
      "curve_steps": list(range(0, steps, stride)),
  })
  built = {name: strategies_lib.make(name, 2) for name in names}
  groups = runner.plan_groups({n: runner.kind_of(s)
                              for n, s in built.items()})

  def lower(members):
    return lambda: _toy_program(
        [built[n] for n in members], steps, stride, scale,
        problem.learning_rate).lower(starts, jnp.int32(0))

  compiled = [(program, seconds) for _, program, seconds in
              runner.in_parallel(
                  runner.trace_and_compile,
                  [lower(members) for _, members in groups],
                  lambda i, _: progress(f"toy2d/compile {groups[i][0]} "
                                        f"({len(groups[i][1])})"))]
  runs = [(g, k, name) for g, (_, members) in enumerate(groups)
          for k, name in enumerate(members)]

  def train(run):
    g, k, _ = run
    start = time.perf_counter()
    outputs = jax.block_until_ready(compiled[g][0](starts, jnp.int32(k)))
    return outputs, compiled[g][1] / len(groups[g][1]) + (
        time.perf_counter() - start)

  def finished(i, out):
    name = runs[i][2]
    entry = _toy_entry(out[0], scale, front_x, front_values, tolerance,
                       steps, stride)
    entry["gramian"] = strategies_lib.reads_task_gradients(built[name])
    entry["train_seconds"] = out[1]
    result["strategies"][name] = entry
    progress(f"{problem.name}/{name}")

  runner.in_parallel(train, runs, finished, threads=runner.TRAIN_THREADS)
  result["strategies"] = {n: result["strategies"][n] for n in names}
  result["ranking"] = toy_ranking(result)
  return result


def toy_ranking(result) -> list[str]:
  """Most starts reaching the Pareto set first, then nearest to it."""
  return sorted(
      result["strategies"],
      key=lambda n: (-result["strategies"][n]["mean_score"]["mean"],
                     float(np.mean(
                         result["strategies"][n]["distance_to_pareto_set"]))))


def make(suite: str = "quick", data_dir: Optional[str] = None,
         **overrides) -> Problem:
  del data_dir
  cfg = dict(CONFIGS[suite], **overrides)
  scale = cfg["scale"]

  def unused(*args):
    raise NotImplementedError("toy2d has its own protocol (extra['run']).")

  return Problem(
      name="toy2d", task_names=("f1", "f2"), metric_names=("pareto_reached",),
      higher_is_better=(True,),
      init_params=lambda key: jnp.asarray(STARTS[0], jnp.float32),
      loss_fn=lambda x, batch: training_losses(x, scale),
      train_data=None, test_inputs=None,
      predict=unused, score_task=unused,
      num_steps=cfg["num_steps"], learning_rate=cfg["learning_rate"],
      single_task_baseline=False,
      description=(
          "CAGrad/Nash-MTL two-objective toy (f1 scaled by "
          f"{scale}); Adam {cfg['learning_rate']}, {cfg['num_steps']} steps "
          f"from {len(STARTS)} starting points. Score: the fraction of "
          "starts whose final point reaches the Pareto set (not ε-dominated "
          "by a dense grid, ε = 1 % of each objective's range on the "
          "front)."),
      extra={"config": cfg, "run": _run})
