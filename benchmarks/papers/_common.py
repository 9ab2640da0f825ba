"""The training loop, evaluation and reporting shared by the paper configs.

Everything runs through ``jax.jit`` on whatever device JAX picks (GPU or
TPU when one is installed, else CPU). A model is an ``nnx.Module`` whose
``__call__(inputs, dropout_key=None)`` returns one logit per task,
``[batch, T]``; it is split once (``nnx.split``) and trained functionally:

* multi-task: ``optax_mtl.value_and_grad(task_losses, strategy)`` gives the
  per-task losses and the combined gradient (one backward pass for the
  loss-weighting strategies used here), then an optax optimizer;
* single-task: T models of the same architecture and initialisation, model
  ``t`` trained on task ``t``'s loss only, ``vmap``-ed over chunks of tasks
  (one compilation for all of them).

After every epoch the validation split is scored and the parameters of the
best epoch are kept (per task for the single-task models); the test split is
scored once, with those parameters.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import optax_mtl
from optax_mtl import metrics as mtl_metrics


class Split(NamedTuple):
  """One data split: inputs ``[N, ...]``, labels ``f32[N, T]``, mask ``bool[N, T]``."""
  inputs: np.ndarray
  labels: np.ndarray
  mask: np.ndarray

  @property
  def size(self) -> int:
    return len(self.labels)

  def take(self, rows) -> "Split":
    return Split(self.inputs[rows], self.labels[rows], self.mask[rows])


class TrainConfig(NamedTuple):
  epochs: int
  batch_size: int
  eval_batch_size: int
  dropout: float = 0.0


# ---------------------------------------------------------------------------
# Model pieces and losses.
# ---------------------------------------------------------------------------


class TaskHeads(nnx.Module):
  """One linear head per task on shared features: ``[B, d] -> [B, T]``.

  Head ``k`` is row ``k`` of ``kernel`` (``[T, d]``) and ``bias[k]``; stored as
  one array so that T heads cost one matrix product.
  """

  def __init__(self, in_features: int, num_tasks: int, *, rngs: nnx.Rngs):
    init = jax.nn.initializers.lecun_normal()
    self.kernel = nnx.Param(init(rngs.params(), (num_tasks, in_features)))
    self.bias = nnx.Param(jnp.zeros((num_tasks,)))

  def __call__(self, features):
    return features @ self.kernel[...].T + self.bias[...]


def dropout(x, rate: float, key):
  """Inverted dropout with an explicit key (None or rate 0: identity)."""
  if key is None or rate <= 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0)


def masked_bce(logits, labels, mask):
  """Per-task binary cross-entropy, mean over the labelled rows: ``f32[T]``.

  A task with no label in the batch gets loss 0 (the strategies then skip
  that step's statistics, see ``num_skipped``; the step still trains the
  other tasks).
  """
  mask = mask.astype(logits.dtype)
  per_row = optax.sigmoid_binary_cross_entropy(logits, labels.astype(
      logits.dtype))
  return jnp.sum(per_row * mask, axis=0) / jnp.maximum(jnp.sum(mask, 0), 1.0)


# ---------------------------------------------------------------------------
# Progress display.
# ---------------------------------------------------------------------------


def _batches(num_steps: int, desc: str):
  """``range(num_steps)``, with a tqdm bar when tqdm is installed and stderr
  is a terminal."""
  try:
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  except ImportError:
    return range(num_steps)
  return tqdm(range(num_steps), desc=desc, leave=False,
              disable=not sys.stderr.isatty())


def epoch_line(prefix: str, epoch: int, epochs: int, loss: float,
               metric_name: str, metric: float, seconds: float) -> str:
  return (f"{prefix:<24} epoch {epoch:>3}/{epochs:<3} loss {loss:8.4f}  "
          f"val {metric_name} {metric:7.4f}  {seconds:8.1f} s")


# ---------------------------------------------------------------------------
# Evaluation.
# ---------------------------------------------------------------------------


def _padded_batches(num_rows: int, batch_size: int):
  """(start, stop) pairs; every batch is fed padded to ``batch_size`` rows
  so that one compilation serves them all."""
  for start in range(0, num_rows, batch_size):
    yield start, min(start + batch_size, num_rows)


def _pad(array: np.ndarray, rows: int) -> np.ndarray:
  if len(array) == rows:
    return array
  pad = np.zeros((rows - len(array),) + array.shape[1:], array.dtype)
  return np.concatenate([array, pad])


def predict(forward_fn, params, inputs: np.ndarray,
            batch_size: int) -> np.ndarray:
  """Probabilities ``f32[N, T]`` (or ``[k, N, T]`` for stacked models)."""
  batch_size = min(batch_size, len(inputs))
  outputs = []
  for start, stop in _padded_batches(len(inputs), batch_size):
    probs = forward_fn(params, _pad(inputs[start:stop], batch_size))
    outputs.append(np.asarray(probs)[..., :stop - start, :])
  return np.concatenate(outputs, axis=-2)


def per_task_scores(probs: np.ndarray, split: Split,
                    metrics: dict[str, Callable]) -> dict[str, np.ndarray]:
  """``{name: f64[T]}``: ``metric(labels, probs, keep)`` of every task on
  its labelled rows (``keep``); NaN for a task without labels."""
  num_tasks = probs.shape[1]
  scores = {name: np.full(num_tasks, np.nan) for name in metrics}
  for t in range(num_tasks):
    keep = split.mask[:, t]
    if keep.any():
      for name, metric in metrics.items():
        scores[name][t] = metric(split.labels[:, t], probs[:, t], keep)
  return scores


def nanmean(values) -> float:
  values = np.asarray(values, np.float64)
  if values.size == 0 or not np.any(np.isfinite(values)):
    return float("nan")
  return float(np.nanmean(values))


# ---------------------------------------------------------------------------
# Training.
# ---------------------------------------------------------------------------


def _epoch_orders(num_rows: int, batch_size: int, epochs: int, seed: int):
  """Row indices of every step: ``[epochs][steps, batch]`` (drop-last)."""
  batch_size = min(batch_size, num_rows)
  steps = max(1, num_rows // batch_size)
  rng = np.random.default_rng(seed)
  for _ in range(epochs):
    order = rng.permutation(num_rows)[:steps * batch_size]
    yield order.reshape(steps, batch_size)


def _train_epoch(step: Callable, carry, train: Split, orders, desc: str,
                 key):
  """One epoch: ``carry, losses = step(carry, inputs, labels, mask, key)``
  on every minibatch of ``orders``, a fresh subkey of ``key`` each.

  Returns the last ``carry``, the key to go on with and the losses stacked
  over the minibatches.
  """
  epoch_losses = []
  for i in _batches(len(orders), desc):
    rows = orders[i]
    key, sub = jax.random.split(key)
    carry, losses = step(carry, train.inputs[rows], train.labels[rows],
                         train.mask[rows], sub)
    epoch_losses.append(losses)
  return carry, key, jnp.stack(epoch_losses)


class Functions(NamedTuple):
  """A model split once: training forward pass and jitted evaluation."""
  forward_train: Callable[..., Any]   # (params, inputs, key) -> logits
  forward_eval: Callable[..., Any]    # jitted (params, inputs) -> probs
  forward_eval_stacked: Callable[..., Any]  # the same, vmapped over models


def split_model(model: nnx.Module) -> tuple[Functions, Any]:
  """``(Functions, params)`` of an ``nnx.Module``.

  The functions depend only on the architecture, so models of the same
  architecture (other seeds) reuse them with their own params and share
  the compiled evaluation.
  """
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def forward_train(params, inputs, key):
    return nnx.merge(graphdef, params, rest)(inputs, dropout_key=key)

  def forward_eval(params, inputs):
    return jax.nn.sigmoid(nnx.merge(graphdef, params, rest)(inputs))

  return Functions(forward_train, jax.jit(forward_eval),
                   jax.jit(jax.vmap(forward_eval, in_axes=(0, None)))), params


def train_multitask(
    fns: Functions,
    params,
    strategy,
    optimizer: optax.GradientTransformation,
    train: Split,
    val: Split,
    config: TrainConfig,
    score_fn: Callable[[np.ndarray, Split], dict],
    primary: str,
    seed: int,
    prefix: str,
    log: Callable[[str], None] = print,
) -> dict:
  """Trains one multi-task model under ``strategy``; keeps the best epoch.

  Returns a dict with ``params`` (best validation epoch), ``forward_eval``,
  ``history`` (one entry per epoch), ``best_epoch``, ``num_skipped`` and the
  strategy's last ``weights``.
  """
  forward_train = fns.forward_train

  def task_losses(params, inputs, labels, mask, key):
    return masked_bce(forward_train(params, inputs, key), labels, mask)

  step = optax_mtl.value_and_grad(task_losses, strategy)

  @jax.jit
  def train_step(params, opt_state, strategy_state, inputs, labels, mask,
                 key):
    (losses, grads), strategy_state = step(params, strategy_state, inputs,
                                           labels, mask, key)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state, strategy_state,
            losses)

  use_dropout = config.dropout > 0.0

  def batch_step(carry, inputs, labels, mask, key):
    *carry, losses = train_step(*carry, inputs, labels, mask,
                                key if use_dropout else None)
    return tuple(carry), losses

  forward_eval = fns.forward_eval
  carry = (params, optimizer.init(params), strategy.init(params))
  key = jax.random.key(seed)
  best = dict(value=-math.inf, epoch=0, params=params)
  history = []
  start = time.perf_counter()
  for epoch, orders in enumerate(
      _epoch_orders(train.size, config.batch_size, config.epochs, seed), 1):
    carry, key, epoch_losses = _train_epoch(batch_step, carry, train, orders,
                                            f"{prefix} {epoch}", key)
    params = carry[0]
    loss = float(jnp.mean(epoch_losses))
    scores = score_fn(predict(forward_eval, params, val.inputs,
                              config.eval_batch_size), val)
    value = nanmean(scores[primary])
    seconds = time.perf_counter() - start
    history.append(dict(epoch=epoch, train_loss=loss, val=value,
                        seconds=seconds))
    log(epoch_line(prefix, epoch, config.epochs, loss, primary, value,
                   seconds))
    comparable = value if math.isfinite(value) else -math.inf
    if comparable >= best["value"]:
      best = dict(value=comparable, epoch=epoch, params=params)
  strategy_state = carry[2]
  weights = getattr(strategy_state, "weights", None)
  return dict(params=best["params"], forward_eval=forward_eval,
              history=history, best_epoch=best["epoch"],
              seconds=time.perf_counter() - start,
              num_skipped=int(getattr(strategy_state, "num_skipped", 0)),
              weights=None if weights is None else np.asarray(
                  weights).tolist())


def train_single_task(
    fns: Functions,
    init_params,
    optimizer: optax.GradientTransformation,
    tasks: Sequence[int],
    train: Split,
    val: Split,
    test: Split,
    config: TrainConfig,
    score_fn: Callable[[np.ndarray, Split], dict],
    primary: str,
    seed: int,
    chunk: int,
    prefix: str,
    log: Callable[[str], None] = print,
) -> dict:
  """Single-task models for ``tasks``, ``chunk`` at a time (``vmap``).

  Every model starts from ``init_params`` (the multi-task model's
  initialisation) and sees the same batches; model ``t`` is trained on task
  ``t``'s loss only, and its best epoch is chosen on task ``t``'s validation
  score. Returns the test probabilities of each trained task (``[N, K]``,
  columns in the order of ``tasks``), the best epochs and the history.
  """
  forward_train = fns.forward_train
  use_dropout = config.dropout > 0.0

  def one_step(params, opt_state, task, inputs, labels, mask, key):
    def loss_fn(params):
      return masked_bce(forward_train(params, inputs, key), labels, mask)[task]

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def train_step(params, opt_state, task_ids, inputs, labels, mask, keys):
    return jax.vmap(one_step, in_axes=(0, 0, 0, None, None, None, 0))(
        params, opt_state, task_ids, inputs, labels, mask, keys)

  def batch_step(carry, inputs, labels, mask, key):
    keys = jax.random.split(key, chunk) if use_dropout else None
    params, opt_state, losses = train_step(*carry, inputs, labels, mask,
                                           keys)
    return (params, opt_state, carry[2]), losses

  forward_eval = fns.forward_eval_stacked
  tasks = list(tasks)
  chunk = max(1, min(chunk, len(tasks)))
  test_probs = np.zeros((test.size, len(tasks)), np.float32)
  best_epochs, history = [], []
  start = time.perf_counter()
  for first in range(0, len(tasks), chunk):
    group = tasks[first:first + chunk]
    padded = group + [group[-1]] * (chunk - len(group))  # one shape
    task_ids = jnp.asarray(padded, jnp.int32)
    params = jax.tree.map(lambda x: jnp.stack([x] * chunk), init_params)
    opt_state = jax.vmap(optimizer.init)(params)
    best_params, best_value = params, np.full(chunk, -np.inf)
    best_epoch = np.zeros(chunk, int)
    key = jax.random.key(seed)
    name = f"{prefix} {group[0]}-{group[-1]}"
    carry = (params, opt_state, task_ids)
    for epoch, orders in enumerate(
        _epoch_orders(train.size, config.batch_size, config.epochs, seed), 1):
      carry, key, epoch_losses = _train_epoch(batch_step, carry, train,
                                              orders, f"{name} {epoch}", key)
      params = carry[0]
      loss = float(jnp.mean(epoch_losses[:, :len(group)]))
      scores = _own_task_scores(forward_eval, params, val, padded, score_fn,
                                config.eval_batch_size)
      values = np.where(np.isfinite(scores[primary]), scores[primary],
                        -np.inf)
      improved = values >= best_value
      best_params = _keep_best(best_params, params, jnp.asarray(improved))
      best_value = np.where(improved, values, best_value)
      best_epoch = np.where(improved, epoch, best_epoch)
      seconds = time.perf_counter() - start
      history.append(dict(tasks=group, epoch=epoch, train_loss=loss,
                          val=nanmean(scores[primary][:len(group)]),
                          seconds=seconds))
      log(epoch_line(name, epoch, config.epochs, loss, primary,
                     history[-1]["val"], seconds))
    probs = predict(forward_eval, best_params, test.inputs,
                    config.eval_batch_size)
    for i, t in enumerate(group):
      test_probs[:, first + i] = probs[i, :, t]
    best_epochs.extend(best_epoch[:len(group)].tolist())
  return dict(test_probs=test_probs, best_epochs=best_epochs,
              history=history, seconds=time.perf_counter() - start)


@jax.jit
def _keep_best(best, params, improved):
  """Per stacked model, ``params`` where ``improved`` else ``best``."""
  def pick(b, p):
    return jnp.where(improved.reshape((-1,) + (1,) * (p.ndim - 1)), p, b)
  return jax.tree.map(pick, best, params)


def _own_task_scores(forward_eval, params, val: Split, padded: list[int],
                     score_fn: Callable, eval_batch_size: int) -> dict:
  """The validation scores of each stacked model on its own task."""
  probs = predict(forward_eval, params, val.inputs,
                  eval_batch_size)           # [chunk, N, T]
  own = np.stack([probs[i, :, t] for i, t in enumerate(padded)], 1)
  return score_fn(own, val._replace(labels=val.labels[:, padded],
                                    mask=val.mask[:, padded]))


# ---------------------------------------------------------------------------
# Comparison with the single-task models.
# ---------------------------------------------------------------------------


def negative_transfer(mtl_scores, stl_scores, num_standard_errors: float = 2.0):
  """Tasks where the multi-task model is worse than the single-task models.

  Higher scores are better. ``mtl_scores`` and ``stl_scores`` are ``[K]``
  (one seed) or ``[seeds, K]``. A task whose score is not finite in some
  seed of either (e.g. PR-AUC without a positive test example) is left out.
  With one seed, any lower score counts; with several, the mean difference
  must be below ``-num_standard_errors`` standard errors
  (``optax_mtl.metrics.negative_transfer_mask``).

  Returns:
    ``(count, mask bool[K], num_compared)``.

  Examples:
    >>> count, mask, compared = negative_transfer(
    ...     [0.5, 0.3, float("nan"), 0.9], [0.4, 0.35, 0.2, 0.95])
    >>> count, mask.tolist(), compared
    (2, [False, True, False, True], 3)
  """
  mtl = np.atleast_2d(np.asarray(mtl_scores, np.float64))
  stl = np.atleast_2d(np.asarray(stl_scores, np.float64))
  if mtl.shape[-1] != stl.shape[-1]:
    raise ValueError(f"{mtl.shape[-1]} multi-task scores but "
                     f"{stl.shape[-1]} single-task scores.")
  valid = np.all(np.isfinite(mtl), 0) & np.all(np.isfinite(stl), 0)
  mask = np.zeros(mtl.shape[-1], bool)
  if np.any(valid):
    mask[valid] = mtl_metrics.negative_transfer_mask(
        mtl[:, valid], stl[:, valid], True, num_standard_errors)
  return int(mask.sum()), mask, int(valid.sum())


def delta_m(mtl_scores, stl_scores) -> float:
  """Δm% over the tasks whose scores are finite everywhere (higher better)."""
  mtl = np.atleast_2d(np.asarray(mtl_scores, np.float64))
  stl = np.atleast_2d(np.asarray(stl_scores, np.float64))
  valid = (np.all(np.isfinite(mtl), 0) & np.all(np.isfinite(stl), 0)
           & (np.abs(stl.mean(0)) > 0))
  if not np.any(valid):
    return float("nan")
  return float(np.mean(mtl_metrics.delta_m(mtl[:, valid],
                                           stl[:, valid].mean(0), True)))


# ---------------------------------------------------------------------------
# Output.
# ---------------------------------------------------------------------------


def fmt(value, digits: int = 4) -> str:
  if value is None:
    return "—"
  if isinstance(value, str):
    return value
  if isinstance(value, (int, np.integer)):
    return str(int(value))
  value = float(value)
  return "nan" if not math.isfinite(value) else f"{value:.{digits}f}"


def markdown_table(header: Sequence[str], rows) -> str:
  lines = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(fmt(cell) for cell in row) + " |"
            for row in rows]
  return "\n".join(lines)


def _jsonable(value):
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, np.ndarray):
    return _jsonable(value.tolist())
  if isinstance(value, (np.floating, float)):
    value = float(value)
    return value if math.isfinite(value) else None
  if isinstance(value, (np.integer,)):
    return int(value)
  if isinstance(value, (np.bool_,)):
    return bool(value)
  return value


def write_outputs(out_dir: str, stem: str, results: dict,
                  report: str) -> tuple[str, str]:
  """``<out>/<stem>.json`` (NaN as null) and ``<out>/<stem>.md``."""
  os.makedirs(out_dir, exist_ok=True)
  json_path = os.path.join(out_dir, f"{stem}.json")
  md_path = os.path.join(out_dir, f"{stem}.md")
  with open(json_path, "w", encoding="utf-8") as f:
    json.dump(_jsonable(results), f, indent=1, allow_nan=False)
  with open(md_path, "w", encoding="utf-8") as f:
    f.write(report)
  return json_path, md_path


def run_paper(args, *, stem: str, citation: str,
              report: Callable[[dict], str], make_strategy: Callable,
              data: dict, run_config: dict, log: Callable[[str], None],
              **comparison) -> dict:
  """A paper command: :func:`run_comparison` of the strategies, seeds and
  single-task models named by ``args``, then its results and report written
  to ``args.out`` and logged.

  ``make_strategy(name)`` builds a strategy; ``comparison`` holds the other
  arguments of :func:`run_comparison`; ``data`` and ``run_config`` are
  recorded in the results beside the options. Returns the results with the
  ``files`` written.
  """
  strategy_names = [s.strip() for s in args.strategies.split(",") if s]
  results = run_comparison(
      strategies={n: functools.partial(make_strategy, n)
                  for n in strategy_names},
      seeds=[int(s) for s in str(args.seeds).split(",")],
      stl_tasks=parse_task_limit(args.stl_tasks,
                                 len(comparison["task_names"])),
      stl_chunk=args.stl_chunk, log=log, **comparison)
  results.update(paper=stem, citation=citation, device=device_description(),
                 data=data, config=dict(plain_args(args), **run_config))
  text = report(results)
  json_path, md_path = write_outputs(args.out, stem, results, text)
  log("\n" + text)
  log(f"wrote {json_path} and {md_path}")
  results["files"] = [json_path, md_path]
  return results


def paper_report(results: dict, title: str, data_label: str, split: str,
                 metrics: Sequence[str], citation: str, table: str) -> str:
  """A paper command's report: this run's table, then the paper beside it."""
  return "\n\n".join([
      title,
      f"Device: {results['device']}. {data_label}: {results['data']}.",
      f"## This run ({split}, best validation epoch)",
      results_table(results, metrics),
      f"## Beside the paper\n\n{citation}.",
      table, ""])


def add_run_arguments(parser, defaults: dict, data_help: str) -> None:
  """The options every paper command takes first: data, output, budget."""
  parser.add_argument("--data-dir", required=True, help=data_help)
  parser.add_argument("--out", default="bench_results/papers",
                      help="output folder (default bench_results/papers, "
                      "git-ignored)")
  parser.add_argument("--epochs", type=int, default=defaults["epochs"])
  parser.add_argument("--batch-size", type=int,
                      default=defaults["batch_size"])
  parser.add_argument("--eval-batch-size", type=int,
                      default=defaults["eval_batch_size"])
  parser.add_argument("--learning-rate", type=float,
                      default=defaults["learning_rate"])


def add_comparison_arguments(parser, defaults: dict, tasks: str) -> None:
  """The strategies, single-task models and seeds to compare (``tasks``
  names a paper's tasks, e.g. "attributes")."""
  parser.add_argument("--strategies", default=defaults["strategies"])
  parser.add_argument("--stl-tasks", default=defaults["stl_tasks"],
                      help="single-task models: all, none, N (the first N "
                      f"{tasks}) or indices 0,5,9")
  parser.add_argument("--stl-chunk", type=int, default=defaults["stl_chunk"],
                      help="single-task models trained at once (vmap)")
  parser.add_argument("--seeds", default=defaults["seeds"],
                      help="comma-separated seeds (default 0)")


def plain_args(args) -> dict:
  """The command-line options as a JSON-able dict."""
  return {k: v for k, v in vars(args).items() if not callable(v)}


def device_description() -> str:
  device = jax.devices()[0]
  return f"{device.platform}: {getattr(device, 'device_kind', device)}"


def parse_task_limit(text: str, num_tasks: int) -> list[int]:
  """``all`` / ``none`` / ``N`` (the first N tasks) / ``0,5,9`` (indices)."""
  text = str(text).strip().lower()
  if text == "all":
    return list(range(num_tasks))
  if text in ("none", "0"):
    return []
  if "," in text:
    tasks = sorted({int(t) for t in text.split(",") if t.strip()})
  else:
    tasks = list(range(min(int(text), num_tasks)))
  if any(t < 0 or t >= num_tasks for t in tasks):
    raise ValueError(f"task indices must be in [0, {num_tasks}), got {text}.")
  return tasks


def run_comparison(
    *,
    name: str,
    make_model: Callable[[int], nnx.Module],
    make_optimizer: Callable[[], optax.GradientTransformation],
    strategies: dict,
    splits: tuple[Split, Split, Split],
    task_names: Sequence[str],
    config: TrainConfig,
    score_fn: Callable[[np.ndarray, Split], dict],
    primary: str,
    seeds: Sequence[int],
    stl_tasks: Sequence[int],
    stl_chunk: int,
    log: Callable[[str], None] = print,
) -> dict:
  """Trains every strategy and the single-task models, scores the test split.

  ``strategies`` maps a name to a zero-argument factory of the strategy.
  Returns the JSON-able results: per strategy and seed the test scores of
  every task, their means over tasks, and (when single-task models were
  trained) Δm% and the tasks with negative transfer on ``primary``, over
  the tasks in ``stl_tasks``.
  """
  train, val, test = splits
  fns, first_params = split_model(make_model(seeds[0]))
  init_params = {seeds[0]: first_params}
  for seed in seeds[1:]:
    init_params[seed] = split_model(make_model(seed))[1]
  results = dict(tasks=list(task_names), primary_metric=primary,
                 seeds=list(seeds), strategies={}, single_task=None)
  stl_scores = []
  if stl_tasks:
    stl_entry = dict(tasks=[task_names[t] for t in stl_tasks],
                     task_indices=list(stl_tasks), per_seed=[],
                     best_epochs=[], history=[], seconds=0.0)
    for seed in seeds:
      out = train_single_task(
          fns, init_params[seed], make_optimizer(), stl_tasks, train, val, test,
          config, score_fn, primary, seed, stl_chunk,
          prefix=f"{name} single-task", log=log)
      scores = score_fn(out["test_probs"], test._replace(
          labels=test.labels[:, stl_tasks], mask=test.mask[:, stl_tasks]))
      stl_entry["per_seed"].append(scores)
      stl_entry["best_epochs"].append(out["best_epochs"])
      stl_entry["history"].append(out["history"])
      stl_entry["seconds"] += out["seconds"]
      stl_scores.append(scores[primary])
    stl_entry["mean_over_tasks"] = {
        m: nanmean([s[m] for s in stl_entry["per_seed"]])
        for m in stl_entry["per_seed"][0]}
    results["single_task"] = stl_entry
  for strategy_name, factory in strategies.items():
    entry = dict(per_seed=[], history=[], best_epoch=[], num_skipped=[],
                 weights=[], seconds=0.0)
    for seed in seeds:
      out = train_multitask(
          fns, init_params[seed], factory(), make_optimizer(), train, val, config,
          score_fn, primary, seed, prefix=f"{name} {strategy_name}", log=log)
      probs = predict(out["forward_eval"], out["params"], test.inputs,
                      config.eval_batch_size)
      entry["per_seed"].append(score_fn(probs, test))
      for field in ("history", "best_epoch", "num_skipped", "weights"):
        entry[field].append(out[field])
      entry["seconds"] += out["seconds"]
    entry["mean_over_tasks"] = {
        m: nanmean([s[m] for s in entry["per_seed"]])
        for m in entry["per_seed"][0]}
    if stl_scores:
      mtl = np.stack([s[primary][stl_tasks] for s in entry["per_seed"]])
      count, mask, compared = negative_transfer(mtl, np.stack(stl_scores))
      entry["negative_transfer"] = count
      entry["negative_transfer_tasks"] = [
          task_names[t] for t, bad in zip(stl_tasks, mask) if bad]
      entry["tasks_compared"] = compared
      entry["delta_m"] = delta_m(mtl, np.stack(stl_scores))
    results["strategies"][strategy_name] = entry
  return results


def results_table(results: dict, metrics: Sequence[str]) -> str:
  """One row per model: mean test scores over tasks, Δm%, negative transfer."""
  header = (["model"] + [f"mean test {m}" for m in metrics]
            + ["Δm% vs single-task", "tasks with negative transfer"])
  rows = []
  stl = results.get("single_task")
  if stl:
    rows.append(["single-task"] + [stl["mean_over_tasks"][m] for m in metrics]
                + ["0 (baseline)", "—"])
  for name, entry in results["strategies"].items():
    nt = (f"{entry['negative_transfer']} / {entry['tasks_compared']}"
          if "negative_transfer" in entry else "—")
    rows.append([name] + [entry["mean_over_tasks"][m] for m in metrics]
                + [entry.get("delta_m"), nt])
  return markdown_table(header, rows)
