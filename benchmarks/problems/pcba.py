"""``pcba``: a MoleculeNet-style multi-label CSV brought by the user.

Reads ``<data_dir>/pcba.csv`` (or ``.csv.gz``): a ``smiles`` column and one
0/1 column per assay, empty cells are missing labels and are masked out of
the loss and the metrics. Features: hashed character 1–3-grams of the SMILES
string (no RDKit; see ``benchmarks.data.smiles_ngram_features``). Model: a
shared ReLU MLP trunk and one logistic head per assay. Metrics: ROC-AUC
(primary) and PR-AUC per assay. Split: a fixed random 80/20 split.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from benchmarks import data as data_lib
from benchmarks.problems import Problem
from benchmarks.problems import suite_configs
from benchmarks.problems import _binary

# The full suite runs the paper's sizes.
_PAPER = dict(max_molecules=None, num_buckets=2048, hidden=512, depth=3,
              batch_size=512, num_steps=20000, learning_rate=1e-3)
CONFIGS = suite_configs(
    dict(max_molecules=50000, num_buckets=1024, hidden=256, depth=2,
         batch_size=256, num_steps=1000, learning_rate=1e-3),
    paper=_PAPER, full=_PAPER)


def make(suite: str = "quick", data_dir: Optional[str] = None,
         path: Optional[str] = None, **overrides) -> Problem:
  cfg = dict(CONFIGS[suite], **overrides)
  path = path or (data_lib.find_pcba(data_dir) if data_dir else None)
  if path is None:
    raise ValueError("pcba needs --data-dir with pcba.csv (or pcba.csv.gz).")
  smiles, tasks, labels, mask = data_lib.load_multilabel_csv(path)
  rng = np.random.default_rng(0)
  order = rng.permutation(len(smiles))
  if cfg["max_molecules"]:
    order = order[:cfg["max_molecules"]]
  features = data_lib.smiles_ngram_features([smiles[i] for i in order],
                                            cfg["num_buckets"])
  labels, mask = labels[order], mask[order]
  split = max(1, int(0.8 * len(order)))
  return _binary.make_binary_problem(
      "pcba", tasks,
      (features[:split], labels[:split], mask[:split]),
      (features[split:], labels[split:], mask[split:]),
      hidden=cfg["hidden"], depth=cfg["depth"],
      batch_size=cfg["batch_size"], num_steps=cfg["num_steps"],
      learning_rate=cfg["learning_rate"],
      description=(
          f"{len(tasks)} assays from {path} ({len(order)} molecules); "
          f"hashed SMILES character n-grams ({cfg['num_buckets']} buckets, "
          f"no RDKit); {cfg['depth']}-layer ReLU trunk ({cfg['hidden']} "
          "units), logistic heads, missing labels masked. Primary metric: "
          "test ROC-AUC."),
      extra={"config": cfg, "path": path})
