"""Step time and peak memory of every strategy: absolute and as ratios.

Two models, each a shared trunk with T linear regression heads (squared
error), with a new minibatch at every step (a pool of 8, cycled):

* ``mlp``: a ReLU MLP trunk (2×256, minibatch 256), T = 2, 10, 40;
* ``conv``: a small conv trunk (two 3×3 stride-2 convolutions, 16 and 32
  channels, on 16×16 single-channel inputs, then a dense layer of 64;
  minibatch 64), T = 2, 10 (convolutions behave differently on XLA:CPU
  under ``vmap``, ``lax.map`` and ``lax.cond``).

For each strategy we time the training step
``optax_mtl.value_and_grad(loss_fn, strategy)`` (plus a plain SGD update),
report its absolute time (``step_ms``) and divide it by baselines timed in
the same rounds:

* every strategy ÷ a *plain* training step, ``jax.value_and_grad`` of the
  summed losses (``ratio_plain``): what the strategy costs compared with
  training without optax_mtl;
* loss-only strategies also ÷ the ``equal`` step through ``optax_mtl`` and
  ÷ the same data-dependent weighting written by hand (``by_hand``);
* Gramian strategies also ÷ the *Jacobian-only* step, which computes the
  per-task Jacobian by ``vmap`` of the VJP over the T unit cotangents and
  sums it over tasks (a dot with a vector of ones, the fastest sum on
  XLA:CPU): what every Gramian strategy has to pay at least.

Engine options are timed on one Gramian strategy (:data:`OPTIONS_BASE`,
``upgrad``), ÷ plain and ÷ the strategy's default step:
``gramian_mode="low_memory"``, ``optax_mtl.recompute_every(strategy, 10)``,
the Gramian of the trunk's output (``encoder_fn=``, MGDA-UB) and the Gramian
of the trunk's parameters only (``shared=``).

Method: every step is one call of its own jitted training step,
``(params, state, batch) -> (params, state, logged)``, as a user's training
loop runs it (the plain baseline too: no ``lax.fori_loop`` or other control
flow around the steps, which on XLA:CPU would put convolutions on a slow
path that a user's step does not take). Each entry follows a real training
trajectory: every step starts from the parameters and state the previous
one returned, with the next minibatch, and every step is timed on its own
(``block_until_ready``). A round times ``cycles`` whole cycles of
``RECOMPUTE_EVERY`` consecutive steps of every entry, one entry after the
other (interleaved, so that a slow spell of the shared machine hits all
alike), so that a timing of ``recompute_every`` always holds its recomputing
steps in their true proportion; ``cycles`` is set from the warm-up so that
a round of the entry lasts about ``target_seconds``.

Each step is filed under its position in the cycle (its index mod
``RECOMPUTE_EVERY``). ``step_ms`` is the mean over the cycle's positions of
each position's fastest step over all rounds: noise only ever adds time, so
the fastest of many interleaved rounds estimates a step's own cost, and
averaging over the positions keeps a recomputing step of ``recompute_every``
in its true proportion (amortised). ``ratio_plain`` divides it by the plain
step's; ``ratio_median`` is the median over rounds of the per-round ratio of
the mean steps (the second estimator); ``slowest_step_ms`` is the slowest
position's fastest step (``recompute_every``'s recomputing step) and
``slowest_ratio_plain`` that ÷ the plain step. The plain
step compiled twice gives the run's noise floor (``baselines[T]["noise"]``).
Timings start after a warm-up of ``RECOMPUTE_EVERY + 1`` steps (a step in
training, not the first one, whose solvers have no previous solution to
start from). Peak memory is the compiled step's ``memory_analysis()``: temp
+ argument + output bytes (deterministic on CPU). All steps of one T are
compiled first (two at a time: XLA compiles on one core), then timed, so
that no compilation runs during a timing. The logged value (the sum of the
step's losses) keeps the forward's loss reduction in the plain step too, as
a training step that logs its losses does.
"""

from __future__ import annotations

from concurrent import futures
import functools
import os
import time
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import optax_mtl

from benchmarks import strategies as strategies_lib
from benchmarks.problems import _common

DEFAULT_MODELS = ("mlp", "conv")
DEFAULT_NUM_TASKS = (2, 10, 40)
# Settings shared by both models; MODELS[name] adds the model's own.
CONFIG = dict(model="mlp", num_tasks=DEFAULT_NUM_TASKS, input_dim=64,
              hidden=256, depth=2, batch_size=256, num_batches=8,
              target_seconds=0.05, rounds=10, learning_rate=1e-4)
MODELS = {
    "mlp": dict(model="mlp"),
    "conv": dict(model="conv", num_tasks=(2, 10), side=16,
                 channels=(16, 32), hidden=64, batch_size=64),
}
OPTIONS_BASE = "upgrad"
RECOMPUTE_EVERY = 10


def options(base: str = OPTIONS_BASE) -> tuple[str, ...]:
  """Labels of the engine options timed on ``base``."""
  return (f"{base}, gramian_mode='low_memory'",
          f"recompute_every({base}, {RECOMPUTE_EVERY})",
          f"{base}, encoder_fn=trunk", f"{base}, shared=trunk")


def num_units(names: Sequence[str], models: Sequence[str] = DEFAULT_MODELS,
              num_tasks: Optional[Sequence[int]] = None) -> int:
  """Progress units of :func:`run_speed_models` (one per strategy and T)."""
  return sum(strategies_lib.runs_at(name, t)
             for model in models
             for t in (num_tasks or model_config(model)["num_tasks"])
             for name in names)


def _init_conv(key, cfg):
  """He-initialised 3×3 stride-2 convolutions, then one dense layer."""
  keys = jax.random.split(key, len(cfg["channels"]) + 1)
  layers, in_channels = [], 1
  for layer_key, out_channels in zip(keys, cfg["channels"]):
    fan_in = 9 * in_channels
    layers.append({
        "w": jax.random.normal(layer_key, (3, 3, in_channels, out_channels))
             * np.sqrt(2.0 / fan_in),
        "b": jnp.zeros((out_channels,))})
    in_channels = out_channels
  side = cfg["side"] // 2 ** len(cfg["channels"])
  flat = side * side * in_channels
  return {"conv": layers,
          "dense": _common.init_mlp(keys[-1], [flat, cfg["hidden"]])}


def _apply_conv(trunk, images):
  """``images[N, side, side, 1]`` -> ReLU features ``[N, hidden]``."""
  hidden = images
  for layer in trunk["conv"]:
    hidden = jax.lax.conv_general_dilated(
        hidden, layer["w"], window_strides=(2, 2), padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    hidden = jax.nn.relu(hidden + layer["b"])
  return _common.apply_mlp(trunk["dense"],
                           hidden.reshape(hidden.shape[0], -1))


def make_model(num_tasks: int, config: Optional[dict] = None):
  """``(params, loss_fn, batches, encoder_fn, head_loss_fn)`` with T heads.

  ``batches`` holds ``num_batches`` minibatches on a leading axis; the timed
  loop takes a different one at every step, as training does, so that the
  losses and the Gramian change from step to step (what a warm-started
  solver sees in practice). ``encoder_fn(params, batch)`` is the trunk and
  ``head_loss_fn(params, features, batch)`` the rest, for ``encoder_fn=``.
  """
  cfg = dict(CONFIG, **(config or {}))
  key = jax.random.key(0)
  trunk_key, head_key, x_key, y_key = jax.random.split(key, 4)
  if cfg["model"] == "mlp":
    sizes = [cfg["input_dim"]] + [cfg["hidden"]] * cfg["depth"]
    trunk = _common.init_mlp(trunk_key, sizes)
    input_shape = (cfg["input_dim"],)
    apply_trunk = _common.apply_mlp
  elif cfg["model"] == "conv":
    trunk = _init_conv(trunk_key, cfg)
    input_shape = (cfg["side"], cfg["side"], 1)
    apply_trunk = _apply_conv
  else:
    raise ValueError(f"model must be 'mlp' or 'conv', got {cfg['model']!r}.")
  params = {"trunk": trunk,
            "heads": _common.init_heads(head_key, num_tasks, cfg["hidden"], 1)}
  inputs = jax.random.normal(
      x_key, (cfg["num_batches"], cfg["batch_size"]) + input_shape)
  targets = jax.random.normal(
      y_key, (cfg["num_batches"], cfg["batch_size"], num_tasks))

  def encoder_fn(params, batch):
    return apply_trunk(params["trunk"], batch[0])

  def head_loss_fn(params, features, batch):
    out = _common.apply_heads(params["heads"], features)[..., 0]
    return jnp.mean((out - batch[1]) ** 2, axis=0) + 0.1  # stays > 0

  def loss_fn(params, batch):
    return head_loss_fn(params, encoder_fn(params, batch), batch)

  return params, loss_fn, (inputs, targets), encoder_fn, head_loss_fn


def _train_step(step: Callable, learning_rate: float):
  """jit of one training step ``(params, state, batch) -> (params, state,
  logged)``: the step, a plain SGD update, and the sum of the losses."""

  def train_step(params, state, batch):
    task_losses, grads, state = step(params, state, batch)
    params = jax.tree.map(lambda p, g: p - learning_rate * g, params, grads)
    return params, state, jnp.sum(task_losses)

  return jax.jit(train_step)


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


class _Trajectory:
  """One entry's compiled step and where its training trajectory stands."""

  def __init__(self, compiled, params, state, batches):
    self.compiled, self.params, self.state = compiled, params, state
    self.batches = batches  # One minibatch per entry, cycled.
    self.index = 0
    self.cycles = 1

  def run(self, num_steps: int) -> np.ndarray:
    """Runs ``num_steps`` consecutive steps; the seconds of each."""
    seconds = np.empty(num_steps)
    for i in range(num_steps):
      batch = self.batches[self.index % len(self.batches)]
      start = time.perf_counter()
      out = jax.block_until_ready(
          self.compiled(self.params, self.state, batch))
      seconds[i] = time.perf_counter() - start
      self.params, self.state, _ = out
      self.index += 1
    return seconds


def _compile_all(lowered: Sequence[Any]) -> list[Any]:
  """Compiles every lowered step, two at a time (XLA compiles on one core)."""
  threads = max(1, min(2, len(os.sched_getaffinity(0))))
  if threads == 1 or len(lowered) < 2:
    return [entry.compile() for entry in lowered]
  with futures.ThreadPoolExecutor(threads) as pool:
    return list(pool.map(lambda entry: entry.compile(), lowered))


def _prepare(steps: dict[str, tuple], learning_rate, params, batches,
             target_seconds) -> dict[str, _Trajectory]:
  """``{key: (step, state)}`` -> ``{key: _Trajectory}``: compiles every
  step, warms it up over ``RECOMPUTE_EVERY + 1`` steps and sets how many
  cycles a round of it times."""
  num_batches = jax.tree.leaves(batches)[0].shape[0]
  batch_list = [jax.tree.map(lambda b, i=i: b[i], batches)
                for i in range(num_batches)]
  lowered = [_train_step(step, learning_rate).lower(params, state,
                                                    batch_list[0])
             for step, state in steps.values()]
  trajectories = {}
  for (key, (_, state)), compiled in zip(steps.items(),
                                         _compile_all(lowered)):
    trajectory = _Trajectory(compiled, params, state, batch_list)
    warm_up = trajectory.run(RECOMPUTE_EVERY + 1)
    cycle = float(np.mean(warm_up[1:])) * RECOMPUTE_EVERY
    trajectory.cycles = int(np.clip(round(target_seconds / max(cycle, 1e-6)),
                                    1, 50))
    trajectories[key] = trajectory
  return trajectories


class _Rounds(NamedTuple):
  """Per entry: the mean step of each round, and each cycle position's
  fastest step over all rounds (s)."""

  mean: dict[str, np.ndarray]  # [rounds]
  by_position: dict[str, np.ndarray]  # [RECOMPUTE_EVERY]


def _interleaved_rounds(trajectories: dict[str, _Trajectory],
                        rounds: int) -> _Rounds:
  """Times whole cycles of every entry, ``rounds`` times, taken in turn.

  Every round runs every entry's next ``cycles × RECOMPUTE_EVERY`` steps,
  one entry after the other, so that a slow spell of a shared machine hits
  all of them alike. Each step is filed under its position in the cycle
  (its index mod ``RECOMPUTE_EVERY``: ``recompute_every``'s recomputing
  step always falls on the same position).
  """
  mean = {key: [] for key in trajectories}
  by_position = {key: np.full(RECOMPUTE_EVERY, np.inf) for key in trajectories}
  for _ in range(rounds):
    for key, trajectory in trajectories.items():
      first = trajectory.index
      seconds = trajectory.run(trajectory.cycles * RECOMPUTE_EVERY)
      mean[key].append(float(np.mean(seconds)))
      positions = (first + np.arange(seconds.size)) % RECOMPUTE_EVERY
      np.minimum.at(by_position[key], positions, seconds)
  return _Rounds({k: np.asarray(v) for k, v in mean.items()}, by_position)


def _amortised(times: _Rounds, key: str) -> float:
  """Mean over the cycle's positions of each position's fastest step (s).

  On a shared machine noise only ever adds time, so the fastest of many
  interleaved rounds is the best estimate of a step's own cost; taken per
  position of the ``recompute_every`` cycle and averaged over the cycle, it
  keeps the recomputing step in its true proportion (1 in
  ``RECOMPUTE_EVERY``) while each step is filtered of noise on its own.
  """
  return float(np.mean(times.by_position[key]))


def _ratio(times: _Rounds, candidate: str, baseline: str) -> float:
  """Amortised step of ``candidate`` ÷ that of ``baseline``."""
  return _amortised(times, candidate) / _amortised(times, baseline)


def _median_ratio(times: _Rounds, candidate: str, baseline: str) -> float:
  """Median over rounds of the per-round ratio of the mean steps (the
  second estimator)."""
  return float(np.median(times.mean[candidate] / times.mean[baseline]))


def _timing(times: _Rounds, key: str) -> dict[str, float]:
  """``step_ms`` (amortised), ``slowest_step_ms`` (the slowest position's
  fastest step: ``recompute_every``'s recomputing step) and its ratio to
  the plain step."""
  slowest = float(np.max(times.by_position[key]))
  return {"step_ms": _amortised(times, key) * 1e3,
          "slowest_step_ms": slowest * 1e3,
          "slowest_ratio_plain": slowest / _amortised(times, "plain")}


def model_config(model: str = "mlp", config: Optional[dict] = None) -> dict:
  """The full settings of one speed model: CONFIG, MODELS[model], config."""
  if model not in MODELS:
    raise ValueError(f"unknown speed model {model!r}; known: "
                     f"{', '.join(MODELS)}.")
  return {**CONFIG, **MODELS[model], **(config or {})}


def run_speed(
    names: Sequence[str],
    num_tasks: Optional[Sequence[int]] = None,
    config: Optional[dict] = None,
    progress: Optional[Callable[[str], None]] = None,
    model: str = "mlp",
) -> dict[str, Any]:
  """Times every strategy against its baselines on one model.

  For each T, every baseline and every strategy is compiled first, then all
  are timed in ``rounds`` interleaved rounds of whole ``recompute_every``
  cycles of consecutive top-level steps (:func:`_interleaved_rounds`).

  Args:
    names: strategy names (``benchmarks.strategies``). When
      :data:`OPTIONS_BASE` is among them, its engine options are timed too.
    num_tasks: the task counts (default: the model's).
    config: overrides of the model's settings (:func:`model_config`).
    progress: called with a short label after every strategy and T.
    model: ``"mlp"`` or ``"conv"``.

  Returns:
    ``{"model", "config", "num_tasks", "baselines": {T: {name:
    {"memory_bytes", "flops", "step_ms", "slowest_step_ms",
    "slowest_ratio_plain"}, "noise": plain_again ÷ plain}}, "strategies":
    {name: {T: {"kind", "step_ms", "slowest_step_ms", "slowest_ratio_plain",
    "ratio_plain", "ratio_median", "ratio_equal", "ratio_by_hand" |
    "ratio_jacobian", "flops_ratio", "memory_bytes", "memory_ratio"}}},
    "options": {label: {T: {"step_ms", "slowest_step_ms",
    "slowest_ratio_plain", "ratio_plain", "ratio_base",
    "memory_bytes"}}}}`` (T as a string key; ``step_ms`` is the amortised
    mean step, ``slowest_step_ms`` the slowest step of a round;
    ``flops_ratio`` and ``memory_ratio`` are ÷ plain for loss-only
    strategies and ÷ the Jacobian-only step for Gramian ones).
  """
  names = strategies_lib.resolve(names)
  cfg = model_config(model, config)
  num_tasks = list(num_tasks or cfg["num_tasks"])
  cfg["num_tasks"] = num_tasks
  progress = progress or (lambda label: None)
  out: dict[str, Any] = {"model": model, "config": cfg,
                         "num_tasks": num_tasks, "baselines": {},
                         "strategies": {}, "options": {}}
  for t in num_tasks:
    params, loss_fn, batches, encoder_fn, head_loss_fn = make_model(t, cfg)
    step_of = functools.partial(_strategy_step, loss_fn, head_loss_fn)
    equal = strategies_lib.make("equal", t)
    # plain_again is plain compiled a second time: its ratio to plain is
    # this run's noise floor.
    plain_step, by_hand_step, jacobian_step = _baseline_steps(t, loss_fn)
    loops = {"plain": (plain_step, ()), "plain_again": (plain_step, ()),
             "by_hand": (by_hand_step, ()), "jacobian": (jacobian_step, ()),
             "equal": (step_of(equal), equal.init(params))}
    baseline_keys = tuple(loops)
    entries: dict[str, dict[str, Any]] = {}
    for name in names:
      if not strategies_lib.runs_at(name, t):
        continue  # Not defined at this T (krum at T = 2): no entry.
      strategy = strategies_lib.make(name, t)
      gramian = strategies_lib.reads_task_gradients(strategy)
      entries[name] = {"kind": "gramian" if gramian else "losses"}
      loops[name] = (step_of(strategy), strategy.init(params))
    option_labels = options() if OPTIONS_BASE in names else ()
    if option_labels:
      loops.update(_option_loops(t, params, step_of, encoder_fn))
    timed = _prepare(loops, cfg["learning_rate"], params, batches,
                     cfg["target_seconds"])

    times = _interleaved_rounds(timed, cfg["rounds"])
    baselines = {
        key: {"memory_bytes": memory_bytes(timed[key].compiled),
              "flops": flops(timed[key].compiled), **_timing(times, key)}
        for key in baseline_keys}
    baselines["noise"] = _ratio(times, "plain_again", "plain")
    out["baselines"][str(t)] = baselines
    for name, entry in entries.items():
      _time_entry(entry, name, times, timed[name].compiled, baselines)
      out["strategies"].setdefault(name, {})[str(t)] = entry
      progress(f"speed {model} T={t}/{name}")
    for label in option_labels:
      out["options"].setdefault(label, {})[str(t)] = {
          **_timing(times, label),
          "ratio_plain": _ratio(times, label, "plain"),
          "ratio_base": _ratio(times, label, OPTIONS_BASE),
          "memory_bytes": memory_bytes(timed[label].compiled)}
  return out


def _baseline_steps(num_tasks: int,
                    loss_fn: Callable) -> tuple[Callable, ...]:
  """The plain, by-hand and Jacobian-only training steps of a model."""

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
    jacobian = jax.vmap(vjp_fn)(jnp.eye(num_tasks,
                                        dtype=task_losses.dtype))[0]
    # A dot with ones, not jnp.sum(j, axis=0): on XLA:CPU the reduction
    # over the leading axis is about 2x slower than the dot (measured).
    ones = jnp.ones((num_tasks,), task_losses.dtype)
    return task_losses, jax.tree.map(
        lambda j: jnp.tensordot(ones, j, axes=1), jacobian), state

  return plain_step, by_hand_step, jacobian_step


def _strategy_step(loss_fn: Callable, head_loss_fn: Callable, strategy,
                   **engine_options) -> Callable:
  """A training step of ``strategy`` through ``optax_mtl.value_and_grad``
  (of ``head_loss_fn`` when an ``encoder_fn`` is given)."""
  if "encoder_fn" in engine_options:
    value_and_grad = optax_mtl.value_and_grad(head_loss_fn, strategy,
                                              **engine_options)
  else:
    value_and_grad = optax_mtl.value_and_grad(loss_fn, strategy,
                                              **engine_options)

  samples = optax_mtl.weighting_of(strategy).num_samples

  def step(params, state, batch):
    # MoDo, SDMGrad: the minibatch rolled by s rows, copied inside the
    # timed step (a data loader would hand over three: a small
    # overestimate of their step).
    if samples > 1:
      batch = jax.tree.map(
          lambda b: jnp.stack([jnp.roll(b, s, axis=0)
                               for s in range(samples)]), batch)
    (task_losses, grads), state = value_and_grad(params, state, batch)
    return task_losses, grads, state

  return step


def _option_loops(num_tasks: int, params, step_of: Callable,
                  encoder_fn: Callable) -> dict[str, tuple]:
  """The engine options of :data:`OPTIONS_BASE`, by label of ``options()``:
  ``{label: (step, initial state)}``."""
  base = strategies_lib.make(OPTIONS_BASE, num_tasks)
  recompute = optax_mtl.recompute_every(base, RECOMPUTE_EVERY)
  trunk_only = {"trunk": True, "heads": False}
  variants = (
      (step_of(base, gramian_mode="low_memory"), base),
      (step_of(recompute), recompute),
      (step_of(base, encoder_fn=encoder_fn), base),
      (step_of(base, shared=trunk_only), base))
  return {label: (step, strategy.init(params))
          for label, (step, strategy) in zip(options(), variants)}


def _time_entry(entry: dict[str, Any], name: str, times: _Rounds, compiled,
                baselines: dict[str, Any]) -> None:
  """Fills a strategy's entry: its times, ratios, operations and memory
  against the plain step (loss-only) or the Jacobian-only one (Gramian)."""
  gramian = entry["kind"] == "gramian"
  reference = "jacobian" if gramian else "plain"
  entry.update(_timing(times, name))
  entry["ratio_plain"] = _ratio(times, name, "plain")
  entry["ratio_median"] = _median_ratio(times, name, "plain")
  entry["ratio_equal"] = _ratio(times, name, "equal")
  if gramian:
    entry["ratio_jacobian"] = _ratio(times, name, "jacobian")
  else:
    entry["ratio_by_hand"] = _ratio(times, name, "by_hand")
  entry["memory_bytes"] = memory_bytes(compiled)
  reference_flops = baselines[reference]["flops"]
  step_flops = flops(compiled)
  if reference_flops and step_flops:
    entry["flops_ratio"] = step_flops / reference_flops
  reference_memory = baselines[reference]["memory_bytes"]
  if reference_memory and entry["memory_bytes"]:
    entry["memory_ratio"] = entry["memory_bytes"] / reference_memory


def run_speed_models(
    names: Sequence[str],
    models: Sequence[str] = DEFAULT_MODELS,
    num_tasks: Optional[Sequence[int]] = None,
    config: Optional[dict] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> dict[str, dict[str, Any]]:
  """:func:`run_speed` on every model: ``{model: result}``."""
  return {model: run_speed(names, num_tasks, config, progress, model=model)
          for model in models}
