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
``ratio_median`` (the median of the per-round ratios to plain) is kept as a
second estimator, and the plain step compiled twice gives the run's noise
floor (``baselines[T]["noise"]``). Peak memory is the compiled executable's
``memory_analysis()``: temp + argument + output bytes (deterministic on
CPU); ``gramian_mode="low_memory"``'s is that of its option row. All loops of
one T are compiled first (two at a time: XLA compiles on one core), then
timed, so that no compilation runs during a timing.
"""

from __future__ import annotations

import time
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import optax_mtl

from benchmarks import runner
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
  return sum(len(names) * len(num_tasks or model_config(model)["num_tasks"])
             for model in models)


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


def _lower(step, learning_rate, params, state, batches):
  return _loop(step, learning_rate).lower(
      params, state, batches, jnp.asarray(1, jnp.int32))


def _warm(compiled, params, state, batches, target_seconds) -> _Timed:
  # Warm-up, and the timings start from a state in training (a strategy's
  # first step may differ: a solver without a warm start, a first EMA).
  params, state, _ = compiled(params, state, batches,
                              jnp.asarray(_WARM_UP_STEPS, jnp.int32))
  args = (params, state, batches)
  single = min(_time_once(compiled, args, 1) for _ in range(3))
  steps = int(np.clip(target_seconds / max(single, 1e-6), 1, 2000))
  return _Timed(compiled, args, steps)


def _compile_and_warm(loops: dict[str, tuple], learning_rate, params,
                      batches, target_seconds) -> dict[str, _Timed]:
  """``{key: (step, state)}`` -> ``{key: _Timed}``; compiles in parallel
  (``runner.COMPILE_THREADS`` at a time), then warms up one by one."""
  jobs = [runner.Job(_lower(step, learning_rate, params, state, batches), (),
                     {}) for step, state in loops.values()]
  compiled = runner.compile_jobs(jobs)
  return {key: _warm(executable, params, state, batches, target_seconds)
          for (key, (_, state)), (executable, _) in zip(loops.items(),
                                                        compiled)}


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
  are timed in ``rounds`` interleaved rounds (:func:`_ratio`).

  Args:
    names: strategy names (``benchmarks.strategies``). When
      :data:`OPTIONS_BASE` is among them, its engine options are timed too.
    num_tasks: the task counts (default: the model's).
    config: overrides of the model's settings (:func:`model_config`).
    progress: called with a short label after every strategy and T.
    model: ``"mlp"`` or ``"conv"``.

  Returns:
    ``{"model", "config", "num_tasks", "baselines": {T: {name:
    {"memory_bytes", "flops", "step_ms"}, "noise": plain_again ÷ plain}},
    "strategies": {name: {T: {"kind", "step_ms", "ratio_plain",
    "ratio_median", "ratio_equal", "ratio_by_hand" | "ratio_jacobian",
    "flops_ratio", "memory_bytes", "memory_ratio"}}}, "options": {label:
    {T: {"step_ms",
    "ratio_plain", "ratio_base", "memory_bytes"}}}}`` (T as a string key;
    ``flops_ratio`` and ``memory_ratio`` are ÷ plain for loss-only
    strategies and ÷ the Jacobian-only step for Gramian ones).
  """
  names = strategies_lib.resolve(names)
  cfg = model_config(model, config)
  num_tasks = list(num_tasks or cfg["num_tasks"])
  cfg["num_tasks"] = num_tasks
  progress = progress or (lambda label: None)
  lr, rounds, target = (cfg["learning_rate"], cfg["rounds"],
                        cfg["target_seconds"])
  out: dict[str, Any] = {"model": model, "config": cfg,
                         "num_tasks": num_tasks, "baselines": {},
                         "strategies": {}, "options": {}}
  for t in num_tasks:
    params, loss_fn, batches, encoder_fn, head_loss_fn = make_model(t, cfg)

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

    def strategy_step(strategy, **engine_options):
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

    equal = strategies_lib.make("equal", t)
    # plain_again is plain compiled a second time: its ratio to plain is
    # this run's noise floor.
    loops = {"plain": (plain_step, ()), "plain_again": (plain_step, ()),
             "by_hand": (by_hand_step, ()), "jacobian": (jacobian_step, ()),
             "equal": (strategy_step(equal), equal.init(params))}
    baseline_keys = tuple(loops)
    entries: dict[str, dict[str, Any]] = {}
    for name in names:
      strategy = strategies_lib.make(name, t)
      gramian = strategies_lib.reads_task_gradients(strategy)
      entries[name] = {"kind": "gramian" if gramian else "losses"}
      loops[name] = (strategy_step(strategy), strategy.init(params))
    option_labels = options() if OPTIONS_BASE in names else ()
    if option_labels:
      base = strategies_lib.make(OPTIONS_BASE, t)
      recompute = optax_mtl.recompute_every(base, RECOMPUTE_EVERY)
      trunk_only = {"trunk": True, "heads": False}
      variants = (
          (strategy_step(base, gramian_mode="low_memory"), base),
          (strategy_step(recompute), recompute),
          (strategy_step(base, encoder_fn=encoder_fn), base),
          (strategy_step(base, shared=trunk_only), base))
      for label, (step, strategy) in zip(option_labels, variants):
        loops[label] = (step, strategy.init(params))
    timed = _compile_and_warm(loops, lr, params, batches, target)

    times = _interleaved_step_times(timed, rounds)
    baselines = {
        key: {"memory_bytes": memory_bytes(timed[key].compiled),
              "flops": flops(timed[key].compiled),
              "step_ms": float(np.min(times[key])) * 1e3}
        for key in baseline_keys}
    baselines["noise"] = _ratio(times, "plain_again", "plain")
    out["baselines"][str(t)] = baselines
    for name, entry in entries.items():
      gramian = entry["kind"] == "gramian"
      reference = "jacobian" if gramian else "plain"
      compiled = timed[name].compiled
      entry["step_ms"] = float(np.min(times[name])) * 1e3
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
      out["strategies"].setdefault(name, {})[str(t)] = entry
      progress(f"speed {model} T={t}/{name}")
    for label in option_labels:
      out["options"].setdefault(label, {})[str(t)] = {
          "step_ms": float(np.min(times[label])) * 1e3,
          "ratio_plain": _ratio(times, label, "plain"),
          "ratio_base": _ratio(times, label, OPTIONS_BASE),
          "memory_bytes": memory_bytes(timed[label].compiled)}
  return out


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
