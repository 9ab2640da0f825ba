"""CelebA, 40 attributes, after the EMA loss-weighting paper.

Lakkapragada, Sleiman, Surabhi & Wall, "Mitigating Negative Transfer in
Multi-Task Learning with Exponential Moving Average Loss Weighting
Strategies", arXiv:2211.12999 (2022).

Run::

  python -m benchmarks.papers celeba --data-dir /data/celeba --out results/

Data (the standard CelebA release, read from ``--data-dir``)::

  DIR/img_align_celeba/000001.jpg …   aligned 178×218 JPEGs
  DIR/list_attr_celeba.txt            count, 40 names, "file v1 … v40" (±1)
  DIR/list_eval_partition.txt         "file p", p = 0 train, 1 val, 2 test

(``DIR/celeba/…`` works too.) Images are read with Pillow, centre-cropped to
a square and resized to ``--image-size`` (64) RGB pixels.

Model: a CNN trunk in Flax NNX (per stage two 3×3 convolutions with
GroupNorm and ReLU, then 2×2 max pooling; channels 32-64-128-256; global
average pooling; a 512-unit ReLU layer) and one logistic head per
attribute. Loss per attribute: binary cross-entropy. Adam (1e-3), batch 256,
10 epochs, best epoch by mean validation accuracy.

Compared: ``equal`` (plain sum), ``ema``, ``rema`` and ``dwema`` with
β = 0.2, and 40 single-task models of the same architecture and
initialisation (``--stl-tasks`` limits them). The test split gives each
attribute's accuracy (the primary metric) and ROC-AUC; per strategy the
mean over attributes, Δm% against the single-task models and the number
of attributes with negative transfer.

The trunk, image size and schedule are this configuration's choices, not
the paper's (see the paper for its network and training schedule).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import math
import os
from typing import Optional

import numpy as np
import optax
from flax import nnx

import optax_mtl
from benchmarks import data as data_lib
from benchmarks.papers import _common
from benchmarks.problems import _auc

PARTITION_FILE = "list_eval_partition.txt"
STEM = "celeba_ema"

DEFAULTS = dict(
    image_size=64, channels="32,64,128,256", hidden=512, epochs=10,
    batch_size=256, eval_batch_size=1024, learning_rate=1e-3, beta=0.2,
    strategies="equal,ema,rema,dwema", stl_tasks="all", stl_chunk=8,
    seeds="0", subset=None, eval_subset=None, workers=8)

CITATION = (
    "Lakkapragada, Sleiman, Surabhi & Wall, \"Mitigating Negative Transfer "
    "in Multi-Task Learning with Exponential Moving Average Loss Weighting "
    "Strategies\", arXiv:2211.12999 (2022)")

# What this run prints beside the paper. Only figures checked against the
# paper's text belong in the "paper" column; every other entry says
# "see paper" rather than guess.
PAPER_SETUP = (
    ("tasks", "40 binary attributes (CelebA)"),
    ("β of ema / rema / dwema", "0.2 (as given in issue 13; see paper)"),
    ("network, image size, schedule", "see paper"),
)
PAPER_RESULTS = {
    "equal": "see paper",
    "ema": "see paper",
    "rema": "see paper",
    "dwema": "see paper",
    "single-task": "see paper",
}


# ---------------------------------------------------------------------------
# Data.
# ---------------------------------------------------------------------------


def load_partition(path: str) -> dict:
  """``list_eval_partition.txt`` -> ``{filename: 0 train | 1 val | 2 test}``."""
  partition = {}
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      parts = line.split()
      if not parts:
        continue
      if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
        raise ValueError(f"{path}:{number}: expected 'filename 0|1|2', got "
                         f"{line.strip()!r}.")
      partition[parts[0]] = int(parts[1])
  return partition


def load_image(path: str, size: int) -> np.ndarray:
  """One image as ``uint8[size, size, 3]``: centre square crop, resize."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  with Image.open(path) as image:
    image = image.convert("RGB")
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    image = image.crop((left, top, left + side, top + side))
    image = image.resize((size, size), Image.BILINEAR)
    return np.asarray(image, np.uint8)


def load_images(image_dir: str, filenames, size: int,
                workers: int = 8) -> np.ndarray:
  """``uint8[N, size, size, 3]``, decoded by ``workers`` threads."""
  paths = [os.path.join(image_dir, name) for name in filenames]
  out = np.zeros((len(paths), size, size, 3), np.uint8)
  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
    for row, image in enumerate(pool.map(lambda p: load_image(p, size),
                                         paths, chunksize=64)):
      out[row] = image
  return out


def load_celeba(data_dir: str, image_size: int, subset: Optional[int] = None,
                eval_subset: Optional[int] = None, workers: int = 8,
                log=print):
  """The three official splits as ``_common.Split``s, and the attribute names.

  ``subset`` keeps the first N training images (file order),
  ``eval_subset`` the first N of validation and of test.
  """
  attr_path = data_lib.find_celeba(data_dir)
  if attr_path is None:
    raise FileNotFoundError(
        f"no {data_lib.CELEBA_FILE} in {data_dir} (or {data_dir}/celeba).")
  root = os.path.dirname(attr_path)
  image_dir = os.path.join(root, data_lib.CELEBA_IMAGES)
  partition_path = os.path.join(root, PARTITION_FILE)
  for path in (image_dir, partition_path):
    if not os.path.exists(path):
      raise FileNotFoundError(f"CelebA needs {path}.")
  filenames, names, labels = data_lib.load_celeba_attributes(attr_path)
  partition = load_partition(partition_path)
  missing = [f for f in filenames if f not in partition]
  if missing:
    raise ValueError(f"{partition_path} has no split for {len(missing)} "
                     f"images (e.g. {missing[0]}).")
  which = np.asarray([partition[f] for f in filenames])
  splits = []
  for split_id, cap in ((0, subset), (1, eval_subset), (2, eval_subset)):
    rows = np.nonzero(which == split_id)[0]
    if cap:
      rows = rows[:cap]
    if len(rows) == 0:
      raise ValueError(f"CelebA split {split_id} is empty.")
    log(f"celeba: reading {len(rows)} images of split {split_id} "
        f"({image_size}×{image_size} RGB)")
    images = load_images(image_dir, [filenames[i] for i in rows], image_size,
                         workers)
    split_labels = labels[rows].astype(np.float32)
    splits.append(_common.Split(images, split_labels,
                                np.ones(split_labels.shape, bool)))
  return tuple(splits), names


# ---------------------------------------------------------------------------
# Model.
# ---------------------------------------------------------------------------


class CelebaCNN(nnx.Module):
  """CNN trunk (uint8 images in) and one logistic head per attribute."""

  def __init__(self, num_tasks: int, channels=(32, 64, 128, 256),
               hidden: int = 512, *, rngs: nnx.Rngs):
    layers = []
    c_in = 3
    for c in channels:
      for _ in range(2):
        layers.append(nnx.Conv(c_in, c, (3, 3), rngs=rngs))
        layers.append(nnx.GroupNorm(c, num_groups=math.gcd(8, c), rngs=rngs))
        c_in = c
    self.layers = nnx.List(layers)
    self.dense = nnx.Linear(c_in, hidden, rngs=rngs)
    self.heads = _common.TaskHeads(hidden, num_tasks, rngs=rngs)

  def features(self, images):
    x = images.astype(np.float32) / 127.5 - 1.0
    for i in range(0, len(self.layers), 4):
      for conv, norm in ((self.layers[i], self.layers[i + 1]),
                         (self.layers[i + 2], self.layers[i + 3])):
        x = nnx.relu(norm(conv(x)))
      x = nnx.max_pool(x, (2, 2), strides=(2, 2))
    return nnx.relu(self.dense(x.mean(axis=(1, 2))))

  def __call__(self, images, dropout_key=None):
    del dropout_key
    return self.heads(self.features(images))


# ---------------------------------------------------------------------------
# Scores and the report.
# ---------------------------------------------------------------------------


def score(probs: np.ndarray, split: _common.Split) -> dict:
  """Accuracy (threshold 0.5) and ROC-AUC of every attribute: ``f64[T]`` each."""
  return _common.per_task_scores(probs, split, {
      "accuracy": lambda labels, p, keep: np.mean(
          (p[keep] > 0.5) == (labels[keep] > 0.5)),
      "roc_auc": _auc.roc_auc})


def paper_table(results: dict) -> str:
  primary = results["primary_metric"]
  rows = [[label, paper, this] for (label, paper), this in zip(
      PAPER_SETUP,
      (str(len(results["tasks"])), str(results["config"]["beta"]),
       f"CNN {results['config']['channels']}, {results['config']['image_size']}"
       f"px, {results['config']['epochs']} epochs"))]
  stl = results.get("single_task")
  for name in list(results["strategies"]) + ["single-task"]:
    if name == "single-task":
      if not stl:
        continue
      value = stl["mean_over_tasks"][primary]
    else:
      value = results["strategies"][name]["mean_over_tasks"][primary]
    rows.append([f"{name}: mean test {primary}",
                 PAPER_RESULTS.get(name, "see paper"), value])
  return _common.markdown_table(("quantity", "paper", "this run"), rows)


def report(results: dict) -> str:
  return _common.paper_report(
      results, "# CelebA, 40 attributes: EMA loss weighting against equal "
      "and single-task", "Images", "test split", ("accuracy", "roc_auc"),
      CITATION, paper_table(results))


# ---------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
  d = DEFAULTS
  _common.add_run_arguments(
      parser, d, "folder with img_align_celeba/, list_attr_celeba.txt and "
      "list_eval_partition.txt")
  parser.add_argument("--subset", type=int, default=d["subset"],
                      help="use the first N training images (default all)")
  parser.add_argument("--eval-subset", type=int, default=d["eval_subset"],
                      help="use the first N validation and test images")
  parser.add_argument("--image-size", type=int, default=d["image_size"])
  parser.add_argument("--channels", default=d["channels"],
                      help="channels of the CNN stages, e.g. 32,64,128,256")
  parser.add_argument("--hidden", type=int, default=d["hidden"])
  parser.add_argument("--beta", type=float, default=d["beta"],
                      help="β of ema, rema and dwema (default 0.2)")
  _common.add_comparison_arguments(parser, d, "attributes")
  parser.add_argument("--workers", type=int, default=d["workers"],
                      help="threads decoding JPEGs")


def make_strategy(name: str, num_tasks: int, beta: float):
  if name in ("ema", "rema", "dwema"):
    # The paper's EMA is optax_mtl.loss_ema (optax_mtl.ema before 0.2).
    factory = (optax_mtl.loss_ema if name == "ema"
               else getattr(optax_mtl, name))
    return factory(num_tasks, beta=beta)
  return getattr(optax_mtl, name)(num_tasks)


def run(args: argparse.Namespace, log=print) -> dict:
  channels = tuple(int(c) for c in str(args.channels).split(","))
  log(f"celeba: device {_common.device_description()}")
  (train, val, test), names = load_celeba(
      args.data_dir, args.image_size, args.subset, args.eval_subset,
      args.workers, log)
  num_tasks = len(names)
  config = _common.TrainConfig(args.epochs, args.batch_size,
                               args.eval_batch_size)
  return _common.run_paper(
      args, stem=STEM, citation=CITATION, report=report,
      make_strategy=lambda n: make_strategy(n, num_tasks, args.beta),
      data=dict(train=train.size, val=val.size, test=test.size,
                image_size=args.image_size),
      run_config=dict(channels=list(channels)), log=log,
      name="celeba",
      make_model=lambda seed: CelebaCNN(num_tasks, channels, args.hidden,
                                        rngs=nnx.Rngs(seed)),
      make_optimizer=lambda: optax.adam(args.learning_rate),
      splits=(train, val, test), task_names=names, config=config,
      score_fn=score, primary="accuracy")
