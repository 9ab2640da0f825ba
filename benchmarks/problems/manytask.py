"""``manytask``: many (128; 32 in the quick suite) imbalanced binary tasks.

A synthetic stand-in for the PubChem BioAssay study of the LBTW paper (Liu
et al., AAAI 2019): every sample has K latent factors ``z ~ N(0, I)`` and is
observed through ``x = A z + noise``. Task t labels a sample positive when
``w_tᵀ z + τ_t ξ`` exceeds the quantile that gives it its positive rate
``p_t`` (log-uniform in [0.5 %, 30 %]); ``w_t`` mixes a few factors (so tasks
share structure) and the noise level ``τ_t`` varies from task to task. Loss:
binary cross-entropy per task. Model: a shared ReLU MLP trunk, one logistic
head per task. Metrics: ROC-AUC (primary) and PR-AUC per task (own NumPy
implementations in ``benchmarks/problems/_auc.py``), higher is better.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from benchmarks.problems import Problem
from benchmarks.problems import suite_configs
from benchmarks.problems import _binary

# The quick suite uses 32 tasks: at T = 128 the Gramian strategies
# backpropagate 128 times per step and some solve T×T problems T times
# per step (UPGrad), minutes per strategy on 2 CPU cores. The paper suite
# uses the 128 tasks of the LBTW study. num_steps is the most steps: the
# single-task models stop early (100-500 steps); UPGrad's step costs
# ~0.1 s here (3 seeds), so the budget bounds the suite's time.
_QUICK = dict(num_tasks=32, num_factors=16, input_dim=64, hidden=32,
              depth=2, num_train=4000, num_test=4000, batch_size=64,
              num_steps=600, learning_rate=3e-3)
CONFIGS = suite_configs(
    _QUICK, num_steps=1200,
    # The LBTW study's 128 tasks (`--suite paper`): hours on 2 CPU cores.
    paper=dict(num_tasks=128, num_factors=32, input_dim=128, hidden=256,
               depth=3, num_train=40000, num_test=20000, batch_size=256,
               num_steps=5000, learning_rate=1e-3))


def generate(num_tasks, num_factors, input_dim, num_samples, seed=7):
  """Features ``[N, D]`` and labels ``[N, T]`` (and the positive rates)."""
  rng = np.random.default_rng(seed)
  mixing = rng.normal(size=(num_factors, input_dim)) / np.sqrt(num_factors)
  # Each task reads 3 of the factors, with random signs and strengths.
  task_weights = np.zeros((num_factors, num_tasks))
  for t in range(num_tasks):
    chosen = rng.choice(num_factors, 3, replace=False)
    task_weights[chosen, t] = rng.normal(size=3)
  task_weights /= np.linalg.norm(task_weights, axis=0, keepdims=True)
  positive_rates = np.exp(rng.uniform(np.log(0.005), np.log(0.3), num_tasks))
  noise_levels = rng.uniform(0.1, 1.0, num_tasks)
  latent = rng.normal(size=(num_samples, num_factors))
  features = latent @ mixing + 0.3 * rng.normal(size=(num_samples, input_dim))
  scores = latent @ task_weights + noise_levels * rng.normal(
      size=(num_samples, num_tasks))
  thresholds = np.array([np.quantile(scores[:, t], 1.0 - positive_rates[t])
                         for t in range(num_tasks)])
  labels = (scores > thresholds).astype(np.float32)
  return features.astype(np.float32), labels, positive_rates, noise_levels


def make(suite: str = "quick", data_dir: Optional[str] = None,
         **overrides) -> Problem:
  del data_dir
  cfg = dict(CONFIGS[suite], **overrides)
  num_train, num_test = cfg["num_train"], cfg["num_test"]
  features, labels, rates, noise = generate(
      cfg["num_tasks"], cfg["num_factors"], cfg["input_dim"],
      num_train + num_test)
  mask = np.ones_like(labels, bool)
  train = (features[:num_train], labels[:num_train], mask[:num_train])
  test = (features[num_train:], labels[num_train:], mask[num_train:])
  return _binary.make_binary_problem(
      "manytask", [f"task{t:03d}" for t in range(cfg["num_tasks"])],
      train, test, hidden=cfg["hidden"], depth=cfg["depth"],
      batch_size=cfg["batch_size"], num_steps=cfg["num_steps"],
      learning_rate=cfg["learning_rate"],
      description=(
          f"{cfg['num_tasks']} imbalanced binary tasks (positive rates "
          "0.5 %–30 %, varying label noise) over "
          f"{cfg['num_factors']} shared latent factors; {cfg['depth']}-layer "
          f"ReLU trunk ({cfg['hidden']} units), logistic heads; {num_train} "
          f"training samples, Adam {cfg['learning_rate']}, "
          f"{cfg['num_steps']} steps of batch {cfg['batch_size']}. Primary "
          "metric: test ROC-AUC (higher is better)."),
      extra={"config": cfg, "positive_rates": rates.tolist(),
             "noise_levels": noise.tolist()})
