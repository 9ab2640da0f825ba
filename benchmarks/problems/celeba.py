"""``celeba``: the 40 CelebA attributes, from a local copy.

Reads ``<data_dir>/list_attr_celeba.txt`` and the aligned images
``<data_dir>/img_align_celeba/<filename>`` (JPEG, read with Pillow, which
ships with matplotlib), converted to grey and downsampled to 16×16 pixels:
a deliberately small feature choice so that an MLP trunk can train on CPU
(accuracies are far below those of the CNNs in the papers). Model: a shared
ReLU MLP trunk and one logistic head per attribute. Metrics: accuracy
(primary) and ROC-AUC per attribute. Split: the first 80 % of the (capped)
file order for training, the rest for testing.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from benchmarks import data as data_lib
from benchmarks.problems import Problem
from benchmarks.problems import suite_configs
from benchmarks.problems import _binary

# The full suite runs the paper's sizes.
_PAPER = dict(max_images=None, side=32, hidden=512, depth=3, batch_size=512,
              num_steps=20000, learning_rate=1e-3)
CONFIGS = suite_configs(
    dict(max_images=20000, side=16, hidden=256, depth=2, batch_size=256,
         num_steps=1000, learning_rate=1e-3), paper=_PAPER, full=_PAPER)


def load_images(image_dir: str, filenames, side: int) -> np.ndarray:
  """Grey ``side×side`` images in [0, 1], flattened: ``f32[N, side²]``."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  out = np.zeros((len(filenames), side * side), np.float32)
  for row, name in enumerate(filenames):
    with Image.open(os.path.join(image_dir, name)) as image:
      small = image.convert("L").resize((side, side), Image.BILINEAR)
      out[row] = np.asarray(small, np.float32).reshape(-1) / 255.0
  return out


def make(suite: str = "quick", data_dir: Optional[str] = None,
         **overrides) -> Problem:
  cfg = dict(CONFIGS[suite], **overrides)
  path = data_lib.find_celeba(data_dir) if data_dir else None
  if path is None:
    raise ValueError(f"celeba needs --data-dir with {data_lib.CELEBA_FILE}.")
  image_dir = os.path.join(os.path.dirname(path), data_lib.CELEBA_IMAGES)
  if not os.path.isdir(image_dir):
    raise ValueError(f"celeba needs the images in {image_dir}.")
  filenames, names, labels = data_lib.load_celeba_attributes(path)
  if cfg["max_images"]:
    filenames, labels = filenames[:cfg["max_images"]], labels[
        :cfg["max_images"]]
  features = load_images(image_dir, filenames, cfg["side"])
  features = (features - features.mean(0)) / (features.std(0) + 1e-6)
  mask = np.ones(labels.shape, bool)
  split = max(1, int(0.8 * len(filenames)))
  return _binary.make_binary_problem(
      "celeba", names,
      (features[:split], labels[:split], mask[:split]),
      (features[split:], labels[split:], mask[split:]),
      hidden=cfg["hidden"], depth=cfg["depth"], batch_size=cfg["batch_size"],
      num_steps=cfg["num_steps"], learning_rate=cfg["learning_rate"],
      metric_names=("accuracy", "roc_auc"),
      description=(
          f"CelebA, {len(names)} attributes, {len(filenames)} images as "
          f"{cfg['side']}×{cfg['side']} grey pixels; {cfg['depth']}-layer "
          f"ReLU trunk ({cfg['hidden']} units), logistic heads. Primary "
          "metric: test accuracy."),
      extra={"config": cfg, "path": path})
