"""What a run will cost: its units, and their measured times on this machine.

A run is a list of *units*, each ending with one progress line:

* ``<problem>/compile <kind> (<n>)``: tracing and compiling one training
  program shared by ``n`` strategies of one kind (``runner.plan_groups``);
* ``<problem>/single-task``: training the single-task baselines;
* ``<problem>/<strategy>``: training (and scoring) one strategy;
* ``speed <model> T=<t>/<strategy>``: the speed benchmark's units.

``unit_costs.json`` (beside this file) holds the CPU seconds each kind of
unit took on this project's machine, per suite and problem, written by
``python -m benchmarks --record-costs`` from a whole run: the process's
CPU time between a unit's progress line and the previous one (both worker
threads together). CPU time, not wall time, because this machine is
shared: the wall time of a unit depends on the other jobs, its CPU time
hardly does. A compilation is stored per strategy of its program.

The expected time printed at the start of a run is the sum over its units
divided by :func:`parallelism`: the runner keeps two threads busy
(compilations two at a time; trainings one at a time, XLA using both cores), counted at 80 % efficiency.
On a machine that other jobs share, the run takes longer; the progress
line's remaining time follows the run's own pace.
"""

from __future__ import annotations

import datetime
import json
import os
import re
from typing import Any, NamedTuple, Optional, Sequence

TABLE = os.path.join(os.path.dirname(__file__), "unit_costs.json")
_COMPILE = re.compile(r"^(?P<problem>[^/ ]+)/compile (?P<kind>[\w-]+) "
                      r"\((?P<count>\d+)\)$")
_SPEED = re.compile(r"^speed (?P<model>\w+) T=(?P<t>\d+)/(?P<name>.+)$")


def load_table(path: str = TABLE) -> dict[str, Any]:
  """The stored table (empty when the file is missing)."""
  if not os.path.exists(path):
    return {"suites": {}}
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _kinds(names: Sequence[str]) -> dict[str, str]:
  """name -> "losses" | "gramian" | "samples" (built at T = 4)."""
  # pylint: disable=import-outside-toplevel
  from benchmarks import runner
  from benchmarks import strategies as strategies_lib
  return {name: runner.kind_of(strategies_lib.make(name, 4))
          for name in names}


def category(label: str, kinds: dict[str, str]) -> tuple[str, str, int]:
  """``(section, key, count)`` of a unit label: where its cost is stored
  (``section`` a problem or ``"speed"``) and how many strategies it
  covers (a compilation is stored per strategy)."""
  match = _COMPILE.match(label)
  if match:
    return (match["problem"], f"compile:{match['kind']}",
            int(match["count"]))
  match = _SPEED.match(label)
  if match:
    return "speed", f"{match['model']} T={match['t']}", 1
  problem, _, name = label.partition("/")
  if name == "single-task":
    return problem, "single-task", 1
  return problem, f"run:{kinds.get(name, 'gramian')}", 1


def parallelism() -> float:
  """CPU seconds per wall second of an idle machine (see the module doc)."""
  # pylint: disable=import-outside-toplevel
  from benchmarks import runner
  return 0.8 * min(runner.COMPILE_THREADS, _cpus())


class Plan(NamedTuple):
  """The units of a run and their expected wall seconds."""

  units: list[str]              # unit labels, in run order
  expected: dict[str, float]    # label -> expected seconds
  programs: dict[str, int]      # problem -> compiled training programs
  missing: list[str]            # categories with no stored measurement
  description: str              # suite, problems, strategies, seeds
  table_note: str               # where and when the costs were measured
  measured: bool = True         # whether the suite has stored costs

  @property
  def total_seconds(self) -> float:
    return float(sum(self.expected.get(u, 0.0) for u in self.units))

  def cost_of(self, label: str) -> float:
    return self.expected.get(label, 0.0)

  def summary(self) -> str:
    if not self.measured:
      return (f"{self.description}: {len(self.units)} units; expected time "
              "unknown: no stored measurement of this suite on this "
              "machine (run it once with --record-costs to store one).")
    minutes = self.total_seconds / 60.0
    text = (f"{self.description}: {len(self.units)} units, expected "
            f"~{minutes:.0f} min on this machine when idle (from per-unit "
            f"CPU times {self.table_note})")
    if self.missing:
      text += ("; no stored time for " + ", ".join(self.missing[:4])
               + (" …" if len(self.missing) > 4 else "")
               + ", counted at the mean of the others")
    return text + "."


def plan_units(args) -> tuple[list[str], dict[str, int], dict[str, str]]:
  """The unit labels of a run, in order; programs per problem; kinds."""
  # pylint: disable=import-outside-toplevel
  from benchmarks import runner
  from benchmarks import speed
  # pylint: disable=import-outside-toplevel
  from benchmarks import strategies as strategies_lib
  kinds = _kinds(args.strategies)
  units, programs = [], {}
  for problem in args.problems:
    # toy2d is the one built-in problem with fewer than 3 tasks (T = 2).
    names = [name for name in args.strategies
             if problem != "toy2d" or strategies_lib.runs_at(name, 2)]
    groups = runner.plan_groups({name: kinds[name] for name in names})
    programs[problem] = len(groups) + (problem != "toy2d")
    if problem != "toy2d":
      units.append(f"{problem}/compile single-task (1)")
    units += [f"{problem}/compile {kind} ({len(members)})"
              for kind, members in groups]
    if problem != "toy2d":
      units.append(f"{problem}/single-task")
    units += [f"{problem}/{name}" for name in names]
  if not args.no_speed:
    for model in args.speed_models:
      tasks = args.speed_tasks or speed.model_config(model)["num_tasks"]
      units += [f"speed {model} T={t}/{name}" for t in tasks
                for name in args.strategies
                if strategies_lib.runs_at(name, t)]
  return units, programs, kinds


def plan(args, table: Optional[dict] = None) -> Plan:
  """The plan of the run that ``args`` (parsed command line) asks for."""
  table = load_table() if table is None else table
  units, programs, kinds = plan_units(args)
  stored = table.get("suites", {}).get(args.suite, {})
  known = [v for section in stored.values() for v in section.values()]
  # Without any measurement of the suite, every unit counts the same (the
  # remaining time then follows the count of units; no time is promised).
  fallback = sum(known) / len(known) if known else 1.0
  expected, missing = {}, []
  for label in units:
    section, key, count = category(label, kinds)
    value = stored.get(section, {}).get(key)
    if value is None:
      values = [s[key] for s in stored.values() if key in s]
      value = sum(values) / len(values) if values else fallback
      if f"{section} {key}" not in missing:
        missing.append(f"{section} {key}")
    expected[label] = value * count / parallelism()
  description = (f"suite {args.suite}: {', '.join(args.problems) or 'no'} "
                 f"problems × {len(args.strategies)} strategies, "
                 f"{len(args.seeds)} seeds"
                 + ("" if args.no_speed else
                    f", speed {','.join(args.speed_models)}"))
  note = table.get("note", "")
  return Plan(units, expected, programs, missing, description, note,
              bool(known))


def record(args, unit_seconds: Sequence[tuple[str, float, float]],
           path: str = TABLE) -> str:
  """Stores a run's measured unit CPU times (``(label, wall, cpu)`` per
  unit) in ``path``; returns the path."""
  kinds = _kinds(args.strategies)
  sums: dict[tuple[str, str], list[float]] = {}
  for label, _, seconds in unit_seconds:
    section, key, count = category(label, kinds)
    entry = sums.setdefault((section, key), [0.0, 0])
    entry[0] += seconds
    entry[1] += count
  table = load_table(path)
  suite = table.setdefault("suites", {}).setdefault(args.suite, {})
  for (section, key), (total, count) in sorted(sums.items()):
    suite.setdefault(section, {})[key] = round(total / max(count, 1), 2)
  load = os.getloadavg()[2] if hasattr(os, "getloadavg") else float("nan")
  table["note"] = (f"measured {datetime.date.today().isoformat()} on "
                   f"{_cpus()} CPUs, load average {load:.1f} at the end")
  with open(path, "w", encoding="utf-8") as f:
    json.dump(table, f, indent=1, sort_keys=True)
    f.write("\n")
  return path


def _cpus() -> int:
  if hasattr(os, "sched_getaffinity"):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1
