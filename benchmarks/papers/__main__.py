"""``python -m benchmarks.papers {celeba,pcba} --data-dir DIR --out DIR``.

See ``benchmarks/papers/__init__.py`` and benchmarks/README.md ("Paper
configurations").
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def build_parser() -> argparse.ArgumentParser:
  # Imported here so that `--help` lists the options of both papers.
  from benchmarks.papers import celeba_ema  # pylint: disable=import-outside-toplevel
  from benchmarks.papers import pcba_lbtw  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(
      prog="python -m benchmarks.papers",
      description="Train and score the EMA paper's CelebA setup or the LBTW "
      "paper's PCBA setup on a local copy of the data set.")
  commands = parser.add_subparsers(dest="paper", required=True)
  for name, module, text in (
      ("celeba", celeba_ema, "CelebA, 40 attributes: ema/rema/dwema vs "
       "equal and single-task (Lakkapragada et al., arXiv:2211.12999)"),
      ("pcba", pcba_lbtw, "PCBA, 128 assays: lbtw vs equal and "
       "single-task (Liu, Liang & Gitter, AAAI 2019)")):
    sub = commands.add_parser(name, help=text, description=text)
    module.add_arguments(sub)
    sub.set_defaults(run=module.run)
  return parser


def main(argv: Optional[Sequence[str]] = None) -> dict:
  args = build_parser().parse_args(argv)
  return args.run(args)


if __name__ == "__main__":
  main(sys.argv[1:])
