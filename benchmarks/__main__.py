"""Command line: ``python -m benchmarks [--suite quick|full] ...``."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from typing import Optional, Sequence

SUITES = {
    # The quick suite runs on built-in data only.
    "quick": dict(problems=("scales", "digits", "manytask", "toy2d"), seeds=3),
    "full": dict(problems=("scales", "digits", "manytask", "toy2d"), seeds=5),
}


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
                           "benchmark (default: 2,10,40 for the MLP, 2,10 "
                           "for the conv trunk)")
  parser.add_argument("--from-results", nargs="+", default=None,
                      metavar="RESULTS_JSON",
                      help="run nothing: merge these results.json files "
                           "(e.g. of a --no-speed and a --speed-only run) "
                           "and write the report into --out")
  parser.add_argument("--speed-models", default="mlp,conv",
                      help="comma-separated speed models (default mlp,conv)")
  parser.add_argument("--speed-batch", type=int, default=None,
                      help="minibatch size of the speed model (default "
                           "256); a larger batch makes every step longer")
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
  """A one-line progress bar on a terminal, plain lines otherwise."""

  def __init__(self, total: int, stream=None):
    self.total = max(total, 1)
    self.done = 0
    self.start = time.perf_counter()
    self.stream = stream or sys.stderr
    self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

  def __call__(self, label: str) -> None:
    self.done += 1
    elapsed = time.perf_counter() - self.start
    eta = elapsed / self.done * max(self.total - self.done, 0)
    width = 30
    filled = int(width * min(self.done, self.total) / self.total)
    line = (f"[{'#' * filled}{'.' * (width - filled)}] "
            f"{self.done}/{self.total} {label:<32} "
            f"{elapsed:6.0f}s elapsed, ~{eta:4.0f}s left")
    if self.tty:
      self.stream.write("\r" + line[:150])
      if self.done >= self.total:
        self.stream.write("\n")
    else:
      self.stream.write(line + "\n")
    self.stream.flush()

  def note(self, text: str) -> None:
    if self.tty:
      self.stream.write("\n")
    self.stream.write(text + "\n")
    self.stream.flush()


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


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  os.environ.setdefault("MPLBACKEND", "Agg")
  # pylint: disable=import-outside-toplevel
  from benchmarks import problems as problems_lib
  from benchmarks import report
  if args.from_results:
    results, speed_result, meta = report.merge(args.from_results)
    paths = report.write_report(results, args.out, speed=speed_result or None,
                                meta=meta)
    print(f"report: {paths['markdown']}")
    return 0
  from benchmarks import runner
  from benchmarks import speed

  names = args.strategies
  total = 0
  for name in args.problems:
    total += len(names) + (0 if name == "toy2d" else 1)
  if not args.no_speed:
    total += speed.num_units(names, args.speed_models, args.speed_tasks)
  progress = Progress(total)
  started = time.perf_counter()
  results = {}
  for name in args.problems:
    problem = problems_lib.make(name, suite=args.suite, data_dir=args.data_dir)
    results[name] = runner.run_problem(
        problem, names, seeds=args.seeds, num_steps=args.steps,
        progress=progress)
  speed_result = None
  if not args.no_speed:
    speed_config = ({} if args.speed_batch is None
                    else {"batch_size": args.speed_batch})
    speed_result = speed.run_speed_models(
        names, args.speed_models, num_tasks=args.speed_tasks,
        config=speed_config, progress=progress)
  meta = {
      "command": "python -m benchmarks " + " ".join(
          sys.argv[1:] if argv is None else list(argv)),
      "suite": args.suite, "seeds": args.seeds,
      "machine": machine_info(),
      "wall_seconds": time.perf_counter() - started,
  }
  paths = report.write_report(results, args.out, speed=speed_result,
                              meta=meta)
  progress.note(f"done in {meta['wall_seconds']:.0f}s; report: "
                f"{paths['markdown']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
