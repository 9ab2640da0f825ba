"""Configurations that follow two loss-weighting papers on their data sets.

* ``celeba`` (:mod:`benchmarks.papers.celeba_ema`): CelebA's 40 attributes,
  a CNN trunk in Flax NNX with one head per attribute; ``ema``, ``rema`` and
  ``dwema`` (β = 0.2) against ``equal`` and single-task models, after
  Lakkapragada et al., arXiv:2211.12999.
* ``pcba`` (:mod:`benchmarks.papers.pcba_lbtw`): PubChem BioAssay's 128
  assays from fingerprints, per-assay PR-AUC and the number of assays with
  negative transfer; ``lbtw`` (α = 0.5) against ``equal`` and single-task
  models, after Liu, Liang & Gitter, AAAI 2019.

One command each, given the data folder (the data sets are not shipped)::

  python -m benchmarks.papers celeba --data-dir /data/celeba --out results/
  python -m benchmarks.papers pcba --data-dir /data/pcba --out results/

Both train under ``jax.jit`` on the device JAX picks (a GPU when jax[cuda]
is installed), print one line per epoch (loss, validation metric, elapsed
time), and write ``<out>/<name>.json`` and ``<out>/<name>.md`` with this
run's figures beside the paper's.
"""

PAPERS = ("celeba", "pcba")
