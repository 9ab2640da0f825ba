"""Loaders for real data sets that users bring (``--data-dir``).

* CelebA attributes: ``list_attr_celeba.txt`` — line 1 the number of images,
  line 2 the 40 attribute names, then ``filename v1 … v40`` with ±1 values.
* MoleculeNet-style multi-label CSV (PCBA): a ``smiles`` column and one
  column per assay with 0/1 labels; an empty cell is a missing label.
  Other columns (e.g. ``mol_id``) are ignored.

Without RDKit, molecules are featurised by hashing the character n-grams
(n = 1, 2, 3) of the SMILES string into a fixed number of buckets
(log(1 + count)): a plain bag-of-substrings, much weaker than fingerprints.
"""

from __future__ import annotations

import csv
import os
import zlib
from typing import Optional

import numpy as np

CELEBA_FILE = "list_attr_celeba.txt"
CELEBA_IMAGES = "img_align_celeba"
PCBA_FILES = ("pcba.csv", "pcba.csv.gz")


def load_celeba_attributes(path: str):
  """Reads ``list_attr_celeba.txt``.

  Returns:
    ``(filenames list[str], attribute_names list[str], labels int8[N, 40])``
    with labels in {0, 1} (the file's −1 becomes 0).
  """
  with open(path, encoding="utf-8") as f:
    count = int(f.readline().split()[0])
    names = f.readline().split()
    filenames, rows = [], []
    for line in f:
      parts = line.split()
      if not parts:
        continue
      if len(parts) != len(names) + 1:
        raise ValueError(
            f"{path}: expected a filename and {len(names)} values, got "
            f"{len(parts)} fields in line {len(rows) + 3}.")
      filenames.append(parts[0])
      rows.append([int(v) for v in parts[1:]])
  labels = np.asarray(rows, np.int8).reshape(-1, len(names))
  if len(filenames) != count:
    raise ValueError(f"{path}: header says {count} images, found "
                     f"{len(filenames)}.")
  if not np.all(np.isin(labels, (-1, 1))):
    raise ValueError(f"{path}: attribute values must be -1 or 1.")
  return filenames, names, (labels > 0).astype(np.int8)


def load_multilabel_csv(path: str, smiles_column: str = "smiles"):
  """Reads a MoleculeNet-style CSV (``.csv`` or ``.csv.gz``).

  Returns:
    ``(smiles list[str], task_names list[str], labels f32[N, T],
    mask bool[N, T])``; masked-out entries (empty cells) have label 0.
  """
  opener = open
  if path.endswith(".gz"):
    import gzip  # pylint: disable=import-outside-toplevel
    opener = gzip.open
  with opener(path, "rt", encoding="utf-8", newline="") as f:
    reader = csv.reader(f)
    header = next(reader)
    if smiles_column not in header:
      raise ValueError(f"{path}: no column {smiles_column!r} in {header}.")
    smiles_at = header.index(smiles_column)
    ignored = {smiles_column, "mol_id"}
    task_at = [i for i, name in enumerate(header) if name not in ignored]
    smiles, labels, mask = [], [], []
    for row in reader:
      if not row:
        continue
      smiles.append(row[smiles_at])
      values = [row[i].strip() if i < len(row) else "" for i in task_at]
      mask.append([v != "" for v in values])
      labels.append([float(v) if v != "" else 0.0 for v in values])
  labels = np.asarray(labels, np.float32).reshape(-1, len(task_at))
  mask = np.asarray(mask, bool).reshape(-1, len(task_at))
  if not np.all(np.isin(labels[mask], (0.0, 1.0))):
    raise ValueError(f"{path}: labels must be 0, 1 or empty.")
  return smiles, [header[i] for i in task_at], labels, mask


def smiles_ngram_features(smiles, num_buckets: int = 1024,
                          max_n: int = 3) -> np.ndarray:
  """Hashed character n-gram counts (log1p), ``f32[N, num_buckets]``."""
  features = np.zeros((len(smiles), num_buckets), np.float32)
  for row, text in enumerate(smiles):
    for n in range(1, max_n + 1):
      for start in range(len(text) - n + 1):
        gram = text[start:start + n].encode()
        features[row, zlib.crc32(gram) % num_buckets] += 1.0
  return np.log1p(features)


def find_pcba(data_dir: str) -> Optional[str]:
  for name in PCBA_FILES:
    path = os.path.join(data_dir, name)
    if os.path.exists(path):
      return path
  return None


def find_celeba(data_dir: str) -> Optional[str]:
  for path in (os.path.join(data_dir, CELEBA_FILE),
               os.path.join(data_dir, "celeba", CELEBA_FILE)):
    if os.path.exists(path):
      return path
  return None


def available_real_problems(data_dir: str) -> list[str]:
  """The real-data problems whose files are present in ``data_dir``."""
  found = []
  if find_celeba(data_dir):
    found.append("celeba")
  if find_pcba(data_dir):
    found.append("pcba")
  return found
