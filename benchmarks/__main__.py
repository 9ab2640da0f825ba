"""Command line: ``python -m benchmarks [--suite quick|full|paper] ...``."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import threading
import time
from typing import Optional, Sequence

SUITES = {
    # The quick suite (`make bench`) runs on built-in data only, with two
    # seeds, and times the step at T = 10 on the MLP only: the size where
    # the Gramian strategies' step (one backward pass per task) separates
    # from the loss-only ones'. Its problems' budgets are the "quick"
    # CONFIGS of benchmarks/problems/<name>.py.
    "quick": dict(problems=("scales", "digits", "manytask", "toy2d"),
                  seeds=2, speed_models=("mlp",), speed_tasks=(10,)),
    # The publication run (`make bench-full`, benchmarks/RESULTS.md): the
    # quick problems with twice the step budgets and five seeds, both speed
    # models at every T of benchmarks/speed.py. It fits a session on this
    # project's 2-core machine (the time is in the README).
    "full": dict(problems=("scales", "digits", "manytask", "toy2d"),
                 seeds=5, speed_models=("mlp", "conv"), speed_tasks=None),
    # The papers' sizes (manytask at T = 128, scales at 250 -> 100, larger
    # digits): for a bigger machine; hours on 2 CPU cores.
    "paper": dict(problems=("scales", "digits", "manytask", "toy2d"),
                  seeds=5, speed_models=("mlp", "conv"), speed_tasks=None),
}
CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "optax_mtl",
                         "jax_compilation_cache")


def parse_seeds(text: str) -> list[int]:
  """``"3"`` -> [0, 1, 2]; ``"0,4,7"`` -> [0, 4, 7]."""
  parts = [p for p in text.split(",") if p.strip()]
  if not parts:
    raise argparse.ArgumentTypeError("--seeds needs a count or a list")
  try:
    values = [int(p) for p in parts]
  except ValueError as error:
    raise argparse.ArgumentTypeError(f"bad --seeds {text!r}") from error
  if len(values) == 1 and "," not in text:
    if values[0] < 1:
      raise argparse.ArgumentTypeError("--seeds must be >= 1")
    return list(range(values[0]))
  return values


def build_parser() -> argparse.ArgumentParser:
  from benchmarks import problems  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(
      prog="python -m benchmarks",
      description="optax_mtl benchmark suite: every strategy against "
                  "single-task baselines, plus step time and memory.")
  parser.add_argument("--suite", choices=sorted(SUITES), default="quick",
                      help="problem sizes and seeds (default: quick)")
  parser.add_argument("--problem", action="append", choices=problems.ALL,
                      dest="problems", metavar="NAME",
                      help="run only this problem (repeatable); one of "
                           f"{', '.join(problems.ALL)}; 'celeba' and 'pcba' "
                           "need --data-dir")
  parser.add_argument("--strategies", default=None,
                      help="comma-separated optax_mtl strategy names "
                           "(default: benchmarks/strategies.py)")
  parser.add_argument("--seeds", type=parse_seeds, default=None,
                      help="a number of seeds (3 -> 0,1,2) or a list 0,4,7")
  parser.add_argument("--out", default="bench_results",
                      help="results folder (default: bench_results)")
  parser.add_argument("--data-dir", default=None,
                      help="folder with real data sets (CelebA's "
                           "list_attr_celeba.txt, pcba.csv); adds those "
                           "problems to the default list")
  parser.add_argument("--steps", type=int, default=None,
                      help="override every problem's training steps")
  parser.add_argument("--no-speed", action="store_true",
                      help="skip the step time / memory benchmark")
  parser.add_argument("--speed-only", action="store_true",
                      help="run only the step time / memory benchmark (e.g. "
                           "on an accelerator)")
  parser.add_argument("--speed-tasks", default=None,
                      help="comma-separated task counts for the speed "
                           "benchmark (default: 10 in the quick suite; in "
                           "the full suite 2,10,40 for the MLP, 2,10 for "
                           "the conv trunk)")
  parser.add_argument("--from-results", nargs="+", default=None,
                      metavar="RESULTS_JSON",
                      help="run nothing: merge these results.json files "
                           "(e.g. of a --no-speed and a --speed-only run) "
                           "and write the report into --out")
  parser.add_argument("--speed-models", default=None,
                      help="comma-separated speed models (default: mlp in "
                           "the quick suite, mlp,conv in the full suite)")
  parser.add_argument("--cache-dir", default=CACHE_DIR,
                      help="JAX persistent compilation cache (default "
                           f"{CACHE_DIR}); a second run compiles little")
  parser.add_argument("--no-cache", action="store_true",
                      help="compile everything (no persistent cache)")
  parser.add_argument("--record-costs", action="store_true",
                      help="store this run's measured time per unit in "
                           "benchmarks/unit_costs.json (the source of the "
                           "expected time printed at start)")
  parser.add_argument("--speed-batch", type=int, default=None,
                      help="minibatch size of the speed model (default "
                           "256); a larger batch makes every step longer")
  parser.add_argument("--device-check", nargs="?", default=None,
                      const=os.path.join("benchmarks", "results", "device"),
                      metavar="FOLDER",
                      help="run only the prepared GPU check (at most 5 "
                           "minutes: speed of the Gramian strategies, solver "
                           "trips and op counts, the device tests) and write "
                           "it into FOLDER (default benchmarks/results/"
                           "device); refuses without a GPU or TPU")
  parser.add_argument("--allow-cpu", action="store_true",
                      help="let --device-check run on the CPU (a dry run)")
  return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  args = build_parser().parse_args(argv)
  suite = SUITES[args.suite]
  if args.seeds is None:
    args.seeds = list(range(suite["seeds"]))
  if args.strategies is not None:
    args.strategies = [s.strip() for s in args.strategies.split(",")
                       if s.strip()]
  if args.speed_only:
    if args.no_speed or args.problems:
      raise SystemExit("--speed-only excludes --no-speed and --problem.")
    args.problems = []
  elif args.problems is None:
    args.problems = list(suite["problems"])
    if args.data_dir is not None:
      from benchmarks.data import available_real_problems  # pylint: disable=import-outside-toplevel
      args.problems += available_real_problems(args.data_dir)
  if args.speed_tasks is not None:
    args.speed_tasks = [int(t) for t in args.speed_tasks.split(",")]
  elif suite["speed_tasks"] is not None:
    args.speed_tasks = list(suite["speed_tasks"])
  if args.speed_models is None:
    args.speed_models = list(suite["speed_models"])
  else:
    args.speed_models = [m.strip() for m in args.speed_models.split(",")
                         if m.strip()]
  from benchmarks import speed  # pylint: disable=import-outside-toplevel
  from benchmarks import strategies  # pylint: disable=import-outside-toplevel
  unknown = [m for m in args.speed_models if m not in speed.MODELS]
  if unknown or not args.speed_models:
    raise SystemExit(f"--speed-models: unknown {unknown}; known: "
                     f"{', '.join(speed.MODELS)}.")
  try:
    args.strategies = strategies.resolve(args.strategies)
  except ValueError as error:
    raise SystemExit(f"--strategies: {error}") from error
  if args.speed_batch is not None and args.speed_batch < 1:
    raise SystemExit(f"--speed-batch must be >= 1, got {args.speed_batch}.")
  return args


class Progress:
  """One progress line: units done, elapsed, remaining.

  The remaining time is the expected cost of the units left
  (:mod:`benchmarks.costs`), scaled by how this run compares so far with
  the expectation. On a terminal the line is rewritten in place, and every
  few seconds while a long unit (a compilation) runs; otherwise one line
  per unit, and one every minute while nothing finishes.
  """

  def __init__(self, plan: "costs.Plan", stream=None, tick_seconds=None):
    self.plan = plan
    self.total = max(len(plan.units), 1)
    self.done = 0
    self.expected_done = 0.0
    self.start = self.last = time.perf_counter()
    self.last_cpu = time.process_time()
    self.stream = stream or sys.stderr
    self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
    self.label = "starting"
    # (label, wall seconds, CPU seconds of this process) per unit.
    self.unit_seconds: list[tuple[str, float, float]] = []
    self.lock = threading.Lock()
    self.stopped = threading.Event()
    self.tick_seconds = tick_seconds or (5.0 if self.tty else 60.0)
    self.ticker = threading.Thread(target=self._tick, daemon=True)
    self.ticker.start()

  def remaining(self) -> float:
    left = max(self.plan.total_seconds - self.expected_done, 0.0)
    elapsed = time.perf_counter() - self.start
    if self.expected_done > 0 and elapsed > 0:
      # How this run compares with the expectation (within 4× either way).
      left *= min(max(elapsed / self.expected_done, 0.25), 4.0)
    return left

  def line(self) -> str:
    elapsed = time.perf_counter() - self.start
    return (f"[{self.done}/{self.total} units] {self.label:<34} "
            f"{_minutes(elapsed)} elapsed, ~{_minutes(self.remaining())} "
            "left")

  def _write(self, text: str, final: bool = False) -> None:
    if self.tty:
      self.stream.write("\r" + text[:150].ljust(150)
                        + ("\n" if final else ""))
    else:
      self.stream.write(text + "\n")
    self.stream.flush()

  def _tick(self) -> None:
    while not self.stopped.wait(self.tick_seconds):
      with self.lock:
        if time.perf_counter() - self.last >= self.tick_seconds:
          self._write(self.line())

  def __call__(self, label: str) -> None:
    with self.lock:
      now, cpu = time.perf_counter(), time.process_time()
      self.unit_seconds.append((label, now - self.last, cpu - self.last_cpu))
      self.last, self.last_cpu = now, cpu
      self.done += 1
      self.expected_done += self.plan.cost_of(label)
      self.label = label
      self._write(self.line(), final=self.done >= self.total)

  def note(self, text: str, label: Optional[str] = None) -> None:
    """Writes ``text`` on its own line; ``label`` (what runs now) replaces
    the last unit's name in the progress lines that follow."""
    with self.lock:
      self.label = label or self.label
      if self.tty:
        self.stream.write("\r" + " " * 150 + "\r")
      self.stream.write(text + "\n")
      self.stream.flush()

  def stop(self) -> None:
    self.stopped.set()


def _minutes(seconds: float) -> str:
  seconds = int(round(seconds))
  return f"{seconds // 60}m{seconds % 60:02d}s"


def usable_cpus() -> int:
  """The CPUs this process may run on (taskset / cgroup affinity)."""
  if hasattr(os, "sched_getaffinity"):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def machine_info() -> dict:
  cpu = platform.processor() or "unknown"
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  import jax  # pylint: disable=import-outside-toplevel
  return {"nproc": usable_cpus(), "cpu": cpu,
          "platform": platform.platform(), "python": platform.python_version(),
          "jax": jax.__version__, "backend": jax.default_backend()}


def enable_compilation_cache(path: str) -> None:
  """JAX's persistent compilation cache in ``path`` (every program)."""
  import jax  # pylint: disable=import-outside-toplevel
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def run_all(args, progress, results: dict, speed_out: dict) -> None:
  """Runs every problem, then the speed benchmark, filling ``results``
  and ``speed_out`` as it goes (an interrupt leaves what is done)."""
  # pylint: disable=import-outside-toplevel
  from benchmarks import problems as problems_lib
  from benchmarks import runner
  from benchmarks import speed
  for name in args.problems:
    progress.note(f"{name}: tracing and compiling "
                  f"{progress.plan.programs.get(name, '?')} programs "
                  f"for {len(args.strategies)} strategies…",
                  label=f"({name}: compiling)")
    problem = problems_lib.make(name, suite=args.suite, data_dir=args.data_dir)
    results[name] = {}
    runner.run_problem(problem, args.strategies, seeds=args.seeds,
                       num_steps=args.steps, progress=progress,
                       into=results[name])
  if not args.no_speed:
    progress.note("speed: compiling and timing one step per strategy…",
                  label="(speed: compiling, timing)")
    speed_config = ({} if args.speed_batch is None
                    else {"batch_size": args.speed_batch})
    speed_out.update(speed.run_speed_models(
        args.strategies, args.speed_models, num_tasks=args.speed_tasks,
        config=speed_config, progress=progress))


def finish_partial(results: dict) -> dict:
  """Drops the problems with no trained strategy and ranks the others."""
  # pylint: disable=import-outside-toplevel
  from benchmarks import runner
  from benchmarks.problems import toy2d
  kept = {}
  for name, result in results.items():
    if not result.get("strategies"):
      continue
    if "ranking" not in result:
      result["ranking"] = (toy2d.toy_ranking(result) if name == "toy2d"
                           else runner.rank(result))
    kept[name] = result
  return kept


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  if args.device_check is not None:
    os.environ.setdefault("MPLBACKEND", "Agg")
    from benchmarks import solver_cost  # pylint: disable=import-outside-toplevel
    solver_cost.device_check(args.device_check, allow_cpu=args.allow_cpu)
    return 0
  os.environ.setdefault("MPLBACKEND", "Agg")
  # pylint: disable=import-outside-toplevel
  from benchmarks import costs
  from benchmarks import report
  if args.from_results:
    results, speed_result, meta = report.merge(args.from_results)
    paths = report.write_report(results, args.out, speed=speed_result or None,
                                meta=meta)
    print(f"report: {paths['markdown']}")
    return 0
  plan = costs.plan(args)
  print(plan.summary(), file=sys.stderr, flush=True)
  if not args.no_cache:
    enable_compilation_cache(args.cache_dir)
  progress = Progress(plan)
  started = time.perf_counter()
  results: dict = {}
  speed_out: dict = {}
  interrupted, error = False, None
  try:
    run_all(args, progress, results, speed_out)
  except KeyboardInterrupt:
    interrupted = True
    progress.note("interrupted: writing the partial results and report…")
  except Exception as caught:  # pylint: disable=broad-except
    # Keep what finished, then fail loudly.
    interrupted, error = True, caught
    progress.note(f"failed ({type(caught).__name__}): writing the partial "
                  "results and report, then the traceback…")
  progress.stop()
  meta = {
      "command": "python -m benchmarks " + " ".join(
          sys.argv[1:] if argv is None else list(argv)),
      "suite": args.suite, "seeds": args.seeds,
      "machine": machine_info(),
      "wall_seconds": time.perf_counter() - started,
      "expected_seconds": plan.total_seconds,
      "unit_seconds": progress.unit_seconds,
      "interrupted": interrupted,
  }
  paths = report.write_report(finish_partial(results), args.out,
                              speed=speed_out or None, meta=meta)
  if args.record_costs and not interrupted:
    path = costs.record(args, progress.unit_seconds)
    progress.note(f"measured unit costs stored in {path}")
  lines = [f"{'stopped' if interrupted else 'done'} after "
           f"{_minutes(meta['wall_seconds'])} (expected "
           f"{_minutes(plan.total_seconds)}); report: {paths['markdown']} "
           f"({len(paths['plots'])} plots)"]
  conclusions = report.main_conclusions(finish_partial(results),
                                        speed_out or None)
  if conclusions:
    lines.append("Main conclusions:")
    lines += [f"  {k + 1}. {text}" for k, text in enumerate(conclusions)]
  progress.note("\n".join(lines))
  if error is not None:
    raise error
  return 130 if interrupted else 0


if __name__ == "__main__":
  CODE = main()
  if CODE == 130:
    # Interrupted: a compilation may still run in a worker thread; leave
    # without waiting for it (the report is written).
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(CODE)  # pylint: disable=protected-access
  sys.exit(CODE)
