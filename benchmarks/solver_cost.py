"""Solver trips per step and sequential operation counts (issue 18, item 5).

Two figures that a developer without a GPU can measure and improve, and
that stand in for kernel launches on an accelerator:

* **trips per step**: ``solver_iterations`` of every strategy with an
  iterative solver, recorded at every step of a real training run (warm:
  the state carried as in training; cold: the same step's Gramian solved
  from a fresh ``init`` state);
* **sequential operations** (:func:`sequential_ops`): the operations the
  optimised XLA program of the solver part of a step executes one after
  another, loops unrolled by their trip counts.

Command line::

    python -m benchmarks.solver_cost [--tasks 10,40] [--steps 100]
        [--out FILE.json] [--compare BEFORE.json]
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Optional, Union

import jax

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

  def __init__(self, computations, trips: Trips):
    self.computations = computations
    self.trips = trips
    self.loops: list[dict[str, Any]] = []

  def _loop_trips(self, name: str, text: str) -> tuple[int, str]:
    known = _TRIP_COUNT.search(text)
    if known:
      return int(known.group(1)), "known"
    if isinstance(self.trips, Mapping):
      if name in self.trips:
        return int(self.trips[name]), "given"
    elif self.trips is not None:
      return int(self.trips), "given"
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
          counter = _Counter(self.computations, self.trips)
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
    condition = self.count(_attribute(text, "condition"), depth + 1)[1]
    body = self.count(_attribute(text, "body"), depth + 1)[1]
    trips, source = self._loop_trips(name, text)
    # The condition runs once more than the body: the check that exits.
    loop_total = trips * (condition + body) + condition
    record.update(trips=trips, trip_source=source, per_trip=condition + body,
                  condition=condition, body=body, total=loop_total)
    return loop_total


def count_hlo(text: str, trips: Trips = None) -> dict[str, Any]:
  """:func:`sequential_ops` of an optimised HLO module's text."""
  computations, entry = parse_hlo(text)
  counter = _Counter(computations, trips)
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
  text = jax.jit(fn).lower(*args).compile().as_text()
  return count_hlo(text, trips)
