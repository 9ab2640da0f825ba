"""PubChem BioAssay (PCBA, 128 tasks), after the LBTW paper.

Liu, Liang & Gitter, "Loss-Balanced Task Weighting to Reduce Negative
Transfer in Multi-Task Learning", AAAI 2019 (student abstract),
doi:10.1609/aaai.v33i01.33019977; the authors' code is
github.com/chao1224/Loss-Balanced-Task-Weighting.

Run::

  python -m benchmarks.papers pcba --data-dir /data/pcba --out results/

Data: ``DIR/pcba.csv`` or ``DIR/pcba.csv.gz`` in the MoleculeNet layout read
by ``benchmarks.data.load_multilabel_csv``: a ``smiles`` column and one 0/1
column per assay (128 in MoleculeNet's PCBA), empty cells are missing labels
(masked out of the loss and the metrics); ``mol_id`` is ignored. Molecules
without any label are dropped.

Inputs: 1024-bit Morgan fingerprints (ECFP4, radius 2) when RDKit is
installed (``pip install rdkit``); without RDKit, hashed character 1–3-grams
of the SMILES string (1024 buckets, ``benchmarks.data.smiles_ngram_features``),
much weaker than fingerprints. ``--features`` picks one; the run prints and
records which it used.

Model and training, after the authors' configuration (``json/LBTW.json``,
``src/pcba_model.py``): 1024 inputs, two shared hidden layers of 2000 units
(ReLU then sigmoid, dropout 0.25), one logistic head per assay, binary
cross-entropy, Adam (learning rate 0.003, L2 weight decay 5e-4), batch 1024,
100 epochs, best epoch by mean validation PR-AUC; the molecules are split
into 5 random folds (test = fold ``--fold``, validation = the next fold).
Differences: no batch normalisation, Flax's default initialisation.

Compared: ``equal`` (the plain sum, the paper's multi-task baseline),
``lbtw`` (α = 0.5, reference losses retaken at the first step of every
epoch) and one single-task model per assay (same network). Reported per
assay: test PR-AUC (primary) and ROC-AUC; per strategy: the mean over
assays, Δm% and the number of assays with negative transfer (test PR-AUC
below the single-task model's; with several ``--seeds``, by more than two
standard errors).
"""

from __future__ import annotations

import argparse
from typing import Optional

import jax
import numpy as np
import optax
from flax import nnx

import optax_mtl
from benchmarks import data as data_lib
from benchmarks.papers import _common
from benchmarks.problems import _auc

STEM = "pcba_lbtw"
NUM_BITS = 1024
NUM_FOLDS = 5

DEFAULTS = dict(
    hidden="2000,2000", dropout=0.25, epochs=100, batch_size=1024,
    eval_batch_size=4096, learning_rate=3e-3, weight_decay=5e-4, alpha=0.5,
    strategies="equal,lbtw", stl_tasks="all", stl_chunk=16, seeds="0",
    fold=0, subset=None, features="auto")

CITATION = (
    "Liu, Liang & Gitter, \"Loss-Balanced Task Weighting to Reduce Negative "
    "Transfer in Multi-Task Learning\", AAAI 2019 student abstract, "
    "doi:10.1609/aaai.v33i01.33019977; setup from the authors' code, "
    "github.com/chao1224/Loss-Balanced-Task-Weighting (json/LBTW.json, "
    "src/pcba_model.py)")

# Setup facts taken from the paper's abstract (128 tasks) and the authors'
# configuration files; the paper's result figures are not restated here
# ("see paper") because they were not checked against its text.
PAPER_SETUP = (
    ("tasks", "128 PCBA assays (abstract)"),
    ("α of lbtw", "0.5 (json/LBTW.json)"),
    ("inputs", "1024 features per molecule (src/pcba_model.py)"),
    ("shared network", "2 × 2000 units, ReLU then sigmoid, dropout 0.25, "
     "batch norm after the last (json/LBTW.json, src/pcba_model.py)"),
    ("training", "Adam 0.003, weight decay 5e-4, batch 1024, 100 epochs, "
     "best epoch by validation PR-AUC (json/LBTW.json, src/pcba_model.py)"),
    ("split", "5 random folds (authors' README)"),
)
PAPER_RESULTS = {
    "equal": "see paper",
    "lbtw": "see paper",
    "single-task": "see paper",
}


# ---------------------------------------------------------------------------
# Data.
# ---------------------------------------------------------------------------


def rdkit_available() -> bool:
  try:
    import rdkit  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    return False
  return True


def morgan_fingerprints(smiles, num_bits: int = NUM_BITS,
                        radius: int = 2) -> tuple[np.ndarray, int]:
  """ECFP-style bit vectors with RDKit: ``(uint8[N, num_bits], num_invalid)``.

  An unparseable SMILES gives a zero row and is counted.
  """
  # pylint: disable=import-outside-toplevel
  from rdkit import Chem
  from rdkit import RDLogger
  RDLogger.DisableLog("rdApp.*")
  try:
    from rdkit.Chem import rdFingerprintGenerator
    generator = rdFingerprintGenerator.GetMorganGenerator(
        radius=radius, fpSize=num_bits)
    bits = generator.GetFingerprintAsNumPy
  except (ImportError, AttributeError):  # RDKit older than 2022.09
    from rdkit import DataStructs
    from rdkit.Chem import AllChem

    def bits(mol):
      vector = AllChem.GetMorganFingerprintAsBitVect(mol, radius, num_bits)
      array = np.zeros(num_bits, np.uint8)
      DataStructs.ConvertToNumpyArray(vector, array)
      return array
  out = np.zeros((len(smiles), num_bits), np.uint8)
  invalid = 0
  for row, text in enumerate(smiles):
    mol = Chem.MolFromSmiles(text)
    if mol is None:
      invalid += 1
      continue
    out[row] = np.asarray(bits(mol), np.uint8)
  return out, invalid


def featurize(smiles, kind: str = "auto", log=print) -> tuple[np.ndarray, str]:
  """``(f32[N, 1024], kind used)``: ``ecfp`` (RDKit) or ``ngram``."""
  if kind == "auto":
    kind = "ecfp" if rdkit_available() else "ngram"
    if kind == "ngram":
      log("pcba: RDKit is not installed: using hashed SMILES character "
          "n-grams instead of fingerprints (pip install rdkit for ECFP4)")
  if kind == "ecfp":
    if not rdkit_available():
      raise ImportError("--features ecfp needs RDKit: pip install rdkit")
    bits, invalid = morgan_fingerprints(smiles)
    if invalid:
      log(f"pcba: {invalid} SMILES could not be parsed (zero fingerprint)")
    return bits.astype(np.float32), "ecfp4-1024"
  if kind == "ngram":
    return (data_lib.smiles_ngram_features(smiles, NUM_BITS),
            "smiles-ngram-1024")
  raise ValueError(f"--features must be auto, ecfp or ngram, got {kind!r}.")


def fold_rows(num_rows: int, fold: int, num_folds: int = NUM_FOLDS,
              seed: int = 0):
  """Row indices ``(train, val, test)`` of a fixed random ``num_folds``-way
  split: test = fold ``fold``, validation = fold ``fold + 1`` (mod)."""
  if not 0 <= fold < num_folds:
    raise ValueError(f"fold must be in [0, {num_folds}), got {fold}.")
  order = np.random.default_rng(seed).permutation(num_rows)
  folds = np.array_split(order, num_folds)
  val_fold = (fold + 1) % num_folds
  train = np.concatenate([f for i, f in enumerate(folds)
                          if i not in (fold, val_fold)])
  return np.sort(train), np.sort(folds[val_fold]), np.sort(folds[fold])


def load_pcba(data_dir: str, features: str = "auto", fold: int = 0,
              subset: Optional[int] = None, log=print):
  """The three splits as ``_common.Split``s, the task names, the feature kind."""
  path = data_lib.find_pcba(data_dir)
  if path is None:
    raise FileNotFoundError(f"no pcba.csv or pcba.csv.gz in {data_dir}.")
  smiles, tasks, labels, mask = data_lib.load_multilabel_csv(path)
  keep = np.nonzero(mask.any(axis=1))[0]
  if subset:
    keep = np.sort(np.random.default_rng(0).permutation(keep)[:subset])
  log(f"pcba: {len(keep)} labelled molecules, {len(tasks)} assays "
      f"from {path}")
  inputs, kind = featurize([smiles[i] for i in keep], features, log)
  labels, mask = labels[keep], mask[keep]
  splits = tuple(_common.Split(inputs[rows], labels[rows], mask[rows])
                 for rows in fold_rows(len(keep), fold))
  if min(s.size for s in splits) == 0:
    raise ValueError(f"too few molecules ({len(keep)}) for {NUM_FOLDS} folds.")
  return splits, tasks, kind


# ---------------------------------------------------------------------------
# Model.
# ---------------------------------------------------------------------------

_ACTIVATIONS = {"relu": nnx.relu, "sigmoid": nnx.sigmoid}


class PcbaMLP(nnx.Module):
  """Shared layers (Linear -> dropout -> activation) and logistic heads."""

  def __init__(self, num_inputs: int, num_tasks: int,
               hidden=(2000, 2000), activations=("relu", "sigmoid"),
               dropout_rate: float = 0.25, *, rngs: nnx.Rngs):
    sizes = (num_inputs,) + tuple(hidden)
    self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs)
                            for a, b in zip(sizes[:-1], sizes[1:])])
    self.activations = tuple(activations[i % len(activations)]
                             for i in range(len(hidden)))
    self.dropout_rate = dropout_rate
    self.heads = _common.TaskHeads(sizes[-1], num_tasks, rngs=rngs)

  def __call__(self, inputs, dropout_key=None):
    x = inputs
    keys = ([None] * len(self.layers) if dropout_key is None else list(
        jax.random.split(dropout_key, len(self.layers))))
    for layer, activation, key in zip(self.layers, self.activations, keys):
      x = _common.dropout(layer(x), self.dropout_rate, key)
      x = _ACTIVATIONS[activation](x)
    return self.heads(x)


# ---------------------------------------------------------------------------
# Scores and the report.
# ---------------------------------------------------------------------------


def score(probs: np.ndarray, split: _common.Split) -> dict:
  """PR-AUC (average precision) and ROC-AUC per assay, labelled rows only."""
  return _common.per_task_scores(probs, split, {
      "pr_auc": _auc.average_precision, "roc_auc": _auc.roc_auc})


def paper_table(results: dict) -> str:
  config = results["config"]
  this_setup = (
      str(len(results["tasks"])),
      str(config["alpha"]),
      results["data"]["features"],
      f"{config['hidden']} units, ReLU then sigmoid, dropout "
      f"{config['dropout']}, no batch norm",
      f"Adam {config['learning_rate']}, weight decay "
      f"{config['weight_decay']}, batch {config['batch_size']}, "
      f"{config['epochs']} epochs, best epoch by validation PR-AUC",
      f"fold {config['fold']} of {NUM_FOLDS} (train/val/test "
      f"{results['data']['train']}/{results['data']['val']}/"
      f"{results['data']['test']})",
  )
  rows = [[label, paper, this]
          for (label, paper), this in zip(PAPER_SETUP, this_setup)]
  stl = results.get("single_task")
  if stl:
    rows.append(["single-task: mean test PR-AUC",
                 PAPER_RESULTS["single-task"],
                 stl["mean_over_tasks"]["pr_auc"]])
  for name, entry in results["strategies"].items():
    rows.append([f"{name}: mean test PR-AUC",
                 PAPER_RESULTS.get(name, "see paper"),
                 entry["mean_over_tasks"]["pr_auc"]])
    if "negative_transfer" in entry:
      rows.append([f"{name}: tasks with negative transfer",
                   PAPER_RESULTS.get(name, "see paper"),
                   f"{entry['negative_transfer']} of "
                   f"{entry['tasks_compared']}"])
  return _common.markdown_table(("quantity", "paper", "this run"), rows)


def report(results: dict) -> str:
  return _common.paper_report(
      results, "# PCBA: LBTW against equal weighting and single-task models",
      "Data", "test fold", ("pr_auc", "roc_auc"), CITATION,
      paper_table(results))


# ---------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
  d = DEFAULTS
  _common.add_run_arguments(parser, d,
                            "folder with pcba.csv or pcba.csv.gz")
  parser.add_argument("--weight-decay", type=float, default=d["weight_decay"])
  parser.add_argument("--subset", type=int, default=d["subset"],
                      help="use N randomly chosen molecules (default all)")
  parser.add_argument("--features", default=d["features"],
                      choices=("auto", "ecfp", "ngram"))
  parser.add_argument("--fold", type=int, default=d["fold"],
                      help=f"test fold, 0..{NUM_FOLDS - 1}")
  parser.add_argument("--hidden", default=d["hidden"],
                      help="shared layer sizes, e.g. 2000,2000")
  parser.add_argument("--dropout", type=float, default=d["dropout"])
  parser.add_argument("--alpha", type=float, default=d["alpha"],
                      help="α of lbtw (default 0.5)")
  _common.add_comparison_arguments(parser, d, "assays")


def make_strategy(name: str, num_tasks: int, alpha: float,
                  steps_per_epoch: int):
  if name == "lbtw":
    return optax_mtl.lbtw(num_tasks, alpha=alpha,
                          steps_per_epoch=steps_per_epoch)
  return getattr(optax_mtl, name)(num_tasks)


def run(args: argparse.Namespace, log=print) -> dict:
  hidden = tuple(int(h) for h in str(args.hidden).split(","))
  log(f"pcba: device {_common.device_description()}")
  (train, val, test), tasks, kind = load_pcba(
      args.data_dir, args.features, args.fold, args.subset, log)
  num_tasks = len(tasks)
  config = _common.TrainConfig(args.epochs, args.batch_size,
                               args.eval_batch_size, args.dropout)
  steps_per_epoch = max(1, train.size // min(args.batch_size, train.size))

  def make_optimizer():
    return optax.chain(optax.add_decayed_weights(args.weight_decay),
                       optax.adam(args.learning_rate))

  return _common.run_paper(
      args, stem=STEM, citation=CITATION, report=report,
      make_strategy=lambda n: make_strategy(n, num_tasks, args.alpha,
                                            steps_per_epoch),
      data=dict(train=train.size, val=val.size, test=test.size,
                features=kind, steps_per_epoch=steps_per_epoch),
      run_config=dict(hidden=list(hidden)), log=log,
      name="pcba",
      make_model=lambda seed: PcbaMLP(
          train.inputs.shape[1], num_tasks, hidden,
          dropout_rate=args.dropout, rngs=nnx.Rngs(seed)),
      make_optimizer=make_optimizer,
      splits=(train, val, test), task_names=tasks, config=config,
      score_fn=score, primary="pr_auc")
