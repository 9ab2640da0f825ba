"""The protocol: single-task baselines, every strategy, several seeds.

``run_problem(problem, strategies, seeds)`` trains

* the T single-task models (same architecture and budget, each trained on
  its own task's loss only) in one vectorised run: ``vmap`` over tasks and
  seeds of one jitted training loop;
* the multi-task model under every strategy, ``vmap`` over seeds, through
  ``optax_mtl.value_and_grad(loss_fn, strategy)`` and ``optax.adam``;

every model under the same model selection (:data:`PROTOCOL`: a held-out
validation split, the best validation checkpoint, early stopping), so that
no comparison rests on an under-trained or over-fitted baseline. It then
scores every selected model on the test set and summarises per task and per
strategy (mean score, Δm%, negative transfer; see ``optax_mtl.metrics``).
The result is a plain dict that ``json.dump`` accepts.
"""

from __future__ import annotations

import functools
import os
import time
from concurrent import futures
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_mtl
from optax_mtl import metrics as mtl_metrics

from benchmarks import problems as problems_lib
from benchmarks import strategies as strategies_lib

_PREDICT_CACHE: dict = {}

# Model selection, the same for every model (single-task and multi-task):
# the last `validation_fraction` of the training rows are held out; every
# `eval_every` steps (default: num_steps // 100) the model's validation
# criterion is computed, the checkpoint with the best criterion is kept (an
# improvement must be by more than the fraction `min_delta`), and training
# stops after `patience` evaluations without improvement or at num_steps.
# The criterion is the mean, over the tasks the model is trained on, of the
# validation loss divided by its value at initialisation (scale free, so
# that a task with large losses does not decide alone; for a single-task
# model it is its own task's validation loss).
PROTOCOL = dict(validation_fraction=0.2, eval_every=None, patience=15,
                min_delta=1e-3)


def seed_list(seeds: Union[int, Sequence[int]]) -> list[int]:
  if isinstance(seeds, int):
    return list(range(seeds))
  return [int(s) for s in seeds]


def protocol_settings(num_steps: int, **overrides) -> dict[str, Any]:
  """The model-selection settings for one run (see :data:`PROTOCOL`).

  Raises:
    TypeError: a setting that :data:`PROTOCOL` does not have.
  """
  unknown = sorted(set(overrides) - set(PROTOCOL))
  if unknown:
    raise TypeError(f"unknown protocol settings {unknown}; known: "
                    f"{', '.join(PROTOCOL)}.")
  settings = dict(PROTOCOL, **overrides)
  if settings["eval_every"] is None:
    settings["eval_every"] = max(1, num_steps // 100)
  settings["num_steps"] = num_steps
  settings["num_evals"] = max(1, num_steps // settings["eval_every"])
  return settings


def split_validation(problem: problems_lib.Problem,
                     fraction: float) -> tuple[Any, Any]:
  """``(train, validation)``: the last ``fraction`` of the training rows
  are held out for model selection."""
  num_rows = jax.tree.leaves(problem.train_data)[0].shape[0]
  num_val = int(round(fraction * num_rows))
  if not 0 < num_val < num_rows:
    raise ValueError(f"validation_fraction={fraction} leaves no training or "
                     f"no validation rows out of {num_rows}.")
  train = jax.tree.map(lambda a: a[:num_rows - num_val], problem.train_data)
  validation = jax.tree.map(lambda a: a[num_rows - num_val:],
                            problem.train_data)
  return train, validation


class _Carry(NamedTuple):
  params: Any
  state: Any
  opt_state: Any
  best_params: Any
  best_criterion: jax.Array   # f32[], the best validation criterion so far
  best_step: jax.Array        # i32[], the step of that checkpoint
  evals_since_best: jax.Array  # i32[]
  eval_index: jax.Array       # i32[], evaluations done
  losses: jax.Array           # f32[num_evals, T], mean training losses
  weights: jax.Array          # f32[num_evals, T], mean weights applied
  criterion: jax.Array        # f32[num_evals], validation criterion
  weight_max: jax.Array       # f32[T], the largest finite |weight| seen
  nonfinite_weights: jax.Array  # i32[], steps with a non-finite weight


def _minibatch(train_data, batch_indices, step_index, num_samples):
  """The minibatch of step ``step_index``. A strategy that reads
  ``num_samples`` > 1 minibatches a step (MoDo, SDMGrad) gets that one and
  the next steps' ones (wrapping around), stacked on a leading axis."""
  if num_samples == 1:
    return jax.tree.map(lambda a: a[batch_indices[step_index]], train_data)
  steps = (step_index + jnp.arange(num_samples)) % batch_indices.shape[0]
  return jax.tree.map(lambda a: a[batch_indices[steps]], train_data)


def _training_loop(problem, step_fn, init_state_fn, settings, num_samples=1,
                   skipped_fn=None):
  """``run(params, batch_indices[steps, B], train, validation, task_mask[T],
  *static) -> dict`` trains with Adam under the selection protocol.

  ``step_fn(params, state, batch, *static) -> ((task_losses, grads), state,
  weights)``; ``batch`` has a leading axis of ``num_samples`` when that is
  above 1 (:func:`_minibatch`). No randomness inside, so that the compiled
  loop stays small; the loop stops early (``lax.while_loop``) once
  ``patience`` evaluations brought no improvement.
  """
  optimizer = optax.adam(problem.learning_rate)
  eval_every, num_evals = settings["eval_every"], settings["num_evals"]
  patience, min_delta = settings["patience"], settings["min_delta"]
  num_tasks = problem.num_tasks

  def run(params, batch_indices, train_data, validation_data, task_mask,
          *static):
    task_mask = task_mask.astype(jnp.float32)
    initial_validation = jnp.abs(problem.loss_fn(params, validation_data))

    def criterion_of(params):
      ratio = problem.loss_fn(params, validation_data) / jnp.where(
          initial_validation > 0, initial_validation, 1.0)
      value = jnp.sum(task_mask * ratio) / jnp.sum(task_mask)
      return jnp.where(jnp.isfinite(value), value, jnp.inf)

    def train_steps(carry: _Carry):
      def one_step(i, inner):
        params, state, opt_state, loss_sum, weight_sum, weight_max, bad = inner
        batch = _minibatch(train_data, batch_indices,
                           carry.eval_index * eval_every + i, num_samples)
        (task_losses, grads), state, weights = step_fn(params, state, batch,
                                                       *static)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        finite = jnp.isfinite(weights)
        weight_max = jnp.maximum(weight_max,
                                 jnp.where(finite, jnp.abs(weights), 0.0))
        bad = bad + jnp.any(~finite).astype(jnp.int32)
        return (params, state, opt_state, loss_sum + task_losses,
                weight_sum + weights, weight_max, bad)

      zeros = jnp.zeros((num_tasks,), jnp.float32)
      params, state, opt_state, loss_sum, weight_sum, weight_max, bad = (
          jax.lax.fori_loop(0, eval_every, one_step,
                            (carry.params, carry.state, carry.opt_state,
                             zeros, zeros, carry.weight_max,
                             carry.nonfinite_weights)))
      value = criterion_of(params)
      improved = value < carry.best_criterion * (1.0 - min_delta)
      step = (carry.eval_index + 1) * eval_every
      index = carry.eval_index
      return _Carry(
          params=params, state=state, opt_state=opt_state,
          best_params=jax.tree.map(lambda new, old: jnp.where(improved, new,
                                                              old),
                                   params, carry.best_params),
          best_criterion=jnp.where(improved, value, carry.best_criterion),
          best_step=jnp.where(improved, step, carry.best_step),
          evals_since_best=jnp.where(improved, 0, carry.evals_since_best + 1),
          eval_index=index + 1,
          losses=carry.losses.at[index].set(loss_sum / eval_every),
          weights=carry.weights.at[index].set(weight_sum / eval_every),
          criterion=carry.criterion.at[index].set(value),
          weight_max=weight_max, nonfinite_weights=bad)

    def keep_going(carry: _Carry):
      return (carry.eval_index < num_evals) & (
          carry.evals_since_best < patience)

    nan_curve = jnp.full((num_evals, num_tasks), jnp.nan, jnp.float32)
    carry = _Carry(
        params=params, state=init_state_fn(params, *static),
        opt_state=optimizer.init(params), best_params=params,
        best_criterion=criterion_of(params),
        best_step=jnp.zeros((), jnp.int32),
        evals_since_best=jnp.zeros((), jnp.int32),
        eval_index=jnp.zeros((), jnp.int32), losses=nan_curve,
        weights=nan_curve, criterion=jnp.full((num_evals,), jnp.nan),
        weight_max=jnp.zeros((num_tasks,), jnp.float32),
        nonfinite_weights=jnp.zeros((), jnp.int32))
    carry = jax.lax.while_loop(keep_going, train_steps, carry)
    num_skipped = (jnp.zeros([], jnp.int32) if skipped_fn is None
                   else skipped_fn(carry.state, *static))
    return dict(
        params=carry.best_params, best_step=carry.best_step,
        steps_run=carry.eval_index * eval_every,
        stopped_early=carry.evals_since_best >= patience,
        losses=carry.losses, weights=carry.weights,
        criterion=carry.criterion, weight_max=carry.weight_max,
        nonfinite_weights=carry.nonfinite_weights, num_skipped=num_skipped)

  return run


def initial_params_and_batches(problem: problems_lib.Problem,
                               seeds: Sequence[int], num_steps: int,
                               num_train: int):
  """Per-seed initial params (stacked) and minibatch indices
  ``int32[num_seeds, steps, batch_size]`` into the first ``num_train`` rows,
  drawn outside the training loop (the same for every strategy and for the
  single-task models)."""
  key = (id(problem), "init")
  if key not in _PREDICT_CACHE:
    _PREDICT_CACHE[key] = (problem, jax.jit(jax.vmap(problem.init_params)))
  init = _PREDICT_CACHE[key][1]
  params = init(jnp.stack([jax.random.key(s) for s in seeds]))
  indices = np.stack([
      np.random.default_rng([s, 12345]).integers(
          0, num_train, (num_steps, problem.batch_size))
      for s in seeds]).astype(np.int32)
  return params, indices


# XLA compiles on one core; the runner compiles this many programs at once.
COMPILE_THREADS = max(1, min(2, len(os.sched_getaffinity(0))
                               if hasattr(os, "sched_getaffinity")
                               else os.cpu_count() or 1))
# Trained models: one at a time (see run_problem).
TRAIN_THREADS = 1


class Job(NamedTuple):
  """A training run, traced and ready to compile."""

  lowered: Any        # jax.stages.Lowered of the vmapped training loop
  args: tuple         # its arguments
  settings: dict      # protocol_settings


def in_parallel(fn: Callable, items: Sequence[Any],
                done: Optional[Callable[[int, Any], None]] = None,
                threads: Optional[int] = None) -> list:
  """``[fn(item)]``, ``threads`` (default COMPILE_THREADS) at a time;
  ``done(index, result)`` is called in this thread as each one finishes
  (for progress lines).

  On an interrupt the items not started are cancelled and the interrupt is
  raised at once (a compilation under way is left to finish in its thread).
  """
  threads = COMPILE_THREADS if threads is None else threads
  if threads == 1 or len(items) < 2:
    results = []
    for index, item in enumerate(items):
      results.append(fn(item))
      if done is not None:
        done(index, results[-1])
    return results
  pool = futures.ThreadPoolExecutor(threads)
  try:
    pending = {pool.submit(fn, item): index
               for index, item in enumerate(items)}
    results = [None] * len(items)
    for future in futures.as_completed(pending):
      index = pending[future]
      results[index] = future.result()
      if done is not None:
        done(index, results[index])
    return results
  finally:
    pool.shutdown(wait=False, cancel_futures=True)


def compile_jobs(jobs: Sequence[Job],
                 done: Optional[Callable[[int, Any], None]] = None
                 ) -> list[tuple[Any, float]]:
  """``[(compiled, seconds)]``, compiled COMPILE_THREADS at a time."""
  def compile_one(job):
    start = time.perf_counter()
    compiled = job.lowered.compile()
    return compiled, time.perf_counter() - start

  return in_parallel(compile_one, jobs, done)


def trace_and_compile(prepare: Callable[[], Any]) -> tuple[Any, Any, float]:
  """``(job, compiled, compile_seconds)`` of ``prepare()`` (a
  :class:`Job`, or anything with ``lowered``); run in a worker thread by
  :func:`in_parallel`, so that one program traces while another compiles."""
  job = prepare()
  lowered = getattr(job, "lowered", job)
  start = time.perf_counter()
  compiled = lowered.compile()
  return job, compiled, time.perf_counter() - start


def execute(job: Job, compiled: Any, compile_seconds: float,
            index: Optional[int] = None) -> dict:
  """Runs a compiled job; its outputs as NumPy (params stay as arrays).
  ``index`` selects the strategy of a shared program (its last argument)."""
  args = job.args
  if index is not None:
    args = args[:-1] + (jnp.asarray(index, jnp.int32),)
  start = time.perf_counter()
  outputs = jax.block_until_ready(compiled(*args))
  run_seconds = time.perf_counter() - start
  out = {key: (value if key == "params" else np.asarray(value))
         for key, value in outputs.items()}
  out.update(settings=job.settings, compile_seconds=compile_seconds,
             run_seconds=run_seconds)
  return out


def _run(job: Job) -> dict:
  ((compiled, seconds),) = compile_jobs([job])
  return execute(job, compiled, seconds)


def switch_step(loss_fn: Callable, strategies: Sequence[Any]):
  """One training step shared by several strategies: ``(step_fn, init_fn)``.

  ``step_fn(params, states, batch, index) -> ((task_losses, grads), states,
  weights)`` runs strategy ``index`` (a traced integer, so one compiled
  program serves them all) through ``optax_mtl.value_and_grad(loss_fn,
  strategy)`` with ``jax.lax.switch``; ``states`` is the tuple of every
  strategy's state, of which only the selected one changes.
  ``init_fn(params, index)`` builds that tuple. Under ``vmap`` over seeds
  the index stays unbatched, so the switch stays a branch, not a select.
  """
  value_and_grads = [optax_mtl.value_and_grad(loss_fn, strategy)
                     for strategy in strategies]

  def branch(k):
    def run(params, states, batch):
      (task_losses, grads), state = value_and_grads[k](params, states[k],
                                                       batch)
      states = states[:k] + (state,) + states[k + 1:]
      return ((task_losses, grads), states,
              state.weights.astype(jnp.float32))
    return run

  branches = [branch(k) for k in range(len(strategies))]

  def step_fn(params, states, batch, index):
    if len(branches) == 1:
      return branches[0](params, states, batch)
    return jax.lax.switch(index, branches, params, states, batch)

  def init_fn(params, index):
    del index
    return tuple(strategy.init(params) for strategy in strategies)

  def skipped_fn(states, index):
    counts = [getattr(state, "num_skipped", jnp.zeros([], jnp.int32))
              for state in states]
    return jnp.stack([jnp.asarray(c, jnp.int32) for c in counts])[index]

  return step_fn, init_fn, skipped_fn


def prepare_multitask(problem: problems_lib.Problem, strategy: Any,
                      seeds: Sequence[int], num_steps: Optional[int] = None,
                      **protocol) -> Job:
  """Traces the multi-task training run (see :func:`train_multitask`).

  ``strategy`` may be a list of strategies with the same
  ``num_samples``: the job is then one compiled program for all of them
  (:func:`switch_step`), and :func:`execute` runs the one at ``index``.
  """
  group = (list(strategy) if isinstance(strategy, list)
           else [strategy])
  samples = {optax_mtl.weighting_of(s).num_samples for s in group}
  if len(samples) != 1:
    raise ValueError(f"one program needs one num_samples, got {samples}.")
  settings = protocol_settings(num_steps or problem.num_steps, **protocol)
  train, validation = split_validation(problem,
                                       settings["validation_fraction"])
  step_fn, init_fn, skipped_fn = switch_step(problem.loss_fn, group)
  run = _training_loop(problem, step_fn, init_fn, settings, samples.pop(),
                       skipped_fn)
  num_train = jax.tree.leaves(train)[0].shape[0]
  params, indices = initial_params_and_batches(
      problem, seeds, settings["num_steps"], num_train)
  args = (params, indices, train, validation,
          jnp.ones((problem.num_tasks,), bool), jnp.zeros((), jnp.int32))
  run_all = jax.jit(jax.vmap(run, in_axes=(0, 0, None, None, None, None)))
  return Job(run_all.lower(*args), args, settings)


def train_multitask(problem: problems_lib.Problem, strategy: Any,
                    seeds: Sequence[int], num_steps: Optional[int] = None,
                    **protocol) -> dict:
  """Trains the multi-task model under ``strategy``, one run per seed.

  Returns:
    A dict of NumPy arrays with a leading seed axis: ``params`` (the
    selected checkpoint), ``best_step``, ``steps_run``, ``stopped_early``,
    ``losses`` and ``weights`` ``[seeds, num_evals, T]`` (means over each
    evaluation interval; NaN after a run stopped), ``criterion``,
    ``weight_max`` ``[seeds, T]``, ``nonfinite_weights``, ``num_skipped``;
    plus ``settings``, ``compile_seconds`` and ``run_seconds``.
  """
  return _run(prepare_multitask(problem, strategy, seeds, num_steps,
                                **protocol))


def prepare_single_task(problem: problems_lib.Problem, seeds: Sequence[int],
                        num_steps: Optional[int] = None, **protocol) -> Job:
  """Traces the single-task training run (see :func:`train_single_task`)."""
  settings = protocol_settings(num_steps or problem.num_steps, **protocol)
  train, validation = split_validation(problem,
                                       settings["validation_fraction"])
  num_tasks = problem.num_tasks

  def step_fn(params, state, batch, task_index):
    def task_loss(p):
      task_losses = problem.loss_fn(p, batch)
      return task_losses[task_index], task_losses

    (_, task_losses), grads = jax.value_and_grad(task_loss, has_aux=True)(
        params)
    weights = jax.nn.one_hot(task_index, num_tasks)
    return (task_losses, grads), state, weights

  run = _training_loop(problem, step_fn, lambda p, t: (), settings)
  num_train = jax.tree.leaves(train)[0].shape[0]
  params, indices = initial_params_and_batches(
      problem, seeds, settings["num_steps"], num_train)

  def per_task(task_index, params, indices, train, validation):
    return jax.vmap(run, in_axes=(0, 0, None, None, None, None))(
        params, indices, train, validation,
        jax.nn.one_hot(task_index, num_tasks) > 0, task_index)

  args = (jnp.arange(num_tasks), params, indices, train, validation)
  run_all = jax.jit(jax.vmap(per_task, in_axes=(0, None, None, None, None)))
  return Job(run_all.lower(*args), args, settings)


def train_single_task(problem: problems_lib.Problem, seeds: Sequence[int],
                      num_steps: Optional[int] = None, **protocol) -> dict:
  """Trains T single-task models per seed in one run (vmap tasks × seeds).

  Model t has the full architecture, the seed's initialisation and batches,
  is trained with Adam on task t's loss only, and is selected by the same
  protocol as the multi-task models (its criterion reads task t only).
  Returns the dict of :func:`train_multitask` with leading axes
  ``[T, num_seeds]``.
  """
  return _run(prepare_single_task(problem, seeds, num_steps, **protocol))


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


_SINGLE_TASK = "single-task"  # The job key of the single-task models.
LATE_FRACTION = 0.2  # "Late" = the last fifth of the training budget.
# A model whose last fifth brought more than 2 % of its whole reduction of
# the validation criterion is reported as still improving.
STILL_IMPROVING = 0.02


def late_gain(criterion: np.ndarray, stopped_early: np.ndarray) -> np.ndarray:
  """The share of a run's progress that came late in its budget.

  The criterion starts at 1 (it is relative to its initial value). For a run
  that used its whole budget: ``(b − l) / (1 − l)``, where ``b`` is the best
  criterion before the last fifth of the evaluations and ``l`` the best
  overall, i.e. the fraction of the whole reduction that the last fifth
  brought; 0 for a run that early stopping ended, or that never improved.
  Leading axes are kept: ``criterion[..., num_evals]`` (NaN after a run
  stopped), ``stopped_early[...]``.
  """
  num_evals = criterion.shape[-1]
  split = max(1, int(round((1.0 - LATE_FRACTION) * num_evals)))
  finite = np.where(np.isfinite(criterion), criterion, np.inf)
  before = np.min(finite[..., :split], axis=-1)
  best = np.minimum(before, np.min(finite[..., split:], axis=-1,
                                   initial=np.inf))
  with np.errstate(invalid="ignore", divide="ignore"):
    gain = np.where(np.isfinite(before) & (best < 1.0),
                    (before - best) / (1.0 - best), 0.0)
  return np.where(stopped_early, 0.0, np.clip(gain, 0.0, 1.0))


def _selection(out: dict) -> dict[str, Any]:
  """What model selection chose, per model (JSON-able), and the validation
  criterion at every evaluation (mean over seeds, NaN once all stopped)."""
  criterion = out["criterion"]
  with np.errstate(invalid="ignore"):
    counts = np.sum(np.isfinite(criterion), axis=-2)
    curve = np.where(counts > 0, np.nansum(criterion, axis=-2)
                     / np.maximum(counts, 1), np.nan)
  return {"best_step": out["best_step"].tolist(),
          "steps_run": out["steps_run"].tolist(),
          "stopped_early": out["stopped_early"].tolist(),
          "late_gain": late_gain(criterion, out["stopped_early"]).tolist(),
          "validation_curve": curve.tolist()}


def kind_of(strategy: Any) -> str:
  """The group a strategy's training program belongs to: ``"losses"``
  (loss-only), ``"gramian"`` (reads the per-task gradients) or
  ``"samples"`` (reads several minibatches a step: MoDo, SDMGrad)."""
  if optax_mtl.weighting_of(strategy).num_samples > 1:
    return "samples"
  return "gramian" if strategies_lib.reads_task_gradients(strategy) else (
      "losses")


def plan_groups(kinds: dict[str, str],
                num_threads: Optional[int] = None) -> list[tuple[str,
                                                                 list[str]]]:
  """``[(kind, names)]``: the strategies that share one compiled program.

  ``kinds`` maps a name to its :func:`kind_of`. One program per kind; the
  largest kind, the Gramian
  one, is cut into ``num_threads`` (default :data:`COMPILE_THREADS`)
  programs of equal size, so that they compile side by side.
  """
  num_threads = num_threads or COMPILE_THREADS
  by_kind: dict[str, list[str]] = {}
  for name, kind in kinds.items():
    by_kind.setdefault(kind, []).append(name)
  groups = []
  for kind in ("losses", "gramian", "samples"):
    names = by_kind.get(kind, [])
    pieces = num_threads if kind == "gramian" else 1
    pieces = max(1, min(pieces, len(names)))
    for k in range(pieces):
      part = names[k::pieces]
      if part:
        groups.append((kind, part))
  return groups


def _strategy_summary(problem, out, stl_scores, strategy, settings,
                      num_seeds) -> dict[str, Any]:
  """The JSON-able summary of one strategy's trained models."""
  scores = score_models(problem, out["params"])
  summary = _summary(scores, stl_scores, problem)
  summary["train_seconds"] = out["compile_seconds"] + out["run_seconds"]
  summary["compile_seconds"] = out["compile_seconds"]
  summary["run_seconds"] = out["run_seconds"]
  # Per training step of all seeds at once (vmapped), validation included.
  summary["step_ms"] = 1e3 * out["run_seconds"] / max(
      1, int(np.max(out["steps_run"])))
  summary["gramian"] = strategies_lib.reads_task_gradients(strategy)
  summary["selection"] = _selection(out)
  summary["weights"] = _nanmean(out["weights"]).tolist()
  summary["losses"] = _nanmean(out["losses"]).tolist()
  summary["skipped_steps"] = out["num_skipped"].tolist()
  summary["weight_max"] = np.max(out["weight_max"], axis=0).tolist()
  summary["nonfinite_weight_steps"] = out["nonfinite_weights"].tolist()
  last = np.maximum(out["steps_run"] // settings["eval_every"] - 1, 0)
  summary["final_train_losses"] = np.mean(
      out["losses"][np.arange(num_seeds), last], axis=0).tolist()
  summary["nonfinite_params"] = int(sum(
      int(np.sum(~np.isfinite(np.asarray(leaf))))
      for leaf in jax.tree.leaves(out["params"])))
  return summary


def _single_task_summary(problem, stl) -> tuple[dict, dict]:
  """``(scores, summary)`` of the single-task models."""
  stl_scores = score_models(problem, stl["params"], single_task=True)
  summary = _summary(stl_scores, None, problem)
  summary["train_seconds"] = stl["compile_seconds"] + stl["run_seconds"]
  summary["selection"] = _selection(stl)  # [T, seeds]
  gains = np.mean(np.asarray(summary["selection"]["late_gain"]), axis=1)
  summary["still_improving"] = {
      problem.task_names[k]: float(gains[k])
      for k in range(problem.num_tasks) if gains[k] > STILL_IMPROVING}
  return stl_scores, summary


def run_problem(
    problem: Union[str, problems_lib.Problem],
    strategies: Optional[Sequence[str]] = None,
    seeds: Union[int, Sequence[int]] = 3,
    suite: str = "quick",
    data_dir: Optional[str] = None,
    num_steps: Optional[int] = None,
    progress: Optional[Callable[[str], None]] = None,
    into: Optional[dict] = None,
    **protocol,
) -> dict[str, Any]:
  """Runs the protocol on one problem; returns a JSON-able result dict.

  The strategies of one kind share one compiled program
  (:func:`plan_groups`, :func:`switch_step`); programs compile two at a
  time, then models train one at a time (:data:`TRAIN_THREADS`).

  Args:
    problem: a :class:`benchmarks.problems.Problem` or a problem name.
    strategies: names of ``benchmarks.strategies.STRATEGIES`` (default: all
      of them); an unknown name raises ``ValueError``.
    seeds: the number of seeds (0, 1, …) or a list of seeds.
    suite: "quick", "full" or "paper" (used when ``problem`` is a name).
    data_dir: folder of real data sets (used when ``problem`` is a name).
    num_steps: overrides the problem's training budget (the most steps).
    progress: called with a short label after every compiled program and
      every trained model ("<problem>/compile <kind> (<n>)",
      "<problem>/single-task", "<problem>/<strategy>").
    into: a dict filled as the run goes (what an interrupted run leaves).
    **protocol: overrides of :data:`PROTOCOL` (``validation_fraction``,
      ``eval_every``, ``patience``).

  Returns:
    ``{"problem", "tasks", "metrics", "higher_is_better", "seeds",
    "protocol", "single_task", "strategies": {name: {..., "weights",
    "losses", "selection", "step_ms", "train_seconds"}}, "skipped":
    {name: why} (the strategies not defined at this T), "ranking"}``.
  """
  if isinstance(problem, str):
    problem = problems_lib.make(problem, suite=suite, data_dir=data_dir)
  seeds = seed_list(seeds)
  names = strategies_lib.resolve(strategies)
  progress = progress or (lambda label: None)
  result = {} if into is None else into
  names, skipped = strategies_lib.split_runnable(names, problem.num_tasks)
  if "run" in problem.extra:  # A problem with its own protocol (the toy).
    result.update(problem.extra["run"](problem, names, seeds, num_steps,
                                       progress, result))
    result["skipped"] = skipped
    return result
  settings = protocol_settings(num_steps or problem.num_steps, **protocol)
  result.update({
      "problem": problem.name,
      "description": problem.description,
      "tasks": list(problem.task_names),
      "metrics": list(problem.metric_names),
      "higher_is_better": list(problem.higher_is_better),
      "seeds": seeds,
      "num_steps": settings["num_steps"],
      "protocol": settings,
      "curve_steps": [(k + 1) * settings["eval_every"]
                      for k in range(settings["num_evals"])],
      "strategies": {},
      "skipped": skipped,
  })
  overrides = settings_overrides(settings)
  built = {name: strategies_lib.make(name, problem.num_tasks)
           for name in names}
  groups = plan_groups({n: kind_of(s) for n, s in built.items()})
  labels, makers = [], []
  if problem.single_task_baseline:
    labels.append(f"compile {_SINGLE_TASK} (1)")
    makers.append(functools.partial(prepare_single_task, problem, seeds,
                                    **overrides))
  for kind, members in groups:
    labels.append(f"compile {kind} ({len(members)})")
    makers.append(functools.partial(
        prepare_multitask, problem, [built[n] for n in members], seeds,
        **overrides))
  traced = in_parallel(trace_and_compile, makers, lambda i, _: progress(
      f"{problem.name}/{labels[i]}"))
  jobs = [job for job, _, _ in traced]
  compiled = [(program, seconds) for _, program, seconds in traced]
  stl_scores = None
  if problem.single_task_baseline:
    stl = execute(jobs[0], *compiled[0])
    stl_scores, result["single_task"] = _single_task_summary(problem, stl)
    progress(f"{problem.name}/{_SINGLE_TASK}")
  first = 1 if problem.single_task_baseline else 0
  runs = [(first + g, index, name) for g, (_, members) in enumerate(groups)
          for index, name in enumerate(members)]

  def train(run):
    job_index, index, _ = run
    program, seconds = compiled[job_index]
    share = seconds / len(groups[job_index - first][1])
    return execute(jobs[job_index], program, share, index=index)

  def finished(i, out):
    name = runs[i][2]
    result["strategies"][name] = _strategy_summary(
        problem, out, stl_scores, built[name], settings, len(seeds))
    progress(f"{problem.name}/{name}")

  # One training at a time (XLA runs each on both cores): two executions
  # at once on XLA:CPU once both stopped for good, their threads waiting on
  # results that no worker computed (a full-suite run, manytask, 2026-12-07).
  in_parallel(train, runs, finished, threads=TRAIN_THREADS)
  result["strategies"] = {n: result["strategies"][n] for n in names}
  result["ranking"] = rank(result)
  return result


def settings_overrides(settings: dict[str, Any]) -> dict[str, Any]:
  """The arguments that rebuild ``settings`` in :func:`protocol_settings`."""
  return {key: settings[key] for key in ("num_steps", "validation_fraction",
                                         "eval_every", "patience",
                                         "min_delta")}


def _nanmean(curves: np.ndarray) -> np.ndarray:
  """Mean over seeds of ``[seeds, evals, T]``, NaN where every run stopped."""
  with np.errstate(invalid="ignore"):
    counts = np.sum(np.isfinite(curves), axis=0)
    total = np.nansum(curves, axis=0)
    return np.where(counts > 0, total / np.maximum(counts, 1), np.nan)


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
