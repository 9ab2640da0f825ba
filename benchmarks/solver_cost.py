"""Solver trips per step and sequential operation counts (issue 18, item 5).

Two figures that a developer without a GPU can measure and improve, and
that stand in for kernel launches on an accelerator:

* **trips per step**: ``solver_iterations`` of every strategy with an
  iterative solver, recorded at every step of a real training run (warm:
  the state carried as in training; cold: the same step's Gramian solved
  from a fresh ``init`` state);
* **sequential operations** (:func:`sequential_ops`): the operations the
  optimised XLA program of the solver part of a step executes one after
  another, each loop unrolled by the trips it runs (:func:`loop_trips`).

Command line::

    python -m benchmarks.solver_cost [--tasks 10,40] [--steps 100]
        [--out FILE.json] [--compare BEFORE.json]

The prepared device check (:func:`device_check`, ``python -m benchmarks
--device-check``) runs these figures, the speed benchmark of the Gramian
strategies and the device's tests on a GPU within 5 minutes.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import subprocess
import sys
import time
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_mtl
from benchmarks import speed
from benchmarks import strategies as strategies_lib
from optax_mtl._src import step as step_lib
from optax_mtl._src import tree as tree_lib

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Opcodes that execute nothing: they name, group or reinterpret buffers
# (parameter, constant, tuple, get-tuple-element, bitcast), order effects
# (after-all, add-dependency, opt-barrier) or read an id (partition-id,
# replica-id). Control flow (call, while, conditional) is not counted
# itself: the operations of the computations it runs are.
FREE_OPCODES = frozenset({
    "parameter", "constant", "tuple", "get-tuple-element", "bitcast",
    "after-all", "add-dependency", "opt-barrier", "partition-id",
    "replica-id", "domain",
})
_CONTROL_OPCODES = frozenset({"call", "while", "conditional"})

_COMPUTATION_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_TRIP_COUNT = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)')


def _attribute(text: str, key: str) -> Optional[str]:
  match = re.search(r"\b" + key + r"=%?([\w.\-]+)", text)
  return match.group(1) if match else None


def _branches(text: str) -> list[str]:
  match = re.search(r"\bbranch_computations=\{([^}]*)\}", text)
  if match:
    return [name.strip().lstrip("%") for name in match.group(1).split(",")]
  return [name for name in (_attribute(text, "true_computation"),
                            _attribute(text, "false_computation")) if name]


def _opcode(rest: str) -> str:
  """The opcode of an instruction's right-hand side ``shape opcode(...)``."""
  rest = rest.lstrip()
  if rest.startswith("("):  # A tuple shape: skip its balanced parentheses.
    depth = 0
    for index, char in enumerate(rest):
      depth += char == "("
      depth -= char == ")"
      if depth == 0:
        rest = rest[index + 1:]
        break
  else:
    parts = rest.split(None, 1)
    rest = parts[1] if len(parts) == 2 else ""
  match = re.match(r"\s*([\w\-]+)\(", rest)
  if not match:
    raise ValueError(f"cannot read the opcode of HLO instruction {rest!r}")
  return match.group(1)


def parse_hlo(text: str) -> tuple[dict[str, list[tuple[str, str, str]]], str]:
  """HLO text -> ({computation: [(name, opcode, text)]}, entry name)."""
  computations: dict[str, list[tuple[str, str, str]]] = {}
  entry, current = None, None
  for line in text.splitlines():
    if current is None:
      header = _COMPUTATION_HEADER.match(line)
      if header and not line.startswith(" "):
        current = header.group(2)
        computations[current] = []
        if header.group(1):
          entry = current
      continue
    if line.strip() == "}":
      current = None
      continue
    instruction = _INSTRUCTION.match(line)
    if instruction:
      computations[current].append(
          (instruction.group(2), _opcode(instruction.group(3)), line))
  if entry is None:
    raise ValueError("the HLO text has no ENTRY computation")
  return computations, entry


Trips = Union[None, int, Mapping[str, int]]


class _Counter:
  """Counts a parsed module's sequential operations, loops unrolled."""

  def __init__(self, computations, trips: Trips, label: str = "given"):
    self.computations = computations
    self.trips = trips
    self.label = label
    self.loops: list[dict[str, Any]] = []

  def _loop_trips(self, name: str, text: str) -> tuple[int, str]:
    known = _TRIP_COUNT.search(text)
    if known:
      return int(known.group(1)), "known"
    if isinstance(self.trips, Mapping):
      if name in self.trips:
        return int(self.trips[name]), self.label
    elif self.trips is not None:
      return int(self.trips), self.label
    return 1, "assumed_once"

  def count(self, computation: str, depth: int = 0) -> tuple[int, int]:
    """(operations outside every loop, all operations) of one run."""
    outside = total = 0
    for name, opcode, text in self.computations[computation]:
      if opcode in FREE_OPCODES:
        continue
      if opcode not in _CONTROL_OPCODES:
        outside += 1
        total += 1
      elif opcode == "call":
        sub_outside, sub_total = self.count(_attribute(text, "to_apply"),
                                            depth)
        outside += sub_outside
        total += sub_total
      elif opcode == "conditional":
        # The larger branch (by all its operations); its loops are recorded.
        best = None
        for branch in _branches(text):
          counter = _Counter(self.computations, self.trips, self.label)
          result = counter.count(branch, depth)
          if best is None or result[1] > best[0][1]:
            best = (result, counter.loops)
        if best is not None:
          outside += best[0][0]
          total += best[0][1]
          self.loops.extend(best[1])
      else:
        total += self._while(name, text, depth)
    return outside, total

  def _while(self, name: str, text: str, depth: int) -> int:
    record = dict(name=name, depth=depth)
    self.loops.append(record)
    first_nested = len(self.loops)
    condition = self.count(_attribute(text, "condition"), depth + 1)[1]
    body = self.count(_attribute(text, "body"), depth + 1)[1]
    trips, source = self._loop_trips(name, text)
    if trips == 0:  # The loops inside never ran: none was measured.
      for nested in self.loops[first_nested:]:
        nested.update(trips=0, trip_source="not run")
    # The condition runs once more than the body: the check that exits.
    loop_total = trips * (condition + body) + condition
    record.update(trips=trips, trip_source=source, per_trip=condition + body,
                  condition=condition, body=body, total=loop_total)
    return loop_total


def count_hlo(text: str, trips: Trips = None,
              label: str = "given") -> dict[str, Any]:
  """:func:`sequential_ops` of an optimised HLO module's text (``label``:
  the ``trip_source`` of the loops whose trips ``trips`` gives)."""
  computations, entry = parse_hlo(text)
  counter = _Counter(computations, trips, label)
  outside, total = counter.count(entry)
  return dict(
      outside_loops=outside,
      per_trip={loop["name"]: loop["per_trip"] for loop in counter.loops},
      loops=counter.loops,
      assumed_once=[loop["name"] for loop in counter.loops
                    if loop["trip_source"] == "assumed_once"],
      total=total)


def sequential_ops(fn: Callable, *args, trips: Trips = None) -> dict[str, Any]:
  """The operations ``jax.jit(fn)(*args)`` executes one after another.

  Reads the optimised HLO of ``jax.jit(fn).lower(*args).compile()`` and
  counts the instructions of the entry computation, a fusion or a library
  call (LAPACK, cuSOLVER: a ``custom-call``) as one, the free ones
  (:data:`FREE_OPCODES`: parameter, constant, tuple, get-tuple-element,
  bitcast, ...) as none. A ``call`` counts the operations of the
  computation it calls; a ``conditional`` those of its larger branch; a
  ``while`` ``trips · (c + b) + c``, with ``c`` and ``b`` the operations of
  its condition and body (counted recursively, nested loops unrolled; the
  condition runs once more than the body). A loop's trips are XLA's
  ``known_trip_count`` where the compiler knows it, else ``trips``: an int
  for every such loop (a nested loop is then unrolled by it too) or a
  mapping from the ``while`` instruction's name; else 1, and the loop is
  listed in ``assumed_once``. Computations applied element-wise or by a
  reduction (``fusion``'s ``calls=``, ``reduce``'s ``to_apply=``) are
  inside their one operation.

  Args:
    fn: a function of arrays, jittable.
    *args: its arguments (arrays or ``jax.ShapeDtypeStruct``).
    trips: the trips of loops whose count XLA does not know (see above).

  Returns:
    ``{"outside_loops": int, "per_trip": {while name: c + b}, "loops":
    [{"name", "depth", "trips", "trip_source" ("known", "given" or
    "assumed_once"), "per_trip", "condition", "body", "total"}],
    "assumed_once": [names], "total": int}``; ``total`` counts every
    operation executed, ``outside_loops`` those not inside any loop.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> def f(x):
    ...   return jax.lax.fori_loop(0, 5, lambda i, y: jnp.sin(y) @ y, x)
    >>> ops = sequential_ops(f, jnp.ones((3, 3)))
    >>> [loop["trips"] for loop in ops["loops"]]
    [5]
  """
  text = optimised_hlo(fn, *args)
  if isinstance(trips, str):
    if trips != "measured":
      raise ValueError(f"trips must be None, an int, a mapping or "
                       f"'measured', got {trips!r}.")
    return count_hlo(text, match_trips(text, loop_trips(fn, *args)),
                     label="measured")
  return count_hlo(text, trips)


def optimised_hlo(fn: Callable, *args) -> str:
  """The optimised HLO text of ``jax.jit(fn)`` on ``args``, compiled afresh:
  an executable from the persistent compilation cache keeps the source
  locations of the code it was first compiled from (its key leaves them
  out), which :func:`match_trips` reads."""
  enabled = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  try:
    return jax.jit(fn).lower(*args).compile().as_text()
  finally:
    jax.config.update("jax_enable_compilation_cache", enabled)


def while_sources(text: str) -> dict[str, list[tuple[str, int]]]:
  """``{while name: [(file's base name, line), ...]}``, innermost frame
  first: where in Python each loop of an HLO module was built (from the
  module's stack-frame tables; empty where the text has none)."""
  tables: dict[str, dict[int, str]] = {}
  section = None
  for line in text.splitlines():
    if line.strip() in ("FileNames", "FunctionNames", "FileLocations",
                        "StackFrames"):
      section = line.strip()
      tables[section] = {}
      continue
    match = re.match(r"^(\d+) (.*)$", line)
    if section and match:
      tables[section][int(match.group(1))] = match.group(2)
    elif not line.strip() or line.startswith(("%", "ENTRY", "HloModule")):
      section = None
  files = {k: os.path.basename(v.strip('"'))
           for k, v in tables.get("FileNames", {}).items()}
  locations, frames = {}, {}
  for key, value in tables.get("FileLocations", {}).items():
    fields = dict(re.findall(r"(\w+)=(\d+)", value))
    locations[key] = (files.get(int(fields.get("file_name_id", 0)), "?"),
                      int(fields.get("line", 0)))
  for key, value in tables.get("StackFrames", {}).items():
    fields = dict(re.findall(r"(\w+)=(\d+)", value))
    frames[key] = (int(fields.get("file_location_id", 0)),
                   int(fields.get("parent_frame_id", 0)))
  sources = {}
  for line in text.splitlines():
    instruction = _INSTRUCTION.match(line)
    if not instruction or " while(" not in line:
      continue
    frame = re.search(r"stack_frame_id=(\d+)", line)
    chain, seen = [], set()
    frame_id = int(frame.group(1)) if frame else 0
    while frame_id in frames and frame_id not in seen:
      seen.add(frame_id)
      location_id, parent = frames[frame_id]
      chain.append(locations.get(location_id, ("?", 0)))
      frame_id = parent
    sources[instruction.group(2)] = chain
  return sources


def loop_trips(fn: Callable, *args) -> list[dict[str, Any]]:
  """The trips of every ``lax.while_loop`` that ``fn(*args)`` runs.

  Runs ``fn`` once, eagerly (``jax.disable_jit``, so that each loop runs
  in Python), with ``jax.lax.while_loop`` counting its body's calls.

  Returns:
    ``[{"stack": [(file's base name, line), ...] (innermost first, user
    frames only, as in XLA's metadata), "trips": int}]`` in the order the
    loops finished.
  """
  from jax._src import source_info_util  # pylint: disable=import-outside-toplevel
  records: list[dict[str, Any]] = []
  original = jax.lax.while_loop

  def counting_while_loop(cond_fun, body_fun, init_val):
    trips = [0]

    def body(value):
      trips[0] += 1
      return body_fun(value)

    stack, frame = [], sys._getframe(1)  # pylint: disable=protected-access
    while frame is not None:
      if source_info_util.is_user_filename(frame.f_code.co_filename):
        stack.append((os.path.basename(frame.f_code.co_filename),
                      frame.f_lineno))
      frame = frame.f_back
    out = original(cond_fun, body, init_val)
    records.append({"stack": stack, "trips": trips[0]})
    return out

  jax.lax.while_loop = counting_while_loop
  try:
    with jax.disable_jit():
      jax.block_until_ready(fn(*args))
  finally:
    jax.lax.while_loop = original
  return records


def match_trips(text: str, records: Sequence[dict[str, Any]]
                ) -> dict[str, int]:
  """``{while name: trips}`` for the loops of an HLO module that
  :func:`loop_trips` records: each record goes to the loop whose source
  stack shares the most innermost frames with its own; a loop given several
  records (one inside another loop) gets their mean, rounded. Loops with no
  record (a branch not taken, say) are left out."""
  sources = while_sources(text)
  matched: dict[str, list[int]] = {}
  for record in records:
    best, best_length = None, 0
    for name, chain in sources.items():
      length = 0
      for ours, theirs in zip(record["stack"], chain):
        if ours != theirs:
          break
        length += 1
      if length > best_length:
        best, best_length = name, length
    if best is not None:
      matched.setdefault(best, []).append(record["trips"])
  return {name: int(round(float(np.mean(trips))))
          for name, trips in matched.items()}


# --------------------------------------------------------------------------
# Trips per step over a real training run, and the solver part's count.
# --------------------------------------------------------------------------

DEFAULT_TASKS = (10, 40)
# The speed benchmark's MLP, a new minibatch at every step, trained by Adam.
CONFIG = dict(model="mlp", steps=100, first_step=20, learning_rate=1e-3)
# Parameters to build a state from where their shapes do not matter (the
# state of a strategy that reads the Gramian does not depend on them).
_PARAMS = {"w": np.zeros((1,), np.float32)}


def solver_strategies(names: Optional[Sequence[str]] = None,
                      num_tasks: int = 10) -> list[str]:
  """The strategies of ``benchmarks/strategies.py`` (or ``names``) whose state
  has ``solver_iterations`` at ``num_tasks`` tasks."""
  names = strategies_lib.resolve(names)
  # runs_at: the strategies defined at this T (older trees lack it).
  runs_at = getattr(strategies_lib, "runs_at", lambda name, t: True)
  return [name for name in names
          if runs_at(name, num_tasks) and hasattr(
              strategies_lib.make(name, num_tasks).init(_PARAMS),
              "solver_iterations")]


def solver_part(strategy: Any) -> Callable:
  """``(gramian, task_losses, state) -> (weights, new_state)``: what a step of
  ``optax_mtl.value_and_grad`` runs between the Gramian and the weighted
  backward pass (the strategy's guarded rule, as the engine calls it)."""
  weighting, options = step_lib.strategy_parts(strategy)
  options = options._replace(recompute_every=1)

  def part(gramian, task_losses, state):
    return step_lib.weights_step(weighting, options, task_losses, state,
                                 lambda: gramian)

  return part


def _statistics(values: np.ndarray) -> dict[str, float]:
  return {"median": float(np.median(values)),
          "p95": float(np.percentile(values, 95)),
          "max": int(np.max(values)), "mean": float(np.mean(values))}


def trips_per_step(name: str, num_tasks: int,
                   config: Optional[dict] = None) -> dict[str, Any]:
  """``solver_iterations`` at every step of a training run, warm and cold.

  Trains the speed benchmark's MLP (``speed.make_model``, a new minibatch
  at every step) with ``optax_mtl.value_and_grad(loss_fn, strategy)`` and
  Adam for ``steps`` steps. Warm: the trips of the step as trained (state
  carried). Cold: the same step (same parameters and minibatch, hence the
  same Gramian) solved from a fresh ``init`` state.

  Returns:
    ``{"warm": [int] * steps, "cold": [int] * steps, "warm_stats",
    "cold_stats"}``, the statistics (median, p95, max, mean) over steps
    ``first_step`` to ``steps - 1``, and ``"median_step"``: ``{"index":
    {"warm": int, "cold": int}, "inputs": {"warm": (gramian, task_losses,
    state), "cold": (...)}}``, the solver part's inputs at the first of
    those steps whose warm (cold) trips are closest to their median (for
    :func:`solver_ops`).
  """
  cfg = dict(CONFIG, **(config or {}))
  model_cfg = speed.model_config(cfg["model"], {
      "num_batches": cfg["steps"], **cfg.get("model_config", {})})
  params, loss_fn, batches, _, _ = speed.make_model(num_tasks, model_cfg)
  strategy = strategies_lib.make(name, num_tasks)
  step = optax_mtl.value_and_grad(loss_fn, strategy)
  optimizer = optax.adam(cfg["learning_rate"])

  @jax.jit
  def train_step(params, opt_state, state, batch):
    (_, grads), new_state = step(params, state, batch)
    _, cold_state = step(params, strategy.init(params), batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state, new_state,
            new_state.solver_iterations, cold_state.solver_iterations)

  state, opt_state = strategy.init(params), optimizer.init(params)
  warm, cold, history = [], [], []
  for index in range(cfg["steps"]):
    batch = jax.tree.map(lambda b, i=index: b[i], batches)
    history.append((params, state, batch))
    params, opt_state, state, warm_trips, cold_trips = train_step(
        params, opt_state, state, batch)
    warm.append(int(warm_trips))
    cold.append(int(cold_trips))
  kept = slice(cfg["first_step"], cfg["steps"])
  out = {"warm": warm, "cold": cold, "median_step": {"index": {},
                                                     "inputs": {}}}
  for key, trips in (("warm", warm), ("cold", cold)):
    stats = out[f"{key}_stats"] = _statistics(np.asarray(trips[kept]))
    index = cfg["first_step"] + int(np.argmin(
        np.abs(np.asarray(trips[kept]) - stats["median"])))
    params, state, batch = history[index]
    out["median_step"]["index"][key] = index
    out["median_step"]["inputs"][key] = (
        *_gramian_and_losses(loss_fn, params, batch),
        state if key == "warm" else strategy.init(params))
  return out


@functools.partial(jax.jit, static_argnums=0)
def _gramian_and_losses(loss_fn, params, batch):
  """The Gramian and float32 losses that the engine's step computes."""
  task_losses, vjp_fn = jax.vjp(lambda p: loss_fn(p, batch), params)
  task_grads = jax.vmap(vjp_fn)(jnp.eye(task_losses.shape[0],
                                        dtype=task_losses.dtype))[0]
  mask = tree_lib.shared_mask(None, params)
  return (tree_lib.gramian(task_grads, mask),
          task_losses.astype(jnp.float32))


def solver_ops(name: str, num_tasks: int,
               inputs: Mapping[str, tuple]) -> dict[str, Any]:
  """:func:`sequential_ops` of :func:`solver_part`, for each entry of
  ``inputs`` (``{"warm": (gramian, task_losses, state), ...}``), every loop
  unrolled by the trips it runs on those inputs (:func:`loop_trips`); the
  program is compiled once.

  Returns:
    ``{"outside_loops", "loops": [{"name", "depth", "per_trip",
    "trips_<key>"}], "unmatched_loops" (loops given no trips, counted
    once), "total_<key>"}``.
  """
  part = solver_part(strategies_lib.make(name, num_tasks))
  first = next(iter(inputs.values()))
  text = optimised_hlo(part, *first)
  out: dict[str, Any] = {}
  for key, args in inputs.items():
    ops = count_hlo(text, match_trips(text, loop_trips(part, *args)),
                    label="measured")
    out.setdefault("outside_loops", ops["outside_loops"])
    loops = out.setdefault("loops", [
        {k: loop[k] for k in ("name", "depth", "per_trip")}
        for loop in ops["loops"]])
    for record, loop in zip(loops, ops["loops"]):
      record[f"trips_{key}"] = loop["trips"]
    out["unmatched_loops"] = len(ops["assumed_once"])
    out[f"total_{key}"] = ops["total"]
  return out


def _git_state() -> dict[str, Any]:
  """HEAD's commit and the package's uncommitted files (the run's code)."""
  def git(*command):
    try:
      return subprocess.run(("git",) + command, capture_output=True, text=True,
                            check=True, cwd=_ROOT).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
      return None
  status = git("status", "--porcelain", "--", "optax_mtl")
  return {"commit": git("rev-parse", "HEAD"),
          "uncommitted": status.splitlines() if status else []}


def run(names: Optional[Sequence[str]] = None,
        num_tasks: Sequence[int] = DEFAULT_TASKS,
        config: Optional[dict] = None,
        progress: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
  """Trips per step and sequential operations of every solver strategy.

  Returns:
    ``{"config", "git", "machine", "strategies": {name: {T: {"warm",
    "cold" (statistics of :func:`trips_per_step`), "trips": {"warm",
    "cold"} (per step), "ops": {"step": the median step, **}:func:`solver_ops`
    on that step's inputs, warm and cold}}}`` (T as a string key).
  """
  cfg = dict(CONFIG, **(config or {}))
  progress = progress or (lambda label: None)
  out: dict[str, Any] = {
      "config": {**cfg, "num_tasks": list(num_tasks)}, "git": _git_state(),
      "machine": {"backend": jax.default_backend(),
                  "devices": [str(d) for d in jax.devices()]},
      "strategies": {}}
  for t in num_tasks:
    for name in solver_strategies(names, t):
      trips = trips_per_step(name, t, cfg)
      median_step = trips["median_step"]
      out["strategies"].setdefault(name, {})[str(t)] = {
          "warm": trips["warm_stats"], "cold": trips["cold_stats"],
          "trips": {"warm": trips["warm"], "cold": trips["cold"]},
          "ops": {"step": median_step["index"],
                  **solver_ops(name, t, median_step["inputs"])}}
      progress(f"{name} T={t}")
  return out


def _rows(result: dict[str, Any]):
  for name, by_t in result["strategies"].items():
    for t, entry in by_t.items():
      yield name, t, entry


def table(result: dict[str, Any]) -> str:
  """A Markdown table: trips (median / p95, cold and warm) and operations."""
  lines = ["| strategy | T | trips cold (median / p95) | trips warm "
           "(median / p95) | ops outside loops | ops per step, warm (loop "
           "trips; at step) | ops per step, cold (loop trips; at step) |",
           "|---|---|---|---|---|---|---|"]
  for name, t, entry in _rows(result):
    ops = entry["ops"]
    cells = []
    for key in ("warm", "cold"):
      trips = "+".join(str(loop.get(f"trips_{key}", "?"))
                       for loop in ops["loops"]) or "no loop"
      step = ops.get("step", {})
      step = step.get(key, "?") if isinstance(step, dict) else step
      cells.append(f"{ops[f'total_{key}']} ({trips}; step {step})")
    unmatched = (f" ({ops['unmatched_loops']} loops counted once)"
                 if ops.get("unmatched_loops") else "")
    lines.append(
        f"| {name} | {t} | {entry['cold']['median']:g} / "
        f"{entry['cold']['p95']:g} | {entry['warm']['median']:g} / "
        f"{entry['warm']['p95']:g} | {ops['outside_loops']} | {cells[0]} | "
        f"{cells[1]}{unmatched} |")
  return "\n".join(lines)


def compare(before: dict[str, Any], after: dict[str, Any]) -> str:
  """A Markdown table of before, after and after ÷ before for each figure."""
  figures = (("trips warm median", lambda e: e["warm"]["median"]),
             ("trips warm p95", lambda e: e["warm"]["p95"]),
             ("trips cold median", lambda e: e["cold"]["median"]),
             ("ops per step (warm)", lambda e: e["ops"]["total_warm"]),
             ("ops per step (cold)", lambda e: e["ops"]["total_cold"]))
  lines = ["| strategy | T | " + " | ".join(
      f"{label} before / after (ratio)" for label, _ in figures) + " |",
           "|---|---|" + "---|" * len(figures)]
  for name, t, entry in _rows(after):
    old = before["strategies"].get(name, {}).get(t)
    cells = []
    for _, read in figures:
      new_value = read(entry)
      if old is None:
        cells.append(f"– / {new_value:g}")
        continue
      old_value = read(old)
      ratio = (f"{new_value / old_value:.2f}" if old_value else
               ("1" if new_value == old_value else "–"))
      cells.append(f"{old_value:g} / {new_value:g} ({ratio})")
    lines.append(f"| {name} | {t} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


# --------------------------------------------------------------------------
# The prepared device check (issue 18, item 6).
# --------------------------------------------------------------------------

DEVICE_OUT = os.path.join("benchmarks", "results", "device")
# What `python -m benchmarks --device-check` runs, in this order, each part
# only if its estimate fits in what is left of budget_seconds (5 minutes
# less a margin for starting Python and JAX).
DEVICE_CHECK = dict(
    budget_seconds=270.0,
    # (model, T) of the speed benchmark, the Gramian strategies and the
    # Jacobian-only baseline; fewer, shorter rounds than on the shared CPU
    # (a lent GPU is quiet).
    speed=(("mlp", 2), ("mlp", 10), ("mlp", 40), ("conv", 2), ("conv", 10)),
    speed_config={"rounds": 5, "target_seconds": 0.02},
    trips_tasks=DEFAULT_TASKS,
    trips_strategies=None,  # None: every strategy with a solver.
    trips_config={"steps": 100},
    tests=("tests/test_solvers.py",),
    # Seconds each part is expected to take on an H100 (compilation
    # dominates); a speed part's estimate grows to the last one measured.
    estimates={"speed": 30.0, "trips": 25.0, "tests": 30.0},
)


def has_accelerator() -> bool:
  """Whether JAX's default backend is a GPU or TPU."""
  return jax.default_backend() != "cpu"


def gramian_strategies(num_tasks: int) -> list[str]:
  """The strategies of ``benchmarks/strategies.py`` that read the Gramian."""
  runs_at = getattr(strategies_lib, "runs_at", lambda name, t: True)
  return [name for name in strategies_lib.STRATEGIES
          if runs_at(name, num_tasks)
          and optax_mtl.weighting_of(strategies_lib.make(
              name, num_tasks)).needs is optax_mtl.Needs.GRAMIAN]


def _device_info() -> dict[str, Any]:
  devices = jax.devices()
  info = {"backend": jax.default_backend(), "jax": jax.__version__,
          "devices": [str(d) for d in devices],
          "device_kind": [d.device_kind for d in devices],
          "git": _git_state()}
  try:
    info["nvidia_smi"] = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
         "--format=csv,noheader"], capture_output=True, text=True,
        timeout=20, check=True).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    info["nvidia_smi"] = None
  return info


def _merge_speed(total: dict[str, Any], part: dict[str, Any]) -> None:
  """Adds one (model, T) :func:`speed.run_speed` result to ``total``."""
  model = total.setdefault(part["model"], {
      "model": part["model"], "config": part["config"], "num_tasks": [],
      "baselines": {}, "strategies": {}, "options": {}})
  model["num_tasks"] = model["config"]["num_tasks"] = (
      model["num_tasks"] + list(part["num_tasks"]))
  model["baselines"].update(part["baselines"])
  for key in ("strategies", "options"):
    for name, by_t in part[key].items():
      model[key].setdefault(name, {}).update(by_t)


class _Budget:
  """Seconds left of the device check, and the log of what ran or not."""

  def __init__(self, seconds: float):
    self.started, self.seconds = time.perf_counter(), seconds
    self.log: list[dict[str, Any]] = []

  def left(self) -> float:
    return self.seconds - (time.perf_counter() - self.started)

  def run(self, label: str, estimate: float, fn: Callable[[], Any]):
    """``fn()`` if ``estimate`` fits in what is left, else None (logged)."""
    if estimate > self.left():
      self.log.append({"part": label, "skipped": (
          f"expected {estimate:.0f} s, {max(self.left(), 0):.0f} s left")})
      print(f"  skipped {label}: {self.log[-1]['skipped']}", flush=True)
      return None
    start = time.perf_counter()
    result = fn()
    self.log.append({"part": label,
                     "seconds": round(time.perf_counter() - start, 1)})
    print(f"  {label}: {self.log[-1]['seconds']} s "
          f"({max(self.left(), 0):.0f} s left)", flush=True)
    return result


def _write_json(path: str, value: Any) -> None:
  with open(path, "w", encoding="utf-8") as file:
    json.dump(value, file, indent=1, default=str)


def _device_tests(check: dict[str, Any], budget: _Budget, out_dir: str):
  """Runs the device's pytest subset, stopped at what is left of the
  budget; its output goes to ``tests.log``."""
  command = [sys.executable, "-m", "pytest", "-q", "-x", "-p",
             "no:cacheprovider", *check["tests"]]
  try:
    done = subprocess.run(command, capture_output=True, text=True,
                          cwd=_ROOT, timeout=max(budget.left(), 1.0))
    output, status = done.stdout + done.stderr, done.returncode
  except subprocess.TimeoutExpired as error:
    output = (error.stdout or b"").decode() if isinstance(
        error.stdout, bytes) else (error.stdout or "")
    status = "stopped: the budget ran out"
  with open(os.path.join(out_dir, "tests.log"), "w", encoding="utf-8") as file:
    file.write(" ".join(command) + "\n" + output)
  tail = output.strip().splitlines()[-1:] or [""]
  return {"command": " ".join(command), "status": status, "last": tail[0]}


def device_check(out_dir: str = DEVICE_OUT, allow_cpu: bool = False,
                 check: Optional[dict] = None) -> dict[str, Any]:
  """The prepared device check: speed, trips and op counts, device tests.

  Runs, each only if it fits in ``budget_seconds`` (:data:`DEVICE_CHECK`):
  the speed benchmark of the Gramian strategies and the Jacobian-only step
  (MLP at T = 2, 10, 40, conv trunk at T = 2, 10), :func:`run` (trips per
  step and sequential operations at T = 10 and 40, on the device's own
  optimised programs) and the device's pytest subset. Writes into
  ``out_dir``: ``device.json`` (``jax.devices()``, the card's name),
  ``results.json`` and ``report.md`` (the report generator's files, merge
  them with ``python -m benchmarks --from-results``), ``solver_cost.json``
  and ``solver_cost.md``, ``tests.log`` and ``summary.json`` (what ran, how
  long, what was skipped and why).

  Raises:
    SystemExit: no GPU or TPU is found and ``allow_cpu`` is False.
  """
  check = {**DEVICE_CHECK, **(check or {})}
  if not has_accelerator() and not allow_cpu:
    raise SystemExit(
        "--device-check: no GPU or TPU found (jax.default_backend() is "
        f"{jax.default_backend()!r}, devices {jax.devices()}); run it on a "
        "machine with an accelerator, or add --allow-cpu to try it here.")
  budget = _Budget(check["budget_seconds"])
  os.makedirs(out_dir, exist_ok=True)
  info = _device_info()
  _write_json(os.path.join(out_dir, "device.json"), info)
  print(f"device check on {info['device_kind']} ({info['backend']}), "
        f"{check['budget_seconds']:.0f} s budget; writing {out_dir}",
        flush=True)
  speed_out: dict[str, Any] = {}
  estimate = check["estimates"]["speed"]
  for model, t in check["speed"]:
    part = budget.run(f"speed {model} T={t}", estimate, lambda m=model, t=t: (
        speed.run_speed(gramian_strategies(t), [t], check["speed_config"],
                        model=m)))
    if part is not None:
      _merge_speed(speed_out, part)
      estimate = max(estimate, budget.log[-1]["seconds"])
  trips = budget.run("trips and op counts",
                     check["estimates"]["trips"] * len(check["trips_tasks"]),
                     lambda: run(check["trips_strategies"],
                                 check["trips_tasks"],
                                 check["trips_config"]))
  if trips is not None:
    _write_json(os.path.join(out_dir, "solver_cost.json"), trips)
    with open(os.path.join(out_dir, "solver_cost.md"), "w",
              encoding="utf-8") as file:
      file.write(table(trips) + "\n")
  tests = (budget.run("device tests", check["estimates"]["tests"],
                      lambda: _device_tests(check, budget, out_dir))
           if check["tests"] else None)
  from benchmarks import report  # pylint: disable=import-outside-toplevel
  meta = {"command": "python -m benchmarks --device-check",
          "machine": {"backend": info["backend"],
                      "cpu": ", ".join(info["device_kind"]),
                      "jax": info["jax"], "nproc": os.cpu_count()},
          "wall_seconds": time.perf_counter() - budget.started}
  paths = (report.write_report({}, out_dir, speed=speed_out, meta=meta)
           if speed_out else {})
  summary = {"device": info, "budget_seconds": check["budget_seconds"],
             "wall_seconds": round(meta["wall_seconds"], 1),
             "parts": budget.log, "tests": tests, "report": paths}
  _write_json(os.path.join(out_dir, "summary.json"), summary)
  print(f"device check done in {summary['wall_seconds']:.0f} s; results in "
        f"{out_dir}", flush=True)
  return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m benchmarks.solver_cost",
      description="Solver trips per step (cold and warm) over a training run "
                  "of the speed benchmark's MLP, and the sequential operation "
                  "count of each solver strategy's part of a step.")
  parser.add_argument("--tasks", default=",".join(map(str, DEFAULT_TASKS)),
                      help="comma-separated task counts (default 10,40)")
  parser.add_argument("--strategies", default=None,
                      help="comma-separated names (default: every strategy "
                           "of benchmarks/strategies.py with a solver)")
  parser.add_argument("--steps", type=int, default=CONFIG["steps"],
                      help=f"training steps (default {CONFIG['steps']}); "
                           f"statistics from step {CONFIG['first_step']}")
  parser.add_argument("--out", default=None, help="write the JSON here")
  parser.add_argument("--compare", default=None, metavar="BEFORE_JSON",
                      help="also print before / after / ratio against an "
                           "earlier --out file")
  args = parser.parse_args(argv)
  names = ([n.strip() for n in args.strategies.split(",") if n.strip()]
           if args.strategies else None)
  tasks = [int(t) for t in args.tasks.split(",") if t.strip()]
  started = time.perf_counter()
  result = run(names, tasks, {"steps": args.steps,
                              "first_step": min(CONFIG["first_step"],
                                                args.steps - 1)},
               progress=lambda label: print(
                   f"  {label} ({time.perf_counter() - started:.0f} s)",
                   file=sys.stderr, flush=True))
  result["wall_seconds"] = time.perf_counter() - started
  print(table(result))
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as file:
      json.dump(result, file, indent=1)
    print(f"written: {args.out}")
  if args.compare:
    with open(args.compare, encoding="utf-8") as file:
      print("\n" + compare(json.load(file), result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
