"""The protocol: single-task baselines, every strategy, several seeds.

``run_problem(problem, strategies, seeds)`` trains

* the T single-task models (same architecture and budget, each trained on
  its own task's loss only) in one vectorised run: ``vmap`` over tasks and
  seeds of one jitted ``lax.scan`` training loop;
* the multi-task model under every strategy, ``vmap`` over seeds, through
  ``optax_mtl.value_and_grad(loss_fn, strategy)`` and ``optax.adam``;

then scores every model on the test set and summarises per task and per
strategy (mean score, Δm%, negative transfer; see ``optax_mtl.metrics``).
The result is a plain dict that ``json.dump`` accepts.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_mtl
from optax_mtl import metrics as mtl_metrics

from benchmarks import problems as problems_lib
from benchmarks import strategies as strategies_lib

MAX_CURVE_POINTS = 200
_PREDICT_CACHE: dict = {}


def seed_list(seeds: Union[int, Sequence[int]]) -> list[int]:
  if isinstance(seeds, int):
    return list(range(seeds))
  return [int(s) for s in seeds]


def _subsample(num_steps: int) -> np.ndarray:
  stride = max(1, num_steps // MAX_CURVE_POINTS)
  return np.arange(0, num_steps, stride)


def _training_loop(problem, step_fn, init_state_fn):
  """``run(params, batch_indices[steps, B], train_data, *static) -> (params,
  losses[steps, T], weights[steps, T], num_skipped)``; no randomness inside,
  so that the compiled loop stays small."""
  optimizer = optax.adam(problem.learning_rate)

  def run(params, batch_indices, train_data, *static):
    state = init_state_fn(params, *static)
    opt_state = optimizer.init(params)

    def body(carry, indices):
      params, state, opt_state = carry
      batch = jax.tree.map(lambda a: a[indices], train_data)
      (task_losses, grads), state, weights = step_fn(params, state, batch,
                                                     *static)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
      return (params, state, opt_state), (task_losses, weights)

    (params, state, _), (task_losses, weights) = jax.lax.scan(
        body, (params, state, opt_state), batch_indices)
    num_skipped = getattr(state, "num_skipped", jnp.zeros([], jnp.int32))
    return params, task_losses, weights, num_skipped

  return run


def initial_params_and_batches(problem: problems_lib.Problem,
                               seeds: Sequence[int], num_steps: int):
  """Per-seed initial params (stacked) and minibatch indices
  ``int32[num_seeds, steps, batch_size]``, drawn outside the training loop
  (the same for every strategy and for the single-task models)."""
  key = (id(problem), "init")
  if key not in _PREDICT_CACHE:
    _PREDICT_CACHE[key] = (problem, jax.jit(jax.vmap(problem.init_params)))
  init = _PREDICT_CACHE[key][1]
  params = init(jnp.stack([jax.random.key(s) for s in seeds]))
  num_train = jax.tree.leaves(problem.train_data)[0].shape[0]
  indices = np.stack([
      np.random.default_rng([s, 12345]).integers(
          0, num_train, (num_steps, problem.batch_size))
      for s in seeds]).astype(np.int32)
  return params, indices


def train_multitask(problem: problems_lib.Problem, strategy: Any,
                    seeds: Sequence[int], num_steps: Optional[int] = None):
  """Trains the multi-task model under ``strategy``, one run per seed.

  Returns:
    ``(params, task_losses, weights, num_skipped)``: params with a leading
    seed axis, losses and weights ``[num_seeds, steps, T]`` and the
    strategy's rejected-step count per seed, as NumPy arrays.
  """
  num_steps = num_steps or problem.num_steps
  value_and_grad = optax_mtl.value_and_grad(problem.loss_fn, strategy)

  def step_fn(params, state, batch):
    (task_losses, grads), state = value_and_grad(params, state, batch)
    return (task_losses, grads), state, state.weights

  run = _training_loop(problem, step_fn, lambda p: strategy.init(p))
  params, indices = initial_params_and_batches(problem, seeds, num_steps)
  run_all = jax.jit(jax.vmap(run, in_axes=(0, 0, None)))
  params, task_losses, weights, skipped = run_all(params, indices,
                                                  problem.train_data)
  return (params, np.asarray(task_losses), np.asarray(weights),
          np.asarray(skipped))


def train_single_task(problem: problems_lib.Problem, seeds: Sequence[int],
                      num_steps: Optional[int] = None):
  """Trains T single-task models per seed in one run (vmap tasks × seeds).

  Model t has the full architecture, the seed's initialisation and batches,
  and is trained with Adam on task t's loss only. Returns params with
  leading axes ``[T, num_seeds]`` and the losses ``[T, seeds, steps, T]``.
  """
  num_steps = num_steps or problem.num_steps
  num_tasks = problem.num_tasks

  def step_fn(params, state, batch, task_index):
    def task_loss(p):
      task_losses = problem.loss_fn(p, batch)
      return task_losses[task_index], task_losses

    (_, task_losses), grads = jax.value_and_grad(task_loss, has_aux=True)(
        params)
    weights = jax.nn.one_hot(task_index, num_tasks)
    return (task_losses, grads), state, weights

  run = _training_loop(problem, step_fn, lambda p, t: ())
  params, indices = initial_params_and_batches(problem, seeds, num_steps)

  def per_task(task_index, params, indices, data):
    return jax.vmap(run, in_axes=(0, 0, None, None))(params, indices, data,
                                                      task_index)

  params, task_losses, _, _ = jax.jit(
      jax.vmap(per_task, in_axes=(0, None, None, None)))(
          jnp.arange(num_tasks), params, indices, problem.train_data)
  return params, np.asarray(task_losses)


def score_models(problem: problems_lib.Problem, params: Any,
                 single_task: bool = False) -> dict[str, np.ndarray]:
  """Test scores ``{metric: [num_seeds, T]}`` of seed-stacked models.

  With ``single_task`` the params have leading axes ``[T, num_seeds]`` and
  task t is scored on model t.
  """
  key = (id(problem), single_task)
  if key not in _PREDICT_CACHE:  # one compilation per problem, not per model
    predict = jax.vmap(problem.predict, in_axes=(0, None))
    if single_task:
      predict = jax.vmap(predict, in_axes=(0, None))
    _PREDICT_CACHE[key] = (problem, jax.jit(predict))
  predict = _PREDICT_CACHE[key][1]
  predictions = [np.asarray(p) for p in predict(params, problem.test_inputs)]
  num_tasks = problem.num_tasks
  num_seeds = (predictions[0].shape[1] if single_task
               else predictions[0].shape[0])
  scores = {m: np.full((num_seeds, num_tasks), np.nan)
            for m in problem.metric_names}
  for task in range(num_tasks):
    for seed in range(num_seeds):
      prediction = (predictions[task][task, seed] if single_task
                    else predictions[task][seed])
      for metric, value in problem.score_task(task, prediction).items():
        scores[metric][seed, task] = value
  return scores


def _summary(scores: dict[str, np.ndarray],
             stl_scores: Optional[dict[str, np.ndarray]],
             problem: problems_lib.Problem) -> dict[str, Any]:
  """Per-task and aggregate statistics of one model type."""
  out: dict[str, Any] = {"per_task": {}}
  for metric, higher in zip(problem.metric_names, problem.higher_is_better):
    values = scores[metric]
    mean, std = mtl_metrics.mean_and_std(values)
    out["per_task"][metric] = {"mean": mean.tolist(), "std": std.tolist(),
                               "per_seed": values.tolist()}
  primary = problem.metric_names[0]
  higher = problem.higher_is_better[0]
  per_seed_mean = np.nanmean(scores[primary], axis=1)
  mean, std = mtl_metrics.mean_and_std(per_seed_mean)
  out["mean_score"] = {"mean": float(mean), "std": float(std)}
  if stl_scores is not None:
    baseline = np.mean(stl_scores[primary], axis=0)
    delta = mtl_metrics.delta_m(scores[primary], baseline, higher)
    mean, std = mtl_metrics.mean_and_std(delta)
    out["delta_m"] = {"mean": float(mean), "std": float(std),
                      "per_seed": delta.tolist()}
    mask = mtl_metrics.negative_transfer_mask(
        scores[primary], stl_scores[primary], higher)
    out["negative_transfer"] = int(mask.sum())
    out["negative_transfer_tasks"] = [
        problem.task_names[k] for k in np.nonzero(mask)[0]]
  return out


def run_problem(
    problem: Union[str, problems_lib.Problem],
    strategies: Optional[Sequence[str]] = None,
    seeds: Union[int, Sequence[int]] = 3,
    suite: str = "quick",
    data_dir: Optional[str] = None,
    num_steps: Optional[int] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> dict[str, Any]:
  """Runs the protocol on one problem; returns a JSON-able result dict.

  Args:
    problem: a :class:`benchmarks.problems.Problem` or a problem name.
    strategies: names of ``optax_mtl`` strategies (default: every strategy of
      ``benchmarks.strategies.STRATEGIES`` that optax_mtl provides).
    seeds: the number of seeds (0, 1, …) or a list of seeds.
    suite: "quick" or "full" (used when ``problem`` is a name).
    data_dir: folder of real data sets (used when ``problem`` is a name).
    num_steps: overrides the problem's number of training steps.
    progress: called with a short label after every trained model.

  Returns:
    ``{"problem", "tasks", "metrics", "higher_is_better", "seeds",
    "single_task", "strategies": {name: {..., "weights", "losses",
    "train_seconds"}}, "ranking"}``.
  """
  if isinstance(problem, str):
    problem = problems_lib.make(problem, suite=suite, data_dir=data_dir)
  seeds = seed_list(seeds)
  names = strategies_lib.available(strategies)
  progress = progress or (lambda label: None)
  if "run" in problem.extra:  # A problem with its own protocol (the toy).
    return problem.extra["run"](problem, names, seeds, num_steps, progress)
  steps = num_steps or problem.num_steps
  curve_index = _subsample(steps)
  result: dict[str, Any] = {
      "problem": problem.name,
      "description": problem.description,
      "tasks": list(problem.task_names),
      "metrics": list(problem.metric_names),
      "higher_is_better": list(problem.higher_is_better),
      "seeds": seeds,
      "num_steps": steps,
      "curve_steps": curve_index.tolist(),
      "strategies": {},
  }
  stl_scores = None
  if problem.single_task_baseline:
    start = time.perf_counter()
    params, losses = train_single_task(problem, seeds, steps)
    stl_scores = score_models(problem, params, single_task=True)
    result["single_task"] = _summary(stl_scores, None, problem)
    result["single_task"]["train_seconds"] = time.perf_counter() - start
    progress(f"{problem.name}/single-task")
  for name in names:
    start = time.perf_counter()
    strategy = strategies_lib.make(name, problem.num_tasks)
    params, losses, weights, skipped = train_multitask(problem, strategy,
                                                       seeds, steps)
    scores = score_models(problem, params)
    summary = _summary(scores, stl_scores, problem)
    summary["train_seconds"] = time.perf_counter() - start
    summary["gramian"] = strategies_lib.needs_gramian(strategy)
    summary["weights"] = np.mean(weights[:, curve_index], axis=0).tolist()
    summary["losses"] = np.mean(losses[:, curve_index], axis=0).tolist()
    summary["skipped_steps"] = skipped.tolist()
    summary["final_train_losses"] = np.mean(losses[:, -1], axis=0).tolist()
    summary["nonfinite_params"] = int(sum(
        int(np.sum(~np.isfinite(np.asarray(leaf))))
        for leaf in jax.tree.leaves(params)))
    result["strategies"][name] = summary
    progress(f"{problem.name}/{name}")
  result["ranking"] = rank(result)
  return result


def rank(result: dict[str, Any]) -> list[str]:
  """Strategies best first: by Δm% if there is a baseline, else mean score."""
  strategies = result["strategies"]
  higher = result["higher_is_better"][0]

  def key(name):
    summary = strategies[name]
    if "delta_m" in summary:
      value = summary["delta_m"]["mean"]
    else:
      value = summary["mean_score"]["mean"]
      value = value if higher else -value
    return -value if np.isfinite(value) else np.inf

  return sorted(strategies, key=key)
